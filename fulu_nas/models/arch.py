"""ArchConfig: everything a search can vary about a model, as one frozen, hashable dataclass."""

from __future__ import annotations

import hashlib
import json
import numbers
import operator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import FuluConfigError
from ..moe import MoEConfig
from ..moe.config import MAX_WIDTH
from ..moe.field_types import fits, is_finite_number

# Past any model's (vocabularies reach ~2^18 ids, contexts ~2^20 tokens, depths a few hundred layers): bounds
# that refuse an absurd size with a message where each trial failed inside the allocator.
MAX_SIZES = {"vocab_size": 2**24, "max_seq_len": 2**24, "num_layers": 2**12, "hidden_size": MAX_WIDTH,
             "dense_ffn_size": MAX_WIDTH, "num_classes": 2**24}


@dataclass(frozen=True)
class ArchConfig:
    """A decoder-only transformer with PiMoE feed-forward layers.

    Layer ``i`` (0-based) has a PiMoE FFN iff ``(i + 1) % moe_every == 0`` (``moe_every=1``: every
    layer; ``2``: the second, fourth, ...); the others have a dense FFN of width
    ``dense_ffn_size``. ``moe`` is the layer configuration; its ``hidden_size`` always equals the
    model's. ``num_classes > 0`` adds a token-classification head (the LM head is tied to the
    embedding either way).
    """

    vocab_size: int = 256
    max_seq_len: int = 128
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    moe_every: int = 1
    dense_ffn_size: int = 256
    num_classes: int = 0
    norm_eps: float = 1e-6
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(hidden_size=64, num_experts=8, expert_ffn_size=128))

    def __post_init__(self) -> None:
        # Types first (a config file can hold anything): a bool is an int to Python but not to torch, a float
        # size fails deep in torch, and a NaN or negative norm_eps makes every output NaN. As in MoEConfig,
        # numpy's integers are taken as ints.
        sizes = ("vocab_size", "max_seq_len", "num_layers", "hidden_size", "num_heads", "moe_every",
                 "dense_ffn_size", "num_classes")
        problems = []
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) and hasattr(value, "__index__"):
                object.__setattr__(self, name, operator.index(value))
            elif not fits(value, int):
                problems.append(f"{name} must be an integer, got {value!r}")
        if type(self.norm_eps).__module__ == "numpy" and isinstance(self.norm_eps, numbers.Real):
            object.__setattr__(self, "norm_eps", float(self.norm_eps))  # yaml cannot write np.float32
        if not (is_finite_number(self.norm_eps) and self.norm_eps > 0):
            problems.append(f"norm_eps must be a finite number > 0, got {self.norm_eps!r}")
        if not isinstance(self.moe, MoEConfig):
            problems.append(f"moe must be a MoEConfig (ArchConfig.from_dict takes a mapping), got {self.moe!r}")
        if problems:
            raise FuluConfigError(problems)
        for name in sizes[:-1]:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, most in MAX_SIZES.items():
            if getattr(self, name) > most:
                problems.append(f"{name} must be at most {most:,}, got {getattr(self, name):,}")
        if self.num_classes < 0:
            problems.append(f"num_classes must be >= 0, got {self.num_classes}")
        if self.num_heads >= 1 and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.moe.hidden_size != self.hidden_size:
            problems.append(f"moe.hidden_size ({self.moe.hidden_size}) must equal hidden_size ({self.hidden_size})")
        if self.moe_every > self.num_layers >= 1:
            problems.append(f"moe_every ({self.moe_every}) > num_layers ({self.num_layers}) leaves no MoE layer")
        if problems:
            raise FuluConfigError(problems)

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if (i + 1) % self.moe_every == 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe"] = self.moe.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        """Build from a plain dict (e.g. parsed YAML). ``moe.hidden_size`` defaults to the model's."""
        if not isinstance(d, dict):
            raise FuluConfigError(f"an architecture must be a mapping of its fields, got {type(d).__name__}")
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FuluConfigError(f"unknown architecture keys: {', '.join(unknown)}")
        moe = d.pop("moe", {}) or {}
        if not isinstance(moe, dict):
            raise FuluConfigError(f"moe must be a mapping of the layer's fields, got {moe!r}")
        moe = dict(moe)
        moe.setdefault("hidden_size", d.get("hidden_size", cls.hidden_size))
        try:
            return cls(**d, moe=MoEConfig.from_dict(moe))
        except FuluConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise FuluConfigError(str(e)) from None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> ArchConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(text) or {})

    def content_hash(self) -> str:
        """A stable hash of the architecture (same config, same hash, across processes)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def with_moe(self, **changes: Any) -> ArchConfig:
        return replace(self, moe=replace(self.moe, **changes))
