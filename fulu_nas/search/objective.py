"""One trial, top to bottom: sample an architecture, reuse an identical earlier result or train
it within the budget (reporting to the pruner and MLflow as it goes), evaluate quality and
routing, measure cost, record everything, return the objectives.

How a trial ends, and what the study keeps of it (user attributes on the Optuna trial):
- COMPLETE: objective values; ``metrics``, and each metric as an attribute of its own (``loss``,
  ``latency_ratio``, ...: optuna-dashboard sorts trials by these), ``arch``, ``mlflow_run_id``,
  ``weights_run_id`` (``cached_from`` when an identical architecture's result was reused).
- PRUNED: by the pruner (``pruned_at_step``), or ``infeasible`` (a constraint of the space or an
  impossible architecture: never trained, not counted toward ``n_trials``).
- FAIL: ``fail_reason`` (diverged, out of memory, an error, a space whose derived values cannot be
  computed for the trial's sample). ``interrupted`` trials (Ctrl-C or SIGTERM, wherever it lands in
  the trial: :func:`requeue_interrupted`) are queued again and not counted; a FAIL with no reason is
  a killed worker's trial, failed by the heartbeat check and retried (see :mod:`.storage`), and one
  with the reason ``worker stopped`` likewise where the storage has no heartbeats (a journal file:
  :func:`fulu_nas.search.study.fail_trials_of_gone_workers`).

With ``trainer.expert_parallel=P > 1`` the training step runs over P ranks in a torchrun launch
(:mod:`fulu_nas.training.parallel`; a num_experts not divisible by P makes the trial infeasible); its reports stream
back to the pruner and MLflow, and the gathered single-device model is evaluated, measured and
logged here exactly as a one-device trial's.

The protocol's steps (:func:`train_architecture`, :func:`evaluate_and_measure`, :class:`TrainingLog`,
:class:`ReferenceModels`) are functions of their own: the confirmation (:mod:`.confirm`) trains and
measures the chosen architectures again with exactly these.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
import traceback
from dataclasses import asdict, dataclass

import optuna
import torch

from ..deploy.cost import ServedKernelWarmup, measure_cost
from ..deploy.devices import device_label
from ..errors import FuluConfigError
from ..models import PiMoETransformer
from ..training.evaluate import evaluate
from ..training.parallel import train_expert_parallel
from ..training.train import (
    BudgetCapReached,
    StepReport,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    resolve_device,
    step_description,
    train,
)
from .interrupts import between_writes, hold_to_the_end_of_the_stretch, interruptible
from .settings import SearchSettings
from .space import Infeasible
from .tracking import Tracker


class TrialFailed(Exception):
    """A trial failed for a recorded reason; the study goes on."""


class SurplusTrial(TrialFailed):
    """Other workers already cover the requested number of trials."""


TrialState = optuna.trial.TrialState


def counts_toward_total(t: optuna.trial.FrozenTrial) -> bool:
    """Whether a finished trial counts toward the study's ``n_trials`` (see the module docstring)."""
    if t.state == TrialState.COMPLETE:
        return True
    if t.state == TrialState.PRUNED:
        return "infeasible" not in t.user_attrs
    if t.state == TrialState.FAIL:
        return t.user_attrs.get("fail_reason") is not None and not t.user_attrs.get("not_counted")
    return False


INTERRUPTED_REASON = "interrupted (Ctrl-C or SIGTERM); the trial was queued again and resumes with the same command"


def requeue_interrupted(study: optuna.Study, trial_id: int) -> None:
    """Trial ``trial_id``, stopped by Ctrl-C or SIGTERM, failed with the reason ``interrupted`` (not
    counted toward ``n_trials``) and queued again: with the parameters it has (a queued trial's fixed
    ones, the reference's among them, before it sampled them all) and its ``reference`` flag. Its
    state is the caller's to set (Optuna's tell)."""
    storage = study._storage  # the trial's id, not a Trial: it may never have reached the objective
    t = storage.get_trial(trial_id)
    storage.set_trial_user_attr(trial_id, "fail_reason", "interrupted")
    storage.set_trial_user_attr(trial_id, "not_counted", True)
    params = {**t.system_attrs.get("fixed_params", {}), **t.params}
    study.enqueue_trial(params, user_attrs={"retry_of": t.number,
                                            **({"reference": True} if t.user_attrs.get("reference") else {})})


