"""``fulu-nas bench search``: compare samplers on a table in seconds instead of days.

Each sampler runs ``--repetitions`` searches of ``--trials`` trials against the table (sampler seed =
repetition; :mod:`.sampler_replay` says how a query is answered and what the regret is); the output
gives, per sampler, the regret's median and quartiles after 10, 25, 50 and 100 trials (and the last) and the
trials it needs to reach random search's median result after 50, writes ``replay.json`` (every
number, every repetition's curve) and ``replay.html`` (median regret against trials, quartile
bands) under ``--out``. ``--objectives loss active_params`` compares NSGA-II, TPE and random search by
hypervolume instead. Everything is checked (table, space, samplers, objectives) before anything is
written. The figures in docs/nas-benchmark.md came from::

    fulu-nas bench search --repetitions 30 --trials 100 --jobs 2 --out outputs/bench-search
    fulu-nas bench search --repetitions 30 --trials 100 --objectives loss active_params --out outputs/bench-search-mo
"""

from __future__ import annotations

import argparse
import contextlib
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

from ..errors import FuluConfigError
from .common import int_in, processes_int, rounds_int
from .nas_table import DEFAULT_TABLE, one_torch_thread

# The product's samplers (study.sampler) a replay can run, and QMC, which is not one of them. The replay
# itself (Optuna, plotly) is imported when it runs: ``fulu-nas bench`` works with torch alone.
SAMPLERS = ("tpe", "gp", "random", "nsga2", "qmc")
SINGLE_OBJECTIVE_SAMPLERS = ("tpe", "gp", "random", "qmc")
MULTI_OBJECTIVE_SAMPLERS = ("nsga2", "tpe", "random")


def _repetition(space: str, task: str, table: str, objectives: tuple[str, ...], trials: int,
                sampler_and_seed: tuple[str, int]) -> list[float]:
    from .sampler_replay import load_replay

    sampler, seed = sampler_and_seed
    return load_replay(space, task, table, objectives).run(sampler, seed, trials)


def samplers_of(args: argparse.Namespace) -> list[str]:
    """The samplers to compare, random search (the baseline) among them."""
    names = args.samplers or list(SINGLE_OBJECTIVE_SAMPLERS if len(args.objectives) == 1 else MULTI_OBJECTIVE_SAMPLERS)
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        raise FuluConfigError(f"--samplers: unknown sampler {unknown[0]!r} (known: {', '.join(SAMPLERS)})")
    from .replay_report import BASELINE

    return list(dict.fromkeys(names)) + ([BASELINE] if BASELINE not in names else [])


def replayed(work, pairs: list[tuple[str, int]], jobs: int) -> list[list[float]]:
    """Each (sampler, seed) pair's regret curve, in the pairs' order, under a bar on stderr: replays
    done, and the last one's final regret."""
    from tqdm.auto import tqdm

    results = []
    with contextlib.ExitStack() as stack:
        if jobs == 1:
            curves = map(work, pairs)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                                                           initializer=one_torch_thread))
            curves = pool.map(work, pairs)
        bar = stack.enter_context(tqdm(total=len(pairs), desc="replays", unit="replay", dynamic_ncols=True))
        for (name, seed), regret in zip(pairs, curves, strict=True):
            results.append(regret)
            bar.set_postfix_str(f"{name} seed {seed}: regret {regret[-1]:.4g} after {len(regret)} trials",
                                refresh=False)
            bar.update()
    return results


def main(args: argparse.Namespace) -> int:
    from .replay_report import format_table, summarize, write_html, write_json
    from .sampler_replay import load_replay

    objectives = tuple(args.objectives)
    samplers = samplers_of(args)
    table = str(args.table)
    replay = load_replay(args.space, args.task, table, objectives)  # every check, before anything runs
    work = partial(_repetition, args.space, args.task, table, objectives, args.trials)
    pairs = [(name, seed) for name in samplers for seed in range(args.repetitions)]
    start = time.perf_counter()
    results = replayed(work, pairs, args.jobs)
    seconds = time.perf_counter() - start
    curves = {name: [r for (n, _), r in zip(pairs, results, strict=True) if n == name] for name in samplers}
    summary = summarize(curves)
    facts = {"table": table, "space": replay.settings.space.name, "task": args.task, "objectives": list(objectives),
             "directions": list(replay.directions), "repetitions": args.repetitions, "trials": args.trials,
             "query": "the architecture's mean over the table's seeds", "seeds": replay.table.seeds,
             "samplers_built_by": "fulu_nas.search.study.make_sampler; qmc: QMCSampler(scramble=True, seed)",
             "startup_trials": replay.settings.study.startup_trials, "seconds": round(seconds, 1)}
    if replay.best is not None:
        facts["table_best"] = replay.best
        gap = ("the table's best mean {:.4f} minus the best so far" if replay.directions[0] == "maximize"
               else "the best so far minus the table's best mean {:.4f}").format(replay.best)
        what = f"regret of the {objectives[0]} ({gap})"
    else:
        facts["reference_point"] = list(replay.reference_point)
        facts["table_hypervolume"] = replay.table_hypervolume
        reference = ", ".join(f"{o} {v:.6g}" for o, v in zip(objectives, replay.reference_point, strict=True))
        what = (f"hypervolume regret of ({', '.join(objectives)}): 1 - HV / HV of the whole table "
                f"({replay.table_hypervolume:.6g}), reference point ({reference})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "replay.json", summary, facts)
    title = f"{replay.settings.space.name} on {args.task}: {what}, {args.repetitions} repetitions"
    write_html(out / "replay.html", summary, title, "regret (median, quartile band)")
    print(f"{len(replay.lookup)} architectures in {table} (query: mean over seeds {replay.table.seeds}); "
          f"{args.repetitions} repetitions x {args.trials} trials per sampler in {seconds:.1f} s\n{what}\n")
    print(format_table(summary))
    print(f"\nwrote {out / 'replay.json'} and {out / 'replay.html'}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="replay samplers against a nas-table: regret vs trials over repetitions",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default=DEFAULT_TABLE, help="the table (default: the committed clusters table)")
    p.add_argument("--space", default="nasbench", help="the search space the table covers")
    p.add_argument("--task", default="clusters", help="the task the table was trained on")
    p.add_argument("--repetitions", type=rounds_int, default=30, help="searches per sampler (seeds 0..N-1)")
    p.add_argument("--trials", type=int_in(1, 100_000), default=100, help="trials per search")
    p.add_argument("--samplers", nargs="+",
                   help=f"of {', '.join(SAMPLERS)} (default: {' '.join(SINGLE_OBJECTIVE_SAMPLERS)}; with several "
                        f"objectives {' '.join(MULTI_OBJECTIVE_SAMPLERS)}); random, the baseline, is always run")
    p.add_argument("--objectives", nargs="+", default=["loss"], help="table columns to optimise (two or more: "
                   "hypervolume)")
    p.add_argument("--jobs", type=processes_int, default=1, help="processes (GP is the slow one)")
    p.add_argument("--out", default="outputs/bench-search", help="folder for replay.json and replay.html")
    p.set_defaults(run=main, folders=("out",))  # --out: a folder the command creates, not a file
