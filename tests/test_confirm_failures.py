"""``fulu-nas confirm`` when things go wrong: a worker process that dies (kill -9, an OOM kill), a SIGTERM
(``timeout``, ``docker stop``, a batch scheduler), and overrides that the command would ignore (it trains
with the search's own settings) -- the latter also for ``fulu-nas export`` and ``fulu-nas dashboard``,
which find the study the same way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import optuna
import pytest

from fulu_nas.cli import main
from fulu_nas.search.confirm import result_key

from .test_confirm import CONFIRM, confirmation_runs, recorded
from .test_confirm import searched as searched  # noqa: F401  (the module's fixture: a finished tiny search)
from .test_search_e2e import load_study

ROOT = Path(__file__).resolve().parents[1]

# Imported by every Python process started with the hook's folder on PYTHONPATH (the confirmation's worker
# processes inherit it): the run of seed FULU_TEST_SEED does FULU_TEST_ACTION once its MLflow run is open.
HOOK = textwrap.dedent("""
    import os
    import signal

    if os.environ.get("FULU_TEST_ACTION"):
        import fulu_nas.search.confirm as confirm

        real = confirm.train_architecture

        def train_architecture(arch, s, cfg, log, kernels=None):
            if cfg.seed == int(os.environ["FULU_TEST_SEED"]):
                action = os.environ["FULU_TEST_ACTION"]
                if action == "kill":  # as the kernel's OOM killer does
                    os.kill(os.getpid(), signal.SIGKILL)
                elif action == "term":  # this process alone, as `kill PID` does
                    os.kill(os.getpid(), signal.SIGTERM)
                elif action == "term-parent":  # the confirmation's main process alone
                    os.kill(os.getppid(), signal.SIGTERM)
                elif action == "int-parent":  # kill -INT PID, timeout -s INT: the main process alone
                    os.kill(os.getppid(), signal.SIGINT)
            return real(arch, s, cfg, log, kernels)

        confirm.train_architecture = train_architecture
