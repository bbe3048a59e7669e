"""Confirmation: the final evaluation of a study's chosen architectures with the search's own
pipeline, several seeds and a longer budget (``fulu-nas confirm``, or ``study.confirm.enabled=true``
at the end of ``fulu-nas search``).

What is trained: the ``top_k`` best distinct architectures (complete, feasible trials, distinct by
their ``arch_hash``; one objective: by its value; several: the Pareto front ordered by the first
objective), and the study's reference trial (when it is not one of them). How: exactly as a trial
(:func:`.objective.train_architecture`, :func:`.objective.evaluate_and_measure` beside the reference
model), for ``budget_factor`` x ``trainer.steps`` steps, once per seed ``trainer.seed + 1 + i``,
i < ``seeds`` (modulo 2^32): seeds the search did not train with, hence did not select on
(:func:`confirmation_seeds`).

Each run is an MLflow run nested under the study's parent run (``fulu.kind=confirmation``, the
source trial, seed and steps as tags, the architecture as params). Its result is written on the
study (a user attribute per architecture, seed and step budget) once the run is done, so a
confirmation that was interrupted, run again, trains only what is missing; a run left RUNNING by a
killed process is closed first (KILLED, or FINISHED when its result had been recorded). The
statistics are :mod:`.confirm_summary`'s.

SIGTERM (``timeout``, ``docker stop``, a batch scheduler) stops a confirmation as Ctrl-C does: the
running run ends KILLED, the finished ones stay recorded, the same command resumes. A confirmation
whose runs did not all end with a result or a recorded failure (a worker process died: kill -9, an
out-of-memory kill) exits 1: its summary lists them as missing, has no winner, and is not recorded on
the study (so ``fulu-nas export trial=best`` does not take a winner from it).
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from dataclasses import dataclass, replace

import optuna
import torch

from ..checks import check_tracking_database_exists
from ..errors import FuluConfigError
from ..models import ArchConfig
from ..training.train import TrainingDiverged, step_description
from .confirm_summary import SUMMARY_ATTR, print_confirmation, summarize_confirmation
from .interrupts import between_writes
from .objective import (
    ReferenceModels,
    ServedKernels,
    TrainingLog,
    evaluate_and_measure,
    failure_reason,
    is_feasible,
    train_architecture,
)
from .settings import SEED_MAX, ConfirmSettings, SearchSettings
from .study import INTERRUPTED, open_study, quiet_optuna, stop_signals_as_interrupt
from .tracking import Tracker
from .worker_progress import ProgressFile

TrialState = optuna.trial.TrialState
RESULT_PREFIX = "confirm:"  # study user attributes holding each finished run's result
FAILURE_PREFIX = "confirm-failed:"  # ... and each failed run's reason (until it is run again and succeeds; a
# divergence, marked "diverged", is that seed's outcome: training is seeded, so it is not run again)
CONFIRM_STOPPING = "the running seed's run is being ended KILLED"  # said to a signal while the confirmation stops


@dataclass(frozen=True)
class Candidate:
    """An architecture to confirm: the best trial that has it, and its rank in the search."""

    trial: optuna.trial.FrozenTrial
    arch: ArchConfig
    arch_hash: str
    search_rank: int | None  # 1 = the search's best; None: the reference, outside the search's ranking
    reference: bool
    feasible: bool


@dataclass(frozen=True)
class Plan:
    """What a confirmation trains: every candidate once per seed, for ``steps`` steps."""

    candidates: tuple[Candidate, ...]
    options: ConfirmSettings
    steps: int
    seeds: tuple[int, ...]
    ranked: int  # distinct architectures in the search's ranking

    def runs(self) -> list[tuple[Candidate, int]]:
        return [(c, seed) for c in self.candidates for seed in self.seeds]


def result_key(arch_hash: str, seed: int, steps: int) -> str:
    # The seed itself, not its index: a result recorded under another numbering of the seeds (another
    # seeds=, or the search's own seed, which no confirmation plans) is read only for that very seed.
    return f"{RESULT_PREFIX}{arch_hash}:seed{seed}:steps{steps}"


def confirmation_seeds(search_seed: int, n: int) -> tuple[int, ...]:
    """The ``n`` seeds of each architecture's runs: those after the search's ``trainer.seed``. Every trial
    trained with that seed and the search chose its best architectures on that draw; run again, it would
    be counted as an independent sample of what it was selected on, biasing the t-tests and Kendall's tau
    toward agreeing with the search. Counted modulo 2^32 (after the largest seed comes 0), so a search of
    any trainer.seed has ``n`` fresh seeds (n <= 1000, never a full turn back to trainer.seed)."""
    return tuple((search_seed + 1 + i) % (SEED_MAX + 1) for i in range(n))


def search_ranking(study: optuna.Study, s: SearchSettings) -> list[optuna.trial.FrozenTrial]:
    """The best trial of each distinct architecture (by ``arch_hash``), best first: complete trials that
    meet the study's constraints, by the first objective (a multi-objective study: its Pareto front)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = 1 if s.study.directions[0] == "minimize" else -1
    pool = study.best_trials if s.study.multi_objective else complete
    seen: set[str] = set()
    firsts = []
    for t in sorted((t for t in pool if is_feasible(t)), key=lambda t: (sign * t.values[0], t.number)):
        h = t.user_attrs.get("arch_hash")
        if h is not None and h not in seen:
            seen.add(h)
            firsts.append(t)
    return firsts


