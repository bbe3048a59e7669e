"""Routing statistics against hand-computed values, and the balancing mechanisms' effect."""

from __future__ import annotations

import math

import pytest
import torch

from fulu_nas.moe import STAT_KEYS, load_balancing_loss, load_statistics, router_z_loss, update_selection_bias
from fulu_nas.moe.balancing import balance_loss

from .helpers import make_layer


def test_load_statistics_by_hand():
    s = load_statistics(torch.tensor([3.0, 1.0, 0.0, 0.0]))
    assert s["utilisation"] == 0.5
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(s["load_balance"], torch.tensor(entropy / math.log(4)))
    torch.testing.assert_close(s["max_vio"], torch.tensor(2.0))  # (3 - 1) / 1
    torch.testing.assert_close(s["cv"], torch.tensor(math.sqrt(1.5)))  # sqrt(mean(c^2) - 1) / 1
    even = load_statistics(torch.tensor([5.0, 5.0, 5.0]))
    assert even["load_balance"] == pytest.approx(1.0) and even["max_vio"] == 0 and even["cv"] == 0
    assert load_statistics(torch.tensor([7.0]))["load_balance"] == 1.0


def constructed_layer():
    """top-1 over 4 experts whose gate reads one coordinate each: token one-hot in dim e goes to
    expert e with logit 10."""
    layer = make_layer("topk", num_experts=4, top_k=1, aux_loss_coef=0.01, z_loss_coef=0.001)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, :4] = 10 * torch.eye(4)
    x = torch.zeros(4, 32)
    x[[0, 1, 2], 0] = 1.0
    x[3, 1] = 1.0
    return layer, x


def test_layer_stats_on_a_constructed_routing():
    layer, x = constructed_layer()
    _, s = layer(x)
    assert set(s) == set(STAT_KEYS)
    assert s["tokens_per_expert"].tolist() == [3.0, 1.0, 0.0, 0.0]
    assert s["utilisation"] == 0.5
    torch.testing.assert_close(s["max_vio"], torch.tensor(2.0))
    # each token's distribution: softmax of (10, 0, 0, 0)
    p_top = math.exp(10) / (math.exp(10) + 3)
    p_low = 1 / (math.exp(10) + 3)
    h = -(p_top * math.log(p_top) + 3 * p_low * math.log(p_low))
    torch.testing.assert_close(s["router_entropy"], torch.tensor(h))
    mean_p = torch.tensor([(3 * p_top + p_low) / 4, (p_top + 3 * p_low) / 4, p_low, p_low])
    aux = 4 * (torch.tensor([0.75, 0.25, 0, 0]) * mean_p).sum()
    torch.testing.assert_close(s["aux_loss"], aux)
    z = math.log(math.exp(10) + 3) ** 2
    torch.testing.assert_close(s["z_loss"], torch.tensor(z))
    torch.testing.assert_close(s["balance_loss"], 0.01 * aux + 0.001 * torch.tensor(z))
    assert s["dropped_share"] == 0


def test_aux_loss_is_one_at_perfect_balance_for_any_k():
    probs = torch.full((12, 6), 1 / 6)
    assert load_balancing_loss(probs, torch.full((6,), 4.0)) == pytest.approx(1.0)
    assert router_z_loss(torch.zeros(5, 6)) == pytest.approx(math.log(6) ** 2)


def skewed_input(n=512):
    x = torch.randn(n, 32)
    x[:, 0] += 2.0  # a direction the gate will be made to love
    return x


def test_selection_bias_step_moves_toward_balance():
    bias = torch.zeros(4)
    update_selection_bias(bias, torch.tensor([10.0, 2.0, 2.0, 2.0]), 0.1)
    assert bias[0] < 0 and torch.all(bias[1:] > 0)
    assert bias.sum().abs() < 1e-6


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_aux_loss_free_bias_balances_a_skewed_router(score_func):
    layer = make_layer("topk", num_experts=8, top_k=2, bias_update_rate=0.005, score_func=score_func)
    with torch.no_grad():
        layer.router.gate.weight[0, 0] = 1.0
    x = skewed_input()
    _, before = layer(x)
    for _ in range(300):
        _, s = layer(x)
        layer.update_expert_bias(s["tokens_per_expert"])
    _, after = layer(x)
    assert before["max_vio"] > 2.0
    assert after["max_vio"] < 0.1 * before["max_vio"]
    # the bias changes selection only: weights come from the unbiased scores
    r = layer.router(x)
    unbiased = torch.softmax(r.logits_TE, -1) if score_func == "softmax" else torch.sigmoid(r.logits_TE)
    w = unbiased.gather(1, r.expert_TK)
    torch.testing.assert_close(r.weight_TK, w / w.sum(-1, keepdim=True))


