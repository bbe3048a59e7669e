"""``fulu-nas bench train-step``: which training step a trial should take, and from how many steps
compiling pays.

Each architecture (the space's reference and the variants, one per ``--arch``) trains ``--steps``
steps (at least 2) of the search's trainer from the same initial weights with each step kind:
``eager``, ``eager+graph`` (the eager step replayed from one CUDA graph, ``trainer.cuda_graph``),
``compiled`` (every block through torch.compile, ``trainer.compile``) and ``compiled+graph``.
Reported per architecture and kind: the first step (a compilation is in it), the capture of the
graph, the mean step after the first, and the break-even budget against ``eager+graph``
(``eager`` where that is not timed): the steps after which a compiled kind's saving has paid for
its longer start. ``trainer.compile=auto`` compiles budgets of at least
:data:`fulu_nas.training.train.COMPILE_MIN_STEPS` steps on a GPU; this is the measurement that
number comes from. Without CUDA the graphed kinds are left out (they would be the eager steps again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

import torch

from ..models import seeded_model
from .common import MAX_STEPS, arch_values, device_name, int_in, markdown_table

# A fine-grained and a hierarchical variant beside the reference: the shapes a search samples that
# compile most differently (many small experts; two-level routing).
DEFAULT_ARCHS = ("", "num_experts=64,top_k=4,expert_ffn_size=256",
                 "router=hierarchical,num_experts=16,hierarchy_depth=2,top_k=2,expert_ffn_size=512")


# compiled+graph before compiled: the first compiled kind of an architecture pays its compilation in
# full, the second reuses Inductor's caches (a search's next architecture reuses what they share).
KINDS = {"eager": ("eager", False), "eager+graph": ("eager", True), "compiled+graph": ("compiled", True),
         "compiled": ("compiled", False)}


def time_steps(arch, task, cfg, kind: str) -> dict[str, float]:
    """``cfg.steps`` steps of ``arch`` with the ``kind`` step (:data:`KINDS`): the first step's, the graph
    capture's and the later steps' mean seconds (the capture left out)."""
    from ..training.train import resolve_device, train

    compile_as, graph = KINDS[kind]
    device = resolve_device(cfg.device)
    model = seeded_model(arch, cfg.seed, device)
    result = train(model, task, dataclasses.replace(cfg, compile=compile_as, cuda_graph=graph and device.type == "cuda",
                                                    progress=False))
    later = (result.seconds - result.first_step_seconds - result.capture_seconds) / max(1, result.steps - 1)
    return {"first_step_s": result.first_step_seconds, "capture_s": result.capture_seconds,
            "step_ms": 1e3 * later, "final_loss": result.final_loss, "graphed": result.cuda_graph}


def train_step_main(args: argparse.Namespace) -> int:
    # The search's modules (and training's) need optuna, hydra, mlflow and tqdm; the bench command line
    # loads with torch alone.
    from ..training.train import resolve_device
    from .nas_settings import composed_settings

    s = composed_settings(args.overrides)
    archs = [(text or "reference",
              s.space.given_arch({**(s.space.reference or {}), **arch_values(text, "--arch")}, s.task, "--arch"))
             for text in args.arch or DEFAULT_ARCHS]
    cfg = dataclasses.replace(s.train, steps=args.steps, seconds_cap=None, max_seconds=None)
    device = resolve_device(cfg.device)
    kinds, no_graph = timed_kinds(args.kinds, device)
    base = next(k for k in ("eager+graph", "eager") if k in kinds)
    rows = []
    for name, timed in timed_archs(archs, kinds, s.task, cfg):
        for kind, t in timed.items():
            saved_ms = timed[base]["step_ms"] - t["step_ms"]
            extra_s = t["first_step_s"] + t["capture_s"] - timed[base]["first_step_s"] - timed[base]["capture_s"]
            # None (JSON null, "never" in the table): the kind saves nothing per step, so never pays back.
            rows.append({"arch": name, "kind": kind, **t,
                         "speed_up": timed["eager"]["step_ms"] / t["step_ms"] if "eager" in timed else None,
                         "break_even_steps": (1e3 * extra_s / saved_ms if saved_ms > 0 else None)
                         if extra_s > 0 else 0})
    print(f"training step, {device_name(device)}, torch {torch.__version__}; {args.steps} steps of batch "
          f"{cfg.batch_size} x {s.task.seq_len} tokens; command: fulu-nas bench {shlex.join(args.argv)}"
          + (f"\nno CUDA: {', '.join(no_graph)} not timed (without a graph they are the step without '+graph')"
             if no_graph else "") + "\n")
    body = [[r["arch"], r["kind"], f"{r['step_ms']:.2f}", "-" if r["speed_up"] is None else f"{r['speed_up']:.2f}x",
             f"{r['first_step_s']:.2f}", f"{r['capture_s']:.2f}",
             "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:.0f}"] for r in rows]
    print(markdown_table(["architecture", "step", "ms/step", "vs eager", "first step s", "graph capture s",
                          f"break-even steps vs {base}"], body))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__, "steps": args.steps,
                       "batch_size": cfg.batch_size, "seq_len": s.task.seq_len, "baseline": base, "rows": rows},
                      f, indent=2)
    return 0


def timed_archs(archs: list, kinds: list[str], task, cfg):
    """(name, {kind: :func:`time_steps`}) per architecture, under a bar on stderr: the kinds timed
    so far, the running one, and each finished one's step time."""
    from tqdm.auto import tqdm

    with tqdm(total=len(archs) * len(kinds), desc="train-step", unit="kind", dynamic_ncols=True) as bar:
        for name, arch in archs:
            timed = {}
            for kind in kinds:
                bar.set_postfix_str(f"{name}, {kind}: {cfg.steps} steps", refresh=True)
                timed[kind] = time_steps(arch, task, cfg, kind)
                bar.write(f"{name}, {kind}: {timed[kind]['step_ms']:.2f} ms/step, first step "
                          f"{timed[kind]['first_step_s']:.2f} s", file=sys.stderr)
                bar.update()
            yield name, timed


