"""Bad input to the layer, its configuration and the spec's system is one clear error naming the
problem; options a layer cannot act on are one architecture; state a layer rebuilds or saves comes
back equal."""

from __future__ import annotations

import io

import pytest
import torch

from fulu_nas import OptimizationLevel, RoutingStrategy, create_ultimate_pimoe_system
from fulu_nas.errors import FuluConfigError
from fulu_nas.models import ArchConfig
from fulu_nas.moe import MoEConfig, PiMoELayer
from fulu_nas.moe.stats import STAT_KEYS
from fulu_nas.search.space import parse_space
from fulu_nas.tasks import build_task

from .helpers import make_config, make_layer

SMALL = dict(hidden_size=16, num_experts=4, expert_ffn_size=16)


# -- hierarchy groups ---------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [(0,), (1,), (-2,)])
@pytest.mark.parametrize("keep", [(), (1,)])
def test_a_hierarchy_group_below_two_is_the_one_problem(groups, keep):
    """0 divided by zero (ZeroDivisionError) and -2 added bounds computed from it ("must be in [1, -2]",
    "the kept groups hold -2 experts")."""
    expected = f"invalid MoE config: hierarchy_groups[0] must be >= 2, got {groups[0]}"
    with pytest.raises(ValueError) as e:
        MoEConfig(**SMALL, router="hierarchical", hierarchy_depth=2, hierarchy_groups=groups,
                  hierarchy_topk_groups=keep)
    assert str(e.value) == expected
    with pytest.raises(ValueError) as e:
        create_ultimate_pimoe_system(hidden_size=16, num_experts=4, routing_strategy="hierarchical",
                                     hierarchy_groups=groups, hierarchy_topk_groups=keep)
    assert str(e.value) == expected
    with pytest.raises(FuluConfigError) as e:
        ArchConfig.from_dict({"hidden_size": 16, "num_heads": 2,
                              "moe": {**SMALL, "router": "hierarchical", "hierarchy_depth": 2,
                                      "hierarchy_groups": list(groups), "hierarchy_topk_groups": list(keep)}})
    assert str(e.value) == expected


# -- the system's flags and enums ----------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [
    ("enable_all_features", "false"),  # was a TypeError from `&=`
    ("enable_all_features", None),
    ("enable_performance_optimization", "no"),  # was silently on
    ("enable_performance_optimization", None),  # was silently off
    ("enable_dynamic_scaling", "false"),
    ("enable_cross_expert_communication", 1),
    ("enable_neural_architecture_search", "yes"),
    ("enable_adaptive_learning", 0),
    ("enable_hardware_optimization", "true"),
])
def test_a_flag_that_is_not_a_bool_is_a_value_error_naming_it(flag, value):
    with pytest.raises(ValueError, match=f"^{flag} must be true or false.*got {value!r}$"):
        create_ultimate_pimoe_system(hidden_size=16, num_experts=4, **{flag: value})


def test_flags_that_follow_enable_all_features_may_be_none():
    system = create_ultimate_pimoe_system(hidden_size=16, num_experts=4, enable_all_features=True,
                                          enable_dynamic_scaling=None, enable_adaptive_learning=False)
    assert system.features["dynamic_scaling"] and not system.features["adaptive_learning"]
    with pytest.raises(ValueError, match="^return_comprehensive_info must be true or false, got 'false'$"):
        system(torch.randn(1, 2, 16), return_comprehensive_info="false")


@pytest.mark.parametrize("strategy,router", [("TOP_K", "topk"), ("topk", "topk"), ("Expert_Choice", "expert_choice"),
                                             ("ATTENTION_BASED", "attention"), (RoutingStrategy.HASH, "hash")])
@pytest.mark.parametrize("level,impl", [("ENHANCED", "sorted"), ("basic", "loop"),
                                        (OptimizationLevel.ADVANCED, "grouped")])
def test_strategy_and_level_take_member_names_and_values(strategy, router, level, impl):
    """A member's name ("TOP_K") was refused with a message that listed it among the choices."""
    system = create_ultimate_pimoe_system(hidden_size=16, num_experts=4, attention_heads=2, routing_strategy=strategy,
                                          optimization_level=level)
    assert (system.config.router, system.config.impl) == (router, impl)