def plan_confirmation(study: optuna.Study, s: SearchSettings, options: ConfirmSettings) -> Plan:
    """What to train. A study with no complete feasible trial, or whose architectures cannot be rebuilt,
    raises :class:`FuluConfigError` listing every problem; nothing is written here."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise FuluConfigError(f"study.name: study {s.study.name!r} has no complete trial: nothing to confirm")
    if not any(is_feasible(t) for t in complete):
        raise FuluConfigError(f"study.name: no complete trial of study {s.study.name!r} meets its constraints: "
                              "nothing to confirm")
    problems: list[str] = []
    for t in complete:
        if is_feasible(t):
            _arch_hash(t, problems)
    firsts = search_ranking(study, s)  # the best trial of each distinct architecture
    ranks = {t.user_attrs["arch_hash"]: rank for rank, t in enumerate(firsts, 1)}  # arch hash -> search rank
    reference = next((t for t in complete if t.user_attrs.get("reference")), None)
    ref_hash = _arch_hash(reference, problems) if reference is not None else None
    candidates = []
    for t in firsts[:options.top_k]:
        h = t.user_attrs["arch_hash"]
        candidates.append(Candidate(t, _rebuild(t, s, problems), h, ranks[h], h == ref_hash, True))
    if reference is not None and ref_hash not in {c.arch_hash for c in candidates}:
        candidates.append(Candidate(reference, _rebuild(reference, s, problems), ref_hash, ranks.get(ref_hash), True,
                                    is_feasible(reference)))
    if problems:
        raise FuluConfigError(problems)
    return Plan(tuple(candidates), options, steps=round(options.budget_factor * s.train.steps),
                seeds=confirmation_seeds(s.train.seed, options.seeds), ranked=len(ranks))


def _arch_hash(t: optuna.trial.FrozenTrial, problems: list[str]) -> str | None:
    h = t.user_attrs.get("arch_hash")
    if not isinstance(h, str):
        problems.append(f"trial {t.number}: has no arch_hash attribute, so its architecture cannot be told apart")
        return None
    return h


def _rebuild(t: optuna.trial.FrozenTrial, s: SearchSettings, problems: list[str]) -> ArchConfig | None:
    try:
        return s.space.family.arch_from_dict(t.user_attrs["arch"])
    except KeyError:
        problems.append(f"trial {t.number}: has no arch attribute: its architecture cannot be rebuilt")
    except (FuluConfigError, TypeError, ValueError, AttributeError) as e:
        problems.append(f"trial {t.number}: its architecture (the arch attribute) cannot be rebuilt: {e}")
    return None


class RunProgress:
    """A bar over the confirmation's runs: done / total, and the running one's step and loss."""

    def __init__(self, name: str, total: int, done: int, enabled: bool = True, report_to: ProgressFile | None = None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, desc=f"confirm {name}", unit="run", disable=not enabled,
                        dynamic_ncols=True)
        self.report_to = report_to or ProgressFile(None)  # a worker's file for the parent's bar

    def on_step(self, trial: int, seed: int, step: int, loss: float) -> None:
        self.bar.set_postfix_str(f"trial {trial} seed {seed}: step {step} loss {loss:.4f}", refresh=True)
        self.report_to.report(f"trial {trial} seed {seed}", step, loss)

    def show_running(self, lines: list[str]) -> None:
        """The worker processes' running runs (their step and loss)."""
        self.bar.set_postfix_str(" | ".join(lines), refresh=True)

    def finished(self, line: str) -> None:
        self.report_to.clear()
        self.bar.write(line)
        self.bar.update(1)
        self.bar.set_postfix_str("", refresh=True)

    def close(self) -> None:
        self.bar.close()


