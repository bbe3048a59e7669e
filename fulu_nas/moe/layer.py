"""The PiMoE layer: router -> dispatch sorted by expert -> grouped experts -> weighted combine.

Shape suffixes: T tokens, D hidden, E experts, K slots per token, C tokens per expert,
N = T*K (token choice) or E*C (expert choice) dispatched rows.

The forward path has static shapes and no host syncs (no ``.item()``, ``.tolist()``,
``nonzero()`` or boolean-mask indexing), so ``torch.compile(fullgraph=True)``, CUDA graphs and
``torch.export`` work. Only ``impl="sorted"`` (reads counts on the host) and ``impl="loop"``
(masks per expert, the reference) break that rule, on purpose.

Expert paths: ``grouped_mm`` gathers the rows into a sorted (N, D) buffer and runs
``torch._grouped_mm`` (CUTLASS on Hopper; any device, autograd). ``triton`` runs the experts as
Triton kernels that read tokens through the sort order and write outputs back in token order
(for large groups the second GEMM is ``torch._grouped_mm`` and the slot sum gathers its rows;
:mod:`fulu_nas.moe.triton_moe`; with a gradient, the training op that keeps the pre-activation
for its backward): CUDA only; without CUDA/triton it takes ``grouped_mm``.
``grouped`` (the default) picks per call:
``triton`` where it applies and was measured faster (:func:`prefer_triton`), else ``grouped_mm``;
in fp32 inference on the CPU the grouped experts read their rows per expert on the host and run
through a streaming C++ kernel for few rows per expert, above that oneDNN with packed weights for
large experts or grouped GEMMs in chunks of experts for small ones
(:meth:`GroupedExperts._forward_cpu`, :mod:`fulu_nas.moe.cpu_stream`, :mod:`fulu_nas.moe.cpu_packed`;
eagerly only).
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import triton_moe, triton_routing
from .balancing import balance_loss, load_balancing_loss, router_z_loss, update_selection_bias
from .config import IMPLS, MoEConfig
from .experts import (
    GroupedExperts,
    SharedExperts,
    as_contiguous,
    group_ends,
    grouped_mm_captures,
    inverse_permutation,
    needs_grad,
    sort_by_expert,
    sum_slots,
    token_rows,
)
from .routers import HashRouter, ScoreRouter, build_router
from .routing import Routing
from .stats import LazyStats, load_statistics, once, router_entropy, stats_layout, token_mean

# The statistics a call returns, in the groups computed together (PiMoELayer._stats).
STATS_LAYOUT = stats_layout((("tokens_per_expert", "utilisation", "load_balance", "max_vio", "cv"),
                             ("router_entropy",), ("dropped_share",), ("aux_loss",), ("z_loss",), ("balance_loss",)))

# Training steps of fewer tokens take grouped_mm (see prefer_triton).
TRITON_TRAINING_MIN_TOKENS = 16384


def autocast_input(x: Tensor) -> Tensor:
    """``x`` in the autocast dtype of its device where autocast is on there, else ``x``."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x


def prefer_triton(cfg: MoEConfig, num_tokens: int, dtype: torch.dtype, training: bool = False) -> bool:
    """Whether ``impl="grouped"`` takes the Triton experts (given that they apply): where they
    were measured faster than ``torch._grouped_mm``. On H200 in bf16 that was every shape tried
    for inference (seed and fine-grained at 4,096 and 32,768 tokens, 256 experts, 1-64-token
    latency; see BENCHMARKS.md). For training (forward + backward) it was 32,768 tokens (seed:
    eager, compiled and with CUDA graphs; fine-grained, compiled) but not 4,096 (seed: 6-16%
    slower, more launches per step): training takes them from ``TRITON_TRAINING_MIN_TOKENS``
    tokens, a threshold between the two measured sizes. fp16 takes the same kernels. fp32 stays
    on grouped_mm (exact fp32 dots in Triton are slow)."""
    if training and num_tokens < TRITON_TRAINING_MIN_TOKENS:
        return False
    return dtype in (torch.bfloat16, torch.float16)


# The paths through grouped GEMMs, which take fp32, bf16 and fp16 only.
GROUPED_GEMM_IMPLS = ("grouped", "grouped_mm", "triton")


def impl_for_dtype(impl: str, dtype: torch.dtype) -> str:
    """``impl``, or ``sorted`` (a matmul per expert) where the input is float64 and ``impl`` a grouped
    GEMM path: a float64 layer (a check) runs matmuls."""
    return "sorted" if dtype == torch.float64 and impl in GROUPED_GEMM_IMPLS else impl


