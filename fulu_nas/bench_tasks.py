"""Task benchmarks (issue 3's targets): train on a wall-clock budget, evaluate, print a table.

``python -m fulu_nas.bench clusters``  - the default top-k layer on ``clusters`` (8 experts, 8
domains), with each balancing method: routing accuracy, load balance, task accuracy.
``python -m fulu_nas.bench routers``   - the five routers on ``pimoe_mix`` at equal settings:
loss, exact match on computed results, routing accuracy, balance.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .models import ArchConfig, PiMoETransformer
from .moe import ROUTERS, MoEConfig

BALANCING = {
    "aux_loss": {"aux_loss_coef": 0.01},
    "aux_free": {"bias_update_rate": 1e-3},
    "none": {},
}


def clusters_arch(task, router: str = "topk", balancing: str = "aux_free") -> ArchConfig:
    """The clusters default: 2 layers of width 64, the second one PiMoE (8 experts, FFN 128, top-2)."""
    return ArchConfig(vocab_size=task.vocab_size, num_classes=task.num_classes, max_seq_len=task.seq_len,
                      num_layers=2, hidden_size=64, num_heads=4, moe_every=2, dense_ffn_size=128,
                      moe=MoEConfig(hidden_size=64, num_experts=8, expert_ffn_size=128, top_k=2, router=router,
                                    **_router_extras(router), **BALANCING[balancing]))


def pimoe_mix_arch(task, router: str = "topk", balancing: str = "aux_free") -> ArchConfig:
    """pimoe_mix default: 2 layers of width 64, the second one PiMoE (8 experts, FFN 64, top-2)."""
    return ArchConfig(vocab_size=task.vocab_size, max_seq_len=task.seq_len, num_layers=2, hidden_size=64,
                      num_heads=4, moe_every=2, dense_ffn_size=128,
                      moe=MoEConfig(hidden_size=64, num_experts=8, expert_ffn_size=64, top_k=2, router=router,
                                    **_router_extras(router), **BALANCING[balancing]))


def _router_extras(router: str) -> dict:
    return {"hierarchical": {"hierarchy_depth": 2}, "attention": {"attention_context": True}}.get(router, {})


def run_one(task, arch: ArchConfig, seconds: float, batch_size: int, lr: float, seed: int) -> dict:
    from .evaluate import evaluate
    from .train import TrainConfig, train

    torch.manual_seed(seed)
    model = PiMoETransformer(arch)
    start = time.perf_counter()
    result = train(model, task, TrainConfig(steps=10**9, max_seconds=seconds, batch_size=batch_size, lr=lr,
                                            seed=seed, progress=False, report_every=100))
    ev = evaluate(model, task)
    return {"router": arch.moe.router, "steps": result.steps, "train_seconds": round(time.perf_counter() - start, 1),
            **{k: v for k, v in ev.items() if isinstance(v, float)}}


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |")
    return "\n".join(lines)


def _device_line() -> str:
    from .bench import device_name

    return f"{device_name(torch.device('cpu'))}, torch {torch.__version__}, float32"


def clusters_main(args: argparse.Namespace) -> int:
    from .tasks import ClustersTask

    task = ClustersTask()
    rows = []
    for balancing in args.balancing:
        row = run_one(task, clusters_arch(task, "topk", balancing), args.seconds, args.batch_size, args.lr, args.seed)
        rows.append({"balancing": balancing, **row})
        print(f"done: {balancing}", flush=True)
    print(f"\nclusters (8 domains), top-k layer of 8 experts, {args.seconds:.0f} s of training, {_device_line()}\n")
    print(_table(rows, ["balancing", "steps", "loss", "accuracy", "routing_accuracy", "load_balance", "max_vio"]))
    _dump(args, rows)
    return 0


def routers_main(args: argparse.Namespace) -> int:
    from .tasks import PiMoEMixTask

    task = PiMoEMixTask()
    rows = []
    for router in args.routers:
        rows.append(run_one(task, pimoe_mix_arch(task, router, args.balancing_method), args.seconds, args.batch_size,
                            args.lr, args.seed))
        print(f"done: {router}", flush=True)
    print(f"\npimoe_mix, 8 experts top-2 ({args.balancing_method}), {args.seconds:.0f} s of training per router, "
          f"{_device_line()}\n")
    print(_table(rows, ["router", "steps", "loss", "exact_match", "routing_accuracy", "load_balance", "max_vio"]))
    _dump(args, rows)
    return 0


def _dump(args: argparse.Namespace, rows: list[dict]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": _device_line(), "seconds": args.seconds, "rows": rows}, f, indent=2)


def add_parsers(sub) -> None:
    p = sub.add_parser("clusters", help="routing accuracy and balance on clusters within a time budget")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--balancing", nargs="+", choices=tuple(BALANCING), default=["aux_free", "aux_loss"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.set_defaults(run=clusters_main)
    p = sub.add_parser("routers", help="the five routers compared on pimoe_mix within a time budget each")
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--routers", nargs="+", choices=ROUTERS, default=list(ROUTERS))
    p.add_argument("--balancing-method", choices=tuple(BALANCING), default="aux_free")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.set_defaults(run=routers_main)
