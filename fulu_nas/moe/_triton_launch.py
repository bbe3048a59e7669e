"""Host-side launches of the Triton kernels through their compiled launchers.

Eagerly, a small layer call waits on its host, and ``kernel[grid](*args)`` spends 25-30 us of host
time per launch (H200 host, triton 3.6) binding the arguments, specialising each one, building the
cache key and looking up the compiled kernel, where the compiled kernel's C launcher itself takes a
few microseconds. :class:`CachedLauncher` keeps, per call signature, the compiled kernel that
Triton's own ``run`` chose for it and launches it directly on later calls with the same signature.

The signature (:func:`specialization_key`) is at least as fine as what Triton compiles a kernel
for, so a cached kernel is only reused for arguments Triton would have given it: each tensor's
dtype and its address modulo 16, each integer's class (equal to 1, a multiple of
16, or neither) and width (32 or 64 bits), the type of every other argument, the keyword arguments
(constexprs and launch options) by name and value, and the device. Anything else (a launch hook
installed by a profiler, a grid given as a function, a constexpr passed positionally) takes
Triton's path unchanged.
"""

from __future__ import annotations

import torch
from triton import knobs
from triton.runtime import driver


def specialization_key(args: tuple, Tensor=torch.Tensor, int=int, type=type, isinstance=isinstance) -> tuple:
    """What the compiled kernel for positional runtime ``args`` depends on (see the module): a
    tensor's dtype and address modulo 16; an integer's class (2: equal to 1, 1: a multiple of 16,
    0: neither) plus its width (0: 32 bits, 4: 64, 8: unsigned 64); a float's type (Triton does not
    specialise on its value); anything else (a bool, None, a numpy integer) by type and value.
    One comprehension, names bound as defaults: it runs on every launch (about 4 us for 22
    arguments on a 2-core CPU, against 7 for a loop)."""
    # 2**31 and 2**63 are folded into constants when the module is compiled: no cost per call.
    return tuple([(2 if a == 1 else not a & 15) + (0 if -2**31 <= a < 2**31 else 4 if a < 2**63 else 8)
                  if type(a) is int
                  else (a.dtype, a.data_ptr() & 15) if isinstance(a, Tensor)
                  else float if type(a) is float else (type(a), a) for a in args])


class CachedLauncher:
    """A ``@triton.jit`` kernel launched as ``launcher[grid](*runtime_args, **constexprs_and_options)``:
    the first call of a signature goes through Triton (which compiles or finds the kernel, and
    launches it); later calls launch that compiled kernel directly."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict[tuple, tuple | None] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict) -> None:
        active = driver.active
        device = active.get_current_device()
        key = (device, specialization_key(args), tuple(kwargs.items()))
        entry = self._compiled.get(key)
        if entry is None or type(grid) is not tuple or _hooked():
            kernel = self.fn.run(*args, grid=grid, warmup=False, **kwargs)
            if key not in self._compiled:
                self._compiled[key] = self._entry(kernel, args, kwargs)
            return
        kernel, constexprs = entry
        grid = grid + (1, 1)
        kernel.run(grid[0], grid[1], grid[2], active.get_current_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *constexprs)

    def _entry(self, kernel, args: tuple, kwargs: dict) -> tuple | None:
        """``(compiled kernel, the constexpr parameters' values in signature order)``, or None
        where the call's layout is not runtime arguments by position then constexprs by keyword."""
        params = self.fn.params
        n = len(args)
        if not all(hasattr(kernel, name) for name in ("run", "function", "packed_metadata")) or any(
                p.is_constexpr for p in params[:n]) or any(
                not p.is_constexpr for p in params[n:]):
            return None
        return kernel, tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params[n:])

    def __len__(self) -> int:
        """How many signatures have a cached kernel."""
        return sum(entry is not None for entry in self._compiled.values())


def _hooked() -> bool:
    """Whether a launch hook is installed (a profiler's): such launches take Triton's path, which
    calls it (triton 3.6 keeps an empty hook chain where older versions kept None)."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))
