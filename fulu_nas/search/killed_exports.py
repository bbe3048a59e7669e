"""What a killed ``fulu-nas export`` left behind, undone by the study's next export.

Ctrl-C and SIGTERM undo an export as they stop it; ``kill -9`` (the out-of-memory killer, a lost node)
leaves its MLflow run RUNNING, and perhaps a registered version whose registration did not end (its
files never recorded, which ``fulu-nas serve`` refuses) with its logged model and the registered model
made for it, and the folder it wrote but never announced. The next export of the study on the same
host finds such a run by its writer (``fulu.worker``, a process that has ended), undoes what the killed
export would have undone, and ends the run KILLED. A version whose registration ended (its fingerprint
tag set, the last step before the ``champion`` alias) stays, with its folder.
"""

from __future__ import annotations

from pathlib import Path

from ..deploy.export import FINGERPRINT_TAG, PARTIAL, abandon, remove_abandoned_partials, verify
from ..deploy.processes import process_is_gone
from ..errors import FuluConfigError
from .tracking import PARENT_RUN_ATTR, WRITER_TAG, open_runs

CHAMPION = "champion"  # the alias of the version an export registered last
OUT_TAG = "fulu.out"  # an export run's folder
OUT_GIVEN_EMPTY_TAG = "fulu.out_given_empty"  # "true" where that folder was given empty: left empty when undone
MADE_BY_TAG = "fulu.made_by_run"  # a registered model's: the export run that registered it first


def undo_killed_exports(client, experiment: str, study) -> list[str]:
    """Undo the exports of ``study`` whose process ended with their run open; a line for each, saying what
    was removed (or why it could not be undone: the export that asks goes on)."""
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    found = client.get_experiment_by_name(experiment)
    if not parent_id or found is None:
        return []
    lines = []
    for run in open_runs(client, found.experiment_id, parent_id, "export"):
        if not process_is_gone(run.data.tags.get(WRITER_TAG, "")):
            continue  # at work, or another host's
        try:
            lines.append(_undo(client, found.experiment_id, run))
        except Exception as e:  # noqa: BLE001 - the registry or the folder failing: said, and the export goes on
            lines.append(f"warning: could not undo the export killed in MLflow run {run.info.run_id}: "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    return lines


def _undo(client, experiment_id: str, run) -> str:
    run_id, tags = run.info.run_id, run.data.tags
    removed, kept, with_removed_version = [], set(), set()
    for found in client.search_model_versions(f"run_id = '{run_id}'"):
        version = client.get_model_version(found.name, found.version)  # a search leaves the tags out
        if FINGERPRINT_TAG in version.tags:  # registered to the end (perhaps champion, or was)
            kept.add(version.source.removeprefix("models:/"))
            continue
        client.delete_model_version(version.name, version.version)
        removed.append(f"version {version.version} of {version.name!r}")
        with_removed_version.add(version.name)
    # the registered model the killed export made (for the version removed, or killed before registering it)
    for model in client.search_registered_models(filter_string=f"tags.`{MADE_BY_TAG}` = '{run_id}'"):
        if not client.search_model_versions(f"name = '{model.name}'"):
            if model.name not in with_removed_version:  # said with its version, where one was removed
                removed.append(f"the empty registered model {model.name!r}")
            client.delete_registered_model(model.name)
    for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        if model.model_id not in kept:
            client.delete_logged_model(model.model_id)
    folder = Path(tags[OUT_TAG]) if tags.get(OUT_TAG) else None
    if folder is not None and folder.parent.is_dir():  # killed between recording its run and renaming its folder
        own = f".{folder.name}{PARTIAL}{tags[WRITER_TAG]}-"
        removed += [f"its partial folder {path}" for path in remove_abandoned_partials(folder.parent)
                    if path.name.startswith(own)]
    if not kept and folder is not None and _untouched(folder, tags.get(FINGERPRINT_TAG)):
        abandon(folder)
        if tags.get(OUT_GIVEN_EMPTY_TAG) == "true":
            folder.mkdir()  # as an undone export leaves the empty folder it was given
            removed.append(f"what the export wrote in {folder}")
        else:
            removed.append(f"the folder {folder}")
    reason = f"export killed before it ended (process {tags[WRITER_TAG]} gone)"
    client.set_tag(run_id, "fulu.reason", reason)
    client.set_terminated(run_id, "KILLED")
    done = ("removed " + " and ".join(removed)) if removed else "nothing else to remove"
    return f"ended the MLflow run {run_id} of an {reason} of trial {tags.get('fulu.trial', '?')}: {done}"


def _untouched(folder: Path, digest: str | None) -> bool:
    """Whether ``folder`` holds what the export wrote and nothing else: every file as its checksums say, and
    those the files of the fingerprint the run recorded (not a folder someone changed or put there since)."""
    if digest is None or folder.is_symlink() or not folder.is_dir():
        return False
    try:
        verify(folder, digest)
    except (FuluConfigError, OSError):
        return False
    return True
