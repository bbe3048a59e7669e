"""The original spec's API: create_ultimate_pimoe_system and what the system reports."""

from __future__ import annotations

import re

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
    assert perf["forward_peak_memory_mb"] > 0
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


@pytest.mark.parametrize("level", ["advanced", "extreme"])
def test_a_system_in_the_middle_of_training_deep_copies_and_pickles(level, tmp_path):
    """A copy of the model mid-training (the best checkpoint, an EMA or teacher copy): at EXTREME the compiled
    call's statistics, a plain dict holding the step's graph, made copy.deepcopy fail with torch's "Only
    Tensors created explicitly by the user (graph leaves) support the deepcopy protocol"."""
    import copy

    system = small(optimization_level=level)
    x = torch.randn(2, 8, 64)
    system(x)
    if level == "extreme":  # the compiled call's statistics hold the step's graph (training uses it)
        assert any(v.requires_grad for v in system.last_stats.values())
    twin = copy.deepcopy(system)
    assert not any(v.requires_grad for v in twin.last_stats.values())
    torch.testing.assert_close(twin.last_stats["tokens_per_expert"], system.last_stats["tokens_per_expert"])
    torch.testing.assert_close(twin(x), system(x))
    torch.save(system, tmp_path / "system.pt")
    assert torch.load(tmp_path / "system.pt", weights_only=False).last_stats.keys() == system.last_stats.keys()


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


@pytest.mark.parametrize("strategy", ["topk", "hierarchical", "attention"])
def test_dynamic_scaling_with_one_expert_per_token_is_reported_off(strategy):
    """Top-p keeps a token's one slot whatever its mass: with top_k=1 it selects nothing."""
    x = torch.randn(1, 6, 64)
    outs = []
    for scaling in (True, False):
        torch.manual_seed(0)
        system = small(routing_strategy=strategy, top_k=1, enable_dynamic_scaling=scaling)
        assert system.system_stats()["features"]["dynamic_scaling"] is False
        assert system.config.top_p is None
        outs.append(system(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert small(routing_strategy=strategy, top_k=2, enable_dynamic_scaling=True).system_stats()["features"][
        "dynamic_scaling"]


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


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_a_non_floating_point_input_is_refused_with_a_type_error(dtype):
    system = small()
    x = torch.ones(2, 4, 64, dtype=dtype)
    with pytest.raises(TypeError, match=rf"input_tensor.*floating-point.*{str(dtype).removeprefix('torch.')}"):
        system(x)
    with pytest.raises(TypeError, match="input_tensor"):
        system(x, return_comprehensive_info=True)
    with pytest.raises(TypeError, match="input_tensor must be a torch.Tensor"):
        system([[[0.0] * 64]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_floating_point_input_keeps_its_dtype(dtype):
    system = small()
    x = torch.randn(2, 4, 64).to(dtype)
    out = system(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), system(x.float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"routing_strategy": "attention", "attention_heads": 0}, "attention_heads must be a positive int, got 0"),
    ({"routing_strategy": "attention", "attention_heads": -8}, "attention_heads must be a positive int, got -8"),
    ({"routing_strategy": "attention", "hidden_size": "32"}, "hidden_size must be a positive int, got '32'"),
    ({"hidden_size": "32"}, "hidden_size must be a positive int, got '32'"),
    ({"hidden_size": 64.0}, "hidden_size must be a positive int, got 64.0"),
    ({"num_experts": "8"}, "num_experts must be a positive int, got '8'"),
    ({"top_k": 0}, "top_k must be a positive int, got 0"),
    ({"top_k": True}, "top_k must be a positive int, got True"),
    ({"expert_ffn_size": 0}, "expert_ffn_size must be a positive int, got 0"),
    ({"routing_strategy": "hierarchical", "hierarchy_depth": 0}, "hierarchy_depth must be a positive int, got 0"),
])
def test_a_size_that_is_not_a_positive_int_is_named(kwargs, named):
    with pytest.raises(ValueError, match=named) as raised:
        small(**kwargs)
    assert ";" not in str(raised.value)  # one message, not a list of knock-on problems


def test_an_expert_choice_top_k_may_exceed_num_experts():
    system = small(routing_strategy="expert_choice", num_experts=4, top_k=6)
    assert system.config.top_k == 6
    assert system(torch.randn(1, 8, 64)).shape == (1, 8, 64)


def test_balance_loss_before_any_forward_says_so():
    system = small()
    with pytest.raises(RuntimeError, match="no forward has run yet"):
        _ = system.balance_loss
    system(torch.randn(1, 4, 64))
    assert system.balance_loss.dim() == 0


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"num_iterations": 0}, "num_iterations must be a positive int, got 0"),
    ({"num_iterations": -3}, "num_iterations must be a positive int, got -3"),
    ({"num_iterations": 2.5}, "num_iterations must be a positive int, got 2.5"),
    ({"warmup": -1}, "warmup must be an int >= 0, got -1"),
    ({"warmup": "1"}, "warmup must be an int >= 0, got '1'"),
])
def test_benchmark_counts_are_checked(kwargs, named):
    system = small()
    with pytest.raises(ValueError, match=named):
        system.benchmark_system(torch.randn(1, 4, 64), **kwargs)
    assert system.system_stats()["forward_calls"] == 0  # refused before any forward


