"""The objective over the trials: the Pareto front of a multi-objective study, else the optimization
history."""

from __future__ import annotations

import json

from ..context import Context, describe_arch
from .blocks import needs_complete, note, quiet, untitled


def panel_objective(ctx: Context, opts: dict) -> list:
    return panel_pareto_front(ctx, opts) if ctx.multi else panel_history(ctx, opts)


def panel_pareto_front(ctx: Context, opts: dict) -> list:
    from optuna.visualization import plot_pareto_front

    if not ctx.multi:
        return [note(f"A single-objective study ({ctx.objectives[0]}) has no Pareto front.")]
    if blocks := needs_complete(ctx):
        return blocks
    names = [ctx.quantity(o) for o in ctx.objectives]
    if len(names) > 3:  # optuna draws 2 or 3 axes: the first two objectives
        fig = quiet(plot_pareto_front, ctx.pareto_plot_study(), target_names=names[:2],
                    targets=lambda t: (t.values[0], t.values[1]))
    else:
        fig = quiet(plot_pareto_front, ctx.pareto_plot_study(), target_names=names)
    _architecture_on_hover(fig, ctx, names)
    blocks = [untitled(fig)]
    front = ctx.pareto()
    blocks.append(note(f"{len(front)} trial(s) on the front: " + ", ".join(str(t.number) for t in front)
                       + ". Hover a point for its architecture."))
    return blocks


def _architecture_on_hover(fig, ctx: Context, names: list[str]) -> None:
    """Each point's hover text: its trial, objective values and architecture, where optuna shows the trial as
    JSON (its number, values and raw parameters)."""
    for trace in fig.data:
        if trace.text is None:
            continue
        texts = []
        for text in trace.text:
            try:
                number = json.loads(str(text).replace("<br>", "\n"))["number"]
                t = ctx.by_number[number]
            except (ValueError, KeyError, TypeError):
                texts.append(text)  # not a trial's JSON: as optuna wrote it
                continue
            values = ", ".join(f"{name} {value:.4g}" for name, value in zip(names, t.values, strict=False))
            texts.append(f"trial {number}: {values}<br>{_architecture(t)}")
        trace.text = texts


def _architecture(t) -> str:
    """A trial's architecture in words, and what sets it apart (the reference, reused weights)."""
    return (describe_arch(t.user_attrs.get("arch"), t.params)
            + (" (reference)" if t.user_attrs.get("reference") else "")
            + (f" (reuses trial {t.user_attrs['cached_from']})" if "cached_from" in t.user_attrs else ""))


def panel_history(ctx: Context, opts: dict) -> list:
    from optuna.visualization import plot_optimization_history

    if blocks := needs_complete(ctx):
        return blocks
    hover = {t.number: _architecture(t) for t in ctx.trials}
    blocks = []
    for i, (name, direction) in enumerate(zip(ctx.objectives, ctx.directions, strict=True)):
        kwargs = {"target": (lambda t, i=i: t.values[i]), "target_name": ctx.quantity(name)} if ctx.multi else \
            {"target_name": ctx.quantity(name)}
        fig = quiet(plot_optimization_history, ctx.plot_study, **kwargs)
        for trace in fig.data:
            if trace.mode == "markers" and trace.x is not None:
                trace.text = [hover.get(int(x), "") for x in trace.x]
                trace.hovertemplate = f"trial %{{x}}<br>{name}: %{{y:.4g}}<br>%{{text}}<extra></extra>"
        blocks.append(untitled(fig, f"{name} ({direction})" if ctx.multi else None))
    return blocks
