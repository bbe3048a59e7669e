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


class _BalanceLoss(torch.autograd.Function):
    """``aux_coef * load_balancing_loss + z_coef * router_z_loss`` with its closed-form backward:
    the probabilities' gradient is one (E,) vector broadcast over the tokens and the logits' is
    ``2 * lse * softmax / T``. Autograd through the two losses' torch ops took about fifty small
    launches per training step, each costing an eager call host time (H200: +0.8 ms per forward +
    backward of the seed config at 32,768 tokens)."""

    @staticmethod
    def forward(ctx, probs_TE, logits_TE, f_E, aux_coef, z_coef):
        T, E = (probs_TE if probs_TE is not None else logits_TE).shape
        ctx.scale = 1.0 / max(T, 1)
        ctx.shape, ctx.coefs = (T, E), (aux_coef, z_coef)
        terms, lse_T = [], None
        if aux_coef:
            terms.append((aux_coef * E * ctx.scale) * torch.dot(probs_TE.sum(0), f_E))
        if z_coef:
            lse_T = torch.logsumexp(logits_TE, dim=-1)
            terms.append((z_coef * ctx.scale) * torch.dot(lse_T, lse_T))
        ctx.save_for_backward(f_E, logits_TE if z_coef else None, lse_T)
        return sum(terms[1:], terms[0])

    @staticmethod
    def backward(ctx, g):
        f_E, logits_TE, lse_T = ctx.saved_tensors
        aux_coef, z_coef = ctx.coefs
        dprobs_TE = dlogits_TE = None
        if aux_coef and ctx.needs_input_grad[0]:
            dprobs_TE = (f_E * (g * (aux_coef * ctx.shape[1] * ctx.scale))).expand(ctx.shape)
        if z_coef and ctx.needs_input_grad[1]:
            dlogits_TE = torch.softmax(logits_TE, dim=-1) * (lse_T * (g * (2 * z_coef * ctx.scale))).unsqueeze(-1)
        return dprobs_TE, dlogits_TE, None, None, None


def balance_loss(probs_TE: Tensor | None, logits_TE: Tensor | None, counts_E: Tensor | None, aux_coef: float,
                 z_coef: float) -> Tensor:
    """``aux_coef * load_balancing_loss(probs_TE, counts_E) + z_coef * router_z_loss(logits_TE)``,
    at least one coefficient nonzero; a term whose coefficient is 0 is left out, and its inputs may
    be None. Eagerly one autograd node with few launches; traced, the two losses' ops, which the
    compiler fuses."""
    assert aux_coef or z_coef, "balance_loss: no term (the caller returns zero)"
    if torch.compiler.is_compiling():
        terms = [c * f() for c, f in ((aux_coef, lambda: load_balancing_loss(probs_TE, counts_E)),
                                      (z_coef, lambda: router_z_loss(logits_TE))) if c]
        return sum(terms[1:], terms[0])
    f_E = None
    if aux_coef:
        f_E = counts_E.detach().float()
        f_E = f_E / f_E.sum().clamp_min(1)
    return _BalanceLoss.apply(probs_TE.float() if aux_coef else None, logits_TE.float() if z_coef else None, f_E,
                              aux_coef, z_coef)


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
