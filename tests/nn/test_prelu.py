"""truegrad.nn.PReLU and truegrad.nn.functional.prelu against torch and the exact oracle."""

from __future__ import annotations

import pytest
import torch

from truegrad import parameter, nn, statistic, testing
from truegrad.nn import functional as TF

from harness import Problem, check, to_torch


class FunctionalPReLU(torch.nn.Module):
    """A custom module calling the functional API with a weight of any shape torch accepts."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.prelu(x, self.weight)


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(nn.Linear(5, 6), nn.PReLU(6), nn.Linear(6, 3), nn.PReLU())


PROBLEMS = [
    Problem("2d-per-channel", lambda: nn.PReLU(5), lambda: torch.randn(7, 5)),
    Problem("2d-shared", lambda: nn.PReLU(), lambda: torch.randn(7, 5)),
    Problem("3d-per-channel", lambda: nn.PReLU(4), lambda: torch.randn(3, 4, 6)),
    Problem("3d-shared", lambda: nn.PReLU(), lambda: torch.randn(3, 4, 6)),
    Problem("4d-per-channel", lambda: nn.PReLU(3), lambda: torch.randn(4, 3, 5, 2)),
    Problem("4d-shared", lambda: nn.PReLU(1, init=-0.5), lambda: torch.randn(4, 3, 5, 2)),
    Problem("5d-per-channel", lambda: nn.PReLU(2), lambda: torch.randn(2, 2, 3, 2, 2)),
    Problem("1d-shared", lambda: nn.PReLU(), lambda: torch.randn(9)),
    Problem("one-channel", lambda: nn.PReLU(1), lambda: torch.randn(5, 1, 4)),
    Problem("1-sample", lambda: nn.PReLU(3), lambda: torch.randn(1, 3, 4)),
    Problem("mlp", _mlp, lambda: torch.randn(6, 5)),
    Problem("functional-vector", lambda: FunctionalPReLU(torch.linspace(-1, 1, 4)),
            lambda: torch.randn(5, 4, 3)),
    Problem("functional-0d-weight", lambda: FunctionalPReLU(torch.tensor(0.3)),
            lambda: torch.randn(5, 4, 3)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("problem", PROBLEMS, ids=[p.id for p in PROBLEMS])
def test_prelu_matches_torch_and_oracle(
    problem: Problem, reduction: str, dtype: torch.dtype
) -> None:
    check(problem, reduction, dtype)


@pytest.mark.parametrize(
    "shape,channels",
    [((6, 4, 5, 5), 4), ((6, 4, 5, 5), 1), ((30,), 1), ((), 1), ((7, 5), 5)],
    ids=["4d-channels", "4d-shared", "1d", "0d", "2d"],
)
@pytest.mark.parametrize("autocast", [False, True], ids=["f32", "bf16-autocast"])
def test_grads_are_torchs_bitwise(shape: tuple[int, ...], channels: int, autocast: bool) -> None:
    layer = nn.PReLU(channels, init=-0.3)
    twin = to_torch(layer)
    x = torch.randn(shape)
    results = []
    for m in (layer, twin):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(xi)
        y.float().mul(torch.linspace(-2, 2, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y, m.weight.grad, xi.grad))
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_zero_dim_input_has_no_samples_and_no_statistic() -> None:
    """A model's samples are dim 0 of its input (docs/statistic.md); a 0-d input has none, so the
    statistic is absent with the reason recorded, never some other number."""
    layer = nn.PReLU()
    layer(torch.tensor(-1.5)).square().backward()
    assert layer.weight.grad is not None and not statistic.has(layer.weight)
    assert "no op on the way sees the samples" in parameter.reason(layer.weight)
    layer.zero_grad()
    layer(torch.tensor([-1.5])).square().sum().backward()  # a batch of one sample is exact
    torch.testing.assert_close(layer.weight.sum_grad_squared, layer.weight.grad**2)


def test_per_sample_gradient_sums_positions_before_squaring() -> None:
    layer = nn.PReLU(2, init=0.5)
    x = -torch.ones(3, 2, 4)  # all negative: dy/da = x at every position
    layer(x).sum().backward()
    # sample n: g_n[c] = sum_p x = -4, so sum_n g_n**2 = 3 * 16 per channel (not 3 * 4 * 1)
    torch.testing.assert_close(layer.weight.sum_grad_squared, torch.full((2,), 48.0))


def test_is_a_drop_in_subclass_with_the_same_state_dict() -> None:
    layer = nn.PReLU(3)
    assert isinstance(layer, torch.nn.PReLU)
    ref = torch.nn.PReLU(3, init=0.1)
    assert layer.state_dict().keys() == ref.state_dict().keys()
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 2)
    assert torch.equal(layer(x), ref(x))
    assert nn.REGISTRY.lookup(nn.PReLU).torch_type is torch.nn.PReLU


def test_accumulates_over_two_backward_passes() -> None:
    layer = nn.PReLU(3)
    x1, x2 = torch.randn(5, 3, 4), torch.randn(2, 3, 4)
    layer(x1).square().sum().backward()
    first = layer.weight.sum_grad_squared.clone()
    layer(x2).square().sum().backward()
    twin = to_torch(layer)
    loss_fn = lambda o, _: o.square().sum()  # noqa: E731
    second = testing.sum_grad_squared_oracle(twin, loss_fn, x2).sum_grad_squared["weight"]
    torch.testing.assert_close(layer.weight.sum_grad_squared, first + second, rtol=1e-5, atol=1e-7)


class Twice(torch.nn.Module):
    """One PReLU applied twice in one forward (a shared parameter)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.act = nn.PReLU(channels, init=-0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(torch.tanh(self.act(x)) - 0.3)


@pytest.mark.parametrize("channels", [1, 3], ids=["shared", "per-channel"])
def test_layer_called_twice_is_exact(channels: int) -> None:
    loss_fn = lambda o, _: o.square().mean()  # noqa: E731
    testing.assert_matches_oracle(Twice(channels), loss_fn, torch.randn(6, 3, 4))


@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_chunked_and_unchunked_agree(twice: bool) -> None:
    model = Twice(3) if twice else nn.PReLU(3, init=-0.4)
    x = torch.randn(9, 3, 4)
    model(x).square().sum().backward()
    whole = {n: p.sum_grad_squared.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    statistic.clear(model.parameters())
    # Per-sample gradients are only (N, C): a single use takes the exact squared shortcut, a
    # shared use keeps its 9 * 3 * 4 bytes of pending sums, which just fit in the bound.
    with nn.settings.configure(chunk_bytes=9 * 3 * 4):
        model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.sum_grad_squared, whole[n], rtol=1e-6, atol=0)


def test_position_granularity_is_the_per_position_approximation() -> None:
    layer = nn.PReLU(2, init=0.5)
    layer.granularity = "position"
    x = -torch.ones(3, 2, 4)
    layer(x).sum().backward()
    # every (sample, position) is its own sample: 12 squares of 1 per channel
    torch.testing.assert_close(layer.weight.sum_grad_squared, torch.full((2,), 12.0))
    shared = nn.PReLU(1)
    shared.granularity = "position"
    shared(x).sum().backward()  # per position the two channels add up: 12 squares of 2
    torch.testing.assert_close(shared.weight.sum_grad_squared, torch.full((1,), 48.0))
    with pytest.raises(ValueError, match="granularity must be one of"):
        TF.prelu(x, layer.weight, granularity="pixel")  # type: ignore[arg-type]


def test_bf16_autocast_statistic_close_to_float32_and_forward_dtype_is_torchs() -> None:
    model = _mlp()
    twin = to_torch(model)
    x = torch.randn(16, 5)
    model(x).square().mean().backward()
    full = {n: p.sum_grad_squared.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    statistic.clear(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == twin(x).dtype == torch.bfloat16
    out.float().square().mean().backward()
    for n, p in model.named_parameters():
        s = p.sum_grad_squared
        assert s.dtype == torch.float32 and p.grad.dtype == torch.float32
        rel = ((s - full[n]).norm() / full[n].norm()).item()
        assert rel < 2e-2, (n, rel)


def test_frozen_no_grad_and_torchs_errors() -> None:
    layer = nn.PReLU(3)
    layer.weight.requires_grad_(False)
    x = torch.randn(4, 3, requires_grad=True)
    layer(x).sum().backward()
    assert not statistic.has(layer.weight) and x.grad is not None
    with torch.no_grad():
        assert torch.equal(nn.PReLU(3)(x), torch.nn.PReLU(3)(x))
    with pytest.raises(RuntimeError, match="Mismatch of parameter numbers and input channel size"):
        nn.PReLU(4)(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="Mismatch of parameter numbers and input channel size"):
        nn.PReLU(3)(torch.randn(3))  # 1-D input has no channel dim
    with pytest.raises(RuntimeError, match="Expected `weight` to be a scalar or 1D tensor"):
        TF.prelu(torch.randn(2, 4), torch.nn.Parameter(torch.ones(2, 2)))
