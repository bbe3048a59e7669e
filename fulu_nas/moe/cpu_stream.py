"""fp32 CPU inference for a few rows per expert: a C++ kernel that streams each weight once.

At decode sizes (a few tokens per expert) the experts' GEMMs do little but read weights: 100 MB
per call in the seed config (hidden 512, 8 experts, FFN 2048). oneDNN's kernels for a handful of
rows read them at 60-85% of the rate of a plain sum over the same bytes; this kernel reads them at
that rate (2-core AVX-512 EPYC, 16 tokens, expert rows 6,6,5,4,4,1,1,5: 2.5-3.1 ms for the experts
against 2.5-3.0 ms for ``torch.sum`` over 100 MB, in the same runs). It packs each expert's
weights once into panels of 64 output columns stored in the order the threads read them, so each
thread reads one sequential stream; it keeps 6 rows x 64 columns of sums in registers and applies
the activation, the routing weight and the biases as each panel finishes (``csrc/cpu_stream.cpp``).
With more rows per expert the work turns compute-bound and oneDNN's blocked GEMM catches up
(crossover at 32-64 rows per expert in the seed config), so :func:`applies` takes the kernel up to
:data:`MAX_MEAN_ROWS`.

The kernel is compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja)
for this CPU's vector ISA as torch reports it: about 10 s, once per machine, torch release, ISA and
version of the source and flags (:func:`build_name`), cached in ``TORCH_EXTENSIONS_DIR``. Where that
fails the experts take the CPU's other paths (oneDNN for large experts, :mod:`fulu_nas.moe.cpu_packed`,
else grouped GEMMs; :meth:`fulu_nas.moe.experts.GroupedExperts._forward_cpu`) and one warning says why;
``FULU_NAS_CPU_STREAM=0`` turns the kernel off.

Shape suffixes as in :mod:`fulu_nas.moe.experts`; ``P`` counts panels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

BLOCK = 64  # output columns per panel (the kernel's kBlock)
# Mean rows per active expert up to which the kernel is taken. The whole layer's time against
# oneDNN's, 2-core EPYC (medians of 3): seed config (hidden 512, 8 experts, FFN 2048, top-2) at 4
# rows per expert 0.82, 16 rows 0.90, 32 rows 0.96, 64 rows 1.04; fine-grained (hidden 1024, 128
# experts, FFN 256, top-8), where oneDNN pays a call per small GEMM: 1 row 0.53, 4 rows 0.66,
# 16 rows 0.72, 64 rows 0.86.
MAX_MEAN_ROWS = 32

_SOURCE = Path(__file__).with_name("csrc") / "cpu_stream.cpp"
# Per vector ISA torch detected: the flags that let the compiler vectorize the 64-column tiles.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw", "-mavx2", "-mfma", "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _flags(isa: str) -> list[str]:
    # -fopenmp: at::parallel_for is inline and needs it to run on torch's OpenMP threads at all.
    return ["-O3", "-fopenmp", "-mtune=native", "-ffp-contract=fast", *_ISA_FLAGS.get(isa, [])]


def build_name(source: bytes, isa: str, flags: list[str]) -> str:
    """The extension's name, which is also its build folder's: one build per vector ISA, torch release
    (a build against another torch's headers must not load) and content of the source and flags (two
    checkouts or versions on one machine each keep their own build instead of rebuilding in turn)."""
    digest = hashlib.sha256(b"\0".join([source, *(f.encode() for f in flags)])).hexdigest()[:16]
    return re.sub(r"\W", "_", f"fulu_nas_cpu_stream_{isa}_torch{torch.__version__}_{digest}".lower())


def _ninja_on_path() -> None:
    """torch runs ninja from PATH alone, and pip puts the ninja that fulu-nas installs among the
    environment's scripts: a fulu-nas run by its full path without activating its environment (pipx,
    cron) had none. Those folders go last on PATH, so that a ninja of the user's own comes first."""
    import shutil
    import sysconfig

    if shutil.which("ninja"):
        return
    folders = dict.fromkeys([sysconfig.get_path("scripts"), os.path.dirname(sys.executable)])
    os.environ["PATH"] = os.pathsep.join(p for p in (os.environ.get("PATH", ""), *folders) if p)


def _build(source: Path = _SOURCE) -> object:
    from torch.utils import cpp_extension

    _ninja_on_path()
    isa = torch.backends.cpu.get_cpu_capability()
    flags, text = _flags(isa), source.read_bytes()
    name = build_name(text, isa, flags)
    # torch's own cache folder for this name (TORCH_EXTENSIONS_DIR or its default).
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    # Compiled from a copy in the build folder: ninja rebuilds when a source's path or modification
    # time changes, so the same source from two checkouts would otherwise be compiled again each time.
    copy = build_dir / source.name
    if not copy.is_file() or copy.read_bytes() != text:
        partial = copy.with_name(f"{copy.name}.{os.getpid()}.partial")
        partial.write_bytes(text)
        partial.replace(copy)  # atomic: a worker starting at the same time reads a whole file
    log.info("loading the CPU streaming experts kernel for %s (compiled once per version of its source)", isa)
    cpp_extension.load(name=name, sources=[str(copy)], is_python_module=False, extra_cflags=flags,
                       build_directory=str(build_dir), verbose=False)
    return torch.ops.fulu_nas_cpu.stream_experts


