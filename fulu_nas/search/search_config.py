"""The search configuration a search saves (its folder's ``search_config.json``, and the copy its MLflow
parent run keeps), read and checked before use: by the search, which must not write over another study's,
and by the commands that read a study (:mod:`.locate`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FuluConfigError


def check_folder_is_the_studys(output_dir: Path, name: str, key: str = "hydra.run.dir") -> None:
    """FuluConfigError where the folder a search writes to holds another study's search (its
    ``search_config.json``): the search would overwrite that study's configuration and summary, which its
    confirmation, export and dashboard read."""
    path = Path(output_dir) / "search_config.json"
    if not path.is_file():
        return
    named = study_named(read_search_config(path)["config"])
    if named != name:
        raise FuluConfigError(f"{key}: {output_dir} is the folder of study {named!r} (its search_config.json): "
                              f"give study {name!r} a folder of its own ({key}=...), or study.name={named} to "
                              "resume that one")


def study_named(config: dict) -> object:
    """The study name a saved search configuration holds (None where it holds none)."""
    study = config.get("study")
    return study.get("name") if isinstance(study, dict) else None


def read_search_config(path: Path, artifact: str = "") -> dict:
    """The search configuration a search saved: its folder's ``search_config.json`` (``{"config": ...,
    "typed_model": ...}``), or the parent run's artifact (``artifact`` names it; the configuration
    itself), checked before use: a damaged file is one message naming it, not a traceback."""
    shown = artifact or str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:  # another user's folder, whose passwords keep the file to its owner (0600)
        raise FuluConfigError(f"study.name: cannot read {shown} ({e.strerror})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FuluConfigError(f"study.name: {shown} is not valid JSON ({e})") from None
    if artifact:
        if not isinstance(data, dict):
            raise FuluConfigError(f"study.name: {shown} is not a search configuration (a JSON object)")
        return data
    if not (isinstance(data, dict) and isinstance(data.get("config"), dict)
            and isinstance(data.get("typed_model"), str | None)):
        raise FuluConfigError(f"study.name: {shown} is not a search configuration (a JSON object with its "
                              "\"config\" object, as `fulu-nas search` writes it)")
    return data