def _expert_indices(source: object, num_experts: int) -> list[int]:
    """``source`` (remap_experts' argument) as a list of ints in ``[0, num_experts)``, or one ValueError
    naming it and that range: torch would index out of range (or with a float) deep inside."""
    items = list(source) if isinstance(source, Iterable) and not isinstance(source, str | bytes) else None
    if items is None or not all(_is_index(i, num_experts) for i in items):
        raise ValueError(f"remap_experts: source must be a list of expert indices in [0, {num_experts}), "
                         f"got {source!r}")
    return [operator.index(i) for i in items]


def _is_index(value: object, num_experts: int) -> bool:
    """An integer (not a bool; numpy's and 0-d integer tensors count) in ``[0, num_experts)``."""
    if isinstance(value, bool):
        return False
    try:
        return 0 <= operator.index(value) < num_experts
    except TypeError:
        return False


class PiMoELayer(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    ``forward(x, token_ids=None)`` takes ``x`` of shape ``(..., hidden_size)`` and returns
    ``(output, stats)``: the output has the shape of ``x``; ``stats`` is a dict of device
    tensors (see :mod:`fulu_nas.moe.stats`) including ``balance_loss``, the weighted auxiliary
    losses to add to the task loss. ``token_ids`` (same leading shape as ``x``) feed the hash
    router. After each optimizer step a trainer calls :meth:`update_expert_bias` with the
    step's ``tokens_per_expert`` for auxiliary-loss-free balancing. ``with_stats=False`` returns
    an empty dict instead of the statistics (for inference).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if not isinstance(cfg, MoEConfig):  # else an AttributeError from deep inside the router's build
            raise TypeError(f"PiMoELayer takes a MoEConfig (MoEConfig.from_dict builds one from a mapping), got "
                            f"{type(cfg).__name__}")
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = GroupedExperts(cfg)
        self.shared = SharedExperts(cfg) if cfg.num_shared_experts else None

    # The Hugging Face importer, registered by fulu_nas.interop.hf_import when it is imported (reading
    # any public name of ``fulu_nas`` does): the knowledge of foreign blocks stays out of the layer
    # library, which imports nothing above itself.
    hf_importer: Callable[..., PiMoELayer] | None = None

    @classmethod
    def from_hf(cls, block: nn.Module, **overrides) -> PiMoELayer:
        """A layer equal to a Hugging Face transformers MoE block (Mixtral, Qwen2-MoE, DeepSeek-V3);
        see :mod:`fulu_nas.interop.hf_import`. ``overrides`` set fields the block does not fix."""
        if cls.hf_importer is None:
            raise RuntimeError("PiMoELayer.from_hf needs fulu_nas.interop.hf_import: import it first "
                               "(or any public name of fulu_nas, e.g. `from fulu_nas import PiMoELayer`)")
        return cls.hf_importer(block, **overrides)

    def _routed_input(self, x: Tensor, token_ids: Tensor | None, impl: str | None) -> tuple[Tensor, Routing, str]:
        """The input as the experts take it, its routing, and the experts' path (``impl`` checked), as
        every forward of the layer (and its expert-parallel form) starts."""
        x_TD, routing = self._route(x, token_ids)
        # Under autocast the experts run in its dtype, as nn.Linear does (a trainer's residual stream and
        # norms stay fp32, so the layer's input is fp32): fp32 grouped GEMMs take a slow path that syncs
        # with the host every call. The router keeps the input's precision.
        x_TD = autocast_input(x_TD)
        impl = impl or self.cfg.impl
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        return x_TD, routing, impl_for_dtype(impl, x_TD.dtype)

    def forward(self, x: Tensor, token_ids: Tensor | None = None, impl: str | None = None,
                with_stats: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(x, Tensor) and x.is_cuda and not torch.compiler.is_compiling() \
                and x.get_device() != torch.cuda.current_device():
            # Triton launches its kernels on the current GPU, whatever their tensors' (torch's ops follow
            # the tensors): a layer on cuda:1 called while cuda:0 is current. A compiled call sets it.
            with torch.cuda.device(x.device):
                return self.forward(x, token_ids, impl, with_stats)
        cfg = self.cfg
        x_TD, routing, impl = self._routed_input(x, token_ids, impl)
        if cfg.token_choice:
            out_TD, load = self._token_choice(x_TD, routing, impl)
        else:
            out_TD, load = self._expert_choice(x_TD, routing, impl)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        # (T, D) input: the output as it is (a view costs host time a small eager call waits on)
        out = out_TD if x.dim() == 2 else out_TD.view(x.shape)
        if not with_stats:  # inference: the load and the statistics are never computed
            return out, {}
        stats = self._stats(routing, once(load))
        # Eagerly, each statistic is computed when first read (a training step reads the balance
        # loss, and the load when balancing without it; the rest only at logging steps): ~50 small
        # launches of host time a step does not pay. A traced graph returns them all.
        return out, dict(stats) if torch.compiler.is_compiling() else stats

    def _route(self, x: Tensor, token_ids: Tensor | None) -> tuple[Tensor, Routing]:
        """The input as (T, D) rows and the router's decision for them."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor (float32, bfloat16, float16 or float64), got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"input must have shape (..., hidden_size={self.cfg.hidden_size}), "
                             f"got {tuple(x.shape)}")
        if token_ids is not None and not isinstance(token_ids, Tensor):
            raise TypeError(f"token_ids must be a tensor of integer ids, got {type(token_ids).__name__}")
        if token_ids is not None and (tuple(token_ids.shape) != tuple(x.shape[:-1]) or token_ids.is_floating_point()
                                      or token_ids.is_complex()):
            # A transposed (S, B) tensor has as many ids, but each token would be routed by another's id.
            raise ValueError(f"token_ids must be integer ids of shape {tuple(x.shape[:-1])} (the input's leading "
                             f"shape), got {token_ids.dtype} of shape {tuple(token_ids.shape)}")
        # A (T, D) input as it is: a reshape costs host time a small eager call waits on
        x_TD = x if x.dim() == 2 else x.reshape(-1, self.cfg.hidden_size)
        # Autocast lowers a linear product to its dtype even from fp32 operands: bf16 logits send a few
        # percent of the tokens to other experts. The router computes in the input's precision.
        device = x_TD.device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            return x_TD, self.router(x_TD, token_ids=token_ids, batch_shape=tuple(x.shape[:-1]))

    def _triton_applies(self, x_TD: Tensor, impl: str) -> bool:
        """The Triton experts for this call: ``impl`` asks for them (:meth:`_takes_triton`) and they can
        run on the device."""
        if impl not in ("triton", "grouped") or not triton_moe.usable(x_TD):
            return False
        return self._takes_triton(impl, x_TD.dtype, x_TD.shape[0], needs_grad(self, x_TD))

    def _takes_triton(self, impl: str, dtype: torch.dtype, num_tokens: int, training: bool) -> bool:
        """Whether ``impl`` asks for the Triton experts on a call of ``num_tokens`` tokens in ``dtype``:
        ``triton`` always, ``grouped`` where :func:`prefer_triton` says so. The forward's dispatch and
        :meth:`captures_in_cuda_graphs` both ask here, so the capture's answer is the path the call takes."""
        return impl == "triton" or (impl == "grouped" and prefer_triton(self.cfg, num_tokens, dtype, training))

    def captures_in_cuda_graphs(self, dtype: torch.dtype | None = None, training_tokens: int | None = None) -> bool:
        """Whether a call of this layer on its CUDA device makes no host sync, so that a CUDA graph can
        capture it: an inference call in ``dtype`` (by default its experts' weights' dtype; what an EXTREME
        system replays after ``optimize_for_inference``), or given ``training_tokens``, a training call of
        that many tokens (a trainer's graphed step). The Triton experts make none (``grouped`` in bf16 or
        fp16, for training from :data:`TRITON_TRAINING_MIN_TOKENS` tokens; ``triton`` in any dtype),
        nor does torch's grouped GEMM where the device has a kernel for the dtype
        (:func:`~fulu_nas.moe.experts.grouped_mm_captures`; bf16 on Hopper and Blackwell); ``sorted``
        and ``loop`` (and so float64) read the routing on the host."""
        w = self.experts.w13_EDF2
        dtype = dtype or w.dtype
        impl = impl_for_dtype(self.cfg.impl, dtype)
        if not w.is_cuda or impl in ("sorted", "loop"):
            return False
        training = training_tokens is not None
        if triton_moe.HAS_TRITON and self._takes_triton(impl, dtype, training_tokens or 0, training):
            return True
        return grouped_mm_captures(w.device, dtype)

    def _triton_experts(self, x_TD: Tensor, order_N: Tensor, weight: Tensor, ends_E: Tensor, k_slots: int,
                        weight_sorted: bool, combine: bool, inverse_N: Tensor | None = None) -> Tensor:
        """The Triton experts op: the inference one (given the sort's inverse permutation where
        the sort wrote it), or with a gradient the training one (which also keeps the
        pre-activation for its backward)."""
        e = self.experts
        grad = needs_grad(self, x_TD)  # the routing weights come from x and the router's parameters
        direct = not grad and triton_moe.direct_call()
        # The kernels read the weights by flat slot whatever their shape; autograd and the op want
        # them flat, a direct launch takes the router's (T, K) as it is (a view is host time).
        weight = weight if direct else weight.reshape(-1)
        args = (x_TD, order_N, as_contiguous(weight, torch.float32), as_contiguous(ends_E, torch.int32),
                e.w13_EDF2, e.w2_EFD, e.b13_EF2, e.b2_ED, k_slots, e.activation == "swiglu", weight_sorted, combine)
        if grad:
            return triton_moe.experts_train(*args)
        if direct:
            return triton_moe.launch_experts(*args, index=triton_moe.SortIndex(order_N, k_slots, inverse_N))
        return triton_moe.moe_experts(*args, inverse_N)

    # -- token choice --------------------------------------------------------------------------

    def _token_choice(self, x_TD: Tensor, r: Routing, impl: str) -> tuple[Tensor, Tensor, Tensor]:
        E = self.cfg.num_experts
        T, K = r.expert_TK.shape
        if impl == "loop":
            weight_N = r.weight_TK.reshape(-1)
            expert_N, active_N = r.expert_TK.reshape(-1), r.active_TK.reshape(-1)
            keep_N = self._capacity_keep_reference(expert_N, active_N, T)
            token_N = torch.arange(T, device=x_TD.device).repeat_interleave(K)
            out_TD = self.experts.forward_loop(x_TD, expert_N, token_N, weight_N * keep_N)
            return out_TD, lambda: (torch.zeros(E, device=x_TD.device).index_add_(0, expert_N, keep_N.float()),
                                    self._dropped_share(active_N, keep_N))

        order_N, ends_E, expert_sorted_N, inverse_N = self._sort_slots(r, impl)
        starts_E = once(lambda: F.pad(ends_E[:-1], (1, 0)))
        # Rows to keep: only a capacity drops rows (inactive top-p slots already have weight 0).
        keep_sorted_N = None
        if self.cfg.capacity_factor is not None:
            keep_sorted_N = self._capacity_keep_sorted(r.active_TK.reshape(-1)[order_N], expert_sorted_N, starts_E(), T)
        if self._triton_applies(x_TD, impl):
            # Tokens are read through order_N inside the first GEMM; the second writes row n to
            # flat slot order_N[n], so each token's K rows are contiguous for the (fused) sum.
            weight_sorted = keep_sorted_N is not None
            weight = (r.weight_TK.reshape(-1)[order_N] * keep_sorted_N) if weight_sorted else r.weight_TK
            out_TD = self._triton_experts(x_TD, order_N, weight, ends_E, K, weight_sorted, True, inverse_N)
        else:
            out_TD = self._grouped_experts(x_TD, order_N, r.weight_TK.reshape(-1), keep_sorted_N, expert_sorted_N,
                                           ends_E, starts_E(), K, impl, inverse_N)

        def load() -> tuple[Tensor, Tensor]:
            if keep_sorted_N is None and self.cfg.top_p is None:
                # Every slot is active and none is dropped: the groups' sizes are the load.
                return (ends_E - starts_E()).float(), torch.zeros((), device=x_TD.device)
            active_sorted_N = r.active_TK.reshape(-1)[order_N]
            keep_N = active_sorted_N if keep_sorted_N is None else keep_sorted_N
            kept_before_N = F.pad(keep_N.long().cumsum(0), (1, 0))  # kept rows before position n
            counts_E = (kept_before_N[ends_E] - kept_before_N[starts_E()]).float()
            return counts_E, self._dropped_share(active_sorted_N, keep_N)
        return out_TD, load

    def _sort_slots(self, r: Routing, impl: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(order_N, ends_E, expert_sorted_N, inverse_N)``: the stable sort of the flat slots by
        expert, the group ends, the sorted expert ids (``None`` where nothing reads them: no
        capacity, no expert biases) and the inverse permutation where the sort gave it (else
        ``None``: whoever needs it computes it). Eagerly on CUDA the routing kernel sorted them
        already (one program) or left its block counts for a counting sort
        (:func:`fulu_nas.moe.triton_routing.launch_place`), both writing the inverse too; else
        torch's stable argsort, and a binary search of the sorted ids for the ends (no atomics). All
        give the same order."""
        cfg = self.cfg
        if r.sorted_slots is not None:
            order_N, ends_E, inverse_N = r.sorted_slots
        elif r.counts_BE is not None:
            order_N, ends_E, inverse_N = triton_routing.sorted_slots(r)
        else:
            expert_N = r.expert_TK.reshape(-1)
            order_N = sort_by_expert(expert_N, cfg.num_experts)
            expert_sorted_N = expert_N[order_N]
            return order_N, group_ends(expert_sorted_N, cfg.num_experts), expert_sorted_N, None
        needs_ids = cfg.capacity_factor is not None or self.experts.b13_EF2 is not None or impl == "sorted"
        return order_N, ends_E, r.expert_TK.reshape(-1)[order_N] if needs_ids else None, inverse_N

    def _grouped_experts(self, x_TD: Tensor, order_N: Tensor, weight_N: Tensor, keep_sorted_N: Tensor | None,
                         expert_sorted_N: Tensor | None, ends_E: Tensor, starts_E: Tensor, K: int, impl: str,
                         inverse_N: Tensor | None) -> Tensor:
        """The token-choice experts by grouped GEMM or sorted matmuls, back in token order."""
        if inverse_N is None and needs_grad(self, x_TD):  # both backwards gather through it
            inverse_N = inverse_permutation(order_N)
        x_sorted_ND = token_rows(x_TD, order_N, K, inverse_N)
        w_sorted_N = weight_N[order_N] if keep_sorted_N is None else weight_N[order_N] * keep_sorted_N
        if impl == "sorted":
            rows_E = ends_E - starts_E
            weighted_ND = self.experts.forward_sorted(x_sorted_ND, rows_E) * w_sorted_N[:, None].to(x_TD.dtype)
        else:
            weighted_ND = self.experts.forward_grouped(x_sorted_ND, ends_E.to(torch.int32), expert_sorted_N, w_sorted_N)
        return sum_slots(weighted_ND, order_N, K, inverse_N).to(x_TD.dtype)

    def _capacity_keep_sorted(self, active_N: Tensor, expert_N: Tensor, starts_E: Tensor, T: int) -> Tensor:
        """Rows sorted by expert: keep an active row if fewer than `capacity` active rows
        precede it within its expert."""
        before_N = active_N.long().cumsum(0) - active_N.long()
        # Experts without rows start at N (every expert, when there are no rows): one padding
        # entry keeps that lookup in range; its value is never used.
        base_E = F.pad(before_N, (0, 1))[starts_E]
        position_N = before_N - base_E[expert_N]
        return active_N & (position_N < self.cfg.expert_capacity(T))

    def _capacity_keep_reference(self, expert_N: Tensor, active_N: Tensor, T: int) -> Tensor:
        """Unsorted computation of the same rule, via a running one-hot count per expert."""
        if self.cfg.capacity_factor is None:
            return active_N
        onehot_NE = F.one_hot(expert_N, self.cfg.num_experts) * active_N[:, None]
        position_N = (onehot_NE.cumsum(0) - onehot_NE).gather(1, expert_N[:, None]).squeeze(1)
        return active_N & (position_N < self.cfg.expert_capacity(T))

    @staticmethod
    def _dropped_share(active_N: Tensor, keep_N: Tensor) -> Tensor:
        return (active_N & ~keep_N).float().sum() / active_N.float().sum().clamp_min(1)

    # -- expert choice ---------------------------------------------------------------------------

    def _expert_choice(self, x_TD: Tensor, r: Routing, impl: str) -> tuple[Tensor, Tensor, Tensor]:
        E, C, token_N, weight_N = self.cfg.num_experts, r.capacity, r.token_N, r.weight_N
        expert_N = torch.arange(E * C, device=x_TD.device) // C  # C may be symbolic under export
        if impl == "loop":
            out_TD = self.experts.forward_loop(x_TD, expert_N, token_N, weight_N)
        else:
            # The choice is already grouped by expert: no sort needed, every group has C rows.
            if self._triton_applies(x_TD, impl):
                offsets_E = torch.arange(1, E + 1, device=x_TD.device, dtype=torch.int32) * C
                y_ND = self._triton_experts(x_TD, token_N, weight_N, offsets_E, 1, True, False)
            elif impl == "sorted":
                x_sorted_ND = x_TD[token_N]
                y_ND = self.experts.forward_sorted(x_sorted_ND, torch.full((E,), C)) * weight_N[:, None].to(x_TD.dtype)
            else:
                x_sorted_ND = x_TD[token_N]
                offsets_E = torch.arange(1, E + 1, device=x_TD.device, dtype=torch.int32) * C
                y_ND = self.experts.forward_grouped(x_sorted_ND, offsets_E, expert_N, weight_N)
            # A token may be taken by several experts: accumulate in fp32.
            out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device).index_add_(
                0, token_N, y_ND.float()).to(x_TD.dtype)

        def load() -> tuple[Tensor, Tensor]:
            counts_E = torch.ones(E, device=x_TD.device) * C  # C may be symbolic under export
            # scatter_add_, not index_add_: inductor's CPU code for index_add_ into a one-element
            # buffer fails (torch 2.13), so a compiled one-token call did.
            taken_T = torch.zeros(x_TD.shape[0], device=x_TD.device).scatter_add_(
                0, token_N, torch.ones(token_N.shape, device=x_TD.device))
            return counts_E, token_mean((taken_T == 0).float())
        return out_TD, load

    # -- statistics and balancing ---------------------------------------------------------------

    def _stats(self, r: Routing, load: Callable[[], tuple[Tensor, Tensor]]) -> LazyStats:
        """The statistics, each computed when first read. ``load()``: (assignments per expert,
        dropped share)."""
        counts = lambda: load()[0]  # noqa: E731
        zero = lambda: torch.zeros((), device=r.expert_TK.device if r.expert_TK is not None  # noqa: E731
                                   else r.token_N.device)
        cfg = self.cfg

        def balance() -> Tensor:
            # A term with a zero coefficient or without its input is left out (with its launches, and
            # the load's when it is the auxiliary loss).
            aux_coef = cfg.aux_loss_coef if r.probs_TE is not None else 0.0
            z_coef = cfg.z_loss_coef if r.logits_TE is not None else 0.0
            if not (aux_coef or z_coef):
                return zero()
            return balance_loss(r.probs_TE, r.logits_TE, counts() if aux_coef else None, aux_coef, z_coef)

        return LazyStats(STATS_LAYOUT, (  # in the order of STATS_LAYOUT's groups
            lambda: load_statistics(counts().detach()),
            lambda: {"router_entropy": router_entropy(r.probs_TE, counts()).detach()},
            lambda: {"dropped_share": load()[1].detach()},
            lambda: {"aux_loss": load_balancing_loss(r.probs_TE, counts()) if r.probs_TE is not None else zero()},
            lambda: {"z_loss": router_z_loss(r.logits_TE) if r.logits_TE is not None else zero()},
            lambda: {"balance_loss": balance()},
        ))

    def _add_balance_losses(self, stats: dict[str, Tensor], r: Routing, counts_E: Tensor) -> dict[str, Tensor]:
        """``aux_loss``, ``z_loss`` and their weighted sum ``balance_loss`` (``counts_E``: the load
        the auxiliary loss balances)."""
        zero = torch.zeros((), device=counts_E.device)
        aux = load_balancing_loss(r.probs_TE, counts_E) if r.probs_TE is not None else zero
        z = router_z_loss(r.logits_TE) if r.logits_TE is not None else zero
        stats["aux_loss"], stats["z_loss"] = aux, z
        stats["balance_loss"] = self.cfg.aux_loss_coef * aux + self.cfg.z_loss_coef * z
        return stats

    def update_expert_bias(self, tokens_per_expert: Tensor) -> None:
        """Auxiliary-loss-free balancing step (call after each optimizer step) from the statistics'
        ``tokens_per_expert``. No-op unless ``bias_update_rate > 0`` and the router scores experts."""
        counts = tokens_per_expert
        if not isinstance(counts, Tensor) or tuple(counts.shape) != (self.cfg.num_experts,):
            got = tuple(counts.shape) if isinstance(counts, Tensor) else type(counts).__name__
            raise ValueError(f"update_expert_bias takes stats['tokens_per_expert'], a tensor of shape "
                             f"({self.cfg.num_experts},), got {got}")
        if self.cfg.bias_update_rate > 0 and isinstance(self.router, ScoreRouter):
            update_selection_bias(self.router.expert_bias, tokens_per_expert, self.cfg.bias_update_rate)

    @torch.no_grad()
    def remap_experts(self, source: list[int], noise: float = 0.0) -> list[tuple[nn.Parameter, nn.Parameter, int]]:
        """Rebuild the expert set: new expert i is a copy of old expert ``source[i]``.

        Dropping an index removes that expert; repeating one clones it (the clone's router row gets
        Gaussian noise of ``noise`` times the rows' scale, so the copies can drift apart). Used by
        dynamic expert scaling. Every parameter with an expert dimension is replaced by a new
        Parameter; returns ``(old, new, expert_dim)`` so the caller can move optimizer state.
        """
        if self.cfg.router == "hierarchical" and self.cfg.hierarchy_depth > 1:  # one level has no groups
            raise ValueError("remap_experts: the hierarchical router's group structure fixes num_experts")
        source = _expert_indices(source, self.cfg.num_experts)
        if self.cfg.token_choice and len(source) < self.cfg.top_k:  # expert choice's top_k is a capacity factor
            raise ValueError(f"remap_experts: {len(source)} experts is fewer than top_k={self.cfg.top_k}")
        index = torch.tensor(source, dtype=torch.long, device=self.experts.w13_EDF2.device)
        clones = torch.tensor([i for i, e in enumerate(source) if e in source[:i]], dtype=torch.long,
                              device=index.device)
        swaps: list[tuple[nn.Parameter, nn.Parameter, int]] = []

        def remap(module: nn.Module, name: str, dim: int, jitter: bool = False) -> None:
            old = getattr(module, name, None)
            if old is None:
                return
            data = old.data.index_select(dim, index)
            if jitter and noise > 0 and clones.numel():
                rows = data.index_select(dim, clones)
                data.index_copy_(dim, clones, rows + noise * data.std() * torch.randn_like(rows))
            new = nn.Parameter(data, requires_grad=old.requires_grad)
            setattr(module, name, new)
            swaps.append((old, new, dim))

        for name in ("w13_EDF2", "w2_EFD", "b13_EF2", "b2_ED"):
            remap(self.experts, name, 0)
        gate = getattr(self.router, "gate", None)
        if gate is not None:
            remap(gate, "weight", 0, jitter=True)
            gate.out_features = len(source)
        remap(self.router, "expert_keys_HED", 1, jitter=True)
        if isinstance(self.router, ScoreRouter):
            self.router.expert_bias = self.router.expert_bias.index_select(0, index)
        self.cfg = replace(self.cfg, num_experts=len(source))
        self.router.cfg = self.cfg
        if isinstance(self.router, HashRouter):
            self.router.remake_lsh()
        return swaps

    def flops_per_token(self, seq_len: int) -> float:
        """Analytic forward FLOPs per token (2 per multiply-add): the router, the experts a token
        uses (expert choice: the capacity of ``seq_len`` tokens, shared out) and the shared experts."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
            raise ValueError(f"seq_len must be a whole number of tokens >= 1, got {seq_len!r}")
        c, D = self.cfg, self.cfg.hidden_size
        mats = 3 if c.activation == "swiglu" else 2
        routed = c.top_k * mats * D * c.expert_ffn_size
        if c.router == "expert_choice":
            routed = c.expert_capacity(seq_len) * c.num_experts * mats * D * c.expert_ffn_size / seq_len
        shared = c.num_shared_experts * mats * D * c.shared_ffn_size
        router = D * c.num_experts * (c.router != "hash")  # the gate, or the attention router's expert keys
        if c.router == "attention":
            router += D * D + c.attention_heads * c.num_experts  # the query projection, the heads' mixing
            if c.attention_context:  # its q, k, v and out projections, and causal attention over the sequence
                router += 4 * D * D + D * (seq_len + 1)  # (S + 1) / 2 keys a token on average, QK and AV
        return 2 * (router + routed + shared)

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and parameters a token activates on average (router, shared, the experts
        of :meth:`MoEConfig.experts_per_token`)."""
        total = sum(p.numel() for p in self.parameters())
        per_expert = sum(p[0].numel() for p in self.experts.parameters())
        active = total - round(per_expert * (self.cfg.num_experts - self.cfg.experts_per_token()))
        return {"total": total, "active": active}
