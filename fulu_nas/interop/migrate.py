"""Sparse upcycling of Hugging Face ELECTRA / BERT-family encoders into PiMoE models.

:func:`migrate_from_electra` replaces each selected encoder layer's feed-forward block
(``intermediate.dense`` -> GELU -> ``output.dense``) with a :class:`~fulu_nas.moe.PiMoELayer`
whose experts all start as copies of that FFN (Komatsuzaki et al. 2022, "Sparse Upcycling").
The dropout, residual and LayerNorm of ``output`` stay. While every expert is the same FFN, a
token's output is the FFN's output times the sum of its routing weights; routers whose weights
sum to one therefore leave the model's outputs unchanged:

=================  ================================================================================
router             right after migration
=================  ================================================================================
``topk``           exact: softmax top-k, renormalised
``hierarchical``   exact: group-limited top-k, renormalised
``attention``      exact: attention scores, top-k, renormalised
``hash``           exact: k distinct experts, weight 1/k each
``expert_choice``  not exact: each expert takes its top-C tokens, so a token may get no expert (its
                   FFN output is lost) or several, with unnormalised weights. Refused unless
                   ``require_exact=False``; then migrated with a warning and ``exact=False``.
=================  ================================================================================

Overrides that break the guarantee (``renormalize=False``, ``routed_scaling_factor != 1``, a
``capacity_factor``, added shared experts) are refused the same way; see :func:`equivalence_problems`.

A shared expert stays exact when it is cut out of the FFN rather than added to it
(``shared_fraction``): the FFN's hidden units are split, the first ones become one always-on shared
expert (with the output bias), and every routed expert starts as a copy of the others. The sum of the
two parts is the FFN, so the guarantee above holds with the routed experts narrower
(DeepSeekMoE's shared expert, at the dense model's size).

transformers is needed only to load a ``save_pretrained`` directory; it is imported lazily.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import operator
import os
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import first_few, nonfinite_tensors
from ..errors import FuluConfigError
from ..moe import MoEConfig, PiMoELayer
from ..moe.config import ALIGNMENT
from ..moe.routers import ScoreRouter
from ..moe.stats import detached_stats
from ..system import RoutingStrategy, enum_member, flag_problems

__all__ = [
    "MigrationInfo", "PiMoEOutput", "TaskModel", "balance_loss", "encoder_root", "equivalence_problems",
    "migrate_from_electra", "moe_outputs", "pimoe_layers", "routing_stats", "shared_units", "update_expert_biases",
    "upcycled_moe_config",
]

EXPECTED = ("a Hugging Face ELECTRA/BERT-family encoder (ElectraModel, BertModel, RobertaModel, ... or a model "
            "with a head around one, or a save_pretrained directory of one) whose encoder.layer[i] has "
            "intermediate.dense (Linear hidden->ffn), an exact GELU, and output.dense (Linear ffn->hidden), "
            "output.dropout and output.LayerNorm")

# MoEConfig fields fixed by the dense FFN being upcycled.
_FROM_MODEL = ("hidden_size", "expert_ffn_size", "activation", "expert_bias")

# Defaults of the balancing losses during fine-tuning (neither changes the forward output).
AUX_LOSS_COEF = 0.01  # Switch Transformer's load-balancing loss
Z_LOSS_COEF = 1e-3  # ST-MoE router z-loss (advanced routing)
BIAS_UPDATE_RATE = 1e-3  # DeepSeek-V3 auxiliary-loss-free bias (advanced routing)


@contextmanager
def quiet_transformers():
    """transformers' loading report and progress bars off (our own messages say what matters)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


class _TokenIds:
    """The ``input_ids`` of the forwards in progress, for hash routing on token ids: the model's pre-hook
    pushes a call's ids, its post-hook pops them, and the upcycled layers read the innermost.

    transformers calls a layer's ``output(hidden_states, input_tensor)`` with nothing else, so the ids cannot
    travel with the call; they are kept per thread (a :class:`contextvars.ContextVar`, also per asyncio task)
    instead, so that calls of one model from several threads each hash their own ids, and a stack, so that a
    nested call does not leave the outer one without its ids."""

    def __init__(self) -> None:
        self._stack: ContextVar[tuple[Tensor | None, ...]] = ContextVar("fulu_token_ids", default=())

    def push(self, ids: Tensor | None) -> None:
        self._stack.set((*self._stack.get(), ids))

    def pop(self, ids: Tensor | None) -> None:
        """Forget a call's ids, if they are the innermost: a call that failed in a forward pre-hook run
        before the one that pushes them pushed nothing, and must not pop the ids of a call around it."""
        stack = self._stack.get()
        if stack and stack[-1] is ids:
            self._stack.set(stack[:-1])

    def current(self) -> Tensor | None:
        stack = self._stack.get()
        return stack[-1] if stack else None

    # A ContextVar neither copies nor pickles; a copied model starts with no call in progress.
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class _CaptureTokenIds:
    """Forward pre-hook on the encoder model: remembers ``input_ids`` (a callable object rather
    than a closure, so that ``copy.deepcopy`` of the model keeps hook and layers on one holder)."""

    def __init__(self, holder: _TokenIds):
        self.holder = holder

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.holder.push(_input_ids(args, kwargs))


class _ForgetTokenIds:
    """Forward hook (always called, also when the call fails): forgets the ids its call pushed."""

    def __init__(self, holder: _TokenIds):
        self.holder = holder

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.holder.pop(_input_ids(args, kwargs))


def _input_ids(args: tuple, kwargs: dict) -> Tensor | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids if isinstance(ids, Tensor) else None


