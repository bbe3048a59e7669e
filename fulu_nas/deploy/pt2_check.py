"""Checking a ``torch.export`` archive (``.pt2``) before ``torch.export.load`` reads it.

``torch.export.load`` must not be run on a file you have not verified. Besides the graph (JSON)
and raw tensor bytes, an archive can hold records that torch 2.13 passes to Python's full
unpickler, which runs whatever code the pickle names:

- a weight or constant whose entry in ``data/{weights,constants}/<model>_*_config.json`` says
  ``use_pickle`` (read with ``torch.load(weights_only=False)``);
- a constant ``custom_obj_*`` (TorchScript's pickle loader) or ``opaque_obj_*`` (``pickle.loads``);
- the legacy ``data/weights/<model>.pt`` and ``data/constants/<model>.pt``, and the example
  inputs ``data/sample_inputs/<model>.pt``, which torch reads with ``weights_only=True`` and, when
  that fails, again with ``weights_only=False``;
- the pre-2.8 layout (``version``, ``serialized_*.pt``) that torch falls back to, with Python's
  ``zipfile``, when the archive does not load;

and ``data/aotinductor/`` holds compiled shared libraries that it loads (native code).
:func:`archive_problems` accepts only what ``torch.export.save`` writes for a program of plain
tensors. Refusing pickles is not enough on its own: the graph names Python callables and holds
shape expressions that the loader parses with sympy (``eval``), so a file is safe to load when its
SHA-256 is the one recorded at export; :func:`load_program` checks both.

This file is shipped inside the MLflow model (``code/pt2_check.py``), which runs with torch, numpy
and MLflow only: it imports torch and the standard library, nothing from fulu_nas.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
from pathlib import Path

import torch
from torch.export.pt2_archive import PT2ArchiveReader
from torch.export.pt2_archive import constants as pt2

# Written by torch's zip writer for every archive (format, version, byte order, serialization id).
HOUSEKEEPING = {pt2.ARCHIVE_FORMAT_PATH, pt2.ARCHIVE_VERSION_PATH, "byteorder", ".data/version",
                ".data/serialization_id"}


class UnsafeProgramError(ValueError):
    """A ``.pt2`` file that is not the exported one, or that ``torch.export.load`` would unpickle."""


def read_verified(path: str | Path, expected_sha256: str) -> bytes:
    """The bytes of ``path`` if their SHA-256 is ``expected_sha256`` (read once: what is checked is
    what gets loaded)."""
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise UnsafeProgramError(f"{path}: checksum mismatch (the file was modified after export)")
    return data


def _payloads(reader: PT2ArchiveReader, config_name: str, folder: str, prefix: str,
              records: set[str], problems: list[str]) -> set[str]:
    """The tensor records a weights/constants config names; what would be unpickled goes to problems."""
    if config_name not in records:
        problems.append(f"{config_name}: missing (torch would read a pickled {folder}<model>.pt instead)")
        return set()
    try:
        entries = json.loads(reader.read_string(config_name))["config"]
        items = [(fqn, meta.get("path_name", ""), meta.get("use_pickle")) for fqn, meta in entries.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        problems.append(f"{config_name}: unreadable ({e})")
        return set()
    names = set()
    for fqn, path_name, use_pickle in items:
        if use_pickle:
            problems.append(f"{folder}{path_name}: pickled ({fqn} has use_pickle)")
        elif not (isinstance(path_name, str) and path_name.startswith(prefix) and "/" not in path_name):
            problems.append(f"{folder}{path_name}: not a plain tensor ({fqn}), torch would unpickle it")
        else:
            names.add(folder + path_name)
    return names


def archive_problems(data: bytes) -> list[str]:
    """Why ``torch.export.load`` would unpickle (or load native code from) this archive; [] when nothing."""
    try:
        reader = PT2ArchiveReader(io.BytesIO(data))  # torch's own zip reader: what it lists is what it loads
        records = set(reader.get_file_names())
        with zipfile.ZipFile(io.BytesIO(data)) as z:  # the reader of torch's fallback path
            names = z.namelist()
    except (RuntimeError, AssertionError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        return [f"not a torch.export archive ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "torch would retry it as a legacy archive, whose tensors are pickles"]
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or len(names) != len(set(names)) or \
            set(names) != {f"{next(iter(roots))}/{record}" for record in records}:
        return ["its zip directory reads differently with torch's reader and with Python's zipfile"]

    problems: list[str] = []
    allowed = set(HOUSEKEEPING)
    models = {r[len(pt2.MODELS_DIR):-len(".json")] for r in records
              if r.startswith(pt2.MODELS_DIR) and r.endswith(".json")}
    if not models:
        problems.append(f"no program ({pt2.MODELS_DIR}*.json)")
    for model in sorted(models):
        allowed.add(pt2.MODELS_FILENAME_FORMAT.format(model))
        for config_format, folder, prefix in (
                (pt2.WEIGHTS_CONFIG_FILENAME_FORMAT, pt2.WEIGHTS_DIR, pt2.WEIGHT_FILENAME_PREFIX),
                (pt2.CONSTANTS_CONFIG_FILENAME_FORMAT, pt2.CONSTANTS_DIR, pt2.TENSOR_CONSTANT_FILENAME_PREFIX)):
            config_name = config_format.format(model)
            allowed |= {config_name} | _payloads(reader, config_name, folder, prefix, records, problems)
        sample = pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
        allowed.add(sample)
        if sample not in records:
            problems.append(f"{sample}: missing")
        elif raw := reader.read_bytes(sample):
            try:  # torch's restricted unpickler (tensors and containers only); torch would retry in full
                torch.load(io.BytesIO(raw), weights_only=True)
            except Exception as e:
                problems.append(f"{sample}: not loadable with weights_only=True ({type(e).__name__}), "
                                "so torch would unpickle it in full")
    for record in sorted(records - allowed):
        if record.startswith(pt2.EXTRA_DIR):
            continue  # read as text only
        if record.startswith(pt2.AOTINDUCTOR_DIR):
            problems.append(f"{record}: compiled code (torch loads it as a shared library)")
        else:
            problems.append(f"{record}: not part of a program of plain tensors (torch may unpickle it)")
    return problems


def check_archive(data: bytes, name: str | Path) -> None:
    """Raise :class:`UnsafeProgramError` naming ``name`` if ``torch.export.load`` would unpickle ``data``."""
    problems = archive_problems(data)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UnsafeProgramError(f"{name}: refused: torch.export.load would unpickle it, which can run any "
                                 f"code: {shown}")


def load_program(path: str | Path, expected_sha256: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` of ``path`` after checking its SHA-256 and refusing pickles."""
    data = read_verified(path, expected_sha256)
    check_archive(data, path)
    with warnings.catch_warnings():
        # The weights are read from the archive's (immutable) bytes, of which torch warns that tensors
        # over them are not writable; nothing writes to a loaded program's weights.
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.export.load(io.BytesIO(data))  # the bytes that were checked, not the path again
