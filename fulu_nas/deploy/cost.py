"""Cost of a model: latency, throughput and peak memory per input shape, parameter counts and
analytic FLOPs per token."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ..models import PiMoETransformer


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