class PiMoEOutput(nn.Module):
    """Replaces a BERT layer's ``output`` (and, with ``intermediate`` set to identity, its FFN):
    ``LayerNorm(dropout(moe(x)) + residual)``.

    Keeps the original ``dropout`` and ``LayerNorm`` modules (and their state-dict names). The
    last forward's routing statistics are kept in ``last_stats`` (their ``balance_loss`` carries
    gradients until the next forward); :func:`balance_loss` sums them over a model.
    """

    def __init__(self, moe: PiMoELayer, dropout: nn.Module, layer_norm: nn.Module, token_ids: _TokenIds | None = None):
        super().__init__()
        self.moe = moe
        self.dropout = dropout
        self.LayerNorm = layer_norm
        self._token_ids = token_ids
        self.last_stats: dict[str, Tensor] = {}
        self._last_ids: Tensor | None = None  # the ids of the last call, for gradient checkpointing's recomputation
        self._chunk_at = 0  # where the next slice of a chunked feed-forward starts in the sequence

    def __getstate__(self):
        # copy.deepcopy (a checkpoint or EMA copy mid-training) and pickling: the last statistics without the
        # graph of the call that made them, which a compiled call's plain dict holds
        return {**super().__getstate__(), "last_stats": detached_stats(self.last_stats)}

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        y, self.last_stats = self.moe(hidden_states, token_ids=self._ids_for(hidden_states))
        return self.LayerNorm(self.dropout(y) + input_tensor)

    def _ids_for(self, hidden_states: Tensor) -> Tensor | None:
        """The token ids of ``hidden_states``'s tokens, for hash routing on ids (None: the router hashes the
        hidden states, as for a call given ``inputs_embeds``)."""
        if self._token_ids is None:
            return None
        ids = self._token_ids.current()
        if ids is None and torch._C._current_graph_task_id() != -1:
            # Called inside a backward with no model call around it: gradient checkpointing recomputing this
            # layer once the model's call returned. It routes as the call did (else torch's check fails).
            ids = self._last_ids
        else:
            if ids is not self._last_ids:
                self._chunk_at = 0  # a new call (one that failed mid-sequence leaves no offset behind)
            self._last_ids = ids
        if ids is None or ids.shape == hidden_states.shape[:-1]:
            return ids
        # transformers' chunk_size_feed_forward: the layer's slices of the sequence, one after another
        batch, length = hidden_states.shape[0], hidden_states.shape[1] if hidden_states.dim() == 3 else 0
        if ids.dim() != 2 or ids.shape[0] != batch or not 0 < length < ids.shape[1] or ids.shape[1] % length:
            return None
        start = self._chunk_at
        self._chunk_at = (start + length) % ids.shape[1]
        return ids[:, start:start + length]


@dataclass(frozen=True)
class MigrationInfo:
    """What :func:`migrate_from_electra` did (``model.fulu_migration``)."""

    source: str
    layers: tuple[int, ...]
    moe: MoEConfig
    exact: bool
    not_exact_because: tuple[str, ...] = ()
    features: dict[str, bool] = field(default_factory=dict)

    def architecture(self) -> dict[str, Any]:
        """What was migrated, as plain data (as ``UltimatePiMoESystem.architecture()``): the layers'
        MoEConfig fields, the source, the layers and features. Its ``moe`` fields are the names a search
        space's ``params`` and ``base.moe`` take (those the encoder fixes, such as ``hidden_size``, aside)."""
        return {"moe": self.moe.to_dict(), "source": self.source, "layers": list(self.layers),
                "features": dict(self.features)}


def equivalence_problems(cfg: MoEConfig, split_shared: bool = False) -> list[str]:
    """Why a PiMoE layer of identical experts would *not* reproduce the dense FFN (empty: it does).
    ``split_shared``: the shared experts are the part of the FFN the routed experts lack
    (``shared_fraction``), not an addition to it."""
    p = []
    if cfg.router == "expert_choice":
        p.append("router 'expert_choice': each expert takes its top-C tokens, so a token can get no expert "
                 "or several, with weights that do not sum to one")
    elif cfg.router != "hash" and not cfg.renormalize:
        p.append(f"renormalize=False: the {cfg.router} router's top-{cfg.top_k} weights sum to less than one")
    if cfg.routed_scaling_factor != 1.0:
        p.append(f"routed_scaling_factor={cfg.routed_scaling_factor} scales the FFN output")
    if cfg.capacity_factor is not None and cfg.token_choice:
        p.append("capacity_factor drops the tokens over an expert's capacity")
    if cfg.num_shared_experts and not split_shared:
        p.append("shared experts add to the upcycled FFN's output (shared_fraction cuts an exact one out of it)")
    if cfg.num_shared_experts and split_shared and cfg.shared_expert_gate:
        p.append("shared_expert_gate=True scales the shared expert cut out of the FFN by sigmoid(gate(x)), so the "
                 "two parts no longer sum to the FFN")
    return p


# -- locating the FFNs ---------------------------------------------------------------------------


# What a BERT-family layer's output block holds: LayerNorm(dropout(dense(h)) + residual). X-MOD adds language
# adapters (adapter_modules, and a lang_ids argument), which a PiMoEOutput in its place would drop.
_OUTPUT_PARTS = frozenset({"dense", "dropout", "LayerNorm"})


