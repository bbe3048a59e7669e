"""The GPU preset (``+experiment=gpu``) end to end on a GPU (skipped without CUDA), shrunk to seconds:
the study, each trial's MLflow run (the training step it used, where its time went, the GPU's
utilisation, cost timed with CUDA events), and the exported winner loaded with torch alone on the GPU."""

from __future__ import annotations

import hashlib
import io
import json

import mlflow
import optuna
import pytest
import torch
from torch.export.passes import move_to_device_pass

from fulu_nas.cli import main

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHRUNK = ("+experiment=gpu", "study.n_trials=3", "study.startup_trials=2", "trainer.steps=40",
          "trainer.report_every=10", "trainer.cost_iterations=3")
STUDY = "gpu-textlm"


def test_gpu_preset_searches_logs_and_exports_a_model_torch_loads_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["search", *SHRUNK, f"hydra.run.dir={out}"]) == 0

    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'optuna.db'}")
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 3
    assert study.trials[0].user_attrs["reference"] and study.trials[0].state == optuna.trial.TrialState.COMPLETE
    arch = study.trials[0].user_attrs["arch"]
    assert (arch["num_layers"], arch["hidden_size"], arch["max_seq_len"]) == (4, 512, 256)

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(STUDY).experiment_id])
    trained = {int(r.data.tags["fulu.trial"]): r for r in runs
               if r.data.tags.get("fulu.kind") == "trial" and r.info.status == "FINISHED"
               and "fulu.cached_from_trial" not in r.data.tags}
    assert 0 in trained
    for run in trained.values():
        m = run.data.metrics
        # auto: 40 steps do not pay for a compilation; the eager step is replayed from a CUDA graph
        assert run.data.params["train_step"] == "eager + CUDA graph, deterministic"
        assert 0 <= m["gpu_utilisation"] <= 100 and 0 < m["train/capture_s"] < m["phase/train_s"]
        assert run.data.metrics["upload_s"] >= 0  # the weights were uploaded, then the run ended
        assert m["cost/kernel_wait_s"] >= 0 and m["cost/prepare_s"] > 0  # compiled while it trained
        assert 0 < m["overhead_share"] < 1 and m["phase/train_s"] > 0
        cost = json.loads(open(client.download_artifacts(run.info.run_id, "cost.json", str(tmp_path))).read())
        assert cost["timing"] == "CUDA events, one CUDA graph per shape"
        assert [(s["batch"], s["seq"]) for s in cost["shapes"]] == [(1, 256), (32, 256)]

    target = tmp_path / "model"
    assert main(["export", f"study.name={STUDY}", f"hydra.run.dir={out}", f"out={target}"]) == 0
    import fulu_nas

    assert json.loads((target / "metrics.json").read_text())["device"].startswith("cuda")  # as its trials were
    model = fulu_nas.load(target, map_location="cuda")
    data = (target / "model.pt2").read_bytes()
    assert hashlib.sha256(data).hexdigest() == json.loads((target / "checksums.json").read_text())["model.pt2"]
    program = move_to_device_pass(torch.export.load(io.BytesIO(data)), "cuda")
    tokens = torch.randint(0, 256, (2, 256), device="cuda")
    with torch.no_grad():
        expected = model(tokens).logits
        got = program.module()(tokens)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)  # bf16 tolerance


def test_an_architecture_gets_the_same_loss_from_one_worker_or_two_sharing_the_gpu(tmp_path, monkeypatch):
    """Deterministic training (the default, ``trainer.deterministic``): the reference, which both studies
    train first, ends with the same loss to the bit whether one worker or two (each its own process and
    CUDA context) share the GPU; so does any other architecture both studies happen to sample."""
    monkeypatch.chdir(tmp_path)
    losses = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(["search", *SHRUNK, "study.pruner=none", f"study.n_workers={workers}",
                     f"hydra.run.dir={out}"]) == 0
        study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'optuna.db'}")
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        losses[workers] = {t.user_attrs["arch_hash"]: t.values[0] for t in complete}
        reference = [t.user_attrs["arch_hash"] for t in complete if t.user_attrs.get("reference")]
    shared = losses[1].keys() & losses[2].keys()
    assert reference and reference[0] in shared
    for arch in shared:
        assert losses[2][arch] == losses[1][arch], arch


# The dimensions that change which operations a training step runs (the others change shapes alone).
OPERATION_DIMENSIONS = ("hierarchy_depth", "attention_context", "top_p", "num_shared_experts", "balancing")


def test_every_router_and_option_of_the_gpu_space_trains_deterministically():
    """Deterministic training (the default) refuses any operation without a deterministic CUDA
    implementation. Every router of the GPU space with every value of each option, one at a time over
    the reference, trains: top-p's probability mass was a floating-point cumsum, which has none."""
    from fulu_nas.models import seeded_model
    from fulu_nas.search.app import compose_config
    from fulu_nas.search.settings import load_settings
    from fulu_nas.tasks import TextLMTask
    from fulu_nas.training.train import TrainConfig, train

    s = load_settings(*compose_config(["+experiment=gpu", "task.seq_len=64", "trainer.device=auto"]))
    params = {p.name: p for p in s.space.params}
    defaults = {"hierarchy_depth": 2, "attention_context": False}
    task = TextLMTask(seq_len=64, max_bytes=200_000)
    trained = set()
    for router in params["router"].choices:
        base = {**s.space.reference, "router": router}
        base.update({k: v for k, v in defaults.items() if params[k].active(base)})
        for name in OPERATION_DIMENSIONS:
            if not params[name].active(base):
                continue
            for value in params[name].grid_values():
                values = s.space.with_derived({**base, name: value})
                arch = s.space.feasible_arch(values, s.task)
                result = train(seeded_model(arch, 0, "cuda"), task,
                               TrainConfig(steps=2, batch_size=4, report_every=1, progress=False, device="cuda"))
                assert result.deterministic and all(r.loss == r.loss for r in result.history), (router, name, value)
                trained.add((router, name, repr(value)))
    assert {("hierarchical", "top_p", "0.5"), ("attention", "attention_context", "True"),
            ("hash", "balancing", "'aux_loss+z_loss'")} <= trained


def test_the_gpu_search_benchmark_script_writes_its_rows_and_checks_the_export(tmp_path):
    """``benchmarks/gpu_search.sh`` (BENCHMARKS.md, "The search on a GPU"), shrunk: one search of two
    trials with one worker, then a second with two, each a row of trials per hour and the GPU's
    utilisation while it ran; the winner exported and loaded with torch alone on the GPU."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "OVERRIDES": " ".join(SHRUNK[2:]).replace("study.startup_trials=2", "study.startup_trials=1")}
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_search.sh"), str(out), "2", "2"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "searches.jsonl").read_text().splitlines()]
    assert [(r["study"], r["workers"], r["finished"]) for r in rows] == [("gpu-w1", 1, 2), ("gpu-w2", 2, 2)]
    assert all(r["trials_per_hour"] > 0 and r["samples"] > 0 and 0 <= r["gpu_utilisation_median"] <= 100
               for r in rows)
    assert "torch-only program on" in (out / "export-check.txt").read_text()
    assert (out / "gpu-w1-summary.json").exists() and (out / "gpu-w2-optuna.db").exists()
