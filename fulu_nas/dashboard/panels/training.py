"""How the trials trained: the training-loss curves, and the best trial's expert load over training
and domain x expert routing (from its MLflow artifacts)."""

from __future__ import annotations

from ..context import Context
from .blocks import note, quiet, untitled


def panel_training_curves(ctx: Context, opts: dict) -> list:
    import plotly.graph_objects as go
    from optuna.trial import TrialState
    from optuna.visualization import plot_intermediate_values

    if ctx.multi:
        return [note("Multi-objective trials report no intermediate values (see each trial's MLflow run for "
                     "train/loss).")]
    if not any(t.intermediate_values for t in ctx.trials):
        return [note("No trial has reported its training loss yet." if ctx.pending else
                     "No trial reported its training loss.")]
    fig = quiet(plot_intermediate_values, ctx.plot_study)
    fig.update_layout(xaxis_title="step", yaxis_title="smoothed training loss")
    # optuna draws complete, pruned and running trials only; a failed trial's loss up to its failure
    # (over the time budget, diverged) is part of "every trial" too.
    failed = [t for t in ctx.trials if t.state == TrialState.FAIL and t.intermediate_values]
    for t in failed:
        steps = sorted(t.intermediate_values)
        fig.add_trace(go.Scatter(x=steps, y=[t.intermediate_values[k] for k in steps], mode="lines+markers",
                                 line=dict(dash="dot"), marker=dict(maxdisplayed=10), name=f"Trial{t.number} (failed)"))
    blocks = [untitled(fig)]
    if failed:
        blocks.append(note(f"Dotted: the failed trial(s) {', '.join(str(t.number) for t in failed)}, up to their "
                           "failure."))
    return blocks


def panel_expert_load(ctx: Context, opts: dict) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    history, why = ctx.best_artifact("routing_history.json")
    if why:
        return [note(why)]
    if not history:
        return [note(f"Trial {ctx.best.number} recorded no routing history.")]
    steps = [h["step"] for h in history]
    n_layers = len(history[0]["tokens_per_expert"])
    fig = make_subplots(rows=n_layers, cols=1, shared_xaxes=True, vertical_spacing=0.08 if n_layers > 1 else 0,
                        subplot_titles=[f"MoE layer {i}" for i in range(n_layers)])
    for layer in range(n_layers):
        counts = [h["tokens_per_expert"][layer] for h in history]
        n_experts = max(len(c) for c in counts)
        share = [[(c[e] / sum(c) if sum(c) and e < len(c) else 0.0) for c in counts] for e in range(n_experts)]
        raw = [[(c[e] if e < len(c) else 0) for c in counts] for e in range(n_experts)]
        fig.add_trace(go.Heatmap(
            x=steps, y=[f"expert {e}" for e in range(n_experts)], z=share, customdata=raw, coloraxis="coloraxis",
            hovertemplate="step %{x}<br>%{y}<br>share %{z:.1%} (%{customdata:.0f} tokens)<extra></extra>"),
            row=layer + 1, col=1)
    fig.update_layout(coloraxis=dict(colorscale="Viridis", colorbar_title="share of<br>routed tokens"),
                      height=max(300, 60 + n_layers * (40 + 28 * n_experts)), margin=dict(t=40))
    fig.update_xaxes(title_text="training step", row=n_layers, col=1)
    return [note(ctx.best_label()), fig]


def panel_routing_matrix(ctx: Context, opts: dict) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not ctx.s.task.domain_names:
        return [note(f"The task {ctx.s.task_name!r} has no domain labels: no domain x expert matrix.")]
    evaluation, why = ctx.best_artifact("evaluation.json")
    if why:
        return [note(why)]
    layers = [(i, layer) for i, layer in enumerate(evaluation.get("layers", [])) if layer.get("confusion")]
    if not layers:
        return [note(f"Trial {ctx.best.number}'s evaluation has no domain x expert counts.")]
    domains = list(ctx.s.task.domain_names)
    fig = make_subplots(rows=len(layers), cols=1, vertical_spacing=0.1 if len(layers) > 1 else 0,
                        subplot_titles=[f"MoE layer {i}" for i, _ in layers])
    for row, (_, layer) in enumerate(layers, start=1):
        counts = layer["confusion"]
        names = domains if len(domains) == len(counts) else [f"domain {d}" for d in range(len(counts))]
        share = [[c / sum(r) if sum(r) else 0.0 for c in r] for r in counts]
        experts = [f"expert {e}" for e in range(len(counts[0]))]
        fig.add_trace(go.Heatmap(
            x=experts, y=names, z=share, customdata=counts, coloraxis="coloraxis",
            text=[[f"{v:.0%}" for v in r] for r in share], texttemplate="%{text}",
            hovertemplate="%{y} -> %{x}<br>%{z:.1%} of the domain's tokens (%{customdata:.0f})<extra></extra>"),
            row=row, col=1)
        fig.update_yaxes(autorange="reversed", row=row, col=1)
    n_domains = max(len(layer["confusion"]) for _, layer in layers)
    fig.update_layout(coloraxis=dict(colorscale="Blues", cmin=0, cmax=1, colorbar_title="share of<br>domain"),
                      height=max(300, 60 + len(layers) * (60 + 30 * n_domains)), margin=dict(t=40))
    acc = evaluation.get("routing_accuracy")
    text = ctx.best_label() + (f". Routing accuracy {acc:.1%}." if isinstance(acc, int | float) else ".")
    return [note(text + " Rows: each domain's tokens, split across the experts they were routed to."), fig]
