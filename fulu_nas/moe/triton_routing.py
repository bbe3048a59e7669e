"""The eager routing fast path on CUDA: a token-choice router's selection in one Triton kernel and
the stable sort of the slots by expert by counting (``route_kernel`` and ``place_kernel`` in
:mod:`fulu_nas.moe._triton_kernels`).

Eagerly, a layer call waits on its host: the torch ops of the selection (softmax, bias, top-k,
gather, renormalisation) and of the sort (argsort, gather of the sorted ids, binary search of the
group ends) are about twenty small launches; these are two (one for a few tokens). The results are
the torch ops' (same experts, order and ends; weights to the last fp32 bit). Under torch.compile
the torch ops stay (Inductor fuses them), except without a gradient for a few tokens or a few
experts (:func:`route_op_applies`), where the routing and its sort are one custom op
(:func:`route_op`): there a compiled call's routing was about ten kernels, longer on the device than
the routing kernel and its sort, and the op chooses exactly the eager call's experts. Launchers
only; nothing here imports triton (:func:`fulu_nas.moe.triton_moe._kernels` does, at the first
launch).
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from .experts import group_ends, inverse_permutation, sort_by_expert
from .routing import Routing, logits_backward
from .triton_moe import TOPK_MAX_EXPERTS, _cdiv, _kernels, _next_pow2, scores_block_tokens, usable

# Without a gradient the routing kernel computes the logits itself: for a few tokens (at most
# ``SMALL_LOGITS_MAX_TOKENS``, up to ``SMALL_LOGITS_MAX_EXPERTS`` experts) with fp32 accuracy (tf32x3
# products, each warp a quarter of the hidden width: H200, 16 tokens, hidden 512, 8 experts, the
# whole routing kernel 5.2 us, against 13.1 with one warp's chain of products and 24.4 with fp32
# broadcast products; the router GEMM's launches, an fp32 copy of x and cuBLAS, cost ~100 us of host
# time on an H200 host); for more tokens (or experts) and bf16 input by the bf16 split of
# :func:`fulu_nas.moe.routing.router_logits` on tensor cores (its ``out_dtype`` GEMM took ~150 us of
# host time per call, H200, 32,768 tokens); fp16 and fp32 input keep the fp32 products up to
# ``FP32_LOGITS_MAX_TOKENS`` tokens (16 a program).
SMALL_LOGITS_MAX_TOKENS = 16
SMALL_LOGITS_MAX_EXPERTS = 32
FP32_LOGITS_MAX_TOKENS = 64
SPLIT_LOGITS_MAX_EXPERTS = 256
# ... but past ``SPLIT_LOGITS_ANY_TOKENS_MAX_EXPERTS`` experts only up to
# ``SPLIT_LOGITS_MAX_TOKEN_EXPERTS`` tokens x experts: each program splits and multiplies every
# expert's gate columns for its few tokens, which at many tokens and experts costs more device time
# than the split GEMM outside the kernel, whose launches cost host time (what counts below). H200,
# the eager GELU layer (hidden 1024, FFN 512, top-2), us a call: 256 experts, 32,768 tokens 1069 in
# the kernel against 807 outside; 8,192 tokens 513 against 568; 128 experts, 32,768 tokens 683
# against 722 (top-8, FFN 256: 1199 against 1165); 64 experts 633-790 against 706-748.
SPLIT_LOGITS_ANY_TOKENS_MAX_EXPERTS = 32
SPLIT_LOGITS_MAX_TOKEN_EXPERTS = 2**22
# With the logits in the kernel, each program multiplies every expert's gate columns: from 128
# experts and ``SPLIT_LOGITS_WIDE_TILE_MIN_TOKENS`` tokens a program takes 32 tokens (not 16) in two
# pipeline stages (not three), reading the gate half as often. H200, hidden 1024, the routing alone
# (device time, us, benchmarks/routing_kernel.py): 128 experts top-2 at 8,192 / 32,768 tokens 44.8 ->
# 30.5 / 149.4 -> 132.0, top-8 53.3 -> 37.1 / 179.8 -> 160.1; 256 experts top-2 116.9 -> 54.1 /
# 461.7 -> 219.7, top-8 126.6 -> 71.5; at 2,048 tokens the 16-token tiles stay the faster.
SPLIT_LOGITS_WIDE_TILE_MIN_TOKENS = 8192
# From ``SPLIT_LOGITS_WIDER_TILE_MIN_TOKENS`` tokens the best tile at 128 expert lanes depends on
# the slots a token takes: at top-2 a program takes 64 tokens, at top-8 three stages. H200, hidden
# 1024, the routing alone (us, 24 tiles swept): top-2 at 16,384 / 32,768 tokens 67.5 -> 50.4 /
# 130.5 -> 97.9; top-8 83.0 -> 73.0 / 160.3 -> 141.8. At 256 expert lanes, top-8 (or more), a
# program takes its 32 tokens in 8 warps and 3 stages: 16,384 tokens 220.9 -> 158.3 us (192 experts
# 177.5 -> 164.6; the eager GELU layer, FFN 512, 1137 -> 1101 us a call); at top-4 (125.6 against
# 131.5) and at 8,192 tokens (72.8 against 79.5) the 4-warp tile stays the faster.
SPLIT_LOGITS_WIDER_TILE_MIN_TOKENS = 16384
# The counting sort reads every block's counts in each program: it runs where there are at most
# this many (blocks x experts) counts, else the layer takes torch's stable argsort (the counts
# grow with tokens x experts: at 32,768 tokens the seed config's 8 experts stay inside, 128 do not).
PLACE_MAX_COUNTS = 2**15
# ... and where a program's slots x expert lanes stay at most this many: the rank of each slot among
# its expert's is a cumulative sum over a (slots x lanes) one-hot tile, which Triton scans through
# shared memory (H200: 256 slots x 256 lanes asked for 262,144 bytes of the 232,448 a block has).
PLACE_MAX_TILE = 2**15


def route_usable(x_TD: Tensor, k: int, num_experts: int) -> bool:
    """Whether :func:`launch_route` can route ``x_TD`` (eager callers: it has no custom op)."""
    return usable(x_TD) and x_TD.dim() == 2 and 1 <= k <= num_experts <= TOPK_MAX_EXPERTS


def logits_in_kernel(x_TD: Tensor, num_experts: int) -> int:
    """How the routing kernel computes the logits of ``x_TD`` itself (no gradient): 1 with fp32
    accuracy (a few tokens), 2 by the bf16 split on tensor cores (bf16 input); 0: it reads them."""
    tokens, few_experts = x_TD.shape[0], num_experts <= SMALL_LOGITS_MAX_EXPERTS
    if few_experts and tokens <= SMALL_LOGITS_MAX_TOKENS:
        return 1
    few_for_split = (num_experts <= SPLIT_LOGITS_ANY_TOKENS_MAX_EXPERTS
                     or tokens * num_experts <= SPLIT_LOGITS_MAX_TOKEN_EXPERTS)
    if x_TD.dtype == torch.bfloat16 and num_experts <= SPLIT_LOGITS_MAX_EXPERTS and few_for_split:
        return 2
    return 1 if few_experts and tokens <= FP32_LOGITS_MAX_TOKENS else 0


# Cached: these run several times in every eager call (host time).
@functools.lru_cache(maxsize=4096)
def _experts_pow2(num_experts: int) -> int:
    """The kernels' expert lanes: a power of two, at least 16."""
    return max(16, _next_pow2(num_experts))


