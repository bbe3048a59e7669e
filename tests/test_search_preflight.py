"""``fulu-nas search``'s pre-flight: what it refuses before Hydra writes anything (exit code 2, one
message, no folder, no study, no run), and what it must keep accepting.

- a derived value that cannot be computed for some samples of the space (it was checked only up to the
  first feasible draw, then stopped the study mid-way when a trial drew such a sample);
- ``study.grace_period`` not above ``study.heartbeat_interval`` (live trials were failed as stale);
- a resume refused as bad input (another budget, objectives...), which had already written the new
  output folder's ``.hydra/`` and ``search.log``, or rewritten the study folder's ``.hydra/``;
- every trainer key the settings accept can be set as ``key=value``, and a study made before
  ``trainer.cost_rounds`` and ``trainer.divergence_factor`` were in the trainer configs still resumes.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import fields
from pathlib import Path

import optuna
import pytest
import yaml

from fulu_nas.cli import main
from fulu_nas.errors import FuluConfigError
from fulu_nas.search import app
from fulu_nas.search.settings import _COST_FIELDS, _TRAIN_FIELDS, CostSettings
from fulu_nas.training.train import TrainConfig

CONF = Path(app.__file__).resolve().parents[1] / "conf"
STUDY = "tiny-clusters"
# A search of one trial that takes seconds.
QUICK = ["+experiment=tiny", "study.n_trials=1", "trainer.steps=5", "trainer.report_every=5"]


def problems_in(err: str) -> list[str]:
    """The listed problems of an ``error: invalid search configuration`` message (nothing else may be printed)."""
    lines = err.strip().splitlines()
    assert lines[0] == "error: invalid search configuration:", err
    assert all(line.startswith("  - ") for line in lines[1:]), err
    return [line[4:] for line in lines[1:]]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under ``folder``: its content's hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def users_space(tmp_path: Path, space: dict) -> tuple[Path, list[str]]:
    """``space`` saved as search space ``mine`` of a config folder of the user's own; an empty working
    folder and the arguments that select the space."""
    spaces = tmp_path / "my_conf" / "search_space"
    spaces.mkdir(parents=True)
    (spaces / "mine.yaml").write_text(yaml.safe_dump({"name": "mine", **space}))
    work = tmp_path / "work"
    work.mkdir()
    return work, ["--config-dir", str(tmp_path / "my_conf"), "search_space=mine"]


# --- derived values that fail for some samples --------------------------------------------------------

BLOCK = {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "moe_every": 1, "dense_ffn_size": 64}
BROKEN_DERIVED = {
    # the audit's space: one num_experts of seven divides by zero
    "one value of seven": ({"num_experts": {"type": "int", "low": 2, "high": 8},
                            "top_k": {"type": "int", "low": 1, "high": 2}},
                           "8 * max(1, 64 // (num_experts - 5))", {"num_experts": 5}),
    # one value of 399, which 200 random draws miss: the discrete values the expression reads are all tried
    "one value of 399": ({"num_experts": {"type": "int", "low": 2, "high": 400},
                          "top_k": {"type": "int", "low": 1, "high": 2}},
                         "8 * max(1, 64 // (num_experts - 317))", {"num_experts": 317}),
    # the value behind a condition: only where the parameter is active
    "a conditional parameter": ({"router": {"type": "categorical", "choices": ["topk", "hash"]},
                                 "num_experts": {"type": "int", "low": 2, "high": 8},
                                 "top_k": {"type": "int", "low": 1, "high": 2, "when": {"router": "topk"}}},
                                "8 * max(1, 64 // (num_experts * top_k - 14))", {"num_experts": 7, "top_k": 2}),
}


@pytest.mark.parametrize("case", BROKEN_DERIVED)
def test_a_derived_value_that_cannot_be_computed_for_some_samples_is_refused(case, tmp_path, monkeypatch, capsys):
    """It passed the pre-flight (which stopped at the first feasible draw); the study then stopped with
    exit 2 at the first trial that drew such a sample, its parent run left RUNNING."""
    params, expression, sample = BROKEN_DERIVED[case]
    space = {"base": {**BLOCK, "moe": {"router": "topk"}} if "router" not in params else BLOCK, "params": params,
             "derived": {"expert_ffn_size": expression}}
    work, args = users_space(tmp_path, space)
    monkeypatch.chdir(work)
    assert main(["search", *args, "task=clusters", "trainer=tiny", "study.n_trials=2", "study.sampler=random",
                 "trainer.steps=5", f"hydra.run.dir={work / 'out'}"]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert problem.startswith(f"search_space.derived.expert_ffn_size: {expression!r} cannot be computed for "), problem
    assert "ZeroDivisionError" in problem, problem
    assert all(f"{name!r}: {value!r}" in problem for name, value in sample.items()), problem
    assert list(work.iterdir()) == []


def test_a_derived_value_computable_for_every_sample_still_passes(tmp_path, monkeypatch):
    space = {"base": BLOCK, "params": {"router": {"type": "categorical", "choices": ["topk", "hash"]},
                                       "num_experts": {"type": "int", "low": 2, "high": 400},
                                       "top_k": {"type": "int", "low": 1, "high": 2, "when": {"router": "topk"}}},
             "derived": {"expert_ffn_size": "8 * max(1, 64 // (num_experts - 1))"}}
    work, args = users_space(tmp_path, space)
    monkeypatch.chdir(work)
    settings = app.preflight([*args, "task=clusters", "trainer=tiny", f"hydra.run.dir={work / 'out'}"])
    assert settings.space.name == "mine"
    assert list(work.iterdir()) == []


def test_the_latency_reference_is_the_reference_trials_architecture_derived_values_included(tmp_path,
                                                                                               monkeypatch):
    """The model every trial's latency_ratio divides by was built from the reference's sampled values
    alone: in the scaling space (expert_ffn_size derived as 256 // top_k) it had FFN 2048 where the
    reference trial trains 128, so the reference trial's own ratio read 0.48, not 1."""
    import torch

    from fulu_nas.search.objective import reference_model

    monkeypatch.chdir(tmp_path)
    s = app.preflight(["+experiment=tiny", "search_space=scaling", f"hydra.run.dir={tmp_path / 'out'}"])
    trained = s.space.arch(s.space.with_derived(s.space.reference), s.task)  # as trial 0 trains it
    assert trained.moe.expert_ffn_size == 128
    model = reference_model(s, torch.device("cpu"))
    assert model.arch == trained and model.arch.content_hash() == trained.content_hash()


# --- heartbeats ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("heartbeat,grace", [(5, 5), (5, 1), (30, 20)])
def test_a_grace_period_not_above_the_heartbeat_interval_is_refused(heartbeat, grace, tmp_path, monkeypatch, capsys):
    """Optuna failed trials that were still training as stale (and trained them again)."""
    monkeypatch.chdir(tmp_path)
    assert main(["search", *QUICK, f"study.heartbeat_interval={heartbeat}",
                 f"study.grace_period={grace}"]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert problem.startswith(f"study.grace_period: {grace} must be above study.heartbeat_interval ({heartbeat})"), \
        problem
    assert list(tmp_path.iterdir()) == []


def test_a_grace_period_above_the_heartbeat_interval_passes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = app.preflight(["+experiment=tiny", "study.heartbeat_interval=5", "study.grace_period=6"])
    assert (settings.study.heartbeat_interval, settings.study.grace_period) == (5, 6)
    assert list(tmp_path.iterdir()) == []


# --- studies made before -------------------------------------------------------------------------------

NEW_TRAINER_KEYS = ("cost_rounds", "divergence_factor")


def config_before(root: Path) -> Path:
    """A config folder with trainer ``before_tiny``: trainer=tiny as it was before the trainer configs held
    cost_rounds and divergence_factor."""
    before = {k: v for k, v in yaml.safe_load((CONF / "trainer" / "default.yaml").read_text()).items()
              if k not in NEW_TRAINER_KEYS}
    before.update({k: v for k, v in yaml.safe_load((CONF / "trainer" / "tiny.yaml").read_text()).items()
                   if k != "defaults"})
    (root / "before" / "trainer").mkdir(parents=True)
    (root / "before" / "trainer" / "before_tiny.yaml").write_text(yaml.safe_dump(before))
    return root / "before"


@pytest.fixture(scope="module")
def made_before(tmp_path_factory) -> Path:
    """A study of one trial, searched into its folder (the default SQLite storage) with the trainer config
    of before the new keys."""
    root = tmp_path_factory.mktemp("before")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["search", "--config-dir", str(config_before(root)), *QUICK, "trainer=before_tiny",
                     f"hydra.run.dir={root / 'out'}"]) == 0
    return root / "out"


@pytest.fixture(scope="module")
def journal_study(tmp_path_factory) -> Path:
    """A study of one trial in a journal file; returns the file."""
    root = tmp_path_factory.mktemp("journal")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["search", *QUICK, f"study.storage=journal://{root / 'j.log'}",
                     f"hydra.run.dir={root / 'first'}"]) == 0
    return root / "j.log"


