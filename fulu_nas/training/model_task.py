"""Whether a model can be trained or evaluated on a task: its vocabulary, its head, its sequence
length and, on a next-token task, its causality. :func:`~fulu_nas.training.train.train` and
:func:`~fulu_nas.training.evaluate.evaluate` refuse the same pairs in the same words."""

from __future__ import annotations

import torch

from ..models import PiMoETransformer
from ..tasks import Task

NOT_CAUSAL = ("router expert_choice is not causal: each expert picks its tokens from the whole batch, so "
              "a token's output depends on the tokens after it, which a next-token language model "
              "predicts (use it on a token-classification task)")



def head_problem(model: torch.nn.Module, task: Task) -> str | None:
    """Why ``model``'s head does not predict ``task``'s targets (None: it does, or the model is not this
    package's transformer): a language-model head on a classification task would read the class ids
    as token ids and train on another problem without a word."""
    if not hasattr(model, "classifier"):
        return None
    classes = model.classifier.out_features if model.classifier is not None else 0
    if classes == task.num_classes:
        return None

    def predicts(n: int) -> str:
        return f"one of {n} classes" if n else "the next token"

    wanted = (f"labels each token with {predicts(task.num_classes)}" if task.num_classes else
              f"predicts {predicts(0)}")
    return (f"the task {wanted}, the model's head predicts {predicts(classes)}: build the model with "
            f"num_classes={task.num_classes}")


def vocabulary_problem(model: torch.nn.Module, task: Task) -> str | None:
    """Why ``model``'s embedding does not cover ``task``'s token ids (None: it does, or it has no such
    embedding): an id past the table failed deep inside the forward."""
    embed = getattr(model, "embed", None)
    if isinstance(embed, torch.nn.Embedding) and task.vocab_size > embed.num_embeddings:
        return (f"the task's vocabulary ({task.vocab_size} ids) does not fit the model's vocab_size "
                f"({embed.num_embeddings})")
    return None


def sequence_problem(model: torch.nn.Module, task: Task) -> str | None:
    """Why ``model`` cannot read ``task``'s sequences whole (None: it can, or it is not this package's
    transformer): longer than its position table, they failed in the first forward."""
    if not isinstance(model, PiMoETransformer) or task.seq_len <= model.arch.max_seq_len:
        return None
    return (f"the task's sequences have {task.seq_len} tokens, more than the model's max_seq_len "
            f"({model.arch.max_seq_len}): build the model with max_seq_len={task.seq_len}")


def causality_problem(model: torch.nn.Module, task: Task) -> str | None:
    """:data:`NOT_CAUSAL` for this package's decoder with an expert-choice layer on a next-token task
    (None otherwise). An upcycled encoder's masked-LM task (also without classes) reads the whole
    sequence by design, and predicts no later token."""
    if task.num_classes == 0 and isinstance(model, PiMoETransformer) and any(
            layer.cfg.router == "expert_choice" for layer in model.moe_layers()):
        return NOT_CAUSAL
    return None


def model_task_problem(model: torch.nn.Module, task: Task) -> str | None:
    """Why ``model`` cannot be trained or evaluated on ``task`` (None: it can); the first problem found.
    :func:`train` and :func:`~fulu_nas.training.evaluate.evaluate` refuse the same pairs in the same words."""
    return (vocabulary_problem(model, task) or head_problem(model, task) or sequence_problem(model, task)
            or causality_problem(model, task))
