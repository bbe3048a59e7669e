"""An upcycling search end to end in temp dirs (fulu-nas search task=upcycle model=PATH): the study and
its MLflow runs with the dense reference as trial 0, the confirmation, the export in the save_pretrained
layout loaded back with the same outputs, and bad input refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import torch

pytest.importorskip("transformers")

import fulu_nas  # noqa: E402
from fulu_nas.cli import main  # noqa: E402
from fulu_nas.errors import FuluConfigError  # noqa: E402
from fulu_nas.interop.encoder import DenseEncoder  # noqa: E402
from fulu_nas.interop.upcycle import UpcycleArch, build_upcycled  # noqa: E402
from fulu_nas.tasks import build_task  # noqa: E402

from .helpers import flip_last_byte  # noqa: E402
from .hf_models import save_encoder, save_gpt2, write_corpus  # noqa: E402

TrialState = optuna.trial.TrialState
STUDY = "upcycle-tiny"


def search(out: Path, model: Path, corpus: Path, *overrides: str) -> int:
    return main(["search", "+experiment=upcycle_tiny", f"model={model}", f"task.path={corpus}",
                 f"hydra.run.dir={out}", *overrides])


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A 3-trial upcycling search of a tiny BERT (with its tokenizer), shared by the tests below."""
    root = tmp_path_factory.mktemp("upcycle")
    bert, corpus, out = save_encoder(root / "bert"), write_corpus(root / "corpus"), root / "out"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert search(out, bert, corpus) == 0
    finally:
        os.chdir(cwd)
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'optuna.db'}")
    return SimpleNamespace(root=root, bert=bert, corpus=corpus, out=out, study=study)