def _required_arguments(module: nn.Module) -> int:
    """How many arguments ``module``'s forward needs (its defaults aside)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    return sum(p.default is p.empty and p.kind in kinds for p in inspect.signature(module.forward).parameters.values())


def encoder_root(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The headless encoder model and its layer list, or FuluConfigError saying what was expected."""
    root = getattr(model, "base_model", model)
    layers = getattr(getattr(root, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise FuluConfigError(f"migrate_from_electra: expected {EXPECTED}; {type(model).__name__} has no "
                              f"encoder.layer list")
    problems = []
    for i, layer in enumerate(layers):
        output = getattr(layer, "output", None)
        if isinstance(output, PiMoEOutput):
            raise FuluConfigError(f"migrate_from_electra: encoder.layer[{i}] of {type(model).__name__} is already "
                                  f"a PiMoE layer (the model was migrated before)")
        intermediate = getattr(layer, "intermediate", None)
        missing = [name for name, ok in (
            ("intermediate.dense", isinstance(getattr(intermediate, "dense", None), nn.Linear)),
            ("intermediate.intermediate_act_fn", hasattr(intermediate, "intermediate_act_fn")),
            ("output.dense", isinstance(getattr(output, "dense", None), nn.Linear)),
            ("output.dropout", hasattr(output, "dropout")),
            ("output.LayerNorm", hasattr(output, "LayerNorm"))) if not ok]
        if missing:
            problems.append(f"encoder.layer[{i}] ({type(layer).__name__}) lacks {', '.join(missing)}")
            continue
        extra = sorted(set(dict(output.named_children())) - _OUTPUT_PARTS)
        if extra or _required_arguments(output) != 2:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            raise FuluConfigError(
                f"migrate_from_electra: {type(model).__name__}"
                + (f" (model_type {model_type!r})" if isinstance(model_type, str) else "")
                + f" is not supported: encoder.layer[{i}].output ({type(output).__name__}) does more than "
                f"LayerNorm(dropout(dense(h)) + residual)"
                + (f" (it has {', '.join(extra)})" if extra else " (its forward takes other arguments)")
                + f", which an upcycled layer would drop; expected {EXPECTED}")
        act = intermediate.intermediate_act_fn
        exact_gelu = type(act).__name__ == "GELUActivation" or (
            isinstance(act, nn.GELU) and act.approximate == "none")
        if not exact_gelu:
            hidden_act = getattr(getattr(model, "config", None), "hidden_act", None)
            problems.append(f"encoder.layer[{i}] uses the activation {type(act).__name__}"
                            + (f" (hidden_act={hidden_act!r})" if isinstance(hidden_act, str) else "")
                            + "; PiMoE's GELU experts compute the exact erf GELU (hidden_act='gelu')")
    if problems:
        raise FuluConfigError([f"migrate_from_electra: expected {EXPECTED}", *problems])
    return root, layers


SAFETENSORS_INDEX = "model.safetensors.index.json"


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of ``folder``: those at its top level and every shard its
    ``model.safetensors.index.json`` names, which transformers reads wherever under the folder they lie
    (``sub/shard.safetensors``). ValueError when the index is not one or names a file that is not inside
    the folder."""
    folder = Path(folder)
    files = {p.resolve(): p for p in folder.glob("*.safetensors")}
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, UnicodeDecodeError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{SAFETENSORS_INDEX} is not a safetensors index (a JSON object whose weight_map maps "
                             f"tensor names to file names)")
        root = folder.resolve()
        for name in sorted(set(weight_map.values())):
            path = folder / name
            if not path.resolve().is_relative_to(root) or not path.is_file():
                raise ValueError(f"{SAFETENSORS_INDEX} names {name!r}, which is not a file inside the folder")
            files.setdefault(path.resolve(), path)
    return sorted(files.values())


def _shown(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def unreadable_weights(folder: str | os.PathLike) -> list[str]:
    """Each safetensors file of ``folder`` (:func:`weight_files`) whose header does not read (not
    safetensors, cut short), with why; safetensors' own error names no file and is no FuluConfigError. The
    header lists every tensor's extent, so a readable one also means the file is whole."""
    from safetensors import SafetensorError, safe_open

    problems = []
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            problems.append(f"{_shown(path, Path(folder))} is not a safetensors file ({str(e).splitlines()[0]})")
    return problems


def nonfinite_weights(folder: str | os.PathLike) -> list[str]:
    """Each safetensors file of ``folder`` with NaN or infinite values, naming its tensors: such weights
    would only show up later, as a "layout" mismatch at verification or as every trial diverging."""
    from safetensors import safe_open

    problems = []
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            bad = nonfinite_tensors((name, f.get_tensor(name)) for name in f.keys())
        if bad:
            problems.append(f"{_shown(path, Path(folder))} holds non-finite values ({first_few(bad)})")
    return problems


def weight_file_problems(folder: str | os.PathLike) -> list[str]:
    """What is wrong with the safetensors files of ``folder`` as files: an index naming files that are not
    the folder's, unreadable ones, else non-finite values (only read once every header reads)."""
    try:
        return unreadable_weights(folder) or nonfinite_weights(folder)
    except ValueError as e:
        return [str(e)]


# config.json's sizes, checked before transformers builds anything from them: it raises ZeroDivisionError,
# IndexError or AssertionError for some impossible ones and builds a model that fails later for others.
_POSITIVE_SIZES = ("vocab_size", "hidden_size", "embedding_size", "intermediate_size", "num_attention_heads",
                   "num_hidden_layers", "max_position_embeddings")


def config_problems(config) -> list[str]:
    """The sizes of a transformers configuration no model can have, each naming its config.json field (the
    fields a model type lacks are not checked). ``hidden_size`` must be a multiple of
    ``num_attention_heads`` (the attention splits it into heads), ``pad_token_id`` an id of the vocabulary,
    ``layer_norm_eps`` positive (a negative one makes LayerNorm's output NaN)."""
    def whole(name: str, low: int) -> bool:
        value = getattr(config, name, None)
        if value is None:
            return False
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{name} must be a whole number >= {low}, got {value!r}")
            return False
        return True

    problems: list[str] = []
    valid = {name: whole(name, 1) for name in _POSITIVE_SIZES}
    whole("type_vocab_size", 0)
    if valid["hidden_size"] and valid["num_attention_heads"] and config.hidden_size % config.num_attention_heads:
        problems.append(f"hidden_size ({config.hidden_size}) must be a multiple of num_attention_heads "
                        f"({config.num_attention_heads})")
    pad = getattr(config, "pad_token_id", None)
    if valid["vocab_size"] and pad is not None and (
            isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < config.vocab_size):
        problems.append(f"pad_token_id must be None or an id below vocab_size ({config.vocab_size}), got {pad!r}")
    eps = getattr(config, "layer_norm_eps", None)
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < math.inf):
        problems.append(f"layer_norm_eps must be a number > 0, got {eps!r}")
    return problems


# safetensors' names of the floating types, all of which transformers casts into the model's float32 (a
# change of precision only); any other stored type (bool, integers) would be cast into meaningless weights.
_FLOAT_TYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})
_TYPE_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
               "I32": "int32", "U64": "uint64", "I64": "int64", "C64": "complex64"}


