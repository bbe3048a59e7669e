"""The table's file: a CSV with one row per (architecture, seed, budget), read back only after it is
checked against the search space it claims to cover.

Layout: ``# key: value`` comment lines (space, task, trainer, command, device, date), then a header
row: the space's parameters in its order (empty where a ``when`` leaves one out), then
:data:`RESULT_COLUMNS`. ``budget_factor`` is 1 for the table itself and F for the subset trained at
F times the steps. ``routing_accuracy`` is empty for a task whose tokens have no labelled domains
(``textlm``), and a number for every other. Readers other than this module skip the comments
(pandas: ``comment="#"``).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import FuluConfigError
from ..search.space import SearchSpace
from ..tasks.base import Task
from .finite_space import INACTIVE, cell

RESULT_COLUMNS = ("arch_hash", "seed", "budget_factor", "steps", "loss", "metric", "routing_accuracy", "load_balance",
                  "active_params", "total_params", "flops_per_token", "train_seconds")
INT_COLUMNS = ("seed", "budget_factor", "steps", "active_params", "total_params")
FLOAT_COLUMNS = ("loss", "metric", "routing_accuracy", "load_balance", "flops_per_token", "train_seconds")
# Six significant digits: far below the differences between architectures, and a diff of two
# regenerated tables stays readable.
_FLOAT_FORMAT = "{:.6g}"


def write_table(path: Path, header: dict[str, str], space: SearchSpace, rows: Iterable[dict]) -> None:
    """Write ``rows`` (each with ``key``, the :func:`~.finite_space.cells` of its architecture, and the
    result columns) under the ``header`` comments."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        for k, v in header.items():
            f.write(f"# {k}: {v}\n")
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([p.name for p in space.params] + list(RESULT_COLUMNS))
        for r in rows:
            writer.writerow(list(r["key"]) + ["" if r[c] is None else _FLOAT_FORMAT.format(r[c])
                                              if c in FLOAT_COLUMNS else r[c] for c in RESULT_COLUMNS])


@dataclass(frozen=True)
class NasTable:
    """A table read back: ``rows`` hold ``key`` (the parameter cells) and typed result columns."""

    path: Path
    header: dict[str, str]
    rows: tuple[dict, ...]

    @property
    def seeds(self) -> list[int]:
        return sorted({r["seed"] for r in self.rows})

    @property
    def budget_factors(self) -> list[int]:
        return sorted({r["budget_factor"] for r in self.rows})

    def by_arch(self, budget_factor: int = 1) -> dict[tuple[str, ...], list[dict]]:
        """Each architecture's rows at ``budget_factor``, seeds in order, architectures in table order."""
        out: dict[tuple[str, ...], list[dict]] = defaultdict(list)
        for r in sorted((r for r in self.rows if r["budget_factor"] == budget_factor), key=lambda r: r["seed"]):
            out[r["key"]].append(r)
        return dict(out)

    def means(self, budget_factor: int = 1) -> dict[tuple[str, ...], dict[str, float | None]]:
        """Each architecture's result columns averaged over its seeds (None for a routing accuracy
        the task does not have)."""
        return {key: {c: None if rows[0][c] is None else statistics.fmean(r[c] for r in rows)
                      for c in INT_COLUMNS + FLOAT_COLUMNS}
                for key, rows in self.by_arch(budget_factor).items()}


