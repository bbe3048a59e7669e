"""fp32 CPU inference with the rows per expert read on the host (GroupedExperts._forward_cpu): the
streaming kernel of cpu_stream for few rows per expert, else oneDNN with prepacked weights
(fulu_nas.moe.cpu_packed) for large experts or torch's grouped GEMM in chunks of experts for
small ones. Each equals the per-expert loop, is taken only where it applies, and follows weight
updates."""

from __future__ import annotations

import pytest
import torch

from fulu_nas.moe import GroupedExperts, MoEConfig, PiMoELayer, cpu_packed, cpu_stream
from fulu_nas.moe import experts as experts_module

from .helpers import make_layer

pytestmark = pytest.mark.skipif(not cpu_packed.available(), reason="this torch has no oneDNN operators")

OPTIONS = {
    "plain": {},
    "gelu_bias_shared": {"activation": "gelu", "expert_bias": True, "num_shared_experts": 1},
    "capacity": {"capacity_factor": 0.5},
    "idle_experts": {"num_experts": 32},
}


@pytest.fixture(params=["onednn", "chunked", "stream"])
def cpu_path(request, monkeypatch) -> str:
    """The three CPU paths: oneDNN (the streaming kernel's row limit at 0, every expert size taken
    as large), grouped GEMMs in chunks (no expert large; chunks of about 24 rows here, so that a
    call makes several) and, where it builds here, the streaming kernel (these tests' few rows per
    expert are within its limit)."""
    if request.param in ("onednn", "chunked"):
        monkeypatch.setattr(cpu_stream, "MAX_MEAN_ROWS", 0)
        large = request.param == "onednn"
        monkeypatch.setattr(experts_module, "ONEDNN_MIN_WEIGHT", 0 if large else 2**62)
        monkeypatch.setattr(experts_module, "CHUNK_ELEMENTS", 24 * 128)
    elif cpu_stream.kernel() is None:
        pytest.skip("the streaming kernel does not build here")
    return request.param


@pytest.fixture
def path_calls(monkeypatch) -> dict[str, list[int]]:
    """The rows of each call of the CPU experts, and of its chunked and oneDNN paths."""
    calls: dict[str, list[int]] = {"cpu": [], "chunked": [], "onednn": []}

    def spy(name, original):
        def wrapped(experts, x_ND, *args, **kwargs):
            calls[name].append(x_ND.shape[0])
            return original(experts, x_ND, *args, **kwargs)
        return wrapped

    for name, method in (("cpu", "_forward_cpu"), ("chunked", "_forward_chunked")):
        monkeypatch.setattr(GroupedExperts, method, spy(name, getattr(GroupedExperts, method)))
    linear = cpu_packed.linear

    def spy_linear(x_ND, *args):
        calls["onednn"].append(x_ND.shape[0])
        return linear(x_ND, *args)

    monkeypatch.setattr(cpu_packed, "linear", spy_linear)
    return calls


@pytest.fixture
def packed_calls(path_calls, cpu_path) -> list[int]:
    """How many times the CPU experts ran (rows per call), after checking that each call took
    ``cpu_path``."""
    yield path_calls["cpu"]
    took = {"onednn": bool(path_calls["onednn"]), "chunked": bool(path_calls["chunked"])}
    assert took == {"onednn": cpu_path == "onednn", "chunked": cpu_path == "chunked"}, took


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




