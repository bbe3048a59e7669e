"""``fulu-nas bench peers``: the plain grouped_mm peer is an independent, correct MoE; the quick run
on the CPU fills every row, and says why each column it cannot fill is n/a."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fulu_nas.bench import cli as bench
from fulu_nas.bench.peers import configs as peer_configs
from fulu_nas.bench.peers import implementations, report

from .helpers import make_layer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    # The quick run checks the invariants, not speed: one thread keeps it from waiting on the other
    # core of a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_plain_grouped_mm_peer_equals_the_fp32_loop(activation):
    """The plain peer, fed the layer's routing, computes what the per-expert loop computes; with its
    own router (fp32, as the layer's) it routes the same way."""
    layer = make_layer(num_experts=8, top_k=3, activation=activation).eval()
    x = torch.randn(96, 32)
    with torch.no_grad():
        routing = layer.router(x)
        ref, _ = layer(x, impl="loop")
        out = implementations.plain_experts(x, routing.weight_TK, routing.expert_TK, layer.experts.w13_EDF2,
                                  layer.experts.w2_EFD, activation)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        plain = implementations.PlainGroupedMM(layer)
        weight_TK, expert_TK = plain.route(x)
        assert torch.equal(expert_TK, routing.expert_TK)
        torch.testing.assert_close(weight_TK, routing.weight_TK)
        torch.testing.assert_close(plain(x), ref, rtol=1e-5, atol=1e-6)


def test_plain_peer_has_gradients_like_the_layer():
    layer = make_layer(num_experts=4, activation="swiglu")
    plain = implementations.PlainGroupedMM(layer)
    x = torch.randn(40, 32)
    grad = torch.randn(40, 32)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    layer(x1, impl="loop")[0].backward(grad)
    plain(x2).backward(grad)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(plain.w13_EDF.grad, layer.experts.w13_EDF2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(plain.gate_ED.grad, layer.router.gate.weight.grad, rtol=1e-4, atol=1e-6)


class _ParallelExperts(nn.Module):
    """ScatterMoE's weight convention, in torch: (E, out, in)."""

    def __init__(self, num_experts, input_size, output_size):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, output_size, input_size))

    def apply_to(self, x_ND, expert_N):
        return torch.einsum("nd,nod->no", x_ND, self.weight[expert_N])


class _MLP(nn.Module):
    """ScatterMoE's MLP / GLUMLP semantics (``forward(x, expert_p, expert_idxs)``) without its kernels."""

    glu = False

    def __init__(self, input_size, hidden_size, num_experts, top_k, activation):
        super().__init__()
        width = 2 * hidden_size if self.glu else hidden_size
        self.experts = _ParallelExperts(num_experts, input_size, width)
        self.output_experts = _ParallelExperts(num_experts, hidden_size, input_size)
        self.top_k, self.activation = top_k, activation

    def forward(self, x, expert_p, expert_idxs):
        T, K = expert_idxs.shape
        expert_N = expert_idxs.reshape(-1)
        h = self.experts.apply_to(x.repeat_interleave(K, 0), expert_N)
        if self.glu:
            h, gates = h.chunk(2, dim=-1)
            h = self.activation(gates) * h
        else:
            h = self.activation(h)
        y = self.output_experts.apply_to(h, expert_N).view(T, K, -1)
        return (expert_p.unsqueeze(-1) * y).sum(1)


class _GLUMLP(_MLP):
    glu = True


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_scattermoe_peer_loads_our_weights_in_its_layout(activation):
    """Our (E, in, out) weights, transposed, and SwiGLU's [gate | up] reordered to ScatterMoE's
    [h | gates], give the layer's output under ScatterMoE's documented semantics."""
    layer = make_layer(num_experts=6, top_k=2, activation=activation).eval()
    peer = implementations.ScatterMoEPeer(layer, (_MLP, _GLUMLP))
    assert isinstance(peer.mlp, _GLUMLP if activation == "swiglu" else _MLP)
    x = torch.randn(50, 32)
    with torch.no_grad():
        ref, _ = layer(x, impl="loop")
        torch.testing.assert_close(peer(x), ref, rtol=1e-5, atol=1e-6)


