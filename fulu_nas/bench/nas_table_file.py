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
from collections import Counter, defaultdict
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
# The values a column can hold (a count of steps, a share), beyond being a number: (lowest, highest).
RANGES = {"seed": (0, math.inf), "steps": (1, math.inf), "active_params": (1, math.inf), "total_params": (1, math.inf),
          "routing_accuracy": (0, 1), "load_balance": (0, 1), "flops_per_token": (0, math.inf),
          "train_seconds": (0, math.inf)}
_SHARE_ROUNDING = 1e-6  # a share written with six significant digits
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

    def steps(self, budget_factor: int = 1) -> int:
        """The training steps of the rows at ``budget_factor`` (one value: :func:`read_table` checks it)."""
        return next(r["steps"] for r in self.rows if r["budget_factor"] == budget_factor)

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
    FuluConfigError naming the file and every problem otherwise.

    Each (architecture, seed, budget_factor) is one row; the rows of a budget have one ``steps``, F
    times the table's at budget factor F (at least 2); an architecture trained at a longer budget is
    an architecture of the space with the table's seeds there too."""
    path = Path(path)
    header, lines = _read_lines(path)
    check_origin(path, space.name, task.name, header)
    records = list(csv.reader(lines))
    names = [p.name for p in space.params]
    expected = names + list(RESULT_COLUMNS)
    if not records or records[0] != expected:
        raise FuluConfigError(_column_problem(path, records[0] if records else [], expected, space))
    allowed = {p.name: {cell(c) for c in p.choices} | {INACTIVE} for p in space.params}
    problems: list[str] = []
    rows, numbers = [], []
    for number, record in enumerate(records[1:], start=1):
        if not record:  # a blank line (one at the end, as an editor leaves it)
            continue
        if record == expected:
            problems.append(f"table {path}, data row {number}: the header row again (two tables in one file?)")
            continue
        row = _row(record, names, allowed, task, problems, f"table {path}, data row {number}")
        if row is not None:
            rows.append(row)
            numbers.append(number)
    if problems:
        raise FuluConfigError(_at_most_five(problems))
    table = NasTable(path, header, tuple(rows))
    _check_rows(table, numbers, space)
    _check_coverage(table, space, architectures)
    return table


def _at_most_five(problems: list[str]) -> list[str]:
    return problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])


