"""What panels are made of: a panel returns blocks, plotly figures or HTML notes; these helpers build
the notes and tidy optuna's figures."""

from __future__ import annotations

import html
import warnings
from typing import Any

from ..context import Context


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with nothing on the console: see :func:`quiet_noting`."""
    return quiet_noting(fn, *args, **kwargs)[0]


def quiet_noting(fn, *args, **kwargs) -> tuple[Any, list[str]]:
    """``fn(*args, **kwargs)`` and the warnings it gave (once each), without optuna's log lines ("Study
    instance does not contain trials." of a plot with nothing of its kind to draw) or any warning on the
    console: the console shows the result only, and the page says what a panel could not draw, or what
    optuna warned of as it drew (its experimental-API notices aside)."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn(*args, **kwargs)
    finally:
        optuna.logging.set_verbosity(verbosity)
    said = [str(w.message) for w in caught if not issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    return result, list(dict.fromkeys(said))


def per_objective(ctx: Context, plot, what: str, feasible_only: bool = False) -> list:
    """One figure of ``plot`` (an ``optuna.visualization`` function) per objective, each drawn from
    the objective's single-objective study (:meth:`Context.objective_study`) so that optuna knows
    whether it is minimised or maximised; a note for an objective it cannot be drawn for yet, and one for
    each warning optuna gave drawing it."""
    blocks = []
    for i, (name, direction) in enumerate(zip(ctx.objectives, ctx.directions, strict=True)):
        try:
            fig, said = quiet_noting(plot, ctx.objective_study(i, feasible_only), target_name=ctx.quantity(name))
        except Exception as e:  # too few distinct values, a single parameter, ...
            blocks.append(note(f"{what} for {name} could not be drawn yet ({type(e).__name__}: {e})."))
            continue
        blocks.append(untitled(fig, f"{name} ({direction})" if ctx.multi else None))
        blocks += [note(f"optuna: {message}") for message in said]
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
