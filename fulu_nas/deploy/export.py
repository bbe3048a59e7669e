"""A deployable model directory, and :func:`load` to get the module back.

An export directory holds:

- ``config.yaml``: the architecture, the task it was found for, and where it came from;
- ``model.safetensors``: the weights (never a pickle);
- ``model.pt2``: a ``torch.export`` program returning logits, with dynamic batch (up to
  :data:`MAX_BATCH` sequences) and sequence (up to the model's length) dimensions; it runs with
  torch alone, loaded as the model card shows (SHA-256 first: ``torch.export.load`` unpickles, see
  :mod:`.pt2_check`);
- ``MLmodel`` + environment files + ``pyfunc.py`` + ``code/pt2_check.py`` + ``artifacts/model.pt2``:
  an MLflow pyfunc over the program (``fulu-nas serve DIR``, :mod:`.serve`), built from code, not
  pickled; it checks the program's SHA-256 (in MLmodel's config) before loading it;
- ``metrics.json``, ``README.md`` (model card) and ``checksums.json``: the SHA-256 of every other
  file, verified by :func:`verify` (and so :func:`load`), which also refuses programs from which
  ``torch.export.load`` would run code. The SHA-256 of ``checksums.json`` is the export's
  :func:`fingerprint`.

The directory is assembled under a temporary name next to ``out`` and renamed at the end, so a
failure leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import device_problem, first_few, nonfinite_tensors, yaml_problem
from ..errors import FuluConfigError
from ..models import ArchConfig, PiMoETransformer
from .files import checked_copy, expected_digest, manifest_digest, parse_manifest
from .files import sha256_file as sha256
from .processes import process_is_gone, this_process
from .pt2_check import UnsafeProgramError, check_archive
from .routing_words import batch_dependence

CHECKSUMS = "checksums.json"
UPCYCLING = "upcycling.yaml"  # what marks an upcycled encoder's export (fulu_nas.interop.upcycle_export)
FORMAT_VERSION = 1
MAX_YAML_DEPTH = 32  # an export's config.yaml nests four levels deep
FINGERPRINT_TAG = "fulu.fingerprint"  # the folder's fingerprint, as a registered version's or export run's tag
MAX_BATCH = 4096  # the program's largest batch (a dynamic dimension needs a bound)
INPUT_NAME = "token_ids"  # the signature's one input (pyfunc.py takes {"token_ids": ids} and ids alike)
# The pyfunc is "models from code": MLflow copies this file into the model and runs it when loading;
# it imports the archive check, shipped beside it as code (the serving side has no fulu_nas).
PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")
PT2_CHECK_CODE = Path(__file__).with_name("pt2_check.py")


class LogitsOnly(nn.Module):
    """The model as ``tokens -> logits`` (what the program and the pyfunc serve)."""

    def __init__(self, model: PiMoETransformer):
        super().__init__()
        self.model = model

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return self.model(tokens_BS).logits


def export_program(model: PiMoETransformer, path: Path, max_batch: int = MAX_BATCH) -> torch.export.ExportedProgram:
    """``torch.export`` the model (eval mode, fp32, CPU) with dynamic batch (up to ``max_batch``) and
    sequence; checks the program against the module before saving it."""
    arch = model.arch
    wrapped = LogitsOnly(model).eval()
    example = torch.randint(0, arch.vocab_size, (2, min(8, arch.max_seq_len)))
    dynamic = {0: torch.export.Dim("batch", min=1, max=max_batch)}
    if arch.max_seq_len > 1:  # a model of one token has a fixed length (torch refuses a Dim of min = max)
        dynamic[1] = torch.export.Dim("seq", min=1, max=arch.max_seq_len)
    with torch.no_grad():
        program = torch.export.export(wrapped, (example,), dynamic_shapes=({**dynamic},))
        check = torch.randint(0, arch.vocab_size, (3, min(5, arch.max_seq_len)))
        torch.testing.assert_close(program.module()(check), wrapped(check), rtol=1e-4, atol=1e-5)
    torch.export.save(program, str(path))
    return program


def pyfunc_arguments(program_path: Path, arch: ArchConfig) -> dict[str, Any]:
    """What ``mlflow.pyfunc.save_model`` and ``log_model`` take, the same for the export folder and the
    registered model, so that both have one signature, one configuration and accept the same input."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    classes = arch.num_classes or arch.vocab_size
    # The input is declared as objects, not int64: MLflow's scoring server casts JSON to the declared dtype
    # (1.9 -> 1, true -> 1) before the model sees it, and passes an object tensor through as it is, so the
    # pyfunc checks the values as they were sent. Shape (-1,), not (-1, -1): with two dimensions MLflow
    # refuses an int64 array from Python ("dtype of input int64 does not match expected dtype object").
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(object), (-1,), name=INPUT_NAME)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, classes))]))
    return dict(python_model=str(PYFUNC_CODE), code_paths=[str(PT2_CHECK_CODE)],
                artifacts={"program": str(program_path)}, signature=signature,
                input_example=np.zeros((1, 4), dtype=np.int64),
                model_config={"program_sha256": sha256(program_path), "vocab_size": arch.vocab_size,
                              "max_seq_len": arch.max_seq_len, "max_batch": MAX_BATCH},
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                                  "numpy"])


