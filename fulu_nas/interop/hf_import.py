"""Import Mixture-of-Experts blocks from Hugging Face transformers as PiMoE layers, and export back.

``from_hf(block)`` dispatches on the block's class to :func:`from_mixtral`
(``MixtralSparseMoeBlock``), :func:`from_qwen2_moe` (``Qwen2MoeSparseMoeBlock``) or
:func:`from_deepseek_v3` (``DeepseekV3MoE``). The imported layer computes what the block computes
(fp32: to rounding); :func:`to_hf` writes a layer's weights into a block of the same shape. An explicit
importer, and ``to_hf`` with an explicit ``family``, refuse a block whose class is another family's: it
has the attributes they read, and would import as a layer that computes something else.

This module never imports transformers: it reads the blocks' attributes (duck typing), so
``fulu_nas.moe`` keeps depending on torch alone.

Shape suffixes: E experts, D hidden, F expert width, Fs shared-expert width.

Expert storage, both read and written:

- transformers >= 5: fused 3-D parameters ``experts.gate_up_proj`` (E, 2F, D), rows ``[gate; up]``,
  and ``experts.down_proj`` (E, D, F); ``is_transposed`` blocks store (E, D, 2F) and (E, F, D),
  ``is_concatenated=False`` blocks interleave gate and up rows (g0, u0, g1, u1, ...).
- transformers 4.x: ``experts`` is a ModuleList of MLPs with ``gate_proj``/``up_proj``/``down_proj``
  (Qwen2-MoE, DeepSeek-V3) or ``w1``/``w3``/``w2`` (Mixtral) linear layers.

Routing, per family (all in fp32, as the blocks compute it):

- Mixtral: softmax over all experts, top-k, renormalised. ``router="topk"``.
- Qwen2-MoE: softmax, top-k, renormalised only if ``norm_topk_prob``; plus a shared expert scaled by
  ``sigmoid(shared_expert_gate(x))``. ``num_shared_experts=1, shared_expert_gate=True``
  (``num_shared_experts=0`` for ``shared_expert_intermediate_size=0``, whose shared term is 0).
- DeepSeek-V3: sigmoid scores; selection on scores + ``e_score_correction_bias``; groups scored by
  the sum of their two best biased scores, ``topk_group`` of ``n_group`` kept; top-k inside; weights
  from the unbiased scores, renormalised if ``norm_topk_prob``, times ``routed_scaling_factor``;
  plus ungated shared experts (none for ``n_shared_experts=0``). ``router="hierarchical"`` with
  ``hierarchy_depth=2`` (plain ``"topk"`` when ``n_group == 1``); the bias is the router's
  ``expert_bias`` buffer.

Where Hugging Face and the published models differ:

- DeepSeek-V3 dropped groups: DeepSeek's published inference code (and the model repositories'
  ``modeling_deepseek.py`` since the V3-0324 update) fills the selection scores of dropped groups
  with -inf; transformers filled them with 0.0 until huggingface/transformers#45441 (4.x and early
  5.x releases; 5.24 fills -inf). They differ only when biased scores of kept experts are
  negative: with 0.0 an expert of a dropped group can then be selected. The importer follows the
  published model (``group_mask_fill="-inf"``); pass ``group_mask_fill="zero"`` to reproduce an
  older transformers block exactly.
- Mixtral's training-time jitter (``router_jitter_noise``): transformers multiplies the block's
  input in place, so the experts see the jittered input too; PiMoE jitters the router input only
  (Switch Transformer). Both are off in eval mode, where the outputs agree.
- Router precision: transformers computes Mixtral's and Qwen2-MoE's router logits in the model's
  dtype; PiMoE keeps fp32 router weights and fp32 logits. Identical in fp32, closer to fp32
  routing in bf16.
- Balancing losses are not part of the blocks (transformers adds them at the model level when
  ``output_router_logits``): pass ``aux_loss_coef=...`` (e.g. the config's
  ``router_aux_loss_coef``) to the importer to train with one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import first_few, nonfinite_tensors
from ..moe.config import MoEConfig
from ..moe.layer import PiMoELayer

FAMILIES = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "DeepseekV3MoE": "deepseek_v3",
}

# Linear-layer names of one 4.x expert MLP: (gate, up, down).
_LEGACY_MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


@dataclass
class _BlockSpec:
    """What an importer reads from a block: the MoEConfig fields it fixes, and where the weights live."""

    family: str
    config: dict[str, Any]
    gate_weight: Tensor  # (E, D) router weight of the block
    experts: _FusedExperts | _ExpertList
    w13_EDF2: Tensor  # the experts in PiMoE's layout
    w2_EFD: Tensor
    shared: nn.Module | None = None  # gate_proj / up_proj / down_proj MLP
    shared_gate_weight: Tensor | None = None  # (1, D)
    expert_bias: Tensor | None = None  # (E,) selection-only bias
    # Fields adopted on import but not required to match on export.
    soft_config: dict[str, Any] = field(default_factory=dict)


# -- reading blocks ------------------------------------------------------------------------------


def _need(block: nn.Module, family: str, *paths: str) -> None:
    """TypeError naming every missing attribute path (``"gate.weight"``) of a ``family`` block."""
    missing = []
    for path in paths:
        obj: Any = block
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                missing.append(path)
                break
    if missing:
        raise TypeError(f"{family} import: {type(block).__name__} has no {', '.join(missing)}; expected a "
                        f"transformers {_CLASS_OF[family]} (or a block with the same attributes)")


def _known_family(block: nn.Module) -> str | None:
    """The family of a block whose class (or a base class) is a known transformers MoE block, else None."""
    return next((FAMILIES[c.__name__] for c in type(block).__mro__ if c.__name__ in FAMILIES), None)


def _check_family(block: nn.Module, family: str) -> None:
    """TypeError when ``block`` is a known block of another family: it has the attributes an importer reads
    (a gate, experts), so it would import as a layer that computes something else."""
    other = _known_family(block)
    if other is not None and other != family:
        raise TypeError(f"from_{family}: {type(block).__name__} is a {other} block, not a {_CLASS_OF[family]}; "
                        f"use from_{other} or from_hf")


def _first(obj: Any, *names: str) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    raise TypeError(f"{type(obj).__name__} has none of the attributes {', '.join(names)}")


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def _check_silu(act: Any, where: str) -> None:
    if not _is_silu(act):
        raise ValueError(f"{where}: the activation must be SiLU (SwiGLU experts), got {type(act).__name__}")


class _FusedExperts:
    """transformers >= 5: experts as fused 3-D parameters."""

    def __init__(self, experts: nn.Module, where: str):
        if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
            raise ValueError(f"{where}: experts with biases are not supported (PiMoE's SwiGLU experts have none)")
        if not getattr(experts, "has_gate", True):
            raise ValueError(f"{where}: experts without a gate projection are not SwiGLU experts")
        _check_silu(getattr(experts, "act_fn", None), where)
        self.experts = experts
        self.transposed = bool(getattr(experts, "is_transposed", False))
        self.interleaved = not getattr(experts, "is_concatenated", True)

    def read(self) -> tuple[Tensor, Tensor]:
        """``(w13_EDF2, w2_EFD)`` in PiMoE's layout."""
        gate_up, down = self.experts.gate_up_proj.detach(), self.experts.down_proj.detach()
        w13_EDF2 = gate_up if self.transposed else gate_up.transpose(1, 2)
        w2_EFD = down if self.transposed else down.transpose(1, 2)
        if self.interleaved:
            w13_EDF2 = torch.cat([w13_EDF2[..., 0::2], w13_EDF2[..., 1::2]], dim=-1)
        return w13_EDF2, w2_EFD

    @torch.no_grad()
    def write(self, w13_EDF2: Tensor, w2_EFD: Tensor) -> None:
        if self.interleaved:
            gate, up = w13_EDF2.chunk(2, dim=-1)
            w13_EDF2 = torch.stack([gate, up], dim=-1).flatten(-2)
        self.experts.gate_up_proj.copy_(w13_EDF2 if self.transposed else w13_EDF2.transpose(1, 2))
        self.experts.down_proj.copy_(w2_EFD if self.transposed else w2_EFD.transpose(1, 2))


