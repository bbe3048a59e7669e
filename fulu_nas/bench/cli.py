"""``fulu-nas bench``: the benchmarks' command line (``python -m fulu_nas.bench`` as well).

``layer``, ``latency`` and ``profile`` time one PiMoE layer (torch alone); ``peers`` times it beside
other MoE implementations (a plain grouped_mm one, Hugging Face Mixtral, ScatterMoE); ``levels``
measures the original spec's optimisation levels; ``train-step`` times the eager and the compiled
training step; ``routers``, ``clusters``, ``dynamic`` and friends
train small models on the tasks.
"""

from __future__ import annotations

import argparse
import functools
import sys

from . import cost_stability, layer, levels, nas_table, peers, sampler_bench, tasks, train_step
from .common import check_writable


def build_parser() -> argparse.ArgumentParser:
    # Options are spelled out: checks that read the command as typed (--summary refusing the
    # generation options) would miss an abbreviation argparse expands.
    parser = argparse.ArgumentParser(prog="fulu-nas bench", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True,
                                parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False))
    layer.add_parsers(sub)
    peers.add_parser(sub)
    levels.add_parser(sub)
    tasks.add_parsers(sub)
    nas_table.add_parser(sub)
    sampler_bench.add_parser(sub)
    cost_stability.add_parser(sub)
    train_step.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command as typed, for the reports that print it
    try:
        for option in ("json", "out"):
            if getattr(args, option, None):
                check_writable(getattr(args, option), f"--{option}", option in getattr(args, "folders", ()))
        return args.run(args)
    except ValueError as e:  # an impossible configuration
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        # A machine with torch alone (a GPU host) runs the layer's benchmarks; the tasks' need scipy, the
        # search's benchmarks the search's packages.
        if not e.name or e.name.split(".")[0] == "fulu_nas":
            raise
        print(f"error: fulu-nas bench {args.what} needs the Python package {e.name.split('.')[0]!r}, which is not "
              f"installed (pip install fulu-nas installs it)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
