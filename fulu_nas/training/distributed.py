"""Data and expert parallelism with torch.distributed: process-group setup under torchrun, swapping
a model's MoE layers for their expert-parallel form and back, and gradient averaging.

The layout is one process group that is both the data-parallel and the expert-parallel group:
every rank reads its own batch, holds E/P experts of each MoE layer (see
:mod:`fulu_nas.moe.expert_parallel`) and a replica of everything else. A training step is::

    out = model(batch)                      # tokens are exchanged with all-to-alls inside
    (local_mean_loss + out.balance_loss).backward()
    average_replicated_gradients(model)     # then the optimizer step, as on one device

Gradient convention: each rank's loss is the mean over its own batch, and the objective is the
mean of these losses over ranks (= the mean over the concatenated batch when the per-rank batches
have equal size). After backward a replicated parameter holds its local gradient: the helper
averages it over ranks. An expert shard already holds the sum over ranks of every rank's loss
gradient (the backward all-to-all brings its rows' gradients home): the helper divides it by P.
Then every gradient is the single-device gradient of the concatenated batch's mean loss.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..moe import ROUTERS, MoEConfig
from ..moe.expert_parallel import ExpertParallelMoE
from ..moe.layer import PiMoELayer


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL with one GPU per local rank when CUDA
    is available, else Gloo on the CPU. Without torchrun's variables it is a one-process group.
    Idempotent: an already initialised group is described, not re-created."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kw = {}
        if timeout_s is not None:
            from datetime import timedelta

            kw["timeout"] = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" not in os.environ:  # a single process outside torchrun
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None, **kw)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (before :func:`expert_parallel`,
    so every rank slices its experts out of the same layer)."""
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
        # A collective writes without moving the version counter, which copies kept between calls (the
        # CPU experts' packed weights, the router's bf16 split) watch: they would keep this rank's own.
        torch.autograd.graph.increment_version(t)


def expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None, chunks: int = 1) -> nn.Module:
    """Replace every :class:`PiMoELayer` inside ``model`` (or ``model`` itself) by its
    :class:`ExpertParallelMoE` on this rank of ``group`` (exchanging in ``chunks``), in place; returns
    the model. The layers must be identical on every rank (same seed, or :func:`broadcast_module` first)."""
    return _swap(model, lambda layer: ExpertParallelMoE.from_layer(layer, group, chunks), want_ep=False)


def gather_experts(model: nn.Module) -> nn.Module:
    """Replace every :class:`ExpertParallelMoE` inside ``model`` by the ordinary single-device
    layer (:meth:`ExpertParallelMoE.gather_layer`, a collective), in place; returns the model.
    Its ``state_dict`` is then the single-device checkpoint format."""
    return _swap(model, lambda layer: layer.gather_layer(), want_ep=True)