def stored_weights_problem(folder: str | os.PathLike, cls: type[nn.Module], config) -> str | None:
    """What is wrong with the weights of ``folder`` for a ``cls`` of ``config``, read from the safetensors
    headers alone, before transformers allocates and initialises a model of the configured sizes (which a
    config.json can make any size): tensors whose shape is not the configured one, and tensors of a
    non-floating type where the model's are floating. ``cls`` is built on the meta device (no memory). A
    stored tensor the model has no place for is :func:`loading_problem`'s to name."""
    from safetensors import safe_open

    try:
        with quiet_transformers(), torch.device("meta"):
            configured = cls(config).state_dict()
    except Exception as e:  # transformers' own checks of a configuration raise any type
        return f"transformers cannot build a {cls.__name__} of its config.json ({first_line(e)})"
    prefix = f"{getattr(cls, 'base_model_prefix', '')}."
    mismatched, not_floating = [], []
    for path in weight_files(folder):
        wrong_type = []
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                # a headless save read into a class with a head, or the other way round
                key = next((k for k in (name, prefix + name, name.removeprefix(prefix)) if k in configured), None)
                if key is None:
                    continue
                stored = f.get_slice(name)
                shape = tuple(stored.get_shape())
                if shape != tuple(configured[key].shape):
                    mismatched.append(f"{name}: {shape} stored, {tuple(configured[key].shape)} configured")
                elif configured[key].is_floating_point() and stored.get_dtype() not in _FLOAT_TYPES:
                    wrong_type.append(f"{name}: {_TYPE_NAMES.get(stored.get_dtype(), stored.get_dtype())}")
        if wrong_type:
            not_floating.append(f"{_shown(path, Path(folder))} holds weights of a non-floating type "
                                f"({first_few(sorted(wrong_type))})")
    if mismatched:
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        return f"its weights do not fit its config.json: {'; '.join(sorted(mismatched)[:3])}{more}"
    return "; ".join(not_floating) or None


def read_hf_config(folder: str | os.PathLike):
    """transformers' configuration in ``folder``/config.json, or ValueError saying in one line why it cannot be
    read. transformers 5 checks the fields' types with huggingface_hub's strict dataclasses, whose errors
    derive from Exception only; their first line names the field but not the problem, their cause both."""
    import transformers

    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: no strict validation
        StrictDataclassError = ValueError  # noqa: N806
    try:
        with quiet_transformers():
            return transformers.AutoConfig.from_pretrained(folder)
    except StrictDataclassError as e:
        raise ValueError(first_line(e.__cause__ or e)) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(first_line(e)) from None