""")


def with_hook(tmp_path: Path, monkeypatch, action: str, seed: int) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    env = {"PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)]), "FULU_TEST_ACTION": action,
           "FULU_TEST_SEED": str(seed)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return {**os.environ, **env}


def run_statuses(out: Path, steps: int) -> dict[str, tuple[str, dict]]:
    _, runs = confirmation_runs(out, steps)
    return {r.info.run_id: (r.info.status, r.data.tags) for r in runs}


def copy_study(searched, tmp_path: Path) -> Path:  # noqa: F811
    out = tmp_path / "out"
    shutil.copytree(searched.out, out)
    return out


# ---------------------------------------------------------------- a worker that dies


@pytest.mark.slow
def test_a_worker_killed_mid_run_fails_the_confirmation_and_records_no_winner(searched, tmp_path,  # noqa: F811
                                                                             monkeypatch, capsys):
    """Worker 1 (the seed-2 runs) is killed with SIGKILL in its first run. It exited 0 with a summary and
    a winner (which export trial=best took) from the runs that finished, its run stayed RUNNING, and the
    missing runs were not mentioned."""
    out = copy_study(searched, tmp_path)
    monkeypatch.chdir(tmp_path)
    with_hook(tmp_path, monkeypatch, "kill", seed=2)
    args = [*CONFIRM, f"hydra.run.dir={out}", "top_k=1", "budget_factor=1", "seeds=2", "n_workers=2"]
    assert main(args) == 1
    console, err = capsys.readouterr()

    first = recorded(out, 60)
    planned = {(a, s) for a in {v["arch_hash"] for v in first.values()} for s in (1, 2)}
    assert {v["seed"] for v in first.values()} == {1}  # worker 0 finished its share
    assert all(v["seed"] == 1 for v in first.values())
    # The dead worker's run is closed, with the reason; nothing stays RUNNING.
    statuses = run_statuses(out, 60)
    killed = [tags for status, tags in statuses.values() if status != "FINISHED"]
    assert all(status != "RUNNING" for status, _ in statuses.values())
    assert len(killed) == 1 and killed[0]["fulu.seed"] == "2"
    assert "confirmation worker 1" in killed[0]["fulu.reason"] and "SIGKILL" in killed[0]["fulu.reason"]
    # The summary says what is missing; no winner is recorded for export to take.
    summary = json.loads((out / "confirmation.json").read_text())
    assert summary["complete"] is False and summary["winner"] is None
    missing = summary["missing_runs"]
    assert len(missing) == len(planned) - len(first) and {m["seed"] for m in missing} == {2}
    assert "confirmation" not in load_study(out).user_attrs
    assert "winner:" not in console
    assert "confirmation worker 1 exited with -9 (SIGKILL" in err
    assert f"incomplete: {len(missing)} of {len(planned)} runs have no result" in err
    for m in missing:
        assert f"missing: trial {m['trial']} seed 2" in console

    # The same command again (no kill) trains only the missing runs and completes the confirmation.
    monkeypatch.setenv("FULU_TEST_ACTION", "")
    assert main(args) == 0
    everything = recorded(out, 60)
    assert len(everything) == len(planned) and all(everything[k] == v for k, v in first.items())
    summary = json.loads((out / "confirmation.json").read_text())
    assert summary["complete"] is True and summary["missing_runs"] == [] and summary["winner"] is not None
    assert load_study(out).user_attrs["confirmation"] == summary
    statuses = run_statuses(out, 60)
    assert sorted(status for status, _ in statuses.values()) == ["FINISHED"] * len(planned) + ["KILLED"]


# ---------------------------------------------------------------- SIGTERM


def confirm_in_a_process(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fulu_nas.cli", *args], env=env, capture_output=True, text=True,
                          timeout=400)


def stopped_by_sigterm(searched, tmp_path, monkeypatch, action: str, workers: int):  # noqa: F811
    """A copy of the study confirmed (top-1, two seeds) in a process whose hook sends SIGTERM (``action``)
    at seed 2 (the second): ``(folder, environment, arguments, the finished process)``, its exit status checked
    (130)."""
    out = copy_study(searched, tmp_path)
    env = with_hook(tmp_path, monkeypatch, action, seed=2)
    args = [*CONFIRM, f"hydra.run.dir={out}", "top_k=1", "budget_factor=1", "seeds=2", f"n_workers={workers}"]
    done = confirm_in_a_process(env, *args)
    assert done.returncode == 130, done.stderr[-3000:]
    return out, env, args, done


@pytest.mark.slow
def test_sigterm_stops_a_confirmation_as_ctrl_c_does(searched, tmp_path, monkeypatch):  # noqa: F811
    """A SIGTERM killed the command with its running run left RUNNING (exit -15)."""
    out, env, args, done = stopped_by_sigterm(searched, tmp_path, monkeypatch, "term", workers=1)
    assert "run the same command to resume" in done.stderr
    statuses = run_statuses(out, 60)
    assert sorted(status for status, _ in statuses.values()) == ["FINISHED", "KILLED"]
    assert not (out / "confirmation.json").exists()
    # resumable: the same command trains what is missing
    env["FULU_TEST_ACTION"] = ""
    done = confirm_in_a_process(env, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "confirmation.json").read_text())["complete"] is True


@pytest.mark.slow
@pytest.mark.parametrize("action", ["term-parent", "int-parent"])
def test_a_signal_to_the_main_process_alone_stops_its_workers_runs(searched, tmp_path, monkeypatch,  # noqa: F811
                                                                   action):
    """`kill PID` (or `kill -INT PID`) of a confirmation on two workers: the workers' runs are ended KILLED,
    exit 130. A SIGINT was not passed on: the workers trained every run left, then the command said it was
    interrupted and wrote no summary."""
    out, _, _, done = stopped_by_sigterm(searched, tmp_path, monkeypatch, action, workers=2)
    statuses = run_statuses(out, 60)
    assert "KILLED" in {status for status, _ in statuses.values()}
    assert all(status in ("FINISHED", "KILLED") for status, _ in statuses.values()), statuses
    assert not (out / "confirmation.json").exists()
    for i in (0, 1):
        assert "Traceback" not in (out / f"confirm-worker-{i}.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("where,signum", [("result", signal.SIGINT), ("close", signal.SIGTERM)],
                         ids=["ctrl-c-recording-the-result", "sigterm-closing-the-run"])
def test_a_signal_while_a_finished_run_is_recorded_and_closed_leaves_it_finished(searched, tmp_path,  # noqa: F811
                                                                                monkeypatch, capsys, where, signum):
    """A signal sent in-process just after the first run's result is written on the study, or inside the write
    that closes that run FINISHED: the run was re-closed KILLED ("interrupted") while its result stayed recorded
    and counted by every later summary. Recording and closing are one step: the run stays FINISHED, the
    confirmation stops before the next run, and the same command trains only what is missing."""
    out = copy_study(searched, tmp_path)
    monkeypatch.chdir(tmp_path)
    sent: list[str] = []
    if where == "result":
        real_set = optuna.Study.set_user_attr

        def set_user_attr(self, key, value):
            real_set(self, key, value)
            if key.startswith("confirm:") and not sent:
                sent.append(value["mlflow_run_id"])
                os.kill(os.getpid(), signum)

        monkeypatch.setattr(optuna.Study, "set_user_attr", set_user_attr)
    else:
        real_terminate = mlflow.MlflowClient.set_terminated

        def set_terminated(self, run_id, status=None, end_time=None):
            if status == "FINISHED" and not sent:
                sent.append(run_id)
                os.kill(os.getpid(), signum)  # inside Tracker.end_trial's write
            return real_terminate(self, run_id, status, end_time)

        monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", set_terminated)
    args = [*CONFIRM, f"hydra.run.dir={out}", "top_k=1", "budget_factor=1", "seeds=1"]
    assert main(args) == 130
    assert "run the same command to resume" in capsys.readouterr().err
    (result,) = recorded(out, 60).values()
    assert sent == [result["mlflow_run_id"]]
    statuses = run_statuses(out, 60)
    assert list(statuses) == sent  # the confirmation stopped before the next run
    status, tags = statuses[sent[0]]
    assert status == "FINISHED" and "fulu.state" not in tags, (status, tags)

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0
    everything = recorded(out, 60)
    statuses = run_statuses(out, 60)
    assert len(everything) == 2 and everything[result_key(result["arch_hash"], result["seed"], 60)] == result
    assert sorted(statuses) == sorted(v["mlflow_run_id"] for v in everything.values())
    assert {status for status, _ in statuses.values()} == {"FINISHED"}
    summary = json.loads((out / "confirmation.json").read_text())
    assert sorted(r["mlflow_run_id"] for a in summary["architectures"] for r in a["runs"]) == sorted(statuses)


# ---------------------------------------------------------------- overrides the command would ignore


def snapshot(out: Path) -> tuple:
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-clusters")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return (sorted(p.name for p in out.rglob("*") if p.suffix != ".db"), len(runs),
            dict(load_study(out).user_attrs))


def test_confirm_refuses_training_overrides_it_would_ignore(searched, tmp_path, monkeypatch, capsys):  # noqa: F811
    """trainer.steps=40 and trainer.seed=7 were dropped without a word: 60 steps and seed 0 were trained."""
    out = copy_study(searched, tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(out)
    where = [*CONFIRM, f"hydra.run.dir={out}", "top_k=1", "seeds=1", "budget_factor=1"]
    assert main([*where, "trainer.steps=40", "trainer.seed=7"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == "error: cannot confirm:" and len(lines) == 3, err
    assert lines[1].startswith("  - trainer.steps=40: ") and lines[2].startswith("  - trainer.seed=7: ")
    assert "trainer.steps is 60 (40 here)" in lines[1] and "trainer.seed is 0 (7 here)" in lines[2]
    assert "budget_factor=" in lines[2] and "seeds=" in lines[2]  # the options to use instead
    # study.confirm.seeds=3: the search's is 2 (the options set the confirmation: seeds=3). task.val_sequences=128:
    # the search's experiment set it to 64; the advice was to add it with +, which was then refused for that.
    for bad, differs in (("+trainer.extra_key=3", None), ("search_space=routers", None), ("study.n_trials=9", None),
                         ("tracking.experiment=other", None), ("study.confirm.seeds=3", "study.confirm.seeds is 2"),
                         ("task.val_sequences=128", "task.val_sequences is 64")):
        assert main([*where, bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot confirm:\n  - {bad}: ") and err.count("\n") == 2, err
        assert "top_k=" in err
        if differs:
            assert f"not used: this command works with the search's own settings, where {differs} (" in err, err
    assert snapshot(out) == before


def test_export_and_dashboard_refuse_overrides_they_would_ignore(searched, tmp_path, monkeypatch,  # noqa: F811
                                                                 capsys):
    out = copy_study(searched, tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(out)
    where = ["study.name=tiny-clusters", f"hydra.run.dir={out}"]
    assert main(["export", *where, "trainer.steps=40", f"out={tmp_path / 'model'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export:\n  - trainer.steps=40: ") and err.count("\n") == 2, err
    assert main(["dashboard", *where, "trainer.seed=7", f"out={tmp_path / 'page.html'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid dashboard request:\n  - trainer.seed=7: ") and err.count("\n") == 2, err
    # A key only the search's experiment set (to 64), given another value: Hydra's advice was to add it with +,
    # which was then refused for differing from the search.
    for command, extra, head in (("export", f"out={tmp_path / 'model'}", "error: cannot export:"),
                                 ("dashboard", f"out={tmp_path / 'page.html'}", "error: invalid dashboard request:")):
        assert main([command, *where, "task.val_sequences=128", extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{head}\n  - task.val_sequences=128: ") and err.count("\n") == 2, err
        assert "where task.val_sequences is 64 (" in err and "+task" not in err, err
    assert list(tmp_path.iterdir()) == [out] and snapshot(out) == before


def test_overrides_that_repeat_the_searchs_settings_are_taken(searched, tmp_path, monkeypatch):  # noqa: F811
    """The search's own command line (as the --config-dir example of docs/search.md passes it to every
    command) still locates the study: those overrides are not ignored, they are the study's settings."""
    out = copy_study(searched, tmp_path)
    monkeypatch.chdir(tmp_path)
    search_args = ["+experiment=tiny", f"hydra.run.dir={out}", "study.n_trials=4", "study.pruner=none",
                   "study.confirm.seeds=2", "trainer.steps=60", "search_space=tiny"]
    assert main(["dashboard", "study.name=tiny-clusters", *search_args, f"out={tmp_path / 'page.html'}"]) == 0
    assert main(["export", "study.name=tiny-clusters", *search_args, f"out={tmp_path / 'model'}"]) == 0
    assert main([*CONFIRM, *search_args, "top_k=1", "seeds=1", "budget_factor=1"]) == 0
    # A key only the search's experiment set, repeated without it: Hydra could not compose it, and advised +.
    assert main([*CONFIRM, f"hydra.run.dir={out}", "task.val_sequences=64", "top_k=1", "seeds=1",
                 "budget_factor=1"]) == 0
    assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={out}", "task.val_sequences=64",
                 f"out={tmp_path / 'again.html'}"]) == 0
    # ... and with the search's command line, whose study.n_trials=4 was then dropped with it: +experiment=tiny
    # was refused as "not used: study.n_trials is 4 (6 here)"
    assert main(["dashboard", "study.name=tiny-clusters", *search_args, "task.val_sequences=64",
                 f"out={tmp_path / 'third.html'}"]) == 0


