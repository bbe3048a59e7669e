"""Tasks: batch contracts, determinism, planted structure, splits and metrics."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
import sysconfig

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fulu_nas.errors import FuluConfigError
from fulu_nas.tasks import IGNORE, NO_DOMAIN, TASKS, Batch, ClustersTask, PiMoEMixTask, Task, TextLMTask, build_task
from fulu_nas.tasks import pimoe_mix as pm

# A complete expression (its left side starts after a space, its result is followed by a space).
EXPR = re.compile(r" (\d+)\+(\d+)=(\d+)(?= )")
WORDS = set(pm.PRONOUNS + pm.DETERMINERS + pm.ADJECTIVES + pm.NOUNS + pm.TRANSITIVE + pm.INTRANSITIVE
            + pm.PREPOSITIONS + pm.ADVERBS + pm.CONJUNCTIONS)


def write_corpus(root, n_files: int = 8, size: int = 300) -> dict[str, bytes]:
    """Text files whose bytes are one letter each (file i: letter i), in nested folders, plus a binary file."""
    files = {}
    for i in range(n_files):
        rel = f"f{i}.txt" if i % 2 else f"sub/deeper/f{i}.txt"
        data = string.ascii_lowercase[i].encode() * size
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        files[rel] = data
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" + b"Z" * 500)
    return files


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


@pytest.fixture(params=["clusters", "pimoe_mix", "textlm"])
def small_task(request, corpus_dir) -> Task:
    params = {"clusters": dict(num_domains=4, values=8, seq_len=16, val_sequences=40),
              "pimoe_mix": dict(seq_len=40, val_sequences=40),
              "textlm": dict(path=str(corpus_dir[0]), seq_len=16)}[request.param]
    return build_task(request.param, **params)


def concat(batches: list[Batch]) -> Batch:
    return Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in ("tokens", "targets", "domains")))


def take(it, n: int) -> list[Batch]:
    return [next(it) for _ in range(n)]


def one_hot_logits(targets: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(targets.clamp(min=0), classes).float() * 10.0


# --- every task ------------------------------------------------------------------------------

def check_batch(task: Task, batch: Batch, batch_size: int | None) -> None:
    classes = task.num_classes or task.vocab_size
    for t in (batch.tokens, batch.targets, batch.domains):
        assert t.dtype == torch.int64 and t.dim() == 2 and t.shape[1] == task.seq_len
        assert t.shape == batch.tokens.shape
        if batch_size is not None:
            assert t.shape[0] == batch_size
    assert ((batch.tokens >= 0) & (batch.tokens < task.vocab_size)).all()
    assert (((batch.targets >= 0) & (batch.targets < classes)) | (batch.targets == IGNORE)).all()
    assert (((batch.domains >= 0) & (batch.domains < len(task.domain_names))) | (batch.domains == NO_DOMAIN)).all()
    assert (batch.targets != IGNORE).any()


def test_batches_shapes_dtypes_ranges(small_task):
    for batch in take(small_task.train_batches(5, seed=0), 3):
        check_batch(small_task, batch, 5)
    val = small_task.val_batches(7)
    assert len(val) >= 1
    for batch in val:
        check_batch(small_task, batch, None)
    assert all(b.tokens.shape[0] == 7 for b in val[:-1]) and 1 <= val[-1].tokens.shape[0] <= 7
    classes = small_task.num_classes or small_task.vocab_size
    counts = small_task.metric_counts(torch.randn(*val[0].tokens.shape, classes), val[0])
    assert small_task.metric_name in counts
    num, den = counts[small_task.metric_name]
    assert den > 0 and num >= 0
    desc = small_task.describe()
    assert desc["name"] == small_task.name and desc["metric"] == small_task.metric_name


def test_streams_reproducible(small_task):
    first = take(small_task.train_batches(4, seed=3), 3)
    again = take(small_task.train_batches(4, seed=3), 3)
    other = take(small_task.train_batches(4, seed=4), 3)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.domains, b.domains)
    assert not all(torch.equal(a.tokens, b.tokens) for a, b in zip(first, other, strict=True))
    # Successive batches of one stream differ.
    assert not torch.equal(first[0].tokens, first[1].tokens)


def test_val_batches_fixed(small_task):
    val = concat(small_task.val_batches(8))
    fresh_task = type(small_task)(**{k: getattr(small_task, k) for k in ("seq_len", "data_seed")},
                                  **_extra_params(small_task))
    for other in (concat(small_task.val_batches(8)), concat(small_task.val_batches(3)),
                  concat(fresh_task.val_batches(16))):
        assert torch.equal(val.tokens, other.tokens) and torch.equal(val.targets, other.targets)
        assert torch.equal(val.domains, other.domains)
    # Editing a returned batch in place does not change the validation set.
    small_task.val_batches(8)[0].tokens.zero_()
    assert torch.equal(concat(small_task.val_batches(8)).tokens, val.tokens)


def _extra_params(task: Task) -> dict:
    if isinstance(task, ClustersTask):
        return dict(num_domains=task.num_domains, values=task.values, classes=task.num_classes,
                    val_sequences=task.val_sequences)
    if isinstance(task, PiMoEMixTask):
        return dict(val_sequences=task.val_sequences)
    return dict(path=task.path)


def test_bad_batch_size(small_task):
    with pytest.raises(FuluConfigError, match="batch_size"):
        small_task.train_batches(0, seed=0)
    with pytest.raises(FuluConfigError, match="batch_size"):
        small_task.val_batches(-1)


# --- clusters ----------------------------------------------------------------------------------

@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 6), m=st.integers(2, 12), c=st.integers(2, 5), s=st.integers(2, 10), seed=st.integers(0, 1000))
@example(k=1, m=3, c=3, s=4, seed=2)  # equal counts of every value: all classes tie
def test_clusters_targets_are_planted_linear_classifiers(k, m, c, s, seed):
    task = ClustersTask(num_domains=k, values=m, classes=c, seq_len=s, val_sequences=5, data_seed=seed)
    assert task.vocab_size == k + m and task.num_classes == c
    assert task.domain_names == tuple(f"domain{i}" for i in range(k))
    assert task.weights_KCM.shape == (k, c, m)
    assert torch.allclose(task.weights_KCM.sum(-1), torch.zeros(k, c, dtype=torch.float64), atol=1e-9)
    for batch in [next(task.train_batches(6, seed)), *task.val_batches(4)]:
        check_batch(task, batch, None)
        marker = batch.tokens[:, 0]
        assert (marker < k).all() and (batch.tokens[:, 1:] >= k).all()
        assert (batch.targets[:, 0] == IGNORE).all() and (batch.domains[:, 0] == NO_DOMAIN).all()
        for row_t, row_y, row_d in zip(batch.tokens.tolist(), batch.targets.tolist(), batch.domains.tolist(),
                                       strict=True):
            dom = row_t[0]
            assert row_d[1:] == [dom] * (s - 1)
            # by hand: running scores of each class, one value at a time
            scores = [0.0] * c
            for t, v in enumerate(row_t[1:], start=1):
                scores = [scores[j] + float(task.weights_KCM[dom, j, v - k]) for j in range(c)]
                # the best class; a tie (equal counts of every value: all scores 0) goes to the lowest
                assert row_y[t] == next(j for j in range(c) if scores[j] >= max(scores) - 1e-9)


def test_clusters_targets_depend_on_the_domain_and_the_counts():
    task = ClustersTask(num_domains=2, values=3, classes=3)
    w = task.weights_KCM
    # one value seen: the class is that value's best class in the domain
    for d in range(2):
        for v in range(3):
            assert task.targets_for(torch.tensor([d]), torch.tensor([[v]])).item() == int(w[d, :, v].argmax())
    # order does not matter, only the counts
    a = task.targets_for(torch.tensor([1]), torch.tensor([[0, 2, 2, 1]]))
    b = task.targets_for(torch.tensor([1]), torch.tensor([[2, 1, 0, 2]]))
    assert a[0, -1] == b[0, -1]
    # the domains really differ: over the default task's validation set, another domain's
    # classifier would give a different class for a large share of the tokens
    task = ClustersTask()
    val = task.val_batches(512)[0]
    shifted = (val.tokens[:, 0] + 1) % task.num_domains
    other = torch.cat([torch.full_like(val.targets[:, :1], IGNORE),
                       task.targets_for(shifted, val.tokens[:, 1:] - task.num_domains)], dim=1)
    mask = val.targets != IGNORE
    assert (other[mask] != val.targets[mask]).float().mean() > 0.5


def test_clusters_metric_and_data_seed():
    task = ClustersTask(num_domains=3, values=5, classes=4, seq_len=12, val_sequences=30)
    num = den = 0.0
    wrong_num = 0.0
    for batch in task.val_batches(8):
        n, d = task.metric_counts(one_hot_logits(batch.targets, 4), batch)["accuracy"]
        num, den = num + n, den + d
        wrong = torch.where(batch.targets == IGNORE, batch.targets, (batch.targets + 1) % 4)
        wrong_num += task.metric_counts(one_hot_logits(wrong, 4), batch)["accuracy"][0]
    assert den == 30 * 11 and num == den and wrong_num == 0
    # The planted functions depend on data_seed (and only on it).
    assert torch.equal(task.weights_KCM, ClustersTask(num_domains=3, values=5, classes=4).weights_KCM)
    assert not torch.equal(ClustersTask(data_seed=1).weights_KCM, ClustersTask(data_seed=2).weights_KCM)


# --- pimoe_mix ---------------------------------------------------------------------------------

def texts(task: PiMoEMixTask, batch: Batch) -> list[str]:
    """The S + 1 characters of each window: tokens then the last target."""
    return [task.decode(t) + task.decode([y[-1]]) for t, y in zip(batch.tokens.tolist(), batch.targets.tolist(),
                                                                   strict=True)]


def test_pimoe_text_arithmetic_and_domains():
    task = PiMoEMixTask(seq_len=64, val_sequences=64)
    assert task.vocab_size == len(set(pm.CHARS)) and task.domain_names == ("text", "computation")
    n_expr = 0
    for batch in [*take(task.train_batches(32, seed=0), 4), *task.val_batches(32)]:
        assert torch.equal(batch.tokens[:, 1:], batch.targets[:, :-1])  # targets are the next characters
        for text, doms in zip(texts(task, batch), batch.domains.tolist(), strict=True):
            for m in EXPR.finditer(text):
                a, b, c = m.groups()
                assert int(a) + int(b) == int(c) and max(int(a), int(b)) <= task.max_operand
                assert all(str(int(x)) == x for x in (a, b, c))  # no leading zeros
                n_expr += 1
            assert doms == [1 if ch in "0123456789+=" else 0 for ch in text[:-1]]
            # Whole words (not cut by the window edges) come from the built-in word list.
            words = re.split(r"[ .,]+", re.sub(r"[0-9+=]+", " ", text))[1:-1]
            assert all(w in WORDS for w in words if w)
    assert n_expr > 100


def test_pimoe_split_by_problem():
    task = PiMoEMixTask(seq_len=48, max_operand=20, val_sequences=200, val_fraction=0.1)
    left = re.compile(r" (\d+)\+(\d+)=")  # operands fully visible
    seen_train, seen_val = set(), set()
    for batch in take(task.train_batches(64, seed=1), 40):
        for text in texts(task, batch):
            seen_train.update((int(a), int(b)) for a, b in left.findall(text))
    for batch in task.val_batches(50):
        for text in texts(task, batch):
            seen_val.update((int(a), int(b)) for a, b in left.findall(text))
    # a problem is an unordered pair: a+b and b+a have the same sum, and a held-out b+a whose a+b trains
    # is scored by recalling it (with ordered pairs, 876 of the 1,000 default held-out pairs were so)
    problems = 21 * 22 // 2
    held_out = {(a, b) for a in range(21) for b in range(a, 21) if task.is_validation_pair(a, b)}
    assert len(held_out) == round(0.1 * problems)
    assert all(task.is_validation_pair(a, b) == task.is_validation_pair(b, a) for a in range(21) for b in range(21))
    n_val = int(task.is_val_P.sum())
    assert n_val == sum(2 - (a == b) for a, b in held_out)
    assert seen_train.isdisjoint(seen_val) and len(seen_val) > 20
    assert seen_train.isdisjoint({(b, a) for a, b in seen_val})
    assert len(seen_train) > 0.9 * (21**2 - n_val)  # training covers (almost) all its pairs, none of validation
    assert all(task.is_validation_pair(*p) for p in seen_val)
    assert not any(task.is_validation_pair(*p) for p in seen_train)
    other = PiMoEMixTask(seq_len=48, max_operand=20, val_fraction=0.1, data_seed=1)
    assert not torch.equal(task.is_val_P, other.is_val_P)


def handmade_batch(task: PiMoEMixTask, text: str) -> Batch:
    ids = torch.tensor([task.encode(text)])
    return Batch(ids[:, :-1], ids[:, 1:], torch.zeros_like(ids[:, :-1]))


def test_pimoe_exact_match_handmade():
    task = PiMoEMixTask(seq_len=16)
    # Counted: "12+34=46" and "5+6=11". Not counted: "2+3=5" (left side cut), "7+8=15" (no space after it).
    text = "2+3=5 the cat sat. 12+34=46 we ran. 5+6=11 a 7+8=15"
    batch = handmade_batch(task, text)
    perfect = one_hot_logits(batch.targets, task.vocab_size)
    assert task.metric_counts(perfect, batch)["exact_match"] == (2.0, 2.0)
    assert task.metric_counts(perfect, batch)["char_accuracy"] == (len(text) - 1, len(text) - 1)

    def counts_with_wrong(at_char: int) -> tuple[float, float]:
        """exact_match when the prediction of character ``text[at_char]`` is wrong."""
        logits = perfect.clone()
        logits[0, at_char - 1] = 0.0
        logits[0, at_char - 1, task.encode("+")[0]] = 10.0
        return task.metric_counts(logits, batch)["exact_match"]

    assert counts_with_wrong(text.index("46") + 1) == (1.0, 2.0)  # a result digit
    assert counts_with_wrong(text.index("46") + 2) == (1.0, 2.0)  # the space after the result
    assert counts_with_wrong(text.index("11")) == (1.0, 2.0)
    assert counts_with_wrong(text.index("34")) == (2.0, 2.0)  # operands are not scored
    assert counts_with_wrong(text.index("15")) == (2.0, 2.0)  # an uncounted expression
    assert counts_with_wrong(text.index("=5") + 1) == (2.0, 2.0)
    # Cut at the end of the window: result digits present but not the space after them.
    assert task.metric_counts(*_perfect(task, "the dog. 12+34=46"))["exact_match"] == (0.0, 0.0)
    assert task.metric_counts(*_perfect(task, "the dog. 12+34=4"))["exact_match"] == (0.0, 0.0)
    assert task.metric_counts(*_perfect(task, "the dog. 12+34=46 "))["exact_match"] == (1.0, 1.0)


def _perfect(task: PiMoEMixTask, text: str) -> tuple[torch.Tensor, Batch]:
    batch = handmade_batch(task, text)
    return one_hot_logits(batch.targets, task.vocab_size), batch


def test_pimoe_exact_match_generated():
    task = PiMoEMixTask(val_sequences=128)
    exact = complete = 0.0
    for batch in task.val_batches(32):
        counts = task.metric_counts(one_hot_logits(batch.targets, task.vocab_size), batch)
        exact, complete = exact + counts["exact_match"][0], complete + counts["exact_match"][1]
        assert counts["char_accuracy"][0] == counts["char_accuracy"][1] == batch.targets.numel()
    independent = sum(len(EXPR.findall(t)) for b in task.val_batches(32) for t in texts(task, b))
    assert exact == complete == independent > 50
    # One wrong result digit in one expression costs exactly one exact match.
    batch = task.val_batches(32)[0]
    row, span = next((r, s) for r in range(32) for s in task.result_spans(batch.tokens[r].tolist(),
                                                                          batch.targets[r].tolist()))
    assert task.decode([batch.tokens[row, span[0]].item()]) == "="
    assert task.decode(batch.targets[row, span].tolist())[:-1].isdigit()
    assert task.decode([batch.targets[row, span[-1]].item()]) == " "
    logits = one_hot_logits(batch.targets, task.vocab_size)
    base = task.metric_counts(logits, batch)["exact_match"]
    logits[row, span[0]] = one_hot_logits((batch.targets[row, span[0]] + 1) % task.vocab_size, task.vocab_size)
    assert task.metric_counts(logits, batch)["exact_match"] == (base[0] - 1, base[1])


# --- textlm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [dict(seq_len=10, val_sequences=4), dict(seq_len=12, val_sequences=2,
                                                                          expression_rate=0.01)])
def test_pimoe_a_validation_set_without_a_complete_expression_is_refused(params):
    """exact_match would be 0 / 0: a measurement of nothing, which read as the worst score."""
    with pytest.raises(FuluConfigError) as err:
        PiMoEMixTask(**params)
    [problem] = err.value.problems
    assert problem.startswith("val_sequences too few: the validation set (") and "no complete expression" in problem
    assert f"seq_len={params['seq_len']}" in problem and f"{params['val_sequences']} windows" in problem
    assert PiMoEMixTask(seq_len=10, val_sequences=64).val_batches(64)  # more windows hold some


def bits_per_byte(task: TextLMTask, logits_fn) -> float:
    num = den = 0.0
    for batch in task.val_batches(64):
        n, d = task.metric_counts(logits_fn(batch), batch)["bits_per_byte"]
        num, den = num + n, den + d
    return num / den


def test_textlm_default_stdlib_corpus():
    task = TextLMTask()
    assert task.vocab_size == 256 and task.num_classes == 0 and task.domain_names == ()
    assert task.train_files and task.val_files and set(task.train_files).isdisjoint(task.val_files)
    assert all(f.endswith(".py") and "site-packages" not in f for f in task.train_files + task.val_files)
    assert task.train_bytes_N.numel() + task.val_bytes_N.numel() > 100_000
    n_val = sum((b.targets != IGNORE).sum().item() for b in task.val_batches(64))
    assert n_val == min(task.max_val_tokens, task.val_bytes_N.numel() - 1)
    assert bits_per_byte(task, lambda b: torch.zeros(*b.tokens.shape, 256)) == pytest.approx(8.0, abs=1e-5)
    assert bits_per_byte(task, lambda b: one_hot_logits(b.targets, 256) * 5) < 1e-3
    batch = next(task.train_batches(4, seed=0))
    assert (batch.domains == NO_DOMAIN).all() and torch.equal(batch.tokens[:, 1:], batch.targets[:, :-1])


def test_textlm_folder_split_by_file(corpus_dir):
    root, files = corpus_dir
    task = TextLMTask(path=str(root), seq_len=16, val_fraction=0.3)
    assert sorted(task.train_files + task.val_files) == sorted(files)  # blob.bin skipped
    assert task.train_files and task.val_files and set(task.train_files).isdisjoint(task.val_files)
    hashed = {rel: int.from_bytes(hashlib.sha256(f"0:{rel}".encode()).digest()[:8], "little") / 2**64
              for rel in files}
    if 0 < sum(h < 0.3 for h in hashed.values()) < len(files):  # no fix-up needed: the rule applies as is
        assert set(task.val_files) == {rel for rel, h in hashed.items() if h < 0.3}
    letters = lambda rels: {files[r][0] for r in rels} | {ord("\n")}  # noqa: E731
    train_letters, val_letters = letters(task.train_files), letters(task.val_files)
    for batch in take(task.train_batches(16, seed=0), 5):
        assert set(batch.tokens.flatten().tolist()) <= train_letters
    val = concat(task.val_batches(4))
    assert set(val.tokens.flatten().tolist()) <= val_letters
    assert set(val.targets.flatten().tolist()) <= val_letters | {IGNORE}
    # Consecutive windows cover the validation bytes once, in order.
    val_bytes = b"\n".join(files[r] for r in task.val_files)
    assert bytes(t for t in val.targets.flatten().tolist() if t != IGNORE) == val_bytes[1:]
    assert val.tokens[0, 0].item() == val_bytes[0]
    # A different data_seed gives a different split.
    splits = {tuple(TextLMTask(path=str(root), seq_len=16, val_fraction=0.3, data_seed=s).val_files)
              for s in range(6)}
    assert len(splits) > 1


def test_textlm_fixups_and_caps(tmp_path):
    files = write_corpus(tmp_path, n_files=3, size=100)
    # val_fraction tiny: one file still goes to validation; huge: one still trains.
    for vf in (1e-9, 1 - 1e-9):
        task = TextLMTask(path=str(tmp_path), seq_len=8, val_fraction=vf)
        assert len(task.train_files) >= 1 and len(task.val_files) >= 1
        assert sorted(task.train_files + task.val_files) == sorted(files)
    # max_bytes caps what is read, files in sorted path order; max_val_tokens caps validation.
    task = TextLMTask(path=str(tmp_path), seq_len=8, max_bytes=150, max_val_tokens=20)
    assert sorted(task.train_files + task.val_files) == ["f1.txt", "sub/deeper/f0.txt"]
    assert task.train_bytes_N.numel() + task.val_bytes_N.numel() <= 150 + 1
    assert sum((b.targets != IGNORE).sum().item() for b in task.val_batches(2)) == 20


def test_textlm_single_file(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes(b"a" * 800 + b"b" * 200)
    task = TextLMTask(path=str(path), seq_len=32, val_fraction=0.2)
    assert task.train_files == task.val_files == ["one.txt"]
    for batch in take(task.train_batches(8, seed=0), 5):
        assert set(batch.tokens.flatten().tolist()) | set(batch.targets.flatten().tolist()) == {ord("a")}
    val = concat(task.val_batches(8))
    assert bytes(t for t in val.targets.flatten().tolist() if t != IGNORE) == b"b" * 199
    # No padding: the routing statistics count every validation token, and a padding token is no byte of the
    # text (token 0 had been routed and counted). The last window starts early; the targets it shares with
    # the window before are read as context, not scored twice.
    assert set(val.tokens.flatten().tolist()) == {ord("b")}
    assert (val.targets[:-1] != IGNORE).all() and (val.targets[-1] != IGNORE).sum() == 199 - 32 * 6


def test_textlm_validation_shorter_than_a_window_is_one_shorter_window(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes(b"a" * 800 + b"bc" * 10)
    task = TextLMTask(path=str(path), seq_len=64, val_fraction=0.02)
    text = bytes(task.val_bytes_N.tolist())
    assert 2 < len(text) < 64 and text.endswith(b"bcbc")
    (val,) = task.val_batches(8)
    assert val.tokens.shape == (1, len(text) - 1)
    assert bytes(val.tokens[0].tolist()) == text[:-1] and bytes(val.targets[0].tolist()) == text[1:]


def test_textlm_bad_paths(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FuluConfigError, match="does not exist") as err:
        TextLMTask(path=str(missing))
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "x.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "empty.txt").write_bytes(b"")
    for bad in (empty, binary, tmp_path / "empty.txt"):
        with pytest.raises(FuluConfigError, match="no usable bytes") as err:
            TextLMTask(path=str(bad))
        assert str(bad) in str(err.value)
    (tmp_path / "short.txt").write_bytes(b"hello world")
    with pytest.raises(FuluConfigError, match="seq_len"):
        TextLMTask(path=str(tmp_path / "short.txt"), seq_len=64)


@pytest.mark.parametrize("path", ["", "  "])
def test_textlm_empty_path_is_refused_not_read_as_the_working_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("what happens to be in the folder a search runs in\n" * 50)
    with pytest.raises(FuluConfigError, match="path: expected a file or folder, or None for the standard library"):
        TextLMTask(path=path, seq_len=16)


def test_textlm_path_of_an_unknown_users_home_is_refused_naming_it():
    with pytest.raises(FuluConfigError, match=r"path '~no-such-user-fulu/corpus': its home folder is unknown"):
        TextLMTask(path="~no-such-user-fulu/corpus")



def test_textlm_corpus_sha256_is_the_bytes_and_names_read_and_the_split(tmp_path):
    """The corpus is known by its content: the same files in another folder are the same corpus; other
    bytes, another name, another split or a cut elsewhere are another."""
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        write_corpus(root, n_files=4)
    digest = TextLMTask(path=str(a), seq_len=16).corpus_sha256
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert TextLMTask(path=str(b), seq_len=16).corpus_sha256 == digest
    others = {TextLMTask(path=str(a), seq_len=16, val_fraction=0.3).corpus_sha256,
              TextLMTask(path=str(a), seq_len=16, data_seed=1).corpus_sha256,
              TextLMTask(path=str(a), seq_len=16, max_bytes=500).corpus_sha256}
    (b / "f1.txt").write_bytes(b"z" * 300)  # the same size, other bytes
    others.add(TextLMTask(path=str(b), seq_len=16).corpus_sha256)
    (b / "f1.txt").rename(b / "g1.txt")
    others.add(TextLMTask(path=str(b), seq_len=16).corpus_sha256)
    assert len(others) == 5 and digest not in others


def test_textlm_relative_and_home_paths_are_resolved(tmp_path, monkeypatch):
    """A path as typed would name another folder for a command run elsewhere (confirm, export, a worker)."""
    (tmp_path / "corpus").mkdir()
    write_corpus(tmp_path / "corpus", n_files=4)
    absolute = str((tmp_path / "corpus").resolve())
    monkeypatch.chdir(tmp_path)
    assert TextLMTask(path="corpus", seq_len=16).path == absolute
    monkeypatch.setenv("HOME", str(tmp_path))
    assert TextLMTask(path="~/corpus/../corpus", seq_len=16).path == absolute


def test_textlm_reads_a_file_whose_name_is_not_utf8(tmp_path):
    """A Latin-1 file name (older archives, copies from other systems): split by its name's bytes."""
    (tmp_path / "a.txt").write_bytes(b"a" * 3000)
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt"), "wb") as f:
        f.write(b"b" * 3000)
    task = TextLMTask(path=str(tmp_path), seq_len=16, val_fraction=0.5)
    names = task.train_files + task.val_files
    assert sorted(names) == ["a.txt", "caf\udce9.txt"]
    assert json.loads(json.dumps(names)) == names
    unit = int.from_bytes(hashlib.sha256(b"0:caf\xe9.txt").digest()[:8], "little") / 2**64
    a_unit = int.from_bytes(hashlib.sha256(b"0:a.txt").digest()[:8], "little") / 2**64
    if (unit < 0.5) != (a_unit < 0.5):  # no fix-up needed: the rule applies as is
        assert ("caf\udce9.txt" in task.val_files) == (unit < 0.5)


