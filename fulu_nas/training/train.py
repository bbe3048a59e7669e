"""Training: AdamW, warm-up + cosine schedule over a step or wall-clock budget, gradient clipping,
bf16 autocast on CUDA, the MoE balancing losses and bias updates, divergence detection, progress.

The schedule runs on *progress* = max(step / steps, elapsed / max_seconds), so a wall-clock
budget gets a complete warm-up and decay just as a step budget does. A step budget alone makes
the result a function of the steps, not of the machine's speed or load: that is what a search
compares architectures by. ``seconds_cap`` is a safety stop for such a budget: the schedule never
looks at it, and a training that reaches it raises :class:`BudgetCapReached` instead of returning a
shorter, load-dependent result.

Under ``torchrun`` (an initialised ``torch.distributed`` group of more than one rank, the model's
MoE layers made expert-parallel with :func:`fulu_nas.training.distributed.expert_parallel`) the same
``train`` is data + expert parallel: every rank draws its own stream of ``batch_size`` sequences
(seed ``seed + rank``: ``batch_size`` is per rank), the replicated gradients are averaged and the
clipping norm is the whole model's (:mod:`fulu_nas.training.distributed`), and every decision that could
split the ranks is taken on global values: the loss is the mean over ranks (reports, divergence),
the wall clock is the slowest rank's (schedule, time budget). Only rank 0 shows progress and calls
``callback``; when it raises, every rank stops (the others raise :class:`StoppedByRankZero`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..checks import check_int, check_number, device_problem
from ..errors import FuluConfigError
from ..models import PiMoETransformer
from ..moe import PiMoELayer
from ..tasks import IGNORE, Batch, Task
from .dynamic_experts import DynamicExperts, DynamicExpertsConfig, check_dynamic_experts
from .layer_norm import thread_invariant_layer_norms
from .model_task import model_task_problem


class StoppedByRankZero(RuntimeError):
    """Distributed training: rank 0's callback raised (e.g. to prune), so this rank stops too."""


