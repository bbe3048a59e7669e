"""An upcycled, fine-tuned encoder as a folder in the ``save_pretrained`` layout, and back.

The folder (written at once and checksummed by :func:`fulu_nas.deploy.export.assemble`):

- ``config.json``: the dense model's transformers configuration (its class in ``architectures``);
- ``model.safetensors``: every weight of the upcycled model (the PiMoE layers' among them);
- the tokenizer files of the dense model's folder, when the search used its tokenizer;
- ``upcycling.yaml``: how to rebuild the PiMoE layers (the :class:`~.upcycle.UpcycleArch`: the layers and
  :func:`~.migrate.migrate_from_electra`'s arguments), the task, and where it came from;
- ``metrics.json``, ``README.md`` (the model card) and ``checksums.json``.

transformers alone would load ``config.json`` as the dense model and drop the experts: the layers are
fulu-nas code. :func:`load_upcycled` (what ``fulu_nas.load`` calls for such a folder) verifies every
file's SHA-256, builds the model class from the configuration, migrates the same layers with the same
arguments and loads the weights strictly (safetensors, JSON and YAML: nothing is unpickled). Checksums
rewritten with the files prove nothing, so the files are also checked against each other first: the
record's types (its YAML without aliases), its sizes against ``config.json`` (and those against what a
model can have), and the model (built on the meta device, no memory) against the safetensors header,
then the weights' types (the float32 written) and values (finite). What comes back is the transformers
model (``BertForMaskedLM``, ...), usable with its tokenizer and pipelines.
"""

from __future__ import annotations

import json
import reprlib
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deploy.export import (
    CHECKSUMS,
    UPCYCLING,
    assemble,
    check_written_weights,
    checked_folder,
    dump_yaml,
    header_problems,
    load_device,
    metrics_json,
    read_yaml,
)
from ..errors import FuluConfigError
from .encoder import TOKENIZER_EXTRAS, TOKENIZER_FILES, quiet_transformers
from .migrate import config_problems, encoder_root, first_line, migrate_from_electra, read_hf_config
from .upcycle import UpcycleArch, UpcycledMLM

FORMAT_VERSION = 1


def write_upcycled(out: Path, model: UpcycledMLM, tokenizer_folder: str | None, config: dict[str, Any],
                   metrics: dict[str, Any], model_card: str,
                   before_rename: Callable[[Path], None] | None = None) -> Path:
    """The export folder of ``model`` at ``out`` (new or empty). ``tokenizer_folder``: where to copy the
    tokenizer files from (the dense model's folder), or None; ``config``: what ``upcycling.yaml`` records
    besides the format and the architecture; ``before_rename``: as :func:`~fulu_nas.deploy.export.assemble`
    takes it."""
    from safetensors.torch import save_model

    hf = model.model.cpu().float().eval()

    def fill(folder: Path) -> None:
        hf.config.to_json_file(str(folder / "config.json"))
        save_model(hf, str(folder / "model.safetensors"))  # handles the tied word embedding / MLM decoder
        if tokenizer_folder is not None:
            source = Path(tokenizer_folder)
            for name in (*TOKENIZER_FILES, *TOKENIZER_EXTRAS):
                if (source / name).is_file():
                    shutil.copyfile(source / name, folder / name)
        record = {"format": FORMAT_VERSION, "architecture": model.arch.to_dict(), **config}
        (folder / UPCYCLING).write_text(dump_yaml(record))
        (folder / "metrics.json").write_text(metrics_json(metrics))
        (folder / "README.md").write_text(model_card)

    return assemble(out, fill, before_rename)


