"""The search's trainer on the CPU with torch's deterministic algorithms (``trainer.deterministic``,
the default) and without: the time of a training step, and whether an architecture trained again
gets the same weights (BENCHMARKS.md, "Deterministic training on the CPU").

    python3 benchmarks/deterministic_training.py [--steps N] [--rounds R] [--archs SPEC ...] [overrides]

Each architecture is the search space's reference with SPEC's values (``key=value,...``; ``""`` the
reference itself). The two settings take turns in each of ``--rounds`` rounds, each a fresh model
of the same seed trained ``--steps`` steps as a trial is (eager); a time is the smallest round's
mean step after the first step. ``distinct weights``: how many different trained models the rounds
of a setting ended with (1: reproducible). Hydra overrides choose the task and space as for
``fulu-nas search`` (default: the default search).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib

import torch

from fulu_nas.bench.common import space_values
from fulu_nas.models import seeded_model
from fulu_nas.search.app import compose_config
from fulu_nas.search.settings import load_settings
from fulu_nas.training.train import train

ARCHS = ("", "num_experts=32,top_k=4,expert_ffn_size=256", "num_experts=64,top_k=4,expert_ffn_size=64",
         "router=attention,attention_context=true", "router=hierarchical,hierarchy_depth=2,num_experts=16")


def weights_digest(model: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    settings = load_settings(*compose_config(args.overrides))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, {args.rounds} rounds")
    print("| architecture | default algorithms (ms a step) | deterministic | speed-up | distinct weights (default / "
          "deterministic) | final loss (default / deterministic) |")
    print("|---|---:|---:|---:|---|---|")
    for spec in args.archs:
        values = space_values(filter(None, spec.split(",")), "--archs")
        arch = settings.space.arch({**(settings.space.reference or {}), **values}, settings.task)
        times: dict[bool, list[float]] = {False: [], True: []}
        digests: dict[bool, set[str]] = {False: set(), True: set()}
        losses: dict[bool, set[float]] = {False: set(), True: set()}
        for _ in range(args.rounds):
            for deterministic in (False, True):
                cfg = dataclasses.replace(settings.train, steps=args.steps, seconds_cap=None, max_seconds=None,
                                          progress=False, compile="eager", deterministic=deterministic)
                model = seeded_model(arch, settings.train.seed, torch.device("cpu"))
                result = train(model, settings.task, cfg)
                times[deterministic].append((result.seconds - result.first_step_seconds) / (result.steps - 1) * 1e3)
                digests[deterministic].add(weights_digest(model))
                losses[deterministic].add(round(result.final_loss, 4))
        default, deterministic = min(times[False]), min(times[True])
        print(f"| {spec or 'reference'} | {default:.2f} | {deterministic:.2f} | {default / deterministic:.3f}x | "
              f"{len(digests[False])} / {len(digests[True])} | {sorted(losses[False])} / {sorted(losses[True])} |",
              flush=True)


if __name__ == "__main__":
    main()
