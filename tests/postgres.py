"""A throwaway PostgreSQL server on 127.0.0.1 for tests (Debian's ``postgresql`` package).

As root, the server runs as the ``postgres`` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .helpers import free_port


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def available() -> bool:
    return all(find_bin(n) for n in ("initdb", "pg_ctl", "createdb"))



@contextmanager
def postgres_server(databases: tuple[str, ...] = ("optuna",)):
    """Yields ``{database: url}``; the server and its data folder are removed afterwards."""
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="fulu-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, cwd=root)

    run(find_bin("initdb"), "-D", str(data), "-U", "fulu", "--auth=trust", "--no-sync")
    run(find_bin("pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
        "-o", f"-h 127.0.0.1 -p {port} -k {root} -F", "start")
    try:
        for db in databases:
            run(find_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "fulu", db)
        yield {db: f"postgresql://fulu@127.0.0.1:{port}/{db}" for db in databases}
    finally:
        subprocess.run([*as_user, find_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)
