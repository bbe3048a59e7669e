"""The composed Hydra config, validated into frozen dataclasses: everything below the CLI takes
these, never a DictConfig. :func:`load_settings` lists every problem, naming its key, in one
:class:`~fulu_nas.errors.FuluConfigError`, before anything is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import interop  # noqa: F401  (registers the upcycle task among TASKS)
from ..checks import (
    check_int,
    check_number,
    device_problem,
    is_folder_name,
    is_tracking_server,
    server_address,
    url_without_password,
)
from ..errors import FuluConfigError
from ..tasks import TASKS, Task, build_task, task_parameters
from ..training.train import (
    SEED_MAX,
    TrainConfig,
    batch_problem,
    check_checkpointing,
    config_problems,
    device_setting_problem,
    resolve_device,
    step_kind,
    uses_cuda_graph,
)
from .family import PIMOE, family_for
from .feasibility import check_feasible
from .space import Param, SearchSpace, parse_space
from .storage import check_storage_url, check_tracking_uri

ARTIFACTS_FOLDER = "mlartifacts"  # in a study's folder: its runs' artifacts (with a database URI, no server)
SAMPLERS = ("tpe", "nsga2", "random", "grid", "gp")
PRUNERS = ("median", "hyperband", "none")
# Objective -> direction (None: the task's metric decides).
OBJECTIVES: dict[str, str | None] = {
    "loss": "minimize", "metric": None, "routing_accuracy": "maximize", "load_balance": "maximize",
    "latency_ms": "minimize", "latency_ratio": "minimize", "throughput": "maximize", "peak_memory_mb": "minimize",
    "active_params": "minimize", "total_params": "minimize",
}
# Quantities a study may bound from above (Optuna trial constraints: feasible when value <= bound).
CONSTRAINABLE = ("loss", "latency_ms", "latency_ratio", "peak_memory_mb", "active_params", "total_params")
_SECTIONS = {"task", "search_space", "study", "trainer", "tracking"}
# Top-level shorthands a task's config defines for one of its own keys (task=upcycle: model=PATH is task.model).
_SHORTHANDS = {"model"}
# trainer.max_seconds is the search's safety cap (TrainConfig.seconds_cap): a trial's budget is its steps alone.
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)} - {"progress", "dynamic_experts", "seconds_cap"}
_COST_FIELDS = {"cost_shapes", "cost_iterations", "cost_rounds", "cost_compile_while_training"}
# The most architectures (top_k) and seeds a confirmation takes. It trains (top_k + 1) x seeds runs, each
# budget_factor times a trial's budget: a thousand of either is far past any confirmation (three seeds make
# its t-tests worth reading, docs/confirm.md) and far below what its plan holds in memory (seeds=10**9 was
# a tuple of a billion seeds, built before anything ran).
CONFIRM_MAX = 1000
# The most times a trial's budget a confirmation (budget_factor) or an export (retrain_factor) trains: far
# past any use, and a step count that exists (1e308 x trainer.steps overflowed to infinity, a traceback).
BUDGET_FACTOR_MAX = 1000


@dataclass(frozen=True)
class ConfirmSettings:
    """``study.confirm``: the final evaluation of the study's best architectures (:mod:`.confirm`);
    ``enabled`` runs it at the end of ``fulu-nas search``, the rest are ``fulu-nas confirm``'s defaults."""

    enabled: bool = False
    top_k: int = 8
    budget_factor: float = 4.0
    seeds: int = 3


@dataclass(frozen=True)
class StudySettings:
    name: str
    n_trials: int
    n_workers: int
    storage: str | None
    sampler: str
    pruner: str
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    constraints: tuple[tuple[str, float], ...]
    seed: int
    startup_trials: int
    heartbeat_interval: int
    grace_period: int
    max_retry: int
    confirm: ConfirmSettings = ConfirmSettings()

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


@dataclass(frozen=True)
class TrackingSettings:
    uri: str | None
    experiment: str
    log_weights: bool


