"""``fulu-nas bench layer | latency | profile``: one PiMoE layer, torch alone.

``layer`` times one PiMoE layer's forward for each execution path (grouped GEMM, sorted dispatch,
per-expert loop) beside a dense FFN doing the same FLOPs (width ``top_k * ffn``: the ceiling the
experts' compute can reach), in one run on one device, and prints a Markdown table.
Timings are medians from ``torch.utils.benchmark`` (which synchronises CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import torch

from ..moe import ROUTERS, FeedForward, MoEConfig, PiMoELayer
from .common import (
    DTYPES,
    bench_device,
    captured,
    device_name,
    experts_int,
    layer_memory_check,
    markdown_table,
    median_seconds,
    positive_int,
    round_median,
    rounds_int,
    seconds_float,
    tokens_int,
    width_int,
)

# A path: (module, impl, how it runs). "compile" = torch.compile(fullgraph=True); "graphs" = the same,
# then the whole call (forward, or forward and backward) captured in one CUDA graph and replayed:
# the input is the graph's own buffer, as for a layer inside a captured model (no copy in, no host
# work per call). "grouped" is the layer's default (Triton experts where preferred, else
# grouped_mm); "grouped_mm" and "triton" force one of them (triton needs CUDA).
PATHS = {
    "loop": ("moe", "loop", "eager"),
    "sorted": ("moe", "sorted", "eager"),
    **{f"{impl}{suffix}": ("moe", impl, how) for impl in ("grouped", "grouped_mm", "triton")
       for suffix, how in (("", "eager"), ("+compile", "compile"), ("+graphs", "graphs"))},
}


def check_paths(paths: tuple[str, ...], device: torch.device) -> None:
    """ValueError (exit 2) for a path this device cannot run (off CUDA a graph capture is a traceback,
    and a triton path would quietly time the CPU's own path)."""
    if device.type != "cuda" and any(PATHS[p][2] == "graphs" for p in paths):
        raise ValueError("the +graphs paths need CUDA (they capture CUDA graphs)")
    if any(PATHS[p][1] == "triton" for p in paths):
        from ..moe import triton_moe

        if device.type != "cuda" or not triton_moe.HAS_TRITON:
            raise ValueError("the triton paths need CUDA and triton")


def _runner(module: torch.nn.Module, impl: str | None, how: str, x: torch.Tensor, backward: bool,
            with_stats: bool = True):
    call = module if impl is None else (lambda t: module(t, impl=impl, with_stats=with_stats))
    if how != "eager":
        # Every runner's lambda is one code object to dynamo: each (path, token count) is one more graph
        # of it, and the 9th failed the command (fullgraph) at dynamo's default limit of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        call = torch.compile(call, fullgraph=True, dynamic=False)

    def forward():
        out = call(x)
        return out[0] if isinstance(out, tuple) else out

    if not backward:
        def run():
            with torch.inference_mode():
                return forward()
    else:
        # The input needs its gradient too, as every MoE layer's input does inside a model.
        x = x.detach().requires_grad_(True)
        grad = torch.randn_like(x)
        params = [p for p in module.parameters() if p.requires_grad]

        def run():
            # Fresh gradients each step (inside a graph: allocated from its pool, rewritten by each replay).
            x.grad = None
            for p in params:
                p.grad = None
            forward().backward(grad)
    return captured(run) if how == "graphs" else run


def bench_layer(cfg: MoEConfig, tokens: list[int], device: torch.device, dtype: torch.dtype,
                paths: tuple[str, ...] = ("grouped", "sorted", "loop"), min_run_time: float = 0.5,
                seed: int = 0, backward: bool = False, with_stats: bool = True, rounds: int = 1) -> list[dict]:
    """tok/s of each path, and of the dense FFN run the same way (eager/compiled/graphed) as the
    ceiling, for each token count. With ``rounds`` > 1 every path is timed once per round, the
    paths taking turns, and each figure is from the median time over the rounds
    (:func:`round_median`): on shared machines the speed drifts by tens of percent within a minute,
    and taking turns puts the drift into every path alike instead of into the ratios between them."""
    torch.manual_seed(seed)
    layer = PiMoELayer(cfg).to(device=device, dtype=dtype).eval()
    dense = FeedForward(cfg.hidden_size, cfg.top_k * cfg.expert_ffn_size, cfg.activation).to(device=device, dtype=dtype)
    hows = sorted({PATHS[p][2] for p in paths}, key=("eager", "compile", "graphs").index)
    rows = []
    for n in tokens:
        x = torch.randn(n, cfg.hidden_size, device=device, dtype=dtype)
        runners = {path: _runner(layer, PATHS[path][1], PATHS[path][2], x, backward, with_stats) for path in paths}
        for how in hows:
            runners["dense" if how == "eager" else f"dense+{how}"] = _runner(dense, None, how, x, backward)
        seconds: dict[str, list[float]] = {key: [] for key in runners}
        for _ in range(rounds):
            for key, run in runners.items():
                seconds[key].append(median_seconds(run, min_run_time))
        rows.append({"tokens": n, **{key: n / round_median(v) for key, v in seconds.items()}})
    return rows


def format_layer_table(rows: list[dict]) -> str:
    """Every measured path, then the best MoE path over the best dense path, and over the loop."""
    keys = [k for k in rows[0] if k != "tokens"]
    head = ["tokens", *(f"{k} tok/s" for k in keys), "best MoE / best dense", "best MoE / loop"]
    body = []
    for r in rows:
        moe = max(r[k] for k in keys if not k.startswith("dense"))
        dense = max(r[k] for k in keys if k.startswith("dense"))
        body.append([str(r["tokens"]), *(f"{r[k]:,.0f}" for k in keys), f"{moe / dense:.2f}",
                     f"{moe / r['loop']:.1f}x" if "loop" in r else "-"])
    return markdown_table(head, body)


def _layer_main(args: argparse.Namespace) -> int:
    device = bench_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cfg = MoEConfig(hidden_size=args.hidden, num_experts=args.experts, expert_ffn_size=args.ffn,
                    top_k=args.top_k, router=args.router, activation=args.activation)
    paths = tuple(args.paths)
    check_paths(paths, device)
    _check_memory(args, device, dtype, max(args.tokens), args.backward)
    rows = bench_layer(cfg, args.tokens, device, dtype, paths, args.min_run_time, backward=args.backward,
                       with_stats=not args.no_stats, rounds=args.rounds)
    rounds = f", medians of {args.rounds} interleaved rounds" if args.rounds > 1 else ""
    print(f"PiMoE layer {'forward + backward' if args.backward else 'forward'}"
          f"{', no statistics' if args.no_stats else ''}, {device_name(device)}, "
          f"torch {torch.__version__}, {str(dtype).removeprefix('torch.')}{rounds}")
    print(f"{_shape_line(cfg)}; dense = FFN of width {cfg.top_k * cfg.expert_ffn_size} (same FLOPs)\n")
    print(format_layer_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "rounds": args.rounds, "dtype": str(dtype).removeprefix("torch."), "paths": list(paths),
                       "backward": args.backward, "with_stats": not args.no_stats,
                       "min_run_time_s": args.min_run_time, "config": cfg.to_dict(), "rows": rows}, f, indent=2)
    return 0


