"""End-to-end searches in temp dirs: the study, its MLflow runs, resume, the duplicate cache, what
optuna-dashboard shows, a worker killed mid-trial (SQLite and PostgreSQL), and two workers sharing a
study on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from fulu_nas.cli import main

from . import postgres

pytestmark = pytest.mark.slow
TrialState = optuna.trial.TrialState


def run_search(out: Path, *overrides: str) -> int:
    return main(["search", "+experiment=tiny", f"hydra.run.dir={out}", *overrides])


def load_study(out: Path, name: str = "tiny-clusters", storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{out / 'optuna.db'}")


def mlflow_runs(tracking_uri: str, experiment: str):
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("fulu.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("fulu.kind") == "trial"]
    return client, parents, trials


def test_tiny_search_end_to_end_then_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=4") == 0
    # the verdict on the reference is one run of each: it says so, and what tests it
    assert "the reference architecture on loss" in (printed := capsys.readouterr().out)
    assert "in one run at 60 steps; fulu-nas confirm study.name=tiny-clusters" in printed
    logged = (out / "search.log").read_text()  # the log keeps each trial's outcome, as the console showed it
    assert all(f"trial {n} " in logged for n in range(4)) and "trial 0 complete: loss=" in logged
    study = load_study(out)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len([t for t in finished if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 4
    reference = study.trials[0]
    assert reference.user_attrs["reference"] and reference.state == TrialState.COMPLETE
    assert reference.params == {"router": "topk", "num_experts": 4, "top_k": 2, "expert_ffn_size": 32}

    client, parents, trials = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["search_space"] == "tiny" and parent.data.params["task"] == "clusters"
    assert parent.data.params["sampler"] == "tpe" and parent.data.params["storage"].startswith("sqlite:///")
    # the tiny trainer's cost shape [1, 32] is measured at the task's 16 positions: the run says both
    assert parent.data.params["trainer.cost_shapes"] == "[[1, 32]]" and parent.data.params["cost.shapes"] == "[[1, 16]]"
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    by_number = {int(r.data.tags["fulu.trial"]): r for r in trials}
    for t in complete:
        run = by_number[t.number]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["loss"] == pytest.approx(t.values[0])
        for key in ("metric", "routing_accuracy", "load_balance", "latency_ms", "throughput", "peak_memory_mb",
                    "active_params"):
            assert key in run.data.metrics
        assert run.data.params["moe.router"] == t.params["router"]
        if "cached_from" not in t.user_attrs:
            # Where the trial's time went: phases that add up to no more than the trial, training the largest.
            assert run.data.params["train_step"] == "eager, deterministic"  # auto: eager on the CPU
            phases = {k: v for k, v in run.data.metrics.items() if k.startswith("phase/")}
            names = ("sample", "build", "train", "report", "evaluate", "cost", "log")
            assert set(phases) == {f"phase/{p}_s" for p in names}
            assert all(v >= 0 for v in phases.values()) and max(phases, key=phases.get) == "phase/train_s"
            assert sum(phases.values()) <= run.info.end_time / 1000 - run.info.start_time / 1000 + 1.0
            share = run.data.metrics["overhead_share"]
            assert share == pytest.approx(1 - phases["phase/train_s"] / sum(phases.values()))
            assert 0 < run.data.metrics["train/first_step_s"] < phases["phase/train_s"]
            assert "gpu_utilisation" not in run.data.metrics  # no GPU here
            # the cost phase's parts: serving the models, the timed rounds, the memory peak
            parts = [run.data.metrics[f"cost/{p}_s"] for p in ("prepare", "timing", "memory")]
            assert all(v >= 0 for v in parts) and sum(parts) <= phases["phase/cost_s"]
            history = client.get_metric_history(run.info.run_id, "train/loss")
            assert history and sorted(m.step for m in history) == [m.step for m in history]
            assert client.get_metric_history(run.info.run_id, "train/layer0/load_balance")
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"arch.yaml", "model.safetensors", "evaluation.json", "cost.json"} <= artifacts
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_finished"] == 4 and summary["reference"]["number"] == 0
    assert (out / ".hydra" / "config.yaml").is_file()

    # Resume: the same study gains trials up to the new total, under the same parent run.
    assert run_search(out, "study.n_trials=6") == 0
    study = load_study(out)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 6
    _, parents, trials = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert len(trials) == len([t for t in study.trials if "infeasible" not in t.user_attrs])


def test_the_study_names_its_objectives_and_keeps_each_metric_as_an_attribute(tmp_path, monkeypatch):
    """What optuna-dashboard shows: the objectives by name, and each trial's metrics as flat user
    attributes it can sort trials by."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study=multi_objective", "study.n_trials=2") == 0
    study = load_study(out)
    assert study.metric_names == ["loss", "latency_ms"]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete
    for t in complete:
        assert [t.user_attrs["loss"], t.user_attrs["latency_ms"]] == pytest.approx(t.values)
        assert isinstance(t.user_attrs["latency_ratio"], float)
        for name, value in t.user_attrs["metrics"].items():
            assert t.user_attrs[name] == pytest.approx(value, nan_ok=True)