@dataclass(frozen=True)
class CostSettings:
    shapes: tuple[tuple[int, int], ...]
    iterations: int
    rounds: int = 5
    # on CUDA, compile the served forward's kernels while the trial trains (deploy.cost.ServedKernelWarmup)
    compile_while_training: bool = True


# Trainer keys the trainer configs gained after studies were made without them (expert_parallel: with the
# key's introduction; cost_rounds and divergence_factor: set before only as +trainer.KEY=...), and their
# defaults (conf/trainer/default.yaml's, the code's): at these values they stay out of a study's
# fingerprint, so that the studies made before them still resume.
_LATER_TRAINER_KEYS = {"expert_parallel": 1, "cost_rounds": CostSettings.rounds, "divergence_factor":
                       TrainConfig.divergence_factor}


@dataclass(frozen=True)
class SearchSettings:
    task_name: str
    task_params: dict
    space: SearchSpace
    study: StudySettings
    train: TrainConfig
    cost: CostSettings
    tracking: TrackingSettings
    output_dir: Path
    raw: dict = field(compare=False, repr=False)
    task: Task = field(compare=False, repr=False)
    # A model folder as the command named it (raw holds its absolute path): studies fingerprinted with it
    # before the path left the fingerprint still resume.
    typed_model: str | None = field(default=None, compare=False, repr=False)
    # A corpus path as the command named it (raw holds it resolved): studies fingerprinted with it, before
    # the corpus was known by its content, still resume.
    typed_path: str | None = field(default=None, compare=False, repr=False)

    @property
    def cost_shapes(self) -> list[tuple[int, int]]:
        """The shapes the cost is measured at: the configured ones, sequences capped at the task's length
        (a model has no positions past it)."""
        return [(b, min(seq, self.task.seq_len)) for b, seq in self.cost.shapes]

    @property
    def storage_url(self) -> str:
        return self.study.storage or f"sqlite:///{(self.output_dir / 'optuna.db').resolve()}"

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{(self.output_dir / 'mlflow.db').resolve()}"

    def locating_overrides(self) -> list[str]:
        """The overrides that point ``fulu-nas confirm``, ``export`` or ``dashboard`` at this study from the
        current folder: its name, and its folder and databases where they are not the default ones (a
        multirun's job folder, say). Each is quoted for a shell; a database URL is given without its
        password (:func:`~fulu_nas.checks.url_without_password`)."""
        found = [("study.name", self.study.name)]
        if self.output_dir.resolve() != (Path("outputs") / self.study.name).resolve():
            found.append(("hydra.run.dir", str(self.output_dir.resolve())))
        if self.study.storage:
            found.append(("study.storage", url_without_password(self.study.storage)))
        if self.tracking.uri:
            found.append(("tracking.uri", url_without_password(self.tracking.uri)))
        return [shlex.quote(f"{key}={hydra_value(value)}") for key, value in found]

    def ui_command(self) -> str:
        """Where this study's MLflow runs are browsed: ``fulu-nas ui`` of its folder (the embedded database) or
        of the tracking database it was given (without a password, quoted for a shell); a tracking server's
        own address, which serves its UI (``mlflow ui`` takes no server as a store)."""
        if self.tracking.uri and is_tracking_server(self.tracking.uri):
            return server_address(self.tracking.uri)
        if self.tracking.uri:
            return f"fulu-nas ui --tracking-uri {shlex.quote(url_without_password(self.tracking.uri))}"
        return f"fulu-nas ui {shlex.quote(str(self.output_dir))}"

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts: a tracking server decides its own; with a database
        URI (no server) they go to this run's folder, not MLflow's default ``./mlruns``."""
        if self.tracking.uri and is_tracking_server(self.tracking.uri):
            return None
        return (self.output_dir / ARTIFACTS_FOLDER).resolve().as_uri()

    @property
    def corpus_sha256(self) -> str | None:
        """The digest of the corpus a task reads from disk (textlm, upcycle: the files' names and bytes and
        the split settings), None for a task that makes its data."""
        return getattr(self.task, "corpus_sha256", None)

    def task_identity(self, task_params: Mapping[str, Any], model_as_typed: bool = False,
                      corpus_by_path: bool = False) -> dict:
        """``task_params`` as a study's fingerprint and a trial's cache key hold them: a model on disk and a
        corpus are known by their content, so their paths are left out; ``model_as_typed``: as identities
        made before held them, with the model's path as the command named it; ``corpus_by_path``: as
        identities made before the corpus was digested held them, with its path as the command named it."""
        params = dict(task_params)
        if self.typed_model is not None:
            if model_as_typed:
                params["model"] = self.typed_model
            else:
                params.pop("model", None)
        if self.corpus_sha256 is not None:
            if not corpus_by_path:
                params.pop("path", None)
            elif self.typed_path is not None:
                params["path"] = self.typed_path
        return params

    def fingerprint(self, legacy: bool = False, given: frozenset[str] = frozenset(),
                    constraints_as_typed: bool = False, report_every_free: bool = False,
                    corpus_by_path: bool = False) -> str:
        """What must not change when a study resumes: space, task, budget, objectives, constraints. Not
        the space's description (prose), nor the path of a model on disk, which is known by its content,
        nor the order the constraints were typed in. ``legacy``: the fingerprint as studies made before
        kept it, with both (the model's path as typed); ``constraints_as_typed``: with the constraints in
        their typed order, as studies made before kept them; ``report_every_free``: without
        ``trainer.report_every``, as studies made before kept it; ``corpus_by_path``: with the corpus
        path as typed and without the corpus's digest, as studies made before kept it. A trainer key the
        trainer configs gained later is left out at its default (:data:`_LATER_TRAINER_KEYS`), so that the
        studies made before still resume, unless it is in ``given`` (:meth:`fingerprints`)."""
        return _digest(self.fingerprint_parts(legacy, given, constraints_as_typed, report_every_free,
                                              corpus_by_path))

    def fingerprint_parts(self, legacy: bool = False, given: frozenset[str] = frozenset(),
                          constraints_as_typed: bool = False, report_every_free: bool = False,
                          corpus_by_path: bool = False) -> dict[str, Any]:
        """What :meth:`fingerprint` digests, by part (``task``, ``search_space``, ``trainer``,
        ``objectives``, ``constraints``, ``model_sha256`` for a task starting from a model file, and
        ``corpus_sha256`` for a task reading a corpus from disk)."""
        keep = {k: copy.deepcopy(self.raw[k]) for k in ("task", "search_space", "trainer")}
        if not legacy:
            keep["search_space"].pop("description", None)
        keep["objectives"] = list(self.study.objectives)
        keep["constraints"] = list(self.study.constraints if constraints_as_typed else sorted(self.study.constraints))
        # The safety cap may change on resume: results depend on the steps alone. report_every may not:
        # what a pruner compares at a step is a moving average over the reports before it.
        free = ("device", "compile", "cuda_graph", "deterministic", "max_seconds",
                *(("report_every",) if report_every_free else ()))
        keep["trainer"] = {k: v for k, v in keep["trainer"].items() if k not in free}
        for key, default in _LATER_TRAINER_KEYS.items():
            if key in keep["trainer"] and key not in given and keep["trainer"][key] == default:
                del keep["trainer"][key]
        # A task that starts from a model on disk (upcycle): another checkpoint at the same path is another study.
        model_sha256 = getattr(self.task, "model_sha256", None)
        if model_sha256:
            keep["model_sha256"] = model_sha256
        # A corpus on disk (textlm, upcycle): other files at the same path are another study, the same files
        # at another path the same one (the stdlib corpus of another Python is another).
        if self.corpus_sha256 is not None and not corpus_by_path:
            keep["corpus_sha256"] = self.corpus_sha256
        keep["task"] = self.task_identity(keep["task"], model_as_typed=legacy, corpus_by_path=corpus_by_path)
        return keep

    def part_digests(self, corpus_by_path: bool = False) -> dict[str, str]:
        """Each part of the fingerprint as a study is made now, digested: kept with the study, so that a
        refused resume can say which part changed (``corpus_by_path``: as a study made before the corpus
        was digested kept them, to compare with one)."""
        return {part: _digest(value) for part, value in self.fingerprint_parts(corpus_by_path=corpus_by_path).items()}

    def fingerprints(self) -> set[str]:
        """The fingerprints a study of these settings may hold (:meth:`fingerprint`): as it is made now, as
        studies made before made it, and with each later trainer key at its default as given (before the
        trainer configs held ``cost_rounds`` and ``divergence_factor``, ``+trainer.cost_rounds=5`` was the
        way to give one, and went into the fingerprint)."""
        at_default = [k for k, v in _LATER_TRAINER_KEYS.items() if k != "expert_parallel"
                      and self.raw["trainer"].get(k, object()) == v]
        subsets = [frozenset(k for i, k in enumerate(at_default) if n >> i & 1) for n in range(2 ** len(at_default))]
        # A study made before the corpus was digested resumes: what it read then is unknown, and it holds the
        # corpus it resumes with from then on (open_study stores the fingerprint as it is made now).
        by_path = (False, True) if self.corpus_sha256 is not None else (False,)
        return {self.fingerprint(legacy, given, typed, free, corpus) for legacy in (False, True) for given in subsets
                for typed in (False, True) for free in (False, True) for corpus in by_path}


def hydra_value(value: str) -> str:
    """``value`` as a Hydra override gives it back as that string: as it is where Hydra's grammar reads it so,
    else in Hydra's quotes (a URL's query ``?timeout=30``, a comma, brackets: unquoted, Hydra refused the
    override or read a sweep). Each form is checked with Hydra's own parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    for form in (value, f'"{value}"', f"'{value}'", f"'{escaped}'"):  # double quotes read best inside a shell's
        try:
            if parser.parse_override(f"key={form}").value() == value:
                return form
        except Exception:  # Hydra's grammar refuses this form: the next one
            continue
    return value


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_settings(cfg: Mapping[str, Any], output_dir: str | Path, will_train: bool = True,
                  typed_model: str | None = None) -> SearchSettings:
    """Validate a composed config (a plain, resolved mapping) into :class:`SearchSettings`. ``will_train``:
    the caller trains with it here (a search, a confirmation), so a training step this machine cannot run
    is refused; a dashboard or an export of saved weights reads a finished study's settings anywhere.
    ``typed_model``: the model folder as the search's command named it, where ``cfg`` was saved with it
    resolved (:attr:`SearchSettings.typed_model`)."""
    problems: list[str] = []
    for key in sorted(set(cfg) - _SECTIONS - _SHORTHANDS - {"hydra"}):
        problems.append(f"{key}: unknown top-level key (sections: {', '.join(sorted(_SECTIONS))})")
    sections = {}
    for name in sorted(_SECTIONS):
        value = cfg.get(name)
        if not isinstance(value, Mapping):
            problems.append(f"{name}: missing or not a mapping")
            value = {}
        sections[name] = dict(value)

    raw = copy.deepcopy(sections)  # the parsers below consume their sections
    typed_path = None
    task, task_name, task_params = _task(sections["task"], problems)
    if isinstance(getattr(task, "model_path", None), str) and isinstance(raw["task"].get("model"), str):
        # The folder by its absolute path: confirm and export, run from another folder, find it again.
        typed_model = typed_model or raw["task"]["model"]
        raw["task"]["model"] = task_params["model"] = task.model_path
    if isinstance(getattr(task, "path", None), str) and isinstance(raw["task"].get("path"), str):
        # The corpus by its absolute path: search_config.json, workers, confirm and export read the same files.
        typed_path = raw["task"]["path"]
        raw["task"]["path"] = task_params["path"] = task.path
    for key in sorted(_SHORTHANDS & set(cfg)):  # +model=PATH beside a task without one was silently ignored
        if cfg[key] is not None and key not in sections["task"]:
            problems.append(f"{key}: task {task_name!r} takes no {key} (model=PATH goes with task=upcycle)")
    family = family_for(task_name)
    space = _collect(problems, lambda: parse_space(sections["search_space"], family=family))
    train, cost = _trainer(sections["trainer"], problems)
    if train is not None and will_train:
        problems += _step_problems(train, has_blocks=family is PIMOE)
    if will_train and train is not None and task is not None and (
            problem := batch_problem(train.batch_size, task.seq_len, "trainer.batch_size")):
        problems.append(problem)
    study = _study(sections["study"], task, problems)
    tracking = _tracking(sections["tracking"], problems)
    if study is not None and space is not None and study.sampler == "grid":
        _collect(problems, space.grid)
    if train is not None and space is not None and train.expert_parallel > 1:
        if family is not PIMOE:
            problems.append(f"trainer.expert_parallel: task {task_name} fine-tunes a Hugging Face model on one "
                            f"device; set trainer.expert_parallel=1")
        else:
            _check_expert_parallel(space, train.expert_parallel, problems)
    if space is not None and task is not None:
        _collect(problems, lambda: check_feasible(space, task))
    if study is not None:
        _check_measurable(study, space, task, task_name, problems)
    if will_train:  # a dashboard or an export still reads a study searched before the check
        _check_workers(raw["study"], problems)
    if problems:
        raise FuluConfigError(problems)
    return SearchSettings(task_name, task_params, space, study, train, cost, tracking, Path(output_dir),
                          raw=raw, task=task, typed_model=typed_model, typed_path=typed_path)