def test_benchmark_without_warmup():
    results = small().benchmark_system(torch.randn(1, 4, 64), num_iterations=1, warmup=0)
    assert results["num_iterations"] == 1 and results["min_time"] == results["max_time"] > 0


@pytest.mark.skipif(torch.accelerator.is_available(), reason="needs a machine without an accelerator")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps"])
def test_an_accelerator_this_machine_lacks_is_named(device):
    kind = device.split(":")[0].upper()
    with pytest.raises(ValueError, match=rf"device: '{device}': torch .* sees no {kind} device here"):
        small(device=device)


def test_unknown_device_is_named():
    with pytest.raises(ValueError, match="device: 'bogus': not a device") as raised:
        small(device="bogus")
    assert len(str(raised.value)) < 200  # not torch's list of every device type
    with pytest.raises(ValueError, match="device: 3.5: not a device"):
        small(device=3.5)


@pytest.mark.parametrize("device", ["meta", torch.device("meta")])
def test_a_device_that_cannot_run_a_forward_is_refused(device):
    with pytest.raises(ValueError, match=r"^device: .*meta.*: a meta device holds no values and cannot run a "
                                         r"forward \(use 'cpu' or 'cuda'\)$"):
        small(device=device)


def test_cpu_device_by_name_or_object():
    assert small(device="cpu").device == torch.device("cpu")
    assert small(device=torch.device("cpu")).device == torch.device("cpu")


@pytest.mark.parametrize("level", ["basic", "advanced", "extreme"])
def test_a_system_saved_whole_after_a_forward_loads_with_its_last_statistics(level):
    """``torch.save(system)`` failed after a forward at the BASIC and ADVANCED levels: the kept
    statistics were closures over the call."""
    import io

    system = small(optimization_level=level)
    x = torch.randn(1, 4, 64)
    want = system(x)
    buffer = io.BytesIO()
    torch.save(system, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)  # a whole module: a trusted file only
    torch.testing.assert_close(loaded.balance_loss, system.balance_loss.detach())
    torch.testing.assert_close(loaded(x), want)


@pytest.mark.parametrize(("override", "argument"), [
    ({"router": "topk"}, "routing_strategy"),
    ({"impl": "loop"}, "optimization_level"),
    ({"top_p": 0.3}, "dynamic_top_p"),
    ({"attention_context": False}, "routing_strategy"),
    ({"num_shared_experts": 2}, "enable_cross_expert_communication"),
    ({"shared_expert_gate": False}, "enable_cross_expert_communication"),
    ({"bias_update_rate": 0.0}, "enable_adaptive_learning"),
])
def test_a_layer_override_of_what_an_argument_sets_is_refused(override, argument):
    """An override applied after the spec's arguments built a hash system with a top-k router whose
    features were reported off, or an ADVANCED system running the loop: refused, naming the argument."""
    field = next(iter(override))
    with pytest.raises(ValueError, match=f"^{field} is set by [a-z_ ]*{argument}"):
        small(routing_strategy="hash", enable_all_features=True, **override)


@pytest.mark.parametrize("value", ["abc", 0.0, 1.5, float("nan"), True])
def test_dynamic_top_p_is_checked_as_an_argument(value):
    """Checked whether or not dynamic scaling is on ("abc" was accepted with it off), and named as the
    argument (with it on, 1.5 was refused as MoEConfig's top_p, a field the caller never passed)."""
    for scaling in (False, True):
        with pytest.raises(ValueError, match=r"^dynamic_top_p must be a number in \(0, 1\]"):
            small(enable_dynamic_scaling=scaling, dynamic_top_p=value)


