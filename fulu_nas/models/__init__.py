"""Models built from an ArchConfig."""

from .arch import ArchConfig
from .transformer import ModelOutput, PiMoETransformer, seeded_model

__all__ = ["ArchConfig", "ModelOutput", "PiMoETransformer", "seeded_model"]