@functools.lru_cache(maxsize=4096)
def _route_block(tokens: int, num_experts: int, logits: int, k: int) -> tuple[int, int, int, int]:
    """(tokens per program, hidden columns per step, warps, pipeline stages) of the routing kernel
    for its ``LOGITS`` mode and ``k`` slots a token."""
    e_pow2 = _experts_pow2(num_experts)
    if logits == 0:
        return scores_block_tokens(e_pow2), 0, 4, 3
    if logits == 2:
        if tokens >= SPLIT_LOGITS_WIDER_TILE_MIN_TOKENS:
            if e_pow2 == 128 and k <= 2:
                return 64, 64, 4, 2
            if e_pow2 == 128 and k >= 8:
                return 32, 64, 4, 3
            if e_pow2 == 256 and k >= 8:
                return 32, 64, 8, 3
        if e_pow2 >= 128 and tokens >= SPLIT_LOGITS_WIDE_TILE_MIN_TOKENS:
            return 32, 64, 4, 2
        return max(16, scores_block_tokens(e_pow2)), 64, 4, 3  # tensor-core tiles: at least 16 rows
    return 16, 128, 4, 3  # four warps' quarters of 128 columns: each a product of depth 32


def launch_route(logits_TE: Tensor | None, x_TD: Tensor, gate_ED: Tensor | None, bias_E: Tensor, k: int,
                 score_func: str, renormalize: bool, scaling: float,
                 top_p: float | None) -> Routing:  # pragma: no cover
    """Token-choice selection in one kernel (:func:`fulu_nas.moe.routing.select_experts` on the
    scores of ``logits_TE``, or with ``logits_TE=None`` of ``x_TD @ gate_ED^T`` computed in the
    kernel, as :func:`logits_in_kernel` says): a :class:`Routing` with ``expert_TK`` (int64),
    ``weight_TK``, ``active_TK``, ``probs_TE``, ``logits_TE`` (fp32), ``counts_BE`` with
    ``rows_per_block`` (how many of each block's slots chose each expert, for
    :func:`launch_place`), and ``sorted_slots``, that sort's ``(order_N, ends_E, inverse_N)`` already
    done where one program routed every token, else None."""
    T, D = x_TD.shape
    E = bias_E.shape[0]
    mode = logits_in_kernel(x_TD, E) if logits_TE is None else 0
    assert logits_TE is not None or mode, "launch_route: logits needed (see logits_in_kernel)"
    fused = mode > 0
    block_t, block_d, warps, stages = _route_block(T, E, mode, k)
    dev = x_TD.device
    blocks = _cdiv(T, block_t)
    k_pow2 = max(2, _next_pow2(k))
    # One program sees every slot: it sorts them too, where its ranking tile fits.
    place = blocks == 1 and place_tile_fits(block_t * k_pow2, E)
    if fused:
        logits_TE = torch.empty((T, E), dtype=torch.float32, device=dev)
        x_TD = x_TD if x_TD.stride(-1) == 1 else x_TD.contiguous()
        gate_ED = gate_ED.contiguous()
    elif logits_TE.stride(-1) != 1:
        logits_TE = logits_TE.contiguous()
    r = Routing(expert_TK=torch.empty((T, k), dtype=torch.int64, device=dev),
                weight_TK=torch.empty((T, k), dtype=torch.float32, device=dev),
                active_TK=torch.empty((T, k), dtype=torch.bool, device=dev),
                probs_TE=torch.empty((T, E), dtype=torch.float32, device=dev), logits_TE=logits_TE,
                counts_BE=torch.empty((blocks, E), dtype=torch.int32, device=dev), rows_per_block=block_t * k,
                sorted_slots=(torch.empty(T * k, dtype=torch.int64, device=dev),
                              torch.empty(E, dtype=torch.int32, device=dev),
                              torch.empty(T * k, dtype=torch.int64, device=dev)) if place else None)
    if T == 0:
        return r
    order_N, ends_E, inverse_N = r.sorted_slots or (logits_TE,) * 3
    _kernels().route_kernel[(blocks,)](
        logits_TE, x_TD, gate_ED if fused else logits_TE, bias_E, r.expert_TK, r.weight_TK, r.active_TK,
        r.probs_TE, logits_TE, r.counts_BE, order_N, inverse_N, ends_E, T, E, D, logits_TE.stride(0), x_TD.stride(0),
        float(scaling), float(top_p) if top_p is not None else 1.0,
        K=k, K_POW2=k_pow2, LOGITS=mode, SIGMOID=score_func == "sigmoid",
        RENORMALIZE=renormalize, HAS_TOP_P=top_p is not None, PLACE=place, BLOCK_T=block_t, BLOCK_D=max(block_d, 1),
        E_POW2=_experts_pow2(E), num_warps=warps, num_stages=stages)
    return r


