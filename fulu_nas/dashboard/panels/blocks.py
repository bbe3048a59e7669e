"""What panels are made of: a panel returns blocks, plotly figures or HTML notes; these helpers build
the notes and tidy optuna's figures."""

from __future__ import annotations

import html
import warnings

from ..context import Context


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def quiet(fn, *args, **kwargs):
    import optuna

    with warnings.catch_warnings():  # experimental-API and PED-ANOVA direction notices: not the user's concern
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def needs_complete(ctx: Context, n: int = 1) -> list | None:
    if len(ctx.complete) < n:
        have = f"{len(ctx.complete)} so far" if ctx.complete else "none so far"
        return [note(f"Needs at least {n} complete trial{'s' if n > 1 else ''} ({have}).")]
    return None


def untitled(fig, title: str | None = None):
    fig.update_layout(title=title, margin=dict(t=50 if title else 30))
    return fig
