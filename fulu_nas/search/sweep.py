"""A ``--multirun`` sweep's jobs: each job's outcome as it ends, and the list printed when the sweep ends.

Hydra's basic launcher stops a sweep at the first job that exits, so a job that fails (no trial completed,
a refused configuration) is recorded here and returns instead: the sweep goes on to its next job, and the
command ends with the list and the first failed job's exit code. An interrupted job (Ctrl-C, SIGTERM) still
stops the sweep: the rest is left to the resumed sweep.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .report import console_for_results, format_value, say


@dataclass(frozen=True)
class JobOutcome:
    number: int
    overrides: list[str]
    output_dir: Path
    sweep_dir: Path
    code: int


_ended: list[JobOutcome] = []


def start() -> None:
    """A new sweep (a process can search more than once: the API, tests)."""
    _ended.clear()


def record(cfg_hydra, code: int) -> None:
    """The job that Hydra's config ``cfg_hydra`` describes ended with exit ``code``."""
    _ended.append(JobOutcome(cfg_hydra.job.num, list(cfg_hydra.overrides.task), Path(cfg_hydra.runtime.output_dir),
                             Path(cfg_hydra.sweep.dir).resolve(), code))


def exit_code() -> int:
    """The first failed job's exit code; 0 when every job ended well."""
    return next((job.code for job in _ended if job.code), 0)


def print_sweep(n_jobs: int, console=None) -> None:
    """One line a job: what tells it from the others (its swept values), its outcome, its folder; then the
    jobs an interrupt left unstarted."""
    if not _ended:
        return
    console = console or console_for_results()
    common = set.intersection(*(set(job.overrides) for job in _ended)) if len(_ended) > 1 else set()
    sweep_dir = _ended[0].sweep_dir
    say(console, f"sweep of {n_jobs} job{'s' * (n_jobs != 1)} in {sweep_dir}:")
    for job in _ended:
        swept = " ".join(o for o in job.overrides if o not in common)
        say(console, f"  job {job.number}{' ' + swept if swept else ''}: {_outcome(job)}  ->  {job.output_dir}")
    if (left := n_jobs - len(_ended)) > 0:
        say(console, f"  {left} job{'s' * (left != 1)} not started: run the same command with "
                     f"hydra.sweep.dir={sweep_dir} to resume the sweep")


def _outcome(job: JobOutcome) -> str:
    from .study import INTERRUPTED

    if job.code == INTERRUPTED:
        return f"interrupted (exit code {job.code})"
    summary = _summary(job) if job.code in (0, 1) else None  # 1: no result, or stopped short, or a worker failed
    if job.code:
        untrained = summary is not None and not summary.get("n_complete") and (
            summary.get("n_finished", 0) >= summary.get("n_trials_requested", 1))
        return f"{'no trial completed' if untrained else 'failed'} (exit code {job.code})"
    if summary is None:
        return "done"
    if "pareto_front" in summary:
        n = len(summary["pareto_front"])
        return f"Pareto front of {n} trial{'s' * (n != 1)}"
    if "best" in summary:
        values = ", ".join(f"{name}={format_value(value)}"
                           for name, value in zip(summary["objectives"], summary["best_values"], strict=True))
        return f"best trial {summary['best_trial']}: {values}"
    return "no feasible trial"


def _summary(job: JobOutcome) -> dict | None:
    """The job's summary.json (the search writes it as it ends), None where it cannot be read."""
    try:
        return json.loads((job.output_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
