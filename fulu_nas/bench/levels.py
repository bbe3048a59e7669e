"""The original spec's performance table, measured: ``python -m fulu_nas.bench levels``.

One row per optimisation level of :func:`fulu_nas.system.create_ultimate_pimoe_system`, each run
the way the system runs it after ``optimize_for_inference()``, plus a dense FFN doing the same
FLOPs (width ``top_k * ffn``: the ceiling) in the same run, at the spec's shapes (hidden 512,
8 experts, FFN 2048, top-2). The columns are the spec's: latency, throughput, memory, expert
utilisation, load balance.

- BASIC: per-expert loop, fp32. ENHANCED: sorted dispatch, one matmul pair per expert, fp32.
  ADVANCED: grouped GEMM (the Triton experts on CUDA), bf16 on CUDA (hardware optimisation),
  eager. EXTREME: ADVANCED compiled, replayed from one CUDA graph per input shape on CUDA. On the
  CPU, ADVANCED and EXTREME both run the eager forward with the CPU's expert paths (the streaming
  kernel for few rows per expert, above that oneDNN for large experts, chunked grouped GEMMs for
  small ones), as the system does there.
- Latency: median of per-call times after warm-up (CUDA events on CUDA, the wall clock on the
  CPU); throughput = tokens / median latency.
- Memory: on CUDA the allocator's peak over the level's calls (warm-up, compilation and graph
  capture included), weights and input included. On the CPU the weights and input plus the
  peak of live tensor allocations over the first two calls (torch.profiler's allocation events;
  the first call packs the experts' weights).
- Utilisation and balance: the routing statistics of the measured call
  (:mod:`fulu_nas.moe.stats`). An untrained router says little, so the layer is first trained
  for a short run on ``clusters`` (inside a one-block model of width 512, 8 planted domains), and
  the benchmark input is the hidden states entering the layer for the task's validation
  sequences. Every level gets the same trained weights.

Needs torch (and tqdm for training) only.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from ..deploy.cost import cpu_peak_bytes
from ..deploy.cuda_graphs import GraphedForward
from ..models import ArchConfig, PiMoETransformer
from ..moe import ROUTERS, FeedForward
from ..system import OptimizationLevel, create_ultimate_pimoe_system
from .common import (
    batch_int,
    bench_device,
    check_memory,
    device_name,
    experts_int,
    layer_bytes,
    markdown_table,
    positive_float,
    seed_int,
    steps_int,
    tokens_int,
    width_int,
)

COLUMNS = ("level", "dtype", "latency_ms", "throughput_tokens_per_s", "memory_mb", "expert_utilisation",
           "load_balance", "of_dense")
DENSE_ROW = "dense FFN (same FLOPs)"
SEQ_LEN = 16  # clusters sequences: the benchmark input is a whole number of them
HEADINGS = ("level", "dtype", "latency (ms)", "throughput (tokens/s)", "memory (MiB)", "expert utilisation",
            "load balance", "throughput / dense")


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iterations: int) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls: CUDA events around each call on CUDA (no
    host sync between calls), the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iterations)]
    torch.cuda.synchronize(device)
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def _tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def train_on_clusters(args: argparse.Namespace, device: torch.device) -> tuple[PiMoETransformer, dict]:
    """A one-block model of width ``hidden`` whose FFN is the spec layer, trained on ``clusters``
    for ``train_steps`` steps; returns it and a summary (steps, seconds, loss, task accuracy)."""
    from ..tasks import ClustersTask
    from ..training.train import TrainConfig, train

    task = ClustersTask(num_domains=args.experts, seq_len=SEQ_LEN)
    layer_cfg = _system(args, OptimizationLevel.ADVANCED, device="cpu").config
    # Auxiliary-loss-free balancing (DeepSeek-V3) while training; it changes no parameter shape.
    arch = ArchConfig(vocab_size=task.vocab_size, num_classes=task.num_classes, max_seq_len=task.seq_len,
                      num_layers=1, hidden_size=args.hidden, num_heads=8, moe_every=1,
                      dense_ffn_size=args.ffn, moe=replace(layer_cfg, impl="grouped", bias_update_rate=1e-3))
    torch.manual_seed(args.seed)
    model = PiMoETransformer(arch)
    result = train(model, task, TrainConfig(steps=args.train_steps, batch_size=args.train_batch, lr=args.lr,
                                            seed=args.seed, device=str(device), progress=args.progress))
    model.eval()
    correct = total = 0.0
    with torch.no_grad():
        for batch in task.val_batches(256):
            batch = batch.to(device)
            right, count = task.metric_counts(model(batch.tokens).logits, batch)["accuracy"]
            correct, total = correct + right, total + count
    return model, {"task": "clusters", "train_steps": result.steps, "train_seconds": round(result.seconds, 1),
                   "final_loss": round(result.final_loss, 4), "task_accuracy": round(correct / total, 4)}


def layer_inputs(model: PiMoETransformer, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor]:
    """The hidden states entering the model's MoE layer, (sequences, seq_len, hidden), and the
    token ids (for the hash router), for ``tokens`` tokens of clusters validation sequences."""
    from ..tasks import ClustersTask

    task = ClustersTask(num_domains=args.experts, val_sequences=args.tokens // SEQ_LEN, seq_len=SEQ_LEN)
    captured: list[Tensor] = []
    hook = model.moe_layers()[0].register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    tokens = torch.cat([b.tokens for b in task.val_batches(256)]).to(device)
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        hook.remove()
    return captured[0].detach().float(), tokens


def _system(args: argparse.Namespace, level: OptimizationLevel, device):
    advanced = level in (OptimizationLevel.ADVANCED, OptimizationLevel.EXTREME)
    return create_ultimate_pimoe_system(
        hidden_size=args.hidden, num_experts=args.experts, routing_strategy=args.router, optimization_level=level,
        top_k=args.top_k, expert_ffn_size=args.ffn, enable_hardware_optimization=advanced, device=device)


def measure_level(run: Callable[[], object], module: torch.nn.Module, x: Tensor, args: argparse.Namespace,
                  device: torch.device) -> dict:
    """Latency, throughput and memory of ``run`` (one forward of ``x``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        times = time_calls(run, device, args.warmup, args.iterations)
        memory = torch.cuda.max_memory_allocated(device)
    else:
        memory = _tensor_bytes(module) + x.numel() * x.element_size() + cpu_peak_bytes(lambda: (run(), run()))
        times = time_calls(run, device, args.warmup, args.iterations)
    latency = statistics.median(times)
    tokens = x.shape[0] * x.shape[1]
    return {"latency_ms": latency * 1e3, "throughput_tokens_per_s": tokens / latency, "memory_mb": memory / 2**20}


def bench_levels(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], dict]:
    _say(f"training the layer on clusters for {args.train_steps} steps ({device.type})")
    model, training = train_on_clusters(args, device)
    x, token_ids = layer_inputs(model, args, device)
    trained = {k: v.detach().to("cpu") for k, v in model.moe_layers()[0].state_dict().items()}
    del model
    _release(device)
    rows = []
    for name in dict.fromkeys(args.levels):  # a level named twice is measured once
        _say(f"measuring {name.upper()}")
        rows.append(_level_row(args, OptimizationLevel[name.upper()], trained, x, token_ids, device))
        _release(device)
    _say("measuring the dense FFN")
    rows.append(_dense_row(args, x, device))
    dense = rows[-1]["throughput_tokens_per_s"]
    for row in rows:
        row["of_dense"] = row["throughput_tokens_per_s"] / dense
    return rows, training


