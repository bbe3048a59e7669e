"""The Triton experts (gather and un-permute fused into the grouped GEMMs) and the Triton top-k:
GPU checks against the fp32 reference loop, skipped without CUDA or triton; plus the CPU
fallback of ``impl="triton"``."""

from __future__ import annotations

import pytest
import torch

from fulu_nas.moe import ROUTERS, triton_moe, triton_routing
from fulu_nas.moe.layer import prefer_triton

from .helpers import ROUTE_CASES, make_layer, routing_kernel_mismatches

_skip = pytest.mark.skipif(not (torch.cuda.is_available() and triton_moe.HAS_TRITON),
                           reason="needs a CUDA GPU and triton")


def needs_triton(test):
    return pytest.mark.cuda(_skip(test))

OPTIONS = {
    "plain": {},
    "top_p": {"top_p": 0.6, "top_k": 3},
    "capacity": {"capacity_factor": 0.75},
    "gelu_bias_shared": {"activation": "gelu", "expert_bias": True, "num_shared_experts": 1},
    "sigmoid": {"score_func": "sigmoid", "renormalize": False, "routed_scaling_factor": 2.5},
}
APPLIES = {"top_p": {"topk", "hierarchical", "attention"}, "sigmoid": {"topk", "hierarchical", "attention"},
           "capacity": {"topk", "hash", "hierarchical", "attention"}}
CASES = [(r, o) for o in OPTIONS for r in ROUTERS if r in APPLIES.get(o, ROUTERS)]


def relative_error(a, b):
    """||a - b|| / ||b||; 0 when both are zero (a parameter that gets no gradient in either)."""
    diff = (a.float() - b.float()).norm()
    return 0.0 if diff == 0 else (diff / b.float().norm()).item()


def bf16_and_reference(router, **kw):
    """A bf16 layer on CUDA and an fp32 copy of it (same bf16-representable weights)."""
    fast = make_layer(router, **kw).cuda().to(torch.bfloat16).eval()
    ref = make_layer(router, **kw).cuda().eval()
    ref.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})
    return fast, ref


def run_pair(fast, ref, x, token_ids=None):
    """The Triton path of ``fast`` and the fp32 loop of ``ref`` on the same routing decisions (the
    router's bf16 and fp32 logits may differ in the last bits and flip a near-tie), so only the
    expert arithmetic differs."""
    with torch.inference_mode():
        routing = fast.router(x.reshape(-1, x.shape[-1]), token_ids=token_ids, batch_shape=tuple(x.shape[:-1]))
        ref.router.forward = lambda *args, **kwargs: routing
        out, stats = fast(x, token_ids=token_ids, impl="triton")
        expected, ref_stats = ref(x.float(), token_ids=token_ids, impl="loop")
    assert torch.isfinite(out).all() and out.dtype == x.dtype
    assert torch.equal(stats["tokens_per_expert"], ref_stats["tokens_per_expert"])
    torch.testing.assert_close(stats["dropped_share"], ref_stats["dropped_share"])
    return out, expected, stats


@needs_triton
@pytest.mark.parametrize(("router", "option"), CASES)
@pytest.mark.parametrize("shape", [(2, 96), (1, 1024)], ids=["small", "large"])
def test_triton_matches_fp32_loop(router, option, shape):
    kw = dict(hidden_size=256, expert_ffn_size=384, num_experts=16, top_k=2)
    kw.update(OPTIONS[option])
    fast, ref = bf16_and_reference(router, **kw)
    x = torch.randn(*shape, 256, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, shape, device="cuda") if router == "hash" else None
    out, expected, _ = run_pair(fast, ref, x, ids)
    assert relative_error(out, expected) < 1e-2


@needs_triton
@pytest.mark.parametrize("hidden", [512, 1024])
def test_gelu_inference_tiles_match_the_loop(hidden):
    """GELU inference's own tiles for large groups (see ``up_config``), both hidden-size branches."""
    fast, ref = bf16_and_reference("topk", hidden_size=hidden, expert_ffn_size=512, num_experts=8, top_k=2,
                                   activation="gelu")
    x = torch.randn(2, 1024, hidden, device="cuda", dtype=torch.bfloat16)
    tiles = triton_moe.up_config(4096, 8, hidden, 512, single_accumulator=True)
    assert tiles != triton_moe.up_config(4096, 8, hidden, 512)
    out, expected, _ = run_pair(fast, ref, x)
    assert relative_error(out, expected) < 1e-2


