"""ArchConfig and PiMoETransformer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fulu_nas.errors import FuluConfigError
from fulu_nas.models import ArchConfig, PiMoETransformer, seeded_model
from fulu_nas.moe import MoEConfig

from .helpers import make_config


def arch(**kw) -> ArchConfig:
    base = dict(vocab_size=50, max_seq_len=16, num_layers=2, hidden_size=32, num_heads=4, dense_ffn_size=64,
                moe=MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=32))
    base.update(kw)
    return ArchConfig(**base)


def test_round_trip_and_stable_hash():
    a = arch(moe_every=2, num_classes=7)
    assert ArchConfig.from_dict(a.to_dict()) == a
    assert ArchConfig.from_yaml(a.to_yaml()) == a
    code = ("from fulu_nas.models import ArchConfig;import sys;"
            "print(ArchConfig.from_yaml(sys.stdin.read()).content_hash())")
    other_process = subprocess.run([sys.executable, "-c", code], input=a.to_yaml(), capture_output=True, text=True)
    assert other_process.stdout.strip() == a.content_hash()
    assert a.with_moe(num_experts=8).content_hash() != a.content_hash()
    # moe.hidden_size may be left out of a YAML/dict: it follows the model's width
    d = a.to_dict()
    del d["moe"]["hidden_size"]
    assert ArchConfig.from_dict(d) == a


@pytest.mark.parametrize(("kw", "named"), [
    ({"hidden_size": 30}, "num_heads"),
    ({"moe": MoEConfig(hidden_size=64, num_experts=4, expert_ffn_size=32)}, "moe.hidden_size"),
    ({"num_layers": 0}, "num_layers"),
    ({"moe_every": 3}, "moe_every"),
])
def test_invalid_architectures_name_the_field(kw, named):
    with pytest.raises(FuluConfigError, match=named):
        arch(**kw)


@pytest.mark.parametrize(("kw", "named"), [
    ({"dense_ffn_size": 10**11}, "dense_ffn_size must be at most"),
    ({"vocab_size": 10**15}, "vocab_size must be at most"),
    ({"num_layers": 10**9}, "num_layers must be at most"),
    ({"max_seq_len": 10**12}, "max_seq_len must be at most"),
    ({"num_classes": 10**12}, "num_classes must be at most"),
])
def test_absurd_sizes_are_refused_before_anything_is_allocated(kw, named):
    # They failed in each trial with the allocator's message, after the study and its runs were made.
    with pytest.raises(FuluConfigError, match=named):
        arch(**kw)


def test_malformed_architecture_input_is_one_config_error():
    import numpy as np

    with pytest.raises(FuluConfigError, match="a mapping"):
        ArchConfig.from_yaml("- 1")
    with pytest.raises(FuluConfigError, match="moe must be a mapping"):
        ArchConfig.from_dict({"moe": 5})
    with pytest.raises(FuluConfigError, match="moe must be a MoEConfig"):
        arch(moe={"num_experts": 4})
    # numpy's floats are taken as floats, as its integers are taken as ints (and as MoEConfig takes both)
    a = arch(norm_eps=np.float32(1e-5), num_layers=np.int64(2))
    assert type(a.norm_eps) is float and a.norm_eps == pytest.approx(1e-5)
    assert ArchConfig.from_yaml(a.to_yaml()) == a


def test_from_dict_reports_unknown_keys_and_bad_moe():
    with pytest.raises(FuluConfigError, match="unknown architecture keys: depth"):
        ArchConfig.from_dict({"depth": 3})
    with pytest.raises(FuluConfigError, match="top_k"):
        ArchConfig.from_dict({"hidden_size": 32, "moe": {"num_experts": 2, "top_k": 3}})


def test_forward_shapes_stats_and_hidden_states():
    a = arch(num_layers=4, moe_every=2)
    model = PiMoETransformer(a)
    assert a.moe_layer_indices == (1, 3) and len(model.moe_layers()) == 2
    tokens = torch.randint(0, 50, (3, 16))
    out = model(tokens)
    assert out.logits.shape == (3, 16, 50)
    assert len(out.hidden_states) == 4 and out.hidden_states[0].shape == (3, 16, 32)
    assert len(out.moe_stats) == 2 and out.moe_stats[0]["tokens_per_expert"].shape == (4,)
    cls = PiMoETransformer(arch(num_classes=5))(tokens)
    assert cls.logits.shape == (3, 16, 5)


def test_lm_head_is_tied_and_model_is_causal():
    model = PiMoETransformer(arch()).eval()
    tokens = torch.randint(0, 50, (2, 16))
    out = model(tokens)
    h = model.norm(out.hidden_states[-1])
    torch.testing.assert_close(out.logits, h @ model.embed.weight.t())
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    torch.testing.assert_close(model(changed).logits[:, :10], out.logits[:, :10])


@pytest.mark.parametrize("router", ["topk", "hash", "hierarchical", "attention", "expert_choice"])
def test_only_expert_choice_lets_a_token_read_later_tokens(router):
    """Why a next-token task refuses expert choice (fulu_nas.search.family.NOT_CAUSAL): with it, the
    logits of the first tokens change when only later tokens do; with every other router they cannot."""
    moe = MoEConfig(hidden_size=32, num_experts=8, expert_ffn_size=32, top_k=2, router=router,
                    attention_context=router == "attention")
    torch.manual_seed(0)
    model = PiMoETransformer(arch(moe=moe)).eval()
    tokens = torch.randint(0, 50, (4, 16))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 7) % 50
    with torch.no_grad():
        before, after = model(tokens).logits[:, :8], model(changed).logits[:, :8]
    if router == "expert_choice":
        assert not torch.equal(before, after)
    else:
        torch.testing.assert_close(after, before)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = PiMoETransformer(arch())
    tokens = torch.randint(0, 50, (2, 16))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        out = model(tokens)
        (out.logits.square().mean() + out.balance_loss).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_parameter_counts_and_flops_by_hand():
    a = arch(num_layers=1, moe=MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=32, top_k=1,
                                         activation="gelu"))
    model = PiMoETransformer(a)
    counts = model.parameter_counts()
    expert = 32 * 32 * 2
    assert counts["total"] - counts["active"] == 3 * expert
    D, S = 32, 16
    attention = 2 * 4 * D * D + 2 * 2 * D * (S + 1) / 2
    moe = 2 * (D * 4 + 1 * 2 * D * 32)
    head = 2 * D * 50
    assert model.flops_per_token(S) == int(attention + moe + head)



@pytest.mark.parametrize("router,extra", [("topk", {}), ("hierarchical", {}), ("expert_choice", {}),
                                          ("attention", {}), ("attention", {"attention_context": True})])
def test_a_layers_flops_are_what_torch_counts(router, extra):
    """The attention router's query projection, and with context its projections and the causal
    attention over the sequence, were left out (41% of the layer at hidden 64, sequence 64)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fulu_nas.moe import PiMoELayer

    B, S, D, H = 2, 64, 64, 4
    layer = PiMoELayer(MoEConfig(hidden_size=D, num_experts=8, expert_ffn_size=128, top_k=2, router=router,
                                 attention_heads=H, **extra)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(torch.randn(B, S, D), impl="sorted", with_stats=False)
    counted = counter.get_total_flops() / (B * S)
    if extra.get("attention_context"):  # the CPU's attention kernel is not counted: its multiply-adds by hand
        keys = sum(i + 1 for i in range(S)) / S  # causal: token i attends to i + 1 keys
        counted += 2 * 2 * H * keys * (D // H)  # q . k and the weighted sum of v, per head
    assert layer.flops_per_token(S) == pytest.approx(counted, rel=1e-6)

def test_remap_experts_moves_weights_router_rows_and_bias():
    model = PiMoETransformer(arch(moe=MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=32,
                                                bias_update_rate=0.1)))
    layer = model.moe_layers()[0]
    layer.router.expert_bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    w13, gate = layer.experts.w13_EDF2.detach().clone(), layer.router.gate.weight.detach().clone()
    old_param = layer.experts.w13_EDF2
    swaps = layer.remap_experts([3, 1, 1], noise=0.0)
    assert layer.cfg.num_experts == 3 and layer.router.cfg.num_experts == 3
    torch.testing.assert_close(layer.experts.w13_EDF2, w13[[3, 1, 1]])
    torch.testing.assert_close(layer.router.gate.weight, gate[[3, 1, 1]])
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([0.4, 0.2, 0.2]))
    assert any(old is old_param and new is layer.experts.w13_EDF2 and dim == 0 for old, new, dim in swaps)
    assert any(new is layer.router.gate.weight for _, new, _ in swaps)
    assert any(p is layer.experts.w13_EDF2 for p in model.parameters())
    layer.remap_experts([0, 1, 2, 2], noise=0.5)  # the clone's router row moves, the original's does not
    assert not torch.equal(layer.router.gate.weight[3], layer.router.gate.weight[2])
    torch.testing.assert_close(layer.experts.w13_EDF2[3], layer.experts.w13_EDF2[2])
    layer.remap_experts([0, 1, 2], noise=0.0)
    out = model(torch.randint(0, 50, (2, 16)))
    assert out.moe_stats[0]["tokens_per_expert"].shape == (3,)
    with pytest.raises(ValueError, match="top_k"):
        layer.remap_experts([0])


