"""Small layers of every router, seeded: shared by the tests."""

from __future__ import annotations

import socket

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for servers and process groups in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, nprocs: int, out_dir) -> list[dict]:
    """Run ``worker(rank, port, out_dir)`` in ``nprocs`` processes; each saves ``rank{r}.pt``."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=nprocs, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]


def flip_last_byte(path, mask: int = 0xFF) -> None:
    """Tamper with the file at ``path``: its last byte XOR ``mask``."""
    data = bytearray(path.read_bytes())
    data[-1] ^= mask
    path.write_bytes(bytes(data))