@needs_triton
def test_gelu_normal_cdf_on_the_gpu_matches_float64():
    """The kernels' Phi(x) with the GPU's fast reciprocal and exp2 (the interpreter's test, on the
    device): within 3e-5 relative of float64 over [-10, 10], 1e-5 over [-6, 6]."""
    from fulu_nas.moe import _triton_kernels

    from .triton_probes import normal_cdf_errors

    assert _triton_kernels._reciprocal is _triton_kernels._fast_reciprocal  # the SFU's, not a division
    err = normal_cdf_errors("cuda")
    assert err["phi"] < 3e-5 and err["gelu"] < 1e-5, err


@needs_triton
@pytest.mark.parametrize("grouped_mm_second", [True, False], ids=["grouped_mm", "triton"])
@pytest.mark.parametrize(("router", "top_k"), [("topk", 2), ("topk", 1), ("expert_choice", 2)])
def test_both_second_gemms_match_the_loop(monkeypatch, grouped_mm_second, router, top_k):
    """The second GEMM as torch._grouped_mm (rows in expert order, gathered by the combine) and as
    the Triton kernel (rows written to slot order) both equal the fp32 loop; 64 experts for 300
    tokens, so group sizes vary and some may be empty."""
    monkeypatch.setattr(triton_moe, "GROUPED_MM_SECOND", grouped_mm_second)
    fast, ref = bf16_and_reference(router, hidden_size=256, expert_ffn_size=128, num_experts=64, top_k=top_k,
                                   renormalize=False)
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    out, expected, _ = run_pair(fast, ref, x)
    assert relative_error(out, expected) < 1e-2


@needs_triton
@pytest.mark.parametrize("router", ROUTERS)
def test_experts_without_tokens(router):
    """64 experts, 5 tokens: most groups are empty (and, for expert choice, capacity 1)."""
    kw = dict(hidden_size=128, expert_ffn_size=256, num_experts=64, top_k=2)
    if router == "expert_choice":
        kw["capacity_factor"] = 0.2
    fast, ref = bf16_and_reference(router, **kw)
    x = torch.randn(5, 128, device="cuda", dtype=torch.bfloat16)
    out, expected, stats = run_pair(fast, ref, x)
    if router != "expert_choice":
        assert (stats["tokens_per_expert"] == 0).sum() >= 54
    assert relative_error(out, expected) < 1e-2


