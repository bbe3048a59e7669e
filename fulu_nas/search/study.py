"""The study driver: open (or resume) the Optuna study, run workers until the study has the
requested number of finished trials, then report the best trial or the Pareto front.

``run_search`` is what ``fulu-nas search`` calls. With ``study.n_workers=1`` the trials run in
this process; with N it starts N worker processes (``python -m fulu_nas.search.worker``), one
per GPU when GPUs are visible, all sharing the study's storage, and shows their progress. Workers
on other hosts join by running the same command against the same ``study.storage``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import optuna

from ..deploy.processes import process_is_gone, this_process
from ..errors import FuluConfigError
from ..moe import cpu_stream
from ..signals import held
from . import interrupts
from .interrupts import between_writes, interrupt
from .objective import (
    DEVICE_BOUND,
    Objective,
    TrialFailed,
    counts_toward_total,
    is_feasible,
    measuring_device,
    pareto_front,
    requeue_interrupted,
)
from .private_files import settings_hold_password, write_config
from .report import describe_counts, print_summary, summarize
from .settings import SearchSettings
from .storage import mask_url, open_study_storage
from .tracking import ORPHANED_UPLOAD, PARENT_RUN_ATTR, Tracker, quiet_mlflow
from .worker_progress import ProgressFile, progress_path, remove_all, running_lines

TrialState = optuna.trial.TrialState
logger = logging.getLogger(__name__)  # the run folder's search.log (the console shows WARNING and above)
FINGERPRINT_ATTR = "fulu_fingerprint"
FINGERPRINT_PARTS_ATTR = "fulu_fingerprint_parts"  # each part's digest: what a refused resume names
INTERRUPTED = 130
NO_RESULT = 1  # no trial of a complete study completed within its constraints (failed, pruned, infeasible)
INCOMPLETE = 1  # the search stopped without the requested finished trials, not interrupted
WORKER_ATTR = "worker"  # a trial's user attribute: the process that runs it (deploy.processes.this_process)


def make_sampler(s: SearchSettings, worker_index: int = 0, trials_before: int = 0) -> optuna.samplers.BaseSampler:
    # Workers of one study get different seeds, or their random start-up trials would coincide; so does
    # each resumption of a study (by the trials it already holds), or a resumed or extended study would
    # draw its first trials again.
    seed = s.study.seed + 1000 * worker_index
    if trials_before:
        seed = int(np.random.SeedSequence([s.study.seed, worker_index, trials_before]).generate_state(1)[0])
    startup = s.study.startup_trials
    if s.study.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True,
                                          constant_liar=True)
    if s.study.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if s.study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.study.sampler == "grid":
        return optuna.samplers.GridSampler(s.space.grid(), seed=seed)
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)


def make_pruner(s: SearchSettings) -> optuna.pruners.BasePruner:
    if s.study.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.study.startup_trials,
                                           n_warmup_steps=2 * s.train.report_every)
    if s.study.pruner == "hyperband":
        # The resource is the training step (what the objective reports): from one report up to the
        # whole step budget, so the last rung of every bracket trains a trial to completion.
        return optuna.pruners.HyperbandPruner(min_resource=s.train.report_every, max_resource=s.train.steps,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(s: SearchSettings, worker_index: int = 0) -> optuna.Study:
    """Create the study or load it; a study created with another space, task or budget is refused."""
    storage = open_study_storage(s.storage_url, s.study.heartbeat_interval, s.study.grace_period,
                                 s.study.max_retry, on_stale=functools.partial(_close_stale_run, s))
    study = optuna.create_study(study_name=s.study.name, storage=storage, sampler=make_sampler(s, worker_index),
                                pruner=make_pruner(s), directions=list(s.study.directions), load_if_exists=True)
    check_resumable(study, s)
    if study.user_attrs.get(FINGERPRINT_ATTR) is None:
        study.set_user_attr("search_space", s.space.name)
        study.set_user_attr("task", s.task_name)
    if study.user_attrs.get(FINGERPRINT_ATTR) != s.fingerprint():  # new, or resumed from an earlier form
        study.set_user_attr(FINGERPRINT_ATTR, s.fingerprint())
        study.set_user_attr(FINGERPRINT_PARTS_ATTR, s.part_digests())
    if study.metric_names != list(s.study.objectives):
        # Optuna's plots and optuna-dashboard name the objectives by these (else "Objective 0").
        study.set_metric_names(list(s.study.objectives))
    # Trials already sampled or run (not those only queued, such as the reference of a study just created).
    trials_before = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
    if trials_before:
        study.sampler = make_sampler(s, worker_index, trials_before)
    if s.space.reference is not None and not study.get_trials(deepcopy=False):
        # The hand-picked default goes first, so every study can say whether the search beat it.
        study.enqueue_trial(s.space.reference, user_attrs={"reference": True}, skip_if_exists=True)
    return study


def check_resumable(study: optuna.Study, s: SearchSettings) -> None:
    """FuluConfigError when ``study`` (created, or loaded as it is) was created with other objectives, or
    another space, task or budget (its fingerprint) than ``s``: :func:`open_study`, and the search's
    pre-flight before anything is written (:func:`fulu_nas.search.app.preflight`)."""
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in s.study.directions]:
        raise FuluConfigError(f"study.objectives: study {s.study.name!r} in {mask_url(s.storage_url)} was created "
                              "with other objectives; choose another study.name")
    fingerprint = study.user_attrs.get(FINGERPRINT_ATTR)
    if fingerprint is not None and fingerprint not in s.fingerprints():
        raise FuluConfigError(f"study.name: study {s.study.name!r} in {mask_url(s.storage_url)} was created "
                              f"{changed_settings(study.user_attrs.get(FINGERPRINT_PARTS_ATTR), s)}; choose another "
                              "study.name to start a new study, or the original settings to resume it")
    _check_same_device(study, s)


def _check_same_device(study: optuna.Study, s: SearchSettings) -> None:
    """A study that optimises or bounds latency, throughput or memory resumes only on the device that measured
    its trials: its front would weigh one device's figures against another's. A trial from before devices
    were recorded counts as this device's (as for reuse)."""
    bound = sorted(set(DEVICE_BOUND) & (set(s.study.objectives) | {name for name, _ in s.study.constraints}))
    if not bound:
        return
    here = measuring_device(s)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if elsewhere := sorted({t.user_attrs.get("device", here) for t in complete} - {here}):
        raise FuluConfigError(f"trainer.device: study {s.study.name!r} in {mask_url(s.storage_url)} measured "
                              f"{', '.join(bound)} on {'; '.join(elsewhere)}, this search would measure on {here}, "
                              "and the two are not comparable: resume it there, or choose another study.name")