def save_pyfunc(directory: Path, program_path: Path, arch: ArchConfig) -> None:
    """Write the MLflow pyfunc (MLmodel, environment files, code, artifacts) into ``directory``."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "pyfunc"
        mlflow.pyfunc.save_model(path=str(staged), **pyfunc_arguments(program_path, arch))
        for item in staged.iterdir():
            shutil.move(str(item), directory / item.name)


def torch_only_loading(program_sha256: str, vocab_size: int, max_seq_len: int, batch_dependent: str | None) -> str:
    """The model card's section on loading ``model.pt2`` with torch alone, SHA-256 first. Its example batch
    fits the model: the program refuses sequences longer than ``max_seq_len``. ``batch_dependent``: why a
    sequence's output depends on its batch (:func:`~.routing_words.batch_dependence`), or None."""
    split = (f"split larger batches, knowing that each part is then its own batch: a sequence's output depends "
             f"on the rest of its batch ({batch_dependent})" if batch_dependent else "split larger batches")
    return f"""
## Loading model.pt2 with torch alone
`torch.export.load` unpickles parts of an archive and evaluates expressions stored in it: run it
only on a file whose SHA-256 is the one exported. `model.pt2` (and its copy `artifacts/model.pt2`):
`{program_sha256}`.
```python
import hashlib, io, torch
data = open("model.pt2", "rb").read()
if hashlib.sha256(data).hexdigest() != "{program_sha256}":
    raise SystemExit("model.pt2 is not the exported file: not loading it")
program = torch.export.load(io.BytesIO(data))     # the bytes just checked
logits = program.module()(torch.randint(0, {vocab_size}, (2, {min(16, max_seq_len)})))
```
The program takes a batch of up to {MAX_BATCH} sequences (its bound on the dynamic batch dimension), each
up to the model's length; {split}.
"""


def check_out_folder(out: Path) -> None:
    """FuluConfigError unless ``out`` is a folder an export may fill: missing, or empty, and not the current
    folder. A file, even an empty one, is named as such (calling it "not empty" would point the user at the
    wrong fix)."""
    if out.exists() and not out.is_dir():
        raise FuluConfigError(f"out: {out} is a file, not a folder; choose a folder")
    if out.is_dir() and any(out.iterdir()):
        raise FuluConfigError(f"out: {out} exists and is not empty; choose another folder")
    # The folder is assembled beside ``out`` and renamed into place (:func:`assemble`): the current folder
    # would be removed and replaced under this process and any shell in it, which would see an empty,
    # deleted folder.
    with contextlib.suppress(OSError):
        if out.is_dir() and os.path.samefile(out, os.curdir):
            raise FuluConfigError(f"out: {out} is the current folder, which an export cannot replace (it is "
                                  "written beside out and renamed into place); name a new folder, e.g. out=model")