@pytest.mark.parametrize("router", ["topk", "expert_choice", "hash", "hierarchical", "attention"])
def test_seeded_model_is_built_on_the_device_it_is_given(router):
    """Every parameter and buffer is created on the device (nothing built on the CPU and moved: that is
    what made a GPU trial's model take seconds to build); on the CPU, the seed's usual weights."""
    moe = make_config(router, hidden_size=32, expert_ffn_size=16, num_experts=8, top_k=2)
    arch = ArchConfig(vocab_size=64, max_seq_len=16, num_layers=2, hidden_size=32, num_heads=2, moe=moe)
    on_meta = seeded_model(arch, 0, "meta")
    assert {t.device.type for t in [*on_meta.parameters(), *on_meta.buffers()]} == {"meta"}
    torch.manual_seed(0)
    expected = PiMoETransformer(arch)
    got = seeded_model(arch, 0)
    for (name, a), (_, b) in zip(expected.state_dict().items(), got.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_every_architecture_of_the_gpu_space_is_built_on_the_device_it_is_given():
    """The GPU preset's space, sampled through its own code (every router and option it holds), built on
    the meta device: no tensor of any of them is made on the CPU first."""
    import random

    from fulu_nas.search.app import compose_config
    from fulu_nas.search.feasibility import _RandomTrial
    from fulu_nas.search.settings import load_settings
    from fulu_nas.search.space import Infeasible

    s = load_settings(*compose_config(["search_space=gpu", "task=textlm", "task.seq_len=256"]))
    rng, built = random.Random(0), set()
    for _ in range(200):
        try:
            arch = s.space.feasible_arch(s.space.sample(_RandomTrial(rng, {})), s.task)
        except Infeasible:
            continue
        model = seeded_model(arch, 0, "meta")
        assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}, arch
        m = arch.moe
        built.add((m.router, m.num_shared_experts > 0))
    assert {router for router, _ in built} == {"topk", "hash", "hierarchical", "attention"}
    assert {shared for _, shared in built} == {True, False}
