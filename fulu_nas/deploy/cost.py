"""Cost of a model as it is deployed: latency, throughput and peak memory per input shape, parameter
counts and analytic FLOPs per token.

What is timed is the forward the export serves (:class:`~fulu_nas.deploy.export.LogitsOnly`: tokens ->
logits, eval and inference mode; fp32 on the CPU as exported). On CUDA the model is served in bf16 (the
grouped GEMM's fast path; fp32 takes a fallback that synchronises with the host), replayed from one
CUDA graph per shape and timed with CUDA events.

A shared machine's speed drifts by tens of percent within a minute, so the timing runs in rounds, and
in each round the model and, when given, a fixed reference model take turns call by call, in the order
model-reference then reference-model (what the first call of a pair pays, the second does not); the
figures are medians over the rounds (``*_spread``: their interquartile range over the median).
``latency_ratio`` (each round's median over consecutive pairs of both orders of the model's time over
the reference's; the median over the rounds) cancels the drift that both share: that is the load-robust
figure to compare architectures by.
"""

from __future__ import annotations

import copy
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch

from ..checks import check_int
from ..errors import FuluConfigError
from ..models import PiMoETransformer
from .cuda_graphs import capture
from .export import LogitsOnly


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live tensor memory allocated on the CPU while ``fn()`` runs, from torch.profiler's
    allocation records: every allocation and free at its own time, cumulative. (Each op's net memory
    summed at the op's start cancelled a temporary that the op freed before returning, such as
    cross_entropy's log_softmax.)

    Kineto, the profiler's C++ backend, writes "USDT: ... profiler_start" and "profiler_stop" lines to
    the process's stderr on every profile at any log level below 6, which breaks a progress bar. Its
    own switch, ``KINETO_LOG_LEVEL``, is read once, when the process first profiles: it is set to 6
    (silent) here unless the user chose a level."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw event tree (what torch's own memory profiler reads): allocations are leaves of the op
    # that made them, a free is negative.
    pending, allocations = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while pending:
        event = pending.pop()
        pending += event.children
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append(event)
    live = peak = 0
    for event in sorted(allocations, key=lambda e: e.start_time_ns):
        live += event.extra_fields.alloc_size
        peak = max(peak, live)
    return peak


def robust_spread(values: list[float]) -> float:
    """Interquartile range over the median (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(values)


def deployed_forward(model: PiMoETransformer, tokens: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One call of the served forward on ``tokens``: eager on the CPU; on CUDA a bf16 copy of the model
    replayed from a CUDA graph (captured after warm-up calls; the graph owns its input buffer)."""
    if tokens.device.type != "cuda":
        served = LogitsOnly(model).eval()
        return lambda: served(tokens)
    return _GraphReplay(LogitsOnly(copy.deepcopy(model).to(torch.bfloat16)).eval(), tokens)


def served_reference(reference: PiMoETransformer, tokens: torch.Tensor,
                     cache: dict | None) -> Callable[[], torch.Tensor]:
    """:func:`deployed_forward` of the fixed ``reference`` model on ``tokens``, kept in ``cache`` (one per
    reference model) on CUDA: later calls at the same shape copy their tokens into the captured graph's
    input instead of copying the model and capturing again (a search measures every trial beside it)."""
    if cache is None or tokens.device.type != "cuda":
        return deployed_forward(reference, tokens)
    replay = cache.get(tuple(tokens.shape))
    if replay is None:
        replay = cache[tuple(tokens.shape)] = deployed_forward(reference, tokens)
    else:
        replay.tokens.copy_(tokens)
    return replay


class ServedKernelWarmup:
    """:func:`deployed_forward`'s served copy of ``model`` (bf16) called once per ``(batch, seq)`` shape on a
    background thread and a stream of its own, started while ``model`` trains: the GPU kernels the served
    forward needs are then compiled before its cost is measured. Triton compiles its kernels on first use
    for each new combination of expert count, top-k and tile sizes, which took 0.1-1.9 s per architecture
    of the GPU preset on an H200, most of the cost phase; training leaves the host idle while the GPU
    replays its steps. The copy is taken here, from the untrained weights: the kernels depend on the
    shapes alone. Its outputs are thrown away, and so is a failure: the measurement meets it again."""

    def __init__(self, model: PiMoETransformer, shapes: list[tuple[int, int]]):
        device = next(model.parameters()).device
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        generator = torch.Generator(device).manual_seed(0)  # the training's random stream stays untouched
        with torch.cuda.stream(self.stream), torch.no_grad():
            served = LogitsOnly(copy.deepcopy(model).to(torch.bfloat16)).eval()
            batches = [torch.randint(0, model.arch.vocab_size, shape, device=device, generator=generator)
                       for shape in shapes]
        # training's next steps update the weights in place: only after the copy has read them
        torch.cuda.current_stream(device).wait_stream(self.stream)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(served, batches), daemon=True,
                                        name="fulu-served-kernel-warmup")
        self._thread.start()

    def _run(self, served: torch.nn.Module, batches: list[torch.Tensor]) -> None:
        try:
            with torch.inference_mode(), torch.cuda.stream(self.stream):
                for tokens in batches:
                    served(tokens)
            self.stream.synchronize()
        except Exception as e:  # the cost measurement meets it again and fails the trial with it
            self.error = e

    def wait(self) -> float:
        """Seconds spent waiting for the thread to finish."""
        start = time.perf_counter()
        self._thread.join()
        return time.perf_counter() - start


