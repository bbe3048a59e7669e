"""How a model card describes its PiMoE layers' routing, and whether a sequence's output depends on the
rest of its batch (a reader deploying the model must know: it decides how requests may be batched)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def routing_words(moe: Mapping[str, Any]) -> str:
    """What the layers of ``moe`` (an architecture's ``moe`` mapping) do with the tokens of a batch of T,
    as a verb phrase: "route each token to 2 of 8 experts"."""
    experts, k, factor = moe["num_experts"], moe["top_k"], moe.get("capacity_factor")
    if moe["router"] == "expert_choice":
        # MoEConfig's expert choice: C = ceil(capacity_factor * T / E), the factor defaulting to top_k
        return (f"let each of {experts} experts choose its ceil({k if factor is None else factor:g} x T / {experts}) "
                f"best tokens of a batch of T (a token gets 0 to {experts} experts)")
    top_p = moe.get("top_p")
    count = f"up to {k} (the fewest whose probability reaches {top_p:g})" if top_p is not None else f"{k}"
    words = f"route each token to {count} of {experts} experts"
    if factor is not None:
        words += (f", each expert keeping at most ceil({factor:g} x T x {k} / {experts}) assignments of a batch "
                  f"of T tokens, earlier tokens first (the rest skip it)")
    return words


def batch_dependence(moe: Mapping[str, Any] | None) -> str | None:
    """Why a sequence's output depends on the other sequences of its batch, or None where it does not."""
    if moe is None:
        return None
    if moe["router"] == "expert_choice":
        return "each expert chooses among all the tokens of the batch"
    if moe.get("capacity_factor") is not None:
        return "an expert's capacity is shared by all the tokens of the batch"
    return None


def batching_note(moe: Mapping[str, Any] | None) -> str:
    """The card's sentence on batches: none where a sequence's output is its own."""
    why = batch_dependence(moe)
    if why is None:
        return ""
    return (f"A sequence's output depends on the other sequences of its batch ({why}): the same sequence "
            "in another batch, or a batch split in parts, gives other outputs. Batch requests as the "
            "evaluation did, or accept the difference.")
