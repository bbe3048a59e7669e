"""Declarative search spaces: parse and validate a YAML mapping, sample it with an Optuna trial,
and turn a sample into an :class:`~fulu_nas.models.ArchConfig`.

A space (see ``search_spaces/*.yaml``)::

    description: what this space is for
    base:                 # fixed ArchConfig fields; ``moe:`` holds fixed MoEConfig fields
      num_layers: 2
      moe: {activation: swiglu}
    params:               # sampled in this order
      router: {type: categorical, choices: [topk, hierarchical]}
      num_experts: {type: int, low: 4, high: 64, log: true}
      hierarchy_depth: {type: int, low: 1, high: 3, when: {router: hierarchical}}
    derived:              # computed from sampled values
      expert_ffn_size: "1024 // top_k"
    constraints:          # a sample violating one is infeasible (never trained)
      - "top_k <= num_experts"
    reference: {router: topk, num_experts: 8}   # the hand-picked default, trained first

A parameter or derived value names an ``ArchConfig`` field, an ``MoEConfig`` field, or
``balancing`` (one of :data:`~fulu_nas.moe.BALANCING_METHODS`); for task ``upcycle`` the fields of
its model family instead (:mod:`.family`). ``when`` makes a parameter
conditional on earlier categorical parameters, so Optuna only samples it where it means
something (``hierarchy_depth`` only for the hierarchical router). :func:`parse_space` lists every
problem, each naming its key, in one :class:`~fulu_nas.errors.FuluConfigError`.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..checks import is_finite_number, is_folder_name
from ..errors import FuluConfigError
from ..moe import BALANCING_METHODS
from .expressions import Expression, ExpressionError, ExpressionTooLarge, parse_expression
from .family import PIMOE, Family
from .field_types import type_problem

PARAM_TYPES = ("categorical", "int", "float")
# The name of a space without ``name:``, as the study's default name (conf/study/default.yaml) calls it.
UNNAMED = "custom"
# balancing names a set of MoE fields (BALANCING_METHODS), so it is searched, never fixed or derived: a
# fixed method is the fields it sets.
_BALANCING_PARAM_ONLY = ("balancing is searched in params only; to fix a method, give base.moe the fields it sets ("
                         + "; ".join(f"{m}: {', '.join(f'{k}={v}' for k, v in fields.items()) or 'none'}"
                                     for m, fields in BALANCING_METHODS.items()) + ")")
_SPACE_KEYS = {"name", "description", "base", "params", "derived", "constraints", "reference"}
_PARAM_KEYS = {"type", "choices", "low", "high", "log", "step", "when"}
# The most combinations study.sampler=grid takes: Optuna's grid sampler makes a list of every one (a tuple
# each) in every worker, 128 MB at this many of ten parameters; it is 4.7 times the default space's grid
# (221,184), and a grid of billions took the machine's memory.
GRID_MAX = 2**20


def _is_choice(v: object) -> bool:
    return v is None or isinstance(v, (bool, str)) or is_finite_number(v)


def _choice_key(v: object) -> tuple:
    """What tells two choices apart as Optuna does (it files a value under the first choice equal to it):
    a number or boolean by its value (1, 1.0 and true are one choice), anything else by its type and value
    ("1" is not 1)."""
    return ("number", float(v)) if isinstance(v, bool) or is_finite_number(v) else (type(v).__name__, v)


IMPOSSIBLE = "impossible architecture"  # how Infeasible begins for fields that contradict each other


class Infeasible(Exception):
    """A sample that is no architecture to train: it breaks a constraint of the space, or its
    fields contradict each other. The message says which."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    choices: tuple = ()
    low: float = 0
    high: float = 0
    log: bool = False
    step: float | None = None
    when: tuple[tuple[str, tuple], ...] = ()

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(name in values and values[name] in allowed for name, allowed in self.when)

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, low=int(self.low), high=int(self.high), step=int(self.step or 1),
                                     log=self.log)
        return trial.suggest_float(self.name, low=self.low, high=self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if not is_finite_number(value) or (self.kind == "int" and not isinstance(value, int)):
            return False  # 3.0 is not an int parameter's value: it would reach the model as a float
        if not self.low <= value <= self.high:
            return False
        return self.step is None or _whole_steps(value - self.low, self.step, self.kind)

    def grid_values(self) -> list | None:
        """Every value, for the grid sampler (None for a continuous float). Count them first
        (:meth:`grid_size`): an int parameter may span billions."""
        n = self.grid_size()
        return None if n is None else [self.grid_value(i) for i in range(n)]

    def grid_size(self) -> int | None:
        """How many values :meth:`grid_values` gives, counted without making them (None: continuous)."""
        if self.kind == "categorical":
            return len(self.choices)
        if self.kind == "int":
            return (int(self.high) - int(self.low)) // int(self.step or 1) + 1
        return None if self.step is None else round((self.high - self.low) / self.step) + 1

    def grid_value(self, i: int) -> Any:
        """The ``i``-th of :meth:`grid_values`."""
        if self.kind == "categorical":
            return self.choices[i]
        if self.kind == "int":
            return int(self.low) + i * int(self.step or 1)
        return float_step_value(self.low, self.high, self.step, i)


def float_step_value(low: float, high: float, step: float, i: int) -> float:
    """The ``i``-th value of a float parameter with a ``step``, as Optuna's samplers give it: ``low + i *
    step`` in binary, at most ``high`` (1.1 + 3 x 0.2 is 1.7000000000000002, above a high of 1.7)."""
    return min(low + i * step, high)


def _whole_steps(span: float, step: float, kind: str) -> bool:
    """Whether ``span`` is a whole number of ``step``: exactly for an int parameter (math.isclose took
    500000000.5 steps for a whole number), within rounding for a float one (a sampled value)."""
    if kind == "int":
        return int(span) % int(step) == 0
    steps = span / step
    return math.isfinite(steps) and math.isclose(steps, round(steps))


def _finite_span(low: float, high: float) -> bool:
    try:
        return math.isfinite(float(high) - float(low))
    except OverflowError:  # an int bound beyond a float's range
        return False


def _divides(low: float, high: float, step: float) -> bool:
    """Whether a float ``step`` divides ``high - low`` exactly, in decimal, as Optuna checks it (within
    rounding, Optuna lowered high to the last whole step and warned: high was never drawn)."""
    return (Decimal(str(high)) - Decimal(str(low))) % Decimal(str(step)) == 0


def _evaluated(expr, values: Mapping[str, Any], key: str, shown: Mapping[str, Any]):
    """``expr`` on ``values``; FuluConfigError under ``key`` (naming the sample ``shown``) where it cannot be
    computed. A division by zero, or values of the wrong type for the operation (64 // router, abs('x'),
    min()), is the expression's fault, not the sample's: skipping a derived value left its field at the
    default unsaid, and counting a constraint as broken shrank the space without a word."""
    try:
        return expr(values)
    except ExpressionTooLarge as e:
        raise FuluConfigError(f"{key}: {e}") from None
    except (ArithmeticError, TypeError, ValueError) as e:
        raise FuluConfigError(f"{key}: {expr.text!r} cannot be computed for {dict(shown)} "
                              f"({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    base: dict
    params: tuple[Param, ...]
    derived: tuple[tuple[str, Expression], ...]
    constraints: tuple[Expression, ...]
    reference: dict | None
    family: Family = PIMOE

    def sample(self, trial) -> dict[str, Any]:
        """Suggest every active parameter through ``trial``; returns them plus the derived values."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(values):
                values[p.name] = p.suggest(trial)
        return self.with_derived(values)

    def with_derived(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` and the derived values computed from them; a derived value reading a parameter the
        sample lacks (inactive: its ``when`` does not hold) is left unset, so its field keeps its default.
        An expression that cannot be computed for ``values`` is the expression's fault, not the sample's:
        FuluConfigError naming it (the pre-flight refuses the space, a trial fails with it)."""
        out = dict(values)
        for name, expr in self.derived:
            if expr.names <= out.keys():
                value = _evaluated(expr, out, f"search_space.derived.{name}", dict(values))
                if isinstance(value, float) and not math.isfinite(value):
                    raise FuluConfigError(f"search_space.derived.{name}: {expr.text!r} gives {value} for "
                                          f"{dict(values)}: NaN and infinities are no setting")
                if problem := type_problem(name, value):
                    raise FuluConfigError(f"search_space.derived.{name}: {expr.text!r} gives {value!r} for "
                                          f"{dict(values)}: {problem} (use // for whole numbers)")
                out[name] = value
        return out

    def violations(self, values: Mapping[str, Any]) -> list[str]:
        """The constraints ``values`` break (constraints naming an inactive parameter don't apply);
        FuluConfigError naming a constraint that cannot be computed for ``values``, or that gives no
        truth value (``num_experts % top_k`` kept the pairs it was meant to refuse)."""
        broken = []
        for i, c in enumerate(self.constraints):
            if not c.names <= values.keys():
                continue
            key = f"search_space.constraints[{i}]"
            holds = _evaluated(c, values, key, values)
            if not isinstance(holds, bool):
                raise FuluConfigError(f"{key}: {c.text!r} gives {holds!r} for {dict(values)}, not true or false: a "
                                      "constraint is a condition (a comparison, and, or, not), e.g. "
                                      "'num_experts % top_k == 0'")
            if not holds:
                broken.append(c.text)
        return broken

    def feasible_arch(self, values: Mapping[str, Any], task):
        """The architecture for sampled ``values`` (derived values included) on ``task`` (see :meth:`arch`),
        or :class:`Infeasible` saying why there is none."""
        broken = self.violations(values)
        if broken:
            raise Infeasible(f"violates {', '.join(broken)}")
        try:
            return self.arch(values, task)
        except FuluConfigError as e:
            raise Infeasible(f"{IMPOSSIBLE}: {'; '.join(e.problems)}") from None

    def arch(self, values: Mapping[str, Any], task):
        """The architecture for sampled ``values`` on ``task`` (FuluConfigError if impossible): an
        :class:`ArchConfig`, or what the space's family makes (:mod:`.family`)."""
        return self.family.arch(self.base, dict(values), task)

    def given_arch(self, values: Mapping[str, Any], task, option: str):
        """The architecture for values a user gave (a benchmark's ``key=value`` options, which may leave the
        space's ranges): each value must have its field's type, and the derived values are computed;
        FuluConfigError naming ``option`` and the key otherwise."""
        problems = [f"{option}: {name}: {problem}" for name, value in values.items()
                    if (problem := type_problem(name, value))]
        if problems:
            raise FuluConfigError(problems)
        return self.arch(self.with_derived(values), task)

    def grid(self) -> dict[str, list]:
        """Every parameter's values, for the grid sampler: FuluConfigError for a continuous parameter, or
        more than :data:`GRID_MAX` combinations (counted before any list is made)."""
        continuous = [p.name for p in self.params if p.grid_size() is None]
        if continuous:
            raise FuluConfigError([f"study.sampler=grid needs discrete parameters: params.{n} is a float without "
                                   "a step" for n in continuous])
        size = math.prod(p.grid_size() for p in self.params)
        if size > GRID_MAX:
            raise FuluConfigError(f"study.sampler=grid: the space's parameters make {size:,} combinations, more than "
                                  f"{GRID_MAX:,} (the grid sampler holds every one in memory); use another sampler, "
                                  "or fewer values (a step, fewer choices)")
        return {p.name: p.grid_values() for p in self.params}


def parse_space(data: object, name: str = UNNAMED, family: Family = PIMOE) -> SearchSpace:
    """Validate a space given as a plain mapping (parsed YAML) for the models of ``family`` (the task's);
    every problem names its key."""
    problems: list[str] = []
    targets = family.targets
    if not isinstance(data, Mapping):
        raise FuluConfigError(f"search_space: expected a mapping, got {type(data).__name__}")
    for key in sorted(set(map(str, data)) - _SPACE_KEYS):
        problems.append(f"search_space.{key}: unknown key (allowed: {', '.join(sorted(_SPACE_KEYS))})")
    if not data.get("params"):  # an empty file searched the configs' defaults, one architecture
        problems.append("search_space.params: a space needs at least one parameter to search")

    base = {} if data.get("base") is None else data["base"]  # 0, [] or false is no mapping either
    if not isinstance(base, Mapping):
        problems.append("search_space.base: expected a mapping of architecture fields")
        base = {}
    base = dict(base)
    for key in sorted(set(map(str, base)) - family.base_fields - {"moe"}):
        problems.append(f"search_space.base.{key}: {_BALANCING_PARAM_ONLY}" if key == "balancing" else
                        f"search_space.base.{key}: not an architecture field"
                        + ("" if family is PIMOE else f" of the {family.name} family ({family.what})"))
    _check_types(base, family.base_fields - family.task_fields, "search_space.base", problems)
    for key in sorted(family.task_fields & set(base)):
        problems.append(f"search_space.base.{key}: set from the task, not by the space")
    base_moe = {} if base.get("moe") is None else base["moe"]
    if not isinstance(base_moe, Mapping):
        problems.append("search_space.base.moe: expected a mapping of MoE layer fields")
        base_moe = {}
    for key in sorted(set(map(str, base_moe)) - family.moe_fields):
        problems.append(f"search_space.base.moe.{key}: not an MoE layer field"
                        + ("" if family is PIMOE else f" the {family.name} family sets"))
    _check_types(base_moe, family.moe_fields, "search_space.base.moe", problems)
    base["moe"] = dict(base_moe)

    params = _parse_params(data.get("params"), problems, family)
    # Every parameter declared, valid or not: a bad definition is reported once, not again by each
    # expression and reference entry that names it.
    declared = set(map(str, data["params"])) & targets if isinstance(data.get("params"), Mapping) else set()
    known = {p.name for p in params} | declared
    derived = _parse_derived(data.get("derived"), known, problems, targets)
    known |= {n for n, _ in derived}
    _check_set_once(base, params, derived, family, problems)
    constraints = _parse_constraints(data.get("constraints"), known, problems)
    _check_compared_choices(params, [(f"search_space.derived.{n}", e) for n, e in derived]
                            + [(f"search_space.constraints[{i}]", e) for i, e in enumerate(constraints)], problems)
    reference = _parse_reference(data.get("reference"), params, declared, problems)
    description = data.get("description", "")
    if not isinstance(description, str):
        problems.append("search_space.description: expected a string")
    space_name = data.get("name", name)
    if not is_folder_name(space_name):
        # It names the study's folder (outputs/<space>-<task>): a '/' was refused as a bad study.name.
        problems.append(f"search_space.name: expected a plain folder name (not . or .., without / or \\), got "
                        f"{space_name!r}" + ("" if isinstance(space_name, str) or space_name is None else
                                             f" (YAML read it as {type(space_name).__name__} {space_name!r}: "
                                             "quote it)"))
    if problems:
        raise FuluConfigError(problems)
    space = SearchSpace(space_name, description, base, params, derived, constraints, reference, family)
    if reference is not None and family.probe:
        _check_reference_arch(space)
    return space


def _check_set_once(base: dict, params: tuple[Param, ...], derived: tuple, family: Family,
                    problems: list[str]) -> None:
    """Each field set in one place. A model applies the fixed values, then the parameters and derived values
    in the file's order (:meth:`.family.Family.split`), so a field set twice was settled by that order
    without a word (a sampled value dropped), and the study's fingerprint does not see the order."""
    setters = [(f"search_space.base.{n}", {("own", n)}) for n in base if n != "moe"]
    setters += [(f"search_space.base.moe.{n}", {("moe", n)}) for n in base["moe"]]
    setters += [(f"search_space.params.{p.name}", family.fields_set(p.name, p.choices)) for p in params]
    setters += [(f"search_space.derived.{n}", family.fields_set(n)) for n, _ in derived]
    places: dict[tuple[str, str], list[str]] = {}
    for key, fields_ in setters:
        for field in fields_:
            places.setdefault(field, []).append(key)
    for (_, field), where in places.items():
        if len(where) > 1:
            problems.append(f"{where[0]}: {field} is also set by {' and '.join(where[1:])}; set a field in one place")


def _check_types(fixed: Mapping, names: set[str], key: str, problems: list[str]) -> None:
    for name in sorted(set(fixed) & names):
        problem = type_problem(name, fixed[name])
        if problem:
            problems.append(f"{key}.{name}: {problem}")


def _parse_params(raw: object, problems: list[str], family: Family) -> tuple[Param, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        problems.append("search_space.params: expected a mapping of parameter name -> definition")
        return ()
    params: list[Param] = []
    for name, spec in raw.items():
        key = f"search_space.params.{name}"
        if not isinstance(name, str) or name not in family.targets:
            problems.append(f"{key}: not a searchable field ({family.what})")
            continue
        if not isinstance(spec, Mapping):
            problems.append(f"{key}: expected a mapping with a 'type'")
            continue
        n_before = len(problems)
        for extra in sorted(set(map(str, spec)) - _PARAM_KEYS):
            problems.append(f"{key}.{extra}: unknown key (allowed: {', '.join(sorted(_PARAM_KEYS))})")
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            problems.append(f"{key}.type: must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
            continue
        refused = frozenset(n for n in list(raw)[:list(raw).index(name)] if n not in {q.name for q in params})
        when = _parse_when(spec.get("when"), key, params, problems, refused)
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, (list, tuple)) or not choices:
                problems.append(f"{key}.choices: expected a non-empty list")
                continue
            bad = [c for c in choices if not _is_choice(c)]
            if bad:
                problems.append(f"{key}.choices: values must be numbers, strings, booleans or null, got {bad[0]!r}")
            elif len({_choice_key(c) for c in choices}) != len(choices):
                # 1 and 1.0 too: Optuna files a value under the first choice equal to it, so one was drawn
                # twice as often and recorded as the other
                problems.append(f"{key}.choices: contains duplicates")
            if name == "balancing" and not bad:
                unknown = [c for c in choices if c not in BALANCING_METHODS]
                if unknown:
                    problems.append(f"{key}.choices: unknown balancing method {unknown[0]!r} "
                                    f"(known: {', '.join(BALANCING_METHODS)})")
            elif not bad:
                mistyped = next(filter(None, (type_problem(name, c) for c in choices)), None)
                if mistyped:
                    problems.append(f"{key}.choices: {mistyped}")
            for extra in ("low", "high", "log", "step"):
                if extra in spec:
                    problems.append(f"{key}.{extra}: not allowed for a categorical parameter")
            if len(problems) == n_before:
                params.append(Param(name, kind, tuple(choices), when=when))
            continue
        if "choices" in spec:
            problems.append(f"{key}.choices: only for categorical parameters")
        low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
        if name == "balancing":
            problems.append(f"{key}.type: balancing is categorical")
        for bound, v in (("low", low), ("high", high)):
            if not is_finite_number(v) or (kind == "int" and not float(v).is_integer()):
                problems.append(f"{key}.{bound}: expected {'an integer' if kind == 'int' else 'a number'}, got {v!r}")
        if kind == "float" and is_finite_number(low) and (mistyped := type_problem(name, float(low))):
            problems.append(f"{key}.type: float samples fractions, and {name} takes whole numbers ({mistyped}); "
                            "use type: int" if type_problem(name, 1) is None else
                            f"{key}.type: {kind} samples numbers, and {name} takes no number ({mistyped}); use "
                            "type: categorical with its choices")
        if not isinstance(log, bool):
            problems.append(f"{key}.log: expected true or false, got {log!r}")
        if step is not None and (not is_finite_number(step) or step <= 0
                                 or (kind == "int" and not float(step).is_integer())):
            problems.append(f"{key}.step: expected a positive {'integer' if kind == 'int' else 'number'}, got {step!r}")
            step = None
        if len(problems) > n_before:
            continue
        if low > high:
            problems.append(f"{key}: low ({low}) > high ({high})")
        if log is True and low <= 0:
            problems.append(f"{key}.low: must be > 0 with log: true, got {low}")
        if log is True and step is not None and (kind == "float" or step != 1):
            problems.append(f"{key}: step and log: true cannot be combined")
        if kind == "float" and not _finite_span(low, high):
            problems.append(f"{key}: high - low ({high} - {low}) is beyond a float's range")
        elif step is not None and kind == "float" and (high - low) / step > GRID_MAX * 2**20:
            # too many values to count in a float (an OverflowError traceback): a continuous parameter
            problems.append(f"{key}.step: {step} makes more than {GRID_MAX * 2**20:,} values between low and high; "
                            "leave step out for a continuous parameter")
        elif step is not None and low <= high and not (_whole_steps(high - low, step, kind) if kind == "int"
                                                       else _divides(low, high, step)):
            problems.append(f"{key}.step: high - low ({high - low}) is not a multiple of step ({step})")
        if len(problems) == n_before:
            params.append(Param(name, kind, low=low, high=high, log=log, step=step, when=when))
    return tuple(params)


def _parse_when(raw: object, key: str, earlier: list[Param], problems: list[str],
                refused: frozenset[str] = frozenset()) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        problems.append(f"{key}.when: expected a mapping of earlier parameter -> value or list of values")
        return ()
    by_name = {p.name: p for p in earlier}
    out = []
    for other, allowed in raw.items():
        allowed = tuple(allowed) if isinstance(allowed, (list, tuple)) else (allowed,)
        p = by_name.get(other)
        if p is None and other in refused:  # an earlier definition refused already: that is the problem
            continue
        if p is None or p.kind != "categorical":
            problems.append(f"{key}.when.{other}: must name a categorical parameter defined earlier in params")
            continue
        missing = [a for a in allowed if not p.contains(a)]
        if missing or not allowed:
            problems.append(f"{key}.when.{other}: {missing[0] if missing else '[]'!r} is not one of its choices")
            continue
        out.append((other, allowed))
    return tuple(out)


def _parse_derived(raw: object, known: set[str], problems: list[str], targets: frozenset[str]) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        problems.append("search_space.derived: expected a mapping of field -> expression")
        return ()
    out = []
    for name, text in raw.items():
        key = f"search_space.derived.{name}"
        if name == "balancing":
            problems.append(f"{key}: {_BALANCING_PARAM_ONLY}")
            continue
        if not isinstance(name, str) or name not in targets:
            problems.append(f"{key}: not an architecture or MoE layer field")
            continue
        if name in known:
            problems.append(f"{key}: already defined")
            continue
        expr = _expression(text, key, known, problems)
        if expr is None:
            continue
        out.append((name, expr))
        known = known | {name}
    return tuple(out)


def _parse_constraints(raw: object, known: set[str], problems: list[str]) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        problems.append("search_space.constraints: expected a list of expressions")
        return ()
    out = []
    for i, text in enumerate(raw):
        expr = _expression(text, f"search_space.constraints[{i}]", known, problems)
        if expr is not None:
            out.append(expr)
    return tuple(out)


def _check_compared_choices(params: tuple[Param, ...], expressions: list[tuple[str, Expression]],
                            problems: list[str]) -> None:
    """A categorical parameter compared for (in)equality with a value that is none of its choices: a typo
    (``router != 'hsh'``) that makes the comparison the same for every sample, so the expression
    quietly keeps what it was written to refuse."""
    categorical = {p.name: p for p in params if p.kind == "categorical"}
    for key, expr in expressions:
        for node in ast.walk(expr.tree):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            for op, left, right in zip(node.ops, operands, operands[1:], strict=False):
                if not isinstance(op, ast.Eq | ast.NotEq):
                    continue
                for name, other in ((left, right), (right, left)):
                    p = isinstance(name, ast.Name) and categorical.get(name.id)
                    if not p:
                        continue
                    try:  # a literal (-1 too, which the tree holds as an operation on 1)
                        constant = ast.literal_eval(other)
                    except (ValueError, TypeError, SyntaxError, RecursionError):
                        continue  # a name or an expression: not known before sampling
                    # as the comparison itself reads them: 1 == 1.0 == True
                    if not any(constant == choice for choice in p.choices):
                        problems.append(f"{key}: {expr.text!r} compares {p.name} with {constant!r}, which is "
                                        f"not one of its choices ({', '.join(map(repr, p.choices))})")


def _expression(text: object, key: str, known: set[str], problems: list[str]) -> Expression | None:
    """A parsed expression whose names are all ``known`` parameters or derived values, or None
    (with the problem recorded)."""
    try:
        expr = parse_expression(text)
    except ExpressionError as e:
        problems.append(f"{key}: {e}")
        return None
    unknown = sorted(expr.names - known)
    if unknown:
        problems.append(f"{key}: unknown name {unknown[0]!r} in {expr.text!r} (use parameters or earlier "
                        "derived values)")
        return None
    return expr


def _parse_reference(raw: object, params: tuple[Param, ...], declared: set[str], problems: list[str]) -> dict | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append("search_space.reference: expected a mapping of parameter -> value")
        return None
    by_name = {p.name: p for p in params}
    for name in raw:
        if name not in by_name and name not in declared:
            problems.append(f"search_space.reference.{name}: not a parameter of this space")
    values: dict[str, Any] = {}
    refused: set[str] = set()
    for p in params:
        if not p.active(values):
            # A value given would be dropped: the reference trained would not be the one written. Unless a
            # parent's value was refused already, which is the problem to fix.
            if p.name in raw and not refused & {parent for parent, _ in p.when}:
                when = ", ".join(f"{parent} in {list(allowed)}" for parent, allowed in p.when)
                problems.append(f"search_space.reference.{p.name}: the parameter is inactive for this reference "
                                f"(its when: {when}); leave it out")
            continue
        if p.name not in raw:
            problems.append(f"search_space.reference.{p.name}: missing (the parameter is active)")
        elif not p.contains(raw[p.name]):
            value = raw[p.name]
            wrong_type = p.kind == "int" and is_finite_number(value) and not isinstance(value, int)
            problems.append(f"search_space.reference.{p.name}: " + (
                f"expected an integer, got {value!r}" if wrong_type else
                f"{value!r} is not one of the parameter's choices" if p.kind == "categorical" else
                f"{value!r} is outside the parameter's range"))
        else:
            values[p.name] = raw[p.name]
            continue
        refused.add(p.name)
    return values


class _ProbeTask:
    """The task a reference is checked on while the space is read, before the study's task is known: one
    of token classification, which every router may serve, so that only a reference no task could train
    is refused here; :func:`.feasibility.check_feasible` checks it on the study's task (a next-token task
    refuses expert choice)."""
    vocab_size, num_classes, seq_len = 256, 2, 64


def _check_reference_arch(space: SearchSpace) -> None:
    try:
        space.feasible_arch(space.with_derived(space.reference or {}), _ProbeTask)
    except Infeasible as e:
        raise FuluConfigError(f"search_space.reference: {e}") from None