def _check_measurable(study: StudySettings, space: SearchSpace | None, task, task_name: str,
                      problems: list[str]) -> None:
    """Every objective and constraint is a number each trial can measure: routing accuracy needs a task
    with labelled domains, the latency ratio a reference architecture to time beside each trial."""
    used = {*study.objectives, *(name for name, _ in study.constraints)}
    if "routing_accuracy" in used and task is not None and not task.domain_names:
        problems.append(f"study.objectives: routing_accuracy needs a task whose tokens have labelled domains; "
                        f"task {task_name} has none (clusters and pimoe_mix have)")
    if "latency_ratio" in used and space is not None and space.reference is None:
        problems.append(f"study: latency_ratio is measured beside the search space's reference architecture, and "
                        f"space {space.name} has none; use latency_ms, or give the space a reference")


def _step_problems(train: TrainConfig, has_blocks: bool) -> list[str]:
    """The trainer's own refusals of a training step (``trainer.compile=compiled`` of a model without
    PiMoETransformer blocks, ``trainer.cuda_graph=true`` where the step cannot be captured), asked with what
    every trial will have: the device, expert-parallel ranks or one process, and ``has_blocks`` (the family
    trains a PiMoETransformer; an upcycled encoder has no blocks). The trainer would raise them in every
    trial, after the study's folder and runs were written."""
    device, ranks = resolve_device(train.device), train.expert_parallel > 1
    problems = []
    for check in (step_kind, uses_cuda_graph):
        try:
            check(train, device, distributed=ranks, has_blocks=has_blocks)
        except ValueError as e:
            problems.append(str(e))
    try:
        check_checkpointing(train, has_blocks)
    except ValueError as e:
        problems.append(str(e))
    return problems