def trials_of(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=storage).trials


# --- refused resumes write nothing ---------------------------------------------------------------------

REFUSED = {
    "another budget": (["trainer.steps=6"], "study.name: study 'tiny-clusters'", "was created with another trainer;"),
    "another space": (["search_space.base.hidden_size=64"], "study.name: study 'tiny-clusters'",
                      "was created with another search_space;"),
    "another cost_rounds": (["trainer.cost_rounds=3"], "study.name: study 'tiny-clusters'",
                            "was created with another trainer;"),
    # the pruner compares each report's smoothed loss, a moving average over the reports
    "another report_every": (["trainer.report_every=1"], "study.name: study 'tiny-clusters'",
                             "was created with another trainer;"),
    "other objectives": (["study.objectives=[loss,latency_ms]", "study.pruner=none"],
                         "study.objectives: study 'tiny-clusters'", "with other objectives"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_resume_leaves_the_study_folder_as_it_was(case, made_before, tmp_path, monkeypatch, capsys):
    """The refusal came from the job, after Hydra had rewritten the folder's .hydra/ with the refused
    overrides (and appended to search.log)."""
    overrides, start, words = REFUSED[case]
    out = tmp_path / "out"
    shutil.copytree(made_before, out)
    before = snapshot(out)
    monkeypatch.chdir(tmp_path)
    assert main(["search", *QUICK, f"hydra.run.dir={out}", *overrides]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert problem.startswith(start) and words in problem, problem
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_resume_in_a_journal_writes_no_folder(case, journal_study, tmp_path, monkeypatch, capsys):
    """A study shared through a journal, resumed from another folder: that folder's .hydra/ and search.log
    were written before the refusal."""
    overrides, start, words = REFUSED[case]
    journal = tmp_path / "j.log"
    shutil.copy2(journal_study, journal)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["search", *QUICK, f"study.storage=journal://{journal}", f"hydra.run.dir={tmp_path / 'second'}",
                 *overrides]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert problem.startswith(start) and words in problem, problem
    assert snapshot(tmp_path) == before


def test_the_preflight_opens_studies_and_storages_without_writing(made_before, journal_study, tmp_path,
                                                                  monkeypatch):
    """A study that does not exist yet (in an existing storage or none), and one resumed as it was, pass
    without a file made or changed."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(made_before, out)
    shutil.copy2(journal_study, tmp_path / "j.log")
    (tmp_path / "empty.db").touch()  # not an Optuna database yet: the search makes its tables
    before = snapshot(tmp_path)
    for overrides in ([f"hydra.run.dir={out}", "study.n_trials=2"],  # the same study, extended
                      [f"hydra.run.dir={out}", "study.name=another", "trainer.steps=6"],
                      [f"study.storage=journal://{tmp_path / 'j.log'}", "study.name=another", "trainer.steps=6"],
                      # resumed with the tracking database its runs are in (another is refused: see test_search_cli)
                      [f"study.storage=journal://{tmp_path / 'j.log'}", "study.n_trials=2",
                       f"tracking.uri=sqlite:///{journal_study.parent / 'first' / 'mlflow.db'}"],
                      [f"study.storage=journal://{tmp_path / 'new.log'}"],
                      [f"study.storage=sqlite:///{tmp_path / 'new.db'}"],
                      [f"study.storage=sqlite:///{tmp_path / 'empty.db'}"]):
        settings = app.preflight(["+experiment=tiny", "trainer.steps=5", "trainer.report_every=5",
                                  f"hydra.run.dir={tmp_path / 'unused'}", *overrides])
        assert settings.study.n_trials >= 1
        assert snapshot(tmp_path) == before, overrides


# --- trainer keys --------------------------------------------------------------------------------------

def test_every_trainer_key_the_settings_accept_is_in_the_default_trainer_config():
    """docs/search.md: any key can be set as key=value; trainer.cost_rounds could only be added with +,
    and then changed the study's fingerprint although it was the default."""
    default = yaml.safe_load((CONF / "trainer" / "default.yaml").read_text())
    assert set(default) == _TRAIN_FIELDS | _COST_FIELDS
    code_defaults = {"cost_rounds": {f.name: f.default for f in fields(CostSettings)}["rounds"],
                     "divergence_factor": {f.name: f.default for f in fields(TrainConfig)}["divergence_factor"]}
    assert {k: default[k] for k in NEW_TRAINER_KEYS} == code_defaults


@pytest.mark.parametrize("trainer", ["default", "tiny", "gpu"])
def test_cost_rounds_and_divergence_factor_are_set_as_key_value(trainer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = [f"trainer={trainer}", "trainer.device=auto"]
    settings = app.preflight([*base, "trainer.cost_rounds=3", "trainer.divergence_factor=4"])
    assert (settings.cost.rounds, settings.train.divergence_factor) == (3, 4)
    plain = app.preflight(base)
    # the defaults, given or not, are the same study; another value is another study
    at_default = app.preflight([*base, "trainer.cost_rounds=5", "trainer.divergence_factor=10"])
    if trainer != "gpu":  # the GPU preset's cost_rounds is 3
        assert at_default.fingerprint() == plain.fingerprint()
    assert settings.fingerprint() != plain.fingerprint()
    assert list(tmp_path.iterdir()) == []


def test_a_study_made_before_the_new_trainer_keys_resumes(made_before, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(made_before, out)
    monkeypatch.chdir(tmp_path)
    for n, given in ((2, []), (3, ["trainer.cost_rounds=5", "trainer.divergence_factor=10"])):
        assert main(["search", *QUICK, f"hydra.run.dir={out}", f"study.n_trials={n}", *given]) == 0
        assert len(trials_of(f"sqlite:///{out / 'optuna.db'}")) == n
    capsys.readouterr()


def test_a_study_made_while_report_every_was_free_resumes_and_then_keeps_it(tmp_path, monkeypatch):
    """Studies kept report_every out of their fingerprint: such a study resumes (with any report_every,
    as it did), and holds the one it resumed with from then on."""
    from fulu_nas.search.study import FINGERPRINT_ATTR, open_study, quiet_optuna

    monkeypatch.chdir(tmp_path)
    storage = f"study.storage=sqlite:///{tmp_path / 'optuna.db'}"
    made = app.preflight(["+experiment=tiny", storage, "trainer.report_every=5", f"hydra.run.dir={tmp_path}"])
    with quiet_optuna():
        study = open_study(made)
    study.set_user_attr(FINGERPRINT_ATTR, made.fingerprint(report_every_free=True))  # as it was kept then
    resumed = app.preflight(["+experiment=tiny", storage, "trainer.report_every=2", f"hydra.run.dir={tmp_path}"])
    with quiet_optuna():
        open_study(resumed)
    with pytest.raises(FuluConfigError, match="was created with another trainer;"):
        app.preflight(["+experiment=tiny", storage, "trainer.report_every=5", f"hydra.run.dir={tmp_path}"])


def test_a_study_made_with_a_default_trainer_key_added_by_plus_resumes(tmp_path, monkeypatch):
    """Before the keys were in the trainer configs, +trainer.cost_rounds=5 (the default) was the one way to
    give them, and went into the study's fingerprint: such a study resumes with trainer.cost_rounds=5."""
    from fulu_nas.search.study import open_study, quiet_optuna

    monkeypatch.chdir(tmp_path)
    conf = config_before(tmp_path)
    storage = f"study.storage=sqlite:///{tmp_path / 'optuna.db'}"
    made = app.preflight(["--config-dir", str(conf), "+experiment=tiny", "trainer=before_tiny", storage,
                          "+trainer.cost_rounds=5", "+trainer.divergence_factor=10.0", f"hydra.run.dir={tmp_path}"])
    with quiet_optuna():
        open_study(made)  # what a search of these settings made first
    for given in (["trainer.cost_rounds=5", "trainer.divergence_factor=10.0"], ["trainer.cost_rounds=5"], []):
        app.preflight(["+experiment=tiny", storage, *given, f"hydra.run.dir={tmp_path}"])
    with pytest.raises(FuluConfigError, match="was created with another trainer;"):
        app.preflight(["+experiment=tiny", storage, "trainer.cost_rounds=3", f"hydra.run.dir={tmp_path}"])


# --- a corpus known by its content ---------------------------------------------------------------------

def write_text_corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(4):
        (root / f"f{i}.txt").write_bytes(b"the quick brown fox " * 20 + bytes([65 + i]) * 400)
    return root


def textlm(tmp_path: Path, path: object, *more: str) -> list[str]:
    return ["search_space=tiny", "trainer=tiny", "task=textlm", f"task.path={path}", "task.seq_len=16",
            "study.name=text", f"study.storage=sqlite:///{tmp_path / 'optuna.db'}",
            f"hydra.run.dir={tmp_path / 'out'}", *more]


def test_a_textlm_study_is_tied_to_its_corpus_by_content_and_stores_its_path_resolved(tmp_path, monkeypatch):
    """Other bytes at the same path resumed the study and were compared with trials on the old ones; a
    relative path was stored as typed, and a command run from another folder read another corpus."""
    from fulu_nas.search.objective import cache_key
    from fulu_nas.search.settings import load_settings
    from fulu_nas.search.study import open_study, quiet_optuna

    monkeypatch.chdir(tmp_path)
    write_text_corpus(tmp_path / "corpus")
    made = app.preflight(textlm(tmp_path, "corpus"))
    absolute = str((tmp_path / "corpus").resolve())
    assert made.raw["task"]["path"] == made.task_params["path"] == absolute
    with quiet_optuna():
        open_study(made)
    # the same files in another folder: the same study, the same trials
    shutil.copytree(tmp_path / "corpus", tmp_path / "moved")
    moved = app.preflight(textlm(tmp_path, tmp_path / "moved"))
    assert cache_key(moved, "an-architecture") == cache_key(made, "an-architecture")
    # other bytes at the same path: refused, naming the corpus alone; another trial key
    (tmp_path / "corpus" / "f1.txt").write_bytes(b"0123456789+=" * 70)
    with pytest.raises(FuluConfigError) as err:
        app.preflight(textlm(tmp_path, "corpus"))
    [problem] = err.value.problems
    assert problem.startswith("study.name: study 'text'") and "was created with another corpus (" in problem
    assert "another task" not in problem
    changed = load_settings(*app.compose_config(textlm(tmp_path, "corpus")))
    assert cache_key(changed, "an-architecture") != cache_key(made, "an-architecture")


def test_a_textlm_study_made_before_its_corpus_was_digested_resumes_and_then_keeps_it(tmp_path, monkeypatch):
    """Such a study kept its path as typed and no digest of the corpus: it resumes (what it read then is
    unknown), and is tied to the corpus it resumed with from then on."""
    from fulu_nas.search.settings import _digest
    from fulu_nas.search.study import FINGERPRINT_ATTR, FINGERPRINT_PARTS_ATTR, open_study, quiet_optuna

    monkeypatch.chdir(tmp_path)
    write_text_corpus(tmp_path / "corpus")
    made = app.preflight(textlm(tmp_path, "corpus"))
    with quiet_optuna():
        study = open_study(made)
    before = made.fingerprint_parts(corpus_by_path=True)  # as it was kept then
    assert before["task"]["path"] == "corpus" and "corpus_sha256" not in before
    study.set_user_attr(FINGERPRINT_ATTR, made.fingerprint(corpus_by_path=True))
    study.set_user_attr(FINGERPRINT_PARTS_ATTR, {part: _digest(value) for part, value in before.items()})
    with pytest.raises(FuluConfigError, match="was created with another trainer;"):  # the corpus is not named
        app.preflight(textlm(tmp_path, "corpus", "trainer.steps=7"))
    with quiet_optuna():
        open_study(app.preflight(textlm(tmp_path, "corpus")))
    (tmp_path / "corpus" / "f1.txt").write_bytes(b"0123456789+=" * 70)
    with pytest.raises(FuluConfigError, match=r"was created with another corpus \("):
        app.preflight(textlm(tmp_path, "corpus"))


def test_a_pimoe_mix_validation_set_without_a_complete_expression_is_refused(tmp_path, monkeypatch, capsys):
    """Its exact_match would be 0 / 0, reported as 0: the worst score, for a measurement of nothing."""
    monkeypatch.chdir(tmp_path)
    assert main(["search", "search_space=tiny", "trainer=tiny", "task=pimoe_mix", "task.seq_len=10",
                 "+task.val_sequences=4"]) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert problem.startswith("task.val_sequences: too few: the validation set (4 windows of seq_len=10"), problem
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_textlm_search_records_its_corpus_and_later_commands_read_the_same_files(tmp_path, monkeypatch, capsys):
    """search_config.json and the study's MLflow run hold the corpus's absolute path and its digest; a
    command given the same relative task.path from another folder (which has its own folder of that name)
    is told the override is not used, rather than reading those files."""
    import json

    import mlflow

    from fulu_nas.search.locate import load_study, locate_study, search_settings
    from fulu_nas.tasks import TextLMTask

    monkeypatch.chdir(tmp_path)
    write_text_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    given = textlm(tmp_path, "corpus", "trainer.steps=5", "trainer.report_every=5",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")  # the search's own
    assert main(["search", *given, "study.n_trials=1"]) == 0
    absolute = str((tmp_path / "corpus").resolve())
    assert json.loads((out / "search_config.json").read_text())["config"]["task"]["path"] == absolute
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [parent] = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                if r.data.tags.get("fulu.kind") == "study"]
    assert parent.data.params["task.path"] == absolute
    assert parent.data.params["task.corpus_sha256"] == TextLMTask(path=absolute, seq_len=16).corpus_sha256
    location = locate_study(given)
    assert search_settings(location, load_study(location)).task_params["path"] == absolute
    elsewhere = write_text_corpus(tmp_path / "elsewhere" / "corpus").parent
    monkeypatch.chdir(elsewhere)
    location = locate_study(given)
    with pytest.raises(FuluConfigError, match=r"task.path=corpus: not used: .* where task.path is"):
        search_settings(location, load_study(location))
    capsys.readouterr()


@pytest.mark.parametrize(("argv", "problem"), [
    (["--info", "searchpath", "task=nope"], "task: no option 'nope' (options: clusters, pimoe_mix, textlm, upcycle)"),
    (["+experiment=tiny", "--cfg", "job", "study.n_trial=3"], "study.n_trial: unknown key (check its spelling)"),
])
def test_the_flags_printing_the_configuration_compose_it_as_the_search_does(argv, problem, tmp_path, monkeypatch,
                                                                          capsys):
    """--cfg and --info skipped the pre-flight: an unknown option was a MissingConfigException traceback (exit 1),
    a misspelt key Hydra's message advising `+study.n_trial=3`, which the search then refused."""
    monkeypatch.chdir(tmp_path)
    assert main(["search", *argv]) == 2
    assert problems_in(capsys.readouterr().err) == [problem]
    assert main(["search", "+experiment=tiny", "--cfg", "job", "study.n_trials=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["study"]["n_trials"] == 3
    assert list(tmp_path.iterdir()) == []
