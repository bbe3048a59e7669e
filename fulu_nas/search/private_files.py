"""Files of a search that hold its databases' passwords, kept to their owner.

A ``study.storage`` or ``tracking.uri`` typed with its password (``postgresql://user:pw@host/db``) is
written as typed where the password is needed again or Hydra keeps the command: the workers'
configuration (``search_config.json``, ``confirm_config.json``), Hydra's ``.hydra/*.yaml`` and a sweep's
``multirun.yaml``. Those files are made readable by their owner alone (0600, as PostgreSQL asks of
``~/.pgpass``), where they were every local user's to read. Without a password nothing changes.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checks import mask_url

PRIVATE = 0o600


def holds_password(*urls: str) -> bool:
    """Whether any of ``urls`` carries a password (one :func:`~fulu_nas.checks.mask_url` would hide)."""
    return any(mask_url(url) != url for url in urls)


def settings_hold_password(s) -> bool:
    """Whether the search settings ``s`` name a database or tracking server by a URL with its password."""
    return holds_password(s.storage_url, s.tracking_uri)


def write_config(path: Path, text: str, private: bool) -> None:
    """``path`` made to hold ``text``; ``private``: created 0600 (never readable by others, not even while
    written), and made 0600 if it was there already."""
    if not private:
        path.write_text(text)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, PRIVATE)
        f.write(text)


def make_hydra_record_private(output_dir: Path, sweep_dir: Path | None = None) -> None:
    """Hydra's record of the command (``.hydra/*.yaml`` in the job's folder; ``multirun.yaml`` in a
    sweep's), which holds the overrides as typed, made 0600: Hydra writes it before the job starts."""
    paths = list((output_dir / ".hydra").glob("*.yaml"))
    if sweep_dir is not None:
        paths.append(sweep_dir / "multirun.yaml")
    for path in paths:
        if path.is_file():
            path.chmod(PRIVATE)
