"""The eager routing fast path's decisions and plumbing on the CPU.

The kernels themselves are checked against the torch ops on CUDA (tests/test_triton_moe.py) and in
Triton's interpreter (tests/test_triton_interpreter.py). Here: which logits mode and tile each
shape gets, and that the routers and the layer use what the kernels return (the kernel's choice,
its block counts or its finished sort; with a gradient, the logits' gradient from its backward) exactly
as the torch path would. The launchers are replaced by torch implementations of their contract.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fulu_nas.moe import triton_routing
from fulu_nas.moe.experts import inverse_permutation, sort_by_expert
from fulu_nas.moe.routing import Routing, SplitLogits, normalised_probs, scores_from_logits, select_experts

from .helpers import make_layer


@pytest.mark.parametrize(("tokens", "experts", "dtype", "mode"), [
    (16, 8, torch.bfloat16, 1), (16, 32, torch.float32, 1), (64, 8, torch.float32, 1), (17, 8, torch.bfloat16, 2),
    (1, 128, torch.bfloat16, 2), (16, 64, torch.float32, 0), (65, 8, torch.bfloat16, 2),
    (32768, 8, torch.bfloat16, 2), (32768, 16, torch.bfloat16, 2), (32768, 32, torch.bfloat16, 2),
    (4096, 48, torch.bfloat16, 2), (32768, 128, torch.bfloat16, 2), (16384, 256, torch.bfloat16, 2),
    (8192, 256, torch.bfloat16, 2), (16384, 128, torch.bfloat16, 2), (16384, 200, torch.bfloat16, 2),
    (16385, 256, torch.bfloat16, 0), (32768, 256, torch.bfloat16, 0), (2**20, 32, torch.bfloat16, 2),
    (65, 8, torch.float32, 0), (32768, 257, torch.bfloat16, 0), (16, 300, torch.float32, 0)])
def test_logits_mode_and_tiles_follow_the_shape(tokens, experts, dtype, mode):
    """fp32 accuracy for up to 16 tokens and 32 experts (any dtype; fp16 and fp32 up to 64 tokens), 16
    tokens a program; the bf16 split on tensor cores (at least 16 rows a program) for bf16 input up
    to 256 experts (past 32 experts up to 2^22 tokens x experts); else the logits are read. A
    compiled call routes through the kernel's op exactly where the kernel computes the logits and
    the call has at most 64 tokens, or at most 32 experts and 128 experts x slots."""
    x = torch.empty(tokens, 32, dtype=dtype)
    assert triton_routing.logits_in_kernel(x, experts) == mode
    e_pow2 = max(16, 1 << (experts - 1).bit_length())
    for k in (1, 2, 4, 8):
        block_t, block_d, warps, stages = triton_routing._route_block(tokens, experts, mode, k)
        assert block_t >= 1 and block_t & (block_t - 1) == 0 and warps in (1, 2, 4, 8) and stages >= 1
        if mode == 1:
            assert block_t == 16 and block_d % 64 == 0 and e_pow2 <= 32
        if mode == 2:
            assert block_t >= 16 and block_d == 64
            wide = experts > 64 and tokens >= triton_routing.SPLIT_LOGITS_WIDE_TILE_MIN_TOKENS
            wider = wide and tokens >= triton_routing.SPLIT_LOGITS_WIDER_TILE_MIN_TOKENS and e_pow2 == 128
            eight_warps = (e_pow2 == 256 and k >= 8
                           and tokens >= triton_routing.SPLIT_LOGITS_WIDER_TILE_MIN_TOKENS)
            if wider and k <= 2:
                assert (block_t, warps, stages) == (64, 4, 2), k
            elif wider and k >= 8:
                assert (block_t, warps, stages) == (32, 4, 3), k
            elif eight_warps:
                assert (block_t, warps, stages) == (32, 8, 3), k
            else:
                assert (block_t, warps, stages) == ((32, 4, 2) if wide else (block_t, 4, 3)), k
        if mode == 0:
            assert block_t * e_pow2 <= 2048
    with pytest.MonkeyPatch.context() as m:
        m.setattr(triton_routing, "route_usable", lambda *args: True)
        for k in (1, 2, 4, 8):
            few = experts <= 32 and experts * k <= 128
            assert triton_routing.route_op_applies(x, k, experts) == (mode > 0 and (tokens <= 64 or few)), k


def test_only_cuda_or_the_interpreter_routes_by_kernel():
    assert not triton_routing.route_usable(torch.zeros(4, 32), 2, 8)


def test_the_counting_sort_runs_while_the_counts_stay_small():
    assert triton_routing.place_usable(torch.zeros(512, 8, dtype=torch.int32), 128)  # seed, 32,768 tokens
    assert not triton_routing.place_usable(torch.zeros(2048, 128, dtype=torch.int32), 128)  # fine-grained


def test_the_counting_sort_runs_while_its_ranking_tile_fits_in_shared_memory():
    """A program ranks its slots by a cumulative sum over a (slots x expert lanes) tile in shared
    memory: 256 slots of 256 experts asked the H200 for more than a block has, so top-16 of 256
    experts sorts by torch's argsort, where top-8 (128 slots a block) still counts."""
    few_blocks = torch.zeros(64, 256, dtype=torch.int32)
    assert triton_routing.place_usable(few_blocks, 16 * 8)
    assert not triton_routing.place_usable(few_blocks, 16 * 16)
    assert triton_routing.place_usable(torch.zeros(4, 128, dtype=torch.int32), 32 * 8)
    assert triton_routing.place_tile_fits(16 * 2, 8) and not triton_routing.place_tile_fits(16 * 16, 256)


