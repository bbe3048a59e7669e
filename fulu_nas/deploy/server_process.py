"""Running a server (MLflow's UI, MLflow's scoring server) as a child of a command until it is stopped.

SIGINT (Ctrl-C), SIGTERM or SIGHUP to the command stops the whole server: MLflow serves from child
processes of its own, which outlive a signal to the process that started them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import time

from ..errors import FuluConfigError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def check_port_free(host: str, number: int) -> None:
    """FuluConfigError when nothing can listen on ``host:number`` (in use, or not an address here): the
    servers print their own traceback for it and exit 0."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, number))
    except OSError as e:
        raise FuluConfigError(f"--port: cannot listen on {host}:{number} ({e.strerror or e})") from None


def port(text: str) -> int:
    """argparse type: a TCP port number."""
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {value}")
    return value
GRACE_S = 15.0  # for the server's processes to exit after the signal, before they are killed


def run_server(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``command`` in a session (and process group) of its own until it exits, or until one of
    :data:`STOP_SIGNALS` comes to this process: the signal is passed to the whole group (the terminal's
    signals no longer reach it directly) as a SIGTERM, and every process of it is waited for. 0 when stopped by a
    signal, else its exit status."""
    # The console carries the server's address and its errors: not MLflow's INFO lines nor the deprecation
    # warnings of the web stack it runs on.
    quiet = {"MLFLOW_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore"}
    server = subprocess.Popen(command, start_new_session=True, env={**quiet, **(os.environ if env is None else env)})
    stopped_by: list[int] = []

    def stop(signum: int, _frame) -> None:
        stopped_by.append(signum)
        # SIGTERM whatever the signal: a SIGINT makes every Python process of the server that is still
        # importing (MLflow starts a dozen) print a KeyboardInterrupt traceback; the servers stop on
        # SIGTERM as on SIGINT.
        _signal_group(server.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        code = server.wait()
        if not stopped_by:  # it ended by itself: its children must not serve on
            _signal_group(server.pid, signal.SIGTERM)
        _wait_for_group(server.pid)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopped_by else code


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # the group has ended
        pass


def _wait_for_group(pgid: int) -> None:
    """Until no process of group ``pgid`` is left, for up to :data:`GRACE_S`; then SIGKILL to the rest."""
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
