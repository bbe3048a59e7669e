"""Models built from an ArchConfig."""

from .arch import ArchConfig
from .transformer import ModelOutput, PiMoETransformer

__all__ = ["ArchConfig", "ModelOutput", "PiMoETransformer"]
