"""What panels are made of: a panel returns blocks, plotly figures or HTML notes; these helpers build
the notes and tidy optuna's figures."""

from __future__ import annotations

import html
import warnings

from ..context import Context


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` without optuna's experimental-API notices and log lines ("Study instance
    does not contain trials." of a plot with nothing of its kind to draw): the console shows the result
    only, and the page says what a panel could not draw."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return fn(*args, **kwargs)
    finally:
        optuna.logging.set_verbosity(verbosity)


def per_objective(ctx: Context, plot, what: str, feasible_only: bool = False) -> list:
    """One figure of ``plot`` (an ``optuna.visualization`` function) per objective, each drawn from
    the objective's single-objective study (:meth:`Context.objective_study`) so that optuna knows
    whether it is minimised or maximised; a note for an objective it cannot be drawn for yet."""
    blocks = []
    for i, (name, direction) in enumerate(zip(ctx.objectives, ctx.directions, strict=True)):
        try:
            fig = quiet(plot, ctx.objective_study(i, feasible_only), target_name=ctx.quantity(name))
        except Exception as e:  # too few distinct values, a single parameter, ...
            blocks.append(note(f"{what} for {name} could not be drawn yet ({type(e).__name__}: {e})."))
            continue
        blocks.append(untitled(fig, f"{name} ({direction})" if ctx.multi else None))
    return blocks


def needs_complete(ctx: Context, n: int = 1, feasible_only: bool = False) -> list | None:
    """A note when fewer than ``n`` trials are complete (``feasible_only``: complete and within the study's
    constraints), else None."""
    have = [t for t in ctx.complete if ctx.feasible(t)] if feasible_only else ctx.complete
    if len(have) < n:
        count = (str(len(have)) if have else "none") + (" so far" if ctx.pending else "")
        what = "complete feasible trial" if len(have) < len(ctx.complete) else "complete trial"
        return [note(f"Needs at least {n} {what}{'s' if n > 1 else ''} ({count}).")]
    return None


def untitled(fig, title: str | None = None):
    fig.update_layout(title=title, margin=dict(t=50 if title else 30))
    return fig
