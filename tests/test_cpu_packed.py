"""CPU inference with prepacked expert weights (fulu_nas.moe.cpu_packed: oneDNN, and the streaming
kernel of cpu_stream for few rows per expert): equal to the per-expert loop, taken only where it
applies, and following weight updates."""

from __future__ import annotations

import pytest
import torch

from fulu_nas.moe import GroupedExperts, cpu_packed, cpu_stream

from .helpers import make_layer

pytestmark = pytest.mark.skipif(not cpu_packed.available(), reason="this torch has no oneDNN operators")

OPTIONS = {
    "plain": {},
    "gelu_bias_shared": {"activation": "gelu", "expert_bias": True, "num_shared_experts": 1},
    "capacity": {"capacity_factor": 0.5},
    "idle_experts": {"num_experts": 32},
}


@pytest.fixture(params=["onednn", "stream"])
def cpu_path(request, monkeypatch) -> str:
    """Both packed paths: oneDNN (the streaming kernel's row limit at 0) and, where it builds here,
    the streaming kernel (these tests' few rows per expert are within its limit)."""
    if request.param == "onednn":
        monkeypatch.setattr(cpu_stream, "MAX_MEAN_ROWS", 0)
    elif cpu_stream.kernel() is None:
        pytest.skip("the streaming kernel does not build here")
    return request.param


@pytest.fixture
def packed_calls(monkeypatch, cpu_path) -> list[int]:
    """How many times the packed experts ran (rows per call)."""
    calls: list[int] = []
    original = GroupedExperts._forward_packed

    def spy(experts, x_ND, counts, weight_N):
        calls.append(x_ND.shape[0])
        return original(experts, x_ND, counts, weight_N)

    monkeypatch.setattr(GroupedExperts, "_forward_packed", spy)
    return calls


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("option", OPTIONS)
def test_packed_experts_equal_the_loop(router, option, packed_calls):
    layer = make_layer(router, **OPTIONS[option]).eval()
    if layer.experts.b13_EF2 is not None:  # non-zero biases, so that they are checked
        torch.nn.init.normal_(layer.experts.b13_EF2)
        torch.nn.init.normal_(layer.experts.b2_ED)
    x = torch.randn(2, 9, 32)
    ids = torch.randint(0, 100, (2, 9))
    with torch.inference_mode():
        fast = layer(x, token_ids=ids, impl="grouped")[0]
        ref = layer(x, token_ids=ids, impl="loop")[0]
    assert packed_calls, "the packed path ran"
    assert relative_error(fast, ref) < 1e-5


def test_packed_weights_follow_updates(packed_calls):
    """After an optimizer step (in place) and after load_state_dict, the packed path uses the new
    weights."""
    layer = make_layer("topk")
    x = torch.randn(16, 32)

    def check():
        layer.eval()
        with torch.inference_mode():
            assert relative_error(layer(x)[0], layer(x, impl="loop")[0]) < 1e-5
        layer.train()

    check()
    before = len(packed_calls)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    out, stats = layer(x)
    (out.square().sum() + stats["balance_loss"]).backward()
    assert len(packed_calls) == before, "training takes the autograd path"
    opt.step()
    check()
    layer.load_state_dict(make_layer("topk", seed=7).state_dict())
    check()
    # dynamic experts replace the parameters (same shapes here: a clone in place of a drop)
    layer.remap_experts([0, 1, 2, 3, 4, 5, 6, 6])
    check()
    assert len(packed_calls) == before + 3


def test_packed_path_only_for_fp32_inference_on_the_cpu():
    x = torch.randn(4, 32)
    assert cpu_packed.applies(x, needs_grad=False)
    assert not cpu_packed.applies(x, needs_grad=True)
    assert not cpu_packed.applies(x.double(), needs_grad=False)
    assert not cpu_packed.applies(x.bfloat16(), needs_grad=False)



@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
def test_packed_linear_equals_the_product(rows):
    """Few rows are padded for oneDNN's faster kernel; the result has exactly the rows given."""
    w_OI, b_O, x_NI = torch.randn(48, 32), torch.randn(48), torch.randn(rows, 32)
    packed = torch.ops.mkldnn._reorder_linear_weight(w_OI, 16)
    out = cpu_packed.linear(x_NI, packed, b_O)
    assert out.shape == (rows, 48)
    torch.testing.assert_close(out, x_NI @ w_OI.T + b_O, rtol=1e-5, atol=1e-5)