def test_an_extended_study_draws_new_architectures_rather_than_its_first_ones_again(tmp_path, monkeypatch):
    """The sampler was seeded with study.seed on every run, so extending a study (or resuming one after
    an interruption) replayed its first draws: trials 3 and 4 were trials 1 and 2 again."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    options = ("study.sampler=random", "study.pruner=none", "trainer.steps=10", "trainer.report_every=5")
    assert run_search(out, *options, "study.n_trials=3") == 0
    assert run_search(out, *options, "study.n_trials=5") == 0
    trials = load_study(out).trials
    assert len(trials) == 5
    assert [t.params for t in trials[3:5]] != [t.params for t in trials[1:3]]


def test_resuming_with_another_space_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=1") == 0
    capsys.readouterr()
    config = (out / "search_config.json").read_text()
    assert run_search(out, "study.n_trials=2", "search_space.base.hidden_size=64") == 2
    assert "study.name" in capsys.readouterr().err
    assert len(load_study(out).trials) == 1
    # export, dashboard and confirm read the study's settings from it: the refused run must not rewrite it
    assert (out / "search_config.json").read_text() == config


def test_an_architecture_identical_to_a_pruned_trial_is_recorded_as_pruned_with_its_run(tmp_path, monkeypatch,
                                                                                       capsys):
    """A trial that repeats a pruned one is pruned without training: it had no MLflow run (the study's
    trials and its runs did not add up) and its console line said "pruned at step ?"."""
    conf = tmp_path / "conf" / "search_space"
    conf.mkdir(parents=True)
    space = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "tiny.yaml").read_text())
    space.update(name="one", params={"top_k": {"type": "categorical", "choices": [1, 2]}}, reference={"top_k": 2})
    (conf / "one.yaml").write_text(yaml.safe_dump(space))
    # the pruner's decision made for it: every architecture with one expert a token is pruned at its first report
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda trial: trial.params.get("top_k") == 1)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["search", "+experiment=tiny", "--config-dir", str(tmp_path / "conf"), "search_space=one",
                 f"hydra.run.dir={out}", "study.n_trials=8", "study.sampler=random"]) == 0
    console = capsys.readouterr().out
    study = load_study(out, "one-clusters")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    [first] = [t for t in pruned if "cached_from" not in t.user_attrs]
    repeats = [t for t in pruned if "cached_from" in t.user_attrs]
    assert repeats, [t.params for t in study.trials]
    step = first.user_attrs["pruned_at_step"]
    _, _, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "one-clusters")
    by_trial = {int(r.data.tags["fulu.trial"]): r for r in runs}
    assert sorted(by_trial) == [t.number for t in study.trials]  # every trial has its run
    for t in repeats:
        assert t.user_attrs["cached_from"] == first.number and t.user_attrs["pruned_at_step"] == step
        run = by_trial[t.number]
        assert run.info.status == "KILLED" and run.data.tags["fulu.state"] == "pruned"
        assert run.data.tags["fulu.cached_from_trial"] == str(first.number)
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert f"trial {t.number} pruned at step {step} (reused trial {first.number})" in console, console


def test_identical_architectures_are_trained_once(tmp_path, monkeypatch):
    conf = tmp_path / "conf" / "search_space"
    conf.mkdir(parents=True)
    space = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "tiny.yaml").read_text())
    space.update(name="one", params={"top_k": {"type": "categorical", "choices": [1, 2]}}, reference={"top_k": 2})
    (conf / "one.yaml").write_text(yaml.safe_dump(space))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["search", "+experiment=tiny", "--config-dir", str(tmp_path / "conf"), "search_space=one",
                 f"hydra.run.dir={out}", "study.n_trials=5", "study.pruner=none"]) == 0
    study = load_study(out, "one-clusters")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 5
    trained = [t for t in complete if "cached_from" not in t.user_attrs]
    assert sorted(t.params["top_k"] for t in trained) == [1, 2]
    for t in complete:
        if "cached_from" in t.user_attrs:
            source = study.trials[t.user_attrs["cached_from"]]
            assert source.params == t.params and source.values == t.values
            assert t.user_attrs["weights_run_id"] == source.user_attrs["weights_run_id"]
            # the quality and cost are copied; how the earlier trial's run went is its own
            assert not any(k.startswith(("phase/", "cost/")) for k in t.user_attrs["metrics"])
            assert any(k.startswith("cost/") for k in source.user_attrs["metrics"])
    _, _, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "one-clusters")
    assert sum("fulu.cached_from_trial" in r.data.tags for r in runs) == 3
    here = study.trials[0].user_attrs["device"]
    assert {t.user_attrs["device"] for t in complete} == {here} and here.startswith("cpu: ")
    assert {r.data.tags["fulu.device"] for r in runs} == {here}
    # a reused result's run carries the tags a trained one does (an MLflow filter on them left it out)
    by_trial = {int(r.data.tags["fulu.trial"]): r.data.tags for r in runs}
    for t in complete:
        assert by_trial[t.number]["fulu.arch_hash"] == t.user_attrs["arch_hash"]
        assert by_trial[t.number]["fulu.reference"] == str(bool(t.user_attrs.get("reference")))

    # Resumed on another device: its trials' latency and memory are that device's, so an architecture is
    # trained and costed again there, not reused from the first device's trials (which kept their figures).
    from fulu_nas.search import objective

    monkeypatch.setattr(objective, "device_label", lambda device: "cuda: Another GPU")
    assert main(["search", "+experiment=tiny", "--config-dir", str(tmp_path / "conf"), "search_space=one",
                 f"hydra.run.dir={out}", "study.n_trials=9", "study.pruner=none"]) == 0
    later = load_study(out, "one-clusters").trials[5:]
    assert len(later) == 4 and all(t.user_attrs["device"] == "cuda: Another GPU" for t in later)
    trained_there = [t for t in later if "cached_from" not in t.user_attrs]
    assert sorted(t.params["top_k"] for t in trained_there) == sorted({t.params["top_k"] for t in later})
    assert all(t.user_attrs["cached_from"] >= 5 for t in later if "cached_from" in t.user_attrs)



@pytest.mark.parametrize("bound", ["study.objectives=[loss,latency_ms]", "study.constraints={peak_memory_mb:1e9}"])
def test_a_study_that_measured_latency_or_memory_elsewhere_is_not_resumed_on_another_device(tmp_path, monkeypatch,
                                                                                                capsys, bound):
    """Its front would weigh one device's latency (or memory) against another's: refused before anything is
    written, naming both devices. A study of loss alone resumes there (the test above)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=1", "study.pruner=none", bound) == 0
    here = load_study(out).trials[0].user_attrs["device"]
    config = (out / "search_config.json").read_text()
    capsys.readouterr()
    from fulu_nas.search import objective

    monkeypatch.setattr(objective, "device_label", lambda device: "cuda: Another GPU")
    assert run_search(out, "study.n_trials=2", "study.pruner=none", bound) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("  - trainer.device: study 'tiny-clusters'")
    assert here in err and "cuda: Another GPU" in err and "study.name" in err
    assert len(load_study(out).trials) == 1 and (out / "search_config.json").read_text() == config

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from fulu_nas.cli import main; sys.exit(main())", *args]


