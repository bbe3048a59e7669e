"""The layer benchmark and the console entry point, run end to end on tiny shapes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fulu_nas import cli
from fulu_nas.bench import cli as bench
from fulu_nas.bench.levels import DENSE_ROW


def test_bench_layer_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "layer.json"
    code = bench.main(["layer", "--tokens", "4", "32", "--hidden", "32", "--experts", "4", "--ffn", "64",
                       "--min-run-time", "0.01", "--rounds", "2", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "grouped tok/s" in text and "dense tok/s" in text and "hidden 32, 4 experts" in text
    assert "medians of 2 interleaved rounds" in text
    result = json.loads(out.read_text())
    assert result["rounds"] == 2 and result["threads"] == torch.get_num_threads()
    rows = result["rows"]
    assert [r["tokens"] for r in rows] == [4, 32]
    assert all(r[k] > 0 for r in rows for k in ("grouped", "sorted", "loop", "dense"))


@pytest.mark.parametrize("activation,op", [("gelu", "aten::gelu"), ("swiglu", "aten::silu")])
def test_bench_profile_profiles_the_chosen_activation(activation, op, capsys):
    code = bench.main(["profile", "--tokens", "16", "--hidden", "32", "--experts", "4", "--ffn", "64",
                       "--path", "sorted", "--activation", activation, "--no-stats", "--rows", "60"])
    assert code == 0
    table = capsys.readouterr().out
    assert op in table
    other = "aten::silu" if op == "aten::gelu" else "aten::gelu"
    assert other not in table


def test_bench_profile_prints_the_table_and_nothing_of_the_profilers_own(tmp_path):
    """Kineto, torch.profiler's backend, wrote "USDT: ... profiler_start" lines to the process's
    stderr (a new process: the library reads its log level once)."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-m", "fulu_nas.bench", "profile", "--tokens", "16", "--hidden", "32",
                           "--experts", "4", "--ffn", "64", "--path", "sorted"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0 and "aten::mm" in done.stdout
    assert done.stderr == ""


def test_bench_refuses_an_impossible_layer(capsys):
    assert bench.main(["layer", "--hidden", "30", "--min-run-time", "0.01"]) == 2
    assert "hidden_size" in capsys.readouterr().err


