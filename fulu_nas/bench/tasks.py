"""Task benchmarks: train on a wall-clock or step budget, evaluate, print a table.

``python -m fulu_nas.bench clusters``  - the default top-k layer on ``clusters`` (8 experts, 8
domains), with each balancing method: routing accuracy, load balance, task accuracy.
``python -m fulu_nas.bench dynamic``   - dynamic expert scaling on ``clusters`` from 4 and from 32
experts, each against a fixed layer of the size it ended with.
``python -m fulu_nas.bench routers``   - the causal routers on ``pimoe_mix`` at equal settings:
loss, exact match on computed results, routing accuracy, balance. Not expert choice: its outputs read
later tokens, which training refuses on a next-token task (``training.model_task.NOT_CAUSAL``).
"""

from __future__ import annotations

import argparse
import json

import torch

from ..models import ArchConfig, PiMoETransformer
from ..moe import BALANCING_METHODS, ROUTERS, MoEConfig
from .common import (
    batch_int,
    device_name,
    int_in,
    markdown_table,
    positive_float,
    seconds_float,
    seed_int,
    steps_int,
    threads_int,
    unit_float,
)

# pimoe_mix is a next-token task, on which training refuses expert choice (it reads later tokens).
CAUSAL_ROUTERS = tuple(r for r in ROUTERS if r != "expert_choice")
DYNAMIC_SECONDS = 60.0
BALANCING = {name: BALANCING_METHODS[name] for name in ("aux_loss", "aux_free", "none")}


def clusters_arch(task, router: str = "topk", balancing: str = "aux_free", num_experts: int = 8) -> ArchConfig:
    """The clusters default: one block of width 64 whose FFN is the PiMoE layer (8 experts, GELU FFN
    32, top-1 with the gate probability as the weight).

    Why these settings. One block: attention carries the domain marker to every token and the
    experts are the only nonlinear computation before the head, so the per-domain function has
    to be computed by an expert. Small GELU experts make an expert that serves several domains
    pay for it (it must gate several classifiers by the domain). Top-1: each token goes to one
    expert, so routing is a partition whose balance the selection bias controls directly (with
    top-2 a domain's first choice can alternate inside an expert pair at perfect load balance).
    No renormalisation (Switch Transformer): a renormalised top-1 weight is always 1 and the router
    would learn from the balancing bias alone; the gate probability as weight carries the task
    loss to the router.
    """
    return ArchConfig(vocab_size=task.vocab_size, num_classes=task.num_classes, max_seq_len=task.seq_len,
                      num_layers=1, hidden_size=64, num_heads=4, moe_every=1, dense_ffn_size=128,
                      moe=MoEConfig(hidden_size=64, num_experts=num_experts, expert_ffn_size=32, top_k=1,
                                    renormalize=False, activation="gelu", router=router,
                                    **_router_extras(router), **BALANCING[balancing]))


def pimoe_mix_arch(task, router: str = "topk", balancing: str = "aux_free") -> ArchConfig:
    """pimoe_mix default: 2 layers of width 64, the second one PiMoE (8 experts, FFN 64, top-2)."""
    return ArchConfig(vocab_size=task.vocab_size, max_seq_len=task.seq_len, num_layers=2, hidden_size=64,
                      num_heads=4, moe_every=2, dense_ffn_size=128,
                      moe=MoEConfig(hidden_size=64, num_experts=8, expert_ffn_size=64, top_k=2, router=router,
                                    **_router_extras(router), **BALANCING[balancing]))


def _router_extras(router: str) -> dict:
    return {"hierarchical": {"hierarchy_depth": 2}, "attention": {"attention_context": True}}.get(router, {})


def run_one(task, arch: ArchConfig, seconds: float, batch_size: int, lr: float, seed: int,
            dynamic=None, steps: int | None = None) -> dict:
    """Train a fresh model of ``arch`` for ``seconds``, or for ``steps`` when given (``dynamic``: a
    DynamicExpertsConfig) and evaluate it; ``train_seconds`` is the training's alone (not the
    evaluation's), ``experts`` the final expert count of the (first) MoE layer."""
    from ..training.evaluate import evaluate
    from ..training.train import TrainConfig, train

    torch.manual_seed(seed)
    model = PiMoETransformer(arch)
    budget = dict(steps=steps, max_seconds=None) if steps else dict(steps=10**9, max_seconds=seconds)
    result = train(model, task, TrainConfig(**budget, batch_size=batch_size, lr=lr, seed=seed, progress=False,
                                            report_every=100, dynamic_experts=dynamic))
    ev = evaluate(model, task)
    return {"router": arch.moe.router, "steps": result.steps, "train_seconds": round(result.seconds, 1),
            "experts": model.moe_layers()[0].cfg.num_experts,
            "expert_history": [counts[0] for counts in result.expert_counts],
            **{k: v for k, v in ev.items() if isinstance(v, float)}}


