"""What a killed ``fulu-nas export`` left behind, undone by the study's next export.

Ctrl-C and SIGTERM undo an export as they stop it; ``kill -9`` (the out-of-memory killer, a lost node)
leaves its MLflow run RUNNING, and perhaps a registered version whose files were never recorded (which
``fulu-nas serve`` refuses) with its logged model and the registered model made for it, and the folder
it wrote but never announced. The next export of the study on the same host finds such a run by its
writer (``fulu.worker``, a process that has ended), undoes what the killed export would have undone,
and ends the run KILLED. A version the ``champion`` alias names was registered to the end: it stays,
with its folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..deploy.export import FINGERPRINT_TAG, fingerprint
from ..deploy.processes import process_is_gone
from .tracking import PARENT_RUN_ATTR

CHAMPION = "champion"  # the alias of the version an export registered last
OUT_TAG = "fulu.out"  # an export run's folder
MADE_BY_TAG = "fulu.made_by_run"  # a registered model's: the export run that registered it first
WRITER_TAG = "fulu.worker"  # the process that opened a run (deploy.processes.this_process)


def undo_killed_exports(client, experiment: str, study) -> list[str]:
    """Undo the exports of ``study`` whose process ended with their run open; one line for each, saying what
    was removed."""
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    found = client.get_experiment_by_name(experiment)
    if not parent_id or found is None:
        return []
    runs = client.search_runs([found.experiment_id], max_results=1000, filter_string=(
        f"tags.mlflow.parentRunId = '{parent_id}' and tags.`fulu.kind` = 'export' and "
        "attributes.status = 'RUNNING'"))
    return [_undo(client, found.experiment_id, run) for run in runs
            if process_is_gone(run.data.tags.get(WRITER_TAG, ""))]


def _undo(client, experiment_id: str, run) -> str:
    run_id, tags = run.info.run_id, run.data.tags
    removed, kept = [], set()
    for found in client.search_model_versions(f"run_id = '{run_id}'"):
        version = client.get_model_version(found.name, found.version)  # a search leaves the aliases out
        if CHAMPION in version.aliases:  # registered to the end: served now
            kept.add(version.source.removeprefix("models:/"))
        else:
            client.delete_model_version(version.name, version.version)
            removed.append(f"version {version.version} of {version.name!r}")
            model = client.get_registered_model(version.name)
            if model.tags.get(MADE_BY_TAG) == run_id and not client.search_model_versions(f"name = '{model.name}'"):
                client.delete_registered_model(model.name)  # the killed export made it for this version
    for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        if model.model_id not in kept:
            client.delete_logged_model(model.model_id)
    folder = Path(tags[OUT_TAG]) if tags.get(OUT_TAG) else None
    if not kept and folder is not None and _wrote(folder, tags.get(FINGERPRINT_TAG)):
        shutil.rmtree(folder)
        removed.append(f"the folder {folder}")
    reason = f"export killed before it ended (process {tags[WRITER_TAG]} gone)"
    client.set_tag(run_id, "fulu.reason", reason)
    client.set_terminated(run_id, "KILLED")
    done = ("removed " + " and ".join(removed)) if removed else "nothing else to remove"
    return f"ended the MLflow run {run_id} of an {reason} of trial {tags.get('fulu.trial', '?')}: {done}"


def _wrote(folder: Path, digest: str | None) -> bool:
    """Whether ``folder`` is still the export's own: the files of the fingerprint it recorded (not a folder
    someone put there since)."""
    try:
        return digest is not None and folder.is_dir() and not folder.is_symlink() and fingerprint(folder) == digest
    except OSError:
        return False