def torch_route(logits_TE, x_TD, gate_ED, bias_E, k, score_func, renormalize, scaling, top_p):
    """:func:`triton_routing.launch_route`'s contract by torch ops (16 tokens a block)."""
    T, E = x_TD.shape[0], bias_E.shape[0]
    if logits_TE is None:
        with torch.no_grad():  # the kernel's output carries no gradient
            logits_TE = F.linear(x_TD.float(), gate_ED.float())  # as router_logits on the CPU
    scores = scores_from_logits(logits_TE, score_func)
    expert, weight, active = select_experts(scores, scores + bias_E, k, renormalize=renormalize,
                                            scaling=scaling, top_p=top_p)
    rows = 16 * k
    flat = expert.reshape(-1)
    counts = torch.stack([torch.bincount(block, minlength=E) for block in flat.split(rows)]).int()
    one_block = T <= 16
    sorted_slots = torch_place(flat, counts, rows) if one_block else None
    return Routing(expert_TK=expert, weight_TK=weight.detach(), active_TK=active,
                   probs_TE=normalised_probs(scores, score_func).detach(), logits_TE=logits_TE,
                   counts_BE=counts, rows_per_block=rows, sorted_slots=sorted_slots)


def torch_route_backward(logits_TE, expert_TK, active_TK, grad_weight_TK, grad_probs_TE, sigmoid, renormalize,
                         scaling):
    """:func:`triton_routing.launch_route_backward`'s contract: autograd through the torch ops of the
    selected weights and the probabilities."""
    score_func = "sigmoid" if sigmoid else "softmax"
    with torch.enable_grad():
        logits = logits_TE.detach().requires_grad_(True)
        scores = scores_from_logits(logits, score_func)
        weight = scores.gather(-1, expert_TK) * active_TK
        if renormalize:
            weight = weight / weight.sum(-1, keepdim=True).clamp_min(1e-20)
        outputs = [(weight * scaling, grad_weight_TK), (normalised_probs(scores, score_func), grad_probs_TE)]
        outs, grads = zip(*[(o, g) for o, g in outputs if g is not None], strict=True)
        return torch.autograd.grad(outs, logits, grads)[0]


def torch_place(expert_N, counts_BE, rows_per_block):
    E = counts_BE.shape[1]
    order_N = sort_by_expert(expert_N, E)
    return order_N, expert_N.bincount(minlength=E).cumsum(0).int(), inverse_permutation(order_N)


def forward_backward(layer, x):
    x = x.clone().requires_grad_(True)
    out, stats = layer(x)
    probe = torch.linspace(-1, 1, out.numel()).view_as(out)
    ((out * probe).sum() + stats["balance_loss"]).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads, stats["tokens_per_expert"].detach(), stats["dropped_share"].detach()


@pytest.mark.parametrize("tokens", [8, 100])
@pytest.mark.parametrize(("router", "options"), [
    ("topk", {}), ("topk", {"top_p": 0.6, "top_k": 3}), ("topk", {"capacity_factor": 0.75}),
    ("topk", {"score_func": "sigmoid", "renormalize": False, "routed_scaling_factor": 2.5}),
    ("topk", {"activation": "gelu", "expert_bias": True, "num_shared_experts": 1}), ("attention", {})])
