"""Expert parallelism on CPU/Gloo with 2 processes equals the single-process layer.

One module fixture spawns the 2 ranks once; they run every case and save what they saw (outputs,
statistics, gradients, gathered layers, a short training run); the tests below compare that with
the single-process PiMoELayer computed here.

Loss scaling. Each rank r minimises ``L_r = mean(out_r * up_r) + balance_loss_r`` (a per-rank mean,
the data-parallel convention); the objective is ``mean_r L_r``. For token-choice routers without
capacity a token's output does not depend on the other tokens, and ``balance_loss_r`` uses the
global load, so ``mean_r L_r`` equals ``L = mean(out * up) + balance_loss`` of the single layer on
the concatenated input ("concat" reference). Then, after backward:
- an expert shard's gradient is the gradient of ``sum_r L_r`` (the backward all-to-all brings
  every rank's rows home): ``P * dL/dW`` restricted to the rank's experts;
- a replicated parameter's gradient is ``dL_r/dtheta``; their mean over ranks is ``dL/dtheta``;
- an input's gradient is ``dL_r/dx_r = P * dL/dx`` restricted to the rank's tokens;
- after ``average_replicated_gradients`` (mean of the replicated, expert shards divided by P)
  every gradient is ``dL/d(param)``.
Expert choice and capacity limits decide per batch, so for them rank r's routing is the single
layer's routing of ``x_r`` alone ("per_rank" reference: single layer run on each rank's input,
gradients summed or averaged over ranks the same way).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils import clip_grad_norm_ as torch_clip_grad_norm_

from fulu_nas.moe import MoEConfig, PiMoELayer

from .helpers import free_port, make_layer, spawn_ranks

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with Gloo is not available", allow_module_level=True)

P = 2  # ranks
B, S = 2, 12  # per-rank batch
TOL = dict(rtol=1e-5, atol=1e-5)
CLIP = 0.5  # gradient clipping in the training run (it clips: the norms are larger)

# name -> (router, config overrides, reference)
CASES = {
    "topk": ("topk", {"aux_loss_coef": 0.01, "z_loss_coef": 1e-3}, "concat"),
    "topk_shared": ("topk", {"num_shared_experts": 2, "shared_expert_gate": True, "activation": "gelu",
                             "expert_bias": True, "aux_loss_coef": 0.01}, "concat"),
    "top_p": ("topk", {"top_p": 0.55, "top_k": 3}, "concat"),
    "hash": ("hash", {}, "concat"),
    "hierarchical": ("hierarchical", {"aux_loss_coef": 0.01, "score_func": "sigmoid"}, "concat"),
    "attention": ("attention", {"aux_loss_coef": 0.01, "z_loss_coef": 1e-3}, "concat"),
    "expert_choice": ("expert_choice", {"aux_loss_coef": 0.01}, "per_rank"),
    "expert_choice_shared": ("expert_choice", {"num_shared_experts": 1, "capacity_factor": 1.5}, "per_rank"),
    "capacity": ("topk", {"capacity_factor": 0.75}, "per_rank"),
    # every token goes to experts 0..3: rank 1's experts receive nothing
    "idle_rank": ("topk", {"aux_loss_coef": 0.01}, "concat"),
}


def build(name: str) -> PiMoELayer:
    """The case's layer, identical in every process."""
    router, overrides, _ = CASES[name]
    layer = make_layer(router, seed=3, **overrides)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        if name == "attention":  # the context path starts at zero; give it weight so it is tested
            w = layer.router.context_out.weight
            w.copy_(0.1 * torch.randn(w.shape, generator=g))
        if name == "idle_rank":
            layer.router.expert_bias[: layer.cfg.num_experts // P] = 10.0
    return layer


def inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The concatenated input of all ranks (rank r holds rows [r*B, (r+1)*B)), upstream weights
    for the loss, and token ids for the hash router."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(P * B, S, 32, generator=g)
    up = torch.randn(P * B, S, 32, generator=g)
    ids = torch.randint(0, 1000, (P * B, S), generator=g) if CASES[name][0] == "hash" else None
    return x, up, ids


def part(t: torch.Tensor | None, r: int) -> torch.Tensor | None:
    return None if t is None else t[r * B:(r + 1) * B]


# -- the training run (same code for both layouts) -------------------------------------------------

def tiny_model():
    from fulu_nas.models.arch import ArchConfig
    from fulu_nas.models.transformer import PiMoETransformer

    torch.manual_seed(21)
    moe = MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=32, top_k=2, aux_loss_coef=0.01,
                    bias_update_rate=1e-2)
    return PiMoETransformer(ArchConfig(vocab_size=64, max_seq_len=16, num_layers=2, hidden_size=32, num_heads=4,
                                       dense_ffn_size=64, moe=moe))


