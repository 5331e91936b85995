"""Settings-as-data harness for truegrad.nn: one Problem per module configuration.

``check(problem, reduction, dtype)`` builds the truegrad model and a plain-torch twin
with the same weights, runs one forward/backward on both, and asserts:

* the outputs are equal (bitwise where the truegrad forward calls torch's own op);
* ``p.grad`` equals torch's (float64: 1e-10; float32: up to rounding, see ``grads.py``);
* ``p.sum_grad_squared`` equals the torch.func oracle of docs/statistic.md computed on the
  plain-torch twin (float32: rtol 1e-4, atol 1e-6 x max; float64: rtol 1e-9), or the
  problem's own layer-level oracle where samples interact (BatchNorm in training mode).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from truegrad import testing

from grads import assert_close_to_rounding


@dataclasses.dataclass(frozen=True)
class Problem:
    """One configuration to check.

    Attributes:
        id: readable test id.
        module_fn: builds the model from ``truegrad.nn`` modules (float32, seeded by the caller).
        input_fn: builds the inputs: a tensor, a tuple of positional args or a dict of kwargs.
        output_fn: picks the differentiable output from the model's return value.
        batch_dim: the batch dimension of inputs and outputs.
        layer_oracle: for layers whose samples interact: ``(torch_model, inputs, loss_fn) ->
            {name: sum_grad_squared}``; the torch.func oracle is used otherwise.
        exact_forward: whether the forward output must be bitwise torch's.
    """

    id: str
    module_fn: Callable[[], torch.nn.Module]
    input_fn: Callable[[], Any]
    output_fn: Callable[[Any], torch.Tensor] = lambda out: out
    batch_dim: int = 0
    layer_oracle: Callable[..., dict[str, torch.Tensor]] | None = None
    exact_forward: bool = True


def to_torch(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` that is plain torch (modules and parameters)."""
    return testing.plain_copy(model)


def _cast_inputs(inputs: Any, dtype: torch.dtype) -> Any:
    cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
    if isinstance(inputs, dict):
        return {k: cast(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(cast(v) for v in inputs)
    return cast(inputs)


def _call(model: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def make_loss(problem: Problem, reduction: str, target: torch.Tensor) -> Callable[[Any, Any], torch.Tensor]:
    def loss_fn(out: Any, _: Any) -> torch.Tensor:
        y = problem.output_fn(out)
        return torch.nn.functional.mse_loss(y, target.to(y.dtype), reduction=reduction)

    return loss_fn


def check(problem: Problem, reduction: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = problem.module_fn().to(dtype)
    inputs = _cast_inputs(problem.input_fn(), dtype)
    twin = to_torch(model)

    # Forwards for comparison run without recording a graph, so that the one recorded
    # forward per model is the one that is backwarded.
    with torch.no_grad():
        out = problem.output_fn(_call(model, inputs))
        out_twin = problem.output_fn(_call(twin, inputs))
    target = torch.randn_like(out)
    loss_fn = make_loss(problem, reduction, target)
    if problem.exact_forward:
        assert torch.equal(out, out_twin), "forward differs from torch"
    else:
        torch.testing.assert_close(out, out_twin)

    loss_fn(_call(model, inputs), None).backward()
    loss_fn(_call(twin, inputs), None).backward()
    if problem.layer_oracle is not None:
        expected_sgs = problem.layer_oracle(to_torch(model), inputs, loss_fn)
    else:
        expected_sgs = testing.sum_grad_squared_oracle(
            twin, loss_fn, inputs, batch_dim=problem.batch_dim
        ).sum_grad_squared
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    problems = testing.compare_to_oracle(
        model,
        testing.OracleResult(grad=grads, sum_grad_squared=expected_sgs),
        rtol=rtol,
        atol_factor=1e-12 if dtype == torch.float64 else 1e-6,
        check_grad=False,
    )
    assert not problems, "\n".join(problems)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close_to_rounding(p.grad, grads[name], name)
            assert p.sum_grad_squared.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
