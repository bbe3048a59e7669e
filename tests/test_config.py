"""MoEConfig validation: impossible architectures are refused, naming the field; the layer refuses
inputs it cannot take, naming them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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
    # accepted and without effect: the layer was the one without them
    ({"router": "topk", "hierarchy_depth": 3}, "hierarchy_depth, hierarchy_groups and hierarchy_topk_groups "
                                               "apply to the hierarchical router, not 'topk'"),
    ({"router": "expert_choice", "attention_context": True}, "attention_context applies to the attention "
                                                             "router, not 'expert_choice'"),
    ({"capacity_factor": 0}, "capacity_factor"),
    ({"activation": "relu"}, "activation"),
    ({"score_func": "tanh"}, "score_func"),
    ({"impl": "magic"}, "impl"),
    ({"aux_loss_coef": -1}, "aux_loss_coef"),
    ({"num_shared_experts": 1, "shared_expert_ffn_size": 12}, "shared_expert_ffn_size"),
    # each of these was accepted, then failed inside torch or gave non-finite outputs
    ({"num_shared_experts": 1, "shared_expert_ffn_size": -8}, "shared_expert_ffn_size must be a positive multiple"),
    ({"capacity_factor": math.inf}, "capacity_factor must be a finite number or null, got inf"),
    ({"router_jitter": math.inf}, "router_jitter must be a finite number"),
    ({"routed_scaling_factor": math.inf}, "routed_scaling_factor must be a finite number"),
    ({"aux_loss_coef": math.inf}, "aux_loss_coef must be a finite number"),
    ({"z_loss_coef": math.inf}, "z_loss_coef must be a finite number"),
    ({"bias_update_rate": math.inf}, "bias_update_rate must be a finite number"),
    ({"router": "hierarchical", "hierarchy_groups": (2,)}, "hierarchy_groups and hierarchy_topk_groups need "
                                                           "hierarchy_depth > 1"),
    ({"hidden_size": "16"}, "hidden_size must be an integer, got '16'"),
    ({"hidden_size": 16.0}, "hidden_size must be an integer, got 16.0"),
    ({"top_k": 1.5}, "top_k must be an integer, got 1.5"),
    ({"num_experts": None}, "num_experts must be an integer, got None"),
    ({"hierarchy_groups": ("a",)}, "hierarchy_groups must be a list of integers"),
    ({"hierarchy_groups": None}, "hierarchy_groups must be a list of integers"),
    ({"hash_seed": 2**70}, r"hash_seed must be in \[0, 2\*\*63\)"),
    ({"hash_seed": 1.5}, "hash_seed must be an integer"),
    ({"renormalize": "no"}, "renormalize must be true or false, got 'no'"),  # was taken as true
    ({"router": 3}, "router must be a string"),
    # accepted, then the forward overflowed (a capacity of 10**300 slots) or torch failed to allocate
    ({"capacity_factor": 1e300}, r"capacity_factor must be > 0 and at most 1048576, got 1e\+300"),
    # past fp32's range: the jitter failed inside torch naming no field, the output or the loss became inf
    ({"router_jitter": 1e39}, r"router_jitter must be in \[0, 1\)"),
    ({"router_jitter": 1.0}, r"router_jitter must be in \[0, 1\)"),  # a multiplier of 0 (or < 0 above 1)
    ({"routed_scaling_factor": 1e39}, "routed_scaling_factor must be > 0 and at most 1048576"),
    ({"z_loss_coef": 1e39}, "z_loss_coef must be >= 0 and at most 1048576"),
    ({"aux_loss_coef": 1e39}, "aux_loss_coef must be >= 0 and at most 1048576"),
    ({"bias_update_rate": 1e39}, "bias_update_rate must be >= 0 and at most 1048576"),
    ({"hidden_size": 2**70}, r"hidden_size must be a positive multiple of 8 \(.*\) and at most 1048576"),
    ({"expert_ffn_size": 2**40}, r"expert_ffn_size must be a positive multiple of 8 \(.*\) and at most 1048576"),
    ({"num_shared_experts": 1, "shared_expert_ffn_size": 2**40}, "shared_expert_ffn_size must be a positive "
                                                                 "multiple of 8 and at most 1048576"),
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
    with pytest.raises(ValueError, match="unknown MoE config keys: 1, nonsense"):  # was a join's TypeError
        MoEConfig.from_dict({**d, "nonsense": 1, 1: 2})


@pytest.mark.parametrize("given", [None, "hidden_size", {"hidden_size": 32}])
def test_a_config_of_the_wrong_type_is_one_type_error(given):
    """A dict (from YAML or JSON) where a config object is taken failed with an AttributeError from deep
    inside the build ('dict' object has no attribute 'router'); from_dict of a string took its characters for
    keys ("unknown MoE config keys: _, d, e, h, ...")."""
    from fulu_nas.models import PiMoETransformer
    from fulu_nas.moe import PiMoELayer

    with pytest.raises(TypeError, match=f"PiMoELayer takes a MoEConfig .* got {type(given).__name__}"):
        PiMoELayer(given)
    with pytest.raises(TypeError, match=f"PiMoETransformer takes an ArchConfig .* got {type(given).__name__}"):
        PiMoETransformer(given)
    if not isinstance(given, dict):
        with pytest.raises(TypeError, match=f"from_dict takes a mapping .* got {type(given).__name__}"):
            MoEConfig.from_dict(given)


def test_expert_choice_capacity_defaults_to_top_k():
    cfg = MoEConfig(router="expert_choice", num_experts=8, top_k=2)
    assert cfg.expert_capacity(64) == 16
    assert MoEConfig(router="expert_choice", num_experts=8, capacity_factor=100.0).expert_capacity(10) == 10
    assert MoEConfig(capacity_factor=1.25, num_experts=8, top_k=2).expert_capacity(64) == 20


@pytest.mark.parametrize("factor,tokens,want", [(1.0005, 32768, 8197), (0.0004, 32768, 4), (0.0004, 262144, 27),
                                                 (1 / 3, 30, 3), (2.5, 10, 7)])
def test_the_capacity_is_the_documented_ceiling(factor, tokens, want):
    """ceil(cf * T * k / E): the factor was rounded to a fraction of denominator 1,000 at most, so
    1.0005 acted as 1.0 and 0.0004 as 0 (capacity 1)."""
    assert want == math.ceil(factor * tokens * 2 / 8 - 1e-9)
    assert MoEConfig(capacity_factor=factor, num_experts=8, top_k=2).expert_capacity(tokens) == want


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_the_capacity_never_exceeds_the_tokens(router):
    """An expert takes a token once at most: a larger capacity drops nothing more (a factor of 10**6 with
    8 experts asked for 250,000 slots of 10 tokens)."""
    cfg = MoEConfig(router=router, num_experts=8, top_k=2, capacity_factor=2.0**20)
    assert cfg.expert_capacity(10) == 10
    assert cfg.expert_capacity(1) == 1


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


def test_numpy_integers_are_taken_as_ints():
    cfg = MoEConfig(hidden_size=np.int64(16), num_experts=np.int32(4), expert_ffn_size=16, top_k=np.int64(2))
    assert (cfg.hidden_size, cfg.num_experts, cfg.top_k) == (16, 4, 2)
    assert all(type(v) is int for v in (cfg.hidden_size, cfg.num_experts, cfg.top_k))


def test_the_layer_names_what_it_cannot_take():
    """Each used to fail deep inside torch or to pass silently."""
    from fulu_nas.moe import PiMoELayer

    layer = PiMoELayer(MoEConfig(hidden_size=16, num_experts=4, expert_ffn_size=16))
    x = torch.randn(2, 5, 16)
    for bad in (x.long(), x.bool(), x.to(torch.complex64)):  # "Expected mat_a to be Float32 ..." before
        with pytest.raises(TypeError, match=f"input must be a floating-point tensor .* got {bad.dtype}"):
            layer(bad)
    with pytest.raises(TypeError, match="got ndarray"):
        layer(x.numpy())
    with pytest.raises(ValueError, match="impl must be one of"):  # ran the default path
        layer(x, impl="bogus")
    for counts in (torch.tensor(3.0), torch.ones(3), {"tokens_per_expert": torch.ones(4)}):  # a no-op or torch errors
        with pytest.raises(ValueError, match=r"update_expert_bias takes stats\['tokens_per_expert'\], a tensor of "
                                             r"shape \(4,\)"):
            layer.update_expert_bias(counts)
    hashed = PiMoELayer(MoEConfig(hidden_size=16, num_experts=4, expert_ffn_size=16, router="hash"))
    ids = torch.randint(0, 100, (2, 5))
    for bad in (ids.t(), ids[:, :4], ids.float()):  # a transposed one routed each token by another's id
        with pytest.raises(ValueError, match=r"token_ids must be integer ids of shape \(2, 5\)"):
            hashed(x, token_ids=bad)
    assert hashed(x, token_ids=ids)[0].shape == x.shape


@pytest.mark.parametrize("impl", ["grouped", "grouped_mm", "triton", "sorted", "loop"])
def test_a_float64_layer_runs_on_every_path_and_matches_the_loop(impl):
    """float64 (a numerical check, a ``.double()`` model) failed in the grouped GEMMs, which take fp32,
    bf16 and fp16 only; those paths now run it by sorted matmuls."""
    from fulu_nas.moe import PiMoELayer

    torch.manual_seed(0)
    layer = PiMoELayer(MoEConfig(hidden_size=16, num_experts=4, expert_ffn_size=16, top_k=2)).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    out, stats = layer(x, impl=impl)
    want, _ = layer(x, impl="loop")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-7)  # the router's scores are fp32 on every path
    assert torch.isfinite(stats["balance_loss"])


@pytest.mark.parametrize("layer_dtype,input_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                     (torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_shared_experts_take_an_input_of_another_dtype_as_the_routed_experts_do(layer_dtype, input_dtype):
    """The routed experts cast their weights to the input's dtype; the shared experts (plain linear
    layers) failed with a dtype mismatch in the matmul."""
    from fulu_nas.moe import PiMoELayer

    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, num_experts=4, expert_ffn_size=16, top_k=2, num_shared_experts=1,
                    shared_expert_gate=True)
    layer = PiMoELayer(cfg).to(layer_dtype).eval()
    x = torch.randn(3, 5, 16, dtype=input_dtype)
    out, _ = layer(x)
    assert out.dtype == input_dtype
    # the same weights in the input's dtype: the layer cast whole
    same = PiMoELayer(cfg).to(layer_dtype)
    same.load_state_dict(layer.state_dict())
    want, _ = same.to(input_dtype).eval()(x, impl="loop")
    tolerance = 1e-5 if torch.finfo(input_dtype).bits >= 32 else 2e-2
    torch.testing.assert_close(out.float(), want.float(), rtol=tolerance, atol=tolerance)


def test_a_hash_layer_built_on_the_meta_device_routes_as_the_original_once_loaded():
    """The usual way to build a large model without allocating it twice: on the meta device, then
    ``to_empty`` and ``load_state_dict``. The hash router's projections (not in the state dict, a
    function of the seed) stayed uninitialised memory and routed tokens elsewhere."""
    from fulu_nas.moe import PiMoELayer

    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, num_experts=8, expert_ffn_size=16, router="hash")
    layer = PiMoELayer(cfg).eval()
    with torch.device("meta"):
        meta = PiMoELayer(cfg)
    meta = meta.to_empty(device="cpu")
    meta.load_state_dict(layer.state_dict())
    x = torch.randn(64, 16)
    (out, stats), (want, want_stats) = meta.eval()(x), layer(x)
    assert torch.equal(meta.router.planes_DB, layer.router.planes_DB)
    assert torch.equal(stats["tokens_per_expert"], want_stats["tokens_per_expert"])
    torch.testing.assert_close(out, want)
    with torch.device("meta"):  # materialised inside the block too (its default device is meta there)
        inside = PiMoELayer(cfg).to_empty(device="cpu")
    inside.load_state_dict(layer.state_dict())
    assert torch.equal(inside.eval()(x)[1]["tokens_per_expert"], want_stats["tokens_per_expert"])
    moved = PiMoELayer(cfg).to(torch.bfloat16)  # moves keep the projections (fp32, as every router's)
    assert torch.equal(moved.router.planes_DB, layer.router.planes_DB)
    # load_state_dict(assign=True) (torchtitan's, accelerate's way) carries no non-persistent buffer and this
    # router has no parameter to assign: its projections stayed on the meta device and a call without token
    # ids failed ("Tensor on device meta is not on the expected device cpu")
    with torch.device("meta"):
        assigned = PiMoELayer(cfg)
    assigned.load_state_dict(layer.state_dict(), assign=True)
    out, stats = assigned.eval()(x)
    assert torch.equal(stats["tokens_per_expert"], want_stats["tokens_per_expert"])
    torch.testing.assert_close(out, want)
    assert torch.equal(assigned.router.planes_DB, layer.router.planes_DB)
