"""Serves an exported model over HTTP, every file checked first. MODEL: models:/NAME@ALIAS,
models:/NAME/VERSION (in the registry of --tracking-uri or MLFLOW_TRACKING_URI) or an export
folder. --sha256: the fingerprint fulu-nas export printed (for a registered model, also the files
hash on its "registered as" line, which binds the files themselves). MLflow's scoring server answers
on 127.0.0.1 unless --host says otherwise; Ctrl-C stops it."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys

from ..deploy.files import expected_digest
from ..deploy.serve import NO_PICKLES, casting_signature, checked_model, registry_uri
from ..deploy.server_process import check_port_free, port, run_server
from ..errors import FuluConfigError
from .storage import check_tracking_uri, probe_tracking
from .tracking import quiet_mlflow

BAD_INPUT = 2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fulu-nas serve", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or an export folder")
    parser.add_argument("--sha256", help="the fingerprint fulu-nas export printed for this model; for a registered "
                        "model, also the files hash printed on its 'registered as' line")
    parser.add_argument("--tracking-uri", help="the registry's tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=5001)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return BAD_INPUT if e.code else 0
    quiet_mlflow()  # checking a folder saves a pyfunc, which logs and shows download bars
    # SIGTERM and SIGHUP before the server runs stop the checks as Ctrl-C does, and the private copy is removed
    # (their default would end the process with the copy left behind); run_server then takes them.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _serve(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace) -> int:
    try:
        # a URI other than the registry's was read as a folder ("https:/example.com/model: not an export ...")
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/", args.model) and not args.model.startswith("models:/") \
                and not os.path.exists(args.model):
            raise FuluConfigError(f"{args.model}: not a model fulu-nas serves (models:/NAME@ALIAS, "
                                  "models:/NAME/VERSION, or an export folder on this machine)")
        expected_digest(args.sha256, "--sha256")  # named as given, before anything is read
        if not args.host.strip():  # bind() reads an empty address as every interface: never unasked
            raise FuluConfigError("--host: empty; give the address to listen on (127.0.0.1, the default: this "
                                  "machine only; 0.0.0.0: every interface)")
        check_port_free(args.host, args.port)
        tracking_uri = None
        if args.model.startswith("models:/"):
            tracking_uri = registry_uri(args.tracking_uri)
            given_by = "--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI"
            check_tracking_uri(tracking_uri, given_by)
            probe_tracking(tracking_uri, given_by)
        with checked_model(args.model, args.sha256, tracking_uri) as copy:
            if warning := casting_signature(copy):
                print(f"warning: {warning}", file=sys.stderr)
            # The server says where it serves once it answers there (it takes the port before it loads the model).
            command = [sys.executable, "-m", "fulu_nas.deploy.scoring_app", str(copy), "--host", args.host,
                       "--port", str(args.port), "--shown", args.model]
            # the checked copy, should this command be killed outright (it is removed by checked_model else)
            return run_server(command, env={**os.environ, **NO_PICKLES}, remove_if_orphaned=copy.parent)
    except FuluConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
