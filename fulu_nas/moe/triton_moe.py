"""Triton MoE experts on CUDA: gather fused into the first grouped GEMM's loads, SwiGLU and the
routing weight into its epilogue, the un-permute into the second's stores (or, for large groups,
the second GEMM as ``torch._grouped_mm`` and the un-permute into the slot sum's loads).

Depends on torch and the standard library: triton is imported only when a kernel first runs
(:mod:`fulu_nas.moe._triton_kernels`), so this module imports anywhere and nothing changes on the
CPU. The kernels are wrapped as ``torch.library`` custom ops (``fulu_nas::moe_experts``,
``fulu_nas::moe_experts_train``, ``fulu_nas::moe_experts_backward``, ``fulu_nas::topk_indices``)
with fake implementations, so ``torch.compile(fullgraph=True)`` keeps them in its graph and CUDA
graphs capture them (no host syncs inside).

Inference takes ``moe_experts``. Training takes ``moe_experts_train`` (eagerly the autograd
Function ``_ExpertsTrainEager``, which launches the same kernels without the ops' dispatch): the
same kernels, the first one also storing the pre-activation (gate and up), or at large groups the
first GEMM as ``torch._grouped_mm`` over gathered rows (:func:`first_gemm_by_grouped_mm`), with a
registered backward
(``moe_experts_backward``, one opaque op: four ``torch._grouped_mm`` GEMMs and one Triton pass for
the activation's and the routing weight's gradients). The top-k op returns indices only (no
gradient flows through a selection), so the routers use it in training too.

Shape suffixes as in :mod:`fulu_nas.moe.layer`.
"""

import functools
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from .experts import _grouped_mm, as_contiguous, inverse_permutation

# FULU_NAS_TRITON=0 switches the Triton kernels off (the grouped_mm path and torch.topk: the code
# before them, for before/after benchmarks in one run).
HAS_TRITON = importlib.util.find_spec("triton") is not None and os.environ.get("FULU_NAS_TRITON", "1") != "0"
# TRITON_INTERPRET=1 runs the kernels on CPU tensors (slow; for developing the kernels only).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TOPK_MAX_EXPERTS = 4096

_KERNELS = None


def _kernels():  # pragma: no cover
    global _KERNELS
    if _KERNELS is None:
        from . import _triton_kernels

        _KERNELS = _triton_kernels
    return _KERNELS


def _exporting() -> bool:
    # torch.export (non-strict, the default) leaves the custom ops out, so that exported programs
    # load with torch alone. Dynamo folds is_exporting() to True while it traces (torch 2.11), so
    # is_dynamo_compiling() tells torch.compile apart (a strict export would keep the ops).
    return torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()


def direct_call() -> bool:
    """Whether an eager caller may launch the kernels itself rather than through their custom op.
    Eagerly, the op's dispatch (schema check, autograd and fake-tensor wrappers) costs more host
    time than the kernels' launches; torch.compile needs the op (its graph holds it)."""
    return not torch.compiler.is_compiling()


