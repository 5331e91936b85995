"""Activation checkpointing (``torch.utils.checkpoint``) under every engine backend.

The checkpointed forward is recomputed during backward, when a node first unpacks its saved
tensors; that is often inside a rule's backward. The recomputation must go through the same
rules as the forward (the checkpoint compares the saved tensors and fails otherwise), and the
statistic comes from the original forward's records with the recomputed tensors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import truegrad
from truegrad import parameter, statistic, testing
from truegrad.backends import get_backend

ENGINE = ["auto", "nn", "patch_torch", "patch_model"]


class SharedAcrossTheCheckpoint(torch.nn.Module):
    """``a`` is used inside the checkpointed region and after it (a tied weight's pattern);
    the region is a lambda, no module call."""

    def __init__(self, reentrant: bool, layers: object = torch.nn) -> None:
        super().__init__()
        self.a = layers.Linear(4, 4)
        self.b = layers.Linear(4, 4)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(lambda t: self.b(torch.tanh(self.a(t))), x, use_reentrant=self.reentrant)
        return self.a(h)


def _oracle(model: SharedAcrossTheCheckpoint, x: torch.Tensor) -> dict[str, torch.Tensor]:
    plain = testing.plain_copy(model)
    plain.reentrant = False  # the same function (a reentrant region's oracle would see no input grad)
    return testing.sum_grad_squared_oracle(
        plain, lambda out, _: out.square().sum(), x, method="loop"
    ).sum_grad_squared


@pytest.mark.parametrize("backend", ENGINE)
def test_non_reentrant_checkpoint_is_exact(backend: str) -> None:
    torch.manual_seed(0)
    model, x = SharedAcrossTheCheckpoint(reentrant=False), torch.randn(5, 4)
    expected = _oracle(model, x)
    with get_backend(backend).prepare(model):
        model(x).square().sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(statistic.get(p), expected[name], rtol=1e-5, atol=1e-8)


def test_non_reentrant_checkpoint_of_truegrad_nn_layers_is_exact() -> None:
    torch.manual_seed(0)
    model, x = SharedAcrossTheCheckpoint(False, truegrad.nn), torch.randn(5, 4)
    expected = _oracle(model, x)
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(statistic.get(p), expected[name], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", ENGINE)
def test_reentrant_checkpoint_is_exact_or_absent_with_the_reason(backend: str) -> None:
    """The reentrant checkpoint runs its region without gradients and backpropagates through a
    recomputation in a nested backward: ``a``'s use after the region meets an output the
    engine could not follow, so ``a`` gets no statistic (with the reason), never a number."""
    torch.manual_seed(0)
    model, x = SharedAcrossTheCheckpoint(reentrant=True), torch.randn(5, 4, requires_grad=True)
    expected = _oracle(model, x.detach())
    exact = 0
    with get_backend(backend).prepare(model):
        model(x).square().sum().backward()
        for name, p in model.named_parameters():
            value = statistic.get(p)
            if value is None:
                assert parameter.reason(p), name
            else:
                torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-8)
                exact += 1
        assert exact == 2  # b's weight and bias: their nested backward is followed
        assert not statistic.has(model.a.weight)
        assert "meets a tensor" in parameter.reason(model.a.weight)
