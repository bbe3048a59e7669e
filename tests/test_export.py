"""Export: the directory, torch-only loading of model.pt2, MLflow serving and the registry,
checksums, and trial selection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch

import fulu_nas
from fulu_nas.cli import main
from fulu_nas.errors import FuluConfigError
from fulu_nas.search.export_trial import select_trial

from .helpers import free_port
from .test_search_e2e import load_study, run_search

TrialState = optuna.trial.TrialState


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny study and its best trial exported (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("export")
    out = root / "out"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert run_search(out, "study.n_trials=3", "study.pruner=none") == 0
        assert main(["export", "study.name=tiny-clusters", f"hydra.run.dir={out}", f"out={root / 'model'}"]) == 0
    finally:
        os.chdir(cwd)
    return SimpleNamespace(root=root, out=out, model_dir=root / "model", study=load_study(out))


def tokens(batch=3, seq=12, vocab=40, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_export_directory_and_load(exported):
    d = exported.model_dir
    for name in ("config.yaml", "model.safetensors", "model.pt2", "MLmodel", "metrics.json", "README.md",
                 "checksums.json", "requirements.txt", "python_env.yaml"):
        assert (d / name).is_file(), name
    study = exported.study
    best = min((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.values[0])
    metrics = json.loads((d / "metrics.json").read_text())
    # Measured again on the exported weights: the same validation loss the trial reported.
    assert metrics["loss"] == pytest.approx(best.user_attrs["metrics"]["loss"], rel=1e-4)
    assert {"accuracy", "routing_accuracy", "load_balance", "latency_ms", "active_params"} <= metrics.keys()
    model = fulu_nas.load(d)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.arch.to_dict() == best.user_attrs["arch"]
    card = (d / "README.md").read_text()
    assert f"trial {best.number}" in card and "mlflow models serve" in card


@pytest.mark.slow
def test_program_runs_with_torch_alone_and_matches(exported, tmp_path):
    model = fulu_nas.load(exported.model_dir)
    x = tokens(vocab=model.arch.vocab_size)
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["fulu_nas"] = None          # make any import of fulu_nas fail
        import numpy as np, torch
        program = torch.export.load({str(exported.model_dir / "model.pt2")!r})
        x = torch.from_numpy(np.load({str(tmp_path / "x.npy")!r}))
        with torch.no_grad():
            np.save({str(tmp_path / "y.npy")!r}, program.module()(x).numpy())
            # dynamic batch and sequence
            assert program.module()(x[:1, :5]).shape[:2] == (1, 5)
        try:
            import fulu_nas  # noqa
        except ImportError:
            print("fulu_nas not importable")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fulu_nas not importable" in result.stdout
    with torch.no_grad():
        expected = model(x).logits
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "y.npy")), expected, rtol=1e-5, atol=1e-5)



@pytest.mark.slow
def test_mlflow_serves_the_model_and_the_registry_resolves_champion(exported):
    import mlflow

    model = fulu_nas.load(exported.model_dir)
    x = tokens(vocab=model.arch.vocab_size)
    with torch.no_grad():
        expected = model(x).logits.numpy()

    mlflow.set_tracking_uri(f"sqlite:///{exported.out / 'mlflow.db'}")
    registered = mlflow.pyfunc.load_model("models:/tiny-clusters@champion")
    np.testing.assert_allclose(registered.predict(x.numpy()), expected, rtol=1e-5, atol=1e-5)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(exported.model_dir),
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        answer = None
        deadline = time.time() + 120
        while answer is None and time.time() < deadline:
            time.sleep(1)
            assert server.poll() is None, "mlflow models serve exited"
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                             data=json.dumps({"inputs": x.tolist()}).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
            except OSError:
                continue
        assert answer is not None, "the server did not answer"
        np.testing.assert_allclose(np.asarray(answer["predictions"]), expected, rtol=1e-5, atol=1e-5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_tampered_or_missing_files_are_refused(exported, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported.model_dir, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(FuluConfigError, match="model.safetensors: checksum mismatch"):
        fulu_nas.load(copy)
    (copy / "model.pt2").unlink()
    with pytest.raises(FuluConfigError, match="model.pt2: missing"):
        fulu_nas.load(copy)
    with pytest.raises(FuluConfigError, match="not an export directory"):
        fulu_nas.load(tmp_path / "nowhere")


@pytest.mark.slow
def test_export_refuses_bad_input_and_writes_nothing(exported, monkeypatch, capsys):
    monkeypatch.chdir(exported.root)
    before = sorted(p.name for p in exported.root.iterdir())
    out = exported.out
    for args, key in ([["study.name=nope"], "no study database"],
                      [["study.name=tiny-clusters", f"hydra.run.dir={out}", "trial=999", "out=x1"], "trial 999"],
                      [["study.name=tiny-clusters", f"hydra.run.dir={out}", "trial=pareto:7", "out=x2"], "pareto"],
                      [["study.name=tiny-clusters", f"hydra.run.dir={out}", f"out={exported.model_dir}"],
                       "not empty"],
                      [["study.name=tiny-clusters", f"hydra.run.dir={out}", "retrain=maybe", "out=x3"], "retrain"]):
        assert main(["export", *args]) == 2
        assert key in capsys.readouterr().err
    assert sorted(p.name for p in exported.root.iterdir()) == before


@pytest.mark.slow
def test_retrain_exports_a_longer_trained_model(exported, monkeypatch):
    monkeypatch.chdir(exported.root)
    target = exported.root / "retrained"
    assert main(["export", "study.name=tiny-clusters", f"hydra.run.dir={exported.out}", "trial=0", "retrain=true",
                 "retrain_factor=2", f"out={target}", "name=tiny-retrained"]) == 0
    metrics = json.loads((target / "metrics.json").read_text())
    assert metrics["retrained"] is True and metrics["retrain_steps"] > 0
    assert fulu_nas.load(target).arch.to_dict() == exported.study.trials[0].user_attrs["arch"]


def fake_study(directions, rows):
    study = optuna.create_study(directions=directions)
    for values, loss, latency in rows:
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs={"metrics": {"loss": loss,
                                                                                         "latency_ms": latency}}))
    return study


def settings_for(objectives, directions):
    return SimpleNamespace(study=SimpleNamespace(name="s", objectives=objectives, directions=directions,
                                                 multi_objective=len(objectives) > 1))


def test_trial_selection_rules():
    single = fake_study(["minimize"], [([2.0], 2.0, 1.0), ([1.0], 1.0, 5.0), ([1.5], 1.5, 0.5)])
    s = settings_for(["loss"], ["minimize"])
    assert select_trial(single, s, "best").number == 1
    assert select_trial(single, s, "2").number == 2
    assert select_trial(single, s, "fastest_within:60").number == 2
    assert select_trial(single, s, "fastest_within:10").number == 1

    multi = fake_study(["minimize", "minimize"], [([1.0, 5.0], 1.0, 5.0), ([2.0, 1.0], 2.0, 1.0),
                                                  ([3.0, 3.0], 3.0, 3.0)])
    m = settings_for(["loss", "latency_ms"], ["minimize", "minimize"])
    with pytest.raises(FuluConfigError, match="pareto"):
        select_trial(multi, m, "best")
    assert [select_trial(multi, m, f"pareto:{i}").number for i in range(2)] == [0, 1]
    with pytest.raises(FuluConfigError, match="0..1"):
        select_trial(multi, m, "pareto:2")
    with pytest.raises(FuluConfigError, match="expected best"):
        select_trial(multi, m, "latest")
