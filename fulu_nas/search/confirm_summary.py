"""The statistics of a confirmation (:mod:`.confirm`), as a plain dict (``confirmation.json``, the
study's ``confirmation`` attribute, the MLflow parent run) and as a table on the terminal.

Per architecture: the mean and sample standard deviation of each objective over its seeds, and its
confirmed rank (by the mean of the first objective). Over the architectures: Kendall's tau between
the search's ranking and the confirmed one (do the search's low-budget results order the
architectures as the longer, repeated training does?). Against the reference: Welch's t-test
(``scipy.stats.ttest_ind(equal_var=False)``, one-sided in the objective's direction): an architecture
"beats the reference" only when p < alpha, i.e. when its difference is beyond the seeds' noise;
with a single seed there is no noise estimate, so no test; an objective that is the same on every seed
(a parameter count) is compared exactly. An architecture that diverged on a seed cannot be the winner
(training is seeded: the divergence is that seed's outcome); no winner is named while another run
failed (the safety cap, an error): the means would be over different seeds, and it is retried.
"""

from __future__ import annotations

import math
import statistics
import warnings

SUMMARY_ATTR = "confirmation"  # the study user attribute holding the latest summary
ALPHA = 0.05
TEST = "Welch's t-test (scipy.stats.ttest_ind, equal_var=False), one-sided in the objective's direction"
EXACT = "exact: the same value on every seed"


def summarize_confirmation(header: dict, rows: list[dict], directions: list[str]) -> dict:
    """``header`` (study, objectives, budget, seeds, ...) plus the statistics of ``rows``: one per
    architecture with ``trial``, ``search_rank`` (None off the search's ranking), ``reference``,
    ``feasible``, ``search_values`` and ``runs`` (each with the ``values`` of the objectives)."""
    signs = [1 if d == "minimize" else -1 for d in directions]
    rows = [dict(r) for r in rows]
    for r in rows:
        per_objective = list(zip(*(run["values"] for run in r["runs"]), strict=True)) if r["runs"] else []
        r["n"] = len(r["runs"])
        r["mean"] = [statistics.fmean(v) for v in per_objective] or None
        r["sd"] = [statistics.stdev(v) for v in per_objective] if r["n"] >= 2 else None
    failed = header.get("failed_runs") or []
    for r in rows:
        own = [f for f in failed if f.get("trial") == r["trial"]]
        r["failed_seeds"] = sorted(f["seed"] for f in own if not f.get("diverged"))
        r["diverged_seeds"] = sorted(f["seed"] for f in own if f.get("diverged"))
    # The search rank orders equal means only for the winner's choice and the table; the confirmed rank of
    # equal means is shared ("1, 1, 3"): a tie is no evidence for or against the search's order.
    measured = sorted((r for r in rows if r["n"]), key=lambda r: (signs[0] * r["mean"][0], _rank_key(r), r["trial"]))
    for i, r in enumerate(measured):
        tied = i > 0 and measured[i - 1]["mean"][0] == r["mean"][0]
        r["confirmed_rank"] = measured[i - 1]["confirmed_rank"] if tied else i + 1
    for r in rows:
        r.setdefault("confirmed_rank", None)
    reference = next((r for r in rows if r["reference"]), None)
    for r in rows:
        r["vs_reference"] = None if r is reference or reference is None or not r["n"] else [
            compare(r, reference, i, signs[i]) for i in range(len(directions))]
    rows.sort(key=lambda r: (r["confirmed_rank"] is None, r["confirmed_rank"] or 0, _rank_key(r)))
    summary = {**header, "test": {"name": TEST, "alpha": ALPHA}, "architectures": rows,
               "kendall_tau": kendall(rows, signs[0]), "reference": None if reference is None else reference["trial"]}
    # An architecture that diverged on a seed is out (it would otherwise win on the seeds that survived: one
    # that diverged on two seeds of three, on its third). No winner from an incomplete confirmation (runs
    # without a result: a worker died), nor while a possible winner has other failed runs (the safety cap,
    # an error; retried by the next invocation): the failed seeds could change it, and export's trial=best
    # would take it.
    eligible = [r for r in rows if r["feasible"] and not r["diverged_seeds"]]
    candidates = [r for r in measured if r in eligible]
    unfinished = [r for r in eligible if r["failed_seeds"]]
    single = len(directions) == 1
    summary["winner"] = None if not single or not candidates or header.get("complete") is False \
        or unfinished else {k: candidates[0][k] for k in ("trial", "arch_hash", "search_rank", "mean", "sd", "n")}
    if summary["winner"] is not None:  # the architectures with a better mean that could not win, and why
        summary["winner"]["ranked_above"] = [
            {"trial": r["trial"], "why": "over the study's constraints" if not r["feasible"] else "diverged on a seed"}
            for r in measured[:measured.index(candidates[0])]]
    summary["winner_withheld"] = None
    if single and unfinished:  # said also when those failures left no architecture with a result
        summary["winner_withheld"] = (
            "runs failed: " + "; ".join(f"trial {r['trial']} seed(s) {', '.join(map(str, r['failed_seeds']))}"
                                        for r in unfinished)
            + (" (their means are over fewer seeds, and the failed seeds could change the winner)" if candidates
               else " (no architecture that could win has a result)"))
    elif single and not eligible and any(r["feasible"] for r in rows):
        summary["winner_withheld"] = "every architecture that met the constraints diverged on a seed: " + "; ".join(
            f"trial {r['trial']} seed(s) {', '.join(map(str, r['diverged_seeds']))}" for r in rows if r["feasible"])
    return summary


