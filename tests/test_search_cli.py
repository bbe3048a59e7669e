"""``fulu-nas search`` on bad input: exit code 2, one message naming the key, nothing written.
And the Hydra conveniences (``--cfg job``, ``--help``) that must not run a study."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from fulu_nas.cli import main
from fulu_nas.errors import FuluConfigError
from fulu_nas.search import app

CONF = Path(app.__file__).resolve().parents[1] / "conf"

BAD_SPACE = {"name": "mine", "params": {"num_experts": {"type": "int", "low": 16, "high": 4}}}

# (overrides, text the message must contain)
BAD = [
    (["search_space=nonexistent"], "search_space"),
    (["task=nonexistent"], "task"),
    (["study.sampler=annealing"], "study.sampler"),
    (["study.objectives=[loss,latency_ms]"], "study.pruner"),
    (["study.objectives=[loss,speed]", "study.pruner=none"], "study.objectives"),
    (["study.pruner=median", "study.objectives=[latency_ms]"], "study.pruner"),
    (["study.n_trials=0"], "study.n_trials"),
    (["study.name=nan"], "YAML read it as float nan: quote it"),
    (["+study.n_trial=5"], "study.n_trial"),
    # Hydra's own words advised "+study.n_trails=3", which the settings then refuse as unknown
    (["study.n_trails=3"], "study.n_trails: unknown key (check its spelling)"),
    # advised removing it first, "~cost.rounds '+cost.rounds=0'", which Hydra then refused: there is no cost entry
    (["cost.rounds=0"], "cost.rounds: unknown key (check its spelling)"),
    (["study.storage=oracle://host/db"], "study.storage"),
    (["study.storage=sqlite:////nonexistent/dir/optuna.db"], "study.storage"),
    (["study.storage=journal:///nonexistent/dir/journal.log"], "study.storage"),
    # a folder that takes no new file (as a read-only mount): refused only after Hydra wrote the output
    # folder, and a tracking database there hung in MLflow's retries with the study already created
    (["study.storage=sqlite:////proc/optuna.db"], "study.storage: cannot make /proc/optuna.db"),
    (["study.storage=journal:///proc/journal.log"], "study.storage: cannot make /proc/journal.log"),
    (["tracking.uri=sqlite:////proc/mlflow.db"], "tracking.uri: cannot make /proc/mlflow.db"),
    (["study.constraints={latency:1.0}"], "study.constraints.latency"),
    # the driver's query arguments: a traceback once the folder (and, for tracking.uri, the study) was made;
    # an unknown one ignored, with SQLAlchemy's warnings on the console
    (['study.storage="sqlite:///x.db?timeout=abc"'], "study.storage: a query argument of 'sqlite:///x.db?timeout=abc'"),
    (['tracking.uri="sqlite:///m.db?timeout=abc"'], "tracking.uri: a query argument of 'sqlite:///m.db?timeout=abc'"),
    (['study.storage="sqlite:///x.db?foo=1"'], "study.storage: Query string argument(s) 'foo' are not accepted"),
    # an unset shell variable: the study's databases went into the current folder
    (["hydra.run.dir="], "hydra.run.dir: empty (an unset shell variable?)"),
    (["tracking.uri=/tmp/mlruns"], "tracking.uri"),
    (["trainer.lr=-1"], "trainer.lr"),
    (["trainer.cost_shapes=[[1]]"], "trainer.cost_shapes"),
    (["trainer.device=tpu"], "trainer.device"),
    (["trainer.device=cuda:99"], "trainer.device: 'cuda:99'"),  # no such GPU (none at all on a CPU machine)
    (["trainer.compile=yes"], "trainer.compile"),
    (["trainer.cuda_graph=maybe"], "trainer.cuda_graph"),
    (["trainer.deterministic=sometimes"], "trainer.deterministic"),
    (["task=textlm", "task.path=/nonexistent/corpus"], "/nonexistent/corpus"),
    # what Hydra advises for model=PATH outside task=upcycle; the model was then ignored
    (["task=clusters", "+model=/some/encoder"], "model: task 'clusters' takes no model"),
    (["study.sampler=grid", "search_space=default", "+search_space.params.router_jitter={type:float,low:0,high:1}",
      "+search_space.reference.router_jitter=0.0"],
     "params.router_jitter"),
    (["search_space.params.top_k.high=0"], "search_space.params.top_k"),
    # numbers no trial could measure: trials failed without a reason, and were not counted, so the study ran on
    (["task=textlm", "study.objectives=[routing_accuracy]", "study.pruner=none"], "labelled domains"),
    (["search_space=tiny", "~search_space.reference", "study.objectives=[latency_ratio]", "study.pruner=none"],
     "reference architecture"),
    (["search_space=tiny", "~search_space.reference", "study.constraints={latency_ratio:1.5}"],
     "reference architecture"),
]


@pytest.mark.parametrize("device", ["cuda:x", "cuda:-1", "cuda:"])
def test_a_malformed_device_is_one_problem(device, tmp_path, monkeypatch, capsys):
    """The trainer's settings and the machine's devices both look at trainer.device: a malformed one is
    named once, not once by each."""
    monkeypatch.chdir(tmp_path)
    assert main(["search", f"trainer.device={device}"]) == 2
    named = [line for line in capsys.readouterr().err.splitlines() if "trainer.device" in line]
    assert len(named) == 1 and "expected auto, cpu, cuda or cuda:N" in named[0], named


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
def test_bad_input_exits_2_naming_the_key_and_writes_nothing(overrides, key, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", *overrides]) == 2
    err = capsys.readouterr().err
    assert key in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sweep,message", [
    (["study.n_trials=abc"], "study.n_trials: expected an integer >= 1, got 'abc'"),
    (["study.n_trials=2,abc", "trainer.lr=1e-3,2e-3"], "job 2 (+experiment=tiny study.n_trials=abc trainer.lr=0.001): "
                                                       "study.n_trials: expected an integer >= 1"),
    (["trainer.lr=interval(0,1)"], "does not support sweep type : INTERVAL_SWEEP"),
])
def test_a_multirun_with_bad_input_is_refused_before_hydra_writes_a_job(sweep, message, tmp_path, monkeypatch, capsys):
    """``-m`` sweeps: every job of the sweep is checked first (Hydra used to write multirun/ and the
    first job's .hydra/ before the job refused its input)."""
    monkeypatch.chdir(tmp_path)
    assert main(["search", "-m", "+experiment=tiny", *sweep]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid search configuration:\n  - ") and message in err and err.count("\n") == 2, err
    assert list(tmp_path.iterdir()) == []


def test_a_multirun_whose_jobs_share_one_study_is_refused_before_hydra_writes_a_job(tmp_path, monkeypatch, capsys):
    """With study.storage= shared, every job opened the one default-named study: the second seed's job found
    "nothing to train" (the first's trials) and ended in an MLflow traceback, exit 1."""
    monkeypatch.chdir(tmp_path)
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    assert main(["search", "-m", "+experiment=tiny", f"study.storage={shared}", "study.seed=0,1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid search configuration:\n  - job 1 (+experiment=tiny ") and err.endswith(
        f"study.seed=1): study.name: 'tiny-clusters' in {shared} is job 0's study too: give each job its own "
        "study.name (sweep it too, or name the swept key in it, e.g. \"study.name=mine-${study.seed}\")\n"), err
    assert list(tmp_path.iterdir()) == []


def test_a_multirun_job_is_checked_in_its_own_folder(tmp_path, monkeypatch, capsys):
    """Each job was checked in hydra.run.dir (outputs/NAME), where a sweep writes nothing: a study there with
    other settings refused the sweep, and the sweep's own folders were never checked."""
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "outputs" / "tiny-clusters"
    assert main(["search", "+experiment=tiny", "study.n_trials=1", "trainer.steps=10", "study.pruner=none",
                 f"hydra.run.dir={other}"]) == 0
    sweep = tmp_path / "sweep"
    (sweep / "1").mkdir(parents=True)
    (sweep / "1" / "optuna.db").write_bytes(b"not a database" * 100)  # the folder job 1 would write in
    capsys.readouterr()
    assert main(["search", "-m", "+experiment=tiny", "study.n_trials=1", "trainer.steps=20,30",
                 f"hydra.sweep.dir={sweep}"]) == 2
    err = capsys.readouterr().err
    assert "job 1 (+experiment=tiny study.n_trials=1 trainer.steps=30" in err and "is not a SQLite database" in err
    assert "job 0" not in err and "created with another" not in err, err
    assert sorted(p.name for p in sweep.iterdir()) == ["1"]
    # a sweep folder that cannot be made: Hydra's 24-line traceback
    assert main(["search", "-m", "+experiment=tiny", "study.seed=0,1", "hydra.sweep.dir=/proc/nope"]) == 2
    assert "hydra.sweep.dir: cannot make the folder '/proc/nope/0'" in capsys.readouterr().err
    # an empty one (an unset shell variable): checked as /0, while Hydra wrote the jobs in the current folder
    assert main(["search", "-m", "+experiment=tiny", "study.seed=0,1", "hydra.sweep.dir="]) == 2
    assert "hydra.sweep.dir: empty (an unset shell variable?)" in capsys.readouterr().err
    assert not os.path.exists("/0") and sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "sweep"]


def test_a_study_resumed_with_another_tracking_database_is_refused_before_anything_is_written(tmp_path, monkeypatch,
                                                                                              capsys):
    """A shared study.storage resumed from another folder (its own mlflow.db): "nothing to train", then MLflow's
    traceback (the study's parent run is not in that database), exit 1."""
    monkeypatch.chdir(tmp_path)
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    common = ["+experiment=tiny", "study.n_trials=1", "trainer.steps=10", "study.pruner=none",
              f"study.storage={shared}"]
    assert main(["search", *common, f"hydra.run.dir={tmp_path / 'a'}"]) == 0
    capsys.readouterr()
    assert main(["search", *common, f"hydra.run.dir={tmp_path / 'b'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid search configuration:\n  - tracking.uri: study 'tiny-clusters' in "
                          f"{shared} keeps its MLflow runs elsewhere: its parent run ") and err.endswith(
        f"is not in sqlite:///{tmp_path / 'b' / 'mlflow.db'}; give the tracking.uri= it was searched with\n"), err
    assert not (tmp_path / "b").exists()
    assert main(["search", *common, f"hydra.run.dir={tmp_path / 'b'}",
                 f"tracking.uri=sqlite:///{tmp_path / 'a' / 'mlflow.db'}"]) == 0  # with it, the study resumes


def test_a_sweep_without_multirun_and_multirun_with_cfg_are_one_message(tmp_path, monkeypatch, capsys):
    """search_space=tiny,default without -m was told to quote the value (which then named no option); -m with
    --cfg gave Hydra's ValueError traceback."""
    monkeypatch.chdir(tmp_path)
    assert main(["search", "+experiment=tiny", "search_space=tiny,default"]) == 2
    assert capsys.readouterr().err == ("error: invalid search configuration:\n  - search_space=tiny,default: a sweep "
                                       "over several options: add --multirun (-m) to run one search for each, or "
                                       "give one option\n")
    assert main(["search", "-m", "+experiment=tiny", "study.seed=0,1", "--cfg", "job"]) == 2
    assert capsys.readouterr().err == ("error: Only one of --run, --multirun, --cfg, --info and --shell_completion "
                                       "can be specified\n")
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_runs_a_study_in_each_job_folder_and_resumes_in_it(tmp_path, monkeypatch, capsys):
    """docs/search.md, "Sweeps": a study in each job's folder, each job's summary naming that folder, and the same
    command with the sweep's folder resuming each job."""
    monkeypatch.chdir(tmp_path)
    command = ["search", "--multirun", "+experiment=tiny", "study.seed=0,1", "hydra.sweep.dir=sweeps/seeds",
               "study.n_trials=1", "trainer.steps=5", "study.pruner=none"]
    assert main(command) == 0
    out = capsys.readouterr().out
    for job in ("0", "1"):
        folder = tmp_path / "sweeps" / "seeds" / job
        study = optuna.load_study(study_name="tiny-clusters", storage=f"sqlite:///{folder / 'optuna.db'}")
        assert len(study.trials) == 1 and (folder / "mlflow.db").is_file()
        assert f"results: {folder}  |  MLflow: fulu-nas ui {folder}" in out
    assert main(command) == 0
    assert capsys.readouterr().out.count("already has 1 finished trial of the 1 requested: nothing to train") == 2


def test_a_sweep_goes_on_past_a_job_without_result_and_lists_its_jobs(tmp_path, monkeypatch, capsys):
    """A job whose every trial failed stopped the sweep (Hydra's launcher ends it at the first job that exits),
    leaving the later jobs unrun; nothing listed the jobs' outcomes at the end."""
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--multirun", "+experiment=tiny", "trainer.lr=1000,0.003", "hydra.sweep.dir=sweep",
                 "study.n_trials=1", "trainer.steps=5", "study.pruner=none", "trainer.divergence_factor=1.01"]) == 1
    out = capsys.readouterr().out
    folder = tmp_path / "sweep"
    study = optuna.load_study(study_name="tiny-clusters", storage=f"sqlite:///{folder / '1' / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
    loss = study.trials[0].values[0]
    assert out.splitlines()[-3:] == [
        f"sweep of 2 jobs in {folder}:",
        f"  job 0 trainer.lr=1000: no trial completed (exit code 1)  ->  {folder / '0'}",
        f"  job 1 trainer.lr=0.003: best trial 0: loss={loss:.4g}  ->  {folder / '1'}"]


def test_an_interrupted_sweep_stops_and_lists_the_jobs_it_did_not_start(tmp_path, monkeypatch, capsys):
    from fulu_nas.search import study

    codes = iter([0, study.INTERRUPTED])
    monkeypatch.setattr(study, "run_search", lambda settings: next(codes))
    monkeypatch.chdir(tmp_path)
    assert main(["search", "-m", "+experiment=tiny", "study.seed=0,1,2", "hydra.sweep.dir=sweep"]) == 130
    folder = tmp_path / "sweep"
    assert capsys.readouterr().out.splitlines()[-4:] == [
        f"sweep of 3 jobs in {folder}:",
        f"  job 0 study.seed=0: done  ->  {folder / '0'}",
        f"  job 1 study.seed=1: interrupted (exit code 130)  ->  {folder / '1'}",
        f"  1 job not started: run the same command with hydra.sweep.dir={folder} to resume the sweep"]


def test_a_damaged_database_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """A file that is not a SQLite database (or a folder) as the study's or the tracking database failed
    only after the search had written its folder; the tracking one with a traceback, exit 1."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "damaged.db").write_bytes(b"not a database" * 100)
    (tmp_path / "a_folder").mkdir()
    for override in ("study.storage=sqlite:///damaged.db", "tracking.uri=sqlite:///damaged.db",
                     "study.storage=sqlite:///a_folder"):
        assert main(["search", "+experiment=tiny", override]) == 2
        err = capsys.readouterr().err
        assert "is not a SQLite database" in err and "[SQL:" not in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder", "damaged.db"]


def users_space(tmp_path: Path, name: str, space: dict | str) -> tuple[Path, list[str]]:
    """``space`` (a mapping, or YAML text as it is) saved as search space ``name`` of a config folder of
    the user's own; returns an empty working folder and the arguments that select the space."""
    spaces = tmp_path / "my_conf" / "search_space"
    spaces.mkdir(parents=True, exist_ok=True)
    (spaces / f"{name}.yaml").write_text(space if isinstance(space, str) else yaml.safe_dump(space))
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return work, ["--config-dir", str(tmp_path / "my_conf"), f"search_space={name}"]


def problems_in(err: str) -> list[str]:
    """The listed problems of an ``error: invalid search configuration`` message (nothing else may be printed)."""
    lines = err.strip().splitlines()
    assert lines[0] == "error: invalid search configuration:", err
    assert all(line.startswith("  - ") for line in lines[1:]), err
    return [line[4:] for line in lines[1:]]


def test_a_users_own_space_outside_the_repo_is_validated_the_same_way(tmp_path, monkeypatch, capsys):
    work, args = users_space(tmp_path, "mine", BAD_SPACE)
    monkeypatch.chdir(work)
    assert main(["search", *args]) == 2
    assert "search_space.params.num_experts: low (16) > high (4)" in capsys.readouterr().err
    assert list(work.iterdir()) == []


def test_malformed_yaml_is_one_message_naming_the_file_and_line(tmp_path, monkeypatch, capsys):
    # the flow mapping of line 3 is never closed
    text = ("name: broken\nparams:\n  router: {type: categorical, choices: [topk, hash]\n"
            "  top_k: {type: int, low: 1, high: 2}\n")
    work, args = users_space(tmp_path, "broken", text)
    monkeypatch.chdir(work)
    assert main(["search", *args]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert str(tmp_path / "my_conf" / "search_space" / "broken.yaml") in problem and "line 3" in problem, problem
    assert list(work.iterdir()) == []
    # a file in another encoding than UTF-8 (Latin-1 here) was Hydra's UnicodeDecodeError traceback
    (tmp_path / "my_conf" / "search_space" / "broken.yaml").write_bytes('name: "R\xe9sum\xe9"\n'.encode("latin-1"))
    assert main(["search", *args]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert problem.startswith(f"{tmp_path / 'my_conf' / 'search_space' / 'broken.yaml'}: not UTF-8 text"), problem
    assert list(work.iterdir()) == []


# Fixed fields of one small block, for the spaces below.
BLOCK = {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "moe_every": 1, "dense_ffn_size": 64}


def categorical(*choices, **spec) -> dict:
    return {"type": "categorical", "choices": list(choices), **spec}


ROUTER = categorical("topk", "hash")
# Spaces of which no sample, or no sample with one of the choices, is a feasible architecture; and
# what the one message must say.
INFEASIBLE = {
    "unknown fixed router": ({"base": {**BLOCK, "moe": {"router": "nonsense"}},
                              "params": {"num_experts": categorical(2, 4)}},
                             ["search_space.base.moe.router", "'nonsense'"]),
    "fixed top_k above num_experts": ({"base": {**BLOCK, "moe": {"top_k": 4, "num_experts": 2}},
                                       "params": {"router": ROUTER}},
                                      ["search_space.base.moe.top_k", "search_space.base.moe.num_experts"]),
    "only unknown routers": ({"base": BLOCK, "params": {"router": categorical("nonsense", "bogus")}},
                             ["search_space.params.router.choices", "'nonsense'"]),
    "a typo among routers": ({"base": BLOCK, "params": {"router": categorical("topk", "hsah")}},
                             ["search_space.params.router.choices", "'hsah'"]),
    "a choice its condition makes impossible": (
        {"base": BLOCK, "params": {"router": ROUTER, "top_p": categorical(None, 0.5, when={"router": "hash"})}},
        ["search_space.params.top_p.choices", "0.5"]),
    "a constraint nothing meets": ({"base": BLOCK, "params": {"router": ROUTER,
                                                              "top_k": {"type": "int", "low": 1, "high": 2}},
                                    "constraints": ["top_k > 2"]},
                                   ["search_space", "top_k > 2"]),
}


@pytest.mark.parametrize("case", INFEASIBLE)
def test_a_space_without_feasible_architectures_is_refused(case, tmp_path, monkeypatch, capsys):
    space, texts = INFEASIBLE[case]
    work, args = users_space(tmp_path, "mine", {"name": "mine", **space})
    monkeypatch.chdir(work)
    # a tiny budget, so that a space wrongly accepted fails this test in seconds
    assert main(["search", *args, "task=clusters", "trainer=tiny", "study.n_trials=1"]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert all(text in problem for text in texts), problem
    assert list(work.iterdir()) == []


# Spaces whose values reached the model with the wrong type or not at all: every trial failed (or a
# derived value was dropped) and the search exited 0.
MISTYPED = {
    "a float parameter for an int field": ({"num_experts": {"type": "float", "low": 2, "high": 4}}, {},
                                           ["search_space.params.num_experts.type", "use type: int"]),
    "a derived value that is a fraction": ({"num_experts": categorical(2, 4)}, {"top_k": "num_experts / 2"},
                                           ["search_space.derived.top_k", "expected an integer"]),
    "a derived value that is infinite": ({"num_experts": categorical(2, 4)},
                                         {"routed_scaling_factor": "num_experts * 1e308 * 10"},
                                         ["search_space.derived.routed_scaling_factor", "NaN and infinities"]),
    "a derived value divided by zero": ({"num_experts": categorical(2, 4)}, {"top_k": "num_experts // 0"},
                                        ["search_space.derived.top_k", "ZeroDivisionError"]),
}


@pytest.mark.parametrize("case", MISTYPED)
def test_a_space_whose_values_have_the_wrong_type_is_refused(case, tmp_path, monkeypatch, capsys):
    params, derived, texts = MISTYPED[case]
    work, args = users_space(tmp_path, "mine", {"name": "mine", "base": BLOCK,
                                                "params": {"router": ROUTER, **params}, "derived": derived})
    monkeypatch.chdir(work)
    assert main(["search", *args, "task=clusters", "trainer=tiny", "study.n_trials=1"]) == 2
    err = capsys.readouterr().err
    assert all(text in err for text in texts), err
    assert list(work.iterdir()) == []


def test_a_reference_value_of_the_wrong_type_or_an_empty_space_is_refused(tmp_path, monkeypatch, capsys):
    for name, space, words in (
            ("ref", {"name": "ref", "base": BLOCK, "params": {"router": ROUTER, "num_experts": categorical(2, 4),
                                                              "top_k": {"type": "int", "low": 1, "high": 2}},
                     "reference": {"router": "topk", "num_experts": 4, "top_k": 2.0}},
             "search_space.reference.top_k: expected an integer, got 2.0"),
            ("empty", "", "search_space.params: a space needs at least one parameter")):
        work, args = users_space(tmp_path / name, name, space)
        monkeypatch.chdir(work)
        assert main(["search", *args, "task=clusters", "trainer=tiny", "study.n_trials=1"]) == 2
        assert words in capsys.readouterr().err
        assert list(work.iterdir()) == []


SHIPPED = [f"search_space={p.stem}" for p in sorted((CONF / "search_space").glob("*.yaml"))] + [
    f"+experiment={p.stem}" for p in sorted((CONF / "experiment").glob("*.yaml"))]


# The upcycling space and preset are for task=upcycle, which needs a model: a tiny encoder (the corpus cut
# short, so that its tokenization takes no time).
NEEDS_MODEL = {"search_space=upcycle", "+experiment=upcycle_tiny"}
# Spaces with expert choice, which is not causal: for token classification (a next-token task refuses them).
CLASSIFICATION_SPACES = {"search_space=routers", "search_space=nasbench"}


@pytest.mark.parametrize("override", SHIPPED)
def test_every_shipped_space_and_preset_passes_validation(override, tmp_path, tmp_path_factory, monkeypatch):
    extra = []
    if override in NEEDS_MODEL:
        pytest.importorskip("transformers")
        from .hf_models import save_encoder

        encoder = save_encoder(tmp_path_factory.mktemp("encoder") / "bert", max_position_embeddings=128)
        extra = ["task=upcycle", f"model={encoder}", "task.max_bytes=100000"]
    if override in CLASSIFICATION_SPACES:
        extra = ["task=clusters"]
    if override == "+experiment=gpu" and not torch.cuda.is_available():
        extra = ["trainer.device=auto"]  # the rest of the preset; without a GPU it exits 2 (test below)
    monkeypatch.chdir(tmp_path)
    app.preflight([override, *extra])
    assert list(tmp_path.iterdir()) == []


# Numbers of every section: each (key, value) is not finite or out of range.
NUMBERS = [
    *[(f"trainer.{k}", v) for k in ("lr", "max_seconds") for v in ("nan", "inf", "-1")], ("trainer.lr", "0"),
    *[(f"trainer.{k}", v) for k in ("grad_clip", "weight_decay") for v in ("nan", "inf")],
    *[(f"trainer.{k}", v) for k in ("warmup_fraction", "min_lr_ratio") for v in ("nan", "1.5")],
    *[("trainer.divergence_factor", v) for v in ("nan", "0.5")],
    *[(f"trainer.{k}", v) for k in ("steps", "batch_size", "report_every", "expert_parallel", "cost_iterations",
                                    "cost_rounds")
      for v in ("inf", "0")],
    *[("trainer.seed", v) for v in ("nan", "-1", str(2**64))],
    ("trainer.cost_shapes", "[[1,inf]]"), ("trainer.gradient_checkpointing", "2"),
    ("trainer.cost_compile_while_training", "2"),
    *[(f"study.{k}", v) for k in ("n_trials", "n_workers", "heartbeat_interval", "grace_period") for v in ("inf", "0")],
    *[(f"study.{k}", v) for k in ("startup_trials", "max_retry") for v in ("nan", "-1")],
    *[("study.seed", v) for v in ("nan", str(2**32))],
    *[("study.constraints.latency_ms", v) for v in ("nan", "inf", "0")], ("study.constraints.active_params", "-1"),
    *[("study.confirm.budget_factor", v) for v in ("nan", "inf")], ("study.confirm.top_k", "inf"),
    ("study.confirm.seeds", "nan"),
    ("task.seq_len", "inf"), ("task.max_operand", "nan"), ("task.expression_rate", "nan"), ("task.data_seed", "nan"),
    ("search_space.base.hidden_size", "nan"), ("+search_space.base.norm_eps", "inf"),
    # (a field no parameter of the default space sets: aux_loss_coef is its balancing parameter's)
    ("+search_space.base.moe.routed_scaling_factor", "nan"), ("search_space.params.top_k.high", "inf"),
]


@pytest.mark.parametrize("key,value", NUMBERS, ids=[f"{k}={v}" for k, v in NUMBERS])
def test_numbers_must_be_finite_and_in_range(key, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overrides = ["trainer=tiny", "study.n_trials=1", f"{key}={value}"]
    if key.startswith("study.constraints"):  # the shipped constraints are null: set the mapping whole
        overrides[-1] = f"study.constraints={{{key.rsplit('.', 1)[1]}:{value}}}"
    assert main(["search", *overrides]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert problem.startswith(key.lstrip("+")), problem
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["under a file", "under /proc"])
def test_an_output_folder_that_cannot_be_made_is_one_message(where, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    folder = str(tmp_path / "a_file" / "out") if where == "under a file" else "/proc/fulu-nas/out"
    assert main(["search", "trainer=tiny", "study.n_trials=1", f"hydra.run.dir={folder}"]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert problem.startswith("hydra.run.dir") and folder in problem, problem
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]
    assert not Path("/proc/fulu-nas").exists()


def _limit_memory() -> None:
    # A guard, not the behaviour under test: an unbounded string repetition fails with MemoryError
    # here instead of taking the machine's memory.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


# Expressions whose value is too large to compute; each in its own process, whose timeout is only a
# guard against the hang this refusal prevents.
HUGE = {"a power tower": ("derived", {"expert_ffn_size": "9**9**9**9"}, "search_space.derived.expert_ffn_size"),
        "a string repetition": ("constraints", ["'ab' * 10**10 != ''"], "search_space.constraints[0]")}


@pytest.mark.parametrize("case", HUGE)
def test_expressions_too_large_to_evaluate_are_refused(case, tmp_path):
    section, value, key = HUGE[case]
    work, args = users_space(tmp_path, "huge", {"name": "huge", "base": BLOCK, "params": {"router": ROUTER},
                                                section: value})
    result = subprocess.run([sys.executable, "-c", "import sys; from fulu_nas.cli import main; sys.exit(main())",
                             "search", *args, "task=clusters", "trainer=tiny", "study.n_trials=1"],
                            cwd=work, capture_output=True, text=True, timeout=300, preexec_fn=_limit_memory)
    assert result.returncode == 2, result.stderr[-2000:]
    [problem] = problems_in(result.stderr)
    assert problem.startswith(key) and "too large" in problem, problem
    assert list(work.iterdir()) == []


def test_storage_passwords_stay_out_of_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "study.storage=postgresql://user:hunter2@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err
    assert "study.storage" in err and "hunter2" not in err and "***" in err


@pytest.mark.parametrize("url, password", [("postgresql://user:pw@host/db", True), ("postgresql://user@host/db", False),
                                           ("http://user:pw@host:5000", True), ("http://host:5000", False),
                                           ("http://user@host:5000", False),
                                           ("postgresql://user@host/db?password=pw&sslmode=require", True),
                                           ("sqlite:////tmp/out/optuna.db", False), ("journal:///tmp/j.log", False)])
def test_urls_with_a_password_are_told_apart(url, password):
    from fulu_nas.search.private_files import holds_password

    assert holds_password("sqlite:///mlflow.db", url) is password


def test_a_password_given_as_the_drivers_query_parameter_is_masked_and_left_out_of_printed_commands():
    from fulu_nas.checks import mask_url, url_without_password

    url = "postgresql://user@host/db?password=pw&sslmode=require"
    assert mask_url(url) == "postgresql://user@host/db?password=***&sslmode=require"
    assert url_without_password(url) == "postgresql://user@host/db?sslmode=require"


def test_a_private_config_replaces_a_file_others_could_read(tmp_path):
    """A resume that now names its database with a password rewrites the file the first run left 0644."""
    import stat

    from fulu_nas.search.private_files import write_config

    path = tmp_path / "search_config.json"
    write_config(path, "{}", private=False)
    path.chmod(0o644)
    write_config(path, '{"url": "postgresql://u:pw@h/db"}', private=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and "pw@" in path.read_text()


def test_a_search_config_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    """Another user's folder whose search_config.json is kept to its owner: named as unreadable, not as
    "not valid JSON"."""
    from fulu_nas.search.locate import _read_search_config

    path = tmp_path / "search_config.json"
    path.write_text("{}")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(FuluConfigError, match=r"cannot read .*search_config.json \(Permission denied\)"):
        _read_search_config(path)


def test_cfg_job_prints_the_composed_config_without_running(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--cfg", "job", "--resolve", "search_space=routers", "task=clusters"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["search_space"]["name"] == "routers" and cfg["task"]["name"] == "clusters"
    assert cfg["study"]["name"] == "routers-clusters"
    assert not (tmp_path / "outputs").exists()


def test_help_lists_commands_and_hydra_groups(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("search", "confirm", "export", "serve", "ui", "dashboard", "bench"):
        assert f"  {command} " in out
    assert main(["search", "--help"]) == 0
    out = capsys.readouterr().out
    groups = ("search_space: default, gpu, nasbench, routers, scaling, tiny, upcycle", "experiment: gpu, tiny",
              "study:", "task:", "trainer: default, gpu, tiny", "tracking:")
    for group in groups:
        assert group in out, out


@pytest.mark.parametrize("argv", [["--help"], ["dashboard", "--help"], ["confirm", "--help"], ["search", "--help"]])
def test_help_into_a_closed_pipe_ends_without_a_traceback(argv, tmp_path):
    """`fulu-nas dashboard --help | head -1` printed a BrokenPipeError traceback once head had gone. Here the
    pipe has no reader from the start, so every write fails."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-c", "import sys; from fulu_nas.cli import main; sys.exit(main())",
                                 *argv], stdout=write, stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=300)
    finally:
        os.close(write)
    assert result.returncode == 141 and result.stderr == "", result.stderr[-2000:]


SIGNAL_WHILE_LOADING = """
import os, signal, sys
import fulu_nas.cli as cli
where, signals = sys.argv[1], [getattr(signal, name) for name in sys.argv[2].split(",")]
def arrive():
    for sig in signals:
        os.kill(os.getpid(), sig)
if where == "command":  # as the command's modules start to import
    step = cli._command_main
    def loading(*args):
        arrive()
        return step(*args)
    cli._command_main = loading
else:  # as MLflow starts to import, wherever that is
    class SignalOnImport:
        def find_spec(self, name, path=None, target=None):
            if name == "mlflow":
                arrive()
            return None
    sys.meta_path.insert(0, SignalOnImport())
sys.exit(cli.main(["serve", "no-such-folder"]))
"""


@pytest.mark.parametrize("signals", ["SIGTERM", "SIGHUP", "SIGINT", "SIGINT,SIGTERM"])
@pytest.mark.parametrize("where", ["command", "mlflow"])
def test_a_signal_while_a_command_loads_its_libraries_is_a_ctrl_c_once_they_have(tmp_path, where, signals):
    """A SIGTERM or SIGHUP in `fulu-nas serve`'s first seconds (torch, then MLflow importing) ended it by the
    default action (143, no word); a Ctrl-C there, raised inside numpy's import, left numpy half-loaded and
    gave a traceback ('cannot load module more than once per process'). The signals are held until the
    libraries have loaded, then stop the command as a Ctrl-C does: 'interrupted', exit code 130, before it
    does anything."""
    result = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_LOADING, where, signals], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 130 and result.stderr == "interrupted\n", (result.returncode, result.stderr[-2000:])
    assert result.stdout == ""


def test_held_signals_come_back_as_one_ctrl_c_and_ignored_ones_stay_ignored():
    """Held: noted, then one KeyboardInterrupt when the block ends, the handlers before it back. Ignored (nohup's
    SIGHUP, a background job's SIGINT): a command under nohup stopped with 130 at a SIGHUP while it loaded."""
    import os
    import signal

    from fulu_nas.signals import held

    def own(signum, frame):
        raise AssertionError("the handler before the block ran inside it")

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGTERM, own)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with held():
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing comes of it
        with pytest.raises(KeyboardInterrupt):
            with held():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # twice: still one interrupt, at the end
                reached_the_end = True
        assert reached_the_end
        assert signal.getsignal(signal.SIGTERM) is own and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        # a block that may wait long (a search opening its study on a server that does not answer): the second
        # signal acts at once, so that a user who insists needs no kill -9
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with held(second_acts=True):
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("first")
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("second")
        assert reached == ["first"] and signal.getsignal(signal.SIGTERM) is own
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_confirm_and_export_help_list_their_options_wherever_help_stands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv, options in ((["confirm", "--help"], ("top_k=", "budget_factor=", "seeds=", "n_workers=")),
                          (["export", "study.name=x", "--help"], ("trial=", "retrain=", "retrain_factor=", "out=",
                                                                   "name="))):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert all(option in out for option in options), (argv, out)
    assert not (tmp_path / "outputs").exists()


def test_ui_refuses_a_folder_without_a_tracking_database(tmp_path, capsys):
    assert main(["ui", str(tmp_path)]) == 2
    assert "no MLflow database" in capsys.readouterr().err
    # each of these printed a traceback, or created a folder and an empty database, and exited 0 or 1
    for argv, words in ((["--tracking-uri", "foo://x"], "unsupported scheme"),
                        (["--tracking-uri", f"sqlite:///{tmp_path}/nowhere/x.db"], "does not exist"),
                        ([str(tmp_path), "--port", "99999"], "port number in 1..65535")):
        assert main(["ui", *argv]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()
    # a damaged database in the folder: the address, then the server's 66-line traceback, exit 1
    (tmp_path / "mlflow.db").write_text("not a database")
    assert main(["ui", str(tmp_path)]) == 2
    assert "is not a SQLite database" in capsys.readouterr().err
    (tmp_path / "mlflow.db").write_bytes(b"")  # an empty file would be made an MLflow database
    assert main(["ui", str(tmp_path)]) == 2
    assert "is not an MLflow tracking database" in capsys.readouterr().err
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:  # what the check reads of MLflow's
        db.execute("CREATE TABLE experiments (experiment_id INTEGER)")
    for command in (["ui", str(tmp_path)], ["serve", str(tmp_path)]):  # it named --port
        assert main([*command, "--host", "999.1.1.1"]) == 2
        assert "--host: cannot listen on 999.1.1.1:" in capsys.readouterr().err
    with socket.socket() as taken:  # a port in use: the server printed a traceback and the command exited 0
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for command in (["ui", str(tmp_path)], ["serve", str(tmp_path)]):
            assert main([*command, "--port", str(taken.getsockname()[1])]) == 2
            assert "--port: cannot listen on 127.0.0.1:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_the_gpu_preset_without_a_gpu_exits_2_naming_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "+experiment=gpu"]) == 2
    assert problems_in(capsys.readouterr().err) == [
        f"trainer.device: 'cuda': torch {torch.__version__} sees no CUDA device here; use trainer.device=auto or cpu"]
    assert list(tmp_path.iterdir()) == []


# The trainer's own message for a step that cannot be replayed from a CUDA graph, before the reasons.
NO_GRAPH = "trainer.cuda_graph=true is impossible here: "


@pytest.mark.parametrize("override,reason", [("trainer.device=cpu", "it needs a CUDA device"),
                                             ("trainer.expert_parallel=2", "expert-parallel ranks"),
                                             ("trainer.gradient_checkpointing=true", "gradient checkpointing")])
def test_a_cuda_graph_that_no_trial_could_capture_is_refused(override, reason, tmp_path, monkeypatch, capsys):
    """Every trial failed with the trainer's error, and the search exited 0 with its folder written."""
    monkeypatch.chdir(tmp_path)
    assert main(["search", "+experiment=tiny", "trainer.cuda_graph=true", override]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert problem.startswith(NO_GRAPH) and reason in problem, problem
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_graph_true_without_a_gpu_exits_2_naming_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "+experiment=tiny", "trainer.cuda_graph=true"]) == 2
    assert problems_in(capsys.readouterr().err) == [NO_GRAPH + "it needs a CUDA device"]
    assert list(tmp_path.iterdir()) == []


def test_when_the_served_kernels_compile_does_not_change_a_trials_cache_key(tmp_path):
    """Whether the kernels compile beside training or during the measurement, a resumed study reuses
    the same trials; the cost protocol itself (rounds) is part of the key."""
    from fulu_nas.search.objective import cache_key
    from fulu_nas.search.settings import load_settings

    def key(*overrides):
        s = load_settings(*app.compose_config(["+experiment=tiny", f"hydra.run.dir={tmp_path}", *overrides]))
        assert s.cost.compile_while_training == ("trainer.cost_compile_while_training=false" not in overrides)
        return cache_key(s, "an-architecture")

    assert key() == key("trainer.cost_compile_while_training=false")
    assert key() != key("trainer.cost_rounds=3")


@pytest.mark.slow
def test_the_searchs_own_config_dir_and_space_locate_its_study_for_every_command(tmp_path, monkeypatch, capsys):
    """A search of a space of the user's own, then dashboard, export and confirm given the same
    arguments: ``--config-dir`` was a Hydra grammar error for them (and without it the space did not
    compose)."""
    tiny = yaml.safe_load((Path(__file__).resolve().parents[1] / "fulu_nas" / "conf" / "search_space" /
                           "tiny.yaml").read_text())
    work, args = users_space(tmp_path, "mine", tiny)
    monkeypatch.chdir(work)
    base = ["+experiment=tiny", "study.n_trials=2", "study.name=mine", *args]
    assert main(["search", *base]) == 0
    assert main(["dashboard", *base]) == 0
    assert main(["export", *base, f"out={tmp_path / 'model'}"]) == 0
    assert main(["confirm", *base, "top_k=1", "seeds=1", "budget_factor=1"]) == 0
    capsys.readouterr()
    assert main(["dashboard", "study.name=mine", "--config-dir", str(tmp_path / "nowhere")]) == 2
    assert "--config-dir: " in capsys.readouterr().err


def test_the_command_starts_without_torch_and_a_ctrl_c_while_torch_loads_stops_it_quietly(tmp_path):
    """A Ctrl-C in a command's first second, while Python imports torch, printed Python's traceback:
    the entry point imports nothing heavy, and an interrupt before a command handles its own is exit
    130 with one line."""
    script = tmp_path / "interrupt_torch_import.py"
    script.write_text(
        "import importlib.abc, sys\n"
        "class Interrupt(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from fulu_nas.cli import main\n"  # what the console script does
        "assert 'torch' not in sys.modules\n"
        "sys.exit(main(['bench', 'layer', '--tokens', '4']))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip() == "interrupted"
    assert done.stdout == ""


@pytest.mark.parametrize("option", ["inf", "nan", "123", "true", "null"])
def test_a_group_option_yaml_reads_as_no_string_is_one_message(option, tmp_path, monkeypatch, capsys):
    """Hydra's ValueError ("Config group override must be a string") was a traceback and exit 1."""
    work, args = users_space(tmp_path, option, (CONF / "search_space" / "tiny.yaml").read_text())
    monkeypatch.chdir(work)
    assert main(["search", *args, "+experiment=tiny"]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert problem.startswith(f"search_space={option}: ") and f"\"search_space='{option}'\"" in problem, problem
    assert list(work.iterdir()) == []


def test_an_int_parameter_whose_condition_never_holds_is_refused(tmp_path, monkeypatch, capsys):
    """The same condition on a categorical parameter was refused; on an int one, it was a dead dimension."""
    params = {"router": categorical("topk", "attention"),
              "attention_context": categorical(False, True, when={"router": "attention"}),
              "attention_heads": {"type": "int", "low": 1, "high": 2,
                                  "when": {"router": "topk", "attention_context": True}}}
    space = yaml.safe_dump({"name": "mine", "base": BLOCK, "params": params}, sort_keys=False)  # parents first
    work, args = users_space(tmp_path, "mine", space)
    monkeypatch.chdir(work)
    assert main(["search", *args, "task=clusters", "trainer=tiny", "study.n_trials=1"]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert problem.startswith("search_space.params.attention_heads: ") and "never hold together" in problem, problem
    assert list(work.iterdir()) == []


def test_a_fixed_value_added_for_a_sampled_field_is_refused(tmp_path, monkeypatch, capsys):
    """The sampled router was trained, the fixed one dropped without a word."""
    monkeypatch.chdir(tmp_path)
    assert main(["search", "+experiment=tiny", "+search_space.base.moe.router=hash"]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert "search_space.base.moe.router" in problem and "search_space.params.router" in problem, problem
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("preset,override,advice", [
    # a key the space's mapping may hold but does not yet: Hydra's "+" was the right advice
    ("search_space=default", "search_space.params.hierarchy_depth.step=1",
     "+search_space.params.hierarchy_depth.step=1"),
    # an entry that exists (categorical in tiny): a mapping given for it is merged into it, so it is
    # replaced by removing it first
    ("+experiment=tiny", "search_space.params.top_k={type:int,low:1,high:2}", "~search_space.params.top_k"),
])
def test_a_key_a_space_may_hold_is_not_called_misspelt(preset, override, advice, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", preset, override]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert problem.startswith(override.split("=")[0] + ": ") and advice in problem, problem
    assert "spelling" not in problem, problem
    assert list(tmp_path.iterdir()) == []


def test_a_space_without_a_name_gives_the_study_its_name(tmp_path, monkeypatch):
    space = yaml.safe_load((CONF / "search_space" / "tiny.yaml").read_text())
    del space["name"]
    work, args = users_space(tmp_path, "noname", space)
    settings = app.preflight([*args, "+experiment=tiny", f"hydra.run.dir={work / 'out'}"])
    assert settings.study.name == f"{settings.space.name}-clusters", (settings.study.name, settings.space.name)
