"""The search engine: Hydra-composed spaces -> Optuna studies -> MLflow.

``space`` parses and samples declarative spaces (``expressions``: their derived values and
constraints, ``field_types``: the types their fixed values take, ``feasibility``: the sampling
that refuses a space yielding nothing to train), ``settings`` validates the composed config,
``objective`` is one trial's protocol, ``study`` drives the study and its workers, ``tracking``
writes MLflow runs, ``report`` summarises, ``app`` is the Hydra entry point of ``fulu-nas search``;
``confirm`` trains the chosen architectures again (``confirm_summary``: its statistics,
``confirm_command``: ``fulu-nas confirm``).
Optuna, MLflow and Hydra are imported here and above, never in ``fulu_nas.moe``.
"""

from .settings import SearchSettings, load_settings
from .space import SearchSpace, parse_space

__all__ = ["SearchSettings", "SearchSpace", "load_settings", "parse_space"]
