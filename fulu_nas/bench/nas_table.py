"""``fulu-nas bench nas-table``: a tabular benchmark (NAS-Bench style) of a finite search space.

Every architecture of the space is trained for a fixed number of steps with each seed, by the
product's own trial protocol (the composed ``trainer`` settings, ``torch.manual_seed(seed)``, a fresh
model, :func:`~fulu_nas.training.train.train`, :func:`~fulu_nas.training.evaluate.evaluate`), and
one CSV row per (architecture, seed) records its parameters, validation loss, task metric, routing
accuracy, load balance, parameter counts and FLOPs per token (:mod:`.nas_table_file`). A subset of
``--factor-subset`` architectures, spread evenly over the loss ranking, is trained again at
``--factor`` times the steps (``budget_factor`` column), to measure whether a short trial ranks
architectures as a long one does. Samplers are then compared against the table in seconds
(``fulu-nas bench search``, :mod:`.sampler_replay`).

Deterministic: step budgets (never wall-clock), fixed seeds, one torch thread per job; ``--jobs``
runs jobs in that many processes and gives the same numbers as one. Only ``train_seconds`` varies.

The committed table (``fulu_nas/bench/data/nas_table_clusters.csv``, see docs/nas-benchmark.md) came from::

    nice -n 10 fulu-nas bench nas-table --out fulu_nas/bench/data/nas_table_clusters.csv --space nasbench \\
        --task clusters --seeds 3 --steps 300 --jobs 2 --factor-subset 24 --factor 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import FuluConfigError
from ..models import PiMoETransformer
from .common import MAX_STEPS, device_name, positive_int, processes_int, rounds_int, steps_int

if TYPE_CHECKING:
    from ..search.settings import SearchSettings

# The search's modules (and the packages they need: Hydra, Optuna, tqdm) are imported where a table is
# made, not here: `fulu-nas bench` lists this command on a machine with torch alone, which runs the layer's
# benchmarks, and this command then names the package it lacks.

DEFAULT_TABLE = Path(__file__).parent / "data" / "nas_table_clusters.csv"


@dataclass(frozen=True)
class Job:
    """One training: an architecture's sampled values, a seed, and its budget."""

    values: dict[str, Any]
    seed: int
    budget_factor: int
    steps: int


def train_and_evaluate(s: SearchSettings, job: Job) -> dict:
    """What a search trial measures for ``job`` (the objective's training and evaluation, without the
    latency measurement, which a shared machine's load would make noise), as a table row."""
    from ..training.evaluate import evaluate
    from ..training.train import train
    from .finite_space import cells

    values = s.space.with_derived(job.values)
    arch = s.space.arch(values, s.task)
    cfg = replace(s.train, steps=job.steps, seed=job.seed, device="cpu", progress=False)
    torch.manual_seed(cfg.seed)
    model = PiMoETransformer(arch)
    result = train(model, s.task, cfg)
    quality = evaluate(model, s.task)
    counts = model.parameter_counts()
    return {"key": cells(s.space, job.values), "arch_hash": arch.content_hash(), "seed": job.seed,
            "budget_factor": job.budget_factor, "steps": result.steps, "loss": quality["loss"],
            "metric": quality[s.task.metric_name], "routing_accuracy": quality.get("routing_accuracy"),
            "load_balance": quality["load_balance"], "active_params": counts["active"], "total_params": counts["total"],
            "flops_per_token": float(model.flops_per_token(s.task.seq_len)),
            "train_seconds": result.seconds}


def _run(space: str, task: str, job: Job) -> dict:
    from .nas_settings import product_settings

    return train_and_evaluate(product_settings(space, task), job)


def one_torch_thread() -> None:
    # The models (and a replay's GP fits) are tiny: one thread per process is fastest, keeps processes
    # from competing for cores, and makes the float reductions the same in every process.
    torch.set_num_threads(1)


@contextmanager
def _one_thread_here() -> Iterator[None]:
    threads = torch.get_num_threads()
    one_torch_thread()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def job_runner(space: str, task: str, processes: int) -> Iterator[Callable[[list[Job]], Iterator[dict]]]:
    """A function from jobs to their rows (in order), computed here (``processes=1``) or in that many
    spawned processes, started once for every batch of jobs."""
    work = partial(_run, space, task)
    if processes == 1:
        with _one_thread_here():
            yield partial(map, work)
        return
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn"), initializer=one_torch_thread) as pool:
        yield partial(pool.map, work)


def evenly_over_ranking(keys_by_loss: list, k: int) -> list:
    """``k`` of the ranked keys at evenly spaced ranks, the best and the worst included."""
    n = len(keys_by_loss)
    if k == 1:
        return keys_by_loss[:1]
    return [keys_by_loss[round(i * (n - 1) / (k - 1))] for i in range(k)]


def _progress(done: int, total: int, s: SearchSettings, row: dict) -> None:
    arch = ", ".join(f"{p.name}={v}" for p, v in zip(s.space.params, row["key"], strict=True) if v)
    print(f"[{done}/{total}] {arch} | seed {row['seed']} x{row['budget_factor']}: loss {row['loss']:.4f} "
          f"({row['train_seconds']:.1f} s)", flush=True)


def command_line(args: argparse.Namespace, steps: int) -> str:
    """The command that regenerates the table, every option spelled out."""
    parts = [f"fulu-nas bench nas-table --out {args.out} --space {args.space} --task {args.task}",
             f"--seeds {args.seeds} --steps {steps} --jobs {args.jobs}"]
    if args.factor_subset:
        parts.append(f"--factor-subset {args.factor_subset} --factor {args.factor}")
    if args.limit:
        parts.append(f"--limit {args.limit}")
    return " ".join(parts)


