"""The five routers. Each maps hidden states ``x_TD`` to a fixed-shape :class:`Routing`.

Shape suffixes: T tokens, D hidden, E experts, K slots per token, C tokens per expert,
H heads, Dh head size, B batch, S sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import triton_moe, triton_routing
from .config import MoEConfig
from .experts import needs_grad
from .routing import (
    Routing,
    expert_softmax,
    forget_splits,
    jitter,
    normalised_probs,
    router_logits,
    scores_from_logits,
    select_experts,
)


class Fp32Router(nn.Module):
    """Routers keep fp32 parameters and buffers whatever dtype the model is cast to (as
    DeepSeek-V3 keeps its gate): routing decisions should not flip with bf16 rounding, the
    aux-free bias takes steps of ~1e-3 that bf16 would round away, and the logits need no
    per-call weight cast."""

    def _forget_splits(self) -> None:
        for owner in self.modules():
            forget_splits(owner)

    def _load_from_state_dict(self, *args, **kwargs):
        # before a load, which swaps the weights under torch's swap_module_params_on_conversion (a load pre-hook
        # would keep a weak reference to the module that a deep copy points at the original)
        self._forget_splits()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._forget_splits()  # the kept bf16 splits of the gate (see routing.forget_splits)

        # Take only the device move from `fn` (e.g. `.to("cuda", torch.bfloat16)`): the values
        # are never rounded through a lower precision.
        def keep_dtype(t: Tensor) -> Tensor:
            out = fn(t)
            return t.to(device=out.device) if t.is_floating_point() and out.dtype != t.dtype else out

        return super()._apply(keep_dtype, recurse)


class ScoreRouter(Fp32Router):
    """Base of the routers that score every expert: top-k, hierarchical and attention.

    Holds the selection-only bias of DeepSeek-V3's auxiliary-loss-free balancing
    (``expert_bias``): it shifts which experts are chosen, never their weights.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

    def logits(self, x_TD: Tensor, batch_shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def group_mask(self, selection_TE: Tensor) -> Tensor:
        """Selection scores after any structural masking (the hierarchy overrides this)."""
        return selection_TE

    def gate_weight(self) -> Tensor | None:
        """The (E, D) weight when the logits are ``x @ W^T`` (the routing kernel may then compute them)."""
        return None

    def forward(self, x_TD: Tensor, token_ids: Tensor | None = None,
                batch_shape: tuple[int, ...] = ()) -> Routing:
        cfg = self.cfg
        x_TD = jitter(x_TD, cfg.router_jitter, self.training)
        if (triton_moe.direct_call() and type(self).group_mask is ScoreRouter.group_mask
                and triton_routing.route_usable(x_TD, cfg.top_k, cfg.num_experts)):
            return self._route_by_kernel(x_TD, batch_shape)
        if self._routes_by_op_compiled(x_TD):
            expert_TK, weight_TK, active_TK, probs_TE, logits_TE, *sort = triton_routing.route_op(
                x_TD, self.gate_weight(), self.expert_bias, cfg.top_k, cfg.score_func, cfg.renormalize,
                cfg.routed_scaling_factor, cfg.top_p)
            return Routing(expert_TK=expert_TK, weight_TK=weight_TK, active_TK=active_TK, probs_TE=probs_TE,
                           logits_TE=logits_TE, sorted_slots=tuple(sort))
        logits_TE = self.logits(x_TD, batch_shape).float()
        scores_TE = scores_from_logits(logits_TE, cfg.score_func)
        selection_TE = self.group_mask(scores_TE + self.expert_bias)
        expert_TK, weight_TK, active_TK = select_experts(
            scores_TE, selection_TE, cfg.top_k, renormalize=cfg.renormalize,
            scaling=cfg.routed_scaling_factor, top_p=cfg.top_p)
        return Routing(expert_TK=expert_TK, weight_TK=weight_TK, active_TK=active_TK,
                       probs_TE=normalised_probs(scores_TE, cfg.score_func), logits_TE=logits_TE)

    def _routes_by_op_compiled(self, x_TD: Tensor) -> bool:
        """Whether a compiled call without a gradient routes ``x_TD`` through the routing kernel's op
        (:func:`fulu_nas.moe.triton_routing.route_op`: a linear gate, no group mask, and a few tokens or
        experts: :func:`fulu_nas.moe.triton_routing.route_op_applies`)."""
        return (type(self).group_mask is ScoreRouter.group_mask and self.gate_weight() is not None
                and not needs_grad(self, x_TD)
                and triton_routing.route_op_applies(x_TD, self.cfg.top_k, self.cfg.num_experts))

    def _route_by_kernel(self, x_TD: Tensor, batch_shape: tuple[int, ...]) -> Routing:
        """The same selection through the Triton routing kernel, eagerly on CUDA: one launch where
        the torch ops take about ten (and the block counts the layer's counting sort needs). The
        kernel computes the logits itself where :func:`fulu_nas.moe.triton_routing.logits_in_kernel`
        says it can (with a gradient only for bf16 input: their gradient then takes two bf16 GEMMs,
        :func:`fulu_nas.moe.triton_routing.with_input_gradient`), else reads them; with a gradient
        its weights and probabilities carry it through one backward kernel
        (:func:`fulu_nas.moe.triton_routing.with_logits_gradient`)."""
        cfg = self.cfg
        grad = needs_grad(self, x_TD)
        gate = self.gate_weight()
        in_kernel = gate is not None and bool(triton_routing.logits_in_kernel(x_TD, cfg.num_experts)) and (
            not grad or x_TD.dtype == torch.bfloat16)
        logits_TE = None if in_kernel else self.logits(x_TD, batch_shape).float()
        routing = triton_routing.launch_route(logits_TE, x_TD, gate, self.expert_bias, cfg.top_k, cfg.score_func,
                                              cfg.renormalize, cfg.routed_scaling_factor, cfg.top_p)
        if grad:
            if in_kernel:
                triton_routing.with_input_gradient(routing, x_TD, gate)
            triton_routing.with_logits_gradient(routing, cfg.score_func, cfg.renormalize, cfg.routed_scaling_factor)
        return routing


class TopKRouter(ScoreRouter):
    """Token-choice top-k over a linear gate (Shazeer 2017; Mixtral with softmax + renorm)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)

    def logits(self, x_TD: Tensor, batch_shape: tuple[int, ...]) -> Tensor:
        # fp32 logits, as DeepSeek-V3 computes them: routing decisions should not flip with the
        # model's compute dtype.
        return router_logits(x_TD, self.gate.weight)

    def gate_weight(self) -> Tensor:
        return self.gate.weight


class HierarchicalRouter(TopKRouter):
    """Routing through ``hierarchy_depth`` levels of nested expert groups.

    One gate scores every expert. At each upper level a node (a group of experts) is scored by
    the sum of its best two still-allowed expert scores, and only the best
    ``hierarchy_topk_groups[l]`` nodes stay allowed; the final level picks the top-k experts
    inside the surviving groups. Depth 2 is DeepSeek-V3's group-limited routing, depth 1 is
    plain top-k. Dropped groups are masked with -inf, as in DeepSeek's reference inference code;
    ``group_mask_fill="zero"`` fills them with 0 instead, as Hugging Face transformers' DeepSeek-V3
    router did before huggingface/transformers#45441 (it differs once biased scores go negative:
    an expert of a dropped group can then be chosen).
    """

    def group_mask(self, selection_TE: Tensor) -> Tensor:
        cfg = self.cfg
        T, E = selection_TE.shape
        fill = float("-inf") if cfg.group_mask_fill == "-inf" else 0.0
        nodes = 1
        for groups, keep in zip(cfg.hierarchy_groups, cfg.hierarchy_topk_groups, strict=True):
            nodes *= groups
            per_node = E // nodes
            node_scores_TN = selection_TE.view(T, nodes, per_node).topk(
                min(2, per_node), dim=-1).values.sum(-1)
            kept_TN = torch.zeros_like(node_scores_TN, dtype=torch.bool).scatter_(
                1, node_scores_TN.topk(keep, dim=-1).indices, True)
            allowed_TE = kept_TN.repeat_interleave(per_node, dim=1)
            selection_TE = selection_TE.masked_fill(~allowed_TE, fill)
        return selection_TE


class AttentionRouter(ScoreRouter):
    """Multi-head attention routing: per head, token queries score learned expert keys.

    Head h gives logits ``q_h(x) . k_{h,e} / sqrt(Dh)``; a learned softmax over heads mixes them
    into the routing logits. With ``attention_context`` the token first attends causally to its
    sequence (a residual, zero-initialised so training starts from context-free routing), so the
    routing of a token can depend on its neighbours.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        H, D = cfg.attention_heads, cfg.hidden_size
        self.head_dim = D // H
        self.query = nn.Linear(D, D, bias=False)
        self.expert_keys_HED = nn.Parameter(torch.randn(H, cfg.num_experts, self.head_dim) / math.sqrt(self.head_dim))
        self.head_mix_H = nn.Parameter(torch.zeros(H))
        if cfg.attention_context:
            self.context_qkv = nn.Linear(D, 3 * D, bias=False)
            self.context_out = nn.Linear(D, D, bias=False)
            nn.init.zeros_(self.context_out.weight)

    def _context(self, x_TD: Tensor, batch_shape: tuple[int, ...]) -> Tensor:
        H, Dh = self.cfg.attention_heads, self.head_dim
        # Sizes from the batch shape, not view(-1, S, ...): -1 is ambiguous when a dimension is 0.
        B, S = (math.prod(batch_shape[:-1]), batch_shape[-1]) if batch_shape else (1, x_TD.shape[0])
        q, k, v = self.context_qkv(x_TD).view(B, S, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
        ctx_BHSD = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.context_out(ctx_BHSD.transpose(1, 2).reshape(x_TD.shape))

    def logits(self, x_TD: Tensor, batch_shape: tuple[int, ...]) -> Tensor:
        x_TD = x_TD.float()
        if self.cfg.attention_context:
            x_TD = x_TD + self._context(x_TD, batch_shape)
        H, Dh = self.cfg.attention_heads, self.head_dim
        q_THD = self.query(x_TD).view(-1, H, Dh)
        per_head_THE = torch.einsum("thd,hed->the", q_THD, self.expert_keys_HED.float()) / math.sqrt(Dh)
        return torch.einsum("the,h->te", per_head_THE, torch.softmax(self.head_mix_H.float(), 0))


class ExpertChoiceRouter(Fp32Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax score.

    C comes from the capacity factor (see :class:`MoEConfig`). A token may be taken by zero,
    one or several experts; load is balanced by construction. Note for causal language models:
    an expert's choice depends on the whole batch, later tokens included.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)

    def forward(self, x_TD: Tensor, token_ids: Tensor | None = None,
                batch_shape: tuple[int, ...] = ()) -> Routing:
        x_TD = jitter(x_TD, self.cfg.router_jitter, self.training)
        logits_TE = router_logits(x_TD, self.gate.weight)
        probs_TE = expert_softmax(logits_TE)
        capacity = self.cfg.expert_capacity(x_TD.shape[0])
        # A full sort then a slice (not topk(capacity)): keeps the capacity symbolic under
        # torch.export with a dynamic token count.
        weight_ET, token_ET = probs_TE.t().sort(dim=-1, descending=True, stable=True)
        slots_N = first_columns(probs_TE.shape[1], probs_TE.shape[0], capacity, probs_TE.device)
        return Routing(token_N=token_ET.reshape(-1)[slots_N],
                       weight_N=weight_ET.reshape(-1)[slots_N] * self.cfg.routed_scaling_factor,
                       capacity=capacity, probs_TE=probs_TE, logits_TE=logits_TE)


def first_columns(rows: int, columns: int, taken: int, device: torch.device) -> Tensor:
    """Flat indices of the first ``taken`` columns of each row of a contiguous (rows, columns)
    tensor, row by row: ``a.reshape(-1)[first_columns(...)]`` is ``a[:, :taken].reshape(-1)`` without
    the strided slice, whose flattening asks whether ``taken`` is 1; torch.export then specialised
    an expert-choice program on a capacity of at least 2 and refused every smaller input."""
    n_N = torch.arange(rows * taken, device=device)
    return n_N // taken * columns + n_N % taken


_HASH_PRIME = 2_147_483_647  # 2^31 - 1: products with 31-bit multipliers stay inside int64


class HashRouter(Fp32Router):
    """Hash layers (Roller et al. 2021): a fixed, parameter-free assignment from token ids.

    Slot j of a token with id ``i`` goes to expert ``(h(i) + j) mod E`` with the universal hash
    ``h(i) = ((a*i + b) mod P) mod E`` (``a``, ``b`` drawn from ``hash_seed``), so a token's k
    experts are distinct. Without token ids the id is replaced by a locality-sensitive code of
    the hidden state (signs of fixed random projections), which is deterministic and keeps
    similar states on the same expert. Each slot has weight ``1/k``.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        # Drawn on the CPU whatever the device the layer is built on (a `with torch.device(...)`): the same
        # hash on every device.
        g = torch.Generator().manual_seed(cfg.hash_seed)
        self.a, self.b = (int(v) for v in torch.randint(1, _HASH_PRIME, (2,), generator=g, device="cpu"))
        planes_DB, powers_B = self._lsh(torch.get_default_device())
        # Not persistent: a pure function of the seed, made on construction and again wherever the
        # module is moved (see _apply).
        self.register_buffer("planes_DB", planes_DB, persistent=False)
        self.register_buffer("powers_B", powers_B, persistent=False)

    def _lsh(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The locality-sensitive code's projections and bit weights, drawn on the CPU from the seed
        whatever the device (the same hash on every device)."""
        g = torch.Generator().manual_seed(self.cfg.hash_seed)
        torch.randint(1, _HASH_PRIME, (2,), generator=g, device="cpu")  # a and b come first
        bits = min(62, max(8, math.ceil(math.log2(self.cfg.num_experts)) + 8))
        planes_DB = torch.randn(self.cfg.hidden_size, bits, generator=g, device="cpu")
        return planes_DB.to(device), (2 ** torch.arange(bits, dtype=torch.int64, device="cpu")).to(device)

    def remake_lsh(self) -> None:
        """Draw the locality-sensitive code again for ``self.cfg``, on the buffers' device: its width
        follows ``num_experts``, so a layer whose experts were remapped needs the code a layer built
        with the new config has (the buffers are not in the state dict to carry it)."""
        self.planes_DB, self.powers_B = self._lsh(self.planes_DB.device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # A layer built on the meta device and materialised with to_empty() would keep uninitialised
        # memory here (load_state_dict does not carry non-persistent buffers): remake them.
        if self.planes_DB.device.type != "meta":
            self.remake_lsh()
        return self

    def forward(self, x_TD: Tensor, token_ids: Tensor | None = None,
                batch_shape: tuple[int, ...] = ()) -> Routing:
        cfg = self.cfg
        if token_ids is None:
            if self.planes_DB.is_meta and not x_TD.is_meta:
                # built on the meta device and loaded with load_state_dict(assign=True), which carries no
                # non-persistent buffer (and this router has no parameter to assign): made here, once
                self.planes_DB, self.powers_B = self._lsh(x_TD.device)
            bits_TB = (x_TD.float() @ self.planes_DB.float()) > 0  # fp32 whatever the model dtype
            ids_T = (bits_TB.long() * self.powers_B).sum(-1)
        else:
            ids_T = token_ids.reshape(-1).long()
        base_T = (((ids_T % _HASH_PRIME) * self.a + self.b) % _HASH_PRIME) % cfg.num_experts
        slots_K = torch.arange(cfg.top_k, device=x_TD.device)
        expert_TK = (base_T[:, None] + slots_K) % cfg.num_experts
        weight_TK = torch.full(expert_TK.shape, cfg.routed_scaling_factor / cfg.top_k,
                               device=x_TD.device)
        return Routing(expert_TK=expert_TK, weight_TK=weight_TK,
                       active_TK=torch.ones_like(expert_TK, dtype=torch.bool))


ROUTER_CLASSES = {
    "topk": TopKRouter,
    "hierarchical": HierarchicalRouter,
    "attention": AttentionRouter,
    "expert_choice": ExpertChoiceRouter,
    "hash": HashRouter,
}


def build_router(cfg: MoEConfig) -> nn.Module:
    return ROUTER_CLASSES[cfg.router](cfg)
