"""The product's own settings for a benchmark: ``fulu_nas/conf`` composed by Hydra and validated
exactly as ``fulu-nas search OVERRIDES`` would, with nothing written.

A table trains every architecture with the trainer a search trial gets, a replay samples with the
study's sampler construction, and ``bench cost`` and ``bench train-step`` measure as a trial does,
so all start here rather than from settings of their own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from ..errors import FuluConfigError
from ..search.settings import SearchSettings, load_settings


def composed_settings(overrides: Sequence[str]) -> SearchSettings:
    """The validated settings of ``fulu-nas search OVERRIDES``; FuluConfigError (exit 2) for any
    problem, Hydra's and OmegaConf's too (an unknown group option or key), which are no ValueError."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ..search.app import compose_config, composition_problem

    try:
        cfg, output_dir = compose_config(list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise FuluConfigError(composition_problem(e, None)) from None
    return load_settings(cfg, output_dir)


@functools.cache
def product_settings(space: str, task: str, overrides: tuple[str, ...] = ()) -> SearchSettings:
    """The validated settings of a search over ``space`` on ``task`` (FuluConfigError for an unknown
    space or task, or any other problem). Cached: a worker process composes them once."""
    return composed_settings([f"search_space={space}", f"task={task}", *overrides])