@needs_triton
@pytest.mark.parametrize(("tokens", "experts", "k"), [(7, 8, 2), (4096, 128, 8), (333, 256, 8), (50, 1000, 3)])
def test_triton_topk_matches_torch(tokens, experts, k):
    scores = torch.randn(tokens, experts, device="cuda")
    scores[: tokens // 2] = scores[: tokens // 2].round(decimals=1)  # many ties
    scores[0, : experts // 2] = float("-inf")
    scores[-1, 1] = float("nan")  # torch.topk ranks NaN first
    got = triton_moe.topk_indices(scores, k)
    expected = torch.topk(scores, k, dim=-1)
    # Equal scores may come in either order: compare the selected values, and the indices are
    # distinct and in range.
    torch.testing.assert_close(scores.gather(1, got), expected.values, equal_nan=True, rtol=0, atol=0)
    assert (got.sort(-1).values.diff(dim=-1) > 0).all() and got.max() < experts
    assert got[-1, 0] == 1


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [*ROUTE_CASES, "seed_32768", "e256_4096", "e300_1000", "e128_8192",
                                  "e256_16384", "e128_16384", "e128_16384_top8", "e256_16384_top8"])
def test_routing_kernel_and_counting_sort_match_torch(case, dtype):
    """The routing kernel (logits given, or computed by fp32 products or the bf16 split) and the
    counting sort give the torch ops' experts, weights, probabilities, sort order and group ends."""
    shapes = {"seed_32768": (32768, 8, 2, {}), "e256_4096": (4096, 256, 8, {}), "e300_1000": (1000, 300, 2, {}),
              # the wider tiles of the logits in the kernel (from 128 experts and 8,192 tokens), and
              # from 16,384 tokens at 128 experts those chosen by the slots a token takes
              "e128_8192": (8192, 128, 8, {}), "e256_16384": (16384, 256, 2, {}), "e128_16384": (16384, 128, 2, {}),
              "e128_16384_top8": (16384, 128, 8, {}), "e256_16384_top8": (16384, 256, 8, {})}
    tokens, experts, k, options = ROUTE_CASES.get(case) or shapes[case]
    assert routing_kernel_mismatches(tokens, experts, k, options, "cuda", dtype) == []


@needs_triton
@pytest.mark.parametrize("tokens", [16, 4096])
@pytest.mark.parametrize("option", ["plain", "top_p", "sigmoid"])
def test_default_call_through_the_routing_kernel_equals_torch_routing(monkeypatch, tokens, option):
    """The default eager call (routing kernel, counting sort) gives the torch-routed call's experts,
    output, statistics and, in training, gradients."""
    fast, _ = bf16_and_reference("topk", hidden_size=256, expert_ffn_size=512, num_experts=16,
                                 **OPTIONS[option])
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)

    def call(kernel: bool):
        with monkeypatch.context() as m:
            if not kernel:
                m.setattr(triton_routing, "route_usable", lambda *args: False)
            with torch.inference_mode():
                routing = fast.router(x)
                out, stats = fast(x)
                stats = {name: stats[name] for name in ("tokens_per_expert", "dropped_share", "balance_loss")}
            fast.train()
            trained = forward_backward(fast, x.float(), None)
            fast.eval()
        return routing, out, stats, trained

    (r_kernel, out_kernel, stats_kernel, train_kernel), (r_torch, out_torch, stats_torch, train_torch) = \
        call(True), call(False)
    assert r_kernel.counts_BE is not None and r_torch.counts_BE is None
    assert torch.equal(r_kernel.expert_TK, r_torch.expert_TK)
    torch.testing.assert_close(stats_kernel, stats_torch)
    # The weights may differ in the last fp32 bit (the kernel's softmax), which can round a few
    # bf16 outputs to the neighbouring value.
    assert relative_error(out_kernel, out_torch) < 1e-3
    (out_k, dx_k, grads_k), (out_t, dx_t, grads_t) = train_kernel, train_torch
    assert sorted(grads_k) == sorted(grads_t)
    for got, want in [(out_k, out_t), (dx_k, dx_t), *((grads_k[n], grads_t[n]) for n in grads_t)]:
        assert relative_error(got, want) < 1e-3


@needs_triton
def test_default_takes_triton_where_preferred():
    fast, _ = bf16_and_reference("topk", hidden_size=256, expert_ffn_size=512, num_experts=8)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        triton_out, _ = fast(x, impl="triton")
        default_out, _ = fast(x)
        mm_out, _ = fast(x, impl="grouped_mm")
    expected = triton_out if prefer_triton(fast.cfg, 512, x.dtype) else mm_out
    assert torch.equal(default_out, expected)
    assert relative_error(triton_out, mm_out) < 1e-2


def forward_backward(layer, x, impl, token_ids=None):
    """Output, input gradient and parameter gradients of a fixed non-trivial loss."""
    x = x.detach().clone().requires_grad_(True)
    out, stats = layer(x, token_ids=token_ids, impl=impl)
    probe = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    ((out.float() * probe).sum() + stats["balance_loss"]).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@needs_triton
