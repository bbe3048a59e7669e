"""``train()`` under torch.distributed (2 Gloo processes, expert-parallel MoE layers) equals the
single-process ``train()`` on the concatenated per-rank batches; a search with
``trainer.expert_parallel=2`` trains its trials over 2 ranks and stores ordinary weights."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
import torch.distributed as dist

from fulu_nas.cli import main
from fulu_nas.tasks import IGNORE, NO_DOMAIN, Batch, Task
from fulu_nas.training.train import TrainConfig, train

from .helpers import spawn_ranks

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with Gloo is not available", allow_module_level=True)

P = 2
PER_RANK = 3  # sequences per rank and step
SEQ = 16
CFG = TrainConfig(steps=6, batch_size=PER_RANK, lr=1e-2, warmup_fraction=0.2, grad_clip=0.5, seed=7, device="cpu",
                  report_every=1, progress=False)


class ShardedTask(Task):
    """A fixed stream of global batches of ``P * PER_RANK`` sequences: asked for ``PER_RANK`` rows
    with seed ``CFG.seed + r`` it yields rank r's rows; asked for all rows, the whole batch."""

    name, vocab_size, seq_len, metric_name, higher_is_better = "sharded", 64, SEQ, "loss", False

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(33)
        rank = seed - CFG.seed
        assert (batch_size, rank) in ((PER_RANK, 0), (PER_RANK, 1), (P * PER_RANK, 0)), (batch_size, seed)
        while True:
            tokens = torch.randint(0, self.vocab_size, (P * PER_RANK, SEQ), generator=g)
            if batch_size == PER_RANK:
                tokens = tokens[rank * PER_RANK:(rank + 1) * PER_RANK]
            targets = torch.full_like(tokens, IGNORE)
            targets[:, :-1] = tokens[:, 1:]  # every sequence has the same number of targets
            yield Batch(tokens, targets, torch.full_like(tokens, NO_DOMAIN))

    def val_batches(self, batch_size: int) -> list[Batch]:
        return []

    def metric_counts(self, logits, batch):
        return {"loss": (0.0, 1.0)}


def tiny_model():
    from fulu_nas.models import ArchConfig, PiMoETransformer
    from fulu_nas.moe import MoEConfig

    torch.manual_seed(21)
    moe = MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=32, top_k=2, aux_loss_coef=0.01,
                    z_loss_coef=1e-3, bias_update_rate=1e-2)
    return PiMoETransformer(ArchConfig(vocab_size=64, max_seq_len=SEQ, num_layers=2, hidden_size=32, num_heads=4,
                                       dense_ffn_size=64, moe=moe))


def _worker(rank: int, port: int, out_dir: str) -> None:
    from fulu_nas.training.distributed import broadcast_module, expert_parallel, gather_experts, init_from_env
    from fulu_nas.training.dynamic_experts import DynamicExpertsConfig
    from fulu_nas.training.train import StoppedByRankZero

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(P), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_from_env(backend="gloo", timeout_s=60)
    out: dict = {}
    try:
        # broadcast_module: every rank ends with rank 0's parameters and buffers
        differing = tiny_model()
        with torch.no_grad():
            for t in [*differing.parameters(), *differing.buffers()]:
                if t.is_floating_point():
                    t.add_(rank)
        broadcast_module(differing)
        out["broadcast"] = differing.state_dict()
        # ... a layer that served an inference call before the broadcast too (its CPU experts' packed
        # copies of this rank's own weights, which a collective's write does not tell autograd about)
        from fulu_nas.moe import MoEConfig, PiMoELayer

        torch.manual_seed(rank)
        layer = PiMoELayer(MoEConfig(hidden_size=512, num_experts=2, expert_ffn_size=2048, top_k=1)).eval()
        x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            layer(x, with_stats=False)
            broadcast_module(layer)
            out["served"] = (layer(x, with_stats=False)[0], layer(x, impl="loop", with_stats=False)[0])

        model = expert_parallel(tiny_model())
        seen = []
        result = train(model, ShardedTask(), CFG, callback=seen.append)
        out["losses"] = [r.loss for r in result.history]
        out["aux"] = [layer["aux_loss"] for r in result.history for layer in r.layers]
        out["balance"] = [r.load_balance for r in result.history]
        out["called"] = len(seen)
        out["state"] = gather_experts(model).state_dict()

        # rank 0's callback stops every rank at the same step (no hang)
        def stop(report):
            if report.step == 2:
                raise KeyError("prune")

        try:
            train(expert_parallel(tiny_model()), ShardedTask(), CFG, callback=stop)
        except (KeyError, StoppedByRankZero) as e:
            out["stopped"] = type(e).__name__
        # a wall-clock budget: every rank stops after the same step
        timed = train(expert_parallel(tiny_model()), ShardedTask(), replace(CFG, steps=10**6, max_seconds=0.5))
        out["timed"] = (timed.steps, timed.stop_reason)
        try:
            train(expert_parallel(tiny_model()), ShardedTask(), replace(CFG, dynamic_experts=DynamicExpertsConfig()))
        except ValueError as e:
            out["dynamic"] = str(e)
        try:
            train(tiny_model(), ShardedTask(), CFG)
        except ValueError as e:
            out["not_ep"] = str(e)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_worker, P, tmp_path_factory.mktemp("distributed_train"))