def test_bench_levels_measures_the_spec_table(tmp_path, capsys):
    out = tmp_path / "levels.json"
    code = bench.main(["levels", "--device", "cpu", "--hidden", "32", "--experts", "4", "--ffn", "64", "--tokens", "64",
                       "--train-steps", "30", "--train-batch", "16", "--lr", "3e-3", "--iterations", "2",
                       "--warmup", "1", "--no-progress", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| level | dtype | latency (ms) | throughput (tokens/s) | memory (MiB) |" in text  # 2**20 bytes
    result = json.loads(out.read_text())
    assert result["training"]["train_steps"] == 30 and 0 <= result["training"]["task_accuracy"] <= 1
    rows = {r["level"]: r for r in result["rows"]}
    assert list(rows) == ["BASIC", "ENHANCED", "ADVANCED", "EXTREME", DENSE_ROW]
    for r in rows.values():
        assert r["latency_ms"] > 0
        assert abs(r["throughput_tokens_per_s"] - 64 / (r["latency_ms"] / 1e3)) < 1e-6 * r["throughput_tokens_per_s"]
    assert rows[DENSE_ROW]["of_dense"] == 1.0
    moe_rows = [r for name, r in rows.items() if name != DENSE_ROW]
    expert_weights_mb = 4 * 3 * 32 * 64 * 4 / 2**20
    for r in moe_rows:
        assert r["memory_mb"] > expert_weights_mb  # weights, input and workspace
        assert 0 < r["expert_utilisation"] <= 1 and 0 <= r["load_balance"] <= 1
    # Every level routes the same trained weights the same way (fp32 on the CPU).
    assert len({(r["expert_utilisation"], r["load_balance"]) for r in moe_rows}) == 1


def test_bench_levels_refuses_partial_sequences(capsys):
    assert bench.main(["levels", "--tokens", "50"]) == 2
    assert "--tokens must be a multiple of the clusters sequence length 16, got 50" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", ["layer", "levels"])
def test_bench_refuses_cuda_without_cuda(command, capsys):
    assert bench.main([command, "--device", "cuda", "--tokens", "16"]) == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err


def test_bench_refuses_an_unknown_device(capsys):
    assert bench.main(["layer", "--device", "gpu0"]) == 2
    assert "--device 'gpu0'" in capsys.readouterr().err


def test_bench_refuses_zero_rounds(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["layer", "--rounds", "0"])
    assert exit_info.value.code == 2
    assert "--rounds: must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv,words", [
    (["layer", "--tokens", "0"], "--tokens: must be at least 1"),  # a traceback before
    (["profile", "--tokens", "-1"], "--tokens: must be at least 1"),
    (["layer", "--min-run-time", "nan"], "--min-run-time: must be a finite number above 0"),  # timed forever
    (["clusters", "--seconds", "nan"], "--seconds: must be a finite number above 0"),  # trained forever
    (["routers", "--seconds", "inf"], "--seconds: must be a finite number above 0"),
    (["dynamic", "--lr", "inf"], "--lr: must be a finite number above 0")])
def test_bench_refuses_numbers_that_would_crash_or_never_end(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


def test_bench_routers_leaves_out_expert_choice_on_its_next_token_task(capsys):
    """Expert choice reads later tokens: training refuses it on pimoe_mix, so the benchmark offers the four
    causal routers (it stopped with the refusal after training the others)."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["routers", "--routers", "expert_choice", "--seconds", "1"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'expert_choice'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["routers", "--help"])
    assert "not expert_choice" in " ".join(capsys.readouterr().out.split())


def test_bench_refuses_an_output_it_could_not_write_before_running(tmp_path, capsys):
    """It was a traceback once the whole benchmark had run."""
    (tmp_path / "a_file").write_text("")
    for argv in (["layer", "--tokens", "4", "--json", str(tmp_path / "a_file" / "x.json")],
                 ["nas-table", "--out", str(tmp_path / "a_file" / "t.csv"), "--limit", "1"]):
        assert bench.main(argv) == 2
        assert "is not a folder" in capsys.readouterr().err


def test_bench_refuses_cuda_graphs_without_cuda(capsys):
    assert bench.main(["layer", "--device", "cpu", "--paths", "grouped+graphs", "--min-run-time", "0.01"]) == 2
    assert "+graphs paths need CUDA" in capsys.readouterr().err


def test_cli_dispatches_and_rejects_unknown_commands(capsys):
    assert cli.main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_module_runs_with_torch_alone(tmp_path):
    # The GPU machines have torch but not optuna/hydra/mlflow: the layer and the benchmark must
    # not import them.
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in {'optuna', 'hydra', 'mlflow', 'omegaconf', 'plotly'}:\n"
        "        raise ModuleNotFoundError('No module named ' + repr(name), name=name)  # as if absent\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import fulu_nas, fulu_nas.moe, fulu_nas.bench.cli, fulu_nas.bench.levels, fulu_nas.system\n"
        # the search's benchmarks name what they need (they were a traceback)
        "assert fulu_nas.bench.cli.main(['search', '--trials', '2', '--out', 'x']) == 2\n"
        "assert fulu_nas.bench.cli.main(['layer', '--tokens', '8', '--hidden', '16', '--experts', '2',"
        " '--ffn', '16', '--min-run-time', '0.01', '--paths', 'grouped']) == 0\n"
        "sys.exit(fulu_nas.bench.cli.main(['levels', '--hidden', '16', '--experts', '2', '--ffn', '16',"
        " '--tokens', '32', '--train-steps', '2', '--iterations', '1', '--warmup', '1']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "grouped tok/s" in result.stdout and "| EXTREME |" in result.stdout
    assert "error: fulu-nas bench search needs the Python package 'optuna'" in result.stderr, result.stderr


def test_task_benchmarks_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "routers.json"
    assert bench.main(["routers", "--seconds", "1", "--routers", "topk", "hash", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| topk |" in text and "| hash |" in text and "exact_match" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["router"] for r in rows] == ["topk", "hash"] and all(r["steps"] > 0 for r in rows)
    assert bench.main(["clusters", "--seconds", "1", "--balancing", "aux_loss"]) == 0
    assert "routing_accuracy" in capsys.readouterr().out


def test_the_competing_load_ends_with_the_command_however_it_is_stopped():
    """`bench cost --load N` left its N busy processes running for good when it was ended by a signal (timeout,
    kill, a cancelled CI job): they ran in their own sessions and were stopped in a `finally` no signal reaches.
    Each now ends once its parent is gone, however the parent ended (kill -9 here)."""
    code = ("import time; from fulu_nas.bench.cost_stability import busy_processes; "
            "print(*(p.pid for p in busy_processes(2)), flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        hogs = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(hogs) == 2 and all(Path(f"/proc/{pid}").exists() for pid in hogs)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_running(pid) for pid in hogs):
        time.sleep(0.2)
    left = [pid for pid in hogs if _running(pid)]
    for pid in left:  # stopped by the test that started them, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not left


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an exited child of init not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_bench_cost_repeats_the_search_cost_protocol(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert bench.main(["cost", "+experiment=tiny", "--params", "router=hash", "--repeat", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "latency_ratio" in text and "relative range over 2 repetitions" in text
    # a ratio beside two latencies it is not the quotient of, from one of two shapes, unexplained (item 10)
    assert "figures of the first shape" in text and "not latency_ms / reference ms" in text
    result = json.loads(out.read_text())
    assert result["architecture"]["router"] == "hash" and len(result["rows"]) == 2
    assert all(r["latency_ratio"] > 0 and r["latency_ms"] > 0 for r in result["rows"])
    assert bench.main(["cost", "+experiment=tiny", "--params", "router=nonsense"]) == 2
    # a message naming the key (it was "'<=' not supported between ..."), or a traceback for 4.0
    for value, words in (("abc", "--params: num_experts: expected an integer, got 'abc'"),
                         ("4.0", "--params: num_experts: expected an integer, got 4.0")):
        capsys.readouterr()
        assert bench.main(["cost", "+experiment=tiny", "--params", f"num_experts={value}"]) == 2
        assert words in capsys.readouterr().err


def test_bench_train_step_times_each_step_kind(tmp_path, capsys):
    """The table and JSON hold every kind timed, per architecture; on the CPU the graphed kinds are
    left out (they would be the eager step again) and the header says so."""
    out = tmp_path / "steps.json"
    code = bench.main(["train-step", "+experiment=tiny", "--steps", "3", "--arch", "", "--arch", "num_experts=8",
                       "--kinds", "eager", "eager+graph", "--json", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    text = captured.out
    rows = json.loads(out.read_text())["rows"]
    kinds = ["eager", "eager+graph"] if torch.cuda.is_available() else ["eager"]
    # Progress on stderr while it runs: each kind timed, as it finishes.
    assert f"{len(kinds) * 2}/{len(kinds) * 2}" in captured.err and "num_experts=8, eager: " in captured.err
    assert [(r["arch"], r["kind"]) for r in rows] == [(a, k) for a in ("reference", "num_experts=8") for k in kinds]
    assert all(r["step_ms"] > 0 and r["graphed"] == (r["kind"] == "eager+graph") for r in rows)
    assert "| reference | eager |" in text and ("no CUDA: eager+graph not timed" in text) != torch.cuda.is_available()

def _refused(argv, words, capsys):
    """``argv`` ends with exit 2 and ``words`` on stderr, from argparse or from the command."""
    try:
        code = bench.main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["layer", "--tokens", "4", "--min-run-time", "0.01", "--json", "{tmp}/missing/x.json"],
    ["layer", "--tokens", "4", "--min-run-time", "0.01", "--json", "{tmp}"],
    ["train-step", "--arch", "", "--kinds", "eager", "--json", "{tmp}"],
    ["nas-table", "--out", "{tmp}", "--limit", "1"]])
def test_bench_refuses_a_json_or_out_into_a_missing_folder_or_onto_a_folder(argv, tmp_path, capsys):
    """Checked before the run, not a FileNotFoundError / IsADirectoryError once the whole benchmark has run."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    _refused(argv, "--", capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("path,words", [("grouped+graphs", "+graphs paths need CUDA"),
                                        ("triton", "triton paths need CUDA")])
