"""Training: AdamW, warm-up + cosine schedule over a step or wall-clock budget, gradient clipping,
bf16 autocast on CUDA, the MoE balancing losses and bias updates, divergence detection, progress.

The schedule runs on *progress* = max(step / steps, elapsed / max_seconds), so a wall-clock
budget gets a complete warm-up and decay just as a step budget does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .dynamic_experts import DynamicExperts, DynamicExpertsConfig
from .models import PiMoETransformer
from .tasks import IGNORE, Batch, Task


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exploded; carries the step and the value."""

    def __init__(self, step: int, value: float, reason: str):
        self.step, self.value, self.reason = step, value, reason
        super().__init__(f"training diverged at step {step}: loss {value} ({reason})")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    max_seconds: float | None = None
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    gradient_checkpointing: bool = False
    report_every: int = 25
    divergence_factor: float = 10.0
    progress: bool = True
    dynamic_experts: DynamicExpertsConfig | None = None


@dataclass
class StepReport:
    """What the callback receives every ``report_every`` steps (host values)."""

    step: int
    loss: float
    lr: float
    elapsed: float
    layers: list[dict[str, float | list[float]]]

    @property
    def load_balance(self) -> float:
        return sum(layer["load_balance"] for layer in self.layers) / max(1, len(self.layers))


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    stop_reason: str
    history: list[StepReport] = field(default_factory=list)
    expert_counts: list[list[int]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` of the budget, then cosine decay to ``min_ratio``."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    t = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def task_loss(logits: Tensor, batch: Batch) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)


def host_layer_stats(moe_stats: list[dict[str, Tensor]]) -> list[dict[str, float | list[float]]]:
    keys = ("utilisation", "load_balance", "max_vio", "cv", "router_entropy", "dropped_share", "aux_loss")
    out = []
    for s in moe_stats:
        d: dict[str, float | list[float]] = {k: float(s[k].detach()) for k in keys}
        d["tokens_per_expert"] = s["tokens_per_expert"].tolist()
        out.append(d)
    return out


def _decays(name: str, p: torch.Tensor) -> bool:
    # Weight decay on matrices only: not on norms, biases or positions, and not on the router,
    # whose logits would shrink once the task loss stops pulling, letting routing drift.
    return p.dim() >= 2 and not name.startswith("pos.") and ".router." not in name


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if _decays(n, p)]
    rest = [p for n, p in model.named_parameters() if not _decays(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def train(model: PiMoETransformer, task: Task, cfg: TrainConfig,
          callback: Callable[[StepReport], None] | None = None) -> TrainResult:
    """Train ``model`` on ``task`` until ``cfg.steps`` or ``cfg.max_seconds`` runs out.

    ``callback`` gets a :class:`StepReport` every ``report_every`` steps and at the end; it may
    raise to stop training (a search uses that to prune). Raises :class:`TrainingDiverged` on a
    NaN/inf loss or one above ``divergence_factor`` times the first loss.
    """
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device).train()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = _optimizer(model, cfg)
    dynamic = DynamicExperts(model, optimizer, cfg.dynamic_experts) if cfg.dynamic_experts else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    batches = task.train_batches(cfg.batch_size, seed=cfg.seed)
    result = TrainResult(steps=0, seconds=0.0, final_loss=float("nan"), stop_reason="steps")
    first_loss = None
    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, disable=not cfg.progress, desc="train", leave=False)
    try:
        for step in range(1, cfg.steps + 1):
            elapsed = time.perf_counter() - start
            progress = step / cfg.steps
            if cfg.max_seconds:
                progress = max(progress, elapsed / cfg.max_seconds)
            lr = cfg.lr * lr_factor(progress, cfg.warmup_fraction, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr

            batch = next(batches).to(device)
            with autocast:
                out = model(batch.tokens)
            loss = task_loss(out.logits, batch)
            value = loss.item()  # one sync per step: cheap next to the step, and catches NaN at once
            first_loss = value if first_loss is None else first_loss
            if not math.isfinite(value):
                raise TrainingDiverged(step, value, "not finite")
            if value > cfg.divergence_factor * max(first_loss, 1e-3) and step > 1:
                raise TrainingDiverged(step, value, f"above {cfg.divergence_factor}x the first loss {first_loss:.4g}")

            optimizer.zero_grad(set_to_none=True)
            (loss + out.balance_loss).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            model.update_expert_biases(out.moe_stats)
            if dynamic is not None:
                dynamic.observe(out.moe_stats, value)
                dynamic.maybe_rescale(step, progress)

            result.steps, result.final_loss = step, value
            bar.update(1)
            last = step == cfg.steps or (cfg.max_seconds and time.perf_counter() - start >= cfg.max_seconds)
            if step % cfg.report_every == 0 or last:
                report = StepReport(step, value, lr, time.perf_counter() - start, host_layer_stats(out.moe_stats))
                result.history.append(report)
                bar.set_postfix(loss=f"{value:.4f}", balance=f"{report.load_balance:.3f}")
                if callback is not None:
                    callback(report)
            if last and step < cfg.steps:
                result.stop_reason = "time"
                break
    finally:
        bar.close()
        result.seconds = time.perf_counter() - start
    result.expert_counts = [[layer.cfg.num_experts for layer in model.moe_layers()]]
    if dynamic is not None:
        result.expert_counts = dynamic.history
    return result
