"""The product's own settings for a table benchmark: ``fulu_nas/conf`` composed by Hydra and validated
exactly as ``fulu-nas search search_space=SPACE task=TASK ...`` would, with nothing written.

A table trains every architecture with the trainer a search trial gets, and a replay samples with
the study's sampler construction, so both start here rather than from settings of their own.
"""

from __future__ import annotations

import functools

from ..errors import FuluConfigError
from ..search.settings import SearchSettings, load_settings


@functools.cache
def product_settings(space: str, task: str, overrides: tuple[str, ...] = ()) -> SearchSettings:
    """The validated settings of a search over ``space`` on ``task`` (FuluConfigError for an unknown
    space or task, or any other problem). Cached: a worker process composes them once."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ..search.app import compose_config

    try:
        cfg, output_dir = compose_config([f"search_space={space}", f"task={task}", *overrides])
    except (HydraException, OmegaConfBaseException) as e:
        message = str(e).strip().splitlines()[0]
        raise FuluConfigError(f"configuration (search_space={space}, task={task}): {message}") from None
    return load_settings(cfg, output_dir)
