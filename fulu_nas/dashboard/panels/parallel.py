"""Parameters against each objective: optuna's parallel coordinates."""

from __future__ import annotations

import math

from ..context import Context
from .blocks import needs_complete, per_objective


def panel_parallel(ctx: Context, opts: dict) -> list:
    from optuna.visualization import plot_parallel_coordinate

    if blocks := needs_complete(ctx):
        return blocks
    blocks = per_objective(ctx, plot_parallel_coordinate, "Parallel coordinates")
    for i, block in enumerate(blocks):  # one block per objective: its figure, or a note
        if not isinstance(block, str):
            _objective_ticks(block, ctx, i)
    return blocks


def _objective_ticks(fig, ctx: Context, i: int) -> None:
    """Label the objective's axis (the first, at x=0) with as many digits as its ticks need to differ:
    optuna writes three significant digits, so losses 0.02 apart read 1.29, 1.3, 1.3, 1.3, 1.31."""
    from optuna.trial import TrialState

    values = [t.values[0] for t in ctx.objective_study(i).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.values and math.isfinite(t.values[0])]
    ticks = [a for a in fig.layout.annotations if a.x == 0 and a.y is not None]
    if not values or len(ticks) < 2 or min(values) == max(values):
        return
    lo, hi = min(values), max(values)
    at = [lo + a.y * (hi - lo) for a in ticks]
    for digits in range(3, 10):
        texts = [f"{v:.{digits}g}" for v in at]
        if len(set(texts)) == len(texts):
            break
    for a, text in zip(ticks, texts, strict=True):
        a.text = text