def _check_expert_parallel(space: SearchSpace, P: int, problems: list[str]) -> None:
    """A trial whose num_experts is not divisible by P is infeasible (see the objective); a space
    where no value is divisible would only produce such trials: refuse it up front."""
    param = next((p for p in space.params if p.name == "num_experts"), None)
    if param is None:
        param = Param("num_experts", "categorical", ((space.base.get("moe") or {}).get("num_experts"),))
    if param.kind == "int":  # not listed: the range may span billions of values
        count = param.grid_size()
        # Equally spaced values repeat their remainders modulo P within P values: the first P tell
        shown = [param.grid_value(i) for i in range(min(count, max(P, 9)))]
        divisible = any(v % P == 0 for v in shown[:P])
    else:
        shown = [c for c in param.choices if isinstance(c, int) and not isinstance(c, bool)]
        count, divisible = len(shown), any(v % P == 0 for v in shown)
    if count and not divisible:
        problems.append(f"trainer.expert_parallel: {P} ranks need num_experts divisible by {P}, but the search "
                        f"space's num_experts takes only {', '.join(map(str, shown[:8]))}"
                        f"{' ...' if count > 8 else ''}")


def _collect(problems: list[str], make):
    try:
        return make()
    except FuluConfigError as e:
        problems.extend(e.problems)
        return None