def graph_latency_ms(step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeat: int = 20,
                     replays: int = 50) -> float:
    """Device time of one ``step`` (CUDA): ``repeat`` chained steps are captured in one CUDA graph,
    replayed, timed with CUDA events; the median per step. No Python or launch overhead."""
    def chain():
        y = x
        for _ in range(repeat):
            y = step(y)

    with torch.inference_mode():
        replay = captured(chain, warmup=1)
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / repeat)
    return sorted(times)[len(times) // 2]


def _latency_main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("error: latency needs CUDA (it times CUDA-graph replays)", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = MoEConfig(hidden_size=args.hidden, num_experts=args.experts, expert_ffn_size=args.ffn,
                    top_k=args.top_k, router=args.router, activation=args.activation)
    _check_memory(args, device, dtype, max(args.tokens), False)
    torch.manual_seed(0)
    layer = PiMoELayer(cfg).to(device=device, dtype=dtype).eval()
    dense = FeedForward(cfg.hidden_size, cfg.top_k * cfg.expert_ffn_size, cfg.activation).to(device=device, dtype=dtype)
    # One static graph per (token count, grad mode, with_stats): more than dynamo's default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    weight_bytes = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
    big = torch.empty(2**28, dtype=torch.uint8, device=device)
    copy_ms = median_seconds(lambda: big.clone(), 0.2) * 1e3
    bandwidth = 2 * big.numel() / (copy_ms / 1e3)  # bytes read + written per second
    print(f"latency per layer forward (CUDA graph of 20 chained calls, median of 50 replays), "
          f"{device_name(device)}, torch {torch.__version__}, bf16")
    print(f"{_shape_line(cfg)}; reading all expert weights once at the measured copy bandwidth "
          f"({bandwidth / 1e12:.2f} TB/s) takes "
          f"{weight_bytes / bandwidth * 1e3:.4f} ms\n")
    impls = tuple(args.impls)
    head = ["tokens", *(f"{i}{suffix} ms" for i in impls for suffix in ("", "+compile", "+compile, no stats")),
            "dense ms"]
    print("| " + " | ".join(head) + " |\n|" + "---:|" * len(head))
    for n in args.tokens:
        x = torch.randn(n, cfg.hidden_size, device=device, dtype=dtype)
        cells = []
        for impl in impls:
            cells.append(graph_latency_ms(lambda t, i=impl: layer(t, impl=i)[0], x))
            cells.append(graph_latency_ms(lambda t, i=impl: compiled(t, impl=i)[0], x))
            cells.append(graph_latency_ms(lambda t, i=impl: compiled(t, impl=i, with_stats=False)[0], x))
        cells.append(graph_latency_ms(dense, x))
        print(f"| {n} | " + " | ".join(f"{c:.4f}" for c in cells) + " |", flush=True)
    return 0


def _profile_main(args: argparse.Namespace) -> int:
    from torch.profiler import ProfilerActivity, profile

    device = bench_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cfg = MoEConfig(hidden_size=args.hidden, num_experts=args.experts, expert_ffn_size=args.ffn,
                    top_k=args.top_k, router=args.router, activation=args.activation)
    check_paths((args.path,), device)
    _check_memory(args, device, dtype, args.tokens, args.backward)
    torch.manual_seed(0)
    layer = PiMoELayer(cfg).to(device=device, dtype=dtype).eval()
    _, impl, how = PATHS[args.path]
    run = _runner(layer, impl, how, torch.randn(args.tokens, cfg.hidden_size, device=device, dtype=dtype),
                  args.backward, with_stats=not args.no_stats)
    for _ in range(5):
        run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # Kineto writes "USDT: profiler_start/stop" lines to stderr unless its level, read once, is 6
    # (fulu_nas.deploy.cost.cpu_peak_bytes); the user's own level stands.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=activities) as prof:
        for _ in range(10):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"torch.profiler, path {args.path} {'forward + backward' if args.backward else 'forward'}"
          f"{', no statistics' if args.no_stats else ''}, 10 calls of {args.tokens} tokens, {device_name(device)}, "
          f"torch {torch.__version__}, {str(dtype).removeprefix('torch.')}")
    print(_shape_line(cfg) + "\n")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    return 0


def _shape_line(cfg: MoEConfig) -> str:
    """The layer's shape as the headers print it."""
    return (f"hidden {cfg.hidden_size}, {cfg.num_experts} experts, FFN {cfg.expert_ffn_size} ({cfg.activation}), "
            f"top-{cfg.top_k}, router {cfg.router}")


def _check_memory(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tokens: int,
                  backward: bool) -> None:
    """ValueError (exit 2) naming the shape options when the layer clearly does not fit in memory."""
    options = {"--tokens": tokens, "--hidden": args.hidden, "--experts": args.experts, "--ffn": args.ffn,
               "--top-k": args.top_k}
    layer_memory_check(device, dtype, options, args.hidden, args.experts, args.ffn, args.top_k, tokens,
                       args.activation == "swiglu", backward)


def _shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=width_int, default=512)
    p.add_argument("--experts", type=experts_int, default=8)
    p.add_argument("--ffn", type=width_int, default=2048)
    p.add_argument("--top-k", type=experts_int, default=2)
    p.add_argument("--router", choices=ROUTERS, default="topk")
    p.add_argument("--activation", choices=("gelu", "swiglu"), default="swiglu", help="the experts' activation")


