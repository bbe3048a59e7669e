"""PiMoETransformer: a small decoder-only transformer whose FFNs are PiMoE layers.

Shape suffixes: B batch, S sequence, D hidden, V vocabulary, C classes.
Pre-norm blocks (RMSNorm), causal attention through ``F.scaled_dot_product_attention``, learned
positions, an LM head tied to the token embedding, and an optional token-classification head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..moe import FeedForward, PiMoELayer
from .arch import ArchConfig


@dataclass
class ModelOutput:
    """``logits``: the task head's output (classes if the model has a classification head, else
    the vocabulary); ``hidden_states``: each block's output; ``moe_stats``: one routing-statistics
    dict per MoE layer, in layer order; ``balance_loss``: their weighted auxiliary losses, summed."""

    logits: Tensor
    hidden_states: list[Tensor]
    moe_stats: list[dict[str, Tensor]]
    balance_loss: Tensor


class CausalSelfAttention(nn.Module):
    def __init__(self, arch: ArchConfig):
        super().__init__()
        self.num_heads = arch.num_heads
        self.qkv = nn.Linear(arch.hidden_size, 3 * arch.hidden_size, bias=False)
        self.out = nn.Linear(arch.hidden_size, arch.hidden_size, bias=False)

    def forward(self, x_BSD: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, arch: ArchConfig, moe: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(arch.hidden_size, eps=arch.norm_eps)
        self.attn = CausalSelfAttention(arch)
        self.ffn_norm = nn.RMSNorm(arch.hidden_size, eps=arch.norm_eps)
        self.ffn = PiMoELayer(arch.moe) if moe else FeedForward(arch.hidden_size, arch.dense_ffn_size,
                                                                  arch.moe.activation)

    def forward(self, x_BSD: Tensor, tokens_BS: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        h = x_BSD + self.attn(self.attn_norm(x_BSD))
        if isinstance(self.ffn, PiMoELayer):
            y, stats = self.ffn(self.ffn_norm(h), token_ids=tokens_BS)
        else:
            y, stats = self.ffn(self.ffn_norm(h)), {}
        return h + y, stats


class PiMoETransformer(nn.Module):
    def __init__(self, arch: ArchConfig):
        super().__init__()
        if not isinstance(arch, ArchConfig):
            raise TypeError(f"PiMoETransformer takes an ArchConfig (ArchConfig.from_dict builds one from a mapping), "
                            f"got {type(arch).__name__}")
        self.arch = arch
        self.embed = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.pos = nn.Embedding(arch.max_seq_len, arch.hidden_size)
        moe_layers = set(arch.moe_layer_indices)
        self.blocks = nn.ModuleList(Block(arch, i in moe_layers) for i in range(arch.num_layers))
        self.norm = nn.RMSNorm(arch.hidden_size, eps=arch.norm_eps)
        self.classifier = nn.Linear(arch.hidden_size, arch.num_classes) if arch.num_classes else None
        self.gradient_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's scheme for the dense parts; residual output projections scaled by depth. The
        # experts keep their own fan-in initialisation.
        for name, p in self.named_parameters():
            if ".experts." in name or ".router." in name or p.dim() < 2:
                continue
            residual_out = name.endswith(("attn.out.weight", "w2.weight"))
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.arch.num_layers) if residual_out else 0.02)

    def moe_layers(self) -> list[PiMoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, PiMoELayer)]

    def forward(self, tokens_BS: Tensor) -> ModelOutput:
        if tokens_BS.dim() != 2 or tokens_BS.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens: expected a (batch, sequence) tensor of int64 or int32 ids (the embedding "
                             f"takes no other type), got shape {tuple(tokens_BS.shape)} and {tokens_BS.dtype}")
        B, S = tokens_BS.shape
        if S > self.arch.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={self.arch.max_seq_len}")
        if tokens_BS.device.type == "cpu" and tokens_BS.numel() and not torch.compiler.is_compiling():
            # The embedding's own error does not say which ids; on a GPU this check would wait for the device.
            low, high = tokens_BS.min().item(), tokens_BS.max().item()
            if low < 0 or high >= self.arch.vocab_size:
                raise ValueError(f"tokens: ids must be in [0, {self.arch.vocab_size}) (vocab_size), got "
                                 f"{low if low < 0 else high}")
        x = self.embed(tokens_BS) + self.pos(torch.arange(S, device=tokens_BS.device))
        hidden, stats = [], []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x, s = checkpoint(block, x, tokens_BS, use_reentrant=False)
            else:
                x, s = block(x, tokens_BS)
            hidden.append(x)
            if s:
                stats.append(s)
        h = self.norm(x)
        logits = self.classifier(h) if self.classifier is not None else F.linear(h, self.embed.weight)
        balance = sum((s["balance_loss"] for s in stats), torch.zeros((), device=h.device))
        return ModelOutput(logits=logits, hidden_states=hidden, moe_stats=stats, balance_loss=balance)

    @torch.no_grad()
    def update_expert_biases(self, moe_stats: list[dict[str, Tensor]]) -> None:
        """Auxiliary-loss-free balancing step for every MoE layer (after an optimizer step)."""
        for layer, stats in zip(self.moe_layers(), moe_stats, strict=True):
            layer.update_expert_bias(stats["tokens_per_expert"])

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and those one token activates (all dense parts + active experts)."""
        return parameter_counts(self, self.moe_layers())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Analytic forward FLOPs per token (2 per multiply-add), at sequence length ``seq_len``
        (default ``max_seq_len``; causal attention averages ``seq_len / 2`` keys per query)."""
        a, D = self.arch, self.arch.hidden_size
        S = seq_len or a.max_seq_len
        attention = 2 * 4 * D * D + 2 * 2 * D * (S + 1) / 2
        total = a.num_layers * attention
        for block in self.blocks:
            ffn = block.ffn
            if isinstance(ffn, PiMoELayer):
                total += ffn.flops_per_token(S)
            else:
                mats = 3 if a.moe.activation == "swiglu" else 2
                total += 2 * mats * D * a.dense_ffn_size
        head = a.num_classes or a.vocab_size
        return int(total + 2 * D * head)


def parameter_counts(model: nn.Module, moe_layers: list[PiMoELayer]) -> dict[str, int]:
    """``model``'s total parameters, and those one token activates: all but the experts of ``moe_layers``
    (its PiMoE layers) it is not routed to. Each MoE layer counts as its own ``parameter_counts`` says: an
    expert-parallel layer holds only this rank's experts but counts the whole layer's."""
    counts = [layer.parameter_counts() for layer in moe_layers]
    held = sum(p.numel() for layer in moe_layers for p in layer.parameters())
    total = sum(p.numel() for p in model.parameters()) - held + sum(c["total"] for c in counts)
    inactive = sum(c["total"] - c["active"] for c in counts)
    return {"total": total, "active": total - inactive}


def seeded_model(arch: ArchConfig, seed: int, device: torch.device | str = "cpu") -> PiMoETransformer:
    """The model of ``arch`` with the initial weights ``seed`` draws, built directly on ``device``:
    initialising a GPU-sized model on the CPU takes seconds (up to 5 s for 64 experts of width 2048 in
    each of 4 layers), a GPU's does it in milliseconds. A GPU's generator draws other weights than the
    CPU's for the same seed; every trial, confirmation and retraining on one kind of device draws the
    same."""
    torch.manual_seed(seed)
    with torch.device(device):
        return PiMoETransformer(arch)
