"""The ``fulu-nas`` console entry point: ``fulu-nas <command> ...``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .signals import held

COMMANDS = {
    "search": "run or resume a search (Hydra app): fulu-nas search [key=value ...] | --help | --cfg job",
    "confirm": "train the best architectures again (seeds, longer budget): fulu-nas confirm study.name=NAME [top_k=8]",
    "export": "write a trial as a deployable model: fulu-nas export study.name=NAME [trial=best] [out=DIR]",
    "serve": "serve an exported model over HTTP after checking its files: fulu-nas serve models:/NAME@champion",
    "ui": "open the MLflow UI of a search on 127.0.0.1: fulu-nas ui [OUTPUT_DIR | --tracking-uri URI]",
    "dashboard": "HTML dashboard of a study, logged to MLflow: fulu-nas dashboard study.name=NAME [layout=..] [out=..]",
    "bench": "benchmarks (the layer's need torch alone): fulu-nas bench layer --help",
}


def main(argv: list[str] | None = None) -> int:
    # torch's C++ warnings (the memory profiler's note on blocks allocated before it started, in the
    # middle of a progress bar) are not the console's business; read once, as torch loads. A user's
    # own level stands.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    try:
        return run_command(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # before the command handles its own (a search's), e.g. while torch loads
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`fulu-nas search --help | head`): no traceback, and none again as Python
        # flushes stdout at exit (the recipe of Python's signal module documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE


def run_command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fulu-nas <command> [args]\n\ncommands:")
        width = max(map(len, COMMANDS))  # the names in one column, the longest (dashboard) too
        for name, text in COMMANDS.items():
            print(f"  {name:{width}s}  {text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    with held():  # the command's libraries load (seconds): a signal meanwhile is a Ctrl-C once they have
        command_main = _command_main(command)
    return command_main(rest)


def _command_main(command: str) -> Callable[[list[str]], int]:
    if command == "search":
        from .search import app

        return app.main
    if command == "confirm":
        from .search import confirm_command

        return confirm_command.main
    if command == "export":
        from .search import export_trial

        return export_trial.main
    if command == "serve":
        from .search import serve_command

        return serve_command.main
    if command == "ui":
        from .dashboard import ui

        return ui.main
    if command == "dashboard":
        from .dashboard import command as dashboard

        return dashboard.main
    from .bench import cli

    return cli.main


if __name__ == "__main__":
    sys.exit(main())
