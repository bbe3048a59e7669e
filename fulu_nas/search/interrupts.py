"""Ctrl-C and SIGTERM stop a search between database writes, never inside one.

A KeyboardInterrupt raised inside an MLflow or Optuna write (a SQLAlchemy session on the SQLite
file) could leave that database locked: ending the interrupted trial's runs then failed with
"database is locked", and the search exited 1 with a traceback instead of failing the trial and
queuing it again. Blocks of writes run under :func:`between_writes`; a signal arriving inside one
is raised as KeyboardInterrupt when the block ends. Signals reach the main thread only; elsewhere
nothing is deferred.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Deferral:
    depth = 0  # blocks of writes the main thread is inside
    pending = False  # a signal came during one


def interrupt(_signum: int, _frame) -> None:
    """The handler of SIGINT and SIGTERM while a search runs."""
    if _Deferral.depth:
        _Deferral.pending = True
        return
    raise KeyboardInterrupt


@contextmanager
def between_writes() -> Iterator[None]:
    """Run a block of database writes whole: an interrupt that arrives inside is raised at its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
        if not _Deferral.depth and _Deferral.pending:
            _Deferral.pending = False
            raise KeyboardInterrupt
