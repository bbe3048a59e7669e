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

# The public names load on first use (PEP 562): the ``fulu-nas`` entry point imports this package, and a
# command that needs no torch (``--help``, a refused argument) should not wait for it; nor should a
# Ctrl-C in its first second land inside torch's import, before the command can handle it.
_PUBLIC = {
    "MoEConfig": ".moe", "PiMoELayer": ".moe", "migrate_from_electra": ".interop",
    "OptimizationLevel": ".system", "RoutingStrategy": ".system", "UltimatePiMoESystem": ".system",
    "create_ultimate_pimoe_system": ".system", "create_ultimate_pimoe_system_from_config": ".system_config",
}

__version__ = "0.1.0"


def load(directory: str | _Path, map_location="cpu", expected_sha256: str | None = None):
    """An exported model directory (``fulu-nas export``) as an ``nn.Module`` in eval mode, after verifying
    every file's SHA-256, and with ``expected_sha256`` (the fingerprint ``fulu-nas export`` printed) that the
    folder is the exported one; reads YAML and safetensors only, nothing is unpickled. A searched model comes
    back as a ``PiMoETransformer``; an upcycled encoder (task ``upcycle``) as its transformers model with the
    PiMoE layers (``fulu_nas.interop.upcycle_export.load_upcycled``)."""
    from .deploy.export import load as load_searched
    from .deploy.files import path_argument
    from .interop.upcycle_export import is_upcycled_export, load_upcycled

    directory = path_argument(directory, "directory", "not a folder (a str or a path)")
    if is_upcycled_export(directory):
        return load_upcycled(directory, map_location, expected_sha256)
    return load_searched(directory, map_location, expected_sha256)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    importlib.import_module(".interop", __name__)  # its registrations: the upcycle task, PiMoELayer.from_hf
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


__all__ = [
    "MoEConfig", "OptimizationLevel", "PiMoELayer", "RoutingStrategy", "UltimatePiMoESystem",
    "create_ultimate_pimoe_system", "create_ultimate_pimoe_system_from_config", "load", "migrate_from_electra",
]
