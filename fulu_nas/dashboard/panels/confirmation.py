"""The study's confirmation (``fulu-nas confirm``): does the search's ranking hold when its best
architectures are trained again with several seeds and a longer budget, and which of them beat the
reference beyond the seeds' noise?"""

from __future__ import annotations

from ...search.confirm_summary import SUMMARY_ATTR, TEST
from ..context import Context
from .blocks import note

_CANDIDATE, _REFERENCE = "#1f77b4", "#d62728"


def panel_confirmation(ctx: Context, opts: dict) -> list:
    summary = ctx.study.user_attrs.get(SUMMARY_ATTR)
    if not isinstance(summary, dict) and not ctx.complete:  # confirm would refuse it: nothing to train again
        return [note("Nothing to confirm yet: the study has no complete trial.")]
    if not isinstance(summary, dict):
        # the overrides that find the study from here (its folder and databases where not the default ones)
        command = " ".join(["fulu-nas confirm", *ctx.s.locating_overrides()])
        return [note(f"This study has not been confirmed yet: `{command}` trains its best architectures again "
                     "with several seeds and a longer budget, and this panel then compares the two rankings.")]
    rows = [r for r in summary["architectures"] if r["mean"] is not None]
    if not rows:
        return [note("Every run of the confirmation failed: see confirmation.json for the reasons.")]
    return [_figure(summary, rows), note(_caption(summary))]


def _label(r: dict) -> str:
    return f"trial {r['trial']}" + (" (reference)" if r["reference"] else "")


def _figure(summary: dict, rows: list[dict]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    objectives = summary["objectives"]
    ranks = _ranks_among_confirmed(rows)
    k = max(len(ranks), 1)
    fig = make_subplots(rows=1, cols=1 + len(objectives), horizontal_spacing=0.08,
                        subplot_titles=[f"search rank vs confirmed rank ({k} architectures)",
                                        *(f"{o}: mean +- sd over seeds" for o in objectives)])
    fig.add_trace(go.Scatter(x=[1, k], y=[1, k], mode="lines", line=dict(dash="dot", color="#999"),
                             name="same rank", hoverinfo="skip"), row=1, col=1)
    for reference, color in ((False, _CANDIDATE), (True, _REFERENCE)):
        group = [r for r in rows if r["reference"] == reference]
        name = "reference" if reference else "confirmed architectures"
        placed = [r for r in group if r["trial"] in ranks]
        fig.add_trace(go.Scatter(
            x=[ranks[r["trial"]][0] for r in placed], y=[ranks[r["trial"]][1] for r in placed],
            text=[_label(r) for r in placed], customdata=[r["search_rank"] for r in placed], mode="markers+text",
            textposition="top center", marker=dict(size=11, color=color, symbol="diamond" if reference else "circle"),
            name=name, legendgroup=name,
            hovertemplate=f"%{{text}}<br>search rank %{{x}} of these {k} (%{{customdata}} in the whole search), "
                          f"confirmed rank %{{y}} of {k}<extra></extra>"), row=1, col=1)
        for i, o in enumerate(objectives):
            fig.add_trace(go.Scatter(
                x=[_label(r) for r in group], y=[r["mean"][i] for r in group],
                error_y=dict(type="data", array=[r["sd"][i] if r["sd"] else 0.0 for r in group], visible=True),
                mode="markers", marker=dict(size=10, color=color, symbol="diamond" if reference else "circle"),
                name=name, legendgroup=name, showlegend=False,
                hovertemplate=f"%{{x}}<br>{o} mean %{{y:.4g}} +- %{{error_y.array:.2g}}<extra></extra>"),
                row=1, col=2 + i)
    for i, o in enumerate(objectives):
        fig.add_trace(go.Scatter(
            x=[_label(r) for r in rows], y=[r["search_values"][i] for r in rows], mode="markers",
            marker=dict(size=9, color="#555", symbol="x-thin", line=dict(width=2, color="#555")),
            name="value in the search", legendgroup="search", showlegend=i == 0,
            hovertemplate=f"%{{x}}<br>{o} in the search %{{y:.4g}}<extra></extra>"), row=1, col=2 + i)
        fig.update_yaxes(title_text=f"{o} ({summary['directions'][i][:3]})", row=1, col=2 + i)
    # Rank 1 at the top left; half a rank of margin keeps the labels of the last points inside.
    fig.update_xaxes(title_text=f"search rank among these {k}", dtick=1, range=[0.5, k + 0.7], row=1, col=1)
    fig.update_yaxes(title_text=f"confirmed rank among these {k}", dtick=1, range=[k + 0.5, 0.5], row=1, col=1)
    fig.update_layout(height=460, margin=dict(t=50), legend=dict(orientation="h", y=-0.25))
    return fig


def _ranks_among_confirmed(rows: list[dict]) -> dict[int, tuple[int, int]]:
    """trial -> (search rank, confirmed rank), both counted 1..K among the K confirmed architectures
    that the search ranked: the search ranks all its trials and the confirmation only these, so their
    raw ranks are on two scales that one "same rank" diagonal cannot compare."""
    ranked = [r for r in rows if r["search_rank"] is not None]
    by_search = [r["trial"] for r in sorted(ranked, key=lambda r: r["search_rank"])]
    by_confirmed = [r["trial"] for r in sorted(ranked, key=lambda r: r["confirmed_rank"])]
    return {t: (by_search.index(t) + 1, by_confirmed.index(t) + 1) for t in by_search}


def _caption(summary: dict) -> str:
    seeds = summary["seeds"]
    # A confirmation without search_seed was made when the runs began with the search's own seed.
    own = summary.get("search_seed", seeds[0])
    parts = [f"{len(summary['architectures'])} architectures x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}) "
             f"at {summary['steps']} steps, {summary['budget_factor']:g} x the search's {summary['search_steps']}"
             + (f"; seed {own} is the search's own seed, which the search selected on." if own in seeds else ".")]
    tau = summary["kendall_tau"]
    parts.append(f"Kendall's tau between the rankings: {tau['tau']:+.2f} over {tau['n']} architectures "
                 f"(p={tau['p_value']:.3g})." if tau["tau"] is not None else f"Kendall's tau: {tau['note']}.")
    objectives = summary["objectives"]
    # one verdict per objective: named when there are several (the console's table has a column each)
    verdicts = [f"trial {r['trial']}: " + "; ".join(f"{o}: {v['verdict']}" if len(objectives) > 1 else v["verdict"]
                                                     for o, v in zip(objectives, r["vs_reference"], strict=True))
                for r in summary["architectures"] if r["vs_reference"]]
    if verdicts:
        parts.append(f"Against the reference (trial {summary['reference']}; {TEST}, alpha "
                     f"{summary['test']['alpha']}): " + "; ".join(verdicts) + ".")
    if summary["winner"]:
        parts.append(f"Confirmed winner: trial {summary['winner']['trial']} (export with trial=best takes it).")
    if summary["failed_runs"]:
        parts.append(f"{len(summary['failed_runs'])} run(s) failed (see confirmation.json).")
    return " ".join(parts)
