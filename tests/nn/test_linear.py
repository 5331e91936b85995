"""truegrad.nn.Linear and truegrad.nn.functional.linear against torch and the exact oracle."""

from __future__ import annotations

import warnings

import pytest
import torch

from truegrad import nn, statistic, testing
from truegrad.nn import functional as TF

from grads import assert_close_to_rounding, assert_grad_matches, grad_mode, grad_modes
from harness import Problem, check


class FunctionalLinear(torch.nn.Linear):
    """A custom module calling the functional API (as a user's own module would)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.linear(x, self.weight, self.bias)


PROBLEMS = [
    Problem("2d", lambda: nn.Linear(5, 4), lambda: torch.randn(6, 5)),
    Problem("2d-nobias", lambda: nn.Linear(5, 4, bias=False), lambda: torch.randn(6, 5)),
    Problem("3d-seq", lambda: nn.Linear(5, 4), lambda: torch.randn(3, 7, 5)),
    Problem("4d", lambda: nn.Linear(5, 4), lambda: torch.randn(3, 2, 3, 5)),
    Problem("1-sample", lambda: nn.Linear(5, 4), lambda: torch.randn(1, 3, 5)),
    Problem("mlp", lambda: torch.nn.Sequential(nn.Linear(5, 8), torch.nn.GELU(), nn.Linear(8, 2)),
            lambda: torch.randn(4, 3, 5)),
    Problem("functional", lambda: FunctionalLinear(5, 3), lambda: torch.randn(4, 2, 5)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("problem", PROBLEMS, ids=[p.id for p in PROBLEMS])
def test_linear_matches_torch_and_oracle(problem: Problem, reduction: str, dtype: torch.dtype) -> None:
    check(problem, reduction, dtype)


def test_mixing_with_torch_nn_covers_exactly_the_truegrad_layers() -> None:
    model = torch.nn.Sequential(nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(6, 5)
    loss_fn = lambda o, _: o.square().mean()  # noqa: E731
    testing.assert_matches_oracle(model, loss_fn, x, params=["0.weight", "0.bias"])
    assert not statistic.has(model[2].weight) and not statistic.has(model[2].bias)


def test_is_a_drop_in_subclass_with_the_same_state_dict() -> None:
    layer = nn.Linear(3, 2)
    assert isinstance(layer, torch.nn.Linear)
    ref = torch.nn.Linear(3, 2)
    assert layer.state_dict().keys() == ref.state_dict().keys()
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3)
    assert torch.equal(layer(x), ref(x))
    assert nn.REGISTRY.lookup(nn.Linear).torch_type is torch.nn.Linear


@pytest.mark.parametrize("lead", [(), (2,)], ids=["2d", "3d"])
def test_accumulates_over_two_backward_passes(lead: tuple[int, ...]) -> None:
    """Statistic and gradient of two backward passes are the sums of each (on 2-D input the
    first pass takes the paired matmul, the second, with p.grad present, two plain ones)."""
    layer = nn.Linear(4, 3)
    x1, x2 = torch.randn(5, *lead, 4), torch.randn(3, *lead, 4)
    loss_fn = lambda o, _: o.square().sum()  # noqa: E731
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(layer.state_dict())
    layer(x1).square().sum().backward()
    first = layer.weight.sum_grad_squared.clone()
    layer(x2).square().sum().backward()
    loss_fn(twin(x1), None).backward()
    loss_fn(twin(x2), None).backward()
    second = testing.sum_grad_squared_oracle(twin, loss_fn, x2).sum_grad_squared["weight"]
    torch.testing.assert_close(layer.weight.sum_grad_squared, first + second, rtol=1e-5, atol=1e-7)
    assert_close_to_rounding(layer.weight.grad, twin.weight.grad)
    assert torch.equal(layer.bias.grad, twin.bias.grad)


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5)], ids=["2d", "3d"])
def test_layer_called_twice_is_exact(shape: tuple[int, ...]) -> None:
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(5, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(torch.tanh(self.layer(x)))

    testing.assert_matches_oracle(Twice(), lambda o, _: o.square().mean(), torch.randn(*shape))


@pytest.mark.parametrize("chunk_bytes", [16, 2 * 5 * 5 * 4 * 2], ids=["1-sample", "2-samples"])
def test_shared_use_over_the_memory_bound_is_exact(chunk_bytes: int) -> None:
    """Per-sample gradients of a layer called twice do not fit the bound: each use keeps its
    operands and the last one forms both chunk by chunk (it used to add the per-use squares,
    an approximation with a warning)."""

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(5, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(torch.tanh(self.layer(x)))

    with nn.settings.configure(chunk_bytes=chunk_bytes), warnings.catch_warnings():
        warnings.simplefilter("error")
        testing.assert_matches_oracle(Twice(), lambda o, _: o.square().mean(), torch.randn(7, 3, 5))


def test_model_calls_with_different_batch_sizes_give_no_statistic_and_a_reason() -> None:
    """Two calls of one model in one backward, with 4 and 6 samples: sample n of one call
    cannot be paired with a sample of the other, so the shared weight gets no statistic
    (never the per-call squares added) and the reason names it."""
    from truegrad import _names, parameter

    model = torch.nn.Sequential(nn.Linear(5, 5), torch.nn.Tanh(), nn.Linear(5, 2))
    _names.remember(model)
    (model(torch.randn(4, 5)).sum() + model(torch.randn(6, 5)).sum()).backward()
    for name in ("0.weight", "0.bias", "2.weight"):
        param = model.get_parameter(name)
        assert param.grad is not None and not statistic.has(param), name
    reason = parameter.reason(model[0].weight)
    assert "'0.weight'" in reason and "different batch sizes (6 and 4)" in reason, reason
    model.zero_grad()
    model(torch.randn(4, 5)).sum().backward()  # the next backward is exact again
    assert statistic.has(model[0].weight)


def test_chunked_and_unchunked_agree() -> None:
    layer = nn.Linear(6, 5)
    x = torch.randn(9, 4, 6)
    layer(x).square().sum().backward()
    whole, whole_grad = layer.weight.sum_grad_squared.clone(), layer.weight.grad.clone()
    layer.zero_grad()
    statistic.clear(layer.parameters())
    with nn.settings.configure(chunk_bytes=2 * 5 * 6 * 4):  # 2 samples' products per chunk
        layer(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.sum_grad_squared, whole, rtol=1e-6, atol=0)
    assert_close_to_rounding(layer.weight.grad, whole_grad)


@grad_modes
@pytest.mark.parametrize("shape", [(7, 4, 6), (9, 6)], ids=["3d", "2d"])
def test_weight_grad_is_torchs_bitwise_or_computed_with_the_statistic(
    mode: str, shape: tuple[int, ...]
) -> None:
    """On (N, T, D) the per-sample products are formed anyway and by default p.grad is their
    sum (one matmul saved); on (N, D) on CPU the gradient and the statistic are one batched
    matmul of two. Either is within rounding of torch's; under bitwise_grad p.grad is torch's
    own matmul, bitwise. The bias gradient and the statistic are the same either way."""
    layer = nn.Linear(6, 5)
    twin = torch.nn.Linear(6, 5)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(*shape)
    twin(x).square().mean().backward()
    with grad_mode(mode):
        layer(x).square().mean().backward()
        assert_grad_matches(layer.weight.grad, twin.weight.grad)  # mode-aware (grads.py)
    assert torch.equal(layer.bias.grad, twin.bias.grad)
    expected = testing.sum_grad_squared_oracle(twin, lambda o, _: o.square().mean(), x)
    torch.testing.assert_close(
        layer.weight.sum_grad_squared, expected.sum_grad_squared["weight"], rtol=1e-5, atol=1e-9
    )


def test_bitwise_grad_setting_is_validated_and_restored() -> None:
    assert nn.settings.bitwise_grad is False
    with pytest.raises(TypeError, match=r"bitwise_grad must be True or False \(a bool\), got 'no'"):
        with nn.settings.configure(bitwise_grad="no"):  # type: ignore[arg-type]
            pass
    with nn.settings.configure(bitwise_grad=True):
        assert nn.settings.bitwise_grad is True
    assert nn.settings.bitwise_grad is False


def test_position_granularity_is_the_per_position_approximation() -> None:
    layer = nn.Linear(3, 2)
    layer.granularity = "position"
    x = torch.randn(4, 5, 3)
    layer(x).sum().backward()
    # d(sum)/dy = 1 everywhere: per-position squares sum to sum_{n,t} x**2 per column.
    expected = (x**2).sum((0, 1)).expand(2, 3)
    torch.testing.assert_close(layer.weight.sum_grad_squared, expected)
    torch.testing.assert_close(layer.bias.sum_grad_squared, torch.full((2,), 20.0))
    with pytest.raises(ValueError, match="granularity must be one of"):
        TF.linear(x, layer.weight, granularity="token")  # type: ignore[arg-type]


def test_bf16_autocast_statistic_close_to_float32() -> None:
    model = torch.nn.Sequential(nn.Linear(16, 32), torch.nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(8, 6, 16)
    model(x).square().mean().backward()
    full = {n: p.sum_grad_squared.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    statistic.clear(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for n, p in model.named_parameters():
        s = p.sum_grad_squared
        assert s.dtype == torch.float32 and p.grad.dtype == torch.float32
        rel = ((s - full[n]).norm() / full[n].norm()).item()
        assert rel < 2e-2, (n, rel)


def test_bf16_autocast_grad_is_torchs_bitwise() -> None:
    layer = nn.Linear(8, 4)
    twin = torch.nn.Linear(8, 4)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(5, 3, 8)
    for m in (layer, twin):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x).float().square().sum().backward()
    assert torch.equal(layer.weight.grad, twin.weight.grad)
    assert torch.equal(layer.bias.grad, twin.bias.grad)


def test_fp16_loss_scaled_gradients_do_not_overflow() -> None:
    layer = nn.Linear(8, 4).half()
    x = torch.randn(4, 3, 8, dtype=torch.float16)
    scale = 2.0**24
    out = layer(x)
    out.backward(torch.full_like(out, 1e-3) * scale)  # dy of 1.7e4: fp16-representable
    s = layer.weight.sum_grad_squared
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    dy = torch.full((4, 3, 4), 1e-3 * scale)
    per_sample = torch.einsum("nto,nti->noi", dy, x.float())
    torch.testing.assert_close(s, per_sample.square().sum(0), rtol=1e-3, atol=0)


def test_cauchy_schwarz_and_single_sample() -> None:
    model = torch.nn.Sequential(nn.Linear(4, 6), torch.nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(7, 3, 4)
    model(x).square().mean().backward()
    for p in model.parameters():
        assert (p.sum_grad_squared >= 0).all()
        assert (7 * p.sum_grad_squared >= p.grad**2 * (1 - 1e-5) - 1e-10).all()
    model.zero_grad()
    statistic.clear(model.parameters())
    model(x[:1]).square().mean().backward()
    for p in model.parameters():
        torch.testing.assert_close(p.sum_grad_squared, p.grad**2, rtol=1e-5, atol=1e-10)


def test_frozen_and_no_grad() -> None:
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    layer(torch.randn(4, 3)).sum().backward()
    assert statistic.has(layer.weight) and not statistic.has(layer.bias)
    with torch.no_grad():
        layer(torch.randn(4, 3))


def test_gradient_penalty_through_autograd_grad_leaves_the_statistic_alone() -> None:
    layer = nn.Linear(4, 3)
    x = torch.randn(6, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    assert not statistic.has(layer.weight) and layer.weight.grad is None
    # the penalty's own backward does reach the weight: like p.grad, the statistic is written
    gx.square().sum().backward()
    assert layer.weight.grad is not None