def _table(rows: list[dict], columns: list[str]) -> str:
    return markdown_table(columns, [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
                                    for r in rows])


def _device_line() -> str:
    """The device and precision run_one trains with: its TrainConfig's device "auto" (CUDA where
    there is one, with bf16 autocast)."""
    from ..training.train import resolve_device

    device = resolve_device("auto")
    precision = "bf16 autocast" if device.type == "cuda" else "float32"
    return f"{device_name(device)}, torch {torch.__version__}, {precision}"


def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def clusters_main(args: argparse.Namespace) -> int:
    from ..tasks import ClustersTask

    _set_threads(args)
    task = ClustersTask()
    rows = []
    for balancing in args.balancing:
        row = run_one(task, clusters_arch(task, "topk", balancing), args.seconds, args.batch_size, args.lr, args.seed)
        rows.append({"balancing": balancing, **row})
        print(f"done: {balancing}", flush=True)
    print(f"\nclusters (8 domains), top-k layer of 8 experts (top-1, GELU FFN 32), {args.seconds:g} s of training, "
          f"{_device_line()}\n")
    print(_table(rows, ["balancing", "steps", "loss", "accuracy", "routing_accuracy", "load_balance", "max_vio"]))
    _dump(args, rows)
    return 0


def routers_main(args: argparse.Namespace) -> int:
    from ..tasks import PiMoEMixTask

    _set_threads(args)
    task = PiMoEMixTask()
    rows = []
    for router in args.routers:
        rows.append(run_one(task, pimoe_mix_arch(task, router, args.balancing_method), args.seconds, args.batch_size,
                            args.lr, args.seed))
        print(f"done: {router}", flush=True)
    print(f"\npimoe_mix, 8 experts top-2 ({args.balancing_method}), {args.seconds:g} s of training per router, "
          f"{_device_line()}\n")
    print(_table(rows, ["router", "steps", "loss", "exact_match", "routing_accuracy", "load_balance", "max_vio"]))
    _dump(args, rows)
    return 0


def dynamic_main(args: argparse.Namespace) -> int:
    """Dynamic expert scaling from each start size, then a fixed layer of the size it ended with
    (same budget, seed and settings otherwise), for each seed; the target: from 4 it must
    grow, from 32 shrink, with routing accuracy no worse than the fixed layer of the final size.
    ``--steps`` gives every run the same number of steps (a comparison that another process on
    the same cores cannot skew); otherwise each run gets ``--seconds`` of wall-clock."""
    from ..tasks import ClustersTask
    from ..training.dynamic_experts import DynamicExpertsConfig

    if args.steps and args.seconds:
        raise ValueError("give --steps or --seconds, not both (a step budget ignores the clock)")
    args.seconds = None if args.steps else args.seconds or DYNAMIC_SECONDS
    _set_threads(args)
    task = ClustersTask()
    cfg = DynamicExpertsConfig(every=args.every, freeze_after=args.freeze_after)
    rows, verdicts = [], []
    for seed in args.seeds:
        for start in args.start:
            dyn = run_one(task, clusters_arch(task, num_experts=start), args.seconds, args.batch_size, args.lr,
                          seed, dynamic=cfg, steps=args.steps)
            history = dyn["expert_history"]
            rows.append({"seed": seed, "layer": f"dynamic from {start}", "path": " > ".join(map(str, history)), **dyn})
            print(f"done: seed {seed}, dynamic from {start} -> {dyn['experts']}", flush=True)
            fixed = run_one(task, clusters_arch(task, num_experts=dyn["experts"]), args.seconds, args.batch_size,
                            args.lr, seed, steps=args.steps)
            rows.append({"seed": seed, "layer": f"fixed {dyn['experts']}", "path": str(dyn["experts"]), **fixed})
            print(f"done: seed {seed}, fixed {dyn['experts']}", flush=True)
            # One expert a domain: from fewer it should grow, from more shrink, from as many stay.
            direction = "more" if start < task.num_domains else "fewer" if start > task.num_domains else "as many"
            moved = {"more": dyn["experts"] > start, "fewer": dyn["experts"] < start,
                     "as many": dyn["experts"] == start}[direction]
            kept = dyn["routing_accuracy"] >= fixed["routing_accuracy"]
            verdicts.append(f"seed {seed}, from {start}: ended with {dyn['experts']} ({direction} wanted: "
                            f"{'yes' if moved else 'NO'}), routing accuracy {dyn['routing_accuracy']:.3f} vs fixed "
                            f"{fixed['routing_accuracy']:.3f} ({'no worse' if kept else 'WORSE'})")
    budget = f"{args.steps} steps" if args.steps else f"{args.seconds:g} s of training"
    print(f"\nclusters ({task.num_domains} domains), dynamic expert scaling (check every {cfg.every} steps, frozen "
          f"after {cfg.freeze_after:.0%} of the budget) vs fixed layers, {budget} each, {_device_line()}\n")
    print(_table(rows, ["seed", "layer", "path", "steps", "train_seconds", "loss", "accuracy", "routing_accuracy",
                        "load_balance"]))
    print()
    print("\n".join(verdicts))
    _dump(args, rows)
    return 0


