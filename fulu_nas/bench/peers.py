"""``fulu-nas bench peers``: the PiMoE layer beside the MoE implementations a user could take instead.

For each configuration (a shape; forward in inference mode, or forward + backward) every
implementation runs on the same expert weights, in one process on one device:

- dense ceiling: ``FeedForward(H, F, activation)`` over T*k rows (each token's row k times: the
  experts' GEMMs at their shapes, FLOPs and output rows, without routing, grouping or the combine),
  eager, eager in a CUDA graph, and compiled (the activation fused) in a CUDA graph; the fastest
  counts. The targets' ratios are against it.
- wide dense FFN: ``FeedForward(H, k*F, activation)`` over the T rows, timed the same way: the same
  FLOPs in fewer, wider rows (its second GEMM writes T rows, not T*k), so a stricter bound; its ratio
  is reported beside.
- GEMM-only bound: the experts' two grouped GEMMs alone (``torch._grouped_mm`` on rows already
  sorted by expert, with the real routing's offsets; no gather, activation or combine), eager and
  graphed; the faster counts. With backward: their four gradient GEMMs too.
- plain grouped_mm peer: :func:`plain_route` + :func:`plain_experts`, the reference a user would
  write with ``torch._grouped_mm`` (eager).
- Hugging Face Mixtral: ``MixtralSparseMoeBlock`` of the same shapes (SwiGLU only), with the
  experts implementation a transformers model gets by default (``grouped_mm``; ``--hf-experts``).
- ScatterMoE (github.com/shawntan/scattermoe; ``MLP`` / ``GLUMLP``, eager, CUDA and triton) found
  on ``--peers-path``, behind the same plain router.
- fulu-nas default: ``out, stats = layer(x)``, eager, with statistics.
- fulu-nas best: ``torch.compile(layer, fullgraph=True, dynamic=False)`` called with
  ``with_stats=False``, the whole call captured in one CUDA graph and replayed.

Timing: every implementation of a configuration takes its turn in each of ``--rounds`` rounds;
within a round each call is timed by itself (CUDA events around it, then a sync; the wall clock on
the CPU), so host work the GPU cannot hide counts, and a figure is the median over the rounds of
each round's median. Accuracy: the relative error ``||out - ref|| / ||ref||`` against the fp32
per-expert loop (an fp32 copy of the layer, ``impl="loop"``). Implementations with a router of their
own are fed the reference's routing for that (their experts part); fulu-nas runs end to end, and
the tokens its router sends elsewhere than the fp32 reference's are counted.

Imports torch only at module level: transformers and ScatterMoE are imported when used.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..moe import FeedForward, MoEConfig, PiMoELayer
from .common import DTYPES, bench_device, captured, device_name, markdown_table, positive_int

# Shape suffixes: T tokens, D hidden, E experts, F expert width (2F for SwiGLU's gate and up),
# K slots per token, N = T*K dispatched rows.


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    experts: int
    ffn: int
    top_k: int

    def describe(self) -> str:
        return f"T={self.tokens}, H={self.hidden}, E={self.experts}, F={self.ffn}, k={self.top_k}"


@dataclass(frozen=True)
class Config:
    label: str
    shapes: tuple[Shape, ...]  # one; two for the E-scaling ratio (the first over the second)
    backward: bool = False


SEED = Shape(32768, 512, 8, 2048, 2)
CONFIGS = {
    "seed-fwd": Config("seed fwd", (SEED,)),
    "seed-fwd-bwd": Config("seed fwd+bwd", (SEED,), backward=True),
    "fine-fwd": Config("fine fwd", (Shape(32768, 1024, 128, 256, 8),)),
    "seed-latency": Config("seed latency", (Shape(16, 512, 8, 2048, 2),)),
    "e-scaling": Config("E-scaling", (Shape(32768, 1024, 256, 512, 2), Shape(32768, 1024, 8, 512, 2))),
}
# --quick: the same rows at shapes a CPU runs in seconds.
_QUICK_SEED = Shape(256, 64, 8, 128, 2)
QUICK = {
    "seed-fwd": (_QUICK_SEED,),
    "seed-fwd-bwd": (_QUICK_SEED,),
    "fine-fwd": (Shape(256, 64, 16, 32, 4),),
    "seed-latency": (Shape(16, 64, 8, 128, 2),),
    "e-scaling": (Shape(256, 64, 32, 64, 2), Shape(256, 64, 8, 64, 2)),
}
LATENCY_CONFIGS = ("seed-latency",)  # --tokens-scale leaves their token counts alone

IMPLS = {
    "dense": "dense ceiling (T*k rows x F)",
    "dense_wide": "wide dense FFN (T rows x kF)",
    "gemm": "GEMM-only bound",
    "plain": "plain torch._grouped_mm peer (eager)",
    "hf": "Hugging Face Mixtral block (SwiGLU only)",
    "scattermoe": "ScatterMoE (eager)",
    "fulu": "fulu-nas default `out, stats = layer(x)`",
    "fulu_best": "fulu-nas best: compiled + one CUDA graph, no stats",
}
# Each timing's throughput ratio to a bound (key in a result -> the bound's implementation), in the
# order the table's cells print them.
BOUND_RATIOS = {"of_dense": "dense", "of_gemm": "gemm", "of_dense_wide": "dense_wide"}
# Implementations whose output is the MoE layer's (the bounds compute something else).
MOE_IMPLS = ("plain", "hf", "scattermoe", "fulu", "fulu_best")


# -- the plain grouped_mm peer --------------------------------------------------------------------


def plain_route(x_TD: Tensor, gate_ED: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Softmax top-k routing in fp32, renormalised: ``(weight_TK, expert_TK)``."""
    probs_TE = torch.softmax(F.linear(x_TD.float(), gate_ED.float()), dim=-1)
    weight_TK, expert_TK = probs_TE.topk(k, dim=-1)
    return weight_TK / weight_TK.sum(-1, keepdim=True), expert_TK


