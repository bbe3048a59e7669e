"""Host time of the seed layer's default eager call at 16 tokens on a GPU (BENCHMARKS.md, "Host time of
the eager call"): what a small eager call waits on, since its kernels take a fraction of it.

    python3 benchmarks/eager_host_time.py

Prints, each the smallest and the median of 5 rounds of N calls issued without a sync (microseconds
per call): ``layer(x)`` with and without statistics (3 interleaved rounds), the router alone, a
``torch.empty``, and for each Triton kernel the call launches, one launch with the call's own
arguments through the project's cached launcher and through Triton's ``kernel[grid](...)``.
"""

import statistics
import sys
import time

import torch


def per_call_us(fn, n: int = 2000) -> tuple[float, float]:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return min(rounds), statistics.median(rounds)


def seed_layer(device: torch.device):
    """``(layer, x)``: the seed layer (hidden 512, 8 experts, FFN 2048, top-2, GELU) in bf16 and eval
    mode on ``device``, and a 16-token input: the call the eager benchmarks time."""
    from fulu_nas.moe import MoEConfig, PiMoELayer

    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=512, num_experts=8, expert_ffn_size=2048, top_k=2, router="topk", activation="gelu")
    layer = PiMoELayer(cfg).to(device=device, dtype=torch.bfloat16).eval()
    return layer, torch.randn(16, 512, device=device, dtype=torch.bfloat16)


def main() -> int:
    if not torch.cuda.is_available():
        print("eager_host_time: needs CUDA (the Triton kernels' launches are what it times)", file=sys.stderr)
        return 2
    from fulu_nas.moe import triton_moe

    dev = torch.device("cuda")
    layer, x = seed_layer(dev)
    rows = []
    with torch.no_grad():
        for r in range(3):
            rows.append((f"layer(x) [{r}]", per_call_us(lambda: layer(x))))
            rows.append((f"layer(x, with_stats=False) [{r}]", per_call_us(lambda: layer(x, with_stats=False))))
        rows.append(("router(x)", per_call_us(lambda: layer.router(x, token_ids=None, batch_shape=(16,)))))
        rows.append(("torch.empty((16, 2), int64)",
                     per_call_us(lambda: torch.empty((16, 2), dtype=torch.int64, device=dev))))

        # The arguments of each launch of one call, then that launch alone, both ways.
        kernels = triton_moe._kernels()
        names = [n for n in dir(kernels) if n.endswith("_kernel")]
        launchers = {n: getattr(kernels, n) for n in names}
        captured = {}

        class Capture:
            def __init__(self, name):
                self.name = name

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    captured[self.name] = (grid, args, kwargs)
                    return launchers[self.name][grid](*args, **kwargs)
                return launch

        for n in names:
            setattr(kernels, n, Capture(n))
        try:
            layer(x)
        finally:
            for n in names:
                setattr(kernels, n, launchers[n])
        torch.cuda.synchronize()
        for name, (grid, args, kwargs) in sorted(captured.items()):
            cached, jit = launchers[name], launchers[name].fn
            rows.append((f"{name}: cached launcher",
                         per_call_us(lambda f=cached, g=grid, a=args, k=kwargs: f[g](*a, **k), 3000)))
            rows.append((f"{name}: Triton's dispatch",
                         per_call_us(lambda f=jit, g=grid, a=args, k=kwargs: f[g](*a, **k), 3000)))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; microseconds of host time per call")
    for name, (low, median) in rows:
        print(f"{name:44s} min {low:8.2f}  median {median:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
