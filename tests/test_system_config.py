"""The spec's YAML configuration block builds the system its keys name (create_ultimate_pimoe_system_from_config),
and a key it cannot honour is refused naming it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from fulu_nas import RoutingStrategy, create_ultimate_pimoe_system, create_ultimate_pimoe_system_from_config
from fulu_nas.system_config import system_arguments

ROOT = Path(__file__).resolve().parents[1]


def spec_config() -> dict:
    """The configuration block as docs/system.md gives it (the spec's, key for key)."""
    page = (ROOT / "docs" / "system.md").read_text()
    start = page.index("<!-- file: fulu.yaml -->\n```yaml\n") + len("<!-- file: fulu.yaml -->\n```yaml\n")
    return yaml.safe_load(page[start:page.index("```", start)])


def with_keys(**sections) -> dict:
    """The spec's configuration with ``sections``' keys set (a value None: the key removed)."""
    config = copy.deepcopy(spec_config())
    for section, keys in sections.items():
        block = config["fulu"].setdefault(section, {})
        for key, value in keys.items():
            if value is None:
                block.pop(key, None)
            else:
                block[key] = value
    return config


def same_system(a, b) -> None:
    """Two systems built alike: the same features, router and layer configuration, and the same output of
    the same weights on the same input."""
    assert a.system_stats()["features"] == b.system_stats()["features"]
    assert a.layer.cfg == b.layer.cfg
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, a.layer.cfg.hidden_size)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_the_spec_configuration_builds_the_system_its_keys_name(tmp_path):
    """Every key of the spec's block is mapped: the attention router, the advanced level, every feature on
    (dynamic scaling, the shared expert, the search-space description, grouped dispatch, hardware)."""
    path = tmp_path / "fulu.yaml"
    path.write_text(yaml.safe_dump(spec_config()))
    assert system_arguments(path) == dict(
        hidden_size=512, num_experts=8, routing_strategy="attention_based", optimization_level="advanced",
        enable_all_features=True, enable_dynamic_scaling=True, enable_cross_expert_communication=True,
        enable_neural_architecture_search=True, enable_hardware_optimization=True,
        enable_performance_optimization=True)
    from_file = create_ultimate_pimoe_system_from_config(path)
    assert from_file.layer.cfg.router == "attention" and from_file.layer.cfg.num_shared_experts == 1
    same_system(from_file, create_ultimate_pimoe_system(
        hidden_size=512, num_experts=8, routing_strategy=RoutingStrategy.ATTENTION_BASED,
        optimization_level="advanced", enable_all_features=True))
    # the parsed mapping, and keyword arguments over the file's
    smaller = create_ultimate_pimoe_system_from_config(spec_config(), num_experts=4, hidden_size=64)
    assert (smaller.layer.cfg.num_experts, smaller.layer.cfg.hidden_size) == (4, 64)


@pytest.mark.parametrize("key, argument, feature", [
    ("dynamic_expert_scaling", "enable_dynamic_scaling", "dynamic_scaling"),
    ("cross_expert_communication", "enable_cross_expert_communication", "cross_expert_communication"),
    ("neural_architecture_search", "enable_neural_architecture_search", "neural_architecture_search"),
    ("adaptive_learning", "enable_adaptive_learning", "adaptive_learning"),
])
def test_a_routing_feature_switched_off_is_off_beside_all_features(key, argument, feature):
    config = with_keys(advanced_routing={key: False}, ultimate_pimoe={"hidden_size": 64})
    assert system_arguments(config)[argument] is False
    features = create_ultimate_pimoe_system_from_config(config).system_stats()["features"]
    assert features[feature] is False
    assert all(on for name, on in features.items() if name != feature)


def test_the_dispatch_flags_are_one_switch_and_hardware_its_own():
    off = {name: False for name in ("memory_optimization", "computational_optimization", "parallel_processing",
                                    "intelligent_caching")}
    config = with_keys(performance_optimization={**off, "hardware_optimization": False},
                       ultimate_pimoe={"hidden_size": 64})
    system = create_ultimate_pimoe_system_from_config(config)
    features = system.system_stats()["features"]
    assert features["performance_optimization"] is False and features["hardware_optimization"] is False
    assert system.layer.cfg.impl == "loop"  # the per-expert loop, whatever the level


@pytest.mark.parametrize("flags, strategy", [({"attention_based_router": False, "hierarchical_router": True},
                                              RoutingStrategy.HIERARCHICAL),
                                             ({"attention_based_router": None, "hierarchical_router": None,
                                               "hash_router": True}, RoutingStrategy.HASH)])
def test_the_one_router_enabled_is_the_strategy_when_none_is_named(flags, strategy):
    config = with_keys(advanced_routing=flags, ultimate_pimoe={"hidden_size": 64})
    del config["fulu"]["ultimate_pimoe"]["routing_strategy"]
    assert system_arguments(config)["routing_strategy"] is strategy
    system = create_ultimate_pimoe_system_from_config(config)
    assert system.layer.cfg.router == {RoutingStrategy.HIERARCHICAL: "hierarchical",
                                       RoutingStrategy.HASH: "hash"}[strategy]


