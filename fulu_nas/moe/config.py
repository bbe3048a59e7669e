"""The PiMoE layer's configuration: one frozen dataclass, validated on construction.

Every field is something a search may vary. Impossible combinations raise ``ValueError`` naming
the offending field, so that a bad architecture fails before any tensor is allocated.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction

import torch

from .field_types import describe, fits

# The options each router cannot act on (MoEConfig.without_inert_options). Neither scores experts
# through score_func nor rescales a token's selected weights (renormalize): expert choice takes a softmax
# over the tokens, the hash router no scores.
_INERT_OPTIONS = {"hash": ("router_jitter", "aux_loss_coef", "z_loss_coef", "bias_update_rate", "score_func",
                           "renormalize"),
                  "expert_choice": ("aux_loss_coef", "bias_update_rate", "score_func", "renormalize")}
# The options of a part of the layer that only some configurations have: the group mask of the
# hierarchical router, and the width and gate of shared experts.
_HIERARCHY_OPTIONS = ("group_mask_fill",)
_SHARED_EXPERT_OPTIONS = ("shared_expert_gate", "shared_expert_ffn_size")
# The options of one router alone: the attention router's heads, the hash router's hash functions.
_ROUTER_OPTIONS = {"attention_heads": "attention", "hash_seed": "hash"}

ROUTERS = ("topk", "expert_choice", "hash", "hierarchical", "attention")
SCORE_FUNCS = ("softmax", "sigmoid")
ACTIVATIONS = ("gelu", "swiglu")
IMPLS = ("grouped", "grouped_mm", "triton", "sorted", "loop")
GROUP_MASK_FILLS = ("-inf", "zero")

# torch's grouped GEMM needs row strides that are multiples of 16 bytes: 8 elements covers
# fp32, bf16 and fp16 alike.
ALIGNMENT = 8


# Wider than any layer (hidden sizes reach tens of thousands) and a capacity factor past any that drops
# tokens: bounds that refuse absurd values with a message where they failed inside torch.
MAX_WIDTH = 2**20
MAX_CAPACITY_FACTOR = 2**20
# Likewise for the routing weights' scale and the balancing coefficients (past fp32's range the output or
# the loss became infinite).
MAX_COEFFICIENT = 2**20

# More experts than any layer trains (PEER's product keys reach 2^20): a bound that keeps validation
# and the hierarchy's factorisation instant for absurd inputs.
MAX_EXPERTS = 2**24


def _max(a, b):
    """max of ints or symbolic ints (torch.export's dynamic sizes). Plain ints take Python's max:
    torch 2.11's torch.compile cannot trace torch.sym_max on two ints."""
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else torch.sym_max(a, b)


def _min(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else torch.sym_min(a, b)


@dataclass(frozen=True)
class MoEConfig:
    """Configuration of one :class:`~fulu_nas.moe.PiMoELayer`.

    Routing
        ``router`` picks the routing algorithm; ``top_k`` is the number of expert slots per
        token (``k_max`` when ``top_p`` is set). ``score_func`` turns logits into scores
        (computed in fp32); ``renormalize`` rescales the selected weights to sum to one;
        ``routed_scaling_factor`` multiplies them afterwards (DeepSeek-V3). ``router_jitter``
        multiplies the router input by U(1-eps, 1+eps) during training (Switch Transformer).
    Dynamic routing
        ``top_p``: each token takes the fewest experts whose probability mass reaches ``top_p``
        (Huang et al. 2024), within ``top_k`` static slots; unused slots carry weight 0.
    Capacity
        ``capacity_factor``: for token-choice routers, each expert keeps at most
        ``ceil(capacity_factor * T * top_k / E)`` assignments (earlier tokens first, as in
        Switch) and the overflow is dropped; ``None`` is dropless. For ``expert_choice`` each
        expert takes ``ceil(capacity_factor * T / E)`` tokens; ``None`` means ``top_k``, the same
        compute as top-k routing.
    Hierarchy (``router="hierarchical"``)
        ``hierarchy_depth`` levels. ``hierarchy_groups[l]`` is how many children each node of
        level ``l`` has (level 0 is the root), for the ``depth - 1`` levels above the experts;
        ``hierarchy_topk_groups[l]`` is how many nodes are kept at that level. Empty tuples are
        derived from ``num_experts`` (see :func:`default_hierarchy`). ``group_mask_fill``: the
        selection score given to the experts of dropped groups: ``"-inf"`` (default; DeepSeek-V3's
        published inference code, so a dropped group's expert is never chosen) or ``"zero"``
        (what Hugging Face transformers' DeepSeek-V3 router did before huggingface/transformers
        #45441: with negative biased scores an expert of a dropped group can then outrank the
        kept ones). Only for importing blocks that route that way.
    Attention router (``router="attention"``)
        ``attention_heads`` heads of size ``hidden_size // attention_heads``;
        ``attention_context`` lets each token first attend causally to its sequence.
    Hash router
        ``hash_seed`` picks the fixed hash functions.
    Balancing
        ``aux_loss_coef`` (Switch/GShard load-balancing loss), ``z_loss_coef`` (ST-MoE router
        z-loss), ``bias_update_rate`` (DeepSeek-V3 auxiliary-loss-free bias; 0 disables).
    Experts
        ``expert_ffn_size`` is each expert's hidden width, ``activation`` GELU or SwiGLU,
        ``expert_bias`` adds per-expert biases (needed to upcycle BERT-style FFNs).
        ``num_shared_experts`` always-on experts of width ``shared_expert_ffn_size`` (``None``, the
        default, or 0: ``expert_ffn_size``), optionally scaled by a sigmoid gate (Qwen2-MoE).
    Execution
        ``impl``: ``grouped`` (the fast path: ``triton`` where it applies and was measured faster,
        else ``grouped_mm``), ``grouped_mm`` (gather + ``torch._grouped_mm``; any device, autograd),
        ``triton`` (Triton kernels with the gather and un-permute fused, with a backward; CUDA
        only, else ``grouped_mm``), ``sorted`` (sorted dispatch with a matmul per expert, syncs once per
        forward) or ``loop`` (per-expert masks, the test reference and benchmark baseline). In fp32
        inference on the CPU the three grouped impls take the CPU experts' paths alike (the streaming
        kernel, oneDNN or grouped GEMMs in chunks; docs/layer.md, "CPU").
    """

    hidden_size: int = 512
    num_experts: int = 8
    expert_ffn_size: int = 2048
    top_k: int = 2
    router: str = "topk"
    score_func: str = "softmax"
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    router_jitter: float = 0.0
    top_p: float | None = None
    capacity_factor: float | None = None
    activation: str = "swiglu"
    expert_bias: bool = False
    num_shared_experts: int = 0
    shared_expert_ffn_size: int | None = None
    shared_expert_gate: bool = False
    hierarchy_depth: int = 1
    hierarchy_groups: tuple[int, ...] = field(default_factory=tuple)
    hierarchy_topk_groups: tuple[int, ...] = field(default_factory=tuple)
    group_mask_fill: str = "-inf"
    attention_heads: int = 4
    attention_context: bool = False
    hash_seed: int = 0
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    impl: str = "grouped"

    def __post_init__(self) -> None:
        # Each field of its annotated type first: the checks below do arithmetic on them, and a string
        # or an infinity there failed later inside torch (or silently gave non-finite outputs).
        problems = _type_problems(self)
        if problems:
            raise ValueError("invalid MoE config: " + "; ".join(problems))
        # Lists from YAML/JSON become tuples so the config stays hashable.
        for name in ("hierarchy_groups", "hierarchy_topk_groups"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.router == "hierarchical" and self.hierarchy_depth > 1:
            groups, keep = default_hierarchy(self)
            object.__setattr__(self, "hierarchy_groups", groups)
            object.__setattr__(self, "hierarchy_topk_groups", keep)
        problems = self.problems()
        if problems:
            raise ValueError("invalid MoE config: " + "; ".join(problems))

    @property
    def token_choice(self) -> bool:
        """Whether tokens pick experts (everything except expert-choice routing)."""
        return self.router != "expert_choice"

    @property
    def shared_ffn_size(self) -> int:
        return self.shared_expert_ffn_size or self.expert_ffn_size

    def inert_options(self) -> tuple[str, ...]:
        """The options this configuration accepts but cannot act on: the hash router learns no routing
        (jitter, the auxiliary loss, the z-loss and the selection bias do nothing) and has no scores;
        expert choice balances its load by construction (its auxiliary loss is a constant, and it has
        no selection bias) and always takes a softmax; only a hierarchical router of two levels or
        more masks groups, only the attention router has heads and only the hash router hash
        functions; and without shared experts their width and gate do nothing."""
        inert = _INERT_OPTIONS.get(self.router, ())
        if self.router != "hierarchical" or self.hierarchy_depth == 1:  # one level has no groups to mask
            inert += _HIERARCHY_OPTIONS
        if not self.num_shared_experts:
            inert += _SHARED_EXPERT_OPTIONS
        if self.token_choice and self.top_k == 1:  # a token's one slot is always kept: top-p selects nothing
            inert += ("top_p",)
        for option, router in _ROUTER_OPTIONS.items():
            if self.router != router:
                inert += (option,)
        return inert

    def without_inert_options(self) -> MoEConfig:
        """This configuration with its :meth:`inert_options` at their defaults. Two configurations that
        train the same layer then compare equal: a search reuses one's result for the other instead of
        training it again under another name."""
        defaults = {f.name: f.default for f in fields(self)}
        changed = {name: defaults[name] for name in self.inert_options() if getattr(self, name) != defaults[name]}
        if self.router == "hierarchical" and self.hierarchy_depth == 1:  # one level, no groups: the topk router
            changed["router"] = "topk"
        return replace(self, **changed) if changed else self

    def expert_capacity(self, num_tokens: int) -> int:
        """Per-expert capacity for ``num_tokens`` tokens (see the class docstring).

        Integer arithmetic only (the factor as a fraction), so that under ``torch.export`` with a
        dynamic token count the capacity stays a symbolic expression instead of being frozen.
        """
        if self.router == "expert_choice":
            factor = self.capacity_factor if self.capacity_factor is not None else self.top_k
            slots = num_tokens
        else:
            if self.capacity_factor is None:
                raise ValueError("expert_capacity: this token-choice config has no capacity_factor (no capacity)")
            factor, slots = self.capacity_factor, num_tokens * self.top_k
        # The nearest fraction of denominator up to 10**6: exact for a factor of six decimals, and the
        # products stay far inside int64 for a symbolic token count.
        ratio = Fraction(factor).limit_denominator(10**6)
        denominator = ratio.denominator * self.num_experts
        capacity = _max(1, (ratio.numerator * slots + denominator - 1) // denominator)
        return _min(num_tokens, capacity)  # an expert takes a token once at most

    def experts_per_token(self) -> float:
        """The routed experts a token uses on average: ``top_k``; under expert choice the capacity
        factor (``top_k`` without one), as the capacity shares the experts out, and all of them at most."""
        per_token = self.capacity_factor if self.router == "expert_choice" and self.capacity_factor is not None \
            else self.top_k
        return min(per_token, self.num_experts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hierarchy_groups"] = list(self.hierarchy_groups)
        d["hierarchy_topk_groups"] = list(self.hierarchy_topk_groups)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        if not isinstance(d, Mapping):  # a string's characters were taken for its keys
            raise TypeError(f"MoEConfig.from_dict takes a mapping of MoEConfig fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in set(d) - known)  # a non-string key named too
        if unknown:
            raise ValueError(f"unknown MoE config keys: {', '.join(unknown)}")
        return cls(**d)

    def problems(self) -> list[str]:
        """Every problem with this config, each naming its field (empty when valid)."""
        p: list[str] = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                p.append(msg)

        need(self.router in ROUTERS, f"router must be one of {ROUTERS}, got {self.router!r}")
        need(self.score_func in SCORE_FUNCS,
             f"score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        need(self.activation in ACTIVATIONS,
             f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(self.impl in IMPLS, f"impl must be one of {IMPLS}, got {self.impl!r}")
        need(self.group_mask_fill in GROUP_MASK_FILLS,
             f"group_mask_fill must be one of {GROUP_MASK_FILLS}, got {self.group_mask_fill!r}")
        for name in ("hidden_size", "expert_ffn_size"):
            v = getattr(self, name)
            need(0 < v <= MAX_WIDTH and v % ALIGNMENT == 0,
                 f"{name} must be a positive multiple of {ALIGNMENT} (grouped GEMM alignment) and at most "
                 f"{MAX_WIDTH}, got {v}")
        if self.num_shared_experts:
            need(0 < self.shared_ffn_size <= MAX_WIDTH and self.shared_ffn_size % ALIGNMENT == 0,
                 f"shared_expert_ffn_size must be a positive multiple of {ALIGNMENT} and at most {MAX_WIDTH}, "
                 f"got {self.shared_ffn_size}")
        need(1 <= self.num_experts <= MAX_EXPERTS,
             f"num_experts must be >= 1 and at most {MAX_EXPERTS}, got {self.num_experts}")
        need(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        if self.token_choice:
            need(self.top_k <= self.num_experts,
                 f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        need(self.num_shared_experts >= 0, "num_shared_experts must be >= 0")
        # Switch's multiplicative noise U(1 - eps, 1 + eps): a multiplier that can reach 0 (or flip the input's
        # sign) is no jitter
        need(0 <= self.router_jitter < 1, f"router_jitter must be in [0, 1), got {self.router_jitter}")
        need(0 < self.routed_scaling_factor <= MAX_COEFFICIENT,
             f"routed_scaling_factor must be > 0 and at most {MAX_COEFFICIENT}, got {self.routed_scaling_factor}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            v = getattr(self, name)
            need(0 <= v <= MAX_COEFFICIENT, f"{name} must be >= 0 and at most {MAX_COEFFICIENT}, got {v}")
        if self.top_p is not None:
            need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
            need(self.score_func == "softmax", "top_p needs score_func='softmax' (a probability mass)")
            need(self.router in ("topk", "hierarchical", "attention"),
                 f"top_p applies to score-based token-choice routers, not {self.router!r}")
        if self.capacity_factor is not None:
            need(0 < self.capacity_factor <= MAX_CAPACITY_FACTOR,
                 f"capacity_factor must be > 0 and at most {MAX_CAPACITY_FACTOR}, got {self.capacity_factor}")
        need(self.hierarchy_depth >= 1, f"hierarchy_depth must be >= 1, got {self.hierarchy_depth}")
        if self.router == "hierarchical" and self.hierarchy_depth == 1:
            need(not (self.hierarchy_groups or self.hierarchy_topk_groups),
                 "hierarchy_groups and hierarchy_topk_groups need hierarchy_depth > 1 (one level has no groups)")
        need(0 <= self.hash_seed < 2**63, f"hash_seed must be in [0, 2**63), got {self.hash_seed}")
        # Another router's structure would be accepted and do nothing: the layer without it.
        if self.router != "hierarchical":
            need(self.hierarchy_depth == 1 and not (self.hierarchy_groups or self.hierarchy_topk_groups),
                 "hierarchy_depth, hierarchy_groups and hierarchy_topk_groups apply to the hierarchical router, "
                 f"not {self.router!r}")
        if self.router != "attention":
            need(not self.attention_context, f"attention_context applies to the attention router, not {self.router!r}")
        if self.router == "hierarchical" and self.hierarchy_depth > 1 and not p:
            p.extend(_hierarchy_problems(self))
        if self.router == "attention":
            need(self.attention_heads >= 1, "attention_heads must be >= 1")
            need(self.attention_heads >= 1 and self.hidden_size % self.attention_heads == 0,
                 f"hidden_size ({self.hidden_size}) must be divisible by attention_heads "
                 f"({self.attention_heads})")
        if self.router == "hash":
            need(self.top_p is None, "the hash router has no scores for top_p")
        return p


@functools.cache
def _hints() -> dict[str, object]:
    return typing.get_type_hints(MoEConfig)


def _type_problems(c: MoEConfig) -> list[str]:
    """A problem for each field whose value is not of its annotated type. numpy's integers (which
    ``range`` over an array gives) are taken as ints, its floats and integers as floats where a
    float is expected."""
    problems = []
    for f in fields(c):
        value, hint = getattr(c, f.name), _hints()[f.name]
        if hint in (int, int | None) and not isinstance(value, (int, type(None))) and hasattr(value, "__index__"):
            value = operator.index(value)
            object.__setattr__(c, f.name, value)
        elif hint in (float, float | None) and type(value).__module__ == "numpy" and isinstance(value, numbers.Real):
            # np.float64 is a float subclass that yaml cannot write (the trial's arch.yaml)
            value = float(value)
            object.__setattr__(c, f.name, value)
        if not fits(value, hint):
            problems.append(f"{f.name} must be {describe(hint)}, got {value!r}")
    return problems


def _group_count_problems(c: MoEConfig) -> list[str]:
    """A problem for each of ``hierarchy_groups`` below 2 (a level that splits nothing)."""
    return [f"hierarchy_groups[{level}] must be >= 2, got {g}" for level, g in enumerate(c.hierarchy_groups) if g < 2]


def _hierarchy_problems(c: MoEConfig) -> list[str]:
    # The checks below multiply and divide by the group counts: with a count below 2 they would
    # divide by zero or report bounds computed from it, so that count is the one problem.
    p = _group_count_problems(c)
    if p:
        return p
    levels = c.hierarchy_depth - 1
    if len(c.hierarchy_groups) != levels or len(c.hierarchy_topk_groups) != levels:
        return [f"hierarchy_groups and hierarchy_topk_groups need {levels} entries for "
                f"hierarchy_depth={c.hierarchy_depth}"]
    nodes, candidates = 1, 1
    for level, (g, keep) in enumerate(zip(c.hierarchy_groups, c.hierarchy_topk_groups, strict=True)):
        nodes *= g
        candidates *= g
        if not 1 <= keep <= candidates:
            p.append(f"hierarchy_topk_groups[{level}] ({keep}) must be in [1, {candidates}]")
        candidates = keep
    if c.num_experts % nodes:
        p.append(f"num_experts ({c.num_experts}) must be divisible by the product of "
                 f"hierarchy_groups ({nodes})")
    elif candidates * (c.num_experts // nodes) < c.top_k:
        p.append(f"the kept groups hold {candidates * (c.num_experts // nodes)} experts, fewer "
                 f"than top_k ({c.top_k}): raise hierarchy_topk_groups")
    return p


def _divisors(n: int) -> list[int]:
    """The divisors of ``n``, by trial division up to its square root."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def default_hierarchy(c: MoEConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Fill in missing hierarchy groups: near-equal branching, keeping half the nodes per level.

    ``num_experts`` is factored into ``depth`` near-equal factors (e.g. 64 experts at depth 3 ->
    4 x 4 x 4); at each upper level half of the candidate nodes are kept (DeepSeek-V3 keeps 4 of
    8 groups), but never so few that fewer than ``top_k`` experts remain.
    """
    levels = c.hierarchy_depth - 1
    groups = c.hierarchy_groups
    if not groups:
        remaining, out = c.num_experts, []
        for left in range(c.hierarchy_depth, 1, -1):
            target = remaining ** (1 / left)
            divisors = [d for d in _divisors(remaining) if 2 <= d and remaining // d >= 2]
            if not divisors:
                raise ValueError(
                    f"invalid MoE config: hierarchy_depth={c.hierarchy_depth} cannot split "
                    f"num_experts={c.num_experts} into groups of >= 2 at every level")
            g = min(divisors, key=lambda d: (abs(d - target), d))
            out.append(g)
            remaining //= g
        groups = tuple(out)
    keep = c.hierarchy_topk_groups
    # Kept counts are derived from valid groups only: _hierarchy_problems reports the others.
    if not keep and len(groups) == levels and not _group_count_problems(c):
        out, candidates, nodes = [], 1, 1
        for g in groups:
            candidates *= g
            nodes *= g
            leaves = c.num_experts // nodes if c.num_experts % nodes == 0 else 1
            out.append(min(candidates, max(candidates // 2, 1, math.ceil(c.top_k / leaves))))
            candidates = out[-1]
        keep = tuple(out)
    return tuple(groups), tuple(keep)