class BudgetCapReached(RuntimeError):
    """Training passed ``seconds_cap`` before its step budget ran out."""

    def __init__(self, step: int, steps: int, seconds: float, cap: float):
        self.step, self.steps, self.seconds, self.cap = step, steps, seconds, cap
        super().__init__(f"safety cap of {cap:g} s reached after {step} of {steps} steps ({seconds:.1f} s)")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exploded; carries the step and the value."""

    def __init__(self, step: int, value: float, reason: str):
        self.step, self.value, self.reason = step, value, reason
        super().__init__(f"training diverged at step {step}: loss {value} ({reason})")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    max_seconds: float | None = None
    seconds_cap: float | None = None
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    gradient_checkpointing: bool = False
    report_every: int = 25
    divergence_factor: float = 10.0
    progress: bool = True
    dynamic_experts: DynamicExpertsConfig | None = None
    # Devices (ranks) per trial in a search: expert-parallel training under a torchrun-style launch
    # (read by the search; ``train`` follows the process group it finds, see the module doc).
    expert_parallel: int = 1
    # The training step: "compiled" (every block through torch.compile), "eager", or "auto" (see
    # :func:`step_kind`). Either gives the same model up to floating-point rounding.
    compile: str = "auto"
    # Replay the training step from one CUDA graph (:func:`uses_cuda_graph`): "auto" (wherever the step
    # can be captured), True or False.
    cuda_graph: bool | str = "auto"
    # Train with deterministic algorithms only (:func:`deterministic_training`): the same architecture,
    # seed and steps give bit-identical weights from run to run and worker to worker (on the CPU with any
    # thread count, with ``MKL_CBWR`` set in ``fulu_nas/__init__`` for the GEMMs' rounding).
    deterministic: bool = True

    def __post_init__(self) -> None:
        problems = config_problems({f.name: getattr(self, f.name) for f in fields(self)})
        if problems:  # a negative grad_clip, say, trained uphill without a word
            raise FuluConfigError(problems)


# Seeds reach numpy (the search's samplers), whose seeds are 32-bit.
SEED_MAX = 2**32 - 1
# The numbers of a TrainConfig: finite, within (low, high, whether low itself is excluded); the time
# limits may also be None (no limit). grad_clip 0 turns clipping off. Integers: (low, high or None).
NUMBER_BOUNDS = {"lr": (0, math.inf, True), "max_seconds": (0, math.inf, True), "seconds_cap": (0, math.inf, True),
                 "grad_clip": (0, math.inf, False), "weight_decay": (0, math.inf, False),
                 "warmup_fraction": (0, 1, False), "min_lr_ratio": (0, 1, False),
                 "divergence_factor": (1, math.inf, True)}
INT_BOUNDS = {"steps": (1, None), "batch_size": (1, None), "report_every": (1, None), "expert_parallel": (1, None),
              "seed": (0, SEED_MAX)}


def config_problems(values: Mapping[str, object], prefix: str = "") -> list[str]:
    """What is wrong with ``values`` (some or all of a TrainConfig's fields), each problem naming its
    key (``prefix`` + field: ``trainer.`` in a search's settings)."""
    problems: list[str] = []
    for key, bounds in INT_BOUNDS.items():
        if key in values:
            check_int(prefix + key, values[key], problems, *bounds)
    for key, bounds in NUMBER_BOUNDS.items():
        if key in values and not (key in ("max_seconds", "seconds_cap") and values[key] is None):
            check_number(prefix + key, values[key], problems, *bounds)
    for key in ("gradient_checkpointing", "deterministic", "progress"):
        if not isinstance(values.get(key, False), bool):
            problems.append(f"{prefix}{key}: expected true or false, got {values[key]!r}")
    if values.get("compile", "auto") not in ("auto", "compiled", "eager"):
        problems.append(f"{prefix}compile: expected auto, compiled or eager, got {values['compile']!r}")
    if not (values.get("cuda_graph", "auto") == "auto" or isinstance(values["cuda_graph"], bool)):  # 1 == True
        problems.append(f"{prefix}cuda_graph: expected auto, true or false, got {values['cuda_graph']!r}")
    dynamic = values.get("dynamic_experts")
    if dynamic is not None and not isinstance(dynamic, DynamicExpertsConfig):
        problems.append(f"{prefix}dynamic_experts: expected None or a DynamicExpertsConfig, got {dynamic!r}")
    ranks = values.get("expert_parallel", 1)
    if dynamic is not None and isinstance(ranks, int) and not isinstance(ranks, bool) and ranks > 1:
        problems.append(f"{prefix}dynamic_experts: not supported with expert_parallel={ranks} (the expert count is "
                        "fixed by the split over the ranks); take expert_parallel=1 or no dynamic_experts")
    if problem := device_setting_problem(values.get("device", "auto"), prefix + "device"):
        problems.append(problem)
    return problems


# auto, cpu, cuda or cuda:N, N written as torch reads it (no sign, no leading zero: "cuda:01" is no device).
_DEVICE_SETTING = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]*))?")


def device_setting_problem(device: object, key: str = "device") -> str | None:
    """Why ``device`` is no device setting (None: it is one). Whether this machine has that GPU is asked
    when training starts (:func:`resolve_device`): a config may be made for another machine."""
    if isinstance(device, str) and _DEVICE_SETTING.fullmatch(device):
        return None
    return f"{key}: expected auto, cpu, cuda or cuda:N, got {device!r}"


