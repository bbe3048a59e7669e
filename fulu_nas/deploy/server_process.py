"""Running a server (MLflow's UI, MLflow's scoring server) as a child of a command until it is stopped.

SIGINT (Ctrl-C), SIGTERM or SIGHUP to the command stops the whole server: MLflow serves from child
processes of its own, which outlive a signal to the process that started them.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
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
        # a port taken or reserved, else an address that does not resolve or is not this machine's
        option = "--port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "--host"
        raise FuluConfigError(f"{option}: cannot listen on {host}:{number} ({e.strerror or e})") from None


def port(text: str) -> int:
    """argparse type: a TCP port number."""
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {value}")
    return value
GRACE_S = 15.0  # for the server's processes to exit after the signal, before they are killed


# Lines the servers print that say nothing to a user of fulu-nas: MLflow's notice of its security
# middleware (printed, not logged) names options of its own command line, which fulu-nas passes or not.
NOISE_PREFIXES = ("[MLflow] Security middleware",)


def run_server(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``command`` in a session (and process group) of its own until it exits, or until one of
    :data:`STOP_SIGNALS` comes to this process: the signal is passed to the whole group (the terminal's
    signals no longer reach it directly) as a SIGTERM, and every process of it is waited for. 0 when stopped by a
    signal, else its exit status."""
    # The console carries the server's address and its errors: not MLflow's INFO lines, uvicorn's (a line per
    # request; it reads its options from UVICORN_* variables) nor the deprecation warnings of the web stack.
    quiet = {"MLFLOW_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore", "UVICORN_LOG_LEVEL": "warning",
             "UVICORN_ACCESS_LOG": "false"}
    server = subprocess.Popen(command, start_new_session=True, env={**quiet, **(os.environ if env is None else env)},
                              stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    forward = threading.Thread(target=_forward_errors, args=(server.stderr,), daemon=True)
    forward.start()
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
        forward.join(timeout=GRACE_S)  # the pipe ends with the last process of the group
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopped_by else code


def _forward_errors(stream) -> None:
    """The server's stderr to ours, line by line, less :data:`NOISE_PREFIXES`."""
    for line in stream:
        if not line.startswith(NOISE_PREFIXES):
            sys.stderr.write(line)
            sys.stderr.flush()
    stream.close()


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