class _ExpertList:
    """transformers 4.x: experts as a ModuleList of gated MLPs."""

    def __init__(self, experts: nn.Module, where: str):
        try:
            self.mlps = list(experts)
        except TypeError:
            raise TypeError(f"{where}: experts must be fused 3-D parameters (gate_up_proj, down_proj) or a "
                            f"list of MLPs, got {type(experts).__name__}") from None
        if not self.mlps:
            raise TypeError(f"{where}: the expert list is empty")
        first = self.mlps[0]
        names = next((n for n in _LEGACY_MLP_NAMES if all(hasattr(first, a) for a in n)), None)
        if names is None:
            raise TypeError(f"{where}: expert MLPs need gate_proj/up_proj/down_proj or w1/w3/w2 linear layers, "
                            f"got {type(first).__name__}")
        self.names = names
        for mlp in self.mlps:
            _check_silu(getattr(mlp, "act_fn", None), where)
            if any(getattr(mlp, n).bias is not None for n in names):
                raise ValueError(f"{where}: expert MLPs with biases are not supported")

    def read(self) -> tuple[Tensor, Tensor]:
        g, u, d = self.names
        w13_EDF2 = torch.stack([torch.cat([getattr(m, g).weight, getattr(m, u).weight]).t() for m in self.mlps])
        w2_EFD = torch.stack([getattr(m, d).weight.t() for m in self.mlps])
        return w13_EDF2.detach(), w2_EFD.detach()

    @torch.no_grad()
    def write(self, w13_EDF2: Tensor, w2_EFD: Tensor) -> None:
        g, u, d = self.names
        for m, w13_DF2, w2_FD in zip(self.mlps, w13_EDF2, w2_EFD, strict=True):
            gate_DF, up_DF = w13_DF2.chunk(2, dim=-1)
            getattr(m, g).weight.copy_(gate_DF.t())
            getattr(m, u).weight.copy_(up_DF.t())
            getattr(m, d).weight.copy_(w2_FD.t())


