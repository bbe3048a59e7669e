"""Parameters against each objective: optuna's parallel coordinates."""

from __future__ import annotations

from ..context import Context
from .blocks import needs_complete, note, quiet, untitled


def panel_parallel(ctx: Context, opts: dict) -> list:
    from optuna.visualization import plot_parallel_coordinate

    if blocks := needs_complete(ctx):
        return blocks
    blocks = []
    for i, name in enumerate(ctx.objectives):
        kwargs = {"target": (lambda t, i=i: t.values[i])} if ctx.multi else {}
        try:
            fig = quiet(plot_parallel_coordinate, ctx.plot_study, target_name=name, **kwargs)
        except Exception as e:
            blocks.append(note(f"Parallel coordinates for {name} could not be drawn ({type(e).__name__}: {e})."))
            continue
        blocks.append(untitled(fig, name if ctx.multi else None))
    return blocks
