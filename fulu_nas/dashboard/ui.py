"""``fulu-nas ui``: the MLflow UI of a search, on 127.0.0.1.

``fulu-nas ui outputs/<study>`` opens the search's embedded tracking database
(``<dir>/mlflow.db``); ``--tracking-uri`` opens any other backend store. The study itself can be
browsed with optuna-dashboard: ``optuna-dashboard sqlite:///outputs/<study>/optuna.db``.

SIGINT (Ctrl-C), SIGTERM or SIGHUP to the command stops the whole server: MLflow serves from child
processes of its own, which outlive a signal to the process that started them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BAD_INPUT = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_S = 15.0  # for the server's processes to exit after the signal, before they are killed


def build_command(args: argparse.Namespace) -> list[str]:
    if args.tracking_uri:
        uri = args.tracking_uri
    else:
        db = Path(args.output_dir) / "mlflow.db"
        if not db.is_file():
            raise FileNotFoundError(f"no MLflow database at {db} (is {args.output_dir!r} the output folder of a "
                                    "search? it is printed at the end of `fulu-nas search`)")
        uri = f"sqlite:///{db.resolve()}"
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
            "--port", str(args.port)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fulu-nas ui", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", nargs="?", default=".", help="a search's output folder (default: .)")
    parser.add_argument("--tracking-uri", help="an MLflow backend store URI instead of <output_dir>/mlflow.db")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    try:
        args = parser.parse_args(argv)
        command = build_command(args)
    except SystemExit as e:
        return BAD_INPUT if e.code else 0
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    print(f"MLflow UI: http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    return run_server(command)


def run_server(command: list[str]) -> int:
    """Run ``command`` in a session (and process group) of its own until it exits, or until one of
    :data:`STOP_SIGNALS` comes to this process: the signal is passed to the whole group (the terminal's
    signals no longer reach it directly) and every process of it is waited for. 0 when stopped by a
    signal, else its exit status."""
    server = subprocess.Popen(command, start_new_session=True)
    stopped_by: list[int] = []

    def stop(signum: int, _frame) -> None:
        stopped_by.append(signum)
        _signal_group(server.pid, signum)

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