def _run_quick(tmp_path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "peers.json"
    code = bench.main(["peers", "--device", "cpu", "--quick", "--quiet", "--rounds", "2", "--json", str(out), *extra])
    assert code == 0
    return json.loads(out.read_text()), str(out)


def _check_measured(d: dict, key: str) -> None:
    assert d["available"] and not d["failed"], (key, d["reason"])
    assert d["ms"] > 0 and math.isfinite(d["ms"]), key
    assert all(len(v) == 2 and all(ms > 0 and math.isfinite(ms) for ms in v) for v in d["rounds_ms"].values()), key
    assert d["of_dense"] > 0 and d["of_gemm"] > 0 and d["of_dense_wide"] > 0


def test_bench_peers_quick_on_cpu(tmp_path, capsys, one_thread):
    result, path = _run_quick(tmp_path)
    text = capsys.readouterr().out
    assert result["dtype"] == "torch.float32" and result["activation"] == "gelu" and result["rounds"] == 2
    assert result["complete"]
    assert result["command"] == f"fulu-nas bench peers --device cpu --quick --quiet --rounds 2 --json {path}"
    assert result["command"] in text and "torch " + torch.__version__ in text
    configs = {c["name"]: c for c in result["configs"]}
    assert list(configs) == list(peer_configs.CONFIGS)
    for name, c in configs.items():
        assert c["label"] in text
        assert len(c["shapes"]) == (2 if name == "e-scaling" else 1)
        assert c["backward"] == (name == "seed-fwd-bwd")
        for s in c["shapes"]:
            impls = s["impls"]
            for key in ("dense", "dense_wide", "gemm", "plain", "fulu"):
                _check_measured(impls[key], key)
            # The bounds' ratios are their own times over the implementation's.
            fulu = impls["fulu"]
            for ratio, bound in (("of_dense", "dense"), ("of_gemm", "gemm"), ("of_dense_wide", "dense_wide")):
                assert fulu[ratio] == pytest.approx(impls[bound]["ms"] / fulu["ms"])
            assert impls["dense"]["of_dense"] == pytest.approx(1.0)
            # An independent reference and the layer agree with the fp32 loop.
            assert impls["plain"]["rel_error"] < 1e-4 and impls["fulu"]["rel_error"] < 1e-4
            assert impls["plain"]["routing_differs_share"] == 0 and impls["fulu"]["routing_differs_share"] == 0
            for key, reason in (("hf", "SwiGLU"), ("scattermoe", "needs CUDA"), ("fulu_best", "needs CUDA")):
                assert not impls[key]["available"] and not impls[key]["failed"] and impls[key]["ms"] is None
                assert reason in impls[key]["reason"]
            assert s["compiled_routing"] is None  # no --cpu-compile
            for key in ("dense", "dense_wide"):
                assert list(impls[key]["ms_by_variant"]) == ["eager"]  # no CUDA graphs on the CPU
    assert configs["seed-latency"]["shapes"][0]["shape"]["tokens"] == 16
    ratio = configs["e-scaling"]["ratio"]
    assert ratio["plain"] > 0 and ratio["fulu"] > 0 and ratio["hf"] is None
    assert "n/a" in text and "Mixtral's experts are SwiGLU" in text and "needs CUDA" in text


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_bench_peers_fills_the_mixtral_column_with_swiglu(tmp_path, one_thread, experts):
    """With batched_mm experts the forward + backward row failed the column: the reference routing its
    accuracy check feeds them was made in inference mode, and batched_mm saves it for the backward."""
    result, _ = _run_quick(tmp_path, "--activation", "swiglu", "--configs", "seed-fwd", "seed-fwd-bwd",
                           *(["--hf-experts", experts] if experts != "grouped_mm" else []))
    assert [c["name"] for c in result["configs"]] == ["seed-fwd", "seed-fwd-bwd"]
    for c in result["configs"]:
        impls = c["shapes"][0]["impls"]
        _check_measured(impls["hf"], "hf")
        # fp32 on the CPU: its experts on the reference routing match the loop, its own router agrees.
        assert impls["hf"]["rel_error"] < 1e-4 and impls["hf"]["routing_differs_share"] == 0
        assert any(f"experts_implementation={experts}" in note for note in impls["hf"]["notes"])
        assert impls["plain"]["rel_error"] < 1e-4 and impls["fulu"]["rel_error"] < 1e-4


# Every package fulu-nas installs beside torch (and the peers' packages): a GPU host may have torch alone.
NOT_TORCH = ("transformers", "scattermoe", "optuna", "hydra", "omegaconf", "mlflow", "tqdm", "rich", "yaml", "numpy",
             "scipy", "plotly", "safetensors", "sqlalchemy", "psycopg", "ninja")


def bench_with_torch_alone(args: list[str]) -> subprocess.CompletedProcess:
    """``fulu-nas bench ARGS`` in a process where importing any package but torch fails."""
    code = (
        "import builtins, sys, warnings\n"
        "warnings.filterwarnings('ignore', 'Failed to initialize NumPy')  # numpy is there, but blocked\n"
        "real = builtins.__import__\n"
        "def guard(name, globals=None, locals=None, fromlist=(), level=0):\n"
        f"    if level == 0 and name.split('.')[0] in {set(NOT_TORCH)!r}:  # not sympy's own .numpy\n"
        "        raise ModuleNotFoundError('blocked ' + name, name=name)\n"
        "    return real(name, globals, locals, fromlist, level)\n"
        "builtins.__import__ = guard\n"
        "import torch; torch.set_num_threads(1)\n"
        "from fulu_nas.bench import cli\n"
        f"sys.exit(cli.main({args!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_bench_peers_imports_and_runs_without_transformers(tmp_path):
    """The module imports with torch alone; without transformers the Mixtral column is n/a, saying why."""
    run = bench_with_torch_alone(["peers", "--device", "cpu", "--quick", "--quiet", "--rounds", "1", "--activation",
                                  "swiglu", "--configs", "seed-latency", "--json", str(tmp_path / "p.json")])
    assert run.returncode == 0, run.stderr
    hf = json.loads((tmp_path / "p.json").read_text())["configs"][0]["shapes"][0]["impls"]["hf"]
    assert hf["reason"].startswith("transformers is not installed") and hf["ms"] is None


def test_the_layer_benchmark_runs_with_torch_alone_and_the_others_name_what_they_need(tmp_path):
    """Every bench command failed with tqdm's ModuleNotFoundError (a traceback, exit 1) where torch was the only
    package: the command line imported the search's modules to list the table and training commands."""
    run = bench_with_torch_alone(["layer", "--tokens", "4", "--hidden", "32", "--experts", "4", "--ffn", "64",
                                  "--min-run-time", "0.01", "--rounds", "1", "--json", str(tmp_path / "l.json")])
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "l.json").read_text())
    assert bench_with_torch_alone(["nas-table", "--help"]).returncode == 0
    for command in (["train-step"], ["nas-table", "--out", str(tmp_path / "t.csv")]):
        run = bench_with_torch_alone(command)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.startswith(f"error: fulu-nas bench {command[0]} needs the Python package "), run.stderr
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize("scale", ["0", "inf", "nan"])  # inf was an OverflowError, nan "cannot convert"
def test_bench_peers_refuses_a_bad_tokens_scale(scale, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["peers", "--device", "cpu", "--quick", "--tokens-scale", scale])
    assert exit_info.value.code == 2
    assert "--tokens-scale: must be a finite number above 0" in capsys.readouterr().err