def check_out_name(out: Path) -> None:
    """FuluConfigError when ``out``'s name is too long for the folder :func:`assemble` writes beside it
    (``.NAME.partial-HOST:PID-XXXXXXXX``): the file system refused it only after the model was evaluated and
    measured, with a traceback."""
    try:
        limit = os.pathconf(nearest_existing(out.parent), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = len(os.fsencode(out.name)) + len(os.fsencode(f".{PARTIAL}{this_process()}-")) + 8
    if longest > limit:
        raise FuluConfigError(f"out: the folder's name is {len(os.fsencode(out.name))} bytes long; the export writes "
                              f"it beside out under a name {longest - len(os.fsencode(out.name))} bytes longer, and "
                              f"this file system takes names of at most {limit} bytes: choose a shorter name")


def nearest_existing(folder: Path) -> Path:
    """``folder``, or its closest ancestor that exists."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first: what making it would make."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is an empty folder: those a failed write made."""
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty (someone else's files since), or already gone
            folder.rmdir()


def metrics_json(metrics: Mapping[str, Any]) -> str:
    """``metrics.json``'s text: strict JSON, every parser's. A metric that does not apply to the model (NaN:
    the routing statistics of a model without routing) or is infinite is ``null``: NaN and Infinity are not
    JSON (JavaScript's ``JSON.parse``, Go and serde_json refuse them)."""
    def value(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: value(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [value(x) for x in v]
        if v is None or isinstance(v, str | bool | int):
            return v
        number = float(v)  # a float, or a numpy or torch scalar
        return number if math.isfinite(number) else None

    return json.dumps(value(metrics), indent=2, allow_nan=False)


def metric_rows(metrics: Mapping[str, Any]) -> str:
    """The model card's table rows of the numeric metrics: counts as integers (a count measured as a float
    read 1.181e+04 for 11812) and other numbers of 10^4 or more without a fraction (tokens per second), the
    rest to 4 significant digits; a metric that does not apply (NaN) is left out."""
    rows = []
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                continue
            v = f"{v:.0f}" if v.is_integer() or abs(v) >= 1e4 else f"{v:.4g}"
        rows.append(f"| {k} | {v} |")
    return "\n".join(rows)


PARTIAL = ".partial-"
# A folder assemble() is writing: ``.NAME.partial-HOST:PID-XXXXXXXX`` (mkdtemp's suffix: letters, digits, _).
PARTIAL_NAME = re.compile(r"\..+\.partial-(?P<writer>.+:\d+)-[a-z0-9_]{8}")


def remove_abandoned_partials(folder: Path) -> list[Path]:
    """The partial folders in ``folder`` whose writer has ended (a killed export or migration: ``kill -9``
    leaves no chance to remove them) are removed; those of a running writer, or of another host's, stay.
    The folders removed."""
    removed = []
    for path in folder.glob(f".*{PARTIAL}*"):
        match = PARTIAL_NAME.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and process_is_gone(match["writer"]):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def abandon(folder: Path) -> None:
    """Remove ``folder`` by first renaming it to a partial folder of this process: a removal cut short (Ctrl-C,
    a crash) leaves a partial folder, which :func:`remove_abandoned_partials` finishes, not a folder that looks
    whole."""
    partial = folder.with_name(f".{folder.name}{PARTIAL}{this_process()}-{secrets.token_hex(4)}")
    folder.rename(partial)
    shutil.rmtree(partial)


def assemble(out: Path, fill: Callable[[Path], None], before_rename: Callable[[Path], None] | None = None) -> Path:
    """Write the folder ``out`` (which must not exist or be empty) all at once: ``fill(folder)`` writes the
    files into a temporary folder next to ``out``; then :data:`CHECKSUMS` lists the SHA-256 of each of them,
    the permissions let a serving user read them, ``before_rename(folder)`` runs (an export records the
    folder it is about to announce), and the folder is renamed to ``out``. A failure leaves nothing
    behind."""
    out = Path(out)
    check_out_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_partials(out.parent)
    # Named by its writer, so that a later export can tell the folder of a killed one from one being written.
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}{this_process()}-", dir=out.parent))
    try:
        fill(partial)
        # Every file, not only those fulu_nas reads: MLflow and torch-only users read the others.
        checksums = {path.relative_to(partial).as_posix(): sha256(path)
                     for path in sorted(partial.rglob("*")) if path.is_file()}
        (partial / CHECKSUMS).write_text(json.dumps(checksums, indent=2))
        partial.chmod(0o755)  # mkdtemp's 0700 would hide the model from a serving user
        for path in partial.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if before_rename is not None:
            before_rename(partial)
        try:
            if out.exists():
                out.rmdir()  # the empty folder given
            partial.rename(out)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another writer's, since the check (another export)
                raise FuluConfigError(f"out: {out} exists and is not empty; choose another folder") from None
            raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def write_export(out: Path, model: PiMoETransformer, config: dict[str, Any], metrics: dict[str, Any],
                 model_card: str, before_rename: Callable[[Path], None] | None = None) -> Path:
    """Assemble the export directory at ``out`` (which must not exist or be empty); ``before_rename``: as
    :func:`assemble` takes it."""
    from safetensors.torch import save_model

    counts = [layer.cfg.num_experts for layer in model.moe_layers()]
    if any(n != model.arch.moe.num_experts for n in counts):  # dynamic experts, scaled layer by layer
        raise FuluConfigError(f"the model's MoE layers have {', '.join(map(str, counts))} experts: one architecture "
                              f"(config.yaml) describes a single count, so it cannot be exported")

    def fill(folder: Path) -> None:
        cpu = model.cpu().float().eval()
        save_model(cpu, str(folder / "model.safetensors"))  # handles the tied embedding / LM head
        export_program(cpu, folder / "model.pt2")
        (folder / "config.yaml").write_text(dump_yaml(config))
        (folder / "metrics.json").write_text(metrics_json(metrics))
        save_pyfunc(folder, folder / "model.pt2", cpu.arch)
        card = model_card + torch_only_loading(sha256(folder / "model.pt2"), cpu.arch.vocab_size,
                                               cpu.arch.max_seq_len, batch_dependence(cpu.arch.moe.to_dict()))
        (folder / "README.md").write_text(card)

    return assemble(out, fill, before_rename)


# What write_export writes beside the MLflow model's files (which save_pyfunc writes): not registered.
FOLDER_ONLY = ("config.yaml", "model.safetensors", "model.pt2", "metrics.json", "README.md", CHECKSUMS)


def pyfunc_manifest(directory: Path) -> dict[str, str]:
    """The MLflow model's files in an export folder just written, with the SHA-256 its ``checksums.json``
    lists for them: the bytes the export registers, and then expects the artifact store to give back."""
    return _registered(parse_manifest((directory / CHECKSUMS).read_bytes(), str(directory / CHECKSUMS)))


def _registered(checksums: dict[str, str]) -> dict[str, str]:
    """Of an export's checksums, those of the MLflow model's files (what a registration holds)."""
    return {name: digest for name, digest in checksums.items() if name not in FOLDER_ONLY}


def fingerprint(directory: str | Path) -> str:
    """The SHA-256 of the folder's ``checksums.json``: one hash for every file of an export (printed by
    ``fulu-nas export``, recorded in MLflow). Check a folder against it with ``expected_sha256=``."""
    return sha256(Path(directory) / CHECKSUMS)


def check_folder(directory: str | Path, expected_sha256: str | None = None, into: Path | None = None,
                 required: tuple[str, ...] = ()) -> dict[str, str]:
    """Check that ``checksums.json`` lists every other file of the directory with its SHA-256, that they
    are regular files, and that no program in it would run code when ``torch.export.load`` reads it;
    with ``expected_sha256`` (the export's :func:`fingerprint`), that ``checksums.json`` is the exported
    one, so that a folder whose files and checksums were both replaced is refused too. ``into``: copy
    the files there in the same read (a private folder to load from). ``required``: the files the caller
    reads, which must be there even if ``checksums.json`` does not list them. FuluConfigError names each
    file that is missing, changed, added or refused."""
    expected = expected_digest(expected_sha256)
    directory = Path(directory)
    listing = directory / CHECKSUMS
    if not directory.is_dir():
        what = "a file, not a folder" if os.path.lexists(directory) else "no such folder"
        raise FuluConfigError(f"{directory}: not an export directory ({what})")
    if listing.is_symlink() or not listing.is_file():
        raise FuluConfigError(f"{directory}: not an export directory (no {CHECKSUMS})")
    text = listing.read_bytes()
    if expected is not None and hashlib.sha256(text).hexdigest() != expected:
        if _files_hash(text) == expected:  # both are printed by the export: the one for the registered version
            raise FuluConfigError(f"{listing}: {expected_sha256} is the files hash of the version the export "
                                  "registered ('files ...' on its 'registered as' line), which checks that version; "
                                  "a folder is checked against the export's fingerprint ('fingerprint ...')")
        raise FuluConfigError(f"{listing}: its SHA-256 is not the expected {expected_sha256} (not the exported "
                              "folder, or its files and checksums were replaced)")
    checksums = parse_manifest(text, str(listing))
    problems = checked_copy(directory, checksums, CHECKSUMS, ignore=(CHECKSUMS,), into=into)
    # A file gone from the folder and from its checksums passes the check above (one still there is named
    # as not listed): the caller would fail on it later, in the private copy's name.
    problems += [f"{directory / name}: missing" for name in required
                 if name not in checksums and not os.path.lexists(directory / name)]
    if into is not None:
        (into / CHECKSUMS).write_bytes(text)
    if not problems:
        for name in checksums:
            if name.endswith(".pt2"):
                try:
                    check_archive(((into or directory) / name).read_bytes(), directory / name)
                except UnsafeProgramError as e:
                    problems.append(str(e))
    if problems:
        raise FuluConfigError(problems)
    return checksums


def _files_hash(listing: bytes) -> str | None:
    """The files hash of the registered version of the export whose ``checksums.json`` is ``listing``
    (:func:`pyfunc_manifest`'s digest), or None where the listing does not read."""
    try:
        checksums = parse_manifest(listing, CHECKSUMS)
    except FuluConfigError:
        return None
    return manifest_digest(_registered(checksums))


def verify(directory: str | Path, expected_sha256: str | None = None) -> dict[str, str]:
    """:func:`check_folder` without a copy."""
    return check_folder(directory, expected_sha256)


@contextlib.contextmanager
def checked_folder(directory: str | Path, expected_sha256: str | None = None,
                   required: tuple[str, ...] = ()) -> Iterator[Path]:
    """A private copy of the export folder, made in the same read that checks it (:func:`check_folder`),
    removed on exit: what a loader reads is what was checked."""
    with tempfile.TemporaryDirectory(prefix="fulu-nas-checked-") as tmp:
        copy = Path(tmp) / "model"
        copy.mkdir()
        check_folder(directory, expected_sha256, into=copy, required=required)
        yield copy


def header_problems(stored: dict[str, tuple], expected: dict[str, tuple], missing: list[str]) -> list[str]:
    """Where a safetensors header (``stored``: tensor name to shape) disagrees with a configuration's tensors
    (``expected``): at most three shapes, the names it has that the configuration lacks, and ``missing``,
    the configuration's tensors the file lacks (counted by the caller: a tied tensor is saved once)."""
    problems = [f"{k}: {stored[k]} stored, {expected[k]} configured" for k in sorted(stored)
                if k in expected and stored[k] != expected[k]][:3]
    if unknown := sorted(stored.keys() - expected.keys()):
        problems.append(f"no parameter {first_few(unknown)}")
    if missing:  # load_state_dict's error would list them all
        problems.append(f"no tensor {first_few(sorted(missing))} in the file")
    return problems


def configured_tensors(arch: ArchConfig, config: Path) -> dict[str, torch.Tensor]:
    """The state dict ``arch`` describes, on the meta device (shapes, no memory); ``config``: the user's file,
    for the message when the layers refuse the architecture."""
    try:  # a configuration ArchConfig takes can still be one the layers refuse, in their own words
        with torch.device("meta"):
            return PiMoETransformer(arch).state_dict()
    except (TypeError, ValueError) as e:
        raise FuluConfigError(f"{config}: not a valid architecture ({str(e).splitlines()[0]})") from None


def read_weights(arch: ArchConfig, weights: Path, source: Path, config: Path) -> dict[str, torch.Tensor]:
    """The weights of ``weights``, read once: the configuration's tensor shapes are checked against the
    safetensors header before anything is read or a module of that size allocated (a configuration can
    ask for any size); then each tensor's type, the one :func:`write_export` stores, and its values,
    finite. ``source``, ``config``: the user's files, for messages."""
    from safetensors import SafetensorError, safe_open

    configured = configured_tensors(arch, config)
    expected = {k: tuple(v.shape) for k, v in configured.items()}
    try:  # the checksums say the file is the listed one, not that it is whole (they can be rewritten with it)
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            if problems := header_problems(stored, expected, list(expected.keys() - stored.keys())):
                raise FuluConfigError(f"{source}: config.yaml does not describe these weights: " + "; ".join(problems))
            tensors = {k: f.get_tensor(k) for k in sorted(stored)}
    except SafetensorError as e:
        raise FuluConfigError(f"{source}: not a safetensors file ({e})") from None
    check_written_weights(tensors, configured, source)
    return tensors


def check_program(program: Path, arch: ArchConfig, source: Path) -> None:
    """FuluConfigError naming ``source`` (the user's folder) unless the tensors of the program ``program`` (a
    checked copy) have the shapes ``arch`` gives them. A pyfunc over the program takes its limits (the
    vocabulary, the length) from the architecture: a config.yaml edited along with the checksums let
    through ids the program then failed on."""
    from .pt2_check import load_program

    configured = {f"model.{k}": tuple(v.shape) for k, v in configured_tensors(arch, source / "config.yaml").items()}
    try:
        stored = {k: tuple(v.shape) for k, v in load_program(program, sha256(program)).state_dict.items()}
    except UnsafeProgramError as e:
        raise FuluConfigError(f"{source / 'model.pt2'}: {e}") from None
    # the names the program lacks are not counted: it holds a tied tensor once
    if problems := header_problems(stored, configured, []):
        raise FuluConfigError(f"{source / 'config.yaml'} does not describe the program model.pt2: "
                              + "; ".join(problems))


def check_written_weights(tensors: Mapping[str, torch.Tensor], configured: Mapping[str, torch.Tensor],
                          source: Path) -> None:
    """FuluConfigError naming ``source`` (the user's weights file) unless each stored tensor is of the type an
    export writes for the configured one of its name (float32 for floating point) and finite. Loading casts
    what it reads into the model's parameters without a word, NaN and inf included: weights of another
    type (int32, float16), or not finite, are not what an export wrote."""
    wrong_type = [f"{k} ({_dtype_name(tensor.dtype)} stored, an export writes {_dtype_name(written)})"
                  for k, tensor in tensors.items() if tensor.dtype != (written := _written_dtype(configured[k]))]
    not_finite = nonfinite_tensors(tensors.items())
    problems = ([f"tensors of another type: {first_few(wrong_type)}"] if wrong_type else []) + (
        [f"NaN or infinite values in {first_few(not_finite)}"] if not_finite else [])
    if problems:
        raise FuluConfigError(f"{source}: not the exported weights: " + "; ".join(problems))


def _written_dtype(parameter: torch.Tensor) -> torch.dtype:
    """The type an export stores ``parameter`` as: it saves the model in float32."""
    return torch.float32 if parameter.is_floating_point() else parameter.dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_device(map_location: str | torch.device) -> torch.device:
    """``map_location`` as a device of this machine that can hold the weights (safetensors and torch refuse
    any other deep inside the load, in their own words)."""
    if problem := device_problem(map_location, "map_location"):
        raise FuluConfigError(problem)
    device = torch.device(map_location)
    if device.type == "meta":
        raise FuluConfigError(f"map_location: {map_location!r}: holds no data (a meta tensor is a shape alone): "
                              "name a device such as 'cpu' or 'cuda'")
    return device


def dump_yaml(data: object) -> str:
    """``data`` as the YAML an export writes: a value two fields share is written twice, never as an
    alias, which :func:`read_yaml` refuses."""
    import yaml

    class NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:
            return True

    return yaml.dump(data, Dumper=NoAliases, sort_keys=False)


def read_yaml(path: Path, shown: Path) -> object:
    """The YAML file ``path`` (a checked private copy), FuluConfigError naming ``shown`` (the user's
    file) in one line if it is not YAML (PyYAML's message spans lines and names no file) or holds an
    alias: a few hundred bytes of nested aliases stand for billions of elements once anything walks
    them (a message showing a value, a check of each item), and an export writes none."""
    import yaml

    try:
        text = path.read_text()
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise FuluConfigError(f"{shown}: holds YAML aliases (*name), which an export never writes")
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > MAX_YAML_DEPTH:  # PyYAML composes it by recursion: a small file would take minutes, then fail
                raise FuluConfigError(f"{shown}: nested more than {MAX_YAML_DEPTH} levels deep, which an export "
                                      "never writes")
        return yaml.safe_load(text)
    except FuluConfigError:  # a ValueError itself: said as raised above
        raise
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise FuluConfigError(f"{shown}: not valid YAML ({yaml_problem(e)})") from None
    except ValueError as e:  # Python's limit on an integer's digits (4,300), met by the loader's int()
        raise FuluConfigError(f"{shown}: not a configuration an export writes ({str(e).splitlines()[0]})") from None


def read_architecture(path: Path, shown: Path) -> ArchConfig:
    """The architecture of the export's ``config.yaml`` (``path``, a checked private copy; ``shown``: the
    user's file, for messages), its format and fields checked."""
    config = read_yaml(path, shown)
    if not isinstance(config, dict) or config.get("format") != FORMAT_VERSION:
        found = config.get("format") if isinstance(config, dict) else config
        raise FuluConfigError(f"{shown}: unknown export format {found!r}")
    if not isinstance(config.get("architecture"), dict):
        raise FuluConfigError(f"{shown}: no architecture mapping")
    try:
        return ArchConfig.from_dict(config["architecture"])
    except (TypeError, ValueError, KeyError) as e:
        raise FuluConfigError(f"{shown}: not a valid architecture ({e})") from None


def load(directory: str | Path, map_location: str | torch.device = "cpu",
         expected_sha256: str | None = None) -> PiMoETransformer:
    """The exported model as an ``nn.Module`` (eval mode), read from a copy made as the folder is checked
    (:func:`checked_folder`; ``expected_sha256``: the export's :func:`fingerprint`). Reads YAML and
    safetensors only: nothing is unpickled."""
    device = load_device(map_location)
    directory = Path(directory)
    with checked_folder(directory, expected_sha256, required=("config.yaml", "model.safetensors")) as copy:
        arch = read_architecture(copy / "config.yaml", directory / "config.yaml")
        weights = read_weights(arch, copy / "model.safetensors", directory / "model.safetensors",
                               directory / "config.yaml")
        model = PiMoETransformer(arch)
        model.load_state_dict(weights, strict=True)
    return model.to(device).eval()
