"""The user's dense encoder: a ``save_pretrained`` folder of a BERT-family model (BERT, RoBERTa,
ELECTRA, ...), checked and loaded once with a masked-language-model head, the starting point of every
upcycling trial.

:class:`DenseEncoder` refuses, with one :class:`~fulu_nas.errors.FuluConfigError` naming the folder and
what was expected: a path that is not a folder, a folder without ``config.json`` or without safetensors
weights (nothing is unpickled), a model type without a masked-language-model class in transformers
(GPT-2, T5, ...), impossible sizes in ``config.json`` (:func:`~.migrate.config_problems`), weights of other
sizes than the configured ones or of a non-floating type (compared in the safetensors headers before a model
is allocated), weights that hold NaN or infinite values or tensors the configuration has no place for,
and an encoder whose feed-forward blocks :func:`~.migrate.migrate_from_electra` cannot upcycle (an
activation other than the exact GELU, sizes that are not multiples of 8). A folder saved without the MLM
head (``BertModel``, ``ElectraForPreTraining``) gets a new head, drawn from a fixed seed so that every
trial starts from the same weights (``head`` says which).

The folder's tokenizer is its own when it has tokenizer files (:data:`TOKENIZER_FILES`); transformers
would otherwise hand back an empty tokenizer of the model type without complaint, so the files decide.
``sha256`` fingerprints the files read (configuration, the safetensors index and every weight file,
:func:`~.migrate.weight_files`, tokenizer): a trial's architecture
records it, and an export refuses a folder that changed since the search.

transformers is imported when a folder is loaded, not with this module.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import FuluConfigError
from .migrate import (
    SAFETENSORS_INDEX,
    alignment_problems,
    config_problems,
    encoder_root,
    first_line,
    loading_problem,
    quiet_transformers,
    read_hf_config,
    saved_class,
    stored_weights_problem,
    weight_files,
)

# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone holds none).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "merges.txt", "added_tokens.json")
EXPECTED = ("a save_pretrained folder of a BERT-family encoder (BERT, RoBERTa, ELECTRA, ...): config.json and "
            "safetensors weights")


@dataclass(frozen=True)
class EncoderShape:
    """The sizes an upcycling reads from the dense model."""

    num_layers: int
    hidden_size: int
    ffn_size: int
    num_heads: int
    vocab_size: int


def _state_keys(cls: type[nn.Module], config) -> frozenset[str]:
    """The names of the tensors a ``cls`` of ``config`` saves, read from one built on the meta device (no
    memory, no initialisation)."""
    with quiet_transformers(), torch.device("meta"):
        return frozenset(cls(config).state_dict())


def _sha256(folder: Path, files: list[Path]) -> str:
    """The files' names (relative to ``folder``: a shard may lie in a subfolder) and bytes."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class DenseEncoder:
    """The encoder in ``path`` with a masked-language-model head (fp32, CPU, eval mode), and what a task
    and an upcycling need to know about it. ``seed`` draws a missing head."""

    def __init__(self, path: str | os.PathLike | None, seed: int = 0):
        if path is None or (isinstance(path, str) and not path.strip()):
            raise FuluConfigError("model not set: pass model=PATH, the save_pretrained folder of your encoder")
        if not isinstance(path, str | os.PathLike):
            raise FuluConfigError(f"model must be a folder path, got {path!r}")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FuluConfigError(f"model {os.fspath(path)!r} is not a folder; expected {EXPECTED}")
        if not (folder / "config.json").is_file():
            raise FuluConfigError(f"model {os.fspath(path)!r} has no config.json: not a save_pretrained model folder; "
                                  f"expected {EXPECTED}")
        try:
            weights = weight_files(folder)
        except ValueError as e:
            raise FuluConfigError(f"model {os.fspath(path)!r}: {e}") from None
        if not weights:
            others = sorted(p.name for p in folder.glob("*.bin"))
            raise FuluConfigError(f"model {os.fspath(path)!r} has no safetensors weights"
                                  + (f" (only {', '.join(others)}: pickles, which fulu-nas does not load)" if others
                                     else "")
                                  + "; save it with save_pretrained (safetensors is its default)")
        self.path = str(folder.resolve())
        self.shown = os.fspath(path)  # as the user gave it, for messages
        self.tokenizer_files = tuple(sorted(n for n in TOKENIZER_FILES if (folder / n).is_file()))
        extras = [folder / n for n in TOKENIZER_EXTRAS if (folder / n).is_file()] if self.tokenizer_files else []
        index = [folder / SAFETENSORS_INDEX] if (folder / SAFETENSORS_INDEX).is_file() else []
        read = [folder / "config.json", *index, *weights, *(folder / n for n in self.tokenizer_files), *extras]
        self.sha256 = _sha256(folder, read)
        # the folder as checked and hashed (transformers would take an unexpanded '~/enc' for a Hub repo id)
        self.model, self.head = self._load(folder, os.fspath(path), seed)
        self.config = self.model.config
        try:
            _, layers = encoder_root(self.model)
        except FuluConfigError as e:
            raise FuluConfigError([f"model {os.fspath(path)!r}: {p}" for p in e.problems]) from None
        dense = layers[0].intermediate.dense
        # Said here, once, rather than by every architecture of the search space failing on it.
        if problems := alignment_problems(dense.in_features, dense.out_features):
            raise FuluConfigError([f"model {os.fspath(path)!r}: {p}" for p in problems])
        self.shape = EncoderShape(num_layers=len(layers), hidden_size=dense.in_features, ffn_size=dense.out_features,
                                  num_heads=int(getattr(self.config, "num_attention_heads", 4) or 4),
                                  vocab_size=int(self.config.vocab_size))

    @staticmethod
    def _load(folder: Path, shown: str, seed: int) -> tuple[nn.Module, str]:
        """The model of ``folder`` (``shown``: the path as the user gave it, for messages) with its MLM head,
        and whether that head is the folder's or new."""
        try:
            import transformers
        except ImportError:
            raise FuluConfigError("model: loading a Hugging Face model needs transformers: "
                                  "pip install 'fulu-nas[hf]'") from None
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_MASKED_LM_MAPPING,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )

        try:
            config = read_hf_config(folder)
        except ValueError as e:
            raise FuluConfigError(f"model {shown!r}: its config.json cannot be read: {e}") from None
        if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            saved = ", ".join(config.architectures or []) or config.model_type
            raise FuluConfigError(f"model {shown!r} is a {config.model_type} model ({saved}), which "
                                  f"has no masked-language-model head in transformers; expected {EXPECTED}")
        if problems := config_problems(config):
            raise FuluConfigError([f"model {shown!r}: config.json: {p}" for p in problems])
        try:
            saved = saved_class(config)
        except ValueError as e:
            raise FuluConfigError(f"model {shown!r}: {e}") from None
        if problem := stored_weights_problem(folder, MODEL_FOR_MASKED_LM_MAPPING[type(config)], config):
            raise FuluConfigError(f"model {shown!r}: {problem}")
        try:
            saved_keys = _state_keys(saved, config)
        except Exception as e:  # transformers' own checks of a configuration raise any type
            raise FuluConfigError(f"model {shown!r}: transformers cannot build a {saved.__name__} of its "
                                  f"config.json ({first_line(e)})") from None
        with quiet_transformers():
            # The same new head for every trial, without touching the caller's random state.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                try:
                    # The sizes were compared above; should any still differ, loading_problem names them
                    # (transformers' own report is silenced).
                    model, info = transformers.AutoModelForMaskedLM.from_pretrained(
                        folder, use_safetensors=True, dtype=torch.float32, output_loading_info=True,
                        ignore_mismatched_sizes=True)
                except (OSError, ValueError, RuntimeError) as e:
                    raise FuluConfigError(f"model {shown!r} cannot be loaded: "
                                          f"{str(e).splitlines()[0]}") from None
        # A folder saved without the MLM head gets a new one (documented); the head of the class it was saved
        # from (a pooler, ELECTRA's discriminator) is not the MLM model's to use, any other tensor is wrong.
        if problem := loading_problem(model, info, new_head=True, saved_keys=saved_keys):
            raise FuluConfigError(f"model {shown!r}: {problem}")
        return model.eval(), "new" if info["missing_keys"] else "pretrained"  # a head the files lack

    def copy(self) -> nn.Module:
        """A copy of the pristine dense model (every trial starts from one)."""
        return copy.deepcopy(self.model)

    def tokenizer(self):
        """The folder's own tokenizer, or None when it has none."""
        if not self.tokenizer_files:
            return None
        from transformers import AutoTokenizer

        with quiet_transformers():
            try:
                return AutoTokenizer.from_pretrained(self.path)
            except ImportError:  # a package the tokenizer needs (sentencepiece): transformers' message says which
                raise
            except Exception as e:  # noqa: BLE001 - a file cut short (a crash as it was saved), or of another kind
                raise FuluConfigError(f"model {self.shown!r}: its tokenizer ({', '.join(self.tokenizer_files)}) "
                                      f"cannot be read: {first_line(e)}") from None

    @torch.no_grad()
    def check_length(self, seq_len: int) -> None:
        """FuluConfigError when the model cannot run on sequences of ``seq_len`` tokens (its position
        embeddings end earlier)."""
        if (error := self._run_error(seq_len)) is None:
            return
        # The longest length it runs (bisected: RoBERTa's positions start after its padding index, so
        # its max_position_embeddings is not the limit).
        runs, fails = 0, seq_len
        while fails - runs > 1:
            middle = (runs + fails) // 2
            runs, fails = (middle, fails) if self._run_error(middle) is None else (runs, middle)
        limit = getattr(self.config, "max_position_embeddings", None)
        why = (f"it runs on at most {runs} tokens" + (f" (max_position_embeddings {limit})" if limit else "")
               if runs else error)
        raise FuluConfigError(f"seq_len={seq_len} is too long for model {self.path!r}: {why}")

    def _run_error(self, seq_len: int) -> str | None:
        """Why the model fails on one sequence of ``seq_len`` tokens (None: it runs)."""
        try:
            self.model(input_ids=torch.zeros(1, seq_len, dtype=torch.long))
        except (IndexError, RuntimeError, ValueError) as e:
            return str(e).splitlines()[0]
        return None