@pytest.mark.slow
def test_a_confirmation_on_workers_of_a_study_measured_on_another_device_runs_as_in_one_process(tmp_path,
                                                                                                  monkeypatch, capsys):
    """A study of latency searched on a GPU, confirmed here: the confirmation workers opened the study as a
    search resuming it does, whose device check refused it; each died with a traceback (exit 1, "run the
    command again", which failed the same way), where one process confirms it (exit 0)."""
    import sqlite3

    from .test_search_e2e import run_search

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=2", "trainer.steps=10", "study.pruner=none",
                      "study.objectives=[loss,latency_ms]") == 0
    with sqlite3.connect(out / "optuna.db") as db:  # as if its trials had been measured on a GPU
        db.execute("UPDATE trial_user_attributes SET value_json = ? WHERE key = 'device'",
                   (json.dumps("cuda: NVIDIA H100 80GB HBM3"),))
    capsys.readouterr()
    for n in (1, 2):
        copy = shutil.copytree(out, tmp_path / f"out{n}")
        assert main([*CONFIRM, f"hydra.run.dir={copy}", "top_k=1", "budget_factor=1", "seeds=1",
                     f"n_workers={n}"]) == 0, capsys.readouterr().err[-3000:]
        assert len(recorded(copy, 10)) == 2  # the reference and the best trial, one seed each
