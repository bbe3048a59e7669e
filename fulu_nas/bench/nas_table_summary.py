"""``fulu-nas bench nas-table --summary FILE``: what a table says about its space.

- the best architectures by mean validation loss over seeds, and how much seeds move a result
  compared with how much architectures differ;
- rank correlation of the validation loss across seeds (Kendall's tau, Spearman's rho for each
  pair of seeds over all architectures): how reproducible one trial's ranking is;
- rank correlation between the table's budget and ``budget_factor`` times it over the subset
  trained at both (means over seeds): whether a short trial predicts a long one here, the
  question NAS-Bench-201 answers across epochs before low-fidelity search is trusted.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from .common import markdown_table
from .finite_space import INACTIVE, architecture_keys
from .nas_settings import product_settings
from .nas_table_file import NasTable, check_origin, read_table

# Said where a correlation is n/a (scipy warned on stderr and gave NaN).
NO_CORRELATION = "a rank correlation needs at least 2 architectures, and losses that are not all equal"


def rank_correlation(x: list[float], y: list[float]) -> dict[str, float | None]:
    """Kendall's tau and Spearman's rho of ``x`` and ``y``; None where they are undefined (fewer than two
    values, or one side constant)."""
    from scipy.stats import kendalltau, spearmanr

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"kendall_tau": None, "spearman_rho": None}
    return {"kendall_tau": float(kendalltau(x, y).statistic), "spearman_rho": float(spearmanr(x, y).statistic)}


def _correlation(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return statistics.fmean(defined) if defined else None


def seed_correlations(table: NasTable) -> list[dict]:
    """For each pair of seeds: both correlations of the loss over every architecture."""
    base = table.by_arch(1)
    loss = {seed: [next(r["loss"] for r in rows if r["seed"] == seed) for rows in base.values()]
            for seed in table.seeds}
    return [{"seeds": (a, b), **rank_correlation(loss[a], loss[b])} for a, b in itertools.combinations(table.seeds, 2)]


def budget_correlation(table: NasTable, factor: int) -> dict:
    """Both correlations of the mean loss at budget factor 1 and ``factor`` over the architectures
    trained at both."""
    short, long = table.means(1), table.means(factor)
    keys = [k for k in short if k in long]
    return {"factor": factor, "architectures": len(keys),
            **rank_correlation([short[k]["loss"] for k in keys], [long[k]["loss"] for k in keys])}


def _name(table_params: list[str], key: tuple[str, ...]) -> str:
    return ", ".join(f"{n}={v}" for n, v in zip(table_params, key, strict=True) if v != INACTIVE)


def _accuracy(value: float | None) -> str:
    """A routing accuracy, "-" where the task labels no domains."""
    return "-" if value is None else f"{value:.3f}"


def summary_main(args: argparse.Namespace) -> int:
    check_origin(args.summary, args.space, args.task)
    s = product_settings(args.space, args.task)
    table = read_table(args.summary, s.space, architecture_keys(s.space, s.task), s.task)
    names = [p.name for p in s.space.params]
    base, means = table.by_arch(1), table.means(1)
    print(f"{table.path}: {len(base)} architectures of search space {s.space.name!r} x seeds {table.seeds} at "
          f"{table.steps(1)} steps ({len(table.rows)} rows)")
    for key in ("task", "trainer", "device", "date", "command"):
        if key in table.header:
            print(f"  {key}: {table.header[key]}")
    ranked = sorted(means, key=lambda k: means[k]["loss"])
    print("\nbest and worst architectures by mean validation loss over seeds:\n")
    body = []
    for i in sorted(set(range(min(5, len(ranked)))) | {len(ranked) - 1}):
        k = ranked[i]
        losses = [r["loss"] for r in base[k]]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        body.append([str(i + 1), _name(names, k), f"{means[k]['loss']:.4f} ± {sd:.4f}", f"{means[k]['metric']:.3f}",
                     _accuracy(means[k]["routing_accuracy"]), f"{means[k]['active_params']:.0f}"])
    print(markdown_table(["rank", "architecture", "loss (mean ± sd)", "metric", "routing acc.", "active params"], body,
                         text_columns=2))
    if len(table.seeds) > 1:
        noise = statistics.median(statistics.stdev(r["loss"] for r in rows) for rows in base.values())
        spread = statistics.stdev(m["loss"] for m in means.values())
        print(f"\nseed noise: median over architectures of the loss's sd over seeds {noise:.4f}; sd of the mean loss "
              f"across architectures {spread:.4f}")
        print("\nrank correlation of the validation loss between seeds (all architectures):\n")
        pairs = seed_correlations(table)
        rows = [[f"{p['seeds'][0]} vs {p['seeds'][1]}", _correlation(p["kendall_tau"]),
                 _correlation(p["spearman_rho"])] for p in pairs]
        rows.append(["mean", _correlation(_mean([p["kendall_tau"] for p in pairs])),
                     _correlation(_mean([p["spearman_rho"] for p in pairs]))])
        print(markdown_table(["seeds", "Kendall tau", "Spearman rho"], rows, text_columns=1))
        if any(p["kendall_tau"] is None for p in pairs):
            print(f"n/a: {NO_CORRELATION}")
    for factor in table.budget_factors[1:]:
        b = budget_correlation(table, factor)
        print(f"\nshort vs long budget (mean loss over seeds, the {b['architectures']} architectures trained at "
              f"{table.steps(1)} and {table.steps(factor)} steps): Kendall tau {_correlation(b['kendall_tau'])}, "
              f"Spearman rho {_correlation(b['spearman_rho'])}"
              + (f" ({NO_CORRELATION})" if b["kendall_tau"] is None else "") + "\n")
        short, long = table.means(1), table.means(factor)
        by_short = sorted(long, key=lambda k: short[k]["loss"])
        body = [[_name(names, k), str(i + 1), str(by_short.index(k) + 1), f"{long[k]['loss']:.4f}",
                 f"{short[k]['loss']:.4f}", _accuracy(long[k]["routing_accuracy"])]
                for i, k in enumerate(sorted(long, key=lambda k: long[k]["loss"]))]
        print(markdown_table(["architecture", f"rank at {factor}x", "rank at 1x (of these)", f"loss at {factor}x",
                              "loss at 1x", f"routing acc. at {factor}x"], body, text_columns=1))
    return 0
