"""Which parameters matter: optuna's parameter importances, per objective, among the feasible trials."""

from __future__ import annotations

from ..context import Context
from .blocks import needs_complete, note, per_objective

# Below this many feasible complete trials the importances are said to be chance: with 3 trials of the tiny
# space, the two parameters that never changed ranked first (PED-ANOVA on too few points).
FEW_TRIALS = 10


def panel_importances(ctx: Context, opts: dict) -> list:
    """What makes a good value among the trials that count: a complete trial over a study constraint is
    left out (the lowest losses are often over a cost bound, and would make what they share look
    important; optuna's importances do not look at constraints)."""
    from optuna.visualization import plot_param_importances

    if blocks := needs_complete(ctx, 2, feasible_only=True):
        return blocks
    blocks = per_objective(ctx, plot_param_importances, "Parameter importances", feasible_only=True)
    over = sum(not ctx.feasible(t) for t in ctx.complete)
    if over:
        blocks.append(note(f"From the {len(ctx.complete) - over} feasible complete trials ({over} over a study "
                           "constraint left out)."))
    if (counted := len(ctx.complete) - over) < FEW_TRIALS:
        blocks.append(note(f"Only {counted} trials: importances from so few are mostly chance (a parameter that "
                           f"barely changed may rank high); read them from {FEW_TRIALS} trials on."))
    return blocks
