"""MLflow tracking of a study: one parent run per study, one nested run per trial (and per
confirmation run, :mod:`.confirm`).

Everything goes through an explicit :class:`mlflow.MlflowClient` and run ids (no fluent "active
run" state), so trials run by other processes or hosts nest under the same parent: its id is
stored on the Optuna study (``mlflow_parent_run_id``) and every worker reads it from there.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..checks import is_tracking_server, sqlite_file
from ..deploy.files import sha256_file
from ..deploy.processes import process_is_gone, this_process
from ..errors import FuluConfigError
from ..signals import held
from .interrupts import between_writes
from .settings import ARTIFACTS_FOLDER, SearchSettings
from .storage import database_error, first_contact, mask_url

# Why the run of a finished trial whose artifacts' upload was cut off ended KILLED.
ORPHANED_UPLOAD = ("its worker stopped while uploading the trial's artifacts; the weights may be missing "
                   "(fulu-nas export retrain=true trains them again)")
PARENT_RUN_ATTR = "mlflow_parent_run_id"
WEIGHTS_SHA256_TAG = "fulu.weights_sha256"  # a trial's model.safetensors, as it was uploaded


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``moe.num_experts``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


WRITER_TAG = "fulu.worker"  # a run's: the process that opened it (deploy.processes.this_process)


def quiet_mlflow() -> None:
    """Keep MLflow's INFO log (database migrations, input-example validation) and its artifact download
    bars off the console, which carries the command's own progress and results; its warnings still
    show. MLflow configures its logger when imported, so this imports it first."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "mlflow" not in sys.modules:
        with held():  # MLflow loads (seconds): its import is no place for a KeyboardInterrupt
            import mlflow  # noqa: F401

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def writes(method):
    """A Tracker method that writes to the tracking database: a Ctrl-C waits until it is done
    (:func:`~fulu_nas.search.interrupts.between_writes`)."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        with between_writes():
            return method(*args, **kwargs)
    return run


def open_experiment(tracking_uri: str, name: str, artifact_location: str | None):
    """A client of ``tracking_uri`` and the id of its experiment ``name``, created where it does not exist.
    The client makes a database's tables, which processes starting together race for (see
    :func:`~.storage.first_contact`); a tracking server migrates alone."""
    import mlflow

    def first() -> tuple[mlflow.MlflowClient, Any]:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        return client, client.get_experiment_by_name(name)

    # MLflow migrates a new database step by step (not one transaction on SQLite): an interrupt in the
    # middle left tables that made every later open fail ("table datasets already exists").
    remote = is_tracking_server(tracking_uri)
    try:
        with between_writes():
            client, experiment = first_contact(tracking_uri, first, lambda e: not remote)
    except Exception as e:
        if remote or not type(e).__module__.startswith(("sqlalchemy", "alembic", "mlflow")):
            raise
        # A database half-made (its migration killed) or of another MLflow: one message, not SQLAlchemy's trace.
        where = sqlite_file(tracking_uri) if tracking_uri.startswith("sqlite:") else mask_url(tracking_uri)
        raise FuluConfigError(f"tracking.uri: MLflow cannot open its database {where}: {database_error(e)}") from None
    if experiment is not None:
        return client, experiment.experiment_id
    try:
        return client, client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # another worker created it first
        return client, client.get_experiment_by_name(name).experiment_id


class Tracker:
    def __init__(self, settings: SearchSettings):

        quiet_mlflow()  # a worker process starts here
        self.settings = settings
        self.client, self.experiment_id = open_experiment(settings.tracking_uri, settings.tracking.experiment,
                                                          settings.artifact_location)
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fulu-upload")
        self._uploads: list[Future] = []

    # -- the study's parent run ---------------------------------------------------------------
    @writes
    def parent_run(self, study) -> str:
        """The study's parent run, created on first use and shared through the study."""
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id:
            return run_id
        s = self.settings
        run = self.client.create_run(self.experiment_id, run_name=f"study {s.study.name}",
                                     tags={"fulu.kind": "study", "fulu.study": s.study.name})
        params = {"study_name": s.study.name, "storage": mask_url(s.storage_url), "search_space": s.space.name,
                  "task": s.task_name, "sampler": s.study.sampler, "pruner": s.study.pruner,
                  "objectives": ",".join(s.study.objectives), "n_trials": s.study.n_trials,
                  **{f"task.{k}": v for k, v in s.task_params.items()},
                  **({"task.corpus_sha256": s.corpus_sha256} if s.corpus_sha256 is not None else {}),
                  **{f"trainer.{k}": v for k, v in flatten(s.raw["trainer"]).items()},
                  "cost.shapes": [list(shape) for shape in s.cost_shapes],  # as measured: trainer.cost_shapes capped
                  **{f"constraint.{k}": v for k, v in s.study.constraints}}
        self.log_params(run.info.run_id, params)
        with tempfile.TemporaryDirectory() as tmp:
            # In the order written: a space's parameters are sampled, and their `when` read, in file order.
            _write_json(Path(tmp) / "search_config.json", masked_config(s.raw), sort_keys=False)
            self.client.log_artifact(run.info.run_id, str(Path(tmp) / "search_config.json"))
        # Two workers starting at once may both get here: the first id stored wins.
        study.set_user_attr(PARENT_RUN_ATTR, study.user_attrs.get(PARENT_RUN_ATTR) or run.info.run_id)
        winner = study.user_attrs[PARENT_RUN_ATTR]
        if winner != run.info.run_id:
            self.client.delete_run(run.info.run_id)
        return winner

    @writes
    def finish_study(self, parent_id: str, summary: dict, error: str | None = None) -> None:
        """The summary on the study's parent run, which ends FINISHED once the study has its trials and
        KILLED when the search stopped short (interrupted, or out of attempts; the same command resumes it);
        FAILED, with ``error`` as its reason, when an error ended the search or no trial of the study completed."""
        metrics = {f"best.{k}": v for k, v in summary.get("best_metrics", {}).items() if _is_number(v)}
        self._log_metrics(parent_id, metrics)
        # n_trials_requested as a tag: the run's n_trials parameter is the first search's (parameters are fixed)
        for key in ("best_trial", "n_complete", "n_pruned", "n_failed", "n_infeasible", "n_reused",
                    "n_trials_requested", "n_finished"):
            if key in summary:
                self.client.set_tag(parent_id, f"fulu.{key}", str(summary[key]))
        with tempfile.TemporaryDirectory() as tmp:
            _write_json(Path(tmp) / "summary.json", summary)
            self.client.log_artifact(parent_id, str(Path(tmp) / "summary.json"))
        done = summary["n_finished"] >= summary["n_trials_requested"]
        self.client.set_tag(parent_id, "fulu.state", "complete" if done else "incomplete")
        if error is not None:
            self.client.set_tag(parent_id, "fulu.reason", error[:5000])
        elif "fulu.reason" in self.client.get_run(parent_id).data.tags:  # an earlier search's, ended by an error
            self.client.delete_tag(parent_id, "fulu.reason")
        status = "FAILED" if error is not None else "FINISHED" if done else "KILLED"
        self.client.set_terminated(parent_id, status=status)

    # -- trials -------------------------------------------------------------------------------
    @writes
    def start_trial(self, parent_id: str, number: int, params: dict, arch: dict, tags: dict) -> str:
        return self._start_child(parent_id, f"trial {number}", "trial", number, tags,
                                 {**{f"param.{k}": v for k, v in params.items()}, **flatten(arch)})

    @writes
    def start_confirmation(self, parent_id: str, trial: int, seed: int, steps: int, arch: dict, tags: dict) -> str:
        """A confirmation run (:mod:`.confirm`) of ``trial``'s architecture: its params are the architecture."""
        return self._start_child(parent_id, f"confirm trial {trial} seed {seed}", "confirmation", trial,
                                 {"fulu.seed": seed, "fulu.steps": steps, **tags}, flatten(arch))

    def open_children(self, parent_id: str, kind: str, trial: int | None = None) -> list[str]:
        """The ids of ``parent_id``'s runs of ``kind`` (of trial number ``trial`` when given) still
        RUNNING (a process that wrote them was killed, or is still at work)."""
        return [r.info.run_id for r in self._open_runs(parent_id, kind, trial)]

    def _open_runs(self, parent_id: str, kind: str, trial: int | None = None) -> list:
        return open_runs(self.client, self.experiment_id, parent_id, kind, trial)

    @writes
    def close_stale_trial(self, study, trial, reason: str | None = None) -> None:
        """``trial`` was failed because its worker stopped (killed, or cut off from the storage): its MLflow
        run, which that worker cannot close any more, ends KILLED with ``reason`` (by default the heartbeat
        check's, which fails most such trials)."""
        parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if not parent_id:
            return
        reason = reason or (f"worker stopped: no heartbeat for {self.settings.study.grace_period} s (killed, or cut "
                            "off from the study's storage); Optuna failed the trial and queues it again up to "
                            "study.max_retry times")
        for run_id in self.open_children(parent_id, "trial", trial.number):
            self.end_trial(run_id, "KILLED", {"fulu.state": "failed", "fulu.reason": reason})

    @writes
    def close_orphaned_uploads(self, study) -> list[int]:
        """Runs of finished trials still open because the worker process uploading their artifacts
        (:meth:`finish_trial_in_background`) was killed: those that a process of this host wrote and
        that process is gone end KILLED with the reason (another host's runs are left to that host).
        Returns their trials' numbers."""
        parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if not parent_id:
            return []
        finished = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        closed = []
        for run in self._open_runs(parent_id, "trial"):
            trial = int(run.data.tags["fulu.trial"])
            if process_is_gone(run.data.tags.get(WRITER_TAG, "")) and trial in finished:
                self.end_trial(run.info.run_id, "KILLED", {"fulu.reason": ORPHANED_UPLOAD})
                closed.append(trial)
        return sorted(closed)

    @writes
    def _start_child(self, parent_id: str, name: str, kind: str, trial: int, tags: dict, params: dict) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={"mlflow.parentRunId": parent_id, "fulu.kind": kind, "fulu.trial": str(trial),
                  "fulu.study": self.settings.study.name, WRITER_TAG: this_process(),
                  **{k: str(v) for k, v in tags.items()}})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    @writes
    def log_step(self, run_id: str, step: int, values: dict[str, float]) -> None:
        self._log_metrics(run_id, values, step=step)

    @writes
    def log_metrics(self, run_id: str, values: dict[str, Any]) -> None:
        self._log_metrics(run_id, {k: v for k, v in values.items() if _is_number(v)})

    def finish_trial_in_background(self, run_id: str, files: dict[str, Any], weights) -> None:
        """A trained trial's artifacts (:meth:`log_files`, ``weights`` among them), then its run ended
        FINISHED, on a background thread: writing and uploading up to a gigabyte of weights overlaps the
        next trial instead of adding to this one. ``weights`` moves to the CPU here (the trial is done
        with it). A failed upload ends the run FAILED with the reason. At most one upload waits behind
        the running one (each holds a model's weights in memory); :meth:`wait_for_uploads` ends them
        all, and every worker calls it before it exits."""
        if weights is not None:
            weights.to("cpu")
        while len(self._uploads) >= 2:
            self._uploads.pop(0).result()
        self._uploads.append(self._uploader.submit(self._finish_trial, run_id, files, weights))

    def _finish_trial(self, run_id: str, files: dict[str, Any], weights) -> None:
        start = time.perf_counter()
        try:
            self.log_files(run_id, files, weights)
            self._log_metrics(run_id, {"upload_s": time.perf_counter() - start})
        except Exception as e:  # noqa: BLE001 - recorded on the run, which must not stay open
            self.end_trial(run_id, "FAILED", {"fulu.state": "failed",
                                              "fulu.reason": f"artifact upload failed: {type(e).__name__}: {e}"})
            return
        self.end_trial(run_id, "FINISHED")

    def wait_for_uploads(self) -> None:
        """Every background upload done and its run ended."""
        while self._uploads:
            self._uploads.pop(0).result()

    @writes
    def log_files(self, run_id: str, files: dict[str, Any], weights=None) -> None:
        """Text/JSON artifacts by file name, plus the model's weights as safetensors."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                path = Path(tmp) / name
                if isinstance(content, str):
                    path.write_text(content)
                else:
                    _write_json(path, content)
                self.client.log_artifact(run_id, str(path))
            if weights is not None and self.settings.tracking.log_weights:
                from safetensors.torch import save_model

                path = Path(tmp) / "model.safetensors"
                save_model(weights, str(path))  # handles the tied embedding / LM head
                # in the tracking database, apart from the artifact store: export checks the file against it
                self.client.set_tag(run_id, WEIGHTS_SHA256_TAG, sha256_file(path))
                self.client.log_artifact(run_id, str(path))

    @writes
    def end_trial(self, run_id: str, status: str, tags: dict | None = None) -> None:
        for k, v in (tags or {}).items():
            self.client.set_tag(run_id, k, str(v)[:5000])
        self.client.set_terminated(run_id, status=status)

    # -- helpers ------------------------------------------------------------------------------
    @writes
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    @writes
    def _log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i:i + 500])


def open_runs(client, experiment_id: str, parent_id: str, kind: str, trial: int | None = None) -> list:
    """``parent_id``'s runs of ``kind`` (``fulu.kind``: trial, confirmation, export; of trial number ``trial``
    when given) still RUNNING: a process that wrote them was killed, or is still at work."""
    of_trial = "" if trial is None else f" and tags.`fulu.trial` = '{trial}'"
    return client.search_runs([experiment_id], max_results=1000, filter_string=(
        f"tags.mlflow.parentRunId = '{parent_id}' and tags.`fulu.kind` = '{kind}' and "
        f"attributes.status = 'RUNNING'{of_trial}"))


@contextmanager
def export_run(tracking_uri: str, experiment: str, study, trial: int, metrics: dict[str, Any], tags: dict[str, str]):
    """``fulu-nas export``'s MLflow run of trial ``trial`` (active inside the block, for what the export
    logs), nested under the study's parent run, with ``tags`` and the metrics measured on the exported weights."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    tags = {**tags, "fulu.kind": "export", "fulu.trial": str(trial)}
    if study.user_attrs.get(PARENT_RUN_ATTR):
        tags["mlflow.parentRunId"] = study.user_attrs[PARENT_RUN_ATTR]
    with mlflow.start_run(experiment_id=found.experiment_id if found else None, run_name=f"export trial {trial}",
                          tags=tags):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if _is_number(v)})
        yield


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# The configuration's URLs, which may hold a password: the study's storage, the tracking store.
URL_KEYS = (("study", "storage"), ("tracking", "uri"))