def _level_row(args: argparse.Namespace, level: OptimizationLevel, trained: dict[str, Tensor], x: Tensor,
               token_ids: Tensor, device: torch.device) -> dict:
    """One level's row: the system with the trained weights, optimised for inference, measured."""
    system = _system(args, level, device)
    system.layer.load_state_dict(trained)
    system.optimize_for_inference()
    # The input in the level's dtype, as the previous layer would hand it over (no cast per call).
    x = x.to(system.dtype)
    row = {"level": level.name, "dtype": str(system.dtype).removeprefix("torch.")}
    row.update(measure_level(lambda: system(x, token_ids=token_ids), system, x, args, device))
    _, info = system(x, return_comprehensive_info=True, token_ids=token_ids)
    row["expert_utilisation"] = info["routing_info"]["utilisation"]
    row["load_balance"] = info["routing_info"]["load_balance"]
    return row


def _dense_row(args: argparse.Namespace, x: Tensor, device: torch.device) -> dict:
    """The ceiling: a SwiGLU FFN of width top_k * ffn, run as EXTREME runs (bf16, compiled and
    replayed from a CUDA graph on CUDA; eager fp32 on the CPU)."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    dense = FeedForward(args.hidden, args.top_k * args.ffn, "swiglu").to(device=device, dtype=dtype).eval()
    x_in = x.to(dtype)
    step = GraphedForward(torch.compile(lambda h, _ids=None: dense(h), fullgraph=True)) if cuda else dense

    def run():
        with torch.inference_mode():
            return step(x_in).clone()

    row = {"level": DENSE_ROW, "dtype": str(dtype).removeprefix("torch.")}
    row.update(measure_level(run, dense, x_in, args, device))
    row["expert_utilisation"] = row["load_balance"] = None
    return row


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_table(rows: list[dict]) -> str:
    def cell(key: str, value) -> str:
        if value is None:
            return "-"
        if isinstance(value, str):
            return value
        return {"throughput_tokens_per_s": f"{value:,.0f}", "latency_ms": f"{value:.3f}",
                "memory_mb": f"{value:,.1f}"}.get(key, f"{value:.2f}")

    return markdown_table(list(HEADINGS), [[cell(k, r[k]) for k in COLUMNS] for r in rows], text_columns=2)


def levels_main(args: argparse.Namespace) -> int:
    device = bench_device(args.device)
    if args.tokens % SEQ_LEN:
        raise ValueError(f"--tokens must be a multiple of the clusters sequence length {SEQ_LEN}, got {args.tokens}")
    check_levels_memory(args, device)
    rows, training = bench_levels(args, device)
    print(f"The spec's table, measured: {device_name(device)}, torch {torch.__version__}")
    print(f"hidden {args.hidden}, {args.experts} experts, FFN {args.ffn} (swiglu), top-{args.top_k}, router "
          f"{args.router}; {args.tokens} tokens per call (clusters validation sequences of 16, the layer's "
          f"inputs after {training['train_steps']} training steps: task accuracy {training['task_accuracy']:.3f}); "
          f"medians of {args.iterations} calls after {args.warmup}\n")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__, "hidden": args.hidden,
                       "experts": args.experts, "ffn": args.ffn, "top_k": args.top_k, "router": args.router,
                       "tokens": args.tokens, "training": training, "rows": rows}, f, indent=2)
    return 0


def check_levels_memory(args: argparse.Namespace, device: torch.device) -> None:
    """ValueError (exit 2) naming the size options when the run clearly does not fit in memory: the
    training (fp32 weights, their gradients and Adam's two moments; a batch's activations, forward
    and backward) and the measured calls (the weights again, the input's activations)."""
    shape = (args.hidden, args.experts, args.ffn, args.top_k)
    training = layer_bytes(*shape, args.train_batch * SEQ_LEN, backward=True) + 2 * layer_bytes(*shape, 0)
    need = training + layer_bytes(*shape, args.tokens)
    options = {"--tokens": args.tokens, "--hidden": args.hidden, "--experts": args.experts, "--ffn": args.ffn,
               "--top-k": args.top_k, "--train-batch": args.train_batch}
    check_memory(need, device, options, "the layer's training and measured calls")


def add_parser(sub) -> None:
    p = sub.add_parser("levels", help="the spec's table: latency, throughput, memory, utilisation and balance "
                                      "per optimisation level, beside a dense FFN")
    p.add_argument("--hidden", type=width_int, default=512)
    p.add_argument("--experts", type=experts_int, default=8)
    p.add_argument("--ffn", type=width_int, default=2048)
    p.add_argument("--top-k", type=experts_int, default=2)
    p.add_argument("--router", choices=ROUTERS, default="topk")
    p.add_argument("--tokens", type=tokens_int, default=2048, help="tokens per call (a multiple of 16)")
    p.add_argument("--levels", nargs="+", choices=[m.value for m in OptimizationLevel],
                   default=[m.value for m in OptimizationLevel])
    p.add_argument("--train-steps", type=steps_int, default=300, help="training steps on clusters first")
    p.add_argument("--train-batch", type=batch_int, default=64, help="sequences per training step")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--warmup", type=steps_int, default=3)
    p.add_argument("--iterations", type=steps_int, default=20)
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the training progress bar")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(run=levels_main)
