"""Fixtures: a fixed seed for every test, process-wide matmul settings restored after each test,
and the router parameter."""

from __future__ import annotations

import pytest
import torch

from fulu_nas.moe import ROUTERS


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _restore_matmul_precision():
    # create_ultimate_pimoe_system with hardware optimisation turns TF32 on for the process; the
    # fp32 reference comparisons of later tests must not inherit it.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    precision = torch.get_float32_matmul_precision()
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.set_float32_matmul_precision(precision)


@pytest.fixture(params=ROUTERS)
def router(request) -> str:
    return request.param
