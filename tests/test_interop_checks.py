"""What the Hugging Face bridges read from disk is checked before it is used: migrate_from_electra on a
save_pretrained folder (and its flags), the upcycle task's encoder folder, and an upcycled export loaded with
fulu_nas.load or given to fulu-nas serve. Bad input is one FuluConfigError (exit 2 from the CLI) naming the
user's file. Also the upcycled export's fingerprint and the encoder path it records. Tiny models in temp dirs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
import yaml

pytest.importorskip("transformers")

from transformers import BertConfig, BertForMaskedLM, BertModel  # noqa: E402

import fulu_nas  # noqa: E402
from fulu_nas import migrate_from_electra  # noqa: E402
from fulu_nas.cli import main  # noqa: E402
from fulu_nas.deploy.export import fingerprint  # noqa: E402
from fulu_nas.errors import FuluConfigError  # noqa: E402
from fulu_nas.interop.encoder import DenseEncoder  # noqa: E402
from fulu_nas.interop.migrate import PiMoEOutput  # noqa: E402
from fulu_nas.interop.upcycle import build_upcycled, upcycle_arch  # noqa: E402
from fulu_nas.interop.upcycle_export import write_upcycled  # noqa: E402

from .helpers import free_port  # noqa: E402
from .hf_models import save_encoder, save_gpt2, write_corpus  # noqa: E402

STUDY = "upcycle-tiny"


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def forge_checksums(folder: Path) -> None:
    """checksums.json rewritten to match the folder as it is now (a hand edit, or a forger)."""
    listing = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(folder.iterdir()) if p.is_file() and p.name != "checksums.json"}
    (folder / "checksums.json").write_text(json.dumps(listing, indent=2))


def half_file(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# -- migrate_from_electra(PATH) ------------------------------------------------------------------

def _no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _pickle_only(folder: Path) -> None:
    model = BertForMaskedLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def _other_models_weights(folder: Path) -> None:
    gpt2 = save_gpt2(folder.parent / f"{folder.name}-gpt2")
    shutil.copyfile(gpt2 / "model.safetensors", folder / "model.safetensors")


FOLDER_CASES = {
    "no weights": (_no_weights, r"has no safetensors weights; save it with save_pretrained"),
    "pickles only": (_pickle_only, r"has no safetensors weights \(only pytorch_model.bin: pickles, which fulu-nas "
                                   r"does not load\)"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{not json"), r"its config.json cannot be read"),
    "unknown model type": (lambda f: (f / "config.json").write_text('{"model_type": "nosuchmodel"}'),
                           r"its config.json cannot be read: .*nosuchmodel"),
    "sizes differ": (lambda f: edit_json(f / "config.json", intermediate_size=128),
                     r"its weights do not fit its config.json: .*intermediate.dense.weight: \(64, 32\) stored, "
                     r"\(128, 32\) configured"),
    "corrupt weights": (lambda f: half_file(f / "model.safetensors"),
                        r"model.safetensors is not a safetensors file \(.*incomplete metadata"),
    "another model's weights": (_other_models_weights,
                                r"its weights lack \d+ of the encoder's tensors \(bert\..*\): they are not the model "
                                r"its config.json describes"),
}


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_migrating_a_folder_it_cannot_load_is_one_clear_error(tmp_path, monkeypatch, case):
    edit, words = FOLDER_CASES[case]
    folder = save_encoder(tmp_path / "bert", tokenizer=False)
    edit(folder)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called: a pickle was read")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(FuluConfigError) as caught:
        migrate_from_electra(folder, num_experts=4)
    assert len(caught.value.problems) == 1
    message = str(caught.value)
    assert message.startswith(f"migrate_from_electra: {str(folder)!r}"), message
    assert re.search(words, message), message


def test_migrating_a_good_folder_still_works_and_is_quiet(tmp_path, capsys):
    folder = save_encoder(tmp_path / "bert", tokenizer=False)
    capsys.readouterr()
    model = migrate_from_electra(folder, num_experts=4)
    out = capsys.readouterr()
    assert out.out + out.err == ""  # no loading report or progress bar of transformers'
    assert type(model).__name__ == "BertForMaskedLM" and model.fulu_migration.layers == (0, 1)
    dense = BertForMaskedLM.from_pretrained(folder).eval()
    ids = torch.randint(0, dense.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, dense(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


# -- migrate_from_electra's flags ----------------------------------------------------------------

def small_bert(layers: int = 4) -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4)).eval()


FLAGS = ("enable_ultimate_pimoe", "enable_advanced_routing", "enable_performance_optimization", "require_exact",
         "hash_on_token_ids", "inplace", "verify")


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("value", ["false", "no", 0, None])
def test_flags_must_be_true_or_false(flag, value):
    dense = small_bert()
    with pytest.raises(FuluConfigError, match=rf"^migrate_from_electra: {flag} must be true or false, got "
                                              rf"{re.escape(repr(value))}$"):
        migrate_from_electra(dense, num_experts=4, **{flag: value})
    assert not any(isinstance(layer.output, PiMoEOutput) for layer in dense.encoder.layer)  # untouched


def test_layers_must_be_a_list_and_every_other_layer_needs_a_second_one():
    for layers in (3, "01", {0: 1}):
        with pytest.raises(FuluConfigError, match=rf"layers must be a list of layer indices \(or None: the flag "
                                                  rf"enable_ultimate_pimoe chooses\), got {re.escape(repr(layers))}"):
            migrate_from_electra(small_bert(), num_experts=4, layers=layers)
    with pytest.raises(FuluConfigError, match=r"enable_ultimate_pimoe=False upcycles every other layer \(the second, "
                                              r"fourth, \.\.\.\), and the model has 1 layer: pass layers=\[0\]"):
        migrate_from_electra(small_bert(1), num_experts=4, enable_ultimate_pimoe=False)
    # the flags as documented still choose the layers
    every_other = migrate_from_electra(small_bert(), num_experts=4, enable_ultimate_pimoe=False)
    assert every_other.fulu_migration.layers == (1, 3)
    assert migrate_from_electra(small_bert(), num_experts=4, layers=range(2)).fulu_migration.layers == (0, 1)


# -- the upcycle task's encoder folder -----------------------------------------------------------

def test_a_corrupt_encoder_is_refused_by_the_search_with_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = save_encoder(tmp_path / "bert")
    half_file(folder / "model.safetensors")
    corpus = write_corpus(tmp_path / "corpus")
    capsys.readouterr()
    assert main(["search", "+experiment=upcycle_tiny", f"model={folder}", f"task.path={corpus}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid search configuration:")
    assert re.search(rf"task.model: '{re.escape(str(folder))}': model.safetensors is not a safetensors file", err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.rglob("*.db"))


def test_the_task_records_the_encoder_folder_as_an_absolute_path(tmp_path, monkeypatch):
    folder = save_encoder(tmp_path / "bert")
    corpus = write_corpus(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    from fulu_nas.tasks import build_task

    task = build_task("upcycle", model="bert", path=str(corpus), seq_len=32)
    assert task.model_path == str(folder.resolve()) and task.describe()["model"] == str(folder.resolve())


# -- an upcycled export, loaded and served -------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An upcycled export written directly (no search): both layers of a tiny BERT, top-2 of 4 experts with the
    auxiliary-loss-free bias."""
    root = tmp_path_factory.mktemp("upcycled")
    bert = save_encoder(root / "bert")
    encoder = DenseEncoder(bert)
    arch = upcycle_arch(encoder, 32, layers="all",
                        moe={"router": "topk", "num_experts": 4, "top_k": 2, "bias_update_rate": 1e-3})
    torch.manual_seed(0)
    model = build_upcycled(arch, encoder)
    folder = write_upcycled(root / "upcycled", model, str(bert), {"task": {"name": "upcycle", "model": str(bert)}},
                            {"loss": 1.0}, "# card\n")
    return SimpleNamespace(root=root, bert=bert, folder=folder, model=model)