def _task(d: dict, problems: list[str]) -> tuple[Task | None, str, dict]:
    name = d.pop("name", None)
    if not isinstance(name, str):
        problems.append(f"task.name: expected a task name, got {name!r}")
        return None, "", {}

    known = set(task_parameters(name)) if name in TASKS else set()

    def build():
        try:
            return build_task(name, **d)
        except FuluConfigError as e:
            raise FuluConfigError([_task_problem(p, known) for p in e.problems]) from None

    return _collect(problems, build), name, d


def _task_problem(problem: str, parameters: set[str]) -> str:
    """A task's message keyed like the rest: it begins with the parameter it is about, if any."""
    if problem.startswith("task"):
        return problem
    first, _, rest = problem.partition(" ")
    return f"task.{first}: {rest}" if first in parameters else f"task: {problem}"


def _int(d: dict, key: str, section: str, problems: list[str], low: int = 0, high: int | None = None) -> int:
    v = d.get(key)
    return v if check_int(f"{section}.{key}", v, problems, low, high) else low


def _choice(d: dict, key: str, section: str, options: tuple[str, ...], problems: list[str]) -> str:
    v = d.get(key)
    if v not in options:
        problems.append(f"{section}.{key}: must be one of {', '.join(options)}, got {v!r}")
    return v


