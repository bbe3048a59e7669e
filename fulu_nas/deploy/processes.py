"""Which process wrote something (a trial's MLflow run, an export's run, a folder being written), named
so that a later process can tell whether its writer has ended: ``host:pid``.

A writer that ended without finishing (``kill -9``, the out-of-memory killer, a lost node) cannot
undo its own work; whoever comes next on the same host can, once it knows that writer is gone.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def this_process() -> str:
    """This process as a writer: ``host:pid`` (the ``fulu.worker`` tag of the MLflow runs it opens, the
    ``worker`` attribute of the Optuna trials it runs, the name of the folders it is writing)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_is_gone(writer: str) -> bool:
    """Whether ``writer`` (:func:`this_process` of some process) names a process of this host that has
    ended. Another host's processes cannot be seen from here: never known to be gone."""
    host, _, pid = writer.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has ended and waits for its parent to reap it (Linux's /proc; elsewhere unknown: no)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]  # the state follows the command name in parentheses
