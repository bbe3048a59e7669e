"""``clusters``: token classification with one planted linear scoring function per domain.

Vocabulary: K domain markers (ids ``0..K-1``) then m value tokens (ids ``K..K+m-1``); C classes.
Domain k owns a score matrix ``W_k`` (C x m, Gaussian, fixed by ``data_seed``, each class row
centred over the values so that no class wins by default). A sequence is
``[marker_k, v_1, ..., v_{S-1}]`` with k and the values uniform; the target of value token
``v_t`` is ``argmax_c sum_{s <= t} W_k[c, v_s]``: domain k's linear classifier applied to the
counts of the values seen so far. The marker itself has no target and no domain.

Why this shape. The values and their counts are shared by all domains; only the marker at
position 0 says which classifier applies, so the model must carry the domain from the marker
to every token. Given the domain, the target is a *linear* function of the (causally averaged)
value counts, which a single small expert computes; an expert serving several domains must
instead compute several classifiers gated by the domain, and the count vectors are too many to
memorise. So splitting the experts by domain is what the loss rewards, unlike a per-domain
lookup table (an earlier version), where any partition of the (domain, value) pairs among the
experts costs the same and routing settled on values as often as on domains.

Batch shapes: ``tokens``, ``targets``, ``domains`` are (B, S) int64; ``targets`` in ``[0, C)``
(``IGNORE`` at position 0), ``domains`` in ``[0, K)`` (``NO_DOMAIN`` at position 0).

Validation is a fixed set of random sequences drawn from a generator that no training seed
shares (seeds are hashed with a distinct tag); all sequences follow the same planted functions.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fulu_nas.tasks._common import (
    MAX_SEQ_LEN,
    accuracy_counts,
    check_batch_size,
    check_elements,
    check_int,
    make_generator,
    raise_problems,
    split_batches,
)
from fulu_nas.tasks.base import IGNORE, NO_DOMAIN, Batch, Task

# Class scores this close to the best count as tied (float64 sums of a few dozen weights).
TIE_TOLERANCE = 1e-9
# Each domain is a marker token, a planted classifier and a name under which every trial records its routing:
# its routing accuracy and its row of the domains x experts confusion matrix of each MoE layer. 4,096 domains
# make that 262,144 numbers a layer at 64 experts (the default space's most), and a validation set of
# thousands of sequences (one domain each; 512 by default) to measure them at all.
MAX_DOMAINS = 4096
# Value tokens and classes: the model's vocabulary (with the markers) and its classification head, as large
# as a large tokenizer's vocabulary at most.
MAX_TOKENS = 65_536


class ClustersTask(Task):
    """Planted per-domain linear classifiers over running value counts; metric ``accuracy``."""

    name = "clusters"
    metric_name = "accuracy"
    higher_is_better = True

    def __init__(self, *, num_domains: int = 8, values: int = 16, classes: int = 4, seq_len: int = 16,
                 val_sequences: int = 512, data_seed: int = 0):
        problems: list[str] = []
        check_int(problems, "num_domains", num_domains, 1, MAX_DOMAINS)
        check_int(problems, "values", values, 2, MAX_TOKENS)
        check_int(problems, "classes", classes, 2, MAX_TOKENS)
        check_int(problems, "seq_len", seq_len, 2, MAX_SEQ_LEN)
        check_int(problems, "val_sequences", val_sequences, 1)
        check_int(problems, "data_seed", data_seed, -(2**63))
        raise_problems(problems)
        check_elements(problems, "values", "planted weights", {"num_domains": num_domains, "classes": classes,
                                                                "values": values})
        check_elements(problems, "val_sequences", "value counts of the validation set",
                       {"val_sequences": val_sequences, "(seq_len - 1)": seq_len - 1, "values": values})
        raise_problems(problems)
        self.num_domains, self.values, self.seq_len = int(num_domains), int(values), int(seq_len)
        self.val_sequences, self.data_seed = int(val_sequences), int(data_seed)
        self.vocab_size = self.num_domains + self.values
        self.num_classes = int(classes)
        self.domain_names = tuple(f"domain{k}" for k in range(self.num_domains))
        g = make_generator("clusters", "weights", self.data_seed)
        # weights_KCM[k, c, v]: how much one occurrence of value v adds to class c's score in domain k.
        w = torch.randn(self.num_domains, self.num_classes, self.values, generator=g, dtype=torch.float64)
        self.weights_KCM = w - w.mean(-1, keepdim=True)
        self._val: tuple[Tensor, Tensor, Tensor] | None = None

    def targets_for(self, domain_N: Tensor, values_NT: Tensor) -> Tensor:
        """Class of each value token: domain ``domain_N[n]``'s classifier on the counts of
        ``values_NT[n, :t+1]`` (value indices in ``[0, values)``, not token ids)."""
        counts_NTM = F.one_hot(values_NT, self.values).to(torch.float64).cumsum(1)
        scores_NTC = torch.einsum("ntm,ncm->ntc", counts_NTM, self.weights_KCM[domain_N])
        # Ties go to the lowest class: equal counts of every value give every class the same score
        # (each class's weights sum to zero), which rounding would otherwise break at random.
        best_NT1 = scores_NTC.amax(-1, keepdim=True)
        return (scores_NTC >= best_NT1 - TIE_TOLERANCE).long().argmax(-1)

    def _sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        k_N = torch.randint(self.num_domains, (n,), generator=g)
        values_NT = torch.randint(self.values, (n, self.seq_len - 1), generator=g)
        tokens_NS = torch.cat([k_N[:, None], values_NT + self.num_domains], dim=1)
        targets_NS = torch.cat([torch.full((n, 1), IGNORE), self.targets_for(k_N, values_NT)], dim=1)
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