def _rank_key(r: dict) -> float:
    return r["search_rank"] if r["search_rank"] is not None else math.inf


def compare(r: dict, reference: dict, i: int, sign: int) -> dict:
    """Does ``r`` beat ``reference`` on objective ``i`` beyond the seeds' noise?"""
    a = [run["values"][i] for run in r["runs"]]
    b = [run["values"][i] for run in reference["runs"]]
    if not b:
        return {"test": None, "p_value": None, "beats": None,
                "verdict": "no test: the reference has no result (its runs failed)"}
    if len(b) < 2 <= len(a):
        return {"test": None, "p_value": None, "beats": None,
                "verdict": "no test: the reference has one result (its other runs failed; the seeds' noise is "
                           "unknown)"}
    if min(len(a), len(b)) < 2:  # seeds=1, or an architecture whose other runs failed
        return {"test": None, "p_value": None, "beats": None,
                "verdict": "one result: no test (the seeds' noise is unknown)"}
    if len(set(a)) == 1 and len(set(b)) == 1 and a[0] != b[0]:
        # No noise on either side (a parameter count): the difference is certain. The p-value is the
        # one-sided one of beating the reference, as the t-test's: 0 when better, 1 when worse. The
        # verdict says "worse than" rather than the t-test's "not distinguishable" of two values that
        # differ on every seed.
        beats = sign * (a[0] - b[0]) < 0
        return {"test": EXACT, "p_value": 0.0 if beats else 1.0, "beats": beats,
                "verdict": f"{'beats' if beats else 'worse than'} the reference ({EXACT}, p={0 if beats else 1})"}
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # identical values on every seed: scipy warns, the verdict below says so
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(ttest_ind(a, b, equal_var=False, alternative="less" if sign > 0 else "greater").pvalue)
    if math.isnan(p):
        return {"test": TEST, "p_value": None, "beats": False,
                "verdict": "not distinguishable from the reference (identical on every seed)"}
    beats = p < ALPHA
    verdict = (f"beats the reference (Welch's t-test, one-sided, p={p:.3g})" if beats
               else f"not distinguishable from the reference (p={p:.3g})")
    return {"test": TEST, "p_value": p, "beats": beats, "verdict": verdict}


