"""What every benchmark shares: the device and its name, timing, CUDA-graph capture, tables, argparse types."""

from __future__ import annotations

import argparse
import math
import platform
import statistics
from collections.abc import Callable, Iterable

import torch
from torch.utils import benchmark

from ..deploy.cuda_graphs import capture

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def space_values(pairs: Iterable[str], option: str) -> dict:
    """A search space's parameter values from ``key=value`` pairs (values parsed as YAML, so
    ``top_p=0.5`` is a number and ``top_p=null`` None); ValueError (exit 2) naming ``option`` for a
    pair without ``=``."""
    import yaml

    values = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq:
            raise ValueError(f"{option}: expected key=value, got {pair!r}")
        values[key.strip()] = yaml.safe_load(text)
    return values


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def bench_device(name: str | None) -> torch.device:
    """``--device``: default cuda if available, else cpu; ValueError (exit 2) for a device this
    machine does not have."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: the benchmarks run on cpu or cuda")
    return device


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    """Median wall time of ``fn()`` after torch.utils.benchmark's own warm-up, with torch's whole
    intra-op thread pool (the Timer's default is one thread, which would time a 1-core CPU)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def captured(step: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``step`` (CUDA work without host syncs) captured in one CUDA graph after ``warmup`` calls on a
    side stream (:func:`fulu_nas.deploy.cuda_graphs.capture`); returns the graph's replay."""
    graph, _ = capture(step, warmup)
    return graph.replay


def markdown_table(head: list[str], body: list[list[str]], text_columns: int = 0) -> str:
    """A Markdown table: the first ``text_columns`` columns left-aligned, the rest right-aligned."""
    rule = "|" + "---|" * text_columns + "---:|" * (len(head) - text_columns)
    return "\n".join(["| " + " | ".join(head) + " |", rule, *("| " + " | ".join(cells) + " |" for cells in body)])


def check_writable(path: str, option: str, folder: bool = False) -> None:
    """ValueError (exit 2) naming ``option`` unless ``path`` can be written: a file (``folder``: a
    folder, created with its parents) whose own folder exists, is writable and which is no folder
    itself; checked before a benchmark runs, rather than found out after it."""
    import os
    import tempfile
    from pathlib import Path

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


def round_median(values: list[float]) -> float:
    """The median of per-round figures, always one measured round: for an even count the lower
    middle one, where statistics.median would average the two (so one disturbed round of two moved
    the figure by half its excess)."""
    return statistics.median_low(values)


def unit_float(text: str) -> float:
    """argparse type: a share, from 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
