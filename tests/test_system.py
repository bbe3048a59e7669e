"""The original spec's API: create_ultimate_pimoe_system and what the system reports."""

from __future__ import annotations

import pytest
import torch

from fulu_nas import OptimizationLevel, RoutingStrategy, create_ultimate_pimoe_system


def small(**kw):
    base = dict(hidden_size=64, num_experts=8, expert_ffn_size=64)
    base.update(kw)
    return create_ultimate_pimoe_system(**base)


def test_spec_example_attention_advanced_all_features():
    system = small(routing_strategy=RoutingStrategy.ATTENTION_BASED,
                   optimization_level=OptimizationLevel.ADVANCED, enable_all_features=True)
    x = torch.randn(2, 10, 64)
    out = system(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out2, info = system(x, return_comprehensive_info=True)
    torch.testing.assert_close(out2, out)
    perf = info["performance_metrics"]
    assert perf["latency_ms"] > 0 and perf["tokens"] == 20
    assert perf["throughput_tokens_per_s"] == pytest.approx(20 / (perf["latency_ms"] / 1e3))
    assert perf["process_peak_rss_mb"] > 0
    routing = info["routing_info"]
    assert routing["router"] == "attention" and len(routing["tokens_per_expert"]) == 8
    assert 0 < routing["load_balance"] <= 1 and 0 < routing["utilisation"] <= 1
    # top-p dynamic scaling: between 1 and top_k experts per token
    assert 20 <= sum(routing["tokens_per_expert"]) <= 40
    stats = info["system_stats"]
    assert all(stats["features"].values())
    assert stats["parameters"]["active"] < stats["parameters"]["total"]
    assert system.config.num_shared_experts == 1 and system.config.shared_expert_gate
    assert system.config.bias_update_rate > 0 and system.config.top_p == 0.5


def test_spec_example_hierarchical_extreme_with_flags():
    system = small(routing_strategy=RoutingStrategy.HIERARCHICAL, optimization_level=OptimizationLevel.EXTREME,
                   enable_dynamic_scaling=True, enable_cross_expert_communication=True,
                   enable_neural_architecture_search=True, enable_performance_optimization=True,
                   enable_adaptive_learning=True, enable_hardware_optimization=True)
    x = torch.randn(2, 8, 64)
    out, info = system(x, return_comprehensive_info=True)
    assert info["system_stats"]["compiled"] and info["system_stats"]["optimization_level"] == "EXTREME"
    eager, _ = system.layer(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    assert system.architecture()["moe"]["router"] == "hierarchical"
    # CPU inference drops the compiled forward for the eager one (packed experts, faster)
    system.optimize_for_inference()
    out, info = system(x, return_comprehensive_info=True)
    assert not info["system_stats"]["compiled"] and info["system_stats"]["cuda_graphs"] == 0
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)


def test_state_dict_holds_the_layer_once_at_every_level():
    basic = small(optimization_level="basic")
    layer_keys = [f"layer.{k}" for k in basic.layer.state_dict()]
    for level in ("basic", "extreme"):
        assert list(small(optimization_level=level).state_dict()) == layer_keys
    extreme = small(optimization_level="extreme")
    extreme.load_state_dict(basic.state_dict())
    x = torch.randn(2, 8, 64)
    torch.testing.assert_close(extreme(x), basic(x), rtol=1e-4, atol=1e-5)


def test_levels_compute_the_same_function():
    x = torch.randn(2, 6, 64)
    outs = []
    for level in ("basic", "enhanced", "advanced"):
        torch.manual_seed(0)
        system = small(optimization_level=level)
        assert system.config.impl == {"basic": "loop", "enhanced": "sorted", "advanced": "grouped"}[level]
        outs.append(system(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-6)


def test_optimize_for_inference_and_benchmark():
    system = small(routing_strategy="topk")
    x = torch.randn(2, 16, 64)
    before = system(x)
    assert system.optimize_for_inference() is system
    assert not system.training and not any(p.requires_grad for p in system.parameters())
    torch.testing.assert_close(system(x), before)
    results = system.benchmark_system(x, num_iterations=5, warmup=1)
    assert results["throughput"] == pytest.approx(32 / results["average_time"])
    assert results["min_time"] <= results["median_time"] <= results["max_time"]
    assert results["num_iterations"] == 5


def test_adaptive_learning_updates_the_bias_after_a_step():
    system = small(enable_adaptive_learning=True)
    system(torch.randn(4, 16, 64))
    bias_before = system.layer.router.expert_bias.clone()
    system.update_after_step()
    assert not torch.equal(system.layer.router.expert_bias, bias_before)
    assert system.balance_loss.dim() == 0


def test_flags_without_meaning_for_a_router_are_reported_off():
    system = small(routing_strategy=RoutingStrategy.HASH, enable_all_features=True)
    feats = system.system_stats()["features"]
    assert not feats["dynamic_scaling"] and not feats["adaptive_learning"]
    assert feats["cross_expert_communication"]
    assert system(torch.randn(1, 4, 64)).shape == (1, 4, 64)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"num_experts": 4, "top_k": 5}, "top_k"),
    ({"routing_strategy": "attention", "hidden_size": 60, "attention_heads": 8}, "hidden_size"),
    ({"routing_strategy": "telepathy"}, "routing_strategy"),
    ({"optimization_level": "ludicrous"}, "optimization_level"),
    ({"num_experts": 0}, "num_experts"),
    ({"warp_drive": True}, "warp_drive"),
])
def test_impossible_input_raises_value_error_naming_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=named):
        small(**kwargs)


def test_wrong_input_rank_or_width_is_refused():
    system = small()
    with pytest.raises(ValueError, match="rank 3"):
        system(torch.randn(10, 64))
    with pytest.raises(ValueError, match="hidden_size=64"):
        system(torch.randn(1, 10, 32))
