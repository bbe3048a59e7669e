"""Which parameters matter: optuna's parameter importances, per objective."""

from __future__ import annotations

from ..context import Context
from .blocks import needs_complete, note, quiet, untitled


def panel_importances(ctx: Context, opts: dict) -> list:
    from optuna.visualization import plot_param_importances

    if blocks := needs_complete(ctx, 2):
        return blocks
    try:
        if ctx.multi:
            fig = quiet(plot_param_importances, ctx.plot_study)
            fig.for_each_trace(lambda tr: tr.update(name=_objective_name(ctx, tr.name)))
        else:
            fig = quiet(plot_param_importances, ctx.plot_study, target_name=ctx.objectives[0])
    except Exception as e:  # too few distinct values, a single parameter, ...
        return [note(f"Parameter importances could not be computed yet ({type(e).__name__}: {e}).")]
    return [untitled(fig)]


def _objective_name(ctx: Context, name: str | None) -> str | None:
    """optuna labels multi-objective traces 'Objective Value k'; use our names."""
    if name and name.startswith("Objective Value"):
        for i, obj in enumerate(ctx.objectives):
            if name.endswith(str(i)):
                return obj
    return name
