"""Does what a process did before slow the seed layer's 16-token eager call? (BENCHMARKS.md, "The
input's reshape and the routing weights' flat view"): one process times the call fresh, then after
large eager forwards, after large forward + backward calls, after compiling the large call, after
``torch.cuda.empty_cache()`` and after ``gc.collect()``.

    python3 benchmarks/eager_host_history.py

Prints a row per moment: the call's host time (microseconds, the smallest and the median of 5 rounds
of 2,000 calls issued without a sync), the median of calls each timed by CUDA events as ``fulu-nas
bench peers`` times them (milliseconds), a ``torch.empty`` on the GPU timed beside them (the host's
own speed at that moment: it runs none of the layer's code), the call's host time in
``torch.empty``s, and the memory the caching allocator holds.
"""

import gc
import statistics
import sys

import torch
from eager_host_time import per_call_us, seed_layer  # this folder: the script's own path comes first


def main() -> int:
    if not torch.cuda.is_available():
        print("eager_host_history: needs CUDA (the small call's host time on a GPU is what it times)",
              file=sys.stderr)
        return 2
    from fulu_nas.bench.peers.timing import time_each_call

    dev = torch.device("cuda")
    layer, small = seed_layer(dev)
    large = torch.randn(32768, 512, device=dev, dtype=torch.bfloat16)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; seed layer, 16 tokens, bf16, GELU")
    print(f"{'moment':36s} {'host us min':>11s} {'median':>8s} {'events ms':>9s} {'empty us':>8s} "
          f"{'/ empty':>7s} {'cached MiB':>10s}")

    def row(moment: str) -> None:
        with torch.no_grad():
            low, median = per_call_us(lambda: layer(small))
            events = statistics.median(time_each_call(lambda: layer(small), dev, 0.5))
            empty, _ = per_call_us(lambda: torch.empty((16, 2), dtype=torch.int64, device=dev), 5000)
        print(f"{moment:36s} {low:11.1f} {median:8.1f} {events:9.4f} {empty:8.2f} {low / empty:7.0f} "
              f"{torch.cuda.memory_reserved() / 2**20:10.0f}", flush=True)

    row("fresh")
    row("fresh, again")
    with torch.no_grad():
        for _ in range(50):
            layer(large)
    row("after 50 large forwards")
    layer.train()
    x = large.clone().requires_grad_()
    for _ in range(20):
        out, _ = layer(x)
        out.float().square().mean().backward()
    layer.eval()
    row("after 20 large forward + backward")
    compiled = torch.compile(lambda t: layer(t, with_stats=False)[0], fullgraph=True)
    with torch.no_grad():
        for _ in range(5):
            compiled(large)
    row("after compiling the large call")
    torch.cuda.empty_cache()
    row("after torch.cuda.empty_cache()")
    gc.collect()
    row("after gc.collect()")
    return 0


if __name__ == "__main__":
    sys.exit(main())