def _dump(args: argparse.Namespace, rows: list[dict]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": _device_line(), "seconds": args.seconds, "steps": getattr(args, "steps", None),
                       "rows": rows}, f, indent=2)


THREADS_HELP = ("torch CPU threads (0: torch's default). The clusters model is tiny: one thread runs it "
                "fastest, and several threads collapse when another process shares the cores")


def add_parsers(sub) -> None:
    from ..training.dynamic_experts import DynamicExpertsConfig

    p = sub.add_parser("clusters", help="routing accuracy and balance on clusters within a time budget")
    p.add_argument("--seconds", type=seconds_float, default=60.0)
    p.add_argument("--balancing", nargs="+", choices=tuple(BALANCING), default=["aux_free", "aux_loss"])
    p.add_argument("--batch-size", type=batch_int, default=128)
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--threads", type=threads_int, default=1, help=THREADS_HELP)
    p.add_argument("--json")
    p.set_defaults(run=clusters_main)
    p = sub.add_parser("dynamic", help="dynamic expert scaling on clusters from 4 and 32 experts vs fixed layers")
    p.add_argument("--seconds", type=seconds_float,
                   help=f"training budget of each of the runs (default {DYNAMIC_SECONDS:g})")
    p.add_argument("--steps", type=steps_int, help="a step budget instead of --seconds (the same for every run)")
    defaults = DynamicExpertsConfig()
    # Checked here, before the first run trains: training refuses a count outside the range only as that
    # start's run begins.
    p.add_argument("--start", type=int_in(defaults.min_experts, defaults.max_experts), nargs="+", default=[4, 32],
                   help=f"initial expert counts ({defaults.min_experts} to {defaults.max_experts}: the dynamic "
                        "layer's min_experts..max_experts)")
    p.add_argument("--every", type=steps_int, default=defaults.every, help="steps between rescaling checks")
    p.add_argument("--freeze-after", type=unit_float, default=defaults.freeze_after,
                   help="share of the budget after which the expert set stays fixed")
    p.add_argument("--batch-size", type=batch_int, default=128)
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--seeds", type=seed_int, nargs="+", default=[0])
    p.add_argument("--threads", type=threads_int, default=1, help=THREADS_HELP)
    p.add_argument("--json")
    p.set_defaults(run=dynamic_main)
    p = sub.add_parser("routers", help="the causal routers compared on pimoe_mix within a time budget each "
                                       "(not expert_choice: it reads later tokens)")
    p.add_argument("--seconds", type=seconds_float, default=300.0)
    p.add_argument("--routers", nargs="+", choices=CAUSAL_ROUTERS, default=list(CAUSAL_ROUTERS),
                   help="the routers to compare (not expert_choice: it reads later tokens, which training refuses "
                        "on this next-token task)")
    p.add_argument("--balancing-method", choices=tuple(BALANCING), default="aux_free")
    p.add_argument("--batch-size", type=batch_int, default=32)
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--json")
    p.set_defaults(run=routers_main)
