"""``fulu-nas search``: a Hydra app over ``fulu_nas/conf/`` (groups task, search_space, study, trainer,
tracking, experiment). With ``study.confirm.enabled=true`` the finished study is confirmed
(:mod:`.confirm`) before the job ends.

Before Hydra runs the job (and creates its output folder) the same overrides are composed with
Hydra's compose API and validated: a file that is not YAML, a malformed or infeasible space or
config, an unknown group option, a wrong storage URL, an output folder that cannot be made all end
here with one message listing every problem and exit code 2, with nothing written. Hydra's own
flags (``--help``, ``--cfg job``, ``--info``, ``-m``) go straight to Hydra.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..checks import mask_url, yaml_problem
from ..errors import FuluConfigError
from ..signals import terminate_as_interrupt

# Shipped inside the package (the top-level conf/ of a checkout links here), so a wheel install finds it.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BAD_INPUT = 2
# Flags after which Hydra prints instead of running a job: no pre-flight for these, but the ones printing the
# composed configuration compose it first as the search would, so that a misspelt key or option is one line
# (Hydra's own message advised `+key=value`, which the search then refused, or was a traceback).
_HYDRA_ONLY = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
               "--version"}
_PRINTING_CONFIG = {"--cfg", "-c", "--info", "-i"}
_MULTIRUN = {"--multirun", "-m"}  # a sweep: every job is checked before Hydra writes any
# Sections whose every key is in their shipped files: a key Hydra cannot set there is misspelt.
_FIXED_SCHEMA = ("study.", "trainer.", "tracking.")
_WITH_VALUE = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--package", "-p",
               "--experimental-rerun"}


def _flags_first(argv: list[str]) -> list[str]:
    """Hydra's parser wants flags before the overrides; accept them anywhere."""
    flags, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("-"):
            flags.append(arg)
            if arg in _WITH_VALUE or arg in _PRINTING_CONFIG:
                nxt = next(it, None)
                if nxt is not None:
                    flags.append(nxt)
        else:
            overrides.append(arg)
    return flags + overrides


def split_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Overrides, and the flags with values (``--config-dir DIR`` or ``--config-dir=DIR``)."""
    overrides, flags = [], {}
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in _WITH_VALUE:
            flags[name] = value if eq else next(it, "")
        elif name in _PRINTING_CONFIG:  # its value (--cfg job, --info searchpath) is no override
            flags[name] = value if eq else next(it, "")
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, flags


def sweep_jobs(argv: list[str]) -> list[list[str]]:
    """The arguments of each job of a multirun (``-m``): the cross product of the sweeps' values, as
    Hydra's basic sweeper runs them (its own split), with the flags of ``argv``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides, _ = split_flags(argv)
    flags = [a for a in _flags_first(argv) if a not in overrides and a not in _MULTIRUN]
    try:
        jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]
    except HydraException as e:
        raise FuluConfigError(f"configuration: {' '.join(str(e).split())}") from None
    return [[*flags, *job] for job in jobs]


def compose_config(overrides: list[str], config_dir: str | None = None, config_name: str = "config",
                   job_num: int | None = None):
    """The composed config (resolved, as plain containers) and the run's output folder: ``hydra.run.dir``, or
    for job ``job_num`` of a multirun its folder in the sweep's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if unquoted := _unquoted_options(overrides, config_dir):
        raise FuluConfigError(unquoted)
    if config_dir:
        overrides = [*overrides, f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"]
    if job_num is not None:
        overrides = [*overrides, f"hydra.job.num={job_num}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    if job_num is None:
        output_dir = OmegaConf.select(cfg, "hydra.run.dir")
    else:  # an empty sweep folder stays empty (check_output_dir refuses it): Hydra would write the jobs here
        sweep = OmegaConf.select(cfg, "hydra.sweep.dir")
        output_dir = f"{sweep}/{OmegaConf.select(cfg, 'hydra.sweep.subdir')}" if str(sweep).strip() else ""
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    resolved = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    return resolved, output_dir


def _unquoted_options(overrides: list[str], config_dir: str | None) -> list[str]:
    """The group options that YAML reads as no string (``search_space=inf``, ``123``, ``true``, ``null``), each
    with the quoting that makes it one: Hydra refuses them with a bare ValueError naming neither."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = {p.name for root in (CONF_DIR, config_dir) if root for p in Path(root).iterdir() if p.is_dir()}
    problems = []
    for o in OverridesParser.create().parse_overrides(overrides):
        value = o.value()
        if o.key_or_group in groups and o.is_sweep_override():  # search_space=a,b without --multirun
            problems.append(f"{o.input_line}: a sweep over several options: add --multirun (-m) to run one search "
                            "for each, or give one option")
            continue
        if o.key_or_group in groups and not isinstance(value, (str, list)):
            key, _, text = o.input_line.partition("=")
            read = "null" if value is None else f"{type(value).__name__} {value!r}"
            problems.append(f"{o.input_line}: YAML reads the option as {read}: quote it "
                            f"for Hydra, \"{key}='{text}'\"")
    return problems


