"""The ``fulu-nas`` console entry point: ``fulu-nas <command> ...``."""

from __future__ import annotations

import sys

COMMANDS = {
    "bench": "benchmarks (torch only): fulu-nas bench layer --help",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fulu-nas <command> [args]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:10s} {text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from . import bench

        return bench.main(rest)
    print(f"error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
