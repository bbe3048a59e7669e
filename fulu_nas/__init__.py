"""fulu-nas: neural architecture search for Mixture-of-Experts (PiMoE) layers.

The layer library (``fulu_nas.moe``) and the spec's entry point need torch only.
"""

from .deploy.export import load  # an exported model directory -> nn.Module (safetensors + YAML, no pickle)
from .interop import migrate_from_electra  # torch only: transformers is imported when loading a directory
from .moe import MoEConfig, PiMoELayer
from .system import OptimizationLevel, RoutingStrategy, UltimatePiMoESystem, create_ultimate_pimoe_system

__version__ = "0.1.0"
__all__ = [
    "MoEConfig", "OptimizationLevel", "PiMoELayer", "RoutingStrategy", "UltimatePiMoESystem",
    "create_ultimate_pimoe_system", "load", "migrate_from_electra",
]
