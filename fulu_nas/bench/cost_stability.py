"""``fulu-nas bench cost``: how stable the search's cost figures are on a shared machine.

One architecture of a search space is measured ``--repeat`` times with exactly the protocol a trial
uses (the study's cost shapes, interleaved rounds beside the space's reference model), optionally
while ``--load`` busy processes compete for the CPU. Prints each repetition's ``latency_ms`` and
``latency_ratio`` and their relative range ((max - min) / median): the ratio is what a search should
compare architectures by when the machine is not its own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys

import torch

from ..models import PiMoETransformer
from .common import MAX_PROCESSES, arch_values, device_name, int_in, markdown_table, rounds_int

# A busy loop that ends once the process that started it is gone (it checks every ~10 ms of work): a command
# ended by a signal or killed outright left its competitors running for good.
_BUSY = """import os, sys
parent = int(sys.argv[1])  # not its own getppid(): the parent may be gone before this line runs
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


def busy_processes(n: int) -> list[subprocess.Popen]:
    """``n`` processes competing for the CPU, each in a session of its own (a Ctrl-C at the terminal is the
    command's to handle), each ending with this process."""
    return [subprocess.Popen([sys.executable, "-c", _BUSY, str(os.getpid())], start_new_session=True) for _ in range(n)]


def relative_range(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def cost_main(args: argparse.Namespace) -> int:
    # The search's modules need optuna, hydra and mlflow; the bench command line loads with torch alone.
    from ..search.objective import measure_trial_cost, reference_model
    from .nas_settings import composed_settings

    s = composed_settings(args.overrides)
    values = {**(s.space.reference or {}), **arch_values(args.params, "--params")}
    arch = s.space.given_arch(values, s.task, "--params")
    torch.manual_seed(s.train.seed)
    model = PiMoETransformer(arch)
    reference = reference_model(s, torch.device("cpu"))
    hogs = busy_processes(args.load)
    rows = []
    # SIGTERM (timeout, kill) ends the command through the finally below, as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        for _ in range(args.repeat):
            _, metrics = measure_trial_cost(model, s, reference)
            rows.append(metrics)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for p in hogs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    latency = [r["latency_ms"] for r in rows]
    ratio = [r["latency_ratio"] for r in rows]
    print(f"cost protocol of the search, {device_name(torch.device('cpu'))}, torch {torch.__version__}, "
          f"{args.load} competing busy processes; shapes {list(s.cost.shapes)} (the figures of the first shape, as "
          f"a trial's), {s.cost.rounds} rounds of {s.cost.iterations} calls; architecture {values}\n")
    body = [[str(i + 1), f"{r['latency_ms']:.3f}", f"{r['latency_spread']:.2f}", f"{r['reference_latency_ms']:.3f}",
             f"{r['latency_ratio']:.3f}", f"{r['latency_ratio_spread']:.2f}"] for i, r in enumerate(rows)]
    print(markdown_table(["repetition", "latency_ms", "spread", "reference ms", "latency_ratio", "spread"], body))
    print("\nlatency_ms and reference ms: the median over the rounds of each round's median call; latency_ratio: the "
          "median over the rounds of each round's median ratio over pairs of calls taking turns with the reference's, "
          "each first as often (the drift cancels call by call: not latency_ms / reference ms); spread: interquartile "
          "range / median over the rounds")
    print(f"relative range over {args.repeat} repetitions: latency_ms {relative_range(latency):.1%}, "
          f"latency_ratio {relative_range(ratio):.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(torch.device("cpu")), "torch": torch.__version__, "load": args.load,
                       "architecture": values, "rows": rows}, f, indent=2)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("cost", help="repeat one architecture's cost measurement (the search's protocol), "
                                    "optionally under competing CPU load")
    p.add_argument("overrides", nargs="*", help="search config overrides, e.g. search_space=routers task=clusters")
    p.add_argument("--params", default="router=hierarchical,num_experts=16,hierarchy_depth=2",
                   help="architecture parameters over the space's reference, as key=value,... (default: %(default)s)")
    p.add_argument("--repeat", type=rounds_int, default=5)
    p.add_argument("--load", type=int_in(0, MAX_PROCESSES), default=0,
                   help="busy processes competing for the CPU while measuring")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(run=cost_main)