def test_the_layer_uses_what_the_routing_kernel_returns(monkeypatch, router, options, tokens):
    """Through the kernel path (its finished sort for one block, the counting sort from its block
    counts for more; capacity and expert biases read the sorted ids), inference and training give
    the torch path's output, gradients and statistics."""
    layer = make_layer(router, **options)
    x = torch.randn(tokens, 32)
    calls = []

    def expected():
        layer.eval()
        with torch.no_grad():
            inference = layer(x)[0]
        layer.train()
        return inference, forward_backward(layer, x)

    want = expected()
    monkeypatch.setattr(triton_routing, "route_usable", lambda *args: True)
    monkeypatch.setattr(triton_routing, "launch_route", lambda *args: calls.append("route") or torch_route(*args))
    monkeypatch.setattr(triton_routing, "launch_place", lambda *args: calls.append("place") or torch_place(*args))
    monkeypatch.setattr(triton_routing, "launch_route_backward",
                        lambda *args: calls.append("backward") or torch_route_backward(*args))
    got = expected()
    assert calls.count("route") == 2 and calls.count("backward") == 1
    assert ("place" in calls) == (tokens > 16)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [8, 100])
@pytest.mark.parametrize("options", [{}, {"score_func": "sigmoid", "renormalize": False, "routed_scaling_factor": 2.5},
                                     {"top_p": 0.6, "top_k": 3, "activation": "gelu"}])
def test_bf16_training_takes_the_kernels_logits_and_their_gradient(monkeypatch, options, tokens):
    """bf16 training lets the routing kernel compute the logits too: its forward equals the torch
    path's (the same fp32 logits), and the gradients of the input, the gate (with the z-loss's part
    of it) and the experts match the torch path's within bf16 rounding of the logits' gradient."""
    layer = make_layer("topk", z_loss_coef=1e-2, **options).to(torch.bfloat16)
    x = torch.randn(tokens, 32).to(torch.bfloat16)
    calls = []

    def run():
        x_in = x.clone().requires_grad_(True)
        out, stats = layer(x_in)
        probe = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
        ((out * probe).float().sum() + stats["balance_loss"]).backward()
        grads = {n: p.grad.float().clone() for n, p in layer.named_parameters() if p.grad is not None}
        layer.zero_grad(set_to_none=True)
        return out.detach(), x_in.grad.float(), grads

    layer.train()
    want = run()
    monkeypatch.setattr(triton_routing, "route_usable", lambda *args: True)
    monkeypatch.setattr(triton_routing, "launch_route",
                        lambda *args: calls.append("route" if args[0] is not None else "route+logits")
                        or torch_route(*args))
    monkeypatch.setattr(triton_routing, "launch_place", torch_place)
    monkeypatch.setattr(triton_routing, "launch_route_backward", torch_route_backward)
    got = run()
    assert calls == ["route+logits"]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=2e-3)
    assert got[2].keys() == want[2].keys() and "router.gate.weight" in got[2]
    for name, g in got[2].items():
        assert (g - want[2][name]).norm() <= 1e-2 * want[2][name].norm(), name


def test_split_logits_and_their_gradient_match_the_fp32_gemm():
    """:class:`SplitLogits` (what bf16 training on CUDA takes for the router's logits, shared with the
    kernel's logits): the fp32 GEMM's logits to ~2^-16 of the weight, and its gradients within bf16
    rounding of the logits' gradient; the weight's gradient stays fp32. On the CPU its GEMMs run in
    fp32 on the same bf16-rounded operands."""
    torch.manual_seed(0)
    x = torch.randn(300, 48).to(torch.bfloat16)
    w = torch.randn(12, 48) * 0.1
    probe = torch.randn(300, 12)

    def run(split: bool):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logits = SplitLogits.apply(xi, wi) if split else F.linear(xi.float(), wi)
        (logits * probe).sum().backward()
        return logits.detach(), xi.grad, wi.grad

    (lg, dx, dw), (ref_lg, ref_dx, ref_dw) = run(True), run(False)
    assert dw.dtype == torch.float32 and dx.dtype == torch.bfloat16
    assert (lg - ref_lg).norm() <= 1e-5 * ref_lg.norm()
    assert (dx.float() - ref_dx.float()).norm() <= 1e-2 * ref_dx.float().norm()
    assert 0 < (dw - ref_dw).norm() <= 1e-2 * ref_dw.norm()  # the logits' gradient was rounded to bf16


def test_routing_benchmark_swaps_in_the_tiles_before_the_wide_ones():
    """benchmarks/routing_kernel.py times the rule against the 16-token tiles through a stand-in
    for ``_route_block`` with its signature: the stand-in gives the rule's tiles below 8,192 tokens."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "routing_kernel.py"
    spec = importlib.util.spec_from_file_location("routing_kernel_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for tokens, experts, k in ((32768, 128, 2), (16384, 128, 8), (8192, 256, 8)):
        assert bench.narrow_tiles(tokens, experts, 2, k) == triton_routing._route_block(2048, experts, 2, k)
        assert bench.narrow_tiles(tokens, experts, 2, k)[0] == 16
        assert bench.RULE(tokens, experts, 2, k) == triton_routing._route_block(tokens, experts, 2, k)
