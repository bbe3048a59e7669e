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

    peaks = [cpu_peak_bytes(allocations) for _ in range(2)]
    with open(sys.argv[1], "w") as f:
        f.write(" ".join(map(str, peaks)))
""").format(MB=MB)


def test_cpu_peak_is_exact_and_prints_nothing(tmp_path):
    result_file = tmp_path / "peaks.txt"
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}  # the profiler's defaults
    result = subprocess.run([sys.executable, "-c", MEASURE, str(result_file)], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    assert result_file.read_text().split() == [str(4 * MB)] * 2
