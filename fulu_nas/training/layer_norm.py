"""LayerNorm training on the CPU with the same result for any number of threads.

torch's CPU LayerNorm backward adds the weight's and the bias's gradient over the rows in per-thread
partial sums, so their rounding, and from the next step on the whole model, depends on the thread
count (every shape tried, e.g. 512 x 32 and 256 x 768, torch 2.13). A search's workers on a CPU each
take their share of the cores, so an upcycled Hugging Face encoder (whose every block has
LayerNorms) trained by two workers ended with other weights than the same trial run alone. Here
the input's gradient is torch's own, and the two parameter gradients are column sums over the rows,
which round the same whatever the threads.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn


class _LayerNorm(torch.autograd.Function):
    """``F.layer_norm`` with the parameter gradients summed over the rows by ``Tensor.sum(0)``."""

    @staticmethod
    def forward(x: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return torch.native_layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.shape, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)

    @staticmethod
    def backward(ctx, grad_out: Tensor, _mean_grad, _rstd_grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_layer_norm_backward(grad_out, x, ctx.shape, mean, rstd, weight, bias,
                                                               [True, False, False])[0]
        rows = grad_out.reshape(-1, *ctx.shape)
        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[2]:
            grad_weight = (rows * ((x - mean) * rstd).reshape(rows.shape)).sum(0).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = rows.sum(0).to(bias.dtype)
        return grad_x, None, grad_weight, grad_bias, None


def layer_norm(module: nn.LayerNorm, x: Tensor) -> Tensor:
    """``module(x)``; with a gradient, through :class:`_LayerNorm`."""
    if not torch.is_grad_enabled():
        return nn.LayerNorm.forward(module, x)
    return _LayerNorm.apply(x, tuple(module.normalized_shape), module.weight, module.bias, module.eps)[0]


@contextmanager
def thread_invariant_layer_norms(model: nn.Module):
    """Every ``nn.LayerNorm`` of ``model`` with parameters trains through :func:`layer_norm` for the
    duration of the ``with`` (the models fulu-nas builds have none: they use RMSNorm)."""
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) and m.elementwise_affine]
    # A forward already set on the instance (a library's or the user's patch) is put back, not dropped.
    before = {m: m.__dict__["forward"] for m in norms if "forward" in m.__dict__}
    for m in norms:
        m.forward = partial(layer_norm, m)
    try:
        yield
    finally:
        for m in norms:
            if m in before:
                m.forward = before[m]
            else:
                del m.forward
