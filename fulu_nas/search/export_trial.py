"""usage: fulu-nas export study.name=NAME [trial=best] [retrain=false] [retrain_factor=4] [out=DIR] [name=MODEL]
                       [overrides ...]

Picks a trial of a finished (or running) study, gets its weights (saved during the search, or
retrained with a longer budget), measures it, and writes the export directory; the MLflow model is
registered as name (default: the study's name) with the alias champion.

trial: best (single-objective studies: the winner of the study's confirmation, fulu-nas confirm,
when it has one, else the search's best trial), a trial number, pareto:<i> (the i-th Pareto-optimal
trial, ordered by the first objective) or fastest_within:<pct> (the lowest latency among trials
whose loss is within pct % of the best loss). Which trial was taken, and why, is printed and kept in
the export (selected_by in metrics.json and in config.yaml's source).

Pass the overrides that locate the study when the search used them: study.storage=...,
tracking.uri=..., hydra.run.dir=..., and --config-dir DIR with its search_space=...
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import optuna

from ..checks import check_tracking_database_exists, first_few, nonfinite_tensors
from ..deploy.files import sha256_file
from ..deploy.processes import this_process
from ..errors import FuluConfigError
from ..training.train import BudgetCapReached, TrainingDiverged
from .confirm import search_ranking
from .confirm_summary import SUMMARY_ATTR, confirmed_winner, describe_winner, why_no_winner
from .family import UPCYCLE
from .interrupts import between_writes
from .killed_exports import CHAMPION, MADE_BY_TAG, OUT_GIVEN_EMPTY_TAG, OUT_TAG, undo_killed_exports
from .locate import StudyLocation, check_recordable, load_study, locate_study, search_settings, split_options
from .objective import ServedKernels, is_feasible, measure_trial_cost, pareto_front, reference_model, train_architecture
from .settings import BUDGET_FACTOR_MAX, SearchSettings
from .storage import check_output_dir, mask_url
from .study import INTERRUPTED, stop_signals_as_interrupt
from .tracking import WEIGHTS_SHA256_TAG, WRITER_TAG, export_run, moved_artifact_folder, quiet_mlflow

TrialState = optuna.trial.TrialState
EXPORT_STOPPING = "what the export wrote or registered is being removed"  # said to a signal while it stops
# The names MLflow's registry takes (it refuses '/', ':', '.', '%' and quotes), checked before anything is written.
# MLflow also refuses a name of spaces; spaces around a name are refused too (a name that only looks right).
REGISTERED_NAME = re.compile(r"[A-Za-z0-9_\-]([A-Za-z0-9_\- ]*[A-Za-z0-9_\-])?")
# A trial number or Pareto index: ASCII digits only (str.isdigit() holds for '²', which int() refuses), and
# few enough for int() (which refuses more than 4,300 digits).
NUMBER = re.compile(r"[0-9]{1,18}")
# fastest_within's and retrain_factor's: a plain decimal number, ASCII digits only (float() also takes
# '5_0' (50), '1e1', 'nan' and ' 5'), short enough to stay finite.
DECIMAL = re.compile(r"[0-9]{1,18}(\.[0-9]{1,18})?|\.[0-9]{1,18}")
RETRAIN_FACTOR = "4"  # the default: times the search's budget
OPTIONS = {"trial": "best", "retrain": "false", "retrain_factor": "", "out": "", "name": ""}
BAD_INPUT = 2


def _numbers(trials: list) -> str:
    """Trial numbers for a message: all of a few, else the first and last ones."""
    numbers = [str(t.number) for t in trials]
    return ", ".join(numbers) if len(numbers) <= 12 else f"{', '.join(numbers[:6])}, ..., {', '.join(numbers[-3:])}"


def select_trial(study: optuna.Study, s: SearchSettings, spec: str) -> optuna.trial.FrozenTrial:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        raise FuluConfigError(f"trial: study {s.study.name!r} has no complete trial yet")
    feasible = [t for t in complete if is_feasible(t)]
    if NUMBER.fullmatch(spec):  # named: taken even if it breaks the constraints (the export says so)
        match = [t for t in complete if t.number == int(spec)]
        if not match:
            trials = study.get_trials(deepcopy=False)
            numbered = [t for t in trials if t.number == int(spec)]
            state = f"is {numbered[0].state.name}, not COMPLETE" if numbered else \
                f"does not exist (its trials are 0 to {len(trials) - 1})"
            raise FuluConfigError(f"trial: trial {int(spec)} of study {s.study.name!r} {state}; complete trials: "
                                  f"{_numbers(complete)}")
        return match[0]
    if not feasible and (spec == "best" or spec.partition(":")[0] in ("pareto", "fastest_within")):
        bounds = ", ".join(f"{name} <= {bound:g}" for name, bound in s.study.constraints)
        raise FuluConfigError(f"trial: no feasible trial: all {len(complete)} complete trials of study "
                              f"{s.study.name!r} break study.constraints ({bounds}); name one with trial=N "
                              f"(one of {', '.join(str(t.number) for t in complete)}) to export it anyway")
    if spec == "best":
        if s.study.multi_objective:
            raise FuluConfigError(f"trial: study {s.study.name!r} has {len(s.study.objectives)} objectives "
                                  f"({', '.join(s.study.objectives)}), so there is no single best trial: choose "
                                  f"trial=pareto:<i> (0..{len(pareto_front(study)) - 1}) or trial=fastest_within:<pct>")
        sign = 1 if s.study.directions[0] == "minimize" else -1
        return min(feasible, key=lambda t: sign * t.values[0])
    kind, _, arg = spec.partition(":")
    if kind == "pareto":
        front = pareto_front(study) if s.study.multi_objective else \
            [select_trial(study, s, "best")]
        if not NUMBER.fullmatch(arg) or int(arg) >= len(front):
            raise FuluConfigError(f"trial: pareto:<i> needs i in 0..{len(front) - 1}, got {arg!r}")
        return front[int(arg)]
    if kind == "fastest_within":
        if not DECIMAL.fullmatch(arg):
            raise FuluConfigError(f"trial: fastest_within:<pct> needs a finite percentage >= 0, a plain decimal "
                                  f"number such as 5 or 2.5, got {arg!r}")
        pct = float(arg)
        best_loss = min(t.user_attrs["metrics"]["loss"] for t in feasible)
        close = [t for t in feasible if t.user_attrs["metrics"]["loss"] <= best_loss * (1 + pct / 100)]
        # latency_ratio (beside the reference, in the same rounds) is robust to the machine's load; studies
        # measured before it existed have latency_ms only.
        key = "latency_ratio" if all("latency_ratio" in t.user_attrs["metrics"] for t in close) else "latency_ms"
        return min(close, key=lambda t: t.user_attrs["metrics"][key])
    raise FuluConfigError(f"trial: expected best, a trial number, pareto:<i> or fastest_within:<pct>, got {spec!r}")


def choose_trial(study: optuna.Study, s: SearchSettings, spec: str) -> tuple[optuna.trial.FrozenTrial, str]:
    """:func:`select_trial`, except that ``best`` takes the confirmed winner when the study was confirmed
    (its mean over seeds at the longer budget is the better estimate); and how it was chosen, in words."""
    winner = confirmed_winner(study) if spec == "best" else None
    if winner is None:
        trial = select_trial(study, s, spec)
        why = why_no_winner(study.user_attrs.get(SUMMARY_ATTR))
        return trial, f"trial={spec}" + (f" (the best trial of the search; {why})" if spec == "best" else "")
    confirmation = study.user_attrs[SUMMARY_ATTR]
    confirmed = {a["arch_hash"] for a in confirmation["architectures"]}
    newer = [t.number for t in search_ranking(study, s)[:confirmation["top_k"]]
             if t.user_attrs["arch_hash"] not in confirmed]
    if newer:  # trials added since: the confirmation no longer holds the search's best architectures
        raise FuluConfigError(
            f"trial: the study's confirmation is out of date: trial(s) {', '.join(map(str, newer))} ranked among the "
            f"search's best {confirmation['top_k']} architectures after it ran; run fulu-nas confirm "
            f"{' '.join(s.locating_overrides())} again, or name a trial (trial=N)")
    return select_trial(study, s, str(winner["trial"])), f"trial=best: {describe_winner(winner)}"


def trial_model(location: StudyLocation, s: SearchSettings, trial: optuna.trial.FrozenTrial, retrain: bool,
                factor: float):
    """The trial's model with its saved weights, or retrained for ``factor`` times the search budget (as the
    search and the confirmation train: over ``trainer.expert_parallel`` ranks when it is > 1)."""
    import mlflow
    from safetensors.torch import load_model

    family = s.space.family
    arch = family.arch_from_dict(trial.user_attrs["arch"])
    if retrain:
        # On the search's device (trainer.device), as the confirmation trains: "auto" took a GPU for a study
        # searched on the CPU, which then is not the search's model again, nor measured where it trained.
        budget = replace(s.train, steps=int(s.train.steps * factor), progress=True,
                         seconds_cap=s.train.seconds_cap * factor if s.train.seconds_cap else None)
        kernels = ServedKernels(s)  # the cost measured next uses the served forward's kernels compiled meanwhile
        try:
            model, result = train_architecture(arch, s, budget, None, kernels)
        finally:
            kernels.wait()
        return model.cpu().float(), {"retrained": True, "retrain_steps": result.steps,
                                     "retrain_seconds": result.seconds}
    model = family.build(arch, s.task, s.train.seed)  # the trial's weights replace the initial ones
    run_id = trial.user_attrs.get("weights_run_id")
    client = mlflow.MlflowClient(location.tracking_uri)
    try:
        run = client.get_run(run_id) if run_id else None
    except mlflow.exceptions.MlflowException:  # another study's tracking database, or the run was removed
        raise FuluConfigError(f"tracking.uri: trial {trial.number}'s MLflow run {run_id} is not in "
                              f"{mask_url(location.tracking_uri)}; pass the search's tracking.uri= (or retrain=true "
                              "to train the trial again)") from None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, "model.safetensors", tmp) if run else None
            if path is None:
                raise FileNotFoundError
            recorded = run.data.tags.get(WEIGHTS_SHA256_TAG)
            if recorded != sha256_file(Path(path)):
                raise FuluConfigError(
                    f"trial: trial {trial.number}'s weights in MLflow (run {run_id}) "
                    + ("are not the ones the search uploaded (their SHA-256 differs from the run's "
                       f"{WEIGHTS_SHA256_TAG} tag)" if recorded else
                       f"have no recorded SHA-256 ({WEIGHTS_SHA256_TAG}: searched by an older fulu-nas)")
                    + "; pass retrain=true to train the architecture again")
            load_model(model, path, strict=True)
    except (FileNotFoundError, OSError, mlflow.exceptions.MlflowException):
        if run is not None and run.info.status == "RUNNING":
            raise FuluConfigError(f"trial: trial {trial.number}'s weights are still being uploaded by the search "
                                  f"(its MLflow run {run_id} is open); export it once that run has ended") from None
        if run is not None and (moved := moved_artifact_folder(run.info.artifact_uri, location.output_dir)):
            raise FuluConfigError(f"trial: trial {trial.number}'s weights are recorded in {moved}, which does not "
                                  "exist: was the study's folder moved from there? MLflow's runs keep "
                                  "the absolute path of their artifacts: export from the folder where the search "
                                  "ran (or move it back), or pass retrain=true to train the trial again") from None
        raise FuluConfigError(f"trial: trial {trial.number} has no saved weights (was tracking.log_weights false, or "
                              "did their upload fail?); pass retrain=true to train it again") from None
    return model, {"retrained": False, "weights_run_id": run_id}



def model_card(s: SearchSettings, location: StudyLocation, trial, config: dict, metrics: dict, name: str) -> str:
    from ..deploy.export import metric_rows
    from ..deploy.routing_words import batching_note, routing_words

    arch = config["architecture"]
    moe = arch["moe"]
    values = ", ".join(f"{o} = {v:.4g}" for o, v in zip(s.study.objectives, trial.values, strict=True))
    rows = metric_rows(metrics)
    return f"""# {name}: PiMoE model (trial {trial.number} of study {s.study.name})

