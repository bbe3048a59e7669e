"""``pimoe_mix``: character-level LM over text interleaved with arithmetic (the PiMoE setting).

A stream is a sequence of *segments* joined by single spaces; each segment is, independently,
an expression ``a+b=c`` with probability ``expression_rate`` and otherwise a sentence from a
small grammar over ~150 common words ending with ``'.'``. So ``expression_rate`` is the fraction
of segments, not of characters (sentences are ~4x longer than expressions). A window starts at
a random offset inside the first segment: ``tokens = c[0:S]``, ``targets = c[1:S+1]``.
Domains are those of the *input* characters: 1 ("computation") for every character of an
expression, 0 ("text") for everything else, separating spaces included.

Split by problem: a fixed random ``val_fraction`` of all problems, unordered operand pairs
``{a, b}`` (drawn from ``data_seed``), appears only in validation, as ``a+b`` and ``b+a`` alike,
the rest only in training; the sentences are not split.

``exact_match`` (teacher-forced) counts the *complete* expressions of a window: those whose
whole left side is visible (the space before ``a`` lies in the window) and whose result digits
and following space are all among the targets. Such an expression is exact iff argmax is right
at each target position where the target is a result digit or that space. Positions are
recomputed from the characters (``c = tokens[0] + targets``): see :meth:`result_spans`. A
validation set without a complete expression (too few or too short windows) is refused: its
exact match would be 0 / 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import Tensor

from fulu_nas.errors import FuluConfigError
from fulu_nas.tasks._common import (
    MAX_SEQ_LEN,
    TorchRandom,
    accuracy_counts,
    check_batch_size,
    check_elements,
    check_float,
    check_int,
    make_generator,
    raise_problems,
    split_batches,
)
from fulu_nas.tasks.base import Batch, Task

CHARS = " abcdefghijklmnopqrstuvwxyz.,0123456789+="
CHAR_ID = {c: i for i, c in enumerate(CHARS)}
TEXT, COMPUTATION = 0, 1
MAX_OPERAND_LIMIT = 999  # (max_operand + 1) ** 2 pairs are enumerated for the split

PRONOUNS = ("i", "you", "he", "she", "we", "they")
DETERMINERS = ("the", "a", "this", "that", "my", "our", "your", "her", "his", "every", "one")
ADJECTIVES = ("big", "small", "old", "new", "red", "green", "blue", "happy", "quiet", "long", "short", "warm",
              "cold", "little", "good", "bad", "dark", "bright", "young", "quick", "slow", "soft", "hard", "kind",
              "busy")
NOUNS = ("cat", "dog", "man", "woman", "child", "bird", "house", "car", "tree", "book", "ball", "friend", "teacher",
         "river", "road", "city", "garden", "table", "window", "door", "box", "boat", "horse", "apple", "letter",
         "school", "market", "hill", "farmer", "king", "girl", "boy", "fish", "song", "cup", "chair", "mountain",
         "village", "train", "bridge", "shop", "lamp", "coat", "field", "sun")
TRANSITIVE = ("saw", "found", "took", "made", "liked", "wanted", "kept", "moved", "opened", "closed", "painted",
              "carried", "watched", "heard", "followed", "helped", "built", "bought", "sold", "cleaned", "visited",
              "called", "left", "met", "read", "wrote", "held", "lost", "missed", "pulled")
INTRANSITIVE = ("sat", "ran", "walked", "slept", "waited", "laughed", "stayed", "smiled", "jumped", "sang",
                "played", "worked")
PREPOSITIONS = ("on", "in", "near", "under", "over", "behind", "by", "with", "to", "from", "at", "across")
ADVERBS = ("today", "again", "slowly", "quickly", "later", "now", "often", "once", "there", "here", "together",
           "home")
CONJUNCTIONS = ("and", "but", "so", "then", "because", "while")

# A complete expression: a space, then a+b=c, then (looked ahead, not consumed) the next space.
_COMPLETE_EXPR = re.compile(r" \d+\+\d+=(\d+)(?= )")


def _noun_phrase(rng: TorchRandom) -> str:
    adjective = rng.choice(ADJECTIVES) + " " if rng.random() < 0.4 else ""
    return f"{rng.choice(DETERMINERS)} {adjective}{rng.choice(NOUNS)}"


def _clause(rng: TorchRandom) -> str:
    words = [rng.choice(PRONOUNS) if rng.random() < 0.3 else _noun_phrase(rng)]
    if rng.random() < 0.6:
        words += [rng.choice(TRANSITIVE), _noun_phrase(rng)]
    else:
        words.append(rng.choice(INTRANSITIVE))
    if rng.random() < 0.4:
        words += [rng.choice(PREPOSITIONS), _noun_phrase(rng)]
    if rng.random() < 0.25:
        words.append(rng.choice(ADVERBS))
    return " ".join(words)


def sentence(rng: TorchRandom) -> str:
    """One sentence of the built-in grammar, e.g. ``"the old cat saw a dog on the hill, and we ran."``"""
    text = _clause(rng)
    if rng.random() < 0.3:
        text += f", {rng.choice(CONJUNCTIONS)} {_clause(rng)}"
    return text + "."


class PiMoEMixTask(Task):
    """Text + arithmetic character LM; ``num_classes = 0``, metric ``exact_match`` (+ ``char_accuracy``)."""

    name = "pimoe_mix"
    vocab_size = len(CHARS)
    num_classes = 0
    domain_names = ("text", "computation")
    metric_name = "exact_match"
    higher_is_better = True

    def __init__(self, *, seq_len: int = 64, max_operand: int = 99, expression_rate: float = 0.5,
                 val_sequences: int = 256, val_fraction: float = 0.1, data_seed: int = 0):
        problems: list[str] = []
        check_int(problems, "max_operand", max_operand, 1, MAX_OPERAND_LIMIT)
        # The longest expression with its two surrounding spaces must fit in tokens + last target.
        min_len = len(f" {max_operand}+{max_operand}={2 * max_operand} ") - 1 if not problems else 2
        check_int(problems, "seq_len", seq_len, min_len, MAX_SEQ_LEN)
        check_float(problems, "expression_rate", expression_rate, 0.0, 1.0, low_open=True)
        check_int(problems, "val_sequences", val_sequences, 1)
        check_float(problems, "val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_int(problems, "data_seed", data_seed, -(2**63))
        raise_problems(problems)
        check_elements(problems, "val_sequences", "characters of the validation set",
                       {"val_sequences": val_sequences, "(seq_len + 1)": seq_len + 1})
        raise_problems(problems)
        self.seq_len, self.max_operand = int(seq_len), int(max_operand)
        self.expression_rate, self.val_fraction = float(expression_rate), float(val_fraction)
        self.val_sequences, self.data_seed = int(val_sequences), int(data_seed)
        n = self.max_operand + 1
        # A problem is an unordered pair: a+b and b+a have the same sum, so a held-out b+a whose a+b
        # trains would be scored by recalling it. Problems {a, b}, a <= b, are split.
        a_U, b_U = torch.triu_indices(n, n)
        n_problems = a_U.numel()
        n_val = min(max(round(self.val_fraction * n_problems), 1), n_problems - 1)
        val_U = torch.randperm(n_problems, generator=make_generator("pimoe_mix", "problems", self.data_seed))[:n_val]
        # is_val_P[a * (max_operand + 1) + b] says whether the pair (a, b) belongs to validation.
        self.is_val_P = torch.zeros(n * n, dtype=torch.bool)
        self.is_val_P[a_U[val_U] * n + b_U[val_U]] = True
        self.is_val_P[b_U[val_U] * n + a_U[val_U]] = True
        self._train_pairs = torch.nonzero(~self.is_val_P).flatten().tolist()
        self._val_pairs = torch.nonzero(self.is_val_P).flatten().tolist()
        self._val: tuple[Tensor, Tensor, Tensor] | None = None
        # exact_match divides by the validation set's complete expressions: with none it measures nothing
        if not any(self.result_spans(tokens_S, targets_S) for batch in self.val_batches(self.val_sequences)
                   for tokens_S, targets_S in zip(batch.tokens.tolist(), batch.targets.tolist(), strict=True)):
            raise FuluConfigError(f"val_sequences too few: the validation set ({self.val_sequences} windows of "
                                  f"seq_len={self.seq_len} characters, expression_rate={self.expression_rate}) holds "
                                  "no complete expression to score exact_match on; use more val_sequences, a longer "
                                  "seq_len or a higher expression_rate")

    # --- characters -------------------------------------------------------------------------
    @staticmethod
    def encode(text: str) -> list[int]:
        return [CHAR_ID[c] for c in text]

    @staticmethod
    def decode(ids) -> str:
        """Ids to characters; ids outside the vocabulary (e.g. ``IGNORE``) become ``'?'``."""
        return "".join(CHARS[i] if 0 <= i < len(CHARS) else "?" for i in ids)

    def is_validation_pair(self, a: int, b: int) -> bool:
        return bool(self.is_val_P[a * (self.max_operand + 1) + b])

    # --- generation -------------------------------------------------------------------------
    def _window(self, rng: TorchRandom, pairs: list[int]) -> tuple[list[int], list[int]]:
        """S + 1 character ids and their domains, cut from a fresh segment stream."""
        chars: list[str] = []
        domains: list[int] = []
        offset = -1
        while offset < 0 or len(chars) < offset + self.seq_len + 1:
            if chars:
                chars.append(" ")
                domains.append(TEXT)
            if rng.random() < self.expression_rate:
                a, b = divmod(rng.choice(pairs), self.max_operand + 1)
                segment, domain = f"{a}+{b}={a + b}", COMPUTATION
            else:
                segment, domain = sentence(rng), TEXT
            if offset < 0:
                offset = rng.randbelow(len(segment) + 1)
            chars.extend(segment)
            domains.extend([domain] * len(segment))
        end = offset + self.seq_len + 1
        return self.encode("".join(chars[offset:end])), domains[offset:end]

    def _sample(self, n: int, rng: TorchRandom, pairs: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        ids, domains = zip(*(self._window(rng, pairs) for _ in range(n)), strict=True)
        ids_NS1 = torch.tensor(ids, dtype=torch.int64)
        domains_NS = torch.tensor(domains, dtype=torch.int64)[:, :-1].contiguous()
        return ids_NS1[:, :-1].contiguous(), ids_NS1[:, 1:].contiguous(), domains_NS

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        rng = TorchRandom(make_generator("pimoe_mix", "train", self.data_seed, int(seed)))

        def stream() -> Iterator[Batch]:
            while True:
                yield Batch(*self._sample(batch_size, rng, self._train_pairs))

        return stream()

    def val_batches(self, batch_size: int) -> list[Batch]:
        check_batch_size(batch_size)
        if self._val is None:
            rng = TorchRandom(make_generator("pimoe_mix", "val", self.data_seed))
            self._val = self._sample(self.val_sequences, rng, self._val_pairs)
        return split_batches(*self._val, batch_size)

    # --- metrics ----------------------------------------------------------------------------
    def result_spans(self, tokens_S: list[int], targets_S: list[int]) -> list[list[int]]:
        """For each complete expression of one sequence, the target indices to check: its result
        digits and the space after them (see the module docstring for "complete")."""
        text = self.decode([tokens_S[0], *targets_S])  # text[p + 1] == targets[p]
        return [list(range(m.start(1) - 1, m.end(1))) for m in _COMPLETE_EXPR.finditer(text)]

    def metric_counts(self, logits: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        correct_BS = (logits.argmax(dim=-1).cpu() == batch.targets.cpu()).tolist()
        exact = complete = 0
        for tokens_S, targets_S, correct_S in zip(batch.tokens.tolist(), batch.targets.tolist(), correct_BS,
                                                  strict=True):
            for span in self.result_spans(tokens_S, targets_S):
                complete += 1
                exact += all(correct_S[i] for i in span)
        return {"exact_match": (float(exact), float(complete)),
                "char_accuracy": accuracy_counts(logits, batch.targets)}