def _study(d: dict, task: Task | None, problems: list[str]) -> StudySettings | None:
    n0 = len(problems)
    known = {f.name for f in fields(StudySettings)} - {"directions"}
    for key in sorted(set(d) - known):
        problems.append(f"study.{key}: unknown key")
    name = d.get("name")
    if not is_folder_name(name):
        read_as = "" if isinstance(name, str) or name is None else \
            f" (YAML read it as {type(name).__name__} {name!r}: quote it for Hydra, \"study.name='{name}'\")"
        problems.append(f"study.name: expected a plain folder name (not . or .., without / or \\), got "
                        f"{name!r}{read_as}")
    ints = {k: _int(d, k, "study", problems, *bounds) for k, bounds in
            (("n_trials", (1,)), ("n_workers", (1,)), ("seed", (0, SEED_MAX)), ("startup_trials", (0,)),
             ("heartbeat_interval", (1,)), ("grace_period", (1,)), ("max_retry", (0,)))}
    heartbeat, grace = d.get("heartbeat_interval"), d.get("grace_period")
    if (heartbeat, grace) == (ints["heartbeat_interval"], ints["grace_period"]) and type(heartbeat) is int \
            and type(grace) is int and grace <= heartbeat:  # both valid, the grace too short
        # Optuna fails a RUNNING trial whose last heartbeat is grace_period old: one still training, beating
        # every heartbeat_interval, would be failed as stale and trained again (Optuna's default is twice it).
        problems.append(f"study.grace_period: {grace} must be above study.heartbeat_interval ({heartbeat}): a "
                        f"trial still training would be failed as stale between two of its heartbeats (e.g. "
                        f"study.grace_period={4 * heartbeat})")
    sampler = _choice(d, "sampler", "study", SAMPLERS, problems)
    pruner = _choice(d, "pruner", "study", PRUNERS, problems)
    objectives = d.get("objectives")
    if isinstance(objectives, str):
        objectives = [objectives]
    directions = []
    if not isinstance(objectives, (list, tuple)) or not objectives:
        problems.append(f"study.objectives: expected a non-empty list of {', '.join(OBJECTIVES)}")
        objectives = []
    for o in objectives:
        if o not in OBJECTIVES:
            problems.append(f"study.objectives: unknown objective {o!r} (known: {', '.join(OBJECTIVES)})")
        elif o == "metric":
            directions.append("maximize" if task is None or task.higher_is_better else "minimize")
        else:
            directions.append(OBJECTIVES[o])
    if len(set(objectives)) != len(objectives):
        problems.append("study.objectives: lists an objective twice")
    if len(objectives) > 1 and pruner not in (None, "none") and pruner in PRUNERS:
        problems.append(f"study.pruner: Optuna cannot prune multi-objective studies; set study.pruner=none "
                        f"(objectives: {', '.join(map(str, objectives))})")
    if pruner in ("median", "hyperband") and list(objectives) != ["loss"] and len(objectives) == 1:
        problems.append(f"study.pruner: pruning compares the training loss, so it needs objectives: [loss] "
                        f"(got {list(objectives)}); set study.pruner=none")
    constraints = d.get("constraints") or {}
    if not isinstance(constraints, Mapping):
        problems.append("study.constraints: expected a mapping of quantity -> upper bound")
        constraints = {}
    for key, bound in constraints.items():
        if key not in CONSTRAINABLE:
            problems.append(f"study.constraints.{key}: cannot be bounded (choose from {', '.join(CONSTRAINABLE)})")
        else:
            # every bounded quantity is positive (a loss at least not negative): a bound of 0 or below
            # would make every trial infeasible, and the search end without a result
            check_number(f"study.constraints.{key}", bound, problems, 0, low_open=True)
    storage = d.get("storage")
    if storage is not None:
        _collect(problems, lambda: check_storage_url(storage))
    confirm = d.get("confirm")
    if confirm is not None and not isinstance(confirm, Mapping):
        problems.append(f"study.confirm: expected a mapping (enabled, top_k, budget_factor, seeds), got {confirm!r}")
        confirm = None
    # Studies searched before the key existed have no study.confirm: they take the defaults.
    confirm = confirm_settings(confirm or {}, "study.confirm.", problems)
    if len(problems) > n0:
        return None
    return StudySettings(name=name, storage=storage, sampler=sampler, pruner=pruner, objectives=tuple(objectives),
                         directions=tuple(directions), constraints=tuple((k, float(v)) for k, v in constraints.items()),
                         confirm=confirm, **ints)


