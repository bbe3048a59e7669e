"""What sampler replays add up to: regret quartiles per trial, the trials each sampler needs to reach
random search's median result, a printed table, a JSON of the numbers and a plotly page.

Random search is the baseline (Lindauer & Hutter 2020: compare against it at the same budget). Its
target is the median over repetitions of its regret after ``baseline_trial`` trials (50, or every
trial of a shorter replay), for an even number of repetitions the higher of the two middle regrets:
a regret some repetition reached (not a value between two that none has), which more than half of
random search's repetitions reach by that trial. A repetition reaches it at the first trial whose
regret is no larger.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

BASELINE = "random"
CHECKPOINTS = (10, 25, 50, 100)


def quartiles(values) -> dict[str, float]:
    q1, median, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3)}


def first_reaching(regret: list[float], target: float) -> int | None:
    """The 1-based trial at which ``regret`` first drops to ``target`` or below (None: never)."""
    return next((t for t, r in enumerate(regret, start=1) if r <= target), None)


def summarize(curves: dict[str, list[list[float]]], baseline_trial: int = 50) -> dict:
    """``curves[sampler][repetition][trial]`` (regret) -> per sampler: quartiles at the checkpoints and
    at every trial, and the trials needed to reach the baseline's median regret after ``baseline_trial``."""
    trials = len(next(iter(curves.values()))[0])
    at = min(baseline_trial, trials)
    # An order statistic, not interpolated: with an even count, the mean of the two middle regrets is
    # a value no repetition has, reached by only half of random's own repetitions ("not reached").
    target = float(np.percentile(np.asarray([rep[at - 1] for rep in curves[BASELINE]], dtype=float), 50,
                                 method="higher"))
    out = {"target": {"sampler": BASELINE, "trial": at, "regret": target}, "samplers": {}}
    for name, reps in curves.items():
        reached = [first_reaching(rep, target) for rep in reps]
        # A repetition that never reaches the target counts as infinitely many trials, so the median
        # says "not reached" (None) when half of them or more miss it.
        median = float(np.median([math.inf if t is None else t for t in reached]))
        out["samplers"][name] = {
            # The last trial is a checkpoint too: a shorter replay than the first checkpoint showed no regret.
            "checkpoints": {t: quartiles([rep[t - 1] for rep in reps])
                            for t in sorted({c for c in CHECKPOINTS if c <= trials} | {trials})},
            "trials_to_target": {"median": None if math.isinf(median) else median,
                                 "reached": sum(t is not None for t in reached), "repetitions": len(reps),
                                 "per_repetition": reached},
            "per_trial": [quartiles(column) for column in zip(*reps, strict=True)],
            "regret": reps,
        }
    return out


def format_table(summary: dict) -> str:
    """A Markdown table: regret median [quartiles] at each checkpoint, and trials to the target."""
    from .common import markdown_table

    first = next(iter(summary["samplers"].values()))
    checkpoints = list(first["checkpoints"])
    target = summary["target"]
    head = ["sampler", *(f"regret @{t} median [q1, q3]" for t in checkpoints),
            f"trials to {target['sampler']}'s {target['trial']}-trial median (median; reached)"]
    body = []
    for name, s in summary["samplers"].items():
        row = [name] + [f"{q['median']:.4f} [{q['q1']:.4f}, {q['q3']:.4f}]" for q in s["checkpoints"].values()]
        t = s["trials_to_target"]
        median = "not reached" if t["median"] is None else f"{t['median']:g}"
        row.append(f"{median}; {t['reached']}/{t['repetitions']}")
        body.append(row)
    return markdown_table(head, body, text_columns=1)


def write_json(path: Path, summary: dict, facts: dict) -> None:
    path.write_text(json.dumps({**facts, **summary}, indent=1))


def write_html(path: Path, summary: dict, title: str, y_title: str) -> None:
    """Median regret against trials, quartile band shaded, one colour per sampler (plotly.js inlined)."""
    import plotly.graph_objects as go
    from plotly.colors import DEFAULT_PLOTLY_COLORS

    fig = go.Figure()
    for (name, s), colour in zip(summary["samplers"].items(), DEFAULT_PLOTLY_COLORS, strict=False):
        x = list(range(1, len(s["per_trial"]) + 1))
        q1, median, q3 = ([q[k] for q in s["per_trial"]] for k in ("q1", "median", "q3"))
        band = colour.replace("rgb", "rgba").replace(")", ", 0.15)")
        fig.add_trace(go.Scatter(x=x + x[::-1], y=q3 + q1[::-1], fill="toself", fillcolor=band, line={"width": 0},
                                 hoverinfo="skip", showlegend=False, legendgroup=name))
        fig.add_trace(go.Scatter(x=x, y=median, name=name, line={"color": colour}, legendgroup=name))
    fig.update_layout(title=title, xaxis_title="trials", yaxis_title=y_title, template="plotly_white")
    fig.write_html(path, include_plotlyjs=True, full_html=True)
