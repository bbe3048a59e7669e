"""Small Triton kernels that expose the experts kernels' device functions to tests (imported only
where triton is installed): on the GPU, or on the CPU through Triton's interpreter."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fulu_nas.moe._triton_kernels import _normal_cdf


@triton.jit
def _normal_cdf_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, _normal_cdf(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


def normal_cdf_errors(device: str) -> dict[str, float]:
    """Largest relative errors of the kernels' fp32 Phi(x) and GELU x * Phi(x) against float64, over
    x in [-10, 10] (Phi) and [-6, 6] (GELU, whose values below -6 are under 1e-8), beside the same
    figures for the erf form ``0.5 * (1 + erf(x / sqrt 2))`` in fp32."""
    x = torch.linspace(-10, 10, 200_001, device=device, dtype=torch.float32)
    phi = torch.empty_like(x)
    _normal_cdf_kernel[(triton.cdiv(x.numel(), 1024),)](x, phi, x.numel(), BLOCK=1024)
    exact = 0.5 * torch.erfc(-x.double() / 2**0.5)
    erf_form = 0.5 * (1 + torch.erf(x * 0.7071067811865476))
    gelu_range = x.abs() <= 6

    def worst(values, over=slice(None)):
        return ((values.double() - exact).abs() / exact)[over].max().item()

    return {"phi": worst(phi), "phi_erf_form": worst(erf_form),
            "gelu": worst(phi, gelu_range), "gelu_erf_form": worst(erf_form, gelu_range)}
