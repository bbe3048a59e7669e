"""Serving and loading an exported model with MLflow after checking every file of it (``fulu-nas serve``).

An MLflow model is code (``pyfunc.py``, ``code/``) and configuration (``MLmodel``) that MLflow runs as it
loads the model, before any check the model itself makes; ``mlflow models serve`` on a model whose
files someone replaced runs their code. So ``fulu-nas serve`` first makes a private copy of the model
and checks it against SHA-256 values recorded where the model's files are not:

- a registered model (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, in the tracking server of
  ``MLFLOW_TRACKING_URI`` or ``--tracking-uri``): ``fulu-nas export`` records the SHA-256 of every
  file of the version it registers as the version's tag ``fulu.files``, in the tracking database, not
  in the artifact store that holds the files. With ``--sha256``, the version must also be the one
  registered by the export that printed that fingerprint (its tag ``fulu.fingerprint``), or its files
  those of the files hash that export printed on its "registered as" line (a hash of the files
  themselves, so it also catches a tracking database whose tags were rewritten);
- an export folder: its ``checksums.json``, and with ``--sha256`` that this file is the exported one
  (the fingerprint ``fulu-nas export`` printed), else only that the folder agrees with itself. A
  folder's own code is never run, since its checksums can be rewritten along with it: the installed
  fulu-nas pyfunc serves its checked program and architecture. An upcycled encoder's export (task
  ``upcycle``) is no MLflow model: it is refused, pointing to ``fulu_nas.load``.

Then MLflow's scoring server serves the copy in this environment (:mod:`.scoring_app`: its app behind
short JSON errors, on 127.0.0.1 by default), with MLflow's pickle loading switched off.
:func:`load_pyfunc` does the same for ``mlflow.pyfunc.load_model`` in Python.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..checks import check_tracking_database_exists
from ..errors import FuluConfigError
from .export import FINGERPRINT_TAG, check_folder
from .files import (
    checked_copy,
    expected_digest,
    manifest_digest,
    manifest_json,
    parse_manifest,
    path_argument,
)

FILES_TAG = "fulu.files"  # a registered version's files: JSON, relative name -> SHA-256
NO_PICKLES = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
# MLflow's note of a version's name and number, which it writes into a local artifact store when a
# model is loaded by its models:/ URI; data it never runs, so not checked and not served.
REGISTRY_NOTE = "registered_model_meta"


def _download(client, name: str, version: str, into: Path, tracking_uri: str | None) -> Path:
    """The files of a registered version, downloaded as ``mlflow models serve`` would fetch them; FuluConfigError
    where the artifact store cannot give them (moved or deleted, a server down, no credentials)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    store = client.get_model_version_download_uri(name, version)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # MLflow's download progress bar
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=store, dst_path=str(into),
                                                            tracking_uri=tracking_uri))
    except (MlflowException, OSError) as e:
        # MLflow's message: a line naming the store, then '##### File NAME #####' and the error of each file.
        lines = (e.message if isinstance(e, MlflowException) else str(e)).splitlines()
        reason = next((line.strip() for line in lines if line.strip() and not line.startswith(
            ("The following failures occurred", "#####"))), type(e).__name__)
        raise FuluConfigError(f"models:/{name}/{version}: its files could not be fetched from the artifact store "
                              f"{store} ({reason}): were the study's artifacts (its mlartifacts folder) moved or "
                              "deleted, or is the artifact server down?") from None


def record_registered_files(client, name: str, version: str, manifest: dict[str, str], tracking_uri: str) -> str:
    """Tag the registered version ``name``/``version`` with ``manifest`` (:data:`FILES_TAG`: the SHA-256 of
    the files the export wrote and uploaded) once the artifact store gives back exactly those bytes (the
    store's own word would certify whatever it held by then); the manifest's digest."""
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(client, name, version, Path(tmp), tracking_uri)
        problems = checked_copy(local, manifest, "the files uploaded", ignore=(REGISTRY_NOTE,), shown=Path())
    if problems:
        raise FuluConfigError([f"registering {name!r}: the artifact store gave back other files than those "
                               f"uploaded: {p}" for p in problems])
    client.set_model_version_tag(name, version, FILES_TAG, manifest_json(manifest))
    return manifest_digest(manifest)


