"""The table of the best trials, with their metrics and architectures."""

from __future__ import annotations

import html

from ...search.report import format_value
from ..context import Context, describe_arch
from .blocks import needs_complete, note

# Metrics shown beside the objectives in the table of trials.
TABLE_METRICS = ("loss", "metric", "routing_accuracy", "load_balance", "latency_ms", "latency_ratio", "throughput",
                 "active_params")


def panel_top_trials(ctx: Context, opts: dict) -> list:
    if blocks := needs_complete(ctx):
        return blocks
    rows = int(opts.get("rows", 10))
    ranked = ctx.ranked()
    shown = ranked[:rows]
    reference = next((t for t in ranked if t.user_attrs.get("reference")), None)
    if reference is not None and reference not in shown:
        shown.append(reference)
    front = {t.number for t in ctx.pareto()}
    metrics = [m for m in TABLE_METRICS if m not in ctx.objectives]
    head = ["trial", *(f"{ctx.quantity(o)} ({d[:3]})" for o, d in zip(ctx.objectives, ctx.directions, strict=True)),
            *map(ctx.quantity, metrics), "architecture", "notes"]
    body = []
    for t in shown:
        m = t.user_attrs.get("metrics", {})
        notes = []
        if t.number in front:
            notes.append("Pareto front")
        if t.user_attrs.get("reference"):
            notes.append("reference")
        if "cached_from" in t.user_attrs:
            notes.append(f"reuses trial {t.user_attrs['cached_from']}")
        if not ctx.feasible(t):
            notes.append("violates constraints")
        cells = [str(t.number), *(format_value(v) for v in t.values), *(format_value(m.get(k)) for k in metrics),
                 describe_arch(t.user_attrs.get("arch"), t.params), ", ".join(notes)]
        best = ' class="best"' if ctx.best is not None and t.number == ctx.best.number else ""
        body.append(f"<tr{best}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    table = ('<table class="trials"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
             + "</tr></thead><tbody>" + "".join(body) + "</tbody></table>")
    order = "Pareto front first, then by " if ctx.multi else "by "
    return [note(f"{len(ctx.complete)} complete trial(s), {order}{ctx.objectives[0]}; showing {len(shown)}."),
            table]
