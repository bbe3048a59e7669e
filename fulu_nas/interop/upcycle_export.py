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
arguments and loads the weights strictly (safetensors and YAML: nothing is unpickled). What comes back
is the transformers model (``BertForMaskedLM``, ...), usable with its tokenizer and pipelines.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deploy.export import assemble, checked_folder, load_device, read_yaml
from ..errors import FuluConfigError
from .encoder import TOKENIZER_EXTRAS, TOKENIZER_FILES, quiet_transformers
from .migrate import migrate_from_electra
from .upcycle import UpcycleArch, UpcycledMLM

UPCYCLING = "upcycling.yaml"
FORMAT_VERSION = 1


def write_upcycled(out: Path, model: UpcycledMLM, tokenizer_folder: str | None, config: dict[str, Any],
                   metrics: dict[str, Any], model_card: str) -> Path:
    """The export folder of ``model`` at ``out`` (new or empty). ``tokenizer_folder``: where to copy the
    tokenizer files from (the dense model's folder), or None; ``config``: what ``upcycling.yaml`` records
    besides the format and the architecture."""
    from safetensors.torch import save_model

    hf = model.model.cpu().float().eval()

    def fill(folder: Path) -> None:
        import yaml

        hf.config.to_json_file(str(folder / "config.json"))
        save_model(hf, str(folder / "model.safetensors"))  # handles the tied word embedding / MLM decoder
        if tokenizer_folder is not None:
            source = Path(tokenizer_folder)
            for name in (*TOKENIZER_FILES, *TOKENIZER_EXTRAS):
                if (source / name).is_file():
                    shutil.copyfile(source / name, folder / name)
        record = {"format": FORMAT_VERSION, "architecture": model.arch.to_dict(), **config}
        (folder / UPCYCLING).write_text(yaml.safe_dump(record, sort_keys=False))
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        (folder / "README.md").write_text(model_card)

    return assemble(out, fill)


def is_upcycled_export(directory: str | Path) -> bool:
    return (Path(directory) / UPCYCLING).is_file()


def load_upcycled(directory: str | Path, map_location: str | torch.device = "cpu",
                  expected_sha256: str | None = None) -> nn.Module:
    """The exported model (a transformers masked-language model with its PiMoE layers, eval mode), read
    from a copy made as the folder is checked (:func:`~fulu_nas.deploy.export.checked_folder`;
    ``expected_sha256``: the export's fingerprint). ``model.fulu_migration`` says what was upcycled."""
    device = load_device(map_location)
    directory = Path(directory)
    with checked_folder(directory, expected_sha256, required=(UPCYCLING, "model.safetensors")) as copy:
        record = read_yaml(copy / UPCYCLING, directory / UPCYCLING)
        if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
            found = record.get("format") if isinstance(record, dict) else record
            raise FuluConfigError(f"{directory / UPCYCLING}: unknown export format {found!r}")
        arch = UpcycleArch.from_dict(record["architecture"])
        try:
            import transformers
        except ImportError:
            raise FuluConfigError("loading an upcycled model needs transformers: pip install 'fulu-nas[hf]'") from None
        from safetensors.torch import load_model

        with quiet_transformers(), torch.random.fork_rng(devices=[]):  # the initial weights are replaced below
            config = transformers.AutoConfig.from_pretrained(copy)
            model = transformers.AutoModelForMaskedLM.from_config(config)
        if arch.layers:
            with warnings.catch_warnings():  # an inexact start (expert choice) was the searched architecture's
                warnings.simplefilter("ignore", UserWarning)
                model = migrate_from_electra(model, layers=arch.layers, inplace=True, verify=False, **arch.migration)
        load_model(model, str(copy / "model.safetensors"), strict=True, device=str(device))
    return model.to(device).eval()
