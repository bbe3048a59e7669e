"""Routing results and the selection math shared by the score-based routers.

Shape suffixes: T tokens, E experts, K slots per token (top-k or k_max), C tokens per expert.
All routing math runs in fp32 and produces fixed shapes: nothing here syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import triton_moe
from .weight_version import version


@dataclass
class Routing:
    """What a router decided.

    Token-choice routers fill ``expert_TK`` / ``weight_TK`` / ``active_TK`` (slot k of token t goes
    to expert ``expert_TK[t, k]`` with combine weight ``weight_TK[t, k]``; inactive slots are
    unused top-p slots and carry weight 0). Expert-choice fills ``token_N`` / ``weight_N``
    grouped by expert, ``capacity`` (C) slots each (expert e takes tokens ``token_EC[e]``).
    ``probs_TE`` are the normalised router probabilities and ``logits_TE`` the raw logits (both
    ``None`` for the parameter-free hash router); they feed the balancing losses and the
    router-entropy statistic. ``counts_BE``, ``rows_per_block`` and ``sorted_slots``: see
    :func:`fulu_nas.moe.triton_routing.launch_route`.
    """

    expert_TK: Tensor | None = None
    weight_TK: Tensor | None = None
    active_TK: Tensor | None = None
    # Expert choice, flat: expert e takes tokens ``token_N[e * capacity:(e + 1) * capacity]``.
    token_N: Tensor | None = None
    weight_N: Tensor | None = None
    capacity: int = 0
    probs_TE: Tensor | None = None
    logits_TE: Tensor | None = None
    # From the Triton routing kernel (eager, CUDA): how many slots of each block of
    # ``rows_per_block`` flat slots chose each expert, for the layer's counting sort.
    counts_BE: Tensor | None = None
    rows_per_block: int = 0
    # ... or that sort itself, ``(order_N, ends_E, inverse_N)``, where one program routed every token.
    sorted_slots: tuple[Tensor, Tensor, Tensor] | None = None

    # Flat, not (E, C): flattening a (E, C) tensor asks whether C is 1, and torch.export then
    # specialised the program on a capacity of at least 2.
    @property
    def token_EC(self) -> Tensor | None:
        return None if self.token_N is None else self.token_N.view(-1, self.capacity)

    @property
    def weight_EC(self) -> Tensor | None:
        return None if self.weight_N is None else self.weight_N.view(-1, self.capacity)


def jitter(x_TD: Tensor, eps: float, training: bool) -> Tensor:
    """Switch Transformer's multiplicative router-input noise U(1-eps, 1+eps), training only."""
    if not training or eps <= 0:
        return x_TD
    return x_TD * torch.empty_like(x_TD).uniform_(1 - eps, 1 + eps)


SPLIT_GEMM_MIN_MACS = 2**24


def router_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """fp32 router logits ``x @ W^T`` from fp32 weights.

    On CUDA with bf16 activations the fp32 GEMM would run on the slow SIMT path, after an fp32
    copy of ``x``; instead the weight is split into a bf16 high part and a bf16 residual, stacked,
    and one tensor-core GEMM with fp32 output computes both products, whose halves are added: exact
    in the (bf16) input, about 2^-16 relative error in the weight, at bf16 speed (H200, 32,768 x
    1024 x 128: 0.032 ms, against 0.066 for two GEMMs and an add). With a gradient the same forward
    runs inside :class:`SplitLogits`, whose backward is two bf16 GEMMs. The CPU takes the plain fp32
    GEMM, as do small products (below ``SPLIT_GEMM_MIN_MACS`` multiply-adds: a few hundred
    tokens), where the fp32 GEMM is a few microseconds and the ``out_dtype`` GEMM's host time
    (~60 us per call, H200) is what counts.
    """
    if (x_TD.is_cuda and x_TD.dtype == torch.bfloat16
            and x_TD.shape[0] * x_TD.shape[1] * weight_ED.shape[0] >= SPLIT_GEMM_MIN_MACS):
        if torch.is_grad_enabled() and (x_TD.requires_grad or weight_ED.requires_grad):
            return SplitLogits.apply(x_TD, weight_ED)
        return split_logits(x_TD, weight_ED)
    return F.linear(x_TD.float(), weight_ED.float())


