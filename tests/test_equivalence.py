"""The grouped-GEMM path (and the sorted path) compute what the per-expert loop computes:
outputs, input gradients and parameter gradients, for every router and option."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fulu_nas.moe import ROUTERS

from .helpers import make_layer

TOL = dict(rtol=1e-5, atol=1e-5)

OPTIONS = {
    "plain": {},
    "capacity": {"capacity_factor": 0.75},
    "top_p": {"top_p": 0.55, "top_k": 3},
    "sigmoid_noscale": {"score_func": "sigmoid", "renormalize": False, "routed_scaling_factor": 2.5},
    "shared_gelu_bias": {"num_shared_experts": 2, "shared_expert_gate": True, "activation": "gelu",
                         "expert_bias": True},
}
APPLIES = {
    "top_p": {"topk", "hierarchical", "attention"},
    "sigmoid_noscale": {"topk", "hierarchical", "attention"},
}


def run(layer, x, impl, token_ids=None):
    """Output, stats and all gradients for a fixed upstream gradient."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out, stats = layer(x, token_ids=token_ids, impl=impl)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), stats, x.grad, grads


def assert_same(layer, x, token_ids=None, impls=("grouped", "sorted")):
    ref_out, ref_stats, ref_gx, ref_grads = run(layer, x, "loop", token_ids)
    for impl in impls:
        out, stats, gx, grads = run(layer, x, impl, token_ids)
        torch.testing.assert_close(out, ref_out, **TOL, msg=f"{impl} output")
        torch.testing.assert_close(gx, ref_gx, **TOL, msg=f"{impl} input gradient")
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=f"{impl} grad {name}")
        for key in ("tokens_per_expert", "dropped_share", "load_balance"):
            torch.testing.assert_close(stats[key], ref_stats[key], msg=key)


CASES = [(r, o) for o in OPTIONS for r in ROUTERS if r in APPLIES.get(o, ROUTERS)]


@pytest.mark.parametrize(("router", "option"), CASES)
def test_grouped_equals_loop(router, option):
    layer = make_layer(router, **OPTIONS[option])
    x = torch.randn(3, 11, 32)
    ids = torch.randint(0, 1000, (3, 11)) if router == "hash" else None
    assert_same(layer, x, ids)


def test_experts_without_tokens_get_zero_gradient(router):
    # 32 experts, 3 tokens: most experts receive nothing (expert choice: capacity 1 each).
    layer = make_layer(router, num_experts=32, top_k=1, capacity_factor=0.1 if router == "expert_choice" else None,
                       **({"hierarchy_depth": 2} if router == "hierarchical" else {}))
    x = torch.randn(1, 3, 32)
    assert_same(layer, x)
    out, stats, _, grads = run(layer, x, "grouped")
    assert torch.isfinite(out).all()
    idle = stats["tokens_per_expert"] == 0
    if router != "expert_choice":
        assert idle.sum() >= 29
        assert torch.all(grads["experts.w13_EDF2"][idle] == 0)
        assert torch.all(grads["experts.w2_EFD"][idle] == 0)


@settings(max_examples=12, deadline=None)
@given(
    router=st.sampled_from(ROUTERS),
    batch=st.integers(1, 3),
    seq=st.integers(1, 17),
    experts=st.sampled_from([1, 2, 4, 6, 8, 16]),
    top_k=st.integers(1, 4),
    hidden=st.sampled_from([8, 16, 40]),
    ffn=st.sampled_from([8, 24, 64]),
    activation=st.sampled_from(["gelu", "swiglu"]),
)
def test_grouped_equals_loop_random_shapes(router, batch, seq, experts, top_k, hidden, ffn, activation):
    top_k = min(top_k, experts)
    extra = {}
    if router == "hierarchical":
        if experts < 4:
            router = "topk"
        else:
            extra["hierarchy_depth"] = 2
    if router == "attention":
        extra.update(attention_heads=2 if hidden % 2 == 0 else 1)
    layer = make_layer(router, num_experts=experts, top_k=top_k, hidden_size=hidden,
                       expert_ffn_size=ffn, activation=activation, **extra)
    assert_same(layer, torch.randn(batch, seq, hidden), impls=("grouped",))


def test_two_dimensional_input_is_tokens_by_hidden():
    layer = make_layer("topk")
    x = torch.randn(5, 32)
    out, _ = layer(x)
    out3, _ = layer(x[None])
    assert out.shape == (5, 32)
    torch.testing.assert_close(out, out3[0])


def test_frozen_experts_still_train_the_router():
    # The activation's in-place fast path must not run when only the routing weights need
    # gradients (experts frozen, router trained).
    layer = make_layer("topk")
    layer.experts.requires_grad_(False)
    out, _ = layer(torch.randn(2, 7, 32))
    out.square().sum().backward()
    assert layer.router.gate.weight.grad is not None and layer.router.gate.weight.grad.abs().sum() > 0