def is_upcycled_export(directory: str | Path) -> bool:
    """Whether ``fulu_nas.load`` reads ``directory`` as an upcycled export. Its ``checksums.json`` says which
    files the export wrote: ``upcycling.yaml`` (or a transformers ``config.json``, without a searched
    export's ``config.yaml``) makes it one, whatever else the folder holds, so that a record added to a
    searched export is named as a file not listed, and a deleted record as missing. Without a readable
    listing (the chosen loader names that), the files present decide."""
    directory = Path(directory)
    try:
        listed = json.loads((directory / CHECKSUMS).read_text())
    except (OSError, ValueError, RecursionError):  # the chosen loader names what is wrong with it
        listed = None
    names = set(listed) if isinstance(listed, dict) else {
        name for name in (UPCYCLING, "config.yaml", "config.json") if (directory / name).is_file()}
    return UPCYCLING in names or ("config.json" in names and "config.yaml" not in names)


def _in_words(e: BaseException, copy: Path, directory: Path) -> str:
    """An error's first line, naming the user's folder rather than the private copy read."""
    return first_line(e).replace(str(copy), str(directory))


# A rejected value as a message shows it: a few items and levels (a long list would make a long message).
_SHOW = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 2, 5, 5, 80, 80


def _read_architecture(path: Path, shown: Path) -> UpcycleArch:
    """The architecture ``upcycling.yaml`` records, its types checked before any is used (``int("01")`` would
    take a string for layer 1)."""
    record = read_yaml(path, shown)
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        found = record.get("format") if isinstance(record, dict) else record
        raise FuluConfigError(f"{shown}: unknown export format {_SHOW.repr(found)}")
    arch = record.get("architecture")
    if not isinstance(arch, dict):
        raise FuluConfigError(f"{shown}: no architecture mapping")
    layers = arch.get("layers", [])
    if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise FuluConfigError(f"{shown}: architecture.layers must be a list of layer indices, got "
                              f"{_SHOW.repr(layers)}")
    migration = arch.get("migration", {})
    if not isinstance(migration, dict):
        raise FuluConfigError(f"{shown}: architecture.migration must be a mapping, got {_SHOW.repr(migration)}")
    try:
        return UpcycleArch.from_dict(arch)
    except FuluConfigError as e:
        raise FuluConfigError(f"{shown}: not a valid architecture ({'; '.join(e.problems)})") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise FuluConfigError(f"{shown}: not a valid architecture ({e})") from None


