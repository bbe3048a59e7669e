"""Find an existing study from command-line overrides, for the commands that read one
(``fulu-nas export``, ``fulu-nas dashboard``).

``study.name=NAME`` (plus ``study.storage=``, ``tracking.uri=`` or ``hydra.run.dir=`` when the
search used them) is composed with the same Hydra config as ``fulu-nas search``, so a study is
found where the search put it: ``outputs/NAME/optuna.db`` by default. The search's full
configuration comes back too (from ``search_config.json`` in its folder, or the parent MLflow
run's artifact when the study lives on a server), as :class:`~fulu_nas.search.SearchSettings`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import FuluConfigError
from .settings import SearchSettings, load_settings
from .storage import (
    check_output_dir,
    check_sqlite_writable,
    check_study_storage_exists,
    check_tracking_uri,
    mask_url,
    probe_tracking,
)


@dataclass(frozen=True)
class StudyLocation:
    name: str
    storage_url: str
    tracking_uri: str
    output_dir: Path


def split_options(argv: list[str], options: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` arguments whose key is one of ``options`` (the command's own), and the rest
    (Hydra overrides). Defaults come from ``options``."""
    own, rest = dict(options), []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in options:
            own[key] = value
        else:
            rest.append(arg)
    return own, rest


# The flags of a search that change where its configuration is read from.
STUDY_FLAGS = ("--config-dir", "-cd")


def locate_study(overrides: list[str]) -> StudyLocation:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .app import compose_config, split_flags

    if not any(o.startswith("study.name=") for o in overrides):
        raise FuluConfigError("study.name: which study? pass study.name=NAME (the name `fulu-nas search` printed)")
    try:
        # The search's own --config-dir (a space of the user's, say), so that its overrides compose here too.
        if unknown := [a for a in overrides if a.startswith("-") and a.partition("=")[0] not in STUDY_FLAGS]:
            # Hydra would drop them: --layout=compact drew and wrote the default layout without a word
            raise FuluConfigError(f"{unknown[0]}: unknown option (this command takes key=value settings, such as "
                                  f"study.name=NAME, and --config-dir DIR)")
        overrides, flags = split_flags(overrides)
        config_dir = flags.get("--config-dir") or flags.get("-cd")
        if config_dir and not Path(config_dir).is_dir():
            raise FuluConfigError(f"--config-dir: {config_dir!r} is not a folder")
        cfg, output_dir = compose_config(overrides, config_dir)
    except (HydraException, OmegaConfBaseException) as e:
        raise FuluConfigError(f"configuration: {' '.join(str(e).split())}") from None
    name = cfg["study"]["name"]
    output_dir = Path(output_dir)
    storage = cfg["study"].get("storage") or f"sqlite:///{(output_dir / 'optuna.db').resolve()}"
    tracking = cfg["tracking"].get("uri") or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
    check_study_storage_exists(storage, name)
    # A wrong tracking.uri must not make a folder and a database (MLflow would) or wait on an unreachable
    # server for minutes.
    check_tracking_uri(tracking)
    probe_tracking(tracking)
    return StudyLocation(name, storage, tracking, output_dir)


def check_recordable(location: StudyLocation, study_database: bool = True) -> None:
    """FuluConfigError unless what a command records can be written, before its work rather than a
    traceback after it: the tracking SQLite database and, with ``study_database`` (a confirmation), the
    study's too; the study's folder where confirmation.json goes, or where MLflow keeps the artifacts
    (unless a tracking server keeps them)."""
    if study_database:
        check_sqlite_writable(location.storage_url, "study.storage")
    check_sqlite_writable(location.tracking_uri, "tracking.uri")
    if study_database or not location.tracking_uri.startswith(("http://", "https://")):  # a server keeps its own
        check_output_dir(str(location.output_dir))


def load_study(location: StudyLocation):
    import optuna

    from .storage import open_study_storage

    storage = open_study_storage(location.storage_url)
    try:
        return optuna.load_study(study_name=location.name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise FuluConfigError(f"study.name: no study {location.name!r} in {mask_url(location.storage_url)} "
                              f"(it has: {', '.join(names) or 'none'})") from None


def search_settings(location: StudyLocation, study, will_train: bool = False) -> SearchSettings:
    """The configuration the study was searched with (``will_train``: the caller trains with it here; see
    :func:`~.settings.load_settings`)."""
    path = location.output_dir / "search_config.json"
    if path.is_file():
        data = json.loads(path.read_text())
    else:
        import mlflow

        from .tracking import PARENT_RUN_ATTR

        parent = study.user_attrs.get(PARENT_RUN_ATTR)
        if not parent:
            raise FuluConfigError(f"study.name: study {location.name!r} has no search configuration (no "
                                  f"{path} and no MLflow parent run)")
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.MlflowClient(location.tracking_uri).download_artifacts(parent, "search_config.json", tmp)
            data = {"config": json.loads(Path(local).read_text())}
    return load_settings(data["config"], location.output_dir, will_train, typed_model=data.get("typed_model"))
