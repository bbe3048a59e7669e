"""GPU checks (skipped without CUDA): the bf16 fast path against the fp32 reference, CUDA graphs,
and no host synchronisation in the forward."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from fulu_nas.moe import ROUTERS, triton_routing

from .helpers import assert_compiled_trains_as_eager, make_layer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def text_lm(moe):
    """A 2-layer byte-level language model of width 256 around ``moe``, and its task (sequences of 128);
    for expert choice, which training refuses on next-token tasks (it is not causal), a token classifier
    of the same width and its task (``clusters``)."""
    from fulu_nas.models import ArchConfig
    from fulu_nas.tasks import ClustersTask, TextLMTask

    task = ClustersTask() if moe.router == "expert_choice" else TextLMTask(seq_len=128, max_bytes=400_000)
    return task, ArchConfig(vocab_size=task.vocab_size, max_seq_len=task.seq_len, num_layers=2, hidden_size=256,
                            num_heads=4, num_classes=task.num_classes, moe=moe)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("router", ROUTERS)
def test_bf16_grouped_matches_fp32_loop(router):
    """bf16 fast path vs the fp32 loop on the same (bf16-representable) weights and inputs, so
    both make the same routing decisions and only the GEMM arithmetic differs."""
    kw = dict(hidden_size=256, expert_ffn_size=512, num_experts=16, top_k=2, num_shared_experts=1)
    fast = make_layer(router, **kw).cuda().to(torch.bfloat16)
    ref_layer = make_layer(router, **kw).cuda()
    ref_layer.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})
    x = torch.randn(4, 256, 256, device="cuda", dtype=torch.bfloat16)
    out, stats = fast(x)
    ref, ref_stats = ref_layer(x.float(), impl="loop")
    assert torch.equal(stats["tokens_per_expert"], ref_stats["tokens_per_expert"])
    assert relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("router", ROUTERS)
def test_fast_path_does_not_sync(router):
    layer = make_layer(router, hidden_size=256, expert_ffn_size=512, num_experts=16).cuda().to(torch.bfloat16)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    layer(x)  # warm-up: first calls may initialise handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, stats = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_cuda_graph_replay_matches_eager():
    layer = make_layer("topk", hidden_size=256, expert_ffn_size=512, num_experts=8).cuda().to(torch.bfloat16).eval()
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        expected, _ = layer(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                layer(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, _ = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        expected, _ = layer(x)
    torch.testing.assert_close(out, expected)


def test_split_bf16_router_logits_are_near_fp32():
    from fulu_nas.moe.routing import router_logits

    x = torch.randn(4096, 512, device="cuda").to(torch.bfloat16)
    w = torch.randn(64, 512, device="cuda")
    ref = x.double() @ w.double().t()
    err = ((router_logits(x, w).double() - ref).norm() / ref.norm()).item()
    fp32_err = ((router_logits(x.float(), w).double() - ref).norm() / ref.norm()).item()
    assert err < 1e-4 and err < 100 * max(fp32_err, 1e-7)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_split_router_logits_train_like_the_fp32_gemm(compiled):
    """With a gradient the bf16 split logits (eager, and traced by torch.compile) give the fp32
    GEMM's logits and, within bf16 rounding of the logits' gradient, its gradients."""
    from fulu_nas.moe.routing import router_logits

    torch.manual_seed(0)
    x = torch.randn(4096, 512, device="cuda").to(torch.bfloat16)
    w = torch.randn(64, 512, device="cuda") * 0.05
    probe = torch.randn(4096, 64, device="cuda")

    def run(split: bool):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        f = router_logits if split else (lambda a, b: torch.nn.functional.linear(a.float(), b))
        if compiled:
            torch._dynamo.reset()
            f = torch.compile(f, fullgraph=True)
        logits = f(xi, wi)
        (logits * probe).sum().backward()
        return logits.detach().double(), xi.grad.double(), wi.grad.double()

    got, want = run(True), run(False)
    assert relative_error(got[0], want[0]) < 1e-4
    assert relative_error(got[1], want[1]) < 1e-2 and relative_error(got[2], want[2]) < 1e-2


@pytest.mark.parametrize("router", ROUTERS)
def test_bf16_training_step_has_finite_gradients(router):
    layer = make_layer(router, hidden_size=256, expert_ffn_size=512, num_experts=16).cuda().to(torch.bfloat16)
    x = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, stats = layer(x)
    (out.float().square().mean() + stats["balance_loss"]).backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_extreme_system_replays_one_cuda_graph_per_input_shape():
    from fulu_nas import create_ultimate_pimoe_system

    torch.manual_seed(0)
    system = create_ultimate_pimoe_system(hidden_size=256, num_experts=8, expert_ffn_size=512,
                                          optimization_level="extreme", enable_hardware_optimization=True,
                                          device="cuda")
    xs = [torch.randn(2, 64, 256, device="cuda") for _ in range(2)] + [torch.randn(1, 16, 256, device="cuda")]
    system.optimize_for_inference()
    with torch.inference_mode():
        refs = [system.layer(x.bfloat16())[0].float() for x in xs]
    outs = [system(x) for x in xs]
    for _ in range(2):  # replays: each call's input is copied in, and earlier outputs stay as they were
        outs_again = [system(x) for x in xs]
    for out, again, ref in zip(outs, outs_again, refs, strict=True):
        assert relative_error(out, ref) < 1e-2 and torch.equal(out, again)
    _, info = system(xs[2], return_comprehensive_info=True)
    assert sum(info["routing_info"]["tokens_per_expert"]) == 16 * 2  # the last call's statistics
    assert info["system_stats"]["compiled"] and info["system_stats"]["cuda_graphs"] == 2


def test_spec_system_optimized_for_inference_on_cuda():
    from fulu_nas import create_ultimate_pimoe_system

    torch.manual_seed(0)
    system = create_ultimate_pimoe_system(hidden_size=256, num_experts=8, expert_ffn_size=512,
                                          routing_strategy="attention", enable_all_features=True, device="cuda")
    assert system.dtype == torch.bfloat16
    x = torch.randn(2, 64, 256, device="cuda")
    eager = system(x)
    out, info = system(x, return_comprehensive_info=True)
    assert info["performance_metrics"]["peak_memory_mb"] > 0
    system.optimize_for_inference()
    for _ in range(3):  # CUDA-graph warm-up and recording
        fast = system(x)
    assert relative_error(fast, eager) < 2e-2
    results = system.benchmark_system(x, num_iterations=10, warmup=2)
    assert results["throughput"] > 0 and results["peak_memory_mb"] > 0


def test_an_extreme_systems_peak_memory_counts_its_graphs_activations():
    """After optimize_for_inference an EXTREME system replays a CUDA graph, whose activations were
    allocated in the graph's pool at capture: the allocator's peak around a replay left them out, so a
    replay reported far less memory than the same call that captured the graph."""
    from fulu_nas import create_ultimate_pimoe_system

    torch.manual_seed(0)
    hidden, ffn, k = 256, 1024, 2
    system = create_ultimate_pimoe_system(hidden_size=hidden, num_experts=8, expert_ffn_size=ffn, top_k=k,
                                          optimization_level="extreme", enable_hardware_optimization=True,
                                          device="cuda").optimize_for_inference()
    x = torch.randn(8, 512, hidden, device="cuda")
    figures = [system(x, return_comprehensive_info=True)[1]["performance_metrics"]["peak_memory_mb"]
               for _ in range(3)]  # the first call captures the graph, the others replay it
    assert system.system_stats()["cuda_graphs"] == 1
    weights = sum(p.numel() * p.element_size() for p in system.parameters())
    expert_hidden = x.shape[0] * x.shape[1] * k * ffn * 2  # the experts' bf16 hidden rows, alive in the call
    assert all(f > (weights + expert_hidden) / 2**20 for f in figures), figures
    assert 0.8 * figures[0] <= figures[1] <= 1.25 * figures[0] and figures[2] == pytest.approx(figures[1]), figures
    benchmarked = system.benchmark_system(x, num_iterations=3, warmup=1)["peak_memory_mb"]
    assert benchmarked == pytest.approx(figures[1], rel=0.05), (benchmarked, figures)


def test_an_fp32_extreme_system_serves_after_optimize_for_inference():
    """An EXTREME system left in fp32 failed its first call after optimize_for_inference: torch's fp32
    grouped GEMM (no grouped kernel for fp32 on Hopper, torch 2.11) copies its offsets to the host,
    which the CUDA graph's capture refused. It now runs compiled without a graph where the layer
    cannot be captured."""
    from fulu_nas import create_ultimate_pimoe_system
    from fulu_nas.moe.experts import grouped_mm_captures

    torch.manual_seed(0)
    system = create_ultimate_pimoe_system(hidden_size=256, num_experts=8, expert_ffn_size=512,
                                          optimization_level="extreme", enable_hardware_optimization=False,
                                          device="cuda")
    assert system.dtype == torch.float32
    xs = [torch.randn(2, 64, 256, device="cuda"), torch.randn(1, 16, 256, device="cuda")]
    with torch.no_grad():
        refs = [system.layer(x, impl="loop")[0] for x in xs]
    system.optimize_for_inference()
    with warnings.catch_warnings():
        # the probe of the grouped GEMM's capture says nothing (torch warned of an empty graph)
        warnings.filterwarnings("error", message=".*CUDA Graph is empty")
        for _ in range(3):  # capture (where it can) and replays
            outs = [system(x).clone() for x in xs]
    for out, ref in zip(outs, refs, strict=True):
        assert relative_error(out, ref) < 1e-4
    captures = grouped_mm_captures(torch.device("cuda", 0), torch.float32)
    assert system.layer.captures_in_cuda_graphs() == captures
    assert system.system_stats()["cuda_graphs"] == (2 if captures else 0)
    if torch.cuda.get_device_capability()[0] in (9, 10):  # torch's bf16 grouped kernel
        assert grouped_mm_captures(torch.device("cuda", 0), torch.bfloat16)


def test_the_grouped_gemm_probe_is_not_spoilt_by_another_threads_gpu_work():
    """A search trial probes the grouped GEMM (in the trainer) while its served forward's kernels compile on
    a thread of their own: a capture in torch's global mode failed that thread's allocations, or its calls
    spoilt the capture, and a wrong answer is kept for the process (every later trial trained eagerly)."""
    import threading

    from fulu_nas.moe.experts import grouped_mm_captures

    errors, stop = [], threading.Event()

    def allocate():  # cudaMalloc and cudaFree, as a thread compiling and running kernels makes them
        stream = torch.cuda.Stream()
        try:
            with torch.cuda.stream(stream):
                n = 1
                while not stop.is_set():
                    n = n % 64 + 1
                    (torch.ones(n << 20, device="cuda") * 2).sum().item()
                    torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 (the test's finding)
            errors.append(e)

    thread = threading.Thread(target=allocate)
    thread.start()
    try:
        answers = [grouped_mm_captures.__wrapped__(torch.device("cuda", 0), torch.bfloat16) for _ in range(20)]
    finally:
        stop.set()
        thread.join()
    assert errors == []
    if torch.cuda.get_device_capability()[0] in (9, 10):
        assert all(answers)


def test_the_triton_experts_in_fp32_replay_from_a_cuda_graph():
    """``impl="triton"`` takes the Triton experts in any dtype: an fp32 layer's compiled call has no host
    sync and replays from a graph, equal to the loop."""
    from fulu_nas.deploy.cuda_graphs import GraphedForward
    from fulu_nas.system import CompiledForward

    torch.manual_seed(0)
    layer = make_layer(hidden_size=256, num_experts=8, expert_ffn_size=512, impl="triton").cuda().eval()
    assert layer.captures_in_cuda_graphs()
    graphed = GraphedForward(CompiledForward(layer), module=layer, capturable=layer.captures_in_cuda_graphs)
    x = torch.randn(128, 256, device="cuda")
    with torch.inference_mode():
        ref = layer(x, impl="loop")[0]
        outs = [graphed(x)[0].clone() for _ in range(2)]
    assert graphed.num_graphs == 1
    # Triton's fp32 dots may take TF32 products: within the bf16 path's tolerance of the loop
    assert all(relative_error(out, ref) < 1e-2 for out in outs)


def test_trial_cost_on_cuda_replays_the_served_forward_beside_the_reference():
    """The search's cost protocol on a GPU: the served forward captured in a CUDA graph per shape,
    timed with CUDA events in rounds beside the reference model; the graph's logits equal eager's."""
    from fulu_nas.deploy.cost import deployed_forward, measure_cost
    from fulu_nas.models import ArchConfig, PiMoETransformer
    from fulu_nas.moe import MoEConfig

    def model(experts, seed):
        torch.manual_seed(seed)
        arch = ArchConfig(vocab_size=64, max_seq_len=32, num_layers=2, hidden_size=64, num_heads=4, moe_every=2,
                          dense_ffn_size=128, moe=MoEConfig(hidden_size=64, num_experts=experts, expert_ffn_size=64))
        return PiMoETransformer(arch).cuda().eval()

    trial, reference = model(16, 0), model(8, 1)
    tokens = torch.randint(0, 64, (4, 32), device="cuda")
    with torch.inference_mode():
        replay = deployed_forward(trial, tokens)
        # the served copy is bf16: equal to the fp32 model's logits to bf16 rounding
        torch.testing.assert_close(replay().float(), trial(tokens).logits, rtol=0.05, atol=0.05)
    served: dict = {}  # the reference's replays, kept from one trial's measurement to the next
    for measured in (trial, model(4, 2)):
        cost = measure_cost(measured, [(1, 32), (8, 32)], iterations=5, rounds=3, reference=reference,
                            reference_served=served)
        for shape in cost["shapes"]:
            assert 0 < shape["latency_p50_ms"] <= shape["latency_p95_ms"] and shape["latency_ratio"] > 0
        # the activations' peak of one served forward: more for 8 sequences than for one (a peak read
        # around a graph replay, which allocates nothing, was 0)
        one, eight = (shape["peak_memory_mb"] for shape in cost["shapes"])
        assert 0 < one < eight
        assert cost["device"].startswith("cuda")
        if measured is trial:
            kept = dict(served)
    assert sorted(served) == [(1, 32), (8, 32)] and all(served[k] is kept[k] for k in served)
    # a kept replay serves new tokens: they are copied into its graph's input, and it computes what a
    # fresh capture on them does (the same bf16 copy and kernels; against the fp32 model a bf16 copy
    # routes some tokens elsewhere)
    from fulu_nas.deploy.cost import served_reference

    other = torch.randint(0, 64, (8, 32), device="cuda")
    with torch.inference_mode():
        kept_out = served_reference(reference, other, served)().clone()
        torch.testing.assert_close(kept_out, deployed_forward(reference, other)())


@pytest.mark.parametrize("router", ROUTERS)
def test_compiled_inference_routes_like_eager_and_is_as_accurate(router):
    """torch.compile'd bf16 inference chooses the same experts as eager on the same weights and
    inputs, and its error against the fp32 loop is within the eager path's."""
    torch._dynamo.reset()
    kw = dict(hidden_size=256, expert_ffn_size=512, num_experts=64, top_k=4 if router != "hash" else 2)
    fast = make_layer(router, **kw).cuda().to(torch.bfloat16).eval()
    ref_layer = make_layer(router, **kw).cuda().eval()
    ref_layer.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})
    x = torch.randn(8, 1024, 256, device="cuda", dtype=torch.bfloat16)
    token_ids = torch.randint(0, 50000, (8, 1024), device="cuda") if router == "hash" else None
    with torch.inference_mode():
        rows = x.reshape(-1, 256)
        eager_routing = fast.router(rows, token_ids=token_ids, batch_shape=(8, 1024))
        compiled_routing = torch.compile(fast.router, fullgraph=True)(rows, token_ids=token_ids,
                                                                       batch_shape=(8, 1024))
        eager, _ = fast(x, token_ids)
        compiled, _ = torch.compile(fast, fullgraph=True)(x, token_ids)
        ref, _ = ref_layer(x.float(), token_ids, impl="loop")
    for name in ("expert_TK", "token_EC"):
        got, want = getattr(compiled_routing, name), getattr(eager_routing, name)
        if want is not None:
            assert torch.equal(got.sort(-1).values, want.sort(-1).values), name
    eager_error = relative_error(eager, ref)
    assert relative_error(compiled, ref) <= max(1.25 * eager_error, 1e-3)