def _check_workers(study: Mapping[str, Any], problems: list[str]) -> None:
    """At most one worker per trial: a worker trains one trial at a time, so the others would start, open
    the study and find nothing to do. (Either number invalid: its own problem says so.)"""
    n_trials, n_workers = study.get("n_trials"), study.get("n_workers")
    if type(n_trials) is int and type(n_workers) is int and 1 <= n_trials < n_workers:
        problems.append(f"study.n_workers: {n_workers} workers for study.n_trials={n_trials}: at most one worker "
                        "per trial (workers on other hosts join the study with their own command)")


def confirm_settings(d: Mapping[str, Any], prefix: str, problems: list[str],
                     defaults: ConfirmSettings = ConfirmSettings()) -> ConfirmSettings:
    """``d`` validated over ``defaults`` (keys it lacks keep their default); ``prefix`` names the keys
    in messages: ``study.confirm.`` in the config, nothing for ``fulu-nas confirm``'s own options. The
    runs' seeds count on from ``trainer.seed`` modulo 2^32, so any number of them is a seed."""
    known = {f.name for f in fields(ConfirmSettings)}
    for key in sorted(set(d) - known):
        problems.append(f"{prefix}{key}: unknown key (keys: {', '.join(sorted(known))})")
    values = {k: d.get(k, getattr(defaults, k)) for k in known}
    if not isinstance(values["enabled"], bool):
        problems.append(f"{prefix}enabled: expected true or false, got {values['enabled']!r}")
    _check_confirm_size(f"{prefix}top_k", values["top_k"], problems)
    _check_confirm_size(f"{prefix}seeds", values["seeds"], problems)
    # The confirmation trains budget_factor x trainer.steps: a longer budget than the search's, never a shorter one.
    check_number(f"{prefix}budget_factor", values["budget_factor"], problems, 1, BUDGET_FACTOR_MAX)
    return ConfirmSettings(**values)


