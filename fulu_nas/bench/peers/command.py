"""``fulu-nas bench peers``: the PiMoE layer beside the MoE implementations a user could take instead.

For each configuration (a shape; forward in inference mode, or forward + backward) every
implementation runs on the same expert weights, in one process on one device:

- dense ceiling: ``FeedForward(H, F, activation)`` over T*k rows (each token's row k times: the
  experts' GEMMs at their shapes, FLOPs and output rows, without routing, grouping or the combine),
  eager, eager in a CUDA graph, and compiled (the activation fused) in a CUDA graph; the fastest
  counts. The targets' ratios are against it.
- wide dense FFN: ``FeedForward(H, k*F, activation)`` over the T rows, timed the same way: the same
  FLOPs in fewer, wider rows (its second GEMM writes T rows, not T*k), so a stricter bound; its ratio
  is reported beside.
- GEMM-only bound: the experts' two grouped GEMMs alone (``torch._grouped_mm`` on rows already
  sorted by expert, with the real routing's offsets; no gather, activation or combine), eager and
  graphed; the faster counts. With backward: their four gradient GEMMs too.
- plain grouped_mm peer: :func:`~.implementations.plain_route` + :func:`~.implementations.plain_experts`,
  the reference a user would write with ``torch._grouped_mm`` (eager).
- Hugging Face Mixtral: ``MixtralSparseMoeBlock`` of the same shapes (SwiGLU only), with the
  experts implementation a transformers model gets by default (``grouped_mm``; ``--hf-experts``).
- ScatterMoE (github.com/shawntan/scattermoe; ``MLP`` / ``GLUMLP``, eager, CUDA and triton) found
  on ``--peers-path``, behind the same plain router.
- fulu-nas default: ``out, stats = layer(x)``, eager, with statistics.
- fulu-nas best: ``torch.compile(layer, fullgraph=True, dynamic=False)`` called with
  ``with_stats=False``, the whole call captured in one CUDA graph and replayed.

Timing: every implementation of a configuration takes its turn in each of ``--rounds`` rounds;
within a round each call is timed by itself (CUDA events around it, then a sync; the wall clock on
the CPU), so host work the GPU cannot hide counts, and a figure is the median over the rounds of
each round's median. Accuracy: the relative error ``||out - ref|| / ||ref||`` against the fp32
per-expert loop (an fp32 copy of the layer, ``impl="loop"``). Implementations with a router of their
own are fed the reference's routing for that (their experts part); fulu-nas runs end to end, and
the tokens its router sends elsewhere than the fp32 reference's are counted.

The package: :mod:`.configs` (the rows and columns), :mod:`.implementations` (the peers), :mod:`.timing`,
:mod:`.measure` (one configuration), :mod:`.report` (the tables) and this module (the command). Only torch
is imported at module level: transformers and ScatterMoE are imported when used.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from ..common import (
    DTYPES,
    MAX_TOKENS_SCALE,
    bench_device,
    check_memory,
    device_name,
    layer_bytes,
    positive_float_at_most,
    rounds_int,
    seconds_float,
    seed_int,
)
from .configs import CONFIGS, IMPLS, LATENCY_CONFIGS, selected_configs
from .measure import Options, measure_config
from .report import format_tables


def _peers_path(given: str | None) -> str | None:
    """``--peers-path`` made absolute; without it ``./.peers`` where that folder exists."""
    if given is not None:
        return str(Path(given).resolve())
    return str(Path(".peers").resolve()) if Path(".peers").is_dir() else None


def check_options(args: argparse.Namespace, device: torch.device) -> None:
    """ValueError (exit 2) for an option the run would ignore, which would print figures as if it
    had applied."""
    if args.hf_experts and args.activation != "swiglu":
        raise ValueError("--hf-experts: the Mixtral column needs --activation swiglu (it is n/a with "
                         f"{args.activation})")
    if args.tokens_scale != 1 and set(args.configs) <= set(LATENCY_CONFIGS):
        raise ValueError(f"--tokens-scale: no throughput row among --configs {' '.join(args.configs)} "
                         "(the latency rows keep their token counts)")
    if args.cpu_compile and device.type == "cuda":
        raise ValueError("--cpu-compile: for the CPU (on CUDA the compiled layer is timed in a CUDA graph already)")
    if args.peers_path is not None and not Path(args.peers_path).is_dir():
        raise ValueError(f"--peers-path: {args.peers_path} is not a folder")


def check_peers_memory(args: argparse.Namespace, configs: dict, device: torch.device, dtype: torch.dtype) -> None:
    """ValueError (exit 2) naming --tokens-scale when a shape clearly does not fit in memory: the
    layer and the bounds in ``dtype`` and the fp32 reference beside them (on CUDA the reference
    and the layer's fp32 weights are on the GPU too; their host copy is the layer's weights)."""
    for name, config in configs.items():
        for s in config.shapes:
            shape = (s.hidden, s.experts, s.ffn, s.top_k, s.tokens, args.activation == "swiglu")
            need = layer_bytes(*shape, dtype.itemsize, config.backward) + layer_bytes(*shape, 4)
            options = {"--tokens-scale": f"{args.tokens_scale:g}", "--configs": name}
            check_memory(need, device, options, f"the {s.describe()} shape's layers and activations")


def peers_main(args: argparse.Namespace) -> int:
    device = bench_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    check_options(args, device)
    peers_path = _peers_path(args.peers_path)
    opts = Options(device=device, dtype=dtype, activation=args.activation, rounds=args.rounds,
                   min_time=args.min_time if args.min_time is not None else 0.01 if args.quick else 0.2,
                   peers_path=peers_path, hf_experts=args.hf_experts or "grouped_mm",
                   cpu_compile=args.cpu_compile, seed=args.seed)
    configs = selected_configs(list(dict.fromkeys(args.configs)), args.quick, args.tokens_scale)
    check_peers_memory(args, configs, device, dtype)
    command = "fulu-nas bench " + shlex.join(getattr(args, "argv", None) or ["peers"])
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    def write_json(results: list[dict], complete: bool) -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device_name(device), "torch": torch.__version__, "dtype": str(dtype),
                           "activation": args.activation, "rounds": args.rounds, "min_time_s": opts.min_time,
                           "command": command, "impls": IMPLS, "peers_path": peers_path, "complete": complete,
                           "configs": results}, f, indent=2)

    results: list[dict] = []
    for name, config in configs.items():
        results.append(measure_config(name, config, opts, log))
        write_json(results, complete=False)  # what is measured survives an interrupted run
    header = (f"MoE layer implementations side by side: {device_name(device)}, torch {torch.__version__}, "
              f"{str(dtype).removeprefix('torch.')}, {args.activation}, {args.rounds} interleaved rounds\n"
              f"command: {command}\n")
    shapes = "\n".join(f"- {c.label}: " + "; ".join(s.describe() for s in c.shapes)
                       + (", forward + backward" if c.backward else ", forward (inference mode)")
                       for c in configs.values())
    print(header + "\n" + shapes + "\n\n" + format_tables(results))
    write_json(results, complete=True)
    failed = sorted({IMPLS[k] for c in results for s in c["shapes"] for k, d in s["impls"].items() if d["failed"]})
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    """The ``peers`` subcommand."""
    p = sub.add_parser("peers", help="the PiMoE layer beside a plain grouped_mm MoE, Hugging Face Mixtral, "
                                     "ScatterMoE, a dense FFN and the GEMM-only bound",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS),
                   help="rows to measure (default: all)")
    p.add_argument("--activation", choices=("gelu", "swiglu"), default="gelu",
                   help="the experts' activation (the Hugging Face Mixtral column needs swiglu)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (seconds on a CPU): checks, not figures")
    p.add_argument("--tokens-scale", type=positive_float_at_most(MAX_TOKENS_SCALE), default=1.0,
                   help="multiply the token counts of the throughput rows (not the latency row)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--rounds", type=rounds_int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--min-time", type=seconds_float,
                   help="seconds of timed calls per implementation and round, at least 5 calls (default 0.2; "
                        "0.01 with --quick)")
    p.add_argument("--peers-path", help="folder holding scattermoe/ (default: ./.peers if it exists)")
    p.add_argument("--hf-experts", choices=("grouped_mm", "eager", "batched_mm"),
                   help="the Mixtral block's experts_implementation, with --activation swiglu (default: "
                        "grouped_mm, transformers 5's default for models)")
    p.add_argument("--cpu-compile", action="store_true",
                   help="on the CPU, also time the compiled layer (no graph) and check its routing: "
                        "tens of seconds of compilation per shape")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.set_defaults(run=peers_main)
