"""Bridges to the Hugging Face world: ELECTRA/BERT upcycling (:mod:`.migrate`), the importers of
Mixtral / Qwen2-MoE / DeepSeek-V3 blocks (:mod:`.hf_import`), and the ``upcycle`` task that fine-tunes
a user's encoder (:mod:`.mlm_task`). None imports transformers at module level: a saved model folder
is loaded through it only when one is passed."""

from ..tasks import register_task
from . import hf_import  # registers PiMoELayer.from_hf
from .migrate import migrate_from_electra
from .mlm_task import UpcycleTask

register_task(UpcycleTask)

__all__ = ["hf_import", "migrate_from_electra"]
