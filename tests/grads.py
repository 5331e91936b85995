"""How ``p.grad`` of a truegrad layer is compared with torch's.

With ``truegrad.nn.settings.bitwise_grad`` on, every gradient comes from the very ops
torch's backward uses: bitwise equal. With it off (the default), some layers compute
``p.grad`` together with the statistic (the sum of the per-sample gradients they form
anyway; one batched matmul for a Linear on 2-D input), a float sum taken in another
order: equal up to rounding, checked as
float64 within 1e-10 and float32 within rtol 1e-5 and atol 1e-6 x the largest
|element| (float32 eps is 1.2e-7).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from truegrad.nn import settings

#: ids of the two ways p.grad is formed, for ``pytest.mark.parametrize``
GRAD_MODES = ["bitwise", "fused"]


@contextlib.contextmanager
def grad_mode(mode: str) -> Iterator[None]:
    """Run the block with ``bitwise_grad`` set for ``mode`` (one of GRAD_MODES)."""
    if mode not in GRAD_MODES:
        raise ValueError(f"grad mode must be one of {GRAD_MODES}, got {mode!r}")
    with settings.configure(bitwise_grad=mode == "bitwise"):
        yield


def assert_close_to_rounding(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Equal up to the rounding of a float sum taken in another order."""
    if expected.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10, msg=name)
        return
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=1e-5, atol=1e-6 * max(scale, 1e-6), msg=name or None
    )


def assert_grad_matches(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Bitwise under ``bitwise_grad``, else equal up to rounding."""
    if settings.bitwise_grad:
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), name
    else:
        assert_close_to_rounding(actual, expected, name)


grad_modes = pytest.mark.parametrize("mode", GRAD_MODES)