def _read_config(copy: Path, directory: Path):
    """The transformers configuration in ``config.json``, of a model type with a masked-language-model class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    shown = directory / "config.json"
    try:
        data = json.loads((copy / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FuluConfigError(f"{shown}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FuluConfigError(f"{shown}: expected a JSON object (a transformers configuration)")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise FuluConfigError(f"{shown}: model_type {model_type!r} has no masked-language-model class in "
                              "transformers")
    try:
        config = read_hf_config(copy)
    except ValueError as e:
        raise FuluConfigError(f"{shown}: not a transformers configuration ({_in_words(e, copy, directory)})") from None
    if problems := config_problems(config):
        raise FuluConfigError([f"{shown}: {p}" for p in problems])
    return config


def _build(config, arch: UpcycleArch, copy: Path, directory: Path) -> nn.Module:
    """The masked-language model of ``config`` with ``arch``'s layers migrated (random weights, replaced by the
    caller); on the meta device when called under ``torch.device("meta")``. The dense model's sizes must be
    the ones the architecture records."""
    import transformers

    try:
        with quiet_transformers():
            model = transformers.AutoModelForMaskedLM.from_config(config)
    except Exception as e:  # transformers' own checks of a configuration raise any type
        raise FuluConfigError(f"{directory / 'config.json'}: transformers cannot build its model "
                              f"({_in_words(e, copy, directory)})") from None
    try:
        _, layers = encoder_root(model)
    except FuluConfigError as e:
        raise FuluConfigError(f"{directory / 'config.json'}: {'; '.join(e.problems)}") from None
    dense = layers[0].intermediate.dense
    found = {"num_layers": len(layers), "hidden_size": dense.in_features, "ffn_size": dense.out_features,
             "vocab_size": config.vocab_size, "num_heads": int(getattr(config, "num_attention_heads", 4) or 4)}
    differ = [f"{k} is {getattr(arch, k)!r} in {UPCYCLING}, {v!r} in config.json" for k, v in found.items()
              if getattr(arch, k) != v]
    if differ:
        raise FuluConfigError(f"{directory}: {UPCYCLING} and config.json disagree: {'; '.join(differ)}")
    if arch.layers:
        with warnings.catch_warnings():  # an inexact start (expert choice) was the searched architecture's
            warnings.simplefilter("ignore", UserWarning)
            try:
                model = migrate_from_electra(model, layers=arch.layers, inplace=True, verify=False, **arch.migration)
            except FuluConfigError as e:
                raise FuluConfigError(f"{directory}: {UPCYCLING} and config.json give no upcycled model "
                                      f"({'; '.join(e.problems)})") from None
    return model


def _check_weights(model: nn.Module, weights: Path, directory: Path) -> None:
    """The shapes of ``model`` (built on the meta device) against the safetensors header, before a model of that
    size is allocated: the checksums say the files are the listed ones, not that they agree (both can be
    rewritten), and a configuration can ask for any size. Then each tensor's type, the float32
    :func:`write_upcycled` stores, and its values, finite: loading would cast any type into the model and
    copy NaN and inf without a word."""
    from safetensors import SafetensorError, safe_open

    shown = directory / weights.name
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise FuluConfigError(f"{shown}: not a safetensors file ({_in_words(e, weights.parent, directory)})") from None
    tensors = model.state_dict(keep_vars=True)
    expected = {k: tuple(v.shape) for k, v in tensors.items()}
    # Tied tensors (the MLM decoder and the word embeddings) are one tensor, saved under one of their names.
    tied: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        tied.setdefault(id(tensor), []).append(name)
    missing = [names[0] for names in tied.values() if not any(n in stored for n in names)]
    if problems := header_problems(stored, expected, missing):
        raise FuluConfigError(f"{directory}: {UPCYCLING} and config.json do not describe the weights in "
                              f"{weights.name}: " + "; ".join(problems))
    try:
        with safe_open(str(weights), framework="pt") as f:
            check_written_weights({k: f.get_tensor(k) for k in sorted(stored)}, tensors, shown)
    except (SafetensorError, OSError) as e:
        raise FuluConfigError(f"{shown}: not a safetensors file ({_in_words(e, weights.parent, directory)})") from None


def load_upcycled(directory: str | Path, map_location: str | torch.device = "cpu",
                  expected_sha256: str | None = None) -> nn.Module:
    """The exported model (a transformers masked-language model with its PiMoE layers, eval mode), read
    from a copy made as the folder is checked (:func:`~fulu_nas.deploy.export.checked_folder`;
    ``expected_sha256``: the export's fingerprint). ``model.fulu_migration`` says what was upcycled.
    FuluConfigError, naming the folder's file, when a file is not what an export writes or the files
    disagree: the model is built on the meta device and checked against the weights' header first."""
    device = load_device(map_location)
    directory = Path(directory)
    required = (UPCYCLING, "config.json", "model.safetensors")
    with checked_folder(directory, expected_sha256, required=required) as copy:
        arch = _read_architecture(copy / UPCYCLING, directory / UPCYCLING)
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise FuluConfigError("loading an upcycled model needs transformers: pip install 'fulu-nas[hf]'") from None
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        config = _read_config(copy, directory)
        with torch.device("meta"):
            configured = _build(config, arch, copy, directory)
        # Outside the meta device's context: the weights' values are read to be checked.
        _check_weights(configured, copy / "model.safetensors", directory)
        with torch.random.fork_rng(devices=[]):  # the initial weights are replaced below
            model = _build(config, arch, copy, directory)
        try:
            load_model(model, str(copy / "model.safetensors"), strict=True, device=str(device))
        except (RuntimeError, SafetensorError) as e:
            raise FuluConfigError(f"{directory / 'model.safetensors'}: cannot be loaded "
                                  f"({_in_words(e, copy, directory)})") from None
    return model.to(device).eval()
