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
from eager_host_time import seed_layer  # this folder: the script's own path comes first


def stub_launches(launches: Counter) -> None:
    """Give the Triton path's kernels launchers that run the project's cached launcher as shipped
    (:class:`fulu_nas.moe._triton_launch.CachedLauncher`: signature, lookup, the call of the compiled
    kernel) over stand-ins for the JIT function (the real kernel's parameters), the compiled kernel
    (whose C launch does nothing) and Triton's driver (device 0, a fixed stream); ``launches``
    counts the launches by kernel."""
    from fulu_nas.moe import _triton_kernels, _triton_launch, triton_moe

    class Compiled:  # what Triton's compile returns, as the launcher uses it
        function = packed_metadata = None

        def __init__(self, name: str):
            self.name = name

        def run(self, *args):
            launches[self.name] += 1

    class JitFunction:  # what @triton.jit returns, as the launcher uses it
        def __init__(self, kernel):
            self.params, self.compiled = kernel.params, Compiled(kernel.__name__)

        def run(self, *args, grid, warmup, **kwargs):  # Triton's path: the first call of a signature
            launches[self.compiled.name] += 1
            return self.compiled

    class Driver:
        class active:  # noqa: N801 (triton.runtime.driver.active)
            get_current_device = staticmethod(lambda: 0)
            get_current_stream = staticmethod(lambda device: 0)

    kernels = [getattr(_triton_kernels, name) for name in dir(_triton_kernels) if name.endswith("_kernel")]
    _triton_launch.driver = Driver
    triton_moe.HAS_TRITON = triton_moe.INTERPRET = True  # the CUDA path, on CPU tensors
    triton_moe._KERNELS = types.SimpleNamespace(**{k.fn.__name__: _triton_launch.CachedLauncher(JitFunction(k.fn))
                                                   for k in kernels if isinstance(k, _triton_launch.CachedLauncher)})


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
    launches: Counter = Counter()
    stub_launches(launches)
    layer, x = seed_layer(torch.device("cpu"))
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