def edit_record(folder: Path, change) -> None:
    record = yaml.safe_load((folder / "upcycling.yaml").read_text())
    change(record)
    (folder / "upcycling.yaml").write_text(yaml.safe_dump(record, sort_keys=False))


def _set(section: str | None, **values):
    def change(record):
        (record if section is None else record[section] if section == "architecture" else
         record["architecture"][section]).update(values)
    return change


def alias_bomb(levels: int) -> str:
    """An upcycling.yaml of a few hundred bytes whose layers list, with its aliases expanded, holds
    10**levels elements."""
    lines = ["format: 1", "a0: &a0 [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"architecture: {{layers: *a{levels - 1}}}"]) + "\n"


TAMPERING = {
    "one layer fewer": (lambda f: edit_record(f, _set("architecture", layers=[0])),
                        r"upcycling.yaml and config.json do not describe the weights in model.safetensors: .*no "
                        r"parameter bert.encoder.layer.1.output.moe"),
    "other expert count": (lambda f: edit_record(f, _set("migration", num_experts=8)),
                           r"do not describe the weights in model.safetensors: bert.encoder.layer.0.output.moe.*"
                           r"\(4, \d+\) stored, \(8, \d+\) configured"),
    "other router": (lambda f: edit_record(f, _set("migration", routing_strategy="hash")),
                     r"do not describe the weights in model.safetensors: no parameter .*router.gate.weight"),
    "architecture a list": (lambda f: edit_record(f, lambda r: r.update(architecture=[1])),
                            r"upcycling.yaml: no architecture mapping"),
    "architecture missing": (lambda f: edit_record(f, lambda r: r.pop("architecture")),
                             r"upcycling.yaml: no architecture mapping"),
    "migration a list": (lambda f: edit_record(f, _set("architecture", migration=[1])),
                         r"upcycling.yaml: architecture.migration must be a mapping, got \[1\]"),
    "layers a string": (lambda f: edit_record(f, _set("architecture", layers="01")),
                        r"upcycling.yaml: architecture.layers must be a list of layer indices, got '01'"),
    "layers a fraction": (lambda f: edit_record(f, _set("architecture", layers=[0.7, 1])),
                          r"upcycling.yaml: architecture.layers must be a list of layer indices, got \[0.7, 1\]"),
    "layer count": (lambda f: edit_record(f, _set("architecture", num_layers=5)),
                    r"upcycling.yaml and config.json disagree: num_layers is 5 in upcycling.yaml, 2 in config.json"),
    "unknown migration key": (lambda f: edit_record(f, _set("migration", foo=1)),
                              r"upcycling.yaml: not a valid architecture \(.*foo"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{x"), r"config.json: not valid JSON"),
    "config of GPT-2": (lambda f: edit_json(f / "config.json", model_type="gpt2"),
                        r"config.json: model_type 'gpt2' has no masked-language-model class in transformers"),
    "config gone": (lambda f: (f / "config.json").unlink(), r"config.json: missing"),
    "config hidden size": (lambda f: edit_json(f / "config.json", hidden_size=64),
                           r"upcycling.yaml and config.json disagree: hidden_size is 32 in upcycling.yaml, 64 in "
                           r"config.json"),
    "config vocabulary": (lambda f: edit_json(f / "config.json", vocab_size=3_000_000),
                          r"disagree: vocab_size is \d+ in upcycling.yaml, 3000000 in config.json"),
    "both vocabularies": (lambda f: (edit_json(f / "config.json", vocab_size=3_000_000),
                                     edit_record(f, _set("architecture", vocab_size=3_000_000))),
                          r"do not describe the weights in model.safetensors: bert.embeddings.word_embeddings.weight: "
                          r"\(\d+, 32\) stored, \(3000000, 32\) configured"),
    "config heads 0": (lambda f: edit_json(f / "config.json", num_attention_heads=0),
                       r"config.json: num_attention_heads must be a whole number >= 1, got 0"),
    "config hidden 0": (lambda f: edit_json(f / "config.json", hidden_size=0),
                        r"config.json: hidden_size must be a whole number >= 1, got 0"),
    "config vocabulary 0": (lambda f: edit_json(f / "config.json", vocab_size=0),
                            r"config.json: vocab_size must be a whole number >= 1, got 0"),
    "config padding id": (lambda f: edit_json(f / "config.json", pad_token_id=999),
                          r"config.json: pad_token_id must be None or an id below vocab_size \(\d+\), got 999"),
    "record of aliases": (lambda f: (f / "upcycling.yaml").write_text(alias_bomb(7)),
                          r"upcycling.yaml: holds YAML aliases \(\*name\), which an export never writes"),
    "record of a long list": (lambda f: edit_record(f, _set("architecture", layers=["x"] * 100_000)),
                              r"upcycling.yaml: architecture.layers must be a list of layer indices, got \['x', "
                              r"'x', 'x', 'x', 'x', \.\.\.\]$"),
    "weights cut short": (lambda f: half_file(f / "model.safetensors"),
                          r"model.safetensors: not a safetensors file"),
    "record gone": (lambda f: (f / "upcycling.yaml").unlink(), r"upcycling.yaml: missing"),
    "weights of the dense model": (
        lambda f: shutil.copyfile(f.parent / "dense.safetensors", f / "model.safetensors"),
        r"do not describe the weights in model.safetensors: no parameter .*intermediate.*; no tensor "
        r"bert.encoder.layer.0.output.moe"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_an_edited_upcycled_export_is_refused_with_one_message_naming_its_file(exported, tmp_path, case):
    edit, words = TAMPERING[case]
    folder = tmp_path / "edited"
    shutil.copytree(exported.folder, folder)
    shutil.copyfile(exported.bert / "model.safetensors", tmp_path / "dense.safetensors")
    edit(folder)
    forge_checksums(folder)
    with pytest.raises(FuluConfigError) as caught:
        fulu_nas.load(folder)
    message = str(caught.value)
    assert re.search(words, message), message
    assert str(folder) in message and "fulu-nas-checked" not in message and "config.yaml" not in message
    assert "\n" not in message


def test_an_upcycled_export_loads_with_its_outputs(exported):
    model = fulu_nas.load(exported.folder)
    assert type(model).__name__ == "BertForMaskedLM" and model.fulu_migration.layers == (0, 1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, exported.model.eval()(ids).logits, rtol=0, atol=0)


def test_serve_refuses_an_upcycled_export_before_starting(exported, tmp_path, capsys):
    capsys.readouterr()
    assert main(["serve", str(exported.folder), "--port", str(free_port())]) == 2
    out, err = capsys.readouterr()
    assert "serving" not in out
    assert err.strip() == (f"error: {exported.folder} is an upcycled encoder (upcycling.yaml), a transformers model "
                           "rather than an MLflow model, so fulu-nas serve cannot serve it: load it with "
                           "fulu_nas.load(FOLDER, expected_sha256=FINGERPRINT) and serve it from Python (for "
                           "example with a transformers pipeline)")
    # any other checked folder without a searched export's configuration and program: refused too
    folder = tmp_path / "no-record"
    shutil.copytree(exported.folder, folder)
    (folder / "upcycling.yaml").unlink()
    forge_checksums(folder)
    assert main(["serve", str(folder), "--port", str(free_port())]) == 2
    out, err = capsys.readouterr()
    assert "serving" not in out and err.strip().endswith(f"{folder}: no config.yaml or model.pt2, so not the export "
                                                         "of a searched model; fulu-nas serve serves the folders "
                                                         "fulu-nas export writes for a searched model")


# -- fulu-nas export of an upcycling search ------------------------------------------------------

@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A one-trial upcycling search (the dense reference) of an encoder named by a relative path."""
    root = tmp_path_factory.mktemp("search")
    bert, corpus, out = save_encoder(root / "bert"), write_corpus(root / "corpus"), root / "out"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["search", "+experiment=upcycle_tiny", "model=bert", f"task.path={corpus}",
                     f"hydra.run.dir={out}", "study.n_trials=1", "trainer.steps=5", "trainer.report_every=5"]) == 0
    finally:
        os.chdir(cwd)
    return SimpleNamespace(root=root, bert=bert, corpus=corpus, out=out)


def test_an_upcycled_export_prints_and_records_its_fingerprint(searched, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(searched.root)
    folder = tmp_path / "exported"
    capsys.readouterr()
    assert main(["export", f"study.name={STUDY}", f"hydra.run.dir={searched.out}", "trial=0", f"out={folder}"]) == 0
    out = capsys.readouterr().out
    printed = re.search(r"fingerprint ([0-9a-f]{64})", out)
    assert printed and printed.group(1) == fingerprint(folder), out
    assert fulu_nas.load(folder, expected_sha256=printed.group(1)) is not None
    with pytest.raises(FuluConfigError, match="checksums.json: its SHA-256 is not the expected"):
        fulu_nas.load(folder, expected_sha256="0" * 64)

    client = mlflow.MlflowClient(f"sqlite:///{searched.out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`fulu.kind` = 'export'")
    assert [r.data.tags.get("fulu.fingerprint") for r in runs] == [printed.group(1)]
    card = (folder / "README.md").read_text()
    assert 'fulu_nas.load(".", expected_sha256="FINGERPRINT")' in card and "fulu-nas export` printed" in card
    # trial 0 is the dense reference: its card says so, and does not compare it with itself
    assert card.startswith("# Dense ") and "The dense reference (trial 0)" not in card

    # the encoder was named by a relative path: the export records where it is
    absolute = str(searched.bert.resolve())
    record = yaml.safe_load((folder / "upcycling.yaml").read_text())
    assert record["task"]["model"] == absolute and f"`{absolute}`" in card


def test_a_retrained_upcycled_exports_card_gives_the_steps_it_was_trained_for(searched, tmp_path, monkeypatch,
                                                                               capsys):
    """The card said the search's budget (and nothing of the retraining) whatever retrain_factor was."""
    monkeypatch.chdir(searched.root)
    folder = tmp_path / "retrained"
    assert main(["export", f"study.name={STUDY}", f"hydra.run.dir={searched.out}", "trial=0", f"out={folder}",
                 "retrain=true", "retrain_factor=2"]) == 0
    card = (folder / "README.md").read_text()
    assert "for 10 steps (retrained for this export; the search's trials had 5)" in card, card


def test_a_study_of_an_encoder_named_by_a_relative_path_is_found_from_anywhere(searched, tmp_path, monkeypatch):
    """The folder was kept as typed: export and confirm from another folder could not find it, and
    resuming with its absolute path was refused as another study. It is kept absolute, and known by its
    content in the study's fingerprint; a study fingerprinted with the path as typed still resumes."""
    import optuna

    from fulu_nas.search.locate import load_study, locate_study, search_settings
    from fulu_nas.search.study import FINGERPRINT_ATTR

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["export", f"study.name={STUDY}", f"hydra.run.dir={searched.out}", "trial=0",
                 f"out={tmp_path / 'exported'}"]) == 0
    absolute = str(searched.bert.resolve())
    resume = ["search", "+experiment=upcycle_tiny", f"model={absolute}", f"task.path={searched.corpus}",
              f"hydra.run.dir={searched.out}", "study.n_trials=1", "trainer.steps=5", "trainer.report_every=5"]
    assert main(resume) == 0
    # a study whose fingerprint holds the path as typed (relative) resumes with that path
    import dataclasses

    monkeypatch.chdir(searched.root)
    location = locate_study([f"study.name={STUDY}", f"hydra.run.dir={searched.out}"])
    settings = search_settings(location, load_study(location))
    assert settings.raw["task"]["model"] == absolute
    legacy = dataclasses.replace(settings, typed_model="bert").fingerprint(legacy=True)
    assert legacy != settings.fingerprint()
    optuna.load_study(study_name=STUDY, storage=location.storage_url).set_user_attr(FINGERPRINT_ATTR, legacy)
    assert main([*resume[:2], "model=bert", *resume[3:]]) == 0
    # so do its worker processes (study.n_workers, confirm's workers), which read the saved configuration
    from fulu_nas.search.study import load_worker_settings

    worker = load_worker_settings(searched.out / "search_config.json")
    assert worker.raw["task"]["model"] == absolute and worker.fingerprint(legacy=True) == legacy
    # a trial's cache key too knows the encoder by its content (the architecture's source_sha256), so a
    # resume by either path reuses the trials; one made with the path as typed is found by that key
    from fulu_nas.search.objective import cache_key

    by_absolute = dataclasses.replace(settings, typed_model=absolute)
    assert cache_key(settings, "an-architecture") == cache_key(by_absolute, "an-architecture")
    assert cache_key(settings, "an-architecture", model_as_typed=True) != cache_key(settings, "an-architecture")
    other = save_encoder(tmp_path / "other", seed=9)  # another encoder is another study, whatever its path
    assert main([*resume[:2], f"model={other}", *resume[3:]]) == 2


def test_an_upcycling_search_prints_no_cpp_warning_in_its_progress(searched, tmp_path):
    """The cost measurement's memory profiler printed a c10 warning ("Memory block of unknown size was
    allocated before the profiling started") in the middle of the progress bar."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCH_CPP_LOG_LEVEL"}
    command = [sys.executable, "-m", "fulu_nas", "search", "+experiment=upcycle_tiny", f"model={searched.bert}",
               f"task.path={searched.corpus}", f"hydra.run.dir={tmp_path / 'out'}", "study.n_trials=2",
               "trainer.steps=10"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "CPUAllocator" not in done.stderr and not re.search(r"^\[W", done.stderr, re.M), done.stderr