def is_feasible(t: optuna.trial.FrozenTrial) -> bool:
    """Every constraint of the trial (Optuna's ``trial.set_constraint``) is met."""
    return all(c <= 0 for c in t.constraints.values())


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Optuna's Pareto front (``best_trials``: feasible and non-dominated) with one trial per
    architecture, best first objective first (the lowest, or the highest where it is maximised, as the
    dashboard and the confirmation rank it): the order ``trial=pareto:i`` counts in and the search's table
    shows."""
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
    return sorted(one_per_architecture(study.best_trials), key=lambda t: (sign * t.values[0], t.number))


def one_per_architecture(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials by number, one per ``arch_hash``: a trial that reused another's result has its
    values, so Optuna keeps both on a front; the lower-numbered, which trained, stays."""
    seen: set[str] = set()
    front = []
    for t in sorted(trials, key=lambda t: t.number):
        h = t.user_attrs.get("arch_hash")
        if h is None or h not in seen:
            seen.add(h)
            front.append(t)
    return front


# What a trial's figures of these depend on: the device that measured them.
DEVICE_BOUND = ("latency_ms", "latency_ratio", "throughput", "peak_memory_mb")


def measuring_device(s: SearchSettings) -> str:
    """The label (:func:`~fulu_nas.deploy.devices.device_label`) of the device this search's trials are
    trained and costed on."""
    return device_label(resolve_device(s.train.device))


def reference_model(s: SearchSettings, device: torch.device) -> PiMoETransformer | None:
    """The space's reference architecture (initial weights, the study's seed) on ``device``: the fixed
    model every trial's latency is measured beside (``latency_ratio``). None without a reference."""
    if s.space.reference is None:
        return None
    # with the space's derived values, as the reference trial trains it (not the fields' defaults)
    arch = s.space.arch(s.space.with_derived(s.space.reference), s.task)
    return s.space.family.build(arch, s.task, s.train.seed, device)


def measure_trial_cost(model, s: SearchSettings, reference: PiMoETransformer | None = None,
                       reference_served: dict | None = None) -> tuple[dict, dict[str, float]]:
    """The study's cost protocol on ``model``: :func:`measure_cost` at the configured shapes (sequences
    capped at the task's length) in interleaved rounds beside ``reference`` (its served forward cached in
    ``reference_served``), and its figures as flat metrics (latency from the first shape)."""
    cost = measure_cost(model, s.cost_shapes, iterations=s.cost.iterations, rounds=s.cost.rounds, reference=reference,
                        reference_served=reference_served)
    first = cost["shapes"][0]
    ratio = {k: first[k] for k in ("latency_ratio", "latency_ratio_spread", "reference_latency_ms") if k in first}
    return cost, {"latency_ms": first["latency_p50_ms"], "latency_p95_ms": first["latency_p95_ms"],
                  "latency_spread": first["latency_spread"], **ratio,
                  "throughput": max(x["throughput_tokens_per_s"] for x in cost["shapes"]),
                  "peak_memory_mb": max(x["peak_memory_mb"] for x in cost["shapes"]),
                  "active_params": float(cost["active_params"]), "total_params": float(cost["total_params"]),
                  "flops_per_token": float(cost["flops_per_token"])}


class ReferenceModels:
    """The reference model (:func:`reference_model`), built once and kept on the device of the models
    measured beside it, with its served forward per input shape (``served``, see
    :func:`~fulu_nas.deploy.cost.served_reference`)."""

    def __init__(self, s: SearchSettings):
        self.s = s
        self._model: PiMoETransformer | None = None
        self.served: dict = {}

    def beside(self, model: PiMoETransformer) -> PiMoETransformer | None:
        device = next(model.parameters()).device
        if self._model is None or next(self._model.parameters()).device != device:
            self._model = reference_model(self.s, device)
            self.served = {}
        return self._model