def test_tokens_scale_shrinks_the_throughput_rows_only():
    configs = peer_configs.selected_configs(list(peer_configs.CONFIGS), quick=False, tokens_scale=0.25)
    assert configs["seed-fwd"].shapes[0].tokens == 8192 and configs["seed-latency"].shapes[0].tokens == 16
    assert [s.experts for s in configs["e-scaling"].shapes] == [256, 8]
    assert configs["e-scaling"].label == "E-scaling E=256 / E=8"


def test_cells_name_the_faster_variant_and_the_ratios():
    d = {"ms": 1.0, "ms_by_variant": {"eager": 2.0, "graph": 1.0}, "variant": "graph", "of_dense": 0.5,
         "of_gemm": 0.25, "of_dense_wide": 0.4, "failed": False}
    assert report.time_cell(d) == "1.000 ms graph (0.50/0.25/0.40)"
    # the best path compiled on the CPU (--cpu-compile), under a header that promises a CUDA graph
    assert report.time_cell({**d, "ms_by_variant": {"compiled": 1.0}, "variant": "compiled"}) == (
        "1.000 ms compiled (0.50/0.25/0.40)")
    assert report.time_cell({**d, "ms_by_variant": {"eager": 1.0}, "variant": "eager"}) == "1.000 ms (0.50/0.25/0.40)"
    assert report.time_cell({"ms": None, "failed": False}) == "n/a"
    assert report.time_cell({"ms": None, "failed": True}) == "FAILED"



