"""The original spec's entry point: ``create_ultimate_pimoe_system(...)``.

A thin, honest wrapper around :class:`fulu_nas.moe.PiMoELayer`. Each keyword of the spec maps to a
real mechanism (see ``FEATURES`` and docs/system.md); every figure the system
reports is measured on the call that reports it (CPU memory: on one more, untimed, forward of the same
input; see ``UltimatePiMoESystem._memory``).
"""

from __future__ import annotations

import numbers
import operator
import statistics
import time
from dataclasses import fields
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from .checks import device_problem
from .deploy.cost import cpu_peak_bytes
from .deploy.cuda_graphs import GraphedForward
from .moe import MoEConfig, PiMoELayer
from .moe.stats import detached_stats


class RoutingStrategy(str, Enum):
    TOP_K = "topk"
    EXPERT_CHOICE = "expert_choice"
    HASH = "hash"
    HIERARCHICAL = "hierarchical"
    ATTENTION_BASED = "attention"


class OptimizationLevel(str, Enum):
    """How the experts are executed.

    BASIC: per-expert loop in fp32. ENHANCED: tokens sorted by expert, one matmul pair per expert.
    ADVANCED: grouped GEMM over the sorted tokens (bf16 on CUDA with hardware optimisation).
    EXTREME: ADVANCED plus ``torch.compile(fullgraph=True)``, and CUDA graphs for inference.
    """

    BASIC = "basic"
    ENHANCED = "enhanced"
    ADVANCED = "advanced"
    EXTREME = "extreme"


_IMPL = {OptimizationLevel.BASIC: "loop", OptimizationLevel.ENHANCED: "sorted",
         OptimizationLevel.ADVANCED: "grouped", OptimizationLevel.EXTREME: "grouped"}

# What each spec flag switches on (shown in info["system_stats"]["features"]).
FEATURES = {
    "dynamic_scaling": "top-p dynamic routing: each token takes as many experts (up to top_k) as "
                       "its probability mass needs (Huang et al. 2024)",
    "cross_expert_communication": "a shared expert seen by every token, gated per token "
                                  "(Qwen2-MoE)",
    "neural_architecture_search": "the architecture is recorded in search-space form in "
                                  "info['system_stats']['architecture'] (system.architecture()) so "
                                  "a search can start from it",
    "performance_optimization": "the optimisation level's dispatch (sorted / grouped GEMM) instead "
                                "of the per-expert loop",
    "adaptive_learning": "auxiliary-loss-free balancing: a selection bias that adapts to the "
                         "load after every optimizer step (system.update_after_step())",
    "hardware_optimization": "on CUDA: bf16 weights and activations at ADVANCED and EXTREME (the "
                             "grouped GEMM's tensor-core path) and TF32 for remaining fp32 matmuls; "
                             "on CPU fp32 is already the fast path",
}


def enum_member(enum: type[Enum], value: Enum | str, argument: str):
    """``value`` as a member of ``enum``: a member, or a member's value or name in any case
    (``"topk"``, ``"TOP_K"``), or ValueError naming ``argument`` and listing both."""
    wanted = value.value if isinstance(value, Enum) else value
    if isinstance(wanted, str):
        for member in enum:
            if wanted.lower() in (member.value.lower(), member.name.lower()):
                return member
    # Names first: the spec writes RoutingStrategy.TOP_K; the value is what a config file holds.
    choices = ", ".join(f"{m.name} ({m.value!r})" for m in enum)
    raise ValueError(f"{argument} must be one of {choices}, got {value!r}")


def flag_problems(flags: dict[str, Any], unset_allowed: tuple[str, ...] = ()) -> list[str]:
    """A message for each flag that is not a bool (nor None, for those of ``unset_allowed``): a string
    such as "false" is truthy, and would switch on what it names."""
    return [f"{name} must be true or false{' (or None)' if name in unset_allowed else ''}, got {value!r}"
            for name, value in flags.items()
            if not (isinstance(value, bool) or (value is None and name in unset_allowed))]