class TrainingLog:
    """A training run's reports as they arrive: step metrics on its MLflow run (the loss and its moving
    average, the learning rate, each MoE layer's routing), each layer's tokens per expert for the
    ``routing_history.json`` artifact, and ``on_progress(step, loss)`` for a progress display."""

    def __init__(self, tracker: Tracker, run_id: str, on_progress):
        self.tracker, self.run_id, self.on_progress = tracker, run_id, on_progress
        self.smoothed: list[float] = []
        self.routing_history: list[dict] = []
        self.gpu_utilisation: list[float] = []
        self.seconds = 0.0  # spent recording: a trial's overhead, not its training

    def __call__(self, report: StepReport) -> float:
        """Record ``report``; returns the smoothed loss (what a pruner compares)."""
        start = time.perf_counter()
        try:
            return self._record(report)
        finally:
            self.seconds += time.perf_counter() - start

    def _record(self, report: StepReport) -> float:
        ema = report.loss if not self.smoothed else 0.8 * self.smoothed[-1] + 0.2 * report.loss
        self.smoothed.append(ema)
        step_metrics = {"train/loss": report.loss, "train/loss_smoothed": ema, "train/lr": report.lr,
                        "train/load_balance": report.load_balance}
        if report.gpu_utilisation is not None:
            step_metrics["train/gpu_utilisation"] = report.gpu_utilisation
            self.gpu_utilisation.append(report.gpu_utilisation)
        for i, layer in enumerate(report.layers):
            for k in ("load_balance", "max_vio", "cv", "router_entropy", "utilisation", "dropped_share"):
                step_metrics[f"train/layer{i}/{k}"] = layer[k]
        self.tracker.log_step(self.run_id, report.step, step_metrics)
        self.routing_history.append({"step": report.step, "tokens_per_expert": [layer["tokens_per_expert"]
                                                                                for layer in report.layers]})
        self.on_progress(report.step, report.loss)
        return ema


class ServedKernels:
    """The served forward's GPU kernels, compiled while a trial's model trains
    (:class:`~fulu_nas.deploy.cost.ServedKernelWarmup`) where its cost is measured on CUDA and
    ``trainer.cost_compile_while_training`` is on; :meth:`wait` before measuring the cost."""

    def __init__(self, s: SearchSettings):
        self.s = s
        self._warmup: ServedKernelWarmup | None = None

    def start(self, model: PiMoETransformer) -> None:
        if self.s.cost.compile_while_training and next(model.parameters()).is_cuda:
            self._warmup = ServedKernelWarmup(model, self.s.cost_shapes)

    def wait(self) -> float:
        """Seconds waited for the compilation (0 where none runs)."""
        return self._warmup.wait() if self._warmup is not None else 0.0


def train_architecture(arch, s: SearchSettings, cfg: TrainConfig, on_report,
                       kernels: ServedKernels) -> tuple[PiMoETransformer, TrainResult]:
    """``arch`` trained on the study's task with ``cfg`` (as the space's family sets it for ``arch``: an
    upcycling's own learning rate), whose seed also draws the initial weights: over ``cfg.expert_parallel``
    ranks when it is > 1 (the gathered single-device model comes back), else here, where ``kernels``
    starts compiling the served forward's kernels as training starts."""
    cfg = s.space.family.train_config(arch, cfg)
    if cfg.expert_parallel > 1:
        return train_expert_parallel(arch, s.task_name, s.task_params, cfg, on_report=on_report,
                                     workdir=s.output_dir)
    model = s.space.family.build(arch, s.task, cfg.seed, resolve_device(cfg.device))
    kernels.start(model)
    return model, train(model, s.task, cfg, callback=on_report)


@dataclass
class Measured:
    """A trained model's evaluation (quality and routing), its cost beside the reference, and the flat
    metrics its run records (the objectives are read from these); ``seconds``: each phase's time."""

    quality: dict
    cost: dict
    metrics: dict[str, float]
    seconds: dict[str, float]

    def artifacts(self, arch, routing_history: list[dict]) -> dict:
        """The run's artifacts by file name (weights aside)."""
        return {"arch.yaml": arch.to_yaml(), "evaluation.json": self.quality, "cost.json": self.cost,
                "routing_history.json": routing_history}