def test_the_study_has_the_dense_reference_first_and_every_trial_starts_from_the_checkpoint(searched):
    trials = searched.study.trials
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    reference = trials[0]
    assert reference.user_attrs["reference"] and reference.params == {"layers": "dense", "lr": 1e-4}
    assert reference.user_attrs["arch"]["layers"] == [] and reference.user_attrs["arch"]["moe"] is None
    sha = DenseEncoder(searched.bert).sha256
    assert {t.user_attrs["arch"]["source_sha256"] for t in trials} == {sha}
    upcycled = [t for t in trials if t.user_attrs["arch"]["layers"]]
    assert upcycled, "the sampler drew only the dense model"
    for t in trials:
        m = t.user_attrs["metrics"]
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"])) and 0 <= m["masked_accuracy"] <= 1
        assert m["train_steps"] == 60 and m["active_params"] <= m["total_params"]
    for t in upcycled:
        m = t.user_attrs["metrics"]
        assert 0 < m["utilisation"] <= 1 and 0 <= m["load_balance"] <= 1 and math.isfinite(m["max_vio"])
        assert m["active_params"] > reference.user_attrs["metrics"]["active_params"]

    client = mlflow.MlflowClient(f"sqlite:///{searched.out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = [r for r in runs if r.data.tags.get("fulu.kind") == "study"]
    children = {int(r.data.tags["fulu.trial"]): r for r in runs if r.data.tags.get("fulu.kind") == "trial"}
    assert len(parent) == 1 and parent[0].data.params["task"] == "upcycle" and sorted(children) == [0, 1, 2]
    for number, run in children.items():
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert run.data.metrics["loss"] == pytest.approx(trials[number].values[0])
        assert {"perplexity", "masked_accuracy", "latency_ratio", "active_params"} <= run.data.metrics.keys()
        assert {"arch.yaml", "model.safetensors", "evaluation.json"} <= {a.path for a in
                                                                          client.list_artifacts(run.info.run_id)}
    summary = json.loads((searched.out / "summary.json").read_text())
    assert summary["reference"]["number"] == 0 and summary["n_complete"] == 3


def trial_model(out: Path, trial: optuna.trial.FrozenTrial, task, tmp: Path):
    """The trial's model with the weights the search saved in its MLflow run (eval mode)."""
    from safetensors.torch import load_model

    model = build_upcycled(UpcycleArch.from_dict(trial.user_attrs["arch"]), task.encoder)
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    load_model(model, client.download_artifacts(trial.user_attrs["weights_run_id"], "model.safetensors", str(tmp)),
               strict=True)
    return model.eval()


def test_export_writes_a_save_pretrained_folder_that_loads_back_with_the_same_outputs(searched, tmp_path):
    best = min(searched.study.trials, key=lambda t: t.values[0])
    folder = tmp_path / "upcycled"
    assert main(["export", f"study.name={STUDY}", f"hydra.run.dir={searched.out}", f"trial={best.number}",
                 f"out={folder}"]) == 0
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "upcycling.yaml", "metrics.json", "README.md",
            "checksums.json"} <= names
    assert set(json.loads((folder / "checksums.json").read_text())) == names - {"checksums.json"}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["loss"] == pytest.approx(best.values[0], rel=1e-5)

    model = fulu_nas.load(folder)
    assert type(model).__name__ == "BertForMaskedLM" and not model.training
    layers = tuple(best.user_attrs["arch"]["layers"])  # () for the dense model: nothing migrated
    assert getattr(getattr(model, "fulu_migration", None), "layers", ()) == layers
    # the trial's own weights, as the search saved them, give the same logits
    task = build_task("upcycle", model=str(searched.bert), path=str(searched.corpus), seq_len=32)
    trained = trial_model(searched.out, best, task, tmp_path)
    tokens = task.val_batches(8)[0].tokens
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, trained(tokens).logits, rtol=0, atol=1e-6)

    # bad arguments and a damaged record behind rewritten checksums: one message naming them (a raw
    # safetensors or PyYAML error before)
    for device in ("gpu0", "meta"):
        with pytest.raises(FuluConfigError, match=f"map_location: '{device}': "):
            fulu_nas.load(folder, map_location=device)
    with pytest.raises(FuluConfigError, match="expected_sha256: 123 is not a SHA-256"):
        fulu_nas.load(folder, expected_sha256=123)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "upcycling.yaml").write_text("format: [1\n")
    listing = json.loads((broken / "checksums.json").read_text())
    (broken / "checksums.json").write_text(json.dumps(
        {name: hashlib.sha256((broken / name).read_bytes()).hexdigest() for name in listing}))
    with pytest.raises(FuluConfigError, match=r"broken/upcycling.yaml: not valid YAML \(.* at line 2"):
        fulu_nas.load(broken)
    # a config.json field of the wrong type: a raw huggingface_hub StrictDataclassFieldValidationError before
    typed = tmp_path / "typed"
    shutil.copytree(folder, typed)
    config = json.loads((typed / "config.json").read_text())
    (typed / "config.json").write_text(json.dumps({**config, "hidden_size": str(config["hidden_size"])}))
    (typed / "checksums.json").write_text(json.dumps(
        {name: hashlib.sha256((typed / name).read_bytes()).hexdigest() for name in listing}))
    with pytest.raises(FuluConfigError, match=r"typed/config.json: not a transformers configuration \(Field "
                                              r"'hidden_size' expected int, got str"):
        fulu_nas.load(typed)

    # a changed byte is refused before anything is read as weights
    weights = folder / "model.safetensors"
    flip_last_byte(weights, 1)
    with pytest.raises(FuluConfigError, match="model.safetensors: checksum mismatch"):
        fulu_nas.load(folder)


def test_confirm_trains_the_best_and_the_dense_reference_again(searched):
    assert main(["confirm", f"study.name={STUDY}", f"hydra.run.dir={searched.out}", "top_k=1", "seeds=2",
                 "budget_factor=1"]) == 0
    summary = json.loads((searched.out / "confirmation.json").read_text())
    rows = {row["trial"]: row for row in summary["architectures"]}
    assert rows[0]["reference"] and len(rows) in (1, 2)
    assert all(len(row["runs"]) == 2 for row in rows.values())
    # the seeds after the search's own (0): the confirmation never repeats the run the search selected on
    assert summary["seeds"] == [1, 2]
    for row in rows.values():
        assert sorted(r["seed"] for r in row["runs"]) == [1, 2]