@pytest.mark.parametrize(("router", "option"), CASES)
def test_triton_training_matches_the_loop_in_fp32(router, option):
    """The training op (Triton forward keeping the pre-activation, grouped_mm + Triton backward)
    gives the loop's output and gradients: fp32 (exact dots), same routing."""
    kw = dict(hidden_size=128, expert_ffn_size=192, num_experts=16, top_k=2)
    kw.update(OPTIONS[option])
    layer = make_layer(router, **kw).cuda().train()
    x = torch.randn(2, 96, 128, device="cuda")
    ids = torch.randint(0, 1000, (2, 96), device="cuda") if router == "hash" else None
    out, dx, grads = forward_backward(layer, x, "triton", ids)
    ref_out, ref_dx, ref_grads = forward_backward(layer, x, "loop", ids)
    assert relative_error(out, ref_out) < 1e-4 and relative_error(dx, ref_dx) < 1e-4
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert relative_error(g, ref_grads[name]) < 1e-4, name


@needs_triton
@pytest.mark.parametrize("first_gemm", [False, True], ids=["gather_up_kernel", "grouped_mm"])
@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_triton_training_in_bf16_with_idle_experts(monkeypatch, router, first_gemm):
    """bf16 training through the Triton op against the bf16 loop (the same routing); 64 experts
    and 24 tokens, so most experts get no rows and must get exactly zero gradients; the first GEMM
    fused with the gather, and as grouped_mm over gathered rows."""
    monkeypatch.setattr(triton_moe, "GROUPED_MM_FIRST", first_gemm)
    kw = dict(hidden_size=128, expert_ffn_size=256, num_experts=64, top_k=2)
    if router == "expert_choice":
        kw["capacity_factor"] = 0.2
    fast, _ = bf16_and_reference(router, **kw)
    fast.train()
    x = torch.randn(24, 128, device="cuda", dtype=torch.bfloat16)
    out, dx, grads = forward_backward(fast, x, "triton")
    ref_out, ref_dx, ref_grads = forward_backward(fast, x, "loop")
    assert relative_error(out, ref_out) < 1e-2 and relative_error(dx, ref_dx) < 2e-2
    for name in ("experts.w13_EDF2", "experts.w2_EFD"):
        assert relative_error(grads[name], ref_grads[name]) < 2e-2, name
        idle = ref_grads[name].flatten(1).abs().amax(1) == 0
        if router != "expert_choice":
            assert idle.sum() >= 20
        assert (grads[name][idle] == 0).all(), name


@needs_triton
@pytest.mark.parametrize("entry", ["op", "eager_function"])
def test_training_op_backward_writes_no_gradient_for_its_saved_outputs(entry):
    """``pre`` and ``act``, the training op's outputs kept for its backward, are not differentiable: autograd
    must not fill zero gradients for them (N rows each) before the backward runs; through the custom op
    (what compiled graphs hold) and the eager autograd Function alike."""
    T, D, F, E, K = 512, 128, 256, 8, 2
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    expert_N = torch.randint(0, E, (T * K,), device="cuda")
    order = torch.argsort(expert_N, stable=True)
    ends = torch.bincount(expert_N, minlength=E).cumsum(0).to(torch.int32)
    weight = torch.rand(T * K, device="cuda", requires_grad=True)
    w13 = (torch.randn(E, D, F, device="cuda") / D**0.5).requires_grad_()
    w2 = (torch.randn(E, F, D, device="cuda") / F**0.5).requires_grad_()
    args = (x, order, weight, ends, w13, w2, None, None, K, False, False, True)
    out = triton_moe.moe_experts_train(*args)[0] if entry == "op" else triton_moe.experts_train(*args)
    grad = torch.randn_like(out)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out.backward(grad)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels and not [k for k in kernels if "Fill" in k], kernels
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, weight, w13, w2))


@needs_triton
def test_cached_launches_keep_tritons_specialisation(monkeypatch):
    """Eager launches reuse a compiled kernel only for arguments of its signature: a second call of
    a signature skips Triton's dispatch, and an input 2 bytes past a 16-byte boundary after aligned
    ones gets a kernel of its own and the right sums (the aligned kernel's vector loads would fault)."""
    launcher = triton_moe._kernels().sum_slots_kernel
    dispatched = []
    run = launcher.fn.run
    monkeypatch.setattr(launcher.fn, "run", lambda *a, **k: dispatched.append(1) or run(*a, **k))
    T, K, D = 37, 2, 512
    for offset in (0, 0, 1, 1):
        buf = torch.randn(T * K * D + 1, device="cuda", dtype=torch.bfloat16)
        y = buf[offset:offset + T * K * D].view(T * K, D)
        out = triton_moe._sum_slots(y, None, K)
        torch.testing.assert_close(out, y.float().view(T, K, D).sum(1).to(torch.bfloat16))
    assert len(dispatched) <= 2  # at most once per signature (the aligned one may be cached already)
    assert any(key[1][0][1] for key in launcher._compiled)  # the misaligned signature (address % 16) has its own


