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
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence

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
    if not isinstance(counts_E, Tensor) or counts_E.dim() != 1:  # a (layers, experts) stack gave a balance of 3
        shape = tuple(counts_E.shape) if isinstance(counts_E, Tensor) else type(counts_E).__name__
        raise ValueError(f"counts_E must be a 1-D tensor of per-expert counts, got {shape}")
    c = counts_E.float()
    E = c.shape[0]
    mean = c.mean().clamp_min(1e-20)
    p = c / c.sum().clamp_min(1e-20)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum() + 0.0  # + 0.0: no -0.0 for an empty load
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


def once(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` called at most once; later calls return the first result."""
    cell: list[object] = []

    def get():
        if not cell:
            cell.append(fn())
        return cell[0]
    return get


def stats_layout(groups: Sequence[Sequence[str]]) -> dict[str, int]:
    """Each name of ``groups`` mapped to its group's index: a :class:`LazyStats` layout."""
    return {name: i for i, names in enumerate(groups) for name in names}


def detached_stats(stats: Mapping[str, Tensor]) -> OrderedDict:
    """Statistics as a copy or a pickle of them holds them: detached (the call's graph is not the copy's,
    and ``copy.deepcopy`` refuses a tensor that has one), in an ``OrderedDict`` (see
    :meth:`LazyStats.__reduce__`). What a module that keeps its last call's statistics copies: a
    compiled call returns them as a plain dict."""
    return OrderedDict((name, value.detach()) for name, value in stats.items())


class LazyStats(Mapping[str, Tensor]):
    """The statistics of one layer call, each computed when it is first read.

    ``layout`` (from :func:`stats_layout`, built once and shared by every call) maps each name to
    its group, an index into ``computes``; ``computes[i]()`` returns a dict with group i's names,
    all of which are kept when any one of them is read. Reading every key (``dict(stats)``) gives
    what an eager computation would have.
    """

    def __init__(self, layout: Mapping[str, int], computes: Sequence[Callable[[], dict[str, Tensor]]]):
        self._layout, self._computes = layout, computes
        self._with_grad: dict[str, Tensor] = {}
        self._without_grad: dict[str, Tensor] = {}  # read under no_grad or inference_mode

    def __getitem__(self, name: str) -> Tensor:
        # A value first read under no_grad (a log line, say) has no gradient: a later read with
        # gradients on computes it again, or the balancing loss would silently train nothing.
        grad = torch.is_grad_enabled()
        if name in self._with_grad:
            return self._with_grad[name]
        values = self._with_grad if grad else self._without_grad
        if name not in values:
            values.update(self._computes[self._layout[name]]())
        return values[name]

    def __reduce__(self):
        """Pickled (``torch.save`` of the statistics, or of a module that keeps its last ones) as an
        ``OrderedDict`` of the values, detached: the computations are closures over the call. Not a
        plain dict: ``builtins.dict`` is no global torch.load's default weights-only unpickler
        allows, ``collections.OrderedDict`` (a state dict's type) is."""
        return OrderedDict, (detached_stats(self),)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout)

    def __len__(self) -> int:
        return len(self._layout)

    def __repr__(self) -> str:
        return f"LazyStats({dict(self)!r})"