def test_broadcast_module_gives_every_rank_the_layers_of_rank_zero(ranks):
    reference = tiny_model().state_dict()
    for r in ranks:
        assert r["broadcast"].keys() == reference.keys()
        for name, t in reference.items():
            torch.testing.assert_close(r["broadcast"][name], t, rtol=0, atol=0, msg=name)


def test_a_layer_that_served_before_the_broadcast_serves_rank_zeros_weights_after_it(ranks):
    """Rank 1 went on computing with its own experts (0.46 off rank 0): the broadcast wrote the weights
    without moving their version counters, the key of the packed copies."""
    for r in ranks:
        served, loop = r["served"]
        torch.testing.assert_close(served, loop, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loop, ranks[0]["served"][1], rtol=0, atol=0)


def test_distributed_train_matches_single_process_step_for_step(ranks):
    model = tiny_model()
    ref = train(model, ShardedTask(), replace(CFG, batch_size=P * PER_RANK))
    losses = [r.loss for r in ref.history]
    assert len(losses) == CFG.steps
    for res in ranks:
        assert res["losses"] == pytest.approx(losses, abs=1e-5)
        assert res["balance"] == pytest.approx([r.load_balance for r in ref.history], abs=1e-5)
        # aux_loss is local to a rank in the EP layer: the report carries its mean, the single-process value
        assert res["aux"] == pytest.approx([la["aux_loss"] for r in ref.history for la in r.layers], abs=1e-5)
    assert ranks[0]["called"] == CFG.steps and ranks[1]["called"] == 0  # only rank 0 calls back
    state = model.state_dict()
    for res in ranks:
        assert res["state"].keys() == state.keys()
        for k, v in state.items():
            torch.testing.assert_close(res["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_every_rank_takes_the_same_decisions(ranks):
    assert [res["stopped"] for res in ranks] == ["KeyError", "StoppedByRankZero"]
    assert ranks[0]["timed"] == ranks[1]["timed"] and ranks[0]["timed"][1] == "time"
    for res in ranks:
        assert "dynamic experts" in res["dynamic"]
        assert "expert_parallel(model)" in res["not_ep"]


# -- search ----------------------------------------------------------------------------------------

def test_workers_get_disjoint_gpu_sets(monkeypatch):
    from fulu_nas.search.study import worker_env

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [worker_env(i, 4, 2)["CUDA_VISIBLE_DEVICES"] for i in range(4)] == ["0,1", "2,3", "0,1", "2,3"]
    assert [worker_env(i, 2, 4)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["0,1,2,3"] * 2
    assert [worker_env(i, 2, 1)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7,8")
    assert [worker_env(i, 3, 2)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["4,5", "6,7", "4,5"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert worker_env(0, 1, 2)["CUDA_VISIBLE_DEVICES"] == "3"  # too few: the trial fails, saying so


BENCH = ["--hidden", "32", "--ffn", "32", "--steps", "1"]


@pytest.mark.parametrize("options,rank,words", [
    (["--tokens", "0"], "0", "argument --tokens: must be at least 1 and at most 16777216, got 0"),
    (["--chunks", "0"], "0", "argument --chunks: must be at least 1 and at most 16777216, got 0"),
    (["--steps", "x"], "0", "argument --steps: invalid int value: 'x'"),
    (["--router", "nope"], "0", "argument --router: invalid choice: 'nope' (choose from 'topk', 'expert_choice', "
                                "'hash', 'hierarchical', 'attention')"),
    (["--experts", "3"], "0", "--experts 3: expert parallelism over 2 ranks needs a multiple of 2"),
    (["--top-k", "9"], "0", "invalid MoE config: top_k (9) must be <= num_experts (8)"),
    (["--profile", "/no/such/folder/p.txt"], "0", "--profile: the folder /no/such/folder does not exist"),
    (["--tokens", "0"], "1", None)])  # every rank refuses; rank 0 alone says why
def test_the_expert_parallel_benchmark_refuses_bad_options_before_starting(options, rank, words, monkeypatch,
                                                                          capsys):
    """They ended in a traceback from every rank (--tokens 0: "cannot reshape tensor of 0 elements"),
    some only after the process group had started."""
    from fulu_nas.training import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node=2 sets it
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(distributed, "init_from_env", lambda *a, **k: pytest.fail("the process group was started"))
    with pytest.raises(SystemExit) as exited:
        distributed.main(BENCH + options)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    if words is None:
        assert err == ""
    else:
        assert err.splitlines()[-1] == f"python -m fulu_nas.training.distributed: error: {words}"


@pytest.mark.parametrize("world_size", ["0", "abc", "-2"])
def test_the_expert_parallel_benchmark_refuses_a_bad_world_size(world_size, monkeypatch, capsys):
    """torchrun never sets these, a hand-made environment can: they ended in a ZeroDivisionError or a
    ValueError traceback."""
    from fulu_nas.training import distributed

    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "init_from_env", lambda *a, **k: pytest.fail("the process group was started"))
    with pytest.raises(SystemExit) as exited:
        distributed.main(BENCH)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m fulu_nas.training.distributed: error: WORLD_SIZE must be a positive integer, got {world_size!r}")


@pytest.mark.parametrize("value,text", [("0", "expected an integer >= 1"), ("3", "divisible by 3")])
def test_expert_parallel_is_validated(value, text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["search", "+experiment=tiny", f"hydra.run.dir={out}", f"trainer.expert_parallel={value}"]) == 2
    err = capsys.readouterr().err
    assert "trainer.expert_parallel" in err and text in err
    assert not (out / "optuna.db").exists()


@pytest.mark.slow
def test_tiny_search_with_two_ranks_per_trial(tmp_path, monkeypatch):
    import mlflow
    from safetensors.torch import load_model

    from fulu_nas.models import ArchConfig, PiMoETransformer

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    # The documented command (docs/scaling.md): 2 trials are within the tiny study's 3 startup trials,
    # which the pruner leaves alone.
    assert main(["search", "+experiment=tiny", f"hydra.run.dir={out}", "study.n_trials=2",
                 "trainer.expert_parallel=2"]) == 0
    study = optuna.load_study(study_name="tiny-clusters", storage=f"sqlite:///{out / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2, [(t.state, t.user_attrs.get("fail_reason")) for t in study.trials]
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    for t in complete:
        if "cached_from" in t.user_attrs:
            continue
        run_id = t.user_attrs["weights_run_id"]
        assert client.get_metric_history(run_id, "train/loss")  # the ranks' reports, streamed back
        path = client.download_artifacts(run_id, "model.safetensors", str(tmp_path / f"t{t.number}"))
        model = PiMoETransformer(ArchConfig.from_dict(t.user_attrs["arch"]))
        missing, unexpected = load_model(model, path)
        assert not missing and not unexpected
        assert t.user_attrs["metrics"]["train_steps"] >= 1
    assert not list(Path(out).glob("ep-trial-*"))  # the scratch folders are gone


@pytest.mark.slow
def test_a_callback_that_raises_stops_the_ranks_mid_run(tmp_path):
    """What pruning does to a 2-rank trial: the streamed report's callback raises, the ranks stop at
    their next report (long before the budget) and the exception reaches the caller."""
    import time

    from fulu_nas.models import ArchConfig
    from fulu_nas.moe import MoEConfig
    from fulu_nas.training.parallel import train_expert_parallel

    arch = ArchConfig(vocab_size=64, max_seq_len=16, num_layers=1, hidden_size=32, num_heads=2, dense_ffn_size=64,
                      num_classes=4, moe=MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=32, top_k=2))
    cfg = TrainConfig(steps=10**6, max_seconds=60, batch_size=4, report_every=2, device="cpu", progress=False,
                      expert_parallel=2)
    seen = []

    def prune(report):
        seen.append(report.step)
        raise optuna.TrialPruned("pruned")

    start = time.perf_counter()
    with pytest.raises(optuna.TrialPruned):
        train_expert_parallel(arch, "clusters", {"seq_len": 16}, cfg, on_report=prune, workdir=tmp_path)
    assert time.perf_counter() - start < 40 and seen == [2]
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_two_rank_trial_records_the_step_that_ran_and_its_timing(tmp_path, monkeypatch):
    """The ranks' whole training result reaches the trial's and the confirmation's MLflow runs: the step
    that ran (deterministic, as on one device), the first step's time as rank 0 measured it, and the
    ranks' training time as phase/train_s (the parent records the reports while the ranks train)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    base = ["study.name=tiny-clusters", f"hydra.run.dir={out}"]
    assert main(["search", "+experiment=tiny", *base, "study.n_trials=1", "trainer.expert_parallel=2",
                 "trainer.steps=20", "study.pruner=none"]) == 0
    assert main(["confirm", *base, "top_k=1", "seeds=1", "budget_factor=1"]) == 0
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-clusters")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    [trial] = [r for r in runs if r.data.tags.get("fulu.kind") == "trial"]
    [confirmation] = [r for r in runs if r.data.tags.get("fulu.kind") == "confirmation"]
    for run in (trial, confirmation):
        assert run.data.params["train_step"] == "eager, deterministic"
    m = trial.data.metrics
    assert 0 < m["train/first_step_s"] < m["phase/train_s"]
    assert m["phase/train_s"] == pytest.approx(m["train_seconds"])
    phases = {k: v for k, v in m.items() if k.startswith("phase/")}
    assert all(v >= 0 for v in phases.values())
    # the reports are recorded while the ranks train: the trial's time is the phases but for that overlap
    elapsed = sum(phases.values()) - phases["phase/report_s"]
    assert elapsed <= trial.info.end_time / 1000 - trial.info.start_time / 1000 + 1.0
    assert m["overhead_share"] == pytest.approx(1 - phases["phase/train_s"] / elapsed)