A {arch['num_layers']}-layer decoder of width {arch['hidden_size']} whose PiMoE layers {routing_words(moe)}
(router `{moe['router']}`, expert width {moe['expert_ffn_size']}, {moe['num_shared_experts']} shared experts),
found by fulu-nas for the task `{s.task_name}`. {batching_note(moe)}

## How it was found
Study `{s.study.name}` ({mask_url(location.storage_url)}), search space `{s.space.name}`, sampler
`{s.study.sampler}`, objectives {', '.join(s.study.objectives)}; trial {trial.number}: {values}.
Parameters: {', '.join(f'{k}={v}' for k, v in trial.params.items())}. Selected by {metrics['selected_by']}.
{'Retrained with a longer budget before export.' if metrics.get('retrained') else
 "Weights are the trial's own, saved during the search."}

## Metrics (measured on the exported weights, {metrics.get('device', 'cpu')})
| metric | value |
|---|---|
{rows}

## Use it
```python
import fulu_nas
model = fulu_nas.load(".", expected_sha256="FINGERPRINT")  # nn.Module; every file checked first
```
Serve: `fulu-nas serve . --sha256 FINGERPRINT --port 5001` (the fingerprint `fulu-nas export` printed:
every file is checked before MLflow runs any of them), then POST `{{"inputs": [[1, 2, 3]]}}` to
`/invocations`; the registered model is `models:/{name}@champion` (`fulu-nas serve models:/{name}@champion`).
The architecture is in `config.yaml`; the full configuration in `architecture` rebuilds the module.
With torch alone, load `model.pt2` as the last section shows.
"""


def registry_before(client, name: str) -> tuple[bool, str | None]:
    """Whether the registered model ``name`` exists, and the version its ``champion`` alias names (None for
    none): what undoing a registration puts back."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False, None
    try:
        return True, client.get_model_version_by_alias(name, CHAMPION).version
    except MlflowException as e:
        if e.error_code != "INVALID_PARAMETER_VALUE":  # MLflow's answer for an alias the model lacks
            raise
        return True, None


