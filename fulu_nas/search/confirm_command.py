"""``fulu-nas confirm``: the command line of :mod:`.confirm`."""

from __future__ import annotations

import sys
from dataclasses import replace

from ..errors import FuluConfigError
from .settings import CONFIRM_MAX, ConfirmSettings, confirm_settings

BAD_INPUT = 2
OPTIONS = {"top_k": "", "budget_factor": "", "seeds": "", "n_workers": ""}  # "": the study's value
# After naming an override that the command would ignore (it trains with the search's own settings).
HINT = ("; what a confirmation trains is set by its own options: top_k= (how many architectures), budget_factor= "
        "(budget_factor x the search's trainer.steps steps), seeds= (seeds trainer.seed + 1 .. trainer.seed + seeds), "
        "n_workers=")
USAGE = f"""usage: fulu-nas confirm study.name=NAME [top_k=K] [budget_factor=F] [seeds=N] [n_workers=W] [overrides ...]

Trains the study's top_k best distinct architectures and its reference architecture again with the
search's own pipeline, for budget_factor x trainer.steps steps, once per seed trainer.seed + 1,
..., trainer.seed + seeds (modulo 2^32), each run nested under the study's MLflow parent run: seeds
the search, which trained with trainer.seed, did not select its architectures on. top_k and seeds
are at most {CONFIRM_MAX}.

Writes confirmation.json in the search's output folder (and on the MLflow parent run), and prints
per architecture its search rank, its confirmed rank (by the mean over seeds), the mean +- sd of
each objective, Kendall's tau between the two rankings, and whether it beats the reference
(Welch's t-test, one-sided, alpha 0.05; with one seed there is no test), and the winner (none while a
run failed). Runs already recorded for the same architecture, seed and step budget are not repeated:
run the same command again to resume, or to retry the failed runs.

The runs are independent: n_workers=W shares them among W processes (each with its share of the CPU
threads, or its own GPU), as the search's study.n_workers does; the default is the study's
study.n_workers. Options default to the study's study.confirm values (top_k 8, budget_factor 4,
seeds 3 unless the search set others). Pass the overrides that locate the study when the search used them:
study.storage=..., tracking.uri=..., hydra.run.dir=..., and --config-dir DIR with its search_space=...
Any other override (trainer.steps=, trainer.seed=, ...) that differs from the search's setting is
refused: the confirmation trains with the search's own settings.
"""


def command_options(given: dict[str, str], defaults: ConfirmSettings) -> ConfirmSettings:
    """The command's ``key=value`` options over the study's ``study.confirm``; every bad value listed.
    Any number of seeds up to the bound is valid from any trainer.seed: they are counted modulo 2^32
    (:func:`.confirm.confirmation_seeds`), so no last seed is checked."""
    problems: list[str] = []
    options = confirm_settings({k: _number(v) for k, v in given.items() if v != ""}, "", problems, defaults)
    if problems:
        raise FuluConfigError(problems)
    return options


def worker_count(text: str) -> int | None:
    """``n_workers=``: a whole number of at least 1 (None: not given)."""
    if text == "":
        return None
    value = _number(text)
    if not isinstance(value, int) or value < 1:
        raise FuluConfigError(f"n_workers: must be a whole number of at least 1, got {text!r}")
    return value


def _number(text: str) -> int | float | str:
    """``"4"`` -> 4, ``"1.5"`` -> 1.5; anything else stays text (and is refused by the validation)."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def locate(overrides: list[str]):
    """The study's location (:func:`.locate.locate_study`). A plain ``key=value`` of a key that the default
    configuration lacks and only the search's own groups or ``+`` gave it (``task.val_sequences=128``, which
    ``+experiment=tiny`` set to 64) cannot be composed, and Hydra's advice, ``+task.val_sequences=128``, was then
    refused for differing from the search: such an override is compared with the search's setting at once,
    refused when it differs, and taken when it repeats it (left out: the confirmation trains with the search's
    settings anyway)."""
    from .locate import check_overrides_are_used, locate_study

    try:
        return locate_study(overrides, HINT)
    except FuluConfigError as failed:
        found = _search_keys_given(overrides)
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
        repeated = {o.input_line for o in plain}
        return locate_study([o for o in overrides if o not in repeated], HINT)


def _search_keys_given(overrides: list[str]):
    """``(location, the search's settings, the plain key=value overrides of keys the search's configuration
    has)``, found from the overrides that locate the study alone; None when there are none, or the study
    cannot be read back or an override not parsed (the composition's own message then says what is wrong)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from .app import split_flags
    from .locate import LOCATING, load_study, locate_study, search_settings
    from .tracking import flatten

    rest, flags = split_flags(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(rest)
        where = locate_study([*(f"{k}={v}" for k, v in flags.items()),
                              *(o for o in rest if o.partition("=")[0] in LOCATING)], HINT)
        searched = search_settings(where, load_study(where))
    except (FuluConfigError, HydraException):
        return None
    leaves = flatten(searched.raw)
    plain = [o for o in parsed if not (o.is_add() or o.is_delete() or o.is_force_add())
             and o.key_or_group in leaves and o.key_or_group not in LOCATING]
    return (where, searched, plain) if plain else None


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    from .confirm import confirm_study
    from .locate import check_recordable, load_study, search_settings, split_options
    from .study import quiet_optuna
    from .tracking import quiet_mlflow

    quiet_mlflow()
    given, overrides = split_options(argv, OPTIONS)
    try:
        # study.confirm.* is compared with the search's like any other setting: the search's own command line
        # (study.confirm.seeds=2 ...) is taken, a differing value refused with the options to use instead.
        with quiet_optuna():
            location = locate(overrides)
            study = load_study(location)
            check_recordable(location)
            s = search_settings(location, study, will_train=True)
        n_workers = worker_count(given.pop("n_workers", ""))
        return confirm_study(study, s, command_options(given, s.study.confirm), n_workers=n_workers)
    except FuluConfigError as e:
        print("error: cannot confirm:\n  - " + "\n  - ".join(e.problems), file=sys.stderr)
        return BAD_INPUT
