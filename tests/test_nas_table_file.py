"""Reading a benchmark table back: a table whose rows repeat or mix runs, whose budgets are impossible,
whose longer budget strays outside the space, or which is of another space, task or not a file at
all, is refused with one message naming the problem (exit 2); and random search's target in a replay
is a result some repetition reached."""

from __future__ import annotations

import json

import pytest

from fulu_nas.bench import cli as bench
from fulu_nas.bench.nas_table import DEFAULT_TABLE
from fulu_nas.bench.replay_report import summarize


def _parts() -> tuple[list[str], str, list[str]]:
    """The committed table's comment lines, header line and data lines."""
    lines = DEFAULT_TABLE.read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    return lines[:first], lines[first], lines[first + 1:]


def _cells(header: str, line: str) -> dict[str, str]:
    return dict(zip(header.rstrip("\n").split(","), line.rstrip("\n").split(","), strict=True))


def _line(cells: dict[str, str]) -> str:
    return ",".join(cells.values()) + "\n"


def _write(tmp_path, name: str, comments: list[str], header: str, data: list[str]) -> str:
    path = tmp_path / name
    path.write_text("".join(comments) + header + "".join(data))
    return str(path)


def _refused(capsys, *args: str) -> str:
    """The one-line message of ``bench *args``, which must exit 2."""
    capsys.readouterr()
    assert bench.main(list(args)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def _summary_and_search_refuse(capsys, table: str, tmp_path) -> str:
    err = _refused(capsys, "nas-table", "--summary", table)
    out = tmp_path / "replay"
    assert _refused(capsys, "search", "--table", table, "--repetitions", "1", "--trials", "2", "--samplers", "random",
                    "--out", str(out)) == err
    assert not out.exists()
    return err


def test_a_table_whose_rows_all_repeat_is_refused_naming_the_repeated_row(tmp_path, capsys):
    """Every data row twice (a table appended to itself) was read, and every sd computed over six values."""
    comments, header, data = _parts()
    table = _write(tmp_path, "dup.csv", comments, header, data + data)
    err = _summary_and_search_refuse(capsys, table, tmp_path)
    assert (f"data row {len(data) + 1}: architecture router=topk, num_experts=4, top_k=1, num_shared_experts=0, "
            "balancing=aux_free, seed 0, budget_factor 1 is already at data row 1") in err
    assert f"{len(data) - 1} more rows repeat an earlier one" in err


def test_one_repeated_row_is_named_as_repeated_not_as_different_seeds(tmp_path, capsys):
    comments, header, data = _parts()
    table = _write(tmp_path, "dup1.csv", comments, header, data[:1] + data)
    err = _refused(capsys, "nas-table", "--summary", table)
    assert "data row 2: architecture router=topk" in err and "is already at data row 1" in err
    assert "different seeds" not in err


def test_two_runs_at_different_steps_in_one_table_are_refused(tmp_path, capsys):
    """A second run at 600 steps appended to the table was averaged with the first ("at 300/600 steps")."""
    comments, header, data = _parts()
    again = [_line({**c, "steps": "600"}) for line in data if (c := _cells(header, line))["budget_factor"] == "1"]
    err = _refused(capsys, "nas-table", "--summary", _write(tmp_path, "two.csv", comments, header, data + again))
    assert "steps 300 and 600 at budget_factor 1" in err


def test_one_row_with_other_steps_is_refused(tmp_path, capsys):
    comments, header, data = _parts()
    data = [_line({**_cells(header, data[0]), "steps": "5"})] + data[1:]
    err = _refused(capsys, "nas-table", "--summary", _write(tmp_path, "steps.csv", comments, header, data))
    assert "steps 5 and 300 at budget_factor 1" in err


def test_architectures_missing_a_seed_are_named_against_the_seeds_of_the_others(tmp_path, capsys):
    """The first architecture without seed 0 blamed every other architecture for having seed 0."""
    comments, header, data = _parts()
    err = _refused(capsys, "nas-table", "--summary", _write(tmp_path, "uneven.csv", comments, header, data[1:]))
    assert ("architectures have different seeds: [0, 1, 2] for 107 of the 108, [1, 2] for router=topk, "
            "num_experts=4, top_k=1, num_shared_experts=0, balancing=aux_free") in err


@pytest.mark.parametrize("factor", ["0", "-4"])
def test_a_budget_factor_below_one_is_refused(factor, tmp_path, capsys):
    """Factor 0 was taken for a longer budget: a perfect correlation of the table with itself."""
    comments, header, data = _parts()
    data = data[:-1] + [_line({**_cells(header, data[-1]), "budget_factor": factor})]
    err = _refused(capsys, "nas-table", "--summary", _write(tmp_path, "bf.csv", comments, header, data))
    assert f"data row {len(data)}: budget_factor={factor}: must be 1 (the table) or at least 2" in err


def test_a_longer_budgets_steps_must_be_its_factor_times_the_tables(tmp_path, capsys):
    """The 4x rows' steps set to 300 were ignored: the summary said 1200 from factor x steps."""
    comments, header, data = _parts()
    data = [_line({**c, "steps": "300"}) if (c := _cells(header, line))["budget_factor"] == "4" else line
            for line in data]
    err = _refused(capsys, "nas-table", "--summary", _write(tmp_path, "fs.csv", comments, header, data))
    assert "budget_factor 4: steps 300, expected 4 x 300 = 1200" in err


def test_the_summary_labels_a_longer_budget_with_the_tables_own_steps(capsys):
    assert bench.main(["nas-table", "--summary", str(DEFAULT_TABLE)]) == 0
    assert "the 24 architectures trained at 300 and 1200 steps" in capsys.readouterr().out


def test_a_longer_budget_row_outside_the_space_is_refused_not_a_traceback(tmp_path, capsys):
    """A 4x row of the hash router with balancing (each cell allowed, the combination not an architecture)
    raised KeyError in --summary, and was accepted by bench search."""
    comments, header, data = _parts()
    four = next(_cells(header, line) for line in data if _cells(header, line)["budget_factor"] == "4")
    stray = {**four, "router": "hash", "hierarchy_depth": "", "num_experts": "4", "top_k": "1",
             "num_shared_experts": "1", "balancing": "aux_free"}
    err = _summary_and_search_refuse(capsys, _write(tmp_path, "fx.csv", comments, header, data + [_line(stray)]),
                                     tmp_path)
    assert ("1 architectures at budget_factor 4 are not in search space 'nasbench' (first: router=hash, "
            "num_experts=4, top_k=1, num_shared_experts=1, balancing=aux_free)") in err


def test_a_longer_budget_architecture_missing_seeds_is_refused(tmp_path, capsys):
    comments, header, data = _parts()
    key = next(line.split(",")[:6] for line in data if _cells(header, line)["budget_factor"] == "4")
    data = [line for line in data if not (line.split(",")[:6] == key and _cells(header, line)["budget_factor"] == "4"
                                          and _cells(header, line)["seed"] != "0")]
    err = _refused(capsys, "nas-table", "--summary", _write(tmp_path, "fu.csv", comments, header, data))
    assert "at budget_factor 4" in err and "seeds [0] for" in err and "the table's seeds [0, 1, 2]" in err


def test_a_missing_column_is_named(tmp_path, capsys):
    comments, header, data = _parts()
    drop = header.rstrip("\n").split(",").index("load_balance")

    def without(line: str) -> str:
        cells = line.rstrip("\n").split(",")
        return ",".join(cells[:drop] + cells[drop + 1:]) + "\n"

    err = _refused(capsys, "nas-table", "--summary",
                   _write(tmp_path, "mc.csv", comments, without(header), [without(line) for line in data]))
    assert "missing column: load_balance" in err and "router, hierarchy_depth" not in err


@pytest.mark.parametrize("command", [["nas-table", "--summary"], ["search", "--repetitions", "1", "--trials", "2",
                                                                   "--table"]])
@pytest.mark.parametrize("options", [["--space", "tiny"], ["--space", "tiny", "--task", "textlm"],
                                     # refused for their own sake, before the table was read: pimoe_mix makes
                                     # an expert-choice router infeasible, default has int parameters
                                     ["--task", "pimoe_mix"], ["--space", "default"]])
def test_a_table_of_another_space_or_task_says_which_options_read_it(command, options, capsys):
    err = _refused(capsys, *command, str(DEFAULT_TABLE), *options)
    assert err.strip() == (f"error: table {DEFAULT_TABLE} is a table of search space 'nasbench' on task clusters: pass "
                           "--space nasbench --task clusters")


def test_a_table_that_is_not_utf8_is_named(tmp_path, capsys):
    """The codec's words alone, naming neither the file nor the option."""
    (table := tmp_path / "b.csv").write_bytes(b"# space: nasbench\n\xff\xfe")
    assert _refused(capsys, "nas-table", "--summary", str(table)).strip() == (
        f"error: table {table}: not a CSV text file (byte 18 is not UTF-8)")


def test_a_folder_given_as_the_table_is_said_to_be_a_folder(tmp_path, capsys):
    err = _refused(capsys, "search", "--table", str(tmp_path), "--repetitions", "1", "--trials", "2",
                   "--out", str(tmp_path / "replay"))
    assert f"table {tmp_path} is a folder, not a file" in err


def test_a_table_that_is_no_regular_file_is_not_called_missing(capsys):
    err = _refused(capsys, "nas-table", "--summary", "/dev/null")
    assert "table /dev/null is not a regular file" in err


def test_a_table_appended_to_itself_with_its_header_is_named_as_such(tmp_path, capsys):
    """Its second header row was refused field by field (router='router' is not one of the space's choices, ...)."""
    comments, header, data = _parts()
    err = _summary_and_search_refuse(capsys, _write(tmp_path, "twice.csv", comments, header,
                                                    data + [header] + data), tmp_path)
    assert f"data row {len(data) + 1}: the header row again (two tables in one file?)" in err
    assert "router='router'" not in err


def test_a_byte_order_mark_and_a_blank_last_line_are_read(tmp_path, capsys):
    """A spreadsheet's UTF-8 export (a byte-order mark) was refused as missing every column; an editor's blank
    last line as a row of 0 fields."""
    comments, header, data = _parts()
    table = tmp_path / "bom.csv"
    table.write_bytes(b"\xef\xbb\xbf" + "".join(comments + [header] + data + ["\n"]).encode())
    capsys.readouterr()
    assert bench.main(["nas-table", "--summary", str(table)]) == 0
    assert "108 architectures of search space 'nasbench'" in capsys.readouterr().out


@pytest.mark.parametrize("column, value, words", [
    ("steps", "0", "steps=0: must be at least 1"),
    ("seed", "-1", "seed=-1: must be at least 0"),
    ("active_params", "-5", "active_params=-5: must be at least 1"),
    ("total_params", "1", "total_params=1 is below active_params="),
    ("load_balance", "1.5", "load_balance=1.5: must be between 0 and 1"),
    ("routing_accuracy", "-0.1", "routing_accuracy=-0.1: must be between 0 and 1"),
    ("train_seconds", "-3", "train_seconds=-3: must be at least 0"),
    ("seed", "1.5", "seed='1.5' is not an integer"),  # was "is not a number"
])
def test_values_no_run_can_give_are_refused(tmp_path, capsys, column, value, words):
    """steps 0, negative seeds and parameter counts, shares outside [0, 1] were read and summarised."""
    comments, header, data = _parts()
    cells = _cells(header, data[0])
    cells[column] = value
    err = _summary_and_search_refuse(capsys, _write(tmp_path, "odd.csv", comments, header,
                                                    [_line(cells)] + data[1:]), tmp_path)
    assert f"data row 1: {words}" in err


def test_random_search_target_is_a_regret_some_repetition_reached():
    """With an even number of repetitions the interpolated median (0.5 here) is a regret no repetition has,
    and only half of random's repetitions reached it: its own row said "not reached"."""
    curves = {"random": [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [2.0, 2.0]], "tpe": [[0.0, 0.0]] * 4}
    s = summarize(curves, baseline_trial=50)
    assert s["target"]["regret"] in {rep[-1] for rep in curves["random"]}
    assert s["samplers"]["random"]["trials_to_target"]["median"] is not None
    assert s["samplers"]["random"]["trials_to_target"]["reached"] > 2


def test_random_search_reaches_its_own_target_in_a_short_replay(tmp_path, capsys):
    out = tmp_path / "replay"
    assert bench.main(["search", "--repetitions", "6", "--trials", "30", "--samplers", "random", "--out",
                       str(out)]) == 0
    random = json.loads((out / "replay.json").read_text())["samplers"]["random"]["trials_to_target"]
    assert random["median"] is not None and random["reached"] > 3


def test_one_front_is_one_hypervolume_regret_whatever_the_order_it_was_reached_in(tmp_path):
    """Optuna sums hypervolumes incrementally: one front reached in another order gave regrets 1e-16 apart
    (0.05029216526026259, ...292; 2e-16 for the whole front), and whether a repetition reached random's
    target depended on those last bits."""
    out = tmp_path / "replay"
    assert bench.main(["search", "--repetitions", "10", "--trials", "50", "--objectives", "loss", "active_params",
                       "--samplers", "random", "--out", str(out)]) == 0
    reps = json.loads((out / "replay.json").read_text())["samplers"]["random"]["regret"]
    values = sorted({r for rep in reps for r in rep})
    assert values[0] == 0.0
    assert all(b - a > 1e-9 for a, b in zip(values, values[1:], strict=False))


def test_a_table_rewritten_between_two_replays_in_one_process_is_read_again(tmp_path):
    """The replay was cached on the table's path: a second call in one process (the Python API, a notebook)
    replayed the table as first read."""
    import csv
    import io

    from fulu_nas.bench.sampler_replay import load_replay

    table = tmp_path / "t.csv"
    table.write_text(DEFAULT_TABLE.read_text())
    first = load_replay("nasbench", "clusters", str(table), ("loss",)).best
    text = table.read_text()
    comments = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    rows = list(csv.DictReader(line for line in text.splitlines(keepends=True) if not line.startswith("#")))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "loss": str(float(r["loss"]) + 1.0)} for r in rows)
    table.write_text(comments + out.getvalue())
    assert load_replay("nasbench", "clusters", str(table), ("loss",)).best == pytest.approx(first + 1.0)
