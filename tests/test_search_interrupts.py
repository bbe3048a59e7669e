"""Ctrl-C and SIGTERM at the awkward moments of a search (a second signal while the first is handled,
a trial being created, a trial's MLflow run being created), a space's error inside a trial, and the
study's parent run closed whatever ends the search.

Each signal is sent in-process at the exact point (a wrapped method sends it to this process), so
nothing here depends on timing. What every interrupt must leave: the trial failed with the reason
``interrupted`` and not counted, queued again (its ``reference`` flag kept), its MLflow run KILLED,
no trial RUNNING and no run RUNNING; the same command then finishes the study."""

from __future__ import annotations

import json
import os
import signal
import time
import weakref
from types import SimpleNamespace

import mlflow
import optuna
import pytest

import fulu_nas.search.objective as objective_module
from fulu_nas.cli import main
from fulu_nas.errors import FuluConfigError
from fulu_nas.search import study as study_module
from fulu_nas.search.space import SearchSpace
from fulu_nas.search.tracking import Tracker

from .test_search_e2e import load_study, mlflow_runs, run_search

pytestmark = pytest.mark.slow
TrialState = optuna.trial.TrialState
FAST = ("trainer.report_every=5", "study.pruner=none")


def _search(out, n_trials: int = 2, steps: int = 10) -> int:
    return run_search(out, f"study.n_trials={n_trials}", f"trainer.steps={steps}", *FAST)


def _runs(out) -> tuple[list, list]:
    _, parents, trials = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    return parents, trials


def _assert_stopped_cleanly(out, number: int, reference: bool, run_made: bool = True) -> None:
    """Trial ``number`` failed as interrupted and queued again; nothing left RUNNING."""
    study = load_study(out)
    states = {t.number: t.state.name for t in study.trials}
    assert not [n for n, s in states.items() if s == "RUNNING"], states
    stopped = study.trials[number]
    assert stopped.state == TrialState.FAIL, states
    assert stopped.user_attrs.get("fail_reason") == "interrupted" and stopped.user_attrs.get("not_counted"), \
        stopped.user_attrs
    assert bool(stopped.user_attrs.get("reference")) == reference
    queued = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [t.user_attrs.get("retry_of") for t in queued] == [number], [t.user_attrs for t in queued]
    assert bool(queued[0].user_attrs.get("reference")) == reference
    if reference:
        assert queued[0].system_attrs["fixed_params"] == study.trials[number].system_attrs["fixed_params"]
    parents, trials = _runs(out)
    assert [r.info.run_name for r in parents + trials if r.info.status == "RUNNING"] == []
    assert [(r.info.status, r.data.tags.get("fulu.state")) for r in parents] == [("KILLED", "incomplete")]
    mine = [r for r in trials if r.data.tags["fulu.trial"] == str(number)]
    if run_made:
        assert [(r.info.status, r.data.tags.get("fulu.state")) for r in mine] == [("KILLED", "interrupted")]
    else:
        assert mine == []


