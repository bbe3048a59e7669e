"""The tabular benchmark: the nasbench space enumerates exactly, ``bench nas-table`` writes the rows it
promises and the same numbers every time (in one process or two), ``bench search`` replays samplers
against the committed table with honest regret curves, and bad input stops with one message and
nothing written."""

from __future__ import annotations

import csv
import itertools
import json
import warnings
from collections import Counter

import optuna
import pytest

from fulu_nas.bench import cli as bench
from fulu_nas.bench.finite_space import architecture_keys, enumerate_space
from fulu_nas.bench.nas_settings import product_settings
from fulu_nas.bench.nas_table import DEFAULT_TABLE
from fulu_nas.bench.nas_table_file import RESULT_COLUMNS

PARAMS = ["router", "hierarchy_depth", "num_experts", "top_k", "num_shared_experts", "balancing"]


def _data_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_the_space_enumerates_to_108_architectures_that_all_build():
    s = product_settings("nasbench", "clusters")
    archs = enumerate_space(s.space, s.task)
    # 4 learned routers x 3 expert counts x 2 top-k x 2 shared x 2 balancing, and the hash router without balancing
    assert len(archs) == 4 * 3 * 2 * 2 * 2 + 3 * 2 * 2 == 108
    assert Counter(v["router"] for v in archs) == {"topk": 24, "expert_choice": 24, "hierarchical": 24,
                                                   "attention": 24, "hash": 12}
    assert len(set(architecture_keys(s.space, s.task))) == 108
    hashes = {s.space.arch(s.space.with_derived(v), s.task).content_hash() for v in archs}  # raises if impossible
    # expert choice's two balancing names are one model (its load is balanced by construction): 96 to train
    assert len(hashes) == 108 - 12
    assert all(("balancing" in v) != (v["router"] == "hash") for v in archs)
    assert all(("hierarchy_depth" in v) == (v["router"] == "hierarchical") for v in archs)


def test_nas_table_writes_the_promised_rows_and_the_same_numbers_in_one_process_or_two(tmp_path, capsys):
    runs = []
    for jobs in (1, 2):
        out = tmp_path / f"table{jobs}.csv"
        assert bench.main(["nas-table", "--out", str(out), "--limit", "3", "--seeds", "2", "--steps", "6",
                           "--factor-subset", "2", "--factor", "2", "--jobs", str(jobs)]) == 0
        runs.append(_data_rows(out))
    rows = runs[0]
    assert list(rows[0]) == PARAMS + list(RESULT_COLUMNS)
    base = [r for r in rows if r["budget_factor"] == "1"]
    longer = [r for r in rows if r["budget_factor"] == "2"]
    assert len(base) == 3 * 2 and len(longer) == 2 * 2
    assert {r["steps"] for r in base} == {"6"} and {r["steps"] for r in longer} == {"12"}
    assert [r["seed"] for r in base] == ["0", "1"] * 3
    # The subset spans the loss ranking: the best and the worst of the three architectures.
    mean = {h: sum(float(r["loss"]) for r in base if r["arch_hash"] == h) / 2 for h in {r["arch_hash"] for r in base}}
    ranked = sorted(mean, key=mean.get)
    assert {r["arch_hash"] for r in longer} == {ranked[0], ranked[-1]}
    assert all(float(r["active_params"]) <= float(r["total_params"]) for r in rows)
    timeless = [[{k: v for k, v in r.items() if k != "train_seconds"} for r in run] for run in runs]
    assert timeless[0] == timeless[1]
    assert "wrote 10 rows" in capsys.readouterr().out


def test_the_committed_table_covers_the_space_and_its_summary_reports_the_correlations(capsys):
    rows = _data_rows(DEFAULT_TABLE)
    assert DEFAULT_TABLE.stat().st_size < 1_000_000
    assert len([r for r in rows if r["budget_factor"] == "1"]) == 108 * 3
    assert bench.main(["nas-table", "--summary", str(DEFAULT_TABLE)]) == 0
    text = capsys.readouterr().out
    assert "Kendall tau" in text and "short vs long budget" in text


