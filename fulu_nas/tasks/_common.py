"""Helpers shared by the tasks: parameter checks, explicit seeding, batching.

Parameter checks append a message to a ``problems`` list instead of raising, so that a
constructor can report every bad parameter at once in one :class:`FuluConfigError`.
Seeds are derived by hashing their parts (hashlib, stable across runs and platforms), so that
the training stream of any seed and the validation set never share a generator.
"""

from __future__ import annotations

import hashlib
import math
import numbers

import torch
from torch import Tensor

from fulu_nas.errors import FuluConfigError
from fulu_nas.tasks.base import IGNORE, Batch

# The longest sequence a task makes: the model learns an embedding for each position and attends over all of
# them. The presets use 16 to 256 positions; this is 256 times the longest.
MAX_SEQ_LEN = 65_536
# The most numbers one array a task makes may hold (clusters' planted weights and its validation set's value
# counts, pimoe_mix's validation characters): 2**27, over 1,000 times the largest the defaults make (clusters'
# 512 x 15 x 16 value counts) and a few GiB at most (1 GiB of float64), where a size of 10**9 took the
# machine's memory while the task was being checked.
MAX_ELEMENTS = 2**27


def check_int(problems: list[str], name: str, value, minimum: int, maximum: int | None = None) -> None:
    """Require an integer (not a bool) in ``[minimum, maximum]``."""
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        problems.append(f"{name} must be an integer {bounds}, got {value!r}")


def check_float(problems: list[str], name: str, value, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Require a real number in the interval from ``low`` to ``high`` (open ends as flagged)."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        problems.append(f"{name} must be a number in {interval}, got {value!r}")


def check_elements(problems: list[str], name: str, what: str, sizes: dict[str, int]) -> None:
    """Require an array of the valid integer ``sizes`` (each named by the task's parameters it comes from;
    ``what`` the array holds) to have at most :data:`MAX_ELEMENTS` numbers; the problem names parameter ``name``."""
    total = math.prod(sizes.values())
    if total > MAX_ELEMENTS:
        problems.append(f"{name} too large: {' x '.join(sizes)} = {' x '.join(map(str, sizes.values()))} = {total:,} "
                        f"{what}, more than {MAX_ELEMENTS:,}")


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise FuluConfigError(problems)


def check_batch_size(batch_size) -> None:
    problems: list[str] = []
    check_int(problems, "batch_size", batch_size, 1)
    raise_problems(problems)


def derive_seed(*parts) -> int:
    """A 63-bit seed from a stable hash of ``parts`` (e.g. ``("clusters", "train", data_seed, seed)``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


class TorchRandom:
    """Python-side random draws from an explicitly seeded ``torch.Generator``.

    Uniform floats are fetched in blocks (one tensor op per ``block`` draws), which keeps
    per-character generation in Python fast while all randomness stays in torch.
    """

    def __init__(self, generator: torch.Generator, block: int = 4096):
        self.generator = generator
        self.block = block
        self._buf: list[float] = []
        self._i = 0

    def random(self) -> float:
        if self._i >= len(self._buf):
            self._buf = torch.rand(self.block, generator=self.generator, dtype=torch.float64).tolist()
            self._i = 0
        self._i += 1
        return self._buf[self._i - 1]

    def randbelow(self, n: int) -> int:
        return min(int(self.random() * n), n - 1)

    def choice(self, seq):
        return seq[self.randbelow(len(seq))]


def split_batches(tokens_NS: Tensor, targets_NS: Tensor, domains_NS: Tensor, batch_size: int) -> list[Batch]:
    """Cut N fixed sequences into batches of ``batch_size`` (the last one may be smaller); copies, so
    that a caller editing a batch in place cannot alter the cached validation set."""
    return [Batch(*(t[i:i + batch_size].clone() for t in (tokens_NS, targets_NS, domains_NS)))
            for i in range(0, tokens_NS.shape[0], batch_size)]


def accuracy_counts(logits_BSC: Tensor, targets_BS: Tensor) -> tuple[float, float]:
    """(correct argmax predictions, positions) over positions whose target is not IGNORE."""
    targets_BS = targets_BS.to(logits_BSC.device)
    mask_BS = targets_BS != IGNORE
    correct_BS = (logits_BSC.argmax(dim=-1) == targets_BS) & mask_BS
    return float(correct_BS.sum().item()), float(mask_BS.sum().item())