def plain_experts(x_TD: Tensor, weight_TK: Tensor, expert_TK: Tensor, w13_EDF: Tensor, w2_EFD: Tensor,
                  activation: str) -> Tensor:
    """The experts as a user would write them with ``torch._grouped_mm``: sort the slots by expert,
    gather their rows, grouped GEMM, activation, grouped GEMM, times the routing weights, added
    back to the tokens."""
    K = expert_TK.shape[1]
    expert_N = expert_TK.reshape(-1)
    order_N = torch.argsort(expert_N, stable=True)
    counts_E = torch.zeros(w13_EDF.shape[0], dtype=torch.long, device=x_TD.device).index_add_(
        0, expert_N, torch.ones_like(expert_N))
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    token_N = order_N // K
    h_NF = torch._grouped_mm(x_TD[token_N], w13_EDF, offs=offsets_E)
    if activation == "swiglu":
        gate_NF, up_NF = h_NF.chunk(2, dim=-1)
        a_NF = F.silu(gate_NF) * up_NF
    else:
        a_NF = F.gelu(h_NF)
    y_ND = torch._grouped_mm(a_NF, w2_EFD, offs=offsets_E) * weight_TK.reshape(-1)[order_N, None].to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)


class PlainGroupedMM(nn.Module):
    """:func:`plain_route` then :func:`plain_experts`, on copies of a PiMoE layer's weights."""

    def __init__(self, layer: PiMoELayer):
        super().__init__()
        self.top_k, self.activation = layer.cfg.top_k, layer.cfg.activation
        self.gate_ED = nn.Parameter(layer.router.gate.weight.detach().clone().float())
        self.w13_EDF = nn.Parameter(layer.experts.w13_EDF2.detach().clone())
        self.w2_EFD = nn.Parameter(layer.experts.w2_EFD.detach().clone())

    def route(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        return plain_route(x_TD, self.gate_ED, self.top_k)

    def experts(self, x_TD: Tensor, weight_TK: Tensor, expert_TK: Tensor) -> Tensor:
        return plain_experts(x_TD, weight_TK, expert_TK, self.w13_EDF, self.w2_EFD, self.activation)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.experts(x_TD, *self.route(x_TD))


# -- peers from other projects --------------------------------------------------------------------


class ScatterMoEPeer(nn.Module):
    """ScatterMoE's ``MLP`` (GELU) or ``GLUMLP`` (SwiGLU) behind :func:`plain_route`, with a PiMoE
    layer's weights: ``ParallelExperts.weight`` is (E, out, in), our (E, in, out) transposed; its
    GLU computes ``activation(gates) * h`` from the first GEMM's halves ``[h | gates]``, so our
    ``[gate | up]`` becomes ``[up | gate]``."""

    def __init__(self, layer: PiMoELayer, mlp_classes: tuple[type, type]):
        super().__init__()
        mlp_cls, glu_cls = mlp_classes
        cfg = layer.cfg
        self.top_k = cfg.top_k
        if cfg.activation == "swiglu":
            self.mlp = glu_cls(cfg.hidden_size, cfg.expert_ffn_size, cfg.num_experts, cfg.top_k, activation=nn.SiLU())
        else:
            self.mlp = mlp_cls(cfg.hidden_size, cfg.expert_ffn_size, cfg.num_experts, cfg.top_k, activation=nn.GELU())
        w13_EDF = layer.experts.w13_EDF2.detach()
        if cfg.activation == "swiglu":
            gate_EDF, up_EDF = w13_EDF.chunk(2, dim=-1)
            w13_EDF = torch.cat([up_EDF, gate_EDF], dim=-1)
        self.mlp.to(device=w13_EDF.device, dtype=w13_EDF.dtype)
        with torch.no_grad():
            self.mlp.experts.weight.copy_(w13_EDF.transpose(1, 2))
            self.mlp.output_experts.weight.copy_(layer.experts.w2_EFD.detach().transpose(1, 2))
        self.gate_ED = nn.Parameter(layer.router.gate.weight.detach().clone().float())

    def experts(self, x_TD: Tensor, weight_TK: Tensor, expert_TK: Tensor) -> Tensor:
        return self.mlp(x_TD, weight_TK.to(x_TD.dtype), expert_TK)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.experts(x_TD, *plain_route(x_TD, self.gate_ED, self.top_k))


def import_scattermoe(peers_path: str | None) -> tuple[type, type]:
    """ScatterMoE's ``(MLP, GLUMLP)``, with ``peers_path`` (a folder holding ``scattermoe/``) first
    on ``sys.path``; ImportError (or whatever its import raises) when it cannot be imported."""
    if peers_path and peers_path not in sys.path:
        sys.path.insert(0, peers_path)
    from scattermoe.mlp import GLUMLP, MLP

    return MLP, GLUMLP


def hf_mixtral_block(layer: PiMoELayer, experts_impl: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers ``MixtralSparseMoeBlock`` of the layer's shapes holding its weights (the
    router's fp32 weight rounded to the block's dtype), in eval mode."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from ..interop.hf_import import to_hf

    cfg = layer.cfg
    hf_cfg = MixtralConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.expert_ffn_size,
                           num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, hidden_act="silu",
                           router_jitter_noise=0.0, experts_implementation=experts_impl)
    hf_cfg._experts_implementation = experts_impl  # transformers 4.x has no such argument (a no-op there)
    device = layer.experts.w13_EDF2.device
    with torch.device(device):
        block = MixtralSparseMoeBlock(hf_cfg)
    block.to(dtype=dtype or layer.experts.w13_EDF2.dtype)
    to_hf(layer, block)
    return block.eval()