def preflight(argv: list[str], compose_only: bool = False, job_num: int | None = None):
    """Compose and validate without writing anything (``compose_only``: compose, and check no more);
    FuluConfigError lists the problems. ``job_num``: a multirun's job, checked in its own folder."""
    from .settings import load_settings
    from .storage import check_output_dir, check_separate_databases, probe_storage, probe_tracking

    overrides, flags = split_flags(argv)
    config_dir = flags.get("--config-dir") or flags.get("-cd")
    if config_dir and not Path(config_dir).is_dir():
        raise FuluConfigError(f"--config-dir: {config_dir!r} is not a folder")
    cfg, output_dir = compose_checked(overrides, config_dir, flags.get("--config-name") or flags.get("-cn")
                                      or "config", job_num)
    if compose_only:
        return None
    problems = []  # the output folder's and the settings', listed together
    try:
        check_output_dir(output_dir, "hydra.run.dir" if job_num is None else "hydra.sweep.dir")
    except FuluConfigError as e:
        problems = e.problems
    try:
        settings = load_settings(cfg, output_dir)
    except FuluConfigError as e:
        raise FuluConfigError(problems + e.problems) from None
    if problems:
        raise FuluConfigError(problems)
    probe_storage(settings.storage_url)
    probe_tracking(settings.tracking_uri)
    check_separate_databases(settings.storage_url, settings.tracking_uri)
    check_existing_study(settings)
    return settings