def masked_config(raw: dict) -> dict:
    """The search's configuration with the passwords of its database URLs masked (:func:`mask_url`): the
    copy kept with its MLflow run, which whoever reads the runs can read. A command that reads it back
    takes the URLs it was given (:func:`fulu_nas.search.locate.search_settings`)."""
    config = copy.deepcopy(raw)
    for section, key in URL_KEYS:
        if isinstance(url := config.get(section, {}).get(key), str):
            config[section][key] = mask_url(url)
    return config


def _write_json(path: Path, content: Any, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=sort_keys, default=str))


def relocated_artifact_folder(artifact_uri: str, output_dir: Path) -> Path | None:
    """Where the artifacts of a run whose study folder moved (:func:`moved_artifact_folder`) are now: the same
    place under the moved folder's ``mlartifacts``, if it is there; else None."""
    if (moved := moved_artifact_folder(artifact_uri, output_dir)) is None:
        return None
    parts = Path(moved).parts
    if ARTIFACTS_FOLDER not in parts:
        return None
    below = parts[len(parts) - parts[::-1].index(ARTIFACTS_FOLDER):]  # after the last mlartifacts
    folder = Path(output_dir, ARTIFACTS_FOLDER, *below)
    return folder if folder.is_dir() else None


def moved_artifact_folder(artifact_uri: str, output_dir: Path) -> str | None:
    """The local folder a run keeps its artifacts in (its ``file:`` URI) where that folder does not exist on
    this machine and lies outside the study's folder ``output_dir``, else None. MLflow records the absolute
    path: a study folder moved since its search still names the old one, where a download finds nothing and
    an upload makes the folder again."""
    from mlflow.utils.file_utils import local_file_uri_to_path
    from mlflow.utils.uri import is_local_uri

    if not is_local_uri(artifact_uri):  # a tracking server's or a cloud store's
        return None
    folder = Path(local_file_uri_to_path(artifact_uri))
    if folder.exists() or folder.resolve().is_relative_to(Path(output_dir).resolve()):
        return None  # there, or this folder's own (its mlartifacts removed)
    return str(folder)
