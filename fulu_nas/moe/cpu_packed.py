"""CPU inference with the expert weights packed once for oneDNN (fp32).

A GEMM with few rows spends its time reading the weight matrix; torch's CPU matmul repacks that
matrix into its blocked layout on every call, so a 4-row product over an 8 MB weight streams it at
7-8 GB/s where the machine reads at 20-25 GB/s. oneDNN can take the weight already in its blocked
layout (``torch.ops.mkldnn._reorder_linear_weight``, once) and skip the repacking
(``torch.ops.mkldnn._linear_pointwise``, per call): the operators inductor's CPU weight freezing
uses. Measured on the 2-core CI machine (seed config, 8 experts, fp32, experts only): 16 tokens
6.0 ms against 14.2 ms for the loop layer; 64 tokens 11.0 against 21.0 ms for plain matmuls; 256
tokens 31.9 against 45.0; 1,024 tokens 121.7 against 142.0. For up to
:data:`~fulu_nas.moe.cpu_stream.MAX_MEAN_ROWS` rows per expert the streaming kernel of
:mod:`fulu_nas.moe.cpu_stream` reads the weights faster still and takes those calls.

:meth:`GroupedExperts._forward_cpu <fulu_nas.moe.experts.GroupedExperts._forward_cpu>` takes
these paths where they apply (oneDNN for experts of at least
:data:`~fulu_nas.moe.experts.ONEDNN_MIN_WEIGHT` weight elements: for smaller ones its cost per call
exceeds the product, and grouped GEMMs in chunks of experts serve them), so every caller of the
grouped experts gets them. Each packed copy
(:func:`cached`: oneDNN's, the kernel's panels) is kept per
:class:`~fulu_nas.moe.experts.GroupedExperts` module (in a weak map, so it never travels with the
module's state, copies or pickles) and is rebuilt when a weight is replaced or changed in place
through autograd-visible operations (an optimizer step, fused or not; ``load_state_dict``): it is
keyed on each weight's storage and version counter, and the fused optimizer steps
(:mod:`~fulu_nas.moe.weight_version`). Writes through ``.data`` bypass the version counter and are
not seen, nor are other in-place writes to weights made under ``torch.inference_mode()``, which have
no version counter (``load_state_dict`` is: the experts drop their copies after a load, :func:`forget`). Each
copy costs the expert weights' size once more, for as long as the module lives (a workload with
both few and many rows per expert holds both).

Shape suffixes as in :mod:`fulu_nas.moe.layer`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

from .weight_version import version

T = TypeVar("T")

# The row count oneDNN is told to expect when it picks the blocked layout (any count works).
_BATCH_HINT = 16


def available() -> bool:
    """Whether this torch build has the oneDNN operators (the CPU wheels do)."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise"))


def applies(x_ND: Tensor, needs_grad: bool) -> bool:
    """fp32 inference on the CPU, run eagerly (the per-expert row counts are read on the host, so
    not under torch.compile or torch.export)."""
    return (x_ND.device.type == "cpu" and x_ND.dtype == torch.float32 and not needs_grad
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting() and available())


# oneDNN's kernels for 1-3 rows stream the weights slower than its 4-row kernel (2-core AVX-512
# EPYC, all 16 GEMMs of the seed config with 1 / 2 / 4 rows each: 3.76 / 3.62 / 2.99 ms; 3 rows
# 3.16 against 2.97 in another run), so fewer rows are padded to 4: the extra rows' multiply-adds
# are free next to the weight reads (the 16-token expert counts 6,6,5,4,4,1,1,5: 3.03 -> 2.93 ms,
# in five runs out of five).
_MIN_ROWS = 4


def linear(x_ND: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ W^T + bias`` with ``W`` packed by :class:`PackedExperts`."""
    n = x_ND.shape[0]
    if 0 < n < _MIN_ROWS:
        return linear(torch.nn.functional.pad(x_ND, (0, 0, 0, _MIN_ROWS - n)), packed, bias)[:n]
    return torch.ops.mkldnn._linear_pointwise(x_ND, packed, bias, "none", [None], "")


class PackedExperts(NamedTuple):
    """Per expert, the two stacked weights (E, in, out) transposed to (out, in), in fp32, packed
    for oneDNN."""

    w13: list[Tensor]
    w2: list[Tensor]


def pack(w13_EDW: Tensor, w2_EFD: Tensor) -> PackedExperts:
    with torch.no_grad():
        return PackedExperts(*([torch.ops.mkldnn._reorder_linear_weight(w[e].t().float().contiguous(), _BATCH_HINT)
                                for e in range(w.shape[0])] for w in (w13_EDW, w2_EFD)))


# owner -> {kind: (signature of the weights packed, packed copy)}
_PACKED: weakref.WeakKeyDictionary[object, dict[str, tuple[tuple, object]]] = weakref.WeakKeyDictionary()


def _fingerprint(w: Tensor | None) -> tuple | None:
    return None if w is None else version(w)


def _unchanged(signature: tuple, weights: tuple[Tensor | None, ...]) -> bool:
    # The same tensor objects (a replaced parameter may reuse a freed address), the same storage
    # (``module.to`` swaps ``.data``) and no in-place change since.
    return all((ref is None) == (w is None) and (ref is None or ref() is w) and fingerprint == _fingerprint(w)
               for (ref, fingerprint), w in zip(signature, weights, strict=True))


def cached(owner: object, kind: str, weights: tuple[Tensor | None, ...], make: Callable[[], T]) -> T:
    """``owner``'s packed copy of ``weights`` in layout ``kind``, made again by ``make()`` if a
    weight was replaced or changed in place since."""
    entries = _PACKED.setdefault(owner, {})
    entry = entries.get(kind)
    if entry is None or not _unchanged(entry[0], weights):
        signature = tuple((None if w is None else weakref.ref(w), _fingerprint(w)) for w in weights)
        entries[kind] = entry = (signature, make())
    return entry[1]


def forget(owner: object, *_: object) -> None:
    """Drop ``owner``'s packed copies (a ``load_state_dict`` post hook: a load into weights made under
    ``torch.inference_mode()`` writes them in place, which their key cannot see)."""
    _PACKED.pop(owner, None)