class Confirmation:
    """Runs a plan on a study: the runs not yet recorded, then the summary."""

    def __init__(self, study: optuna.Study, s: SearchSettings, plan: Plan, progress: bool = True):
        self.study, self.s, self.plan, self.progress = study, s, plan, progress
        self.tracker = Tracker(s)
        self.parent = self.tracker.parent_run(study)
        self.references = ReferenceModels(s)

    def key(self, c: Candidate, seed: int) -> str:
        return result_key(c.arch_hash, seed, self.plan.steps)

    def recorded(self) -> dict[str, dict]:
        keys = {self.key(c, seed) for c, seed in self.plan.runs()}
        return {k: v for k, v in self.study.user_attrs.items() if k in keys}

    def todo(self) -> list[tuple[Candidate, int]]:
        """The planned runs without a result or a recorded divergence (that seed's outcome, not a failure
        to retry); the study's attributes read once (each read is a query of the storage)."""
        attrs = self.study.user_attrs
        return [(c, seed) for c, seed in self.plan.runs()
                if (key := self.key(c, seed)) not in attrs and not _diverged(attrs.get(FAILURE_PREFIX + key))]

    def run(self, n_workers: int = 1) -> int:
        """0 with the summary written; 130 when interrupted (Ctrl-C or SIGTERM; the finished runs stay
        recorded); 1 when a worker process died: the summary lists the runs it left without a result as
        missing, has no winner and is not recorded on the study. With ``n_workers`` > 1 the runs are
        shared among that many processes (:mod:`.confirm_workers`)."""
        # SIGTERM too (`timeout`, `docker stop`, a batch scheduler; also the confirmation at the end of a
        # search, whose own handlers have ended): it killed the process with its running run left RUNNING.
        with stop_signals_as_interrupt(CONFIRM_STOPPING):
            try:
                return self._run_all(n_workers)
            except KeyboardInterrupt:
                print("interrupted: the finished runs are recorded; run the same command to resume", file=sys.stderr)
                return INTERRUPTED

    def _run_all(self, n_workers: int) -> int:
        self.close_stale()
        todo = self.todo()
        since = time.time()  # failures recorded from now on are this invocation's
        bar = RunProgress(self.s.study.name, len(self.plan.runs()), len(self.plan.runs()) - len(todo), self.progress)
        code = 0
        try:
            if n_workers > 1 and len(todo) > 1:
                from .confirm_workers import run_in_workers

                code = run_in_workers(self, todo, min(n_workers, len(todo)), bar)
                if code == INTERRUPTED:
                    raise KeyboardInterrupt
            else:
                for c, seed in todo:
                    self._run(c, seed, bar)
        finally:
            bar.close()
        with between_writes():
            missing = self._summarize(since)
        return 1 if missing or code else 0

    def run_share(self, share: set[str], report_to: ProgressFile | None = None) -> int:
        """A worker's part of :meth:`run`: the runs whose keys are in ``share`` (and not yet recorded),
        each training report also to ``report_to`` (for the parent's bar)."""
        bar = RunProgress(self.s.study.name, 0, 0, enabled=False, report_to=report_to)
        try:  # (the worker's signal handlers: confirm_worker's)
            for c, seed in self.todo():
                if self.key(c, seed) in share:
                    self._run(c, seed, bar)
        except KeyboardInterrupt:
            return INTERRUPTED
        finally:
            bar.report_to.clear()
        return 0

    def finished_lines(self, keys: dict[str, tuple[Candidate, int]], since: float) -> list[tuple[str, str]]:
        """``(key, line)`` for each of ``keys`` whose run has finished by now: recorded, or failed
        after ``since`` (a time.time(); older failures are of earlier attempts)."""
        attrs = self.study.user_attrs
        lines = []
        for key, (c, seed) in keys.items():
            failure = attrs.get(FAILURE_PREFIX + key)
            if key in attrs:
                lines.append((key, self._result_line(c, seed, attrs[key]["values"])))
            elif failure and failure.get("at", 0) >= since:
                lines.append((key, f"trial {c.trial.number} seed {seed} failed: {failure['reason']}"))
        return lines

    def _result_line(self, c: Candidate, seed: int, values: list[float]) -> str:
        shown = ", ".join(f"{o}={v:.4g}" for o, v in zip(self.s.study.objectives, values, strict=True))
        return f"trial {c.trial.number} seed {seed}: {shown} ({self.plan.steps} steps)"

    def close_stale(self, reasons: dict[str, str] | None = None) -> None:
        """Runs a killed process left RUNNING: FINISHED when their result was recorded (the process died
        between recording it and closing the run), else KILLED (they are trained again), with the
        reason ``reasons`` gives for the run's key (a worker that died) when it has one."""
        recorded_runs = {v.get("mlflow_run_id") for k, v in self.study.user_attrs.items()
                         if k.startswith(RESULT_PREFIX) and isinstance(v, dict)}
        for run in self.tracker._open_runs(self.parent, "confirmation"):
            run_id, tags = run.info.run_id, run.data.tags
            if run_id in recorded_runs:
                self.tracker.end_trial(run_id, "FINISHED")
                continue
            try:
                key = result_key(tags["fulu.arch_hash"], int(tags["fulu.seed"]), int(tags["fulu.steps"]))
            except (KeyError, ValueError):
                key = None
            reason = (reasons or {}).get(key)
            self.tracker.end_trial(run_id, "KILLED", {"fulu.state": "worker died", "fulu.reason": reason}
                                   if reason else {"fulu.state": "interrupted"})

    def _run(self, c: Candidate, seed: int, bar: RunProgress) -> None:
        """One architecture, one seed: trained, evaluated, measured, recorded. A failure is recorded
        (on the study and its MLflow run), not raised: the other runs go on."""
        s, steps, factor = self.s, self.plan.steps, self.plan.options.budget_factor
        cfg = replace(s.train, steps=steps, seed=seed,
                      seconds_cap=s.train.seconds_cap * factor if s.train.seconds_cap else None)
        run_id = self.tracker.start_confirmation(self.parent, c.trial.number, seed, steps, c.arch.to_dict(),
                                                 run_tags(c, factor))
        log = TrainingLog(self.tracker, run_id, lambda step, loss: bar.on_step(c.trial.number, seed, step, loss))
        model = None
        kernels = ServedKernels(s)
        saved = False  # the result is on the study: the run is counted, so it must not end KILLED
        try:
            model, result = train_architecture(c.arch, s, cfg, log, kernels)
            measured = evaluate_and_measure(model, s, self.references, result, kernels)
            values = [measured.metrics[o] for o in s.study.objectives]
            self.tracker.log_params(run_id, {"train_step": step_description(result)})
            self.tracker.log_metrics(run_id, measured.metrics)
            self.tracker.log_files(run_id, measured.artifacts(c.arch, log.routing_history))
            # One block of writes: a signal arriving meanwhile is raised once the run is closed FINISHED, not
            # inside the study's write (which could leave its SQLite file locked). The result goes first: a
            # process killed in between leaves a RUNNING run whose result is known, which the next invocation
            # closes as FINISHED instead of training it again.
            with between_writes():
                self.study.set_user_attr(result_key(c.arch_hash, seed, steps), {
                    "trial": c.trial.number, "arch_hash": c.arch_hash, "seed": seed, "steps": steps,
                    "values": values, "metrics": measured.metrics, "mlflow_run_id": run_id})
                saved = True
                self.tracker.end_trial(run_id, "FINISHED")
            bar.finished(self._result_line(c, seed, values))
        except KeyboardInterrupt:
            if not saved:
                self.tracker.end_trial(run_id, "KILLED", {"fulu.state": "interrupted"})
            raise
        except Exception as e:
            reason = failure_reason(e)
            with between_writes():  # the run's end and the failure it records, whole (as the result above)
                self.tracker.end_trial(run_id, "FAILED", {"fulu.state": "failed", "fulu.reason": reason,
                                                          "fulu.traceback": traceback.format_exc()[-4000:]})
                self.study.set_user_attr(FAILURE_PREFIX + self.key(c, seed),
                                         {"trial": c.trial.number, "seed": seed, "reason": reason,
                                          "at": time.time(), "diverged": isinstance(e, TrainingDiverged)})
            bar.finished(f"trial {c.trial.number} seed {seed} failed: {reason}")
        finally:
            kernels.wait()
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _summarize(self, since: float = 0.0) -> int:
        """The summary of the plan's recorded runs (``confirmation.json``, printed); the number of
        planned runs that have neither a result nor a failure recorded since ``since`` (a worker died
        before it ended them). With none the summary is also recorded on the study and its parent run
        (``fulu-nas export trial=best`` takes its winner); otherwise it lists them as missing and has no
        winner, and the study keeps its last complete confirmation (if any)."""
        s, plan = self.s, self.plan
        results = self.recorded()
        attrs = self.study.user_attrs
        failures, missing = [], []
        for c, seed in plan.runs():
            key = self.key(c, seed)
            if key in results:
                continue
            failure = attrs.get(FAILURE_PREFIX + key)
            if isinstance(failure, dict) and (failure.get("at", 0) >= since or _diverged(failure)):
                failures.append(failure)
            else:
                missing.append({"trial": c.trial.number, "arch_hash": c.arch_hash, "seed": seed})
        rows = []
        for c in plan.candidates:
            runs = [results[k] for seed in plan.seeds if (k := result_key(c.arch_hash, seed, plan.steps)) in results]
            rows.append({"trial": c.trial.number, "arch_hash": c.arch_hash, "search_rank": c.search_rank,
                         "reference": c.reference, "feasible": c.feasible, "search_values": list(c.trial.values),
                         "params": ", ".join(f"{k}={v}" for k, v in c.trial.params.items()),
                         "runs": [{"seed": r["seed"], "values": r["values"], "mlflow_run_id": r["mlflow_run_id"]}
                                  for r in runs]})
        header = {"study": s.study.name, "objectives": list(s.study.objectives),
                  "directions": list(s.study.directions), "top_k": plan.options.top_k,
                  "ranked_architectures": plan.ranked, "budget_factor": plan.options.budget_factor,
                  "search_steps": s.train.steps, "search_seed": s.train.seed, "steps": plan.steps,
                  "seeds": list(plan.seeds),
                  "failed_runs": failures, "complete": not missing, "missing_runs": missing}
        summary = summarize_confirmation(header, rows, list(s.study.directions))
        path = s.output_dir / "confirmation.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str))
        if not missing:
            self.tracker.log_files(self.parent, {"confirmation.json": summary})
            self.study.set_user_attr(SUMMARY_ATTR, summary)
        print_confirmation(summary, path)
        if missing:
            print(f"incomplete: {len(missing)} of {len(plan.runs())} runs have no result (a worker process died; "
                  "see above), so no winner is recorded and the study keeps its previous confirmation, if any; "
                  "run the same command again to train the missing runs", file=sys.stderr)
        return len(missing)


