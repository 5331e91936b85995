"""truegrad.nn.Bilinear and truegrad.nn.functional.bilinear against torch and the exact oracle."""

from __future__ import annotations

import pytest
import torch

from truegrad import parameter, nn, statistic, testing
from truegrad.nn import functional as TF

from harness import Problem, check, to_torch

# The oracle vmaps torch's own bilinear, which has no batching rule for aten::_trilinear.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


class FunctionalBilinear(torch.nn.Bilinear):
    """A custom module calling the functional API (as a user's own module would)."""

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return TF.bilinear(x1, x2, self.weight, self.bias)


class BilinearMLP(torch.nn.Module):
    """Two inputs mixed by a Bilinear, then a nonlinearity and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Bilinear(5, 4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(x1, x2)))


def _pair(*lead: int, in1: int = 5, in2: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(*lead, in1), torch.randn(*lead, in2)


PROBLEMS = [
    Problem("2d", lambda: nn.Bilinear(5, 4, 3), lambda: _pair(6)),
    Problem("2d-nobias", lambda: nn.Bilinear(5, 4, 3, bias=False), lambda: _pair(6)),
    Problem("2d-square", lambda: nn.Bilinear(4, 4, 2), lambda: _pair(5, in1=4, in2=4)),
    Problem("3d-seq", lambda: nn.Bilinear(5, 4, 3), lambda: _pair(3, 7)),
    Problem("3d-seq-nobias", lambda: nn.Bilinear(5, 4, 3, bias=False), lambda: _pair(3, 7)),
    Problem("4d", lambda: nn.Bilinear(5, 4, 3), lambda: _pair(3, 2, 3)),
    Problem("1-sample", lambda: nn.Bilinear(5, 4, 3), lambda: _pair(1, 4)),
    Problem("bilinear-mlp", BilinearMLP, lambda: _pair(4, 3)),
    Problem("functional-2d", lambda: FunctionalBilinear(5, 4, 3), lambda: _pair(6)),
    Problem("functional-3d", lambda: FunctionalBilinear(5, 4, 3), lambda: _pair(4, 2)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("problem", PROBLEMS, ids=[p.id for p in PROBLEMS])
def test_bilinear_matches_torch_and_oracle(
    problem: Problem, reduction: str, dtype: torch.dtype
) -> None:
    check(problem, reduction, dtype)


@pytest.mark.parametrize("lead", [(6,), (4, 3), (1,)], ids=["2d", "3d", "one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_grads_are_torchs_bitwise(lead: tuple[int, ...], dtype: torch.dtype) -> None:
    layer = nn.Bilinear(7, 5, 3).to(dtype)
    twin = torch.nn.Bilinear(7, 5, 3).to(dtype)
    twin.load_state_dict(layer.state_dict())
    x1, x2 = (t.to(dtype) for t in _pair(*lead, in1=7, in2=5))
    grads = []
    for m in (layer, twin):
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        y = m(a, b)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape))
        grads.append((y, m.weight.grad, m.bias.grad, a.grad, b.grad))
    for ours, theirs in zip(*grads):
        assert torch.equal(ours, theirs)


def test_unbatched_inputs_give_no_statistic() -> None:
    """Called with 1-D inputs, the model's samples (dim 0 of its input) are the layer's
    features: the statistic is absent with a reason; a batch of one sample is exact."""
    layer = nn.Bilinear(5, 4, 3)
    x1, x2 = torch.randn(5), torch.randn(4)
    layer(x1, x2).square().sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and not statistic.has(p)
        assert "samples" in parameter.reason(p)
    layer.zero_grad()
    layer(x1[None], x2[None]).square().sum().backward()
    for p in layer.parameters():
        torch.testing.assert_close(p.sum_grad_squared, p.grad**2, rtol=1e-5, atol=1e-10)


def test_is_a_drop_in_subclass_with_the_same_state_dict() -> None:
    layer = nn.Bilinear(3, 2, 4)
    assert isinstance(layer, torch.nn.Bilinear)
    ref = torch.nn.Bilinear(3, 2, 4)
    assert layer.state_dict().keys() == ref.state_dict().keys()
    layer.load_state_dict(ref.state_dict())
    x1, x2 = torch.randn(5, 3), torch.randn(5, 2)
    assert torch.equal(layer(x1, x2), ref(x1, x2))
    assert nn.REGISTRY.lookup(nn.Bilinear).torch_type is torch.nn.Bilinear


def test_accumulates_over_two_backward_passes() -> None:
    layer = nn.Bilinear(4, 3, 2)
    first_in, second_in = _pair(5, 2, in1=4, in2=3), _pair(3, 2, in1=4, in2=3)
    layer(*first_in).square().sum().backward()
    first = {n: p.sum_grad_squared.clone() for n, p in layer.named_parameters()}
    layer(*second_in).square().sum().backward()
    twin = torch.nn.Bilinear(4, 3, 2)
    twin.load_state_dict(layer.state_dict())
    loss_fn = lambda o, _: o.square().sum()  # noqa: E731
    second = testing.sum_grad_squared_oracle(twin, loss_fn, second_in).sum_grad_squared
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.sum_grad_squared, first[n] + second[n], rtol=1e-5, atol=1e-7)


def test_layer_called_twice_is_exact() -> None:
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Bilinear(4, 4, 4)

        def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.layer(torch.tanh(self.layer(x, z)), z)

    loss_fn = lambda o, _: o.square().mean()  # noqa: E731
    testing.assert_matches_oracle(Twice(), loss_fn, _pair(5, 3, in1=4, in2=4))


@pytest.mark.parametrize("lead", [(9, 4), (9,)], ids=["3d", "2d-shared"])
def test_chunked_and_unchunked_agree(lead: tuple[int, ...]) -> None:
    layer = nn.Bilinear(6, 5, 3)
    x1, x2 = _pair(*lead, in1=6, in2=5)
    layer(x1, x2).square().sum().backward()
    whole = {n: p.sum_grad_squared.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    statistic.clear(layer.parameters())
    with nn.settings.configure(chunk_bytes=2 * 3 * 6 * 5 * 4 * 2):  # 2 samples per chunk
        layer(x1, x2).square().sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.sum_grad_squared, whole[n], rtol=1e-6, atol=0)


def test_position_granularity_is_the_per_position_approximation() -> None:
    layer = nn.Bilinear(3, 2, 2)
    layer.granularity = "position"
    x1, x2 = _pair(4, 5, in1=3, in2=2)
    layer(x1, x2).sum().backward()
    # d(sum)/dy = 1 everywhere: per-position squares are sum_{n,t} x1[i]**2 x2[j]**2 per (i, j).
    expected = torch.einsum("nti,ntj->ij", x1**2, x2**2).expand(2, 3, 2)
    torch.testing.assert_close(layer.weight.sum_grad_squared, expected)
    torch.testing.assert_close(layer.bias.sum_grad_squared, torch.full((2,), 20.0))
    with pytest.raises(ValueError, match="granularity must be one of"):
        TF.bilinear(x1, x2, layer.weight, granularity="token")  # type: ignore[arg-type]


def test_bf16_autocast_statistic_close_to_float32_and_forward_dtype_is_torchs() -> None:
    model = BilinearMLP()
    twin = to_torch(model)
    x1, x2 = _pair(8, 6)
    model(x1, x2).square().mean().backward()
    full = {n: p.sum_grad_squared.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    statistic.clear(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x1, x2)
        assert model.mix(x1, x2).dtype == twin.mix(x1, x2).dtype
        assert out.dtype == twin(x1, x2).dtype == torch.bfloat16
    out.float().square().mean().backward()
    for n, p in model.named_parameters():
        s = p.sum_grad_squared
        assert s.dtype == torch.float32 and p.grad.dtype == torch.float32
        rel = ((s - full[n]).norm() / full[n].norm()).item()
        assert rel < 2e-2, (n, rel)


def test_frozen_no_grad_and_shape_errors_are_torchs() -> None:
    layer = nn.Bilinear(3, 2, 2)
    layer.bias.requires_grad_(False)
    layer(*_pair(4, in1=3, in2=2)).sum().backward()
    assert statistic.has(layer.weight) and not statistic.has(layer.bias)
    with torch.no_grad():
        layer(*_pair(4, in1=3, in2=2))
    with pytest.raises(RuntimeError, match="input batch dimensions do not match"):
        layer(torch.randn(4, 3), torch.randn(5, 2))
