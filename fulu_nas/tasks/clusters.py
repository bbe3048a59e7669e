"""``clusters``: token classification with one planted function per domain.

Vocabulary: K domain markers (ids ``0..K-1``) then m value tokens (ids ``K..K+m-1``). Domain k
owns a random permutation ``perm_k`` of ``range(m)`` (fixed by ``data_seed``). A sequence is
``[marker_k, v_1, ..., v_{S-1}]`` with k and the values uniform; the target of value token
``v_t`` is ``perm_k[v_t]``. The same value maps to different classes in different domains, so
a model must carry the domain from the marker to every token: an ideal setting for experts
that specialise by domain. The marker itself has no target and no domain.

Validation is a fixed set of random sequences drawn from a generator that no training seed
shares (seeds are hashed with a distinct tag); all sequences follow the same planted functions.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from fulu_nas.tasks._common import (
    accuracy_counts,
    check_batch_size,
    check_int,
    make_generator,
    raise_problems,
    split_batches,
)
from fulu_nas.tasks.base import IGNORE, NO_DOMAIN, Batch, Task


class ClustersTask(Task):
    """Planted per-domain permutations; ``num_classes = values``, metric ``accuracy``."""

    name = "clusters"
    metric_name = "accuracy"
    higher_is_better = True

    def __init__(self, *, num_domains: int = 8, values: int = 32, seq_len: int = 32, val_sequences: int = 512,
                 data_seed: int = 0):
        problems: list[str] = []
        check_int(problems, "num_domains", num_domains, 1)
        check_int(problems, "values", values, 2)
        check_int(problems, "seq_len", seq_len, 2)
        check_int(problems, "val_sequences", val_sequences, 1)
        check_int(problems, "data_seed", data_seed, -(2**63))
        raise_problems(problems)
        self.num_domains, self.values, self.seq_len = int(num_domains), int(values), int(seq_len)
        self.val_sequences, self.data_seed = int(val_sequences), int(data_seed)
        self.vocab_size = self.num_domains + self.values
        self.num_classes = self.values
        self.domain_names = tuple(f"domain{k}" for k in range(self.num_domains))
        g = make_generator("clusters", "perms", self.data_seed)
        # perm_KM[k, v] is the class of value v in domain k.
        self.perm_KM = torch.stack([torch.randperm(self.values, generator=g) for _ in range(self.num_domains)])
        self._val: tuple[Tensor, Tensor, Tensor] | None = None

    def _sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        k_N = torch.randint(self.num_domains, (n,), generator=g)
        values_NV = torch.randint(self.values, (n, self.seq_len - 1), generator=g)
        tokens_NS = torch.cat([k_N[:, None], values_NV + self.num_domains], dim=1)
        targets_NS = torch.cat([torch.full((n, 1), IGNORE), self.perm_KM[k_N[:, None], values_NV]], dim=1)
        domains_NS = torch.cat([torch.full((n, 1), NO_DOMAIN), k_N[:, None].expand(n, self.seq_len - 1)], dim=1)
        return tokens_NS, targets_NS, domains_NS.contiguous()

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        g = make_generator("clusters", "train", self.data_seed, int(seed))

        def stream() -> Iterator[Batch]:
            while True:
                yield Batch(*self._sample(batch_size, g))

        return stream()

    def val_batches(self, batch_size: int) -> list[Batch]:
        check_batch_size(batch_size)
        if self._val is None:
            self._val = self._sample(self.val_sequences, make_generator("clusters", "val", self.data_seed))
        return split_batches(*self._val, batch_size)

    def metric_counts(self, logits: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        return {"accuracy": accuracy_counts(logits, batch.targets)}
