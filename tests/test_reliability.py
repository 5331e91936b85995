"""Reliability findings (issue 12): memory, interrupted steps, stale state, double counting.

Each test here failed on the code before its fix."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import truegrad
from truegrad import statistic, testing
from truegrad.backends import get_backend

ALL_BACKENDS = ["auto", "nn", "patch_torch", "patch_model", "backpack"]
ENGINE = ["auto", "nn", "patch_torch", "patch_model"]


class Twice(torch.nn.Module):
    """One Linear called twice: its per-sample gradients are kept between the two uses."""

    def __init__(self, layers: object = torch.nn) -> None:
        super().__init__()
        self.layer = layers.Linear(4, 4)
        self.head = layers.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(torch.tanh(self.layer(x))))


def _step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model(x).square().sum().backward()


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("backend", [*ALL_BACKENDS, "truegrad.nn"])
@pytest.mark.parametrize("undo", [False, True], ids=["dropped", "undone"])
def test_a_dropped_model_is_freed(backend: str, undo: bool) -> None:
    """Finding 2: a cached AccumulateGrad node (holding the parameter) in a map keyed by the
    parameter, and BackPack's watch list holding the module, kept every model alive."""
    if backend == "truegrad.nn":
        model = Twice(truegrad.nn)
        handle = None
    else:
        model = Twice()
        handle = get_backend(backend).prepare(model)
    x = torch.randn(3, 4)
    with get_backend(backend).backward_context() if backend == "backpack" else _nothing():
        _step(model, x)
    refs = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(model)]
    if undo and handle is not None:
        handle.undo()
    del model, handle
    gc.collect()
    if backend == "patch_torch" and not undo:  # torch itself stays patched without undo()
        from truegrad.backends.patch_torch import unpatch_torch

        unpatch_torch()
    assert all(ref() is None for ref in refs)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize("backend", ENGINE)
def test_a_backward_interrupted_between_two_uses_leaves_nothing(backend: str) -> None:
    """Finding 3: a hook raising between the backward of a parameter's two uses left the
    first use's per-sample gradients pending; the next clean step added them (1.6-5x)."""
    torch.manual_seed(0)
    model, x = Twice(), torch.randn(5, 4)
    expected = testing.sum_grad_squared_oracle(
        testing.plain_copy(model), lambda out, _: out.square().sum(), x
    ).sum_grad_squared
    with get_backend(backend).prepare(model):
        inner = torch.tanh(model.layer(x))

        def boom(_: torch.Tensor) -> None:
            raise RuntimeError("boom")

        inner.register_hook(boom)
        out = model.head(model.layer(inner))
        with pytest.raises(RuntimeError, match="boom"):
            out.square().sum().backward()
        model.zero_grad()
        statistic.clear(model.parameters())
        _step(model, x)
        for name, p in model.named_parameters():
            torch.testing.assert_close(statistic.get(p), expected[name], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- lifetime


CLEARS = {
    "model.zero_grad()": lambda model: model.zero_grad(),
    "SGD.zero_grad()": lambda model: torch.optim.SGD(model.parameters(), lr=0.1).zero_grad(),
    "p.grad = None": lambda model: [setattr(p, "grad", None) for p in model.parameters()],
    "set_to_none=False": lambda model: model.zero_grad(set_to_none=False),
}


@pytest.mark.parametrize("clear", list(CLEARS))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_the_statistic_dies_with_the_gradient(backend: str, clear: str) -> None:
    """Finding 4: clearing the gradient by anything but TGAdamW left the statistic, and the
    next backward added to it (TGAdamW then stepped with the sum of two batches)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(5, 3)
    expected = testing.sum_grad_squared_oracle(
        testing.plain_copy(model), lambda out, _: out.square().sum(), x
    ).sum_grad_squared
    chosen = get_backend(backend)
    with chosen.prepare(model):
        for _ in range(2):
            with chosen.backward_context():
                _step(model, x)
            CLEARS[clear](model)
            if clear != "set_to_none=False":  # (the gradient is gone: so is the statistic)
                assert not any(statistic.has(p) for p in model.parameters())
        with chosen.backward_context():
            _step(model, x)
        for name, p in model.named_parameters():
            torch.testing.assert_close(statistic.get(p), expected[name], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_accumulation_without_clearing_still_adds(backend: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(5, 3)
    expected = testing.sum_grad_squared_oracle(
        testing.plain_copy(model), lambda out, _: out.square().sum(), x
    ).sum_grad_squared
    chosen = get_backend(backend)
    with chosen.prepare(model):
        for _ in range(3):
            with chosen.backward_context():
                _step(model, x)
        for name, p in model.named_parameters():
            torch.testing.assert_close(statistic.get(p), 3 * expected[name], rtol=1e-5, atol=1e-9)