def train_batches(steps: int = 5, per_rank: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(33)
    return [torch.randint(0, 64, (P * per_rank, 16), generator=g) for _ in range(steps)]


def train(model, batches, sync=None) -> list[float]:
    """Adam steps on next-token loss (mean over the batch) + balance loss; aux-free bias updates."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for tokens in batches:
        out = model(tokens)
        task = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1))
        loss = task + out.balance_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sync is not None:
            sync(model)
        opt.step()
        model.update_expert_biases(out.moe_stats)
        losses.append(loss.detach())
    return losses


# -- the ranks --------------------------------------------------------------------------------------

def _run_case(name: str, rank: int) -> dict:
    from fulu_nas.moe.expert_parallel import ExpertParallelMoE
    from fulu_nas.training.distributed import average_replicated_gradients

    layer = build(name)
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    ep = ExpertParallelMoE.from_layer(layer)
    x_all, up_all, ids_all = inputs(name)
    x = part(x_all, rank).clone().requires_grad_(True)
    out, stats = ep(x, token_ids=part(ids_all, rank))
    loss = (out * part(up_all, rank)).mean() + stats["balance_loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ep.named_parameters() if p.grad is not None}
    average_replicated_gradients(ep)
    averaged = {n: p.grad.clone() for n, p in ep.named_parameters() if p.grad is not None}
    with torch.no_grad():
        out_sorted, _ = ep(x, token_ids=part(ids_all, rank), impl="sorted")
        # inference (the CPU's packed experts), with and without the statistics
        out_inference, _ = ep(x, token_ids=part(ids_all, rank))
        out_nostats, nostats = ep(x, token_ids=part(ids_all, rank), with_stats=False)
    gathered = ep.gather_layer()
    # the same in 3 chunks of tokens, each chunk's exchanges in flight while another's experts run
    chunked = ExpertParallelMoE.from_layer(build(name), chunks=3)
    x_chunked = part(x_all, rank).clone().requires_grad_(True)
    out_chunked, stats_chunked = chunked(x_chunked, token_ids=part(ids_all, rank))
    ((out_chunked * part(up_all, rank)).mean() + stats_chunked["balance_loss"]).backward()
    return {
        "chunked": {"out": out_chunked.detach(), "stats": {k: v.detach() for k, v in stats_chunked.items()},
                    "x_grad": x_chunked.grad, "repr": repr(chunked),
                    "grads": {n: p.grad.clone() for n, p in chunked.named_parameters() if p.grad is not None}},
        "out": out.detach(), "stats": {k: v.detach() for k, v in stats.items()}, "x_grad": x.grad,
        "grads": grads, "averaged": averaged, "out_sorted": out_sorted, "out_nostats": out_nostats,
        "out_inference": out_inference,
        "nostats": nostats, "original": original, "gathered": gathered.state_dict(),
        "gathered_type": type(gathered), "expert_range": ep.expert_range,
        "parameter_counts": ep.parameter_counts(), "layer_parameter_counts": layer.parameter_counts(),
    }


def _run_float64(rank: int) -> dict:
    """The layer in float64 (a gradient check's precision), with its default experts' kernels."""
    from fulu_nas.moe.expert_parallel import ExpertParallelMoE

    ep = ExpertParallelMoE.from_layer(build("topk").double())
    x = part(inputs("topk")[0], rank).double()
    out, _ = ep(x)
    return {"impl": ep.cfg.impl, "out": out.detach()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    from fulu_nas.moe.expert_parallel import ExpertParallelMoE
    from fulu_nas.training.distributed import (
        average_replicated_gradients,
        clip_grad_norm_,
        expert_parallel,
        gather_experts,
        init_from_env,
    )

    torch.set_num_threads(1)
    # as torchrun would set it up
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(P), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info = init_from_env(backend="gloo", timeout_s=60)
    assert (info.rank, info.world_size, info.device.type) == (rank, P, "cpu")
    try:
        results = {name: _run_case(name, rank) for name in CASES}
        try:
            ExpertParallelMoE.from_layer(make_layer("topk", num_experts=5))
        except ValueError as e:
            results["indivisible"] = str(e)
        try:
            ExpertParallelMoE.from_layer(make_layer("topk"), chunks=0)
        except ValueError as e:
            results["no_chunks"] = str(e)

        results["float64"] = _run_float64(rank)

        model = expert_parallel(tiny_model())
        batches = [t.chunk(P)[rank] for t in train_batches()]
        norms = []

        def sync(m):
            average_replicated_gradients(m)
            norms.append(float(clip_grad_norm_(m, CLIP)))

        losses = torch.stack(train(model, batches, sync=sync))
        dist.all_reduce(losses)
        results["train_losses"] = (losses / P).tolist()
        results["train_grad_norms"] = norms
        results["train_ep_layers"] = sum(isinstance(m, ExpertParallelMoE) for m in model.modules())
        results["train_state"] = gather_experts(model).state_dict()
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_worker, P, tmp_path_factory.mktemp("expert_parallel"))


# -- references -------------------------------------------------------------------------------------

def single(layer: PiMoELayer, x, up, ids):
    """Output, stats, parameter gradients and input gradient of the mean loss on one input."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out, stats = layer(x, token_ids=ids)
    ((out * up).mean() + stats["balance_loss"]).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), {k: v.detach() for k, v in stats.items()}, grads, x.grad


def reference_grads(name: str):
    """(gradients of sum_r L_r, gradients of mean_r L_r, input gradient of sum_r L_r) per parameter
    of the full layer; the input gradient is over the concatenated input."""
    layer = build(name)
    x, up, ids = inputs(name)
    if CASES[name][2] == "concat":
        _, _, g, gx = single(layer, x, up, ids)
        return {n: P * v for n, v in g.items()}, g, P * gx
    runs = [single(layer, part(x, r), part(up, r), part(ids, r)) for r in range(P)]
    total = {n: sum(run[2][n] for run in runs) for n in runs[0][2]}
    return total, {n: v / P for n, v in total.items()}, torch.cat([run[3] for run in runs])


def expert_slice(res: dict, name: str, full: torch.Tensor) -> torch.Tensor:
    start, stop = res["expert_range"]
    return full[start:stop] if name.startswith("experts.") else full


# -- tests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_output_equals_single_layer_on_each_rank_input(ranks, name):
    ranks = [res[name] for res in ranks]
    layer = build(name)
    x, up, ids = inputs(name)
    for r, res in enumerate(ranks):
        ref, _, _, _ = single(layer, part(x, r), part(up, r), part(ids, r))
        torch.testing.assert_close(res["out"], ref, **TOL, msg=f"rank {r} output")
        torch.testing.assert_close(res["out_sorted"], ref, **TOL, msg=f"rank {r} impl=sorted output")
        torch.testing.assert_close(res["out_inference"], ref, **TOL, msg=f"rank {r} inference output")
        torch.testing.assert_close(res["out_nostats"], res["out_inference"], rtol=0, atol=0)
        assert res["nostats"] == {}


@pytest.mark.parametrize("name", CASES)
def test_statistics_see_the_global_load(ranks, name):
    ranks = [res[name] for res in ranks]
    layer = build(name)
    x, up, ids = inputs(name)
    per_rank = [single(layer, part(x, r), part(up, r), part(ids, r))[1] for r in range(P)]
    counts = sum(s["tokens_per_expert"] for s in per_rank)
    for res in ranks:
        torch.testing.assert_close(res["stats"]["tokens_per_expert"], counts, rtol=0, atol=0)
    if CASES[name][2] == "concat":
        _, ref, _, _ = single(layer, x, up, ids)
        torch.testing.assert_close(counts, ref["tokens_per_expert"], rtol=0, atol=0)
        for key in ("utilisation", "load_balance", "max_vio", "cv", "router_entropy", "dropped_share"):
            for res in ranks:
                torch.testing.assert_close(res["stats"][key], ref[key], **TOL, msg=key)
        for key in ("aux_loss", "z_loss", "balance_loss"):  # local losses: their mean is the global one
            mean = sum(res["stats"][key] for res in ranks) / P
            torch.testing.assert_close(mean, ref[key], **TOL, msg=key)


@pytest.mark.parametrize("name", CASES)
def test_gradients_equal_single_layer(ranks, name):
    ranks = [res[name] for res in ranks]
    total, mean, gx = reference_grads(name)
    for r, res in enumerate(ranks):
        assert res["grads"].keys() == total.keys()
        torch.testing.assert_close(res["x_grad"], part(gx, r), **TOL, msg=f"rank {r} input gradient")
        for n in total:
            if n.startswith("experts."):  # the shard's gradient: every rank's rows, sum of the losses
                torch.testing.assert_close(res["grads"][n], expert_slice(res, n, total[n]), **TOL, msg=n)
            # after averaging: the single-device gradient of the mean loss, for every parameter
            torch.testing.assert_close(res["averaged"][n], expert_slice(res, n, mean[n]), **TOL, msg=n)
    for n in mean:
        if not n.startswith("experts."):  # replicated: local gradients, whose mean is the single one
            torch.testing.assert_close(sum(res["grads"][n] for res in ranks) / P, mean[n], **TOL, msg=n)


@pytest.mark.parametrize("name", CASES)
def test_exchanging_in_chunks_gives_the_same_outputs_statistics_and_gradients(ranks, name):
    for r, res in enumerate(res[name] for res in ranks):
        chunked = res["chunked"]
        assert "chunks=3" in chunked["repr"]
        torch.testing.assert_close(chunked["out"], res["out"], **TOL, msg=f"rank {r} output")
        torch.testing.assert_close(chunked["x_grad"], res["x_grad"], **TOL, msg=f"rank {r} input gradient")
        assert chunked["stats"].keys() == res["stats"].keys()
        for key, value in res["stats"].items():
            torch.testing.assert_close(chunked["stats"][key], value, **TOL, msg=key)
        assert chunked["grads"].keys() == res["grads"].keys()
        for n, g in res["grads"].items():
            torch.testing.assert_close(chunked["grads"][n], g, **TOL, msg=f"rank {r} {n}")


def test_a_rank_whose_experts_get_no_tokens(ranks):
    ranks = [res["idle_rank"] for res in ranks]
    counts = ranks[0]["stats"]["tokens_per_expert"]
    assert counts[4:].sum() == 0 and counts[:4].sum() == P * B * S * 2
    idle = ranks[1]
    assert idle["expert_range"] == (4, 8)
    for n, g in idle["grads"].items():
        if n.startswith("experts."):
            assert torch.all(g == 0), n


@pytest.mark.parametrize("name", CASES)
def test_gather_layer_round_trips_exactly(ranks, name):
    ranks = [res[name] for res in ranks]
    for res in ranks:
        assert res["gathered_type"] is PiMoELayer
        assert res["gathered"].keys() == res["original"].keys()
        for k, v in res["original"].items():
            assert torch.equal(res["gathered"][k], v), k
        assert res["parameter_counts"] == res["layer_parameter_counts"]


def test_float64_runs_as_the_single_layer_does(ranks):
    """The single-device layer runs float64 by the sorted experts (the grouped GEMMs take fp32, bf16 and
    fp16 only); the expert-parallel layer raised "Expected mat_a to be Float32, BFloat16 or Float16"."""
    layer = build("topk").double()
    x = inputs("topk")[0].double()
    for r, res in enumerate(ranks):
        assert res["float64"]["impl"] == "grouped"  # the default: the one float64 cannot take
        ref, _ = layer(part(x, r))
        assert res["float64"]["out"].dtype == torch.float64
        torch.testing.assert_close(res["float64"]["out"], ref.detach(), rtol=1e-12, atol=1e-12)


def test_indivisible_expert_count_is_a_clear_error(ranks):
    assert "num_experts divisible by 2" in ranks[0]["indivisible"]
    assert "num_experts=5" in ranks[0]["indivisible"]
    assert ranks[0]["no_chunks"] == "chunks must be a positive integer, got 0"


def test_distributed_training_matches_single_process(ranks):
    model = tiny_model()
    norms = []
    losses = [float(v) for v in train(model, train_batches(),
                                       sync=lambda m: norms.append(float(torch_clip_grad_norm_(m.parameters(), CLIP))))]
    assert ranks[0]["train_ep_layers"] == 2
    assert min(norms) > CLIP
    for res in ranks:
        assert res["train_losses"] == pytest.approx(losses, abs=1e-5)
        assert res["train_grad_norms"] == pytest.approx(norms, rel=1e-5)
    state = model.state_dict()
    for res in ranks:
        assert res["train_state"].keys() == state.keys()
        for k, v in state.items():
            torch.testing.assert_close(res["train_state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # the aux-free bias moved, by the same global-load step on every rank
    bias = [k for k in state if k.endswith("router.expert_bias")]
    assert bias and any(state[k].abs().sum() > 0 for k in bias)


# -- edge cases, in 2 ranks of their own -----------------------------------------------------------
# (a separate spawn: a case that fails in one rank must not leave the other waiting in a collective
# of the main run)

AUTOCAST_CASES = ("topk", "topk_shared", "expert_choice")


def _edge_worker(rank: int, port: int, out_dir: str) -> None:
    from fulu_nas.moe.expert_parallel import ExpertParallelMoE
    from fulu_nas.training.distributed import expert_parallel, init_from_env

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(P), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_from_env(backend="gloo", timeout_s=60)
    results = {}
    try:
        ep = ExpertParallelMoE.from_layer(build("topk"))
        x = part(inputs("topk")[0], rank)
        try:  # every rank refuses before the first collective, so none is left waiting
            ep(x, impl="bogus")
            results["bogus"] = "accepted"
        except ValueError as e:
            results["bogus"] = str(e)

        results["model_counts"] = expert_parallel(tiny_model()).parameter_counts()

        for name in AUTOCAST_CASES:
            ep = ExpertParallelMoE.from_layer(build(name))
            x = part(inputs(name)[0], rank).clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, _ = ep(x)
            out.float().sum().backward()
            results[f"autocast_{name}"] = {"out": out.detach(), "x_grad": x.grad}

        # rank 1 has no tokens (an uneven last batch): it still takes part in every exchange
        ep = ExpertParallelMoE.from_layer(build("topk"))
        x_all, up_all, _ = inputs("topk")
        x = (part(x_all, rank) if rank == 0 else x_all[:0]).clone().requires_grad_(True)
        up = part(up_all, rank) if rank == 0 else up_all[:0]
        out, stats = ep(x)
        ((out * up).sum() + stats["balance_loss"]).backward()
        results["empty"] = {"out": out.detach(), "x_grad": x.grad, "stats": {k: v.detach() for k, v in stats.items()},
                            "grads": {n: p.grad.clone() for n, p in ep.named_parameters() if p.grad is not None},
                            "expert_range": ep.expert_range}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def edge_ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_edge_worker, P, tmp_path_factory.mktemp("expert_parallel_edges"))


def test_an_unknown_impl_is_refused_as_the_single_layer_refuses_it(edge_ranks):
    with pytest.raises(ValueError) as refused:
        build("topk")(inputs("topk")[0], impl="bogus")
    for res in edge_ranks:
        assert res["bogus"] == str(refused.value)


def test_the_model_counts_every_expert_on_every_rank(edge_ranks):
    counts = tiny_model().parameter_counts()
    for res in edge_ranks:
        assert res["model_counts"] == counts


@pytest.mark.parametrize("name", AUTOCAST_CASES)
def test_under_autocast_the_experts_run_as_the_single_layers_do(edge_ranks, name):
    """The expert-parallel layer ran its experts in fp32 where the single layer runs them in the autocast dtype."""
    layer = build(name)
    x_all = inputs(name)[0]
    for r, res in enumerate(edge_ranks):
        x = part(x_all, r).clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref, _ = layer(x)
        ref.float().sum().backward()
        got = res[f"autocast_{name}"]
        assert got["out"].dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(got["out"], ref.detach(), rtol=0, atol=0, msg=f"rank {r} output")
        if CASES[name][2] == "concat":  # the input gradient of a per-batch router sees the other rank's rows
            torch.testing.assert_close(got["x_grad"], x.grad, rtol=1e-2, atol=1e-2, msg=f"rank {r} input gradient")


def test_a_rank_without_tokens_takes_part_forward_and_backward(edge_ranks):
    """The empty rank raised in the forward ("cannot reshape tensor of 0 elements") and the other waited
    in the backward exchange. Reference: the single layer on rank 0's tokens, the only ones there are."""
    x_all, up_all, _ = inputs("topk")
    layer = build("topk")
    x = part(x_all, 0).clone().requires_grad_(True)
    ref, stats = layer(x)
    ((ref * part(up_all, 0)).sum() + stats["balance_loss"]).backward()
    full, empty = (res["empty"] for res in edge_ranks)
    torch.testing.assert_close(full["out"], ref.detach(), **TOL)
    torch.testing.assert_close(full["x_grad"], x.grad, **TOL)
    assert empty["out"].shape == (0, S, 32) and empty["x_grad"].shape == (0, S, 32)
    for res in (full, empty):
        torch.testing.assert_close(res["stats"]["tokens_per_expert"], stats["tokens_per_expert"], rtol=0, atol=0)
    grads = {n: p.grad for n, p in layer.named_parameters()}
    for res in (full, empty):  # each expert shard's gradient: rank 0's rows, computed where the expert lives
        start, stop = res["expert_range"]
        for n, g in res["grads"].items():
            if n.startswith("experts."):
                torch.testing.assert_close(g, grads[n][start:stop], **TOL, msg=n)
    assert all(torch.all(g == 0) for n, g in empty["grads"].items() if not n.startswith("experts."))


# -- one rank, in this process ----------------------------------------------------------------------
# The 2-rank tests above run in spawned processes, which coverage does not follow; with a group of
# one rank the same code runs here (exchanges of one rank, no idle experts) and must equal the layer.

@pytest.fixture(scope="module")
def single_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_one_rank_group_equals_the_layer(single_rank_group, name):
    from fulu_nas.moe.expert_parallel import ExpertParallelMoE
    from fulu_nas.training.distributed import average_replicated_gradients, clip_grad_norm_, expert_shard_parameters

    layer = build(name)
    ep = ExpertParallelMoE.from_layer(build(name))
    x, up, ids = inputs(name)
    x_ref, x_ep = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, stats = layer(x_ref, token_ids=ids)
    out_ep, stats_ep = ep(x_ep, token_ids=ids)
    torch.testing.assert_close(out_ep, out, **TOL)
    torch.testing.assert_close(stats_ep["tokens_per_expert"], stats["tokens_per_expert"])
    ((out * up).mean() + stats["balance_loss"]).backward()
    ((out_ep * up).mean() + stats_ep["balance_loss"]).backward()
    average_replicated_gradients(ep)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, **TOL)
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    for n, p in ep.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], **TOL)
    assert len(expert_shard_parameters(ep)) >= 2
    clip_grad_norm_(ep, 1e9)
    gathered = ep.gather_layer().state_dict()
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(gathered[k], v)
    with torch.no_grad():
        torch.testing.assert_close(ep(x, token_ids=ids, with_stats=False)[0], layer(x, token_ids=ids)[0], **TOL)