def split_logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    """``x @ W^T`` in fp32 for bf16 ``x`` by one tensor-core GEMM of the weight's bf16 split."""
    hi_TE, lo_TE = mm_fp32(x_TD, _split_weight(weight_ED).t()).chunk(2, dim=-1)
    return hi_TE + lo_TE


def mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of low-precision operands with fp32 accumulation and result (the CPU, where the
    ``out_dtype`` GEMM does not exist, multiplies fp32 copies)."""
    return torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else torch.mm(a.float(), b.float())


def logits_backward(dlogits_TE: Tensor, x_TD: Tensor, weight_ED: Tensor, need_dx: bool,
                    need_dweight: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``x`` and of the fp32 weight of the logits ``x @ W^T`` (bf16 ``x``): two GEMMs
    of the logits' gradient rounded to ``x``'s dtype, the weight's with fp32 accumulation and result.
    The fp32 path copies ``x`` to fp32 and runs both on SIMT, then casts ``dx`` back: about 0.2 ms
    of device time per forward + backward at 32,768 tokens of width 512 (H200), in six launches."""
    d_TE = dlogits_TE.to(x_TD.dtype)
    dx_TD = torch.mm(d_TE, weight_ED.to(x_TD.dtype)) if need_dx else None
    dweight_ED = mm_fp32(d_TE.t(), x_TD).to(weight_ED.dtype) if need_dweight else None
    return dx_TD, dweight_ED


class SplitLogits(torch.autograd.Function):
    """:func:`split_logits` with its gradient (:func:`logits_backward`): what training takes where
    inference takes the split, eagerly and under torch.compile (which traces both halves)."""

    @staticmethod
    def forward(ctx, x_TD, weight_ED):
        ctx.save_for_backward(x_TD, weight_ED)
        return split_logits(x_TD, weight_ED)

    @staticmethod
    def backward(ctx, dlogits_TE):
        x_TD, weight_ED = ctx.saved_tensors
        return logits_backward(dlogits_TE, x_TD, weight_ED, *ctx.needs_input_grad)


def split_bf16(w: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 ``w`` as ``hi + lo`` with both parts bf16 (about 16 significant bits in all).

    ``hi`` is ``w`` rounded to bf16 by integer arithmetic on its bits (add half of the dropped
    16-bit field, clear it) rather than by ``w.to(bf16).float()``: torch.compile treats that
    round trip as the identity and folds ``w - hi`` to zero, which left compiled inference routing
    on the bf16 ``hi`` alone (different experts for up to 1.3% of tokens). The bit operations
    cannot be folded, and ``w - hi`` is exact in fp32.
    """
    hi_fp32 = ((w.view(torch.int32) + 0x8000) & -0x10000).view(torch.float32)
    return hi_fp32.to(torch.bfloat16), (w - hi_fp32).to(torch.bfloat16)


def _split_weight(weight_ED: Tensor) -> Tensor:
    """``cat([hi, lo])`` of the router weight (:func:`split_bf16`), kept for the weight between
    eager calls until it changes (its version counter moves with every in-place update): the
    split is six small launches, a noticeable share of a small batch's eager call."""
    if torch.compiler.is_compiling() or weight_ED.is_inference():
        # compiled: part of the graph, fused by the compiler; an inference tensor (made under
        # inference_mode) has no version counter that would tell when it changes
        return torch.cat(split_bf16(weight_ED.float()))
    key = version(weight_ED)
    cached = _SPLIT_WEIGHTS.get(weight_ED)
    if cached is None or cached[0] != key:
        cached = _SPLIT_WEIGHTS[weight_ED] = (key, torch.cat(split_bf16(weight_ED.float())))
    return cached[1]


# Router weight -> (its version, its split); an entry goes with its weight.
_SPLIT_WEIGHTS = WeakIdKeyDictionary()


def forget_splits(module: torch.nn.Module, *_: object) -> None:
    """Drop the kept splits of ``module``'s parameters: before torch makes new ones (``.to()``) or loads
    into them. Under torch's swap_module_params_on_conversion a parameter whose tensor has a weak
    reference (this cache's key) cannot be swapped."""
    for parameter in module.parameters(recurse=False):
        _SPLIT_WEIGHTS.pop(parameter, None)


class _ExpertSoftmax(torch.autograd.Function):
    """``torch.softmax`` over the experts with its backward written out, ``p * (g - sum(g * p))``:
    torch's CPU softmax backward over a last dimension that is not a multiple of 16 (17-63 experts
    measured, torch 2.13) rounds differently with one thread and with two, so an architecture that
    a search's worker trained with its share of the cores ended with other weights than in a run
    alone. The written-out ops round the same with any thread count."""

    @staticmethod
    def forward(logits_TE: Tensor) -> Tensor:
        return torch.softmax(logits_TE, dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_TE: Tensor) -> Tensor:
        (probs_TE,) = ctx.saved_tensors
        return probs_TE * (grad_TE - (grad_TE * probs_TE).sum(-1, keepdim=True))


def expert_softmax(logits_TE: Tensor) -> Tensor:
    """Softmax over the experts (the last dimension); in eager CPU calls with a gradient through
    :class:`_ExpertSoftmax`, whose backward rounds the same with any number of threads."""
    if (logits_TE.device.type == "cpu" and torch.is_grad_enabled() and logits_TE.requires_grad
            and not torch.compiler.is_compiling()):
        return _ExpertSoftmax.apply(logits_TE)
    return torch.softmax(logits_TE, dim=-1)


def scores_from_logits(logits_TE: Tensor, score_func: str) -> Tensor:
    """fp32 routing scores: softmax over experts, or an independent sigmoid per expert."""
    logits_TE = logits_TE.float()
    if score_func == "softmax":
        return expert_softmax(logits_TE)
    return torch.sigmoid(logits_TE)


def normalised_probs(scores_TE: Tensor, score_func: str) -> Tensor:
    """Scores as a distribution over experts (sigmoid scores are divided by their sum)."""
    if score_func == "softmax":
        return scores_TE
    return scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)