def test_bench_profile_refuses_cuda_paths_without_cuda(path, words, capsys):
    """A torch.cuda.Stream traceback, or a profile of the CPU path labelled triton (items 2, 17)."""
    _refused(["profile", "--device", "cpu", "--tokens", "16", "--path", path], words, capsys)


@pytest.mark.parametrize("argv,words", [
    (["peers", "--device", "cpu", "--quick", "--tokens-scale", "inf"], "--tokens-scale: must be a finite number"),
    (["peers", "--device", "cpu", "--quick", "--tokens-scale", "nan"], "--tokens-scale: must be a finite number"),
    (["peers", "--device", "cpu", "--quick", "--min-time", "0"], "--min-time: must be a finite number"),
    (["dynamic", "--every", "0"], "--every: must be at least 1"),
    (["dynamic", "--steps", "0"], "--steps: must be at least 1"),
    (["dynamic", "--freeze-after", "5"], "--freeze-after: must be between 0 and 1"),
    (["dynamic", "--steps", "5", "--seconds", "1"], "--steps or --seconds, not both"),
    (["clusters", "--threads", "-1"], "--threads: must be at least 0"),
    (["dynamic", "--threads", "-1"], "--threads: must be at least 0"),
    (["cost", "--load", "-1"], "--load: must be at least 0"),
    (["profile", "--rows", "0"], "--rows: must be at least 1"),
    (["train-step", "--arch", "", "--kinds", "compiled"],
     "--kinds compiled: add eager" + (" or eager+graph" if torch.cuda.is_available() else ", the baseline")),
    (["train-step", "--arch", "--kinds", "eager"], "--arch"),
    (["train-step", "--arch", "", "--kinds"], "--kinds")])