_PARTS = {"task": "another task", "search_space": "another search_space", "trainer": "another trainer",
          "objectives": "other study.objectives", "constraints": "other study.constraints",
          "model_sha256": "another model file (task.model)",
          "corpus_sha256": "another corpus (the names or bytes of the files task.path reads)"}


def changed_settings(stored: object, s: SearchSettings) -> str:
    """Which settings differ from the ones ``stored`` (a study's part digests; a study made before
    they were kept has none, and is told apart as a whole)."""
    differ = [_PARTS[part] for part in changed_parts(stored, s) or ()]
    if not differ:  # not kept, or the parts agree and the whole does not: a part this version does not keep
        return "with another search space, task, budget, objectives or constraints"
    *rest, last = differ
    return "with " + (f"{', '.join(rest)} and {last}" if rest else last)


def changed_parts(stored: object, s: SearchSettings) -> list[str] | None:
    """The parts of the fingerprint (:data:`_PARTS`' keys) whose digests ``stored`` (a study's) holds other
    than ``s`` gives; None when the study kept none (made before they were kept)."""
    if not isinstance(stored, dict):
        return None
    # A study made before the corpus was digested kept its path as typed and no digest: compare like with like.
    current = s.part_digests(corpus_by_path="corpus_sha256" not in stored)
    return [part for part in _PARTS if stored.get(part) != current.get(part)]


