"""Model families: what a search space's sample becomes, and how it is built and trained. The task
decides (:func:`family_for`):

- :data:`PIMOE` (every task but ``upcycle``): an :class:`~fulu_nas.models.ArchConfig` from the space's
  architecture and MoE fields, trained from scratch as a :class:`~fulu_nas.models.PiMoETransformer`;
- :data:`UPCYCLE` (task ``upcycle``): an :class:`~fulu_nas.interop.upcycle.UpcycleArch`, the user's dense
  encoder with chosen layers upcycled (``layers``: dense, all, every_other, last_n with ``last_n``;
  ``shared_fraction``; MoE fields; ``balancing``) and fine-tuned with the learning rate ``lr``.

A space names its family's fields only (:attr:`Family.targets`); the objective, the confirmation and the
export go through the family for everything that differs: the architecture, the model, its training
configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from ..errors import FuluConfigError
from ..models import ArchConfig, PiMoETransformer, seeded_model
from ..moe import BALANCING_METHODS, MoEConfig
from ..training.model_task import NOT_CAUSAL
from ..training.train import TrainConfig

_MOE_FIELDS = frozenset(f.name for f in fields(MoEConfig)) - {"hidden_size"}


@dataclass(frozen=True)
class Family:
    """A model family (module doc). ``base_fields``: the fixed values a space's ``base`` may set besides
    ``moe``; ``moe_fields``: the MoE fields it may set or search; ``targets``: every name a space may
    search or derive; ``task_fields``: fields set from the task, refused in ``base``; ``probe``: whether a
    space's reference is checked as the space is read, on a stand-in task (every family's is checked on
    the study's task too, before the study)."""

    name: str
    base_fields: frozenset[str]
    moe_fields: frozenset[str]
    task_fields: frozenset[str] = frozenset()
    probe: bool = True
    what: str = "an architecture or MoE layer field, or 'balancing'"

    @property
    def targets(self) -> frozenset[str]:
        return (self.base_fields - self.task_fields) | self.moe_fields | {"balancing"}

    def split(self, base: dict, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The space's fixed values and a sample as (own fields, MoE fields), balancing spelled out."""
        own = {k: v for k, v in base.items() if k != "moe"}
        moe = dict(base.get("moe") or {})
        for name, value in values.items():
            if name == "balancing":
                moe.update(BALANCING_METHODS[value])
            elif name in self.base_fields:
                own[name] = value
            else:
                moe[name] = value
        return own, moe

    def fields_set(self, name: str, choices: tuple = ()) -> set[tuple[str, str]]:
        """The fields that :meth:`split` sets for a parameter or derived value ``name``, as (``own`` or
        ``moe``, field): a balancing method's fields, for each of its ``choices``."""
        if name == "balancing":
            return {("moe", field) for choice in choices for field in BALANCING_METHODS.get(choice, {})}
        return {("own" if name in self.base_fields else "moe", name)}

    def arch(self, base: dict, values: dict[str, Any], task):
        raise NotImplementedError

    def arch_from_dict(self, d: dict[str, Any]):
        raise NotImplementedError

    def build(self, arch, task, seed: int, device: torch.device | str = "cpu"):
        """The model to train on ``device``, with the initial weights ``seed`` draws there."""
        raise NotImplementedError

    def train_config(self, arch, cfg: TrainConfig) -> TrainConfig:
        """The training configuration of ``arch`` under the study's ``cfg``."""
        return cfg


class _PiMoE(Family):
    def arch(self, base: dict, values: dict[str, Any], task) -> ArchConfig:
        own, moe = self.split(base, values)
        own.update(vocab_size=task.vocab_size, num_classes=task.num_classes, max_seq_len=task.seq_len)
        if task.num_classes == 0 and moe.get("router") == "expert_choice":
            raise FuluConfigError(NOT_CAUSAL)
        arch = ArchConfig.from_dict({**own, "moe": moe})
        # a balancing method the router cannot use is no other architecture (see without_inert_options)
        return replace(arch, moe=arch.moe.without_inert_options())

    def arch_from_dict(self, d: dict[str, Any]) -> ArchConfig:
        return ArchConfig.from_dict(d)

    def build(self, arch: ArchConfig, task, seed: int, device: torch.device | str = "cpu") -> PiMoETransformer:
        return seeded_model(arch, seed, device)


# The upcycling's own fields; the sizes, activation and biases of its experts come from the dense model.
_UPCYCLE_FIELDS = frozenset({"layers", "last_n", "shared_fraction", "lr"})
_FROM_MODEL = frozenset({"expert_ffn_size", "activation", "expert_bias"})


class _Upcycle(Family):
    def arch(self, base: dict, values: dict[str, Any], task):
        from ..interop.upcycle import upcycle_arch

        own, moe = self.split(base, values)
        if own.get("shared_fraction"):
            moe["shared_fraction"] = own["shared_fraction"]
        try:
            return upcycle_arch(task.encoder, task.seq_len, lr=own.get("lr"), layers=own.get("layers", "dense"),
                                last_n=own.get("last_n"), moe=moe)
        except (TypeError, ValueError) as e:  # a value of the wrong type for a field
            raise FuluConfigError(str(e)) from None

    def arch_from_dict(self, d: dict[str, Any]):
        from ..interop.upcycle import UpcycleArch

        return UpcycleArch.from_dict(d)

    def build(self, arch, task, seed: int, device: torch.device | str = "cpu"):
        from ..interop.upcycle import build_upcycled

        torch.manual_seed(seed)  # the routers' initial weights; the rest is the checkpoint's
        return build_upcycled(arch, task.encoder).to(device)

    def train_config(self, arch, cfg: TrainConfig) -> TrainConfig:
        return cfg if arch.lr is None else replace(cfg, lr=arch.lr)


PIMOE = _PiMoE("pimoe", base_fields=frozenset(f.name for f in fields(ArchConfig)) - {"moe"}, moe_fields=_MOE_FIELDS,
               task_fields=frozenset({"vocab_size", "num_classes", "max_seq_len"}))
UPCYCLE = _Upcycle("upcycle", base_fields=_UPCYCLE_FIELDS, moe_fields=_MOE_FIELDS - _FROM_MODEL, probe=False,
                   what="an MoE layer field, 'balancing', or one of the upcycling's: " + ", ".join(sorted(
                       _UPCYCLE_FIELDS)))
_BY_TASK = {"upcycle": UPCYCLE}


def family_for(task_name: str) -> Family:
    """The family of the models a task trains."""
    return _BY_TASK.get(task_name, PIMOE)