@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_packed_weights_follow_a_fused_optimizer_step(packed_calls, optimizer):
    """torch's fused optimizers (``fused=True``) write the parameters without moving their version
    counters: after such a step the experts computed with the old weights (the router with the new),
    a relative error near 1."""
    layer = make_layer("topk")
    opt = getattr(torch.optim, optimizer)(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(16, 32)
    for _ in range(2):  # packed, trained one fused step, packed again
        layer.eval()
        with torch.inference_mode():
            assert relative_error(layer(x)[0], layer(x, impl="loop")[0]) < 1e-5
        layer.train()
        out, stats = layer(x)
        (out.square().sum() + stats["balance_loss"]).backward()
        opt.step()
        opt.zero_grad()
    assert len(packed_calls) == 2


def test_the_router_weights_split_follows_a_fused_optimizer_step():
    """The router weight's bf16 split (what CUDA's bf16 logits multiply by, kept between calls) was keyed
    on the weight's version counter, which a fused optimizer step leaves as it was: the router went on
    with the old weights."""
    from fulu_nas.moe import routing

    weight = torch.nn.Parameter(torch.randn(8, 32))
    opt = torch.optim.AdamW([weight], lr=0.1, fused=True)
    routing._split_weight(weight)
    weight.grad = torch.randn_like(weight)
    opt.step()
    torch.testing.assert_close(routing._split_weight(weight), torch.cat(routing.split_bf16(weight.detach())),
                               rtol=0, atol=0)

def test_a_layer_made_under_inference_mode_takes_its_packed_paths(packed_calls):
    """Weights created under ``torch.inference_mode()`` (a model built or loaded there to serve) have
    no version counter: the packed copies' key read it and every packed path raised."""
    with torch.inference_mode():
        layer = make_layer("topk").eval()
        x = torch.randn(16, 32)
        assert layer.experts.w13_EDF2.is_inference()
        fast, ref = layer(x)[0], layer(x, impl="loop")[0]
        assert relative_error(fast, ref) < 1e-5
        assert packed_calls, "the packed path ran"
        # a replaced weight is seen (the key is the tensor itself and its storage)
        layer.experts.w2_EFD = torch.nn.Parameter(layer.experts.w2_EFD * 2, requires_grad=False)
        assert relative_error(layer(x)[0], layer(x, impl="loop")[0]) < 1e-5
        assert relative_error(layer(x)[0], fast) > 0.1
        # a load writes the weights in place, unseen by the copies' key: the experts drop them
        layer.load_state_dict(make_layer("topk", seed=7).state_dict())
        assert relative_error(layer(x)[0], layer(x, impl="loop")[0]) < 1e-5

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


def _experts(activation: str, bias: bool, num_experts: int = 6, hidden: int = 32, ffn: int = 48) -> GroupedExperts:
    from fulu_nas.moe import MoEConfig

    experts = GroupedExperts(MoEConfig(hidden_size=hidden, num_experts=num_experts, expert_ffn_size=ffn,
                                       activation=activation, expert_bias=bias))
    if bias:
        torch.nn.init.normal_(experts.b13_EF2)
        torch.nn.init.normal_(experts.b2_ED)
    return experts.eval()


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 5, 40, 10**6])
def test_chunked_grouped_gemms_equal_each_expert(monkeypatch, activation, bias, chunk_rows):
    """Chunks of one expert, of several, an expert larger than a chunk, experts without rows (first,
    inside, last) and one chunk for all: the rows each expert computes, times their weights."""
    experts = _experts(activation, bias)
    monkeypatch.setattr(experts_module, "CHUNK_ELEMENTS", chunk_rows * experts.w13_EDF2.shape[2])
    counts = [0, 7, 0, 30, 3, 0]
    x_ND, weight_N = torch.randn(sum(counts), 32), torch.rand(sum(counts))
    expert_N = torch.repeat_interleave(torch.arange(6), torch.tensor(counts))
    with torch.inference_mode():
        out = experts._forward_chunked(x_ND, counts, expert_N if bias else None, weight_N)
        ref = torch.cat([experts.expert(e, rows) for e, rows in enumerate(x_ND.split(counts))]) * weight_N[:, None]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_chunked_grouped_gemms_without_rows():
    experts = _experts("gelu", False)
    with torch.inference_mode():
        out = experts._forward_chunked(torch.empty(0, 32), [0] * 6, None, torch.empty(0))
    assert out.shape == (0, 32)