def kendall(rows: list[dict], sign: int = 1) -> dict:
    """Kendall's tau-b between the search ranks and the confirmed means (of the first objective, ``sign``
    1: minimised, -1: maximised) of the architectures that have both. From the means, not the confirmed
    ranks' tie-break: equal means are ties, which count neither as agreement nor as disagreement with
    the search. Every mean equal: tau is undefined (None, with a note), not +1."""
    pairs = [(r["search_rank"], sign * r["mean"][0]) for r in rows
             if r["search_rank"] is not None and r["confirmed_rank"] is not None]
    if len(pairs) < 2:
        return {"tau": None, "p_value": None, "n": len(pairs), "note": "not computed: needs two ranked architectures"}
    from scipy.stats import kendalltau

    with warnings.catch_warnings():  # every mean tied: scipy warns and returns NaN, said below
        warnings.simplefilter("ignore", RuntimeWarning)
        result = kendalltau(*zip(*pairs, strict=True), variant="b")
    if math.isnan(result.statistic):
        return {"tau": None, "p_value": None, "n": len(pairs),
                "note": f"undefined: the {len(pairs)} architectures have the same confirmed mean (a tie is neither "
                        "agreement nor disagreement with the search)"}
    return {"tau": float(result.statistic), "p_value": float(result.pvalue), "n": len(pairs)}


def confirmed_winner(study) -> dict | None:
    """The winner of the study's latest confirmation (see :func:`winner`); None without one."""
    return winner(study.user_attrs.get(SUMMARY_ATTR))


def winner(summary: dict | None) -> dict | None:
    """The summary's winner (best mean of a single objective, among architectures feasible in the search)
    with the budget it was confirmed at; None without one (an incomplete confirmation has none)."""
    if not isinstance(summary, dict) or not summary.get("winner") or summary.get("complete") is False:
        return None
    return {**summary["winner"], "objective": summary["objectives"][0], "steps": summary["steps"],
            "seeds": summary["seeds"]}


def why_no_winner(summary: dict | None) -> str:
    """Why :func:`winner` finds none in ``summary`` (a study's latest confirmation, or None), in words."""
    if not isinstance(summary, dict):
        return "no confirmation"
    if summary.get("complete") is False:
        return "its confirmation is incomplete: runs without a result"
    if summary.get("winner_withheld"):
        return f"its confirmation named no winner: {summary['winner_withheld']}"
    return "its confirmation named no winner"


def describe_winner(w: dict) -> str:
    sd = f" +- {w['sd'][0]:.4g}" if w["sd"] else ""
    above = w.get("ranked_above") or []
    of = " of the architectures that can win," if above else ""
    passed = "; ranked above it: " + "; ".join(f"trial {a['trial']}, {a['why']}" for a in above) if above else ""
    return (f"the confirmed winner, trial {w['trial']} (best mean {w['objective']}{of} {w['mean'][0]:.4g}{sd} over "
            f"{w['n']} seed(s) at {w['steps']} steps; search rank {w['search_rank'] or '-'}{passed})")


