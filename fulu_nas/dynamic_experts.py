"""Dynamic expert scaling during training (load- and performance-driven, after DynMoE).

Every ``every`` steps, for each MoE layer, with the load accumulated since the last check and a
probe of the latest training batch (each token's router probabilities, top-1 expert and loss):
- experts whose load is below ``remove_below`` x the mean are removed (they receive almost no
  tokens);
- redundant experts are merged: when the tokens of expert i give expert j almost the probability
  they give i, and the other way round (``merge_above`` of it, both ways), the two serve the same
  kind of token, and the less loaded one is removed. Only once the router has differentiated
  (most pairs well below the threshold), so nothing merges while routing is still uniform, and
  only experts that have lived through ``merge_after`` checks (a fresh clone is its original's
  duplicate until it has had the chance to take its own share of tokens). A layer that merged
  has as many experts as its tokens need and grows no more;
- an expert is split (cloned, router row copied plus noise) when load is concentrated (the
  busiest above ``add_above`` x the mean), or when training has stalled (the loss improved by
  less than ``plateau`` of itself over the window while still above ``grow_loss``): the model
  asks more of its experts than they give. The expert split is the one whose tokens have the
  highest loss (the worst served, e.g. one shared by two kinds of token); without a probe, the
  busiest. (Under load balancing the load stays even, so growth comes from the plateau test.)
always within ``[min_experts, max_experts]`` (and never below ``top_k``). Once training progress
(the fraction of the step or time budget, as the schedule counts it) reaches ``freeze_after``
the expert set stays fixed, so the router and experts settle on it before training ends. The
optimizer state of the affected parameters moves with the experts, so Adam's moments follow
their expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .moe import PiMoELayer


@dataclass(frozen=True)
class Probe:
    """One MoE layer on the latest batch: router probabilities, top-1 expert and loss per token."""

    probs_TE: Tensor
    top1_T: Tensor
    loss_T: Tensor
    labelled_T: Tensor


@dataclass(frozen=True)
class DynamicExpertsConfig:
    every: int = 100
    min_experts: int = 2
    max_experts: int = 64
    remove_below: float = 0.1
    add_above: float = 2.0
    plateau: float = 0.05
    grow_loss: float = 0.0
    noise: float = 0.05
    freeze_after: float = 0.5
    merge_above: float = 0.2
    merge_after: int = 3


class DynamicExperts:
    def __init__(self, model, optimizer: torch.optim.Optimizer, cfg: DynamicExpertsConfig):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.layers: list[PiMoELayer] = model.moe_layers()
        self.load = [torch.zeros(layer.cfg.num_experts) for layer in self.layers]
        self.losses: list[float] = []
        self.window_loss: float | None = None
        self.history: list[list[int]] = [[layer.cfg.num_experts for layer in self.layers]]
        # Checks each expert has lived through: a fresh clone is still its original's duplicate,
        # so it is not merged back before it had the chance to take a different share of tokens;
        # and the first experts are not judged before routing has formed.
        self.ages = [[0] * layer.cfg.num_experts for layer in self.layers]
        # A layer that had to merge duplicates has at least as many experts as its tokens need:
        # it grows no more (a stalled loss is then not for want of experts).
        self.saturated = [False for _ in self.layers]

    def observe(self, moe_stats: list[dict[str, Tensor]], loss: float, batch=None) -> None:
        for i, stats in enumerate(moe_stats):
            self.load[i] += stats["tokens_per_expert"].detach().float().cpu()
        self.losses.append(loss)
        self.batch = batch

    @torch.no_grad()
    def probe(self) -> list[Probe] | None:
        """Each MoE layer's router probabilities, top-1 experts and the tokens' losses on the latest
        batch (None without a batch or for routers without per-token scores)."""
        from .evaluate import capture_routing, top1_expert
        from .tasks import IGNORE

        batch = getattr(self, "batch", None)
        if batch is None:
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            with capture_routing(self.model) as routed:
                logits = self.model(batch.tokens).logits.float()
        finally:
            self.model.train(was_training)
        targets = batch.targets.flatten()
        loss_T = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.clamp_min(0), reduction="none")
        labelled_T = targets != IGNORE
        probes = []
        for captured in routed:
            r = captured[-1]
            if r.probs_TE is None:
                return None
            probes.append(Probe(r.probs_TE.float().cpu(), top1_expert(r).cpu(), loss_T.cpu(), labelled_T.cpu()))
        return probes

    def maybe_rescale(self, step: int, progress: float = 0.0) -> bool:
        """Rescale every ``every`` steps until ``progress`` reaches ``freeze_after``."""
        if step % self.cfg.every:
            return False
        if progress >= self.cfg.freeze_after:
            self.load = [torch.zeros_like(load) for load in self.load]
            self.losses = []
            return False
        loss = sum(self.losses) / len(self.losses)
        stalled = (self.window_loss is not None and loss > self.cfg.grow_loss
                   and self.window_loss - loss < self.cfg.plateau * loss)
        changed = False
        probes = self.probe()
        for i, layer in enumerate(self.layers):
            source = self.plan(self.load[i], layer.cfg.top_k, stalled and not self.saturated[i],
                               probes[i] if probes else None, self.ages[i])
            self.saturated[i] |= self.merged
            old_ages = self.ages[i]
            self.ages[i] = [0 if e in source[:j] else old_ages[e] + 1 for j, e in enumerate(source)]
            if source != list(range(layer.cfg.num_experts)):
                self._apply(layer, source)
                changed = True
            self.load[i] = torch.zeros(layer.cfg.num_experts)
        self.window_loss, self.losses = loss, []
        if changed:
            self.history.append([layer.cfg.num_experts for layer in self.layers])
        return changed

    def plan(self, load: Tensor, top_k: int, stalled: bool, probe: Probe | None = None,
             ages: list[int] | None = None) -> list[int]:
        """Which old expert each new expert copies (a removal drops an index, a split repeats one)."""
        cfg, E = self.cfg, load.numel()
        floor = max(cfg.min_experts, top_k)
        mean = load.mean().clamp_min(1e-9)
        keep = [e for e in range(E) if load[e] >= cfg.remove_below * mean]
        # remove the least loaded first, never below the floor
        for e in sorted(set(range(E)) - set(keep), key=lambda e: float(load[e])):
            if len(keep) >= floor:
                break
            keep.append(e)
        self.merged = False
        if probe is not None:
            settled = [e for e in keep if ages is None or ages[e] >= self.cfg.merge_after]
            for e in self.redundant(probe, load, settled):
                if len(keep) > floor:
                    keep.remove(e)
                    self.merged = True
        keep.sort()
        busiest = max(keep, key=lambda e: float(load[e]))
        concentrated = load[busiest] > cfg.add_above * mean
        if (concentrated or stalled) and len(keep) < cfg.max_experts:
            keep.append(self.worst_served(probe, keep) if probe is not None and not concentrated else busiest)
        return keep

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

    @staticmethod
    def worst_served(probe: Probe, keep: list[int]) -> int:
        """The kept expert whose labelled tokens have the highest mean loss."""
        E = probe.probs_TE.shape[1]
        top1 = probe.top1_T[probe.labelled_T]
        loss = probe.loss_T[probe.labelled_T]
        counts = torch.bincount(top1, minlength=E).float()
        mean_loss = torch.zeros(E).index_add_(0, top1, loss) / counts.clamp_min(1)
        return max(keep, key=lambda e: float(mean_loss[e]) if counts[e] > 0 else -1.0)

    def _apply(self, layer: PiMoELayer, source: list[int]) -> None:
        """Remap the layer, then point the optimizer at the new parameters with their state
        (Adam's moments) remapped the same way; a clone starts from its original's moments."""
        index = torch.tensor(source)
        for old, new, dim in layer.remap_experts(source, noise=self.cfg.noise):
            for group in self.optimizer.param_groups:
                group["params"] = [new if p is old else p for p in group["params"]]
            state = self.optimizer.state.pop(old, None)
            if state:
                self.optimizer.state[new] = {
                    k: v.index_select(dim, index.to(v.device)) if torch.is_tensor(v) and v.dim() == new.dim() else v
                    for k, v in state.items()}
