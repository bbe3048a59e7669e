"""Ctrl-C and SIGTERM stop a search between database writes, never inside one, and only once.

A KeyboardInterrupt raised inside an MLflow or Optuna write (a SQLAlchemy session on the SQLite
file) could leave that database locked: ending the interrupted trial's runs then failed with
"database is locked", and the search exited 1 with a traceback instead of failing the trial and
queuing it again. Blocks of writes run under :func:`between_writes`; a signal arriving inside one
is raised as KeyboardInterrupt when the block ends. Signals reach the main thread only; elsewhere
nothing is deferred.

The first interrupt stops the search; the signals after it are ignored while the search stops
(:func:`interrupt`): handling the first one fails the running trial, queues it again and ends its
runs, and a second KeyboardInterrupt in the middle of that left the trial without its reason, never
queued again, its run RUNNING. A second signal is common: ``timeout``, ``kill -- -PGID`` or a batch
scheduler signal every process of a search with ``study.n_workers`` > 1, and its parent forwards
SIGTERM to its workers as well (it cannot tell a SIGTERM sent to it alone, as ``docker stop`` sends
it). :func:`reset` starts afresh (each search installing the handlers calls it).

Python ignores an exception raised inside a finaliser (a weakref callback or ``__del__``, as SQLAlchemy's
class registry runs one whenever the garbage collector frees a mapped class), printing "Exception ignored
in ..." with its traceback. A signal handled there lost its interrupt, and the search, already stopping,
ignored the signals after it: it ran to its end. While the handlers are installed such an interrupt is
noted instead of printed (:func:`catching_swallowed_interrupts`) and raised at the next safe point: the end
of a block of writes (a training report is one) or a check of a waiting loop (:func:`raise_if_swallowed`).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# What a search does once stopped, said to the signals that come meanwhile; other commands say theirs.
SEARCH_STOPPING = "the running trial is being failed and queued again, and its runs ended"


class _Deferral:
    depth = 0  # blocks of writes the main thread is inside
    pending = False  # a signal came during one
    stopping = False  # the first interrupt was raised (or the search is ending): signals are ignored
    told = False  # the console was told that a signal was ignored
    swallowed = False  # the interrupt raised came inside a finaliser, which Python ignored
    stretch = False  # inside interruptible()
    stopping_words = SEARCH_STOPPING


def interrupt(_signum: int, _frame) -> None:
    """The handler of SIGINT and SIGTERM while a search runs."""
    if _Deferral.stopping:
        _tell_ignored()
        return
    if _Deferral.depth:
        _Deferral.pending = True
        return
    _stop()


def _stop() -> None:
    _Deferral.stopping = True
    raise KeyboardInterrupt


def _tell_ignored() -> None:
    if not _Deferral.told:
        _Deferral.told = True
        # os.write, not print: a signal handler printing while the main thread prints to the same
        # stream raises RuntimeError (a reentrant call to its buffer)
        os.write(2, f"already stopping: {_Deferral.stopping_words}; wait for it\n".encode())


def ignore_signals() -> None:
    """From here on the search is ending (its summary written, its runs closed): signals are ignored
    until :func:`reset`. No-op outside the main thread."""
    if threading.current_thread() is threading.main_thread():
        _Deferral.stopping = True


def reset(stopping_words: str = SEARCH_STOPPING) -> None:
    """No signal pending, none ignored: the state of a command that has not been interrupted.
    ``stopping_words``: what the command does once stopped, said to a signal that comes meanwhile."""
    _Deferral.pending = _Deferral.stopping = _Deferral.told = _Deferral.swallowed = False
    _Deferral.stopping_words = stopping_words


def raise_if_swallowed() -> None:
    """Raise the interrupt a finaliser swallowed, if one did (outside blocks of writes, main thread)."""
    if _Deferral.swallowed and not _Deferral.depth and threading.current_thread() is threading.main_thread():
        _Deferral.swallowed = False
        raise KeyboardInterrupt


@contextmanager
def catching_swallowed_interrupts() -> Iterator[None]:
    """Within: a KeyboardInterrupt that Python ignores (raised inside a finaliser) is noted for
    :func:`raise_if_swallowed` rather than printed; other ignored exceptions go to the hook before."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            _Deferral.swallowed = True
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


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
            if not _Deferral.stopping:
                _stop()
        raise_if_swallowed()


@contextmanager
def interruptible() -> Iterator[None]:
    """Inside a block of writes, a stretch where an interrupt is raised at once: a trial's own work inside
    Optuna's optimize, whose bookkeeping around it (creating the trial, writing its result) is a block of
    writes. A signal deferred before the stretch is raised as it starts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    depth, _Deferral.depth = _Deferral.depth, 0
    stretch, _Deferral.stretch = _Deferral.stretch, True
    try:
        if _Deferral.pending:
            _Deferral.pending = False
            if not _Deferral.stopping:
                _stop()
        yield
    finally:
        _Deferral.depth, _Deferral.stretch = depth, stretch


def hold_to_the_end_of_the_stretch() -> None:
    """Inside :func:`interruptible`: from here to the stretch's end a signal is held as inside a block of
    writes, then raised where the enclosing block ends. A trial that has its result is recorded (Optuna's
    tell) before the signal stops the worker, rather than failed with its result made. Elsewhere nothing."""
    if _Deferral.stretch and threading.current_thread() is threading.main_thread():
        _Deferral.depth += 1  # interruptible() restores the depth it found


# The search or confirmation process that started a worker (:func:`~.study.worker_env` sets it).
PARENT_PID_ENV = "FULU_NAS_PARENT_PID"


def stop_with_parent(poll_seconds: float = 1.0) -> bool:
    """In a worker process: stop it as Ctrl-C does (SIGTERM to itself: its running trial failed and queued
    again, its run ended) once the process that started it is gone. A ``kill -9`` of the search (or the
    kernel's out-of-memory killer) left its workers running on, and the same command then ran its own beside
    them, both writing the same logs. A daemon thread watches the parent's pid (the orphan is given to
    another parent) rather than the kernel's parent-death signal, which follows the thread that started
    the process, not the process. False where that process is gone already: the worker then starts nothing."""
    import signal
    import time

    parent = os.environ.get(PARENT_PID_ENV)
    if parent is None:  # not a worker of this machine's search
        return True
    parent = int(parent)
    if os.getppid() != parent:
        return False

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()
    return True