def test_bench_search_replays_samplers_with_non_negative_non_increasing_regret(tmp_path, capsys):
    out = tmp_path / "replay"
    assert bench.main(["search", "--repetitions", "3", "--trials", "20", "--samplers", "tpe", "random", "qmc",
                       "--out", str(out)]) == 0
    page = (out / "replay.html").read_text()
    assert page.lower().startswith("<!doctype html>") and '"name":"tpe"' in page and "plotly.js" in page
    result = json.loads((out / "replay.json").read_text())
    assert list(result["samplers"]) == ["tpe", "random", "qmc"]
    for sampler in result["samplers"].values():
        assert len(sampler["regret"]) == 3
        for regret in sampler["regret"]:
            assert len(regret) == 20 and min(regret) >= 0
            assert all(b <= a for a, b in itertools.pairwise(regret))
    assert "trials to random's 20-trial median" in capsys.readouterr().out

    # By hand: Optuna's RandomSampler(seed=0) through the space's own sampling, looked up in the CSV.
    s = product_settings("nasbench", "clusters")
    losses: dict[tuple, list[float]] = {}
    for r in _data_rows(DEFAULT_TABLE):
        if r["budget_factor"] == "1":
            losses.setdefault(tuple(r[p] for p in PARAMS), []).append(float(r["loss"]))
    mean = {k: sum(v) / len(v) for k, v in losses.items()}
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: mean[tuple(str(s.space.sample(t).get(p, "")) for p in PARAMS)], n_trials=20)
    best = [min(t.value for t in study.trials[:i + 1]) for i in range(20)]
    assert result["table_best"] == pytest.approx(min(mean.values()))
    assert result["samplers"]["random"]["regret"][0] == pytest.approx([b - min(mean.values()) for b in best])


