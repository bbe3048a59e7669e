"""Fixtures: a fixed seed for every test, and the router parameter."""

from __future__ import annotations

import pytest
import torch

from fulu_nas.moe import ROUTERS


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(params=ROUTERS)
def router(request) -> str:
    return request.param
