"""Which parameters matter: optuna's parameter importances, per objective."""

from __future__ import annotations

from ..context import Context
from .blocks import needs_complete, per_objective


def panel_importances(ctx: Context, opts: dict) -> list:
    from optuna.visualization import plot_param_importances

    return needs_complete(ctx, 2) or per_objective(ctx, plot_param_importances, "Parameter importances")