def _check_confirm_size(key: str, value: object, problems: list[str]) -> bool:
    """Whether ``value`` is an integer from 1 to :data:`CONFIRM_MAX` (top_k or seeds)."""
    if not check_int(key, value, problems, 1):
        return False
    if value > CONFIRM_MAX:
        problems.append(f"{key}: at most {CONFIRM_MAX}, got {value} (a confirmation trains (top_k + 1) x seeds runs)")
        return False
    return True


def _trainer(d: dict, problems: list[str]) -> tuple[TrainConfig | None, CostSettings | None]:
    n0 = len(problems)
    for key in sorted(set(d) - _TRAIN_FIELDS - _COST_FIELDS):
        problems.append(f"trainer.{key}: unknown key")
    shapes = d.pop("cost_shapes", [[1, 64]])
    iterations = d.pop("cost_iterations", 10)
    ok_shapes = isinstance(shapes, (list, tuple)) and shapes and all(
        isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                              for v in s) for s in shapes)
    if not ok_shapes:
        problems.append(f"trainer.cost_shapes: expected a list of [batch, seq] positive integer pairs, got {shapes!r}")
    rounds = d.pop("cost_rounds", CostSettings.rounds)
    for key, v in (("cost_iterations", iterations), ("cost_rounds", rounds)):
        check_int(f"trainer.{key}", v, problems, 1)
    compile_while_training = d.pop("cost_compile_while_training", True)
    if not isinstance(compile_while_training, bool):
        problems.append(f"trainer.cost_compile_while_training: expected true or false, got {compile_while_training!r}")
    problems += config_problems({k: v for k, v in d.items() if k in _TRAIN_FIELDS}, "trainer.")
    device = d.get("device", "auto")
    # A well-formed GPU setting is asked of this machine too (a malformed one is named above, once).
    if device_setting_problem(device) is None and device.startswith("cuda"):
        if problem := device_problem(device, "trainer.device"):
            problems.append(f"{problem}; use trainer.device=auto or cpu")
    if len(problems) > n0:
        return None, None
    options = {k: v for k, v in d.items() if k in _TRAIN_FIELDS}
    cap = options.pop("max_seconds", None)
    train = TrainConfig(**options, seconds_cap=cap, progress=False)
    return train, CostSettings(tuple((int(b), int(s)) for b, s in shapes), iterations, rounds,
                               compile_while_training)


def _tracking(d: dict, problems: list[str]) -> TrackingSettings | None:
    n0 = len(problems)
    for key in sorted(set(d) - {"uri", "experiment", "log_weights"}):
        problems.append(f"tracking.{key}: unknown key")
    uri = d.get("uri")
    if uri is not None:
        _collect(problems, lambda: check_tracking_uri(uri))
    experiment = d.get("experiment")
    if not isinstance(experiment, str) or not experiment:
        problems.append(f"tracking.experiment: expected a name, got {experiment!r}")
    if not isinstance(d.get("log_weights", True), bool):
        problems.append("tracking.log_weights: expected true or false")
    if len(problems) > n0:
        return None
    return TrackingSettings(uri, experiment, d.get("log_weights", True))
