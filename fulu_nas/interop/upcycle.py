"""One way to upcycle the user's dense encoder, as a searchable architecture (:class:`UpcycleArch`), and the
model it gives (:func:`build_upcycled`): the dense model with the chosen layers migrated by
:func:`~.migrate.migrate_from_electra`, wrapped for the project's trainer, evaluation and cost protocol
(:class:`UpcycledMLM`).

An architecture is the migration's arguments (which layers, the router and its options, the number of
experts, top-k, the shared expert's fraction, the balancing losses), the fine-tuning learning rate, the
SHA-256 of the dense checkpoint it starts from, and the sizes read from it. No layer (``layers=()``) is
the dense model itself: the reference an upcycling must beat at the same fine-tuning budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..errors import FuluConfigError
from ..models.transformer import parameter_counts
from ..moe import MoEConfig
from .encoder import DenseEncoder
from .migrate import TaskModel, equivalence_problems, migrate_from_electra, pimoe_layers, upcycled_moe_config

# How a search names the layers to upcycle; last_n takes the number of layers from the end.
LAYER_CHOICES = ("dense", "all", "every_other", "last_n")


def _shared_expert_conflicts(migration: dict[str, Any]) -> list[str]:
    """The problem (a list of one, or empty) with shared-expert settings beside ``shared_fraction`` in
    ``migration``: the shared expert the fraction cuts out of each FFN is one expert of the FFN's first hidden
    units, ungated, so that the two parts sum to the FFN. A gate would scale that part by
    ``sigmoid(gate(x))``, and a count or width of its own (even 0 or ``None``, which would replace the
    fraction's) would not fit the units cut out."""
    fraction = migration.get("shared_fraction") if isinstance(migration, dict) else None
    if not fraction:
        return []
    named = [f"{name}={migration[name]!r}" for name in ("num_shared_experts", "shared_expert_ffn_size")
             if name in migration]
    if migration.get("shared_expert_gate", False) is not False:
        named.insert(0, f"shared_expert_gate={migration['shared_expert_gate']!r}")
    if not named:
        return []
    return [f"shared_fraction={fraction!r} cuts the shared expert out of each FFN (one expert of its first hidden "
            f"units, ungated, so that the upcycled model starts exact); {', '.join(named)} cannot be set with it"]


def choose_layers(choice: str, num_layers: int, last_n: int | None = None) -> tuple[int, ...]:
    """The encoder layers a choice of :data:`LAYER_CHOICES` upcycles (FuluConfigError when it cannot)."""
    if choice == "dense":
        return ()
    if choice == "all":
        return tuple(range(num_layers))
    if choice == "every_other":  # the second, fourth, ...: the Switch / GShard placement
        if num_layers < 2:
            raise FuluConfigError(f"layers=every_other: the model has {num_layers} layer, no second one")
        return tuple(range(1, num_layers, 2))
    if choice == "last_n":
        if isinstance(last_n, bool) or not isinstance(last_n, int) or not 1 <= last_n <= num_layers:
            raise FuluConfigError(f"layers=last_n needs last_n in [1, {num_layers}] (the model's layers), "
                                  f"got {last_n!r}")
        return tuple(range(num_layers - last_n, num_layers))
    raise FuluConfigError(f"layers must be one of {', '.join(LAYER_CHOICES)}, got {choice!r}")


@dataclass(frozen=True)
class UpcycleArch:
    """An upcycling of the dense encoder whose SHA-256 is ``source_sha256`` (module doc). ``migration``:
    :func:`~.migrate.migrate_from_electra`'s keyword arguments besides the model and ``layers``; ``lr``:
    the fine-tuning learning rate (None: the study's ``trainer.lr``)."""

    source_sha256: str
    num_layers: int
    hidden_size: int
    ffn_size: int
    num_heads: int
    vocab_size: int
    max_seq_len: int
    lr: float | None = None
    layers: tuple[int, ...] = ()
    migration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        problems = []
        if self.lr is not None and not (isinstance(self.lr, int | float) and not isinstance(self.lr, bool)
                                        and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a finite number > 0 (or null: trainer.lr), got {self.lr!r}")
        if any(not 0 <= i < self.num_layers for i in self.layers) or len(set(self.layers)) != len(self.layers):
            problems.append(f"layers must be distinct indices in [0, {self.num_layers}), got {list(self.layers)}")
        if not self.layers and self.migration:
            problems.append("the dense model (no layer upcycled) takes no migration arguments")
        problems += _shared_expert_conflicts(self.migration)
        if problems:
            raise FuluConfigError(problems)
        self.moe  # noqa: B018 - computing it validates the migration's arguments

    def __hash__(self) -> int:  # the migration's dict is not hashable; its content is
        return hash(self.content_hash())

    @property
    def moe(self) -> MoEConfig | None:
        """The configuration of the PiMoE layers (None for the dense model); FuluConfigError if there is none."""
        if not self.layers:
            return None
        options = {k: v for k, v in self.migration.items() if k != "require_exact"}
        return upcycled_moe_config(self.hidden_size, self.ffn_size, self.num_heads, **options)

    @property
    def exact(self) -> bool:
        """Whether the upcycled model starts out computing the dense model's outputs."""
        return not self.layers or not equivalence_problems(self.moe, bool(self.migration.get("shared_fraction")))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        moe = self.moe
        # For a reader (dashboards, the export's card): from_dict recomputes it.
        d.update(family="upcycle", moe=moe.to_dict() if moe else None, exact=self.exact)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UpcycleArch:
        d = {k: v for k, v in d.items() if k not in ("family", "moe", "exact")}
        try:
            return cls(**d)
        except TypeError as e:
            raise FuluConfigError(f"not an upcycling architecture: {e}") from None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def content_hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def upcycle_arch(encoder: DenseEncoder, seq_len: int, lr: float | None = None, layers: str = "dense",
                 last_n: int | None = None, moe: dict[str, Any] | None = None) -> UpcycleArch:
    """The architecture for a search's choices: ``layers`` (:data:`LAYER_CHOICES`, with ``last_n``), and
    ``moe``: migration keywords and MoEConfig fields, ``router`` standing for ``routing_strategy``. Routers
    that cannot start exact (expert choice) are migrated anyway (``exact`` says so); balancing is what
    ``moe`` sets, nothing else (the migration's defaults off)."""
    chosen = choose_layers(layers, encoder.shape.num_layers, last_n)
    migration: dict[str, Any] = {}
    if chosen:
        options = dict(moe or {})
        if "router" in options:
            options["routing_strategy"] = options.pop("router")
        migration = {"enable_advanced_routing": False, "aux_loss_coef": 0.0, **options}
        if problems := _shared_expert_conflicts(migration):
            raise FuluConfigError(problems)
        probe = upcycled_moe_config(encoder.shape.hidden_size, encoder.shape.ffn_size, encoder.shape.num_heads,
                                    **migration)
        # A balancing the router cannot use is no other upcycling (MoEConfig.without_inert_options).
        inert = [k for k in options if k in MoEConfig.__dataclass_fields__
                 and getattr(probe, k) != getattr(probe.without_inert_options(), k)]
        if inert:
            migration = {"enable_advanced_routing": False, "aux_loss_coef": 0.0,
                         **{k: v for k, v in options.items() if k not in inert}}
            probe = upcycled_moe_config(encoder.shape.hidden_size, encoder.shape.ffn_size, encoder.shape.num_heads,
                                        **migration)
        migration["require_exact"] = not equivalence_problems(probe, bool(migration.get("shared_fraction")))
    s = encoder.shape
    return UpcycleArch(source_sha256=encoder.sha256, num_layers=s.num_layers, hidden_size=s.hidden_size,
                       ffn_size=s.ffn_size, num_heads=s.num_heads, vocab_size=s.vocab_size, max_seq_len=seq_len,
                       lr=lr, layers=chosen, migration=migration)


class UpcycledMLM(TaskModel):
    """The (upcycled) masked-language model as the trainer, :func:`~fulu_nas.training.evaluate.evaluate` and
    :func:`~fulu_nas.deploy.cost.measure_cost` take it: tokens -> :class:`~fulu_nas.models.ModelOutput`,
    its PiMoE layers, parameter counts and FLOPs per token. ``arch``: the :class:`UpcycleArch`."""

    def __init__(self, model: nn.Module, arch: UpcycleArch):
        super().__init__(model, require_moe=False)
        self.arch = arch

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and those one token activates (all but the experts it is not routed to)."""
        return parameter_counts(self, self.moe_layers())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Analytic forward FLOPs per token (2 per multiply-add) at ``seq_len`` (default ``max_seq_len``):
        attention over every position, the dense FFNs, the PiMoE layers' own count, the MLM head's
        transform and decoder."""
        a, D = self.arch, self.arch.hidden_size
        S = seq_len or a.max_seq_len
        attention = 2 * 4 * D * D + 2 * 2 * D * S
        moe = pimoe_layers(self.model)
        dense_ffn = 2 * 2 * D * a.ffn_size * (a.num_layers - len(moe))
        head = 2 * D * D + 2 * D * a.vocab_size
        return int(a.num_layers * attention + dense_ffn + sum(layer.flops_per_token(S) for layer in moe) + head)


def another_checkpoint(current: str, searched: list[str]) -> str:
    """What is wrong with a model folder whose SHA-256 is ``current``, not one of ``searched``."""
    on = ", ".join(f"{digest[:12]}..." for digest in sorted(searched))
    return (f"not the checkpoint this architecture was searched on (SHA-256 {current[:12]}..., expected {on}): the "
            "folder changed since the search")


def build_upcycled(arch: UpcycleArch, encoder: DenseEncoder) -> UpcycledMLM:
    """A fresh copy of the dense model with ``arch``'s layers upcycled (the routers' initial weights come
    from torch's random state: seed it first). FuluConfigError when ``encoder`` is not the checkpoint the
    architecture was made from."""
    if encoder.sha256 != arch.source_sha256:
        raise FuluConfigError(f"model {encoder.path!r} is {another_checkpoint(encoder.sha256, [arch.source_sha256])}")
    model = encoder.copy()
    if arch.layers:
        with warnings.catch_warnings():  # an inexact start is recorded as arch.exact, not warned about per trial
            warnings.simplefilter("ignore", UserWarning)
            model = migrate_from_electra(model, layers=arch.layers, inplace=True, **arch.migration)
    return UpcycledMLM(model, arch)