def _call_args(p: argparse.ArgumentParser) -> None:
    """Whether the call computes the routing statistics."""
    p.add_argument("--no-stats", action="store_true",
                   help="the layer's inference call, layer(x, with_stats=False): no routing statistics")


def add_parsers(sub) -> None:
    """The ``layer``, ``latency`` and ``profile`` subcommands."""
    p = sub.add_parser("layer", help="tokens/s of one PiMoE layer: grouped vs sorted vs loop vs dense")
    p.add_argument("--tokens", type=tokens_int, nargs="+", default=[16, 256, 4096])
    _shape_args(p)
    _call_args(p)
    p.add_argument("--paths", nargs="+", choices=tuple(PATHS), default=["grouped", "sorted", "loop"],
                   help="compile/graphs variants are meant for CUDA")
    p.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--min-run-time", type=seconds_float, default=0.5, help="seconds of timing per cell")
    p.add_argument("--rounds", type=rounds_int, default=1,
                   help="time every path this many times, taking turns, and report medians")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(run=_layer_main)
    p = sub.add_parser("latency", help="per-layer device latency from CUDA-graph replays (CUDA only)")
    _shape_args(p)
    p.add_argument("--tokens", type=tokens_int, nargs="+", default=[1, 16, 64])
    p.add_argument("--impls", nargs="+", choices=("grouped", "grouped_mm", "triton"), default=["grouped"])
    p.set_defaults(run=_latency_main)
    p = sub.add_parser("profile", help="torch.profiler table of one path (10 calls after warm-up)")
    _shape_args(p)
    p.add_argument("--tokens", type=tokens_int, default=32768)
    p.add_argument("--path", choices=tuple(PATHS), default="grouped")
    _call_args(p)
    p.add_argument("--backward", action="store_true")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=tuple(DTYPES))
    p.add_argument("--rows", type=positive_int, default=25, help="table rows (operators) to print")
    p.set_defaults(run=_profile_main)