def timed_kinds(asked: list[str], device: torch.device) -> tuple[list[str], list[str]]:
    """The kinds to time, and the graphed kinds left out because ``device`` is no GPU (they would run
    the same step as their ungraphed kind, and a difference between the two would be noise);
    ValueError without an eager kind, the baseline of the break-even column."""
    kinds = list(dict.fromkeys(asked))
    no_graph = [k for k in kinds if KINDS[k][1]] if device.type != "cuda" else []
    kinds = [k for k in kinds if k not in no_graph]
    if not {"eager", "eager+graph"} & set(kinds):
        cuda = device.type == "cuda"
        raise ValueError(f"--kinds {' '.join(asked)}: add eager" + (" or eager+graph" if cuda else "")
                         + ", the baseline the compiled kinds are measured against"
                         + ("" if cuda else " (without CUDA the graphed kinds are not timed)"))
    return kinds, no_graph


def add_parser(sub) -> None:
    p = sub.add_parser("train-step", help="the training step kinds side by side (eager, CUDA graph, compiled), and the "
                                          "budget from which compiling pays")
    p.add_argument("overrides", nargs="*", help="search config overrides, e.g. +experiment=gpu")
    # One architecture per --arch, repeated for more: a list of them would take the overrides after it too.
    p.add_argument("--arch", action="append",
                   help="an architecture as key=value,... over the space's reference ('' is the reference); repeat "
                        f"for several (default: {' '.join(repr(a) for a in DEFAULT_ARCHS)})")
    p.add_argument("--steps", type=int_in(2, MAX_STEPS), default=60,
                   help="steps per architecture and kind, at least 2: the mean step is taken after the first")
    p.add_argument("--kinds", nargs="*", choices=list(KINDS), default=list(KINDS),
                   help="the step kinds to time, eager or eager+graph among them (a graph needs CUDA: off it the "
                        "graphed kinds are left out)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(run=train_step_main)
