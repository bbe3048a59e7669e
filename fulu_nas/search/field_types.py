"""The type each architecture field takes, read from the annotations of
:class:`~fulu_nas.models.ArchConfig` and :class:`~fulu_nas.moe.MoEConfig`: a search space's fixed
values and categorical choices are checked against it before anything samples the space, so that
``top_k: 1.5`` or ``norm_eps: .nan`` is named with its key instead of failing every trial.
Which values a field accepts beyond its type (a known router, a multiple of 8) is the configs' own
business: the space's sampling check (:mod:`.feasibility`) asks them.
"""

from __future__ import annotations

import math
import types
import typing

from ..models import ArchConfig
from ..moe import MoEConfig

_HINTS = {**typing.get_type_hints(ArchConfig), **typing.get_type_hints(MoEConfig)}


def is_finite_number(v: object) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite, nor an int beyond any float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float: no setting is, and float(v) would fail later
        return False


def _fits(value: object, hint: object) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:  # tuple[int, ...]: YAML gives a list
        return isinstance(value, (list, tuple)) and all(_fits(v, int) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return is_finite_number(value)
    if hint is str:
        return isinstance(value, str)
    return True  # a nested config (ArchConfig.moe) is checked field by field


def _describe(hint: object) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "a list of integers"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number",
            str: "a string"}.get(hint, str(hint))


def type_problem(field: str, value: object) -> str | None:
    """What is wrong with ``value``'s type for architecture or MoE field ``field`` (None: nothing)."""
    hint = _HINTS.get(field)
    if hint is None or _fits(value, hint):
        return None
    return f"expected {_describe(hint)}, got {value!r}"