def test_update_is_a_no_op_without_rate_or_scores():
    for layer in (make_layer("topk"), make_layer("hash", bias_update_rate=0.1)):
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.update_expert_bias(torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 1]))
        for k, v in layer.state_dict().items():
            assert torch.equal(v, state[k])


def train_router_on_balance_loss(layer, x, lr, steps):
    """SGD on the router with the balancing losses alone; returns the stats before and after."""
    opt = torch.optim.SGD(layer.router.parameters(), lr=lr)
    _, before = layer(x)
    for _ in range(steps):
        _, s = layer(x)
        opt.zero_grad()
        s["balance_loss"].backward()
        opt.step()
    _, after = layer(x)
    return before, after


def test_training_on_aux_loss_balances_the_gate():
    layer = make_layer("topk", num_experts=8, top_k=2, aux_loss_coef=1.0)
    with torch.no_grad():
        layer.router.gate.weight[0, 0] = 2.0
    before, after = train_router_on_balance_loss(layer, skewed_input(), lr=0.5, steps=100)
    assert after["aux_loss"] < before["aux_loss"]
    assert after["load_balance"] > before["load_balance"] and after["max_vio"] < 0.5 * before["max_vio"]


def test_z_loss_shrinks_logits():
    layer = make_layer("topk", z_loss_coef=1.0)
    start, end = train_router_on_balance_loss(layer, torch.randn(64, 32) * 4, lr=0.01, steps=50)
    assert end["z_loss"] < 0.5 * start["z_loss"]


def test_stats_are_detached_except_losses():
    layer, x = constructed_layer()
    _, s = layer(x.requires_grad_(True))
    for k, v in s.items():
        assert v.requires_grad == (k in ("aux_loss", "z_loss", "balance_loss")), k


def test_parameter_counts():
    layer = make_layer("topk", num_experts=8, top_k=2, num_shared_experts=1)
    counts = layer.parameter_counts()
    expert = 32 * 96 + 48 * 32
    router = 8 * 32
    shared = 32 * 96 + 48 * 32
    assert counts["total"] == 8 * expert + router + shared
    assert counts["active"] == 2 * expert + router + shared


