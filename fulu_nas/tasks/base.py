"""What every task provides: deterministic batches from a seed, and its metrics.

Shape suffixes: B batch, S sequence. A batch holds
- ``tokens``  (B, S) int64: model input ids in ``[0, vocab_size)``
- ``targets`` (B, S) int64: what the model must predict at each position (next-token ids for
  language-model tasks, class ids for token-classification tasks); ``IGNORE`` = no loss there
- ``domains`` (B, S) int64: ground-truth domain of each token (index into ``domain_names``);
  ``NO_DOMAIN`` where a token has none (or the task has no domains)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100
NO_DOMAIN = -1


@dataclass
class Batch:
    tokens: Tensor
    targets: Tensor
    domains: Tensor

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``. To a GPU from the CPU the copies go through pinned memory and do not
        block: a plain copy from pageable memory waits for every kernel queued before it, which would
        stop the host from queueing a training step ahead of the GPU."""
        device = torch.device(device)
        if device.type == "cuda" and self.tokens.device.type == "cpu":
            return Batch(*(t.pin_memory().to(device, non_blocking=True)
                           for t in (self.tokens, self.targets, self.domains)))
        return Batch(self.tokens.to(device), self.targets.to(device), self.domains.to(device))


class Task(ABC):
    """A task: data, split, batches and metrics.

    ``num_classes == 0`` means next-token language modelling (logits over ``vocab_size``, the
    model's tied LM head); ``num_classes > 0`` means token classification (the model's
    classification head with that many classes).
    """

    name: str
    vocab_size: int
    seq_len: int
    num_classes: int = 0
    domain_names: tuple[str, ...] = ()
    metric_name: str
    higher_is_better: bool

    @abstractmethod
    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """An endless, deterministic stream of training batches (same seed, same stream)."""

    @abstractmethod
    def val_batches(self, batch_size: int) -> list[Batch]:
        """The fixed validation set, in batches: drawn from a generator no training seed shares, and not
        necessarily disjoint from training data. pimoe_mix holds out problems and textlm files (or the
        end of a single file); clusters draws from the same distribution as training, so at small sizes
        its validation sequences can appear in training too (it measures a planted function)."""

    @abstractmethod
    def metric_counts(self, logits: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        """Per-batch ``(numerator, denominator)`` for each task metric (``metric_name`` among
        them); evaluation sums them over the validation set and divides. ``logits`` is
        (B, S, C) from the head the task uses."""

    def describe(self) -> dict:
        """A plain-dict description (what an experiment tracker records)."""
        return {"name": self.name, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "num_classes": self.num_classes, "domains": list(self.domain_names),
                "metric": self.metric_name}