def test_an_unknown_strategy_or_level_lists_the_values():
    with pytest.raises(ValueError, match=r"^routing_strategy must be one of TOP_K \('topk'\), "
                                         r"EXPERT_CHOICE \('expert_choice'\), .*got 'random'$"):
        create_ultimate_pimoe_system(hidden_size=16, routing_strategy="random")
    with pytest.raises(ValueError, match=r"^optimization_level must be one of BASIC \('basic'\), .*got 3$"):
        create_ultimate_pimoe_system(hidden_size=16, optimization_level=3)


# -- remap_experts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [[0, 1, 2, 3, 0, 1, 2, 3, 0], [3, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3] * 8])
def test_a_remapped_hash_layer_equals_a_fresh_layer_loaded_with_its_state(source):
    """The locality-sensitive code's width follows num_experts and is not in the state dict: a remapped
    layer kept the old one, so the same weights routed tokens elsewhere (outputs 0.5 apart)."""
    layer = make_layer("hash", **SMALL)
    layer.remap_experts(source)
    fresh = PiMoELayer(layer.cfg)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 32, 16, generator=torch.Generator().manual_seed(1))
    (out, stats), (expected, expected_stats) = layer(x), fresh(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(stats["tokens_per_expert"], expected_stats["tokens_per_expert"], rtol=0, atol=0)


@pytest.mark.parametrize("source", [[0, 9], [-1, 0], [0.5, 1], [True, 1], 3])
def test_remap_experts_refuses_a_source_outside_the_experts(source):
    layer = make_layer("topk", **SMALL)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"^remap_experts: source must be a list of expert indices in \[0, 4\)"):
        layer.remap_experts(source)
    assert layer.cfg.num_experts == 4
    for name, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_an_expert_choice_layer_remaps_to_fewer_experts_than_its_capacity_factor():
    """Expert choice's top_k is a capacity factor and may exceed the expert count (the config allows
    it): remapping such a layer, even to its own experts, was refused as "fewer experts than top_k"."""
    layer = make_layer("expert_choice", hidden_size=16, num_experts=4, expert_ffn_size=16, top_k=6)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    before, _ = layer(x)
    layer.remap_experts([0, 1, 2, 3])
    torch.testing.assert_close(layer(x)[0], before, rtol=0, atol=0)
    layer.remap_experts([2])
    assert layer.cfg.num_experts == 1 and layer.cfg.top_k == 6
    fresh = PiMoELayer(layer.cfg)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x)[0], fresh(x)[0], rtol=0, atol=0)


def test_a_one_level_hierarchical_layer_remaps_as_topk_does():
    """Depth 1 has no group structure to keep: remapping it was refused as the deeper levels are."""
    layer = make_layer("hierarchical", hierarchy_depth=1, hierarchy_groups=(), hierarchy_topk_groups=(), **SMALL)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    before, _ = layer(x)
    layer.remap_experts([3, 2, 1, 0])
    torch.testing.assert_close(layer(x)[0], before, rtol=1e-6, atol=1e-6)
    deeper = make_layer("hierarchical", hidden_size=16, num_experts=8, expert_ffn_size=16, hierarchy_depth=2)
    with pytest.raises(ValueError, match="remap_experts: the hierarchical router's group structure fixes num_experts"):
        deeper.remap_experts(list(range(8)) + [0])


def test_a_token_choice_layer_keeps_at_least_top_k_experts():
    layer = make_layer("topk", **SMALL)
    with pytest.raises(ValueError, match="remap_experts: 1 experts is fewer than top_k=2"):
        layer.remap_experts([0])


# -- statistics saved -------------------------------------------------------------------------------------