def test_bench_refuses_options_that_crashed_or_were_ignored(argv, words, capsys):
    """Tracebacks after minutes of training (items 3-6), or silently wrong runs (items 17-20)."""
    _refused(argv, words, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback of the graphed kinds")
def test_bench_train_step_on_the_cpu_times_no_graph_kind_and_shows_no_unmeasured_baseline(tmp_path, capsys):
    """An eager step labelled eager+graph with a speed-up, "vs eager 1.00x" with no eager run, and
    Infinity in the JSON (items 7, 8, 16)."""
    out = tmp_path / "steps.json"
    assert bench.main(["train-step", "+experiment=tiny", "--steps", "2", "--arch", "",
                       "--kinds", "eager+graph", "compiled+graph", "eager", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "eager+graph" not in text.split("\n\n", 1)[1] and "no CUDA" in text
    rows = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))["rows"]
    assert [r["kind"] for r in rows] == ["eager"]


def test_bench_layer_json_records_what_was_timed(tmp_path):
    out = tmp_path / "layer.json"
    assert bench.main(["layer", "--tokens", "4", "--hidden", "16", "--experts", "2", "--ffn", "16", "--paths", "sorted",
                       "--min-run-time", "0.01", "--backward", "--no-stats", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["backward"] and not result["with_stats"] and result["min_run_time_s"] == 0.01
    assert result["paths"] == ["sorted"] and result["dtype"] == "float32"



def test_bench_layer_compiles_past_dynamos_default_graph_limit(tmp_path, monkeypatch):
    """Each (path, token count) of a compiled path is one more graph of one lambda to dynamo: past its
    limit (8 by default; 1 here, so that two token counts show it) the command ended in
    FailOnRecompileLimitHit's traceback."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    out = tmp_path / "layer.json"
    assert bench.main(["layer", "--tokens", "2", "3", "--hidden", "16", "--experts", "2", "--ffn", "16", "--top-k", "1",
                       "--paths", "grouped+compile", "--min-run-time", "0.01", "--json", str(out)]) == 0
    assert [r["tokens"] for r in json.loads(out.read_text())["rows"]] == [2, 3]

def test_bench_profile_names_device_torch_dtype_and_path(capsys):
    assert bench.main(["profile", "--tokens", "8", "--hidden", "16", "--experts", "2", "--ffn", "16",
                       "--path", "sorted", "--rows", "3"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "path sorted" in first and f"torch {torch.__version__}" in first and "float32" in first


def test_round_median_is_a_measured_round():
    """statistics.median of two rounds is their mean: one disturbed round moved it by half (item 14)."""
    from fulu_nas.bench.common import round_median

    assert round_median([15.22, 0.083]) == 0.083 and round_median([3.0, 1.0, 2.0]) == 2.0


def test_bench_levels_measures_a_level_once(capsys):
    """``--levels basic basic`` printed two BASIC rows (item 22)."""
    assert bench.main(["levels", "--device", "cpu", "--hidden", "16", "--experts", "2", "--ffn", "16", "--tokens", "16",
                       "--train-steps", "1", "--iterations", "1", "--warmup", "1", "--no-progress",
                       "--levels", "basic", "basic"]) == 0
    assert capsys.readouterr().out.count("| BASIC |") == 1


def test_task_benchmarks_print_the_budget_they_ran(tmp_path, capsys):
    """A 0.4 s budget printed as "0 s", and dynamic's JSON named the unused 60 s budget (items 9, 16)."""
    assert bench.main(["clusters", "--seconds", "0.4", "--balancing", "none"]) == 0
    assert "0.4 s of training" in capsys.readouterr().out
    out = tmp_path / "dynamic.json"
    assert bench.main(["dynamic", "--steps", "2", "--start", "4", "--json", str(out)]) == 0
    assert "2 steps each" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["seconds"] is None and result["steps"] == 2


def test_dynamic_from_as_many_experts_as_domains_wants_them_kept(capsys):
    """From 8 experts on the 8-domain task, keeping 8 was reported as "fewer wanted: NO"."""
    assert bench.main(["dynamic", "--steps", "2", "--start", "8"]) == 0
    assert "from 8: ended with 8 (as many wanted: yes)" in capsys.readouterr().out


def test_nas_table_refuses_a_longer_budget_past_the_step_bound(tmp_path, capsys):
    """--factor had no bound: a typo's zeros trained for 1e11 steps, with no output."""
    out = tmp_path / "table.csv"
    assert bench.main(["nas-table", "--out", str(out), "--limit", "2", "--steps", "3", "--factor-subset", "1",
                       "--factor", "100000000000"]) == 2
    assert "--factor 100000000000: 100000000000 x 3 steps is more than 1,000,000 steps" in capsys.readouterr().err
    assert not out.exists()


def test_a_replay_shorter_than_the_first_checkpoint_shows_its_last_trial_s_regret(tmp_path, capsys):
    """With --trials below 10 the table had no regret column at all."""
    out = tmp_path / "replay"
    assert bench.main(["search", "--repetitions", "2", "--trials", "5", "--samplers", "random", "--out",
                       str(out)]) == 0
    assert "| sampler | regret @5 median [q1, q3] |" in capsys.readouterr().out
    assert list(json.loads((out / "replay.json").read_text())["samplers"]["random"]["checkpoints"]) == ["5"]


def test_task_benchmarks_name_the_device_they_train_on(monkeypatch):
    """The header named the CPU and float32 on a GPU host, where run_one trains on CUDA (item 11)."""
    from fulu_nas.bench import tasks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tasks, "device_name", lambda device: f"<{device.type}>")
    assert tasks._device_line().startswith("<cuda>") and "bf16 autocast" in tasks._device_line()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_latency_takes_the_activation(capsys):
    """``latency`` timed SwiGLU only, beside `peers`' GELU figures (item 23)."""
    assert bench.main(["latency", "--activation", "gelu"]) == 2
    assert "latency needs CUDA" in capsys.readouterr().err


@pytest.mark.parametrize("argv,option", [
    (["bench", "nas-table", "--summary", "t.csv", "--job", "4"], "--job"),
    (["bench", "layer", "--tok", "4"], "--tok"),
    (["serve", "x", "--sha", "0" * 64], "--sha"),
    (["ui", ".", "--track", "sqlite:///x.db"], "--track")])
def test_an_abbreviated_option_is_refused_not_read_as_the_full_one(argv, option, capsys):
    """An abbreviation slipped past the checks that name options as typed (``--summary`` refusing
    the generation options): each option must be spelled out."""
    try:
        code = cli.main(argv)
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    assert f"unrecognized arguments: {option}" in capsys.readouterr().err


# -- sizes, counts and seeds out of range: one message naming the option, exit 2, nothing written --------------

_HAS_JSON = {"layer", "levels", "peers", "routers", "clusters", "dynamic", "train-step", "cost"}
_TINY_LAYER = ["--hidden", "16", "--experts", "2", "--ffn", "16", "--min-run-time", "0.01"]
_TOO_BIG = "1000000000000"


def _refused_writing_nothing(argv, words, tmp_path, capsys, add_json=True):
    """``argv`` (with ``--json`` into ``tmp_path`` where the command has one) ends with exit 2, one
    ``error`` message holding ``words`` on stderr, no traceback, and no file written."""
    out = tmp_path / "out.json"
    if add_json and argv[0] in _HAS_JSON:
        argv = [*argv, "--json", str(out)]
    try:
        code = bench.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,words", [
    # D1: allocation tracebacks (DefaultCPUAllocator: can't allocate memory)
    (["layer", "--tokens", _TOO_BIG, "--paths", "loop"], "--tokens: must be at least 1 and at most 16777216"),
    (["layer", "--hidden", _TOO_BIG, "--tokens", "16"], "--hidden: must be at least 1 and at most 65536"),
    (["layer", "--ffn", _TOO_BIG, "--tokens", "16"], "--ffn: must be at least 1 and at most 65536"),
    (["layer", "--experts", "16777216", "--tokens", "16"], "--experts: must be at least 1 and at most 4096"),
    (["layer", "--top-k", "16777216", "--tokens", "16"], "--top-k: must be at least 1 and at most 4096"),
    (["profile", "--tokens", _TOO_BIG, "--path", "loop"], "--tokens: must be at least 1 and at most 16777216"),
    (["profile", "--hidden", _TOO_BIG, "--tokens", "16"], "--hidden: must be at least 1 and at most 65536"),
    (["latency", "--tokens", _TOO_BIG], "--tokens: must be at least 1 and at most 16777216"),
    (["levels", "--hidden", _TOO_BIG, "--tokens", "16"], "--hidden: must be at least 1 and at most 65536"),
    (["levels", "--experts", _TOO_BIG, "--tokens", "16"], "--experts: must be at least 1 and at most 4096"),
    (["levels", "--ffn", _TOO_BIG, "--tokens", "16"], "--ffn: must be at least 1 and at most 65536"),
    (["levels", "--tokens", "17179869184"], "--tokens: must be at least 1 and at most 16777216"),
    # D2
    (["peers", "--device", "cpu", "--quick", "--configs", "seed-fwd", "--tokens-scale", "1e12"],
     "--tokens-scale: must be a finite number above 0 and at most 64"),
    # D3: a hang building the samples, an allocation traceback
    (["routers", "--seconds", "0.5", "--routers", "topk", "--batch-size", _TOO_BIG],
     "--batch-size: must be at least 1 and at most 65536"),
    (["clusters", "--seconds", "0.5", "--batch-size", _TOO_BIG], "--batch-size: must be at least 1 and at most 65536"),
    (["dynamic", "--steps", "2", "--batch-size", "0"], "--batch-size: must be at least 1 and at most 65536"),
    (["levels", "--train-batch", _TOO_BIG], "--train-batch: must be at least 1 and at most 65536"),
    # D5: "error: Overflow when unpacking long long", naming no option
    (["routers", "--seconds", "0.5", "--seed", "100000000000000000000000"],
     "--seed: must be at least 0 and at most 4294967295"),
    (["levels", "--seed", "100000000000000000000000"], "--seed: must be at least 0 and at most 4294967295"),
    (["levels", "--seed", "-1"], "--seed: must be at least 0 and at most 4294967295"),
    (["clusters", "--seed", "4294967296"], "--seed: must be at least 0 and at most 4294967295"),
    (["dynamic", "--seeds", "0", "4294967296"], "--seeds: must be at least 0 and at most 4294967295"),
    (["peers", "--device", "cpu", "--quick", "--seed", "4294967296"],
     "--seed: must be at least 0 and at most 4294967295"),
    # D7: time and count budgets that never end
    (["layer", "--tokens", "16", "--paths", "loop", "--min-run-time", "1e12"],
     "--min-run-time: must be a finite number above 0 and at most 3600"),
    (["layer", "--tokens", "16", "--paths", "loop", "--rounds", _TOO_BIG],
     "--rounds: must be at least 1 and at most 1000"),
    (["levels", "--iterations", _TOO_BIG], "--iterations: must be at least 1 and at most 1000000"),
    (["levels", "--train-steps", _TOO_BIG], "--train-steps: must be at least 1 and at most 1000000"),
    (["levels", "--warmup", _TOO_BIG], "--warmup: must be at least 1 and at most 1000000"),
    (["routers", "--seconds", "1e12"], "--seconds: must be a finite number above 0 and at most 3600"),
    (["clusters", "--seconds", "1e12"], "--seconds: must be a finite number above 0 and at most 3600"),
    (["dynamic", "--seconds", "1e12"], "--seconds: must be a finite number above 0 and at most 3600"),
    (["dynamic", "--steps", _TOO_BIG], "--steps: must be at least 1 and at most 1000000"),
    (["dynamic", "--steps", "2", "--start", _TOO_BIG], "--start: must be at least 2 and at most 64"),
    (["peers", "--device", "cpu", "--quick", "--rounds", _TOO_BIG], "--rounds: must be at least 1 and at most 1000"),
    (["peers", "--device", "cpu", "--quick", "--min-time", "1e12"],
     "--min-time: must be a finite number above 0 and at most 3600"),
    (["train-step", "--arch", "", "--kinds", "eager", "--steps", _TOO_BIG],
     "--steps: must be at least 2 and at most 1000000"),
    (["cost", "--repeat", _TOO_BIG], "--repeat: must be at least 1 and at most 1000"),
    # a typo here starts that many processes
    (["cost", "--load", _TOO_BIG], "--load: must be at least 0 and at most 256"),
    (["nas-table", "--out", "{tmp}/t.csv", "--jobs", _TOO_BIG], "--jobs: must be at least 1 and at most 256"),
    (["search", "--out", "{tmp}/search", "--jobs", _TOO_BIG], "--jobs: must be at least 1 and at most 256"),
    (["clusters", "--threads", _TOO_BIG], "--threads: must be at least 0 and at most 1024")])