def test_a_changed_checkpoint_is_refused_at_export(searched, tmp_path, capsys):
    moved = tmp_path / "bert-copy"
    save_encoder(moved, seed=3)  # another model at the searched path
    config = json.loads((searched.out / "search_config.json").read_text())
    config["config"]["task"]["model"] = str(moved)
    (searched.out / "search_config.json").write_text(json.dumps(config))
    try:
        capsys.readouterr()
        assert main(["export", f"study.name={STUDY}", f"hydra.run.dir={searched.out}", "trial=1",
                     f"out={tmp_path / 'x'}"]) == 2
        assert "not the checkpoint this architecture was searched on" in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    finally:
        config["config"]["task"]["model"] = str(searched.bert)
        (searched.out / "search_config.json").write_text(json.dumps(config))


def test_a_changed_checkpoint_is_refused_at_confirm(searched, tmp_path, capsys):
    """Every run of the confirmation failed alike on it, yet the command exited 0 with a complete
    confirmation.json and advised running it again, which failed the same way."""
    moved = tmp_path / "bert-copy"
    save_encoder(moved, seed=3)  # another model at the searched path
    config = json.loads((searched.out / "search_config.json").read_text())
    config["config"]["task"]["model"] = str(moved)
    (searched.out / "search_config.json").write_text(json.dumps(config))
    confirmation = searched.out / "confirmation.json"
    before = confirmation.read_bytes() if confirmation.exists() else None
    try:
        capsys.readouterr()
        assert main(["confirm", f"study.name={STUDY}", f"hydra.run.dir={searched.out}", "top_k=1", "seeds=1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot confirm:\n  - task.model: ") and \
            "is not the checkpoint this architecture was searched on" in err and err.count("\n") == 2, err
        assert (confirmation.read_bytes() if confirmation.exists() else None) == before
    finally:
        config["config"]["task"]["model"] = str(searched.bert)
        (searched.out / "search_config.json").write_text(json.dumps(config))


def test_a_configuration_of_the_same_name_on_another_corpus_is_not_taken(searched, tmp_path, monkeypatch):
    """Two studies of one name searched into one folder on two corpora: the folder's search_config.json (the
    second's) was taken for the first, whose confirmation and export then read the second's corpus. The
    study's digest of its corpus tells them apart: the MLflow parent run's copy is read instead."""
    from fulu_nas.search.locate import load_study, locate_study, search_settings

    other = write_corpus(tmp_path / "other-corpus", files=4, lines=90)
    path = searched.out / "search_config.json"
    original = path.read_text()
    config = json.loads(original)
    config["config"]["task"]["path"] = str(other)
    try:
        path.write_text(json.dumps(config))
        monkeypatch.chdir(searched.root)
        location = locate_study([f"study.name={STUDY}", f"hydra.run.dir={searched.out}"])
        settings = search_settings(location, load_study(location))
        assert settings.task_params["path"] == str(searched.corpus)
    finally:
        path.write_text(original)


def test_a_tokenizer_file_that_cannot_be_read_is_one_message(tmp_path, monkeypatch, capsys):
    """A tokenizer.json cut short (a crash as it was saved) ended the search with transformers' JSONDecodeError
    traceback, naming neither the folder nor the file."""
    monkeypatch.chdir(tmp_path)
    bert = save_encoder(tmp_path / "bert")
    (bert / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    capsys.readouterr()
    corpus = write_corpus(tmp_path / "corpus")
    assert main(["search", "+experiment=upcycle_tiny", f"model={bert}", f"task.path={corpus}"]) == 2
    err = capsys.readouterr().err
    assert f"task.model: {str(bert)!r}: its tokenizer (tokenizer.json) cannot be read: Unterminated string" in err, err
    assert "Traceback" not in err and not (tmp_path / "outputs").exists()


def test_an_electra_without_tokenizer_failing_trials_and_a_dense_export(tmp_path, monkeypatch):
    """A byte-level ELECTRA saved without a tokenizer: at learning rates that make the loss explode each trial
    fails with its reason and the study goes on (no trial completed: exit code 1); at a sane one the dense
    reference exports and loads."""
    monkeypatch.chdir(tmp_path)
    electra = save_encoder(tmp_path / "electra", family="electra", tokenizer=False, vocab_size=300)
    corpus, out = write_corpus(tmp_path / "corpus"), tmp_path / "out"
    assert search(out, electra, corpus, "study.n_trials=2", "search_space.params.lr.low=20",
                  "search_space.params.lr.high=30", "search_space.reference.lr=20", "study.name=fails") == 1
    study = optuna.load_study(study_name="fails", storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all(t.user_attrs["fail_reason"].startswith("diverged") for t in study.trials)
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fails").experiment_id],
                              filter_string="tags.`fulu.kind` = 'trial'")
    assert len(runs) == 2 and all(r.info.status == "FAILED" and r.data.tags["fulu.reason"].startswith("diverged")
                                  for r in runs)

    assert search(out, electra, corpus, "study.n_trials=1", "study.name=dense") == 0
    folder = tmp_path / "exported"
    assert main(["export", "study.name=dense", f"hydra.run.dir={out}", f"out={folder}"]) == 0
    assert not (folder / "tokenizer.json").exists() and (folder / "upcycling.yaml").is_file()
    model = fulu_nas.load(folder)
    assert type(model).__name__ == "ElectraForMaskedLM" and not hasattr(model, "fulu_migration")
    task = build_task("upcycle", model=str(electra), path=str(corpus), seq_len=32)
    dense = optuna.load_study(study_name="dense", storage=f"sqlite:///{out / 'optuna.db'}").trials[0]
    trained = trial_model(out, dense, task, tmp_path)
    tokens = task.val_batches(4)[0].tokens
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, trained(tokens).logits, rtol=0, atol=1e-6)


def test_resuming_on_another_checkpoint_at_the_same_path_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bert, corpus, out = save_encoder(tmp_path / "bert"), write_corpus(tmp_path / "corpus"), tmp_path / "out"
    short = ("study.n_trials=1", "trainer.steps=5", "trainer.report_every=5")
    assert search(out, bert, corpus, *short) == 0
    save_encoder(bert, seed=9)  # the user retrained their model in place
    capsys.readouterr()
    assert search(out, bert, corpus, *short[1:], "study.n_trials=2") == 2
    assert "study.name: study 'upcycle-tiny'" in capsys.readouterr().err
    assert len(optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'optuna.db'}").trials) == 1


@pytest.mark.parametrize("case, words", [
    ("no model", "task.model: not set: pass model=PATH"),
    ("missing", "task.model: '.*missing' is not a folder"),
    ("not a model", "task.model: '.*corpus' has no config.json"),
    ("gpt2", "task.model: '.*gpt2' is a gpt2 model"),
    ("no tokenizer", "task: tokenizer=model needs the folder's tokenizer: model '.*electra' has none"),
    ("another space", "search_space.params.num_experts: not a searchable field|"
                      "search_space.base.num_layers: not an architecture field of the upcycle family"),
    # "check its spelling" sent the user to a key spelt right
    ("model without the task", r"model: a key of task=upcycle alone \(model=PATH names the encoder it upcycles\): "
                               r"add task=upcycle or \+experiment=upcycle_tiny"),
    # an encoder has no transformer blocks of this package's to compile or capture
    ("compiled", "trainer.compile=compiled compiles a PiMoETransformer's blocks; this model has none"),
    ("cuda graph", "trainer.cuda_graph=true is impossible here: .*a model without transformer blocks"),
    # trained without it, saying nothing
    ("checkpointing", "trainer.gradient_checkpointing=true checkpoints a PiMoETransformer's blocks; this model has "
                      "none"),
])
def test_bad_input_is_one_clear_message_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, case, words):
    import re

    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "corpus")
    electra = save_encoder(tmp_path / "electra", family="electra", tokenizer=False, vocab_size=300)
    gpt2 = save_gpt2(tmp_path / "gpt2")
    args = {"no model": ["+experiment=upcycle_tiny"],
            "missing": ["+experiment=upcycle_tiny", f"model={tmp_path / 'missing'}"],
            "not a model": ["+experiment=upcycle_tiny", f"model={corpus}"],
            "gpt2": ["+experiment=upcycle_tiny", f"model={gpt2}"],
            "no tokenizer": ["+experiment=upcycle_tiny", f"model={electra}", "task.tokenizer=model"],
            "another space": ["+experiment=upcycle_tiny", f"model={electra}", "search_space=tiny"],
            "model without the task": ["+experiment=tiny", f"model={electra}"],
            "compiled": ["+experiment=upcycle_tiny", f"model={electra}", "trainer.compile=compiled"],
            "cuda graph": ["+experiment=upcycle_tiny", f"model={electra}", "trainer.cuda_graph=true"],
            "checkpointing": ["+experiment=upcycle_tiny", f"model={electra}", "trainer.gradient_checkpointing=true"],
            }[case]
    capsys.readouterr()
    assert main(["search", *args, f"task.path={corpus}" if "upcycle" in args[0] else "study.n_trials=1"]) == 2
    err = capsys.readouterr().err
    assert re.search(words, err), err
    assert err.startswith("error: invalid search configuration:")
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.rglob("*.db"))