@pytest.mark.parametrize("router", ["topk", "expert_choice", "hash"])
def test_statistics_load_back_with_torch_default_safe_loader(router):
    layer = make_layer(router)
    _, stats = layer(torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)))
    buffer = io.BytesIO()
    torch.save(stats, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only=True, torch's default
    assert tuple(loaded) == STAT_KEYS
    for name in STAT_KEYS:
        torch.testing.assert_close(loaded[name], stats[name].detach(), rtol=0, atol=0)


# -- options a layer cannot act on -----------------------------------------------------------------------

def _output(cfg: MoEConfig) -> torch.Tensor:
    torch.manual_seed(0)
    layer = PiMoELayer(cfg)
    return layer(torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(2)))[0]


def test_group_mask_fill_is_inert_on_a_one_level_hierarchy():
    """One level has no groups to mask: two such layers that differ only in the fill are one architecture."""
    plain = make_config("hierarchical", hierarchy_depth=1, hierarchy_groups=(), hierarchy_topk_groups=())
    given = make_config("hierarchical", hierarchy_depth=1, hierarchy_groups=(), hierarchy_topk_groups=(),
                        group_mask_fill="zero")
    torch.testing.assert_close(_output(given), _output(plain), rtol=0, atol=0)
    assert "group_mask_fill" in given.inert_options()
    assert given.without_inert_options() == plain.without_inert_options()


@pytest.mark.parametrize("router,option", [
    ("expert_choice", {"score_func": "sigmoid"}),
    ("hash", {"score_func": "sigmoid"}),
    ("topk", {"group_mask_fill": "zero"}),
    ("attention", {"group_mask_fill": "zero"}),
    ("topk", {"shared_expert_gate": True}),
    ("topk", {"shared_expert_ffn_size": 24}),
    ("hash", {"shared_expert_ffn_size": 24, "shared_expert_gate": True, "group_mask_fill": "zero"}),
    ("expert_choice", {"renormalize": False}),
    ("hash", {"renormalize": False}),
    ("topk", {"attention_heads": 2}),
    ("hierarchical", {"attention_heads": 8}),
    ("topk", {"hash_seed": 7}),
    ("attention", {"hash_seed": 7}),
])
def test_an_option_the_layer_cannot_act_on_is_normalised_away(router, option):
    plain, given = make_config(router), make_config(router, **option)
    # the layers are the same: the same parameters compute the same output, bit for bit
    torch.testing.assert_close(_output(given), _output(plain), rtol=0, atol=0)
    assert set(option) <= set(given.inert_options())
    assert given.without_inert_options() == plain


@pytest.mark.parametrize("router", ["topk", "attention", "hierarchical"])
def test_top_p_is_inert_with_one_slot(router):
    """With top_k=1 a token's one slot is always kept, so top-p selects nothing: a search trained the
    same layer once for each top_p it drew."""
    plain, given = make_config(router, top_k=1), make_config(router, top_k=1, top_p=0.5)
    torch.testing.assert_close(_output(given), _output(plain), rtol=0, atol=0)
    assert "top_p" in given.inert_options()
    assert given.without_inert_options() == plain.without_inert_options()
    two = make_config(router, top_k=2, top_p=0.5)  # with two slots it drops the second of some tokens
    assert "top_p" not in two.inert_options() and two.without_inert_options().top_p == 0.5


def test_a_one_level_hierarchy_is_the_topk_router():
    """Depth 1 has no groups: the same parameters and outputs as topk, so one architecture."""
    one_level = make_config("hierarchical", hierarchy_depth=1, hierarchy_groups=(), hierarchy_topk_groups=())
    topk = make_config("topk")
    torch.testing.assert_close(_output(one_level), _output(topk), rtol=0, atol=0)
    assert one_level.without_inert_options() == topk
    assert (ArchConfig(hidden_size=32, moe=one_level.without_inert_options()).content_hash()
            == ArchConfig(hidden_size=32, moe=topk).content_hash())


def test_a_numpy_float_is_taken_as_a_float():
    """np.float64 (a float subclass) passed validation and compared equal, then broke the trial's
    arch.yaml (yaml cannot represent it); np.float32 was refused as not a number."""
    import numpy as np

    for value in (np.float64(1.5), np.float32(1.5)):
        arch = ArchConfig().with_moe(capacity_factor=value)
        assert type(arch.moe.capacity_factor) is float and arch.moe.capacity_factor == 1.5
        assert arch == ArchConfig().with_moe(capacity_factor=1.5)
        assert "capacity_factor: 1.5" in arch.to_yaml()