def register_files(client, out: Path, manifest: dict[str, str], name: str, logged_ids: list[str]) -> str:
    """Register the MLflow model of the export folder ``out`` as a new version of ``name`` (in the active
    run): the files of ``manifest`` themselves, copied as they are checked, so that the version holds the
    bytes the export wrote (``log_model`` would save, and upload, a model of its own making). The version;
    the logged model it makes is added to ``logged_ids`` as soon as it exists (an undone export deletes it)."""
    import mlflow

    from ..deploy.export import CHECKSUMS, FOLDER_ONLY
    from ..deploy.files import checked_copy

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model"
        if problems := checked_copy(out, manifest, CHECKSUMS, ignore=FOLDER_ONLY, into=staged):
            raise FuluConfigError(problems)  # the folder changed while it was being registered
        logged = mlflow.initialize_logged_model(name="model")
        logged_ids.append(logged.model_id)
        client.log_model_artifacts(logged.model_id, str(staged))
    client.finalize_logged_model(logged.model_id, "READY")
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow's two lines; the export prints its own, with the alias
        return str(mlflow.register_model(f"models:/{logged.model_id}", name).version)


def make_registered_model(client, name: str, run_id: str) -> tuple[bool, str | None]:
    """Make the registered model ``name`` tagged as made by the export run ``run_id``, in one write: the next
    export removes it, should this one be killed before its version is registered. What
    :func:`registry_before` says now (another export may have made it since it looked)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags={MADE_BY_TAG: run_id})
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return registry_before(client, name)
    return False, None


def undo_registration(client, name: str, version: str | None, before: tuple[bool, str | None],
                      logged_ids: list[str]) -> None:
    """Put the registry back as :func:`registry_before` found it: the new version gone (and the model, if the
    export made it), ``champion`` on the version it named (deleting the new version removed its alias), and
    the logged models the export made deleted (the experiment lists them beside its runs)."""
    existed, champion = before
    if not existed:
        with contextlib.suppress(Exception):  # not made yet: the export stopped before registering
            client.delete_registered_model(name)
    else:
        if version is not None:
            client.delete_model_version(name, version)
        if champion is not None:
            client.set_registered_model_alias(name, CHAMPION, champion)
    for model_id in logged_ids:
        client.delete_logged_model(model_id)


def export_trial(location: StudyLocation, options: dict[str, str]) -> Path:
    import mlflow

    from ..deploy.export import (
        FINGERPRINT_TAG,
        FORMAT_VERSION,
        check_out_folder,
        check_out_name,
        fingerprint,
        missing_folders,
        pyfunc_manifest,
        remove_empty_folders,
        write_export,
    )
    from ..deploy.serve import record_registered_files
    from ..training.evaluate import evaluate
    from ..training.train import resolve_device

    retrain = options["retrain"].lower() in ("1", "true", "yes")
    if options["retrain"].lower() not in ("0", "1", "true", "false", "yes", "no"):
        raise FuluConfigError(f"retrain: expected true or false, got {options['retrain']!r}")
    if options["retrain_factor"] and not retrain:  # taken and ignored: the saved weights were exported
        raise FuluConfigError(f"retrain_factor: only used with retrain=true (the saved weights are exported "
                              f"as they are); add retrain=true or leave retrain_factor={options['retrain_factor']} out")
    factor_text = options["retrain_factor"] or RETRAIN_FACTOR
    factor = float(factor_text) if DECIMAL.fullmatch(factor_text) else math.nan
    if not (0 < factor <= BUDGET_FACTOR_MAX):  # 0 exported an untrained model
        raise FuluConfigError(f"retrain_factor: expected a number > 0 and at most {BUDGET_FACTOR_MAX} (times the "
                              f"search's budget), got {factor_text!r}")
    # Before MLflow opens it: it would make a missing database (and then miss the trial's run in it).
    check_tracking_database_exists(location.tracking_uri)
    study = load_study(location)
    s = search_settings(location, study, will_train=retrain)
    steps = s.train.steps * factor
    if retrain and not (math.isfinite(steps) and int(steps) >= 1):  # int(): as trial_model trains
        raise FuluConfigError(f"retrain_factor: {factor_text} times the search's {s.train.steps} "
                              f"steps is {steps:g} steps, not a number of steps to train (at least 1)")
    trial, selected_by = choose_trial(study, s, options["trial"])
    over = [key for key, value in trial.constraints.items() if value > 0]
    if over:  # only a trial named by number can break them: said in the console, metrics.json and the card
        selected_by += f"; it breaks study.constraints ({', '.join(over)})"
    name = options["name"] or f"{s.study.name}"
    if not REGISTERED_NAME.fullmatch(name):
        raise FuluConfigError(f"name: {name!r} cannot name an MLflow registered model (letters, digits, '-', '_' "
                              "and spaces, not at either end; no '/', ':', '.', '%' or quotes): pass name=")
    # expanduser: a '~' the shell left (quoted, or sh) named a folder called '~' in the current one.
    out = Path(options["out"]).expanduser() if options["out"] else location.output_dir / f"export-trial{trial.number}"
    check_out_name(out)  # before the path is looked at: a name too long for the file system raised there
    if out.is_symlink():
        # Follow a link to its folder now: the final rename would fail on the link itself, after all the work.
        try:
            out = out.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling, or a loop
            raise FuluConfigError(f"out: {out} is a symbolic link to nothing (a missing path or a loop); pass "
                                  "the folder itself") from None
        check_out_name(out)  # the folder the link names is the one written beside
    check_recordable(location, study_database=False)  # the registered model, its run and artifacts
    client = mlflow.MlflowClient(location.tracking_uri)
    # Before the folder's check: a killed export's unannounced folder is what the same command would trip on.
    with between_writes():  # MLflow's writes: a Ctrl-C waits for them
        undone = undo_killed_exports(client, s.tracking.experiment, study)
    for line in undone:
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)
    existed = out.is_dir()  # an empty folder given: made again, with its mode, if the registration fails
    mode = out.stat().st_mode & 0o7777 if existed else None
    check_out_folder(out)
    made = missing_folders(out.parent)  # what the export makes: removed again if it fails
    check_output_dir(str(out.parent), "out")

    # Said once the trial's weights load and pass their checks, so that a refusal is the one message; a
    # retraining (long) is said before it starts.
    announce = f"exporting trial {trial.number}: {selected_by}"
    if retrain:
        print(announce)
    try:
        model, provenance = trial_model(location, s, trial, retrain, factor)
    except (TrainingDiverged, BudgetCapReached) as e:  # a failed retraining: nothing to export
        raise FuluConfigError(f"retrain: retraining trial {trial.number} "
                              f"{'diverged' if isinstance(e, TrainingDiverged) else 'stopped'}: {e}; nothing was "
                              "exported") from None
    # Training checks the loss every report_every steps, not the weights: NaN weights would be evaluated,
    # measured, written and registered as the champion, which fulu_nas.load then refuses.
    if nonfinite := nonfinite_tensors(model.state_dict().items()):
        whose = (f"retrain: retraining trial {trial.number} left" if retrain else
                 f"trial: trial {trial.number}'s saved weights hold")
        raise FuluConfigError(f"{whose} NaN or infinite values in {first_few(nonfinite)}; nothing was "
                              "exported")
    if not retrain:
        print(announce)
    # Measured as the search measured its trials: on the search's device (the GPU preset's cost is the
    # bf16 forward replayed from CUDA graphs; a CPU would take minutes for it and measure something else).
    device = resolve_device(s.train.device)
    model.to(device)
    quality = evaluate(model, s.task)
    cost, cost_metrics = measure_trial_cost(model, s, reference_model(s, device))
    model.cpu()
    metrics = {k: v for k, v in quality.items() if isinstance(v, (int, float))}
    metrics.update(cost_metrics, device=cost["device"], selected_by=selected_by, **provenance)
    config = {"format": FORMAT_VERSION, "architecture": model.arch.to_dict(),
              "task": {"name": s.task_name, **s.task_params},
              "source": {"study": s.study.name, "storage": mask_url(location.storage_url), "trial": trial.number,
                         "params": dict(trial.params), "objectives": list(s.study.objectives),
                         "values": list(trial.values), "search_space": s.space.name,
                         "mlflow_run_id": trial.user_attrs.get("mlflow_run_id"), "selected_by": selected_by},
              "registered_model": name, "torch_version": str(__import__("torch").__version__)}
    upcycled = s.space.family is UPCYCLE  # a transformers folder with the PiMoE layers, not a PiMoETransformer
    # The folder is written, then recorded in the study's MLflow: a searched model is registered (the same
    # pyfunc, nested under the study's parent run), an upcycled one's run keeps its record and card. A
    # failure, Ctrl-C or SIGTERM removes the folder and the new version and ends the run, so that a failed
    # export leaves nothing a re-run would trip on, nor a version `fulu-nas serve` cannot check.
    version = run_id = before = digest = None
    placed = False  # the export's folder renamed to out: the only thing at out a failure may remove
    stage = "writing"  # what an OSError failed at: the folder's writing, or the export's record in MLflow
    logged_ids: list[str] = []
    recording = contextlib.ExitStack()

    def record(folder: Path) -> None:
        """The export's run, made with the folder written and before it is renamed into place: what the next
        export undoes, should this one be killed (killed_exports): its writer, folder and files. A kill
        after the rename then leaves a run that names the folder, not a folder nothing names."""
        nonlocal digest, run_id, stage
        digest = fingerprint(folder)
        stage = "recording"
        tags = {WRITER_TAG: this_process(), OUT_TAG: str(out.resolve()), FINGERPRINT_TAG: digest,
                OUT_GIVEN_EMPTY_TAG: str(existed).lower()}
        # A signal arriving from here on is raised when the recording ends, never inside a database write
        # (which could leave the tracking database locked for the steps that undo the export below).
        recording.enter_context(between_writes())
        recording.enter_context(export_run(location.tracking_uri, s.tracking.experiment, study, trial.number,
                                           metrics, tags))
        run_id = mlflow.active_run().info.run_id
        stage = "writing"  # the rename into place comes next

    try:
        with recording:
            if upcycled:
                from .export_upcycled import RECORDED, write_upcycled_export

                write_upcycled_export(location, s, study, trial, model, config, metrics, out, before_rename=record)
                placed, stage = True, "recording"
                for file in RECORDED:
                    mlflow.log_artifact(str(out / file))
            else:
                write_export(out, model, config, metrics, model_card(s, location, trial, config, metrics, name),
                             before_rename=record)
                placed, stage = True, "recording"
                before = registry_before(client, name)
                if not before[0]:
                    before = make_registered_model(client, name, run_id)
                manifest = pyfunc_manifest(out)
                version = register_files(client, out, manifest, name, logged_ids)
                # The registered files' SHA-256 in the tracking database, which `fulu-nas serve` checks them
                # against: those the export wrote, once the artifact store gives them back.
                registered = record_registered_files(client, name, version, manifest, location.tracking_uri)
                client.set_model_version_tag(name, version, FINGERPRINT_TAG, digest)  # the folder's
                client.set_registered_model_alias(name, CHAMPION, version)
    except BaseException as e:
        # Not before it is placed: a folder that appeared at out since its check (another export to the
        # same out, another writer) is what refused this export, and is not this export's to remove.
        if placed:
            shutil.rmtree(out, ignore_errors=True)
        with contextlib.suppress(OSError):
            if existed and not out.exists():
                out.mkdir()
                out.chmod(mode)
            remove_empty_folders(made)
        with contextlib.suppress(Exception):  # best effort: the registry may be what failed
            if before is not None:
                undo_registration(client, name, version, before, logged_ids)
            if run_id is not None:  # ended FINISHED when the signal was raised after its block
                client.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if isinstance(e, mlflow.exceptions.MlflowException):  # one line: the name refused, or the registry
            option = "name" if e.error_code == "INVALID_PARAMETER_VALUE" and not upcycled else "tracking.uri"
            what = "recording the export" if upcycled else f"registering {name!r}"
            raise FuluConfigError(f"{option}: {what} in {mask_url(location.tracking_uri)} failed, so nothing was "
                                  f"exported: {(e.message or str(e)).splitlines()[0]}") from None
        if isinstance(e, OSError):  # a disk full, a folder that cannot be written: the folder's or the store's
            where = (f"out: writing {out}" if stage == "writing" else
                     f"tracking.uri: {'recording the export' if upcycled else f'registering {name!r}'} in "
                     f"{mask_url(location.tracking_uri)}")
            raise FuluConfigError(f"{where} failed, so nothing was exported: {e}") from None
        raise
    print(f"exported trial {trial.number} of study {s.study.name} to {out} (fingerprint {digest}"
          + ("; load it with fulu_nas.load(FOLDER, expected_sha256=FINGERPRINT))" if upcycled else
             f")\nregistered as models:/{name}@champion (version {version}, files {registered})"))
    return out


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if "name=" in argv:  # an empty name registered the model under the study's name, unasked
        print("error: cannot export:\n  - name: empty; give the registered model's name, or leave name= out for "
              "the study's name", file=sys.stderr)
        return BAD_INPUT
    quiet_mlflow()
    try:
        options, overrides = split_options(argv, OPTIONS)
        # SIGTERM (`timeout`, `docker stop`, a batch scheduler) stops the export as Ctrl-C does: its default
        # action would kill the process before anything is undone, leaving a folder that was never registered
        # (or a partial one) and the export's MLflow run RUNNING.
        with stop_signals_as_interrupt(EXPORT_STOPPING):
            export_trial(locate_study(overrides), options)
    except FuluConfigError as e:
        print("error: cannot export:\n  - " + "\n  - ".join(e.problems), file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: nothing was exported (the folder and a new registered version are removed, the alias "
              "champion is where it was, and the export's run is ended)", file=sys.stderr)
        return INTERRUPTED
    return 0
