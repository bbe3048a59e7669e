"""The Triton experts' arithmetic on the CPU, through Triton's interpreter (``TRITON_INTERPRET=1``):
the same kernels and custom ops the GPU runs, forward and backward, against the per-expert loop in
fp32, and the routing kernel and counting sort against the torch ops they replace. Runs where
triton is installed (the dev extra installs it); the interpreter is switched on in a subprocess
because :mod:`fulu_nas.moe.triton_moe` reads it at import. GPU timings and bf16 live in
tests/test_triton_moe.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "topk": ("topk", {}),
    "top_p": ("topk", {"top_p": 0.6, "top_k": 3}),
    "capacity": ("topk", {"capacity_factor": 0.75}),
    "gelu_bias_shared": ("topk", {"activation": "gelu", "expert_bias": True, "num_shared_experts": 1}),
    "expert_choice": ("expert_choice", {}),
    "hash": ("hash", {}),
    "idle_experts": ("topk", {"num_experts": 32}),
    "sigmoid_renormalized": ("topk", {"score_func": "sigmoid", "routed_scaling_factor": 2.5}),
    "sigmoid_raw": ("topk", {"score_func": "sigmoid", "renormalize": False, "routed_scaling_factor": 2.5}),
    "top_p_raw": ("topk", {"renormalize": False, "top_p": 0.5, "top_k": 3}),
    # the balance loss's gradients: the probabilities' (one row broadcast over the tokens) through the
    # routing kernel's backward, the logits' from the z-loss
    "aux_z_losses": ("topk", {"aux_loss_coef": 0.3, "z_loss_coef": 0.1}),
}

# Runs in the subprocess: every case's relative errors (triton vs loop) as JSON on stdout.
WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
from fulu_nas.moe import triton_moe
from fulu_nas.moe.expert_parallel import ExpertParallelMoE
from tests.helpers import make_layer

assert triton_moe.INTERPRET and triton_moe.HAS_TRITON
cases = json.loads(sys.argv[1])


def rel(a, b):
    d = (a - b).norm()
    return 0.0 if d == 0 else (d / b.norm()).item()


def run(layer, x, ids, impl, compiled=False):
    x = x.clone().requires_grad_(True)
    call = (lambda t: layer(t, token_ids=ids, impl=impl))
    if compiled:
        call = torch.compile(call, fullgraph=True)
    out, stats = call(x)
    probe = torch.linspace(-1, 1, out.numel()).view_as(out)
    ((out * probe).sum() + stats["balance_loss"]).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def compare(a, b):
    out = {"out": rel(a[0], b[0]), "dx": rel(a[1], b[1]), "params": sorted(a[2]) == sorted(b[2])}
    out.update({n: rel(a[2][n], b[2][n]) for n in b[2]})
    return out


results = {}
torch.manual_seed(0)
for name, (router, kw) in cases.items():
    args = dict(hidden_size=32, expert_ffn_size=48, num_experts=8, top_k=2)
    args.update(kw)
    layer = make_layer(router, **args).train()
    x = torch.randn(37, 32)
    ids = torch.randint(0, 100, (37,))
    results[name] = compare(run(layer, x, ids, "triton"), run(layer, x, ids, "loop"))
    with torch.no_grad():
        fast, ref = (layer(x, token_ids=ids, impl=impl)[0] for impl in ("triton", "loop"))
        results[name]["inference"] = rel(fast, ref)

layer = make_layer("topk", hidden_size=32, expert_ffn_size=48, num_experts=8, top_k=2).train()
x = torch.randn(41, 32)
results["compiled"] = compare(run(layer, x, None, "triton", compiled=True), run(layer, x, None, "loop"))

# Compiled inference of a few tokens, or of many bf16 tokens over a few experts, routes through the
# routing kernel's op (one op in the graph, where the torch ops were about ten kernels): the eager
# call's experts, order and output.
from torch._dynamo.testing import EagerAndRecordGraphs
from fulu_nas.moe import triton_routing

small = {}
# (many tokens: also top-p, sigmoid scores, scaling and the selection bias through the op)
top_p = {"top_p": 0.6, "top_k": 3, "routed_scaling_factor": 2.5}
sigmoid = {"score_func": "sigmoid", "routed_scaling_factor": 2.5}
place_max_counts = triton_routing.PLACE_MAX_COUNTS
for name, tokens, dtype, kw in (("16", 16, torch.float32, {}), ("48", 48, torch.float32, {}),
                                ("200", 200, torch.bfloat16, {}), ("200 top-p", 200, torch.bfloat16, top_p),
                                ("200 sigmoid", 200, torch.bfloat16, sigmoid),
                                ("200 argsort", 200, torch.bfloat16, {})):
    # "argsort": the block counts do not fit the counting sort, so the eager call and the op sort by
    # torch's argsort, and the op computes the inverse permutation the counting sort would write.
    triton_routing.PLACE_MAX_COUNTS = 0 if name.endswith("argsort") else place_max_counts
    layer = make_layer("topk", **{"hidden_size": 32, "expert_ffn_size": 48, "num_experts": 8, "top_k": 2} | kw)
    layer = layer.eval().to(dtype)
    layer.router.expert_bias.copy_(torch.randn(8) * 0.1 if kw else torch.zeros(8))  # the bias shifts choices
    xs = torch.randn(tokens, 32, dtype=dtype)
    with torch.no_grad():
        eager_r = layer.router(xs)
        recorded = EagerAndRecordGraphs()
        compiled_r = torch.compile(layer.router, fullgraph=True, backend=recorded)(xs)
        eager_out, eager_stats = layer(xs, impl="triton")
        torch._dynamo.reset()
        out, stats = torch.compile(lambda t: layer(t, impl="triton"), fullgraph=True)(xs)
        torch._dynamo.reset()
        eager_order = (eager_r.sorted_slots or triton_routing.sorted_slots(eager_r))[0]
    small[name] = {
        "op_in_graph": any("fulu_nas.route" in str(n.target) for g in recorded.graphs for n in g.graph.nodes),
        "experts": all(torch.equal(getattr(compiled_r, f), getattr(eager_r, f))
                       for f in ("expert_TK", "weight_TK", "active_TK")),
        "order": torch.equal(compiled_r.sorted_slots[0], eager_order),
        "out": rel(out.float(), eager_out.float()),
        "load": torch.equal(stats["tokens_per_expert"], eager_stats["tokens_per_expert"]),
        "inverse": bool(compiled_r.sorted_slots[2][compiled_r.sorted_slots[0]].equal(
            torch.arange(compiled_r.sorted_slots[0].shape[0]))),
    }
triton_routing.PLACE_MAX_COUNTS = place_max_counts
results["compiled_routing_op"] = small

# The second GEMM as torch._grouped_mm, rows in expert order, combined through the inverse
# permutation: token choice (k = 2 with idle experts, k = 1) and expert choice.
triton_moe.GROUPED_MM_SECOND = True
for name, router, kw in (("grouped_mm_second", "topk", {"num_experts": 32}),
                         ("grouped_mm_second_k1", "topk", {"top_k": 1, "renormalize": False}),
                         ("grouped_mm_second_expert_choice", "expert_choice", {})):
    args = dict(hidden_size=32, expert_ffn_size=48, num_experts=8, top_k=2)
    args.update(kw)
    layer = make_layer(router, **args).train()
    results[name] = compare(run(layer, x, None, "triton"), run(layer, x, None, "loop"))
    with torch.no_grad():  # inference: combined through the counting sort's inverse permutation
        fast, ref = (layer(x, impl=impl)[0] for impl in ("triton", "loop"))
        results[name]["inference"] = rel(fast, ref)
triton_moe.GROUPED_MM_SECOND = None

# The first GEMM as torch._grouped_mm over the gathered rows, the activation as its own pass (and the
# gathered rows reused by the backward): SwiGLU and GELU, k = 1, expert choice, compiled.
triton_moe.GROUPED_MM_FIRST = True
for name, router, kw in (("grouped_mm_first", "topk", {"num_experts": 32}),
                         ("grouped_mm_first_gelu_k1", "topk", {"top_k": 1, "activation": "gelu", "renormalize": False}),
                         ("grouped_mm_first_expert_choice", "expert_choice", {})):
    args = dict(hidden_size=32, expert_ffn_size=48, num_experts=8, top_k=2)
    args.update(kw)
    layer = make_layer(router, **args).train()
    results[name] = compare(run(layer, x, None, "triton"), run(layer, x, None, "loop"))
    with torch.no_grad():
        fast, ref = (layer(x, impl=impl)[0] for impl in ("triton", "loop"))
        results[name]["inference"] = rel(fast, ref)
layer = make_layer("topk", hidden_size=32, expert_ffn_size=48, num_experts=8, top_k=2).train()
results["grouped_mm_first_compiled"] = compare(run(layer, x, None, "triton", compiled=True),
                                               run(layer, x, None, "loop"))
triton_moe.GROUPED_MM_FIRST = None

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
layer = make_layer("topk", hidden_size=32, expert_ffn_size=48, num_experts=8, top_k=2).train()
ep = ExpertParallelMoE.from_layer(make_layer("topk", hidden_size=32, expert_ffn_size=48, num_experts=8, top_k=2))
ep.load_state_dict(layer.state_dict())
results["expert_parallel"] = compare(run(ep, x, None, "triton"), run(layer, x, None, "loop"))
dist.destroy_process_group()

# The kernels' normal CDF (the GELU) against float64.
from tests.triton_probes import normal_cdf_errors
results["normal_cdf"] = normal_cdf_errors("cpu")

# The routing kernel and the counting sort against the torch ops they replace.
from tests.helpers import ROUTE_CASES, routing_kernel_mismatches
results["routing"] = {name: routing_kernel_mismatches(*case, device="cpu", dtype=torch.float32)
                      for name, case in ROUTE_CASES.items()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def results() -> dict:
    from .helpers import free_port

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(CASES), str(free_port())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_routing_kernel_and_counting_sort_equal_the_torch_ops(results):
    """Experts, weights, top-p activity, probabilities and the counting sort's order and group ends
    equal :func:`select_experts`, the stable argsort and bincount (softmax, sigmoid with scaling, top-p,
    one token, several blocks, 128 experts, tied scores; logits given and computed in the kernel)."""
    assert results["routing"] == {name: [] for name in results["routing"]}


def test_gelu_normal_cdf_is_accurate_where_the_erf_form_cancels(results):
    """The kernels' Phi(x) (GELU = x * Phi(x)) from erfc: within 3e-5 relative of float64 over
    [-10, 10] and 1e-5 over [-6, 6], where ``0.5 * (1 + erf(x / sqrt 2))`` in fp32 loses every digit
    in the negative tail."""
    err = results["normal_cdf"]
    assert err["phi"] < 3e-5 and err["gelu"] < 1e-5, err
    assert err["phi_erf_form"] > 0.5 and err["gelu_erf_form"] > 1e-3, err


def test_compiled_inference_routes_through_the_routing_kernel(results):
    """Compiled inference of 16 and 48 tokens, and of 200 bf16 tokens over 8 experts (softmax top-2;
    top-3 with top-p; sigmoid; both scaled and with a selection bias; sorted by argsort where the
    block counts do not fit the counting sort), holds the routing op (:func:`route_op`) in its graph
    and chooses the eager call's experts and weights, in its order (with its inverse permutation),
    with its output and load."""
    assert "200 argsort" in results["compiled_routing_op"]
    for tokens, res in results["compiled_routing_op"].items():
        assert res["op_in_graph"], tokens
        assert res["experts"] and res["order"] and res["inverse"] and res["load"], (tokens, res)
        assert res["out"] < 1e-6, (tokens, res)


@pytest.mark.parametrize("name", [*CASES, "compiled", "grouped_mm_second", "grouped_mm_second_k1",
                                  "grouped_mm_second_expert_choice", "grouped_mm_first", "grouped_mm_first_gelu_k1",
                                  "grouped_mm_first_expert_choice", "grouped_mm_first_compiled",
                                  "expert_parallel"])
def test_triton_experts_equal_the_loop_forward_and_backward(results, name):
    """Output, input gradient and every parameter's gradient (router included, through the routing
    weights' gradient) of the Triton path equal the loop's in fp32."""
    res = dict(results[name])
    assert res.pop("params"), "the same parameters get gradients"
    for key, err in res.items():
        assert err < 1e-5, (name, key, err)