@pytest.mark.parametrize(("hidden", "ffn", "path"), [(64, 96, "chunked"), (512, 2048, "onednn")])
def test_large_experts_take_onednn_and_small_ones_the_chunks(path_calls, hidden, ffn, path):
    """Past the streaming kernel's rows, experts of hidden x width >= ONEDNN_MIN_WEIGHT run through
    oneDNN, smaller ones through the chunked grouped GEMMs; both equal each expert's rows."""
    experts = _experts("gelu", False, num_experts=2, hidden=hidden, ffn=ffn)
    counts = [cpu_stream.MAX_MEAN_ROWS + 8] * 2
    x_ND = torch.randn(sum(counts), hidden)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    with torch.inference_mode():
        out = experts.forward_grouped(x_ND, offsets, None, None)
        ref = torch.cat([experts.expert(e, rows) for e, rows in enumerate(x_ND.split(counts))])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert bool(path_calls["onednn"]) == (path == "onednn") and bool(path_calls["chunked"]) == (path == "chunked")


def test_cpu_paths_benchmark_times_every_path_and_names_the_rules_pick():
    """benchmarks/cpu_experts_paths.py: every path of a shape is a time (each checked against the
    loop first), the streaming kernel only up to 64 rows per expert, and the rule's pick named."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_experts_paths.py"
    done = subprocess.run([sys.executable, str(script), "--rounds", "1", "--min-ms", "1",
                           "--shapes", "32,4,16,2,256", "32,4,16,2,16"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| H=")]
    assert len(rows) == 2
    many, few = ([cell.strip() for cell in row.strip("|").split("|")] for row in rows)
    assert many[1] == "128" and many[2] == "-" and re.fullmatch(r"[\d.]+ \(chunked\)", many[6])
    assert few[1] == "8" and re.fullmatch(r"[\d.]+ \((stream|chunked)\)", few[6])
    assert all(float(cell) > 0 for cell in many[3:6] + few[3:6])


@pytest.mark.parametrize("size", [(32, 64), (512, 1024)], ids=["streaming", "onednn"])
def test_a_layer_converts_and_loads_under_torchs_swap_on_conversion_after_a_packed_call(size):
    """With torch.__future__.set_swap_module_params_on_conversion(True), conversions and loads swap each
    parameter's tensor (torch.utils.swap_tensors), which refuses a tensor with a weak reference: after one
    fp32 inference call had packed the experts' weights (whose cache keeps weak references to them), .to(),
    .half(), load_state_dict and the rest failed with "Couldn't swap GroupedExperts.w13_EDF2"."""
    hidden, ffn = size
    torch.manual_seed(0)
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer = PiMoELayer(MoEConfig(hidden_size=hidden, num_experts=4, expert_ffn_size=ffn)).eval()
        other = PiMoELayer(layer.cfg).eval()
        x = torch.randn(8, hidden)
        with torch.no_grad():
            layer(x)  # packs the experts' weights for the CPU kernels
        layer.load_state_dict(other.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(layer(x)[0], other(x)[0], rtol=0, atol=0)  # the loaded weights, not stale
        layer.to(torch.bfloat16)
        assert layer.experts.w13_EDF2.dtype == torch.bfloat16
        with torch.no_grad():
            layer.float()(x)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def test_the_routers_kept_split_is_dropped_before_torch_swaps_its_gate():
    """The router's bf16 split of its fp32 gate (kept between eager calls, keyed by a weak reference to the
    gate's weight) made the gate's tensor unswappable under torch's swap_module_params_on_conversion: .to()
    and load_state_dict failed ("Cannot swap t1 because it has weakref associated with it")."""
    from fulu_nas.moe.routing import _SPLIT_WEIGHTS, _split_weight

    torch.manual_seed(0)
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer, other = (PiMoELayer(MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=64)) for _ in range(2))
        _split_weight(layer.router.gate.weight)  # as an eager bf16 call on a GPU keeps it
        assert layer.router.gate.weight in _SPLIT_WEIGHTS
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer.router.gate.weight, other.router.gate.weight)
        _split_weight(layer.router.gate.weight)
        layer.to(torch.bfloat16)
        assert layer.router.gate.weight.dtype == torch.float32  # a router's weights stay fp32
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
