"""What every benchmark shares: the device and its name, timing, CUDA-graph capture, tables, and (from
:mod:`fulu_nas.options`) the argparse types."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable

import torch
from torch.utils import benchmark

from ..deploy.cuda_graphs import capture

# The benchmarks' option types live a layer down, where the expert-parallel benchmark
# (fulu_nas.training.distributed) reads them too.
from ..options import (  # noqa: F401
    MAX_EXPERTS,
    MAX_PROCESSES,
    MAX_STEPS,
    MAX_TOKENS_SCALE,
    batch_int,
    check_writable,
    experts_int,
    int_in,
    positive_float,
    positive_float_at_most,
    positive_int,
    processes_int,
    rounds_int,
    seconds_float,
    seed_int,
    steps_int,
    threads_int,
    tokens_int,
    unit_float,
    width_int,
)

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
        try:
            values[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{option}: {key.strip()}: cannot read {text!r} ({' '.join(str(e).split())})") from None
    return values


def arch_values(text: str, option: str) -> dict:
    """A search space's parameter values from one ``key=value,...`` word (:func:`space_values`): one
    word per option value, so that the Hydra overrides after the option stay overrides. A comma inside
    brackets belongs to its value (``hierarchy_groups=[2,4]``)."""
    pairs, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c in "[{") - (c in "]}")
        if c == "," and depth <= 0:
            pairs.append(text[start:i])
            start, depth = i + 1, 0
    return space_values(filter(None, [*pairs, text[start:]]), option)


def device_name(device: torch.device) -> str:
    from ..deploy.devices import processor_name

    if device.type == "cuda":
        return processor_name(device)
    return f"{processor_name(device)} ({torch.get_num_threads()} threads)"


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


def round_median(values: list[float]) -> float:
    """The median of per-round figures, always one measured round: for an even count the lower
    middle one, where statistics.median would average the two (so one disturbed round of two moved
    the figure by half its excess)."""
    return statistics.median_low(values)


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
