"""The PiMoE layer library. Depends on torch and the standard library only.

>>> from fulu_nas.moe import MoEConfig, PiMoELayer
>>> layer = PiMoELayer(MoEConfig(hidden_size=64, num_experts=4, expert_ffn_size=128))
"""

from .balancing import BALANCING_METHODS, load_balancing_loss, router_z_loss, update_selection_bias
from .config import ACTIVATIONS, IMPLS, ROUTERS, SCORE_FUNCS, MoEConfig
from .experts import FeedForward, GroupedExperts, SharedExperts, grouped_mm
from .layer import PiMoELayer
from .routing import Routing, select_experts
from .stats import STAT_KEYS, load_statistics

__all__ = [
    "ACTIVATIONS", "BALANCING_METHODS", "IMPLS", "ROUTERS", "SCORE_FUNCS", "STAT_KEYS",
    "FeedForward", "GroupedExperts", "MoEConfig", "PiMoELayer", "Routing", "SharedExperts",
    "grouped_mm", "load_balancing_loss", "load_statistics", "router_z_loss", "select_experts",
    "update_selection_bias",
]
