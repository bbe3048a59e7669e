"""Triton kernels of the MoE fast path (imported only by :mod:`fulu_nas.moe.triton_moe`, lazily,
when a kernel is first launched: importing it needs triton).

Shape suffixes: T tokens, D hidden, F expert width, E experts, K slots per token, N = T*K
dispatched rows (sorted by expert). Rows are found through ``order_N`` (the stable argsort of the
flat expert ids): sorted row n is flat slot ``order_N[n]`` = token ``order_N[n] // K``.

- ``gather_up_kernel``: ``act[n] = act_fn(x[order[n] // K] @ w13[e] + b13[e]) * weight[n]`` for the
  rows n of expert e. The token gather happens in the A-tile loads (no (N, D) gathered copy), and
  SwiGLU's gate and up halves are two accumulators of one program, so the (N, 2F) pre-activation
  never reaches memory in inference (training stores it for the backward: ``STORE_PRE``).
- ``down_scatter_kernel``: ``y[order[n]] = act[n] @ w2[e] + b2[e] * weight[n]``: the output rows are
  written in token-slot order, so the combine is a contiguous sum over K.
- ``sum_slots_kernel``: each token's K rows summed in fp32 (deterministic), read in slot order or
  gathered through the inverse permutation (after a ``torch._grouped_mm`` second GEMM, which
  writes rows in expert order); torch's reduction over the middle dimension took 0.20 ms where
  this reads the same 512 MB in about 0.14 (fine-grained config, 32,768 tokens).
- ``act_forward_kernel``: ``act = act_fn(pre) * weight`` over stored pre-activations, where the first
  GEMM ran as ``torch._grouped_mm`` from gathered rows (training at large groups: TMA loads).
- ``act_backward_kernel``: the activation's and routing weight's backward in one pass over the rows
  (training): from ``d act`` and the stored pre-activation, ``d pre`` and each row's ``d weight``
  (a full row per program, so the weight gradient is summed without atomics: deterministic).
- ``topk_kernel``: indices of the k largest entries of each row (descending, ties to the lower
  index), for the routers' selection.
- ``route_kernel``: a token-choice router's whole selection from its logits (or, for a few tokens,
  from ``x`` and the gate) in one pass, with each block's expert counts; ``place_kernel`` turns
  those counts into the stable sort of the slots by expert and the group ends (a counting sort):
  two launches where the eager torch ops took about twenty, whose host time the GPU waited on.
  ``route_backward_kernel``: in training, the logits' gradient through those weights and
  probabilities in one pass (where torch's autograd ran a dozen small kernels).

Every program of the grouped GEMMs finds its (expert, row block) from the group ends alone
(prefix sum of per-expert block counts), so the grid is a static upper bound (``cdiv(N, BM) + E``
row blocks) and nothing is read on the host. GPU-only: excluded from CPU coverage.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_launch import CachedLauncher


@triton.jit
def _group_table(ends_ptr, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):  # pragma: no cover
    """Per expert (lanes < E): its first row, end row, row blocks and cumulative row blocks."""
    idx = tl.arange(0, E_POW2)
    valid = idx < E
    ends = tl.load(ends_ptr + idx, mask=valid, other=0).to(tl.int32)
    starts = tl.load(ends_ptr + idx - 1, mask=valid & (idx > 0), other=0).to(tl.int32)
    blocks = tl.where(valid, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    return starts, ends, blocks, tl.cumsum(blocks, 0)


@triton.jit
def _locate(pid_m, starts, ends, blocks, cum, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):  # pragma: no cover
    """(expert, first row, end row) of row block ``pid_m`` in a :func:`_group_table`; expert >= E
    means no work."""
    idx = tl.arange(0, E_POW2)
    e = tl.sum((cum <= pid_m).to(tl.int32), 0)
    first_block = tl.sum(tl.where(idx == e, cum - blocks, 0), 0)
    start = tl.sum(tl.where(idx == e, starts, 0), 0)
    end = tl.sum(tl.where(idx == e, ends, 0), 0)
    return e, start + (pid_m - first_block) * BLOCK_M, end


@triton.jit
def _program_tile(ends_ptr, E, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # pragma: no cover
                  E_POW2: tl.constexpr):
    """This program's tile of a grouped GEMM with one tile a program: (expert, first row, end row,
    column block); expert >= E means no work."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(num_cols, BLOCK_N)
    starts, ends, blocks, cum = _group_table(ends_ptr, E, BLOCK_M, E_POW2)
    e, row0, row_end = _locate(pid // num_n, starts, ends, blocks, cum, BLOCK_M, E_POW2)
    return e, row0, row_end, pid % num_n


@triton.jit
def _fast_reciprocal(x):  # pragma: no cover
    """1 / x by the SFU's approximate reciprocal (within 1 ulp, subnormals flushed): ``1 / x`` and
    ``tl.fdiv(..., ieee_rounding=False)`` compile to a division with range checks, four FMULs, two
    compares and a select an element more (SASS of the seed's first GEMM, sm_90)."""
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _plain_reciprocal(x):  # pragma: no cover
    return 1.0 / x


# Triton's interpreter (CPU tests) runs no inline PTX.
_reciprocal = _fast_reciprocal if isinstance(_fast_reciprocal, triton.runtime.JITFunction) else _plain_reciprocal


@triton.jit
def _normal_cdf(x):  # pragma: no cover
    """The standard normal CDF Phi(x) = erfc(-x / sqrt 2) / 2 in fp32, from erfc of |x| by the Chebyshev
    fit of Numerical Recipes (``erfcc``, fractional error < 1.2e-7 everywhere), in place of
    ``0.5 * (1 + erf(x / sqrt 2))`` through libdevice's ``erf``: cheaper with large tiles (H200, seed
    first GEMM with GELU, 128x128x64 tiles: 547 -> 435 us), and more accurate for negative x, where
    ``1 + erf`` cancels: against a float64 GELU, bf16 results differ for 1.2e-5 of N(0, 1) inputs
    (8.9e-5 with the erf form) and 8.4e-5 of N(0, 2^2) ones (1.8e-2).

    erfc(z) = t * exp(P(t) - z^2) with t = 1 / (1 + z / 2), z = |x| / sqrt 2. The exponent is taken in
    base 2: the coefficients below are Numerical Recipes' (0.17087277, -0.82215223, ..., 1.00002368,
    -1.26551223) times log2(e), the constant term less 1 (the halving), so that besides the
    reciprocal and the exp2 an element costs one FMA a coefficient and four more operations: in the
    seed's first GEMM 17.5 FP32 instructions an element, where the form in base e with a division
    took 26.5 (SASS, sm_90), and 415 us where it took 455 (H200, 32,768 tokens)."""
    t = _reciprocal(1.0 + tl.abs(x) * 0.35355339059327373)
    p = 0.24651729790196045 * t + -1.1861149450768025
    p = p * t + 2.147474463933521
    p = p * t + -1.637753152343414
    p = p * t + 0.40232158165127635
    p = p * t + -0.2687568603388257
    p = p * t + 0.1396300565225048
    p = p * t + 0.5397006155284324
    p = p * t + 1.4427292039075317
    p = p * t + -2.825748218405333
    half_erfc = t * tl.exp2(p - (x * 0.7213475204444817) * x)  # x^2 / 2 * log2(e)
    return tl.where(x < 0, half_erfc, 1.0 - half_erfc)


@triton.jit
def gather_up_kernel(  # pragma: no cover
    x_ptr, order_ptr, weight_ptr, ends_ptr, w_ptr, b_ptr, out_ptr, pre_ptr,
    N, D, F, E, K_SLOTS,
    stride_xt, stride_we, stride_wd, stride_be, stride_on, stride_pn,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, WEIGHT_SORTED: tl.constexpr, STORE_PRE: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
):
    e, row0, row_end, pid_n = _program_tile(ends_ptr, E, F, BLOCK_M, BLOCK_N, E_POW2)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    # Rows past the group read slot 0's token (always valid) and are never stored.
    src = tl.load(order_ptr + rows, mask=rmask, other=0)
    tok = (src // K_SLOTS).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :]
    w_base = w_ptr + e.to(tl.int64) * stride_we
    g_ptrs = w_base + ks[:, None] * stride_wd + cols[None, :]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + ks)[None, :] < D, other=0.0)
        if EVEN_K and EVEN_N:
            g = tl.load(g_ptrs)
        else:
            g = tl.load(g_ptrs, mask=((k0 + ks)[:, None] < D) & cmask[None, :], other=0.0)
        if FP32:
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
        else:
            acc_g = tl.dot(a, g, acc_g)
        if SWIGLU:
            if EVEN_K and EVEN_N:
                u = tl.load(g_ptrs + F)
            else:
                u = tl.load(g_ptrs + F, mask=((k0 + ks)[:, None] < D) & cmask[None, :], other=0.0)
            if FP32:
                acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wd
    if HAS_BIAS:
        b_row = b_ptr + e.to(tl.int64) * stride_be + cols
        acc_g += tl.load(b_row, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc_u += tl.load(b_row + F, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:  # gate (and up) before the activation, for the backward
        pre_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_pn + cols[None, :]
        smask = rmask[:, None] & cmask[None, :]
        tl.store(pre_ptrs, acc_g.to(pre_ptr.dtype.element_ty), mask=smask)
        if SWIGLU:
            tl.store(pre_ptrs + F, acc_u.to(pre_ptr.dtype.element_ty), mask=smask)
    if WEIGHT_SORTED:
        wt = tl.load(weight_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    else:
        wt = tl.load(weight_ptr + src, mask=rmask, other=0.0).to(tl.float32)
    if SWIGLU:
        h = acc_g * tl.sigmoid(acc_g) * acc_u
    else:  # exact GELU, x * Phi(x), as torch's default
        h = acc_g * _normal_cdf(acc_g)
    h = h * wt[:, None]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_on + cols[None, :]
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def down_scatter_kernel(  # pragma: no cover
    h_ptr, order_ptr, weight_ptr, ends_ptr, w_ptr, b_ptr, out_ptr,
    N, F, D, E,
    stride_hn, stride_we, stride_wf, stride_be, stride_on,
    HAS_BIAS: tl.constexpr, SCATTER: tl.constexpr, WEIGHT_SORTED: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
):
    e, row0, row_end, pid_n = _program_tile(ends_ptr, E, D, BLOCK_M, BLOCK_N, E_POW2)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    # Rows past the group read a valid row (clamped) and are never stored.
    a_rows = tl.minimum(rows, N - 1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + a_rows[:, None] * stride_hn + ks[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wf + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + ks)[None, :] < F, other=0.0)
        if EVEN_K and EVEN_N:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=((k0 + ks)[:, None] < F) & cmask[None, :], other=0.0)
        if FP32:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wf
    if SCATTER:
        dest = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        dest = rows.to(tl.int64)
    if HAS_BIAS:
        if WEIGHT_SORTED:
            wt = tl.load(weight_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        else:
            wt = tl.load(weight_ptr + dest, mask=rmask, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + e.to(tl.int64) * stride_be + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += wt[:, None] * bias[None, :]
    out_ptrs = out_ptr + dest[:, None] * stride_on + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def sum_slots_kernel(y_ptr, row_ptr, out_ptr, T, D, K: tl.constexpr, GATHER: tl.constexpr,  # pragma: no cover
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[t] = sum_k y[r(t*K + k)]`` in fp32, in slot order: the combine after the second GEMM.
    ``r`` is the identity (rows already in slot order, ``down_scatter_kernel``), or with ``GATHER``
    the slot's row ``row_ptr[t*K + k]`` (rows in expert order: the inverse permutation)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < T
    mask = rmask[:, None] & (cols < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        if GATHER:
            src = tl.load(row_ptr + rows * K + k, mask=rmask, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64) * K + k
        acc += tl.load(y_ptr + src[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_weights(weight_ptr, order_ptr, rows, rmask, WEIGHT_SORTED: tl.constexpr):  # pragma: no cover
    """fp32 routing weights of sorted rows ``rows``: stored by sorted row, or by flat slot (read
    through the sort order)."""
    if WEIGHT_SORTED:
        return tl.load(weight_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    src = tl.load(order_ptr + rows, mask=rmask, other=0)
    return tl.load(weight_ptr + src, mask=rmask, other=0.0).to(tl.float32)


@triton.jit
def act_forward_kernel(pre_ptr, weight_ptr, order_ptr, act_ptr, N, F, stride_pn, stride_an,  # pragma: no cover
                       SWIGLU: tl.constexpr, WEIGHT_SORTED: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """``act = act_fn(pre) * weight`` for a BLOCK_R x BLOCK_F tile (SwiGLU: ``silu(gate) * up`` from
    ``pre``'s two halves), computed in fp32 from the stored pre-activation: the activation after a
    ``torch._grouped_mm`` first GEMM."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    rmask = rows < N
    mask = rmask[:, None] & (cols < F)[None, :]
    wt = _row_weights(weight_ptr, order_ptr, rows, rmask, WEIGHT_SORTED)
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(pre_ptr + r64 * stride_pn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if SWIGLU:
        u = tl.load(pre_ptr + r64 * stride_pn + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
    else:  # exact GELU, x * Phi(x), as torch's default
        h = g * _normal_cdf(g)
    tl.store(act_ptr + r64 * stride_an + cols[None, :], (h * wt[:, None]).to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def act_backward_kernel(dact_ptr, pre_ptr, weight_ptr, order_ptr, dpre_ptr, dweight_ptr,  # pragma: no cover
                        N, F, stride_dn, stride_pn, stride_gn,
                        SWIGLU: tl.constexpr, WEIGHT_SORTED: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Backward of ``act = act_fn(pre) * weight`` for BLOCK_R rows: ``dpre`` (gate and up halves for
    SwiGLU) and ``dweight = sum_f dact[n, f] * act_fn(pre)[n, f]`` (fp32), stored where the weight
    is read: by sorted row, or at the row's flat slot ``order[n]``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    wt = _row_weights(weight_ptr, order_ptr, rows, rmask, WEIGHT_SORTED)
    r64 = rows.to(tl.int64)[:, None]
    dw = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = rmask[:, None] & (cols < F)[None, :]
        da = tl.load(dact_ptr + r64 * stride_dn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(pre_ptr + r64 * stride_pn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if SWIGLU:
            u = tl.load(pre_ptr + r64 * stride_pn + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(g)
            silu = g * s
            dw += tl.sum(da * silu * u, 1)
            da = da * wt[:, None]
            tl.store(dpre_ptr + r64 * stride_gn + cols[None, :],
                     (da * u * s * (1.0 + g * (1.0 - s))).to(dpre_ptr.dtype.element_ty), mask=mask)
            tl.store(dpre_ptr + r64 * stride_gn + F + cols[None, :], (da * silu).to(dpre_ptr.dtype.element_ty),
                     mask=mask)
        else:  # exact GELU
            cdf = _normal_cdf(g)
            dw += tl.sum(da * g * cdf, 1)
            dgelu = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
            tl.store(dpre_ptr + r64 * stride_gn + cols[None, :],
                     (da * wt[:, None] * dgelu).to(dpre_ptr.dtype.element_ty), mask=mask)
    dst = rows if WEIGHT_SORTED else tl.load(order_ptr + rows, mask=rmask, other=0)
    tl.store(dweight_ptr + dst, dw, mask=rmask)


@triton.jit
def topk_kernel(s_ptr, out_ptr, T, E, stride_t,  # pragma: no cover
                K: tl.constexpr, BLOCK_T: tl.constexpr, E_POW2: tl.constexpr):
    """Indices of the K largest of each row, largest first; NaN counts as +inf (as torch.topk);
    equal values go to the lower index."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = tl.arange(0, E_POW2)
    cmask = cols < E
    v = tl.load(s_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
    v = tl.where(v != v, float("inf"), v)
    taken = (cols[None, :] >= E) | (rows[:, None] < 0)  # padding columns are never chosen
    for j in range(K):
        m = tl.max(tl.where(taken, float("-inf"), v), 1)
        idx = tl.min(tl.where((v == m[:, None]) & ~taken, cols[None, :], E_POW2), 1)
        tl.store(out_ptr + rows.to(tl.int64) * K + j, idx.to(tl.int64), mask=rmask)
        taken = taken | (cols[None, :] == idx[:, None])


@triton.jit
def _sorted_positions(e, cols, base):  # pragma: no cover
    """Where the stable order by expert puts each of these slots (expert ``e``, in slot order; a lane
    past the experts for none): its expert's ``base`` (the position of the first of this program's
    slots of that expert) plus its rank among them."""
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)
    rank = tl.sum(onehot * tl.cumsum(onehot, 0), 1) - 1
    return tl.sum(onehot * base[None, :], 1) + rank


@triton.jit
def route_kernel(logits_ptr, x_ptr, gate_ptr, bias_ptr, expert_ptr, weight_ptr, active_ptr, probs_ptr,
                 logits_out_ptr, counts_ptr, order_ptr, inverse_ptr, ends_ptr, T, E, D, stride_lt,  # pragma: no cover
                 stride_xt, scaling, top_p, K: tl.constexpr, K_POW2: tl.constexpr, LOGITS: tl.constexpr,
                 SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_TOP_P: tl.constexpr,
                 PLACE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, E_POW2: tl.constexpr):
    """Token-choice routing of BLOCK_T tokens in one pass, as :func:`fulu_nas.moe.routing.select_experts`
    computes it from the logits: scores (softmax or sigmoid), the top K of ``scores + bias``
    (descending, ties to the lower index, NaN as +inf), their scores as weights (top-p masking,
    renormalisation, scaling), the normalised probabilities, and how many of the block's
    BLOCK_T*K slots chose each expert (``counts[block, e]``, for :func:`place_kernel`).
    ``LOGITS``: 0 reads them from ``logits_ptr``; otherwise ``x @ gate^T`` is computed here and
    stored, 1 with fp32 accuracy (a few tokens; tf32x3 tensor-core products), 2 for bf16 ``x`` as
    :func:`fulu_nas.moe.routing.router_logits` does: the fp32 gate split into bf16 high and low
    parts, two tensor-core products accumulated in fp32. ``PLACE`` (one program, all tokens): also
    the counting sort of :func:`place_kernel` (``order``, ``inverse``, ``ends``), saving its launch."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = tl.arange(0, E_POW2)
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    if LOGITS == 0:
        logits = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_lt + cols[None, :], mask=mask,
                         other=float("-inf")).to(tl.float32)
    else:
        # LOGITS 1: a few tokens in one program, where the (BLOCK_T x E) tile is one warp's mma and a
        # loop over D would be one dependent chain of products: each of the four warps takes a
        # quarter of every D step (a batched dot), summed at the end; tf32x3 keeps fp32 accuracy.
        acc = tl.zeros((BLOCK_T, E_POW2), dtype=tl.float32)
        acc4 = tl.zeros((4, BLOCK_T, E_POW2), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            xv = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xt + dd[None, :],
                         mask=rmask[:, None] & dmask[None, :], other=0.0)
            wv = tl.load(gate_ptr + cols[:, None] * D + dd[None, :], mask=cmask[:, None] & dmask[None, :],
                         other=0.0).to(tl.float32)
            if LOGITS == 1:
                xq = tl.permute(tl.reshape(xv.to(tl.float32), [BLOCK_T, 4, BLOCK_D // 4]), [1, 0, 2])
                wq = tl.permute(tl.reshape(wv, [E_POW2, 4, BLOCK_D // 4]), [1, 2, 0])
                acc4 = tl.dot(xq, wq, acc4, input_precision="tf32x3")
            else:
                hi = wv.to(tl.bfloat16)
                lo = (wv - hi.to(tl.float32)).to(tl.bfloat16)
                acc = tl.dot(xv, tl.trans(hi), acc)
                acc = tl.dot(xv, tl.trans(lo), acc)
        if LOGITS == 1:
            acc = tl.sum(acc4, 0)
        logits = tl.where(cmask[None, :], acc, float("-inf"))
        tl.store(logits_out_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :], logits, mask=mask)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
        scores = tl.where(cmask[None, :], scores, 0.0)
        probs = scores / tl.maximum(tl.sum(scores, 1), 1e-20)[:, None]
    else:
        shifted = tl.exp(logits - tl.max(logits, 1)[:, None])
        scores = shifted / tl.sum(shifted, 1)[:, None]
        probs = scores
    tl.store(probs_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :], probs, mask=mask)
    bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    sel = scores + bias[None, :]
    sel = tl.where(sel != sel, float("inf"), sel)
    taken = (cols[None, :] >= E) | (rows[:, None] < 0)  # padding columns are never chosen
    slots = tl.arange(0, K_POW2)
    expert_TK = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int32)
    weight_TK = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    active_TK = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int1)
    mass = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(K):
        m = tl.max(tl.where(taken, float("-inf"), sel), 1)
        idx = tl.min(tl.where((sel == m[:, None]) & ~taken, cols[None, :], E_POW2), 1)
        chosen = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(chosen, scores, 0.0), 1)
        if HAS_TOP_P:
            active = mass < top_p  # slot 0 has mass 0 before it: always active
            mass += w
            w = tl.where(active, w, 0.0)
        else:
            active = rows >= 0
        expert_TK = tl.where(slots[None, :] == j, idx[:, None], expert_TK)
        weight_TK = tl.where(slots[None, :] == j, w[:, None], weight_TK)
        active_TK = tl.where(slots[None, :] == j, active[:, None], active_TK)
        taken = taken | chosen
    # The block's count per expert: one reduction across the rows of the chosen lanes after the
    # loop rather than one per slot (each a reduction across warps). H200, 32,768 tokens, 128
    # experts, top-8, logits read: about 83 -> 42 us.
    counts = tl.sum((taken & rmask[:, None] & cmask[None, :]).to(tl.int32), 0)
    if RENORMALIZE:
        weight_TK = weight_TK / tl.maximum(tl.sum(weight_TK, 1), 1e-20)[:, None]
    weight_TK = weight_TK * scaling
    out = rows.to(tl.int64)[:, None] * K + slots[None, :]
    omask = rmask[:, None] & (slots < K)[None, :]
    tl.store(expert_ptr + out, expert_TK.to(tl.int64), mask=omask)
    tl.store(weight_ptr + out, weight_TK, mask=omask)
    tl.store(active_ptr + out, active_TK, mask=omask)
    tl.store(counts_ptr + pid * E + cols, counts, mask=cmask)
    if PLACE:  # as place_kernel, over this program's slots in flat order
        flat_n = tl.reshape(out, [BLOCK_T * K_POW2])
        flat_valid = tl.reshape(omask, [BLOCK_T * K_POW2])
        flat_e = tl.reshape(tl.where(omask, expert_TK, E_POW2), [BLOCK_T * K_POW2])
        ends = tl.cumsum(counts, 0)
        position = _sorted_positions(flat_e, cols, ends - counts).to(tl.int64)
        tl.store(order_ptr + position, flat_n, mask=flat_valid)
        tl.store(inverse_ptr + flat_n, position, mask=flat_valid)
        tl.store(ends_ptr + cols, ends, mask=cmask)


@triton.jit
def route_backward_kernel(logits_ptr, expert_ptr, active_ptr, gw_ptr, gp_ptr, dlogits_ptr, T, E,  # pragma: no cover
                          stride_lt, stride_gp, scaling, K: tl.constexpr, SIGMOID: tl.constexpr,
                          RENORMALIZE: tl.constexpr, HAS_GW: tl.constexpr, HAS_GP: tl.constexpr, BLOCK_T: tl.constexpr,
                          E_POW2: tl.constexpr):
    """Gradient of the logits through :func:`route_kernel`'s weights and probabilities, for BLOCK_T
    tokens: with scores ``s`` (softmax or sigmoid), ``w0[k] = s[e_k] * active[k]``, weights
    ``scaling * w0 / max(sum(w0), 1e-20)`` (renormalised) or ``scaling * w0``, probabilities ``s``
    (softmax) or ``s / max(sum(s), 1e-20)`` (sigmoid); ``gw`` (T, K) and ``gp`` (T, E, rows
    ``stride_gp`` apart: 0 for one row broadcast over the tokens, as the auxiliary loss's) are the
    incoming gradients (either may be absent). The selection itself carries no gradient."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = tl.arange(0, E_POW2)
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)
    logits = tl.load(logits_ptr + r64[:, None] * stride_lt + cols[None, :], mask=mask,
                     other=float("-inf")).to(tl.float32)
    if SIGMOID:
        s = tl.where(cmask[None, :], 1.0 / (1.0 + tl.exp(-logits)), 0.0)
    else:
        shifted = tl.exp(logits - tl.max(logits, 1)[:, None])
        s = shifted / tl.sum(shifted, 1)[:, None]
    gs = tl.zeros((BLOCK_T, E_POW2), dtype=tl.float32)
    if HAS_GW:
        # the selected scores w0 and their sum, slot by slot (as the forward)
        z = tl.zeros((BLOCK_T,), dtype=tl.float32)
        gz = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for j in tl.static_range(K):
            e = tl.load(expert_ptr + r64 * K + j, mask=rmask, other=0)
            a = tl.load(active_ptr + r64 * K + j, mask=rmask, other=0).to(tl.float32)
            g = tl.load(gw_ptr + r64 * K + j, mask=rmask, other=0.0).to(tl.float32)
            w0 = tl.sum(tl.where(cols[None, :] == e[:, None], s, 0.0), 1) * a
            z += w0
            gz += g * w0
        if RENORMALIZE:
            big = z >= 1e-20
            zc = tl.maximum(z, 1e-20)
            for j in tl.static_range(K):
                e = tl.load(expert_ptr + r64 * K + j, mask=rmask, other=0)
                a = tl.load(active_ptr + r64 * K + j, mask=rmask, other=0).to(tl.float32)
                g = tl.load(gw_ptr + r64 * K + j, mask=rmask, other=0.0).to(tl.float32)
                g0 = scaling * (g / zc - tl.where(big, gz / (zc * zc), 0.0)) * a
                gs += tl.where(cols[None, :] == e[:, None], g0[:, None], 0.0)
        else:
            for j in tl.static_range(K):
                e = tl.load(expert_ptr + r64 * K + j, mask=rmask, other=0)
                a = tl.load(active_ptr + r64 * K + j, mask=rmask, other=0).to(tl.float32)
                g = tl.load(gw_ptr + r64 * K + j, mask=rmask, other=0.0).to(tl.float32)
                gs += tl.where(cols[None, :] == e[:, None], (scaling * g * a)[:, None], 0.0)
    if HAS_GP:
        gp = tl.load(gp_ptr + r64[:, None] * stride_gp + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if SIGMOID:
            total = tl.sum(s, 1)
            sc = tl.maximum(total, 1e-20)
            dot = tl.sum(gp * s, 1)
            gs += gp / sc[:, None] - tl.where(total >= 1e-20, dot / (sc * sc), 0.0)[:, None]
        else:
            gs += gp
    if SIGMOID:
        dl = gs * s * (1.0 - s)
    else:
        dl = s * (gs - tl.sum(gs * s, 1)[:, None])
    tl.store(dlogits_ptr + r64[:, None] * E + cols[None, :], dl, mask=mask)


@triton.jit
def place_kernel(expert_ptr, counts_ptr, order_ptr, inverse_ptr, ends_ptr, N, E, num_blocks, ROWS,  # pragma: no cover
                 ROWS_POW2: tl.constexpr, E_POW2: tl.constexpr, BLOCK_B: tl.constexpr):
    """The stable argsort of the flat expert ids by counting (``order[p] = n`` for the slot n at
    sorted position p, and its inverse permutation ``inverse[n] = p``), from the per-block counts of
    :func:`route_kernel` (block b holds slots b*ROWS .. b*ROWS + ROWS - 1): a slot's position is its
    expert's start, plus the same expert's slots in earlier blocks, plus its rank among them in its
    own block. Program 0 also writes the int32 group ends (cumulative counts per expert)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, E_POW2)
    cmask = cols < E
    total = tl.zeros((E_POW2,), dtype=tl.int32)
    before = tl.zeros((E_POW2,), dtype=tl.int32)
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        c = tl.load(counts_ptr + blocks[:, None] * E + cols[None, :],
                    mask=(blocks < num_blocks)[:, None] & cmask[None, :], other=0)
        total += tl.sum(c, 0)
        before += tl.sum(tl.where((blocks < pid)[:, None], c, 0), 0)
    ends = tl.cumsum(total, 0)
    if pid == 0:
        tl.store(ends_ptr + cols, ends, mask=cmask)
    local = tl.arange(0, ROWS_POW2)
    n = pid * ROWS + local
    nmask = (n < N) & (local < ROWS)
    e = tl.load(expert_ptr + n, mask=nmask, other=E_POW2).to(tl.int32)
    position = _sorted_positions(e, cols, ends - total + before).to(tl.int64)
    tl.store(order_ptr + position, n.to(tl.int64), mask=nmask)
    tl.store(inverse_ptr + n, position, mask=nmask)


# The kernels the launchers call, launched through their compiled launchers after the first call of
# each signature (see _triton_launch); in Triton's interpreter they stay as they are.
if isinstance(route_kernel, triton.runtime.JITFunction):  # pragma: no cover
    (gather_up_kernel, down_scatter_kernel, sum_slots_kernel, act_forward_kernel, act_backward_kernel, topk_kernel,
     route_kernel, route_backward_kernel, place_kernel) = (
        CachedLauncher(k) for k in (gather_up_kernel, down_scatter_kernel, sum_slots_kernel, act_forward_kernel,
                                    act_backward_kernel, topk_kernel, route_kernel, route_backward_kernel,
                                    place_kernel))
