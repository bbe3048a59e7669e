"""Small layers of every router, seeded: shared by the tests."""

from __future__ import annotations

import torch

from fulu_nas.moe import MoEConfig, PiMoELayer

# Router-specific settings that make each router exercise its distinctive machinery.
ROUTER_EXTRAS = {
    "topk": {},
    "expert_choice": {},
    "hash": {},
    "hierarchical": {"hierarchy_depth": 2},
    "attention": {"attention_heads": 4, "attention_context": True},
}


def make_config(router: str = "topk", **overrides) -> MoEConfig:
    kw = dict(hidden_size=32, num_experts=8, expert_ffn_size=48, top_k=2, router=router)
    kw.update(ROUTER_EXTRAS[router])
    kw.update(overrides)
    return MoEConfig(**kw)


def make_layer(router: str = "topk", seed: int = 0, **overrides) -> PiMoELayer:
    torch.manual_seed(seed)
    return PiMoELayer(make_config(router, **overrides))