class _RouteWeightsGrad(torch.autograd.Function):
    """The routing kernel's weights and probabilities as functions of the logits, for training: the
    forward returns the kernel's outputs, the backward is one kernel (``route_backward_kernel``)
    where recomputing them with torch ops for autograd took about six launches forward and a dozen
    backward, each waited on by the GPU in an eager step."""

    @staticmethod
    def forward(ctx, logits_TE, weight_TK, probs_TE, expert_TK, active_TK, sigmoid, renormalize,
                scaling):  # pragma: no cover
        ctx.save_for_backward(logits_TE, expert_TK, active_TK)
        ctx.options = (sigmoid, renormalize, scaling)
        ctx.set_materialize_grads(False)
        return weight_TK, probs_TE

    @staticmethod
    def backward(ctx, grad_weight_TK, grad_probs_TE):  # pragma: no cover
        logits_TE, expert_TK, active_TK = ctx.saved_tensors
        dlogits_TE = launch_route_backward(logits_TE, expert_TK, active_TK, grad_weight_TK, grad_probs_TE,
                                           *ctx.options)
        return dlogits_TE, None, None, None, None, None, None, None


def launch_route_backward(logits_TE: Tensor, expert_TK: Tensor, active_TK: Tensor, grad_weight_TK: Tensor | None,
                          grad_probs_TE: Tensor | None, sigmoid: bool, renormalize: bool,
                          scaling: float) -> Tensor:  # pragma: no cover
    """The logits' fp32 gradient from the gradients of :func:`launch_route`'s weights and
    probabilities (either may be None): ``route_backward_kernel``."""
    T, E = logits_TE.shape
    dlogits_TE = torch.empty((T, E), dtype=torch.float32, device=logits_TE.device)
    if T:
        block_t = scores_block_tokens(_experts_pow2(E))
        gw = grad_weight_TK.contiguous() if grad_weight_TK is not None else dlogits_TE
        gp = dlogits_TE
        if grad_probs_TE is not None:  # a broadcast row (stride 0) is read as it is
            gp = grad_probs_TE if grad_probs_TE.stride(-1) == 1 else grad_probs_TE.contiguous()
        _kernels().route_backward_kernel[(_cdiv(T, block_t),)](
            logits_TE, expert_TK, active_TK, gw, gp, dlogits_TE, T, E, logits_TE.stride(0), gp.stride(0),
            float(scaling),
            K=expert_TK.shape[1], SIGMOID=sigmoid, RENORMALIZE=renormalize, HAS_GW=grad_weight_TK is not None,
            HAS_GP=grad_probs_TE is not None, BLOCK_T=block_t, E_POW2=_experts_pow2(E), num_warps=4)
    return dlogits_TE


