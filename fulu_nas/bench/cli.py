"""``fulu-nas bench``: the benchmarks' command line (``python -m fulu_nas.bench`` as well).

``layer``, ``latency`` and ``profile`` time one PiMoE layer (torch alone); ``levels`` measures the
original spec's optimisation levels; ``routers``, ``clusters``, ``dynamic`` and friends train small
models on the tasks.
"""

from __future__ import annotations

import argparse
import sys

from . import cost_stability, layer, levels, nas_table, sampler_bench, tasks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fulu-nas bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    layer.add_parsers(sub)
    levels.add_parser(sub)
    tasks.add_parsers(sub)
    nas_table.add_parser(sub)
    sampler_bench.add_parser(sub)
    cost_stability.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:  # an impossible configuration
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