def topk_indices(selection_TE: Tensor, k: int) -> Tensor:
    """Indices of the k largest selection scores per token, largest first. On CUDA a Triton
    kernel: one pass over the scores, faster than torch.topk at every shape measured (H200, fp32
    scores; 16 or 32,768 tokens x 8, 128, 256 experts: 1.2-12x, e.g. 0.029 vs 0.234 ms at
    32,768 x 128, k=8; torch.topk over a few hundred experts is slower than the whole router
    GEMM). Indices carry no gradient, so training uses it too."""
    if triton_moe.topk_usable(selection_TE, k):
        op = triton_moe.launch_topk if triton_moe.direct_call() else triton_moe.topk_indices
        return op(selection_TE.detach().contiguous(), k)
    return torch.topk(selection_TE, k, dim=-1).indices


def select_experts(
    scores_TE: Tensor,
    selection_TE: Tensor,
    k: int,
    *,
    renormalize: bool,
    scaling: float = 1.0,
    top_p: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Token-choice selection: the k best experts by ``selection_TE``, weighted by ``scores_TE``.

    ``selection_TE`` may differ from ``scores_TE`` (the aux-loss-free bias and the hierarchical
    group mask change which experts are chosen, not their weights). With ``top_p`` a token keeps
    its slots, best first, until the probability mass reaches ``top_p``; the rest get weight 0
    and ``active`` False. Returns ``(expert_TK, weight_TK, active_TK)``.
    """
    expert_TK = topk_indices(selection_TE, k)
    return (expert_TK, *selected_weights(scores_TE, expert_TK, renormalize=renormalize, scaling=scaling,
                                         top_p=top_p))


def selected_weights(scores_TE: Tensor, expert_TK: Tensor, *, renormalize: bool, scaling: float = 1.0,
                     top_p: float | None = None) -> tuple[Tensor, Tensor]:
    """``(weight_TK, active_TK)`` of the chosen experts ``expert_TK`` (best first): see
    :func:`select_experts`."""
    weight_TK = scores_TE.gather(-1, expert_TK)
    if top_p is not None:
        # The mass before each slot summed slot by slot, in the routing kernel's order (the same bits on
        # every path), not by cumsum: a floating-point cumsum has no deterministic CUDA implementation,
        # and deterministic training refuses it.
        mass_T, active = torch.zeros_like(weight_TK[..., 0]), []
        for w_T in weight_TK.detach().unbind(-1):
            active.append(mass_T < top_p)  # slot 0 has mass 0 before it: always active
            mass_T = mass_T + w_T
        active_TK = torch.stack(active, -1)
        weight_TK = weight_TK * active_TK
    else:
        active_TK = torch.ones_like(expert_TK, dtype=torch.bool)
    if renormalize:
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    if scaling != 1.0:
        weight_TK = weight_TK * scaling
    return weight_TK, active_TK
