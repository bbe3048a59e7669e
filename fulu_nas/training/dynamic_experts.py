"""Dynamic expert scaling during training (load- and performance-driven, after DynMoE).

Every ``every`` steps, for each MoE layer, with the load accumulated since the last check and a
probe of the latest training batch (for each token that carries a loss: its router input, i.e.
the hidden state entering the MoE layer, its router probabilities and its top-1 expert):
- experts whose load is below ``remove_below`` x the mean are removed (they receive almost no
  tokens);
- redundant experts are merged: when the tokens of expert i give expert j almost the probability
  they give i, and the other way round (``merge_above`` of it, both ways), the two serve the same
  kind of token, and the less loaded one is removed. Only once the router has differentiated
  (most pairs well below the threshold), so nothing merges while routing is still uniform, and
  only experts that have lived through ``merge_after`` checks (a fresh clone is its original's
  duplicate until it has had the chance to take its own share of tokens);
- an expert that serves two kinds of token is split. Under load balancing the load stays even,
  so "load concentrated" says nothing about whether an expert is overloaded with work; what
  does is the shape of its tokens: a 2-means of the router inputs of the tokens whose top-1 is
  the expert. When the two clusters lie ``split_separation`` within-cluster standard deviations
  apart (along the line joining their centres; one blob cut in two gives about 3-5) and each
  holds ``split_min_share`` of the tokens, the expert is cloned and the two router rows are
  pushed apart along the direction that tells the two centres apart, so each copy takes one
  cluster from the first step on. A single well-separated kind of token never splits, so
  growth stops at the number of kinds the layer sees. A layer that merged has as many experts as
  its tokens need and grows no more;
- the busiest expert is also split (cloned, router row copied plus noise) when load is
  concentrated (above ``add_above`` x the mean, e.g. without balancing);
always within ``[min_experts, max_experts]`` (and, for token choice, never below ``top_k``). Once training progress
(the fraction of the step or time budget, as the schedule counts it) reaches ``freeze_after``
the expert set stays fixed, so the router and experts settle on it before training ends. The
optimizer state of the affected parameters moves with the experts, so Adam's moments follow
their expert (a clone starts from its original's).

Shape suffixes: T tokens, D hidden, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..checks import check_int, check_number
from ..errors import FuluConfigError
from ..moe import PiMoELayer


@dataclass(frozen=True)
class Probe:
    """One MoE layer on the latest batch, for the tokens that carry a loss: router inputs, router
    probabilities and top-1 expert."""

    x_TD: Tensor
    probs_TE: Tensor
    top1_T: Tensor


@dataclass(frozen=True)
class DynamicExpertsConfig:
    """When and how the expert set of each MoE layer changes (see the module doc).

    every: steps between checks. min_experts / max_experts: the range of the expert count.
    remove_below: an expert whose load is below this times the mean load is removed.
    add_above: the busiest expert is cloned when its load is above this times the mean.
    split_separation: an expert is split when a 2-means of its tokens' router inputs gives two
    clusters this many within-cluster standard deviations apart ...
    split_min_share: ... each holding at least this share of the expert's tokens ...
    split_min_tokens: ... of at least this many probed tokens (fewer make the 2-means unreliable).
    split_margin: after a split, each copy's router logit exceeds the other's by this much (nats)
    at the centre of its cluster (by as much the other way at the other centre).
    noise: Gaussian noise on a clone's router row, times the rows' standard deviation.
    freeze_after: share of the budget after which the expert set stays fixed.
    merge_above: two experts whose tokens give each other at least this share of the probability
    they give their own expert (both ways) serve the same tokens; one of them is removed.
    merge_after: checks an expert must have lived through before it can be merged.
    """

    every: int = 100
    min_experts: int = 2
    max_experts: int = 64
    remove_below: float = 0.1
    add_above: float = 2.0
    split_separation: float = 6.0
    split_min_share: float = 0.2
    split_min_tokens: int = 32
    split_margin: float = 2.0
    noise: float = 0.05
    freeze_after: float = 0.5
    merge_above: float = 0.2
    merge_after: int = 3

    def __post_init__(self) -> None:
        # Unchecked, every=0 divided by zero and remove_below=nan removed every expert it could.
        problems: list[str] = []
        for name, low in _INT_LOWS.items():
            check_int(name, getattr(self, name), problems, low)
        for name, (low, high, low_open) in _NUMBER_BOUNDS.items():
            check_number(name, getattr(self, name), problems, low, high, low_open)
        if not problems and self.max_experts < self.min_experts:
            problems.append(f"max_experts: expected at least min_experts ({self.min_experts}), got {self.max_experts}")
        if problems:
            raise FuluConfigError([f"dynamic_experts.{p}" for p in problems])


# DynamicExpertsConfig's bounds: integers' lowest values; numbers' (low, high, low excluded). A 2-means
# needs two tokens; a share is at most 1.
_INT_LOWS = {"every": 1, "min_experts": 1, "max_experts": 1, "split_min_tokens": 2, "merge_after": 0}
_NUMBER_BOUNDS = {"remove_below": (0, math.inf, False), "add_above": (0, math.inf, True),
                  "split_separation": (0, math.inf, False), "split_min_share": (0, 1, False),
                  "split_margin": (0, math.inf, False), "noise": (0, math.inf, False),
                  "freeze_after": (0, 1, False), "merge_above": (0, 1, False)}


@dataclass
class Plan:
    """The new expert set of one layer: new expert i copies old expert ``source[i]`` (a removal
    drops an index, a split repeats one); ``centres[e]``: for an expert split because it serves two
    kinds of token, the centres of the two clusters of router inputs (the original keeps the
    first, the clone takes the second)."""

    source: list[int]
    centres: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    merged: bool = False


def two_means(x_ND: Tensor, iters: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """2-means of the rows of ``x_ND`` (deterministic farthest-point start, a few Lloyd steps):
    the two centres and, per row, whether it belongs to the second."""
    a = x_ND[(x_ND - x_ND.mean(0)).pow(2).sum(1).argmax()]
    b = x_ND[(x_ND - a).pow(2).sum(1).argmax()]
    side_N = torch.zeros(len(x_ND), dtype=torch.bool)
    for _ in range(iters):
        side_N = (x_ND - b).pow(2).sum(1) < (x_ND - a).pow(2).sum(1)
        if side_N.all() or not side_N.any():
            break
        a, b = x_ND[~side_N].mean(0), x_ND[side_N].mean(0)
    return a, b, side_N


def separation(x_ND: Tensor, side_N: Tensor) -> float:
    """Distance between the two groups' means along the line joining them, in pooled within-group
    standard deviations (d'). Cutting one Gaussian blob in two gives about 2.7 (a little more in
    a small sample of many dimensions); two distinct clusters give much more."""
    if side_N.sum() < 2 or (~side_N).sum() < 2:
        return 0.0
    a, b = x_ND[~side_N].mean(0), x_ND[side_N].mean(0)
    p_N = x_ND @ ((b - a) / (b - a).norm().clamp_min(1e-12))
    within = (p_N[~side_N].var(unbiased=False) * (~side_N).sum() + p_N[side_N].var(unbiased=False) * side_N.sum())
    return float((p_N[side_N].mean() - p_N[~side_N].mean()) / (within / len(p_N)).sqrt().clamp_min(1e-12))


def check_dynamic_experts(model, cfg: DynamicExpertsConfig) -> None:
    """Refuse a model whose expert sets cannot change as ``cfg`` would change them: a hierarchical
    router of two levels or more (its groups fix the count), the hash router (a token's expert is its
    id's hash modulo the count, so a clone or a removal would send almost every token to another
    expert), or MoE layers that start outside ``[min_experts, max_experts]`` (the plan keeps a count in
    the range, it does not bring one into it)."""
    if not hasattr(getattr(model, "arch", None), "with_moe"):
        # an upcycled encoder's expert count is its migration's: its layers were remapped, then its
        # architecture could not follow them (AttributeError, the model left half-changed)
        raise FuluConfigError(f"dynamic_experts: {type(model).__name__}'s architecture cannot follow its layers' "
                              "expert counts; dynamic experts are for PiMoETransformer models")
    if any(layer.cfg.router == "hash" for layer in model.moe_layers()):
        raise FuluConfigError("dynamic_experts: the hash router's assignment is fixed by num_experts (a token's "
                              "expert is its id's hash modulo the count); take another router or no dynamic_experts")
    depths = sorted({layer.cfg.hierarchy_depth for layer in model.moe_layers()
                     if layer.cfg.router == "hierarchical" and layer.cfg.hierarchy_depth > 1})
    if depths:
        levels = " or ".join(map(str, depths))
        raise FuluConfigError(f"dynamic_experts: the hierarchical router of {levels} levels fixes its expert count "
                              "(its groups); take another router or no dynamic_experts")
    outside = sorted({layer.cfg.num_experts for layer in model.moe_layers()
                      if not cfg.min_experts <= layer.cfg.num_experts <= cfg.max_experts})
    if outside:
        counts = " or ".join(map(str, outside))
        raise FuluConfigError(f"dynamic_experts: the model's MoE layers have {counts} experts, outside "
                              f"min_experts={cfg.min_experts} .. max_experts={cfg.max_experts}")


class DynamicExperts:
    def __init__(self, model, optimizer: torch.optim.Optimizer, cfg: DynamicExpertsConfig):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.layers: list[PiMoELayer] = model.moe_layers()
        check_dynamic_experts(model, cfg)
        self.load = [torch.zeros(layer.cfg.num_experts) for layer in self.layers]
        self.batch = None
        self.history: list[list[int]] = [[layer.cfg.num_experts for layer in self.layers]]
        # Checks each expert has lived through: a fresh clone is still its original's duplicate,
        # so it is not merged back before it had the chance to take a different share of tokens;
        # and the first experts are not judged before routing has formed.
        self.ages = [[0] * layer.cfg.num_experts for layer in self.layers]
        # A layer that had to merge duplicates has at least as many experts as its tokens need:
        # it grows no more. (Above that size, balanced load spreads each kind of token over
        # several experts and some hold fragments of two kinds; splitting those while merging
        # others only churns the expert set.)
        self.saturated = [False for _ in self.layers]

    def observe(self, moe_stats: list[dict[str, Tensor]], batch=None) -> None:
        for i, stats in enumerate(moe_stats):
            self.load[i] += stats["tokens_per_expert"].detach().float().cpu()
        self.batch = batch

    @torch.no_grad()
    def probe(self) -> list[Probe] | None:
        """Each MoE layer's view of the latest batch (see :class:`Probe`); None without a batch or
        for routers without per-token scores."""
        from ..tasks import IGNORE
        from .evaluate import top1_expert

        if self.batch is None:
            return None
        captured: list[tuple[Tensor, object]] = []
        hooks = [layer.router.register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
                 for layer in self.layers]
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(self.batch.tokens)
        finally:
            self.model.train(was_training)
            for h in hooks:
                h.remove()
        # Only the tokens the model is trained on: the others (e.g. a sequence's domain marker,
        # which carries no target) form clusters of their own that say nothing about the experts.
        labelled_T = (self.batch.targets.flatten() != IGNORE).cpu()
        probes = []
        for x_TD, r in captured:
            if r.probs_TE is None:
                return None
            probes.append(Probe(x_TD.float().cpu()[labelled_T], r.probs_TE.float().cpu()[labelled_T],
                                top1_expert(r).cpu()[labelled_T]))
        return probes

    def maybe_rescale(self, step: int, progress: float = 0.0) -> bool:
        """Rescale every ``every`` steps until ``progress`` reaches ``freeze_after``."""
        if step % self.cfg.every:
            return False
        if progress >= self.cfg.freeze_after:
            self.load = [torch.zeros_like(load) for load in self.load]
            return False
        changed = False
        probes = self.probe()
        for i, layer in enumerate(self.layers):
            # Token choice needs top_k experts; expert choice's top_k is a capacity factor.
            floor = layer.cfg.top_k if layer.cfg.token_choice else 1
            plan = self.plan(self.load[i], floor, probes[i] if probes else None, self.ages[i],
                             grow=not self.saturated[i])
            self.saturated[i] |= plan.merged
            source, old_ages = plan.source, self.ages[i]
            self.ages[i] = [0 if e in source[:j] else old_ages[e] + 1 for j, e in enumerate(source)]
            if source != list(range(layer.cfg.num_experts)):
                self._apply(layer, plan)
                changed = True
            self.load[i] = torch.zeros(layer.cfg.num_experts)
        if changed:
            counts = [layer.cfg.num_experts for layer in self.layers]
            self.history.append(counts)
            if len(set(counts)) == 1:  # the model's architecture (what an export writes) follows its layers
                self.model.arch = self.model.arch.with_moe(num_experts=counts[0])
        return changed

    def plan(self, load: Tensor, top_k: int, probe: Probe | None = None, ages: list[int] | None = None,
             grow: bool = True) -> Plan:
        """Which old expert each new expert copies: removals, merges, then (if ``grow``) splits."""
        cfg, E = self.cfg, load.numel()
        floor = max(cfg.min_experts, top_k)
        mean = load.mean().clamp_min(1e-9)
        keep = [e for e in range(E) if load[e] >= cfg.remove_below * mean]
        # remove the least loaded first, never below the floor: the floor takes back the busiest
        for e in sorted(set(range(E)) - set(keep), key=lambda e: float(load[e]), reverse=True):
            if len(keep) >= floor:
                break
            keep.append(e)
        plan = Plan(keep)
        if probe is not None:
            settled = [e for e in keep if ages is None or ages[e] >= cfg.merge_after]
            for e in self.redundant(probe, load, settled):
                if len(keep) > floor:
                    keep.remove(e)
                    plan.merged = True
            if grow and not plan.merged:
                plan.centres = self.mixed(probe, keep)
        keep.sort()
        split = list(plan.centres)
        busiest = max(keep, key=lambda e: float(load[e]))
        if grow and not plan.merged and load[busiest] > cfg.add_above * mean and busiest not in split:
            split.append(busiest)
        split = split[:max(0, cfg.max_experts - len(keep))]
        plan.centres = {e: c for e, c in plan.centres.items() if e in split}
        plan.source = keep + split
        return plan

    def mixed(self, probe: Probe, keep: list[int]) -> dict[int, tuple[Tensor, Tensor]]:
        """The kept experts whose tokens form two well-separated clusters of router inputs (most
        separated first), with the two clusters' centres."""
        cfg = self.cfg
        found = []
        for e in keep:
            x_ND = probe.x_TD[probe.top1_T == e]
            if len(x_ND) < cfg.split_min_tokens:
                continue
            a, b, side_N = two_means(x_ND)
            share = min(int(side_N.sum()), int((~side_N).sum())) / len(x_ND)
            sep = separation(x_ND, side_N)
            if share >= cfg.split_min_share and sep >= cfg.split_separation:
                found.append((sep, e, (a, b)))
        return {e: centres for _, e, centres in sorted(found, key=lambda f: -f[0])}

    def redundant(self, probe: Probe, load: Tensor, keep: list[int]) -> list[int]:
        """Experts to remove as duplicates of another (see the module doc), the less loaded of each
        redundant pair, pairs disjoint."""
        E = probe.probs_TE.shape[1]
        top1_T = probe.top1_T
        counts = torch.bincount(top1_T, minlength=E).float()
        sums_EE = torch.zeros(E, E).index_add_(0, top1_T, probe.probs_TE)
        M = sums_EE / counts.clamp_min(1)[:, None]  # M[i, j]: mean probability of j on i's tokens
        seen = [e for e in keep if counts[e] > 0]
        if len(seen) < 2:
            return []
        ratio = M / M.diagonal().clamp_min(1e-9)[:, None]
        pair = torch.minimum(ratio, ratio.T)
        idx = torch.tensor(seen)
        sub = pair[idx][:, idx]
        off = sub[~torch.eye(len(seen), dtype=torch.bool)]
        if off.median() > self.cfg.merge_above / 2:  # routing not differentiated yet
            return []
        candidates = sorted(((float(sub[a, b]), seen[a], seen[b]) for a in range(len(seen))
                             for b in range(a + 1, len(seen)) if sub[a, b] > self.cfg.merge_above), reverse=True)
        removed: list[int] = []
        used: set[int] = set()
        for _, i, j in candidates:
            if i in used or j in used:
                continue
            used |= {i, j}
            removed.append(i if load[i] < load[j] else j)
        return removed

    def _apply(self, layer: PiMoELayer, plan: Plan) -> None:
        """Remap the layer, then point the optimizer at the new parameters with their state
        (Adam's moments) remapped the same way; then part the router rows of each split pair."""
        source = plan.source
        index = torch.tensor(source)
        for old, new, dim in layer.remap_experts(source, noise=self.cfg.noise):
            for group in self.optimizer.param_groups:
                group["params"] = [new if p is old else p for p in group["params"]]
            state = self.optimizer.state.pop(old, None)
            if state:
                self.optimizer.state[new] = {
                    k: v.index_select(dim, index.to(v.device)) if torch.is_tensor(v) and v.dim() == new.dim() else v
                    for k, v in state.items()}
        gate = getattr(layer.router, "gate", None)  # routers scoring x @ W^T (top-k, expert choice)
        if gate is None:
            return
        with torch.no_grad():
            for e, (a, b) in plan.centres.items():
                # A pure clone halves the pair's gate probability on all its tokens, and the router
                # then has to discover the split on its own (the pair may starve instead). The gate
                # has no bias, so the smallest change that gives the copies logits +m / -m apart at
                # centre a and the reverse at b is delta in the span of the centres, solving
                # delta . a = m, delta . b = -m; the boundary passes through both the origin and
                # the centres' midpoint.
                delta = torch.linalg.pinv(torch.stack([a, b])) @ torch.tensor([1.0, -1.0])
                delta = (self.cfg.split_margin / 2) * delta.to(gate.weight)
                original, clone = source.index(e), len(source) - 1 - source[::-1].index(e)
                gate.weight[original] += delta
                gate.weight[clone] -= delta