def test_a_summary_says_why_a_rank_correlation_is_not_defined(tmp_path, capsys):
    """A table with one architecture at the longer budget (--factor-subset 1, which the generator takes) was
    summarised with scipy's SmallSampleWarning on stderr and "Kendall tau nan"."""
    out = tmp_path / "table.csv"
    space = ["--space", "tiny", "--task", "textlm"]  # a space small enough to train whole here
    assert bench.main(["nas-table", "--out", str(out), *space, "--seeds", "2", "--steps", "1",
                       "--factor-subset", "1", "--factor", "2"]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's warning, had it been given
        assert bench.main(["nas-table", "--summary", str(out), *space]) == 0
    printed = capsys.readouterr()
    assert "Kendall tau n/a, Spearman rho n/a (a rank correlation needs at least 2 architectures" in printed.out
    assert "nan" not in printed.out and printed.err == ""


def test_bench_search_gives_the_same_curves_with_two_processes(tmp_path, capsys):
    """``--jobs 2`` (the documented command's) runs the repetitions in spawned processes: each repetition's
    sampler is seeded by the repetition, so the curves are those of one process, in the same order."""
    curves = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        assert bench.main(["search", "--repetitions", "2", "--trials", "12", "--samplers", "tpe", "random",
                           "--jobs", jobs, "--out", str(out)]) == 0
        samplers = json.loads((out / "replay.json").read_text())["samplers"]
        curves[jobs] = {name: s["regret"] for name, s in samplers.items()}
        bar = capsys.readouterr().err  # the replays' progress
        assert "4/4" in bar and "random seed 1: regret" in bar
    assert list(curves["2"]) == ["tpe", "random"] and all(len(r) == 2 for r in curves["2"].values())
    assert curves["2"] == curves["1"]


@pytest.mark.parametrize("objective, gap", [("loss", "the best so far minus the table's best mean"),
                                            ("metric", "the table's best mean {:.4f} minus the best so far")])
def test_bench_search_says_what_its_regret_is_in_the_objective_s_direction(tmp_path, capsys, objective, gap):
    """A maximised metric's regret (table best minus best so far, >= 0) was described as "best so far minus
    the table's best", which is <= 0 there."""
    out = tmp_path / "replay"
    assert bench.main(["search", "--repetitions", "1", "--trials", "5", "--samplers", "random", "--objectives",
                       objective, "--out", str(out)]) == 0
    result = json.loads((out / "replay.json").read_text())
    assert min(result["samplers"]["random"]["regret"][0]) >= 0
    said = " ".join(capsys.readouterr().out.split())
    words = gap.format(result["table_best"])
    assert words in said and words in (out / "replay.html").read_text()


def test_bench_search_replays_two_objectives_by_hypervolume_regret(tmp_path, capsys):
    """The second command of docs/nas-benchmark.md's replays, shrunk: the table's front and reference point
    are the page's figures, and every sampler's hypervolume regret falls from at most 1 toward 0."""
    out = tmp_path / "replay-mo"
    assert bench.main(["search", "--repetitions", "2", "--trials", "12", "--objectives", "loss", "active_params",
                       "--out", str(out)]) == 0
    result = json.loads((out / "replay.json").read_text())
    assert result["table_hypervolume"] == pytest.approx(1289.72, abs=0.01)
    assert result["reference_point"] == pytest.approx([1.29777, 13851.6], rel=1e-5)
    for sampler in result["samplers"].values():
        for regret in sampler["regret"]:
            assert len(regret) == 12 and all(0 <= r <= 1 for r in regret)
            assert all(b <= a for a, b in itertools.pairwise(regret))
    assert "hypervolume regret of (loss, active_params)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--table", "NAN"], "data row 1: metric is not finite"),  # was replayed: "best mean nan"
    (["--table", "missing.csv"], "no such file"),
    (["--samplers", "tpe", "annealing"], "unknown sampler 'annealing'"),
    (["--objectives", "latency_ms"], "--objectives"),
    (["--table", "BAD"], "do not match search space 'nasbench'"),
    # A hypervolume regret of an objective that never varies divided by zero after every replay had run.
    (["--table", "CONST", "--objectives", "loss", "load_balance"], "load_balance is 1 for every architecture"),
])
def test_bench_search_refuses_bad_input_with_one_message_and_writes_nothing(tmp_path, capsys, args, message):
    bad = tmp_path / "bad.csv"
    bad.write_text("router,experts,loss\ntopk,4,1.0\n")
    lines = DEFAULT_TABLE.read_text().splitlines(keepends=True)
    header = [i for i, line in enumerate(lines) if not line.startswith("#")][0]
    first = dict(zip(lines[header].strip().split(","), lines[header + 1].strip().split(","), strict=True))
    first["metric"] = "nan"
    lines[header + 1] = ",".join(first.values()) + "\n"
    (tmp_path / "nan.csv").write_text("".join(lines))
    lines = DEFAULT_TABLE.read_text().splitlines(keepends=True)
    columns = lines[header].strip().split(",")
    rows = [line.strip().split(",") for line in lines[header + 1:]]
    constant = [",".join("1" if c == "load_balance" else v for c, v in zip(columns, r, strict=True)) + "\n"
                for r in rows]
    (tmp_path / "const.csv").write_text("".join(lines[:header + 1] + constant))
    named = {"BAD": str(bad), "NAN": str(tmp_path / "nan.csv"), "CONST": str(tmp_path / "const.csv"),
             "missing.csv": str(tmp_path / "missing.csv")}
    args = [named.get(a, a) for a in args]
    out = tmp_path / "replay"
    assert bench.main(["search", *args, "--repetitions", "1", "--trials", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_nas_table_refuses_a_subset_larger_than_the_table_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "table.csv"
    assert bench.main(["nas-table", "--out", str(out), "--limit", "2", "--factor-subset", "3"]) == 2
    assert "--factor-subset 3" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("extra,words", [
    (["--summary", str(DEFAULT_TABLE), "--jobs", "4", "--seeds", "9"], "--summary reads a table: --seeds, --jobs"),
    (["--out", "{out}", "--limit", "1", "--factor", "8"], "--factor without --factor-subset"),
    (["--out", "{out}", "--limit", "1", "--factor", "0"], "--factor without --factor-subset")])
def test_nas_table_refuses_options_it_would_ignore(extra, words, tmp_path, capsys):
    """Refused, not accepted and ignored."""
    out = tmp_path / "table.csv"
    assert bench.main(["nas-table", *(a.replace("{out}", str(out)) for a in extra)]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_search_out_may_be_a_new_folder_but_not_a_file(tmp_path, capsys):
    """``bench search --out`` names a folder it creates (the other --out/--json name files)."""
    (tmp_path / "a_file").write_text("")
    assert bench.main(["search", "--repetitions", "1", "--trials", "1", "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_table_of_a_task_without_domains_is_read_back_by_its_summary_and_replay(tmp_path, capsys):
    """On textlm (no labelled domains) every row's routing_accuracy was nan, which the table's own
    --summary and ``bench search --table`` refused: it is left empty now, shown as "-"."""
    out = tmp_path / "textlm.csv"
    assert bench.main(["nas-table", "--out", str(out), "--space", "tiny", "--task", "textlm", "--seeds", "1",
                       "--steps", "1"]) == 0
    rows = _data_rows(out)
    assert len(rows) == 16 and {r["routing_accuracy"] for r in rows} == {""}
    capsys.readouterr()
    assert bench.main(["nas-table", "--summary", str(out), "--space", "tiny", "--task", "textlm"]) == 0
    best = capsys.readouterr().out.split("| rank |", 1)[1].splitlines()[2]
    assert best.split("|")[5].strip() == "-"
    assert bench.main(["search", "--table", str(out), "--space", "tiny", "--task", "textlm", "--repetitions", "1",
                       "--trials", "2", "--samplers", "random", "--out", str(tmp_path / "replay")]) == 0
    # as earlier versions wrote it
    old = out.with_name("nan.csv")
    old.write_text(out.read_text().replace(",,", ",nan,"))
    assert old.read_text().count(",nan,") == 16
    assert bench.main(["nas-table", "--summary", str(old), "--space", "tiny", "--task", "textlm"]) == 0


def _with_first_row(path, tmp_path, **cells) -> str:
    """``path`` with the first data row's ``cells`` replaced, as a new file."""
    lines = path.read_text().splitlines(keepends=True)
    header = [i for i, line in enumerate(lines) if not line.startswith("#")][0]
    first = dict(zip(lines[header].strip().split(","), lines[header + 1].rstrip("\n").split(","), strict=True))
    lines[header + 1] = ",".join({**first, **cells}.values()) + "\n"
    changed = tmp_path / f"changed-{len(list(tmp_path.iterdir()))}.csv"
    changed.write_text("".join(lines))
    return str(changed)


@pytest.mark.parametrize("task,cells,words", [
    ("clusters", {"routing_accuracy": ""}, "routing_accuracy is missing: task clusters labels domains"),
    ("clusters", {"routing_accuracy": "nan"}, "routing_accuracy is not finite"),
    ("textlm", {"routing_accuracy": "0.5"}, "routing_accuracy='0.5': task textlm labels no domains"),
    ("textlm", {"routing_accuracy": "-1"}, "routing_accuracy='-1': task textlm labels no domains"),
    ("textlm", {"loss": "nan"}, "loss is not finite"),
    ("textlm", {"load_balance": ""}, "load_balance='' is not a number")])
def test_a_tables_routing_accuracy_is_a_number_exactly_where_the_task_labels_domains(task, cells, words, tmp_path,
                                                                                       capsys):
    """Missing where the task has no domains, a finite number where it has; the other columns numbers always."""
    source = tmp_path / "source.csv"
    assert bench.main(["nas-table", "--out", str(source), "--space", "tiny", "--task", task, "--seeds", "1",
                       "--steps", "1"]) == 0
    changed = _with_first_row(source, tmp_path, **cells)
    capsys.readouterr()
    assert bench.main(["nas-table", "--summary", changed, "--space", "tiny", "--task", task]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err



def test_a_rows_train_seconds_is_the_training_alone(monkeypatch):
    """``train_seconds`` is the training's own time, as a search trial records it: it counted building
    the model and the evaluation too."""
    import dataclasses

    from fulu_nas.bench import nas_table
    from fulu_nas.training import train as train_module

    real_train = train_module.train

    def train(model, task, cfg):
        return dataclasses.replace(real_train(model, task, cfg), seconds=12.5)

    monkeypatch.setattr(train_module, "train", train)
    s = product_settings("nasbench", "clusters")
    values = enumerate_space(s.space, s.task)[0]
    row = nas_table.train_and_evaluate(s, nas_table.Job(values=values, seed=0, budget_factor=1, steps=3))
    assert row["train_seconds"] == 12.5 and row["steps"] == 3
