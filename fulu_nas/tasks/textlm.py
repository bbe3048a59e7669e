"""``textlm``: byte-level language modelling on a real corpus on disk.

Corpus: ``path=None`` uses the ``.py`` files of the running Python's standard library (always
present, no download; ``site-packages`` and ``__pycache__`` skipped). Otherwise ``path`` is a
file, used as is, or a folder, contributing every regular file below it except binary ones
(a NUL byte in the first 8 KB) and VCS metadata folders (``.git``, ``.hg``, ``.svn``). Files are
read in sorted relative-path order until ``max_bytes`` bytes have been read (the last file cut).

Split by file: a file is in validation iff ``sha256(f"{data_seed}:{relative path}")`` (the path's bytes
as the file system holds them, UTF-8 or not) maps below
``val_fraction``; with two or more files at least one lands on each side (the file hashed lowest
is moved to validation, or the highest to training). A single file is split by position: its last
``val_fraction`` of bytes is validation. Each side is its files joined by a newline.

Training windows start uniformly at random in the training bytes; validation is consecutive
windows of the first ``max_val_tokens + 1`` validation bytes, each target scored once. There is no padding
(it would be routed, and counted in the load statistics, as if it were text): the last window ends at the
last byte, reading the targets it shares with the window before as context (target ``IGNORE``), and
validation shorter than a window is one shorter window. The corpus is read in the constructor, so errors come early.

The corpus is known by its content: ``corpus_sha256`` digests the relative names and bytes of the
files read and the split settings, so a search can tell other data at the same path (and the same
data at another path) apart; ``path`` is the folder or file resolved to an absolute path.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fulu_nas.errors import FuluConfigError
from fulu_nas.tasks._common import (
    MAX_SEQ_LEN,
    check_batch_size,
    check_float,
    check_int,
    make_generator,
    raise_problems,
    split_batches,
)
from fulu_nas.tasks.base import IGNORE, NO_DOMAIN, Batch, Task

BINARY_PROBE = 8192
SKIPPED_DIRS = {".git", ".hg", ".svn", "__pycache__"}


def _list_files(root: Path, suffix: str | None = None, skip: set[str] = SKIPPED_DIRS) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the regular files below ``root``, sorted by relative path."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        for f in files:
            full = Path(folder, f)
            if (suffix is None or f.endswith(suffix)) and full.is_file():
                found.append((full.relative_to(root).as_posix(), full))
    return sorted(found)


# The most corpus bytes a task reads (max_bytes): all of it is held in memory, as bytes and then as token
# ids (a byte each here, several for a tokenizer); 1e12 was a MemoryError traceback.
MAX_CORPUS_BYTES = 2**30


def _read_corpus(files: list[tuple[str, Path]], max_bytes: int) -> list[tuple[str, bytes]]:
    """Non-empty, non-binary files in order, until ``max_bytes`` bytes in total."""
    out, total = [], 0
    for rel, full in files:
        if total >= max_bytes:
            break
        try:
            with open(full, "rb") as f:
                # no more than the file holds: read(n) sets aside n bytes before it reads any
                data = f.read(min(max_bytes - total, os.fstat(f.fileno()).st_size))
        except OSError as e:
            raise FuluConfigError(f"cannot read corpus file {str(full)!r}: {e.strerror or e}") from e
        if data and b"\0" not in data[:BINARY_PROBE]:
            out.append((rel, data))
            total += len(data)
    return out


def _name_bytes(rel: str) -> bytes:
    """A relative path's bytes as the file system holds them: a name that is not valid UTF-8 was decoded
    with surrogate escapes (os.fsdecode), which strict UTF-8 cannot encode; a valid one encodes as before."""
    return rel.encode("utf-8", "surrogateescape")


def _hash_unit(data_seed: int, rel: str) -> float:
    """A stable hash of a relative path, uniform in [0, 1)."""
    digest = hashlib.sha256(f"{data_seed}:".encode() + _name_bytes(rel)).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def _corpus_sha256(corpus: list[tuple[str, bytes]], val_fraction: float, data_seed: int) -> str:
    """sha256 of the files read (each relative name and its bytes, length-prefixed so that no two corpora
    run together the same) and of the settings that split them: the same digest, the same split."""
    h = hashlib.sha256(f"textlm-corpus:{val_fraction!r}:{data_seed}:{len(corpus)}".encode())
    for rel, data in corpus:
        name = _name_bytes(rel)
        h.update(len(name).to_bytes(8, "little") + name + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class SplitCorpus(NamedTuple):
    """A corpus read and split (:func:`read_split_corpus`)."""

    train_files: list[str]
    val_files: list[str]
    train: bytes
    val: bytes
    sha256: str  # the content read and the split settings (:func:`_corpus_sha256`)
    path: str | None  # the file or folder read, absolute; None for the standard library


def read_split_corpus(path: str | None, max_bytes: int, val_fraction: float, data_seed: int) -> SplitCorpus:
    """Read the corpus and split it (the module doc's rules). Also the corpus of the ``upcycle`` task."""
    if path is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        corpus = _read_corpus(_list_files(stdlib, ".py", SKIPPED_DIRS | {"site-packages"}), max_bytes)
        if not corpus:  # a Python installed without its sources (byte-code only, a zipped standard library)
            raise FuluConfigError(f"path None reads the standard library's .py files, and {str(stdlib)!r} has none; "
                                  "give a file or folder")
        root = None
    else:
        try:
            root = Path(path).expanduser()
        except RuntimeError:  # ~user of an unknown user
            raise FuluConfigError(f"path {path!r}: its home folder is unknown") from None
        if not root.exists():
            raise FuluConfigError(f"path {path!r} does not exist")
        # absolute, so that a command run from another folder (confirm, export, a worker) reads the same files
        root = root.resolve()
        files = [(root.name, root)] if root.is_file() else _list_files(root) if root.is_dir() else []
        corpus = _read_corpus(files, max_bytes)
        if not corpus:
            raise FuluConfigError(f"path {path!r} has no usable bytes (no non-empty, non-binary file)")
    digest, where = _corpus_sha256(corpus, val_fraction, data_seed), None if root is None else str(root)
    if len(corpus) == 1:
        rel, data = corpus[0]
        cut = len(data) - max(1, math.floor(len(data) * val_fraction))
        return SplitCorpus([rel], [rel], data[:cut], data[cut:], digest, where)
    units = [_hash_unit(data_seed, rel) for rel, _ in corpus]
    is_val = [u < val_fraction for u in units]
    if not any(is_val):
        is_val[units.index(min(units))] = True
    if all(is_val):
        is_val[units.index(max(units))] = False
    train = [(rel, data) for (rel, data), v in zip(corpus, is_val, strict=True) if not v]
    val = [(rel, data) for (rel, data), v in zip(corpus, is_val, strict=True) if v]
    return SplitCorpus([r for r, _ in train], [r for r, _ in val], b"\n".join(d for _, d in train),
                       b"\n".join(d for _, d in val), digest, where)


class TextLMTask(Task):
    """Byte LM (``vocab_size = 256``, no domains); metric ``bits_per_byte`` (lower is better)."""

    name = "textlm"
    vocab_size = 256
    num_classes = 0
    domain_names = ()
    metric_name = "bits_per_byte"
    higher_is_better = False

    def __init__(self, *, path: str | None = None, seq_len: int = 128, max_bytes: int = 4_000_000,
                 val_fraction: float = 0.1, max_val_tokens: int = 65_536, data_seed: int = 0):
        problems: list[str] = []
        if path is not None and not isinstance(path, (str, os.PathLike)):
            problems.append(f"path must be a string or None, got {path!r}")
        elif path is not None and not str(path).strip():  # Path('') is the working directory
            problems.append(f"path: expected a file or folder, or None for the standard library, got {path!r}")
        check_int(problems, "seq_len", seq_len, 1, MAX_SEQ_LEN)
        check_int(problems, "max_bytes", max_bytes, 2, MAX_CORPUS_BYTES)
        check_float(problems, "val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_int(problems, "max_val_tokens", max_val_tokens, 1)
        check_int(problems, "data_seed", data_seed, -(2**63))
        raise_problems(problems)
        self.seq_len, self.max_bytes, self.val_fraction = int(seq_len), int(max_bytes), float(val_fraction)
        self.max_val_tokens, self.data_seed = int(max_val_tokens), int(data_seed)
        corpus = read_split_corpus(None if path is None else str(path), self.max_bytes, self.val_fraction,
                                   self.data_seed)
        self.path, self.corpus_sha256 = corpus.path, corpus.sha256
        self.train_files, self.val_files, train, val = corpus.train_files, corpus.val_files, corpus.train, corpus.val
        where = "the standard library's .py files" if self.path is None else f"path {self.path!r}"
        if len(train) < self.seq_len + 1:
            raise FuluConfigError(f"seq_len={self.seq_len} is too long for {where}: only {len(train)} training "
                                  f"bytes (need at least seq_len + 1)")
        if len(val) < 2:
            raise FuluConfigError(f"{where} leaves fewer than 2 validation bytes; use more data or val_fraction")
        self.train_bytes_N = torch.frombuffer(bytearray(train), dtype=torch.uint8).to(torch.int64)
        self.val_bytes_N = torch.frombuffer(bytearray(val[:self.max_val_tokens + 1]), dtype=torch.uint8)
        self._val: tuple[Tensor, Tensor, Tensor] | None = None

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        g = make_generator("textlm", "train", self.data_seed, int(seed))
        span_W = torch.arange(self.seq_len + 1)
        n_starts = self.train_bytes_N.numel() - self.seq_len

        def stream() -> Iterator[Batch]:
            while True:
                starts_B = torch.randint(n_starts, (batch_size,), generator=g)
                windows_BW = self.train_bytes_N[starts_B[:, None] + span_W]
                yield Batch(windows_BW[:, :-1].contiguous(), windows_BW[:, 1:].contiguous(),
                            torch.full((batch_size, self.seq_len), NO_DOMAIN))

        return stream()

    def val_batches(self, batch_size: int) -> list[Batch]:
        check_batch_size(batch_size)
        if self._val is None:
            n_targets = self.val_bytes_N.numel() - 1
            S = min(self.seq_len, n_targets)
            starts = list(range(0, n_targets - S + 1, S))
            scored = starts[-1] + S
            if scored < n_targets:
                starts.append(n_targets - S)
            windows_NW = self.val_bytes_N.to(torch.int64)[torch.tensor(starts)[:, None] + torch.arange(S + 1)]
            tokens_NS, targets_NS = windows_NW[:, :-1], windows_NW[:, 1:].clone()
            if scored < n_targets:
                targets_NS[-1, :scored - starts[-1]] = IGNORE
            self._val = (tokens_NS, targets_NS, torch.full_like(tokens_NS, NO_DOMAIN))
        return split_batches(*self._val, batch_size)

    def describe(self) -> dict:
        return {**super().describe(), "path": self.path, "corpus_sha256": self.corpus_sha256}

    def metric_counts(self, logits: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        targets_BS = batch.targets.to(logits.device)
        nats = F.cross_entropy(logits.float().flatten(0, 1), targets_BS.flatten(), ignore_index=IGNORE,
                               reduction="sum")
        return {"bits_per_byte": (nats.item() / math.log(2), float((targets_BS != IGNORE).sum().item()))}
