"""``fulu_nas.load`` of an export whose files were replaced along with their checksums (no
``expected_sha256``): weights of another type or with NaN/inf were cast into the model without a word;
a symbolic link in place of a listed file was named twice in one message. An export of a tiny model,
written by ``write_export`` as ``fulu-nas export`` writes one (no search needed)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fulu_nas
from fulu_nas.deploy.export import FORMAT_VERSION, verify, write_export
from fulu_nas.errors import FuluConfigError
from fulu_nas.models import ArchConfig, PiMoETransformer
from fulu_nas.moe import MoEConfig

TENSOR = "blocks.0.ffn.experts.w2_EFD"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, PiMoETransformer]:
    arch = ArchConfig(vocab_size=40, max_seq_len=16, num_layers=1, hidden_size=32, num_heads=4, num_classes=3,
                      moe=MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=32))
    torch.manual_seed(0)
    model = PiMoETransformer(arch).eval()
    folder = tmp_path_factory.mktemp("export") / "model"
    write_export(folder, model, {"format": FORMAT_VERSION, "architecture": arch.to_dict()}, {}, "# tiny\n")
    return folder, model


def rewrite_checksums(folder: Path) -> None:
    """What whoever replaces a file also does: record its new SHA-256 in checksums.json."""
    listing = json.loads((folder / "checksums.json").read_text())
    (folder / "checksums.json").write_text(json.dumps(
        {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in listing}))


def test_the_export_loads_as_written(exported):
    folder, model = exported
    loaded = fulu_nas.load(folder)
    assert TENSOR in loaded.state_dict()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize(("change", "words"), [
    (lambda t: t.to(torch.int32), rf"tensors of another type: {TENSOR} \(int32 stored, an export writes float32\)"),
    (lambda t: t.half(), rf"tensors of another type: {TENSOR} \(float16 stored, an export writes float32\)"),
    (lambda t: t.index_fill(0, torch.tensor([1]), float("nan")), f"NaN or infinite values in {TENSOR}"),
    (lambda t: t.index_fill(0, torch.tensor([1]), float("-inf")), f"NaN or infinite values in {TENSOR}"),
], ids=["int32", "float16", "nan", "inf"])
def test_weights_of_another_type_or_not_finite_are_refused_naming_the_tensor(exported, tmp_path, change, words):
    folder = tmp_path / "copy"
    shutil.copytree(exported[0], folder)
    weights = load_file(folder / "model.safetensors")
    weights[TENSOR] = change(weights[TENSOR])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    rewrite_checksums(folder)
    with pytest.raises(FuluConfigError, match=f"model.safetensors: not the exported weights: {words}$") as raised:
        fulu_nas.load(folder)
    message = str(raised.value)
    assert len(raised.value.problems) == 1 and str(folder) in message and "fulu-nas-checked-" not in message


def test_a_linked_config_is_named_once(exported, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exported[0], folder)
    outside = tmp_path / "config.yaml"
    shutil.copyfile(folder / "config.yaml", outside)
    (folder / "config.yaml").unlink()
    (folder / "config.yaml").symlink_to(outside)
    for check in (fulu_nas.load, verify):
        with pytest.raises(FuluConfigError) as raised:
            check(folder)
        assert raised.value.problems == [f"{folder / 'config.yaml'}: a symbolic link (an export holds regular "
                                         "files only)"]
