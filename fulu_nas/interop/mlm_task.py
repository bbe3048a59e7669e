"""``upcycle``: masked-language-model fine-tuning of the user's dense encoder on a text corpus, the task of
an upcycling search (``fulu-nas search task=upcycle model=PATH``).

The model: :class:`~.encoder.DenseEncoder` (``model``: its ``save_pretrained`` folder, whose safetensors
files are checked to read as such first; ``model_path`` is the folder resolved to an absolute path). The corpus:
``textlm``'s (``path``: None for the running Python's standard library, a file or a folder, resolved to an
absolute path; split into training and validation by file, :func:`~fulu_nas.tasks.textlm.read_split_corpus`;
known by its content, ``corpus_sha256``), decoded as UTF-8.

Tokens (``tokenizer``):

- ``model``: the folder's own tokenizer (its files, :data:`~.encoder.TOKENIZER_FILES`); a folder without
  one is refused. Sequences are ``[CLS] text [SEP]`` when the tokenizer has those tokens.
- ``bytes``: the byte-level fallback: each byte of the UTF-8 text is one token whose id is its value
  (0-255), and the mask token is id 256, so the model's ``vocab_size`` must be at least 257. Meant for
  encoders pretrained on bytes; a model pretrained with a subword vocabulary would see unrelated ids.
- ``auto`` (default): the folder's tokenizer when it has one, else bytes.

Masking is BERT's: each token but the special ones is chosen with probability ``mask_rate``; a chosen
token becomes the mask token (80%), a random non-special token (10%) or stays (10%), and is the target
(elsewhere the target is ``IGNORE``); a batch that draws none has its likeliest token chosen, so that
every batch has a loss. Training windows start at random in the training tokens, with
masks drawn from the training seed; validation is consecutive windows of the first ``max_val_tokens``
validation tokens (whole windows only), masked once from ``data_seed``: the same set for every trial.

Metrics: the validation loss is the MLM loss (its exponential, the perplexity, is reported beside it);
the task metric is ``masked_accuracy``, the share of masked tokens predicted exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FuluConfigError
from ..tasks._common import (
    accuracy_counts,
    check_batch_size,
    check_float,
    check_int,
    make_generator,
    raise_problems,
    split_batches,
)
from ..tasks.base import IGNORE, NO_DOMAIN, Batch, Task
from ..tasks.textlm import MAX_CORPUS_BYTES, read_split_corpus
from .encoder import TOKENIZER_FILES, DenseEncoder, quiet_transformers
from .migrate import weight_file_problems

TOKENIZERS = ("auto", "model", "bytes")
BYTE_MASK_ID = 256  # the byte-level fallback's mask token, after the 256 byte values
# Characters per tokenizer call: a corpus is encoded in pieces cut at line ends.
_CHUNK_CHARS = 1 << 16


def _check_weights(model: object) -> None:
    """FuluConfigError when a safetensors file of the model folder does not read as one (corrupt, cut short),
    or holds NaN or infinite weights; transformers would fail on the first with safetensors' own error, and
    the second would fail every trial of a study. Other problems with the folder are
    :class:`~.encoder.DenseEncoder`'s to name."""
    if not isinstance(model, str | os.PathLike):
        return
    folder = Path(model).expanduser()
    if (folder / "config.json").is_file() and (problems := weight_file_problems(folder)):
        raise FuluConfigError(f"model {os.fspath(model)!r}: {'; '.join(problems)}; save the model again with "
                              "save_pretrained")


