"""``fulu-nas confirm``: the command line of :mod:`.confirm`."""

from __future__ import annotations

import re
import sys

from ..errors import FuluConfigError
from .settings import CONFIRM_MAX, ConfirmSettings, confirm_settings

BAD_INPUT = 2
OPTIONS = {"top_k": "", "budget_factor": "", "seeds": "", "n_workers": ""}  # "": the study's value
INTEGER = re.compile(r"[+-]?[0-9]{1,18}")  # int() refuses more than 4,300 digits: a traceback
DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)
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
    """``"4"`` -> 4, ``"1.5"`` -> 1.5; anything else stays text (and is refused by the validation). ASCII
    digits only: Python's int() and float() also took ``1_0`` (10), other scripts' digits and spaces
    around the number."""
    if INTEGER.fullmatch(text):
        return int(text)
    if DECIMAL.fullmatch(text):
        return float(text)
    return text


def check_same_model(study, s) -> None:
    """A study that starts from a model on disk (``task.model``: upcycling) is confirmed on the checkpoint its
    trials were searched on: on another, every run fails alike, and running the command again mends none."""
    current = getattr(s.task, "model_sha256", None)
    searched = {t.user_attrs["arch"].get("source_sha256") for t in study.get_trials(deepcopy=False)
                if isinstance(t.user_attrs.get("arch"), dict)} - {None}
    if current is not None and searched and current not in searched:
        from ..interop.upcycle import another_checkpoint

        raise FuluConfigError(f"task.model: {s.task.model_path!r} is {another_checkpoint(current, list(searched))}; "
                              "put that checkpoint back, or search this one as a new study")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    from .confirm import confirm_study
    from .locate import check_recordable, load_study, locate_study, search_settings, split_options
    from .study import quiet_optuna
    from .tracking import quiet_mlflow

    quiet_mlflow()
    try:
        given, overrides = split_options(argv, OPTIONS)
        # study.confirm.* is compared with the search's like any other setting: the search's own command line
        # (study.confirm.seeds=2 ...) is taken, a differing value refused with the options to use instead.
        with quiet_optuna():
            location = locate_study(overrides, HINT)
            study = load_study(location)
            check_recordable(location)
            s = search_settings(location, study, will_train=True)
            check_same_model(study, s)
        n_workers = worker_count(given.pop("n_workers", ""))
        return confirm_study(study, s, command_options(given, s.study.confirm), n_workers=n_workers)
    except FuluConfigError as e:
        print("error: cannot confirm:\n  - " + "\n  - ".join(e.problems), file=sys.stderr)
        return BAD_INPUT
