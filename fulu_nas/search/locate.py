"""Find an existing study from command-line overrides, for the commands that read one
(``fulu-nas export``, ``fulu-nas dashboard``, ``fulu-nas confirm``).

``study.name=NAME`` (plus ``study.storage=``, ``tracking.uri=`` or ``hydra.run.dir=`` when the
search used them) is composed with the same Hydra config as ``fulu-nas search``, so a study is
found where the search put it: ``outputs/NAME/optuna.db`` by default. The search's full
configuration comes back too (from ``search_config.json`` in its folder, or the parent MLflow
run's artifact when the study lives on a server), as :class:`~fulu_nas.search.SearchSettings`.

These commands work with the search's own settings, so any other override would be ignored. One
is taken only when it repeats the search's setting (the search's own command line, a group choice
such as ``search_space=`` that ``--config-dir`` needs, pass as they are); one that differs from it
(``trainer.steps=40`` for a 60-step study) is refused by :func:`search_settings`, naming it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..checks import is_tracking_server
from ..errors import FuluConfigError
from .settings import SearchSettings, load_settings
from .storage import (
    check_output_dir,
    check_separate_databases,
    check_sqlite_writable,
    check_study_storage_exists,
    check_tracking_uri,
    mask_url,
    probe_tracking,
)
from .tracking import flatten

# The overrides that say where the study is: always taken (hydra.run.dir: its folder).
LOCATING = ("study.name", "study.storage", "tracking.uri", "hydra.run.dir")
# Top-level shorthands of the config and the key they set (model=PATH: task.model).
SHORTHANDS = {"model": "task.model"}
DEFAULT_HINT = ("; only the overrides that locate the study are taken (study.name=, study.storage=, "
                "tracking.uri=, hydra.run.dir=, --config-dir DIR with its search_space=), and others only when "
                "they repeat the search's own settings")


@dataclass(frozen=True)
class StudyLocation:
    name: str
    storage_url: str
    tracking_uri: str
    output_dir: Path
    # The other overrides, each with the config paths it sets and the composed config: checked against
    # the search's own settings by search_settings (an override that differs would be ignored).
    requested: tuple[tuple[str, tuple[str, ...]], ...] = ()
    composed: dict[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)
    hint: str = DEFAULT_HINT


def split_options(argv: list[str], options: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` arguments whose key is one of ``options`` (the command's own), and the rest
    (Hydra overrides). Defaults come from ``options``. An option given empty (``top_k=``, an unset shell
    variable) or twice is refused: either was taken without a word (the default, the last value); so is an
    override given twice, and an override that locates the study (:data:`LOCATING`) given empty."""
    own, rest, given, problems = dict(options), [], {}, []
    overridden: dict[str, str] = {}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not (eq and key in options):
            path = key.lstrip("+~")  # +key=, ++key= and ~key= set or remove the same key
            if eq and path in overridden:  # Hydra took the last one
                problems.append(f"{path}: given twice ({overridden[path]!r}, then {value!r}); give it once")
            elif eq and path in LOCATING and not value.strip() and not key.startswith("~"):  # ~key= deletes
                # hydra.run.dir= was the current folder
                problems.append(f"{path}: empty (an unset shell variable?); give a value, or leave {key}= out")
            rest.append(arg)
            if eq:
                overridden[path] = value
        elif value == "":
            problems.append(f"{key}: empty; give a value, or leave {key}= out for its default")
        elif key in given:
            problems.append(f"{key}: given twice ({given[key]!r}, then {value!r}); give it once")
        else:
            own[key] = given[key] = value
    if problems:
        raise FuluConfigError(problems)
    return own, rest


# The flags of a search that change where its configuration is read from.
STUDY_FLAGS = ("--config-dir", "-cd")