def _experts(experts: nn.Module, where: str) -> _FusedExperts | _ExpertList:
    if isinstance(getattr(experts, "gate_up_proj", None), Tensor):
        return _FusedExperts(experts, where)
    return _ExpertList(experts, where)


def _mlp_weights(mlp: nn.Module, where: str) -> tuple[Tensor, Tensor]:
    """A gated MLP's ``(w13 (2Fs, D) rows [gate; up], w2 (D, Fs))``."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, name, None), nn.Linear):
            raise TypeError(f"{where}: the shared expert needs a linear {name}, got {type(mlp).__name__}")
        if getattr(mlp, name).bias is not None:
            raise ValueError(f"{where}: a shared expert with biases is not supported")
    _check_silu(getattr(mlp, "act_fn", None), where)
    return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(), mlp.down_proj.weight.detach()


def _routed(family: str, gate_weight: Tensor, experts_module: nn.Module, **parts: Any) -> _BlockSpec:
    """The spec of a block's router and routed experts (the importer adds routing and shared parts)."""
    where = f"from_{family}"
    E, D = gate_weight.shape
    experts = _experts(experts_module, where)
    w13_EDF2, w2_EFD = experts.read()
    if w13_EDF2.shape[:2] != (E, D) or w2_EFD.shape != (E, w13_EDF2.shape[2] // 2, D):
        raise ValueError(f"{where}: expert weights {tuple(w13_EDF2.shape)} / {tuple(w2_EFD.shape)} do not fit "
                         f"{E} experts of hidden size {D}")
    config = {"hidden_size": D, "num_experts": E, "expert_ffn_size": w2_EFD.shape[1], "activation": "swiglu",
              "expert_bias": False}
    return _BlockSpec(family, config, gate_weight, experts, w13_EDF2, w2_EFD, **parts)


def _spec_mixtral(block: nn.Module) -> _BlockSpec:
    _check_family(block, "mixtral")
    _need(block, "mixtral", "gate.weight", "experts")
    spec = _routed("mixtral", block.gate.weight, block.experts,
                   soft_config={"router_jitter": float(getattr(block, "jitter_noise", 0.0) or 0.0)})
    top_k = getattr(block, "top_k", None) or _first(block.gate, "top_k")
    spec.config.update(top_k=int(top_k), router="topk", score_func="softmax", renormalize=True,
                       routed_scaling_factor=1.0, num_shared_experts=0)
    return spec


def _spec_qwen2_moe(block: nn.Module) -> _BlockSpec:
    where = "from_qwen2_moe"
    _check_family(block, "qwen2_moe")
    _need(block, "qwen2_moe", "gate.weight", "experts", "shared_expert", "shared_expert_gate.weight")
    w13_shared, _ = _mlp_weights(block.shared_expert, where)
    shared_width = w13_shared.shape[0] // 2
    # shared_expert_intermediate_size=0: the gate scales an empty MLP's zero, so the block has no shared term.
    spec = _routed("qwen2_moe", block.gate.weight, block.experts, shared=block.shared_expert if shared_width else None,
                   shared_gate_weight=block.shared_expert_gate.weight if shared_width else None)
    # transformers >= 5 keeps top_k / norm_topk_prob on the router, 4.x on the block.
    top_k = getattr(block.gate, "top_k", None) or _first(block, "top_k")
    norm = getattr(block.gate, "norm_topk_prob", None)
    norm = _first(block, "norm_topk_prob") if norm is None else norm
    spec.config.update(top_k=int(top_k), router="topk", score_func="softmax", renormalize=bool(norm),
                       routed_scaling_factor=1.0, **_shared_fields(1 if shared_width else 0, shared_width, gate=True))
    return spec


def _spec_deepseek_v3(block: nn.Module) -> _BlockSpec:
    where = "from_deepseek_v3"
    _check_family(block, "deepseek_v3")
    _need(block, "deepseek_v3", "gate.weight", "gate.e_score_correction_bias", "experts", "shared_experts")
    gate = block.gate
    w13_shared, _ = _mlp_weights(block.shared_experts, where)
    shared_width = w13_shared.shape[0] // 2
    # n_shared_experts=0 gives an MLP of width 0, whose output is 0: no shared term.
    spec = _routed("deepseek_v3", gate.weight, block.experts, shared=block.shared_experts if shared_width else None,
                   expert_bias=gate.e_score_correction_bias)
    config = spec.config
    n_group = int(_first(gate, "num_group", "n_group"))
    topk_group = int(_first(gate, "topk_group"))
    # The width is what the weights say; the count, from the config, only splits it into equal experts.
    n_shared = int(getattr(getattr(block, "config", None), "n_shared_experts", 1) or 1)
    if shared_width % n_shared:
        n_shared = 1
    config.update(top_k=int(_first(gate, "top_k")), score_func="sigmoid",
                  renormalize=bool(_first(gate, "norm_topk_prob")),
                  routed_scaling_factor=float(_first(gate, "routed_scaling_factor")),
                  **_shared_fields(n_shared if shared_width else 0, shared_width, gate=False))
    if n_group > 1:
        config.update(router="hierarchical", hierarchy_depth=2, hierarchy_groups=(n_group,),
                      hierarchy_topk_groups=(topk_group,))
    else:  # one group: group-limited routing is plain top-k
        config.update(router="topk")
    return spec


def _shared_fields(count: int, width: int, gate: bool) -> dict[str, Any]:
    """The MoEConfig fields of ``count`` shared experts of total width ``width``. Without any, no width: a
    width of 0 would mean the routed experts' width to MoEConfig."""
    if not count:
        return {"num_shared_experts": 0, "shared_expert_gate": False}
    return {"num_shared_experts": count, "shared_expert_ffn_size": width // count, "shared_expert_gate": gate}


_SPECS = {"mixtral": _spec_mixtral, "qwen2_moe": _spec_qwen2_moe, "deepseek_v3": _spec_deepseek_v3}
_CLASS_OF = {family: name for name, family in FAMILIES.items()}


def hf_family(block: nn.Module) -> str:
    """The family (``"mixtral"``, ``"qwen2_moe"``, ``"deepseek_v3"``) of a transformers MoE block,
    from its class or a base class; TypeError naming the supported classes otherwise."""
    family = _known_family(block)
    if family is not None:
        return family
    raise TypeError(f"unsupported Hugging Face MoE block {type(block).__name__}: expected one of "
                    f"{', '.join(FAMILIES)} (or call from_mixtral / from_qwen2_moe / from_deepseek_v3 "
                    f"directly on a block with the same layout)")


# -- import --------------------------------------------------------------------------------------


def _build(block: nn.Module, spec: _BlockSpec, overrides: dict[str, Any]) -> PiMoELayer:
    fixed = sorted(set(overrides) & set(spec.config))
    if fixed:
        raise ValueError(f"from_{spec.family}: {', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} read from "
                         f"the block and cannot be overridden")
    # transformers 5 makes a block's fused expert weights with torch.empty: one built from its config and never
    # initialised would import as a layer that computes NaN
    if bad := nonfinite_tensors([*block.named_parameters(), *block.named_buffers()]):
        raise ValueError(f"from_{spec.family}: the block's {first_few(bad)} hold NaN or infinite values (weights "
                         "never initialised, or damaged): the layer imported from them would compute NaN")
    cfg = MoEConfig(**{**spec.config, **spec.soft_config, **overrides})
    w13_EDF2, w2_EFD = spec.w13_EDF2, spec.w2_EFD
    layer = PiMoELayer(cfg).to(device=w13_EDF2.device, dtype=w13_EDF2.dtype)  # routers stay fp32
    with torch.no_grad():
        layer.router.gate.weight.copy_(spec.gate_weight)
        layer.experts.w13_EDF2.copy_(w13_EDF2)
        layer.experts.w2_EFD.copy_(w2_EFD)
        if spec.expert_bias is not None:
            layer.router.expert_bias.copy_(spec.expert_bias)
        if spec.shared is not None:
            w13, w2 = _mlp_weights(spec.shared, f"from_{spec.family}")
            layer.shared.ffn.w13.weight.copy_(w13)
            layer.shared.ffn.w2.weight.copy_(w2)
        if spec.shared_gate_weight is not None:
            layer.shared.gate.weight.copy_(spec.shared_gate_weight)
    return layer


def from_mixtral(block: nn.Module, **overrides: Any) -> PiMoELayer:
    """A PiMoE layer equal to a transformers ``MixtralSparseMoeBlock``.

    ``overrides`` set :class:`MoEConfig` fields the block does not fix (``impl``,
    ``aux_loss_coef``, ``z_loss_coef``, ``bias_update_rate``, ``capacity_factor``, ...); the block's
    ``jitter_noise`` becomes ``router_jitter`` unless overridden.
    """
    return _build(block, _spec_mixtral(block), overrides)


def from_qwen2_moe(block: nn.Module, **overrides: Any) -> PiMoELayer:
    """A PiMoE layer equal to a transformers ``Qwen2MoeSparseMoeBlock`` (routed experts plus the
    sigmoid-gated shared expert); ``overrides`` as in :func:`from_mixtral`."""
    return _build(block, _spec_qwen2_moe(block), overrides)


def from_deepseek_v3(block: nn.Module, *, group_mask_fill: str = "-inf", **overrides: Any) -> PiMoELayer:
    """A PiMoE layer equal to a transformers ``DeepseekV3MoE`` block.

    ``group_mask_fill="-inf"`` (default) follows DeepSeek's published routing (and transformers
    since huggingface/transformers#45441); ``"zero"`` reproduces older transformers releases, which
    filled dropped groups with 0.0 (see the module docstring). ``overrides`` as in
    :func:`from_mixtral`.
    """
    return _build(block, _spec_deepseek_v3(block), {"group_mask_fill": group_mask_fill, **overrides})


_IMPORTERS = {"mixtral": from_mixtral, "qwen2_moe": from_qwen2_moe, "deepseek_v3": from_deepseek_v3}


def from_hf(block: nn.Module, **overrides: Any) -> PiMoELayer:
    """Import a transformers MoE block: Mixtral, Qwen2-MoE or DeepSeek-V3 (dispatch on the class)."""
    return _IMPORTERS[hf_family(block)](block, **overrides)


# -- export --------------------------------------------------------------------------------------


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    """Config fields as compared on export: the shared experts by their total width."""
    out = {k: v for k, v in config.items() if k not in ("num_shared_experts", "shared_expert_ffn_size")}
    out["shared_width"] = config["num_shared_experts"] * config.get("shared_expert_ffn_size", 0)
    return out


def _setting(cfg: MoEConfig, name: str) -> Any:
    return cfg.num_shared_experts * cfg.shared_ffn_size if name == "shared_width" else getattr(cfg, name)


# transformers filled the scores of dropped groups with 0.0 before this release (the module's notes)
GROUP_MASK_FIX = "5.24"


def _group_mask_fill(block: nn.Module) -> str:
    """How a DeepSeek-V3 block fills the selection scores of dropped groups: as the published model
    (-inf), unless it is a transformers block from a release before :data:`GROUP_MASK_FIX` (0.0)."""
    if not type(block).__module__.startswith("transformers."):
        return "-inf"  # the model repositories' own modeling_deepseek.py
    import transformers
    from packaging.version import InvalidVersion, Version

    try:
        old = Version(transformers.__version__) < Version(GROUP_MASK_FIX)
    except InvalidVersion:
        old = False
    return "zero" if old else "-inf"


@torch.no_grad()
def to_hf(layer: PiMoELayer, block: nn.Module, family: str | None = None) -> nn.Module:
    """Write ``layer``'s weights into the transformers MoE ``block`` (same family and shapes) and
    return the block. ``family`` (``"mixtral"``, ``"qwen2_moe"``, ``"deepseek_v3"``) defaults to the
    block's class. ValueError listing every setting where the block would route differently."""
    if family is not None and family not in _SPECS:
        raise ValueError(f"to_hf: family must be one of {', '.join(_SPECS)}, got {family!r}")
    known = _known_family(block)
    if family is not None and known is not None and known != family:
        raise ValueError(f"to_hf: family={family!r}, but {type(block).__name__} is a {known} block; leave family out "
                         f"or pass {known!r}")
    spec = _SPECS[family or hf_family(block)](block)
    mismatches = [f"{name}: layer {_setting(layer.cfg, name)!r}, block {value!r}"
                  for name, value in _normalised(spec.config).items() if _setting(layer.cfg, name) != value]
    for name in ("capacity_factor", "top_p"):
        if getattr(layer.cfg, name) is not None:
            mismatches.append(f"{name}: layer {getattr(layer.cfg, name)!r}, block has none")
    if (family or hf_family(block)) == "deepseek_v3" and layer.cfg.router == "hierarchical" and (
            (fill := _group_mask_fill(block)) != layer.cfg.group_mask_fill):
        mismatches.append(f"group_mask_fill: layer {layer.cfg.group_mask_fill!r}, block {fill!r}")
    bias = getattr(layer.router, "expert_bias", None)
    if spec.expert_bias is None and bias is not None and bool(bias.any()):
        mismatches.append("expert_bias: the layer has a nonzero selection bias, the block none")
    if mismatches:
        raise ValueError(f"to_hf: the layer does not match the {type(block).__name__}: " + "; ".join(mismatches))
    spec.gate_weight.copy_(layer.router.gate.weight)
    spec.experts.write(layer.experts.w13_EDF2, layer.experts.w2_EFD)
    if spec.expert_bias is not None:
        spec.expert_bias.copy_(layer.router.expert_bias)
    if spec.shared is not None:
        gate, up = layer.shared.ffn.w13.weight.chunk(2, dim=0)
        spec.shared.gate_proj.weight.copy_(gate)
        spec.shared.up_proj.weight.copy_(up)
        spec.shared.down_proj.weight.copy_(layer.shared.ffn.w2.weight)
    if spec.shared_gate_weight is not None:
        spec.shared_gate_weight.copy_(layer.shared.gate.weight)
    return block


PiMoELayer.hf_importer = staticmethod(from_hf)