def saved_class(config) -> type[nn.Module]:
    """The transformers model class ``config.json``'s ``architectures`` names (the class the folder was
    saved from), or the headless model of its type when it names none; ValueError when the name is not a
    model class of the config's type (a function, a tokenizer, another model type's class)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    names = config.architectures or []
    if not names and type(config) in MODEL_MAPPING:
        return MODEL_MAPPING[type(config)]
    if not names:
        raise ValueError(f"model_type {config.model_type!r} has no model class in transformers")
    cls = getattr(transformers, names[0], None) if isinstance(names[0], str) else None
    model_type = getattr(getattr(cls, "config_class", None), "model_type", None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and model_type == config.model_type):
        raise ValueError(f"config.json's architectures names {names[0]!r}, which is not a transformers model class "
                         f"of model_type {config.model_type!r}")
    return cls


def alignment_problems(hidden: int, ffn: int) -> list[str]:
    """The encoder sizes an upcycling cannot take: PiMoE's grouped GEMMs need both multiples of
    :data:`ALIGNMENT` (named with config.json's fields)."""
    return [f"{name}={size} is not a multiple of {ALIGNMENT}: PiMoE's grouped experts need a hidden_size and an "
            f"intermediate_size that are multiples of {ALIGNMENT}"
            for name, size in (("hidden_size", hidden), ("intermediate_size", ffn)) if size % ALIGNMENT]


def first_line(e: BaseException) -> str:
    """An error's first line (its type's name when it has no message)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def loading_problem(model: nn.Module, info: Mapping[str, Any], *, new_head: bool = False,
                    saved_keys: Iterable[str] = ()) -> str | None:
    """What is wrong with weights transformers loaded into ``model`` (``info``: its
    ``output_loading_info``, loaded with ``ignore_mismatched_sizes=True``), or None: sizes that do not
    fit the config, tensors the files lack (transformers starts those at random, which would make a random
    model; the pooler is optional: ``BertModel(add_pooling_layer=False)`` saves none), and tensors the
    config has no place for (transformers drops those, which would truncate the model silently).

    ``new_head``: a head the files lack is wanted new (only the encoder's tensors are required).
    ``saved_keys``: the tensors of the class the files were saved from, when ``model`` is of another
    class: its head is not the files' business to match."""
    if mismatched := sorted(info["mismatched_keys"]):
        shapes = [f"{key}: {tuple(stored)} stored, {tuple(configured)} configured"
                  for key, stored, configured in mismatched[:3]]
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        return f"its weights do not fit its config.json: {'; '.join(shapes)}{more}"
    headless = getattr(model, "base_model", model) is model
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    missing = sorted(k for k in info["missing_keys"] if not k.removeprefix(prefix).startswith("pooler."))
    body = [k for k in missing if headless or k.startswith(prefix)]
    if body:
        return (f"its weights lack {len(body)} of the encoder's tensors ({first_few(body)}): they are not the model "
                f"its config.json describes")
    if missing and not new_head:
        return (f"its weights lack the head of {type(model).__name__} ({first_few(missing)}), which would be "
                f"drawn at random: they are not the model its config.json describes")
    # a key of the saved class may be named with or without the base model's prefix
    saved = set(saved_keys)
    unused = sorted(k for k in info["unexpected_keys"]
                    if not {k, k.removeprefix(prefix), prefix + k} & saved)
    if unused:
        return (f"its weights hold {len(unused)} tensor{'s' if len(unused) > 1 else ''} that its config.json does "
                f"not use ({first_few(unused)}): they are not the model its config.json describes")
    return None


def _load(path: str | os.PathLike) -> nn.Module:
    """The model saved in ``path`` (as the class it was saved from), read from safetensors only, or one
    FuluConfigError naming the folder and what is wrong with it."""
    where = f"migrate_from_electra: {os.fspath(path)!r}"
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FuluConfigError(f"{where} is not a directory; expected a model instance or a directory written by "
                              f"save_pretrained")
    if not (folder / "config.json").is_file():
        raise FuluConfigError(f"{where} has no config.json; expected a directory written by save_pretrained")
    if problems := weight_file_problems(folder):
        raise FuluConfigError(f"{where}: {'; '.join(problems)}")
    if not weight_files(folder):
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        raise FuluConfigError(f"{where} has no safetensors weights"
                              + (f" (only {', '.join(pickles)}: pickles, which fulu-nas does not load)" if pickles
                                 else "")
                              + "; save it with save_pretrained (safetensors is its default)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("loading a model directory needs transformers: pip install 'fulu-nas[hf]'") from None
    try:
        config = read_hf_config(folder)
    except ValueError as e:
        raise FuluConfigError(f"{where}: its config.json cannot be read: {e}") from None
    if problems := config_problems(config):
        raise FuluConfigError([f"{where}: config.json: {p}" for p in problems])
    try:
        cls = saved_class(config)  # keeps the head the directory was saved with
    except ValueError as e:
        raise FuluConfigError(f"{where}: {e}") from None
    if problem := stored_weights_problem(folder, cls, config):
        raise FuluConfigError(f"{where}: {problem}")
    with quiet_transformers():  # its loading report and bars; the checks below say what matters
        try:
            # The sizes were compared above; should any still differ, loading_problem names them (transformers'
            # own report is silenced).
            model, info = cls.from_pretrained(folder, use_safetensors=True, output_loading_info=True,
                                              ignore_mismatched_sizes=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise FuluConfigError(f"{where} cannot be loaded: {first_line(e)}") from None
    if problem := loading_problem(model, info):
        raise FuluConfigError(f"{where}: {problem}")
    return model


# -- building the layers -------------------------------------------------------------------------


def shared_units(ffn: int, shared_fraction: float) -> int:
    """How many of an FFN's ``ffn`` hidden units ``shared_fraction`` cuts out as the shared expert: the
    nearest multiple of 8 (the grouped GEMM's alignment), leaving at least 8 to the routed experts;
    0 for 0. FuluConfigError when no such split exists."""
    if isinstance(shared_fraction, bool) or not isinstance(shared_fraction, int | float) or not (
            0 <= shared_fraction < 1):
        raise FuluConfigError(f"migrate_from_electra: shared_fraction must be a number in [0, 1), got "
                              f"{shared_fraction!r}")
    if not shared_fraction:
        return 0
    units = round(ffn * shared_fraction / ALIGNMENT) * ALIGNMENT
    if not ALIGNMENT <= units <= ffn - ALIGNMENT:
        raise FuluConfigError(f"migrate_from_electra: shared_fraction={shared_fraction} of an FFN of {ffn} units "
                              f"gives {units}; the shared and the routed part need at least {ALIGNMENT} each")
    return units


def upcycled_moe_config(hidden: int, ffn: int, heads: int, num_experts: int = 8,
                        routing_strategy: RoutingStrategy | str = RoutingStrategy.TOP_K, top_k: int = 2, *,
                        enable_advanced_routing: bool = True, enable_performance_optimization: bool = True,
                        shared_fraction: float = 0.0, **overrides: Any) -> MoEConfig:
    """The PiMoE layer configuration :func:`migrate_from_electra` gives an encoder of width ``hidden``,
    FFN width ``ffn`` and ``heads`` attention heads, for the same keyword arguments (FuluConfigError
    when there is none): what a search checks before it migrates anything."""
    if problems := _flag_problems(enable_advanced_routing=enable_advanced_routing,
                                  enable_performance_optimization=enable_performance_optimization):
        raise FuluConfigError(problems)
    try:
        strategy = enum_member(RoutingStrategy, routing_strategy, "routing_strategy")
    except ValueError as e:
        raise FuluConfigError(f"migrate_from_electra: {e}") from None
    fixed = sorted(set(overrides) & set(_FROM_MODEL))
    if fixed:
        raise FuluConfigError(f"migrate_from_electra: {', '.join(fixed)} come from the model's feed-forward "
                              f"layers and cannot be overridden")
    shared = shared_units(ffn, shared_fraction)
    given = [f"{name}={overrides[name]!r}" for name in ("num_shared_experts", "shared_expert_ffn_size")
             if name in overrides]
    if shared and given:  # even 0 or None: either would replace what the fraction gives
        raise FuluConfigError(f"migrate_from_electra: shared_fraction cuts the shared expert out of the FFN (one "
                              f"expert, as wide as the units cut out); {', '.join(given)} cannot be set with it")
    kw: dict[str, Any] = dict(hidden_size=hidden, expert_ffn_size=ffn - shared, activation="gelu", expert_bias=True,
                              num_experts=num_experts, top_k=top_k, router=strategy.value,
                              impl="grouped" if enable_performance_optimization else "loop",
                              aux_loss_coef=AUX_LOSS_COEF)
    if shared:
        kw.update(num_shared_experts=1, shared_expert_ffn_size=shared)
    if strategy is RoutingStrategy.HIERARCHICAL:
        kw["hierarchy_depth"] = 2
    if strategy is RoutingStrategy.ATTENTION_BASED:
        kw["attention_heads"] = math.gcd(int(heads), hidden)
    if enable_advanced_routing and strategy in (RoutingStrategy.TOP_K, RoutingStrategy.HIERARCHICAL,
                                 RoutingStrategy.ATTENTION_BASED):
        kw.update(bias_update_rate=BIAS_UPDATE_RATE, z_loss_coef=Z_LOSS_COEF)
    kw.update(overrides)
    try:
        return MoEConfig(**kw)
    except TypeError as e:  # an unknown keyword
        raise FuluConfigError(f"migrate_from_electra: {e}") from None
    except ValueError as e:
        raise FuluConfigError(f"migrate_from_electra: {e}") from None


def _flag_problems(**flags: Any) -> list[str]:
    return [f"migrate_from_electra: {problem}" for problem in flag_problems(flags)]


def _copy_or_zero(target: Tensor, source: Tensor | None) -> None:
    if source is None:
        target.zero_()
    else:
        target.copy_(source)


@torch.no_grad()
def _upcycle(cfg: MoEConfig, dense_in: nn.Linear, dense_out: nn.Linear, init_std: float,
             split_shared: bool) -> PiMoELayer:
    """A PiMoE layer whose every expert is the FFN ``dense_out(gelu(dense_in(x)))``; with ``split_shared``
    the shared expert is its first hidden units (and the output bias), each routed expert the rest."""
    w = dense_in.weight
    moe = PiMoELayer(cfg).to(device=w.device, dtype=w.dtype)  # the router stays fp32
    E = cfg.num_experts
    S = cfg.num_shared_experts * cfg.shared_ffn_size if split_shared else 0
    moe.experts.w13_EDF2.copy_(dense_in.weight[S:].t().expand(E, -1, -1))
    moe.experts.w2_EFD.copy_(dense_out.weight[:, S:].t().expand(E, -1, -1))
    # With a shared expert the output bias is added once, by it: the routed weights need not sum to one for it.
    in_bias = None if dense_in.bias is None else dense_in.bias[S:]
    _copy_or_zero(moe.experts.b13_EF2, None if in_bias is None else in_bias.expand(E, -1))
    _copy_or_zero(moe.experts.b2_ED, None if S or dense_out.bias is None else dense_out.bias.expand(E, -1))
    if S:
        shared = moe.shared.ffn
        shared.w13.weight.copy_(dense_in.weight[:S])
        shared.w2.weight.copy_(dense_out.weight[:, :S])
        _copy_or_zero(shared.w13.bias, None if dense_in.bias is None else dense_in.bias[:S])
        _copy_or_zero(shared.w2.bias, dense_out.bias)
    gate = getattr(moe.router, "gate", None)
    if gate is not None:  # small logits: near-uniform routing to start, as the encoder's own init
        gate.weight.normal_(0.0, init_std)
    return moe


@contextmanager
def _eval_mode(*modules: nn.Module):
    """``modules`` in eval mode for the ``with``; then every submodule's own flag back (``train(flag)`` would
    give a module's children its flag, changing the dense model's modes before anything is migrated)."""
    flags = [(m, m.training) for top in modules for m in top.modules()]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@torch.no_grad()
def _verify(index: int, intermediate: nn.Module, output: nn.Module, new_output: PiMoEOutput) -> None:
    """The upcycled FFN block must reproduce the dense one on random hidden states."""
    w = new_output.moe.experts.w13_EDF2
    g = torch.Generator().manual_seed(index)
    x = torch.randn(2, 8, w.shape[1], generator=g).to(device=w.device, dtype=w.dtype)
    with _eval_mode(intermediate, output, new_output):
        ref = output(intermediate(x), x).float()
        if not bool(torch.isfinite(ref).all()):
            # Nothing to compare against, and not the upcycling's fault: the dense block itself is broken.
            eps = getattr(getattr(output, "LayerNorm", None), "eps", None)
            raise FuluConfigError(f"migrate_from_electra: encoder.layer[{index}]'s dense feed-forward block itself "
                                  f"gives non-finite outputs on random inputs (its LayerNorm's layer_norm_eps "
                                  f"({eps}) must be > 0, and its weights small enough not to overflow "
                                  f"{w.dtype}): the dense model is broken, not its layout")
        got = new_output(x, x).float()
    tol = 1e-4 if w.dtype == torch.float32 else 5e-2
    err = (got - ref).abs().max().item()
    if not err <= tol * max(1.0, ref.abs().max().item()):
        raise RuntimeError(f"migrate_from_electra: encoder.layer[{index}]'s upcycled feed-forward differs from the "
                           f"dense one by {err:.3g}: its FFN is not intermediate.dense -> GELU -> output.dense "
                           f"-> dropout -> LayerNorm(+ residual); expected {EXPECTED}")


def migrate_from_electra(
    model: nn.Module | str | os.PathLike,
    num_experts: int = 8,
    routing_strategy: RoutingStrategy | str = RoutingStrategy.TOP_K,
    top_k: int = 2,
    *,
    enable_ultimate_pimoe: bool = True,
    enable_advanced_routing: bool = True,
    enable_performance_optimization: bool = True,
    layers: list[int] | tuple[int, ...] | None = None,
    shared_fraction: float = 0.0,
    require_exact: bool = True,
    hash_on_token_ids: bool = True,
    inplace: bool = False,
    verify: bool = True,
    **moe_overrides: Any,
) -> nn.Module:
    """Upcycle a Hugging Face ELECTRA (or BERT-family) encoder: each selected layer's FFN becomes a
    PiMoE layer of ``num_experts`` copies of it. Returns the migrated model (a copy unless
    ``inplace``), with ``model.fulu_migration`` (:class:`MigrationInfo`).

    ``model``: an instance (``ElectraModel``, ``ElectraForMaskedLM``, ``BertModel``, ...) or a
    directory written by ``save_pretrained`` (loaded as the class it was saved from).
    ``routing_strategy``: a :class:`~fulu_nas.RoutingStrategy` or its value (``"topk"``,
    ``"expert_choice"``, ``"hash"``, ``"hierarchical"``, ``"attention"``).

    The spec's flags:

    - ``enable_ultimate_pimoe``: upcycle every encoder layer (True) or every other one, the second,
      fourth, ... (False; the Switch Transformer / GShard placement). ``layers=[...]`` chooses
      explicitly and overrides the flag.
    - ``enable_advanced_routing``: for the score-based routers (top-k, hierarchical, attention), add
      DeepSeek-V3's auxiliary-loss-free balancing (a selection-only bias, ``bias_update_rate=1e-3``,
      adapted by :func:`update_expert_biases` after each optimizer step) and the ST-MoE router
      z-loss (``z_loss_coef=1e-3``) to the Switch load-balancing loss (``aux_loss_coef=0.01``,
      always on). Neither changes the outputs at migration.
    - ``enable_performance_optimization``: grouped-GEMM dispatch (``impl="grouped"``); off, the
      per-expert loop (``impl="loop"``), the reference.

    ``shared_fraction``: cut that fraction of each FFN's hidden units (rounded to a multiple of 8) out
    as one always-on shared expert; the routed experts are copies of the remaining units (exact, see
    the module doc). 0: no shared expert.

    ``require_exact``: refuse (FuluConfigError) a router or override whose outputs would differ from
    the dense model's right after migration (see :func:`equivalence_problems`); with False it is
    migrated with a warning. ``hash_on_token_ids``: the hash router hashes the ``input_ids`` of the
    forward (Roller et al. 2021) rather than the hidden states (calls with ``inputs_embeds`` fall
    back to those). ``verify``: check each upcycled block against the dense one on random inputs.
    ``moe_overrides``: any other :class:`~fulu_nas.moe.MoEConfig` field (``aux_loss_coef``,
    ``top_p``, ``hierarchy_depth``, ``attention_context``, ...).

    Unsupported models raise FuluConfigError naming what was expected, before anything is changed; so do
    flags that are not bools, a ``layers`` that is not a list, and FFN weights that hold NaN or infinite
    values. With ``inplace`` a failure (a layer of
    another FFN size, a block that fails ``verify``) leaves the model as it was: every new block is built
    and verified before any is swapped in. A directory is read from its safetensors
    weights only (a folder with only ``pytorch_model.bin``, a pickle, is refused; :func:`weight_files` says
    which files), and refused when its ``config.json`` holds impossible sizes (:func:`config_problems`), when
    the weights do not fit it or are of a non-floating type (compared in the safetensors headers, before a
    model is allocated), hold NaN or infinite values, lack the encoder's tensors or the head of the class
    ``architectures`` names, or hold tensors the config has no place for.
    """
    problems = _flag_problems(enable_ultimate_pimoe=enable_ultimate_pimoe,
                              enable_advanced_routing=enable_advanced_routing,
                              enable_performance_optimization=enable_performance_optimization,
                              require_exact=require_exact, hash_on_token_ids=hash_on_token_ids, inplace=inplace,
                              verify=verify)
    if layers is not None and (isinstance(layers, str | bytes | Mapping) or not isinstance(layers, Iterable)):
        problems.append(f"migrate_from_electra: layers must be a list of layer indices (or None: the flag "
                        f"enable_ultimate_pimoe chooses), got {layers!r}")
    if problems:
        raise FuluConfigError(problems)
    try:
        strategy = enum_member(RoutingStrategy, routing_strategy, "routing_strategy")
    except ValueError as e:
        raise FuluConfigError(f"migrate_from_electra: {e}") from None
    if isinstance(model, str | os.PathLike):
        model = _load(model)
        inplace = True
    if not isinstance(model, nn.Module):
        raise FuluConfigError(f"migrate_from_electra: expected {EXPECTED}; got a {type(model).__name__}")
    encoder_root(model)  # validate before copying
    if not inplace:
        model = copy.deepcopy(model)
    root, encoder_layers = encoder_root(model)

    n = len(encoder_layers)
    if layers is None:
        if not enable_ultimate_pimoe and n < 2:
            raise FuluConfigError(f"migrate_from_electra: enable_ultimate_pimoe=False upcycles every other layer (the "
                                  f"second, fourth, ...), and the model has {n} layer: pass layers=[0] to upcycle it, "
                                  f"or enable_ultimate_pimoe=True")
        layers = range(n) if enable_ultimate_pimoe else range(1, n, 2)
    layers = list(layers)
    # Whole, distinct indices: int(0.7) would quietly migrate layer 0, and a repeated index once.
    whole = [i for i in layers if not isinstance(i, bool) and hasattr(i, "__index__")]
    chosen = tuple(sorted({operator.index(i) for i in whole}))
    bad = [i for i in chosen if not 0 <= i < n]
    if bad or not chosen or len(whole) != len(layers) or len(chosen) != len(layers):
        raise FuluConfigError(f"migrate_from_electra: layers must be distinct indices in [0, {n}), got "
                              f"{list(layers)}")

    first = encoder_layers[chosen[0]]
    hidden, ffn = first.intermediate.dense.in_features, first.intermediate.dense.out_features
    heads = getattr(getattr(model, "config", None), "num_attention_heads", 4) or 4
    cfg = upcycled_moe_config(hidden, ffn, heads, num_experts, strategy, top_k,
                              enable_advanced_routing=enable_advanced_routing,
                              enable_performance_optimization=enable_performance_optimization,
                              shared_fraction=shared_fraction, **moe_overrides)
    split_shared = bool(shared_fraction)
    inexact = equivalence_problems(cfg, split_shared)
    if inexact and require_exact:
        raise FuluConfigError([f"migrate_from_electra: the migrated model would not compute the original's "
                               f"outputs ({'; '.join(inexact)}); pass require_exact=False to migrate anyway"])
    if inexact:
        warnings.warn("migrate_from_electra: the migrated model does not compute the original's outputs: "
                      + "; ".join(inexact), stacklevel=2)

    # Every layer is checked and its replacement built (and verified) before any is swapped in: a failure
    # leaves an ``inplace`` model as it was, not half-migrated.
    mismatched = []
    for i in chosen:
        dense_in, dense_out = encoder_layers[i].intermediate.dense, encoder_layers[i].output.dense
        if (dense_in.in_features, dense_in.out_features) != (hidden, ffn) or (
                dense_out.in_features, dense_out.out_features) != (ffn, hidden):
            mismatched.append(f"encoder.layer[{i}]'s FFN is {dense_in.in_features}->{dense_in.out_features}->"
                              f"{dense_out.out_features}")
    if mismatched:
        raise FuluConfigError(f"migrate_from_electra: {'; '.join(mismatched)}; every migrated layer needs "
                              f"{hidden}->{ffn}->{hidden}")
    # A folder's files were checked when read; a model passed as an object is checked here, where its NaN
    # would otherwise fail the verification as a layout the FFN does not have.
    nonfinite = nonfinite_tensors((f"encoder.layer[{i}].{part}.{name}", p) for i in chosen
                                  for part in ("intermediate", "output")
                                  for name, p in getattr(encoder_layers[i], part).named_parameters())
    if nonfinite:
        raise FuluConfigError([f"migrate_from_electra: {name} holds non-finite values" for name in nonfinite])

    token_ids = _TokenIds() if cfg.router == "hash" and hash_on_token_ids else None
    init_std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02) or 0.02)
    new_outputs = []
    for i in chosen:
        layer = encoder_layers[i]
        new_output = PiMoEOutput(_upcycle(cfg, layer.intermediate.dense, layer.output.dense, init_std, split_shared),
                                 layer.output.dropout, layer.output.LayerNorm, token_ids)
        if verify and not inexact:
            _verify(i, layer.intermediate, layer.output, new_output)
        new_outputs.append(new_output)

    for i, new_output in zip(chosen, new_outputs, strict=True):
        layer = encoder_layers[i]
        # the mode of the output it replaces (and, as before, of the dropout and LayerNorm it keeps)
        new_output.train(layer.output.training)
        layer.intermediate = nn.Identity().train(layer.training)
        layer.output = new_output
        # Chunking a per-token FFN only saves memory, but a router that sees the sequence (attention
        # context, expert choice) would see one slice at a time: the layer takes the sequence whole.
        if getattr(layer, "chunk_size_feed_forward", 0):
            layer.chunk_size_feed_forward = 0
    if token_ids is not None:
        root.register_forward_pre_hook(_CaptureTokenIds(token_ids), with_kwargs=True)
        root.register_forward_hook(_ForgetTokenIds(token_ids), with_kwargs=True, always_call=True)

    model.fulu_migration = MigrationInfo(
        source=type(model).__name__, layers=chosen, moe=cfg, exact=not inexact, not_exact_because=tuple(inexact),
        features={"ultimate_pimoe": enable_ultimate_pimoe, "advanced_routing": enable_advanced_routing,
                  "performance_optimization": enable_performance_optimization})
    return model


# -- training helpers ----------------------------------------------------------------------------


def moe_outputs(model: nn.Module) -> list[PiMoEOutput]:
    """The upcycled blocks of a migrated model, in layer order."""
    return [m for m in model.modules() if isinstance(m, PiMoEOutput)]


def pimoe_layers(model: nn.Module) -> list[PiMoELayer]:
    """The PiMoE layers of a migrated model, in layer order."""
    return [m.moe for m in moe_outputs(model)]


def routing_stats(model: nn.Module) -> list[dict[str, Tensor]]:
    """The routing statistics of the last forward, one dict per PiMoE layer."""
    return [m.last_stats for m in moe_outputs(model)]


def balance_loss(model: nn.Module) -> Tensor:
    """The last forward's weighted balancing losses, summed over layers: add to the task loss.

    FuluConfigError where they should train the routers but carry no gradient: Hugging Face's
    reentrant gradient checkpointing runs the forward without gradients (and again in the backward,
    too late for this loss), so the routers would silently not be balanced."""
    stats = [s["balance_loss"].float() for s in routing_stats(model) if s]
    if not stats:
        return torch.zeros((), device=next(model.parameters()).device)
    loss = torch.stack(stats).sum()
    trained = [layer for layer in pimoe_layers(model) if (layer.cfg.aux_loss_coef or layer.cfg.z_loss_coef)
               and any(p.requires_grad for p in layer.router.parameters())]
    if torch.is_grad_enabled() and not loss.requires_grad and trained:
        raise FuluConfigError("balance_loss: the last forward's balancing losses have no gradient, so they would "
                              "not train the routers: the forward ran without gradients, as Hugging Face's "
                              "reentrant gradient checkpointing runs it; enable it with model."
                              "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")
    return loss


@torch.no_grad()
def update_expert_biases(model: nn.Module) -> None:
    """Auxiliary-loss-free balancing step for every PiMoE layer (call after each optimizer step);
    a no-op unless the layers have ``bias_update_rate > 0``."""
    for out in moe_outputs(model):
        if out.last_stats and isinstance(out.moe.router, ScoreRouter):
            out.moe.update_expert_bias(out.last_stats["tokens_per_expert"])


class TaskModel(nn.Module):
    """A migrated model with a token-level head (e.g. ``ElectraForTokenClassification`` with
    ``num_labels=task.num_classes``) in the shape :func:`fulu_nas.training.train.train` and
    :func:`fulu_nas.training.evaluate.evaluate` expect: ``forward(tokens)`` returns a
    :class:`~fulu_nas.models.ModelOutput`. ``train(..., TrainConfig(gradient_checkpointing=True))`` is
    refused for it: use the Hugging Face model's own switch, non-reentrant (see :func:`balance_loss`).
    ``require_moe=False`` accepts a model with no PiMoE layer (the dense model, trained the same way as
    a reference)."""

    def __init__(self, model: nn.Module, require_moe: bool = True):
        super().__init__()
        if require_moe and not moe_outputs(model):
            raise FuluConfigError("TaskModel: the model has no PiMoE layers; migrate it with "
                                  "migrate_from_electra first")
        self.model = model
        self.gradient_checkpointing = False

    def forward(self, tokens_BS: Tensor):
        from ..models import ModelOutput

        out = self.model(input_ids=tokens_BS)
        logits = out.logits if hasattr(out, "logits") else out[0]
        stats = routing_stats(self.model)
        return ModelOutput(logits=logits, hidden_states=[], moe_stats=stats, balance_loss=balance_loss(self.model))

    def moe_layers(self) -> list[PiMoELayer]:
        return pimoe_layers(self.model)

    @torch.no_grad()
    def update_expert_biases(self, moe_stats: list[dict[str, Tensor]]) -> None:
        for layer, stats in zip(self.moe_layers(), moe_stats, strict=True):
            layer.update_expert_bias(stats["tokens_per_expert"])