@contextmanager
def _stores(backend: str, out: Path):
    """The study storage, tracking URI and search overrides of ``backend``: the embedded SQLite files
    in ``out`` (the defaults), or two databases of a throwaway PostgreSQL server."""
    if backend == "sqlite":
        yield f"sqlite:///{out / 'optuna.db'}", f"sqlite:///{out / 'mlflow.db'}", []
        return
    if not postgres.available():
        pytest.skip("PostgreSQL is not installed")
    with postgres.postgres_server(("optuna", "mlflow")) as urls:
        yield urls["optuna"], urls["mlflow"], [f"study.storage={urls['optuna']}", f"tracking.uri={urls['mlflow']}"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_worker_killed_mid_trial_is_recovered_on_resume(backend, tmp_path):
    out = tmp_path / "out"
    with _stores(backend, out) as (storage, tracking, overrides):
        args = _cli("search", "+experiment=tiny", f"hydra.run.dir={out}", "study.n_trials=2", "study.pruner=none",
                    "trainer.max_seconds=null", "trainer.steps=400", "study.heartbeat_interval=1",
                    "study.grace_period=2", *overrides)
        log = tmp_path / "first.log"
        with open(log, "w") as console:
            proc = subprocess.Popen(args, cwd=tmp_path, stdout=console, stderr=subprocess.STDOUT)
        # Generous: the loop ends as soon as a trial has reported; a loaded machine starts Python slowly.
        deadline = time.time() + 300
        killed, polled = None, None
        while time.time() < deadline and killed is None and proc.poll() is None:
            time.sleep(0.5)
            # Only once the search has made its storage and study (it writes its config after): opening
            # the storage here while the search creates its tables raced with it, and one of the two
            # creations failed.
            if polled is None:
                if not (out / "search_config.json").exists():
                    continue
                polled = optuna.storages.RDBStorage(storage)
            study = optuna.load_study(study_name="tiny-clusters", storage=polled)
            running = [t for t in study.trials if t.state == TrialState.RUNNING and t.intermediate_values]
            if running:
                os.kill(proc.pid, signal.SIGKILL)
                killed = running[0].number
        if proc.poll() is None and killed is None:
            proc.kill()
        proc.wait()
        assert killed is not None, f"no trial was seen running (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
        assert optuna.load_study(study_name="tiny-clusters", storage=storage).trials[killed].state == \
            TrialState.RUNNING

        result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        study = optuna.load_study(study_name="tiny-clusters", storage=storage)
        assert study.trials[killed].state == TrialState.FAIL
        retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert retries[0].params == study.trials[killed].params
        assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 2

        # The killed trial's MLflow run is closed with the reason; nothing of the study is left RUNNING.
        _, parents, runs = mlflow_runs(tracking, "tiny-clusters")
        assert [r.info.status for r in parents + runs if r.info.status == "RUNNING"] == []
        closed = [r for r in runs if r.data.tags["fulu.trial"] == str(killed)]
        assert len(closed) == 1 and closed[0].info.status == "KILLED"
        assert "heartbeat" in closed[0].data.tags["fulu.reason"]
        retried = [r for r in runs if r.data.tags["fulu.trial"] == str(retries[0].number)]
        assert [r.info.status for r in retried] == ["FINISHED"]


@pytest.mark.skipif(not postgres.available(), reason="PostgreSQL is not installed")
def test_two_workers_share_a_study_on_postgresql(tmp_path):
    out = tmp_path / "out"
    with postgres.postgres_server(("optuna", "mlflow")) as urls:
        result = subprocess.run(_cli("search", "+experiment=tiny", f"hydra.run.dir={out}", "study.n_trials=6",
                                     "study.n_workers=2", "study.pruner=none", f"study.storage={urls['optuna']}",
                                     f"tracking.uri={urls['mlflow']}"), cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        study = optuna.load_study(study_name="tiny-clusters", storage=urls["optuna"])
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert len(complete) == 6
        others = [t for t in study.trials if t.state != TrialState.COMPLETE]
        assert all(t.user_attrs.get("fail_reason", "").startswith("surplus") for t in others)
        # Both workers ran trials, and every trial nests under the one parent run.
        logs = [(out / f"worker-{i}.log").read_text() for i in range(2)]
        assert all("complete" in log for log in logs), logs
        _, parents, runs = mlflow_runs(urls["mlflow"], "tiny-clusters")
        assert len(parents) == 1
        assert sorted(int(r.data.tags["fulu.trial"]) for r in runs) == sorted(t.number for t in complete)
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}


@pytest.mark.skipif(not postgres.available(), reason="PostgreSQL is not installed")
def test_database_passwords_stay_out_of_mlflow_and_the_study_is_still_found_from_its_runs(tmp_path, monkeypatch):
    """The search's configuration went to the study's MLflow run as it was typed, the storage's and the
    tracking database's passwords in it, for whoever reads the runs; read back (a folder without
    search_config.json), the URLs are the ones the command is given."""
    from fulu_nas.search.locate import load_study as located_study
    from fulu_nas.search.locate import locate_study, search_settings

    monkeypatch.chdir(tmp_path)
    out, secret = tmp_path / "out", "s3cret-pw"
    with postgres.postgres_server(("optuna", "mlflow")) as urls:  # trust auth: any password is taken
        storage, tracking = (urls[db].replace("fulu@", f"fulu:{secret}@") for db in ("optuna", "mlflow"))
        assert run_search(out, "study.n_trials=1", "trainer.steps=10", f"study.storage={storage}",
                          f"tracking.uri={tracking}") == 0
        # The files that must keep the passwords (the workers' configuration, Hydra's record of the command)
        # are the owner's alone: they were 0644, for every user of the machine to read.
        holding = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")
                   if p.is_file() and secret.encode() in p.read_bytes()}
        assert {"search_config.json", ".hydra/config.yaml", ".hydra/overrides.yaml"} <= set(holding), holding
        assert {path: oct(mode) for path, mode in holding.items() if mode & 0o077} == {}
        _, parents, runs = mlflow_runs(tracking, "tiny-clusters")
        client = mlflow.MlflowClient(tracking)
        for run in (*parents, *runs):
            assert secret not in json.dumps([run.data.params, run.data.tags])
            with tempfile.TemporaryDirectory() as tmp:
                for artifact in client.list_artifacts(run.info.run_id):
                    if not artifact.is_dir:
                        assert secret not in Path(client.download_artifacts(run.info.run_id, artifact.path,
                                                                            tmp)).read_text(errors="replace")
        (out / "search_config.json").unlink()
        location = locate_study(["study.name=tiny-clusters", f"hydra.run.dir={out}", f"study.storage={storage}",
                                 f"tracking.uri={tracking}"])
        settings = search_settings(location, located_study(location))
        assert (settings.storage_url, settings.tracking_uri) == (storage, tracking)


