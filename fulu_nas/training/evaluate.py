"""Evaluation of a trained model: loss (and, for language modelling, its perplexity), task metric and
routing quality.

Routing accuracy: the confusion matrix ``C[k, e]`` counts tokens of ground-truth domain k whose
top-1 expert is e. Experts are matched to domains optimally (Hungarian, scipy's
``linear_sum_assignment``): one-to-one when E <= K (tokens of unmatched domains count as
misrouted); when E > K every domain gets at least one expert and each remaining expert joins the
domain it serves most (many-to-one), solved exactly as one assignment problem. Accuracy = matched
tokens / all labelled tokens. K counts the domains with labelled tokens in the evaluation: a domain
absent from it (a small validation set, many domains) takes no expert, and has no accuracy of its own.
"""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import FuluConfigError
from ..models import PiMoETransformer
from ..moe import PiMoELayer, Routing, load_statistics
from ..tasks import IGNORE, NO_DOMAIN, Task
from .model_task import model_task_problem


def match_experts_to_domains(confusion_KE: Tensor) -> list[int]:
    """The optimal domain of each expert (-1 for an expert left unmatched when E < K), among the
    domains with tokens: an expert given to an empty domain would lose its tokens, so a perfect router
    scored below 1 whenever a domain was missing from the evaluation."""
    present = confusion_KE.sum(1).nonzero().flatten().tolist()
    if not present:
        return [-1] * confusion_KE.shape[1]
    return [present[k] if k >= 0 else -1 for k in _match(confusion_KE[present])]


def _match(confusion_KE: Tensor) -> list[int]:
    """:func:`match_experts_to_domains` for a confusion matrix whose every domain has tokens."""
    from scipy.optimize import linear_sum_assignment

    C = confusion_KE.double().cpu().numpy()
    K, E = C.shape
    if E <= K:
        rows, cols = linear_sum_assignment(C, maximize=True)
        domain = [-1] * E
        for k, e in zip(rows, cols, strict=True):
            domain[e] = int(k)
        return domain
    # Columns 0..K-1: each domain's representative expert; columns K..E-1: free experts that
    # serve their best domain. An E x E assignment covers every surjective expert->domain map.
    import numpy as np

    free = np.repeat(C.max(0, keepdims=True).T, E - K, axis=1)  # (E, E-K)
    gain = np.concatenate([C.T, free], axis=1)  # (E experts, E slots)
    experts, slots = linear_sum_assignment(gain, maximize=True)
    return [int(s) if s < K else int(C[:, e].argmax()) for e, s in sorted(zip(experts, slots, strict=True))]


def routing_accuracy(confusion_KE: Tensor) -> tuple[float, list[float], list[int]]:
    """(overall accuracy, accuracy per domain, domain of each expert); NaN for a domain without
    tokens (and overall, for a matrix without any)."""
    domain_of = match_experts_to_domains(confusion_KE)
    K = confusion_KE.shape[0]
    hits = torch.zeros(K, dtype=torch.float64)
    for e, k in enumerate(domain_of):
        if k >= 0:
            hits[k] += confusion_KE[k, e]
    per_domain = (hits / confusion_KE.sum(1).double()).tolist()  # 0 / 0: NaN, not a score of 0
    return float(hits.sum() / confusion_KE.sum()), per_domain, domain_of


def top1_expert(r: Routing) -> Tensor:
    """Each token's first-choice expert (expert choice: the expert its router scores highest)."""
    if r.expert_TK is not None:
        return r.expert_TK[:, 0]
    return r.probs_TE.argmax(-1)


@contextmanager
def capture_routing(model: PiMoETransformer):
    """Collects each MoE layer's Routing during the forwards inside the block."""
    captured: list[list[Routing]] = [[] for _ in model.moe_layers()]
    hooks = [layer.router.register_forward_hook(lambda m, a, k, out, i=i: captured[i].append(out), with_kwargs=True)
             for i, layer in enumerate(model.moe_layers())]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def evaluate(model: PiMoETransformer, task: Task, batch_size: int = 64) -> dict:
    """Validation loss, the task's metrics, and routing quality per MoE layer and overall. Refuses a
    model and task that :func:`~fulu_nas.training.train.train` refuses, in its words."""
    if problem := model_task_problem(model, task):  # else, e.g., class ids were scored as token ids
        raise FuluConfigError(problem)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    layers: list[PiMoELayer] = model.moe_layers()
    K = len(task.domain_names)
    loss_sum, loss_count = 0.0, 0
    metric_sums: dict[str, list[float]] = {}
    load = [torch.zeros(layer.cfg.num_experts, device=device) for layer in layers]
    confusion = [torch.zeros(K, layer.cfg.num_experts, device=device) for layer in layers]
    dropped = [0.0 for _ in layers]  # dropped assignments' shares, each batch's weighted by its tokens
    tokens = 0
    try:  # a failure midway (out of memory) leaves the model in the mode it had
        batches = task.val_batches(batch_size)
        for batch in batches:
            batch = batch.to(device)
            with capture_routing(model) as routed:
                out = model(batch.tokens)
            logits = out.logits.float()
            mask = batch.targets != IGNORE
            loss_sum += F.cross_entropy(logits[mask], batch.targets[mask], reduction="sum").item()
            loss_count += int(mask.sum())
            for name, (num, den) in task.metric_counts(logits, batch).items():
                acc = metric_sums.setdefault(name, [0.0, 0.0])
                acc[0] += num
                acc[1] += den
            tokens += batch.tokens.numel()
            domains = batch.domains.flatten()
            labelled = domains != NO_DOMAIN
            for i, stats in enumerate(out.moe_stats):
                load[i] += stats["tokens_per_expert"]
                dropped[i] += float(stats["dropped_share"]) * batch.tokens.numel()
                if K:
                    top1 = top1_expert(routed[i][-1])
                    confusion[i].index_put_((domains[labelled], top1[labelled]),
                                            torch.ones(int(labelled.sum()), device=device), accumulate=True)
    finally:
        model.train(was_training)

    result: dict = {"loss": loss_sum / max(1, loss_count)}
    if task.num_classes == 0:  # language modelling: the loss in nats per token, and its perplexity
        result["perplexity"] = math.exp(min(result["loss"], 700.0))
    # A metric measured on no position (no complete expression to match) is no measurement: NaN, not a score of 0
    result.update({name: num / den if den > 0 else math.nan for name, (num, den) in metric_sums.items()})
    per_layer = []
    for i in range(len(layers)):
        s = {k: float(v) for k, v in load_statistics(load[i]).items() if v.dim() == 0}
        s["tokens_per_expert"] = load[i].tolist()
        s["dropped_share"] = dropped[i] / max(1, tokens)  # a last, smaller batch counts for its size
        if K:
            acc, per_domain, mapping = routing_accuracy(confusion[i].cpu())
            scored = {name: a for name, a in zip(task.domain_names, per_domain, strict=True) if not math.isnan(a)}
            s.update(routing_accuracy=acc, routing_accuracy_per_domain=scored,  # the domains evaluated
                     expert_domains=mapping, confusion=confusion[i].cpu().tolist())
        per_layer.append(s)
    result["layers"] = per_layer
    for key in ("utilisation", "load_balance", "max_vio", "cv", "dropped_share") + (("routing_accuracy",) if K else ()):
        result[key] = statistics.fmean(layer[key] for layer in per_layer) if per_layer else float("nan")
    return result
