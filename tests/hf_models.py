"""Tiny Hugging Face encoders saved with save_pretrained, built from config classes (nothing is
downloaded): the starting points of the upcycling tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Every printable ASCII character, alone and as a word continuation: any ASCII text tokenizes.
CHARACTERS = sorted(set(string.printable) - set(string.whitespace))
VOCAB = SPECIALS + CHARACTERS + [f"##{c}" for c in CHARACTERS]


def save_tokenizer(folder: Path) -> None:
    """A WordPiece tokenizer over characters, from a vocabulary file written here."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab-source.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(vocab=str(vocab), do_lower_case=False).save_pretrained(folder)
    vocab.unlink()


def save_encoder(folder: Path, family: str = "bert", tokenizer: bool = True, seed: int = 0, **config) -> Path:
    """A tiny random BERT or ELECTRA with its MLM head in ``folder`` (and the tokenizer, unless not)."""
    from transformers import BertConfig, BertForMaskedLM, ElectraConfig, ElectraForMaskedLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=64)
    kw.update(config)
    if family == "bert":
        model = BertForMaskedLM(BertConfig(**kw))
    else:
        model = ElectraForMaskedLM(ElectraConfig(embedding_size=kw["hidden_size"], **kw))
    model.save_pretrained(folder)
    if tokenizer:
        save_tokenizer(folder)
    return folder


def save_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(folder)
    return folder


def write_corpus(folder: Path, files: int = 6, lines: int = 120) -> Path:
    """A small corpus of Python-like text files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        text = "\n".join(f"def f{i}_{j}(x, y={j}):\n    return x * {j} + y  # step {i}.{j}" for j in range(lines))
        (folder / f"part{i}.py").write_text(text + "\n")
    return folder
