"""The cached Triton launcher (fulu_nas.moe._triton_launch) on the CPU: which calls may reuse a
compiled kernel (the signature Triton specialises on), and the arguments a reused kernel is launched
with. A stand-in JIT function and compiled kernel record the calls; tests/test_triton_moe.py runs
the real kernels through it on a GPU."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton")
from fulu_nas.moe import _triton_launch  # noqa: E402
from fulu_nas.moe._triton_launch import CachedLauncher, specialization_key  # noqa: E402


def _misaligned(n: int, dtype=torch.bfloat16) -> torch.Tensor:
    base = torch.zeros(n + 1, dtype=dtype)
    return base[1:]  # 2 bytes past a 16-byte boundary (bf16)


def test_key_separates_what_triton_specialises_on():
    a, b = torch.zeros(64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16)
    assert a.data_ptr() % 16 == 0 and _misaligned(64).data_ptr() % 16 != 0
    assert specialization_key((a, 32, 2.0)) == specialization_key((b, 48, 3.0))  # same classes
    assert specialization_key((a,)) != specialization_key((_misaligned(64),))  # alignment
    assert specialization_key((a,)) != specialization_key((a.float(),))  # dtype
    ints = [1, 16, 17, 2**31, 2**31 + 1, 2**63]
    assert len({specialization_key((v,)) for v in ints}) == len(ints)  # ==1, %16, other; i32/i64/u64
    assert specialization_key((17,)) == specialization_key((19,))
    assert specialization_key((2,)) != specialization_key((2.0,)) != specialization_key((True,))
    assert specialization_key((2.0,)) == specialization_key((3.5,))  # floats are not specialised
    np = pytest.importorskip("numpy")
    assert specialization_key((np.int64(16),)) != specialization_key((np.int64(32),))  # by value


class _Param:
    def __init__(self, name: str, constexpr: bool, default=inspect.Parameter.empty):
        self.name, self.is_constexpr, self.default = name, constexpr, default


class _Compiled:
    function, packed_metadata = "fn-handle", "metadata"

    def __init__(self, launches: list):
        self.launches = launches

    def run(self, *args):
        self.launches.append(args)


class _JitFunction:
    """Triton's JITFunction as the launcher uses it: ``params`` and ``run`` (which launches)."""

    params = [_Param("x_ptr", False), _Param("n", False), _Param("BLOCK", True),
              _Param("EVEN", True, default=False), _Param("MODE", True)]

    def __init__(self):
        self.slow, self.fast = [], []
        self.compiled = _Compiled(self.fast)

    def run(self, *args, grid, warmup, **kwargs):
        self.slow.append((grid, args, kwargs))
        return self.compiled


class _Driver:
    class active:  # noqa: N801 (triton.runtime.driver.active)
        @staticmethod
        def get_current_device():
            return 0

        @staticmethod
        def get_current_stream(device):
            return 1234


@pytest.fixture
def launcher(monkeypatch):
    monkeypatch.setattr(_triton_launch, "driver", _Driver)
    return CachedLauncher(_JitFunction())


def test_second_call_of_a_signature_launches_the_compiled_kernel(launcher):
    fn, x = launcher.fn, torch.zeros(64)
    launcher[(3,)](x, 100, MODE=2, BLOCK=64, num_warps=4)
    assert len(fn.slow) == 1 and not fn.fast and len(launcher) == 1
    y = torch.ones(32)
    launcher[(5, 2)](y, 116, MODE=2, BLOCK=64, num_warps=4)
    assert len(fn.slow) == 1
    # grid padded to three dimensions, the stream, the handles, no hooks, then the arguments in
    # signature order: the runtime ones, then every constexpr (EVEN at its default)
    assert fn.fast == [(5, 2, 1, 1234, "fn-handle", "metadata", None, None, None, y, 116, 64, False, 2)]


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int class", "constexpr", "option", "grid function"])
def test_calls_triton_compiles_differently_take_its_path(launcher, change):
    fn = launcher.fn
    launcher[(1,)](torch.zeros(64, dtype=torch.bfloat16), 32, BLOCK=64, MODE=0, num_warps=4)
    args, kwargs, grid = [torch.zeros(64, dtype=torch.bfloat16), 32], dict(BLOCK=64, MODE=0, num_warps=4), (1,)
    if change == "misaligned":
        args[0] = _misaligned(64)
    elif change == "dtype":
        args[0] = torch.zeros(64)
    elif change == "int class":
        args[1] = 1
    elif change == "constexpr":
        kwargs["BLOCK"] = 128
    elif change == "option":
        kwargs["num_warps"] = 8
    else:
        grid = lambda meta: (1,)  # noqa: E731
    launcher[grid](*args, **kwargs)
    assert len(fn.slow) == 2 and not fn.fast


def test_constexpr_passed_by_position_is_never_cached(launcher):
    fn, x = launcher.fn, torch.zeros(64)
    for _ in range(2):
        launcher[(1,)](x, 32, 64, MODE=0)  # BLOCK by position: its value is not in the key
    assert len(fn.slow) == 2 and not fn.fast and len(launcher) == 0


def test_installed_launch_hook_takes_tritons_path(launcher, monkeypatch):
    fn, x = launcher.fn, torch.zeros(64)
    launcher[(1,)](x, 32, BLOCK=64, MODE=0)
    monkeypatch.setattr(_triton_launch, "_hooked", lambda: True)
    launcher[(1,)](x, 32, BLOCK=64, MODE=0)
    assert len(fn.slow) == 2 and not fn.fast


def test_hook_chain_with_a_hook_counts_as_hooked():
    from triton import knobs

    chain = knobs.runtime.launch_enter_hook
    assert not _triton_launch._hooked()
    hook = lambda *args: None  # noqa: E731
    if hasattr(chain, "add"):  # triton >= 3.5: a chain of hooks
        chain.add(hook)
        try:
            assert _triton_launch._hooked()
        finally:
            chain.remove(hook)
    assert not _triton_launch._hooked()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
@pytest.mark.parametrize("name", ["eager_host_time.py", "eager_host_history.py", "routing_kernel.py",
                                  "ep_baseline.py"])
def test_gpu_benchmark_scripts_need_cuda(name):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    arguments = ["256", "8", "512", "2", "64", "1"] if name == "ep_baseline.py" else []
    done = subprocess.run([sys.executable, str(script), *arguments], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "needs CUDA" in done.stderr and not done.stdout


def test_the_expert_parallel_baseline_names_its_arguments():
    """It unpacked sys.argv: without its six numbers (or with --help) a ValueError traceback."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ep_baseline.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)  # no fulu_nas
    assert done.returncode == 2 and "the following arguments are required: hidden, experts" in done.stderr
    assert "Traceback" not in done.stderr


def test_python_time_benchmark_takes_the_gpu_path_on_the_cpu():
    """benchmarks/eager_python_time.py times the CUDA path's Python on the CPU: a call launches the
    routing kernel, both expert GEMMs and the slot sum, each through the cached launcher's signature
    and lookup, and every row is a time."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # the checkout, where the package is not installed (a GPU host with torch alone)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "eager_python_time.py"), "--calls", "20",
                           "--rounds", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == ("launches per call: down_scatter_kernel 1, gather_up_kernel 1, route_kernel 1, "
                         "sum_slots_kernel 1")
    for name in ("layer(x)", "layer(x, with_stats=False)", "router(x)", "torch.empty((16, 2), int64)"):
        row = next(line for line in lines if line.startswith(name + " "))
        low, median = map(float, re.fullmatch(r".* min +([\d.]+) +median +([\d.]+)", row).groups())
        assert 0 < low <= median