def evaluate_and_measure(model: PiMoETransformer, s: SearchSettings, references: ReferenceModels,
                         result: TrainResult, kernels: ServedKernels) -> Measured:
    """Evaluate ``model`` on the task, measure its cost beside the reference (once ``kernels`` are
    compiled); a non-finite validation loss fails it (:class:`TrialFailed`)."""
    start = time.perf_counter()
    quality = evaluate(model, s.task)
    evaluated = time.perf_counter()
    waited = kernels.wait()
    cost, cost_metrics = measure_trial_cost(model, s, references.beside(model), references.served)
    cost["seconds"] = {"kernel_wait": waited, **cost["seconds"]}
    seconds = {"evaluate": evaluated - start, "cost": time.perf_counter() - evaluated}
    task = s.task
    m = {"loss": quality["loss"], "metric": quality[task.metric_name], task.metric_name: quality[task.metric_name],
         "load_balance": quality["load_balance"], "utilisation": quality["utilisation"],
         "max_vio": quality["max_vio"], "cv": quality["cv"], "dropped_share": quality["dropped_share"],
         **cost_metrics, "train_steps": float(result.steps),
         "train_seconds": result.seconds, "final_train_loss": result.final_loss}
    m["routing_accuracy"] = quality.get("routing_accuracy", float("nan"))
    if "perplexity" in quality:
        m["perplexity"] = quality["perplexity"]
    if not math.isfinite(m["loss"]):
        raise TrialFailed("validation loss is not finite")
    for name in (*s.study.objectives, *(name for name, _ in s.study.constraints)):
        if not math.isfinite(m.get(name, math.nan)):  # Optuna would fail the trial without a reason
            raise TrialFailed(f"{name} is {'not finite' if name in m else 'not measured'} ({m.get(name)})")
    return Measured(quality, cost, m, seconds)


# Metrics of how a trial's own run went (phase_metrics): a trial that reuses an identical earlier result
# copies that trial's quality and cost, not these.
RUN_METRICS = ("phase/", "cost/", "train/first_step_s", "train/capture_s", "gpu_utilisation")


def phase_metrics(seconds: dict[str, float], result: TrainResult, log: TrainingLog,
                  ranks: bool = False) -> dict[str, float]:
    """Where a trial's time went, as metrics: ``phase/<name>_s`` for sampling, building the model (and moving
    it to the device, the optimizer; with expert parallelism, starting the ranks and gathering their
    weights), training (the steps alone), step reports (MLflow and the pruner), evaluation, cost measurement
    and logging (the weights' upload included); ``overhead_share``: the share of the trial spent outside
    training steps; the first step's time (with the compiled step, mostly its compilation) and the GPU's
    utilisation during training. ``ranks``: trained over expert-parallel ranks, while this process recorded
    their reports, so the report phase overlaps the training instead of interrupting it."""
    loop = min(result.seconds, seconds["train"])
    # in one process the reports run inside the training loop; beside the ranks they take none of it
    steps = loop if ranks else loop - log.seconds
    phases = {"train": steps, "report": log.seconds, "build": seconds["train"] - loop,
              **{k: v for k, v in seconds.items() if k != "train"}}
    total = sum(phases.values()) - (log.seconds if ranks else 0.0)  # the trial's time
    out = {f"phase/{k}_s": v for k, v in phases.items()}
    out["overhead_share"] = 1 - phases["train"] / total if total > 0 else 0.0
    if result.first_step_seconds > 0:  # 0 is the default of a result that did not measure it
        out["train/first_step_s"] = result.first_step_seconds
    if result.cuda_graph:
        out["train/capture_s"] = result.capture_seconds
    busy = log.gpu_utilisation[1:]  # the first report's period holds the compilation
    if busy:
        out["gpu_utilisation"] = sum(busy) / len(busy)
    return out