BAD = [
    (with_keys(), None, "fulu.extra: not a section"),  # replaced below: a section the block does not have
    (with_keys(advanced_routing={"attention_router": True}), None, "fulu.advanced_routing.attention_router: not a key"),
    (with_keys(ultimate_pimoe={"num_expert": 8}), None,
     "fulu.ultimate_pimoe.num_expert: neither an argument of create_ultimate_pimoe_system nor a MoEConfig field"),
    (with_keys(advanced_routing={"dynamic_expert_scaling": "false"}), None,
     "fulu.advanced_routing.dynamic_expert_scaling: must be true or false, got 'false'"),
    (with_keys(ultimate_pimoe={"enable_dynamic_scaling": False}), None,
     "fulu.advanced_routing.dynamic_expert_scaling: true, but fulu.ultimate_pimoe.enable_dynamic_scaling sets "
     "enable_dynamic_scaling to false"),
    (with_keys(performance_optimization={"intelligent_caching": False}), None,
     "fulu.performance_optimization: memory_optimization, computational_optimization, parallel_processing true but "
     "intelligent_caching false"),
    (with_keys(advanced_routing={"attention_based_router": False}), None,
     "fulu.ultimate_pimoe.routing_strategy: attention_based, but fulu.advanced_routing does not enable its router "
     "(attention_based_router: false; enabled: hierarchical)"),
    (with_keys(ultimate_pimoe={"routing_strategy": "topk"}, advanced_routing={"hierarchical_router": None}), None,
     "fulu.ultimate_pimoe.routing_strategy: topk, but fulu.advanced_routing does not enable its router "
     "(top_k_router is not given; enabled: attention_based)"),
    (with_keys(ultimate_pimoe={"routing_strategy": None},
               advanced_routing={"attention_based_router": None, "hierarchical_router": None, "top_k_router": False}),
     None, "fulu.advanced_routing: enables no router (top_k_router: false)"),
    (with_keys(ultimate_pimoe={"enable_dynamic_scaling": 1}), None,
     "fulu.advanced_routing.dynamic_expert_scaling: true, but fulu.ultimate_pimoe.enable_dynamic_scaling sets "
     "enable_dynamic_scaling to 1"),
    ({"fulu": {1: {}, "ultimate_pimoe": {}}}, None, "fulu.1: not a section of the configuration"),
    (with_keys(ultimate_pimoe={"routing_strategy": None}), None, "fulu.advanced_routing: enables 2 routers"),
    (with_keys(ultimate_system={"monitoring": False}), None,
     "fulu.ultimate_system.monitoring: false, but it cannot be switched off"),
    ({"fulu": {"ultimate_pimoe": [512, 8]}}, None, "fulu.ultimate_pimoe: must map keys to values, got list"),
    ({"pimoe": {}}, None, "no top-level 'fulu:' block"),
    (None, "fulu:\n  ultimate_pimoe:\n    hidden_size: [512\n",
     "malformed YAML: expected ',' or ']', but got '<stream end>' at line 4"),
    (None, "- fulu\n", "no top-level 'fulu:' block"),
    # PyYAML keeps the last of a key given twice: the file's first setting was dropped without a word
    (None, "fulu:\n  ultimate_pimoe:\n    hidden_size: 32\n    routing_strategy: hash\n    routing_strategy: topk\n",
     "malformed YAML: the key 'routing_strategy' given a second time at line 5, column 5 (while constructing a "
     "mapping at line 3, column 5)"),
    (None, "fulu:\n  ultimate_pimoe: {hidden_size: 32}\nfulu: {}\n", "the key 'fulu' given a second time at line 3"),
]
BAD[0] = ({"fulu": {**spec_config()["fulu"], "extra": {}}}, None, "fulu.extra: not a section of the configuration")


@pytest.mark.parametrize("config, text, message", BAD)
def test_a_key_the_system_cannot_honour_is_refused_naming_it(config, text, message, tmp_path):
    if text is not None:
        config = tmp_path / "fulu.yaml"
        config.write_text(text)
    with pytest.raises(ValueError) as refused:
        create_ultimate_pimoe_system_from_config(config)
    assert message in str(refused.value), str(refused.value)
    if text is not None:
        assert str(config) in str(refused.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'none.yaml'}: no such file"):
        create_ultimate_pimoe_system_from_config(tmp_path / "none.yaml")


def test_the_functions_checks_still_apply_to_the_files_values():
    """A value the function refuses (a size that is no positive int) is its own ValueError."""
    with pytest.raises(ValueError, match="hidden_size"):
        create_ultimate_pimoe_system_from_config(with_keys(ultimate_pimoe={"hidden_size": -1}))
