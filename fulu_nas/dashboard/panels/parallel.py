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
            _visible_lines(block)
    return blocks


# The part of optuna's colour scale the lines are drawn from: its first colours are near white, and at the
# lines' half opacity the worst trial's line did not show on the page.
_SCALE_FROM = 0.4


def _visible_lines(fig) -> None:
    """Redraw each trial's line from the darker part of the colour scale, keeping the order of the colours
    (the best trials darkest), and the colour bar with it. optuna gives each line a colour of the scale
    its colour bar shows, so a line's place on the scale is found again by its brightness, which falls
    along the scale."""
    import plotly.colors

    bars = [t for t in fig.data if t.mode == "markers" and t.marker.showscale and t.marker.colorscale]
    if len(bars) != 1:
        return

    def at(scale: list, v: float) -> str:
        return plotly.colors.sample_colorscale(scale, [v], colortype="rgb")[0]

    def brightness(colour: str) -> float:
        return sum(plotly.colors.unlabel_rgb(colour))

    def place(colour: str) -> float:
        lo, hi, target = 0.0, 1.0, brightness(colour)
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if brightness(at(optunas, mid)) > target else (lo, mid)
        return (lo + hi) / 2

    optunas = [list(step) for step in bars[0].marker.colorscale]
    darker = plotly.colors.make_colorscale([at(optunas, _SCALE_FROM + (1 - _SCALE_FROM) * i / 8) for i in range(9)])
    for trace in fig.data:
        if trace.mode == "lines" and isinstance(trace.line.color, str) and trace.line.color.startswith("rgb"):
            trace.line.color = at(darker, place(trace.line.color))
        elif trace.mode == "markers" and trace.marker.showscale:
            trace.marker.colorscale = darker


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