def test_an_e_scaling_cell_whose_second_shape_failed_says_failed():
    """It looked at the first shape alone: measured there and failed at the second, the cell said n/a."""
    from fulu_nas.bench.peers.configs import IMPLS

    def impl(failed: bool) -> dict:
        return {"ms": None if failed else 1.0, "failed": failed,
                "reason": "failed: RuntimeError: x" if failed else None, "rel_error": None, "notes": [],
                "ms_by_variant": {} if failed else {"eager": 1.0}, "variant": "eager",
                "of_dense": 1.0, "of_gemm": 1.0, "of_dense_wide": 1.0}

    shapes = [{"shape": {"experts": e}, "compiled_routing": None, "eager_routing_differs_from_reference_share": None,
               "impls": {k: impl(failed=e == 8 and k == "plain") for k in IMPLS}} for e in (256, 8)]
    ratio = {k: None if k == "plain" else 1.0 for k in IMPLS}
    text = report.format_tables([{"label": "E-scaling E=256 / E=8", "ratio": ratio, "shapes": shapes}])
    row = next(line for line in text.splitlines() if line.startswith("| E-scaling"))
    assert row.split("|")[1 + 1 + list(IMPLS).index("plain")].strip() == "FAILED", row

@pytest.mark.parametrize("extra,words", [
    (["--hf-experts", "eager"], "--hf-experts: the Mixtral column needs --activation swiglu"),
    (["--configs", "seed-latency", "--tokens-scale", "0.5"], "--tokens-scale: no throughput row"),
    (["--peers-path", "/nonexistent"], "--peers-path: /nonexistent is not a folder")])
def test_bench_peers_refuses_options_it_would_ignore(extra, words, capsys):
    """Refused, not accepted without effect."""
    assert bench.main(["peers", "--device", "cpu", "--quick", "--quiet", *extra]) == 2
    assert words in capsys.readouterr().err


def test_bench_peers_refuses_cpu_compile_on_cuda(monkeypatch, capsys):
    """On CUDA the compiled layer is timed in a graph anyway: --cpu-compile did nothing (item 18)."""
    from fulu_nas.bench.peers import command

    monkeypatch.setattr(command, "bench_device", lambda name: torch.device("cuda"))
    assert bench.main(["peers", "--quick", "--quiet", "--cpu-compile"]) == 2
    assert "--cpu-compile: for the CPU" in capsys.readouterr().err
