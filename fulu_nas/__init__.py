"""fulu-nas: neural architecture search for Mixture-of-Experts (PiMoE) layers.

The layer library (``fulu_nas.moe``) and the spec's entry point need torch only.
"""

import os as _os
from pathlib import Path as _Path

# MKL's GEMMs split some products across threads in ways that change the rounding with the thread count,
# so a trial trained on a lone worker's threads and one trained on a worker's share of them could differ
# (e.g. a search with 1 worker vs 2). Strict conditional-numerical-reproducibility mode makes them
# bit-identical for any thread count. MKL reads it once, when torch first loads it: so before torch.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from .deploy.export import load as _load_searched
from .interop import migrate_from_electra  # torch only: transformers is imported when loading a directory
from .interop.upcycle_export import is_upcycled_export as _is_upcycled_export
from .interop.upcycle_export import load_upcycled as _load_upcycled
from .moe import MoEConfig, PiMoELayer
from .system import OptimizationLevel, RoutingStrategy, UltimatePiMoESystem, create_ultimate_pimoe_system

__version__ = "0.1.0"


def load(directory: str | _Path, map_location="cpu", expected_sha256: str | None = None):
    """An exported model directory (``fulu-nas export``) as an ``nn.Module`` in eval mode, after verifying
    every file's SHA-256, and with ``expected_sha256`` (the fingerprint ``fulu-nas export`` printed) that the
    folder is the exported one; reads YAML and safetensors only, nothing is unpickled. A searched model comes
    back as a ``PiMoETransformer``; an upcycled encoder (task ``upcycle``) as its transformers model with the
    PiMoE layers (``fulu_nas.interop.upcycle_export.load_upcycled``)."""
    if _is_upcycled_export(directory):
        return _load_upcycled(directory, map_location, expected_sha256)
    return _load_searched(directory, map_location, expected_sha256)


__all__ = [
    "MoEConfig", "OptimizationLevel", "PiMoELayer", "RoutingStrategy", "UltimatePiMoESystem",
    "create_ultimate_pimoe_system", "load", "migrate_from_electra",
]