class _GraphReplay:
    """A forward captured in a CUDA graph. It holds the model and the input buffer: the graph reads
    their memory, which must outlive it."""

    def __init__(self, served: torch.nn.Module, tokens: torch.Tensor):
        self.served, self.tokens = served, tokens.clone()
        self.graph, self.out = capture(lambda: self.served(self.tokens), device=tokens.device)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.out

    def eager_peak_bytes(self) -> int:
        """Peak memory of one eager call of the served copy above what was allocated before it: the
        activations the graph's pool holds. A replay allocates nothing (the pool was taken at capture),
        so a peak read around one was 0 for every model."""
        device = self.tokens.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            self.served(self.tokens)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base


class _Clock:
    """Seconds since the last lap, the GPU's queued work included (``device``: synchronise it first)."""

    def __init__(self, device: torch.device | None):
        self.device, self.last = device, time.perf_counter()

    def lap(self) -> float:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def _timings(calls: dict[str, Callable[[], object]], iterations: int, cuda: bool) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, ``iterations`` times, the calls taking turns call by call
    (a burst of load then falls on both of a pair alike), in the given order then the reverse, so that
    each goes first as often (see :func:`pair_ratio`): CUDA events around each replay on CUDA, the
    calling thread's CPU time on the CPU (see :func:`measure_cost`)."""
    times: dict[str, list] = {name: [] for name in calls}
    event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    for i in range(iterations):
        for name, call in list(calls.items())[::1 if i % 2 == 0 else -1]:
            if cuda:
                start, end = event(), event()
                start.record()
                call()
                end.record()
                times[name].append((start, end))
            else:
                start = time.thread_time()
                call()
                times[name].append(time.thread_time() - start)
    if cuda:
        torch.cuda.synchronize()
        return {name: [start.elapsed_time(end) / 1e3 for start, end in pairs] for name, pairs in times.items()}
    return times


def pair_ratio(model: list[float], reference: list[float]) -> float:
    """The median over consecutive pairs of calls of :func:`_timings` (one in each order; an odd last
    one alone) of the model's summed time over the reference's: one pair's ratio would carry whatever the
    call going first pays and the second does not."""
    ratios = [sum(model[i:i + 2]) / sum(reference[i:i + 2]) for i in range(0, len(model), 2)]
    return statistics.median(ratios)


def cost_argument_problems(model: PiMoETransformer, batch_shapes: object, warmup: object, iterations: object,
                           rounds: object) -> list[str]:
    """What is wrong with :func:`measure_cost`'s arguments, each problem naming its argument: without
    this an empty list or no iterations failed in ``max()`` or ``statistics.median`` in their words, and a
    batch of no sequences returned a measurement."""
    problems: list[str] = []
    if not (isinstance(batch_shapes, (list, tuple)) and batch_shapes
            and all(isinstance(shape, (list, tuple)) and len(shape) == 2 for shape in batch_shapes)):
        problems.append(f"batch_shapes: expected a non-empty list of (batch, seq) pairs, got {batch_shapes!r}")
    else:
        for i, (batch, seq) in enumerate(batch_shapes):
            check_int(f"batch_shapes[{i}] batch", batch, problems, 1)
            check_int(f"batch_shapes[{i}] seq", seq, problems, 1, model.arch.max_seq_len)
    check_int("warmup", warmup, problems, 0)
    check_int("iterations", iterations, problems, 1)
    check_int("rounds", rounds, problems, 1)
    return problems