def cache_key(settings: SearchSettings, arch_hash: str, model_as_typed: bool = False) -> str:
    """Identical architecture + task + budget + cost protocol -> identical key. A model on disk is in the
    architecture by its content (``source_sha256``), not by its path (``model_as_typed``: the key as it was
    made with the path as typed, which earlier trials of a study keep); a corpus on disk is in the task by
    its content (``corpus_sha256``), not by its path: a trial on other data is not reused."""
    # none of these changes a trial's result (beyond floating-point rounding: device, compile, deterministic)
    skip = ("progress", "device", "compile", "cuda_graph", "deterministic", "report_every", "seconds_cap")
    train = {k: v for k, v in asdict(settings.train).items() if k not in skip}
    if train["expert_parallel"] == 1:  # the default: keys from before the setting stay valid
        del train["expert_parallel"]
    cost = asdict(settings.cost)
    del cost["compile_while_training"]  # when the kernels compile, not what is measured
    task_params = settings.task_identity(settings.task_params, model_as_typed)
    if settings.corpus_sha256 is not None:
        task_params["corpus_sha256"] = settings.corpus_sha256
    blob = json.dumps({"arch": arch_hash, "task": [settings.task_name, task_params], "train": train,
                       "cost": cost}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Objective:
    """The Optuna objective. ``on_progress(trial_number, step, loss)`` feeds a progress display."""

    def __init__(self, settings: SearchSettings, tracker: Tracker, parent_run_id: str, on_progress=None):
        self.s = settings
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.on_progress = on_progress or (lambda *a: None)
        self.prune = settings.study.pruner != "none"
        self.started: set[int] = set()  # trial numbers this worker ran
        self.references = ReferenceModels(settings)
        self._run: str | None = None  # the running trial's MLflow run, while this objective has to end it
        # Where this worker's trials are trained and costed (a resumed study may run on another device).
        self.device = measuring_device(settings)

    def __call__(self, trial: optuna.Trial):
        """Ctrl-C or SIGTERM anywhere in the trial (checking, sampling, reusing, creating its run,
        training) fails it as ``interrupted``, queues it again and ends its run KILLED."""
        self._run = None
        try:
            with interruptible():  # Optuna's writes around the trial are deferred (the worker's loop)
                return self._run_trial(trial)
        except KeyboardInterrupt:
            requeue_interrupted(trial.study, trial._trial_id)
            if self._run is not None:
                self.tracker.end_trial(self._run, "KILLED", {"fulu.state": "interrupted",
                                                             "fulu.reason": INTERRUPTED_REASON})
                self._run = None
            raise

    def _start_run(self, trial: optuna.Trial, values: dict, arch, tags: dict) -> str:
        """The trial's MLflow run, kept in ``self._run`` before a Ctrl-C that arrived while it was being
        created is raised (at the end of the block), so that the interrupted trial's run is ended."""
        with between_writes():
            # every trial run's (a reused result's too, so that a filter on these tags finds it)
            common = {"fulu.reference": bool(trial.user_attrs.get("reference")), "fulu.arch_hash": arch.content_hash(),
                      "fulu.device": self.device}
            self._run = self.tracker.start_trial(self.parent_run_id, trial.number, values, arch.to_dict(),
                                                 {**common, **tags})
            return self._run

    def _run_trial(self, trial: optuna.Trial):
        started = time.perf_counter()
        self.started.add(trial.number)
        self._check_surplus(trial)
        try:
            values = self.s.space.sample(trial)
            arch = self.s.space.feasible_arch(values, self.s.task)
        except Infeasible as e:
            self._infeasible(trial, str(e))
        except FuluConfigError as e:  # the space's fault for this sample (a derived value that cannot be computed)
            reason = "; ".join(e.problems)
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason) from None
        P = self.s.train.expert_parallel
        if P > 1 and arch.moe.num_experts % P:
            self._infeasible(trial, f"num_experts={arch.moe.num_experts} is not divisible by "
                                    f"trainer.expert_parallel={P}")
        key = cache_key(self.s, arch.content_hash())
        trial.set_user_attr("arch", arch.to_dict())
        trial.set_user_attr("arch_hash", arch.content_hash())
        trial.set_user_attr("cache_key", key)
        trial.set_user_attr("device", self.device)
        earlier = self._identical(trial, {key, cache_key(self.s, arch.content_hash(), model_as_typed=True)})
        if earlier is not None:
            return self._reuse(trial, earlier, values, arch)
        return self._train(trial, values, arch, started)

    # -- the protocol -------------------------------------------------------------------------
    def _train(self, trial: optuna.Trial, values: dict, arch, started: float):
        seconds = {"sample": time.perf_counter() - started}
        clock = time.perf_counter()
        run_id = self._start_run(trial, values, arch, {})
        trial.set_user_attr("mlflow_run_id", run_id)
        seconds["log"] = time.perf_counter() - clock
        model = None
        kernels = ServedKernels(self.s)
        log = TrainingLog(self.tracker, run_id, lambda step, loss: self.on_progress(trial.number, step, loss))

        def on_report(report: StepReport) -> None:
            with between_writes():  # MLflow's and Optuna's: a Ctrl-C waits for them
                ema = log(report)
                if not self.s.study.multi_objective:  # Optuna keeps no intermediate values for several objectives
                    trial.report(ema, report.step)
            if not self.s.study.multi_objective:
                # A trial that trained its whole budget is evaluated, not pruned on its last report.
                if self.prune and report.step < self.s.train.steps and trial.should_prune():
                    trial.set_user_attr("pruned_at_step", report.step)
                    raise optuna.TrialPruned(f"pruned at step {report.step} (smoothed loss {ema:.4g})")

        try:
            # over P ranks with trainer.expert_parallel > 1; back here as an ordinary model
            clock = time.perf_counter()
            model, result = train_architecture(arch, self.s, self.s.train, on_report, kernels)
            seconds["train"] = time.perf_counter() - clock
            measured = evaluate_and_measure(model, self.s, self.references, result, kernels)
            metrics = measured.metrics
            for name, bound in self.s.study.constraints:
                trial.set_constraint(name, metrics[name] - bound)
            objectives = [metrics[o] for o in self.s.study.objectives]
            clock = time.perf_counter()
            self.tracker.log_params(run_id, {"train_step": step_description(result)})
            self.tracker.log_metrics(run_id, metrics)
            phases = phase_metrics({**seconds, "log": seconds["log"] + time.perf_counter() - clock,
                                    **measured.seconds}, result, log, ranks=self.s.train.expert_parallel > 1)
            # the cost phase's parts: serving the models (a copy, graph captures), the timed rounds, memory
            phases.update({f"cost/{k}_s": v for k, v in measured.cost["seconds"].items()})
            self.tracker.log_metrics(run_id, phases)
            record_metrics(trial, {**metrics, **phases})
            trial.set_user_attr("weights_run_id", run_id)
            # The trial has its result: a signal from here on waits until Optuna has recorded it (the run
            # ends FINISHED with the upload, the study holds the trial complete).
            hold_to_the_end_of_the_stretch()
            # the artifacts and weights upload while the next trial trains; the run ends after them
            with between_writes():
                self.tracker.finish_trial_in_background(run_id, measured.artifacts(arch, log.routing_history), model)
                self._run = None
            return objectives[0] if len(objectives) == 1 else objectives
        except optuna.TrialPruned as e:
            self._end_run(run_id, "KILLED", {"fulu.state": "pruned", "fulu.reason": str(e)})
            raise
        except Exception as e:
            reason = failure_reason(e)
            trial.set_user_attr("fail_reason", reason)
            self._end_run(run_id, "FAILED", {"fulu.state": "failed", "fulu.reason": reason,
                                             "fulu.traceback": traceback.format_exc()[-4000:]})
            raise TrialFailed(reason) from e
        finally:
            kernels.wait()  # a failed trial's compilation: its copy of the model leaves with it
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _end_run(self, run_id: str, status: str, tags: dict | None = None) -> None:
        """The trial's run ended with the trial's outcome. A signal from here on waits until Optuna has
        recorded that outcome, rather than fail as interrupted (and queue again) a trial whose run says
        otherwise."""
        hold_to_the_end_of_the_stretch()
        self.tracker.end_trial(run_id, status, tags)
        self._run = None

    # -- reuse --------------------------------------------------------------------------------
    def _identical(self, trial: optuna.Trial, keys: set[str]):
        """An earlier trial of the same architecture, task and budget, trained and costed on this kind of
        device: one measured on another (a study resumed elsewhere) has another latency and memory, so the
        architecture is trained and measured again here. A trial from before devices were recorded counts
        as this device's."""
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        for t in trial.study.get_trials(deepcopy=False, states=states):
            if (t.number != trial.number and t.user_attrs.get("cache_key") in keys and "infeasible" not in t.user_attrs
                    and t.user_attrs.get("device", self.device) == self.device):
                return t
        return None

    def _reuse(self, trial: optuna.Trial, earlier: optuna.trial.FrozenTrial, values: dict, arch):
        trial.set_user_attr("cached_from", earlier.number)
        if earlier.state == TrialState.PRUNED:
            # pruned again without training, with a run as the trial it repeats has (MLflow and the study agree)
            step = earlier.user_attrs.get("pruned_at_step")  # none on a trial recorded before steps were
            if step is not None:
                trial.set_user_attr("pruned_at_step", step)
            run_id = self._start_run(trial, values, arch, {"fulu.cached_from_trial": earlier.number})
            trial.set_user_attr("mlflow_run_id", run_id)
            at_step = f" at step {step}" if step is not None else ""
            reason = f"identical to trial {earlier.number}, which was pruned{at_step}"
            self._end_run(run_id, "KILLED", {"fulu.state": "pruned", "fulu.reason": reason})
            raise optuna.TrialPruned(reason)
        metrics = {k: v for k, v in earlier.user_attrs["metrics"].items() if not k.startswith(RUN_METRICS)}
        run_id = self._start_run(trial, values, arch, {"fulu.cached_from_trial": earlier.number,
                                                       "fulu.weights_run_id": earlier.user_attrs.get("weights_run_id")})
        self.tracker.log_metrics(run_id, metrics)
        self._end_run(run_id, "FINISHED")
        for name, bound in self.s.study.constraints:
            trial.set_constraint(name, metrics[name] - bound)
        record_metrics(trial, metrics)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("weights_run_id", earlier.user_attrs.get("weights_run_id"))
        return earlier.values[0] if len(earlier.values) == 1 else list(earlier.values)

    # -- trials that do not run ---------------------------------------------------------------
    def _infeasible(self, trial: optuna.Trial, reason: str):
        trial.set_user_attr("infeasible", reason)
        raise optuna.TrialPruned(f"infeasible: {reason}")

    def _check_surplus(self, trial: optuna.Trial) -> None:
        """With several workers, a trial started after the requested number were already finished or
        running (a race between workers) is failed at once, before anything is sampled."""
        ahead = 0
        for t in trial.study.get_trials(deepcopy=False):
            if t.number < trial.number and (counts_toward_total(t) or t.state == TrialState.RUNNING):
                ahead += 1
        if ahead >= self.s.study.n_trials:
            trial.set_user_attr("fail_reason", "surplus: the requested trials were already taken by other workers")
            trial.set_user_attr("not_counted", True)
            raise SurplusTrial("surplus trial")


def record_metrics(trial: optuna.Trial, metrics: dict[str, float]) -> None:
    """``metrics`` on the trial: as one ``metrics`` attribute (what fulu-nas reads), and each number as an
    attribute of its own, which optuna-dashboard shows as a column to sort trials by."""
    trial.set_user_attr("metrics", metrics)
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            trial.set_user_attr(name, float(value))


def failure_reason(e: BaseException) -> str:
    """Why a training run failed, in one line (recorded on the trial and its MLflow run)."""
    if isinstance(e, TrainingDiverged):
        return f"diverged: {e}"
    if isinstance(e, BudgetCapReached):
        return f"budget cap (trainer.max_seconds): {e}"
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return f"out of memory: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if isinstance(e, TrialFailed):
        return str(e)
    return f"{type(e).__name__}: {e}"
