"""The CPU memory peak of the cost protocol (fulu_nas.deploy.cost.cpu_peak_bytes): exact for a known
sequence of allocations, and silent: torch.profiler's C++ backend writes straight to the process's
file descriptors, which would break the search's progress bar, so the check runs in a child process
and reads what reached its real stdout and stderr."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

MB = 1 << 20

MEASURE = textwrap.dedent("""
    import sys
    import torch
    from fulu_nas.deploy.cost import cpu_peak_bytes

    def allocations():
        a = torch.empty(3 * {MB}, dtype=torch.uint8)
        b = torch.empty({MB}, dtype=torch.uint8)
        del a  # live: 4 MB at most, then 1 MB, then 3 MB
        c = torch.empty(2 * {MB}, dtype=torch.uint8)
        return b, c

    logits = torch.zeros(64, 4096)  # 1 MB of float32
    targets = torch.zeros(64, dtype=torch.long)

    def composite():  # cross_entropy frees its log_softmax (1 MB) before it returns
        return torch.nn.functional.cross_entropy(logits, targets)

    peaks = [cpu_peak_bytes(allocations) for _ in range(2)] + [cpu_peak_bytes(composite)]
    with open(sys.argv[1], "w") as f:
        f.write(" ".join(map(str, peaks)))
""").format(MB=MB)


def test_cpu_peak_is_exact_and_prints_nothing(tmp_path):
    """Each allocation and free counts at its own time: a temporary that an op frees before it returns
    (cross_entropy's log_softmax) counts too. Summing each op's net memory at its start cancelled it."""
    result_file = tmp_path / "peaks.txt"
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}  # the profiler's defaults
    result = subprocess.run([sys.executable, "-c", MEASURE, str(result_file)], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    *exact, composite = map(int, result_file.read_text().split())
    assert exact == [4 * MB] * 2
    assert MB <= composite < MB + 4096  # the log_softmax, and the loss's few bytes


def test_the_latency_ratio_cancels_the_order_of_a_pair():
    """Model and reference take turns call by call; a call that goes first in its pair can pay what
    the second does not (caches, clocks after the loop's own work). With the model always first, two
    identical calls measured a ratio of the first call's penalty; the order alternates, and each
    ratio is taken over both orders."""
    import time

    from fulu_nas.deploy.cost import _timings, pair_ratio

    made = []

    def busy(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    def call(name):
        def run():
            busy(0.004 if len(made) % 2 == 0 else 0.002)  # the first of each pair pays twice the work
            made.append(name)
        return run

    times = _timings({"model": call("model"), "reference": call("reference")}, 10, cuda=False)
    assert made[:4] == ["model", "reference", "reference", "model"]
    assert made.count("model") == made.count("reference") == 10
    assert abs(pair_ratio(times["model"], times["reference"]) - 1) < 0.15
