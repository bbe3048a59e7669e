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


def memory_bytes(device: torch.device) -> int | None:
    """The memory of ``device``: the GPU's, or the machine's physical memory; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def layer_bytes(hidden: int, experts: int, ffn: int, top_k: int, tokens: int, swiglu: bool = True,
                element_size: int = 4, backward: bool = False) -> int:
    """An estimate, on the low side, of the memory one MoE layer and a dense FFN of width
    ``top_k * ffn`` take for a call of ``tokens`` tokens: their weights, the input, the rows sent to
    the experts with their hidden activations, the output; with ``backward`` twice that (the
    gradients). The workspaces of the kernels come on top."""
    matrices = 3 if swiglu else 2
    weights = (experts + top_k) * matrices * hidden * ffn + hidden * experts
    activations = tokens * (hidden * (2 + top_k) + top_k * ffn * matrices)
    return element_size * (weights + activations) * (2 if backward else 1)


def check_memory(need: int, device: torch.device, options: dict[str, object], what: str) -> None:
    """ValueError (exit 2) naming ``options`` (option -> value as given) when ``need`` bytes (an
    estimate of ``what``) exceed the memory of ``device``: refused before anything is allocated,
    rather than an allocation traceback, or the machine swapping, once the run is under way."""
    have = memory_bytes(device)
    if have is None or need <= have:
        return
    given = " ".join(f"{option} {value}" for option, value in options.items())
    where = "the GPU" if device.type == "cuda" else "this machine"
    raise ValueError(f"{given}: {what} need about {_size(need)}, more than the {_size(have)} of memory {where} "
                     "has: choose smaller sizes")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "bytes" else f"{n:.0f} bytes"
        n /= 1024
    raise AssertionError


def layer_memory_check(device: torch.device, dtype: torch.dtype, options: dict[str, object], hidden: int,
                       experts: int, ffn: int, top_k: int, tokens: int, swiglu: bool = True,
                       backward: bool = False, what: str = "the layer's weights and activations") -> None:
    """:func:`check_memory` for a layer benchmark: on the device, the layer and the dense FFN in
    ``dtype``; on a CUDA host besides, the layer's fp32 weights (it is built on the CPU first)."""
    need = layer_bytes(hidden, experts, ffn, top_k, tokens, swiglu, dtype.itemsize, backward)
    check_memory(need, device, options, what)
    if device.type == "cuda":
        check_memory(layer_bytes(hidden, experts, ffn, top_k, 0, swiglu, 4), torch.device("cpu"), options,
                     "the layer's fp32 weights, built on the CPU first,")
