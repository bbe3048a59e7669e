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
import re
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
            if getattr(args, option, None) is not None:  # "" too: it was silently ignored
                check_writable(getattr(args, option), f"--{option}", option in getattr(args, "folders", ()))
        return args.run(args)
    except ValueError as e:  # an impossible configuration
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # the last resort, for sizes the estimates let through
        if diverged(e):  # the rows that trained are lost too: each row trains with the same learning rate
            option = "--lr" if getattr(args, "lr", None) is not None else "trainer.lr="
            print(f"error: {e}: a smaller learning rate ({option}) trains", file=sys.stderr)
            return 1
        if not out_of_memory(e):
            raise
        print(f"error: {memory_message(e, args)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        # A machine with torch alone (a GPU host) runs the layer's benchmarks; the tasks' need scipy, the
        # search's benchmarks the search's packages.
        if not e.name or e.name.split(".")[0] == "fulu_nas":
            raise
        print(f"error: fulu-nas bench {args.what} needs the Python package {e.name.split('.')[0]!r}, which is not "
              f"installed (pip install fulu-nas installs it)", file=sys.stderr)
        return 2


# The options that size a run's tensors, named in the out-of-memory message where the command has them.
SIZE_OPTIONS = ("tokens", "tokens_scale", "hidden", "experts", "ffn", "top_k", "batch_size", "train_batch")


def diverged(e: BaseException) -> bool:
    """Whether ``e`` is a training's divergence (its module is loaded where a command trains: the layer's
    benchmarks run with torch alone)."""
    train = sys.modules.get("fulu_nas.training.train")
    return train is not None and isinstance(e, train.TrainingDiverged)


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: MemoryError, torch's OutOfMemoryError (CUDA), or the
    CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, (MemoryError, oom)) or "can't allocate memory" in str(e)


def memory_message(e: BaseException, args: argparse.Namespace) -> str:
    """One line: the command ran out of memory (how much it asked for, where the error says), and
    the options that size it."""
    asked = re.search(r"allocate (\d+) bytes", str(e))
    if asked:
        detail = f" (it tried to allocate {int(asked.group(1)) / 2**30:,.1f} GiB at once)"
    else:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        detail = f" ({first})" if first else ""
    options = [f"--{name.replace('_', '-')}" for name in SIZE_OPTIONS if hasattr(args, name)]
    hint = f": choose smaller {', '.join(options)}" if options else ": choose a smaller run"
    return f"fulu-nas bench {args.what} ran out of memory{detail}{hint}"


if __name__ == "__main__":
    sys.exit(main())
