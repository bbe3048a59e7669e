"""``fulu-nas dashboard``: one self-contained interactive HTML page of a study.

``fulu-nas dashboard study.name=NAME [layout=default] [out=FILE]`` (plus the overrides that locate
the study when the search used them: ``study.storage=``, ``tracking.uri=``, ``hydra.run.dir=``)
draws the panels of a layout (``dashboards/<layout>.yaml``: a title and a list of panels) with
``optuna.visualization`` and plotly, inlines plotly.js (the page works offline and inside the
MLflow UI's sandboxed iframe), writes it to ``out`` (default ``<output folder>/dashboard.html``)
and logs it to the study's parent MLflow run, where the MLflow UI shows it inline.

The page is a snapshot: a study that is still running (trials running, waiting, failed, pruned,
or none complete yet) gives a page that says so, with whatever can be drawn. Bad input (unknown
study, layout or panel) is one message and exit code 2, with nothing written.
"""

from __future__ import annotations

import copy
import datetime as dt
import html
import json
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FuluConfigError
from ..search.report import format_value

LAYOUTS_DIR = Path(__file__).resolve().parent / "layouts"
BAD_INPUT = 2
OPTIONS = {"layout": "default", "out": ""}
ARTIFACT = "dashboard.html"
# Metrics shown beside the objectives in the table of trials.
TABLE_METRICS = ("loss", "metric", "routing_accuracy", "load_balance", "latency_ms", "throughput", "active_params")
USAGE = """usage: fulu-nas dashboard study.name=NAME [layout=default|NAME|FILE.yaml] [out=FILE] [overrides ...]

Renders one self-contained HTML page of a study (plotly; works offline) from a layout in
dashboards/, writes it to out (default: <the search's output folder>/dashboard.html) and logs it
to the study's parent MLflow run (open it with `fulu-nas ui <output folder>`). Pass the overrides
that locate the study when the search used them: study.storage=..., tracking.uri=...,
hydra.run.dir=...
"""


# ---------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Panel:
    name: str
    title: str  # "" : the panel's own title
    description: str = ""
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    panels: tuple[Panel, ...]


def available_layouts() -> list[str]:
    return sorted(p.stem for p in LAYOUTS_DIR.glob("*.yaml"))


