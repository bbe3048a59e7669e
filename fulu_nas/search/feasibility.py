"""Whether a search space yields architectures to train at all, checked before a study starts.

A space in which every sample is infeasible (an unknown fixed router, a fixed ``top_k`` above
``num_experts``, a constraint nothing meets) would give a study of infeasible trials only, and a
categorical choice that is never feasible (a typo in a router name) would silently shrink the
space. So the space is sampled here as a study samples it, with a fixed seed (the verdict is the
same every time), and :data:`DRAWS` random draws must find a feasible architecture: for the space
(unless its reference is one), for each choice of each categorical parameter (pinned, with the parents
of its ``when`` pinned to values that make it active), and for each numeric parameter (its parents
pinned so). Where the parameters are discrete and their combinations few (:data:`ALL_VALUES_UP_TO`),
every combination is tried instead, so that a rare feasible value is not missed.
When the whole space fails, each fixed value, parameter and derived value is put back to the
field's default in turn; those whose default makes the space feasible are named as the cause.

A derived value or constraint that cannot be evaluated for some samples (``64 // (num_experts - 5)``)
is refused as well, naming it and a sample that breaks it: every random draw is evaluated, as a trial
evaluates it (not only those up to the first feasible one), and so is every combination of the
values of the parameters the expressions read, where they are discrete and few
(:data:`ALL_VALUES_UP_TO`): otherwise the study stopped at the first trial to draw such a sample.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Callable

from ..errors import FuluConfigError
from ..models import ArchConfig
from ..moe import MoEConfig
from .space import IMPOSSIBLE, Infeasible, Param, SearchSpace, float_step_value

DRAWS = 200
# The derived values and constraints are evaluated on every combination of the values of the parameters
# they read when these are discrete and give at most this many (a fraction of a second): a value that
# random draws rarely meet (num_experts=317 of 2..400) is tried too. A space whose parameters give at most
# this many is sampled by every combination (a second or two where none is feasible).
ALL_VALUES_UP_TO = 4096


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


_ARCH_DEFAULTS, _MOE_DEFAULTS = _defaults(ArchConfig), _defaults(MoEConfig)


class _RandomTrial:
    """Answers :meth:`SearchSpace.sample`'s ``suggest_*`` calls with random draws, or with the
    pinned value of a parameter: the space is sampled through its own code, without a study."""

    def __init__(self, rng: random.Random, pins: dict):
        self.rng, self.pins = rng, pins

    def suggest_categorical(self, name, choices):
        return self.pins[name] if name in self.pins else self.rng.choice(choices)

    def suggest_int(self, name, low, high, step=1, log=False):
        if name in self.pins:
            return self.pins[name]
        if log:
            return min(high, max(low, round(math.exp(self.rng.uniform(math.log(low), math.log(high))))))
        return self.rng.randrange(low, high + 1, step)

    def suggest_float(self, name, low, high, step=None, log=False):
        if name in self.pins:
            return self.pins[name]
        if step:
            return float_step_value(low, high, step, self.rng.randint(0, round((high - low) / step)))
        if log:
            return math.exp(self.rng.uniform(math.log(low), math.log(high)))
        return self.rng.uniform(low, high)


def check_feasible(space: SearchSpace, task, draws: int = DRAWS) -> None:
    """FuluConfigError naming what makes ``space`` yield no feasible architecture on ``task``, or a
    categorical choice that never gives one; and the space's reference when it is no architecture on
    ``task`` (reading the space checked it without the task, where a family has a probe: :mod:`.family`)."""
    if space.reference is not None:
        try:
            space.feasible_arch(space.with_derived(space.reference), task)
        except Infeasible as e:
            raise FuluConfigError(f"search_space.reference: {e}") from None
    _check_expressions(space, task, draws)
    rng = random.Random(0)
    # A feasible reference (its values are in the space: reading the space checked them) is an architecture
    # of the space: the space is not empty, however rare its feasible draws; nor is what the reference takes
    # (its value of each categorical parameter, each parameter it sets).
    if space.reference is None and (reason := _failure(space, task, rng, draws, dict)) is not None:
        raise FuluConfigError(_whole_space_problem(space, task, draws, reason))
    by_name = {p.name: p for p in space.params}
    reference = space.with_derived(space.reference) if space.reference is not None else {}
    problems = []
    for p in space.params:
        for what, own in _checked_values(p):
            if p.name in reference and all(reference[name] == value for name, value in own.items()):
                continue  # the reference is such an architecture
            reason = _failure(space, task, rng, draws, lambda p=p, own=own: _pins(p, own, by_name, rng), p.name, own)
            if reason is not None:
                problems.append(f"search_space.params.{p.name}{what} no feasible architecture in "
                                f"{_tried(space, own, draws)} (first: {reason})")
    if problems:
        raise FuluConfigError(problems)


def _check_expressions(space: SearchSpace, task, draws: int) -> None:
    """FuluConfigError (one problem: the derived value or constraint, the values it fails for) when an
    expression of the space cannot be evaluated for values a trial may draw: on every combination of
    the values the expressions read (:func:`_expression_inputs`), then on ``draws`` random samples,
    each made into its architecture as a trial makes it (an infeasible one is no error)."""
    for values in _expression_inputs(space):
        space.violations(space.with_derived(values))
    rng = random.Random(0)
    for _ in range(draws if space.params else 1):
        values = space.sample(_RandomTrial(rng, {}))  # computes the derived values
        try:
            space.feasible_arch(values, task)  # evaluates the constraints
        except Infeasible:
            pass


def _expression_inputs(space: SearchSpace):
    """Every combination of the values of the parameters that the derived values and constraints read
    (through other derived values too), and of those their ``when`` names, each with the active ones
    only; nothing when one of them is continuous or there are more than :data:`ALL_VALUES_UP_TO`."""
    derived, by_name = dict(space.derived), {p.name: p for p in space.params}
    todo = [name for expr in (*space.constraints, *derived.values()) for name in expr.names]
    read: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in read:
            read.add(name)
            todo.extend(derived[name].names if name in derived else
                        [parent for parent, _ in by_name[name].when] if name in by_name else ())
    params = [p for p in space.params if p.name in read]
    sizes = [p.grid_size() for p in params]  # counted first: an int parameter may span billions of values
    if not params or None in sizes or math.prod(sizes) > ALL_VALUES_UP_TO:
        return
    for combination in itertools.product(*(p.grid_values() for p in params)):
        values: dict = {}
        for p, value in zip(params, combination, strict=True):
            if p.active(values):
                values[p.name] = value
        yield values


def _combinations(space: SearchSpace, fixed: dict) -> int | None:
    """How many combinations of the parameters' values there are with ``fixed`` pinned, where they are
    discrete and at most :data:`ALL_VALUES_UP_TO` (every one is then tried); else None (random draws)."""
    sizes = [1 if p.name in fixed else p.grid_size() for p in space.params]
    if not space.params or None in sizes or math.prod(sizes) > ALL_VALUES_UP_TO:
        return None
    return math.prod(sizes)


def _tried(space: SearchSpace, fixed: dict, draws: int) -> str:
    """What :func:`_failure` tried, in words."""
    n = _combinations(space, fixed)
    return f"{draws} random draws" if n is None else f"any of the {n} combinations of the parameters' values"


def _samples(space: SearchSpace, rng: random.Random, draws: int, pins: Callable[[], dict], fixed: dict):
    """The samples :func:`_failure` tries: every combination of the parameters' values with ``fixed`` (a
    verdict the seed does not decide: a feasible value drawn once in 64 was missed by 200 draws now and
    then), or, where there are too many or a parameter is continuous, ``draws`` random draws with ``pins``."""
    if _combinations(space, fixed) is not None:
        names = [p.name for p in space.params]
        for combination in itertools.product(*([fixed[p.name]] if p.name in fixed else p.grid_values()
                                               for p in space.params)):
            yield space.sample(_RandomTrial(rng, dict(zip(names, combination, strict=True))))
        return
    for _ in range(draws if space.params else 1):  # without parameters every draw is the same
        yield space.sample(_RandomTrial(rng, pins()))


def _failure(space: SearchSpace, task, rng: random.Random, draws: int, pins: Callable[[], dict],
             needs: str | None = None, fixed: dict | None = None) -> str | None:
    """None once a sample (:func:`_samples`) is feasible, else why the first was not. ``needs``: a parameter
    that must be active in a sample for it to count; ``fixed``: the values ``pins`` always gives."""
    impossible = violation = None
    inactive = False
    for values in _samples(space, rng, draws, pins, fixed or {}):
        if needs is not None and needs not in values:
            inactive = True  # said only where no active sample says more
            continue
        try:
            space.feasible_arch(values, task)
            return None
        except Infeasible as e:
            # An impossible architecture says more than a constraint broken: every combination starts at the
            # lowest values, which a constraint may refuse before a typo in a router's name shows.
            if str(e).startswith(IMPOSSIBLE):
                impossible = impossible or str(e)
            else:
                violation = violation or str(e)
    return impossible or violation or ("its conditions never hold together" if inactive else None)


def _checked_values(param: Param) -> list[tuple[str, dict]]:
    """What of ``param`` must give a feasible draw, as (the problem's words, its pins): each choice of a
    categorical parameter; a numeric one as a whole (whose ``when`` may never hold: a dead dimension)."""
    if param.kind == "categorical":
        return [(f".choices: {choice!r} gives", {param.name: choice}) for choice in param.choices]
    return [(": its values give", {})]


def _pins(param: Param, own: dict, by_name: dict[str, Param], rng: random.Random) -> dict:
    """``own`` (``param`` pinned, or nothing), and the parents its ``when`` names (theirs too) pinned to
    allowed values."""
    pins, todo = dict(own), list(param.when)
    while todo:
        parent, allowed = todo.pop()
        if parent not in pins:
            pins[parent] = rng.choice(allowed)
            todo.extend(by_name[parent].when)
    return pins


def _whole_space_problem(space: SearchSpace, task, draws: int, reason: str) -> str:
    causes = [cause for cause, variant, pins in _defaults_instead(space) if _feasible(variant, task, draws, pins)]
    tried = _tried(space, {}, draws)
    if not causes:
        return f"search_space: no feasible architecture in {tried} (first: {reason})"
    these = "this setting" if len(causes) == 1 else "these settings"
    return f"{', '.join(causes)}: no architecture of the space is feasible with {these} ({tried}; first: {reason})"


def _feasible(variant: SearchSpace, task, draws: int, pins: dict) -> bool:
    """Whether a sample of ``variant`` with ``pins`` is feasible: each variant drawn with the seed the space
    was (a shared generator's later draws made a setting that changes nothing look like a cause). A field's
    default that a derived value cannot be computed from (a ``top_p`` of None in ``top_p * 2``) is no way
    out: not feasible."""
    try:
        return _failure(variant, task, random.Random(0), draws, lambda: dict(pins), fixed=pins) is None
    except FuluConfigError:
        return False


def _defaults_instead(space: SearchSpace):
    """(what is changed, the space with it changed, pins): each fixed value, parameter and derived
    value of ``space`` in turn replaced by its field's default."""
    defined = {p.name for p in space.params} | {name for name, _ in space.derived}
    moe = space.base.get("moe") or {}
    for name, value in space.base.items():
        if name in _ARCH_DEFAULTS and name not in defined:
            yield (f"search_space.base.{name} ({value!r})",
                   dataclasses.replace(space, base={**space.base, name: _ARCH_DEFAULTS[name]}), {})
    for name, value in moe.items():
        if name in _MOE_DEFAULTS and name not in defined:
            base = {**space.base, "moe": {**moe, name: _MOE_DEFAULTS[name]}}
            yield f"search_space.base.moe.{name} ({value!r})", dataclasses.replace(space, base=base), {}
    for p in space.params:
        defaults = _ARCH_DEFAULTS if p.name in _ARCH_DEFAULTS else _MOE_DEFAULTS
        if p.name in defaults:
            what = f".choices ({list(p.choices)!r})" if p.kind == "categorical" else f" ({p.low}..{p.high})"
            yield f"search_space.params.{p.name}{what}", space, {p.name: defaults[p.name]}
    for name, expr in space.derived:
        rest = tuple((n, e) for n, e in space.derived if n != name)
        yield f"search_space.derived.{name} ({expr.text!r})", dataclasses.replace(space, derived=rest), {}