def locate_study(overrides: list[str], hint: str = DEFAULT_HINT) -> StudyLocation:
    """Where the study is. ``hint``: what to say after naming an override the command would ignore (the
    command's own options, say).

    A plain ``key=value`` of a key that the default configuration lacks and only the search's own groups
    or ``+`` gave it (``task.val_sequences=128``, which ``+experiment=tiny`` set to 64) cannot be composed,
    and Hydra's advice, ``+task.val_sequences=128``, was then refused for differing from the search: such
    an override is compared with the search's setting at once, refused when it differs, and taken when it
    repeats it (left out: the command works with the search's settings anyway)."""
    try:
        return _compose_location(overrides, hint)
    except FuluConfigError as failed:
        found = _search_keys_given(overrides, hint)
        if found is None:
            raise
        where, searched, plain = found
        composed: dict = {}
        for o in plain:
            *sections, leaf = o.key_or_group.split(".")
            node = composed
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = o.value()
        try:
            check_overrides_are_used(replace(where, requested=tuple((o.input_line, (o.key_or_group,)) for o in plain),
                                             composed=composed), searched.raw, searched.typed_model)
        except FuluConfigError as differ:
            named = {o.key_or_group for o in plain}
            others = [p for p in failed.problems if p.partition(":")[0] not in named]
            raise FuluConfigError([*differ.problems, *others]) from None
        # Left out: those the composition refuses, one at a time (Hydra names the first). The others repeat
        # the search too and stay: the groups' settings are compared with what they set (study.n_trials=4 beside
        # +experiment=tiny, which sets 6).
        repeated, kept = {o.input_line for o in plain}, list(overrides)
        while True:
            try:
                return _compose_location(kept, hint)
            except FuluConfigError as again:
                named = {p.partition(":")[0] for p in again.problems}
                refused = [o for o in kept if o in repeated and o.partition("=")[0] in named]
                if not refused:
                    return _compose_location([o for o in overrides if o not in repeated], hint)
                kept = [o for o in kept if o not in refused]


def _search_keys_given(overrides: list[str], hint: str):
    """``(location, the search's settings, the plain key=value overrides of keys the search's configuration
    has)``, found from the overrides that locate the study alone; None when there are none, or the study
    cannot be read back or an override not parsed (the composition's own message then says what is wrong)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from .app import split_flags

    rest, flags = split_flags(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(rest)
        where = _compose_location([*(f"{k}={v}" for k, v in flags.items()),
                                   *(o for o in rest if o.partition("=")[0] in LOCATING)], hint)
        searched = search_settings(where, load_study(where))
    except (FuluConfigError, HydraException):
        return None
    leaves = flatten(searched.raw)
    plain = [o for o in parsed if not (o.is_add() or o.is_delete() or o.is_force_add())
             and o.key_or_group in leaves and o.key_or_group not in LOCATING]
    return (where, searched, plain) if plain else None


def _compose_location(overrides: list[str], hint: str) -> StudyLocation:
    """Where the study is, the overrides composed as the search composed its own."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .app import compose_checked, composition_problem, split_flags

    if not any(o.startswith("study.name=") for o in overrides):
        raise FuluConfigError("study.name: which study? pass study.name=NAME (the name `fulu-nas search` printed)")
    try:
        # The search's own --config-dir (a space of the user's, say), so that its overrides compose here too.
        if unknown := [a for a in overrides if a.startswith("-") and a.partition("=")[0] not in STUDY_FLAGS]:
            # Hydra would drop them: --layout=compact drew and wrote the default layout without a word
            raise FuluConfigError(f"{unknown[0]}: unknown option (this command takes key=value settings, such as "
                                  f"study.name=NAME, and --config-dir DIR)")
        overrides, flags = split_flags(overrides)
        config_dir = flags.get("--config-dir") or flags.get("-cd")
        if config_dir and not Path(config_dir).is_dir():
            raise FuluConfigError(f"--config-dir: {config_dir!r} is not a folder")
        cfg, output_dir = compose_checked(overrides, config_dir)
        requested = _requested(overrides, config_dir, cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise FuluConfigError(composition_problem(e, config_dir)) from None
    name = cfg["study"]["name"]
    output_dir = Path(output_dir)
    storage = cfg["study"].get("storage") or f"sqlite:///{(output_dir / 'optuna.db').resolve()}"
    tracking = cfg["tracking"].get("uri") or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
    check_study_storage_exists(storage, name)
    # A wrong tracking.uri must not make a folder and a database (MLflow would) or wait on an unreachable
    # server for minutes.
    location = StudyLocation(name, storage, tracking, output_dir, requested, cfg, hint)
    try:
        check_tracking_uri(tracking)
        probe_tracking(tracking)
        check_separate_databases(storage, tracking)
    except FuluConfigError:
        # A name the storage does not hold is the problem to name: the tracking database defaults to
        # the folder of the (wrong) name, which is then missing too.
        load_study(location)
        raise
    return location


def _requested(overrides: list[str], config_dir: str | None, cfg: dict) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Each override that does not locate the study, with the config paths it sets: its key (a value
    override); a group choice: the group's node, or (a group of ``@package _global_``, such as
    ``+experiment=``) the paths whose value it changes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .app import CONF_DIR, compose_config

    requested = []
    for i, o in enumerate(OverridesParser.create().parse_overrides(overrides)):
        key = o.key_or_group
        if key in LOCATING:
            continue
        if key.startswith("hydra."):
            requested.append((o.input_line, ()))  # nothing of the search's settings: never used here
            continue
        folders = [CONF_DIR, *([Path(config_dir)] if config_dir else [])]
        if not any((f / key).is_dir() for f in folders):  # a value: key.path=value, +key=, ~key
            requested.append((o.input_line, (SHORTHANDS.get(key, key),)))
            continue
        node = (o.package or key).replace("/", ".")
        if o.package != "_global_" and _select(cfg, node) is not None:
            requested.append((o.input_line, (node,)))
            continue
        without, _ = compose_config(overrides[:i] + overrides[i + 1:], config_dir)
        with_it, without = flatten(cfg), flatten(without)
        requested.append((o.input_line, tuple(sorted(p for p in with_it.keys() | without.keys()
                                                     if with_it.get(p, _ABSENT) != without.get(p, _ABSENT)))))
    return tuple(requested)


