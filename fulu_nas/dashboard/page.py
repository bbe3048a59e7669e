"""The dashboard page: a header of the study's state and the layout's panels, in one self-contained HTML
file (plotly.js inlined)."""

from __future__ import annotations

import datetime as dt
import html
import re
from collections import Counter

from ..search.report import count_trials, describe_counts
from .context import Context
from .layout import Layout
from .panels import PANELS
from .panels.blocks import note

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


def _no_complete_trial(ctx: Context, counts: str) -> str:
    """A study over with no complete trial: its trials' outcomes and why they failed (each distinct
    reason, the most frequent first, with how many trials it failed)."""
    import optuna

    failed = [t.user_attrs.get("fail_reason") or "worker stopped" for t in ctx.trials
              if t.state == optuna.trial.TrialState.FAIL]
    # reasons that differ only in their numbers (the sizes of an out-of-memory error) are one reason, shown
    # by its most frequent wording
    texts: dict[str, Counter] = {}
    for reason in failed:
        texts.setdefault(_NUMBER.sub("#", reason), Counter())[reason] += 1
    reasons = Counter({key: sum(c.values()) for key, c in texts.items()})
    text = f"The search finished with no complete trial ({counts or 'no trial'})."
    if reasons:
        shown = [f"{texts[key].most_common(1)[0][0]} ({n} trial{'s' if n > 1 else ''}"
                 f"{', the numbers varying' if len(texts[key]) > 1 else ''})"
                 for key, n in reasons.most_common(_REASONS)]
        if len(reasons) > _REASONS:
            shown.append(f"{len(reasons) - _REASONS} other reason(s): see each trial's fail_reason")
        text += " Why the trials failed: " + "; ".join(shown) + "."
    return text


_REASONS = 5  # distinct failure reasons shown
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def trial_counts(trials: list) -> str:
    """The finished trials counted as the search's summary counts them (an infeasible trial is not "pruned",
    though optuna stores one that was never trained so; an interrupted attempt, queued again, is no trial),
    then those still to finish: the page's header and the command's console line."""
    import optuna

    states = Counter(t.state for t in trials)
    TS = optuna.trial.TrialState
    finished = describe_counts(count_trials(trials), zeros=False)
    pending = [f"{states[st]} {word}" for st, word in ((TS.RUNNING, "running"), (TS.WAITING, "waiting")) if states[st]]
    return ", ".join(part for part in (finished, *pending) if part)


def render(ctx: Context, layout: Layout) -> str:
    """The page: a header (the study, its trials by state) and the layout's panels."""
    import optuna
    from plotly.offline import get_plotlyjs

    states = Counter(t.state for t in ctx.trials)
    TS = optuna.trial.TrialState
    finished = describe_counts(count_trials(ctx.trials), zeros=False)
    counts = trial_counts(ctx.trials)
    s = ctx.s
    objectives = ", ".join(f"{o} ({d})" for o, d in zip(ctx.objectives, ctx.directions, strict=True))
    title = layout.title.replace("{study}", ctx.study.study_name)
    head = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="facts">study <b>{html.escape(ctx.study.study_name)}</b>: task {html.escape(s.task_name)}, '
            f"search space {html.escape(str(s.space.name))}, objectives {html.escape(objectives)}, "
            f"{s.study.n_trials} trials requested.</p>",
            f'<p class="facts">trials: {html.escape(counts or "none yet")}</p>']
    banners = []
    if states[TS.RUNNING] or states[TS.WAITING]:
        banners.append(f"The study is still running ({states[TS.RUNNING]} running, {states[TS.WAITING]} waiting): "
                       "this page is a snapshot; run `fulu-nas dashboard` again for a newer one.")
    if not ctx.complete and ctx.pending:
        banners.append("No trial has completed yet: the plots appear once one has.")
    elif not ctx.complete:
        banners.append(_no_complete_trial(ctx, finished))
    elif ctx.best is not None:
        banners_best = ctx.best_label()
        head.append(f'<p class="facts">{html.escape(banners_best[0].upper() + banners_best[1:])}</p>')
    head += [f'<p class="banner">{html.escape(b)}</p>' for b in banners]

    sections = []
    for i, panel in enumerate(layout.panels):
        try:
            blocks = PANELS[panel.name].draw(ctx, panel.options)
        except Exception as e:  # a panel that cannot be drawn must not cost the page
            blocks = [note(f"This panel could not be drawn: {type(e).__name__}: {e}")]
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