def _assert_resumes(out, n_trials: int = 2, steps: int = 10) -> None:
    assert _search(out, n_trials, steps) == 0
    study = load_study(out)
    assert not [t.number for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(objective_module.counts_toward_total(t) for t in study.trials) == n_trials
    assert any(t.user_attrs.get("reference") and t.state == TrialState.COMPLETE for t in study.trials)
    parents, trials = _runs(out)
    assert [r.info.run_name for r in parents + trials if r.info.status == "RUNNING"] == []
    assert [(r.info.status, r.data.tags.get("fulu.state")) for r in parents] == [("FINISHED", "complete")]


def _signal(signum: int = signal.SIGINT) -> None:
    os.kill(os.getpid(), signum)


# -- 1. a second signal while the first is handled ---------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_second_signal_while_the_first_is_handled_loses_nothing(signum, tmp_path, monkeypatch):
    """With study.n_workers>1, `timeout` or a scheduler signal the whole process group and the parent
    forwards SIGTERM too: each worker gets two. The second cut the handling of the first short: the
    trial (the reference) was neither given its reason nor queued again and its run stayed RUNNING."""
    sent: list[str] = []
    real_train, real_enqueue, real_end = (objective_module.train_architecture, optuna.Study.enqueue_trial,
                                          Tracker.end_trial)

    def train_architecture(arch, s, cfg, on_report, kernels):
        def report(r):
            on_report(r)
            if r.step == 5 and not sent:
                sent.append("first")
                _signal(signum)  # mid-training of trial 0
        return real_train(arch, s, cfg, report, kernels)

    def enqueue_trial(self, *args, **kwargs):
        if sent == ["first"]:
            sent.append("second")
            _signal(signum)  # while the trial is queued again
        return real_enqueue(self, *args, **kwargs)

    def end_trial(self, run_id, status, tags=None):
        if sent == ["first", "second"]:
            sent.append("third")
            _signal(signum)  # while its run is ended
        return real_end(self, run_id, status, tags)

    monkeypatch.setattr(objective_module, "train_architecture", train_architecture)
    monkeypatch.setattr(optuna.Study, "enqueue_trial", enqueue_trial)
    monkeypatch.setattr(Tracker, "end_trial", end_trial)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert _search(out) == 130
    assert sent == ["first", "second", "third"]
    _assert_stopped_cleanly(out, 0, reference=True)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    _assert_resumes(out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_handled_inside_a_finaliser_still_stops_the_trial(signum, tmp_path, monkeypatch, capsys):
    """A signal handled while a weakref callback runs (SQLAlchemy's class registry runs one whenever the
    garbage collector frees a mapped class): Python ignored the KeyboardInterrupt there, printing its
    traceback, and the search, already stopping, ignored the signals after it: it trained to the end and
    exited 0. The interrupt is raised at the trial's next training report instead."""
    real_train = objective_module.train_architecture
    steps: list[int] = []

    class Collected:
        pass

    def train_architecture(arch, s, cfg, on_report, kernels):
        def report(r):
            steps.append(r.step)
            on_report(r)
            if r.step == 5:
                doomed = Collected()
                keep = weakref.ref(doomed, lambda _: _signal(signum))  # handled inside the callback
                del doomed
                assert keep() is None
                _signal(signum)  # a second signal (the process group's): ignored, the search is stopping
        return real_train(arch, s, cfg, report, kernels)

    monkeypatch.setattr(objective_module, "train_architecture", train_architecture)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert _search(out, steps=40) == 130
    assert steps == [5, 10], steps  # stopped at the next report, not at step 40
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    _assert_stopped_cleanly(out, 0, reference=True)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    _assert_resumes(out, steps=40)


# -- 2. a trial being created --------------------------------------------------------------------------
@pytest.mark.parametrize("where,number", [("ask", 0), ("ask", 1), ("heartbeat", 1)])
def test_ctrl_c_as_optuna_creates_a_trial_fails_and_queues_it(where, number, tmp_path, monkeypatch):
    """Ctrl-C inside study.ask, or before the trial's heartbeat exists, left the trial RUNNING with
    no heartbeat: no worker ever failed it, and the same command then waited for it forever."""
    sent: list[int] = []
    if where == "ask":
        real_ask = optuna.Study.ask

        def ask(self, *args, **kwargs):
            trial = real_ask(self, *args, **kwargs)
            if trial.number == number and not sent:
                sent.append(number)
                _signal()
            return trial

        monkeypatch.setattr(optuna.Study, "ask", ask)
    else:
        import optuna.study._optimize as optimize

        real_heartbeat = optimize.get_heartbeat_thread
        asked: list[int] = []

        def get_heartbeat_thread(trial_id, storage):
            asked.append(trial_id)
            if len(asked) == number + 1 and not sent:
                sent.append(number)
                _signal()
            return real_heartbeat(trial_id, storage)

        monkeypatch.setattr(optimize, "get_heartbeat_thread", get_heartbeat_thread)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert _search(out) == 130
    assert sent == [number]
    _assert_stopped_cleanly(out, number, reference=number == 0, run_made=False)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    _assert_resumes(out)



@pytest.mark.parametrize("number", [0, 1])
def test_a_signal_as_optuna_records_a_trials_result_ends_the_search_with_the_result_kept(number, tmp_path,
                                                                                       monkeypatch, capsys):
    """A signal inside Optuna's tell (after the objective returned, as the result is written) came out of
    its trial loop as UnboundLocalError: the worker died with a traceback, its trial left RUNNING."""
    import optuna.study._optimize as optimize

    real_tell = optimize._tell_with_warning
    sent: list[int] = []

    def tell(study, trial, *args, **kwargs):
        if trial.number == number and not sent:
            sent.append(number)
            _signal()
        return real_tell(study, trial, *args, **kwargs)

    monkeypatch.setattr(optimize, "_tell_with_warning", tell)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert _search(out, n_trials=3) == 130
    assert sent == [number] and "Traceback" not in capsys.readouterr().err
    study = load_study(out)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * (number + 1)  # the result, written whole
    parents, trials = _runs(out)
    assert [r.info.run_name for r in parents + trials if r.info.status == "RUNNING"] == []
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    _assert_resumes(out, n_trials=3)


@pytest.mark.parametrize("where", ["hand-off", "cleanup"])
def test_a_signal_once_a_trial_has_its_result_keeps_the_result(where, tmp_path, monkeypatch, capsys):
    """A signal as the trained trial handed its run to the background upload, or as it freed its memory,
    failed the trial as interrupted and queued it again, while its MLflow run ended FINISHED with its
    metrics: the study and MLflow disagreed, and the resume trained the architecture again."""
    import gc
    import types

    from fulu_nas.search.tracking import Tracker

    sent: list[str] = []

    def signal_once():
        if not sent:
            sent.append(where)
            _signal()

    if where == "hand-off":
        real_finish = Tracker.finish_trial_in_background

        def finish_trial_in_background(self, *args, **kwargs):
            signal_once()
            return real_finish(self, *args, **kwargs)

        monkeypatch.setattr(Tracker, "finish_trial_in_background", finish_trial_in_background)
    else:
        def collect(*args):
            signal_once()
            return gc.collect(*args)

        monkeypatch.setattr(objective_module, "gc", types.SimpleNamespace(collect=collect))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert _search(out) == 130
    assert sent == [where]
    study = load_study(out)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]  # kept, not queued again
    parents, trials = _runs(out)
    assert [(r.info.status, r.data.tags.get("fulu.trial")) for r in trials] == [("FINISHED", "0")]
    assert [r.info.run_name for r in parents + trials if r.info.status == "RUNNING"] == []
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    _assert_resumes(out)
    assert len(load_study(out).trials) == 2  # only the missing trial was trained

@pytest.mark.parametrize("outcome", ["reused", "failed", "pruned"])
def test_a_signal_once_a_trials_run_has_ended_keeps_the_trials_outcome(outcome, tmp_path, monkeypatch):
    """A signal after a trial's MLflow run was ended with its outcome (a reused result's FINISHED, a failed
    trial's FAILED with its reason, a pruned trial's KILLED) failed the trial as interrupted and queued it
    again: the study lost the reason (a diverged trial trained again) and disagreed with MLflow."""
    import gc
    import types

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    sent: list[str] = []

    def signal_once(*args):
        if not sent:
            sent.append(outcome)
            _signal()

    if outcome == "reused":
        assert _search(out, n_trials=1) == 0
        load_study(out).enqueue_trial(load_study(out).trials[0].params)  # the reference again: reused
        real_record = objective_module.record_metrics

        def record_metrics(*args):
            signal_once()  # the reused result's run has just ended FINISHED
            return real_record(*args)

        monkeypatch.setattr(objective_module, "record_metrics", record_metrics)
        overrides = FAST
    else:
        real_train = objective_module.train_architecture
        trained: list[int] = []

        def train_architecture(arch, s, train, on_report, kernels):
            trained.append(1)
            if outcome == "failed" and len(trained) == 2:  # the trial after the reference
                raise RuntimeError("boom")
            return real_train(arch, s, train, on_report, kernels)

        def collect(*args):
            if failed_or_pruned():
                signal_once()  # the trial's run has just ended FAILED or KILLED
            return gc.collect(*args)

        def failed_or_pruned():
            return any(t.state == TrialState.RUNNING and t.number == 1 for t in load_study(out).trials)

        monkeypatch.setattr(objective_module, "train_architecture", train_architecture)
        monkeypatch.setattr(objective_module, "gc", types.SimpleNamespace(collect=collect))
        monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda trial: outcome == "pruned" and trial.number == 1)
        overrides = ("trainer.report_every=5", "study.pruner=median" if outcome == "pruned" else "study.pruner=none")
    # a third trial to go: a signal as the study's last trial ends leaves a finished search (exit 0)
    assert run_search(out, "study.n_trials=3", "trainer.steps=10", *overrides) == 130
    assert sent == [outcome]
    study = load_study(out)
    expected = {"reused": TrialState.COMPLETE, "failed": TrialState.FAIL, "pruned": TrialState.PRUNED}[outcome]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, expected]  # kept, nothing queued again
    if outcome == "failed":
        assert study.trials[1].user_attrs["fail_reason"] == "RuntimeError: boom"
    parents, trials = _runs(out)
    status = {"reused": "FINISHED", "failed": "FAILED", "pruned": "KILLED"}[outcome]
    assert sorted((r.data.tags["fulu.trial"], r.info.status) for r in trials) == [("0", "FINISHED"), ("1", status)]
    assert [r.info.run_name for r in parents + trials if r.info.status == "RUNNING"] == []