def test_without_stats_the_output_is_the_same(router):
    layer = make_layer(router)
    x = torch.randn(2, 9, 32)
    out, stats = layer(x, with_stats=False)
    assert stats == {}
    torch.testing.assert_close(out, layer(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("router", ROUTERS)
def test_under_autocast_the_experts_run_in_its_dtype_and_the_router_in_the_inputs(router):
    """As nn.Linear does under autocast: a trainer's fp32 residual stream reaches the layer as fp32, and the
    experts must run in bf16 (on CUDA, fp32 grouped GEMMs sync with the host), while the routing decisions
    stay those of the fp32 input. Gradients reach the fp32 parameters."""
    layer = make_layer(router, num_shared_experts=1)
    x = torch.randn(2, 24, layer.cfg.hidden_size)
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        reference, ref_stats = layer(x, token_ids=ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, stats = layer(x, token_ids=ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(stats["tokens_per_expert"], ref_stats["tokens_per_expert"])  # same routing
    torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.experts.parameters())


@pytest.mark.parametrize("router", ROUTERS)
def test_under_autocast_the_router_computes_in_the_inputs_precision(router):
    """Autocast lowers a linear layer's product to bf16 even for fp32 operands; the router's products
    must not follow it: at a few thousand tokens bf16 logits (about 2^-8 relative) already send a few
    percent of the tokens to other experts. Routing under autocast is the fp32 routing, to the bit."""
    layer = make_layer(router, num_experts=16, top_k=2)
    x = torch.randn(4096, layer.cfg.hidden_size)
    ids = torch.randint(0, 1000, (4096,))
    with torch.no_grad():
        _, reference = layer._route(x, ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, routed = layer._route(x, ids)
    for field in ("expert_TK", "weight_TK", "token_N", "weight_N", "probs_TE", "logits_TE"):
        want, got = getattr(reference, field), getattr(routed, field)
        assert (want is None) == (got is None), field
        if want is not None:
            assert got.dtype == want.dtype, field
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=field)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("given_inverse", [False, True])
def test_token_rows_and_sum_slots_backward_as_autograd_indexing(k, given_inverse):
    """The dispatch to sorted rows and the combine back to tokens take gathers in their backwards
    (no accumulating scatter): the same values and gradients as autograd through plain indexing, in
    float64 by gradcheck, and bf16 gradients summed in fp32."""
    from fulu_nas.moe.experts import _SumSlots, _TokenRows, inverse_permutation, sum_slots, token_rows

    T, D = 7, 5
    order = torch.randperm(T * k, generator=torch.Generator().manual_seed(k))
    inverse = inverse_permutation(order) if given_inverse else None
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(T * k, D, dtype=torch.float64, requires_grad=True)
    assert type(token_rows(x, order, k, inverse).grad_fn).__name__ == _TokenRows.__name__ + "Backward"
    assert type(sum_slots(rows, order, k, inverse).grad_fn).__name__ == _SumSlots.__name__ + "Backward"
    torch.autograd.gradcheck(lambda t: token_rows(t, order, k, inverse), (x,))
    torch.autograd.gradcheck(lambda t: sum_slots(t, order, k, inverse), (rows,))

    def plain_sum(t):  # each token's rows, by autograd's own indexing
        return torch.zeros(T, D, dtype=t.dtype).index_add(0, order // k, t)

    upstream_rows, upstream_tokens = torch.randn(T * k, D, dtype=torch.float64), torch.randn(T, D, dtype=torch.float64)
    cases = ((lambda t: token_rows(t, order, k, inverse), lambda t: t[order // k], x, upstream_rows),
             (lambda t: sum_slots(t, order, k, inverse), plain_sum, rows, upstream_tokens))
    for fast, plain, inp, up in cases:
        (g_fast,) = torch.autograd.grad(fast(inp), inp, up)
        (g_plain,) = torch.autograd.grad(plain(inp), inp, up)
        torch.testing.assert_close(fast(inp), plain(inp))
        torch.testing.assert_close(g_fast, g_plain)
    x16 = x.detach().bfloat16().requires_grad_(True)
    (g16,) = torch.autograd.grad(token_rows(x16, order, k, inverse), x16, upstream_rows.bfloat16())
    assert g16.dtype == torch.bfloat16
    expected = plain_sum(upstream_rows.bfloat16().float()).bfloat16()  # fp32 sums, rounded once
    assert torch.equal(g16, expected)
    with torch.no_grad():  # without a gradient: plain indexing, no autograd node
        assert token_rows(x, order, k).grad_fn is None and sum_slots(rows, order, k).grad_fn is None