@functools.cache
def _loaded() -> object | None:
    """The operator, built once per process; None (and one warning) where the build fails."""
    try:
        return _build()
    except Exception as exc:  # no compiler, no ninja, a failed build: the other CPU paths serve instead
        reason = f"{type(exc).__name__}: {exc}".strip()[:500]
        warnings.warn(f"fulu_nas: the CPU streaming experts kernel could not be built, using oneDNN or "
                      f"grouped GEMMs for few-token inference instead ({reason})", RuntimeWarning, stacklevel=3)
        return None


def kernel() -> object | None:
    """The compiled operator, or None where it cannot be built here (warned once) or is turned off."""
    if os.environ.get("FULU_NAS_CPU_STREAM", "1") == "0":
        return None
    return _loaded()


def applies(counts: list[int]) -> bool:
    """Few rows per active expert (the weight-reading regime), and the kernel is available."""
    active = sum(1 for c in counts if c)
    return 0 < sum(counts) <= MAX_MEAN_ROWS * active and kernel() is not None


class Panels(NamedTuple):
    """Expert weights in the kernel's layout (see ``csrc/cpu_stream.cpp``)."""

    w13_PEDB: Tensor
    b13_PEB: Tensor | None
    w2_PEFB: Tensor


def _pad_to(t: Tensor, dim: int, multiple: int) -> Tensor:
    pad = -t.shape[dim] % multiple
    if not pad:
        return t
    widths = [0, 0] * (t.dim() - dim - 1) + [0, pad]
    return torch.nn.functional.pad(t, widths)


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _madvise_huge_pages(address: int, length: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), ctypes.c_int(_MADV_HUGEPAGE))
    except (OSError, AttributeError):  # no madvise here: ordinary pages
        pass


def _empty_on_huge_pages(shape: tuple[int, ...]) -> Tensor:
    """An empty fp32 tensor whose whole 2 MB pages are advised to be huge pages (Linux THP, which
    often serves only memory so advised). Streaming the weights from 2 MB pages was measured
    faster (seed config, 16 tokens, 2 cores, six rounds: kernel 2.53 against 2.69 ms; a plain sum
    of 100 MB 2.37 against 2.80 ms); elsewhere the advice is ignored."""
    nbytes = math.prod(shape) * 4
    if nbytes < _HUGE_PAGE or not sys.platform.startswith("linux"):
        return torch.empty(shape)
    buffer = torch.empty(nbytes + _HUGE_PAGE, dtype=torch.uint8)  # untouched: no page is mapped yet
    start = -buffer.data_ptr() % _HUGE_PAGE
    _madvise_huge_pages(buffer.data_ptr() + start, nbytes // _HUGE_PAGE * _HUGE_PAGE)
    return buffer[start:start + nbytes].view(torch.float32).view(shape)  # the view keeps the buffer


def _panels(*parts_EKC: Tensor) -> Tensor:
    """Column groups side by side in panels of 64 columns, (P, E, K, 64), panel-major (the
    kernel's task order). With one part (E, K, C), panel p holds its columns 64p..64p+63; with two
    (SwiGLU's gate and up), columns 32p..32p+31 of each. Columns are zero-padded to whole panels.
    Copied straight into place: packing needs no temporary copy of the weights."""
    width = BLOCK // len(parts_EKC)
    parts = [_pad_to(part, 2, width) for part in parts_EKC]
    E, K, C = parts[0].shape
    P = C // width
    panels_PEKB = _empty_on_huge_pages((P, E, K, BLOCK))
    groups = panels_PEKB.view(P, E, K, len(parts), width)
    for i, part in enumerate(parts):
        groups[:, :, :, i].copy_(part.reshape(E, K, P, width).permute(2, 0, 1, 3))
    return panels_PEKB


def pack(w13_EDW: Tensor, b13_EW: Tensor | None, w2_EFD: Tensor, swiglu: bool) -> Panels:
    """Pack the stacked expert weights (``W`` = 2F for SwiGLU, gate then up; F for GELU) into
    fp32 panels. SwiGLU puts 32 gate and 32 up columns in each panel, so a panel yields finished
    activations; F is padded with zero columns to whole panels (zero activations), and the down
    projection's rows and D columns alike."""
    with torch.no_grad():
        def split(w_EKW: Tensor) -> tuple[Tensor, ...]:
            return w_EKW.detach().float().chunk(2, dim=-1) if swiglu else (w_EKW.detach().float(),)

        w13_PEDB = _panels(*split(w13_EDW))
        b13_PEB = None if b13_EW is None else _panels(*split(b13_EW[:, None, :])).squeeze(2)
        half = BLOCK // 2 if swiglu else BLOCK
        return Panels(w13_PEDB, b13_PEB, _panels(_pad_to(w2_EFD.detach().float(), 1, half)))


def experts(x_ND: Tensor, counts: list[int], panels: Panels, b2_ED: Tensor | None, weight_N: Tensor | None,
            swiglu: bool) -> Tensor:
    """The grouped experts on rows sorted by expert (``counts`` per expert), each output row scaled
    by its routing weight (``None``: unweighted), as :meth:`GroupedExperts.forward_grouped`."""
    op = kernel()
    b2 = None if b2_ED is None else b2_ED.detach().float().contiguous()
    weight = None if weight_N is None else weight_N.float().contiguous()
    return op(x_ND.contiguous(), counts, panels.w13_PEDB, panels.b13_PEB, panels.w2_PEFB, b2, weight, swiglu)
