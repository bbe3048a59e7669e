"""Running a server (MLflow's UI, MLflow's scoring server) as a child of a command until it is stopped.

SIGINT (Ctrl-C), SIGTERM or SIGHUP to the command stops the whole server: MLflow serves from child
processes of its own, which outlive a signal to the process that started them. A command killed outright
(SIGKILL: ``timeout -s KILL``, a supervisor's last resort, the OOM killer) runs no handler, so the server
is started under a small guard process (:func:`_guard`) that stops it when the command is gone.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def check_port_free(host: str, number: int) -> None:
    """FuluConfigError when nothing can listen on ``host:number`` (in use, or not an address here), before
    anything is started: MLflow's UI prints its own traceback for it and exits 0."""
    from ..errors import FuluConfigError  # here: the guard loads this file alone, outside its package

    try:
        listen_on(host, number).close()
    except OSError as e:
        raise FuluConfigError(listen_problem(host, number, e)) from None


def listen_on(host: str, number: int) -> socket.socket:
    """A socket listening on ``host:number``, opened as the servers (uvicorn) open theirs; OSError if it
    cannot be."""
    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        # A port whose last connections wait in TIME_WAIT (for a minute after a server stopped with a client
        # connected) is free to the servers. On POSIX this still refuses a port another socket listens on;
        # Windows' SO_REUSEADDR would take it over, so not there.
        if os.name == "posix":
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, number))
        listening.listen(2048)  # where the port is used by a socket bound with SO_REUSEADDR, only listen() refuses
    except BaseException:
        listening.close()
        raise
    return listening


def listen_problem(host: str, number: int, error: OSError) -> str:
    """What :func:`listen_on`'s ``error`` means, naming the option to change: a port taken or reserved,
    else an address that does not resolve or is not this machine's."""
    option = "--port" if error.errno in (errno.EADDRINUSE, errno.EACCES) else "--host"
    return f"{option}: cannot listen on {host}:{number} ({error.strerror or error})"


def port(text: str) -> int:
    """argparse type: a TCP port number, in ASCII digits (int() also reads '1_000' and other scripts' digits)."""
    if not (text.isascii() and text.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {text!r}")
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {value}")
    return value


GRACE_S = 15.0  # for the server's processes to exit after the signal, before they are killed


# Lines the servers print that say nothing to a user of fulu-nas: MLflow's notice of its security
# middleware (printed, not logged) names options of its own command line, which fulu-nas passes or not.
NOISE_PREFIXES = ("[MLflow] Security middleware",)


def run_server(command: list[str], env: dict[str, str] | None = None,
               remove_if_orphaned: str | os.PathLike | None = None) -> int:
    """Run ``command`` in a session (and process group) of its own until it exits, or until one of
    :data:`STOP_SIGNALS` comes to this process: the signal is passed to the whole group (the terminal's
    signals no longer reach it directly) as a SIGTERM, and every process of it is waited for. 0 when stopped by a
    signal, else its exit status.

    Should this process die without running any of that (SIGKILL), the server's group is stopped all the same,
    by the guard that leads it, which then removes the folder ``remove_if_orphaned`` (what the server serves
    from, which this process would have removed)."""
    # The console carries the server's address and its errors: not MLflow's INFO lines, uvicorn's (a line per
    # request; it reads its options from UVICORN_* variables) nor the deprecation warnings of the web stack.
    quiet = {"MLFLOW_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore", "UVICORN_LOG_LEVEL": "warning",
             "UVICORN_ACCESS_LOG": "false"}
    # Nothing is written to the pipe: the guard reads end-of-file when the last copy of its write end closes,
    # which the kernel does as this process ends, however it ends. (os.pipe's ends are not inherited by the
    # other children this process may start.)
    watched, alive = os.pipe()
    try:
        server = subprocess.Popen(_guarded(command, watched, remove_if_orphaned), start_new_session=True,
                                  pass_fds=(watched,), env={**quiet, **(os.environ if env is None else env)},
                                  stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    except BaseException:
        os.close(alive)
        raise
    finally:
        os.close(watched)
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
        os.close(alive)  # after the group has ended (or on an error here: then the guard stops it)
    if stopped_by:
        return 0
    if code < 0:  # the server was killed (the out-of-memory killer's SIGKILL, say): say so, not a status of -9
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        print(f"error: the server was stopped by {name}", file=sys.stderr)
        return 1
    return code


def _guarded(command: list[str], watched: int, remove: str | os.PathLike | None) -> list[str]:
    """``command`` run by :func:`_guard`, this file's, in a Python process of its own. The file is loaded by its
    path in an isolated interpreter (-I: neither the current folder nor PYTHONPATH on sys.path), so that the
    guard is this very code, whichever fulu_nas the current folder holds; it needs the standard library only."""
    here = str(Path(__file__).resolve())
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('fulu_nas_server_guard', {here!r}); "
            "guard = importlib.util.module_from_spec(spec); spec.loader.exec_module(guard); "
            "sys.exit(guard._guard(sys.argv[1:]))")
    return [sys.executable, "-I", "-c", code, str(watched), os.fspath(remove) if remove is not None else "", "--",
            *command]


def _guard(argv: list[str]) -> int:
    """The process that leads the server's group: runs the command (``argv``: the pipe's read end, the folder
    to remove or "", "--", the command) in its group and gives its exit status; when the pipe ends first (the
    command that started the server has died), stops the group and removes the folder."""
    watched, remove, command = int(argv[0]), argv[1], argv[3:]
    # The SIGTERM that stops the group comes here too; this process stays to give the server's exit status.
    # (A handler, unlike SIG_IGN, is not inherited by the server.)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    server = subprocess.Popen(command)  # the server gets no end of the pipe (close_fds)
    if stopping:  # the group's SIGTERM came before the server was in it
        server.terminate()
    pipe = select.poll()  # not select.select: the pipe's number may be past FD_SETSIZE
    pipe.register(watched, select.POLLIN)
    while server.poll() is None:
        if pipe.poll(200) and not os.read(watched, 1):  # readable only at its end: nothing is written
            _stop_orphaned_group(server)
            if remove:
                shutil.rmtree(remove, ignore_errors=True)
            return 0
    if server.returncode < 0:  # ended by a signal: end by it too, as the server would have without a guard
        if -server.returncode not in (signal.SIGKILL, signal.SIGSTOP):  # those two take no handler
            signal.signal(-server.returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -server.returncode)
    return server.returncode


def _stop_orphaned_group(server: subprocess.Popen) -> None:
    """SIGTERM to every process of this process's group, and then, past :data:`GRACE_S`, SIGKILL to those
    left, but for this process."""
    _signal_group(os.getpgrp(), signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while (left := _others_in_group(server)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.poll()  # the server's exit status, so that it leaves no zombie


def _others_in_group(server: subprocess.Popen) -> list[int]:
    """The running processes of this process's group but itself: from /proc where there is one (the server's
    workers, its children, are in the group too), else the server, while it runs."""
    server.poll()
    group, me = os.getpgrp(), os.getpid()
    if not Path("/proc/self/stat").exists():
        return [server.pid] if server.returncode is None else []
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):  # the process ended meanwhile
            continue
        if int(pgrp) == group and int(stat.parent.name) != me and state not in ("Z", "X"):
            left.append(int(stat.parent.name))
    return left


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