def print_confirmation(summary: dict, path, console=None) -> None:
    from .report import console_for_results, fits, format_value, say

    console = console or console_for_results()
    objectives, directions = summary["objectives"], summary["directions"]
    title = (f"Confirmation of study {summary['study']}: {len(summary['architectures'])} architectures x "
             f"{len(summary['seeds'])} seed(s), {summary['steps']} steps ({summary['budget_factor']:g} x "
             f"the search's {summary['search_steps']})")
    headers = [("trial", "right"), ("search rank", "right"), ("confirmed rank", "right")]
    for o, d in zip(objectives, directions, strict=True):
        headers += [(f"{o} ({d[:3]}) mean +- sd", "right"), (f"{o} in the search", "right")]
    headers += [("vs reference" + (f" ({o})" if len(objectives) > 1 else ""), "left") for o in objectives]
    rows = []
    for r in summary["architectures"]:
        marks = ["reference"] * bool(r["reference"]) + ["infeasible"] * (r.get("feasible") is False)
        cells = [f"{r['trial']}" + (f" ({', '.join(marks)})" if marks else ""), format_value(r["search_rank"]),
                 format_value(r["confirmed_rank"])]
        failed, diverged = r.get("failed_seeds") or [], r.get("diverged_seeds") or []
        lost = ", ".join([f"{len(failed)} failed"] * bool(failed) + [f"{len(diverged)} diverged"] * bool(diverged))
        for i in range(len(objectives)):
            if r["mean"] is None:
                cells.append("diverged" if diverged and not failed else "failed")
            else:
                cells.append(format_value(r["mean"][i]) + (f" +- {r['sd'][i]:.2g}" if r["sd"] else "")
                             + (f" ({r['n']} seed(s); {lost})" if lost else ""))
            cells.append(format_value(r["search_values"][i]))
        for i in range(len(objectives)):
            cells.append("reference" if r["reference"] else "-" if r["vs_reference"] is None
                         else r["vs_reference"][i]["verdict"])
        rows.append(cells)
    table = _table(title, headers, [[*cells, r["params"]] for cells, r in zip(rows, summary["architectures"],
                                                                              strict=True)], "architecture")
    if fits(console, table):
        console.print(table)
    else:  # 80 columns: the architectures under the table, no value cut to an ellipsis
        console.print(_table(title, headers, rows, width=console.width))
        for r in summary["architectures"]:
            say(console, f"trial {r['trial']}: {r['params']}")
    tau = summary["kendall_tau"]
    if tau["tau"] is None:
        say(console, f"Kendall's tau (search rank vs confirmed rank): {tau['note']}")
    else:
        say(console, f"Kendall's tau (search rank vs confirmed rank): {tau['tau']:+.2f} over {tau['n']} "
                      f"architectures (p={tau['p_value']:.3g})")
    if summary["reference"] is None:
        say(console, "the study has no complete reference trial: nothing to compare against")
    else:
        say(console, f"beats the reference: {TEST}, alpha {ALPHA}; otherwise not distinguishable from it")
    for f in summary["failed_runs"]:
        if f.get("diverged"):
            say(console, f"diverged: trial {f['trial']} seed {f['seed']}: {f['reason']} (training is seeded: not "
                          "trained again; the architecture cannot be the winner)")
        else:
            say(console, f"failed: trial {f['trial']} seed {f['seed']}: {f['reason']} (run the command again to "
                          "retry)")
    for m in summary.get("missing_runs", []):
        say(console, f"missing: trial {m['trial']} seed {m['seed']}: no result (its worker died; run the command "
                      "again to train it)")
    if (w := winner(summary)) is not None:
        say(console, f"winner: {describe_winner(w)}; `fulu-nas export` with trial=best takes it")
    elif summary.get("winner_withheld"):
        retry = any(r.get("failed_seeds") for r in summary["architectures"])
        say(console, f"no winner: {summary['winner_withheld']}; "
                      + ("run the command again to retry the failed runs (`fulu-nas export` with trial=best takes "
                         "the search's best trial meanwhile)" if retry else
                         "`fulu-nas export` with trial=best takes the search's best trial"))
    elif len(summary["objectives"]) > 1:
        say(console, f"no winner: a study of {len(summary['objectives'])} objectives has a Pareto front, not one best "
                      "architecture; `fulu-nas export` takes trial=pareto:I or trial=N")
    say(console, f"confirmation: {path}")


def _table(title: str, headers: list[tuple[str, str]], rows: list[list[str]], *extra: str, width=None):
    """The table; with ``width`` (the console's), its columns folded to that width."""
    from rich.table import Table

    from .report import column_widths

    headers = [*headers, *((h, "left") for h in extra)]
    widths = column_widths(width, [[h, *(cells[i] for cells in rows)] for i, (h, _) in enumerate(headers)]) \
        if width else None
    table = Table(title=title)
    for i, (header, justify) in enumerate(headers):
        table.add_column(header, justify=justify, overflow="fold" if width else "ellipsis",
                         width=widths[i] if widths else None)
    for cells in rows:
        table.add_row(*cells)
    return table