def hf_forward(block: nn.Module, x_TD: Tensor) -> Tensor:
    """The block on (T, D) rows: transformers 5 returns the output, 4.x ``(output, router_logits)``."""
    out = block(x_TD[None])
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(x_TD.shape)


def hf_route(block: nn.Module, x_TD: Tensor) -> Tensor:
    """The experts the block's own router (in the block's dtype) picks: ``expert_TK``."""
    routed = block.gate(x_TD)
    if isinstance(routed, tuple) and len(routed) == 3:  # transformers 5: (logits, weights, indices)
        return routed[2]
    logits = routed[0] if isinstance(routed, tuple) else routed  # 4.x: a Linear's logits
    return torch.softmax(logits.float(), dim=-1).topk(block.top_k, dim=-1).indices


# -- timing ---------------------------------------------------------------------------------------


def time_each_call(run: Callable[[], object], device: torch.device, min_time: float, min_calls: int = 5,
                   max_calls: int = 500) -> list[float]:
    """Milliseconds of each of at least ``min_calls`` calls (until ``min_time`` seconds have been
    timed, at most ``max_calls``), each call timed by itself: on CUDA between two events with a
    sync after it, so host work the GPU cannot hide counts; the wall clock on the CPU."""
    times: list[float] = []
    total = 0.0
    while len(times) < min_calls or (total < min_time * 1e3 and len(times) < max_calls):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            run()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        total += ms
    return times


def make_step(forward: Callable[[Tensor], Tensor], x: Tensor, params: list[Tensor], backward: bool,
              seed: int = 1) -> Callable[[], None]:
    """One timed call: ``forward(x)`` in inference mode, or forward and backward of a fixed random
    output gradient (the input and every parameter get gradients; cleared before each call, so
    each call allocates them, also inside a CUDA graph)."""
    if not backward:
        def run() -> None:
            with torch.inference_mode():
                forward(x)
        return run
    x = x.detach().requires_grad_(True)
    grad = torch.randn(x.shape, generator=torch.Generator(device=x.device).manual_seed(seed),
                       device=x.device, dtype=x.dtype)
    params = [p for p in params if p.requires_grad]

    def run() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        forward(x).backward(grad)
    return run


