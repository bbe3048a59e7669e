"""Tasks: deterministic data, validation split and metrics for the search (see :mod:`.base`).

``build_task(name, **params)`` is the one entry point for configuration: it refuses unknown task
names and unknown parameters, and each task's constructor refuses bad values, all with
:class:`~fulu_nas.errors.FuluConfigError`.
"""

from __future__ import annotations

import inspect

from fulu_nas.errors import FuluConfigError
from fulu_nas.tasks.base import IGNORE, NO_DOMAIN, Batch, Task
from fulu_nas.tasks.clusters import ClustersTask
from fulu_nas.tasks.pimoe_mix import PiMoEMixTask
from fulu_nas.tasks.textlm import TextLMTask

TASKS: dict[str, type[Task]] = {"clusters": ClustersTask, "pimoe_mix": PiMoEMixTask, "textlm": TextLMTask}
# The tasks layers above this one register (register_task), and the module that does.
_REGISTERED_ABOVE = {"upcycle": "fulu_nas.interop"}


def register_task(cls: type[Task]) -> type[Task]:
    """Add a task defined in a layer above this one (``upcycle``, which reads a Hugging Face model, is
    registered by :mod:`fulu_nas.interop` when it is imported: the search's settings and any public name of
    ``fulu_nas`` import it)."""
    TASKS[cls.name] = cls
    return cls


def task_parameters(name: str) -> dict[str, object]:
    """The constructor parameters of task ``name`` and their defaults."""
    return {p.name: p.default for p in inspect.signature(TASKS[name]).parameters.values()}


def build_task(name: str, **params) -> Task:
    """The task ``name`` built from keyword ``params`` (FuluConfigError for anything unknown or invalid)."""
    if name not in TASKS:
        if name in _REGISTERED_ABOVE:  # its module is not imported yet: say which, rather than "unknown"
            raise FuluConfigError(f"task {name!r} is registered by {_REGISTERED_ABOVE[name]}: import it first (or "
                                  f"any public name of fulu_nas, e.g. `from fulu_nas import load`)")
        raise FuluConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    known = task_parameters(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise FuluConfigError([f"task {name!r} has no parameter {p!r} (known: {', '.join(known)})" for p in unknown])
    return TASKS[name](**params)


__all__ = ["IGNORE", "NO_DOMAIN", "TASKS", "Batch", "ClustersTask", "PiMoEMixTask", "Task", "TextLMTask",
           "build_task", "register_task", "task_parameters"]