def _set_first(name: str, value: float):
    return lambda tensors: tensors[name].view(-1).__setitem__(0, value)


def _add_layer_2(tensors) -> None:
    for key in [k for k in tensors if ".layer.1." in k]:
        tensors[key.replace(".layer.1.", ".layer.2.")] = tensors[key].clone()


@pytest.mark.parametrize("case,words", [
    # a study ran with every trial "diverging at step 1" (rc 0)
    ("nan in the ffn", r"model.safetensors holds non-finite values \(bert.encoder.layer.0.intermediate.dense.weight\)"),
    ("inf in attention", r"model.safetensors holds non-finite values \(bert.encoder.layer.0.attention.self.query."
                         r"weight\)"),
    # a traceback and rc 1 (huggingface_hub's StrictDataclassFieldValidationError)
    ("string hidden_size", r"its config.json cannot be read: Field 'hidden_size' expected int, got str"),
    # trained on the first 2 of 3 layers without a word
    ("extra layer", r"its weights hold 16 tensors that its config.json does not use "
                    r"\(bert.encoder.layer.2.attention.output.LayerNorm.bias, "),
    # a traceback and rc 1 (transformers' RuntimeError building a model of -1 words)
    ("vocab -1", r"config.json: vocab_size must be a whole number >= 1, got -1"),
    # 19 lines blaming every choice of the search space
    ("ffn 60", r"intermediate_size=60 is not a multiple of 8: PiMoE's grouped experts need"),
    ("hidden 36", r"hidden_size=36 is not a multiple of 8: PiMoE's grouped experts need"),
])
def test_a_bad_checkpoint_is_one_clear_message_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, case,
                                                                          words):
    import re

    from safetensors.torch import load_file, save_file

    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "corpus")
    sizes = {"ffn 60": dict(intermediate_size=60), "hidden 36": dict(hidden_size=36)}.get(case, {})
    model = save_encoder(tmp_path / "enc", **sizes)
    edit = {"nan in the ffn": _set_first("bert.encoder.layer.0.intermediate.dense.weight", float("nan")),
            "inf in attention": _set_first("bert.encoder.layer.0.attention.self.query.weight", float("inf")),
            "extra layer": _add_layer_2}.get(case)
    if edit:
        tensors = load_file(model / "model.safetensors")
        edit(tensors)
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    if case in ("string hidden_size", "vocab -1"):
        config = json.loads((model / "config.json").read_text())
        field = {"string hidden_size": {"hidden_size": "32"}, "vocab -1": {"vocab_size": -1}}[case]
        (model / "config.json").write_text(json.dumps({**config, **field}))
    capsys.readouterr()
    assert main(["search", "+experiment=upcycle_tiny", f"model={model}", f"task.path={corpus}"]) == 2
    err = capsys.readouterr().err
    assert re.search(words, err), err
    assert err.startswith("error: invalid search configuration:") and err.count("\n") == 2, err
    assert "Traceback" not in err
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.rglob("*.db"))


