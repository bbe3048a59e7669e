"""``fulu-nas bench train-step``: when the compiled training step pays for its compilation.

Each architecture (the space's reference and ``--arch`` variants) trains ``--steps`` steps of the
search's trainer twice from the same initial weights, once with the eager step and once with the
compiled one (``trainer.compile``). Reported per architecture: the first step (the compiled step's
compilation is in it), the mean step after it, and the break-even budget: the steps after which the
compiled step's saving has paid for its longer first step. ``trainer.compile=auto`` compiles budgets
of at least :data:`fulu_nas.training.train.COMPILE_MIN_STEPS` steps on a GPU; this is the measurement
that number comes from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex

import torch

from ..models import seeded_model
from ..training.train import resolve_device, train
from .common import device_name, markdown_table, positive_int

# A fine-grained and a hierarchical variant beside the reference: the shapes a search samples that
# compile most differently (many small experts; two-level routing).
DEFAULT_ARCHS = ("", "num_experts=64,top_k=4,expert_ffn_size=256",
                 "router=hierarchical,num_experts=16,hierarchy_depth=2,top_k=2,expert_ffn_size=512")


def _values(text: str) -> dict:
    import yaml

    values = {}
    for pair in filter(None, text.split(",")):
        key, eq, value = pair.partition("=")
        if not eq:
            raise ValueError(f"--arch: expected key=value[,key=value...], got {text!r}")
        values[key.strip()] = yaml.safe_load(value)
    return values


def time_steps(arch, task, cfg, kind: str) -> dict[str, float]:
    """``cfg.steps`` steps of ``arch`` with the ``kind`` step: the first step's and the later steps' mean
    seconds (the trainer synchronises once a step, on the loss)."""
    model = seeded_model(arch, cfg.seed, resolve_device(cfg.device))
    result = train(model, task, dataclasses.replace(cfg, compile=kind, progress=False))
    later = (result.seconds - result.first_step_seconds) / max(1, result.steps - 1)
    return {"first_step_s": result.first_step_seconds, "step_ms": 1e3 * later, "final_loss": result.final_loss}


def train_step_main(args: argparse.Namespace) -> int:
    # The search's modules need optuna, hydra and mlflow; the bench command line loads with torch alone.
    from ..errors import FuluConfigError
    from ..search.app import compose_config
    from ..search.settings import load_settings

    try:
        s = load_settings(*compose_config(args.overrides))
        archs = [(text or "reference", s.space.arch({**(s.space.reference or {}), **_values(text)}, s.task))
                 for text in args.arch]
    except FuluConfigError as e:
        raise ValueError("; ".join(e.problems)) from None
    cfg = dataclasses.replace(s.train, steps=args.steps, seconds_cap=None, max_seconds=None)
    device = resolve_device(cfg.device)
    rows = []
    for name, arch in archs:
        eager, compiled = (time_steps(arch, s.task, cfg, kind) for kind in ("eager", "compiled"))
        saved_ms = eager["step_ms"] - compiled["step_ms"]
        extra_s = compiled["first_step_s"] - eager["first_step_s"]
        rows.append({"arch": name, "eager": eager, "compiled": compiled, "saved_ms_per_step": saved_ms,
                     "compile_extra_s": extra_s,
                     "break_even_steps": 1e3 * extra_s / saved_ms if saved_ms > 0 else math.inf})
    print(f"training step, {device_name(device)}, torch {torch.__version__}; {args.steps} steps of batch "
          f"{cfg.batch_size} x {s.task.seq_len} tokens; command: fulu-nas bench {shlex.join(args.argv)}\n")
    body = [[r["arch"], f"{r['eager']['step_ms']:.2f}", f"{r['compiled']['step_ms']:.2f}",
             f"{r['eager']['step_ms'] / r['compiled']['step_ms']:.2f}x", f"{r['eager']['first_step_s']:.1f}",
             f"{r['compiled']['first_step_s']:.1f}", f"{r['break_even_steps']:.0f}"] for r in rows]
    print(markdown_table(["architecture", "eager ms/step", "compiled ms/step", "speed-up", "eager first step s",
                          "compiled first step s", "break-even steps"], body))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__, "steps": args.steps,
                       "batch_size": cfg.batch_size, "seq_len": s.task.seq_len, "rows": rows}, f, indent=2)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train-step", help="the eager and the compiled training step side by side, and the budget "
                                          "from which compiling pays")
    p.add_argument("overrides", nargs="*", help="search config overrides, e.g. +experiment=gpu")
    p.add_argument("--arch", nargs="*", default=list(DEFAULT_ARCHS),
                   help="architectures as key=value,... over the space's reference ('' is the reference)")
    p.add_argument("--steps", type=positive_int, default=60)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(run=train_step_main)
