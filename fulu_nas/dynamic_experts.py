"""Dynamic expert scaling during training (load- and performance-driven, after DynMoE).

Every ``every`` steps, for each MoE layer, with the load accumulated since the last check:
- experts whose load is below ``remove_below`` x the mean are removed (they receive almost no
  tokens);
- the most loaded expert is split (cloned, router row copied plus noise) when load is
  concentrated (its load above ``add_above`` x the mean), or when training has stalled (the loss
  improved by less than ``plateau`` of itself over the window while still above ``grow_loss``):
  the model is asking more of its experts than they give. (Under load balancing the load stays
  even, so growth comes from the plateau test; ``grow_loss`` defaults to 0 because a loss level
  that means "solved" is task-specific.)
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


class DynamicExperts:
    def __init__(self, model, optimizer: torch.optim.Optimizer, cfg: DynamicExpertsConfig):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.layers: list[PiMoELayer] = model.moe_layers()
        self.load = [torch.zeros(layer.cfg.num_experts) for layer in self.layers]
        self.losses: list[float] = []
        self.window_loss: float | None = None
        self.history: list[list[int]] = [[layer.cfg.num_experts for layer in self.layers]]

    def observe(self, moe_stats: list[dict[str, Tensor]], loss: float) -> None:
        for i, stats in enumerate(moe_stats):
            self.load[i] += stats["tokens_per_expert"].detach().float().cpu()
        self.losses.append(loss)

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
        for i, layer in enumerate(self.layers):
            source = self.plan(self.load[i], layer.cfg.top_k, stalled)
            if source != list(range(layer.cfg.num_experts)):
                self._apply(layer, source)
                changed = True
            self.load[i] = torch.zeros(layer.cfg.num_experts)
        self.window_loss, self.losses = loss, []
        if changed:
            self.history.append([layer.cfg.num_experts for layer in self.layers])
        return changed

    def plan(self, load: Tensor, top_k: int, stalled: bool) -> list[int]:
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
        keep.sort()
        busiest = max(keep, key=lambda e: float(load[e]))
        concentrated = load[busiest] > cfg.add_above * mean
        if (concentrated or stalled) and len(keep) < cfg.max_experts:
            keep.append(busiest)
        return keep

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