def _swap(model: nn.Module, convert, want_ep: bool) -> nn.Module:
    def matches(m: nn.Module) -> bool:
        return isinstance(m, PiMoELayer) and isinstance(m, ExpertParallelMoE) == want_ep

    if matches(model):
        return convert(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if matches(child):
                setattr(parent, name, convert(child))
    return model


def expert_shard_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that live on one rank only (the experts of the expert-parallel layers)."""
    return [p for m in model.modules() if isinstance(m, ExpertParallelMoE) for p in m.experts.parameters()]


@torch.no_grad()
def average_replicated_gradients(model: nn.Module, group: dist.ProcessGroup | None = None, *,
                                 scale_expert_shards: bool = True) -> None:
    """Average the gradients of every replicated parameter (all but the expert shards) over
    ``group`` (one all-reduce per dtype, flattened), and divide the expert shards' gradients by
    the group size (see the module doc: with per-rank mean losses this makes every gradient the
    single-device one). ``scale_expert_shards=False`` leaves the shards' gradients as the sum of
    every rank's loss gradient (for a loss that is already summed over ranks)."""
    P = dist.get_world_size(group)
    shards = {id(p) for p in expert_shard_parameters(model)}
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in model.parameters():
        if id(p) in shards:
            if p.grad is not None and scale_expert_shards:
                p.grad.div_(P)
            continue
        if p.grad is not None:  # the same parameters on every rank: the same graph everywhere
            by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(P)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole (distributed) model: the norm counts each
    replicated gradient once (call :func:`average_replicated_gradients` first, so they agree on
    every rank) and every rank's expert shards. Returns the total norm (the same on every rank)."""
    shards = {id(p) for p in expert_shard_parameters(model)}
    params = [p for p in model.parameters() if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")

    def norm(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), device=device)
        return torch.nn.utils.get_total_norm([g.float() for g in grads]).to(device)

    replicated = norm([p.grad for p in params if id(p) not in shards])
    shard_sq = norm([p.grad for p in params if id(p) in shards]).square()
    dist.all_reduce(shard_sq, group=group)
    total = (replicated.square() + shard_sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


class _RanksParser(argparse.ArgumentParser):
    """Under torchrun every rank parses the same options and refuses the same ones: rank 0 alone says why."""

    def error(self, message: str):
        if int(os.environ.get("RANK", 0)) != 0:
            self.exit(2)
        super().error(message)


def _benchmark_options(argv: list[str] | None) -> tuple[argparse.Namespace, MoEConfig]:
    """The options of :func:`main` and the layer's config, each bad option refused the way argparse
    refuses one (its message, exit 2) before any process group starts: they ended in a traceback from
    every rank, some after the ranks had met."""
    from ..options import MAX_TOKENS, check_writable, experts_int, int_in, steps_int, tokens_int, width_int

    ap = _RanksParser(prog="python -m fulu_nas.training.distributed", allow_abbrev=False)
    ap.add_argument("--hidden", type=width_int, default=256)
    ap.add_argument("--experts", type=experts_int, default=8)
    ap.add_argument("--ffn", type=width_int, default=512)
    ap.add_argument("--top-k", type=experts_int, default=2)
    ap.add_argument("--router", default="topk", choices=ROUTERS)
    ap.add_argument("--tokens", type=tokens_int, default=4096, help="tokens per rank")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=steps_int, default=10)
    ap.add_argument("--impl", choices=("grouped", "grouped_mm", "triton", "sorted"),
                    help="the experts' kernels (default: the layer's, grouped)")
    ap.add_argument("--chunks", type=int_in(1, MAX_TOKENS), default=1,
                    help="exchange the tokens in this many chunks, overlapping the all-to-alls with the experts")
    ap.add_argument("--no-check", action="store_true", help="skip the equivalence check (needs the full layer)")
    ap.add_argument("--profile", help="write rank 0's torch.profiler table of 3 timed steps to this file")
    args = ap.parse_args(argv)
    # torchrun's (the group is not started yet); a hand-made environment may hold anything
    world = os.environ.get("WORLD_SIZE", "1")
    ranks = int(world) if world.strip().isdecimal() else 0
    if ranks < 1:
        ap.error(f"WORLD_SIZE must be a positive integer, got {world!r}")
    if args.experts % ranks:
        ap.error(f"--experts {args.experts}: expert parallelism over {ranks} ranks needs a multiple of {ranks}")
    try:
        if args.profile is not None:
            check_writable(args.profile, "--profile")
        cfg = MoEConfig(hidden_size=args.hidden, num_experts=args.experts, expert_ffn_size=args.ffn,
                        top_k=args.top_k, router=args.router)
    except ValueError as e:  # an impossible layer (top_k above the experts, ...), or nowhere to write
        ap.error(str(e))
    return args, cfg


def main(argv: list[str] | None = None) -> None:
    """``torchrun --nproc-per-node=P -m fulu_nas.training.distributed [options]``: check that the
    expert-parallel layer equals the single-device layer on each rank's input, then time its
    forward+backward (tokens/s per rank and in total). Prints from rank 0."""
    import time

    args, cfg = _benchmark_options(argv)
    info = init_from_env()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layer = PiMoELayer(cfg).to(info.device, dtype)
    ep = ExpertParallelMoE.from_layer(layer, chunks=args.chunks)
    torch.manual_seed(1 + info.rank)
    x = torch.randn(args.tokens, args.hidden, device=info.device, dtype=dtype)
    ids = torch.randint(0, 1 << 20, (args.tokens,), device=info.device)
    if not args.no_check:
        with torch.no_grad():
            ref, _ = layer(x, token_ids=ids, impl=args.impl)  # the same kernels: only the layout differs
            out, _ = ep(x, token_ids=ids, impl=args.impl)
        err = torch.tensor((out.float() - ref.float()).abs().max().item(), device=info.device)
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        if info.rank == 0:
            print(f"max |EP - single| over ranks: {err.item():.3g} ({args.dtype})", flush=True)
    del layer
    x.requires_grad_(True)

    def step() -> None:
        out, stats = ep(x, token_ids=ids, impl=args.impl)
        (out.float().square().mean() + stats["balance_loss"]).backward()
        ep.zero_grad(set_to_none=True)
        x.grad = None

    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    for _ in range(2):
        step()
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if info.device.type == "cuda" else [])
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no "USDT: profiler_start" lines (deploy/cost.py)
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            sync()
        if info.rank == 0:
            sort = "cuda_time_total" if info.device.type == "cuda" else "self_cpu_time_total"
            with open(args.profile, "w") as f:
                f.write(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))
    if info.rank == 0:
        print(f"{info.world_size} ranks ({info.backend}, {info.device.type}), torch {torch.__version__}: "
              f"{args.tokens} tokens/rank, E={args.experts}, D={args.hidden}, F={args.ffn}, top-{args.top_k}, "
              f"{args.dtype}, impl {args.impl or cfg.impl}, {args.chunks} chunk(s): {seconds * 1e3:.2f} ms per "
              "forward+backward, "
              f"{args.tokens / seconds:,.0f} tokens/s per rank, "
              f"{args.tokens * info.world_size / seconds:,.0f} tokens/s total", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