def strict_json(text: str):
    """JSON as every parser reads it: NaN and Infinity are not JSON (JavaScript's JSON.parse refuses them)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def dense_export(searched, tmp_path_factory):
    """Trial 0, the dense reference, exported: a model with no routing, whose routing statistics are NaN."""
    folder = tmp_path_factory.mktemp("dense") / "model"
    assert main(["export", f"study.name={STUDY}", f"hydra.run.dir={searched.out}", "trial=0", f"out={folder}"]) == 0
    return folder


def test_the_dense_exports_metrics_are_json_and_its_card_lists_no_routing_statistics(searched, dense_export):
    """metrics.json held NaN for the routing statistics of a model without routing (not JSON), and the card
    listed them as `| utilisation | nan |`."""
    metrics = strict_json((dense_export / "metrics.json").read_text())
    assert math.isnan(searched.study.trials[0].user_attrs["metrics"]["utilisation"])
    assert metrics["utilisation"] is None and metrics["load_balance"] is None
    assert metrics["loss"] == pytest.approx(searched.study.trials[0].values[0], rel=1e-5)
    card = (dense_export / "README.md").read_text()
    assert "| loss |" in card and "utilisation" not in card and "nan" not in card.lower()


def rewritten(folder: Path, into: Path, change) -> Path:
    """A copy of the export whose weights ``change`` edits, with checksums.json rewritten to match."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, into)
    tensors = load_file(into / "model.safetensors")
    change(tensors)
    save_file(tensors, into / "model.safetensors", metadata={"format": "pt"})
    listing = json.loads((into / "checksums.json").read_text())
    (into / "checksums.json").write_text(json.dumps(
        {name: hashlib.sha256((into / name).read_bytes()).hexdigest() for name in listing}))
    return into