def run_tags(c: Candidate, budget_factor: float) -> dict:
    """The tags of ``c``'s confirmation runs (besides the trial, seed and steps). A reference outside the
    search's ranking has no ``fulu.search_rank`` (it was logged as the text "None")."""
    tags = {"fulu.arch_hash": c.arch_hash, "fulu.reference": c.reference, "fulu.budget_factor": budget_factor}
    if c.search_rank is not None:
        tags["fulu.search_rank"] = c.search_rank
    return tags


def _diverged(failure: object) -> bool:
    return isinstance(failure, dict) and bool(failure.get("diverged"))


def confirm_study(study: optuna.Study, s: SearchSettings, options: ConfirmSettings, progress: bool = True,
                  n_workers: int | None = None) -> int:
    """Plan (bad input raises before anything is written), then run on ``n_workers`` processes (by
    default the study's ``study.n_workers``)."""
    with quiet_optuna():
        plan = plan_confirmation(study, s, options)
        # The runs go to the tracking database given, which must be the search's kind (MLflow would make
        # an empty one of a misspelt file); after the plan, whose refusals say more.
        check_tracking_database_exists(s.tracking_uri)
        return Confirmation(study, s, plan, progress).run(n_workers or s.study.n_workers)


def confirm_after_search(s: SearchSettings) -> int:
    """``study.confirm.enabled=true``: the confirmation at the end of ``fulu-nas search``."""
    with quiet_optuna():
        study = open_study(s)
    return confirm_study(study, s, s.study.confirm)