@needs_triton
def test_triton_training_compiles():
    """A compiled training step keeps the Triton ops (forward and the opaque backward) and gives the
    eager gradients; group sizes that are not multiples of 8 rows (which the backward's grouped
    GEMMs would reject if inductor re-laid their operands out) included."""
    layer = make_layer("topk", hidden_size=256, expert_ffn_size=512, num_experts=8, top_k=2).cuda()
    layer = layer.to(torch.bfloat16).train()
    x = torch.randn(1001, 256, device="cuda", dtype=torch.bfloat16)
    eager = forward_backward(layer, x, "triton")
    torch._dynamo.reset()
    compiled_layer = torch.compile(layer, fullgraph=True)
    compiled = forward_backward(compiled_layer, x, "triton")
    assert relative_error(compiled[0], eager[0]) < 1e-2 and relative_error(compiled[1], eager[1]) < 2e-2
    compiled_grads = {name.removeprefix("_orig_mod."): g for name, g in compiled[2].items()}
    assert compiled_grads.keys() == eager[2].keys()
    for name, g in eager[2].items():
        assert relative_error(compiled_grads[name], g) < 2e-2, name


@needs_triton
def test_triton_path_compiles_captures_and_does_not_sync():
    fast, _ = bf16_and_reference("topk", hidden_size=256, expert_ffn_size=512, num_experts=16, top_k=4)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        expected, _ = fast(x, impl="triton")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fast(x, impl="triton")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch._dynamo.reset()
        graphs = []

        def recording_inductor(gm, example_inputs):
            graphs.append(str(gm.graph))
            return torch._inductor.compile(gm, example_inputs)

        compiled = torch.compile(lambda t: fast(t, impl="triton", with_stats=False)[0], fullgraph=True,
                                 backend=recording_inductor)
        for _ in range(3):
            out = compiled(x)
        # 64 tokens: the routing kernel's op (an eager call's routing), then the experts' op
        assert "fulu_nas.moe_experts" in graphs[0] and "fulu_nas.route.default" in graphs[0]
        assert relative_error(out, expected) < 1e-2
        torch._dynamo.reset()
        graphed = torch.compile(lambda t: fast(t, impl="triton", with_stats=False)[0], fullgraph=True,
                                mode="reduce-overhead")
        for _ in range(3):
            out = graphed(x)
        assert relative_error(out, expected) < 1e-2
        # A manually captured CUDA graph replays the Triton kernels on new data.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fast(x, impl="triton")
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured, _ = fast(x, impl="triton")
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(captured, fast(x, impl="triton")[0])


def test_triton_impl_falls_back_without_cuda():
    """On the CPU (or without triton) ``impl="triton"`` is the grouped_mm path."""
    layer = make_layer("topk")
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        out, stats = layer(x, impl="triton")
        ref, ref_stats = layer(x, impl="grouped_mm")
    if not triton_moe.INTERPRET:
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(stats["tokens_per_expert"], ref_stats["tokens_per_expert"])


@pytest.mark.parametrize(("rows", "experts", "hidden", "ffn"),
                         [(32, 8, 512, 2048), (200, 8, 512, 2048), (400, 8, 512, 2048), (8192, 8, 512, 2048),
                          (65536, 8, 512, 2048), (65536, 256, 1024, 512),
                          (262144, 128, 1024, 256), (24, 4, 40, 24), (3000, 64, 8, 8)])
def test_tile_configs_fit_the_shapes(rows, experts, hidden, ffn):
    for bm, bn, bk, warps, stages in (triton_moe.up_config(rows, experts, hidden, ffn),
                                      triton_moe.up_config(rows, experts, hidden, ffn, single_accumulator=True),
                                      triton_moe.down_config(rows, experts, ffn, hidden)):
        assert all(v >= 16 and v & (v - 1) == 0 for v in (bm, bn, bk))  # tl.dot needs powers of 2 >= 16
        assert bn <= max(16, 2 * max(hidden, ffn)) and warps in (2, 4, 8) and stages >= 2