def test_bench_refuses_sizes_counts_and_seeds_out_of_range(argv, words, tmp_path, capsys):
    """Allocation tracebacks, a hang, an overflow message naming no option, budgets that never end
    (audit D1, D2, D3, D5, D7): argparse refuses them, naming the option and its range."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    _refused_writing_nothing(argv, words, tmp_path, capsys)


@pytest.mark.parametrize("argv", [
    ["layer", "--tokens", "16", "--hidden", "65536", "--experts", "4096", "--ffn", "65536", "--paths", "loop"],
    ["layer", "--tokens", "16777216", "--hidden", "65536", "--experts", "2", "--ffn", "16", "--top-k", "1"],
    ["profile", "--tokens", "16", "--hidden", "65536", "--experts", "4096", "--ffn", "65536", "--path", "loop"],
    ["levels", "--tokens", "16", "--hidden", "65536", "--experts", "4096", "--ffn", "65536"],
    ["levels", "--tokens", "16", "--hidden", "65536", "--experts", "2", "--ffn", "65536", "--top-k", "1",
     "--train-batch", "65536"]])
def test_bench_refuses_a_layer_larger_than_the_memory(argv, tmp_path, capsys):
    """Sizes within their ranges whose weights or activations no machine holds: refused before
    anything is allocated, naming the options (a DefaultCPUAllocator traceback before, D1)."""
    _refused_writing_nothing(argv, "more than the", tmp_path, capsys)
    capsys.readouterr()
    try:
        bench.main(argv)
    except SystemExit:
        pass
    err = capsys.readouterr().err
    assert "--hidden 65536" in err and "--tokens" in err and "--experts" in err and "--ffn" in err


def test_bench_peers_refuses_scaled_shapes_larger_than_the_memory(monkeypatch, tmp_path, capsys):
    """--tokens-scale 64 on a machine of 1 GiB: refused before the first shape is built."""
    from fulu_nas.bench import common

    monkeypatch.setattr(common, "memory_bytes", lambda device: 2**30)
    _refused_writing_nothing(["peers", "--device", "cpu", "--configs", "seed-fwd", "--tokens-scale", "64"],
                             "--tokens-scale 64", tmp_path, capsys)


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 2048000000000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")])
def test_bench_turns_an_allocation_failure_into_one_message(error, monkeypatch, tmp_path, capsys):
    """The last resort for a configuration the estimate let through: exit 2 and one message naming
    the size options, not a traceback (D1)."""
    from fulu_nas.bench import layer

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(layer, "bench_layer", fail)
    _refused_writing_nothing(["layer", "--tokens", "16", *_TINY_LAYER], "out of memory", tmp_path, capsys)
    monkeypatch.setattr(layer, "bench_layer", fail)
    bench.main(["layer", "--tokens", "16", *_TINY_LAYER])
    err = capsys.readouterr().err
    assert "--tokens" in err and "--hidden" in err and len(err.strip().splitlines()) == 1


def test_bench_lets_other_runtime_errors_through(monkeypatch):
    """Only allocation failures are turned into a message: a bug stays a traceback."""
    from fulu_nas.bench import layer

    def fail(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(layer, "bench_layer", fail)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench.main(["layer", "--tokens", "16", *_TINY_LAYER])


@pytest.mark.parametrize("argv", [["layer", "--tokens", "4", "--paths", "loop", *_TINY_LAYER, "--json", ""],
                                  ["nas-table", "--out", "", "--limit", "1"]])
def test_bench_refuses_an_empty_output_path(argv, tmp_path, monkeypatch, capsys):
    """``--json ""`` was silently ignored: the run printed its table and wrote nothing."""
    monkeypatch.chdir(tmp_path)
    option = argv[argv.index("") - 1]
    _refused_writing_nothing(argv, f"{option}: an empty path", tmp_path, capsys, add_json=False)


def test_bench_takes_the_largest_values_in_range():
    """The bounds refuse typos, not real benchmarks: the largest values of each range parse."""
    parser = bench.build_parser()
    args = parser.parse_args(["layer", "--tokens", "16777216", "--hidden", "65536", "--ffn", "65536", "--experts",
                              "4096", "--min-run-time", "3600", "--rounds", "1000"])
    assert (args.tokens, args.hidden, args.ffn, args.experts, args.rounds) == ([2**24], 65536, 65536, 4096, 1000)
    args = parser.parse_args(["levels", "--seed", "4294967295", "--train-batch", "65536", "--iterations", "1000000",
                              "--train-steps", "1000000", "--warmup", "1000000"])
    assert args.seed == 2**32 - 1 and args.train_batch == 65536 and args.iterations == 10**6
    args = parser.parse_args(["peers", "--tokens-scale", "64", "--seed", "0", "--rounds", "1000", "--min-time", "3600"])
    assert args.tokens_scale == 64 and args.rounds == 1000
    args = parser.parse_args(["routers", "--seconds", "3600", "--batch-size", "65536", "--seed", "4294967295"])
    assert args.seconds == 3600 and args.batch_size == 65536


@pytest.mark.parametrize("argv,words", [
    (["cost", "search_space=nosuch"], "search_space: no option 'nosuch' (options: default,"),
    (["cost", "trainer=nosuch"], "trainer: no option 'nosuch' (options: default, gpu, tiny)"),
    (["train-step", "nosuchkey=3", "--kinds", "eager"], "nosuchkey: unknown key (check its spelling)"),
    # YAML's ParserError traceback, exit 1
    (["cost", "--params", "num_experts=[", "--repeat", "1"], "--params: num_experts: cannot read '['"),
    (["train-step", "--arch", "top_k=1,num_experts=[", "--kinds", "eager"], "--arch: num_experts: cannot read '['")])
def test_bench_cost_and_train_step_refuse_a_bad_override_with_one_message(argv, words, tmp_path, capsys):
    """Hydra's and OmegaConf's errors were a traceback and exit 1, where nas-table's --space gave one line."""
    _refused_writing_nothing(argv, words, tmp_path, capsys)


