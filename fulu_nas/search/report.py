"""The end of a search: the best trial (or the Pareto front) beside the reference architecture,
as a plain dict (summary.json, the MLflow parent run) and as a table on the terminal."""

from __future__ import annotations

import io
import math

import optuna

from .objective import counts_toward_total, is_feasible, pareto_front
from .settings import SearchSettings

TrialState = optuna.trial.TrialState
_COLUMNS = ("loss", "metric", "routing_accuracy", "load_balance", "latency_ms", "latency_ratio", "active_params")
# The counts of count_trials, in the order and words of the console's summary.
_COUNT_WORDS = (("n_complete", "complete"), ("n_pruned", "pruned"), ("n_failed", "failed"),
                ("n_infeasible", "infeasible"), ("n_reused", "reused"))


def _row(t: optuna.trial.FrozenTrial) -> dict:
    return {"number": t.number, "values": list(t.values or []), "params": dict(t.params),
            "metrics": dict(t.user_attrs.get("metrics", {})), "reference": bool(t.user_attrs.get("reference")),
            "feasible": is_feasible(t), "violated_constraints": [k for k, c in t.constraints.items() if c > 0],
            "cached_from": t.user_attrs.get("cached_from"), "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            "weights_run_id": t.user_attrs.get("weights_run_id")}


def count_trials(trials: list[optuna.trial.FrozenTrial]) -> dict:
    """The trials by outcome (summary.json, the MLflow tags, the console and the dashboard's header)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return {
        "n_finished": sum(counts_toward_total(t) for t in trials),
        "n_complete": len(complete),
        "n_pruned": sum(t.state == TrialState.PRUNED and "infeasible" not in t.user_attrs for t in trials),
        # not trained (outside the space's constraints), or trained and over a study constraint
        "n_infeasible": sum("infeasible" in t.user_attrs for t in trials) + sum(not is_feasible(t) for t in complete),
        "n_failed": sum(t.state == TrialState.FAIL and counts_toward_total(t) for t in trials),
        "n_reused": sum("cached_from" in t.user_attrs for t in complete),
    }


def describe_counts(counts: dict, zeros: bool = True) -> str:
    """'3 complete, 1 pruned, ...' from :func:`count_trials`; ``zeros=False`` leaves out the zeros."""
    return ", ".join(f"{counts[k]} {word}" for k, word in _COUNT_WORDS if zeros or counts[k])


def summarize(study: optuna.Study, s: SearchSettings) -> dict:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary: dict = {
        "study": s.study.name, "objectives": list(s.study.objectives), "directions": list(s.study.directions),
        "n_trials_requested": s.study.n_trials, **count_trials(trials),
    }
    reference = next((t for t in complete if t.user_attrs.get("reference")), None)
    summary["reference"] = _row(reference) if reference else None
    candidates = [t for t in complete if is_feasible(t)]
    if not candidates:
        return summary
    if s.study.multi_objective:
        summary["pareto_front"] = [_row(t) for t in pareto_front(study)]
        return summary
    sign = 1 if s.study.directions[0] == "minimize" else -1
    best = min(candidates, key=lambda t: sign * t.values[0])
    summary.update(best_trial=best.number, best_values=list(best.values), best_params=dict(best.params),
                   best_metrics=dict(best.user_attrs.get("metrics", {})), best=_row(best))
    if reference is not None:
        ref, got = reference.values[0], best.values[0]
        summary["beats_reference"] = sign * (got - ref) < 0
        summary["improvement_over_reference"] = (ref - got) * sign / abs(ref) if ref else None
        summary["best_is_reference"] = best.user_attrs.get("arch_hash") == reference.user_attrs.get("arch_hash")
    return summary


def console_for_results():
    """The console the results are printed on: the terminal's width on a terminal, 160 columns in a log."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def fits(console, table) -> bool:
    """Does ``table`` fit ``console`` without cutting a word to an ellipsis (each column at least as wide as
    its longest word)? Rich clamps a measurement to the width it is given, so it measures with room to spare;
    and where the columns' minimums fit, rich still shrinks every wrapping column in proportion, which can
    cut a word: the table is drawn once, off screen, to see."""
    from rich.console import Console

    if console.measure(table, options=console.options.update_width(10**6)).minimum > console.width:
        return False
    probe = Console(width=console.width, file=io.StringIO(), color_system=None, legacy_windows=False)
    probe.print(table)
    return "\u2026" not in probe.file.getvalue()


def column_widths(width: int, columns: list[list[str]]) -> list[int] | None:
    """Widths for the columns (each its header and cells) of a table ``width`` characters wide (rich's
    default box and padding): each column first its longest word (a header's too where there is room), then
    a character at a time to those not yet as wide as their longest line; where the words do not fit, the
    first column folds (at least 8 wide). None where they do not fit even so. Rich's own shrinking evens
    out the columns and cuts "(reference)" while a column of ranks has room to spare."""
    room = width - 3 * len(columns) - 1
    words = [[max((len(w) for w in text.split()), default=1) for text in column] for column in columns]
    widths = [max(w[1:], default=1) for w in words]  # the cells'
    if sum(widths) - widths[0] + 8 > room:
        return None
    if sum(widths) > room:  # the first column (what each row is) folds; the values stay whole
        return [room - sum(widths[1:]), *widths[1:]]
    for goal in ([max(w) for w in words], [max(len(line) for text in c for line in text.splitlines() or [""])
                                           for c in columns]):
        while sum(widths) < room and any(w < g for w, g in zip(widths, goal, strict=True)):
            for i, g in enumerate(goal):
                if widths[i] < g and sum(widths) < room:
                    widths[i] += 1
    return widths


def say(console, text: str) -> None:
    """A line of prose: one line however long (the terminal wraps it; a log keeps it whole), so that a
    command in it is copied on one line; no rich markup read in it."""
    console.print(text, soft_wrap=True, markup=False)


def print_summary(summary: dict, s: SearchSettings, console=None) -> None:
    console = console or console_for_results()
    rows = summary.get("pareto_front") or ([summary["best"]] if "best" in summary else [])
    if not rows:
        yet = " yet" if summary["n_finished"] < summary["n_trials_requested"] else ""
        say(console, f"study {summary['study']}: no feasible complete trial{yet} ({summary['n_failed']} failed, "
                     f"{summary['n_pruned']} pruned, {summary['n_infeasible']} infeasible)")
        say(console, f"results: {s.output_dir}")
        return
    title = "Pareto front" if "pareto_front" in summary else "Best trial"
    if summary["n_finished"] < summary["n_trials_requested"]:  # stopped short: say so above the table
        title += f" so far ({summary['n_finished']} of {summary['n_trials_requested']} trials)"
    title = f"{title} of study {summary['study']} ({describe_counts(summary)})"
    front = "pareto_front" in summary
    shown = list(rows)
    ref = summary.get("reference")
    if ref and all(r["number"] != ref["number"] for r in rows):
        shown.append(ref)
    headers = ([("export as", "left")] if front else []) + [("trial", "right")]
    headers += [(f"{o} ({d[:3]})", "right") for o, d in zip(summary["objectives"], summary["directions"], strict=True)]
    headers += [(c, "right") for c in _COLUMNS if c not in summary["objectives"]]
    cells = []
    for r in shown:
        marks = [m for m, on in (("reference", r["reference"]), ("infeasible", not r["feasible"])) if on]
        label = f"{r['number']}" + (f" ({', '.join(marks)})" if marks else "")
        on_front = [i for i, row in enumerate(rows) if row is r] if front else []
        cells.append(([f"trial=pareto:{on_front[0]}" if on_front else ""] if front else []) + [label]
                     + [format_value(v) for v in r["values"]]
                     + [format_value(r["metrics"].get(c)) for c in _COLUMNS if c not in summary["objectives"]])
    console.print(_results_table(console, title, headers, cells, shown))
    _print_verdict(console, summary, s, ref)
    say(console, f"results: {s.output_dir}  |  MLflow: {s.ui_command()}")


def _results_table(console, title: str, headers: list[tuple[str, str]], cells: list[list[str]], shown: list[dict]):
    """One row a trial, its architecture in the last column; where that does not fit the console (80
    columns), one column a trial: a row a value, a row a parameter of the architecture, nothing cut."""
    from rich.table import Table

    table = Table(title=title)
    for header, justify in headers:
        table.add_column(header, justify=justify)
    table.add_column("architecture")
    for r, row in zip(shown, cells, strict=True):
        table.add_row(*row, ", ".join(f"{k}={v}" for k, v in r["params"].items()))
    if fits(console, table):
        return table
    lines = [[header, *(row[i] for row in cells)] for i, (header, _) in enumerate(headers)]
    if lines[0][0] == "export as":  # "export as trial=" | "pareto:0": a narrower column
        lines[0] = ["export as trial=", *(c.removeprefix("trial=") for c in lines[0][1:])]
    lines += [[name, *(format_value(r["params"].get(name)) for r in shown)]
              for name in dict.fromkeys(k for r in shown for k in r["params"])]
    widths = column_widths(console.width, [list(column) for column in zip(*lines, strict=True)])
    table = Table(title=title, show_header=False)
    for i in range(len(shown) + 1):
        table.add_column(justify="right" if i else "left", overflow="fold", width=widths[i] if widths else None)
    for i, line in enumerate(lines):  # the trial (export as, trial) | its values | its architecture
        table.add_row(*line, end_section=line[0] == "trial" or i == len(headers) - 1)
    return table


def _print_verdict(console, summary: dict, s: SearchSettings, ref: dict | None) -> None:
    if summary.get("best_is_reference") and _only_the_reference_trained(summary):
        say(console, f"trial {summary['best_trial']} is the reference architecture; no other architecture has been "
                     f"trained yet ({summary['n_finished']} of {summary['n_trials_requested']} trials): run the same "
                     "command to resume the search")
    elif summary.get("best_is_reference"):
        say(console, f"the best trial, {summary['best_trial']}, is the reference architecture: no other architecture "
                     f"beat it on {summary['objectives'][0]} in one run at {s.train.steps} steps")
    elif "beats_reference" in summary:
        verdict = "beats" if summary["beats_reference"] else "does not beat"
        got, was = summary["best_values"][0], ref["values"][0]
        # By how much the value moved, and which way: "+1.7%" read as a worse loss where it was 1.7% lower.
        change = (f" ({abs(got - was) / abs(was):.1%} {'lower' if got < was else 'higher'})"
                  if was and got != was else "")
        # A reference over a study constraint is no architecture the study would pick: say so.
        over = ref["violated_constraints"]
        infeasible = f" (infeasible: over {', '.join(over)})" if over else ""
        # One run each at the search's budget: a difference of a few percent is often the seed's. With
        # study.confirm.enabled the confirmation follows the search: no advice to run it.
        c = s.study.confirm
        what = (f"trains the best {c.top_k} architecture{'s' * (c.top_k != 1)} (at most) and the reference again "
                f"for {c.budget_factor:g} x {s.train.steps} steps with {c.seeds} seed{'s' * (c.seeds != 1)}")
        again = (f"the confirmation (study.confirm.enabled) {what}" if c.enabled else
                 f"fulu-nas confirm {' '.join(s.locating_overrides())} {what}")
        say(console, f"best trial {summary['best_trial']} {verdict} the reference architecture{infeasible} on "
                     f"{summary['objectives'][0]}{change} in one run at {s.train.steps} steps; {again}")


def _only_the_reference_trained(summary: dict) -> bool:
    """A search stopped short (interrupted) before it finished any trial but the reference's (and
    trials that reused its result): nothing else has had a chance to beat the reference."""
    return (summary["n_finished"] < summary["n_trials_requested"]
            and summary["n_finished"] - summary["n_reused"] <= 1)


def format_value(v) -> str:
    """A table cell: '-' for missing; floats from 10,000 up as whole numbers with thousands separators
    (a throughput or a parameter count read by eye, not as 1.235e+04), the rest to 4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if math.isfinite(v) and abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)