_ABSENT = object()


def _select(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _under(leaves: dict[str, Any], path: str) -> dict[str, Any]:
    return {p: v for p, v in leaves.items() if (p == path or p.startswith(path + ".")) and p not in LOCATING}


def _same(path: str, given: Any, searched: Any, typed_model: str | None) -> bool:
    if given == searched:
        return True
    if path == "task.model" and isinstance(given, str) and isinstance(searched, str):
        # the search kept the model folder by its absolute path (and the text it was given as typed_model)
        return given == typed_model or Path(given).expanduser().resolve() == Path(searched).resolve()
    if path == "task.path" and isinstance(given, str) and isinstance(searched, str):
        # the search kept the corpus by its absolute path: the same text, run from another folder, names another
        return Path(given).expanduser().resolve() == Path(searched).resolve()
    return False


def check_overrides_are_used(location: StudyLocation, config: dict, typed_model: str | None = None) -> None:
    """FuluConfigError naming each override of ``location`` that differs from the search's own settings
    (``config``, as the search saved it): the command works with those, so it would ignore the override."""
    if location.composed is None:
        return
    given, searched = flatten(location.composed), flatten(config)
    problems = []
    for text, paths in location.requested:
        if not paths and text.partition("=")[0].lstrip("+~").startswith("hydra."):
            problems.append(f"{text}: not used: of Hydra's settings this command takes hydra.run.dir only (the "
                            "study's folder)")
            continue
        for path in paths:
            mine, theirs = _under(given, path), _under(searched, path)
            differ = sorted((p for p in mine.keys() | theirs.keys()
                             if not _same(p, mine.get(p, _ABSENT), theirs.get(p, _ABSENT), typed_model)),
                            key=lambda p: (p not in mine, p))  # what the override sets, first
            if differ:
                p = differ[0]
                was = f"is {_show(theirs[p])}" if p in theirs else "is not set"
                now = f"{_show(mine[p])} here" if p in mine else "removed here"
                problems.append(f"{text}: not used: this command works with the search's own settings, where {p} "
                                f"{was} ({now})")
                break
    if problems:
        problems[-1] += location.hint  # once, after the last
        raise FuluConfigError(problems)


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def check_recordable(location: StudyLocation, study_database: bool = True) -> None:
    """FuluConfigError unless what a command records can be written, before its work rather than a
    traceback after it: the tracking SQLite database and, with ``study_database`` (a confirmation), the
    study's too; the study's folder where confirmation.json goes, or where MLflow keeps the artifacts
    (unless a tracking server keeps them)."""
    if study_database:
        check_sqlite_writable(location.storage_url, "study.storage")
    check_sqlite_writable(location.tracking_uri, "tracking.uri")
    if study_database or not is_tracking_server(location.tracking_uri):  # a server keeps its own
        check_output_dir(str(location.output_dir))


def load_study(location: StudyLocation):
    import optuna

    from .storage import open_study_storage

    storage = open_study_storage(location.storage_url)
    try:
        return optuna.load_study(study_name=location.name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise FuluConfigError(f"study.name: no study {location.name!r} in {mask_url(location.storage_url)} "
                              f"(it has: {', '.join(names) or 'none'})") from None


def search_settings(location: StudyLocation, study, will_train: bool = False) -> SearchSettings:
    """The configuration the study was searched with (``will_train``: the caller trains with it here; see
    :func:`~.settings.load_settings`): its folder's ``search_config.json``, else the copy its MLflow parent
    run keeps. A folder's file is taken only if it is this study's: two studies searched in one folder
    (``hydra.run.dir``) left the second's file, whose budget a confirmation of the first trained with and
    whose name its export registered under."""
    path = location.output_dir / "search_config.json"
    refused = None  # why the folder's file is not this study's
    if path.is_file():
        data = _read_search_config(path)
        refused = _not_this_studys(data, location, str(path))
        if refused is None:
            s = _settings_from(data, location, will_train)
            # Two studies of one name in one folder (each in its own storage), or a file edited since.
            refused = _not_its_settings(s, study, location, str(path)) or _another_corpus(s, study, data, location,
                                                                                        path)
            if refused is None:
                return s
    shown = "the MLflow parent run's search_config.json"
    data = {"config": _parent_run_config(location, study, path, refused)}
    if problem := _not_this_studys(data, location, shown):
        raise FuluConfigError(problem)
    s = _settings_from(data, location, will_train)
    if problem := _not_its_settings(s, study, location, shown):
        raise FuluConfigError(problem)
    return s


def _not_its_settings(s: SearchSettings, study, location: StudyLocation, shown: str) -> str | None:
    """Why the settings read from ``shown`` are not those the study was searched with, or None: the study
    keeps the digests of its settings' parts (space, task, trainer, objectives, constraints), and one of
    these differs. The digests of files on disk (the checkpoint, the corpus) are not the file's settings:
    a checkpoint the commands name themselves (:func:`fulu_nas.interop.upcycle.another_checkpoint`), a
    corpus read from the standard library another Python holds. A study made before the digests were kept
    is taken as it is."""
    from .study import FINGERPRINT_ATTR, FINGERPRINT_PARTS_ATTR, changed_parts, changed_settings

    kept = study.user_attrs.get(FINGERPRINT_ATTR)
    if kept is None or kept in s.fingerprints():
        return None
    stored = study.user_attrs.get(FINGERPRINT_PARTS_ATTR)
    if not set(changed_parts(stored, s) or ()) - {"model_sha256", "corpus_sha256"}:
        return None
    return (f"study.name: {shown} is not the configuration study {location.name!r} was searched with: it has "
            f"{changed_settings(stored, s).removeprefix('with ')}")


def _another_corpus(s: SearchSettings, study, data: dict, location: StudyLocation, path: Path) -> str | None:
    """Where the folder's file reads another corpus than the study's digest holds: whether it is another
    study's (a same-named study searched in the folder on another ``task.path``: the MLflow parent run's
    copy names another task) rather than the same files changed since, or None."""
    from .study import FINGERPRINT_PARTS_ATTR, changed_parts
    from .tracking import PARENT_RUN_ATTR

    if "corpus_sha256" not in (changed_parts(study.user_attrs.get(FINGERPRINT_PARTS_ATTR), s) or ()) or \
            not study.user_attrs.get(PARENT_RUN_ATTR):
        return None
    try:
        parent = _parent_run_config(location, study, path, None)
    except FuluConfigError:  # no copy to tell by: the folder's file, as before
        return None
    if parent.get("task") == data["config"].get("task"):
        return None
    return (f"study.name: {path} is not the configuration study {location.name!r} was searched with: it reads "
            "another task.path")


def folder_is_the_studys(location: StudyLocation) -> bool:
    """Whether the study's output folder is its own: its ``search_config.json`` names the study (another
    study searched into the folder since replaced it), or there is none."""
    path = location.output_dir / "search_config.json"
    return not path.is_file() or _not_this_studys(_read_search_config(path), location, str(path)) is None


def _not_this_studys(data: dict, location: StudyLocation, shown: str) -> str | None:
    """Why the search configuration ``data`` (read from ``shown``) is not the one the study was searched
    with, or None: it names another study (a later search of another study into the same folder)."""
    config = data["config"]
    named = config.get("study", {}).get("name") if isinstance(config.get("study"), dict) else None
    if named != location.name:
        return f"study.name: {shown} is the configuration of study {named!r}, not of study {location.name!r}"
    return None


def _parent_run_config(location: StudyLocation, study, path: Path, refused: str | None) -> dict:
    """The configuration the study's MLflow parent run keeps (``refused``: why the folder's own file at
    ``path`` was not taken, said where there is no parent run's copy either)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from ..checks import check_tracking_database_exists
    from .tracking import PARENT_RUN_ATTR

    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent:
        raise FuluConfigError(refused + " (two studies searched in one folder? give each its own hydra.run.dir)"
                              if refused else f"study.name: study {location.name!r} has no search configuration "
                                              f"(no {path} and no MLflow parent run)")
    check_tracking_database_exists(location.tracking_uri)  # MLflow's client would make an empty one
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.MlflowClient(location.tracking_uri).download_artifacts(parent, "search_config.json", tmp)
        except MlflowException as e:
            raise FuluConfigError(
                (refused + "; and " if refused else "") +
                f"tracking.uri: {mask_url(location.tracking_uri)} has no search_config.json of run {parent}, the "
                f"parent run of study {location.name!r} ({' '.join(str(e).split())[:200]}): give the tracking.uri "
                "the search was run with, or run from the search's folder (hydra.run.dir=)") from None
        config = _read_search_config(Path(local), f"search_config.json of MLflow run {parent}")
    return params_in_when_order(config)


def params_in_when_order(config: dict) -> dict:
    """``config`` with its space's parameters reordered so that each comes after the ones its ``when``
    names, the order otherwise kept. The parent run's copy of a search's configuration was written with
    its keys sorted, which put ``hierarchy_depth`` before the ``router`` it depends on: the space was
    refused when read back from there."""
    space = config.get("search_space")
    params = space.get("params") if isinstance(space, dict) else None
    if not isinstance(params, dict):
        return config
    ordered: dict = {}

    def place(name: str, visiting: frozenset) -> None:
        if name in ordered or name not in params or name in visiting:  # a cycle: the space's check names it
            return
        when = params[name].get("when") if isinstance(params[name], dict) else None
        for parent in when if isinstance(when, dict) else ():
            place(parent, visiting | {name})
        ordered[name] = params[name]

    for name in params:
        place(name, frozenset())
    space["params"] = ordered
    return config


def _settings_from(data: dict, location: StudyLocation, will_train: bool) -> SearchSettings:
    # The databases are those this command reached the study with (a folder or database moved since the
    # search, the passwords the parent run's copy masks): what it records goes there, not to the search's URLs.
    from .tracking import URL_KEYS

    given = {"study": location.storage_url, "tracking": location.tracking_uri}
    for section, key in URL_KEYS:
        if isinstance(data["config"].get(section), dict):
            data["config"][section][key] = given[section]
    check_overrides_are_used(location, data["config"], data.get("typed_model"))
    return load_settings(data["config"], location.output_dir, will_train, typed_model=data.get("typed_model"))


def _read_search_config(path: Path, artifact: str = "") -> dict:
    """The search configuration a search saved: its folder's ``search_config.json`` (``{"config": ...,
    "typed_model": ...}``), or the parent run's artifact (``artifact`` names it; the configuration
    itself), checked before use: a damaged file is one message naming it, not a traceback."""
    shown = artifact or str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:  # another user's folder, whose passwords keep the file to its owner (0600)
        raise FuluConfigError(f"study.name: cannot read {shown} ({e.strerror})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FuluConfigError(f"study.name: {shown} is not valid JSON ({e})") from None
    if artifact:
        if not isinstance(data, dict):
            raise FuluConfigError(f"study.name: {shown} is not a search configuration (a JSON object)")
        return data
    if not (isinstance(data, dict) and isinstance(data.get("config"), dict)
            and isinstance(data.get("typed_model"), str | None)):
        raise FuluConfigError(f"study.name: {shown} is not a search configuration (a JSON object with its "
                              "\"config\" object, as `fulu-nas search` writes it)")
    return data