def load_layout(name: str) -> Layout:
    """``dashboards/<name>.yaml``, or a YAML file path; every problem in one FuluConfigError."""
    import yaml

    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
    else:
        path = LAYOUTS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FuluConfigError(f"layout: no layout {name!r} (layouts in {LAYOUTS_DIR}: "
                              f"{', '.join(available_layouts()) or 'none'}; or pass a path to a .yaml file)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise FuluConfigError(f"layout: {path} is not valid YAML: {' '.join(str(e).split())}") from None
    problems: list[str] = []
    if not isinstance(data, dict):
        raise FuluConfigError(f"layout: {path} must be a mapping with `title` and `panels`")
    for key in sorted(set(data) - {"title", "panels"}):
        problems.append(f"layout {path.stem}: unknown key {key!r} (keys: title, panels)")
    title = data.get("title", "{study}")
    if not isinstance(title, str):
        problems.append(f"layout {path.stem}: title must be a string")
        title = "{study}"
    entries = data.get("panels")
    if not isinstance(entries, list) or not entries:
        problems.append(f"layout {path.stem}: panels must be a non-empty list of panel names (known: "
                        f"{', '.join(PANELS)})")
        entries = []
    panels = []
    for i, entry in enumerate(entries):
        where = f"layout {path.stem}: panels[{i}]"
        if isinstance(entry, str):
            entry = {"panel": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("panel"), str):
            problems.append(f"{where}: expected a panel name or a mapping with `panel: NAME`")
            continue
        name_ = entry["panel"]
        if name_ not in PANELS:
            problems.append(f"{where}: unknown panel {name_!r} (known: {', '.join(PANELS)})")
            continue
        spec = PANELS[name_]
        options = {k: v for k, v in entry.items() if k not in ("panel", "title", "description")}
        for key in sorted(set(options) - set(spec.options)):
            allowed = ", ".join(["title", "description", *spec.options])
            problems.append(f"{where}: panel {name_!r} has no option {key!r} (options: {allowed})")
        for key, value in options.items():
            check = spec.options.get(key)
            if check is not None and not check(value):
                problems.append(f"{where}: {name_}.{key}={value!r} is not valid ({spec.option_help[key]})")
        for key in ("title", "description"):
            if key in entry and not isinstance(entry[key], str):
                problems.append(f"{where}: {key} must be a string")
        panels.append(Panel(name_, str(entry.get("title", "")), str(entry.get("description", "")),
                            {k: v for k, v in options.items() if k in spec.options}))
    if problems:
        raise FuluConfigError(problems)
    return Layout(path.stem, title, tuple(panels))


# ---------------------------------------------------------------- the study, as the panels see it


class Context:
    """A snapshot of the study (trials copied once, so a running study gives one consistent page),
    its search settings, and the best trial's artifacts (fetched lazily from MLflow)."""

    def __init__(self, study, settings, tracking_uri: str):
        import optuna

        self.study = study
        self.s = settings
        self.tracking_uri = tracking_uri
        self.objectives = list(settings.study.objectives)
        self.directions = list(settings.study.directions)
        self.multi = settings.study.multi_objective
        self.trials = study.get_trials(deepcopy=True)
        self.by_number = {t.number: t for t in self.trials}
        self.complete = [t for t in self.trials if t.state == optuna.trial.TrialState.COMPLETE]
        self.plot_study = self._plot_study()
        self._artifacts: dict[str, Any] = {}
        self.best = self._best()

    def _plot_study(self):
        """An in-memory copy for ``optuna.visualization``: its hover text shows the trial's
        architecture in a line instead of every user attribute (the full config, every metric)."""
        import optuna

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            plot = optuna.create_study(directions=self.directions, study_name=self.study.study_name)
            for t in self.trials:
                t2 = copy.copy(t)
                attrs = {"architecture": describe_arch(t.user_attrs.get("arch"), t.params)}
                if t.user_attrs.get("reference"):
                    attrs["reference"] = True
                if "cached_from" in t.user_attrs:
                    attrs["reused_from_trial"] = t.user_attrs["cached_from"]
                t2.user_attrs = attrs
                plot.add_trial(t2)
        finally:
            optuna.logging.set_verbosity(verbosity)
        return plot

    def feasible(self, t) -> bool:
        return all(c <= 0 for c in (t.constraints or {}).values())

    def ranked(self) -> list:
        """Complete trials, best first: feasible before infeasible; multi-objective studies put the
        Pareto front first (ordered by the first objective)."""
        front = {t.number for t in self.pareto()}

        def key(t):
            sign = 1 if self.directions[0] == "minimize" else -1
            return (not self.feasible(t), t.number not in front if self.multi else False, sign * t.values[0],
                    t.number)

        return sorted(self.complete, key=key)

    def pareto(self) -> list:
        if not self.multi or not self.complete:
            return []
        sign = 1 if self.directions[0] == "minimize" else -1
        return sorted(self.plot_study.best_trials, key=lambda t: (sign * t.values[0], t.number))

    def _best(self):
        ranked = self.ranked()
        if not ranked or not self.feasible(ranked[0]):
            return None
        return self.by_number[ranked[0].number]

    def artifact(self, run_id: str, path: str):
        """A JSON artifact of an MLflow run, or an Exception saying why not."""
        key = f"{run_id}/{path}"
        if key not in self._artifacts:
            import os

            import mlflow

            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    local = mlflow.MlflowClient(self.tracking_uri).download_artifacts(run_id, path, tmp)
                    self._artifacts[key] = json.loads(Path(local).read_text())
            except Exception as e:  # a missing artifact or an unreachable server: the panel says so
                self._artifacts[key] = e
        return self._artifacts[key]

    def best_artifact(self, path: str):
        """(the best trial's artifact, None) or (None, a note why there is none)."""
        if self.best is None:
            return None, "No complete feasible trial yet."
        run_id = self.best.user_attrs.get("weights_run_id") or self.best.user_attrs.get("mlflow_run_id")
        if not run_id:
            return None, f"trial {self.best.number} has no MLflow run."
        data = self.artifact(run_id, path)
        if isinstance(data, Exception):
            return None, f"trial {self.best.number}: could not read {path} from MLflow run {run_id} ({data})."
        return data, None

    def best_label(self) -> str:
        t = self.best
        what = "first trial of the Pareto front" if self.multi else "best trial"
        extra = " (the reference architecture)" if t.user_attrs.get("reference") else ""
        reused = (f"; reuses the weights of trial {t.user_attrs['cached_from']}" if "cached_from" in t.user_attrs
                  else "")
        return f"{what}: trial {t.number}{extra}: {describe_arch(t.user_attrs.get('arch'), t.params)}{reused}"


def describe_arch(arch: dict | None, params: dict) -> str:
    """One line: the MoE layer's shape and routing (from the trial's ArchConfig), else its parameters."""
    if not isinstance(arch, dict) or not isinstance(arch.get("moe"), dict):
        return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"
    m = arch["moe"]
    parts = [f"{m.get('router')} router", f"{m.get('num_experts')} experts"]
    if m.get("top_p") is not None:
        parts.append(f"top-p {m['top_p']}")
    elif m.get("capacity_factor") is not None:
        parts.append(f"capacity {m['capacity_factor']}")
    else:
        parts.append(f"top-{m.get('top_k')}")
    parts.append(f"expert ffn {m.get('expert_ffn_size')}")
    if (m.get("hierarchy_depth") or 1) > 1:
        parts.append(f"hierarchy depth {m['hierarchy_depth']}")
    if m.get("num_shared_experts"):
        parts.append(f"{m['num_shared_experts']} shared")
    if m.get("aux_loss_coef"):
        parts.append(f"aux loss {m['aux_loss_coef']:g}")
    if m.get("bias_update_rate"):
        parts.append("aux-free balancing")
    n = arch.get("num_layers")
    layers = f"{n} layer{'' if n == 1 else 's'} x {arch.get('hidden_size')} hidden"
    return f"{layers}; " + ", ".join(parts)


# ---------------------------------------------------------------- panels
# A panel returns blocks: plotly figures or HTML notes.


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _quiet(fn, *args, **kwargs):
    import optuna

    with warnings.catch_warnings():  # experimental-API and PED-ANOVA direction notices: not the user's concern
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def _needs_complete(ctx: Context, n: int = 1) -> list | None:
    if len(ctx.complete) < n:
        have = f"{len(ctx.complete)} so far" if ctx.complete else "none so far"
        return [_note(f"Needs at least {n} complete trial{'s' if n > 1 else ''} ({have}).")]
    return None


def _untitled(fig, title: str | None = None):
    fig.update_layout(title=title, margin=dict(t=50 if title else 30))
    return fig


def panel_objective(ctx: Context, opts: dict) -> list:
    return panel_pareto_front(ctx, opts) if ctx.multi else panel_history(ctx, opts)


def panel_pareto_front(ctx: Context, opts: dict) -> list:
    from optuna.visualization import plot_pareto_front

    if not ctx.multi:
        return [_note(f"A single-objective study ({ctx.objectives[0]}) has no Pareto front.")]
    if blocks := _needs_complete(ctx):
        return blocks
    names = ctx.objectives
    if len(names) > 3:  # optuna draws 2 or 3 axes: the first two objectives
        fig = _quiet(plot_pareto_front, ctx.plot_study, target_names=names[:2],
                     targets=lambda t: (t.values[0], t.values[1]))
    else:
        fig = _quiet(plot_pareto_front, ctx.plot_study, target_names=names)
    blocks = [_untitled(fig)]
    front = ctx.pareto()
    blocks.append(_note(f"{len(front)} trial(s) on the front: " + ", ".join(str(t.number) for t in front)
                        + ". Hover a point for its architecture."))
    return blocks


def panel_history(ctx: Context, opts: dict) -> list:
    from optuna.visualization import plot_optimization_history

    if blocks := _needs_complete(ctx):
        return blocks
    hover = {t.number: describe_arch(t.user_attrs.get("arch"), t.params)
             + (" (reference)" if t.user_attrs.get("reference") else "")
             + (f" (reuses trial {t.user_attrs['cached_from']})" if "cached_from" in t.user_attrs else "")
             for t in ctx.trials}
    blocks = []
    for i, (name, direction) in enumerate(zip(ctx.objectives, ctx.directions, strict=True)):
        kwargs = {"target": (lambda t, i=i: t.values[i]), "target_name": name} if ctx.multi else \
            {"target_name": name}
        fig = _quiet(plot_optimization_history, ctx.plot_study, **kwargs)
        for trace in fig.data:
            if trace.mode == "markers" and trace.x is not None:
                trace.text = [hover.get(int(x), "") for x in trace.x]
                trace.hovertemplate = f"trial %{{x}}<br>{name}: %{{y:.4g}}<br>%{{text}}<extra></extra>"
        blocks.append(_untitled(fig, f"{name} ({direction})" if ctx.multi else None))
    return blocks


def panel_importances(ctx: Context, opts: dict) -> list:
    from optuna.visualization import plot_param_importances

    if blocks := _needs_complete(ctx, 2):
        return blocks
    try:
        if ctx.multi:
            fig = _quiet(plot_param_importances, ctx.plot_study)
            fig.for_each_trace(lambda tr: tr.update(name=_objective_name(ctx, tr.name)))
        else:
            fig = _quiet(plot_param_importances, ctx.plot_study, target_name=ctx.objectives[0])
    except Exception as e:  # too few distinct values, a single parameter, ...
        return [_note(f"Parameter importances could not be computed yet ({type(e).__name__}: {e}).")]
    return [_untitled(fig)]


def _objective_name(ctx: Context, name: str | None) -> str | None:
    """optuna labels multi-objective traces 'Objective Value k'; use our names."""
    if name and name.startswith("Objective Value"):
        for i, obj in enumerate(ctx.objectives):
            if name.endswith(str(i)):
                return obj
    return name


def panel_parallel(ctx: Context, opts: dict) -> list:
    from optuna.visualization import plot_parallel_coordinate

    if blocks := _needs_complete(ctx):
        return blocks
    blocks = []
    for i, name in enumerate(ctx.objectives):
        kwargs = {"target": (lambda t, i=i: t.values[i])} if ctx.multi else {}
        try:
            fig = _quiet(plot_parallel_coordinate, ctx.plot_study, target_name=name, **kwargs)
        except Exception as e:
            blocks.append(_note(f"Parallel coordinates for {name} could not be drawn ({type(e).__name__}: {e})."))
            continue
        blocks.append(_untitled(fig, name if ctx.multi else None))
    return blocks


def panel_training_curves(ctx: Context, opts: dict) -> list:
    from optuna.visualization import plot_intermediate_values

    if ctx.multi:
        return [_note("Multi-objective trials report no intermediate values (see each trial's MLflow run for "
                      "train/loss).")]
    if not any(t.intermediate_values for t in ctx.trials):
        return [_note("No trial has reported its training loss yet.")]
    fig = _quiet(plot_intermediate_values, ctx.plot_study)
    fig.update_layout(xaxis_title="step", yaxis_title="smoothed training loss")
    return [_untitled(fig)]


def panel_expert_load(ctx: Context, opts: dict) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    history, why = ctx.best_artifact("routing_history.json")
    if why:
        return [_note(why)]
    if not history:
        return [_note(f"Trial {ctx.best.number} recorded no routing history.")]
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
    return [_note(ctx.best_label()), fig]


def panel_routing_matrix(ctx: Context, opts: dict) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not ctx.s.task.domain_names:
        return [_note(f"The task {ctx.s.task_name!r} has no domain labels: no domain x expert matrix.")]
    evaluation, why = ctx.best_artifact("evaluation.json")
    if why:
        return [_note(why)]
    layers = [(i, layer) for i, layer in enumerate(evaluation.get("layers", [])) if layer.get("confusion")]
    if not layers:
        return [_note(f"Trial {ctx.best.number}'s evaluation has no domain x expert counts.")]
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
    return [_note(text + " Rows: each domain's tokens, split across the experts they were routed to."), fig]


def panel_top_trials(ctx: Context, opts: dict) -> list:
    if blocks := _needs_complete(ctx):
        return blocks
    rows = int(opts.get("rows", 10))
    ranked = ctx.ranked()
    shown = ranked[:rows]
    reference = next((t for t in ranked if t.user_attrs.get("reference")), None)
    if reference is not None and reference not in shown:
        shown.append(reference)
    front = {t.number for t in ctx.pareto()}
    metrics = [m for m in TABLE_METRICS if m not in ctx.objectives]
    head = ["trial", *(f"{o} ({d[:3]})" for o, d in zip(ctx.objectives, ctx.directions, strict=True)), *metrics,
            "architecture", "notes"]
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
    return [_note(f"{len(ctx.complete)} complete trial(s), {order}{ctx.objectives[0]}; showing {len(shown)}."),
            table]


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass(frozen=True)
class PanelSpec:
    draw: Any
    title: str
    options: dict = field(default_factory=dict)
    option_help: dict = field(default_factory=dict)


PANELS: dict[str, PanelSpec] = {
    "objective": PanelSpec(panel_objective, "Objective"),
    "pareto_front": PanelSpec(panel_pareto_front, "Pareto front"),
    "history": PanelSpec(panel_history, "Optimization history"),
    "importances": PanelSpec(panel_importances, "Parameter importances"),
    "parallel": PanelSpec(panel_parallel, "Parameters against the objective"),
    "training_curves": PanelSpec(panel_training_curves, "Training curves"),
    "expert_load": PanelSpec(panel_expert_load, "Expert load over training (best trial)"),
    "routing_matrix": PanelSpec(panel_routing_matrix, "Domain x expert routing (best trial)"),
    "top_trials": PanelSpec(panel_top_trials, "Top trials", {"rows": _positive_int},
                            {"rows": "a positive integer"}),
}


# ---------------------------------------------------------------- the page


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 16px 24px; color: #222; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.facts { color: #444; margin: 0.2em 0; }
.banner { background: #fff4d6; border: 1px solid #e6c66a; padding: 8px 12px; border-radius: 4px; }
.note { color: #555; }
.plot { width: 100%; }
table.trials { border-collapse: collapse; font-size: 0.9em; width: 100%; }
table.trials th, table.trials td { border: 1px solid #ddd; padding: 4px 6px; text-align: right; }
table.trials td:nth-last-child(-n+2), table.trials th:nth-last-child(-n+2) { text-align: left; }
table.trials tr.best { background: #eef6ee; }
footer { color: #888; font-size: 0.8em; margin-top: 2em; }
"""


def _figure_html(fig, div_id: str) -> str:
    fig.update_layout(template="plotly_white", autosize=True)
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def _default_title(ctx: Context, name: str) -> str:
    if name == "objective":
        return PANELS["pareto_front" if ctx.multi else "history"].title
    return PANELS[name].title


def render(ctx: Context, layout: Layout) -> str:
    """The page: a header (the study, its trials by state) and the layout's panels."""
    import optuna
    from plotly.offline import get_plotlyjs

    states = Counter(t.state for t in ctx.trials)
    TS = optuna.trial.TrialState
    words = {TS.COMPLETE: "complete", TS.PRUNED: "pruned", TS.FAIL: "failed", TS.RUNNING: "running",
             TS.WAITING: "waiting"}
    counts = ", ".join(f"{states[s]} {word}" for s, word in words.items() if states[s])
    infeasible = sum("infeasible" in t.user_attrs for t in ctx.trials)
    s = ctx.s
    objectives = ", ".join(f"{o} ({d})" for o, d in zip(ctx.objectives, ctx.directions, strict=True))
    title = layout.title.replace("{study}", ctx.study.study_name)
    head = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="facts">study <b>{html.escape(ctx.study.study_name)}</b>: task {html.escape(s.task_name)}, '
            f"search space {html.escape(str(s.space.name))}, objectives {html.escape(objectives)}, "
            f"{s.study.n_trials} trials requested.</p>",
            f'<p class="facts">trials: {html.escape(counts or "none yet")}'
            + (f" ({infeasible} infeasible, not trained)" if infeasible else "") + "</p>"]
    banners = []
    if states[TS.RUNNING] or states[TS.WAITING]:
        banners.append(f"The study is still running ({states[TS.RUNNING]} running, {states[TS.WAITING]} waiting): "
                       "this page is a snapshot; run `fulu-nas dashboard` again for a newer one.")
    if not ctx.complete:
        banners.append("No trial has completed yet: the plots appear once one has.")
    elif ctx.best is not None:
        banners_best = ctx.best_label()
        head.append(f'<p class="facts">{html.escape(banners_best[0].upper() + banners_best[1:])}</p>')
    head += [f'<p class="banner">{html.escape(b)}</p>' for b in banners]

    sections = []
    for i, panel in enumerate(layout.panels):
        try:
            blocks = PANELS[panel.name].draw(ctx, panel.options)
        except Exception as e:  # a panel that cannot be drawn must not cost the page
            blocks = [_note(f"This panel could not be drawn: {type(e).__name__}: {e}")]
        parts = [f'<section id="panel-{html.escape(panel.name)}" data-panel="{html.escape(panel.name)}">',
                 f"<h2>{html.escape(panel.title or _default_title(ctx, panel.name))}</h2>"]
        if panel.description:
            parts.append(f"<p>{html.escape(panel.description)}</p>")
        for j, block in enumerate(blocks):
            if isinstance(block, str):
                parts.append(block)
            else:
                parts.append(f'<div class="plot">{_figure_html(block, f"plot-{i}-{j}")}</div>')
        parts.append("</section>")
        sections.append("\n".join(parts))
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    footer = (f"<footer>fulu-nas dashboard, layout {html.escape(layout.name)}, {now}; "
              "plots by optuna.visualization and plotly.</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head>\n<body>\n'
            + "\n".join(head) + "\n" + "\n".join(sections) + "\n" + footer + "\n</body></html>\n")


# ---------------------------------------------------------------- the command


def build(argv: list[str]) -> tuple[str, Path, Context, Layout, str | None]:
    """Validate, locate the study, render: (page, where to write it, context, layout, parent run)."""
    from ..search.locate import load_study, locate_study, search_settings, split_options
    from ..search.tracking import PARENT_RUN_ATTR

    own, overrides = split_options(argv, OPTIONS)
    layout = load_layout(own["layout"] or "default")
    location = locate_study(overrides)
    study = load_study(location)
    settings = search_settings(location, study)
    if own["out"]:
        out = Path(own["out"])
        if out.is_dir() or own["out"].endswith("/"):
            out = out / artifact_name(layout)
    else:
        out = location.output_dir / artifact_name(layout)
    ctx = Context(study, settings, location.tracking_uri)
    return render(ctx, layout), out, ctx, layout, study.user_attrs.get(PARENT_RUN_ATTR)


def artifact_name(layout: Layout) -> str:
    return ARTIFACT if layout.name == "default" else f"dashboard-{layout.name}.html"


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\nlayouts: " + ", ".join(available_layouts()) + "\npanels: " + ", ".join(PANELS))
        return 0
    try:
        page, out, ctx, layout, parent = build(argv)
    except FuluConfigError as e:
        print("error: invalid dashboard request:\n  - " + "\n  - ".join(e.problems), file=sys.stderr)
        return BAD_INPUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(f"dashboard: {out}  ({len(ctx.complete)} complete of {len(ctx.trials)} trials, layout {layout.name})")
    if not parent:
        print("not logged to MLflow: the study has no parent run", file=sys.stderr)
        return 0
    import mlflow

    try:
        mlflow.MlflowClient(ctx.tracking_uri).log_text(parent, page, artifact_name(layout))
    except Exception as e:  # the page is written; say why it is not in MLflow
        print(f"warning: could not log the dashboard to MLflow run {parent}: {e}", file=sys.stderr)
        return 1
    print(f"logged to MLflow run {parent} as {artifact_name(layout)}  (fulu-nas ui {ctx.s.output_dir})")
    return 0
