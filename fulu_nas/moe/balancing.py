"""Load balancing: auxiliary losses and the auxiliary-loss-free selection bias.

Shape suffixes: T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .stats import token_mean


def load_balancing_loss(probs_TE: Tensor, counts_E: Tensor) -> Tensor:
    """Switch/GShard auxiliary loss ``E * sum_e f_e * P_e``.

    ``f_e`` is expert e's share of the dispatched assignments (no gradient), ``P_e`` its mean
    router probability. It is 1 at perfect balance for any top-k; Hugging Face's Mixtral
    loss counts f per token instead of per assignment and so equals ``top_k`` times this.
    """
    f_E = counts_E.detach() / counts_E.sum().clamp_min(1)
    return probs_TE.shape[-1] * (f_E * token_mean(probs_TE)).sum()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``."""
    return token_mean(torch.logsumexp(logits_TE.float(), dim=-1).square())


@torch.no_grad()
def update_selection_bias(bias_E: Tensor, counts_E: Tensor, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing step, in place.

    ``b_e += rate * sign(mean(c) - c_e)``: under-loaded experts become more likely to be
    selected. The update's mean is removed (as torchtitan does) so the bias cannot drift as a
    whole, which would change nothing in the selection but grow without bound.
    """
    step_E = rate * torch.sign(counts_E.float().mean() - counts_E.float())
    bias_E.add_(step_E - step_E.mean())


# The balancing methods a search chooses between, as MoEConfig settings (coefficients from the
# papers: Switch's 1e-2 auxiliary loss, DeepSeek-V3's 1e-3 bias update rate).
BALANCING_METHODS: dict[str, dict[str, float]] = {
    "aux_loss": {"aux_loss_coef": 0.01},
    "aux_free": {"bias_update_rate": 1e-3},
    "aux_loss+z_loss": {"aux_loss_coef": 0.01, "z_loss_coef": 1e-3},
    "none": {},
}
