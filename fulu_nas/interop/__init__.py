"""Bridges to the Hugging Face world: ELECTRA/BERT upcycling (:mod:`.migrate`) and the importers of
Mixtral / Qwen2-MoE / DeepSeek-V3 blocks (:mod:`.hf_import`). Neither imports transformers at module
level: a saved model folder is loaded through it only when one is passed."""

from . import hf_import  # registers PiMoELayer.from_hf
from .migrate import migrate_from_electra

__all__ = ["hf_import", "migrate_from_electra"]
