"""The MoE implementations ``bench peers`` times beside the PiMoE layer, each built on a layer's
weights: a plain ``torch._grouped_mm`` MoE, ScatterMoE (from its source, when at hand) and Hugging
Face transformers' Mixtral block. transformers and ScatterMoE are imported when used."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...moe import PiMoELayer

# -- the plain grouped_mm peer --------------------------------------------------------------------


def plain_route(x_TD: Tensor, gate_ED: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Softmax top-k routing in fp32, renormalised: ``(weight_TK, expert_TK)``."""
    probs_TE = torch.softmax(F.linear(x_TD.float(), gate_ED.float()), dim=-1)
    weight_TK, expert_TK = probs_TE.topk(k, dim=-1)
    return weight_TK / weight_TK.sum(-1, keepdim=True), expert_TK


def plain_experts(x_TD: Tensor, weight_TK: Tensor, expert_TK: Tensor, w13_EDF: Tensor, w2_EFD: Tensor,
                  activation: str) -> Tensor:
    """The experts as a user would write them with ``torch._grouped_mm``: sort the slots by expert,
    gather their rows, grouped GEMM, activation, grouped GEMM, times the routing weights, added
    back to the tokens."""
    K = expert_TK.shape[1]
    expert_N = expert_TK.reshape(-1)
    order_N = torch.argsort(expert_N, stable=True)
    counts_E = torch.zeros(w13_EDF.shape[0], dtype=torch.long, device=x_TD.device).index_add_(
        0, expert_N, torch.ones_like(expert_N))
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    token_N = order_N // K
    h_NF = torch._grouped_mm(x_TD[token_N], w13_EDF, offs=offsets_E)
    if activation == "swiglu":
        gate_NF, up_NF = h_NF.chunk(2, dim=-1)
        a_NF = F.silu(gate_NF) * up_NF
    else:
        a_NF = F.gelu(h_NF)
    y_ND = torch._grouped_mm(a_NF, w2_EFD, offs=offsets_E) * weight_TK.reshape(-1)[order_N, None].to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)


class PlainGroupedMM(nn.Module):
    """:func:`plain_route` then :func:`plain_experts`, on copies of a PiMoE layer's weights."""

    def __init__(self, layer: PiMoELayer):
        super().__init__()
        self.top_k, self.activation = layer.cfg.top_k, layer.cfg.activation
        self.gate_ED = nn.Parameter(layer.router.gate.weight.detach().clone().float())
        self.w13_EDF = nn.Parameter(layer.experts.w13_EDF2.detach().clone())
        self.w2_EFD = nn.Parameter(layer.experts.w2_EFD.detach().clone())

    def route(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        return plain_route(x_TD, self.gate_ED, self.top_k)

    def experts(self, x_TD: Tensor, weight_TK: Tensor, expert_TK: Tensor) -> Tensor:
        return plain_experts(x_TD, weight_TK, expert_TK, self.w13_EDF, self.w2_EFD, self.activation)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.experts(x_TD, *self.route(x_TD))


# -- peers from other projects --------------------------------------------------------------------


class ScatterMoEPeer(nn.Module):
    """ScatterMoE's ``MLP`` (GELU) or ``GLUMLP`` (SwiGLU) behind :func:`plain_route`, with a PiMoE
    layer's weights: ``ParallelExperts.weight`` is (E, out, in), our (E, in, out) transposed; its
    GLU computes ``activation(gates) * h`` from the first GEMM's halves ``[h | gates]``, so our
    ``[gate | up]`` becomes ``[up | gate]``."""

    def __init__(self, layer: PiMoELayer, mlp_classes: tuple[type, type]):
        super().__init__()
        mlp_cls, glu_cls = mlp_classes
        cfg = layer.cfg
        self.top_k = cfg.top_k
        if cfg.activation == "swiglu":
            self.mlp = glu_cls(cfg.hidden_size, cfg.expert_ffn_size, cfg.num_experts, cfg.top_k, activation=nn.SiLU())
        else:
            self.mlp = mlp_cls(cfg.hidden_size, cfg.expert_ffn_size, cfg.num_experts, cfg.top_k, activation=nn.GELU())
        w13_EDF = layer.experts.w13_EDF2.detach()
        if cfg.activation == "swiglu":
            gate_EDF, up_EDF = w13_EDF.chunk(2, dim=-1)
            w13_EDF = torch.cat([up_EDF, gate_EDF], dim=-1)
        self.mlp.to(device=w13_EDF.device, dtype=w13_EDF.dtype)
        with torch.no_grad():
            self.mlp.experts.weight.copy_(w13_EDF.transpose(1, 2))
            self.mlp.output_experts.weight.copy_(layer.experts.w2_EFD.detach().transpose(1, 2))
        self.gate_ED = nn.Parameter(layer.router.gate.weight.detach().clone().float())

    def experts(self, x_TD: Tensor, weight_TK: Tensor, expert_TK: Tensor) -> Tensor:
        return self.mlp(x_TD, weight_TK.to(x_TD.dtype), expert_TK)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.experts(x_TD, *plain_route(x_TD, self.gate_ED, self.top_k))


def import_scattermoe(peers_path: str | None) -> tuple[type, type]:
    """ScatterMoE's ``(MLP, GLUMLP)``, with ``peers_path`` (a folder holding ``scattermoe/``) first
    on ``sys.path``; ImportError (or whatever its import raises) when it cannot be imported."""
    if peers_path and peers_path not in sys.path:
        sys.path.insert(0, peers_path)
    from scattermoe.mlp import GLUMLP, MLP

    return MLP, GLUMLP


def hf_mixtral_block(layer: PiMoELayer, experts_impl: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers ``MixtralSparseMoeBlock`` of the layer's shapes holding its weights (the
    router's fp32 weight rounded to the block's dtype), in eval mode."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from ...interop.hf_import import to_hf

    cfg = layer.cfg
    hf_cfg = MixtralConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.expert_ffn_size,
                           num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, hidden_act="silu",
                           router_jitter_noise=0.0, experts_implementation=experts_impl)
    hf_cfg._experts_implementation = experts_impl  # transformers 4.x has no such argument (a no-op there)
    device = layer.experts.w13_EDF2.device
    with torch.device(device):
        block = MixtralSparseMoeBlock(hf_cfg)
    block.to(dtype=dtype or layer.experts.w13_EDF2.dtype)
    to_hf(layer, block)
    return block.eval()


def hf_forward(block: nn.Module, x_TD: Tensor) -> Tensor:
    """The block on (T, D) rows: transformers 5 returns the output, 4.x ``(output, router_logits)``."""
    out = block(x_TD[None])
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(x_TD.shape)


def hf_route(block: nn.Module, x_TD: Tensor) -> Tensor:
    """The experts the block's own router (in the block's dtype) picks: ``expert_TK``."""
    routed = block.gate(x_TD)
    if isinstance(routed, tuple) and len(routed) == 3:  # transformers 5: (logits, weights, indices)
        return routed[2]
    logits = routed[0] if isinstance(routed, tuple) else routed  # 4.x: a Linear's logits
    return torch.softmax(logits.float(), dim=-1).topk(block.top_k, dim=-1).indices