def test_textlm_standard_library_without_py_files_is_refused_naming_it(tmp_path, monkeypatch):
    """A Python installed without its sources (byte-code only, a zipped standard library)."""
    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {**paths, "stdlib": str(tmp_path)})
    with pytest.raises(FuluConfigError, match=re.escape(
            f"path None reads the standard library's .py files, and {str(tmp_path)!r} has none")):
        TextLMTask(seq_len=16)

# --- build_task --------------------------------------------------------------------------------

def test_build_task_registry_and_errors():
    # upcycle is registered by fulu_nas.interop (it reads a Hugging Face model: tests/test_upcycle_task.py),
    # which this file alone would not have imported
    import fulu_nas.interop  # noqa: F401

    assert set(TASKS) == {"clusters", "pimoe_mix", "textlm", "upcycle"}
    task = build_task("clusters", num_domains=2, values=4, seq_len=8)
    assert isinstance(task, ClustersTask) and task.vocab_size == 6 and task.name == "clusters"
    assert isinstance(build_task("pimoe_mix"), PiMoEMixTask)
    with pytest.raises(FuluConfigError, match="unknown task 'nope'.*clusters, pimoe_mix, textlm, upcycle"):
        build_task("nope")
    with pytest.raises(FuluConfigError, match="no parameter 'num_experts'"):
        build_task("clusters", num_experts=4)
    with pytest.raises(FuluConfigError) as err:
        build_task("clusters", seq_len=1, values="many")
    assert "seq_len" in str(err.value) and "values" in str(err.value) and len(err.value.problems) == 2
    bad = [("clusters", {"num_domains": 0}, "num_domains"), ("clusters", {"seq_len": True}, "seq_len"),
           ("clusters", {"classes": 1}, "classes"),
           ("pimoe_mix", {"expression_rate": 0.0}, "expression_rate"),
           ("pimoe_mix", {"val_fraction": 1.0}, "val_fraction"), ("pimoe_mix", {"max_operand": 0}, "max_operand"),
           ("pimoe_mix", {"seq_len": 9}, "seq_len"), ("textlm", {"max_val_tokens": 0}, "max_val_tokens"),
           ("textlm", {"val_fraction": -0.5}, "val_fraction"), ("textlm", {"path": 3}, "path")]
    for name, params, needle in bad:
        with pytest.raises(FuluConfigError, match=needle):
            build_task(name, **params)
    assert math.isclose(PiMoEMixTask(seq_len=10).seq_len, 10)  # the shortest window holding " 99+99=198 "
