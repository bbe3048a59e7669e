"""The Python side of the seed layer's 16-token eager call on the GPU path, timed on the CPU
(BENCHMARKS.md, "Host time of the eager call"): what a small eager call's host time is made of,
without the GPU host's own speed, which moves by tens of percent between calls.

    python3 benchmarks/eager_python_time.py [--calls N] [--rounds R]

The layer takes the path it takes on CUDA (the routing kernel, the Triton experts, the slot sum),
on CPU tensors: each Triton launch goes through the project's cached launcher up to the compiled
kernel's C launch, which is left out (no kernel runs, so the outputs are garbage; only the time is
read). Prints microseconds per call, the smallest and the median of the rounds: ``layer(x)``
with and without statistics, the router alone, a ``torch.empty``; and the launches a call makes.
Needs triton installed (for the launcher), no GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from collections import Counter

import torch

KERNELS = ("gather_up_kernel", "down_scatter_kernel", "sum_slots_kernel", "act_forward_kernel",
           "act_backward_kernel", "topk_kernel", "route_kernel", "route_backward_kernel", "place_kernel")


def stub_launches(launches: Counter) -> None:
    """Route the Triton path's launches to stand-ins that do what the cached launcher does on a
    repeated signature (the signature, the lookup, the call) but launch nothing; ``launches``
    counts them by kernel."""
    from fulu_nas.moe import _triton_launch, triton_moe

    class Launcher(_triton_launch.CachedLauncher):
        def __init__(self, name: str):
            self.name = name
            self._compiled = {}

        def launch(self, grid, args, kwargs):
            launches[self.name] += 1
            key = (0, _triton_launch.specialization_key(args), tuple(kwargs.items()))
            entry = self._compiled.get(key)
            if entry is None:
                entry = self._compiled[key] = (types.SimpleNamespace(run=lambda *a: None, function=None,
                                                                     packed_metadata=None), tuple(kwargs.values()))
            kernel, constexprs = entry
            grid = grid + (1, 1)
            kernel.run(grid[0], grid[1], grid[2], 0, kernel.function, kernel.packed_metadata, None, None, None,
                       *args, *constexprs)

    triton_moe.HAS_TRITON = triton_moe.INTERPRET = True  # the CUDA path, on CPU tensors
    triton_moe._KERNELS = types.SimpleNamespace(**{name: Launcher(name) for name in KERNELS})


def per_call_us(fn, calls: int, rounds: int) -> tuple[float, float]:
    for _ in range(min(calls, 100)):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return min(times), statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    from fulu_nas.moe import MoEConfig, PiMoELayer

    launches: Counter = Counter()
    stub_launches(launches)
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=512, num_experts=8, expert_ffn_size=2048, top_k=2, router="topk", activation="gelu")
    layer = PiMoELayer(cfg).to(dtype=torch.bfloat16).eval()
    x = torch.randn(16, 512, dtype=torch.bfloat16)
    rows = []
    with torch.no_grad():
        layer(x)
        per_call = dict(launches)
        rows.append(("layer(x)", per_call_us(lambda: layer(x), args.calls, args.rounds)))
        rows.append(("layer(x, with_stats=False)", per_call_us(lambda: layer(x, with_stats=False), args.calls,
                                                                args.rounds)))
        rows.append(("router(x)", per_call_us(lambda: layer.router(x, token_ids=None, batch_shape=(16,)),
                                              args.calls, args.rounds)))
        rows.append(("torch.empty((16, 2), int64)",
                     per_call_us(lambda: torch.empty((16, 2), dtype=torch.int64), args.calls, args.rounds)))
    print(f"torch {torch.__version__}, CPU, Triton launches stubbed; microseconds per call")
    for name, (low, median) in rows:
        print(f"{name:30s} min {low:8.2f}  median {median:8.2f}")
    print("launches per call: " + ", ".join(f"{name} {n}" for name, n in sorted(per_call.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