@dataclass
class Result:
    """One implementation in one shape: its timed variants (e.g. eager and graph), accuracy, notes."""

    key: str
    runs: dict[str, Callable[[], None]] = field(default_factory=dict)
    rounds_ms: dict[str, list[float]] = field(default_factory=dict)
    error: float | None = None
    routing_differs: float | None = None  # share of tokens whose expert set differs from the reference's
    notes: list[str] = field(default_factory=list)
    reason: str | None = None  # why it was not measured (n/a)
    failed: bool = False

    @property
    def ms_by_variant(self) -> dict[str, float]:
        return {v: statistics.median(ms) for v, ms in self.rounds_ms.items() if ms}

    @property
    def best(self) -> tuple[str, float] | None:
        by_variant = self.ms_by_variant
        return min(by_variant.items(), key=lambda kv: kv[1]) if by_variant else None

    def to_dict(self) -> dict:
        best = self.best
        return {"available": self.reason is None, "reason": self.reason, "failed": self.failed,
                "ms": best[1] if best else None, "variant": best[0] if best else None,
                "ms_by_variant": self.ms_by_variant, "rounds_ms": self.rounds_ms, "rel_error": self.error,
                "routing_differs_share": self.routing_differs, "notes": self.notes}


def relative_error(out: Tensor, ref: Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def expert_sets_differ(a_TK: Tensor, b_TK: Tensor) -> float:
    """Share of tokens whose set of chosen experts differs."""
    if a_TK.numel() == 0:
        return 0.0
    return (a_TK.sort(-1).values != b_TK.sort(-1).values).any(-1).float().mean().item()


# -- one shape ------------------------------------------------------------------------------------


@dataclass
class Options:
    device: torch.device
    dtype: torch.dtype
    activation: str
    rounds: int
    min_time: float
    peers_path: str | None
    hf_experts: str
    cpu_compile: bool
    seed: int = 0


def _graphs(opts: Options) -> bool:
    return opts.device.type == "cuda"


def _attempt(result: Result, what: Callable[[], None]) -> None:
    """Run ``what`` (setting up or checking ``result``); a failure marks the implementation as
    failed, with the error as its reason, instead of ending the whole benchmark."""
    try:
        what()
    except Exception as e:  # noqa: BLE001 - reported in the table and the exit code
        result.failed = True
        result.reason = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        result.runs.clear()


def measure_shape(shape: Shape, backward: bool, opts: Options, log: Callable[[str], None]) -> dict:
    """Every implementation at one shape: timings, accuracy and routing checks."""
    device, dtype = opts.device, opts.dtype
    torch.manual_seed(opts.seed)
    cfg = MoEConfig(hidden_size=shape.hidden, num_experts=shape.experts, expert_ffn_size=shape.ffn,
                    top_k=shape.top_k, router="topk", activation=opts.activation)
    layer = PiMoELayer(cfg).to(device=device, dtype=dtype).eval()
    x_TD = torch.randn(shape.tokens, shape.hidden, device=device, dtype=dtype)
    grad_mode = contextlib.nullcontext if backward else torch.inference_mode
    x_in = x_TD.detach().requires_grad_(True) if backward else x_TD

    # The reference: an fp32 copy of the layer, per-expert loop; and its routing.
    reference = copy.deepcopy(layer).float()
    with torch.inference_mode():
        ref_out_TD, _ = reference(x_TD.float(), impl="loop")
        ref_routing = reference.router(x_TD.float())
        eager_routing = layer.router(x_TD)
    ref_weight_TK, ref_expert_TK = ref_routing.weight_TK, ref_routing.expert_TK
    del reference

    results = {key: Result(key) for key in IMPLS}

    # The dense bounds: eager, eager in a CUDA graph, compiled in a CUDA graph (the activation fused).
    def dense_runs(key: str, width: int, x_rows: Tensor) -> None:
        dense = FeedForward(shape.hidden, width, opts.activation).to(device=device, dtype=dtype)
        params = list(dense.parameters())
        runs = results[key].runs
        runs["eager"] = make_step(dense, x_rows, params, backward)
        compiled = torch.compile(dense, fullgraph=True, dynamic=False)
        if _graphs(opts):
            runs["graph"] = captured(make_step(dense, x_rows, params, backward))
            runs["compiled+graph"] = captured(make_step(compiled, x_rows, params, backward))
        elif opts.cpu_compile:
            runs["compiled"] = make_step(compiled, x_rows, params, backward)

    def setup_dense() -> None:
        dense_runs("dense", shape.ffn, x_TD.repeat_interleave(shape.top_k, dim=0))

    def setup_dense_wide() -> None:
        dense_runs("dense_wide", shape.top_k * shape.ffn, x_TD)

    # GEMM-only bound: the two grouped GEMMs on rows already sorted by expert, the real offsets.
    def setup_gemm() -> None:
        expert_N = eager_routing.expert_TK.reshape(-1)
        order_N = torch.argsort(expert_N, stable=True)
        counts_E = torch.bincount(expert_N, minlength=shape.experts)
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        w13 = layer.experts.w13_EDF2.detach().clone().requires_grad_(backward)
        w2 = layer.experts.w2_EFD.detach().clone().requires_grad_(backward)
        x_ND = x_TD[order_N // shape.top_k].detach().clone().requires_grad_(backward)
        a_NF = torch.randn(x_ND.shape[0], shape.ffn, device=device, dtype=dtype).requires_grad_(backward)
        grads = (torch.randn(x_ND.shape[0], w13.shape[2], device=device, dtype=dtype),
                 torch.randn_like(x_ND))

        def gemms() -> tuple[Tensor, Tensor]:
            return torch._grouped_mm(x_ND, w13, offs=offsets_E), torch._grouped_mm(a_NF, w2, offs=offsets_E)

        def make() -> Callable[[], None]:
            if not backward:
                def run() -> None:
                    with torch.inference_mode():
                        gemms()
                return run
            leaves = [w13, w2, x_ND, a_NF]

            def run() -> None:
                for t in leaves:
                    t.grad = None
                torch.autograd.backward(gemms(), grads)
            return run

        results["gemm"].runs["eager"] = make()
        if _graphs(opts):
            results["gemm"].runs["graph"] = captured(make())

    # plain grouped_mm peer
    def setup_plain() -> None:
        plain = PlainGroupedMM(layer)
        r = results["plain"]
        with grad_mode():
            r.error = relative_error(plain.experts(x_in, ref_weight_TK, ref_expert_TK), ref_out_TD)
        with torch.inference_mode():
            r.routing_differs = expert_sets_differ(plain.route(x_TD)[1], ref_expert_TK)
        r.runs["eager"] = make_step(plain, x_TD, list(plain.parameters()), backward)
        r.notes.append("error: its experts on the reference routing")

    # Hugging Face Mixtral
    def setup_hf() -> None:
        r = results["hf"]
        if opts.activation != "swiglu":
            r.reason = "Mixtral's experts are SwiGLU: run with --activation swiglu"
            return
        try:
            import transformers
            from transformers.models.mixtral import modeling_mixtral  # noqa: F401
        except ImportError as e:
            r.reason = f"transformers is not installed ({e})"
            return

        def setup() -> None:
            block = hf_mixtral_block(layer, opts.hf_experts)
            r.notes.append(f"transformers {transformers.__version__}, experts_implementation={opts.hf_experts}")
            fused = isinstance(getattr(block.experts, "gate_up_proj", None), Tensor)
            with grad_mode():
                if fused:  # transformers 5: the experts take (x, indices, weights)
                    r.error = relative_error(block.experts(x_in, ref_expert_TK, ref_weight_TK), ref_out_TD)
                    r.notes.append("error: its experts on the reference routing")
                out_TD = hf_forward(block, x_in)
            with torch.inference_mode():
                r.routing_differs = expert_sets_differ(hf_route(block, x_TD), ref_expert_TK)
                reference_block = hf_mixtral_block(layer, "eager", torch.float32)
                reference_block.load_state_dict({k: v.float() for k, v in block.state_dict().items()})
                block_error = relative_error(out_TD, hf_forward(reference_block, x_TD.float()))
                del reference_block
            r.notes.append(f"whole block vs its fp32 copy (the same bf16-rounded router weight): {block_error:.2e}")
            if r.error is None:
                r.error = block_error
            if dtype != torch.float32:
                r.notes.append(f"its router runs in {str(dtype).removeprefix('torch.')} (logits of the rounded "
                               f"weight): {r.routing_differs:.2%} of tokens get other experts than the fp32 "
                               f"reference's")
            r.runs["eager"] = make_step(lambda t: hf_forward(block, t), x_TD, list(block.parameters()), backward)

        _attempt(r, setup)

    # ScatterMoE
    def setup_scattermoe() -> None:
        r = results["scattermoe"]
        if device.type != "cuda":
            r.reason = "needs CUDA (Triton kernels)"
            return
        try:
            classes = import_scattermoe(opts.peers_path)
        except Exception as e:  # noqa: BLE001 - ImportError, or triton failing to import
            where = opts.peers_path or "sys.path (no --peers-path, no ./.peers)"
            r.reason = f"scattermoe cannot be imported from {where}: {type(e).__name__}: {e}"
            return

        def setup() -> None:
            peer = ScatterMoEPeer(layer, classes)
            with grad_mode():
                r.error = relative_error(peer.experts(x_in, ref_weight_TK, ref_expert_TK), ref_out_TD)
            r.notes.append("error: its experts on the reference routing")
            r.runs["eager"] = make_step(peer, x_TD, list(peer.parameters()), backward)

        _attempt(r, setup)

    # fulu-nas default: layer(x), eager, with statistics
    def setup_fulu() -> None:
        r = results["fulu"]
        with grad_mode():
            out_TD, _ = layer(x_in)
        r.error = relative_error(out_TD, ref_out_TD)
        r.routing_differs = expert_sets_differ(eager_routing.expert_TK, ref_expert_TK)
        r.notes.append("error: end to end (its own router)")
        r.runs["eager"] = make_step(lambda t: layer(t)[0], x_TD, list(layer.parameters()), backward)

    # fulu-nas best: compiled, no statistics, one CUDA graph
    compiled_routing: dict = {}

    def setup_fulu_best() -> None:
        r = results["fulu_best"]
        if device.type != "cuda" and not opts.cpu_compile:
            r.reason = "needs CUDA (a CUDA graph); --cpu-compile times the compiled layer without one"
            return

        def setup() -> None:
            compiled = torch.compile(layer, fullgraph=True, dynamic=False)

            def forward(t: Tensor) -> Tensor:
                return compiled(t, with_stats=False)[0]

            with grad_mode():
                r.error = relative_error(forward(x_in), ref_out_TD)
            r.notes.append("error: end to end (its own router, compiled)")
            step = make_step(forward, x_TD, list(layer.parameters()), backward)
            r.runs["graph" if _graphs(opts) else "compiled"] = captured(step) if _graphs(opts) else step
            # The experts the compiled router picks, against eager's.
            with torch.inference_mode():
                got_TK = torch.compile(layer.router, fullgraph=True, dynamic=False)(x_TD).expert_TK
            share = expert_sets_differ(got_TK, eager_routing.expert_TK)
            r.routing_differs = expert_sets_differ(got_TK, ref_expert_TK)
            compiled_routing.update(identical=share == 0.0, differs_share=share,
                                    differs_tokens=round(share * shape.tokens))

        _attempt(r, setup)

    for key, setup in (("dense", setup_dense), ("dense_wide", setup_dense_wide), ("gemm", setup_gemm),
                       ("plain", setup_plain), ("hf", setup_hf), ("scattermoe", setup_scattermoe),
                       ("fulu", setup_fulu), ("fulu_best", setup_fulu_best)):
        log(f"  {IMPLS[key]}: setting up")
        if key in ("dense", "dense_wide", "gemm", "plain", "fulu"):
            _attempt(results[key], setup)
        else:
            setup()

    # Warm-up, then the rounds: the implementations take turns.
    runs = [(r, variant, run) for r in results.values() for variant, run in r.runs.items()]
    for r, _, run in runs:
        try:
            for _ in range(3):
                run()
        except Exception as e:  # noqa: BLE001
            r.failed, r.reason = True, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            r.runs.clear()
    runs = [(r, variant, run) for r, variant, run in runs if r.runs]
    for round_ in range(opts.rounds):
        log(f"  round {round_ + 1}/{opts.rounds}")
        for r, variant, run in runs:
            ms = time_each_call(run, device, opts.min_time)
            r.rounds_ms.setdefault(variant, []).append(statistics.median(ms))

    out = {"shape": vars(shape) | {"activation": opts.activation, "backward": backward},
           "impls": {key: r.to_dict() for key, r in results.items()},
           "compiled_routing": compiled_routing or None,
           "eager_routing_differs_from_reference_share": results["fulu"].routing_differs}
    for d in out["impls"].values():
        if d["ms"]:
            for ratio, key in BOUND_RATIOS.items():
                bound_ms = out["impls"][key]["ms"]
                d[ratio] = bound_ms / d["ms"] if bound_ms else None
    return out


def measure_config(name: str, config: Config, opts: Options, log: Callable[[str], None]) -> dict:
    """A configuration: one shape, or two whose throughput ratio (first / second) is reported."""
    shapes = []
    for shape in config.shapes:
        log(f"{config.label}: {shape.describe()}{', forward + backward' if config.backward else ''}")
        torch._dynamo.reset()
        shapes.append(measure_shape(shape, config.backward, opts, log))
        gc.collect()  # the timed calls' closures hold each other: free their memory before the next shape
        if opts.device.type == "cuda":
            torch.cuda.empty_cache()
    out = {"name": name, "label": config.label, "backward": config.backward, "shapes": shapes}
    if len(shapes) == 2:
        out["ratio"] = {key: (shapes[1]["impls"][key]["ms"] / shapes[0]["impls"][key]["ms"]
                              if shapes[0]["impls"][key]["ms"] and shapes[1]["impls"][key]["ms"] else None)
                        for key in IMPLS}
    return out


# -- the tables -----------------------------------------------------------------------------------


def _na(d: dict) -> str:
    return "n/a" if not d["failed"] else "FAILED"


def _time_cell(d: dict) -> str:
    if d["ms"] is None:
        return _na(d)
    variant = f" {d['variant']}" if len(d["ms_by_variant"]) > 1 else ""
    ratios = "/".join(f"{d[k]:.2f}" if d.get(k) else "-" for k in BOUND_RATIOS)
    return f"{d['ms']:.3f} ms{variant} ({ratios})"


def format_tables(results: list[dict], opts: Options) -> str:
    """The timing table, the accuracy table, the routing checks and the reasons for each n/a."""
    head = ["config", *IMPLS.values()]
    time_rows, error_rows, notes, routing = [], [], {}, []
    for c in results:
        if "ratio" in c:
            cells = []
            for key in IMPLS:
                ratio = c["ratio"][key]
                first, second = (s["impls"][key] for s in c["shapes"])
                cells.append(f"{ratio:.2f} ({second['ms']:.3f} / {first['ms']:.3f} ms)" if ratio else _na(first))
            time_rows.append([c["label"], *cells])
        else:
            time_rows.append([c["label"], *(_time_cell(c["shapes"][0]["impls"][k]) for k in IMPLS)])
        for s in c["shapes"]:
            label = c["label"] if len(c["shapes"]) == 1 else f"{c['label'].split(' ')[0]} E={s['shape']['experts']}"
            impls = s["impls"]
            error_rows.append([label, *(f"{impls[k]['rel_error']:.2e}" if impls[k]["rel_error"] is not None
                                        else _na(impls[k]) for k in MOE_IMPLS)])
            for key, d in impls.items():
                if d["reason"]:
                    notes.setdefault(f"{IMPLS[key]}: {d['reason']}", []).append(label)
                for note in d["notes"]:
                    if not note.startswith("error:"):
                        notes.setdefault(f"{IMPLS[key]}: {note}", []).append(label)
            cr = s["compiled_routing"]
            eager_share = s["eager_routing_differs_from_reference_share"]
            line = f"- {label}: eager router vs the fp32 reference: " + (
                f"{eager_share:.3%} of tokens differ" if eager_share is not None else "n/a")
            if cr:
                line += ("; compiled router vs eager: identical expert sets" if cr["identical"] else
                         f"; compiled router vs eager: {cr['differs_tokens']} tokens "
                         f"({cr['differs_share']:.3%}) differ")
            else:
                line += "; compiled router: not run"
            routing.append(line)
    parts = [
        "Milliseconds per call (median over the rounds of each round's median), and in brackets the "
        "throughput relative to the dense ceiling / to the GEMM-only bound / to the wide dense FFN "
        "(1.00 = as fast). "
        "E-scaling: each implementation's throughput at the larger expert count over the smaller "
        "(in brackets: ms at the smaller / at the larger). "
        "Where two variants were timed, the faster counts (named).\n",
        markdown_table(head, time_rows, text_columns=1),
        "\nRelative error ||out - ref|| / ||ref|| against the fp32 per-expert loop (fp32 copy of the layer, "
        "impl=\"loop\"):\n",
        markdown_table(["config", *(IMPLS[k] for k in MOE_IMPLS)], error_rows, text_columns=1),
        "\nRouting (share of tokens whose expert set differs):\n",
        "\n".join(routing),
    ]
    if notes:
        parts += ["\nNotes:\n", "\n".join(f"- {note} ({', '.join(dict.fromkeys(where))})"
                                          for note, where in notes.items())]
    return "\n".join(parts)


# -- the command ----------------------------------------------------------------------------------


def _scaled(shape: Shape, scale: float) -> Shape:
    return Shape(max(1, math.ceil(shape.tokens * scale)), shape.hidden, shape.experts, shape.ffn, shape.top_k)


def selected_configs(names: list[str], quick: bool, tokens_scale: float) -> dict[str, Config]:
    out = {}
    for name in names:
        config = CONFIGS[name]
        shapes = QUICK[name] if quick else config.shapes
        if name not in LATENCY_CONFIGS:
            shapes = tuple(_scaled(s, tokens_scale) for s in shapes)
        label = config.label
        if len(shapes) == 2:
            label += f" E={shapes[0].experts} / E={shapes[1].experts}"
        out[name] = Config(label, shapes, config.backward)
    return out


def peers_main(args: argparse.Namespace) -> int:
    device = bench_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.tokens_scale <= 0:
        raise ValueError(f"--tokens-scale must be > 0, got {args.tokens_scale}")
    peers_path = args.peers_path
    if peers_path is None and Path(".peers").is_dir():
        peers_path = str(Path(".peers").resolve())
    elif peers_path is not None:
        peers_path = str(Path(peers_path).resolve())
    opts = Options(device=device, dtype=dtype, activation=args.activation, rounds=args.rounds,
                   min_time=args.min_time if args.min_time is not None else 0.01 if args.quick else 0.2,
                   peers_path=peers_path, hf_experts=args.hf_experts,
                   cpu_compile=args.cpu_compile, seed=args.seed)
    configs = selected_configs(list(dict.fromkeys(args.configs)), args.quick, args.tokens_scale)
    command = "fulu-nas bench " + shlex.join(getattr(args, "argv", None) or ["peers"])
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    def write_json(results: list[dict], complete: bool) -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device_name(device), "torch": torch.__version__, "dtype": str(dtype),
                           "activation": args.activation, "rounds": args.rounds, "min_time_s": opts.min_time,
                           "command": command, "impls": IMPLS, "peers_path": peers_path, "complete": complete,
                           "configs": results}, f, indent=2)

    results: list[dict] = []
    for name, config in configs.items():
        results.append(measure_config(name, config, opts, log))
        write_json(results, complete=False)  # what is measured survives an interrupted run
    header = (f"MoE layer implementations side by side: {device_name(device)}, torch {torch.__version__}, "
              f"{str(dtype).removeprefix('torch.')}, {args.activation}, {args.rounds} interleaved rounds\n"
              f"command: {command}\n")
    shapes = "\n".join(f"- {c.label}: " + "; ".join(s.describe() for s in c.shapes)
                       + (", forward + backward" if c.backward else ", forward (inference mode)")
                       for c in configs.values())
    print(header + "\n" + shapes + "\n\n" + format_tables(results, opts))
    write_json(results, complete=True)
    failed = sorted({IMPLS[k] for c in results for s in c["shapes"] for k, d in s["impls"].items() if d["failed"]})
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    """The ``peers`` subcommand."""
    p = sub.add_parser("peers", help="the PiMoE layer beside a plain grouped_mm MoE, Hugging Face Mixtral, "
                                     "ScatterMoE, a dense FFN and the GEMM-only bound",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS),
                   help="rows to measure (default: all)")
    p.add_argument("--activation", choices=("gelu", "swiglu"), default="gelu",
                   help="the experts' activation (the Hugging Face Mixtral column needs swiglu)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (seconds on a CPU): checks, not figures")
    p.add_argument("--tokens-scale", type=float, default=1.0,
                   help="multiply the token counts of the throughput rows (not the latency row)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--min-time", type=float,
                   help="seconds of timed calls per implementation and round, at least 5 calls (default 0.2; "
                        "0.01 with --quick)")
    p.add_argument("--peers-path", help="folder holding scattermoe/ (default: ./.peers if it exists)")
    p.add_argument("--hf-experts", choices=("grouped_mm", "eager", "batched_mm"), default="grouped_mm",
                   help="the Mixtral block's experts_implementation (transformers 5's default for models: "
                        "grouped_mm)")
    p.add_argument("--cpu-compile", action="store_true",
                   help="on the CPU, also time the compiled layer (no graph) and check its routing: "
                        "tens of seconds of compilation per shape")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.set_defaults(run=peers_main)