def _close_stale_run(s: SearchSettings, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                     reason: str | None = None) -> None:
    """The MLflow run of a trial failed because its worker stopped is closed (:meth:`Tracker.close_stale_trial`)."""
    try:
        Tracker(s).close_stale_trial(study, trial, reason)
    except Exception as e:  # the trial is failed and queued again already: a tracking error must not stop this worker
        print(f"warning: the MLflow run of failed trial {trial.number} stays open: {type(e).__name__}: {e}",
              file=sys.stderr)


def finished_count(study: optuna.Study) -> int:
    return sum(counts_toward_total(t) for t in study.get_trials(deepcopy=False))


@contextmanager
def quiet_optuna():
    """Our own one-line-per-trial output replaces Optuna's log (which repeats tracebacks of
    failures whose reasons we record)."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    quiet_mlflow()
    try:
        with warnings.catch_warnings():
            # group=True, heartbeats and stale-trial retries are marked experimental; we rely on them knowingly.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


class TrialProgress:
    """A bar over trials: done / total, best so far, and the running trial's step and loss."""

    def __init__(self, s: SearchSettings, study: optuna.Study, enabled: bool = True,
                 report_to: ProgressFile | None = None):
        from tqdm.auto import tqdm

        self.s, self.study = s, study
        self.report_to = report_to or ProgressFile(None)  # a worker's file for the parent's bar
        self.bar = tqdm(total=s.study.n_trials, initial=min(finished_count(study), s.study.n_trials),
                        desc=f"study {s.study.name}", unit="trial", disable=not enabled, dynamic_ncols=True)
        self.best = ""
        self.current = ""
        self.refresh()

    def on_step(self, number: int, step: int, loss: float) -> None:
        self.current = f"trial {number}: step {step} loss {loss:.4f}"
        self.report_to.report(f"trial {number}", step, loss)
        self._show()

    def trial_ended(self) -> None:
        self.current = ""
        self.report_to.clear()

    def show_running(self, lines: list[str]) -> None:
        """The running trials of the worker processes (their step and loss)."""
        self.current = " | ".join(lines)

    def refresh(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        done = min(sum(counts_toward_total(t) for t in trials), self.s.study.n_trials)
        self.bar.update(done - self.bar.n)
        complete = [t for t in trials if t.state == TrialState.COMPLETE and is_feasible(t)]  # as the summary
        if complete and not self.s.study.multi_objective:
            pick = min if self.s.study.directions[0] == "minimize" else max
            best = pick(complete, key=lambda t: t.values[0])
            self.best = f"best {self.s.study.objectives[0]} {best.values[0]:.4g} (trial {best.number})"
        elif complete:
            n = len(pareto_front(self.study))
            self.best = f"Pareto front: {n} trial{'s' * (n != 1)}"
        self._show()

    def write(self, line: str) -> None:
        self.bar.write(line)

    def _show(self) -> None:
        self.bar.set_postfix_str(" | ".join(p for p in (self.best, self.current) if p), refresh=True)

    def close(self) -> None:
        self.bar.close()


def describe_trial(t: optuna.trial.FrozenTrial, s: SearchSettings) -> str:
    params = ", ".join(f"{k}={v}" for k, v in t.params.items())
    if t.state == TrialState.COMPLETE:
        values = ", ".join(f"{o}={v:.4g}" for o, v in zip(s.study.objectives, t.values, strict=True))
        note = f" (reused trial {t.user_attrs['cached_from']})" if "cached_from" in t.user_attrs else ""
        note += " [reference]" if t.user_attrs.get("reference") else ""
        over = [name for name, bound in s.study.constraints
                if t.user_attrs.get("metrics", {}).get(name, -math.inf) > bound]
        note += f" [infeasible: over {', '.join(over)}]" if over else ""
        return f"trial {t.number} complete: {values}{note} | {params}"
    if t.state == TrialState.PRUNED:
        if "infeasible" in t.user_attrs:
            return f"trial {t.number} infeasible, not trained: {t.user_attrs['infeasible']} | {params}"
        note = f" (reused trial {t.user_attrs['cached_from']})" if "cached_from" in t.user_attrs else ""
        return f"trial {t.number} pruned at step {t.user_attrs.get('pruned_at_step', '?')}{note} | {params}"
    return f"trial {t.number} failed: {t.user_attrs.get('fail_reason', 'worker stopped')} | {params}"


def warm_up(s: SearchSettings) -> None:
    """One-time costs before the first trial, so that no trial pays them: the CPU streaming experts
    kernel is compiled (or loaded from torch's extension cache) for CPU inference."""
    from ..training.train import resolve_device

    if resolve_device(s.train.device).type == "cpu":
        cpu_stream.kernel()


def record_asks(study: optuna.Study, asked: list[int]) -> None:
    """``study.ask`` (what Optuna's optimize calls to create each trial) with the id of every trial it
    creates added to ``asked`` and this process recorded on the trial (``worker``: where the storage has
    no heartbeats, how another worker knows the trial's worker is gone, :func:`fail_trials_of_gone_workers`),
    and a Ctrl-C that arrives while it runs raised at its end, once the id is there: a trial interrupted
    before the objective took it is still known to have been this worker's (:func:`requeue_unfinished`)."""
    ask = study.ask

    def recorded_ask(*args, **kwargs):
        with between_writes():
            trial = ask(*args, **kwargs)
            asked.append(trial._trial_id)
            trial.set_user_attr(WORKER_ATTR, this_process())
        return trial

    study.ask = recorded_ask


def requeue_unfinished(study: optuna.Study, asked: list[int]) -> None:
    """The trials of ``asked`` still RUNNING, which a Ctrl-C stopped before the objective took them (or
    after it returned, before Optuna recorded the result): failed as ``interrupted`` and queued again
    (:func:`requeue_interrupted`). No other worker would: such a trial may have no heartbeat yet, and
    the heartbeat check fails only trials with one (the same command then waited for it forever)."""
    for trial_id in asked:
        t = study._storage.get_trial(trial_id)
        if t.state != TrialState.RUNNING:
            continue
        if t.user_attrs.get("fail_reason") != "interrupted":
            requeue_interrupted(study, trial_id)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)


