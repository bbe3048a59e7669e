"""Ctrl-C, SIGTERM and SIGHUP held while a command loads its libraries, then raised as a Ctrl-C; and
SIGTERM raised as a Ctrl-C at once, for a command that has no handlers of its own for a stretch.

A command's first seconds import torch, numpy and MLflow. A KeyboardInterrupt raised inside a C
extension's import leaves the extension half-loaded, and the next import of it fails with a traceback
(numpy: "cannot load module more than once per process"); SIGTERM's and SIGHUP's default actions end
the process before the command can say anything or undo anything. Under :func:`held` the three only
note their arrival; when the block ends the handlers before it are back and one KeyboardInterrupt is
raised, which the command (or ``fulu_nas.cli``: "interrupted", exit code 130) handles as a Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# SIGHUP is POSIX's only
HELD = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def held(second_acts: bool = False) -> Iterator[None]:
    """Hold :data:`HELD` for the block (in the main thread; elsewhere signals are not this thread's). A signal
    this process ignores (SIGHUP under ``nohup``, SIGINT in a shell's background job) stays ignored.
    ``second_acts``: a second signal raises the KeyboardInterrupt at once, for a block that may wait long
    (a database server that does not answer), so that a user who insists is not left with ``kill -9``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def hold(signum, _frame):
        arrived.append(signum)
        if second_acts and len(arrived) > 1:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, hold) for sig in HELD if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if arrived:
        raise KeyboardInterrupt


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises a KeyboardInterrupt in the block, as Ctrl-C does: its default action ends the process
    with no word, whatever it was writing. For a command's stretch before its own handlers take over (a
    search's checks, Hydra's set-up, the study's opening); a SIGTERM the process ignores stays ignored."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