@pytest.mark.skipif(not postgres.available(), reason="PostgreSQL is not installed")
def test_a_sweep_with_workers_and_its_confirmation_keep_the_database_password_to_the_owner(tmp_path, monkeypatch):
    """The files of a sweep's job that hold the password as typed (the workers' and the confirmation workers'
    configuration, Hydra's records of the job and of the sweep) were 0644, readable by every user of the
    machine; nothing else the job writes holds it."""
    monkeypatch.chdir(tmp_path)
    secret = "s3cret-pw"
    with postgres.postgres_server(("optuna", "mlflow")) as urls:
        storage, tracking = (urls[db].replace("fulu@", f"fulu:{secret}@") for db in ("optuna", "mlflow"))
        assert main(["search", "--multirun", "+experiment=tiny", "hydra.sweep.dir=sweep", "study.n_trials=2",
                     "study.n_workers=2", "trainer.steps=10", f"study.storage={storage}", f"tracking.uri={tracking}",
                     "study.confirm.enabled=true", "study.confirm.top_k=1", "study.confirm.seeds=1",
                     "study.confirm.budget_factor=1"]) == 0
    sweep = tmp_path / "sweep"
    holding = {p.relative_to(sweep).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in sweep.rglob("*")
               if p.is_file() and secret.encode() in p.read_bytes()}
    assert set(holding) == {"multirun.yaml", "0/search_config.json", "0/confirm_config.json", "0/.hydra/config.yaml",
                            "0/.hydra/hydra.yaml", "0/.hydra/overrides.yaml"}, holding
    assert {path: oct(mode) for path, mode in holding.items() if mode & 0o077} == {}