def usable(x: Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``'s device (CUDA, or the interpreter)."""
    return HAS_TRITON and (x.is_cuda or INTERPRET) and not _exporting()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def scores_block_tokens(e_pow2: int) -> int:
    """Tokens per program of the kernels that take a token's top k from its ``e_pow2`` score lanes (the
    top-k and routing kernels): 2048 scores a program, the fastest of 1024-8192 (H200)."""
    return max(1, min(64, 2048 // e_pow2))


def _pow2_at_most(n: int, cap: int) -> int:
    p = 16
    while p * 2 <= min(n, cap):
        p *= 2
    return p


# Tile shapes: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Chosen by rows per expert
# (the M of each group): small groups (decode) are bound by reading the weights and want small M
# tiles and many programs; large groups want 128-row tiles. Measured on H200 (BENCHMARKS.md).
# Cached, as the routing kernel's block rule: they run on every eager launch (host time).
@functools.lru_cache(maxsize=4096)
def up_config(n_rows: int, experts: int, hidden: int, ffn: int, single_accumulator: bool = False
              ) -> tuple[int, int, int, int, int]:
    """``single_accumulator``: GELU inference (one accumulator, no pre-activation store), where
    large groups took other tiles: H200, bf16, 32,768 tokens, the experts alone, against
    (128, 128, 32, 8, 5): hidden 1024 with (128, 256, 64, 8, 4): 8 experts (FFN 512) 0.418 ->
    0.395 ms, 256 experts 0.572 -> 0.509, 128 experts (FFN 256, top-8) 0.990 -> 0.906. Hidden 512
    (8 experts, FFN 2048): (64, 128, 32, 4, 5) with the erf GELU (0.794 -> 0.721), then
    (128, 128, 64, 8, 3) with the kernels' erfc GELU (``_normal_cdf``; 0.754 -> 0.680, the best of
    12 tiles; at hidden 1024 the tile above stayed the best of 12). SwiGLU kept its tiles (0.860
    against 0.865-0.866 for the best others); training was not swept."""
    per_expert = n_rows / max(experts, 1)
    if per_expert <= 16:
        if single_accumulator:  # GELU decode (H200, seed layer, 16 tokens, both GEMMs graphed): 17.5 -> 16.7 us
            return 16, _pow2_at_most(ffn, 128), 128, 4, 5
        return 16, _pow2_at_most(ffn, 128), 64, 4, 4
    if per_expert <= 32:
        return 32, _pow2_at_most(ffn, 64), 128, 4, 3
    if per_expert <= 64:
        return 64, _pow2_at_most(ffn, 64), 64, 4, 3
    if single_accumulator:
        return (128, _pow2_at_most(ffn, 128), 64, 8, 3) if hidden <= 512 else (128, _pow2_at_most(ffn, 256), 64, 8, 4)
    return 128, _pow2_at_most(ffn, 128), 32, 8, 5


@functools.lru_cache(maxsize=4096)
def down_config(n_rows: int, experts: int, ffn: int, hidden: int) -> tuple[int, int, int, int, int]:
    per_expert = n_rows / max(experts, 1)
    if per_expert <= 16:  # two warps, five stages: 17.5 -> 16.3 us (as up_config's decode figure)
        return 16, _pow2_at_most(hidden, 64), 128, 2, 5
    if per_expert <= 32:
        return 32, _pow2_at_most(hidden, 64), 128, 4, 3
    if per_expert <= 64 or _cdiv(n_rows, 128) * _cdiv(hidden, 256) < 512:
        # fewer than ~4 programs per multiprocessor with the large tile: smaller tiles fill the chip
        return 64, _pow2_at_most(hidden, 128), 64, 4, 4
    return 128, _pow2_at_most(hidden, 256), 32, 8, 4


# Overrides for experiments (benchmark sweeps): None, or a 5-tuple as above.
UP_CONFIG: tuple | None = None
DOWN_CONFIG: tuple | None = None
# Override of second_gemm_by_grouped_mm (tests, sweeps): None, True or False.
GROUPED_MM_SECOND: bool | None = None
GROUPED_MM_SECOND_MIN_ROWS_PER_EXPERT = 2048
# ... or from half that per expert when the call has this many rows (a large grid of tiles)
GROUPED_MM_SECOND_LARGE_CALL_ROWS = 131072


def second_gemm_by_grouped_mm(act_NF: Tensor, w2_EFD: Tensor, b2_ED: Tensor | None) -> bool:
    """Whether the second GEMM runs as ``torch._grouped_mm`` (CUTLASS on Hopper, rows written in
    expert order; the combine then gathers each token's rows through the inverse permutation)
    rather than ``down_scatter_kernel`` (rows written in slot order).

    Measured on H200 in bf16 (layer device time, ``down_scatter_kernel`` -> grouped_mm):
    fine-grained (128 experts, FFN 256, top-8) at 32,768 tokens 1.277 -> 1.169 ms, at 4,096 0.273
    -> 0.271; seed (8 experts, FFN 2048, top-2) at 32,768 0.960 -> 0.944, at 4,096 0.220 -> 0.227,
    at 16 tokens 0.071-0.083 -> 0.093. On H100 (bench throughput, compiled and graphed, scatter
    -> grouped_mm): 256 experts (FFN 512, top-8) at 32,768 tokens, 1,024 rows per expert and
    262,144 in all, 23.4 -> 24.3 M tok/s; the seed config at 4,096 tokens (1,024 rows per expert,
    8,192 in all) 21.7 -> 20.2; 256 experts at 4,096 tokens 11.4 -> 10.9. So grouped_mm from
    2,048 rows per expert, or from 1,024 in calls of at least 131,072 rows (bf16 only, on Hopper or
    later). ``GROUPED_MM_SECOND`` overrides the rule. The bias term ``b2[e] * weight[n]`` lives in
    the Triton kernel's epilogue, so a bias keeps that kernel."""
    if b2_ED is not None:
        return False
    if GROUPED_MM_SECOND is not None:
        return GROUPED_MM_SECOND
    E, F, D = w2_EFD.shape
    N = act_NF.shape[0]
    large = N >= GROUPED_MM_SECOND_MIN_ROWS_PER_EXPERT * E or (
        N >= GROUPED_MM_SECOND_LARGE_CALL_ROWS and N >= GROUPED_MM_SECOND_MIN_ROWS_PER_EXPERT // 2 * E)
    return (act_NF.is_cuda and act_NF.dtype == torch.bfloat16 and F % 8 == 0 and D % 8 == 0 and large
            and torch.cuda.get_device_capability(act_NF.device) >= (9, 0))


# Override of first_gemm_by_grouped_mm (tests, sweeps): None, True or False.
GROUPED_MM_FIRST: bool | None = None
GROUPED_MM_FIRST_MIN_ROWS_PER_EXPERT = 2048


def first_gemm_by_grouped_mm(x_TD: Tensor, n_rows: int, w13_EDW: Tensor, b13_EW: Tensor | None,
                             training: bool) -> bool:
    """Whether the first GEMM runs as ``torch._grouped_mm`` over a gathered copy of the rows (and the
    activation as its own pass, :func:`launch_act_forward`) rather than ``gather_up_kernel``.

    ``gather_up_kernel`` reads each token's row through the sort order inside its A-tile loads,
    which cannot use Hopper's TMA. Measured on H200 at the seed config with GELU (65,536 rows, 8
    experts, FFN 2048): with the pre-activation store for the backward it took 0.60 ms, where CUTLASS
    took 0.25 ms from gathered rows and the activation pass 0.20 ms; forward + backward 3.18 -> 3.13
    ms (SwiGLU 3.87 -> 3.74). Training keeps the gathered copy for the backward's weight gradient,
    which gathered the same rows anyway. Inference keeps ``gather_up_kernel`` (without the store it
    won: 1.013 against 1.047 ms). Chosen for training calls from 2,048 rows per expert (bf16, Hopper
    or later, no expert bias); ``GROUPED_MM_FIRST`` overrides the rule (except the bias, which lives
    in the Triton epilogue)."""
    if b13_EW is not None:
        return False
    if GROUPED_MM_FIRST is not None:
        return GROUPED_MM_FIRST
    E, D, W = w13_EDW.shape
    return (training and x_TD.is_cuda and x_TD.dtype == torch.bfloat16 and D % 8 == 0 and W % 8 == 0
            and n_rows >= GROUPED_MM_FIRST_MIN_ROWS_PER_EXPERT * E
            and torch.cuda.get_device_capability(x_TD.device) >= (9, 0))


class SortIndex:
    """Indices derived from the sort order ``order_N`` (row n holds flat slot ``order[n]``), each
    computed once when first needed: the forward and the backward of one eager training call share
    them (each is a launch or three of host time an eager step waits on)."""

    def __init__(self, order_N: Tensor, k_slots: int, inverse_N: Tensor | None = None):
        self.order_N, self.k_slots = order_N, k_slots
        if inverse_N is not None:  # the counting sort wrote it: set in place of the cached property
            self.inverse_N = inverse_N

    @functools.cached_property
    def token_N(self) -> Tensor:
        """Row n's token, ``order[n] // k_slots``."""
        return self.order_N // self.k_slots

    @functools.cached_property
    def inverse_N(self) -> Tensor:
        """The inverse permutation: slot s is row ``inverse[s]``."""
        return inverse_permutation(self.order_N)


def launch_experts(x_TD: Tensor, order_N: Tensor, weight: Tensor, ends_E: Tensor, w13_EDW: Tensor,
                   w2_EFD: Tensor, b13_EW: Tensor | None, b2_ED: Tensor | None, k_slots: int,
                   swiglu: bool, weight_sorted: bool, combine: bool,
                   save_for_backward: bool = False, index: SortIndex | None = None):  # pragma: no cover
    """Both grouped GEMMs. With ``combine`` (token choice) each token's ``k_slots`` rows are summed
    (the row of sorted position n is flat slot ``order[n]``): returns (N // k_slots, D). Without,
    returns (N, D) in sorted order (expert choice combines with index_add). With
    ``save_for_backward`` returns ``(out, pre_NW, act_NF, x_ND)``: also the pre-activation (gate and
    up), the weighted activation and, where the first GEMM ran from a gathered copy of the rows
    (:func:`first_gemm_by_grouped_mm`), that copy (else ``(0, D)``), which the backward needs.
    ``index``: the sort's derived indices, shared with the backward (else computed here)."""
    kern = _kernels()
    index = index or SortIndex(order_N, k_slots)
    N, D = order_N.shape[0], x_TD.shape[1]
    E, F = w2_EFD.shape[0], w2_EFD.shape[1]
    dtype = x_TD.dtype
    x_TD = x_TD if x_TD.stride(-1) == 1 else x_TD.contiguous()
    w13 = as_contiguous(w13_EDW, dtype)
    w2 = as_contiguous(w2_EFD, dtype)
    b13 = b13_EW.contiguous() if b13_EW is not None else None
    b2 = b2_ED.contiguous() if b2_ED is not None else None
    if N == 0:
        no_rows = x_TD.new_empty((0, D))
        return (no_rows, x_TD.new_empty((0, w13.shape[2])), x_TD.new_empty((0, F)), no_rows) if save_for_backward \
            else no_rows
    e_pow2 = max(2, _next_pow2(E))
    fp32 = dtype == torch.float32

    x_ND = None  # the gathered rows kept for the backward, where the first GEMM gathered them
    if first_gemm_by_grouped_mm(x_TD, N, w13, b13, save_for_backward):
        x_ND = x_TD[index.token_N]
        pre_NW = _grouped_mm(x_ND, w13, offs=ends_E)
        act_NF = launch_act_forward(pre_NW, weight, order_N, swiglu, weight_sorted)
    else:
        act_NF = torch.empty((N, F), dtype=dtype, device=x_TD.device)
        # Inference stores no pre-activation (STORE_PRE off): the kernel gets the activation's
        # pointer in its place, which it never writes through.
        pre_NW = torch.empty((N, w13.shape[2]), dtype=dtype, device=x_TD.device) if save_for_backward else act_NF
        bm, bn, bk, warps, stages = UP_CONFIG or up_config(N, E, D, F, not (swiglu or save_for_backward))
        grid = ((_cdiv(N, bm) + E) * _cdiv(F, bn),)
        kern.gather_up_kernel[grid](
            x_TD, order_N, weight, ends_E, w13, b13 if b13 is not None else w13, act_NF, pre_NW,
            N, D, F, E, k_slots,
            x_TD.stride(0), w13.stride(0), w13.stride(1), b13.stride(0) if b13 is not None else 0,
            act_NF.stride(0), pre_NW.stride(0), HAS_BIAS=b13 is not None, SWIGLU=swiglu,
            WEIGHT_SORTED=weight_sorted, STORE_PRE=save_for_backward,
            EVEN_K=D % bk == 0, EVEN_N=F % bn == 0, FP32=fp32,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, E_POW2=e_pow2, num_warps=warps, num_stages=stages)

    if second_gemm_by_grouped_mm(act_NF, w2, b2):
        y_ND = _grouped_mm(act_NF, w2, offs=ends_E)  # rows in expert order
        out = _sum_slots(y_ND, index.inverse_N, k_slots) if combine else y_ND
    else:
        # Rows written in slot order: each token's rows are contiguous (one slot: that is the output).
        y_ND = torch.empty((N, D), dtype=dtype, device=x_TD.device)
        bm, bn, bk, warps, stages = DOWN_CONFIG or down_config(N, E, F, D)
        grid = ((_cdiv(N, bm) + E) * _cdiv(D, bn),)  # an upper bound: the group ends are on the device
        kern.down_scatter_kernel[grid](
            act_NF, order_N, weight, ends_E, w2, b2 if b2 is not None else w2, y_ND, N, F, D, E,
            act_NF.stride(0), w2.stride(0), w2.stride(1), b2.stride(0) if b2 is not None else 0, y_ND.stride(0),
            HAS_BIAS=b2 is not None, SCATTER=combine, WEIGHT_SORTED=weight_sorted,
            EVEN_K=F % bk == 0, EVEN_N=D % bn == 0, FP32=fp32,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, E_POW2=e_pow2, num_warps=warps, num_stages=stages)
        out = _sum_slots(y_ND, None, k_slots) if combine and k_slots > 1 else y_ND
    if not save_for_backward:
        return out
    return out, pre_NW, act_NF, x_ND if x_ND is not None else x_TD.new_empty((0, D))


def _sum_slots(y_ND: Tensor, row_N: Tensor | None, k_slots: int) -> Tensor:  # pragma: no cover
    """``out[t] = sum_k y[row(t*k_slots + k)]`` in fp32, returned in ``y``'s dtype: rows in slot
    order (``row_N`` None), or gathered through ``row_N`` (the inverse permutation of the sort)."""
    N, D = y_ND.shape
    T = N // k_slots
    out = y_ND.new_empty((T, D))
    bt, bd = SUM_CONFIG
    _kernels().sum_slots_kernel[(_cdiv(T, bt), _cdiv(D, bd))](
        y_ND, row_N if row_N is not None else y_ND, out, T, D, K=k_slots, GATHER=row_N is not None,
        BLOCK_T=bt, BLOCK_D=bd, num_warps=4)
    return out


# (BLOCK_T, BLOCK_D) of the combine.
SUM_CONFIG = (16, 256)


# typing.Optional (not ``X | None``): the schema inference of torch 2.11 reads it for sure.
@torch.library.custom_op("fulu_nas::moe_experts", mutates_args=())
def moe_experts(x: Tensor, order: Tensor, weight: Tensor, ends: Tensor, w13: Tensor, w2: Tensor,
                b13: Optional[Tensor], b2: Optional[Tensor], k_slots: int, swiglu: bool,  # noqa: UP045
                weight_sorted: bool, combine: bool, inverse: Optional[Tensor] = None) -> Tensor:  # noqa: UP045  # pragma: no cover
    """Sorted-dispatch experts (see :func:`launch_experts`). ``order``: sorted row -> flat slot
    (token = slot // k_slots); ``weight``: routing weights, by sorted row (``weight_sorted``) or
    by flat slot; ``ends``: int32 cumulative rows per expert; ``inverse``: ``order``'s inverse
    permutation where the sort wrote it (else computed where needed)."""
    return launch_experts(x, order, weight, ends, w13, w2, b13, b2, k_slots, swiglu, weight_sorted, combine,
                          index=SortIndex(order, k_slots, inverse))


@moe_experts.register_fake
def _(x, order, weight, ends, w13, w2, b13, b2, k_slots, swiglu, weight_sorted, combine, inverse=None):
    rows = order.shape[0] // k_slots if combine else order.shape[0]
    return x.new_empty((rows, x.shape[1]))


@torch.library.custom_op("fulu_nas::moe_experts_train", mutates_args=())
def moe_experts_train(x: Tensor, order: Tensor, weight: Tensor, ends: Tensor, w13: Tensor, w2: Tensor,
                      b13: Optional[Tensor], b2: Optional[Tensor], k_slots: int, swiglu: bool,  # noqa: UP045
                      weight_sorted: bool, combine: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # pragma: no cover
    """:func:`moe_experts` for training: returns ``(out, pre, act, x_rows)``; only ``out`` is
    differentiable (the backward, :func:`_experts_backward`, reads the others)."""
    return launch_experts(x, order, weight, ends, w13, w2, b13, b2, k_slots, swiglu, weight_sorted, combine,
                          save_for_backward=True)


@moe_experts_train.register_fake
def _(x, order, weight, ends, w13, w2, b13, b2, k_slots, swiglu, weight_sorted, combine):
    N = order.shape[0]
    rows = N // k_slots if combine else N
    gathered = N if N and first_gemm_by_grouped_mm(x, N, w13, b13, True) else 0
    return (x.new_empty((rows, x.shape[1])), x.new_empty((N, w13.shape[2])), x.new_empty((N, w2.shape[1])),
            x.new_empty((gathered, x.shape[1])))


def _setup_context(ctx, inputs, output) -> None:
    x, order, weight, ends, w13, w2, b13, b2, k_slots, swiglu, weight_sorted, combine = inputs
    _, pre, act, x_rows = output
    ctx.save_for_backward(x, order, weight, ends, w13, w2, b13, b2, pre, act, x_rows)
    ctx.k_slots, ctx.swiglu, ctx.weight_sorted, ctx.combine = k_slots, swiglu, weight_sorted, combine
    ctx.direct = False  # the backward through its op (see :class:`_ExpertsTrainEager`)
    ctx.mark_non_differentiable(pre, act, x_rows)
    # Autograd would otherwise fill a zero gradient for ``pre``, ``act`` and ``x_rows``, which nothing
    # reads: writes of N rows each (80 us apiece at the seed config on an H200).
    ctx.set_materialize_grads(False)


def _experts_backward(ctx, grad_out: Tensor | None, _grad_pre, _grad_act, _grad_x_rows):  # pragma: no cover
    if grad_out is None:  # the loss does not depend on the output
        return (None,) * 12
    x, order, weight, ends, w13, w2, b13, b2, pre, act, x_rows = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    args = (grad_out, x, order, weight, ends, w13, w2, b13, b2, pre, act, x_rows, ctx.k_slots, ctx.swiglu,
            ctx.weight_sorted, ctx.combine, need_dx)
    dx, dweight, dw13, dw2, db13, db2 = (experts_backward(*args, index=ctx.index) if ctx.direct
                                         else moe_experts_backward(*args))
    return (dx if need_dx else None, None, dweight, None, dw13, dw2, db13 if b13 is not None else None,
            db2 if b2 is not None else None, None, None, None, None)


# One opaque op for the whole backward: under torch.compile, inductor would otherwise be free to
# lay out the transposed GEMM operands contiguously, which puts the per-expert row counts on a
# contiguous dimension where grouped_mm needs them to be multiples of 16 bytes.
@torch.library.custom_op("fulu_nas::moe_experts_backward", mutates_args=())
def moe_experts_backward(grad_out: Tensor, x: Tensor, order: Tensor, weight: Tensor, ends: Tensor, w13: Tensor,
                         w2: Tensor, b13: Optional[Tensor], b2: Optional[Tensor], pre: Tensor,  # noqa: UP045
                         act: Tensor, x_rows: Tensor, k_slots: int, swiglu: bool, weight_sorted: bool,
                         combine: bool, need_dx: bool) -> list[Tensor]:  # pragma: no cover
    """:func:`experts_backward` as an op (what a compiled backward graph holds)."""
    return experts_backward(grad_out, x, order, weight, ends, w13, w2, b13, b2, pre, act, x_rows, k_slots, swiglu,
                            weight_sorted, combine, need_dx)


def experts_backward(grad_out: Tensor, x: Tensor, order: Tensor, weight: Tensor, ends: Tensor, w13: Tensor,
                     w2: Tensor, b13: Tensor | None, b2: Tensor | None, pre: Tensor, act: Tensor, x_rows: Tensor,
                     k_slots: int, swiglu: bool, weight_sorted: bool, combine: bool,
                     need_dx: bool, index: SortIndex | None = None) -> list[Tensor]:  # pragma: no cover
    """Gradients ``[dx, dweight, dw13, dw2, db13, db2]`` of :func:`moe_experts_train` (a missing bias
    and an unneeded dx give empty tensors). The four GEMMs are ``torch._grouped_mm`` (transposed
    weights for the data gradients; the weight gradients group the reduction dimension by
    expert); the activation's backward and the routing-weight gradient are one Triton pass
    (:func:`launch_act_backward`); for token choice each token sums its K rows' input gradients
    through the inverse permutation (no atomics). ``x_rows``: the forward's gathered rows, or empty
    (the weight gradient then gathers them)."""
    K, N, dtype = k_slots, order.shape[0], x.dtype
    index = index or SortIndex(order, K)
    token_N = index.token_N
    # out[t] sums the rows written to slots t*K..t*K+K-1: row n's output gradient is its token's.
    dy_ND = (grad_out[token_N] if combine else grad_out).to(dtype).contiguous()
    w13c, w2c = w13.to(dtype), w2.to(dtype)
    dact_NF = _grouped_mm(dy_ND, w2c.transpose(-2, -1), offs=ends)
    dw2 = _grouped_mm(act.t(), dy_ND, offs=ends).to(w2.dtype)
    dpre_NW, dweight_N = launch_act_backward(dact_NF, pre, weight, order, swiglu, weight_sorted)
    x_ND = x_rows if x_rows.shape[0] == N else x[token_N]
    dw13 = _grouped_mm(x_ND.t(), dpre_NW, offs=ends).to(w13.dtype)
    dx = x.new_empty(0)
    if need_dx:
        dx_ND = _grouped_mm(dpre_NW, w13c.transpose(-2, -1), offs=ends)
        if combine:  # every slot holds one row: each token sums its K rows in fp32, in one kernel
            dx = _sum_slots(dx_ND, index.inverse_N, K)
        else:  # expert choice: a token may be in several rows
            dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(
                0, token_N, dx_ND.float()).to(dtype)
    db13, db2 = x.new_empty(0), x.new_empty(0)
    if b13 is not None or b2 is not None:
        counts_E = torch.diff(ends, prepend=ends.new_zeros(1))
        expert_N = torch.repeat_interleave(torch.arange(w13.shape[0], device=x.device), counts_E, output_size=N)
        if b13 is not None:
            db13 = torch.zeros(b13.shape, dtype=torch.float32, device=x.device).index_add_(
                0, expert_N, dpre_NW.float()).to(b13.dtype)
        if b2 is not None:  # y = act @ w2 + b2 * weight
            wt_N = weight if weight_sorted else weight[order]
            db2 = torch.zeros(b2.shape, dtype=torch.float32, device=x.device).index_add_(
                0, expert_N, dy_ND.float() * wt_N[:, None].float()).to(b2.dtype)
            bias_N = (dy_ND.float() * b2.float()[expert_N]).sum(-1)  # by sorted row
            dweight_N = dweight_N + (bias_N if weight_sorted else torch.empty_like(bias_N).index_put_((order,), bias_N))
    return [dx, dweight_N.to(weight.dtype), dw13, dw2, db13, db2]


@moe_experts_backward.register_fake
def _(grad_out, x, order, weight, ends, w13, w2, b13, b2, pre, act, x_rows, k_slots, swiglu, weight_sorted,
      combine, need_dx):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(0)

    return [like(x) if need_dx else x.new_empty(0), like(weight), like(w13), like(w2), like(b13), like(b2)]


moe_experts_train.register_autograd(_experts_backward, setup_context=_setup_context)


class _ExpertsTrainEager(torch.autograd.Function):
    """:func:`moe_experts_train` and its backward for eager callers, launching the kernels directly:
    the custom ops' dispatch (schema checks, the autograd and fake-tensor wrappers) costs more host
    time a training step than an autograd Function (about 100 us per forward and backward on a slow
    host), and an eager training step waits on its host (H200, seed config: 2.5 ms of host time a
    forward + backward against 2.5 ms of device time). Same saved tensors, same backward."""

    @staticmethod
    def forward(ctx, *inputs):  # pragma: no cover
        index = SortIndex(inputs[1], inputs[8])
        outputs = launch_experts(*inputs, save_for_backward=True, index=index)
        _setup_context(ctx, inputs, outputs)
        ctx.direct, ctx.index = True, index
        return outputs

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover
        return _experts_backward(ctx, *grads)


def experts_train(x: Tensor, order: Tensor, weight: Tensor, ends: Tensor, w13: Tensor, w2: Tensor,
                  b13: Tensor | None, b2: Tensor | None, k_slots: int, swiglu: bool, weight_sorted: bool,
                  combine: bool) -> Tensor:  # pragma: no cover
    """The training experts' output: through :class:`_ExpertsTrainEager` eagerly, through the
    :func:`moe_experts_train` op where torch.compile traces (its graph holds the op)."""
    args = (x, order, weight, ends, w13, w2, b13, b2, k_slots, swiglu, weight_sorted, combine)
    return (_ExpertsTrainEager.apply(*args) if direct_call() else moe_experts_train(*args))[0]


# (BLOCK_R, BLOCK_F, num_warps) of the activation's forward pass (after a grouped_mm first GEMM).
ACT_FORWARD_CONFIG = (16, 256, 4)


def launch_act_forward(pre_NW: Tensor, weight: Tensor, order_N: Tensor, swiglu: bool,
                       weight_sorted: bool) -> Tensor:  # pragma: no cover
    """``act = act_fn(pre) * weight`` by sorted row (SwiGLU: ``silu(gate) * up`` of ``pre``'s halves)."""
    N, W = pre_NW.shape
    F = W // 2 if swiglu else W
    act_NF = pre_NW.new_empty((N, F))
    br, bf, warps = ACT_FORWARD_CONFIG
    bf = _pow2_at_most(F, bf)
    _kernels().act_forward_kernel[(_cdiv(N, br), _cdiv(F, bf))](
        pre_NW, weight, order_N, act_NF, N, F, pre_NW.stride(0), act_NF.stride(0),
        SWIGLU=swiglu, WEIGHT_SORTED=weight_sorted, BLOCK_R=br, BLOCK_F=bf, num_warps=warps)
    return act_NF


# (BLOCK_R, BLOCK_F, num_warps) of the activation's backward.
ACT_BACKWARD_CONFIG = (16, 256, 4)


def launch_act_backward(dact_NF: Tensor, pre_NW: Tensor, weight: Tensor, order_N: Tensor, swiglu: bool,
                        weight_sorted: bool) -> tuple[Tensor, Tensor]:  # pragma: no cover
    """``(d pre, d weight)`` of ``act = act_fn(pre) * weight`` (see the kernel): the weight's gradient
    laid out as the weight is (by sorted row with ``weight_sorted``, else by flat slot)."""
    N, F = dact_NF.shape
    dpre_NW = torch.empty_like(pre_NW)
    dweight_N = torch.empty((N,), dtype=torch.float32, device=dact_NF.device)
    if N == 0:
        return dpre_NW, dweight_N
    dact_NF = dact_NF.contiguous()
    br, bf, warps = ACT_BACKWARD_CONFIG
    _kernels().act_backward_kernel[(_cdiv(N, br),)](
        dact_NF, pre_NW, weight, order_N, dpre_NW, dweight_N, N, F,
        dact_NF.stride(0), pre_NW.stride(0), dpre_NW.stride(0),
        SWIGLU=swiglu, WEIGHT_SORTED=weight_sorted, BLOCK_R=br, BLOCK_F=_pow2_at_most(F, bf),
        num_warps=warps)
    return dpre_NW, dweight_N


def topk_usable(scores_TE: Tensor, k: int) -> bool:
    return usable(scores_TE) and scores_TE.dim() == 2 and 1 <= k <= scores_TE.shape[1] <= TOPK_MAX_EXPERTS


@torch.library.custom_op("fulu_nas::topk_indices", mutates_args=())
def topk_indices(scores: Tensor, k: int) -> Tensor:  # pragma: no cover
    """``torch.topk(scores, k, dim=-1).indices`` of a 2-D tensor, largest first; equal scores go to
    the lower index."""
    return launch_topk(scores, k)


def launch_topk(scores: Tensor, k: int) -> Tensor:  # pragma: no cover
    """The top-k kernel itself (what :func:`topk_indices` runs)."""
    kern = _kernels()
    T, E = scores.shape
    out = torch.empty((T, k), dtype=torch.int64, device=scores.device)
    if T == 0:
        return out
    e_pow2 = max(16, _next_pow2(E))
    block_t = scores_block_tokens(e_pow2)
    kern.topk_kernel[(_cdiv(T, block_t),)](scores, out, T, E, scores.stride(0),
                                            K=k, BLOCK_T=block_t, E_POW2=e_pow2, num_warps=4)
    return out


@topk_indices.register_fake
def _(scores, k):
    return scores.new_empty((scores.shape[0], k), dtype=torch.int64)