@pytest.mark.parametrize("case, words", [
    ("nan", r"NaN or infinite values in bert.embeddings.LayerNorm.bias$"),
    ("inf", r"NaN or infinite values in cls.predictions.bias$"),
    ("float16", r"tensors of another type: bert.embeddings.LayerNorm.bias \(float16 stored, an export writes "
                r"float32\), .* and \d+ more$"),
])
def test_loading_an_upcycled_export_refuses_weights_of_another_type_or_not_finite(dense_export, tmp_path, case,
                                                                                   words):
    """Without expected_sha256, weights rewritten with their checksums were cast into the model without a word
    (NaN logits, or float16 silently widened), as the searched model's loader refuses them."""
    def change(tensors):
        if case == "float16":
            tensors.update({k: v.half() for k, v in tensors.items()})
        else:
            name = "bert.embeddings.LayerNorm.bias" if case == "nan" else "cls.predictions.bias"
            tensors[name].view(-1)[0] = float(case)

    folder = rewritten(dense_export, tmp_path / "copy", change)
    with pytest.raises(FuluConfigError, match=f"model.safetensors: not the exported weights: {words}") as raised:
        fulu_nas.load(folder)
    assert len(raised.value.problems) == 1 and str(folder) in str(raised.value)
    assert "fulu-nas-checked-" not in str(raised.value)


class Escaped(BaseException):
    """What the test's own SIGTERM handler raises: a SIGTERM that no handler of the export took."""


@pytest.mark.parametrize("failure", ["artifact store", "sigterm"])
def test_an_upcycled_export_that_cannot_be_recorded_leaves_nothing(searched, tmp_path, capsys, monkeypatch, failure):
    """The folder was written before the export's MLflow run recorded it: a failing artifact store left it,
    with a traceback and exit code 1, and a SIGTERM left it and the run RUNNING. Now: one message and exit
    code 2 (or 130 when stopped), no folder, the run ended."""
    import signal

    from mlflow.exceptions import MlflowException

    def unavailable(*args, **kwargs):
        if failure == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            return None
        raise MlflowException("artifact store unavailable")

    def escaped(signum, frame):
        raise Escaped  # without a handler of its own, the export would have died here

    monkeypatch.setattr(mlflow, "log_artifact", unavailable)
    client = mlflow.MlflowClient(f"sqlite:///{searched.out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY).experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment], max_results=1000)}
    target = tmp_path / "empty"
    target.mkdir()
    previous = signal.signal(signal.SIGTERM, escaped)
    try:
        capsys.readouterr()
        code = main(["export", f"study.name={STUDY}", f"hydra.run.dir={searched.out}", "trial=0", f"out={target}"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if failure == "sigterm":
        assert code == 130 and "interrupted" in err, err
    else:
        assert code == 2, err
        assert err.startswith("error: cannot export:\n  - tracking.uri: ") and err.count("\n") == 2, err
        assert "artifact store unavailable" in err and "nothing was exported" in err
    assert target.is_dir() and not any(target.iterdir())  # the empty folder it was given, as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    new = [r.info.status for r in client.search_runs([experiment], max_results=1000) if r.info.run_id not in before]
    assert len(new) == 1 and new[0] != "RUNNING", new