def with_logits_gradient(routing: Routing, score_func: str, renormalize: bool, scaling: float) -> None:
    """Make ``routing``'s weights and probabilities (from :func:`launch_route` on logits that need a
    gradient) differentiable with respect to those logits."""
    routing.weight_TK, routing.probs_TE = _RouteWeightsGrad.apply(
        routing.logits_TE, routing.weight_TK, routing.probs_TE, routing.expert_TK, routing.active_TK,
        score_func == "sigmoid", renormalize, scaling)


class _KernelLogitsGrad(torch.autograd.Function):
    """The logits the routing kernel computed from bf16 ``x`` and the fp32 gate, as a function of
    both, for training: the backward of :class:`fulu_nas.moe.routing.SplitLogits`, which computes
    the same logits outside the kernel."""

    @staticmethod
    def forward(ctx, x_TD, gate_ED, logits_TE):  # pragma: no cover
        ctx.save_for_backward(x_TD, gate_ED)
        return logits_TE

    @staticmethod
    def backward(ctx, dlogits_TE):  # pragma: no cover
        x_TD, gate_ED = ctx.saved_tensors
        return *logits_backward(dlogits_TE, x_TD, gate_ED, *ctx.needs_input_grad[:2]), None


def with_input_gradient(routing: Routing, x_TD: Tensor, gate_ED: Tensor) -> None:
    """Make ``routing.logits_TE``, computed by :func:`launch_route` from bf16 ``x_TD`` and
    ``gate_ED`` in the kernel, differentiable with respect to both."""
    routing.logits_TE = _KernelLogitsGrad.apply(x_TD, gate_ED, routing.logits_TE)