def _int_argument(value: Any, argument: str, minimum: int = 1) -> int:
    """``value`` as an int (any integer type but bool) of at least ``minimum`` (1: a size; 0: a
    count that may be zero), or ValueError naming ``argument``."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{argument} must be {kind}, got {value!r}")
    return number


def _fraction_argument(value: Any, argument: str) -> float:
    """``value`` as a float in (0, 1] (any real number but bool), or ValueError naming ``argument``."""
    number = None if isinstance(value, bool) or not isinstance(value, numbers.Real) else float(value)
    if number is None or not 0 < number <= 1:  # NaN fails the comparison too
        raise ValueError(f"{argument} must be a number in (0, 1], got {value!r}")
    return number


# The MoEConfig fields the spec's arguments set: an override of one would contradict its argument (a
# hash system with a top-k router, an ADVANCED system running the loop) or the features reported.
SET_BY_ARGUMENTS = {
    "router": "routing_strategy",
    "attention_context": "routing_strategy",
    "impl": "optimization_level and enable_performance_optimization",
    "top_p": "enable_dynamic_scaling and dynamic_top_p",
    "num_shared_experts": "enable_cross_expert_communication",
    "shared_expert_gate": "enable_cross_expert_communication",
    "bias_update_rate": "enable_adaptive_learning",
}


def _resolve_device(device: str | torch.device | int | None) -> torch.device:
    """``device`` (None: the CPU) as a device this machine has, or ValueError naming ``device``."""
    if device is None:
        return torch.device("cpu")
    if problem := device_problem(device, "device"):
        raise ValueError(problem)
    target = torch.device(device)
    if target.type == "meta":  # tensors without values: the first forward would fail inside torch
        raise ValueError(f"device: {device!r}: a meta device holds no values and cannot run a "
                         f"forward (use 'cpu' or 'cuda')")
    return target


def casts_to_bf16(device: torch.device, level: OptimizationLevel, hardware_optimization: bool) -> bool:
    """Whether hardware optimisation makes the system bf16: on CUDA, for the grouped GEMM's tensor-core
    path (ADVANCED, EXTREME) only; BASIC and ENHANCED stay fp32. The constructor and
    ``optimize_for_inference`` both ask, so a system is served in the dtype it was built in."""
    return (device.type == "cuda" and hardware_optimization
            and level in (OptimizationLevel.ADVANCED, OptimizationLevel.EXTREME))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_stat(t: Tensor) -> float | list[float]:
    return t.tolist() if t.dim() else float(t)


def _tokens(input_tensor: Tensor) -> int:
    """batch * seq of an input that is measured, or ValueError: a throughput of no tokens is no figure."""
    tokens = input_tensor.shape[0] * input_tensor.shape[1]
    if not tokens:
        raise ValueError(f"input_tensor has no tokens (shape {tuple(input_tensor.shape)}): there is "
                         f"nothing to measure")
    return tokens


class CompiledForward:
    """``torch.compile(layer, fullgraph=True)``, called with torch's recompile limit raised to
    :data:`RECOMPILE_LIMIT`. Every system's compiled forward is a compilation of the one
    ``PiMoELayer.forward``, and torch keeps 8 of them by default: the spec's five routers compared at
    EXTREME in one script (a training step and an evaluation each) failed on the fifth."""

    RECOMPILE_LIMIT = 256

    def __init__(self, layer: PiMoELayer):
        self.compiled = torch.compile(layer, fullgraph=True)

    def __call__(self, *args, **kwargs):
        limit = max(torch._dynamo.config.recompile_limit, self.RECOMPILE_LIMIT)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return self.compiled(*args, **kwargs)


class UltimatePiMoESystem(nn.Module):
    """A PiMoE layer plus the spec's conveniences: info, inference optimisation, benchmarking."""

    def __init__(self, config: MoEConfig, level: OptimizationLevel, features: dict[str, bool]):
        super().__init__()
        self.optimization_level = level
        self.features = features
        self.layer = PiMoELayer(config)
        self.last_stats: dict[str, Tensor] = {}
        self._set_runner("compiled" if level is OptimizationLevel.EXTREME else "eager")
        self._inference = False
        self._calls = 0
        # What optimize_for_inference switched off and train(True) restores: the training runner and
        # each parameter's requires_grad.
        self._training_runner = "eager"
        self._requires_grad_before_inference: dict[str, bool] = {}

    def __getstate__(self):
        # copy.deepcopy (a checkpoint or EMA copy mid-training) and pickling: the last statistics without the
        # graph of the call that made them, which a compiled call's plain dict holds
        return {**super().__getstate__(), "last_stats": detached_stats(self.last_stats)}

    @property
    def config(self) -> MoEConfig:
        """The layer's configuration (the layer's own: remapped experts change it)."""
        return self.layer.cfg

    def _set_runner(self, kind: str) -> None:
        """What runs the layer: ``eager`` (the layer itself), ``compiled`` or ``graphed`` (a CUDA-graph
        replay of the compiled form), made for the layer the system holds now. A plain attribute, not a
        submodule, so that the layer's parameters appear once (as ``layer.*``) in ``state_dict`` whatever
        the level."""
        layer = self.layer
        runner = {"eager": lambda: layer, "compiled": lambda: CompiledForward(layer),
                  "graphed": lambda: GraphedForward(CompiledForward(layer), module=layer,
                                                    capturable=layer.captures_in_cuda_graphs)}[kind]()
        object.__setattr__(self, "_runner", runner)
        object.__setattr__(self, "_runner_kind", kind)
        object.__setattr__(self, "_runner_layer", layer)

    def _current_runner(self):
        """The runner, made again for a layer assigned since (``system.layer = other``): the old one
        went on running the layer the system was built with."""
        if self._runner_layer is not self.layer:
            self._set_runner(self._runner_kind)
        return self._runner

    @property
    def device(self) -> torch.device:
        return next(self.layer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.layer.experts.parameters()).dtype

    def forward(self, input_tensor: Tensor, return_comprehensive_info: bool = False,
                token_ids: Tensor | None = None):
        self._check_input(input_tensor)
        if problems := flag_problems({"return_comprehensive_info": return_comprehensive_info}):
            raise ValueError(problems[0])
        x = input_tensor.to(self.dtype)
        if not return_comprehensive_info:
            return self._forward(x, token_ids).to(input_tensor.dtype)
        tokens = _tokens(input_tensor)
        device = self.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        out = self._forward(x, token_ids)
        _sync(device)
        elapsed = time.perf_counter() - start
        info = {
            "performance_metrics": {
                "latency_ms": elapsed * 1e3,
                "throughput_tokens_per_s": tokens / elapsed,
                "tokens": tokens,
                **self._memory(x, token_ids),
            },
            "routing_info": {
                "router": self.config.router,
                "num_experts": self.config.num_experts,
                "top_k": self.config.top_k,
                **{k: _host_stat(v.detach()) for k, v in self.last_stats.items()},
            },
            "system_stats": self.system_stats(),
        }
        return out.to(input_tensor.dtype), info

    def _check_input(self, input_tensor: Tensor) -> None:
        if not isinstance(input_tensor, Tensor):
            raise TypeError(f"input_tensor must be a torch.Tensor, got {type(input_tensor).__name__}")
        if not input_tensor.is_floating_point():
            # The output comes back in the input's dtype: integers would round it to zeros.
            raise TypeError(f"input_tensor must be a floating-point tensor (float32, float64, "
                            f"float16 or bfloat16), got {input_tensor.dtype}")
        if input_tensor.dim() != 3:
            raise ValueError(f"input_tensor must have rank 3 (batch, seq, hidden), got shape "
                             f"{tuple(input_tensor.shape)}")
        if input_tensor.shape[-1] != self.config.hidden_size:
            raise ValueError(f"input_tensor's last dimension must be hidden_size="
                             f"{self.config.hidden_size}, got {input_tensor.shape[-1]}")
        if input_tensor.device != self.device:  # else an error from deep inside the layer (autocast, a kernel)
            raise ValueError(f"input_tensor is on {input_tensor.device}, the system on {self.device}: move it with "
                             ".to(system.device)")

    def _forward(self, x: Tensor, token_ids: Tensor | None) -> Tensor:
        """One call of the system: its output, and its statistics kept as the last call's."""
        out, self.last_stats = self._run(x, token_ids)
        self._calls += 1  # after the run: a call the layer refuses is not one
        return out

    def _run(self, x: Tensor, token_ids: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The runner's output and statistics, nothing recorded (what a memory measurement runs)."""
        runner = self._current_runner()
        if self._inference:
            with torch.inference_mode():
                out, stats = runner(x, token_ids)
                # Out of CUDA-graph-owned memory, which the next call rewrites (the statistics stay
                # there: they are the last call's).
                return out.clone(), stats
        return runner(x, token_ids)

    def _memory(self, x: Tensor, token_ids: Tensor | None) -> dict[str, float]:
        """On CUDA the allocator's peak since the caller reset it (with a CUDA graph's activations). The CPU
        allocator keeps no peak: torch.profiler's allocation events give the tensor memory one more forward
        of ``x`` (in the same grad mode) allocates at its peak, as a search's trial measures it; not the
        call that is timed, which the profiler would slow down."""
        device = self.device
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            if isinstance(runner := self._current_runner(), GraphedForward):
                # A replay's activations were allocated at capture and are not in a replay's peak: what its
                # graph's pool holds, beside what is allocated. A call that captured has them in its peak.
                peak = max(peak, torch.cuda.memory_allocated(device) + runner.pool_held_bytes(x, token_ids))
            return {"peak_memory_mb": peak / 2**20}
        return {"forward_peak_memory_mb": cpu_peak_bytes(lambda: self._run(x, token_ids)) / 2**20}

    @property
    def balance_loss(self) -> Tensor:
        """The last forward's weighted auxiliary losses, to add to a training loss."""
        if "balance_loss" not in self.last_stats:
            raise RuntimeError("balance_loss is the last forward's, and no forward has run yet")
        return self.last_stats["balance_loss"]

    def update_after_step(self) -> None:
        """Call after each optimizer step: adapts the selection bias (adaptive learning)."""
        if self.last_stats:
            self.layer.update_expert_bias(self.last_stats["tokens_per_expert"])

    def system_stats(self) -> dict[str, Any]:
        return {
            "parameters": self.layer.parameter_counts(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "optimization_level": self.optimization_level.name,
            "impl": self.config.impl,
            "compiled": self._runner_kind != "eager",
            "cuda_graphs": runner.num_graphs if isinstance(runner := self._current_runner(), GraphedForward) else 0,
            "inference_optimized": self._inference,
            "features": {name: on for name, on in self.features.items()},
            "forward_calls": self._calls,
            # neural architecture search: the configuration in search-space form, in every report
            **({"architecture": self.architecture()} if self.features["neural_architecture_search"] else {}),
        }

    def architecture(self) -> dict[str, Any]:
        """The layer configuration as a plain dict (what a search space parameterises)."""
        return {"moe": self.config.to_dict(), "optimization_level": self.optimization_level.value}

    def optimize_for_inference(self) -> UltimatePiMoESystem:
        """Eval mode, no autograd; on CUDA ADVANCED and EXTREME in bf16 (hardware optimisation, as
        :func:`casts_to_bf16` decides at build time too), and for EXTREME the compiled
        forward replayed from one CUDA graph per input shape
        (:class:`~fulu_nas.deploy.cuda_graphs.GraphedForward`: less host work per call than
        cudagraph trees; each new input shape is compiled and captured once and keeps its graph's
        memory, so bucket variable sizes; a layer whose call syncs with the host, such as fp32
        experts on a GPU without torch's fp32 grouped kernel, runs compiled without a graph:
        :meth:`~fulu_nas.moe.PiMoELayer.captures_in_cuda_graphs`). ADVANCED runs the eager forward
        (the Triton experts on CUDA). On the CPU, ADVANCED and EXTREME both run the eager forward,
        whose experts take the CPU's paths (:mod:`fulu_nas.moe.cpu_stream` for few rows per expert, above that
        :mod:`fulu_nas.moe.cpu_packed`'s oneDNN for large experts, chunked grouped GEMMs for small
        ones): the oneDNN path alone was already faster than
        EXTREME's compiled forward (2 cores, 512 hidden, 8 experts: 7.7 vs 13.4 ms at 16 tokens,
        516 vs 678 ms at 4,096). ``train()`` undoes it (see :meth:`train`)."""
        if not self._inference:
            self._training_runner = self._runner_kind
            self._requires_grad_before_inference = {name: p.requires_grad for name, p in self.named_parameters()}
        self.eval()
        self.requires_grad_(False)
        cuda = self.device.type == "cuda"
        if casts_to_bf16(self.device, self.optimization_level, self.features["hardware_optimization"]):
            self.to(torch.bfloat16)
        if cuda and self.optimization_level is OptimizationLevel.EXTREME:
            self._set_runner("graphed")
        elif self.optimization_level in (OptimizationLevel.ADVANCED, OptimizationLevel.EXTREME):
            self._set_runner("eager")
        self._inference = True
        return self

    def train(self, mode: bool = True) -> UltimatePiMoESystem:
        """``nn.Module.train``; ``train(True)`` after :meth:`optimize_for_inference` also leaves
        inference: forwards run with autograd again, through the runner they had before (not a CUDA
        graph), and each parameter's ``requires_grad`` is restored. A bf16 cast on CUDA stays."""
        if not isinstance(mode, bool):  # before anything changes (nn.Module's own check comes after)
            raise ValueError("training mode is expected to be boolean")
        if mode and self._inference:
            self._leave_inference()
        return super().train(mode)

    def _leave_inference(self) -> None:
        """Undo :meth:`optimize_for_inference`'s switches (see :meth:`train`)."""
        for name, p in self.named_parameters():
            p.requires_grad_(self._requires_grad_before_inference[name])
        self._set_runner(self._training_runner)
        self._inference = False

    @torch.no_grad()
    def benchmark_system(self, input_tensor: Tensor, num_iterations: int = 100,
                         warmup: int = 10) -> dict[str, float]:
        """Time ``num_iterations`` forwards after ``warmup`` (seconds; tokens = batch * seq), and the
        peak memory (see :meth:`_memory`: on CUDA over the timed forwards, on the CPU of one more)."""
        num_iterations = _int_argument(num_iterations, "num_iterations")
        warmup = _int_argument(warmup, "warmup", minimum=0)
        self._check_input(input_tensor)
        tokens = _tokens(input_tensor)
        device = self.device
        for _ in range(warmup):
            self(input_tensor)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(num_iterations):
            _sync(device)
            start = time.perf_counter()
            self(input_tensor)
            _sync(device)
            times.append(time.perf_counter() - start)
        average = statistics.fmean(times)
        return {
            "average_time": average,
            "median_time": statistics.median(times),
            "min_time": min(times),
            "max_time": max(times),
            "throughput": tokens / average,
            "tokens": tokens,
            "num_iterations": num_iterations,
            **self._memory(input_tensor.to(self.dtype), None),
        }


def create_ultimate_pimoe_system(
    hidden_size: int = 512,
    num_experts: int = 8,
    routing_strategy: RoutingStrategy | str = RoutingStrategy.TOP_K,
    optimization_level: OptimizationLevel | str = OptimizationLevel.ADVANCED,
    enable_all_features: bool = False,
    *,
    top_k: int = 2,
    expert_ffn_size: int | None = None,
    attention_heads: int = 8,
    hierarchy_depth: int = 2,
    dynamic_top_p: float = 0.5,
    enable_dynamic_scaling: bool | None = None,
    enable_cross_expert_communication: bool | None = None,
    enable_neural_architecture_search: bool | None = None,
    enable_performance_optimization: bool = True,
    enable_adaptive_learning: bool | None = None,
    enable_hardware_optimization: bool | None = None,
    device: str | torch.device | None = None,
    **moe_overrides: Any,
) -> UltimatePiMoESystem:
    """Build a PiMoE system. Flags left as ``None`` follow ``enable_all_features``.

    ``expert_ffn_size`` defaults to ``4 * hidden_size``; any other :class:`MoEConfig` field can be
    passed through ``moe_overrides``. Impossible input raises ``ValueError`` naming the argument (a
    flag that is neither a bool nor, where it follows ``enable_all_features``, None, among them).
    """
    follows_all_features = dict(enable_dynamic_scaling=enable_dynamic_scaling,
                                enable_cross_expert_communication=enable_cross_expert_communication,
                                enable_neural_architecture_search=enable_neural_architecture_search,
                                enable_adaptive_learning=enable_adaptive_learning,
                                enable_hardware_optimization=enable_hardware_optimization)
    if problems := flag_problems(dict(enable_all_features=enable_all_features,
                                       enable_performance_optimization=enable_performance_optimization,
                                       **follows_all_features), unset_allowed=tuple(follows_all_features)):
        raise ValueError("; ".join(problems))
    strategy = enum_member(RoutingStrategy, routing_strategy, "routing_strategy")
    level = enum_member(OptimizationLevel, optimization_level, "optimization_level")
    hidden_size = _int_argument(hidden_size, "hidden_size")
    num_experts = _int_argument(num_experts, "num_experts")
    top_k = _int_argument(top_k, "top_k")
    if expert_ffn_size is not None:
        expert_ffn_size = _int_argument(expert_ffn_size, "expert_ffn_size")
    attention_heads = _int_argument(attention_heads, "attention_heads")
    hierarchy_depth = _int_argument(hierarchy_depth, "hierarchy_depth")
    dynamic_top_p = _fraction_argument(dynamic_top_p, "dynamic_top_p")
    unknown = sorted(set(moe_overrides) - {f.name for f in fields(MoEConfig)})
    if unknown:
        raise ValueError(f"unknown keyword(s) {', '.join(unknown)}: neither an argument of "
                         f"create_ultimate_pimoe_system nor a MoEConfig field")
    if conflicting := sorted(SET_BY_ARGUMENTS.keys() & moe_overrides.keys()):
        raise ValueError("; ".join(f"{field} is set by {SET_BY_ARGUMENTS[field]}" for field in conflicting)
                         + ": pass those arguments, not MoEConfig overrides")
    target = _resolve_device(device)
    # Expert choice reads top_k as a capacity (each expert takes top_k * tokens / num_experts
    # tokens), which may exceed num_experts.
    if top_k > num_experts and strategy is not RoutingStrategy.EXPERT_CHOICE:
        raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
    if strategy is RoutingStrategy.ATTENTION_BASED and hidden_size % attention_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by attention_heads "
                         f"({attention_heads})")

    def flag(value: bool | None) -> bool:
        return enable_all_features if value is None else value

    features = {
        "dynamic_scaling": flag(enable_dynamic_scaling),
        "cross_expert_communication": flag(enable_cross_expert_communication),
        "neural_architecture_search": flag(enable_neural_architecture_search),
        "performance_optimization": enable_performance_optimization,
        "adaptive_learning": flag(enable_adaptive_learning),
        "hardware_optimization": flag(enable_hardware_optimization),
    }
    score_based = strategy in (RoutingStrategy.TOP_K, RoutingStrategy.HIERARCHICAL,
                               RoutingStrategy.ATTENTION_BASED)
    # Dynamic top-p and the adaptive bias need per-expert scores; expert choice is dynamic by
    # construction and hash routing is fixed, so for those the flags have nothing to switch.
    # Top-p keeps a token's one slot whatever its mass: with top_k=1 it selects nothing.
    features["dynamic_scaling"] &= score_based and top_k > 1
    features["adaptive_learning"] &= score_based
    kw: dict[str, Any] = dict(
        hidden_size=hidden_size, num_experts=num_experts, top_k=top_k,
        expert_ffn_size=4 * hidden_size if expert_ffn_size is None else expert_ffn_size, router=strategy.value,
        impl=_IMPL[level] if enable_performance_optimization else "loop",
    )
    if strategy is RoutingStrategy.ATTENTION_BASED:
        kw.update(attention_heads=attention_heads, attention_context=True)
    if strategy is RoutingStrategy.HIERARCHICAL:
        kw["hierarchy_depth"] = hierarchy_depth
    if features["dynamic_scaling"]:
        kw["top_p"] = dynamic_top_p
    if features["cross_expert_communication"]:
        kw.update(num_shared_experts=1, shared_expert_gate=True)
    if features["adaptive_learning"]:
        kw["bias_update_rate"] = 1e-3
    kw.update(moe_overrides)
    system = UltimatePiMoESystem(MoEConfig(**kw), level, features)
    system.to(target)
    if target.type == "cuda" and features["hardware_optimization"]:
        torch.backends.cuda.matmul.allow_tf32 = True
    if casts_to_bf16(target, level, features["hardware_optimization"]):
        system.to(torch.bfloat16)
    return system
