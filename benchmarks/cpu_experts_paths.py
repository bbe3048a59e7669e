"""The PiMoE layer's fp32 inference call on the CPU through each of its expert paths, per shape: the
measurements behind the rule of ``GroupedExperts._forward_cpu`` (BENCHMARKS.md, "The CPU experts
past the streaming kernel").

    python3 benchmarks/cpu_experts_paths.py [--rounds R] [--shapes H,E,F,K,T ...] [--min-ms MS]

Each path is forced by the rule's constants: the streaming kernel (up to 64 rows per expert, twice
its limit), oneDNN one expert at a time, ``torch._grouped_mm`` in chunks of experts,
one ``torch._grouped_mm`` pair for all experts; and the rule as shipped. The paths take turns in
each of ``--rounds`` rounds; a figure is the smallest round's milliseconds a call (``layer(x,
with_stats=False)``, GELU experts, top-k router), and the rule's pick is named. The default shapes:
the default search space's layers (hidden 64) at its cost measurement's 2,048 tokens, a middle
size, the seed layer (hidden 512, 8 experts, FFN 2048, top-2) at 256-4,096 tokens, and the
fine-grained layer (hidden 1024, 128 experts, FFN 256, top-8).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from unittest import mock

import torch

from fulu_nas.moe import MoEConfig, PiMoELayer, cpu_stream
from fulu_nas.moe import experts as experts_module

SHAPES = ("64,8,64,2,2048", "64,32,64,2,2048", "64,64,128,4,2048", "64,16,256,2,2048", "128,16,128,2,2048",
          "256,32,512,2,4096", "512,8,2048,2,256", "512,8,2048,2,1024", "512,8,2048,2,4096",
          "1024,128,256,8,2048")
NEVER = 2**62
# path -> the rule's constants that force it (the streaming kernel's row limit, oneDNN's weight size, the
# chunk size); None: as shipped.
PATHS = {
    "stream": {"MAX_MEAN_ROWS": NEVER},
    "onednn": {"MAX_MEAN_ROWS": 0, "ONEDNN_MIN_WEIGHT": 0},
    "chunked": {"MAX_MEAN_ROWS": 0, "ONEDNN_MIN_WEIGHT": NEVER},
    "grouped_mm": {"MAX_MEAN_ROWS": 0, "ONEDNN_MIN_WEIGHT": NEVER, "CHUNK_ELEMENTS": NEVER},
    "rule": None,
}


@contextlib.contextmanager
def forced(path: str):
    """The rule's constants set so that calls take ``path`` (restored after)."""
    with contextlib.ExitStack() as stack:
        for name, value in (PATHS[path] or {}).items():
            stack.enter_context(mock.patch.object(cpu_stream if name == "MAX_MEAN_ROWS" else experts_module,
                                                  name, value))
        yield


def taken_path(layer: PiMoELayer, x: torch.Tensor) -> str:
    """The path the shipped rule takes for this call."""
    experts = layer.experts
    with (mock.patch.object(cpu_stream, "experts", wraps=cpu_stream.experts) as stream,
          mock.patch.object(experts, "_forward_chunked", wraps=experts._forward_chunked) as chunked,
          mock.patch.object(experts_module.cpu_packed, "linear", wraps=experts_module.cpu_packed.linear) as onednn,
          torch.inference_mode()):
        layer(x, with_stats=False)
    return next((name for name, spy in (("stream", stream), ("chunked", chunked), ("onednn", onednn))
                 if spy.called), "none")


def measure(spec: str, rounds: int, min_ms: float) -> dict[str, float | str]:
    hidden, experts, ffn, top_k, tokens = map(int, spec.split(","))
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=hidden, num_experts=experts, expert_ffn_size=ffn, top_k=top_k, router="topk",
                    activation="gelu")
    layer = PiMoELayer(cfg).eval()
    x = torch.randn(tokens, hidden)
    # the streaming kernel only up to 64 rows per expert (its limit is 32), where it builds
    paths = [p for p in PATHS if p != "stream" or (tokens * top_k <= 64 * experts and cpu_stream.kernel())]
    with torch.inference_mode():
        reference = layer(x, impl="loop", with_stats=False)[0]
        calls = {}
        for path in paths:
            with forced(path):
                out = layer(x, with_stats=False)[0]  # packs weights, builds the kernel: not timed
                torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
                t0 = time.perf_counter()
                layer(x, with_stats=False)
                calls[path] = max(1, round(min_ms / 1e3 / max(time.perf_counter() - t0, 1e-6)))
        best = {path: float("inf") for path in paths}
        for _ in range(rounds):
            for path in paths:
                with forced(path):
                    t0 = time.perf_counter()
                    for _ in range(calls[path]):
                        layer(x, with_stats=False)
                    best[path] = min(best[path], (time.perf_counter() - t0) / calls[path] * 1e3)
    return {"shape": f"H={hidden} E={experts} F={ffn} k={top_k} T={tokens}",
            "rows_per_expert": tokens * top_k / experts, "taken": taken_path(layer, x), **best}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="hidden,experts,ffn,top_k,tokens")
    parser.add_argument("--min-ms", type=float, default=100.0, help="milliseconds of calls per path and round")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; ms a call (best of "
          f"{args.rounds} rounds); the rule's pick in brackets")
    columns = [p for p in PATHS if p != "rule"]
    print("| shape | rows per expert | " + " | ".join(columns) + " | rule |")
    print("|---|---:|" + "---:|" * (len(columns) + 1))
    for spec in args.shapes:
        row = measure(spec, args.rounds, args.min_ms)
        cells = [f"{row[p]:.3f}" if p in row else "-" for p in columns]
        print(f"| {row['shape']} | {row['rows_per_expert']:.0f} | " + " | ".join(cells)
              + f" | {row['rule']:.3f} ({row['taken']}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