@torch.inference_mode()
def measure_cost(model: PiMoETransformer, batch_shapes: list[tuple[int, int]], warmup: int = 3,
                 iterations: int = 10, rounds: int = 5, reference: PiMoETransformer | None = None,
                 reference_served: dict | None = None) -> dict:
    """Per (batch, seq) shape: latency (median over ``rounds`` of each round's median of ``iterations``
    calls; p95 over every call), its spread, throughput, peak memory, and with a ``reference`` model
    (same device) timed in the same rounds: ``latency_ratio`` and its spread. Plus parameter counts and
    analytic FLOPs per token. ``reference_served``: a cache of the reference's served forward
    (:func:`served_reference`), for a caller measuring many models beside one reference.

    On the CPU a call is timed on one intra-op thread by its CPU time: what the forward costs, not
    how long it waited for a core. With several threads, other processes on the cores make the threads
    wait for each other at every parallel region and a call's time jumps 10-100x at random (measured
    on a 2-core machine under load), which no number of repetitions averages out."""
    if problems := cost_argument_problems(model, batch_shapes, warmup, iterations, rounds):
        raise FuluConfigError(problems)
    device = next(model.parameters()).device
    was_training = model.training
    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    try:
        return _measure(model, batch_shapes, warmup, iterations, rounds, reference, reference_served, device, cuda)
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)


def _measure(model: PiMoETransformer, batch_shapes: list[tuple[int, int]], warmup: int, iterations: int,
             rounds: int, reference: PiMoETransformer | None, reference_served: dict | None, device: torch.device,
             cuda: bool) -> dict:
    shapes = []
    # Wall-clock seconds of the protocol's parts, summed over the shapes: serving the models (a bf16
    # copy and its graph capture on CUDA) with the warm-up calls, the timed rounds, the memory peak.
    seconds = {"prepare": 0.0, "timing": 0.0, "memory": 0.0}
    clock = _Clock(device if cuda else None)
    for batch, seq in batch_shapes:
        tokens = torch.randint(0, model.arch.vocab_size, (batch, seq), device=device)
        calls = {"model": deployed_forward(model, tokens)}
        if reference is not None:
            calls["reference"] = served_reference(reference, tokens, reference_served)
        for call in calls.values():
            for _ in range(warmup):
                call()
        seconds["prepare"] += clock.lap()
        per_round: dict[str, list[float]] = {name: [] for name in calls}
        round_ratios: list[float] = []  # each round's pair_ratio
        every_call: list[float] = []
        for _ in range(rounds):
            times = _timings(calls, iterations, cuda)
            for name, t in times.items():
                per_round[name].append(statistics.median(t))
            every_call += times["model"]
            if reference is not None:
                round_ratios.append(pair_ratio(times["model"], times["reference"]))
        seconds["timing"] += clock.lap()
        if cuda:
            peak = calls["model"].eager_peak_bytes()
        else:
            peak = cpu_peak_bytes(calls["model"])
        seconds["memory"] += clock.lap()
        p50 = statistics.median(per_round["model"])
        shape = {"batch": batch, "seq": seq, "latency_p50_ms": p50 * 1e3,
                 "latency_p95_ms": _percentile(every_call, 0.95) * 1e3,
                 "latency_spread": robust_spread(per_round["model"]),
                 "throughput_tokens_per_s": batch * seq / p50, "peak_memory_mb": peak / 2**20}
        if reference is not None:
            shape.update(reference_latency_ms=statistics.median(per_round["reference"]) * 1e3,
                         latency_ratio=statistics.median(round_ratios),
                         latency_ratio_spread=robust_spread(round_ratios))
        shapes.append(shape)
    params = model.parameter_counts()
    return {"shapes": shapes, "total_params": params["total"], "active_params": params["active"],
            "flops_per_token": model.flops_per_token(max(s for _, s in batch_shapes)),
            "device": str(device), "rounds": rounds, "iterations": iterations, "seconds": seconds,
            "timing": "CUDA events, one CUDA graph per shape" if cuda else "CPU time of one thread"}
