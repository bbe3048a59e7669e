"""Whether a value has the type a configuration field's annotation names (``int``, ``float``,
``bool``, ``str``, ``tuple[int, ...]``, ``X | None``): :class:`~fulu_nas.moe.MoEConfig` checks its
fields with it before any arithmetic on them, and the search checks a space's values against the
architecture's fields with it. Standard library only (this package imports torch and nothing else).
"""

from __future__ import annotations

import math
import types
import typing


def is_finite_number(v: object) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite, nor an int beyond any float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float: no setting is, and float(v) would fail later
        return False


def fits(value: object, hint: object) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (a float field takes an int; a tuple field
    a list, as YAML and JSON give it; a bool is not an int)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(fits(v, int) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return is_finite_number(value)
    if hint is str:
        return isinstance(value, str)
    return True  # a nested config (ArchConfig.moe) is checked field by field


def describe(hint: object) -> str:
    """``hint`` in words, for a message: "an integer or null"."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "a list of integers"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number",
            str: "a string"}.get(hint, str(hint))