def _registered(uri: str, tracking_uri: str | None):
    """The model version ``uri`` names, or FuluConfigError."""
    import mlflow
    from mlflow.exceptions import MlflowException

    reference = uri[len("models:/"):]
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            return client, client.get_model_version_by_alias(name, alias)
        name, _, version = reference.partition("/")
        if not (version.isascii() and version.isdigit()):  # isdigit() alone takes other scripts' digits
            raise FuluConfigError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return client, client.get_model_version(name, version)
    except MlflowException as e:
        raise FuluConfigError(f"{uri}: not found in the model registry at "
                              f"{tracking_uri or mlflow.get_tracking_uri()} ({e.message.splitlines()[0]})") from None


@contextlib.contextmanager
def checked_model(source: str | os.PathLike, expected_sha256: str | None = None,
                  tracking_uri: str | None = None) -> Iterator[Path]:
    """A private copy of the MLflow model ``source`` (a registered model URI or an export folder), made as
    it is checked (for a folder, the model :func:`served_folder` makes of it); removed on exit.
    FuluConfigError names what is wrong.

    ``expected_sha256`` for a registered version: the fingerprint ``fulu-nas export`` printed (the
    version's :data:`FINGERPRINT_TAG`: it is the version that export registered) or the files hash it
    printed on its "registered as" line (the digest of :data:`FILES_TAG`, which also binds the files to
    the hash, against a tracking database whose tags were rewritten). Either way every file is checked
    against :data:`FILES_TAG`."""
    source = path_argument(source, "source", "neither a models:/ URI nor a folder")
    expected = expected_digest(expected_sha256)
    with tempfile.TemporaryDirectory(prefix="fulu-nas-serve-") as tmp:
        copy = Path(tmp) / "model"
        if source.startswith("models:/"):
            tracking_uri = registry_uri(tracking_uri)
            client, version = _registered(source, tracking_uri)
            if FILES_TAG not in version.tags:
                raise FuluConfigError(f"{source}: version {version.version} has no {FILES_TAG} tag (registered "
                                      "by an older fulu-nas, or not by fulu-nas export): export it again")
            manifest = parse_manifest(version.tags[FILES_TAG], f"{source} (tag {FILES_TAG})")
            if expected is not None and expected not in (manifest_digest(manifest),
                                                         version.tags.get(FINGERPRINT_TAG, "").lower()):
                raise FuluConfigError(f"{source}: version {version.version} is not the expected {expected_sha256}: "
                                      "neither the fingerprint fulu-nas export printed for it (tag "
                                      f"{FINGERPRINT_TAG}) nor the hash of its files ({FILES_TAG}, printed "
                                      "as 'files ...' on the export's 'registered as' line)")
            downloaded = Path(tmp) / "download"
            downloaded.mkdir()
            local = _download(client, version.name, version.version, downloaded, tracking_uri)
            copy.mkdir()
            # named by their paths within the model: the download is private, and gone once this returns
            problems = checked_copy(local, manifest, f"the {FILES_TAG} tag of {source}", ignore=(REGISTRY_NOTE,),
                                    into=copy, shown=Path())
            if problems:
                raise FuluConfigError([f"{source}: {p}" for p in problems])
            shutil.rmtree(downloaded)
        else:
            served_folder(Path(source), expected_sha256, Path(tmp), copy)
        yield copy


