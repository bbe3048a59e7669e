"""The routing kernel at many experts on a GPU (BENCHMARKS.md, "The routing kernel at many experts"):
its tiles where it computes the logits itself, against the 16-token tiles it had and against the
split GEMM outside the kernel with the kernel reading its logits.

    python3 benchmarks/routing_kernel.py

Prints, for hidden 1024 and 128 or 256 experts (top-2, top-8) at 2,048 to 32,768 tokens, the routing
alone (device time a call, 20 calls replayed from one CUDA graph, median of 5 replays) and whether
every variant chose the same experts; then the default eager GELU layer (bf16, statistics on) as its
rule routes, with the 16-token tiles and with the split GEMM outside, each call timed by itself with
a sync (host time counts) and 20 calls back to back (median of 3 interleaved rounds), in microseconds.
"""

import statistics
import sys

import torch

from fulu_nas.bench.layer import graph_latency_ms
from fulu_nas.bench.levels import time_calls
from fulu_nas.bench.peers.timing import time_each_call
from fulu_nas.moe import MoEConfig, PiMoELayer, triton_routing
from fulu_nas.moe.routing import split_logits

RULE = triton_routing._route_block  # the routing kernel's tile rule, before any swap below
CUDA = torch.device("cuda")


def graphed_us(fn, n: int = 20, rounds: int = 5) -> float:
    """Device time of one ``fn()``: ``n`` calls captured in one CUDA graph, the median of ``rounds``
    replays (:func:`fulu_nas.bench.layer.graph_latency_ms`, each step passing its input through)."""
    anchor = torch.empty(0, device=CUDA)
    return graph_latency_ms(lambda y: (fn(), y)[1], anchor, repeat=n, replays=rounds) * 1e3


def per_call_us(fn, n: int = 40) -> float:
    """Median of ``n`` calls each timed by itself with a sync after it (host time counts)."""
    for _ in range(5):
        fn()
    return statistics.median(time_each_call(fn, CUDA, 0.0, min_calls=n)) * 1e3


def back_to_back_us(fn, n: int = 20) -> float:
    """Mean of ``n`` calls issued back to back (no sync between them)."""
    return sum(time_calls(fn, CUDA, 3, n)) / n * 1e6


def main() -> int:
    if not torch.cuda.is_available():
        print("routing_kernel: needs CUDA (it times the routing kernel's tiles)", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; microseconds")
    print("routing alone (device): experts, top-k, tokens | logits in the kernel: tiles of the rule, "
          "16-token tiles | split GEMM outside, the kernel reading them | same experts")
    for experts, k in ((128, 2), (128, 8), (256, 2), (256, 8)):
        for tokens in (2048, 8192, 16384, 32768):
            routing_row(experts, k, tokens)
    print("eager layer, GELU, bf16, statistics on: experts, FFN, top-k, tokens | per call / back to back, "
          "the layer's rule | logits in the kernel, 16-token tiles | split GEMM outside")
    for experts, ffn, k in ((128, 256, 8), (128, 512, 2), (256, 512, 2), (256, 512, 8)):
        for tokens in (8192, 16384, 32768):
            layer_row(experts, ffn, k, tokens)
    return 0


def narrow_tiles(tokens: int, experts: int, mode: int, k: int) -> tuple[int, int, int, int]:
    """The tiles before the wide ones: 16 tokens a program, three stages."""
    return RULE(min(tokens, triton_routing.SPLIT_LOGITS_WIDE_TILE_MIN_TOKENS - 1), experts, mode, k)


def patched(fn, **settings):
    """``fn()`` with ``triton_routing``'s attributes set to ``settings``, restored after."""
    saved = {name: getattr(triton_routing, name) for name in settings}
    for name, value in settings.items():
        setattr(triton_routing, name, value)
    try:
        return fn()
    finally:
        for name, value in saved.items():
            setattr(triton_routing, name, value)


def with_narrow_tiles(fn):
    """``fn()`` with the routing kernel's 16-token tiles, and the logits in the kernel at any size."""
    return patched(fn, _route_block=narrow_tiles, SPLIT_LOGITS_MAX_TOKEN_EXPERTS=2**40)


def with_logits_outside(fn):
    """``fn()`` with the split GEMM outside the kernel at any size (the kernel reads its logits)."""
    return patched(fn, SPLIT_LOGITS_MAX_TOKEN_EXPERTS=0)


def with_logits_in_kernel(fn):
    """``fn()`` with the logits in the kernel at any size (the rule's tiles)."""
    return patched(fn, SPLIT_LOGITS_MAX_TOKEN_EXPERTS=2**40)


def routing_row(experts: int, k: int, tokens: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(tokens, 1024, device=CUDA, dtype=torch.bfloat16)
    gate = torch.randn(experts, 1024, device=CUDA) / 32
    args = (torch.zeros(experts, device=CUDA), k, "softmax", True, 1.0, None)

    def inside():
        return triton_routing.launch_route(None, x, gate, *args)

    def outside():
        return triton_routing.launch_route(split_logits(x, gate), x, gate, *args)

    ruled = with_logits_in_kernel(lambda: graphed_us(inside))
    narrowed = with_narrow_tiles(lambda: graphed_us(inside))
    same = torch.equal(with_logits_in_kernel(inside).expert_TK, with_narrow_tiles(inside).expert_TK)
    print(f"{experts:4d} {k} {tokens:6d} | {ruled:7.1f} {narrowed:7.1f} | {graphed_us(outside):7.1f} | {same}",
          flush=True)


def layer_row(experts: int, ffn: int, k: int, tokens: int) -> None:
    cfg = MoEConfig(hidden_size=1024, num_experts=experts, expert_ffn_size=ffn, top_k=k, router="topk",
                    activation="gelu")
    torch.manual_seed(0)
    layer = PiMoELayer(cfg).to(device=CUDA, dtype=torch.bfloat16).eval()
    x = torch.randn(tokens, 1024, device=CUDA, dtype=torch.bfloat16)

    def both():
        return per_call_us(lambda: layer(x)), back_to_back_us(lambda: layer(x))

    times: dict[str, list[tuple[float, float]]] = {"rule": [], "narrow": [], "outside": []}
    with torch.no_grad():
        for _ in range(3):
            times["rule"].append(both())
            times["narrow"].append(with_narrow_tiles(both))
            times["outside"].append(with_logits_outside(both))
    cells = [f"{statistics.median(a for a, _ in v):6.0f} / {statistics.median(b for _, b in v):6.0f}"
             for v in times.values()]
    print(f"{experts:4d} {ffn:4d} {k} {tokens:6d} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    sys.exit(main())
