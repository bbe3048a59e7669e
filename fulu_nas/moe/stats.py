"""Routing statistics, computed on the device as 0-d / 1-d tensors (never read on the host here).

Definitions (c_e = assignments expert e received, mean over experts):
- ``tokens_per_expert``: c (float, shape E)
- ``utilisation``: share of experts with c_e > 0
- ``load_balance``: normalised load entropy ``-sum p_e log p_e / log E`` with ``p = c / sum c``
  (1 = perfectly even; defined as 1 for a single expert)
- ``max_vio``: ``(max c - mean c) / mean c`` (0 = perfectly even)
- ``cv``: population std of c over its mean
- ``router_entropy``: mean over tokens of the router distribution's entropy, in nats
- ``dropped_share``: token-choice: share of assignments dropped by the capacity limit;
  expert-choice: share of tokens that no expert took
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

STAT_KEYS = ("tokens_per_expert", "utilisation", "load_balance", "max_vio", "cv",
             "router_entropy", "dropped_share", "aux_loss", "z_loss", "balance_loss")


def token_mean(x_T: Tensor) -> Tensor:
    """Mean over the token dimension (dim 0), zero for no tokens (``mean`` would give NaN, which
    an empty batch must not feed into the losses even with a zero coefficient: 0 * NaN is NaN)."""
    return x_T.sum(0) / max(x_T.shape[0], 1)


def load_statistics(counts_E: Tensor) -> dict[str, Tensor]:
    """Utilisation, balance, MaxVio and CV of a load vector."""
    c = counts_E.float()
    E = c.shape[0]
    mean = c.mean().clamp_min(1e-20)
    p = c / c.sum().clamp_min(1e-20)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    balance = entropy / math.log(E) if E > 1 else torch.ones_like(entropy)
    return {
        "tokens_per_expert": c,
        "utilisation": (c > 0).float().mean(),
        "load_balance": balance,
        "max_vio": (c.max() - c.mean()) / mean,
        "cv": c.std(correction=0) / mean,
    }


def router_entropy(probs_TE: Tensor | None, like: Tensor) -> Tensor:
    """Mean per-token entropy of the router distribution (0 for a fixed assignment)."""
    if probs_TE is None:
        return torch.zeros((), device=like.device)
    return token_mean(-(probs_TE * torch.log(probs_TE.clamp_min(1e-30))).sum(-1))