def place_tile_fits(slots: int, num_experts: int) -> bool:
    """Whether one program can rank ``slots`` slots among ``num_experts`` experts (see
    ``PLACE_MAX_TILE``)."""
    return max(16, _next_pow2(slots)) * _experts_pow2(num_experts) <= PLACE_MAX_TILE


def place_usable(counts_BE: Tensor, rows_per_block: int) -> bool:
    """Whether the counting sort (:func:`launch_place`) runs on these block counts of
    ``rows_per_block`` slots each, else torch's stable argsort."""
    B, E = counts_BE.shape
    return B * _experts_pow2(E) <= PLACE_MAX_COUNTS and place_tile_fits(rows_per_block, E)


def launch_place(expert_N: Tensor, counts_BE: Tensor,
                 rows_per_block: int) -> tuple[Tensor, Tensor, Tensor]:  # pragma: no cover
    """``(order_N, ends_E, inverse_N)``: the stable argsort of the flat expert ids ``expert_N``
    (int64), the int32 group ends and the inverse permutation (slot n is sorted row ``inverse[n]``),
    by counting from :func:`launch_route`'s block counts (equal to
    :func:`fulu_nas.moe.experts.sort_by_expert`, ``searchsorted`` on the sorted ids and
    :func:`fulu_nas.moe.experts.inverse_permutation`)."""
    N = expert_N.shape[0]
    B, E = counts_BE.shape
    order_N = torch.empty(N, dtype=torch.int64, device=expert_N.device)
    inverse_N = torch.empty_like(order_N)
    if N == 0:
        return order_N, torch.zeros(E, dtype=torch.int32, device=expert_N.device), inverse_N
    ends_E = torch.empty(E, dtype=torch.int32, device=expert_N.device)
    e_pow2 = _experts_pow2(E)
    _kernels().place_kernel[(B,)](expert_N, counts_BE, order_N, inverse_N, ends_E, N, E, B, rows_per_block,
                                  ROWS_POW2=max(16, _next_pow2(rows_per_block)), E_POW2=e_pow2,
                                  BLOCK_B=max(1, 4096 // e_pow2), num_warps=4)
    return order_N, ends_E, inverse_N


def sorted_slots(r: Routing) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(order_N, ends_E, inverse_N)`` of :func:`launch_route`'s choices where its programs did not
    sort them: the counting sort where its counts fit (:func:`place_usable`), which writes the
    inverse permutation too; else torch's stable argsort, the inverse left to whoever needs it
    (``None``: the second GEMM that writes its rows in slot order does not)."""
    expert_N = r.expert_TK.reshape(-1)
    if place_usable(r.counts_BE, r.rows_per_block):
        return launch_place(expert_N, r.counts_BE, r.rows_per_block)
    num_experts = r.counts_BE.shape[1]
    order_N = sort_by_expert(expert_N, num_experts)
    return order_N, group_ends(expert_N[order_N], num_experts).to(torch.int32), None


# A compiled call without a gradient routes through :func:`route_op` (where the kernel computes the
# logits) when it has at most ``ROUTE_OP_MAX_TOKENS`` tokens, or at any size with at most
# ``ROUTE_OP_MAX_EXPERTS`` experts and ``ROUTE_OP_MAX_SLOT_LANES`` experts x slots: there the kernel
# and its sort took less device time than the torch ops Inductor fuses (about ten kernels). H200,
# GELU layers, 32,768 tokens, compiled and replayed from one CUDA graph, us a call: 8 experts top-2
# (hidden 512) 702.5 against 727.3, top-1 374.5 / 401.9, top-4 755.8 / 778.6; hidden 1024: 16
# experts top-4 705.6 / 742.4, 32 experts top-4 739.9 / 757.7, 16 experts top-8 (hidden 512) 831.8 /
# 849.1; slower with 48 experts top-2 (495.6 / 475.0), 32 top-8 (902.0 / 887.6), 128 top-8
# (1100.7 / 977.0), where the kernel's logits (every expert's gate columns in every program) cost more.
ROUTE_OP_MAX_TOKENS = 64
ROUTE_OP_MAX_EXPERTS = 32
ROUTE_OP_MAX_SLOT_LANES = 128


def route_op_applies(x_TD: Tensor, k: int, num_experts: int) -> bool:
    """Whether a compiled call without a gradient routes ``x_TD`` through :func:`route_op`, as an
    eager call does (so both choose the same experts in the same order): logits the kernel computes,
    and a few tokens, or few experts and slots. H200, the seed layer (GELU) compiled and replayed
    from a CUDA graph, 16 tokens: 25.7-27.5 us a call against 35.6-37.1 with the torch ops."""
    if not (route_usable(x_TD, k, num_experts) and logits_in_kernel(x_TD, num_experts) > 0):
        return False
    return x_TD.shape[0] <= ROUTE_OP_MAX_TOKENS or (
        num_experts <= ROUTE_OP_MAX_EXPERTS and num_experts * k <= ROUTE_OP_MAX_SLOT_LANES)


# typing.Optional (not ``X | None``): the schema inference of torch 2.11 reads it for sure.
@torch.library.custom_op("fulu_nas::route", mutates_args=())
def route_op(x: Tensor, gate: Tensor, bias: Tensor, k: int, score_func: str, renormalize: bool, scaling: float,
             top_p: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # noqa: UP045  # pragma: no cover
    """:func:`launch_route` computing the logits itself, then its sort: ``(expert_TK, weight_TK,
    active_TK, probs_TE, logits_TE, order_N, ends_E, inverse_N)`` (see
    :class:`fulu_nas.moe.routing.Routing`), for compiled inference (:func:`route_op_applies`): the
    same choices as an eager call."""
    r = launch_route(None, x, gate, bias, k, score_func, renormalize, scaling, top_p)
    order_N, ends_E, inverse_N = r.sorted_slots or sorted_slots(r)
    if inverse_N is None:  # an op returns tensors: the argsort's inverse, computed here
        inverse_N = inverse_permutation(order_N)
    return r.expert_TK, r.weight_TK, r.active_TK, r.probs_TE, r.logits_TE, order_N, ends_E, inverse_N


@route_op.register_fake
def _(x, gate, bias, k, score_func, renormalize, scaling, top_p):
    T, E = x.shape[0], gate.shape[0]
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((T, k), dtype=torch.int64), x.new_empty((T, k), **f32), x.new_empty((T, k), dtype=torch.bool),
            x.new_empty((T, E), **f32), x.new_empty((T, E), **f32), x.new_empty((T * k,), dtype=torch.int64),
            x.new_empty((E,), dtype=torch.int32), x.new_empty((T * k,), dtype=torch.int64))
