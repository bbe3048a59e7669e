"""Evaluation (quality and routing) and cost measurement of a trained model.

Routing accuracy: the confusion matrix ``C[k, e]`` counts tokens of ground-truth domain k whose
top-1 expert is e. Experts are matched to domains optimally (Hungarian, scipy's
``linear_sum_assignment``): one-to-one when E <= K (tokens of unmatched domains count as
misrouted); when E > K every domain gets at least one expert and each remaining expert joins the
domain it serves most (many-to-one), solved exactly as one assignment problem. Accuracy = matched
tokens / all labelled tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import PiMoETransformer
from .moe import PiMoELayer, Routing, load_statistics
from .tasks import IGNORE, NO_DOMAIN, Task


def match_experts_to_domains(confusion_KE: Tensor) -> list[int]:
    """The optimal domain of each expert (-1 for an expert left unmatched when E < K)."""
    from scipy.optimize import linear_sum_assignment

    C = confusion_KE.double().cpu().numpy()
    K, E = C.shape
    if E <= K:
        rows, cols = linear_sum_assignment(C, maximize=True)
        domain = [-1] * E
        for k, e in zip(rows, cols, strict=True):
            domain[e] = int(k)
        return domain
    # Columns 0..K-1: each domain's representative expert; columns K..E-1: free experts that
    # serve their best domain. An E x E assignment covers every surjective expert->domain map.
    import numpy as np

    free = np.repeat(C.max(0, keepdims=True).T, E - K, axis=1)  # (E, E-K)
    gain = np.concatenate([C.T, free], axis=1)  # (E experts, E slots)
    experts, slots = linear_sum_assignment(gain, maximize=True)
    return [int(s) if s < K else int(C[:, e].argmax()) for e, s in sorted(zip(experts, slots, strict=True))]


def routing_accuracy(confusion_KE: Tensor) -> tuple[float, list[float], list[int]]:
    """(overall accuracy, accuracy per domain, domain of each expert)."""
    domain_of = match_experts_to_domains(confusion_KE)
    K = confusion_KE.shape[0]
    hits = torch.zeros(K, dtype=torch.float64)
    for e, k in enumerate(domain_of):
        if k >= 0:
            hits[k] += confusion_KE[k, e]
    per_domain = (hits / confusion_KE.sum(1).double().clamp_min(1)).tolist()
    return float(hits.sum() / confusion_KE.sum().clamp_min(1)), per_domain, domain_of


def top1_expert(r: Routing) -> Tensor:
    """Each token's first-choice expert (expert choice: the expert its router scores highest)."""
    if r.expert_TK is not None:
        return r.expert_TK[:, 0]
    return r.probs_TE.argmax(-1)


@contextmanager
def capture_routing(model: PiMoETransformer):
    """Collects each MoE layer's Routing during the forwards inside the block."""
    captured: list[list[Routing]] = [[] for _ in model.moe_layers()]
    hooks = [layer.router.register_forward_hook(lambda m, a, k, out, i=i: captured[i].append(out), with_kwargs=True)
             for i, layer in enumerate(model.moe_layers())]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def evaluate(model: PiMoETransformer, task: Task, batch_size: int = 64) -> dict:
    """Validation loss, the task's metrics, and routing quality per MoE layer and overall."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    layers: list[PiMoELayer] = model.moe_layers()
    K = len(task.domain_names)
    loss_sum, loss_count = 0.0, 0
    metric_sums: dict[str, list[float]] = {}
    load = [torch.zeros(layer.cfg.num_experts, device=device) for layer in layers]
    confusion = [torch.zeros(K, layer.cfg.num_experts, device=device) for layer in layers]
    dropped = [0.0 for _ in layers]
    batches = task.val_batches(batch_size)
    for batch in batches:
        batch = batch.to(device)
        with capture_routing(model) as routed:
            out = model(batch.tokens)
        logits = out.logits.float()
        mask = batch.targets != IGNORE
        loss_sum += F.cross_entropy(logits[mask], batch.targets[mask], reduction="sum").item()
        loss_count += int(mask.sum())
        for name, (num, den) in task.metric_counts(logits, batch).items():
            acc = metric_sums.setdefault(name, [0.0, 0.0])
            acc[0] += num
            acc[1] += den
        domains = batch.domains.flatten()
        labelled = domains != NO_DOMAIN
        for i, stats in enumerate(out.moe_stats):
            load[i] += stats["tokens_per_expert"]
            dropped[i] += float(stats["dropped_share"])
            if K:
                top1 = top1_expert(routed[i][-1])
                confusion[i].index_put_((domains[labelled], top1[labelled]),
                                        torch.ones(int(labelled.sum()), device=device), accumulate=True)
    model.train(was_training)

    result: dict = {"loss": loss_sum / max(1, loss_count)}
    result.update({name: num / max(den, 1e-12) for name, (num, den) in metric_sums.items()})
    per_layer = []
    for i in range(len(layers)):
        s = {k: float(v) for k, v in load_statistics(load[i]).items() if v.dim() == 0}
        s["tokens_per_expert"] = load[i].tolist()
        s["dropped_share"] = dropped[i] / max(1, len(batches))
        if K:
            acc, per_domain, mapping = routing_accuracy(confusion[i].cpu())
            s.update(routing_accuracy=acc, routing_accuracy_per_domain=dict(zip(task.domain_names, per_domain,
                                                                                  strict=True)),
                     expert_domains=mapping, confusion=confusion[i].cpu().tolist())
        per_layer.append(s)
    result["layers"] = per_layer
    for key in ("utilisation", "load_balance", "max_vio", "cv", "dropped_share") + (("routing_accuracy",) if K else ()):
        result[key] = statistics.fmean(layer[key] for layer in per_layer) if per_layer else float("nan")
    return result


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live tensor memory allocated while ``fn()`` runs on the CPU, from torch.profiler's
    allocation events (allocations and frees in time order, cumulative)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each op's own allocations (self usage, so nested ops count once) and the frees ("[memory]"
    # events, negative), in time order.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@torch.no_grad()
def measure_cost(model: PiMoETransformer, batch_shapes: list[tuple[int, int]], warmup: int = 3,
                 iterations: int = 20) -> dict:
    """Latency p50/p95, throughput and peak memory per (batch, seq) shape, plus parameter counts
    and analytic FLOPs per token. Timings are synchronised wall-clock after warm-up."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cuda = device.type == "cuda"
    shapes = []
    for batch, seq in batch_shapes:
        tokens = torch.randint(0, model.arch.vocab_size, (batch, seq), device=device)
        for _ in range(warmup):
            model(tokens)
        times = []
        for _ in range(iterations):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(tokens)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            model(tokens)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            peak = cpu_peak_bytes(lambda tokens=tokens: model(tokens))
        p50 = statistics.median(times)
        shapes.append({"batch": batch, "seq": seq, "latency_p50_ms": p50 * 1e3,
                       "latency_p95_ms": _percentile(times, 0.95) * 1e3,
                       "throughput_tokens_per_s": batch * seq / p50, "peak_memory_mb": peak / 2**20})
    model.train(was_training)
    params = model.parameter_counts()
    return {"shapes": shapes, "total_params": params["total"], "active_params": params["active"],
            "flops_per_token": model.flops_per_token(max(s for _, s in batch_shapes)),
            "device": str(device)}
