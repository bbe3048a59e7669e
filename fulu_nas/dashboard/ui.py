"""The MLflow UI of a search, on 127.0.0.1.

fulu-nas ui outputs/<study> opens the search's embedded tracking database (<dir>/mlflow.db);
--tracking-uri opens any other backend store. The study itself can be browsed with
optuna-dashboard: optuna-dashboard sqlite:///outputs/<study>/optuna.db

SIGINT (Ctrl-C), SIGTERM or SIGHUP to the command stops the whole server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checks import check_tracking_database_exists, is_tracking_server, mask_url, server_address, sqlite_file
from ..deploy.server_process import check_port_free, port, run_server
from ..errors import FuluConfigError
from ..search.storage import check_tracking_uri, probe_tracking

BAD_INPUT = 2


def build_command(args: argparse.Namespace) -> list[str]:
    if args.tracking_uri:
        uri = args.tracking_uri
        check_tracking_uri(uri)
        if is_tracking_server(uri):  # mlflow ui failed on it with a traceback
            raise FuluConfigError(f"--tracking-uri: {mask_url(uri)} is an MLflow tracking server, which serves "
                                  f"its own UI: open {server_address(uri)} (fulu-nas ui serves a tracking "
                                  "database)")
        if uri.startswith("sqlite:///") and not sqlite_file(uri).is_file():
            raise FileNotFoundError(f"no MLflow database at {sqlite_file(uri)}")
    else:
        db = Path(args.output_dir) / "mlflow.db"
        if not db.is_file():
            raise FileNotFoundError(f"no MLflow database at {db} (is {args.output_dir!r} the output folder of a "
                                    "search? it is printed at the end of `fulu-nas search`)")
        uri = f"sqlite:///{db.resolve()}"
    # MLflow makes its tables in whatever SQLite file it opens: a study's optuna.db (given by mistake, or
    # copied in as mlflow.db) gained them, then the server died on its schema; an empty file became an
    # MLflow database. A viewer leaves the file as it was.
    check_tracking_database_exists(uri, "--tracking-uri" if args.tracking_uri else "output_dir")
    probe_tracking(uri)  # a damaged database or an unreachable server: one message, not the server's traceback
    # The registry store named (the same database), or MLflow prints that it chose it.
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--registry-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--uvicorn-opts", "--log-level warning"]
    if args.allowed_hosts:
        command += ["--allowed-hosts", args.allowed_hosts]
    return command


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fulu-nas ui", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", nargs="?", default=".", help="a search's output folder (default: .)")
    parser.add_argument("--tracking-uri", help="an MLflow backend store URI instead of <output_dir>/mlflow.db")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=5000)
    parser.add_argument("--allowed-hosts", metavar="HOSTS",
                        help="the Host headers the server answers, comma-separated, e.g. myhost:5000 (MLflow's "
                             "guard against DNS rebinding; default: localhost and private addresses)")
    try:
        args = parser.parse_args(argv)
        command = build_command(args)
        check_port_free(args.host, args.port)
    except SystemExit as e:
        return BAD_INPUT if e.code else 0
    except (FileNotFoundError, FuluConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL is bracketed
    print(f"MLflow UI: http://{host}:{args.port}  (Ctrl-C stops it)", flush=True)
    return run_server(command)
