"""The type each architecture field takes, read from the annotations of
:class:`~fulu_nas.models.ArchConfig` and :class:`~fulu_nas.moe.MoEConfig`: a search space's fixed
values and categorical choices are checked against it before anything samples the space, so that
``top_k: 1.5`` or ``norm_eps: .nan`` is named with its key instead of failing every trial.
Which values a field accepts beyond its type (a known router, a multiple of 8) is the configs' own
business: the space's sampling check (:mod:`.feasibility`) asks them.
"""

from __future__ import annotations

import typing

from ..models import ArchConfig
from ..moe import MoEConfig
from ..moe.field_types import describe, fits

_HINTS = {**typing.get_type_hints(ArchConfig), **typing.get_type_hints(MoEConfig)}


def type_problem(field: str, value: object) -> str | None:
    """What is wrong with ``value``'s type for architecture or MoE field ``field`` (None: nothing)."""
    hint = _HINTS.get(field)
    if hint is None or fits(value, hint):
        return None
    return f"expected {describe(hint)}, got {value!r}"