# -- 3. a trial's MLflow run being created, or its architecture sampled --------------------------------
@pytest.mark.parametrize("where,number", [("start_trial", 0), ("sample", 1)])
def test_ctrl_c_before_a_trial_trains_fails_and_queues_it(where, number, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the trial's MLflow run was created (deferred to the end of that write, outside the
    objective's try) failed the trial with no reason: never queued again (the reference lost for
    good), its run left RUNNING."""
    sent: list[int] = []
    if where == "start_trial":
        real_create = mlflow.MlflowClient.create_run

        def create_run(self, *args, run_name=None, **kwargs):
            run = real_create(self, *args, run_name=run_name, **kwargs)
            if run_name == f"trial {number}" and not sent:
                sent.append(number)
                _signal()  # inside Tracker.start_trial's write: raised as it returns
            return run

        monkeypatch.setattr(mlflow.MlflowClient, "create_run", create_run)
    else:
        real_sample = SearchSpace.sample

        def sample(self, trial):
            values = real_sample(self, trial)
            if isinstance(trial, optuna.Trial) and trial.number == number and not sent:
                sent.append(number)
                _signal()
            return values

        monkeypatch.setattr(SearchSpace, "sample", sample)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert _search(out) == 130
    assert sent == [number]
    _assert_stopped_cleanly(out, number, reference=number == 0, run_made=where == "start_trial")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    _assert_resumes(out)
    # the dashboard's console line counts trials as the search does: the interrupted attempt is no trial
    # ("2 complete of 3 trials")
    capsys.readouterr()
    page = tmp_path / "page.html"
    assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={out}", f"out={page}"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"dashboard: {page}  (2 complete; layout default)"


# -- 4. a space's error inside a trial -------------------------------------------------------------------
def test_a_space_error_in_a_trial_fails_that_trial_and_the_study_goes_on(tmp_path, monkeypatch):
    """A derived expression that cannot be computed for one sample (64 // (num_experts - 5) at 5) raised
    FuluConfigError inside the trial: the search stopped with exit 2, its parent run left RUNNING and
    no summary."""
    real_sample = SearchSpace.sample
    message = ("search_space.derived.expert_ffn_size: cannot be computed for {'num_experts': 5} "
               "(ZeroDivisionError: integer division or modulo by zero)")

    def sample(self, trial):
        values = real_sample(self, trial)
        if isinstance(trial, optuna.Trial) and trial.number == 1:
            raise FuluConfigError(message)
        return values

    monkeypatch.setattr(SearchSpace, "sample", sample)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert _search(out, 3) == 0
    study = load_study(out)
    failed = study.trials[1]
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"] == message
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_failed"] == 1 and summary["n_finished"] == 3
    parents, trials = _runs(out)
    assert [r.info.run_name for r in parents + trials if r.info.status == "RUNNING"] == []
    assert [(r.info.status, r.data.tags.get("fulu.state")) for r in parents] == [("FINISHED", "complete")]
    assert "trial 1 failed: search_space.derived" in (out / "search.log").read_text()


def test_the_parent_run_is_closed_whatever_ends_the_search(tmp_path, monkeypatch):
    """An error that ends the search (here, a bug after trial 0) must not leave the study's parent run
    RUNNING: it ends FAILED with the error, and the summary so far is written."""
    real_describe = study_module.describe_trial

    def describe_trial(t, s):
        if t.number == 1:
            raise RuntimeError("a bug after trial 1")
        return real_describe(t, s)

    monkeypatch.setattr(study_module, "describe_trial", describe_trial)
    monkeypatch.chdir(tmp_path)
    # Hydra re-raises a job's error under a tracer (coverage, a debugger) and exits 1 elsewhere: the same
    # here whatever runs the test
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="a bug after trial 1"):
        _search(out, 3)
    parents, trials = _runs(out)
    assert [r.info.run_name for r in parents + trials if r.info.status == "RUNNING"] == []
    [parent] = parents
    assert (parent.info.status, parent.data.tags.get("fulu.state")) == ("FAILED", "incomplete")
    assert "RuntimeError: a bug after trial 1" in parent.data.tags["fulu.reason"]
    assert json.loads((out / "summary.json").read_text())["n_finished"] == 2


# -- the console's verdict on a study stopped after its reference ------------------------------------------
def test_a_search_stopped_after_its_reference_says_nothing_else_was_trained(tmp_path, monkeypatch, capsys):
    """"no other architecture beat it" of a search interrupted after the reference alone, which nothing
    else had been trained to beat."""
    real_ask = optuna.Study.ask

    def ask(self, *args, **kwargs):
        trial = real_ask(self, *args, **kwargs)
        if trial.number == 1:
            _signal()
        return trial

    monkeypatch.setattr(optuna.Study, "ask", ask)
    monkeypatch.chdir(tmp_path)
    assert _search(tmp_path / "out", 3) == 130
    printed = " ".join(capsys.readouterr().out.split())
    assert "beat it" not in printed
    assert "no other architecture has been trained yet" in printed


# -- a worker killed as Optuna created its trial -----------------------------------------------------------
def test_a_trial_left_without_a_heartbeat_is_failed_and_trained_again(tmp_path, monkeypatch):
    """A worker killed (SIGKILL) in the instant Optuna created its trial left it RUNNING without a
    heartbeat; Optuna's check fails only trials with one, so the same command resumed waited for it
    forever. It is now failed as stale and queued again, and the resumed search finishes the study."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    beat = ("study.heartbeat_interval=1", "study.grace_period=2")
    assert run_search(out, "study.n_trials=1", "trainer.steps=10", *FAST, *beat) == 0
    orphan = load_study(out).ask()  # no heartbeat: what the killed worker left
    sleeps: list[float] = []

    def sleep(seconds):  # the test fails, rather than hangs, where the wait never ends
        sleeps.append(seconds)
        assert len(sleeps) < 60, "the resumed search still waits for the trial without a heartbeat"
        time.sleep(seconds)

    monkeypatch.setattr(study_module, "time", SimpleNamespace(sleep=sleep))
    assert run_search(out, "study.n_trials=2", "trainer.steps=10", *FAST, *beat) == 0
    study = load_study(out)
    retried = optuna.storages.RetryFailedTrialCallback.retried_trial_number
    states = [(t.number, t.state.name, retried(t)) for t in study.trials]
    assert states == [(0, "COMPLETE", None), (orphan.number, "FAIL", None), (2, "COMPLETE", orphan.number)], states
    parents, trials = _runs(out)
    assert [r.info.run_name for r in parents + trials if r.info.status == "RUNNING"] == []


@pytest.mark.parametrize("command", ["search", "confirm", "export"])
def test_a_signal_while_stopping_says_what_that_command_is_doing(command, capfd):
    """Every command stopping on a signal said the search's words to a second one: "the running trial
    is being failed and queued again", of a confirmation or an export too."""
    import signal

    from fulu_nas.search import interrupts
    from fulu_nas.search.confirm import CONFIRM_STOPPING
    from fulu_nas.search.export_trial import EXPORT_STOPPING
    from fulu_nas.search.study import stop_signals_as_interrupt

    words = {"search": interrupts.SEARCH_STOPPING, "confirm": CONFIRM_STOPPING, "export": EXPORT_STOPPING}[command]
    assert "trial is being failed and queued again" in words if command == "search" else "trial" not in words
    with stop_signals_as_interrupt(words):
        interrupts.ignore_signals()  # as after the first signal
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
    assert capfd.readouterr().err == f"already stopping: {words}; wait for it\n"


# -- a signal after the study's last trial -----------------------------------------------------------------
@pytest.mark.parametrize("where", ["last trial told", "uploads"])
def test_a_signal_after_the_last_trial_is_no_interrupted_trial(where, tmp_path, monkeypatch, capsys):
    """Ctrl-C as the search left its loop after the last trial, or waited for the last uploads, printed
    "the running trial was failed and queued again" and exited 130, with no trial running and the study
    complete."""
    sent: list[str] = []
    if where == "uploads":
        real_wait = Tracker.wait_for_uploads

        def wait_for_uploads(self):
            if not sent:
                sent.append(where)
                _signal()
            return real_wait(self)

        monkeypatch.setattr(Tracker, "wait_for_uploads", wait_for_uploads)
    else:
        real_describe = study_module.describe_trial

        def describe_trial(t, s):
            if t.number == 1 and not sent:
                sent.append(where)
                _signal()
            return real_describe(t, s)

        monkeypatch.setattr(study_module, "describe_trial", describe_trial)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert _search(out) == 0
    assert sent == [where]
    _assert_ended_complete(out, capsys.readouterr().err)


def _assert_ended_complete(out, err: str) -> None:
    """A signal after the study's last trial: said so, nothing interrupted, every trial and run finished."""
    assert "stopped after the study's last trial: the study is complete" in err and "interrupted" not in err, err
    study = load_study(out)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    parents, trials = _runs(out)
    assert [(r.info.status, r.data.tags.get("fulu.state")) for r in parents] == [("FINISHED", "complete")]
    assert [r.info.status for r in trials] == ["FINISHED"] * 2


def _signal_at_report(monkeypatch, nth: int, signum: int = signal.SIGINT) -> list[int]:
    """The parent of the workers sends ``signum`` to itself as it tells the ``nth`` finished trial; returns
    the numbers of the trials it told."""
    told: list[int] = []
    real_report = study_module._report

    def report(bar, t, s):
        real_report(bar, t, s)
        told.append(t.number)
        if len(told) == nth:
            _signal(signum)

    monkeypatch.setattr(study_module, "_report", report)
    return told


def test_a_signal_to_the_workers_parent_after_the_last_trial_is_no_interrupted_search(tmp_path, monkeypatch,
                                                                                       capsys):
    """With workers, Ctrl-C that reached the parent once it had told the study's last trial (the workers
    ending their part) exited 130, printing nothing, with the study complete and every run finished."""
    told = _signal_at_report(monkeypatch, 2)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code = run_search(out, "study.n_trials=2", "trainer.steps=10", "study.n_workers=2", *FAST)
    assert sorted(told) == [0, 1]
    err = capsys.readouterr().err
    assert code == 0, err
    _assert_ended_complete(out, err)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_to_the_workers_parent_alone_stops_the_workers_and_the_study_resumes(tmp_path, monkeypatch,
                                                                                    capsys, signum):
    """SIGTERM or SIGINT to the parent of two workers alone (``docker stop``, ``kill PID``, ``kill -INT PID``)
    mid-search: passed on to the workers, whose running trials are failed and queued again; the parent says so
    and exits 130, and the same command finishes the study. A SIGINT was not passed on: the workers ran the
    whole study."""
    told = _signal_at_report(monkeypatch, 1, signum)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    workers = ("study.n_workers=2", *FAST)
    assert run_search(out, "study.n_trials=6", "trainer.steps=10", *workers) == 130
    assert "interrupted: run the same command to resume" in capsys.readouterr().err
    study = load_study(out)
    assert not [t.number for t in study.trials if t.state == TrialState.RUNNING]
    assert sum(objective_module.counts_toward_total(t) for t in study.trials) < 6
    parents, trials = _runs(out)
    assert [r.info.run_name for r in parents + trials if r.info.status == "RUNNING"] == []
    # Every trial that ended is told, those ended since the parent's last look and as the workers stopped too
    # (a trial that completed just before the signal had no line, on the console or in any log).
    ended = {t.number for t in study.trials if t.state.is_finished()}
    assert sorted(told) == sorted(ended), (told, ended)
    logs = [(out / f"worker-{i}.log").read_text() for i in range(2)]
    # The same command tells the trials it runs, not again those of the run before (it replayed them all).
    told = _signal_at_report(monkeypatch, 0)
    assert run_search(out, "study.n_trials=6", "trainer.steps=10", *workers) == 0
    study = load_study(out)
    assert sum(objective_module.counts_toward_total(t) for t in study.trials) == 6
    assert not [t.number for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sorted(told) == sorted(t.number for t in study.trials if t.number not in ended and not
                                  t.user_attrs.get("fail_reason", "").startswith("surplus")), told
    # each worker's log still says what it stopped (the same command emptied the logs)
    assert all((out / f"worker-{i}.log").read_text().startswith(logs[i]) for i in range(2))


def test_workers_stopped_by_a_signal_the_parent_did_not_get_leave_an_interrupted_search(tmp_path, monkeypatch,
                                                                                        capsys):
    """SIGTERM to the worker processes alone (``pkill -f fulu_nas.search.worker``, an administrator, a
    scheduler that stops processes one by one): each exits 130 with its running trial queued again, and the
    parent counted 130 as a worker that ended its part: the search exited 0 with 1 of 8 trials done."""
    import subprocess

    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    class RecordedPopen(real_popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(subprocess, "Popen", RecordedPopen)
    real_report = study_module._report

    def report(bar, t, s):
        real_report(bar, t, s)
        for worker in started:
            if worker.poll() is None and worker not in signalled:  # once each, as pkill does
                signalled.append(worker)
                worker.send_signal(signal.SIGTERM)

    signalled: list[subprocess.Popen] = []

    monkeypatch.setattr(study_module, "_report", report)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    workers = ("study.n_workers=2", *FAST)
    assert run_search(out, "study.n_trials=8", "trainer.steps=10", *workers) == 130
    assert [w.returncode for w in started] == [130, 130]
    assert "interrupted: workers 0, 1 stopped by a signal; run the same command to resume" in capsys.readouterr().err
    assert sum(objective_module.counts_toward_total(t) for t in load_study(out).trials) < 8


def test_ctrl_c_while_mlflow_makes_its_tables_leaves_a_database_the_same_command_opens(tmp_path, monkeypatch,
                                                                                       capsys):
    """A first search interrupted while MLflow migrated its new database (alembic's steps, not one
    transaction on SQLite) left it half-migrated, and every run of the same command after it failed with
    "duplicate column name" or "table ... already exists". The migration is one block of writes: the
    interrupt comes when it is done."""
    import signal

    import sqlalchemy

    from fulu_nas.search.study import stop_signals_as_interrupt
    from fulu_nas.search.tracking import open_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    statements = {"n": 0}
    execute = sqlalchemy.engine.Connection.execute

    def counting(self, *args, **kwargs):
        statements["n"] += 1
        if statements["n"] == 80:  # inside the migration (at this point it left "table datasets already exists")
            signal.raise_signal(signal.SIGINT)
        return execute(self, *args, **kwargs)

    monkeypatch.setattr(sqlalchemy.engine.Connection, "execute", counting)
    with stop_signals_as_interrupt(), pytest.raises(KeyboardInterrupt):
        open_experiment(uri, "fulu-nas", None)
    assert statements["n"] > 80  # the migration went on to its end
    monkeypatch.setattr(sqlalchemy.engine.Connection, "execute", execute)
    client, experiment_id = open_experiment(uri, "fulu-nas", None)
    assert client.get_experiment(experiment_id).name == "fulu-nas"

    # A database left half-made all the same (a kill -9 or a power cut there, or made before) is one message
    # naming it, exit 2: every search of the study printed SQLAlchemy's traceback and exited 1.
    out = tmp_path / "out"
    out.mkdir()
    statements["n"] = 0
    monkeypatch.setattr(sqlalchemy.engine.Connection, "execute", counting)
    with pytest.raises(KeyboardInterrupt):  # no handler deferring it: the migration stops in the middle
        open_experiment(f"sqlite:///{out / 'mlflow.db'}", "fulu-nas", None)
    monkeypatch.setattr(sqlalchemy.engine.Connection, "execute", execute)
    capsys.readouterr()
    assert run_search(out, "study.n_trials=1") == 2
    printed = capsys.readouterr()
    assert printed.err.startswith(f"error: tracking.uri: MLflow cannot open its database {out / 'mlflow.db'}: "), \
        printed.err
    assert printed.err.count("\n") == 1 and "Traceback" not in printed.err and "warning" not in printed.err


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_the_workers_of_a_search_killed_hard_stop_as_at_ctrl_c(tmp_path):
    """`kill -9` of a search with study.n_workers=2 left its workers running on (their parent gone): the
    same command then ran its own two beside them, three or four workers on one study, both generations
    writing worker-0.log. The workers now stop with their parent, each as at Ctrl-C: the running trial
    failed (and queued again for the same command), its run ended."""
    import subprocess

    from .test_search_e2e import _cli

    out = tmp_path / "out"
    args = _cli("search", "+experiment=tiny", f"hydra.run.dir={out}", "study.n_trials=3", "study.n_workers=2",
                "trainer.steps=2000", "trainer.max_seconds=600", *FAST)
    search = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        reports = [out / f".worker-{i}.progress.json" for i in range(2)]
        deadline = time.time() + 300
        while time.time() < deadline and not all(r.exists() for r in reports) and search.poll() is None:
            time.sleep(0.5)
        assert all(r.exists() for r in reports), "the workers did not start training"
        with open(f"/proc/{search.pid}/task/{search.pid}/children") as f:
            workers = [int(pid) for pid in f.read().split()]
        assert len(workers) == 2
        search.send_signal(signal.SIGKILL)
        search.wait()
        deadline = time.time() + 120
        while time.time() < deadline and any(map(_alive, workers)):
            time.sleep(0.5)
        assert not any(map(_alive, workers)), "the workers ran on without their search"
    finally:
        if search.poll() is None:
            search.kill()
    study = load_study(out)
    stopped = [t for t in study.trials if t.state == TrialState.FAIL]
    assert not [t.number for t in study.trials if t.state == TrialState.RUNNING]
    assert len(stopped) == 2 and {t.user_attrs.get("fail_reason") for t in stopped} == {"interrupted"}
    _, trial_runs = _runs(out)
    assert {r.info.status for r in trial_runs} == {"KILLED"}  # ended by their workers, not left open


# -- 7. before the search's own handlers: its checks, Hydra's set-up, the study's opening ----------------
# A search in a child process that sends itself SIGTERM as it calls one of its first steps, then calls it.
SIGNALLED_SEARCH = """
import os, signal, sys
import {module} as module
step = module.{attribute}
def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return step(*args, **kwargs)
module.{attribute} = signalled
from fulu_nas.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("module, attribute", [("fulu_nas.search.settings", "load_settings"),
                                               ("fulu_nas.search.app", "_job"),
                                               ("fulu_nas.search.study", "open_study")],
                         ids=["checks", "hydra-job", "opening"])
def test_sigterm_before_the_search_s_own_handlers_is_a_ctrl_c(module, attribute, tmp_path):
    """SIGTERM (docker stop, a scheduler) in a search's first seconds ended it by SIGTERM's default action: no
    word, exit 143, the output folder half made (.hydra/, an optuna.db with no study, an empty search.log).
    It is a Ctrl-C there too ("interrupted", 130), after the study's opening writes where it arrives inside
    them; the same command then runs the search."""
    import subprocess
    import sys

    out = tmp_path / "out"
    command = ["search", "+experiment=tiny", f"hydra.run.dir={out}", "study.n_trials=1", "trainer.steps=10", *FAST]
    child = subprocess.run([sys.executable, "-c", SIGNALLED_SEARCH.format(module=module, attribute=attribute),
                            *command], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert child.returncode == 130 and child.stderr.strip().splitlines()[-1] == "interrupted", \
        (child.returncode, child.stderr)
    assert "Traceback" not in child.stderr and child.stdout == "", child
    if attribute == "open_study":  # held to the end of the opening: the study and its settings are whole
        assert [t.state for t in load_study(out).trials] == [TrialState.WAITING]  # the reference, queued
        assert json.loads((out / "search_config.json").read_text())["config"]
    else:
        assert not (out / "optuna.db").exists()
    assert main(command) == 0
    assert [t.state for t in load_study(out).trials] == [TrialState.COMPLETE]