@pytest.mark.parametrize("router,option", [
    ("topk", {"score_func": "sigmoid"}),
    ("hierarchical", {"group_mask_fill": "zero"}),
    ("topk", {"num_shared_experts": 1, "shared_expert_gate": True}),
    ("topk", {"num_shared_experts": 1, "shared_expert_ffn_size": 24}),
    ("attention", {"attention_heads": 2}),
    ("hash", {"hash_seed": 7}),
    ("topk", {"renormalize": False}),
])
def test_an_option_the_layer_acts_on_is_kept(router, option):
    given = make_config(router, **option)
    assert given.without_inert_options() == given
    assert not set(option) & set(given.inert_options())


@pytest.mark.parametrize("router,option", [("attention", {"attention_heads": 2}), ("hash", {"hash_seed": 7})])
def test_a_routers_own_option_changes_its_layer(router, option):
    """The heads and the hash functions, normalised away off their routers, act on their own."""
    assert not torch.equal(_output(make_config(router, **option)), _output(make_config(router)))


def test_a_search_builds_inert_options_as_one_architecture():
    space = parse_space({"base": {"num_layers": 1, "hidden_size": 32, "num_heads": 2,
                                  "moe": {"num_experts": 4, "expert_ffn_size": 32}},
                         "params": {"router": {"type": "categorical", "choices": ["topk", "expert_choice"]},
                                    "score_func": {"type": "categorical", "choices": ["softmax", "sigmoid"]}}})
    task = build_task("clusters")  # token classification: expert choice applies
    archs = {f: space.arch({"router": "expert_choice", "score_func": f}, task) for f in ("softmax", "sigmoid")}
    assert archs["softmax"].content_hash() == archs["sigmoid"].content_hash()
    kept = {f: space.arch({"router": "topk", "score_func": f}, task) for f in ("softmax", "sigmoid")}
    assert kept["softmax"].content_hash() != kept["sigmoid"].content_hash()


# -- the system after optimize_for_inference ----------------------------------------------------------

def _gradients(system, x: torch.Tensor) -> dict[str, torch.Tensor]:
    system.zero_grad()
    (system(x).square().mean() + system.balance_loss).backward()
    return {name: p.grad for name, p in system.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("level", ["basic", "advanced"])
def test_train_after_optimize_for_inference_trains_again(level):
    """Every forward stayed under inference_mode: backward failed ("does not require grad")."""
    def build():
        torch.manual_seed(0)
        return create_ultimate_pimoe_system(hidden_size=16, num_experts=4, expert_ffn_size=16,
                                            optimization_level=level, aux_loss_coef=0.01)

    served, reference = build(), build()
    served.layer.experts.w2_EFD.requires_grad_(False)  # frozen before serving: stays frozen
    reference.layer.experts.w2_EFD.requires_grad_(False)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(3))
    served.optimize_for_inference()
    served(x)
    assert served.train() is served
    assert served.training and not served.system_stats()["inference_optimized"]
    gradients, expected = _gradients(served, x), _gradients(reference, x)
    assert gradients.keys() == expected.keys() and "layer.experts.w2_EFD" not in gradients
    for name, grad in expected.items():
        torch.testing.assert_close(gradients[name], grad, rtol=0, atol=0)


def test_eval_after_optimize_for_inference_stays_in_inference():
    system = create_ultimate_pimoe_system(hidden_size=16, num_experts=4, expert_ffn_size=16)
    system.optimize_for_inference()
    system.eval()
    assert system.system_stats()["inference_optimized"]
    assert not system(torch.randn(1, 3, 16)).requires_grad


# -- token ids --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("token_ids", [[[1, 2, 3]], (1, 2, 3), 7])
def test_token_ids_that_are_not_a_tensor_are_a_type_error(token_ids):
    layer = make_layer("hash")
    with pytest.raises(TypeError, match=r"^token_ids must be a tensor of integer ids, got "):
        layer(torch.randn(1, 3, 32), token_ids=token_ids)
