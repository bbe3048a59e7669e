"""Benchmarks that need torch alone: ``python -m fulu_nas.bench layer``.

``layer`` times one PiMoE layer's forward for each execution path (grouped GEMM, sorted dispatch,
per-expert loop) beside a dense FFN doing the same FLOPs (width ``top_k * ffn``: the ceiling the
experts' compute can reach), in one run on one device, and prints a Markdown table.
Timings are medians from ``torch.utils.benchmark`` (which synchronises CUDA).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable

import torch
from torch.utils import benchmark

from .moe import ROUTERS, FeedForward, MoEConfig, PiMoELayer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    """Median wall time of ``fn()`` after torch.utils.benchmark's own warm-up."""
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def bench_layer(cfg: MoEConfig, tokens: list[int], device: torch.device, dtype: torch.dtype,
                impls: tuple[str, ...] = ("grouped", "sorted", "loop"),
                min_run_time: float = 0.5, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    layer = PiMoELayer(cfg).to(device=device, dtype=dtype).eval()
    dense = FeedForward(cfg.hidden_size, cfg.top_k * cfg.expert_ffn_size, cfg.activation).to(device=device, dtype=dtype)
    rows = []
    for n in tokens:
        x = torch.randn(n, cfg.hidden_size, device=device, dtype=dtype)
        row: dict = {"tokens": n}
        with torch.inference_mode():
            for impl in impls:
                row[impl] = n / median_seconds(lambda x=x, impl=impl: layer(x, impl=impl), min_run_time)
            row["dense"] = n / median_seconds(lambda x=x: dense(x), min_run_time)
        rows.append(row)
    return rows


def format_layer_table(rows: list[dict], impls: tuple[str, ...]) -> str:
    head = ["tokens", *(f"{i} tok/s" for i in impls), "dense tok/s", "grouped / dense", "grouped / loop"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [str(r["tokens"]), *(f"{r[i]:,.0f}" for i in impls), f"{r['dense']:,.0f}"]
        cells.append(f"{r['grouped'] / r['dense']:.2f}" if "grouped" in r else "-")
        cells.append(f"{r['grouped'] / r['loop']:.1f}x" if "grouped" in r and "loop" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _layer_main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cfg = MoEConfig(hidden_size=args.hidden, num_experts=args.experts, expert_ffn_size=args.ffn,
                    top_k=args.top_k, router=args.router, activation=args.activation)
    impls = tuple(args.impls)
    rows = bench_layer(cfg, args.tokens, device, dtype, impls, args.min_run_time)
    print(f"PiMoE layer forward, {device_name(device)}, torch {torch.__version__}, {args.dtype or dtype}")
    print(f"hidden {cfg.hidden_size}, {cfg.num_experts} experts, FFN {cfg.expert_ffn_size} "
          f"({cfg.activation}), top-{cfg.top_k}, router {cfg.router}; dense = FFN of width "
          f"{cfg.top_k * cfg.expert_ffn_size} (same FLOPs)\n")
    print(format_layer_table(rows, impls))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__,
                       "dtype": str(dtype), "config": cfg.to_dict(), "rows": rows}, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fulu_nas.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("layer", help="tokens/s of one PiMoE layer: grouped vs sorted vs loop vs dense")
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 4096])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router", choices=ROUTERS, default="topk")
    p.add_argument("--activation", choices=("gelu", "swiglu"), default="swiglu")
    p.add_argument("--impls", nargs="+", choices=("grouped", "sorted", "loop"), default=["grouped", "sorted", "loop"])
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per cell")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(run=_layer_main)
    from .bench_tasks import add_parsers

    add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:  # an impossible configuration
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
