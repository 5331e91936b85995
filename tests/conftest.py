"""Shared fixtures: deterministic seeds and small thread counts for a 2-core machine."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_leaked_model_call():
    yield
    from truegrad.engine import forward

    depth = getattr(forward._STATE, "depth", 0)
    call = getattr(forward._STATE, "call", None)
    assert depth == 0 and call is None, f"a model call was left open (depth {depth}, {call})"


@pytest.fixture(autouse=True)
def _torch_left_unpatched():
    """A test that leaves ``patch_torch`` active changes every later test's torch.nn."""
    yield
    from truegrad.backends.patch_torch import is_patched, unpatch_torch

    if is_patched():
        unpatch_torch()
        pytest.fail("the test left torch patched (patch_torch without undo)")