@pytest.mark.parametrize("tokens, dtype, experts, k", [
    (1, torch.bfloat16, 8, 2), (16, torch.bfloat16, 8, 2), (48, torch.bfloat16, 8, 2), (40, torch.float16, 8, 2),
    (4096, torch.bfloat16, 8, 2), (3000, torch.bfloat16, 32, 4)])
def test_compiled_inference_routes_through_the_kernel_like_eager(tokens, dtype, experts, k):
    """Compiled inference of a few tokens (decode), or of many over a few experts, holds the routing
    kernel's op and chooses exactly the eager call's experts in its order; the output equals the
    eager call's, graphed too."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    from fulu_nas.deploy.cuda_graphs import capture

    torch._dynamo.reset()
    layer = make_layer("topk", hidden_size=256, expert_ffn_size=512, num_experts=experts, top_k=k,
                       activation="gelu").cuda().to(dtype).eval()
    x = torch.randn(tokens, 256, device="cuda", dtype=dtype)
    recorded = EagerAndRecordGraphs()
    with torch.inference_mode():
        eager_r = layer.router(x)
        compiled_r = torch.compile(layer.router, fullgraph=True, backend=recorded)(x)
        eager, _ = layer(x, with_stats=False)
        compiled_layer = torch.compile(layer, fullgraph=True)
        compiled, _ = compiled_layer(x, with_stats=False)
    assert any("fulu_nas.route" in str(n.target) for g in recorded.graphs for n in g.graph.nodes)
    assert torch.equal(compiled_r.expert_TK, eager_r.expert_TK)
    with torch.inference_mode():  # many tokens: the eager layer sorts the router's block counts
        eager_order = (eager_r.sorted_slots or triton_routing.sorted_slots(eager_r))[0]
    assert torch.equal(compiled_r.sorted_slots[0], eager_order)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    with torch.inference_mode():
        graph, graphed = capture(lambda: compiled_layer(x, with_stats=False)[0], 3)
        graph.replay()
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


@pytest.mark.parametrize("activation, configs", [("swiglu", []), ("gelu", ["seed-fwd", "seed-fwd-bwd"])])
def test_bench_peers_quick_on_cuda(tmp_path, activation, configs):
    """``fulu-nas bench peers --quick`` on the GPU: every row, the graphed bounds and best path timed,
    every MoE implementation close to the fp32 loop, compiled routing identical to eager; ScatterMoE
    measured where ./.peers (or --peers-path) holds it, else n/a with the import error."""
    import importlib.util
    import json
    import math

    from fulu_nas.bench import cli as bench
    from fulu_nas.bench.peers import configs as peer_configs

    out = tmp_path / "peers.json"
    argv = ["peers", "--device", "cuda", "--quick", "--quiet", "--rounds", "2", "--activation", activation,
            "--json", str(out)]
    assert bench.main(argv + (["--configs", *configs] if configs else [])) == 0
    result = json.loads(out.read_text())
    assert result["dtype"] == "torch.bfloat16"
    assert [c["name"] for c in result["configs"]] == (configs or list(peer_configs.CONFIGS))
    scattermoe_importable = result["peers_path"] is not None and importlib.util.find_spec("triton") is not None
    for c in result["configs"]:
        for s in c["shapes"]:
            impls = s["impls"]
            measured = ["dense", "dense_wide", "gemm", "plain", "fulu", "fulu_best"]
            if activation == "swiglu" and importlib.util.find_spec("transformers") is not None:
                measured.append("hf")
            if scattermoe_importable:
                measured.append("scattermoe")
            for key in measured:
                d = impls[key]
                assert d["available"] and not d["failed"], (key, d["reason"])
                assert d["ms"] > 0 and math.isfinite(d["ms"]), key
            for key in set(impls) - set(measured):
                assert impls[key]["reason"], key
            for key in ("dense", "dense_wide"):
                assert set(impls[key]["ms_by_variant"]) == {"eager", "graph", "compiled+graph"}
            assert set(impls["gemm"]["ms_by_variant"]) == {"eager", "graph"}
            assert list(impls["fulu_best"]["ms_by_variant"]) == ["graph"]
            for key in set(measured) & set(peer_configs.MOE_IMPLS):
                assert impls[key]["rel_error"] < 2e-2, (key, impls[key]["rel_error"])
            assert s["compiled_routing"]["identical"], s["compiled_routing"]


@pytest.mark.parametrize("router", ["topk", "hierarchical"])
def test_compiled_training_step_trains_like_the_eager_one_on_cuda(router):
    """The trainer's compiled step (bf16 autocast, every block compiled) follows the eager step's losses."""
    from fulu_nas.models import PiMoETransformer
    from fulu_nas.training.train import TrainConfig, train

    moe = make_layer(router, hidden_size=256, expert_ffn_size=256, num_experts=16, top_k=2).cfg
    task, arch = text_lm(moe)
    losses = {}
    for kind in ("eager", "compiled"):
        torch.manual_seed(0)
        model = PiMoETransformer(arch)
        result = train(model, task, TrainConfig(steps=20, batch_size=16, report_every=5, progress=False,
                                                compile=kind, device="cuda"))
        assert result.step_kind == kind
        losses[kind] = [r.loss for r in result.history]
        assert all(r.gpu_utilisation is None or 0 <= r.gpu_utilisation <= 100 for r in result.history)
    # bf16: the same curve, not the same bits. Rounding flips some of the hierarchy's routing choices,
    # which moves an early report by up to 3% (step 10 of the hierarchical router on an H200: 3.03 against
    # 3.12); a step that does not train (or trains another model) is off by far more.
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=5e-2)


@pytest.mark.parametrize("overrides", [{"activation": "gelu", "expert_bias": True, "z_loss_coef": 0.01},
                                       {"z_loss_coef": 0.01, "aux_loss_coef": 0.02}])
def test_inductor_trains_as_the_eager_layer_on_cuda(overrides):
    """As tests/test_compile_export.py on the CPU, whose Inductor code lost every gradient through the
    experts of this layer (GELU, expert biases, a z-loss): the compiled layer's gradients are the eager's."""
    from fulu_nas.moe import MoEConfig, PiMoELayer

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = PiMoELayer(MoEConfig(hidden_size=64, num_experts=8, expert_ffn_size=64, top_k=2, **overrides)).cuda()
    assert_compiled_trains_as_eager(layer, torch.randn(4, 32, 64, device="cuda"), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("router", ROUTERS)
def test_a_model_is_built_on_the_gpu_directly_and_trains(router):
    """A search trial's model, built on the GPU (every tensor created there), with the CPU's hash; it trains
    (expert choice, not causal, on a token-classification task; the others on next-token text)."""
    from fulu_nas.models import ArchConfig, seeded_model
    from fulu_nas.tasks import ClustersTask, TextLMTask
    from fulu_nas.training.train import TrainConfig, train

    task = ClustersTask() if router == "expert_choice" else TextLMTask(seq_len=64, max_bytes=200_000)
    moe = make_layer(router, hidden_size=128, expert_ffn_size=128, num_experts=8, top_k=2).cfg
    arch = ArchConfig(vocab_size=task.vocab_size, max_seq_len=task.seq_len, num_layers=2, hidden_size=128,
                      num_heads=4, num_classes=task.num_classes, moe=moe)
    model = seeded_model(arch, 0, "cuda")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    on_cpu = seeded_model(arch, 0, "cpu")
    for (name, a), (_, b) in zip(model.named_buffers(), on_cpu.named_buffers(), strict=True):
        torch.testing.assert_close(a.cpu(), b, msg=name)  # the hash planes and the like: the same everywhere
    result = train(model, task, TrainConfig(steps=3, batch_size=8, report_every=1, progress=False, device="cuda"))
    assert result.steps == 3 and all(r.loss == r.loss for r in result.history)


@pytest.mark.parametrize("graphed", [False, True])
def test_training_steps_between_loss_checks_do_not_wait_for_the_gpu(graphed):
    """Between the trainer's loss checks (step 1, every report) nothing in a step synchronises with the
    host: batches copied without blocking, the loss kept on the GPU, the MoE layers sync-free, so the
    host queues the next step while the GPU runs this one (graphed: after the warm-up and the capture)."""
    import warnings

    from fulu_nas.models import ArchConfig, seeded_model
    from fulu_nas.tasks import TextLMTask
    from fulu_nas.training.train import GRAPH_WARMUP_STEPS, TrainConfig, train

    task = TextLMTask(seq_len=64, max_bytes=200_000)
    moe = make_layer("topk", hidden_size=128, expert_ffn_size=128, num_experts=8, top_k=2).cfg
    arch = ArchConfig(vocab_size=256, max_seq_len=64, num_layers=2, hidden_size=128, num_heads=4, moe=moe)
    model = seeded_model(arch, 0, "cuda")
    drawn = []  # warnings so far when each batch is drawn
    original = task.train_batches

    def batches(batch_size, seed):
        for batch in original(batch_size, seed):
            drawn.append(len(caught))
            yield batch

    task.train_batches = batches
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = train(model, task, TrainConfig(steps=12, batch_size=8, report_every=10, progress=False,
                                                    device="cuda", cuda_graph=graphed))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert result.steps == 12 and result.final_loss == result.final_loss and result.cuda_graph == graphed
    first = GRAPH_WARMUP_STEPS + 1 if graphed else 1  # the capture synchronises once
    syncs = [str(w.message) for w in caught[drawn[first]:drawn[9]]]
    assert drawn[1] > 0 and syncs == []  # step 1's check synchronised; the steps after it did not


@pytest.mark.parametrize("batch_size", [8, 256])
def test_training_on_a_gpu_without_a_grouped_gemm_kernel_is_not_graphed(monkeypatch, batch_size):
    """torch's bf16 grouped GEMM has a kernel on Hopper and Blackwell only: elsewhere (an A100, an L40S) it
    loops over the groups with their sizes copied to the host, which a CUDA graph's capture refuses, so
    every trial of a search failed there (trainer.cuda_graph=auto captures the step). Such a GPU is
    played here by the probe's answer: below TRITON_TRAINING_MIN_TOKENS tokens (the experts take the
    grouped GEMM) the step runs eagerly, from it (the Triton experts) it is still replayed."""
    from fulu_nas.models import ArchConfig, seeded_model
    from fulu_nas.moe import layer as layer_module
    from fulu_nas.tasks import TextLMTask
    from fulu_nas.training.train import TrainConfig, train

    monkeypatch.setattr(layer_module, "grouped_mm_captures", lambda device, dtype: False)
    task = TextLMTask(seq_len=64, max_bytes=200_000)
    moe = make_layer("topk", hidden_size=128, expert_ffn_size=128, num_experts=8, top_k=2).cfg
    arch = ArchConfig(vocab_size=256, max_seq_len=64, num_layers=2, hidden_size=128, num_heads=4, moe=moe)
    model = seeded_model(arch, 0, "cuda")
    result = train(model, task, TrainConfig(steps=12, batch_size=batch_size, report_every=6, progress=False,
                                            device="cuda"))
    tokens = batch_size * task.seq_len
    assert result.steps == 12 and math.isfinite(result.final_loss)
    assert result.cuda_graph == (tokens >= layer_module.TRITON_TRAINING_MIN_TOKENS)
    with pytest.raises(ValueError, match="grouped GEMM reads its group sizes on the host"):
        train(seeded_model(arch, 0, "cuda"), task, TrainConfig(steps=12, batch_size=8, progress=False,
                                                               device="cuda", cuda_graph=True))


@pytest.mark.parametrize("router", ROUTERS)
def test_the_graphed_training_step_trains_like_the_eager_one(router):
    """The training step replayed from a CUDA graph gives the eager step's losses (the same kernels) and
    fresh routing statistics at every report, for every router (with a shared expert and top-p where
    the router has it)."""
    from fulu_nas.models import seeded_model
    from fulu_nas.training.train import TrainConfig, train

    extra = {"top_p": 0.8} if router in ("topk", "hierarchical", "attention") else {}
    moe = make_layer(router, hidden_size=256, expert_ffn_size=256, num_experts=16, top_k=2, num_shared_experts=1,
                     **extra).cfg
    task, arch = text_lm(moe)
    results = {}
    for graphed in (False, True):
        model = seeded_model(arch, 0, "cuda")
        results[graphed] = train(model, task, TrainConfig(steps=30, batch_size=16, report_every=5, progress=False,
                                                          device="cuda", cuda_graph=graphed))
        assert results[graphed].cuda_graph == graphed
        if graphed:
            assert all(p.grad is None for p in model.parameters())  # the graph's memory is given back
    eager, graphed = ([r.loss for r in results[g].history] for g in (False, True))
    assert graphed == pytest.approx(eager, rel=2e-2)  # bf16: the same curve, not the same bits
    # each report reads that step's statistics (expert choice's counts are fixed by design, a hash
    # router's entropy is zero: one of the two moves for every router)
    seen = {(tuple(r.layers[0]["tokens_per_expert"]), r.layers[0]["router_entropy"]) for r in results[True].history}
    assert len(seen) == len(results[True].history)


def test_cuda_graph_true_replays_a_budget_shorter_than_auto_takes():
    """trainer.cuda_graph=true below the 10 steps auto needs trained eagerly without a word; it replays
    every step after the warm-up, and trains as the eager step does."""
    from fulu_nas.models import seeded_model
    from fulu_nas.training.train import GRAPH_MIN_STEPS, GRAPH_WARMUP_STEPS, TrainConfig, train

    moe = make_layer("topk", hidden_size=256, expert_ffn_size=256, num_experts=8, top_k=2).cfg
    task, arch = text_lm(moe)
    steps = GRAPH_WARMUP_STEPS + 2
    assert steps < GRAPH_MIN_STEPS
    losses = {}
    for graphed in ("auto", True):
        result = train(seeded_model(arch, 0, "cuda"), task, TrainConfig(steps=steps, batch_size=16, report_every=1,
                                                                           progress=False, device="cuda",
                                                                           cuda_graph=graphed))
        assert result.cuda_graph is (graphed is True) and result.steps == steps
        losses[graphed] = [r.loss for r in result.history]
    assert losses[True] == pytest.approx(losses["auto"], rel=2e-2)


def test_served_kernels_compile_beside_a_graphed_training_without_changing_it():
    """The served forward's kernels compile on a thread and stream of their own (ServedKernelWarmup)
    while the model trains, its step captured and replayed meanwhile: the losses are a run's without
    it, and the warm-up ends without an error."""
    from fulu_nas.deploy.cost import ServedKernelWarmup
    from fulu_nas.models import seeded_model
    from fulu_nas.training.train import TrainConfig, train

    # an expert count and top-k no other test serves: the warm-up has kernels to compile
    moe = make_layer("topk", hidden_size=256, expert_ffn_size=256, num_experts=24, top_k=3).cfg
    task, arch = text_lm(moe)
    losses = {}
    for warm in (False, True):
        model = seeded_model(arch, 0, "cuda")
        warmup = ServedKernelWarmup(model, [(1, 128), (16, 128)]) if warm else None
        result = train(model, task, TrainConfig(steps=30, batch_size=16, report_every=5, progress=False,
                                                device="cuda", cuda_graph=True))
        assert result.cuda_graph
        if warmup is not None:
            assert warmup.wait() >= 0 and warmup.error is None
        losses[warm] = [r.loss for r in result.history]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_the_graphed_training_step_warns_nothing():
    """Capturing the step after warm-up steps on a side stream: nothing of theirs (the autograd graph the
    last one's outputs hold) reaches the capture, whose gradient accumulators would then be on another
    stream than the gradients (torch warns once per process, so a fresh one trains here)."""
    code = textwrap.dedent("""
        from fulu_nas.models import ArchConfig, seeded_model
        from fulu_nas.moe import MoEConfig
        from fulu_nas.tasks import TextLMTask
        from fulu_nas.training.train import TrainConfig, train
        moe = MoEConfig(hidden_size=128, num_experts=8, expert_ffn_size=128, top_k=2)
        arch = ArchConfig(vocab_size=256, max_seq_len=64, num_layers=2, hidden_size=128, num_heads=4, moe=moe)
        result = train(seeded_model(arch, 0, "cuda"), TextLMTask(seq_len=64, max_bytes=100_000),
                       TrainConfig(steps=12, batch_size=8, report_every=6, progress=False, device="cuda"))
        assert result.cuda_graph
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr[-3000:]


def test_the_compiled_step_replays_from_a_cuda_graph_too():
    from fulu_nas.models import seeded_model
    from fulu_nas.training.train import TrainConfig, step_description, train

    moe = make_layer("topk", hidden_size=256, expert_ffn_size=256, num_experts=16, top_k=2).cfg
    task, arch = text_lm(moe)
    losses = {}
    for compile_as in ("eager", "compiled"):
        result = train(seeded_model(arch, 0, "cuda"), task,
                       TrainConfig(steps=20, batch_size=16, report_every=5, progress=False, device="cuda",
                                   compile=compile_as))
        assert step_description(result) == f"{compile_as} + CUDA graph, deterministic"
        losses[compile_as] = [r.loss for r in result.history]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=2e-2)