@dataclass
class StepReport:
    """What the callback receives every ``report_every`` steps (host values)."""

    step: int
    loss: float
    lr: float
    elapsed: float
    layers: list[dict[str, float | list[float]]]
    # Percent of the last sampling period (1/6 s to 1 s) in which a kernel ran on the training GPU (NVML,
    # as nvidia-smi reports it); None off CUDA or without NVML.
    gpu_utilisation: float | None = None

    @property
    def load_balance(self) -> float:
        return sum(layer["load_balance"] for layer in self.layers) / max(1, len(self.layers))


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    stop_reason: str
    step_kind: str = "eager"  # "compiled" or "eager": the training step that ran (:func:`step_kind`)
    cuda_graph: bool = False  # the steps after the warm-up were replayed from one CUDA graph
    deterministic: bool = False  # trained with deterministic algorithms only (any device)
    capture_seconds: float = 0.0  # capturing that graph
    first_step_seconds: float = 0.0  # the first step alone: with the compiled step, mostly its compilation
    history: list[StepReport] = field(default_factory=list)
    expert_counts: list[list[int]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if problem := device_problem(name, "device"):
        raise FuluConfigError(problem)
    return torch.device(name)


# Below this many steps the compiled step does not pay for its compilation (each architecture compiles
# anew). `fulu-nas bench train-step +experiment=gpu` on an H200 (BENCHMARKS.md), both steps replayed
# from a CUDA graph: the compiled step saves 3.6-4.7 ms of the eager step's 9.9-12.8 ms, and its
# compilation takes 5.5-16 s, paying back after 1,200-4,200 steps. With deterministic training (the
# default) the reference's compiled step pays back after 3,828 steps instead of 2,635 (same card).
COMPILE_MIN_STEPS = 3000


def step_kind(cfg: TrainConfig, device: torch.device, distributed: bool, has_blocks: bool = True) -> str:
    """The training step to run: ``cfg.compile`` when it names one; for "auto", compiled on CUDA for
    budgets of at least :data:`COMPILE_MIN_STEPS` steps, eager elsewhere (on the CPU, compiling takes
    longer than the small models a CPU trains save with it). Expert-parallel layers (their all-to-all)
    and dynamic experts (modules change between steps) train eagerly; so do models without a
    ``blocks`` list to compile (``has_blocks``: e.g. an upcycled Hugging Face encoder)."""
    if cfg.compile == "compiled" and not has_blocks:
        raise ValueError("trainer.compile=compiled compiles a PiMoETransformer's blocks; this model has none "
                         "(use auto or eager)")
    if cfg.compile == "auto":
        compiled = device.type == "cuda" and cfg.steps >= COMPILE_MIN_STEPS
    else:
        compiled = cfg.compile == "compiled"
    return "compiled" if compiled and has_blocks and not distributed and not cfg.dynamic_experts else "eager"


def check_checkpointing(cfg: TrainConfig, has_blocks: bool = True) -> None:
    """ValueError for gradient checkpointing of a model without PiMoETransformer blocks (an upcycled
    Hugging Face encoder), which trained without it, saying nothing."""
    if cfg.gradient_checkpointing and not has_blocks:
        raise ValueError("trainer.gradient_checkpointing=true checkpoints a PiMoETransformer's blocks; this model "
                         "has none (a Hugging Face model checkpoints with its own gradient_checkpointing_enable)")


# Steps run eagerly before the CUDA graph is captured: the first calls autotune the Triton kernels and
# create the optimizer's state, neither of which a capture may do.
GRAPH_WARMUP_STEPS = 3
# Below this many steps a graph is not worth capturing.
GRAPH_MIN_STEPS = 10


def uses_cuda_graph(cfg: TrainConfig, device: torch.device, distributed: bool, has_blocks: bool = True,
                    experts_capture: bool = True) -> bool:
    """Whether the training step is replayed from one CUDA graph: the forward, the loss, the backward, the
    clipping, the optimizer step and the balancing biases' update as one launch, so that a step costs its
    GPU time and not the host's time to launch its kernels one by one (a search's models are small enough
    that the host's launches set the pace of an eager step). Possible on CUDA for a PiMoETransformer
    trained in one process with static shapes (every MoE layer's are) and no host synchronisation inside
    a step; not with dynamic experts (the modules change between steps), gradient checkpointing or
    expert-parallel ranks, nor where the experts' GEMMs sync (``experts_capture`` false: torch's grouped
    GEMM has no bf16 kernel below Hopper and loops over the groups with their offsets read on the host;
    :func:`experts_capture`). ``cfg.cuda_graph``: "auto" where possible and from :data:`GRAPH_MIN_STEPS`
    steps, True (wherever a step is left after the warm-up; an error where impossible), False."""
    blockers = [why for why, present in (
        ("it needs a CUDA device", device.type != "cuda"), ("expert-parallel ranks", distributed),
        ("dynamic experts", bool(cfg.dynamic_experts)), ("gradient checkpointing", cfg.gradient_checkpointing),
        ("a model without transformer blocks", not has_blocks),
        ("experts whose grouped GEMM reads its group sizes on the host (torch's bf16 grouped GEMM kernel needs a "
         "Hopper or Blackwell GPU)", not experts_capture),
        (f"a budget of {cfg.steps} steps leaves none after the {GRAPH_WARMUP_STEPS} eager warm-up steps a capture "
         "needs", cfg.steps <= GRAPH_WARMUP_STEPS)) if present]
    if cfg.cuda_graph is True:
        if blockers:
            raise ValueError(f"trainer.cuda_graph=true is impossible here: {', '.join(blockers)}")
        return True
    return cfg.cuda_graph == "auto" and not blockers and cfg.steps >= GRAPH_MIN_STEPS


def experts_capture(model: torch.nn.Module, device: torch.device, tokens: int) -> bool:
    """Whether every MoE layer of ``model`` trains on ``device`` without a host sync, in bf16 (the trainer's
    autocast on CUDA) on batches of ``tokens`` tokens: see :meth:`~fulu_nas.moe.PiMoELayer.captures_in_cuda_graphs`.
    Probes the GPU's grouped GEMM once per process, so it is asked only where a graph may be used."""
    if device.type != "cuda":
        return True
    return all(m.captures_in_cuda_graphs(torch.bfloat16, training_tokens=tokens)
               for m in model.modules() if isinstance(m, PiMoELayer))


def step_description(result: TrainResult) -> str:
    """The step that ran, as a trial's MLflow param ``train_step`` records it."""
    step = f"{result.step_kind} + CUDA graph" if result.cuda_graph else result.step_kind
    return f"{step}, deterministic" if result.deterministic else step


@contextmanager
def deterministic_training(enabled: bool):
    """Deterministic algorithms only (``enabled``) for the duration of the ``with``, on every device:
    without them two runs of one architecture differ from the first steps on. On a GPU atomic adds in
    the backward of indexing and attention accumulate in a varying order (on ``pimoe_mix`` a search's
    trial scored 0.39 to 0.94 exact match from run to run); on the CPU the backward of indexing (the
    experts' dispatch, the embedding) adds with atomics from several threads, so the weights varied
    with the run and with the thread count (BENCHMARKS.md), and torch's deterministic version is
    faster there too. Uninitialised memory is not filled: no kernel reads it, and the fills cost 12.7 ms
    of a 108 ms profile of ten eager steps (H200, GPU preset); what remains costs 6% of a graphed eager
    step, 26% of a compiled one (BENCHMARKS.md). Inductor skips the on-device benchmarks whose choice
    changes the numerics. An operation without a deterministic implementation raises, naming the way
    out."""
    if not enabled:
        yield False
        return
    import torch._inductor.config as inductor_config
    import torch.utils.deterministic

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        with inductor_config.patch(deterministic=True):
            yield True
    except RuntimeError as e:
        if "does not have a deterministic implementation" not in str(e):
            raise
        raise RuntimeError(f"{e}\n(trainer.deterministic=false trains with it, not reproducibly)") from e
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


@contextmanager
def compiled_blocks(model: PiMoETransformer):
    """Every transformer block compiled (regional compilation: identical blocks share one compiled graph,
    so compile time does not grow with depth), for the duration of the ``with``; the blocks are plain
    modules again afterwards, so evaluation, cost measurement and export see the eager model."""
    torch._dynamo.reset()  # a search compiles one architecture after another: never hit the recompile limit
    for block in model.blocks:
        block.compile(dynamic=False)
    try:
        yield
    finally:
        for block in model.blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set: back to the module's own forward


def gpu_utilisation(device: torch.device) -> float | None:
    """NVML's utilisation of ``device`` (see :attr:`StepReport.gpu_utilisation`), or None."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # no NVML bindings (pynvml) or no permission: the figure is optional
        return None


def lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` of the budget, then cosine decay to ``min_ratio``."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    t = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def task_loss(logits: Tensor, batch: Batch) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)


def host_layer_stats(moe_stats: list[dict[str, Tensor]]) -> list[dict[str, float | list[float]]]:
    keys = ("utilisation", "load_balance", "max_vio", "cv", "router_entropy", "dropped_share", "aux_loss")
    out = []
    for s in moe_stats:
        d: dict[str, float | list[float]] = {k: float(s[k].detach()) for k in keys}
        d["tokens_per_expert"] = s["tokens_per_expert"].tolist()
        out.append(d)
    return out


# Positions: this package's model's (``pos.``), a Hugging Face encoder's (an upcycled one's).
_POSITIONS = ("pos.", "position_embeddings.", "token_type_embeddings.")


def _decays(name: str, p: torch.Tensor, kept: set[str]) -> bool:
    # Weight decay on matrices only: not on norms, biases or positions, and not on the router,
    # whose logits would shrink once the task loss stops pulling, letting routing drift. ``kept``:
    # the parameters their modules keep out of it (``no_weight_decay_params``: stacked biases, gates).
    return (p.dim() >= 2 and ".router." not in name and name not in kept
            and not any(name.startswith(pos) or f".{pos}" in name for pos in _POSITIONS))


def _kept_from_decay(model: torch.nn.Module) -> set[str]:
    return {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            for name in getattr(module, "no_weight_decay_params", ())}


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW; ``capturable``: its step inside a CUDA graph, the learning rate a tensor the schedule fills
    (a float would be frozen into the graph)."""
    kept = _kept_from_decay(model)
    decay = [p for n, p in model.named_parameters() if _decays(n, p, kept)]
    rest = [p for n, p in model.named_parameters() if not _decays(n, p, kept)]
    lr = torch.tensor(cfg.lr, device=decay[0].device) if capturable else cfg.lr
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if capturable:  # one tensor per group: the optimizer may not share it between groups
        for group in groups:
            group["lr"] = lr.clone()
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), capturable=capturable)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class _OneProcess:
    """What ``train`` does where distributed training needs collectives (:class:`_Ranks`), for a
    single process."""

    rank = 0
    start = 0.0  # train's clock origin, set when the first step is about to run

    def elapsed_before_step(self) -> float:
        return time.perf_counter() - self.start

    def elapsed_after_step(self, timed: bool) -> float:
        return time.perf_counter() - self.start

    def means(self, losses: Tensor) -> list[float]:
        return losses.tolist()

    def step_gradients(self, model: PiMoETransformer, grad_clip: float) -> None:
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)

    def global_layers(self, layers: list[dict]) -> list[dict]:
        return layers

    def call_on_rank_zero(self, callback: Callable[[StepReport], None] | None, report: StepReport) -> None:
        if callback is not None:
            callback(report)


