"""One configuration of ``bench peers`` measured: every implementation set up on the same layer's
weights, checked against an fp32 reference, then timed in interleaved rounds."""

from __future__ import annotations

import contextlib
import copy
import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...moe import FeedForward, MoEConfig, PiMoELayer
from ..common import captured, round_median
from .configs import BOUND_RATIOS, IMPLS, Config, Shape
from .implementations import PlainGroupedMM, ScatterMoEPeer, hf_forward, hf_mixtral_block, hf_route, import_scattermoe
from .timing import make_step, time_each_call


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
        return {v: round_median(ms) for v, ms in self.rounds_ms.items() if ms}

    @property
    def best(self) -> tuple[str, float] | None:
        by_variant = self.ms_by_variant
        return min(by_variant.items(), key=lambda kv: kv[1]) if by_variant else None

    def fail(self, e: Exception) -> None:
        """Mark the implementation failed, with the error as its reason; nothing of it is timed."""
        self.failed = True
        self.reason = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        self.runs.clear()

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

    @property
    def graphs(self) -> bool:
        """Whether calls are also timed replayed from a CUDA graph."""
        return self.device.type == "cuda"


class ShapeBench:
    """Every implementation at one shape. A method per implementation sets it up (its timed runs,
    its error against the fp32 per-expert loop, its routing checks) or says why it cannot run here;
    :meth:`measure` sets them all up, then times them in interleaved rounds."""

    def __init__(self, shape: Shape, backward: bool, opts: Options):
        self.shape, self.backward, self.opts = shape, backward, opts
        device, dtype = opts.device, opts.dtype
        torch.manual_seed(opts.seed)
        cfg = MoEConfig(hidden_size=shape.hidden, num_experts=shape.experts, expert_ffn_size=shape.ffn,
                        top_k=shape.top_k, router="topk", activation=opts.activation)
        self.layer = PiMoELayer(cfg).to(device=device, dtype=dtype).eval()
        self.x_TD = torch.randn(shape.tokens, shape.hidden, device=device, dtype=dtype)
        # Accuracy checks run under the timed calls' grad mode, on an input that takes a gradient
        # when they do.
        self.grad_mode = contextlib.nullcontext if backward else torch.inference_mode
        self.x_in = self.x_TD.detach().requires_grad_(True) if backward else self.x_TD

        # The reference: an fp32 copy of the layer, per-expert loop; and its routing.
        reference = copy.deepcopy(self.layer).float()
        with torch.no_grad():  # not inference tensors: the peers save the routing for their backward
            self.ref_out_TD, _ = reference(self.x_TD.float(), impl="loop")
            ref_routing = reference.router(self.x_TD.float())
            self.eager_routing = self.layer.router(self.x_TD)
        self.ref_weight_TK, self.ref_expert_TK = ref_routing.weight_TK, ref_routing.expert_TK
        self.results = {key: Result(key) for key in IMPLS}
        self.compiled_routing: dict = {}

    # -- the bounds ------------------------------------------------------------------------------

    def _dense_runs(self, key: str, width: int, x_rows: Tensor) -> None:
        """A dense FFN of ``width`` over ``x_rows``: eager, eager in a CUDA graph, and compiled (the
        activation fused) in a CUDA graph."""
        opts = self.opts
        dense = FeedForward(self.shape.hidden, width, opts.activation).to(device=opts.device, dtype=opts.dtype)
        params = list(dense.parameters())
        runs = self.results[key].runs
        runs["eager"] = make_step(dense, x_rows, params, self.backward)
        compiled = torch.compile(dense, fullgraph=True, dynamic=False)
        if opts.graphs:
            runs["graph"] = captured(make_step(dense, x_rows, params, self.backward))
            runs["compiled+graph"] = captured(make_step(compiled, x_rows, params, self.backward))
        elif opts.cpu_compile:
            runs["compiled"] = make_step(compiled, x_rows, params, self.backward)

    def dense(self) -> None:
        """The dense ceiling: width F over each token's row k times."""
        self._dense_runs("dense", self.shape.ffn, self.x_TD.repeat_interleave(self.shape.top_k, dim=0))

    def dense_wide(self) -> None:
        """The wide dense FFN: width k*F over the T tokens."""
        self._dense_runs("dense_wide", self.shape.top_k * self.shape.ffn, self.x_TD)

    def gemm(self) -> None:
        """The GEMM-only bound: the two grouped GEMMs on rows already sorted by expert, the real
        routing's offsets."""
        shape, opts, backward = self.shape, self.opts, self.backward
        experts = self.layer.experts
        expert_N = self.eager_routing.expert_TK.reshape(-1)
        order_N = torch.argsort(expert_N, stable=True)
        offsets_E = torch.bincount(expert_N, minlength=shape.experts).cumsum(0).to(torch.int32)
        w13 = experts.w13_EDF2.detach().clone().requires_grad_(backward)
        w2 = experts.w2_EFD.detach().clone().requires_grad_(backward)
        x_ND = self.x_TD[order_N // shape.top_k].detach().clone().requires_grad_(backward)
        a_NF = torch.randn(x_ND.shape[0], shape.ffn, device=opts.device, dtype=opts.dtype).requires_grad_(backward)
        grads = (torch.randn(x_ND.shape[0], w13.shape[2], device=opts.device, dtype=opts.dtype),
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

        self.results["gemm"].runs["eager"] = make()
        if opts.graphs:
            self.results["gemm"].runs["graph"] = captured(make())

    # -- the peers -------------------------------------------------------------------------------

    def plain(self) -> None:
        plain = PlainGroupedMM(self.layer)
        r = self.results["plain"]
        with self.grad_mode():
            r.error = relative_error(plain.experts(self.x_in, self.ref_weight_TK, self.ref_expert_TK), self.ref_out_TD)
        with torch.inference_mode():
            r.routing_differs = expert_sets_differ(plain.route(self.x_TD)[1], self.ref_expert_TK)
        r.runs["eager"] = make_step(plain, self.x_TD, list(plain.parameters()), self.backward)
        r.notes.append("error: its experts on the reference routing")

    def hf(self) -> None:
        """Hugging Face Mixtral (SwiGLU only), its experts fed the reference routing where they take
        it; its own router's choices counted."""
        r, opts = self.results["hf"], self.opts
        if opts.activation != "swiglu":
            r.reason = "Mixtral's experts are SwiGLU: run with --activation swiglu"
            return
        try:
            import transformers
            from transformers.models.mixtral import modeling_mixtral  # noqa: F401
        except ImportError as e:
            r.reason = f"transformers is not installed ({e})"
            return
        block = hf_mixtral_block(self.layer, opts.hf_experts)
        r.notes.append(f"transformers {transformers.__version__}, experts_implementation={opts.hf_experts}")
        fused = isinstance(getattr(block.experts, "gate_up_proj", None), Tensor)
        with self.grad_mode():
            if fused:  # transformers 5: the experts take (x, indices, weights)
                r.error = relative_error(block.experts(self.x_in, self.ref_expert_TK, self.ref_weight_TK),
                                         self.ref_out_TD)
                r.notes.append("error: its experts on the reference routing")
            out_TD = hf_forward(block, self.x_in)
        with torch.inference_mode():
            r.routing_differs = expert_sets_differ(hf_route(block, self.x_TD), self.ref_expert_TK)
            reference_block = hf_mixtral_block(self.layer, "eager", torch.float32)
            reference_block.load_state_dict({k: v.float() for k, v in block.state_dict().items()})
            block_error = relative_error(out_TD, hf_forward(reference_block, self.x_TD.float()))
            del reference_block
        r.notes.append(f"whole block vs its fp32 copy (the same bf16-rounded router weight): {block_error:.2e}")
        if r.error is None:
            r.error = block_error
        if opts.dtype != torch.float32:
            r.notes.append(f"its router runs in {str(opts.dtype).removeprefix('torch.')} (logits of the rounded "
                           f"weight): {r.routing_differs:.2%} of tokens get other experts than the fp32 "
                           f"reference's")
        r.runs["eager"] = make_step(lambda t: hf_forward(block, t), self.x_TD, list(block.parameters()),
                                    self.backward)

    def scattermoe(self) -> None:
        """ScatterMoE (CUDA), from ``--peers-path``."""
        r, opts = self.results["scattermoe"], self.opts
        if opts.device.type != "cuda":
            r.reason = "needs CUDA (Triton kernels)"
            return
        try:
            classes = import_scattermoe(opts.peers_path)
        except Exception as e:  # noqa: BLE001 - ImportError, or triton failing to import
            where = opts.peers_path or "sys.path (no --peers-path, no ./.peers)"
            r.reason = f"scattermoe cannot be imported from {where}: {type(e).__name__}: {e}"
            return
        peer = ScatterMoEPeer(self.layer, classes)
        with self.grad_mode():
            r.error = relative_error(peer.experts(self.x_in, self.ref_weight_TK, self.ref_expert_TK), self.ref_out_TD)
        r.notes.append("error: its experts on the reference routing")
        r.runs["eager"] = make_step(peer, self.x_TD, list(peer.parameters()), self.backward)

    # -- fulu-nas --------------------------------------------------------------------------------

    def fulu(self) -> None:
        """The default call: ``layer(x)``, eager, with statistics."""
        r, layer = self.results["fulu"], self.layer
        with self.grad_mode():
            out_TD, _ = layer(self.x_in)
        r.error = relative_error(out_TD, self.ref_out_TD)
        r.routing_differs = expert_sets_differ(self.eager_routing.expert_TK, self.ref_expert_TK)
        r.notes.append("error: end to end (its own router)")
        r.runs["eager"] = make_step(lambda t: layer(t)[0], self.x_TD, list(layer.parameters()), self.backward)

    def fulu_best(self) -> None:
        """The best path: compiled, no statistics, one CUDA graph; and the experts its compiled
        router picks against the eager router's."""
        r, opts, layer = self.results["fulu_best"], self.opts, self.layer
        if opts.device.type != "cuda" and not opts.cpu_compile:
            r.reason = "needs CUDA (a CUDA graph); --cpu-compile times the compiled layer without one"
            return
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)

        def forward(t: Tensor) -> Tensor:
            return compiled(t, with_stats=False)[0]

        with self.grad_mode():
            r.error = relative_error(forward(self.x_in), self.ref_out_TD)
        r.notes.append("error: end to end (its own router, compiled)")
        step = make_step(forward, self.x_TD, list(layer.parameters()), self.backward)
        r.runs["graph" if opts.graphs else "compiled"] = captured(step) if opts.graphs else step
        with torch.inference_mode():
            got_TK = torch.compile(layer.router, fullgraph=True, dynamic=False)(self.x_TD).expert_TK
        share = expert_sets_differ(got_TK, self.eager_routing.expert_TK)
        r.routing_differs = expert_sets_differ(got_TK, self.ref_expert_TK)
        self.compiled_routing.update(identical=share == 0.0, differs_share=share,
                                     differs_tokens=round(share * self.shape.tokens))

    # -- the measurement -------------------------------------------------------------------------

    def measure(self, log: Callable[[str], None]) -> dict:
        """Set every implementation up (a failure fails that one, not the benchmark), warm each up,
        time them in turns for ``rounds`` rounds; the figures as a dict."""
        for key, r in self.results.items():
            log(f"  {IMPLS[key]}: setting up")
            try:
                getattr(self, key)()
            except Exception as e:  # noqa: BLE001 - reported in the table and the exit code
                r.fail(e)
        runs = [(r, variant, run) for r in self.results.values() for variant, run in r.runs.items()]
        for r, _, run in runs:
            try:
                for _ in range(3):
                    run()
            except Exception as e:  # noqa: BLE001
                r.fail(e)
        runs = [(r, variant, run) for r, variant, run in runs if r.runs]
        for round_ in range(self.opts.rounds):
            log(f"  round {round_ + 1}/{self.opts.rounds}")
            for r, variant, run in runs:
                ms = time_each_call(run, self.opts.device, self.opts.min_time)
                r.rounds_ms.setdefault(variant, []).append(statistics.median(ms))

        out = {"shape": vars(self.shape) | {"activation": self.opts.activation, "backward": self.backward},
               "impls": {key: r.to_dict() for key, r in self.results.items()},
               "compiled_routing": self.compiled_routing or None,
               "eager_routing_differs_from_reference_share": self.results["fulu"].routing_differs}
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
        shapes.append(ShapeBench(shape, config.backward, opts).measure(log))
        gc.collect()  # the timed calls' closures hold each other: free their memory before the next shape
        if opts.device.type == "cuda":
            torch.cuda.empty_cache()
    out = {"name": name, "label": config.label, "backward": config.backward, "shapes": shapes}
    if len(shapes) == 2:
        out["ratio"] = {key: (shapes[1]["impls"][key]["ms"] / shapes[0]["impls"][key]["ms"]
                              if shapes[0]["impls"][key]["ms"] and shapes[1]["impls"][key]["ms"] else None)
                        for key in IMPLS}
    return out
