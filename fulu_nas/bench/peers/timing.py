"""How ``bench peers`` times a call: each call by itself, so that host work the GPU cannot hide
counts; a call is a forward in inference mode, or a forward and backward."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor


def time_each_call(run: Callable[[], object], device: torch.device, min_time: float, min_calls: int = 5,
                   max_calls: int = 500) -> list[float]:
    """Milliseconds of each of at least ``min_calls`` calls (until ``min_time`` seconds have been
    timed, at most ``max_calls``), each call timed by itself: on CUDA between two events with a
    sync after it, so host work the GPU cannot hide counts; the wall clock on the CPU."""
    times: list[float] = []
    total = 0.0
    while len(times) < min_calls or (total < min_time * 1e3 and len(times) < max_calls):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            run()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        total += ms
    return times


def make_step(forward: Callable[[Tensor], Tensor], x: Tensor, params: list[Tensor], backward: bool,
              seed: int = 1) -> Callable[[], None]:
    """One timed call: ``forward(x)`` in inference mode, or forward and backward of a fixed random
    output gradient (the input and every parameter get gradients; cleared before each call, so
    each call allocates them, also inside a CUDA graph)."""
    if not backward:
        def run() -> None:
            with torch.inference_mode():
                forward(x)
        return run
    x = x.detach().requires_grad_(True)
    grad = torch.randn(x.shape, generator=torch.Generator(device=x.device).manual_seed(seed),
                       device=x.device, dtype=x.dtype)
    params = [p for p in params if p.requires_grad]

    def run() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        forward(x).backward(grad)
    return run