def served_folder(folder: Path, expected_sha256: str | None, tmp: Path, into: Path) -> None:
    """The MLflow model to serve for the export folder ``folder``, written at ``into``: fulu-nas's own pyfunc
    (:func:`~.export.save_pyfunc`, the installed code) over the folder's program and architecture, once every
    file is checked (``expected_sha256``: the export's fingerprint). Nothing of the folder runs: its
    ``pyfunc.py``, ``code/`` and ``MLmodel`` are code and configuration MLflow would run, and a folder's
    checksums can be rewritten with them; its program and configuration are data, checked before use."""
    from .export import UPCYCLING, check_program, read_architecture, save_pyfunc

    checked = tmp / "checked"
    checked.mkdir()
    check_folder(folder, expected_sha256, into=checked)
    if (checked / UPCYCLING).is_file():
        raise FuluConfigError(f"{folder} is an upcycled encoder ({UPCYCLING}), a transformers model rather than an "
                              "MLflow model, so fulu-nas serve cannot serve it: load it with "
                              "fulu_nas.load(FOLDER, expected_sha256=FINGERPRINT) and serve it from Python (for "
                              "example with a transformers pipeline)")
    if missing := [name for name in ("config.yaml", "model.pt2") if not (checked / name).is_file()]:
        raise FuluConfigError(f"{folder}: no {' or '.join(missing)}, so not the export of a searched model; "
                              "fulu-nas serve serves the folders fulu-nas export writes for a searched model")
    arch = read_architecture(checked / "config.yaml", folder / "config.yaml")
    check_program(checked / "model.pt2", arch, folder)
    into.mkdir()
    save_pyfunc(into, checked / "model.pt2", arch)


def casting_signature(model: Path) -> str | None:
    """A warning for a model (the checked copy) whose signature declares its token ids as integers: an
    export made before the signature took objects, whose JSON input MLflow's scoring server casts to
    int64 before the model sees it (1.9 and true are served as the ids 1 and 1, not refused)."""
    import mlflow

    signature = mlflow.models.Model.load(str(model / "MLmodel")).signature
    inputs = signature.inputs.inputs if signature is not None else []
    if inputs and getattr(inputs[0], "type", None) is not None and getattr(inputs[0].type, "kind", "O") in "iu":
        return ("this model's signature declares its token ids as integers (an export made before they were "
                "declared as objects): MLflow's scoring server casts what it is sent to int64, so 1.9 or true "
                "are served as token ids rather than refused; export the model again to have them refused")
    return None


def registry_uri(tracking_uri: str | None) -> str:
    """The tracking server or database that holds the registry: ``tracking_uri``, else
    ``MLFLOW_TRACKING_URI``; a SQLite database must exist and be MLflow's (MLflow would create an empty one,
    or make its tables in the study's optuna.db, before failing)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise FuluConfigError("tracking URI: name the registry's tracking server or database with --tracking-uri "
                              "or MLFLOW_TRACKING_URI (e.g. sqlite:///outputs/STUDY/mlflow.db)")
    check_tracking_database_exists(uri, "tracking URI")
    return uri


def load_pyfunc(source: str | os.PathLike, expected_sha256: str | None = None, tracking_uri: str | None = None):
    """``mlflow.pyfunc.load_model`` of ``source`` (a registered model URI or an export folder) after
    checking every file of it (:func:`checked_model`); MLflow's pickle loading is off meanwhile."""
    import mlflow

    with _mlflow_quiet(), checked_model(source, expected_sha256, tracking_uri) as copy, _environment(NO_PICKLES):
        if warning := casting_signature(copy):
            warnings.warn(warning, stacklevel=2)
        return mlflow.pyfunc.load_model(str(copy))  # the program is read into memory as it loads


@contextlib.contextmanager
def _mlflow_quiet() -> Iterator[None]:
    """MLflow's INFO lines (the validation of the input example as a folder's model is saved) and its download
    bars kept off the caller's console inside the block: a loader's output is the model, not MLflow's
    progress. Its warnings still show."""
    import logging

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    bars = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    try:
        with _environment({bars: os.environ.get(bars, "false")}):  # a user's own choice stands
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in ``os.environ`` inside the block, the previous values (or none) after it."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
