"""Every private part of torch that truegrad reaches into (``truegrad/_compat.py``), checked
against the installed torch: a release that moves one fails here, not silently in the engine."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import truegrad
from truegrad import _compat
from truegrad.backends import get_backend


class _KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor | None = None, *, scale: float = 1.0) -> torch.Tensor:
        return self.linear(x) * scale


def _kwargs_seen_by_a_global_pre_hook(model: nn.Module, *args: Any, **kwargs: Any) -> list[dict]:
    seen: list[dict] = []

    def hook(module: nn.Module, hook_args: tuple) -> None:
        if module is model:
            seen.append(dict(_compat.module_call_kwargs()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        model(*args, **kwargs)
    finally:
        handle.remove()
    return seen


def test_module_call_kwargs_reads_the_keywords_of_the_call() -> None:
    model = _KeywordModel()
    x = torch.randn(4, 3)
    [kwargs] = _kwargs_seen_by_a_global_pre_hook(model, x=x, scale=2.0)
    assert set(kwargs) == {"x", "scale"}
    assert kwargs["x"] is x and kwargs["scale"] == 2.0


def test_module_call_kwargs_is_empty_for_a_positional_call() -> None:
    model = _KeywordModel()
    assert _kwargs_seen_by_a_global_pre_hook(model, torch.randn(4, 3)) == [{}]


def test_module_call_kwargs_with_other_hooks_registered() -> None:
    """Per-module hooks with kwargs and forward hooks change ``_call_impl``'s path (the slow
    path through ``inner``); the keywords are still found."""
    model = _KeywordModel()
    model.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True)
    model.register_forward_hook(lambda m, a, o: None)
    x = torch.randn(4, 3)
    [kwargs] = _kwargs_seen_by_a_global_pre_hook(model, x=x)
    assert kwargs["x"] is x


def test_a_model_called_with_keywords_only_gets_its_samples() -> None:
    """The door that depends on it: a model holding ``truegrad.nn`` modules (global hooks)
    called as ``model(x=...)`` takes its samples from the keyword; the per-sample gradients of
    the inner layer, which sees ``(N, 5, 3)``, are summed over the 5 positions of a sample."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = truegrad.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.unsqueeze(1) * torch.arange(1.0, 6.0).view(1, 5, 1))

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(4, 3)
    expected = truegrad.testing.sum_grad_squared_oracle(
        truegrad.testing.plain_copy(model), lambda out, _: out.square().sum(), x
    )
    model(x=x).square().sum().backward()
    torch.testing.assert_close(model.inner.weight.sum_grad_squared, expected.sum_grad_squared["inner.weight"])
    torch.testing.assert_close(model.inner.bias.sum_grad_squared, expected.sum_grad_squared["inner.bias"])


def test_optimized_module_type_is_what_torch_compile_returns() -> None:
    model = nn.Linear(2, 2)
    assert type(torch.compile(model)) is _compat.optimized_module_type()
    with get_backend("auto").prepare(model):
        assert isinstance(torch.compile(model), _compat.optimized_module_type())
