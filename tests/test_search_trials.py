"""How trials end: failures with reasons (out of memory, divergence) while the study goes on,
Ctrl-C, the samplers, multi-objective Pareto fronts, constraints, and the MLflow UI command."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import mlflow
import optuna
import pytest
import torch

import fulu_nas.search.objective as objective_module
from fulu_nas.cli import main
from fulu_nas.training.train import TrainingDiverged

from .helpers import free_port
from .test_search_e2e import _cli, load_study, mlflow_runs, run_search

pytestmark = pytest.mark.slow
TrialState = optuna.trial.TrialState


@pytest.mark.parametrize("error,reason", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out of memory"),
    (TrainingDiverged(12, float("nan"), "not finite"), "diverged: training diverged at step 12"),
])
def test_a_failing_trial_records_its_reason_and_the_study_goes_on(error, reason, tmp_path, monkeypatch):
    real_train = objective_module.train
    calls = []

    def flaky_train(model, task, cfg, callback=None):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real_train(model, task, cfg, callback)

    monkeypatch.setattr(objective_module, "train", flaky_train)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=3", "study.pruner=none") == 0
    study = load_study(out)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"].startswith(reason)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_failed"] == 1 and summary["n_finished"] == 3


def test_a_non_finite_objective_fails_its_trial_with_a_reason_and_counts(tmp_path, monkeypatch):
    """Optuna failed a trial whose objective was NaN itself, without a reason: the trial did not count
    toward n_trials (the study trained on and on) and its MLflow run said FINISHED."""
    real_cost = objective_module.measure_trial_cost
    calls = []

    def nan_latency(*args, **kwargs):
        cost, metrics = real_cost(*args, **kwargs)
        calls.append(1)
        return cost, {**metrics, "latency_ms": float("nan")} if len(calls) == 2 else metrics

    monkeypatch.setattr(objective_module, "measure_trial_cost", nan_latency)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=3", "study.pruner=none", "study.objectives=[latency_ms]") == 0
    study = load_study(out)
    assert len(study.trials) == 3
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"] == "latency_ms is not finite (nan)"
    _, _, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    statuses = {int(r.data.tags["fulu.trial"]): r.info.status for r in runs}
    assert statuses[failed[0].number] == "FAILED"


def test_a_trials_weights_upload_while_the_next_trial_trains(tmp_path, monkeypatch):
    """A trial returns its objective before its artifacts are written: the upload runs in the background
    and its run ends FINISHED once the weights are stored; the search ends every run before it exits."""
    import threading

    from fulu_nas.search.tracking import Tracker

    out = tmp_path / "out"
    real_log_files, real_train = Tracker.log_files, objective_module.train
    released = threading.Event()
    first_run_while_trial_1_trains = []

    def held_log_files(self, run_id, files, weights=None):
        released.wait(60)  # trial 0's upload is held until trial 1 trains
        return real_log_files(self, run_id, files, weights)

    def train(model, task, cfg, callback=None):
        if trained:
            _, _, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
            first_run_while_trial_1_trains.extend(r.info.status for r in runs if r.data.tags["fulu.trial"] == "0")
            released.set()
        trained.append(1)
        return real_train(model, task, cfg, callback)

    trained = []
    monkeypatch.setattr(objective_module, "train", train)
    monkeypatch.setattr(Tracker, "log_files", held_log_files)
    monkeypatch.chdir(tmp_path)
    assert run_search(out, "study.n_trials=2", "study.pruner=none") == 0
    assert first_run_while_trial_1_trains == ["RUNNING"]  # complete in Optuna, its weights still uploading
    client, _, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    for r in runs:
        assert {"model.safetensors", "arch.yaml", "cost.json"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
        assert r.data.metrics["upload_s"] >= 0


def test_a_failed_upload_fails_the_run_with_its_reason_and_export_says_so(tmp_path, monkeypatch, capsys):
    from fulu_nas.search.tracking import Tracker

    def broken(self, run_id, files, weights=None):
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(Tracker, "log_files", broken)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=2", "study.pruner=none") == 0
    assert sum(t.state == TrialState.COMPLETE for t in load_study(out).trials) == 2  # the objectives stand
    _, _, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"]
    assert {r.data.tags["fulu.reason"] for r in runs} == {"artifact upload failed: OSError: artifact store unreachable"}
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["export", "study.name=tiny-clusters", f"hydra.run.dir={out}", f"out={tmp_path / 'model'}"]) == 2
    said = capsys.readouterr()
    assert "no saved weights" in said.err
    assert "exporting trial" not in said.out  # the refusal is the one message
    assert not (tmp_path / "model").exists()
    client, _, _ = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    for r in runs:  # as while the search is still uploading
        client.update_run(r.info.run_id, "RUNNING")
    assert main(["export", "study.name=tiny-clusters", f"hydra.run.dir={out}", f"out={tmp_path / 'model'}"]) == 2
    assert "still being uploaded" in capsys.readouterr().err


@pytest.mark.parametrize("resumed_with", [(), ("study.n_workers=2",)], ids=["one-process", "workers"])
def test_a_run_left_open_by_a_killed_uploader_is_closed_when_the_study_resumes(resumed_with, tmp_path, monkeypatch,
                                                                               capsys):
    """... and the console says so: the trial (the best one, perhaps) may have no weights, which only the
    export found out. With workers the search's own process says it (a worker's output is its log)."""
    import socket

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=3", "study.pruner=none") == 0
    client, _, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    workers = {"0": f"{host}:{dead.pid}", "1": f"{host}:{os.getpid()}", "2": f"elsewhere:{dead.pid}"}
    for r in runs:  # as a killed worker left them: trial complete, run still open
        client.update_run(r.info.run_id, "RUNNING")
        client.set_tag(r.info.run_id, "fulu.worker", workers[r.data.tags["fulu.trial"]])
    capsys.readouterr()
    assert run_search(out, "study.n_trials=3", "study.pruner=none", *resumed_with) == 0  # nothing left to run
    said = capsys.readouterr()
    assert ("trial 0: its worker stopped while uploading the trial's artifacts; the weights may be missing "
            "(fulu-nas export retrain=true trains them again)") in said.out + said.err
    assert "trial 1:" not in said.out + said.err
    _, _, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    status = {r.data.tags["fulu.trial"]: r.info.status for r in runs}
    assert status == {"0": "KILLED", "1": "RUNNING", "2": "RUNNING"}  # a live process's, another host's: left
    killed = next(r for r in runs if r.data.tags["fulu.trial"] == "0")
    assert "uploading" in killed.data.tags["fulu.reason"]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_fails_the_running_trial_and_the_study_resumes(stop, tmp_path):
    """SIGTERM (timeout, docker stop, a scheduler) as Ctrl-C: it left the trial and its runs RUNNING."""
    out = tmp_path / "out"
    steps = 1000  # long enough that the trial seen running is still running when the signal lands
    args = _cli("search", "+experiment=tiny", f"hydra.run.dir={out}", "study.n_trials=2", "study.pruner=none",
                "trainer.max_seconds=null", f"trainer.steps={steps}")
    # SIGINT as a terminal delivers it: a test run started in the background (a shell without job
    # control) would otherwise pass on an ignored SIGINT, and the search would never see the signal.
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    storage = f"sqlite:///{out / 'optuna.db'}"
    interrupted = None
    deadline = time.time() + 120
    while time.time() < deadline and interrupted is None and proc.poll() is None:
        time.sleep(0.2)
        # Read-only SQL: Optuna's load_study on a database the search is still creating races it to
        # create the schema (and the search then fails on alembic_version).
        try:
            with contextlib.closing(sqlite3.connect(f"file:{out / 'optuna.db'}?mode=ro", uri=True)) as db:
                running = db.execute(
                    "SELECT t.number FROM trials t JOIN trial_intermediate_values v ON v.trial_id = t.trial_id "
                    "WHERE t.state = 'RUNNING' GROUP BY t.trial_id HAVING MAX(v.step) <= ?", (steps // 4,)).fetchall()
        except sqlite3.Error:
            continue
        if running:
            proc.send_signal(stop)
            interrupted = running[0][0]
    _, err = proc.communicate(timeout=120)
    assert interrupted is not None, err[-3000:]
    assert proc.returncode == 130, err
    assert "run the same command to resume" in err
    study = optuna.load_study(study_name="tiny-clusters", storage=storage)
    stopped = study.trials[interrupted]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "interrupted"
    queued = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(queued) == 1 and queued[0].system_attrs["fixed_params"] == stopped.params
    _, parents, trial_runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    assert not [r.info.run_name for r in parents + trial_runs if r.info.status == "RUNNING"]
    assert [(r.info.status, r.data.tags["fulu.state"]) for r in parents] == [("KILLED", "incomplete")]
    [killed] = [r for r in trial_runs if r.data.tags["fulu.trial"] == str(interrupted)]
    assert killed.info.status == "KILLED" and killed.data.tags.get("fulu.reason", "").startswith("interrupted"), \
        killed.data.tags

    resumed = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0
    study = optuna.load_study(study_name="tiny-clusters", storage=storage)
    _, parents, _ = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    assert [(r.info.status, r.data.tags["fulu.state"]) for r in parents] == [("FINISHED", "complete")]
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 2
    assert any(t.user_attrs.get("retry_of") == interrupted and t.state == TrialState.COMPLETE for t in study.trials)


@pytest.mark.parametrize("sampler", ["nsga2", "random", "grid", "gp"])
def test_every_sampler_runs_a_study(sampler, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, f"study.sampler={sampler}", "study.n_trials=3", "study.pruner=none",
                      f"study.name=tiny-{sampler}") == 0
    study = load_study(out, f"tiny-{sampler}")
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 3


def test_hyperband_pruner_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.pruner=hyperband", "study.n_trials=4") == 0
    study = load_study(out)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 4


def test_multi_objective_study_reports_the_pareto_front(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study=multi_objective", "study.n_trials=4") == 0
    assert "Pareto front" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objectives"] == ["loss", "latency_ms"] and summary["pareto_front"]
    study = load_study(out)
    first_of_each_arch = {}  # a trial that reused a result shares its values: one point of the front
    for t in sorted(study.best_trials, key=lambda t: t.number):
        first_of_each_arch.setdefault(t.user_attrs["arch_hash"], t.number)
    assert sorted(r["number"] for r in summary["pareto_front"]) == sorted(first_of_each_arch.values())
    for r in summary["pareto_front"]:
        assert len(r["values"]) == 2 and r["values"][1] == pytest.approx(r["metrics"]["latency_ms"])



def test_constraints_mark_trials_infeasible_and_the_ui_serves_the_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=2", "study.constraints={active_params:100}") == 1  # no result
    console = capsys.readouterr()
    assert "no feasible complete trial" in console.out
    assert "error: no complete trial of study tiny-clusters is within study.constraints" in console.err
    assert console.out.count("[infeasible: over active_params]") == 2, console.out  # each trial's line says so
    assert json.loads((out / "summary.json").read_text())["n_infeasible"] == 2  # was 0
    study = load_study(out)
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        assert t.constraints == {"active_params": pytest.approx(t.user_attrs["metrics"]["active_params"] - 100)}

    port = free_port()
    ui = subprocess.Popen(_cli("ui", str(out), "--port", str(port)), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        body = None
        deadline = time.time() + 90
        while time.time() < deadline and body is None:
            time.sleep(1)
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                                 data=json.dumps({"max_results": 10}).encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    body = json.loads(response.read())
            except OSError:
                assert ui.poll() is None, "fulu-nas ui exited"
        assert body is not None, "the MLflow UI did not answer"
        assert "tiny-clusters" in {e["name"] for e in body["experiments"]}

        # The same server as a tracking server: a second study logs to it over HTTP.
        assert run_search(tmp_path / "out2", "study.n_trials=1", "study.name=over-http",
                          f"tracking.uri=http://127.0.0.1:{port}") == 0
        assert not (tmp_path / "out2" / "mlflow.db").exists()
        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        runs = client.search_runs([client.get_experiment_by_name("over-http").experiment_id])
        kinds = sorted(r.data.tags["fulu.kind"] for r in runs)
        assert kinds == ["study", "trial"]
        trial = next(r for r in runs if r.data.tags["fulu.kind"] == "trial")
        assert "loss" in trial.data.metrics
        assert "model.safetensors" in {a.path for a in client.list_artifacts(trial.info.run_id)}
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def test_search_help_via_the_console_script_exits_0():
    result = subprocess.run([sys.executable, "-m", "fulu_nas.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "search" in result.stdout
    assert main(["nonsense"]) == 2


def test_the_pareto_front_is_ordered_best_first_by_a_maximised_first_objective():
    """The front was ordered lowest first whatever the direction: with ``metric`` maximised, the console and
    ``export trial=pareto:0`` took the worst metric, where the dashboard's "first trial of the front" and the
    confirmation's ranking took the best."""
    import optuna

    from fulu_nas.search.objective import pareto_front

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for number, values in enumerate([[0.5, 1.0], [0.9, 2.0], [0.7, 1.5], [0.6, 3.0]]):
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs={"arch_hash": str(number)}))
    assert [t.number for t in pareto_front(study)] == [1, 2, 0]  # trial 3 is dominated