def generate(args: argparse.Namespace) -> int:
    from .finite_space import cells, enumerate_space
    from .nas_settings import product_settings
    from .nas_table_file import write_table

    s = product_settings(args.space, args.task)
    steps = args.steps or s.train.steps
    archs = enumerate_space(s.space, s.task)[:args.limit]
    if not 0 <= args.factor_subset <= len(archs):
        raise FuluConfigError(f"--factor-subset {args.factor_subset}: choose 0 to {len(archs)} (the architectures "
                              "being trained)")
    if args.factor_subset and args.factor < 2:
        raise FuluConfigError(f"--factor {args.factor}: a longer budget needs a factor of at least 2")
    if not args.factor_subset and _given(args, "--factor"):
        raise FuluConfigError("--factor without --factor-subset: no architecture is trained longer")
    if args.factor_subset and args.factor * steps > MAX_STEPS:  # a typo's zeros: an endless training
        raise FuluConfigError(f"--factor {args.factor}: {args.factor} x {steps} steps is more than {MAX_STEPS:,} "
                              "steps")
    seeds = range(args.seeds)
    out = Path(args.out)
    total = len(archs) * args.seeds + args.factor_subset * args.seeds
    print(f"nas-table: {len(archs)} architectures of search space {s.space.name!r} on {args.task}, seeds "
          f"{list(seeds)}, {steps} steps"
          + (f"; {args.factor_subset} of them again at {args.factor * steps} steps" if args.factor_subset else "")
          + f": {total} trainings in {args.jobs} processes", flush=True)
    start = time.perf_counter()
    rows = []
    with job_runner(args.space, args.task, args.jobs) as run:
        for row in run([Job(values, seed, 1, steps) for values in archs for seed in seeds]):
            rows.append(row)
            _progress(len(rows), total, s, row)
        if args.factor_subset:
            loss: dict[tuple, list[float]] = {}
            for r in rows:
                loss.setdefault(r["key"], []).append(r["loss"])
            ranked = sorted(loss, key=lambda key: sum(loss[key]) / len(loss[key]))
            chosen = set(evenly_over_ranking(ranked, args.factor_subset))
            longer = [Job(values, seed, args.factor, args.factor * steps) for values in archs
                      if cells(s.space, values) in chosen for seed in seeds]
            for row in run(longer):
                rows.append(row)
                _progress(len(rows), total, s, row)
    minutes = (time.perf_counter() - start) / 60
    t = s.train
    header = {"table": f"fulu-nas nas-table, one row per (architecture, seed, budget); see {Path(__file__).name}",
              "space": s.space.name, "task": f"{args.task} {s.task_params} (metric: {s.task.metric_name})",
              "trainer": f"batch_size {t.batch_size}, lr {t.lr}, weight_decay {t.weight_decay}, warmup_fraction "
                         f"{t.warmup_fraction}, min_lr_ratio {t.min_lr_ratio}, grad_clip {t.grad_clip}",
              "command": command_line(args, steps),
              "device": f"{device_name(torch.device('cpu')).rsplit(' (', 1)[0]}, {os.cpu_count()} cores, torch "
                        f"{torch.__version__}, float32, one torch thread per job, {args.jobs} at a time",
              "date": f"{dt.date.today().isoformat()}, {minutes:.1f} minutes"}
    write_table(out, header, s.space, rows)
    print(f"wrote {len(rows)} rows to {out} in {minutes:.1f} minutes")
    return 0


# The options of a generation run, which --summary (reading a finished table) would ignore.
GENERATION_OPTIONS = ("--seeds", "--steps", "--jobs", "--factor-subset", "--factor", "--limit")


def _given(args: argparse.Namespace, option: str) -> bool:
    """Whether ``option`` was typed (the parser's default cannot tell a typed default from none)."""
    return any(a == option or a.startswith(option + "=") for a in getattr(args, "argv", ()))


def main(args: argparse.Namespace) -> int:
    if args.summary:
        if ignored := [o for o in GENERATION_OPTIONS if _given(args, o)]:
            raise ValueError(f"--summary reads a table: {', '.join(ignored)} only apply to generating one (--out)")
        from .nas_table_summary import summary_main

        return summary_main(args)
    return generate(args)


def add_parser(sub) -> None:
    p = sub.add_parser("nas-table", help="train every architecture of a finite space (a NAS-Bench-style table)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="the CSV to write")
    what.add_argument("--summary", metavar="FILE", help="print a table's best architectures and rank correlations")
    p.add_argument("--space", default="nasbench", help="search space (fulu_nas/conf/search_space/NAME.yaml)")
    p.add_argument("--task", default="clusters", help="task (fulu_nas/conf/task/NAME.yaml)")
    p.add_argument("--seeds", type=rounds_int, default=3, help="seeds 0..N-1 for every architecture")
    p.add_argument("--steps", type=steps_int, help="training steps (default: the trainer config's steps)")
    p.add_argument("--jobs", type=processes_int, default=1, help="processes, one torch thread each")
    p.add_argument("--factor-subset", type=int, default=0, metavar="K",
                   help="also train K architectures, evenly spread over the loss ranking, at --factor x the steps")
    p.add_argument("--factor", type=int, default=4, help="the subset's budget multiple")
    p.add_argument("--limit", type=positive_int, help="only the first N architectures of the space (a smoke run)")
    p.set_defaults(run=main)
