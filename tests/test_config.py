"""MoEConfig validation: impossible architectures are refused, naming the field."""

from __future__ import annotations

import pytest

from fulu_nas.moe import MoEConfig


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"top_k": 9, "num_experts": 8}, "top_k"),
    ({"router": "bogus"}, "router"),
    ({"hidden_size": 30}, "hidden_size"),
    ({"expert_ffn_size": 0}, "expert_ffn_size"),
    ({"router": "attention", "hidden_size": 48, "attention_heads": 5}, "attention_heads"),
    ({"router": "hierarchical", "hierarchy_depth": 2, "num_experts": 7, "top_k": 1}, "hierarchy_depth"),
    ({"router": "hierarchical", "hierarchy_depth": 2, "hierarchy_groups": (3,), "hierarchy_topk_groups": (1,)},
     "num_experts"),
    ({"router": "hierarchical", "hierarchy_depth": 2, "hierarchy_groups": (4,), "hierarchy_topk_groups": (1,),
      "top_k": 4}, "hierarchy_topk_groups"),
    ({"top_p": 0.5, "score_func": "sigmoid"}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"router": "hash", "top_p": 0.5}, "top_p"),
    ({"capacity_factor": 0}, "capacity_factor"),
    ({"activation": "relu"}, "activation"),
    ({"score_func": "tanh"}, "score_func"),
    ({"impl": "magic"}, "impl"),
    ({"aux_loss_coef": -1}, "aux_loss_coef"),
    ({"num_shared_experts": 1, "shared_expert_ffn_size": 12}, "shared_expert_ffn_size"),
])
def test_impossible_configs_name_the_field(kwargs, named):
    with pytest.raises(ValueError, match=named):
        MoEConfig(**kwargs)


def test_every_problem_is_listed():
    with pytest.raises(ValueError) as e:
        MoEConfig(router="nope", activation="relu", top_k=0)
    for word in ("router", "activation", "top_k"):
        assert word in str(e.value)


def test_round_trip_through_a_plain_dict():
    cfg = MoEConfig(router="hierarchical", num_experts=16, hierarchy_depth=3, top_k=2)
    d = cfg.to_dict()
    assert d["hierarchy_groups"] == [4, 2] or d["hierarchy_groups"] == [2, 4] or len(d["hierarchy_groups"]) == 2
    again = MoEConfig.from_dict(d)
    assert again == cfg and hash(again) == hash(cfg)
    with pytest.raises(ValueError, match="unknown MoE config keys: nonsense"):
        MoEConfig.from_dict({**d, "nonsense": 1})


def test_expert_choice_capacity_defaults_to_top_k():
    cfg = MoEConfig(router="expert_choice", num_experts=8, top_k=2)
    assert cfg.expert_capacity(64) == 16
    assert MoEConfig(router="expert_choice", num_experts=8, capacity_factor=100.0).expert_capacity(10) == 10
    assert MoEConfig(capacity_factor=1.25, num_experts=8, top_k=2).expert_capacity(64) == 20


def test_a_huge_expert_count_is_refused_at_once():
    """Validation must not hang on absurd sizes: the hierarchy's factorisation used to try every
    divisor up to num_experts (10**12 experts: hours)."""
    import subprocess
    import sys

    code = ("from fulu_nas.moe import MoEConfig\n"
            "try:\n    MoEConfig(router='hierarchical', hierarchy_depth=2, num_experts=10**12)\n"
            "except ValueError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "num_experts must be >= 1 and at most 16777216" in done.stdout
    cfg = MoEConfig(router="hierarchical", hierarchy_depth=3, num_experts=2**24, top_k=2)
    assert cfg.hierarchy_groups == (256, 256)
