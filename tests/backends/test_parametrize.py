"""Parametrizations registered on modules the engine already tracks.

``torch.nn.utils.parametrize`` re-registers the weight as ``torch.nn.Parameter(weight)``
(which needs ``detach()`` to keep a tensor subclass) and adds new parameters (weight_norm's
magnitude ``original0``) that no backend tracked when it prepared the model."""

from __future__ import annotations

import torch

import truegrad
from truegrad import parameter, statistic, testing
from truegrad.backends import get_backend


def _model(layers: object) -> torch.nn.Module:
    return torch.nn.Sequential(layers.Linear(3, 3), torch.nn.Tanh(), layers.Linear(3, 2))


def _expected(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return testing.sum_grad_squared_oracle(
        testing.plain_copy(model), lambda out, _: out.square().sum(), x
    ).sum_grad_squared


def _step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    statistic.clear(model.parameters())
    model(x).square().sum().backward()


def test_weight_norm_on_a_truegrad_nn_layer() -> None:
    """It crashed (``Parameter(TrueGradParameter)`` needs ``detach()`` to keep the subclass).
    The magnitude parameter is tracked from its first use on: no statistic (and the reason)
    for the first backward, whose earlier uses of it the engine may not have seen; exact
    from the second."""
    torch.manual_seed(0)
    model, x = _model(truegrad.nn), torch.randn(4, 3)
    torch.nn.utils.parametrizations.weight_norm(model[0])
    magnitude = model[0].parametrizations.weight.original0
    direction = model[0].parametrizations.weight.original1
    assert isinstance(direction, parameter.TrueGradParameter)
    expected = _expected(model, x)
    _step(model, x)
    assert not statistic.has(magnitude)
    assert "first seen in the middle of a forward" in parameter.reason(magnitude)
    _step(model, x)
    assert parameter.reason(magnitude) is None
    for name, p in model.named_parameters():
        torch.testing.assert_close(statistic.get(p), expected[name], rtol=1e-5, atol=1e-9)


def test_parametrization_registered_after_prepare_names_what_to_do() -> None:
    torch.manual_seed(0)
    model, x = _model(torch.nn), torch.randn(4, 3)
    handle = get_backend("auto").prepare(model)
    torch.nn.utils.parametrizations.weight_norm(model[0])
    expected = _expected(model, x)
    _step(model, x)
    magnitude = model[0].parametrizations.weight.original0
    assert not statistic.has(magnitude)
    assert "prepare the model again" in get_backend("auto").coverage(model)[
        "0.parametrizations.weight.original0"
    ]
    for name, p in model.named_parameters():
        if p is not magnitude:
            torch.testing.assert_close(statistic.get(p), expected[name], rtol=1e-5, atol=1e-9)
    handle.undo()
    with get_backend("auto").prepare(model):  # prepared again: every parameter exact
        _step(model, x)
        for name, p in model.named_parameters():
            torch.testing.assert_close(statistic.get(p), expected[name], rtol=1e-5, atol=1e-9)


def test_state_dict_of_a_tracked_parameter_is_plain() -> None:
    """Only ``Parameter(p)`` keeps the subclass on detach; a state_dict stays plain tensors."""
    layer = truegrad.nn.Linear(2, 2)
    assert all(type(t) is torch.Tensor for t in layer.state_dict().values())
    assert type(layer.weight.detach()) is torch.Tensor
    assert type(torch.nn.Parameter(layer.weight)) is parameter.TrueGradParameter