def beat_for_trials_without_heartbeat(study: optuna.Study, grace_period: int, given: set[int]) -> None:
    """Give a RUNNING trial older than ``grace_period`` a heartbeat, once (``given`` holds the ids).

    Optuna's check fails only trials that have a heartbeat, and a worker killed (SIGKILL, a crash) in
    the instant Optuna created its trial, before the heartbeat thread started, left one without: the
    other workers, and the same command resumed, waited for it forever. With the heartbeat given here
    it is failed as stale one grace period later and queued again. A live trial's worker keeps beating
    anyway, so this changes nothing for it; a dead trial's recent heartbeat is renewed once at most."""
    now = datetime.now()  # Optuna stamps datetime_start with the local clock too
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t._trial_id in given or t.datetime_start is None:
            continue
        if (now - t.datetime_start).total_seconds() > grace_period:
            study._storage.record_heartbeat(t._trial_id)
            given.add(t._trial_id)


def fail_trials_of_gone_workers(s: SearchSettings, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Where the storage has no heartbeats (a journal file), the RUNNING trials whose worker is known to be
    gone (a process of this host that ended: ``kill -9``, a crash) failed as the heartbeat check fails a
    stale trial: with the reason, queued again up to ``study.max_retry`` times (Optuna's retry callback, as
    the heartbeat check's), their MLflow runs ended. Nothing else would ever end them, and every worker took
    them for trials still running. Returns them, failed."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=s.study.max_retry)
    failed = []
    for t in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR, "")
        if not process_is_gone(worker):
            continue
        reason = (f"worker stopped: its process {worker} is gone (killed, or crashed); the trial was failed and "
                  "queued again up to study.max_retry times")
        with between_writes():  # a Ctrl-C meanwhile would leave the trial failed but not queued, or its run open
            if _fail(study, t, reason):
                # The queued copy names no worker until one takes it: taken, it would otherwise be this dead
                # one's for an instant, which another worker could fail under the one now running it.
                t.user_attrs = {k: v for k, v in t.user_attrs.items() if k != WORKER_ATTR}
                retry(study, t)
                _close_stale_run(s, study, t, reason)
                failed.append(study._storage.get_trial(t._trial_id))
    return failed


def _fail(study: optuna.Study, t: optuna.trial.FrozenTrial, reason: str) -> bool:
    """Trial ``t`` failed with ``reason``, not counted; False where another worker failed it first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
        storage.set_trial_user_attr(t._trial_id, "not_counted", True)
        return storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def _say_waiting(bar: TrialProgress, running: list[optuna.trial.FrozenTrial], told: set[int]) -> None:
    """Each trial waited for, once, with its worker: without heartbeats the wait ends only when that
    trial ends, or a search on its worker's host finds that worker gone."""
    for t in running:
        if t.number not in told:
            told.add(t.number)
            bar.write(line := f"waiting for trial {t.number} (worker {t.user_attrs.get(WORKER_ATTR, 'unknown')})")
            logger.info(line)


def _attempts_note(study: optuna.Study, started: set[int]) -> str:
    """Why the trials this worker started did not count: what the attempt limit's message says."""
    mine = [t for t in study.get_trials(deepcopy=False) if t.number in started]
    infeasible = sum("infeasible" in t.user_attrs for t in mine)
    note = f"{sum(map(_surplus, mine))} surplus: taken by other workers first, {infeasible} infeasible"
    return note + ("; is most of the space infeasible?" if 2 * infeasible > len(mine) else "")


def run_worker(s: SearchSettings, worker_index: int = 0, progress: bool = True,
               report_to: ProgressFile | None = None) -> int:
    """Run trials until the study has ``n_trials`` finished ones (counting every worker's), each
    training report also to ``report_to`` (a worker process's, for its parent's bar).
    Returns 0; 130 when interrupted (the current trial is failed and queued again); 1 when it stopped at
    its limit of attempts without the requested finished trials (the same command goes on)."""
    warm_up(s)
    with quiet_optuna():
        study = open_study(s, worker_index)
        tracker = Tracker(s)
        parent = tracker.parent_run(study)
        bar = TrialProgress(s, study, enabled=progress, report_to=report_to)
        _close_orphaned_uploads(tracker, study, bar)
        objective = Objective(s, tracker, parent, on_progress=bar.on_step)
        # Optuna has no public accessor; this is what its own optimize loop asks.
        from optuna.storages._heartbeat import is_heartbeat_enabled

        heartbeat = is_heartbeat_enabled(study._storage)
        attempts, limit, code = 0, 10 * s.study.n_trials + 50, 0
        reported: set[int] = set()
        beat_given: set[int] = set()
        waited: set[int] = set()
        asked: list[int] = []  # the trial this worker is running (its id), once Optuna has created it
        record_asks(study, asked)
        try:
            while True:
                interrupts.raise_if_swallowed()
                if not heartbeat:
                    for t in fail_trials_of_gone_workers(s, study):
                        _report(bar, t, s)
                trials = study.get_trials(deepcopy=False)
                done = sum(counts_toward_total(t) for t in trials)
                running = [t for t in trials if t.state == TrialState.RUNNING]
                if done >= s.study.n_trials:
                    break
                if done + len(running) >= s.study.n_trials:
                    # The rest are running elsewhere: wait for them (a trial started meanwhile would be
                    # surplus), or for a killed worker's trial to be failed and queued again: by the
                    # heartbeat check, or without heartbeats once its worker is known to be gone.
                    if not heartbeat:
                        _say_waiting(bar, running, waited)
                    time.sleep(1.0)
                    interrupts.raise_if_swallowed()
                    if heartbeat:
                        optuna.storages.fail_stale_trials(study)
                        beat_for_trials_without_heartbeat(study, s.study.grace_period, beat_given)
                    bar.refresh()
                    continue
                attempts += 1
                if attempts > limit:
                    bar.write(f"stopping after {limit} trials started: {done} of the {s.study.n_trials} requested "
                              f"trials finished ({_attempts_note(study, objective.started)}); run the same "
                              "command to go on")
                    code = INCOMPLETE
                    break
                asked.clear()
                # Optuna's ask and tell are writes to the study: a signal inside them is raised once they
                # end (inside its tell it came out of Optuna's loop as UnboundLocalError, the trial left
                # RUNNING); the trial itself is interruptible (Objective.__call__).
                with between_writes():
                    study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=False)
                for t in study.get_trials(deepcopy=False):
                    if t.number in objective.started - reported and t.state.is_finished():
                        reported.add(t.number)
                        if not _surplus(t):
                            _report(bar, t, s)
                bar.trial_ended()
                bar.refresh()
            # Here, not only below: a Ctrl-C while the last uploads finish comes after the last trial.
            tracker.wait_for_uploads()
        except KeyboardInterrupt:
            requeue_unfinished(study, asked)
            bar.close()
            return _interrupted(s, study, asked)
        finally:
            bar.trial_ended()
            bar.close()
            tracker.wait_for_uploads()
    return code


