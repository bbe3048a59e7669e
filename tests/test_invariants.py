"""Invariants of each router: capacity, expert-choice capacity, hierarchical group limits,
top-p mass, hash determinism, causal attention context, jitter only in training."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import make_layer, torch_threads


@settings(max_examples=15, deadline=None)
@given(tokens=st.integers(1, 40), experts=st.sampled_from([2, 4, 8]), top_k=st.integers(1, 2),
       factor=st.sampled_from([0.25, 0.5, 1.0, 1.5]), router=st.sampled_from(["topk", "hash", "attention"]))
def test_token_choice_capacity_is_never_exceeded(tokens, experts, top_k, factor, router):
    layer = make_layer(router, num_experts=experts, top_k=top_k, capacity_factor=factor)
    _, stats = layer(torch.randn(tokens, 32))
    capacity = math.ceil(factor * tokens * top_k / experts)
    assert stats["tokens_per_expert"].max() <= capacity
    assigned = stats["tokens_per_expert"].sum()
    torch.testing.assert_close(stats["dropped_share"], 1 - assigned / (tokens * top_k))


@pytest.mark.parametrize(("factor", "tokens"), [(None, 24), (1.0, 24), (0.5, 7), (3.0, 5)])
def test_expert_choice_takes_exactly_capacity_distinct_tokens(factor, tokens):
    layer = make_layer("expert_choice", capacity_factor=factor, num_experts=4, top_k=2)
    x = torch.randn(tokens, 32)
    r = layer.router(x)
    expected = min(tokens, math.ceil((factor if factor is not None else 2) * tokens / 4))
    assert r.token_EC.shape == (4, expected)
    for e in range(4):
        assert len(set(r.token_EC[e].tolist())) == expected
        # the chosen tokens are the expert's best by probability
        best = r.probs_TE[:, e].topk(expected).values
        torch.testing.assert_close(r.weight_EC[e], best)


def test_expert_choice_token_may_get_zero_or_several_experts():
    layer = make_layer("expert_choice", num_experts=4, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, 0] = torch.tensor([5.0, 5, -5, -5])
    x = torch.zeros(8, 32)
    x[:, 0] = torch.tensor([2.0, 0, 0, 0, 0, 0, 0, -2])
    r = layer.router(x)
    per_token = torch.bincount(r.token_EC.flatten(), minlength=8)
    assert per_token[0] == 2 and per_token[7] == 2  # wanted by two experts each
    assert per_token.min() == 0
    _, stats = layer(x)
    torch.testing.assert_close(stats["dropped_share"], (per_token == 0).float().mean())


@pytest.mark.parametrize(("experts", "depth", "groups", "keep", "top_k"),
                         [(16, 2, (4,), (2,), 3), (64, 3, (4, 4), (2, 3), 4), (8, 2, (), (), 2)])
def test_hierarchical_selection_stays_inside_kept_groups(experts, depth, groups, keep, top_k):
    layer = make_layer("hierarchical", num_experts=experts, hierarchy_depth=depth, hierarchy_groups=groups,
                       hierarchy_topk_groups=keep, top_k=top_k)
    cfg = layer.cfg
    r = layer.router(torch.randn(50, 32))
    nodes = 1
    for g, kept in zip(cfg.hierarchy_groups, cfg.hierarchy_topk_groups, strict=True):
        nodes *= g
        node_of_choice = r.expert_TK // (experts // nodes)
        for row in node_of_choice:
            assert len(set(row.tolist())) <= kept
    assert torch.all(r.expert_TK.sort(-1).values.diff(dim=-1) > 0)  # k distinct experts


def test_hierarchical_groups_are_derived_and_kept_groups_hold_top_k():
    cfg = make_layer("hierarchical", num_experts=64, hierarchy_depth=3, top_k=8).cfg
    assert cfg.hierarchy_groups == (4, 4)
    nodes, leaves = 16, 4
    assert cfg.hierarchy_topk_groups[-1] * leaves >= 8 and nodes >= cfg.hierarchy_topk_groups[-1]


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9, 1.0])
def test_top_p_takes_the_fewest_experts_reaching_the_mass(p):
    layer = make_layer("topk", num_experts=8, top_k=4, top_p=p, renormalize=False)
    x = torch.randn(64, 32) * 3
    r = layer.router(x)
    probs = r.probs_TE
    for t in range(64):
        active = r.active_TK[t]
        n = int(active.sum())
        assert active[:n].all() and not active[n:].any()  # active slots come first
        sorted_p = probs[t].sort(descending=True).values
        mass = sorted_p[:n].sum()
        assert mass >= p - 1e-6 or n == 4  # reaches p, or all k_max slots are used
        assert n == 1 or sorted_p[: n - 1].sum() < p  # one fewer would not reach p
        assert torch.all(r.weight_TK[t][~active] == 0)
        torch.testing.assert_close(r.weight_TK[t][active].sum(), mass)


def test_hash_routing_is_fixed_by_token_id():
    layer = make_layer("hash", num_experts=8, top_k=2)
    ids = torch.randint(0, 50_000, (4, 16))
    a = layer.router(torch.randn(64, 32), token_ids=ids)
    b = layer.router(torch.randn(64, 32), token_ids=ids)
    assert torch.equal(a.expert_TK, b.expert_TK)  # hidden states do not matter
    assert torch.all(a.expert_TK[:, 0] != a.expert_TK[:, 1])
    assert sum(p.numel() for p in layer.router.parameters()) == 0
    other = make_layer("hash", num_experts=8, top_k=2, seed=99)  # construction seed is irrelevant
    assert torch.equal(other.router(torch.randn(64, 32), token_ids=ids).expert_TK, a.expert_TK)
    same_id = layer.router(torch.randn(3, 32), token_ids=torch.tensor([7, 7, 7]))
    assert (same_id.expert_TK == same_id.expert_TK[0]).all()


def test_hash_fallback_without_ids_is_deterministic_and_spreads_load():
    layer = make_layer("hash", num_experts=8, top_k=1)
    x = torch.randn(2000, 32)
    a = layer.router(x)
    b = make_layer("hash", num_experts=8, top_k=1, seed=5).router(x)
    assert torch.equal(a.expert_TK, b.expert_TK)
    load = torch.bincount(a.expert_TK.flatten(), minlength=8).float()
    assert load.min() > 0.5 * load.mean()
    assert torch.equal(layer.router(x * 2.0).expert_TK, a.expert_TK)  # scale-invariant code


def test_attention_context_is_causal():
    layer = make_layer("attention", attention_context=True)
    with torch.no_grad():
        layer.router.context_out.weight.normal_(std=0.5)  # make the context matter
    x = torch.randn(1, 10, 32)
    base = layer.router(x.view(10, 32), batch_shape=(1, 10)).logits_TE
    x2 = x.clone()
    x2[0, 6:] = torch.randn(4, 32)
    changed = layer.router(x2.view(10, 32), batch_shape=(1, 10)).logits_TE
    torch.testing.assert_close(changed[:6], base[:6])  # the past cannot see the future
    assert not torch.allclose(changed[6:], base[6:])
    x3 = x.clone()
    x3[0, 0] = torch.randn(32)
    later = layer.router(x3.view(10, 32), batch_shape=(1, 10)).logits_TE
    assert not torch.allclose(later[5:], base[5:])  # the future sees the past


def test_attention_without_context_routes_each_token_alone():
    layer = make_layer("attention", attention_context=False)
    x = torch.randn(10, 32)
    full = layer.router(x).logits_TE
    single = torch.cat([layer.router(x[i:i + 1]).logits_TE for i in range(10)])
    torch.testing.assert_close(full, single)


def test_router_jitter_applies_only_in_training():
    layer = make_layer("topk", router_jitter=0.5)
    x = torch.randn(32, 32)
    layer.eval()
    torch.testing.assert_close(layer.router(x).logits_TE, layer.router(x).logits_TE)
    layer.train()
    assert not torch.allclose(layer.router(x).logits_TE, layer.router(x).logits_TE)


@pytest.mark.parametrize("router", ["topk", "hash", "hierarchical", "attention"])
def test_weights_sum_to_one_with_renormalisation(router):
    layer = make_layer(router)
    r = layer.router(torch.randn(20, 32), token_ids=torch.arange(20))
    torch.testing.assert_close(r.weight_TK.sum(-1), torch.ones(20))


ZERO_TOKEN_OPTIONS = [{}, {"capacity_factor": 1.25}, {"top_p": 0.7},
                      {"num_shared_experts": 1, "shared_expert_gate": True},
                      {"aux_loss_coef": 0.0, "z_loss_coef": 0.0}, {"aux_loss_coef": 0.01, "z_loss_coef": 0.001}]


@settings(max_examples=40, deadline=None)
@given(router=st.sampled_from(["topk", "expert_choice", "hash", "hierarchical", "attention"]),
       options=st.sampled_from(ZERO_TOKEN_OPTIONS), shape=st.sampled_from([(0, 32), (0, 5, 32), (3, 0, 32)]),
       impl=st.sampled_from(["grouped", "sorted", "loop"]), training=st.booleans())
def test_zero_tokens_give_an_empty_output_and_zero_losses(router, options, shape, impl, training):
    """An empty batch (no tokens, or sequences of length 0) is a valid input: the output is empty and
    every statistic and loss is finite, the losses zero, and the backward pass runs."""
    if router in ("expert_choice", "hash") and "top_p" in options:
        options = {}
    layer = make_layer(router, **options).train(training)
    x = torch.randn(shape, requires_grad=True)
    token_ids = torch.zeros(shape[:-1], dtype=torch.long) if router == "hash" else None
    out, stats = layer(x, token_ids=token_ids, impl=impl)
    assert out.shape == x.shape
    for name, value in stats.items():
        assert torch.isfinite(value).all(), f"{name} = {value}"
    for name in ("balance_loss", "aux_loss", "z_loss"):
        assert stats[name].item() == 0.0, name
    (out.sum() + stats["balance_loss"]).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("experts", [8, 17, 24, 56, 64])
def test_the_routers_softmax_has_torchs_gradient_and_rounds_it_the_same_with_any_thread_count(experts):
    """``expert_softmax``: torch's softmax values and (to rounding; float64 by gradcheck) its gradient;
    on the CPU with a gradient its backward gives the same bits with one thread and with two, where
    torch's CPU softmax backward over 17-63 experts (not a multiple of 16) does not."""
    from fulu_nas.moe.routing import _ExpertSoftmax, expert_softmax

    logits = torch.randn(2048, experts, generator=torch.Generator().manual_seed(experts)).requires_grad_(True)
    upstream = torch.randn(2048, experts, generator=torch.Generator().manual_seed(1))
    probs = expert_softmax(logits)
    assert type(probs.grad_fn).__name__ == _ExpertSoftmax.__name__ + "Backward"
    assert torch.equal(probs, torch.softmax(logits, -1))
    grads = {}
    for n in (2, 1):
        with torch_threads(n):
            (grads[n],) = torch.autograd.grad(expert_softmax(logits), logits, upstream)
    assert torch.equal(grads[2], grads[1])
    (torchs,) = torch.autograd.grad(torch.softmax(logits, -1), logits, upstream)
    torch.testing.assert_close(grads[1], torchs, rtol=1e-5, atol=1e-7)
    small = torch.randn(6, experts, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(expert_softmax, (small,))
    with torch.no_grad():
        assert expert_softmax(logits).grad_fn is None