def test_journal_storage_with_two_local_workers(tmp_path):
    out, journal = tmp_path / "out", tmp_path / "optuna-journal.log"
    result = subprocess.run(_cli("search", "+experiment=tiny", f"hydra.run.dir={out}", "study.n_trials=4",
                                 "study.n_workers=2", "study.pruner=none", f"study.storage=journal://{journal}"),
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="tiny-clusters", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 4
    assert not (out / "optuna.db").exists()
    # Both workers logged to the one embedded MLflow database, under one parent run.
    _, parents, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    assert len(parents) == 1 and len(runs) >= 4


def test_a_journal_search_goes_on_past_a_killed_second_worker(tmp_path):
    """Worker 1 of two killed (kill -9, an OOM kill) on a journal file (no heartbeats): the parent polled its
    workers with any(), which stopped at the live worker 0, so the dead one was never reaped; as a zombie it
    looked alive, its trial was never failed, and worker 0 waited for it for ever."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    out, journal = tmp_path / "out", tmp_path / "optuna-journal.log"
    args = _cli("search", "+experiment=tiny", f"hydra.run.dir={out}", "study.n_trials=4", "study.n_workers=2",
                "study.pruner=none", "trainer.steps=400", "trainer.max_seconds=null", f"study.storage=journal://{journal}")
    with open(tmp_path / "console.log", "w") as console:
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=console, stderr=subprocess.STDOUT)
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and killed is None and proc.poll() is None:
        time.sleep(0.5)
        if not journal.exists():
            continue
        study = optuna.load_study(study_name="tiny-clusters", storage=JournalStorage(JournalFileBackend(str(journal))))
        for t in study.trials:
            pid = t.user_attrs.get("worker", ":").rpartition(":")[2]
            if t.state == TrialState.RUNNING and t.intermediate_values and pid.isdigit():
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"fulu_nas.search.worker" in cmdline and cmdline[-2] == b"1":  # worker 1, not worker 0
                    os.kill(int(pid), signal.SIGKILL)
                    killed = t.number
                    break
    try:
        assert killed is not None, (tmp_path / "console.log").read_text()[-3000:]
        # The other worker finished the study: the search has its result (exit 0), and says a worker died.
        assert proc.wait(timeout=400) == 0, (tmp_path / "console.log").read_text()[-3000:]
    finally:
        proc.kill()
    assert "worker 1 exited with -9" in (tmp_path / "console.log").read_text()
    study = optuna.load_study(study_name="tiny-clusters", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert study.trials[killed].state == TrialState.FAIL
    assert study.trials[killed].user_attrs["fail_reason"].startswith("worker stopped")
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 4
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]

def test_a_search_whose_best_is_the_reference_says_so(tmp_path, monkeypatch, capsys):
    """With the reference the best trial, the verdict used to read "best trial 0 does not beat the
    reference architecture (+0.0%)" of the reference itself."""
    monkeypatch.chdir(tmp_path)
    assert run_search(tmp_path / "out", "study.n_trials=1", "trainer.steps=20") == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "the best trial, 0, is the reference architecture: no other architecture beat it on loss in one run " \
           "at 20 steps" in printed
    assert "does not beat" not in printed
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["best_is_reference"] is True


def test_two_workers_show_their_running_trials_step_and_loss(tmp_path):
    """With workers, the console's bar shows each worker's running trial, its step and loss (read from
    the small files the workers replace at each report), as one process's bar shows its own; the files
    are gone when the search ends."""
    import re

    out = tmp_path / "out"
    result = subprocess.run(_cli("search", "+experiment=tiny", f"hydra.run.dir={out}", "study.n_trials=2",
                                 "study.n_workers=2", "study.pruner=none", "trainer.steps=400"),
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = re.findall(r"trial (\d+): step (\d+) loss (\d+\.\d{4})", result.stderr)
    assert {number for number, _, _ in shown} == {"0", "1"}, result.stderr[-2000:]
    assert all(0 < int(step) <= 400 for _, step, _ in shown)
    final = {t.number: t.values[0] for t in load_study(out).trials}
    assert set(final) == {0, 1}
    assert not list(out.glob(".*progress*"))


def _ask_once(url: str, start, asked) -> None:
    from fulu_nas.search.storage import open_study_storage

    study = optuna.load_study(study_name="race", storage=open_study_storage(url))
    start.wait()
    asked.put(study.ask().number)


def test_workers_sharing_a_sqlite_study_never_take_the_same_queued_trial(tmp_path):
    """Workers on one SQLite file take queued trials (the reference, a killed worker's retried trial)
    one each. pysqlite opens a transaction only at the first write and SQLite has no SELECT ... FOR
    UPDATE, so two workers could both read a trial as waiting and both run it: the second then failed
    with "Cannot tell a COMPLETE trial" (a two-worker search, 2026-12-04)."""
    import multiprocessing

    from fulu_nas.search.storage import open_study_storage

    fork = multiprocessing.get_context("fork")
    for round_ in range(6):
        url = f"sqlite:///{tmp_path / f'race{round_}.db'}"
        study = optuna.create_study(study_name="race", storage=open_study_storage(url))
        for x in range(3):
            study.enqueue_trial({"x": x})
        del study
        start, asked = fork.Barrier(4), fork.Queue()
        workers = [fork.Process(target=_ask_once, args=(url, start, asked)) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        assert [w.exitcode for w in workers] == [0] * 4
        numbers = sorted(asked.get(timeout=10) for _ in workers)
        assert numbers == [0, 1, 2, 3], f"round {round_}: trials taken {numbers}"


def test_an_architecture_gets_the_same_result_from_one_worker_or_two(tmp_path):
    """A trial depends on its architecture, seed and budget only: whichever of two workers trains an
    architecture (with its share of the CPU threads), it gets what a lone worker gets. The reference
    (trained first by both runs) is an architecture whose training used to depend on the thread count:
    MKL's GEMMs split their work by thread unless its reproducibility mode is on."""
    values = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        result = subprocess.run(_cli("search", "+experiment=tiny", f"hydra.run.dir={out}", "study.n_trials=4",
                                     f"study.n_workers={workers}", "study.pruner=none", "study.sampler=grid",
                                     "search_space.reference.num_experts=2", "search_space.reference.top_k=1"),
                                cwd=tmp_path, capture_output=True, text=True,
                                env={k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "OMP_NUM_THREADS")})
        assert result.returncode == 0, result.stderr[-3000:]
        values[workers] = {t.user_attrs["arch_hash"]: t.values[0] for t in load_study(out).trials
                           if t.state == TrialState.COMPLETE}
    shared = values[1].keys() & values[2].keys()
    assert "172aa26d82d76855" in shared  # the reference
    for arch in shared:  # to the bit (tests/test_train_evaluate.py: the same with 2 threads and 1)
        assert values[2][arch] == values[1][arch]


def test_local_workers_are_pinned_one_per_gpu(monkeypatch):
    import torch

    from fulu_nas.search.study import worker_env

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [worker_env(i, 4)["CUDA_VISIBLE_DEVICES"] for i in range(4)] == ["0", "1", "0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert [worker_env(i, 2)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["4", "6"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = worker_env(0, 2)
    assert "CUDA_VISIBLE_DEVICES" not in env or env["CUDA_VISIBLE_DEVICES"] == "4,6"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    # one GPU: every worker shares it (each process its own CUDA context), with its share of the CPU threads
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    envs = [worker_env(i, 4) for i in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3"] * 4
    assert {e["OMP_NUM_THREADS"] for e in envs} == {str(max(1, (os.cpu_count() or 1) // 4))}


def test_the_summary_says_when_the_reference_breaks_a_study_constraint(tmp_path, capsys):
    """A best trial 'beats the reference' is qualified when the reference is itself infeasible, in
    summary.json and on the console (the table row and the verdict line)."""
    from fulu_nas.search.app import compose_config
    from fulu_nas.search.report import print_summary, summarize
    from fulu_nas.search.settings import load_settings

    s = load_settings(*compose_config(["+experiment=tiny", f"hydra.run.dir={tmp_path}",
                                       "study.constraints={active_params:1.0e4}"]))
    study = optuna.create_study(direction="minimize")
    dist = {"a": optuna.distributions.IntDistribution(0, 9)}
    for a, loss, over in ((0, 1.31, 1876.0), (1, 1.30, -50.0)):  # trial 0, the reference, is over the bound
        study.add_trial(optuna.trial.create_trial(values=[loss], params={"a": a}, distributions=dist,
                                                  user_attrs={"reference": a == 0, "arch_hash": str(a)},
                                                  constraints={"active_params": over}))
    summary = summarize(study, s)
    assert summary["beats_reference"] and summary["best_trial"] == 1
    assert summary["reference"]["feasible"] is False and summary["reference"]["violated_constraints"] == [
        "active_params"]
    assert summary["best"]["feasible"] is True
    print_summary(summary, s)
    out = capsys.readouterr().out
    assert "0 (reference, infeasible)" in out, out
    words = " ".join(out.split())  # the console wraps the verdict line
    assert "best trial 1 beats the reference architecture (infeasible: over active_params) on loss" in words, out


def test_a_study_resumes_with_its_constraints_in_any_order_and_a_refusal_names_what_changed(tmp_path, monkeypatch,
                                                                                              capsys):
    """The fingerprint held the constraints in the order they were typed: the same bounds in another
    order were refused as "another search space, task, budget or objectives", naming neither the
    constraints nor what else had changed. A study fingerprinted that way resumes with its order, and
    from then on with any."""
    from fulu_nas.search.locate import load_study as located_study
    from fulu_nas.search.locate import locate_study, search_settings
    from fulu_nas.search.study import FINGERPRINT_ATTR, FINGERPRINT_PARTS_ATTR

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    fast = ("trainer.steps=10", "study.pruner=none")
    typed = "study.constraints={latency_ms:100,active_params:1e6}"
    reordered = "study.constraints={active_params:1e6,latency_ms:100}"
    assert run_search(out, "study.n_trials=1", *fast, typed) == 0
    location = locate_study(["study.name=tiny-clusters", f"hydra.run.dir={out}"])
    legacy = search_settings(location, located_study(location)).fingerprint(constraints_as_typed=True)
    study = optuna.load_study(study_name="tiny-clusters", storage=location.storage_url)
    assert legacy != study.user_attrs[FINGERPRINT_ATTR]
    study.set_user_attr(FINGERPRINT_ATTR, legacy)  # as the study was made before
    study.set_user_attr(FINGERPRINT_PARTS_ATTR, None)
    assert run_search(out, "study.n_trials=2", *fast, typed) == 0
    assert run_search(out, "study.n_trials=3", *fast, reordered) == 0
    assert len(load_study(out).trials) == 3
    capsys.readouterr()
    for changed, named in ((("study.constraints={active_params:1e6,latency_ms:50}", "trainer.steps=10"),
                            "with other study.constraints"),
                           ((reordered, "trainer.steps=20"), "with another trainer"),
                           (("study.constraints={latency_ms:100}", "trainer.steps=20"),
                            "with another trainer and other study.constraints")):
        assert run_search(out, "study.n_trials=4", "study.pruner=none", *changed) == 2
        err = capsys.readouterr().err
        assert f"study 'tiny-clusters' in sqlite:///{out / 'optuna.db'} was created {named};" in err, err
    assert len(load_study(out).trials) == 3


def test_a_study_resumes_after_its_spaces_description_changed_and_from_its_earlier_fingerprint(tmp_path,
                                                                                                monkeypatch):
    """The fingerprint held the space's description, prose: a reworded shipped space refused every study
    of it on resume. Studies fingerprinted that way still resume."""
    from fulu_nas.search.locate import load_study as located_study
    from fulu_nas.search.locate import locate_study, search_settings
    from fulu_nas.search.study import FINGERPRINT_ATTR

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=1", "trainer.steps=10") == 0
    assert run_search(out, "study.n_trials=2", "trainer.steps=10", "search_space.description=reworded") == 0
    assert run_search(out, "study.n_trials=2", "trainer.steps=20") == 2  # a budget is no description
    location = locate_study(["study.name=tiny-clusters", f"hydra.run.dir={out}"])
    settings = search_settings(location, located_study(location))
    optuna.load_study(study_name="tiny-clusters", storage=location.storage_url).set_user_attr(
        FINGERPRINT_ATTR, settings.fingerprint(legacy=True))
    assert run_search(out, "study.n_trials=3", "trainer.steps=10", "search_space.description=reworded") == 0


def _journal(path: Path) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


JOURNAL_FAST = ("trainer.steps=10", "trainer.report_every=5", "study.pruner=none")


def test_a_killed_workers_trial_is_failed_and_retried_on_a_journal_file(tmp_path, monkeypatch):
    """The journal file has no heartbeats: the trial of a worker killed with kill -9 stayed RUNNING for good,
    the same command counted it as taken, made surplus trials up to its attempt limit and exited 0 with
    the study incomplete, the trial's MLflow run still RUNNING. A RUNNING trial whose worker (host:pid) is
    a process of this host that is gone is failed with that reason, queued again and its run ended."""
    import socket

    monkeypatch.chdir(tmp_path)
    out, journal = tmp_path / "out", tmp_path / "j.log"
    options = (f"study.storage=journal://{journal}", *JOURNAL_FAST)
    assert run_search(out, "study.n_trials=1", *options) == 0
    study = load_study(out, storage=_journal(journal))
    # What a worker killed while training a queued architecture (the reference's) leaves: its trial
    # RUNNING, naming its worker, and the trial's MLflow run RUNNING.
    study.enqueue_trial(study.trials[0].params)
    killed = study.ask()
    worker = f"{socket.gethostname()}:{_dead_pid()}"
    killed.set_user_attr("worker", worker)
    client, [parent], _ = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    client.create_run(parent.info.experiment_id, run_name=f"trial {killed.number}", tags={
        "mlflow.parentRunId": parent.info.run_id, "fulu.kind": "trial", "fulu.trial": str(killed.number),
        "fulu.study": "tiny-clusters", "fulu.worker": worker})

    assert run_search(out, "study.n_trials=2", *options) == 0
    study = load_study(out, storage=_journal(journal))
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    states = [(t.number, t.state.name, retried(t)) for t in study.trials]
    assert states == [(0, "COMPLETE", None), (1, "FAIL", None), (2, "COMPLETE", 1)], states
    reason = study.trials[1].user_attrs["fail_reason"]
    assert reason.startswith("worker stopped") and worker in reason and study.trials[1].user_attrs["not_counted"]
    assert study.trials[2].params == study.trials[0].params and "fail_reason" not in study.trials[2].user_attrs
    _, parents, runs = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    assert [r.info.run_name for r in parents + runs if r.info.status == "RUNNING"] == []
    [closed] = [r for r in runs if r.data.tags["fulu.trial"] == "1"]
    assert closed.info.status == "KILLED" and closed.data.tags["fulu.reason"] == reason
    assert [(r.info.status, r.data.tags["fulu.state"]) for r in parents] == [("FINISHED", "complete")]


def test_trials_running_in_live_workers_or_on_other_hosts_are_waited_for_on_a_journal_file(tmp_path, monkeypatch,
                                                                                           capsys):
    """Without heartbeats the last trials running elsewhere were counted as taken and every trial the
    worker started meanwhile was surplus (107 of them, then "is most of the space infeasible?"). It waits
    for them, failing none: a live process's, or another host's, whose life it cannot see."""
    import socket

    from fulu_nas.search import study as study_module

    monkeypatch.chdir(tmp_path)
    out, journal = tmp_path / "out", tmp_path / "j.log"
    options = (f"study.storage=journal://{journal}", *JOURNAL_FAST)
    assert run_search(out, "study.n_trials=1", *options) == 0
    study = load_study(out, storage=_journal(journal))
    others = [study.ask(), study.ask()]
    others[0].set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # this test's process: alive
    others[1].set_user_attr("worker", f"elsewhere.example:{_dead_pid()}")
    sleeps: list[float] = []

    def sleep(seconds):  # the other workers finish their trials after a few seconds
        sleeps.append(seconds)
        assert [study.trials[t.number].state for t in others] == [TrialState.RUNNING] * 2
        if len(sleeps) == 3:
            for t in others:
                study.tell(t, 1.0)
        time.sleep(seconds)

    monkeypatch.setattr(study_module, "time", type("clock", (), {"sleep": staticmethod(sleep)}))
    capsys.readouterr()
    assert run_search(out, "study.n_trials=3", *options) == 0
    assert len(sleeps) == 3
    assert [t.state for t in load_study(out, storage=_journal(journal)).trials] == [TrialState.COMPLETE] * 3
    printed = capsys.readouterr().out
    assert f"waiting for trial 1 (worker {socket.gethostname()}:{os.getpid()})" in printed, printed
    assert "waiting for trial 2 (worker elsewhere.example:" in printed


def test_a_search_out_of_attempts_says_why_and_does_not_exit_0(tmp_path, monkeypatch, capsys):
    """A search that stopped at its attempt limit without the requested finished trials exited 0, and
    blamed an infeasible space whatever had made the trials not count."""
    from fulu_nas.search import objective as objective_module

    def surplus(self, trial):  # every trial started finds the requested ones taken by other workers
        trial.set_user_attr("fail_reason", "surplus: the requested trials were already taken by other workers")
        trial.set_user_attr("not_counted", True)
        raise objective_module.SurplusTrial("surplus trial")

    monkeypatch.setattr(objective_module.Objective, "_check_surplus", surplus)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=1", f"study.storage=journal://{tmp_path / 'j.log'}", *JOURNAL_FAST) == 1
    printed = capsys.readouterr().out
    assert "stopping after 60 trials started: 0 of the 1 requested trials finished (60 surplus" in printed, printed
    assert "infeasible?" not in printed


def test_a_study_whose_every_trial_failed_has_no_result_and_exits_1(tmp_path, monkeypatch, capsys):
    """Every trial diverged: the search printed "no feasible complete trial yet" for a complete study and
    exited 0, so a script went on to export; its parent run ended FINISHED. A later search that completes
    trials ends the same parent run FINISHED, without the earlier reason."""
    from fulu_nas.search import objective as objective_module

    real = objective_module.train

    def broken(*args, **kwargs):
        raise RuntimeError("an expert kernel failed")

    monkeypatch.setattr(objective_module, "train", broken)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=2") == 1
    printed = capsys.readouterr()
    assert "no feasible complete trial (2 failed, 0 pruned, 0 infeasible)" in printed.out, printed.out
    assert printed.err.strip().splitlines()[-1] == (
        "error: no trial of study tiny-clusters completed (2 failed): the search has no result; each trial's reason "
        "is above and on its MLflow run (tag fulu.reason)")
    assert json.loads((out / "summary.json").read_text())["n_failed"] == 2
    client, parents, trials = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    assert [p.info.status for p in parents] == ["FAILED"]
    assert parents[0].data.tags["fulu.reason"].startswith("no trial of study tiny-clusters completed (2 failed)")
    assert [t.info.status for t in trials] == ["FAILED"] * 2
    assert all("an expert kernel failed" in t.data.tags["fulu.reason"] for t in trials)

    monkeypatch.setattr(objective_module, "train", real)
    assert run_search(out, "study.n_trials=3") == 0
    client, parents, _ = mlflow_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny-clusters")
    assert [p.info.status for p in parents] == ["FINISHED"] and "fulu.reason" not in parents[0].data.tags
