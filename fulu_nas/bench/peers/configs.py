"""What ``bench peers`` measures: the configurations (rows), their quick shapes, and the
implementations (columns) with the bounds each timing is compared with."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Shape suffixes: T tokens, D hidden, E experts, F expert width (2F for SwiGLU's gate and up),
# K slots per token, N = T*K dispatched rows.


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    experts: int
    ffn: int
    top_k: int

    def describe(self) -> str:
        return f"T={self.tokens}, H={self.hidden}, E={self.experts}, F={self.ffn}, k={self.top_k}"


@dataclass(frozen=True)
class Config:
    label: str
    shapes: tuple[Shape, ...]  # one; two for the E-scaling ratio (the first over the second)
    backward: bool = False


SEED = Shape(32768, 512, 8, 2048, 2)
CONFIGS = {
    "seed-fwd": Config("seed fwd", (SEED,)),
    "seed-fwd-bwd": Config("seed fwd+bwd", (SEED,), backward=True),
    "fine-fwd": Config("fine fwd", (Shape(32768, 1024, 128, 256, 8),)),
    "seed-latency": Config("seed latency", (Shape(16, 512, 8, 2048, 2),)),
    "e-scaling": Config("E-scaling", (Shape(32768, 1024, 256, 512, 2), Shape(32768, 1024, 8, 512, 2))),
}
# --quick: the same rows at shapes a CPU runs in seconds.
_QUICK_SEED = Shape(256, 64, 8, 128, 2)
QUICK = {
    "seed-fwd": (_QUICK_SEED,),
    "seed-fwd-bwd": (_QUICK_SEED,),
    "fine-fwd": (Shape(256, 64, 16, 32, 4),),
    "seed-latency": (Shape(16, 64, 8, 128, 2),),
    "e-scaling": (Shape(256, 64, 32, 64, 2), Shape(256, 64, 8, 64, 2)),
}
LATENCY_CONFIGS = ("seed-latency",)  # --tokens-scale leaves their token counts alone

IMPLS = {
    "dense": "dense ceiling (T*k rows x F)",
    "dense_wide": "wide dense FFN (T rows x kF)",
    "gemm": "GEMM-only bound",
    "plain": "plain torch._grouped_mm peer (eager)",
    "hf": "Hugging Face Mixtral block (SwiGLU only)",
    "scattermoe": "ScatterMoE (eager)",
    "fulu": "fulu-nas default `out, stats = layer(x)`",
    "fulu_best": "fulu-nas best: compiled + one CUDA graph, no stats",
}
# Each timing's throughput ratio to a bound (key in a result -> the bound's implementation), in the
# order the table's cells print them.
BOUND_RATIOS = {"of_dense": "dense", "of_gemm": "gemm", "of_dense_wide": "dense_wide"}
# Implementations whose output is the MoE layer's (the bounds compute something else).
MOE_IMPLS = ("plain", "hf", "scattermoe", "fulu", "fulu_best")


def _scaled(shape: Shape, scale: float) -> Shape:
    return Shape(max(1, math.ceil(shape.tokens * scale)), shape.hidden, shape.experts, shape.ffn, shape.top_k)


def selected_configs(names: list[str], quick: bool, tokens_scale: float) -> dict[str, Config]:
    """The rows ``names`` as measured: their quick shapes with ``quick``, the throughput rows' token
    counts times ``tokens_scale``; the E-scaling row's label names its two expert counts."""
    out = {}
    for name in names:
        config = CONFIGS[name]
        shapes = QUICK[name] if quick else config.shapes
        if name not in LATENCY_CONFIGS:
            shapes = tuple(_scaled(s, tokens_scale) for s in shapes)
        label = config.label
        if len(shapes) == 2:
            label += f" E={shapes[0].experts} / E={shapes[1].experts}"
        out[name] = Config(label, shapes, config.backward)
    return out