class UpcycleTask(Task):
    """MLM on a corpus with the encoder's tokenizer (``vocab_size``: the model's); metric
    ``masked_accuracy`` (higher is better)."""

    name = "upcycle"
    num_classes = 0
    domain_names = ()
    metric_name = "masked_accuracy"
    higher_is_better = True

    def __init__(self, *, model: str | None = None, path: str | None = None, tokenizer: str = "auto",
                 seq_len: int = 128, mask_rate: float = 0.15, max_bytes: int = 2_000_000, val_fraction: float = 0.1,
                 max_val_tokens: int = 32_768, data_seed: int = 0):
        problems: list[str] = []
        if path is not None and not isinstance(path, str | os.PathLike):
            problems.append(f"path must be a string or None, got {path!r}")
        if tokenizer not in TOKENIZERS:
            problems.append(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
        check_int(problems, "seq_len", seq_len, 4)
        check_float(problems, "mask_rate", mask_rate, 0.0, 1.0, low_open=True)
        check_int(problems, "max_bytes", max_bytes, 2, MAX_CORPUS_BYTES)
        check_float(problems, "val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_int(problems, "max_val_tokens", max_val_tokens, 1)
        check_int(problems, "data_seed", data_seed, 0, 2**63 - 1)
        raise_problems(problems)
        _check_weights(model)
        self.encoder = DenseEncoder(model, seed=data_seed)
        self.model_path = self.encoder.path
        self.vocab_size = self.encoder.shape.vocab_size
        self.seq_len, self.mask_rate, self.data_seed = int(seq_len), float(mask_rate), int(data_seed)
        self.tokenizer_kind = self._choose_tokenizer(tokenizer)
        self.encoder.check_length(self.seq_len)
        self._set_tokens()
        corpus = read_split_corpus(None if path is None else str(path), int(max_bytes), float(val_fraction),
                                   self.data_seed)
        # the folder resolved, and the corpus known by its content (as textlm's: a search tells data apart by it)
        self.path, self.corpus_sha256 = corpus.path, corpus.sha256
        self.train_ids_N = self._encode(corpus.train)
        self.val_ids_N = self._encode(corpus.val)[:int(max_val_tokens)]
        where = "the standard library's .py files" if self.path is None else f"path {self.path!r}"
        if self.train_ids_N.numel() < self.body_len + 1:
            raise FuluConfigError(f"seq_len={self.seq_len} is too long for {where}: only {self.train_ids_N.numel()} "
                                  "training tokens")
        if self.val_ids_N.numel() < self.body_len:
            raise FuluConfigError(f"{where} leaves {self.val_ids_N.numel()} validation tokens, fewer than one window "
                                  f"of seq_len={self.seq_len}; use more data, val_fraction or a shorter seq_len")
        self._val: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def model_sha256(self) -> str:
        """The dense checkpoint's fingerprint (:class:`~.encoder.DenseEncoder`)."""
        return self.encoder.sha256

    # -- tokens ----------------------------------------------------------------------------------

    def _choose_tokenizer(self, choice: str) -> str:
        has = bool(self.encoder.tokenizer_files)
        if choice == "model" and not has:
            raise FuluConfigError(f"tokenizer=model needs the folder's tokenizer: model {self.model_path!r} has none "
                                  f"(none of {', '.join(TOKENIZER_FILES)}); save it there with "
                                  "tokenizer.save_pretrained(PATH), or use task.tokenizer=bytes for a byte-level "
                                  "model")
        if choice == "model" or (choice == "auto" and has):
            return "model"
        if self.vocab_size <= BYTE_MASK_ID and has:  # bytes chosen over the folder's own tokenizer
            raise FuluConfigError(f"tokenizer=bytes needs a vocab_size of at least {BYTE_MASK_ID + 1} (bytes 0-255 "
                                  f"and the mask token {BYTE_MASK_ID}); model {self.model_path!r} has "
                                  f"{self.vocab_size}; its folder has a tokenizer: use task.tokenizer=model")
        if self.vocab_size <= BYTE_MASK_ID:
            raise FuluConfigError(f"tokenizer: model {self.model_path!r} has no tokenizer (none of "
                                  f"{', '.join(TOKENIZER_FILES)}) and its vocab_size ({self.vocab_size}) is too "
                                  f"small for the byte-level fallback (bytes 0-255 and the mask token "
                                  f"{BYTE_MASK_ID}); save the model's tokenizer in the folder with "
                                  "tokenizer.save_pretrained(PATH)")
        return "bytes"

    def _set_tokens(self) -> None:
        """The mask id, the special ids (never masked or drawn), the ids a random replacement draws from, and
        the ids around each window."""
        if self.tokenizer_kind == "bytes":
            self._tokenizer = None
            self.mask_id, special, n_tokens, self.prefix, self.suffix = BYTE_MASK_ID, [], 256, [], []
        else:
            tok = self._tokenizer = self.encoder.tokenizer()
            if tok.mask_token_id is None:
                raise FuluConfigError(f"tokenizer: the tokenizer of model {self.model_path!r} has no mask token; "
                                      "masked-language-model fine-tuning needs one")
            n_tokens = len(tok)
            if n_tokens > self.vocab_size:
                raise FuluConfigError(f"tokenizer: the tokenizer of model {self.model_path!r} has {n_tokens} tokens, "
                                      f"more than the model's vocab_size ({self.vocab_size})")
            self.mask_id, special = tok.mask_token_id, list(tok.all_special_ids)
            wrap = tok.cls_token_id is not None and tok.sep_token_id is not None
            self.prefix, self.suffix = ([tok.cls_token_id], [tok.sep_token_id]) if wrap else ([], [])
        self.special_ids = torch.tensor(sorted(set(special) | {self.mask_id}), dtype=torch.long)
        ordinary = torch.ones(n_tokens, dtype=torch.bool)
        ordinary[self.special_ids[self.special_ids < n_tokens]] = False
        self.ordinary_ids = ordinary.nonzero().flatten()
        self.body_len = self.seq_len - len(self.prefix) - len(self.suffix)

    def _encode(self, data: bytes) -> Tensor:
        if self._tokenizer is None:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
        text = data.decode("utf-8", errors="replace")
        pieces, start = [], 0
        while start < len(text):
            end = text.find("\n", start + _CHUNK_CHARS)
            end = len(text) if end < 0 else end + 1
            pieces.append(text[start:end])
            start = end
        with quiet_transformers():  # no warning about sequences longer than the model's: windows are cut below
            ids = self._tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
        return torch.tensor([i for piece in ids for i in piece], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        """Token ids as text (for a look at what the model sees)."""
        if self._tokenizer is None:
            return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")
        return self._tokenizer.decode(ids.tolist())

    # -- batches ---------------------------------------------------------------------------------

    def _windows(self, body_BL: Tensor) -> Tensor:
        B = body_BL.shape[0]
        around = [torch.full((B, len(ids)), ids[0], dtype=torch.long) if ids else None
                  for ids in (self.prefix, self.suffix)]
        return torch.cat([t for t in (around[0], body_BL, around[1]) if t is not None], dim=1)

    def mask(self, ids_BS: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(model input, targets) of BERT's masking of ``ids_BS`` (module doc), drawn from ``g``."""
        draw = torch.rand(ids_BS.shape, generator=g)
        eligible = ~torch.isin(ids_BS, self.special_ids)
        chosen = (draw < self.mask_rate) & eligible
        if not chosen.any() and eligible.any():
            # A batch without a target has no loss (a mean over no token: NaN, a "diverged" training): its
            # token of the lowest draw is chosen, from the same draws (the stream stays as it was).
            chosen.view(-1)[torch.where(eligible, draw, 2.0).argmin()] = True
        how = torch.rand(ids_BS.shape, generator=g)
        random_ids = self.ordinary_ids[torch.randint(self.ordinary_ids.numel(), ids_BS.shape, generator=g)]
        tokens = torch.where(chosen & (how < 0.8), self.mask_id, ids_BS)
        tokens = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, tokens)
        return tokens, torch.where(chosen, ids_BS, IGNORE)

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        g = make_generator("upcycle", "train", self.data_seed, int(seed))
        span_L = torch.arange(self.body_len)
        n_starts = self.train_ids_N.numel() - self.body_len + 1

        def stream() -> Iterator[Batch]:
            while True:
                starts_B = torch.randint(n_starts, (batch_size,), generator=g)
                tokens, targets = self.mask(self._windows(self.train_ids_N[starts_B[:, None] + span_L]), g)
                yield Batch(tokens, targets, torch.full_like(tokens, NO_DOMAIN))

        return stream()

    def val_batches(self, batch_size: int) -> list[Batch]:
        check_batch_size(batch_size)
        if self._val is None:
            n = self.val_ids_N.numel() // self.body_len
            ids = self._windows(self.val_ids_N[:n * self.body_len].reshape(n, self.body_len))
            tokens, targets = self.mask(ids, make_generator("upcycle", "val", self.data_seed))
            self._val = (tokens, targets, torch.full_like(tokens, NO_DOMAIN))
        return split_batches(*self._val, batch_size)

    def metric_counts(self, logits: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        return {"masked_accuracy": accuracy_counts(logits, batch.targets)}

    def describe(self) -> dict:
        return {**super().describe(), "model": self.model_path, "model_sha256": self.model_sha256,
                "path": self.path, "corpus_sha256": self.corpus_sha256,
                "tokenizer": self.tokenizer_kind, "mlm_head": self.encoder.head,
                "train_tokens": self.train_ids_N.numel(), "val_tokens": self.val_ids_N.numel()}
