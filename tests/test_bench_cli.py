"""The layer benchmark and the console entry point, run end to end on tiny shapes."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert "| level | dtype | latency (ms) | throughput (tokens/s) | memory (MB) |" in text
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
        "        raise ImportError('blocked ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import fulu_nas, fulu_nas.moe, fulu_nas.bench.cli, fulu_nas.bench.levels, fulu_nas.system\n"
        "assert fulu_nas.bench.cli.main(['layer', '--tokens', '8', '--hidden', '16', '--experts', '2',"
        " '--ffn', '16', '--min-run-time', '0.01', '--paths', 'grouped']) == 0\n"
        "sys.exit(fulu_nas.bench.cli.main(['levels', '--hidden', '16', '--experts', '2', '--ffn', '16',"
        " '--tokens', '32', '--train-steps', '2', '--iterations', '1', '--warmup', '1']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "grouped tok/s" in result.stdout and "| EXTREME |" in result.stdout


def test_task_benchmarks_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "routers.json"
    assert bench.main(["routers", "--seconds", "1", "--routers", "topk", "hash", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| topk |" in text and "| hash |" in text and "exact_match" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["router"] for r in rows] == ["topk", "hash"] and all(r["steps"] > 0 for r in rows)
    assert bench.main(["clusters", "--seconds", "1", "--balancing", "aux_loss"]) == 0
    assert "routing_accuracy" in capsys.readouterr().out


def test_bench_cost_repeats_the_search_cost_protocol(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert bench.main(["cost", "+experiment=tiny", "--params", "router=hash", "--repeat", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "latency_ratio" in text and "relative range over 2 repetitions" in text
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
    """On the CPU the graphed kinds run eagerly (no capture); the table and JSON hold every kind."""
    out = tmp_path / "steps.json"
    code = bench.main(["train-step", "+experiment=tiny", "--steps", "3", "--arch", "", "num_experts=8",
                       "--kinds", "eager", "eager+graph", "--json", str(out)])
    assert code == 0
    assert "| reference | eager+graph |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["arch"], r["kind"]) for r in rows] == [("reference", "eager"), ("reference", "eager+graph"),
                                                       ("num_experts=8", "eager"), ("num_experts=8", "eager+graph")]
    assert all(r["step_ms"] > 0 and r["capture_s"] == 0 and not r["graphed"] for r in rows)
    # the same seed and steps: the same run
    assert rows[0]["final_loss"] == rows[1]["final_loss"]