def compose_checked(overrides: list[str], config_dir: str | None, config_name: str = "config",
                    job_num: int | None = None) -> tuple[dict, str]:
    """:func:`compose_config`, whose failures on the user's files and overrides are one FuluConfigError
    naming the problem (Hydra, OmegaConf and the YAML parser raise their own, some with a traceback's
    worth of text): for the search and for the commands that read its study alike."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose_config(overrides, config_dir, config_name, job_num)
    except (HydraException, OmegaConfBaseException) as e:
        raise FuluConfigError(composition_problem(e, config_dir)) from None
    except yaml.YAMLError as e:  # a config file (a space of the user's own, say) that is not YAML
        raise FuluConfigError(_yaml_problem(e)) from None
    except UnicodeDecodeError as e:  # ... or not text: Hydra's loader does not say which file
        files = [str(p) for p in sorted(Path(config_dir or CONF_DIR).rglob("*.yaml")) if not _is_utf8(p)]
        raise FuluConfigError(f"{', '.join(files) or 'a config file'}: not UTF-8 text ({e.reason} at byte "
                              f"{e.start})") from None
    except OSError:  # OmegaConf's refusal of a file whose top level is a number or a boolean
        if not_mappings := _files_not_mappings(config_dir):
            raise FuluConfigError("; ".join(f"{f}: a config file must map keys to values (its top level is a "
                                            f"{kind})" for f, kind in not_mappings)) from None
        raise


def check_existing_study(settings) -> None:
    """A study of this name that the storage holds already must resume with these settings: the checks of
    :func:`~.study.open_study` (objectives, fingerprint), made here on the study opened read-only, before
    Hydra writes the output folder (it rewrote a study folder's ``.hydra/`` with the refused overrides).
    Where there is no study yet nothing is opened or made (no database, tables or journal file)."""
    import optuna

    from .storage import open_existing_storage
    from .study import check_resumable, quiet_optuna
    from .tracking import PARENT_RUN_ATTR, moved_artifact_folder

    with quiet_optuna():
        storage = open_existing_storage(settings.storage_url)
        if storage is None:
            return
        try:
            study = optuna.load_study(study_name=settings.study.name, storage=storage,
                                      sampler=optuna.samplers.RandomSampler())
        except KeyError:  # no study of this name yet
            return
        check_resumable(study, settings)
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent:
        return
    run = _tracking_run(settings.tracking_uri, parent)
    if run is None:
        # it would log the resumed study's summary to a run this tracking database lacks: MLflow's traceback
        raise FuluConfigError(f"tracking.uri: study {settings.study.name!r} in {mask_url(settings.storage_url)} keeps "
                              f"its MLflow runs elsewhere: its parent run {parent} is not in "
                              f"{mask_url(settings.tracking_uri)}; give the tracking.uri= it was searched with")
    if moved := moved_artifact_folder(run.info.artifact_uri, settings.output_dir):
        # the resumed trials' weights would go there, making the old folder again, and no export would find them
        raise FuluConfigError(f"hydra.run.dir: study {settings.study.name!r} keeps its MLflow artifacts in {moved}, "
                              "which does not exist: was the study's folder moved from there? MLflow's runs keep "
                              "the absolute path of their artifacts: resume the study where it was searched (move "
                              "the folder back)")


def _tracking_run(uri: str, run_id: str):
    """The run ``run_id`` of the tracking store ``uri``, or None where the store lacks it; a SQLite file is
    read only if it is an MLflow database already (MLflow's client would make one)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from ..checks import check_tracking_database_exists

    try:
        check_tracking_database_exists(uri)
    except FuluConfigError:
        return None
    try:
        return mlflow.MlflowClient(uri).get_run(run_id)
    except MlflowException:
        return None


def composition_problem(e: Exception, config_dir: str | None) -> str:
    """Hydra's or OmegaConf's error composing the configuration, as one line: an unknown group option
    with the group's options (Hydra's text lists them between tabs, with its search path); a config file
    whose top level is not a mapping, named (OmegaConf's error names only the key it failed to resolve);
    a key the configuration does not have."""
    from hydra.errors import MissingConfigException

    if isinstance(e, MissingConfigException) and e.options and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return f"{group.replace('/', '.')}: no option {option!r} (options: {', '.join(sorted(e.options))})"
    if not_mappings := _files_not_mappings(config_dir):
        return "; ".join(f"{f}: a config file must map keys to values (its top level is a {kind})"
                         for f, kind in not_mappings)
    if unknown := re.match(r"Could not override '([^']+)'", str(e)):
        return _override_problem(unknown.group(1), e)
    return f"configuration: {' '.join(str(e).split())}"


def _override_problem(key: str, e: Exception) -> str:
    """A key Hydra could not set. In a section whose every key is in its shipped file it is misspelt: Hydra's
    advice, ``+key=value``, only moved the refusal to the settings. Elsewhere (a space's free-form mappings, a
    task's optional keys) it may only be absent, and then ``+`` adds it; or a mapping given for an existing
    entry was merged into it and one of its keys is the one missing, so the entry is replaced: removed first."""
    if key == "model":  # the upcycle task's own key (task/upcycle.yaml), spelt right
        return ("model: a key of task=upcycle alone (model=PATH names the encoder it upcycles): add task=upcycle or "
                "+experiment=upcycle_tiny")
    missing = getattr(e.__cause__, "full_key", key)
    # the top level is a fixed schema too (cost.rounds=0: no entry "cost" to merge into or add to)
    if "." not in key or key.startswith(_FIXED_SCHEMA) or missing == key.partition(".")[0]:
        return f"{key}: unknown key (check its spelling)"
    added = str(e).partition("To append to your config use ")[2].strip() or f"+{key}=VALUE"
    if missing != key:
        return (f"{key}: a value given for an existing entry is merged into it, which has no {missing}; to replace "
                f"the entry, remove it first: ~{key} '{added}'")
    return f"{key}: not in the configuration yet; add it with {added}"


def _files_not_mappings(config_dir: str | None) -> list[tuple[str, str]]:
    import yaml

    found = []
    for path in sorted(Path(config_dir).rglob("*.yaml")) if config_dir else []:
        try:
            top = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            continue  # reported by the composition's own error
        if top is not None and not isinstance(top, dict):
            found.append((str(path), type(top).__name__))
    return found


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return True


def _yaml_problem(e) -> str:
    """A YAML parser's error as one line naming the file (Hydra's loader names it in the error's mark)."""
    mark = getattr(e, "problem_mark", None)
    return f"{mark.name + ': ' if mark is not None else ''}malformed YAML: {yaml_problem(e)}"


_job_started = False


def _job(cfg) -> None:
    """The Hydra job: validated settings -> the study. Exits with 2 on bad input, 130 on Ctrl-C."""
    global _job_started
    _job_started = True
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from . import sweep
    from .confirm import confirm_after_search
    from .private_files import make_hydra_record_private, settings_hold_password
    from .settings import load_settings
    from .study import INTERRUPTED, run_search

    hydra_cfg = HydraConfig.get()
    try:
        settings = load_settings(OmegaConf.to_container(cfg, resolve=True), hydra_cfg.runtime.output_dir)
        if settings_hold_password(settings):
            make_hydra_record_private(settings.output_dir, Path(hydra_cfg.sweep.dir)
                                      if hydra_cfg.mode == RunMode.MULTIRUN else None)
        code = run_search(settings)
        if not code and settings.study.confirm.enabled:
            code = confirm_after_search(settings)
    except FuluConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = BAD_INPUT
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep.record(hydra_cfg, code)
        if code != INTERRUPTED:
            return  # the sweep goes on: main ends it with the jobs' list and the first failure's code
    if code:
        sys.exit(code)


def main(argv: list[str]) -> int:
    # SIGTERM is a Ctrl-C for the command (its default action ended it with no word while the checks, Hydra's
    # set-up and the study's opening wrote the output folder); the search's own handlers take over while it
    # runs its trials (study.stop_signals_as_interrupt)
    with terminate_as_interrupt():
        return _main(argv)


def _main(argv: list[str]) -> int:
    import hydra

    from . import sweep
    from .tracking import quiet_mlflow

    quiet_mlflow()
    flags = set(a.partition("=")[0] for a in argv)
    printing = bool(flags & _PRINTING_CONFIG)
    jobs = [argv]
    if printing or not flags & _HYDRA_ONLY:
        try:
            multirun = bool(flags & _MULTIRUN)
            jobs = sweep_jobs(argv) if multirun else [argv]
            studies: dict[tuple[str, str], int] = {}
            for n, job in enumerate(jobs):
                job_overrides = " ".join(split_flags(job)[0])
                try:
                    settings = preflight(job, compose_only=printing, job_num=n if multirun else None)
                except FuluConfigError as e:
                    if len(jobs) == 1:
                        raise
                    raise FuluConfigError([f"job {n} ({job_overrides}): {p}" for p in e.problems]) from None
                if settings is not None:  # two jobs of one study: the second resumed (or refused) the first's
                    where = (settings.storage_url, settings.study.name)
                    if where in studies:
                        raise FuluConfigError(
                            f"job {n} ({job_overrides}): study.name: {settings.study.name!r} in "
                            f"{mask_url(settings.storage_url)} is job {studies[where]}'s study too: give each job its "
                            "own study.name (sweep it too, or name the swept key in it, e.g. "
                            "\"study.name=mine-${study.seed}\")")
                    studies[where] = n
        except FuluConfigError as e:
            print("error: invalid search configuration:\n  - " + "\n  - ".join(e.problems), file=sys.stderr)
            return BAD_INPUT
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_job)
    global _job_started
    _job_started = False  # this call's (a process can search more than once: the API, tests)
    sweep.start()
    saved = sys.argv
    sys.argv = ["fulu-nas search", *_flags_first(argv)]
    try:
        app()
    except ValueError as e:  # Hydra's refusal of two of its modes at once (--multirun with --cfg), a traceback
        if _job_started or not str(e).startswith("Only one of"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        sweep.print_sweep(len(jobs))  # an interrupted sweep: the jobs that ran, and those left
        # Hydra exits 1 on its own composition errors, before our job starts: that is bad input.
        return BAD_INPUT if code == 1 and not _job_started else code
    finally:
        sys.argv = saved
    sweep.print_sweep(len(jobs))
    return sweep.exit_code()
