"""Every architecture of a finite search space, and the text that names a parameter value in a table.

A space whose parameters are all categorical (``when`` included) has finitely many samples:
:func:`enumerate_space` walks them in the space's own order (parameters as listed, choices as
listed), leaving out those that break a constraint or build no architecture, exactly the samples
a study would mark infeasible. A tabular benchmark trains each of them once per seed.

:func:`cells` turns sampled values into one text per parameter (empty where a ``when`` leaves the
parameter out): what a table's parameter columns hold, and the key a replay looks a sample up by.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import FuluConfigError
from ..search.space import Param, SearchSpace

INACTIVE = ""


def cell(value: Any) -> str:
    """A choice as table text: strings as they are, numbers, booleans and null as JSON writes them."""
    return value if isinstance(value, str) else json.dumps(value)


def cells(space: SearchSpace, values: Mapping[str, Any]) -> tuple[str, ...]:
    """The table key of sampled ``values``: one text per parameter of ``space``, in its order."""
    return tuple(cell(values[p.name]) if p.name in values else INACTIVE for p in space.params)


def check_finite(space: SearchSpace) -> None:
    """FuluConfigError unless every parameter is categorical with choices that read back unambiguously."""
    problems = [f"search_space.params.{p.name}: a table enumerates categorical parameters only, not {p.kind}"
                for p in space.params if p.kind != "categorical"]
    problems += [f"search_space.params.{p.name}: two choices have the same table text" for p in space.params
                 if p.kind == "categorical" and len({cell(c) for c in p.choices}) != len(p.choices)]
    if problems:
        raise FuluConfigError(problems)


def enumerate_space(space: SearchSpace, task) -> list[dict[str, Any]]:
    """The sampled values (parameters only, no derived ones) of every feasible architecture of ``space``
    on ``task``, in enumeration order."""
    check_finite(space)
    found: list[dict[str, Any]] = []

    def walk(params: tuple[Param, ...], values: dict[str, Any]) -> None:
        if not params:
            full = space.with_derived(values)
            if space.violations(full):
                return
            try:
                space.arch(full, task)
            except FuluConfigError:
                return
            found.append(values)
            return
        head, rest = params[0], params[1:]
        if not head.active(values):
            walk(rest, values)
            return
        for choice in head.choices:
            walk(rest, {**values, head.name: choice})

    walk(space.params, {})
    return found


def architecture_keys(space: SearchSpace, task) -> list[tuple[str, ...]]:
    """The table keys of every feasible architecture, in enumeration order."""
    return [cells(space, values) for values in enumerate_space(space, task)]
