"""The port check and the server launcher behind ``fulu-nas serve`` and ``fulu-nas ui``, with real sockets
and processes; a small stand-in server (a process listening on the port, and a worker of it that holds the
same socket, as uvicorn's do) replaces MLflow's, which takes tens of seconds to start."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fulu_nas.deploy.server_process import check_port_free
from fulu_nas.errors import FuluConfigError

from .helpers import free_port, kill_leftovers, port_is_free, process_alive

LINUX_PROC = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets and processes from /proc")

# Listens on 127.0.0.1:argv[1], starts a worker that holds the listening socket, writes both pids to
# argv[2] (once listening), then answers every connection with "ok".
STAND_IN = """
import os, socket, subprocess, sys
port, pids = int(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen()
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], pass_fds=(s.fileno(),))
with open(pids + ".part", "w") as f:
    f.write(f"{os.getpid()} {worker.pid}")
os.replace(pids + ".part", pids)
while True:
    conn, _ = s.accept()
    conn.sendall(b"ok")
    conn.close()
"""

# run_server(argv[1] as JSON, **argv[2] as JSON), its result as the exit status: the command that serves.
LAUNCHER = """
import json, sys
from fulu_nas.deploy.server_process import run_server
sys.exit(run_server(json.loads(sys.argv[1]), **json.loads(sys.argv[2])))
"""


def _time_wait_on(port: int) -> bool:
    """Whether a TCP socket of 127.0.0.1:``port`` is in TIME_WAIT (state 06 of /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    return any(line.split()[1] == local and line.split()[3] == "06"
               for line in Path("/proc/net/tcp").read_text().splitlines()[1:])



def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            return c.recv(2) == b"ok"
    except OSError:
        return False



def _until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@LINUX_PROC
def test_a_port_whose_last_connection_waits_in_time_wait_is_free():
    """A server stopped while a client kept a connection open (a browser tab, a requests.Session) closes
    it first: its end waits in TIME_WAIT for a minute, which a server binding with SO_REUSEADDR (uvicorn)
    ignores, so the check must too."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = listener.accept()
            conn.close()  # the server's side closes first, so its side waits in TIME_WAIT
            assert client.recv(1) == b""
    assert _until(lambda: _time_wait_on(port), 5), "no TIME_WAIT socket on the port"
    with socket.socket() as plain, pytest.raises(OSError):  # a bind without SO_REUSEADDR is refused
        plain.bind(("127.0.0.1", port))
    check_port_free("127.0.0.1", port)


@pytest.mark.parametrize("listening_on", ["127.0.0.1", "0.0.0.0"])
def test_a_port_a_server_listens_on_is_refused(listening_on):
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((listening_on, 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(FuluConfigError, match=f"--port: cannot listen on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)


def test_an_address_not_of_this_machine_is_refused_as_the_host():
    with pytest.raises(FuluConfigError, match="--host: cannot listen on 192.0.2.1:"):  # TEST-NET-1
        check_port_free("192.0.2.1", free_port())


@contextlib.contextmanager
def _launched(tmp_path: Path, **options):
    """run_server of the stand-in server in a launcher process; yields (launcher, port, server pids)."""
    port, pids = free_port(), tmp_path / "pids"
    command = [sys.executable, "-c", STAND_IN, str(port), str(pids)]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(command), json.dumps(options)],
                                stderr=subprocess.PIPE, text=True)
    server: list[int] = []
    try:
        assert _until(lambda: pids.exists() or launcher.poll() is not None, 30)
        assert launcher.poll() is None, launcher.communicate()[1]
        server = [int(p) for p in pids.read_text().split()]
        assert _answers(port)
        yield launcher, port, server
    finally:
        kill_leftovers([launcher.pid, *server])
        launcher.communicate(timeout=30)


@LINUX_PROC
def test_a_server_does_not_outlive_its_killed_launcher(tmp_path):
    """SIGKILL to the command (timeout -s KILL, a supervisor's last resort, the OOM killer), which no handler
    sees: the server, in a session of its own, stops with it, every process of it, and frees the port."""
    with _launched(tmp_path) as (launcher, port, server):
        launcher.kill()
        launcher.wait(timeout=10)
        assert _until(lambda: not any(process_alive(pid) for pid in server), 10), \
            [pid for pid in server if process_alive(pid)]
        assert not _answers(port)
        assert port_is_free(port)


@LINUX_PROC
def test_a_killed_launcher_s_server_removes_the_folder_it_was_given(tmp_path):
    """The folder the server serves from (fulu-nas serve's checked copy of the model), which the killed
    command cannot remove."""
    folder = tmp_path / "copy"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "MLmodel").write_text("x")
    with _launched(tmp_path, remove_if_orphaned=str(folder)) as (launcher, port, server):
        launcher.kill()
        launcher.wait(timeout=10)
        assert _until(lambda: not any(process_alive(pid) for pid in server) and not folder.exists(), 10)
        assert port_is_free(port)


@LINUX_PROC
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_to_the_launcher_stops_its_server_and_keeps_the_folder(signum, tmp_path):
    """The launcher's caller (fulu-nas serve's checked_model) removes the folder once run_server returns."""
    folder = tmp_path / "copy"
    folder.mkdir()
    with _launched(tmp_path, remove_if_orphaned=str(folder)) as (launcher, port, server):
        launcher.send_signal(signum)
        assert launcher.wait(timeout=30) == 0
        assert not any(process_alive(pid) for pid in server)
        assert port_is_free(port)
        assert folder.is_dir()


def test_a_server_that_exits_by_itself_gives_its_status(tmp_path):
    launcher = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps([sys.executable, "-c", "exit(3)"]), "{}"],
                              capture_output=True, text=True, timeout=60)
    assert launcher.returncode == 3, launcher.stderr


def test_a_server_killed_by_a_signal_is_one_line_and_exit_1(tmp_path):
    """The out-of-memory killer's SIGKILL to the server gave the guard's traceback (SIGKILL takes no handler) and
    exit 1; a SIGTERM from elsewhere exit 241 (a status of -15) and no word."""
    for name in ("SIGKILL", "SIGTERM"):
        server = [sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), signal.{name})"]
        launcher = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(server), "{}"], capture_output=True,
                                  text=True, timeout=60)
        assert (launcher.returncode, launcher.stderr) == (1, f"error: the server was stopped by {name}\n")