def read_table(path: str | Path, space: SearchSpace, architectures: list[tuple[str, ...]], task: Task) -> NasTable:
    """The table at ``path``, checked against ``space`` whose feasible ``architectures`` (their
    cells, in enumeration order) it must cover at budget factor 1 with the same seeds for each, and
    against ``task``, which has a routing accuracy if its tokens have labelled domains;
    FuluConfigError naming the file and every problem otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FuluConfigError(f"table {path}: no such file")
    header: dict[str, str] = {}
    with open(path, newline="") as f:
        lines = [line for line in f if not (line.startswith("#") and _comment(line, header))]
    records = list(csv.reader(lines))
    names = [p.name for p in space.params]
    expected = names + list(RESULT_COLUMNS)
    if not records or records[0] != expected:
        found = records[0] if records else []
        raise FuluConfigError(f"table {path}: its columns ({', '.join(found) or 'none'}) do not match search space "
                              f"{space.name!r}: expected its parameters ({', '.join(names)}) then "
                              f"{', '.join(RESULT_COLUMNS)}")
    allowed = {p.name: {cell(c) for c in p.choices} | {INACTIVE} for p in space.params}
    problems: list[str] = []
    rows = []
    for line, record in enumerate(records[1:], start=2):
        row = _row(record, names, allowed, task, problems, f"table {path}, data row {line - 1}")
        if row is not None:
            rows.append(row)
    if problems:
        raise FuluConfigError(problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else []))
    table = NasTable(path, header, tuple(rows))
    _check_coverage(table, space, architectures)
    return table


def _comment(line: str, header: dict[str, str]) -> bool:
    key, _, value = line[1:].strip().partition(":")
    header[key.strip()] = value.strip()
    return True


def _row(record: list[str], names: list[str], allowed: dict[str, set[str]], task: Task, problems: list[str],
         where: str) -> dict | None:
    if len(record) != len(names) + len(RESULT_COLUMNS):
        problems.append(f"{where}: {len(record)} fields, expected {len(names) + len(RESULT_COLUMNS)}")
        return None
    key = tuple(record[:len(names)])
    for name, text in zip(names, key, strict=True):
        if text not in allowed[name]:
            problems.append(f"{where}: {name}={text!r} is not one of the space's choices")
    row: dict = {"key": key}
    for column, text in zip(RESULT_COLUMNS, record[len(names):], strict=True):
        if column == "routing_accuracy" and not task.domain_names:
            # A number here belongs to another task's table; "nan" is how earlier versions left it out.
            if text not in ("", "nan"):
                problems.append(f"{where}: routing_accuracy={text!r}: task {task.name} labels no domains (the "
                                "column is empty)")
            row[column] = None
            continue
        if column == "routing_accuracy" and not text:
            problems.append(f"{where}: routing_accuracy is missing: task {task.name} labels domains")
            continue
        try:
            row[column] = int(text) if column in INT_COLUMNS else float(text) if column in FLOAT_COLUMNS else text
        except ValueError:
            problems.append(f"{where}: {column}={text!r} is not a number")
    # a replay's objectives, and the summary's ranks, must be numbers
    problems += [f"{where}: {column} is not finite" for column in FLOAT_COLUMNS
                 if row.get(column) is not None and not math.isfinite(row[column])]
    return row


def _check_coverage(table: NasTable, space: SearchSpace, architectures: list[tuple[str, ...]]) -> None:
    base = table.by_arch(1)
    seeds = [r["seed"] for r in next(iter(base.values()), [])]
    problems = []
    missing = [k for k in architectures if k not in base]
    if missing:
        problems.append(f"table {table.path}: no rows for {len(missing)} of the {len(architectures)} architectures of "
                        f"search space {space.name!r} (first: {_describe(space, missing[0])})")
    extra = sorted(set(base) - set(architectures))
    if extra:
        problems.append(f"table {table.path}: {len(extra)} architectures are not in search space {space.name!r} "
                        f"(first: {_describe(space, extra[0])})")
    uneven = [k for k, rows in base.items() if [r["seed"] for r in rows] != seeds]
    if uneven:
        problems.append(f"table {table.path}: architectures have different seeds (seeds {seeds} for the first, "
                        f"{[r['seed'] for r in base[uneven[0]]]} for {_describe(space, uneven[0])})")
    if problems:
        raise FuluConfigError(problems)


def _describe(space: SearchSpace, key: tuple[str, ...]) -> str:
    return ", ".join(f"{p.name}={text}" for p, text in zip(space.params, key, strict=True) if text != INACTIVE)