class _Ranks:
    """The collectives distributed training needs (module doc); one instance per ``train`` call."""

    def __init__(self, model: PiMoETransformer, device: torch.device):
        from ..moe.expert_parallel import ExpertParallelMoE

        not_ep = [i for i, layer in enumerate(model.moe_layers()) if not isinstance(layer, ExpertParallelMoE)]
        if not_ep:
            raise ValueError(f"distributed training over {dist.get_world_size()} ranks needs expert-parallel MoE "
                             f"layers (fulu_nas.training.distributed.expert_parallel(model) before train); MoE layers "
                             f"{not_ep} are not")
        self.rank, self.world_size, self.device = dist.get_rank(), dist.get_world_size(), device
        self.start = 0.0  # train's clock origin, set when the first step is about to run
        self.elapsed = 0.0  # the slowest rank's clock at the end of the last step

    @staticmethod
    def current(model: PiMoETransformer, device: torch.device) -> _Ranks | _OneProcess:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return _OneProcess()
        return _Ranks(model, device)

    def elapsed_before_step(self) -> float:
        return self.elapsed

    def elapsed_after_step(self, timed: bool) -> float:
        """The slowest rank's clock (a collective, so only under a time budget: ``timed``)."""
        if timed:
            self.elapsed = self.slowest(time.perf_counter() - self.start)
        return self.elapsed

    def means(self, losses: Tensor) -> list[float]:
        t = losses.clone()
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def slowest(self, seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def step_gradients(self, model: PiMoETransformer, grad_clip: float) -> None:
        from .distributed import average_replicated_gradients, clip_grad_norm_

        average_replicated_gradients(model)
        if grad_clip:
            clip_grad_norm_(model, grad_clip)

    def global_layers(self, layers: list[dict]) -> list[dict]:
        """The expert-parallel statistics are global already but for ``aux_loss`` (local): average it."""
        if layers:
            aux = torch.tensor([layer["aux_loss"] for layer in layers], dtype=torch.float64, device=self.device)
            dist.all_reduce(aux)
            for layer, value in zip(layers, (aux / self.world_size).tolist(), strict=True):
                layer["aux_loss"] = value
        return layers

    def call_on_rank_zero(self, callback: Callable[[StepReport], None] | None, report: StepReport) -> None:
        stop = torch.zeros(1, device=self.device)
        error: BaseException | None = None
        if self.rank == 0 and callback is not None:
            try:
                callback(report)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = e
                stop.fill_(1)
        dist.broadcast(stop, src=0)
        if error is not None:
            raise error
        if float(stop):
            raise StoppedByRankZero(f"stopped at step {report.step}: rank 0's callback raised")


def loss_check_interval(cfg: TrainConfig, device: torch.device, dynamic_experts: bool) -> int:
    """Every how many steps the losses are read on the host and checked for divergence (besides the
    first step and every report). Reading a loss waits for the GPU: once a step, the host could never
    queue the next step's kernels while the GPU runs this one's, and a launch-bound step (a search's
    small models) leaves the GPU idle for that time. So on CUDA the check comes with the reports: a
    diverged run is caught up to ``report_every`` steps late, with the step it diverged at. On the CPU
    reading costs nothing and the check is every step; so it is with dynamic experts, whose expert
    counts follow the statistics of each step."""
    return cfg.report_every if device.type == "cuda" and not dynamic_experts else 1


class _LossCheck:
    """The training losses, kept on the device until :meth:`check` reads them (see
    :func:`loss_check_interval`): their mean over ranks, and :class:`TrainingDiverged` for the first
    step whose loss is not finite or above ``factor`` times the first step's."""

    def __init__(self, ranks: _Ranks | _OneProcess, factor: float):
        self.ranks, self.factor = ranks, factor
        self.pending: list[Tensor] = []
        self.first: float | None = None
        self.checked = 0  # steps read so far
        self.last = float("nan")  # the last step's loss read

    def append(self, loss: Tensor) -> None:
        self.pending.append(loss)

    def check(self) -> float:
        """Read and check the losses appended since the last check; returns the latest."""
        if self.pending:
            values = self.ranks.means(torch.stack(self.pending))
            self.pending.clear()
            for value in values:
                self.checked += 1
                self.first = value if self.first is None else self.first
                if not math.isfinite(value):
                    raise TrainingDiverged(self.checked, value, "not finite")
                if self.checked > 1 and value > self.factor * max(self.first, 1e-3):
                    raise TrainingDiverged(self.checked, value,
                                           f"above {self.factor}x the first loss {self.first:.4g}")
                self.last = value
        return self.last


class _GraphedStep:
    """One training step (``forward`` then ``update``, :func:`train`'s) captured in a CUDA graph on the
    batch it is built with, then replayed: :meth:`load` copies the next batch into that batch's memory.
    ``loss`` and ``out`` (the logits, every layer's statistics) are the graph's outputs, rewritten by
    each replay. Every statistic is computed inside the graph: a statistic read lazily after a replay
    would be cached on ``out`` and never computed again."""

    def __init__(self, forward, update, batch: Batch):
        self.batch = batch
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the served forward's kernels may be compiling on another thread meanwhile
        # (deploy.cost.ServedKernelWarmup); the capture checks this thread's calls alone.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            loss, out = forward(batch)
            update(loss, out)
            for stats in out.moe_stats:
                dict(stats)
        self.loss, self.out = loss.detach().float(), out

    def load(self, batch: Batch) -> None:
        for static, new in ((self.batch.tokens, batch.tokens), (self.batch.targets, batch.targets),
                            (self.batch.domains, batch.domains)):
            if new.shape != static.shape:  # copy_ would broadcast a smaller batch without a word
                raise ValueError(f"the CUDA graph of the training step was captured for batches of shape "
                                 f"{tuple(static.shape)}, got {tuple(new.shape)}: a task with batches of "
                                 "varying shape needs trainer.cuda_graph=false")
            static.copy_(new.pin_memory() if static.is_cuda and new.device.type == "cpu" else new, non_blocking=True)

    def replay(self) -> None:
        self.graph.replay()


# Why expert choice cannot be a next-token language model's router. Each expert takes its top tokens
# of the whole batch, so whether (and how) token t is processed depends on the scores of the tokens
# after it: the logits at t read the future, the very tokens they are trained and evaluated to predict.
# A search rewards that leak (BENCHMARKS.md, "The search on a GPU": on pimoe_mix, expert choice with
# 36-52 experts reached 0.73-0.81 exact match on the sums, no causal router more than 0.58), and a
# model that uses it cannot generate text one token at a time. Token classification may see the
# whole sequence, so it keeps the router. The search refuses such an architecture before a study
# (fulu_nas.search.family); :func:`train` refuses such a model, whoever built it.
# The most tokens a training step's batch may hold (batch_size x the task's seq_len): 16.8 million, past
# any one device's step; a slip (batch_size=10**12) built its batch for ever or failed to allocate it.
MAX_BATCH_TOKENS = 2**24


def batch_problem(batch_size: int, seq_len: int, key: str = "batch_size") -> str | None:
    """Why a batch of ``batch_size`` sequences of ``seq_len`` tokens is too large to train on (None: it is not)."""
    if batch_size * seq_len <= MAX_BATCH_TOKENS:
        return None
    return (f"{key}: {batch_size:,} sequences of the task's {seq_len} tokens are {batch_size * seq_len:,} tokens a "
            f"step, more than {MAX_BATCH_TOKENS:,}: at most {MAX_BATCH_TOKENS // seq_len:,} sequences")


def train(model: PiMoETransformer, task: Task, cfg: TrainConfig,
          callback: Callable[[StepReport], None] | None = None) -> TrainResult:
    """Train ``model`` on ``task`` until ``cfg.steps`` or ``cfg.max_seconds`` runs out (``seconds_cap``:
    see the module doc).

    ``callback`` gets a :class:`StepReport` every ``report_every`` steps and at the end; it may
    raise to stop training (a search uses that to prune). Raises :class:`TrainingDiverged` on a
    NaN/inf loss or one above ``divergence_factor`` times the first loss. Under ``torchrun`` see
    the module doc (dynamic experts are single-device only).
    """
    device = resolve_device(cfg.device)
    # The current GPU is where a CUDA graph captures and replays (torch.cuda.graph's stream): on a
    # device="cuda:1" that is not current, the capture recorded nothing and every step after it was empty.
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        return _train(model, task, cfg, callback, device)


def _train(model: PiMoETransformer, task: Task, cfg: TrainConfig, callback: Callable[[StepReport], None] | None,
           device: torch.device) -> TrainResult:
    if problem := model_task_problem(model, task) or batch_problem(cfg.batch_size, task.seq_len):
        raise FuluConfigError(problem)
    ranks = _Ranks.current(model, device)
    rank = ranks.rank
    if isinstance(ranks, _Ranks) and cfg.dynamic_experts:
        raise ValueError("dynamic experts (growing/shrinking the expert count) are not supported in distributed "
                         "expert-parallel training; train on one device or drop trainer.dynamic_experts")
    if cfg.dynamic_experts:
        check_dynamic_experts(model, cfg.dynamic_experts)
    torch.manual_seed(cfg.seed + rank)
    model.to(device).train()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    has_blocks = isinstance(getattr(model, "blocks", None), torch.nn.ModuleList)
    check_checkpointing(cfg, has_blocks)
    kind = step_kind(cfg, device, distributed=isinstance(ranks, _Ranks), has_blocks=has_blocks)
    captures = cfg.cuda_graph is False or experts_capture(model, device, cfg.batch_size * task.seq_len)
    graphed = uses_cuda_graph(cfg, device, distributed=isinstance(ranks, _Ranks), has_blocks=has_blocks,
                              experts_capture=captures)
    optimizer = _optimizer(model, cfg, capturable=graphed)
    dynamic = DynamicExperts(model, optimizer, cfg.dynamic_experts) if cfg.dynamic_experts else None
    # A graph replays the casts it captured: autocast's cache of cast weights would hold stale copies.
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed) if device.type == "cuda"
                else nullcontext())
    batches = task.train_batches(cfg.batch_size, seed=cfg.seed + rank)
    result = TrainResult(steps=0, seconds=0.0, final_loss=float("nan"), stop_reason="steps", step_kind=kind)
    check_every = loss_check_interval(cfg, device, dynamic is not None)
    losses = _LossCheck(ranks, cfg.divergence_factor)

    def forward(batch: Batch):
        with autocast:
            out = model(batch.tokens)
        return task_loss(out.logits, batch), out

    def update(loss: Tensor, out) -> None:
        optimizer.zero_grad(set_to_none=True)
        (loss + out.balance_loss).backward()
        ranks.step_gradients(model, cfg.grad_clip)
        optimizer.step()
        model.update_expert_biases(out.moe_stats)

    graph: _GraphedStep | None = None
    side = torch.cuda.Stream(device) if graphed else None  # the warm-up steps run there, as capture needs
    start = ranks.start = time.perf_counter()
    bar = tqdm(total=cfg.steps, disable=not cfg.progress or rank != 0, desc="train", leave=False)
    # The compiled blocks live as long as training: evaluation and export see the eager model.
    # On the CPU a LayerNorm's parameter gradients round by the thread count unless summed another way.
    cpu_norms = device.type == "cpu" and kind == "eager" and cfg.deterministic
    with (compiled_blocks(model) if kind == "compiled" else nullcontext(),
          deterministic_training(cfg.deterministic) as result.deterministic,
          thread_invariant_layer_norms(model) if cpu_norms else nullcontext()):
        try:
            for step in range(1, cfg.steps + 1):
                elapsed = ranks.elapsed_before_step()
                progress = step / cfg.steps
                if cfg.max_seconds:
                    progress = max(progress, elapsed / cfg.max_seconds)
                lr = cfg.lr * lr_factor(progress, cfg.warmup_fraction, cfg.min_lr_ratio)
                _set_lr(optimizer, lr)

                if graphed and step > GRAPH_WARMUP_STEPS:
                    if graph is None:
                        torch.cuda.current_stream(device).wait_stream(side)
                        # The last warm-up step's outputs hold its autograd graph, whose gradient
                        # accumulators belong to the side stream: the capture must make its own.
                        loss = out = None
                        clock = time.perf_counter()
                        graph = _GraphedStep(forward, update, next(batches).to(device))
                        result.cuda_graph, result.capture_seconds = True, time.perf_counter() - clock
                    else:
                        graph.load(next(batches))
                    graph.replay()
                    loss, out = graph.loss.clone(), graph.out
                    losses.append(loss)
                    if step % check_every == 0:
                        result.final_loss = losses.check()
                else:
                    if side is not None:  # the learning rate was set on the current stream
                        side.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(side) if side is not None else nullcontext():
                        batch = next(batches).to(device)
                        loss, out = forward(batch)
                        losses.append(loss.detach().float())
                        if step == 1 or step % check_every == 0:  # before the update when the check is due
                            result.final_loss = losses.check()
                        update(loss, out)
                    if side is not None:  # what reads this step's outputs runs on the current stream
                        torch.cuda.current_stream(device).wait_stream(side)
                    if dynamic is not None:
                        dynamic.observe(out.moe_stats, batch)
                        dynamic.maybe_rescale(step, progress)

                result.steps = step
                elapsed = ranks.elapsed_after_step(timed=bool(cfg.max_seconds or cfg.seconds_cap))
                last = step == cfg.steps or (cfg.max_seconds and elapsed >= cfg.max_seconds)
                reporting = step % cfg.report_every == 0 or last
                if reporting:
                    result.final_loss = value = losses.check()
                if step == 1:
                    result.first_step_seconds = time.perf_counter() - start
                bar.update(1)
                # a step that ends the budget (steps or time) ends training, past the cap or not
                if cfg.seconds_cap and elapsed >= cfg.seconds_cap and not last:
                    losses.check()  # a divergence among the losses not read yet is the reason, not the cap
                    raise BudgetCapReached(step, cfg.steps, elapsed, cfg.seconds_cap)
                if reporting:
                    layers = ranks.global_layers(host_layer_stats(out.moe_stats))
                    report = StepReport(step, value, lr, time.perf_counter() - start, layers,
                                        gpu_utilisation(device) if rank == 0 else None)
                    result.history.append(report)
                    bar.set_postfix(loss=f"{value:.4f}", balance=f"{report.load_balance:.3f}")
                    ranks.call_on_rank_zero(callback, report)
                if last and step < cfg.steps:
                    result.stop_reason = "time"
                    break
        finally:
            bar.close()
            if graphed:  # the gradients live in the graph's memory: give it back with the graph
                optimizer.zero_grad(set_to_none=True)
                del graph
            result.seconds = time.perf_counter() - start
    result.expert_counts = [[layer.cfg.num_experts for layer in model.moe_layers()]]
    if dynamic is not None:
        result.expert_counts = dynamic.history
    return result