def test_statistics_are_computed_when_first_read(monkeypatch):
    """An eager call computes no statistic until one is read, then only that one's group; reading
    them all gives what a traced (compiled) call returns as a plain dict."""
    import fulu_nas.moe.layer as layer_module

    calls = []
    for name in ("load_statistics", "router_entropy", "load_balancing_loss", "router_z_loss", "balance_loss"):
        real = getattr(layer_module, name)
        monkeypatch.setattr(layer_module, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    layer = make_layer("topk", aux_loss_coef=0.01, z_loss_coef=0.0)
    x = torch.randn(2, 9, 32)
    out, stats = layer(x)
    assert calls == [] and set(stats) == set(STAT_KEYS)
    stats["balance_loss"]
    assert calls == ["balance_loss"]  # one fused loss (z_loss_coef 0: its term is left out)
    stats["load_balance"], stats["cv"]
    assert calls == ["balance_loss", "load_statistics"]
    everything = dict(stats)
    assert sorted(calls) == ["balance_loss", "load_balancing_loss", "load_statistics", "router_entropy",
                             "router_z_loss"]
    torch._dynamo.reset()
    compiled_out, compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert type(compiled) is dict and compiled.keys() == everything.keys()
    for key, value in everything.items():
        torch.testing.assert_close(compiled[key], value)
    torch.testing.assert_close(compiled_out, out)


@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize(("aux_coef", "z_coef"), [(0.01, 0.0), (0.0, 1e-3), (0.3, 0.7)])
def test_fused_balance_loss_equals_the_two_losses_and_their_gradients(aux_coef, z_coef, tokens):
    """The eager balance loss (one autograd node with a closed-form backward) against autograd
    through :func:`load_balancing_loss` and :func:`router_z_loss`: value and both gradients."""
    torch.manual_seed(tokens)
    logits = (torch.randn(tokens, 6, dtype=torch.float64) * 3).float()
    counts = torch.randint(0, 9, (6,)).float()

    def run(fused: bool):
        lg = logits.clone().requires_grad_(True)
        probs = torch.softmax(lg, -1)
        probs.retain_grad()
        if fused:
            loss = balance_loss(probs, lg, counts, aux_coef, z_coef)
        else:
            loss = aux_coef * load_balancing_loss(probs, counts) + z_coef * router_z_loss(lg)
        (3.0 * loss).backward()
        # a left-out term gives no gradient where the two losses' sum gives zeros
        return loss.detach(), lg.grad, probs.grad if probs.grad is not None else torch.zeros_like(probs)

    got, want = run(True), run(False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    if tokens:
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reader", ["no_grad", "inference_mode"])
def test_statistics_read_first_without_gradients_still_train_the_router(router, reader):
    """Logging the statistics under no_grad before the loss is built used to cache a balancing loss
    without a gradient: the backward ran and the router silently got no balancing gradient."""
    grads = {}
    for logged_first in (False, True):
        layer = make_layer(router, aux_loss_coef=0.1, z_loss_coef=0.01).train()
        x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
        out, stats = layer(x)
        if logged_first:
            with torch.no_grad() if reader == "no_grad" else torch.inference_mode():
                logged = {k: v.float().mean().item() for k, v in stats.items()}
            assert math.isfinite(logged["balance_loss"])
        loss = out.float().pow(2).mean() + stats["balance_loss"]
        assert stats["balance_loss"].requires_grad == any(p.requires_grad for p in layer.router.parameters())
        loss.backward()
        grads[logged_first] = [p.grad.clone() for p in layer.router.parameters() if p.grad is not None]
    assert len(grads[True]) == len(grads[False])
    for with_log, without in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(with_log, without, rtol=0, atol=0)


def test_statistics_pickle_as_their_values():
    """A module keeping its last statistics (the spec's system, a migrated model) could not be saved
    whole: the statistics' computations are closures over the call."""
    import io

    layer = make_layer("topk").train()
    _, stats = layer(torch.randn(2, 5, 32))
    layer.last_stats = stats  # as such a module keeps them
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # a whole module: loaded with weights_only=False, from a trusted file only
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False).last_stats
    assert isinstance(loaded, dict) and not isinstance(loaded, type(stats)) and loaded.keys() == set(STAT_KEYS)
    for key in STAT_KEYS:
        torch.testing.assert_close(loaded[key], stats[key].detach())
        assert not loaded[key].requires_grad


@pytest.mark.parametrize("capacity_factor, experts", [(None, 2), (0.5, 0.5), (1.0, 1), (4.0, 4), (16.0, 8)])
def test_expert_choice_active_parameters_follow_its_capacity(capacity_factor, experts):
    """Under expert choice a token uses capacity_factor experts on average (top_k without one, all of
    them at most), as its FLOPs count: the active count charged top_k whatever the factor."""
    layer = make_layer("expert_choice", num_experts=8, top_k=2, capacity_factor=capacity_factor)
    counts = layer.parameter_counts()
    expert = 32 * 96 + 48 * 32
    router = 8 * 32
    assert counts["total"] == 8 * expert + router
    assert counts["active"] == round(experts * expert) + router
    seq = 64  # the capacity of 64 tokens over 8 experts is exact for every factor above
    routed_flops = layer.flops_per_token(seq) - 2 * router
    assert routed_flops == pytest.approx(2 * (counts["active"] - router))


def test_load_statistics_refuse_what_is_not_one_load_vector_and_an_empty_load_is_plain_zero():
    """A (layers, experts) stack of counts gave a load balance of 3.0 (outside [0, 1]: the layer count taken for
    the expert count); an empty load's balance printed as -0.0."""
    for counts in (torch.ones(2, 4), torch.tensor(3.0), [1, 2]):
        with pytest.raises(ValueError, match="counts_E must be a 1-D tensor of per-expert counts"):
            load_statistics(counts)
    balance = load_statistics(torch.zeros(8))["load_balance"]
    assert balance.item() == 0.0 and math.copysign(1.0, balance.item()) == 1.0


def test_the_analytic_figures_refuse_impossible_arguments():
    """flops_per_token(0) of an expert-choice layer divided by zero, None failed inside, -3 gave a number;
    expert_capacity of a token-choice config without capacity was a bare AssertionError."""
    from fulu_nas.moe import MoEConfig

    for router in ("expert_choice", "topk"):
        layer = make_layer(router=router)
        for seq_len in (0, -3, None, 2.5, True):
            with pytest.raises(ValueError, match="seq_len must be a whole number of tokens >= 1"):
                layer.flops_per_token(seq_len)
        assert layer.flops_per_token(16) > 0
    with pytest.raises(ValueError, match="no capacity_factor"):
        MoEConfig(hidden_size=16, num_experts=4, expert_ffn_size=16).expert_capacity(32)