def test_an_architectures_list_values_keep_their_commas():
    """``hierarchy_groups=[2,4]`` was cut at its comma into "hierarchy_groups=[2" and "4]": a YAML traceback."""
    from fulu_nas.bench.common import arch_values

    assert arch_values("router=hierarchical,hierarchy_depth=3,hierarchy_groups=[2,4],,x={a: 1, b: [1,2]}",
                       "--params") == {"router": "hierarchical", "hierarchy_depth": 3, "hierarchy_groups": [2, 4],
                                       "x": {"a": 1, "b": [1, 2]}}
    assert arch_values("", "--params") == {}

def test_bench_cost_and_train_step_pass_the_overrides_after_an_architecture_to_the_config(tmp_path):
    """``--params`` and ``--arch`` took every word after them, the overrides too ("unknown MoE config
    keys: search_space, task"): each takes one value now, its parameters joined by commas."""
    out = tmp_path / "cost.json"
    assert bench.main(["cost", "--params", "router=hash,num_experts=2", "+experiment=tiny", "--repeat", "1",
                       "--json", str(out)]) == 0
    assert json.loads(out.read_text())["architecture"] == {"router": "hash", "num_experts": 2, "top_k": 2,
                                                            "expert_ffn_size": 32}
    out = tmp_path / "steps.json"
    assert bench.main(["train-step", "--arch", "", "--arch", "num_experts=2,top_k=1", "+experiment=tiny",
                       "--steps", "2", "--kinds", "eager", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["arch"] for r in result["rows"]] == ["reference", "num_experts=2,top_k=1"]
    assert result["seq_len"] == 16  # +experiment=tiny's clusters, not the default pimoe_mix


def test_bench_train_step_refuses_a_budget_without_a_step_after_the_first(tmp_path, capsys):
    """One step has no mean step after the first: it printed the teardown as ms/step, and speed-ups from it."""
    _refused_writing_nothing(["train-step", "+experiment=tiny", "--arch", "", "--kinds", "eager", "--steps", "1"],
                             "--steps: must be at least 2", tmp_path, capsys)


def test_bench_dynamic_refuses_a_start_outside_the_expert_range_before_training(capsys):
    """``--start 4 1`` trained both runs from 4, then stopped at 1 without a table."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["dynamic", "--steps", "20", "--every", "5", "--start", "4", "1"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "--start: must be at least 2 and at most 64, got 1" in captured.err and captured.out == ""


def test_task_benchmarks_time_the_training_alone(monkeypatch):
    """train_seconds was read after the evaluation too."""
    from fulu_nas.bench.tasks import clusters_arch, run_one
    from fulu_nas.tasks import ClustersTask
    from fulu_nas.training import evaluate as evaluation

    evaluate = evaluation.evaluate

    def slow_evaluate(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        time.sleep(1.0)
        return result

    monkeypatch.setattr(evaluation, "evaluate", slow_evaluate)
    task = ClustersTask()
    row = run_one(task, clusters_arch(task), None, 16, 3e-3, 0, steps=2)
    assert row["steps"] == 2 and row["train_seconds"] < 1.0


@pytest.mark.parametrize("argv,option", [
    (["levels", "--hidden", "32", "--ffn", "32", "--tokens", "64", "--train-steps", "2", "--train-batch", "4",
      "--iterations", "1", "--no-progress", "--lr", "1e30"], "--lr"),
    (["train-step", "+experiment=tiny", "trainer.lr=1e30", "--arch", "", "--steps", "3", "--kinds", "eager"],
     "trainer.lr="),
])
def test_a_training_that_diverges_is_one_line_naming_the_learning_rate(argv, option, capsys):
    """A learning rate too large for the benchmark's training ended the command in TrainingDiverged's traceback."""
    assert bench.main(argv) == 1
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("error: training diverged at step ") and line.endswith(
        f": a smaller learning rate ({option}) trains"), line