@pytest.mark.parametrize("search", [False, True])
def test_the_architecture_search_flag_records_the_architecture_in_the_info(search):
    system = small(enable_neural_architecture_search=search)
    _, info = system(torch.randn(1, 4, 64), return_comprehensive_info=True)
    assert info["system_stats"]["features"]["neural_architecture_search"] is search
    if search:
        assert info["system_stats"]["architecture"] == system.architecture()
    else:
        assert "architecture" not in info["system_stats"]


def test_the_cpu_memory_figure_is_the_peak_of_a_forward_of_that_input():
    """Not the process's peak resident set, which any earlier allocation raises for good."""
    from fulu_nas.deploy.cost import cpu_peak_bytes

    system = small()
    x = torch.randn(2, 16, 64)
    _, info = system(x, return_comprehensive_info=True)
    figure = info["performance_metrics"]["forward_peak_memory_mb"]
    assert "process_peak_rss_mb" not in info["performance_metrics"]
    assert figure == cpu_peak_bytes(lambda: system.layer(x)) / 2**20 > 0
    unrelated = torch.ones(64 * 2**20 // 4)  # 64 MiB the system has nothing to do with
    del unrelated
    _, info = system(x, return_comprehensive_info=True)
    assert info["performance_metrics"]["forward_peak_memory_mb"] == figure
    _, info = system(torch.randn(8, 64, 64), return_comprehensive_info=True)
    assert info["performance_metrics"]["forward_peak_memory_mb"] > figure
    # The measuring forward is no call of the system's: the statistics and the count are the timed call's.
    assert sum(info["routing_info"]["tokens_per_expert"]) == 8 * 64 * 2
    assert info["system_stats"]["forward_calls"] == 3
    results = system.benchmark_system(x, num_iterations=2, warmup=0)
    with torch.no_grad():
        assert results["forward_peak_memory_mb"] == cpu_peak_bytes(lambda: system.layer(x)) / 2**20 > 0
    assert system.system_stats()["forward_calls"] == 5


@pytest.mark.parametrize("shape", [(0, 8, 64), (2, 0, 64)])
def test_an_input_without_tokens_is_refused_where_throughput_is_reported(shape):
    system = small()
    x = torch.randn(shape)
    for measure in (lambda: system(x, return_comprehensive_info=True),
                    lambda: system.benchmark_system(x, num_iterations=2, warmup=1)):
        with pytest.raises(ValueError, match=rf"^input_tensor has no tokens \(shape {re.escape(str(shape))}\)"):
            measure()
    assert system.system_stats()["forward_calls"] == 0
    assert system(x).shape == shape  # a plain forward of no tokens is an empty output, not a measurement


@pytest.mark.parametrize("level", list(OptimizationLevel))
def test_serving_on_cuda_keeps_the_dtype_the_level_was_built_with(level, monkeypatch):
    """Hardware optimisation makes ADVANCED and EXTREME bf16 when built on CUDA; BASIC and ENHANCED
    stay fp32, and optimize_for_inference() must not cast them either. The device is faked: the cast
    is decided by the device, the level and the flag."""
    from fulu_nas.system import UltimatePiMoESystem

    system = small(optimization_level=level, enable_hardware_optimization=True)
    monkeypatch.setattr(UltimatePiMoESystem, "device", property(lambda self: torch.device("cuda")))
    system.optimize_for_inference()
    bf16 = level in (OptimizationLevel.ADVANCED, OptimizationLevel.EXTREME)
    assert system.dtype == (torch.bfloat16 if bf16 else torch.float32)


@pytest.mark.parametrize("level", list(OptimizationLevel))
def test_build_and_serve_decide_the_bf16_cast_alike(level):
    """The one decision both the constructor and optimize_for_inference() take."""
    from fulu_nas.system import casts_to_bf16

    cuda = torch.device("cuda")
    assert casts_to_bf16(cuda, level, True) is (level in (OptimizationLevel.ADVANCED, OptimizationLevel.EXTREME))
    assert not casts_to_bf16(cuda, level, False)
    assert not casts_to_bf16(torch.device("cpu"), level, True)


def test_more_extreme_systems_than_torchs_recompile_limit_run_in_one_process():
    """The spec's five routers compared at EXTREME in one script (a training step and an evaluation each):
    the fifth failed inside torch (FailOnRecompileLimitHit), every system's compiled forward counting towards
    the limit of 8 compilations torch keeps for the layer's forward."""
    torch._dynamo.reset()
    for seed, strategy in enumerate([*RoutingStrategy] * 2):
        torch.manual_seed(seed)
        system = small(routing_strategy=strategy, optimization_level=OptimizationLevel.EXTREME,
                       num_experts=4 + seed % 3)
        x = torch.randn(2, 4, 64)
        system(x).square().mean().backward()
        with torch.no_grad():
            torch.testing.assert_close(system.eval()(x), system.layer(x)[0], rtol=1e-4, atol=1e-5)


def test_an_input_on_another_device_is_named():
    system = small()
    with pytest.raises(ValueError, match=r"input_tensor is on meta, the system on cpu: move it with "
                                         r"\.to\(system\.device\)"):
        system(torch.randn(1, 4, 64, device="meta"))


def test_refused_calls_are_not_counted():
    """The count went up before the layer ran, so calls the layer refused (token ids of the wrong shape) counted."""
    system = small(routing_strategy=RoutingStrategy.HASH)
    x = torch.randn(2, 5, 64)
    for bad in (torch.randn(4, 64), torch.randn(1, 4, 32), torch.ones(1, 4, 64, dtype=torch.long)):
        with pytest.raises((TypeError, ValueError)):
            system(bad)
    with pytest.raises(ValueError, match="token_ids"):
        system(x, token_ids=torch.zeros(5, 2, dtype=torch.long))
    system(x, token_ids=torch.zeros(2, 5, dtype=torch.long))
    assert system.system_stats()["forward_calls"] == 1


def test_a_bad_train_mode_leaves_inference_as_it_was():
    """train("no") raised only after it had left inference: the system ran with gradients again."""
    system = small().optimize_for_inference()
    with pytest.raises(ValueError, match="training mode is expected to be boolean"):
        system.train("no")
    assert system._inference and not any(p.requires_grad for p in system.parameters())


@pytest.mark.parametrize("level", [OptimizationLevel.ADVANCED, OptimizationLevel.EXTREME])
def test_a_layer_assigned_to_the_system_is_the_one_it_runs(level):
    """``system.layer = other`` registered the new layer (its parameters, an optimizer's) while every call
    ran the layer the system was built with, and system_stats called an ADVANCED system compiled."""
    from fulu_nas import PiMoELayer

    system = create_ultimate_pimoe_system(hidden_size=32, num_experts=8, top_k=2, optimization_level=level)
    x = torch.randn(2, 4, 32)
    system(x)
    other = PiMoELayer(system.layer.cfg)
    system.layer = other
    torch.testing.assert_close(system(x), other(x)[0], rtol=1e-5, atol=1e-5)
    assert system.system_stats()["compiled"] == (level is OptimizationLevel.EXTREME)
    system.optimize_for_inference()
    system.layer = other = PiMoELayer(system.layer.cfg)
    with torch.no_grad():
        torch.testing.assert_close(system(x), other(x)[0], rtol=1e-5, atol=1e-5)


def test_the_system_reports_its_layers_configuration_after_remapped_experts():
    """After ``system.layer.remap_experts`` the report said 8 experts beside 4 experts' token counts, and
    ``architecture()`` (what a search starts from) an architecture of 8 experts."""
    system = create_ultimate_pimoe_system(hidden_size=32, num_experts=8, top_k=2, enable_all_features=True)
    system.layer.remap_experts([0, 1, 2, 3])
    _, info = system(torch.randn(2, 4, 32), return_comprehensive_info=True)
    assert info["routing_info"]["num_experts"] == len(info["routing_info"]["tokens_per_expert"]) == 4
    assert system.architecture()["moe"]["num_experts"] == system.config.num_experts == 4


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_a_layer_that_cannot_be_captured_runs_its_forward_as_it_is(impl):
    """GraphedForward asks whether its forward can be captured before capturing a signature: a layer
    off CUDA (or one whose experts read the routing on the host) is called directly, graphless."""
    from fulu_nas.deploy.cuda_graphs import GraphedForward
    from fulu_nas.moe import MoEConfig, PiMoELayer

    torch.manual_seed(0)
    layer = PiMoELayer(MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=64, impl=impl)).eval()
    assert not layer.captures_in_cuda_graphs()
    assert not layer.double().captures_in_cuda_graphs()
    layer.float()
    graphed = GraphedForward(lambda x, ids=None: layer(x), module=layer, capturable=layer.captures_in_cuda_graphs)
    x = torch.randn(2, 8, 32)
    with torch.inference_mode():
        out, _ = graphed(x)
        assert torch.equal(out, layer(x)[0])
    assert graphed.num_graphs == 0