@pytest.mark.parametrize("compile_as", ["eager", "compiled"])
def test_training_twice_gives_identical_weights(compile_as):
    """Deterministic training (the default on a GPU): one architecture trained twice, every step
    replayed from a CUDA graph, ends with bit-identical weights and losses; the trainer restores
    torch's global deterministic setting afterwards."""
    from fulu_nas.models import seeded_model
    from fulu_nas.training.train import TrainConfig, step_description, train

    moe = make_layer("topk", hidden_size=256, expert_ffn_size=256, num_experts=16, top_k=2).cfg
    task, arch = text_lm(moe)
    runs = []
    for _ in range(2):
        model = seeded_model(arch, 0, "cuda")
        result = train(model, task, TrainConfig(steps=30, batch_size=16, report_every=10, progress=False,
                                                device="cuda", compile=compile_as))
        assert step_description(result) == f"{compile_as} + CUDA graph, deterministic"
        runs.append(([r.loss for r in result.history], [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_expert_parallel_baseline_script_times_a_step_and_writes_its_profile(tmp_path):
    """``benchmarks/ep_baseline.py`` (BENCHMARKS.md, "Expert parallelism"): the per-rank work of the
    expert-parallel benchmark on one GPU, a time per forward+backward and a profiler table."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    profile = tmp_path / "profile.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "ep_baseline.py"), "256", "8", "512", "2",
                           "4096", "5", "grouped", str(profile)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ms per forward+backward" in done.stdout and "tokens, E=8, D=256" in done.stdout
    table = profile.read_text()
    assert "Name" in table and "aten::" in table


@pytest.mark.parametrize("grad", [True, False])
def test_the_bf16_router_logits_follow_a_fused_optimizer_step(grad):
    """The router weight's bf16 split is kept between eager calls, keyed on the weight's version counter,
    which a fused optimizer step (``AdamW(fused=True)``, common on GPUs) leaves as it was: training and
    inference went on routing by the weights before the step."""
    from fulu_nas.moe import routing

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 512, device="cuda") * 0.05)
    x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    opt = torch.optim.AdamW([weight], lr=0.1, fused=True)
    for _ in range(2):
        with torch.set_grad_enabled(grad):
            logits = routing.router_logits(x, weight)
        reference = x.detach().double() @ weight.detach().double().t()
        assert ((logits.double() - reference).norm() / reference.norm()).item() < 1e-4
        weight.grad = torch.randn_like(weight)
        opt.step()


@pytest.mark.parametrize("hidden, ffn", [(256, 512), (64, None)])
def test_an_extreme_system_served_from_cuda_graphs_follows_replaced_weights(hidden, ffn):
    """The graphs replayed the addresses the weights had at capture: after load_state_dict(assign=True)
    or remapped experts the system read freed memory (the weights it no longer held, or garbage)."""
    from fulu_nas import create_ultimate_pimoe_system

    torch.manual_seed(0)
    shape = dict(hidden_size=hidden, num_experts=8, expert_ffn_size=ffn, optimization_level="extreme",
                 enable_hardware_optimization=True, device="cuda")
    system = create_ultimate_pimoe_system(**shape).optimize_for_inference()
    x = torch.randn(2, 64, hidden, device="cuda")

    def check():
        with torch.inference_mode():
            reference = system.layer(x.to(system.dtype), impl="loop")[0].float()
            assert relative_error(system(x).float(), reference) < 1e-2

    check()
    other = create_ultimate_pimoe_system(**shape).to(system.dtype)
    system.load_state_dict(other.state_dict(), assign=True)
    check()
    system.layer.remap_experts([0, 1, 2, 3])
    check()
    assert system.system_stats()["cuda_graphs"] == 1  # captured again, not beside the old ones


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_layer_on_a_gpu_that_is_not_the_current_one_computes_there():
    """Triton launches on the current GPU: a layer on cuda:1 called while cuda:0 was current launched its
    kernels on cuda:0's stream with cuda:1's pointers. Eager calls (training and inference) and an EXTREME
    system's graph capture run on the input's GPU."""
    from fulu_nas import create_ultimate_pimoe_system

    torch.manual_seed(0)
    layer = make_layer("topk", hidden_size=256, expert_ffn_size=512, num_experts=8, top_k=2).to("cuda:1")
    x = torch.randn(4, 128, 256, device="cuda:1", dtype=torch.bfloat16, requires_grad=True)
    assert torch.cuda.current_device() == 0
    out, _ = layer.to(torch.bfloat16)(x)
    out.float().square().mean().backward()
    with torch.inference_mode():
        reference = layer(x.detach(), impl="loop")[0]
    assert relative_error(out.detach(), reference) < 1e-2 and torch.isfinite(x.grad).all()
    system = create_ultimate_pimoe_system(hidden_size=256, num_experts=8, expert_ffn_size=512,
                                          optimization_level="extreme", enable_hardware_optimization=True,
                                          device="cuda:1").optimize_for_inference()
    y = torch.randn(2, 64, 256, device="cuda:1")
    with torch.inference_mode():
        reference = system.layer(y.to(system.dtype), impl="loop")[0].float()
    assert relative_error(system(y).float(), reference) < 1e-2
    assert relative_error(system(y).float(), reference) < 1e-2  # a replay of the graph captured on cuda:1