def _report(bar: TrialProgress, t: optuna.trial.FrozenTrial, s: SearchSettings) -> None:
    """A finished trial's line, on the console and in the log."""
    bar.write(line := describe_trial(t, s))
    logger.info(line)


def _interrupted(s: SearchSettings, study: optuna.Study, asked: list[int]) -> int:
    """What a Ctrl-C or SIGTERM stopped, told truly: 130, unless this worker was running no trial and the
    study has its trials (the signal came as the search was ending: it ends as it would have, 0, unless
    the confirmation was still to run)."""
    stopped = any(study._storage.get_trial(i).user_attrs.get("fail_reason") == "interrupted" for i in asked)
    if stopped or finished_count(study) < s.study.n_trials:
        print("interrupted: " + ("the running trial was failed and queued again; " if stopped else "") +
              f"run the same command{_in_this_sweep()} to resume", file=sys.stderr)
        return INTERRUPTED
    if s.study.confirm.enabled:
        print("interrupted after the study's last trial: the study is complete, its confirmation did not run; "
              f"run the same command{_in_this_sweep()} to run it", file=sys.stderr)
        return INTERRUPTED
    print("stopped after the study's last trial: the study is complete", file=sys.stderr)
    return 0


def _in_this_sweep() -> str:
    """In a multirun, what makes the same command resume its jobs rather than start a sweep in a new
    folder (the default sweep folder is named after the time it started); elsewhere nothing."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    return f" with hydra.sweep.dir={Path(HydraConfig.get().sweep.dir).resolve()}"


def _surplus(t: optuna.trial.FrozenTrial) -> bool:
    return t.user_attrs.get("fail_reason", "").startswith("surplus")


@contextmanager
def stop_signals_as_interrupt(stopping: str = interrupts.SEARCH_STOPPING) -> Iterator[None]:
    """SIGTERM (``timeout``, ``docker stop``, a batch scheduler's polite stop) and Ctrl-C stop the search
    alike: between database writes (:mod:`.interrupts`), the running trial failed and queued again, its
    runs ended, the summary written; the signals after the first are ignored, told ``stopping`` (what the
    command is doing meanwhile). Only the main thread can take signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupts.reset(stopping)
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with interrupts.catching_swallowed_interrupts():
            yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        interrupts.reset()


def run_search(s: SearchSettings, progress: bool = True) -> int:
    """The ``fulu-nas search`` job: run the study here or with N worker processes, then summarise."""
    # The study's opening writes its database and settings whole: a signal meanwhile is a Ctrl-C once they are
    # (a second one at once: a database server that does not answer may hold the opening for long).
    with held(second_acts=True):
        s.output_dir.mkdir(parents=True, exist_ok=True)
        with quiet_optuna():
            study = open_study(s)  # a resume with other settings is refused here, before its config is rewritten
        if (done := finished_count(study)) >= s.study.n_trials:  # a resume with nothing left to train
            print(f"study {s.study.name} already has {done} finished trial{'s' * (done != 1)} of the "
                  f"{s.study.n_trials} requested: nothing to train; study.n_trials=M (more than {done}) extends it")
        write_config(s.output_dir / "search_config.json",
                     json.dumps({"config": s.raw, "output_dir": str(s.output_dir), "typed_model": s.typed_model},
                                indent=2, default=str), private=settings_hold_password(s))
    with stop_signals_as_interrupt():
        try:
            if s.study.n_workers == 1:
                code = run_worker(s, 0, progress=progress)
            else:
                code = _run_worker_processes(s, progress)
        except KeyboardInterrupt:  # before a trial ran (opening the study, compiling a kernel, starting workers)
            print(f"interrupted: run the same command{_in_this_sweep()} to resume", file=sys.stderr)
            code = INTERRUPTED
        except BaseException as e:
            # whatever ends the search, its parent run ends (FAILED, with the error) and the summary is written
            interrupts.ignore_signals()
            try:
                _finish_study(s, error=f"{type(e).__name__}: {e}")
            except Exception as closing:  # the error that ended the search is the one to report
                if not (isinstance(e, FuluConfigError) and isinstance(closing, FuluConfigError)):  # not twice
                    print(f"warning: the study's MLflow run and summary.json were not written: "
                          f"{type(closing).__name__}: {closing}", file=sys.stderr)
            raise
        interrupts.ignore_signals()  # the search is ending: a Ctrl-C now would leave its parent run open
        summary = _finish_study(s)
    print_summary(summary, s)
    if code == 0 and (reason := _untrained(summary)):
        print(f"error: {reason}", file=sys.stderr)
        return NO_RESULT
    return code


def _untrained(summary: dict) -> str | None:
    """Why a study that has all its trials has no result (not one trial completed, or none within
    study.constraints), or None. A script running the search (``fulu-nas search && fulu-nas export``) learns
    it from the exit code."""
    if summary["n_finished"] < summary["n_trials_requested"] or "best" in summary or summary.get("pareto_front"):
        return None
    if summary["n_complete"]:
        return (f"no complete trial of study {summary['study']} is within study.constraints "
                f"({describe_counts(summary, zeros=False)}): the search has no result; each trial's figures are on "
                "its MLflow run")
    return (f"no trial of study {summary['study']} completed ({describe_counts(summary, zeros=False)}): the search "
            "has no result; each trial's reason is above and on its MLflow run (tag fulu.reason)")


def _finish_study(s: SearchSettings, error: str | None = None) -> dict:
    """The study's summary on its MLflow parent run, which ends (FAILED with ``error`` when given), and in
    summary.json; returns the summary."""
    with quiet_optuna():
        study = open_study(s)
        summary = summarize(study, s)
        tracker = Tracker(s)
        parent = tracker.parent_run(study) if error is None else study.user_attrs.get(PARENT_RUN_ATTR)
        if parent:
            tracker.finish_study(parent, summary, error=error or _untrained(summary))
    (s.output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def worker_env(index: int, n_workers: int, gpus_per_worker: int = 1) -> dict[str, str]:
    """Worker ``index``'s environment: its share of the CPU threads and, on a GPU host, its own
    ``gpus_per_worker`` GPUs (``trainer.expert_parallel``): the visible GPUs are cut into groups
    ``[g*P, (g+1)*P)`` and worker i takes group ``i % groups`` (disjoint sets while there are
    enough; with fewer GPUs than P it sees them all)."""
    env = dict(os.environ)
    env[interrupts.PARENT_PID_ENV] = str(os.getpid())  # a worker stops when this process is gone
    # Share the CPU cores between workers instead of oversubscribing them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n_workers)))
    # Workers run this very fulu_nas, whatever the interpreter's own path would find.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:
        gpus = 0
    if gpus:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        P = max(1, gpus_per_worker)
        groups = len(ids) // P
        if groups:
            g = index % groups
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[g * P:(g + 1) * P])
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    return env


def _close_orphaned_uploads(tracker: Tracker, study, bar: TrialProgress) -> None:
    """End the runs a killed uploader left open (:meth:`~.tracking.Tracker.close_orphaned_uploads`), each
    trial named on the console: on a resume after a kill the best trial may be one of them, without weights."""
    for number in tracker.close_orphaned_uploads(study):
        bar.write(f"trial {number}: {ORPHANED_UPLOAD}")


def _run_worker_processes(s: SearchSettings, progress: bool) -> int:
    # Create the study, its reference trial and the MLflow parent run once, before workers race.
    with quiet_optuna():
        study = open_study(s)
        tracker = Tracker(s)
        tracker.parent_run(study)
    config = s.output_dir / "search_config.json"
    procs = []
    bar = TrialProgress(s, study, enabled=progress)
    with quiet_optuna():  # here, not in the workers, whose console is their log
        _close_orphaned_uploads(tracker, study, bar)
    running = [progress_path(s.output_dir, "worker", i) for i in range(s.study.n_workers)]
    # the trials a resumed search finished before: said then, not again
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}

    def report_finished() -> None:
        for t in study.get_trials(deepcopy=False):
            if t.state.is_finished() and t.number not in seen:
                seen.add(t.number)
                if not _surplus(t):
                    _report(bar, t, s)

    try:
        for i in range(s.study.n_workers):
            # appended to: on a resume, what a worker said it stopped is still there to read
            log = open(s.output_dir / f"worker-{i}.log", "a")
            command = [sys.executable, "-m", "fulu_nas.search.worker", str(config), str(i)]
            env = worker_env(i, s.study.n_workers, s.train.expert_parallel)
            procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        # Every worker polled each round (a list, not any(), which stops at the first live one): a dead
        # worker is reaped, so that the others see it gone rather than a zombie that looks alive.
        while [p.poll() for p, _ in procs].count(None):
            time.sleep(1.0)
            interrupts.raise_if_swallowed()
            report_finished()
            bar.show_running(running_lines(running))
            bar.refresh()
        report_finished()  # those that finished since the last look
    except KeyboardInterrupt:
        for p, _ in procs:
            # The signal may have come to this process alone (docker stop, kill PID, kill -INT PID): passed
            # on. Sent to the whole process group (Ctrl-C, timeout, kill -- -PGID, a scheduler), the
            # workers got it already: this second one, which no process can tell apart, is ignored by them
            # (:mod:`.interrupts`).
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in procs:
            p.wait()
        report_finished()  # those that finished since the last look, and as the workers stopped
        bar.close()  # the message on a line of its own
        # A worker that had ended its part (0; or killed by the signal as it exited, its handlers gone) and a
        # study with its trials: the signal came as the search was ending.
        ended = (0, INTERRUPTED, -signal.SIGTERM, -signal.SIGINT)
        if all(p.returncode in ended for p, _ in procs) and finished_count(study) >= s.study.n_trials:
            return _interrupted(s, study, [])
        print(f"interrupted: run the same command{_in_this_sweep()} to resume (each worker's log says what it "
              "stopped)", file=sys.stderr)
        return INTERRUPTED
    finally:
        bar.close()
        remove_all(running)
        for _, log in procs:
            log.close()
    failed = [i for i, (p, _) in enumerate(procs) if p.returncode not in (0, INTERRUPTED)]
    for i in failed:
        print(f"worker {i} exited with {procs[i][0].returncode}; see {s.output_dir / f'worker-{i}.log'}",
              file=sys.stderr)
    # A worker lost to a signal (kill -9, the out-of-memory killer) whose trial another worker took over: the
    # study has its trials, and the search its result. A worker that failed on its own (a traceback) is an error.
    lost = [i for i in failed if procs[i][0].returncode < 0]
    if failed and (failed != lost or finished_count(study) < s.study.n_trials):
        return 1
    # Workers stopped by a signal this process did not get (pkill, a scheduler stopping processes one by one)
    # ended their part early: the study lacks trials, the search was interrupted, not finished.
    stopped = [i for i, (p, _) in enumerate(procs) if p.returncode == INTERRUPTED]
    if stopped and finished_count(study) < s.study.n_trials:
        print(f"interrupted: worker{'s' * (len(stopped) > 1)} {', '.join(map(str, stopped))} stopped by a signal; "
              f"run the same command{_in_this_sweep()} to resume", file=sys.stderr)
        return INTERRUPTED
    return 0


def load_worker_settings(config_path: str | Path) -> SearchSettings:
    from .settings import load_settings

    data = json.loads(Path(config_path).read_text())
    return load_settings(data["config"], data["output_dir"], typed_model=data.get("typed_model"))
