"""Command-line option types: argparse types with bounds, and the check that an output path can be
written. The benchmarks (:mod:`fulu_nas.bench`) and the expert-parallel benchmark
(:mod:`fulu_nas.training.distributed`) share them; standard library only."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def check_writable(path: str, option: str, folder: bool = False) -> None:
    """ValueError (exit 2) naming ``option`` unless ``path`` can be written: a file (``folder``: a
    folder, created with its parents) whose own folder exists, is writable and which is no folder
    itself; checked before a benchmark runs, rather than found out after it."""
    import os
    import tempfile
    from pathlib import Path

    if not path:  # Path("") is the current folder: the option was silently ignored
        raise ValueError(f"{option}: an empty path: give a {'folder' if folder else 'file'} name")
    target = Path(path).absolute()
    if folder:
        parent = next(p for p in target.parents if os.path.exists(p))
        if target.exists() and not target.is_dir():
            raise ValueError(f"{option}: {target} is a file, not a folder")
    else:
        parent = target.parent
        if target.is_dir():
            raise ValueError(f"{option}: {target} is a folder: give a file name")
        if not parent.exists():  # most writers open the file without creating its folder
            raise ValueError(f"{option}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"{option}: {parent} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"{option}: cannot write in {parent} ({e.strerror or e})") from None


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (a NaN or infinite time budget never ends)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a share, from 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# Upper bounds of the benchmarks' options: generous for real benchmarking, small enough that a typo
# (a few zeros too many) is refused by argparse, naming the option and its range, instead of
# hanging the machine, filling its memory or ending in an allocation traceback.
MAX_TOKENS = 2**24  # tokens per call
MAX_WIDTH = 65536  # --hidden, --ffn
MAX_EXPERTS = 4096  # --experts, --top-k, dynamic's --start
MAX_BATCH = 65536  # sequences per training step
MAX_SECONDS = 3600.0  # time budgets: --seconds, --min-run-time, --min-time
MAX_ROUNDS = 1000  # --rounds, --repeat
MAX_STEPS = 1_000_000  # --steps, --train-steps, --iterations, --warmup, --every
MAX_PROCESSES = 256  # processes started: --jobs, --load
MAX_THREADS = 1024  # --threads
MAX_TOKENS_SCALE = 64.0  # peers --tokens-scale
# Seeds reach numpy, whose seeds are 32-bit (as fulu_nas.training.train.SEED_MAX; not imported from
# there: the layer's benchmarks run with torch alone).
SEED_MAX = 2**32 - 1


def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer from ``low`` to ``high``; the message names both ends."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be at least {low} and at most {high}, got {text}")
        return value

    parse.__name__ = "int"  # argparse's "invalid int value: 'x'" for a non-integer
    return parse


def positive_float_at_most(high: float) -> Callable[[str], float]:
    """argparse type: a finite number above 0 and at most ``high``."""
    def parse(text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and 0 < value <= high):
            raise argparse.ArgumentTypeError(f"must be a finite number above 0 and at most {high:g}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


tokens_int = int_in(1, MAX_TOKENS)
width_int = int_in(1, MAX_WIDTH)
experts_int = int_in(1, MAX_EXPERTS)
batch_int = int_in(1, MAX_BATCH)
steps_int = int_in(1, MAX_STEPS)
rounds_int = int_in(1, MAX_ROUNDS)
processes_int = int_in(1, MAX_PROCESSES)
threads_int = int_in(0, MAX_THREADS)
seed_int = int_in(0, SEED_MAX)
seconds_float = positive_float_at_most(MAX_SECONDS)
