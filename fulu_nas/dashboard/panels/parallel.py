"""Parameters against each objective: optuna's parallel coordinates."""

from __future__ import annotations

from ..context import Context
from .blocks import needs_complete, per_objective


def panel_parallel(ctx: Context, opts: dict) -> list:
    from optuna.visualization import plot_parallel_coordinate

    return needs_complete(ctx) or per_objective(ctx, plot_parallel_coordinate, "Parallel coordinates")