def _read_lines(path: Path) -> tuple[dict[str, str], list[str]]:
    """The table's ``#`` header (key: value) and its other lines."""
    if path.is_dir():
        raise FuluConfigError(f"table {path} is a folder, not a file")
    if path.exists() and not path.is_file():  # /dev/null, a pipe: not "no such file"
        raise FuluConfigError(f"table {path} is not a regular file")
    if not path.is_file():
        raise FuluConfigError(f"table {path}: no such file")
    header: dict[str, str] = {}
    try:
        # utf-8-sig: a byte-order mark (a spreadsheet's export) is not part of the first line
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = [line for line in f if not (line.startswith("#") and _comment(line, header))]
    except UnicodeDecodeError as e:
        raise FuluConfigError(f"table {path}: not a CSV text file (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise FuluConfigError(f"table {path}: cannot read it ({e.strerror})") from None
    return header, lines


def check_origin(path: str | Path, space: str, task: str, header: dict[str, str] | None = None) -> None:
    """A table whose ``# space:`` or ``# task:`` line names another space or task than the one it is
    read for: refused, saying how to read it. Checked before the space is composed and enumerated, so
    that a wrong ``--space`` or ``--task`` is not refused for its own sake."""
    path = Path(path)
    if header is None:
        header = _read_lines(path)[0]
    made_space = header.get("space") or space
    made_task = (header.get("task") or task).split(" ", 1)[0]
    if (made_space, made_task) != (space, task):
        raise FuluConfigError(f"table {path} is a table of search space {made_space!r} on task {made_task}: pass "
                              f"--space {made_space} --task {made_task}")


def _column_problem(path: Path, found: list[str], expected: list[str], space: SearchSpace) -> str:
    if not found:
        return f"table {path}: no header row: expected the columns {', '.join(expected)}"
    missing = [c for c in expected if c not in found]
    unknown = [c for c in found if c not in expected]
    parts = [f"{what}{'s' if len(cs) > 1 else ''}: {', '.join(cs)}"
             for what, cs in (("missing column", missing), ("unknown column", unknown)) if cs]
    if not parts:
        parts = [f"its columns are repeated or in another order: expected {', '.join(expected)}"]
    return f"table {path}: its columns do not match search space {space.name!r}: {'; '.join(parts)}"


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
            problems.append(f"{where}: {column}={text!r} is not " + ("an integer" if column in INT_COLUMNS
                                                                      and _is_float(text) else "a number"))
            continue
        if column == "budget_factor" and row[column] < 1:
            problems.append(f"{where}: budget_factor={text}: must be 1 (the table) or at least 2 (a longer budget)")
        if column not in RANGES:
            continue
        low, high = RANGES[column]
        slack = _SHARE_ROUNDING if high == 1 else 0
        if math.isfinite(row[column]) and not low - slack <= row[column] <= high + slack:
            problems.append(f"{where}: {column}={text}: " + (f"must be between {low} and {high}" if high == 1 else
                                                             f"must be at least {low}"))
    total, active = row.get("total_params"), row.get("active_params")
    if total is not None and active is not None and total < active:
        problems.append(f"{where}: total_params={row['total_params']} is below active_params={row['active_params']}")
    # a replay's objectives, and the summary's ranks, must be numbers
    problems += [f"{where}: {column} is not finite" for column in FLOAT_COLUMNS
                 if row.get(column) is not None and not math.isfinite(row[column])]
    return row


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_rows(table: NasTable, numbers: list[int], space: SearchSpace) -> None:
    """Each (architecture, seed, budget_factor) once (a table appended to itself, or two runs in one
    file, would be averaged together), and one ``steps`` per budget, the factor times the table's."""
    problems = []
    first: dict[tuple, int] = {}
    repeated = []
    for number, r in zip(numbers, table.rows, strict=True):
        where = (r["key"], r["seed"], r["budget_factor"])
        if where in first:
            repeated.append((number, r, first[where]))
        else:
            first[where] = number
    if repeated:
        number, r, earlier = repeated[0]
        more = f" ({len(repeated) - 1} more rows repeat an earlier one)" if len(repeated) > 1 else ""
        problems.append(f"table {table.path}, data row {number}: architecture {_describe(space, r['key'])}, seed "
                        f"{r['seed']}, budget_factor {r['budget_factor']} is already at data row {earlier}{more}")
    steps: dict[int, set[int]] = defaultdict(set)
    for r in table.rows:
        steps[r["budget_factor"]].add(r["steps"])
    for factor, values in sorted(steps.items()):
        if len(values) > 1:
            problems.append(f"table {table.path}: steps {' and '.join(map(str, sorted(values)))} at budget_factor "
                            f"{factor} (the rows of a budget have one steps)")
    if len(steps.get(1, ())) == 1:
        (base,) = steps[1]
        problems += [f"table {table.path}, budget_factor {factor}: steps {value}, expected {factor} x {base} = "
                     f"{factor * base}" for factor, values in sorted(steps.items())
                     if factor > 1 and len(values) == 1 and (value := next(iter(values))) != factor * base]
    if problems:
        raise FuluConfigError(problems)


def _seeds(rows: list[dict]) -> list[int]:
    return [r["seed"] for r in rows]


def _check_coverage(table: NasTable, space: SearchSpace, architectures: list[tuple[str, ...]]) -> None:
    base = table.by_arch(1)
    lists = Counter(tuple(_seeds(rows)) for rows in base.values())
    seeds = list(lists.most_common(1)[0][0]) if lists else []
    problems = []
    missing = [k for k in architectures if k not in base]
    if missing:
        problems.append(f"table {table.path}: no rows for {len(missing)} of the {len(architectures)} architectures of "
                        f"search space {space.name!r} (first: {_describe(space, missing[0])})")
    known = set(architectures)
    extra = sorted(set(base) - known)
    if extra:
        problems.append(f"table {table.path}: {len(extra)} architectures are not in search space {space.name!r} "
                        f"(first: {_describe(space, extra[0])})")
    uneven = [k for k, rows in base.items() if _seeds(rows) != seeds]
    if uneven:
        problems.append(f"table {table.path}: architectures have different seeds: {seeds} for "
                        f"{lists[tuple(seeds)]} of the {len(base)}, {_seeds(base[uneven[0]])} for "
                        f"{_describe(space, uneven[0])}{_more(uneven)}")
    for factor in table.budget_factors:
        if factor == 1:
            continue
        longer = table.by_arch(factor)
        extra = [k for k in longer if k not in known]
        if extra:
            problems.append(f"table {table.path}: {len(extra)} architectures at budget_factor {factor} are not in "
                            f"search space {space.name!r} (first: {_describe(space, extra[0])})")
        uneven = [k for k, rows in longer.items() if k in known and _seeds(rows) != seeds]
        if uneven:
            problems.append(f"table {table.path}: at budget_factor {factor}, seeds {_seeds(longer[uneven[0]])} for "
                            f"{_describe(space, uneven[0])}, not the table's seeds {seeds}{_more(uneven)}")
    if problems:
        raise FuluConfigError(problems)


def _more(found: list) -> str:
    return f" (and {len(found) - 1} more)" if len(found) > 1 else ""


def _describe(space: SearchSpace, key: tuple[str, ...]) -> str:
    return ", ".join(f"{p.name}={text}" for p, text in zip(space.params, key, strict=True) if text != INACTIVE)