def test_second_gemm_rule(monkeypatch):
    """The second GEMM is ``torch._grouped_mm`` only for large bf16 groups on a Hopper-class GPU, never
    with an expert bias (its term lives in the Triton epilogue); ``GROUPED_MM_SECOND`` overrides."""
    act = torch.empty(65536, 2048, dtype=torch.bfloat16, device="meta")
    w2 = torch.empty(8, 2048, 512, dtype=torch.bfloat16, device="meta")
    assert not triton_moe.second_gemm_by_grouped_mm(act, w2, None)  # large, but not on CUDA
    assert not triton_moe.second_gemm_by_grouped_mm(act, w2, torch.empty(8, 512, device="meta"))
    monkeypatch.setattr(triton_moe, "GROUPED_MM_SECOND", True)
    assert triton_moe.second_gemm_by_grouped_mm(act[:16], w2, None)
    assert not triton_moe.second_gemm_by_grouped_mm(act, w2, torch.empty(8, 512, device="meta"))


def test_first_gemm_rule(monkeypatch):
    """The first GEMM runs from gathered rows as ``torch._grouped_mm`` only in training, for large bf16
    groups on a Hopper-class GPU, never with an expert bias; ``GROUPED_MM_FIRST`` overrides."""
    x = torch.empty(32768, 512, dtype=torch.bfloat16, device="meta")
    w13 = torch.empty(8, 512, 2048, dtype=torch.bfloat16, device="meta")
    bias = torch.empty(8, 2048, device="meta")
    assert not triton_moe.first_gemm_by_grouped_mm(x, 65536, w13, None, True)  # large, but not on CUDA
    monkeypatch.setattr(triton_moe, "GROUPED_MM_FIRST", True)
    assert triton_moe.first_gemm_by_grouped_mm(x, 16, w13, None, False)
    assert not triton_moe.first_gemm_by_grouped_mm(x, 65536, w13, bias, True)


@needs_triton
def test_first_gemm_rule_on_the_gpu():
    """Where the rule applies: training calls from 2,048 rows per expert (on Hopper or later), not
    inference, not smaller calls."""
    x = torch.empty(32768, 512, dtype=torch.bfloat16, device="cuda")
    w13 = torch.empty(8, 512, 2048, dtype=torch.bfloat16, device="cuda")
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert triton_moe.first_gemm_by_grouped_mm(x, 65536, w13, None, True) == hopper
    assert not triton_moe.first_gemm_by_grouped_mm(x, 65536, w13, None, False)
    assert not triton_moe.first_gemm_by_grouped_mm(x, 8 * 2047, w13, None, True)


def test_topk_uses_torch_on_the_cpu():
    from fulu_nas.moe.routing import topk_indices

    scores = torch.randn(5, 8)
    assert not triton_moe.topk_usable(scores, 2) or triton_moe.INTERPRET
    torch.testing.assert_close(topk_indices(scores, 2), torch.topk(scores, 2).indices)


def test_preference_follows_the_measurements():
    """Inference in bf16/fp16 takes the Triton experts at any size; training from
    TRITON_TRAINING_MIN_TOKENS tokens (measured slower at 4,096, faster at 32,768); fp32 never."""
    from fulu_nas.moe.layer import TRITON_TRAINING_MIN_TOKENS

    cfg = make_layer("topk").cfg
    bf16, fp32 = torch.bfloat16, torch.float32
    assert prefer_triton(cfg, 16, bf16) and prefer_triton(cfg, 32768, bf16)
    assert not prefer_triton(cfg, 4096, bf16, training=True) and prefer_triton(cfg, 32768, bf16, training=True)
    assert 4096 < TRITON_TRAINING_MIN_TOKENS <= 32768
    assert not prefer_triton(cfg, 32768, fp32) and not prefer_triton(cfg, 32768, fp32, training=True)
