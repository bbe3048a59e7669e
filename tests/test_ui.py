"""``fulu-nas ui``: SIGTERM or SIGINT to the command stops the MLflow server it started, every process
of it, and frees the port."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .helpers import free_port, kill_leftovers, port_is_free, process_alive


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, set[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        children.setdefault(ppid, set()).add(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found




def _serves(port: int, host: str | None = None) -> bool:
    """Whether the server answers 200 (``host``: the page, as the Host header the request carries; MLflow
    answers its health check whatever the host)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/{'' if host else 'health'}",
                                     headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_ui_stops_its_server(signum, tmp_path):
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # an (empty) tracking database
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "fulu_nas.cli", "ui", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port),
                           "--allowed-hosts", f"fulu.test:{port}"],
                          cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server: set[int] = set()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _serves(port):
            assert ui.poll() is None, "fulu-nas ui exited"
            time.sleep(0.5)
        assert _serves(port), "the MLflow UI did not answer"
        server = _descendants(ui.pid)
        assert server, "the MLflow server runs in child processes"
        # --allowed-hosts: the name other machines reach it by (MLflow answered them 403)
        assert _serves(port, host=f"fulu.test:{port}") and not _serves(port, host=f"other.test:{port}")

        ui.send_signal(signum)
        assert ui.wait(timeout=60) == 0
        # MLflow's notice of its security middleware named options fulu-nas ui did not have
        assert "Security middleware" not in ui.stderr.read()
        assert [pid for pid in server if process_alive(pid)] == []
        assert port_is_free(port)
    finally:
        kill_leftovers([ui.pid, *server])
        ui.wait(timeout=30)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
@pytest.mark.slow
@pytest.mark.parametrize("host, shown", [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
def test_a_ui_stopped_while_its_server_starts_prints_its_address_alone(tmp_path, host, shown):
    """Ctrl-C a few seconds after the start, while MLflow's server processes still import: each of them
    used to print a KeyboardInterrupt traceback (100 lines), and MLflow its choice of registry store. An
    IPv6 address is bracketed in the printed URL (http://::1:PORT was no address a browser takes)."""
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "fulu_nas.cli", "ui", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port), "--host", host],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not _descendants(ui.pid):
            time.sleep(0.2)
        time.sleep(4)  # the server's processes are starting
        server = _descendants(ui.pid)
        ui.send_signal(signal.SIGINT)
        out, err = ui.communicate(timeout=60)
        assert ui.returncode == 0
        assert out == f"MLflow UI: http://{shown}:{port}  (Ctrl-C stops it)\n"
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
        assert [pid for pid in server if process_alive(pid)] == []
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.communicate(timeout=30)


def test_ui_refuses_a_database_that_is_not_mlflow_s_and_leaves_it_untouched(tmp_path, monkeypatch, capsys):
    """A study's optuna.db given as --tracking-uri (or copied into a folder as mlflow.db) gained MLflow's
    tables when `mlflow ui` started on it, then failed with its traceback; an empty file became an MLflow
    database without a word. Each is one message, exit 2, the file as it was and no server started."""
    import optuna

    from fulu_nas.cli import main
    from fulu_nas.dashboard import ui

    started = []
    monkeypatch.setattr(ui, "run_server", lambda command: started.append(command) or 0)
    study_db = tmp_path / "optuna.db"
    optuna.create_study(study_name="s", storage=f"sqlite:///{study_db}")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    folder = tmp_path / "copied"
    folder.mkdir()
    (folder / "mlflow.db").write_bytes(study_db.read_bytes())
    capsys.readouterr()
    cases = [(["--tracking-uri", f"sqlite:///{study_db}"], study_db, "is an Optuna study database"),
             (["--tracking-uri", f"sqlite:///{empty}"], empty, "is not an MLflow tracking database"),
             ([str(folder)], folder / "mlflow.db", "is an Optuna study database")]
    for args, path, words in cases:
        before = path.read_bytes()
        assert main(["ui", *args, "--port", str(free_port())]) == 2, args
        out, err = capsys.readouterr()
        assert words in err and str(path) in err and err.count("\n") == 1, err
        assert out == "" and path.read_bytes() == before
    assert started == []


def test_ui_of_a_tracking_server_points_to_the_servers_own_ui(monkeypatch, capsys):
    """`fulu-nas ui --tracking-uri http://...` (as the search printed it for a study tracked on a server) handed
    the server's address to `mlflow ui` as a store, which failed with MLflow's traceback (exit 1)."""
    from fulu_nas.cli import main
    from fulu_nas.dashboard import ui

    started = []
    monkeypatch.setattr(ui, "run_server", lambda command: started.append(command) or 0)
    assert main(["ui", "--tracking-uri", "http://alice:s3cret@127.0.0.1:5999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tracking-uri: ") and "open http://127.0.0.1:5999 " in err, err
    assert "s3cret" not in err and not started
