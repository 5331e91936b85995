"""truegrad.nn convolutions (Conv1d/2d/3d, ConvTranspose1d/2d/3d) and their functionals
against torch and the exact oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from truegrad import parameter, nn, statistic, testing
from truegrad.nn import settings
from truegrad.nn import functional as TF

from grads import GRAD_MODES, assert_close_to_rounding, assert_grad_matches, grad_mode
from harness import Problem, check, to_torch

# torch's own "same" padding with an even kernel warns once that it copies the input.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


class FunctionalConvs(torch.nn.Module):
    """A custom module calling every conv functional (as a user's own module would)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(4, 2, 3) * 0.3)
        self.b1 = torch.nn.Parameter(torch.randn(4))
        self.w2 = torch.nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)
        self.w3 = torch.nn.Parameter(torch.randn(2, 2, 2, 2, 2) * 0.3)
        self.t1 = torch.nn.Parameter(torch.randn(4, 3, 3) * 0.3)
        self.tb1 = torch.nn.Parameter(torch.randn(3))
        self.t2 = torch.nn.Parameter(torch.randn(4, 2, 2, 2) * 0.3)
        self.t3 = torch.nn.Parameter(torch.randn(2, 1, 2, 2, 2) * 0.3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        y1 = TF.conv_transpose1d(TF.conv1d(x1, self.w1, self.b1, 2, 1), self.t1, self.tb1, 2, 1, 1)
        y2 = TF.conv_transpose2d(TF.conv2d(x2, self.w2, None, 1, "same"), self.t2, stride=2)
        y3 = TF.conv_transpose3d(TF.conv3d(x3, self.w3, padding="valid"), self.t3, dilation=2)
        return torch.cat([y1.flatten(1), y2.flatten(1), y3.flatten(1)], 1)


class TransposeToSize(torch.nn.Module):
    """ConvTranspose2d called with ``output_size`` (picks output_padding per dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 3, stride=(2, 3), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x, output_size=[2 * x.shape[-2], 3 * x.shape[-1]])


def _cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="reflect"),
        torch.nn.Tanh(),
        nn.Conv2d(6, 6, 3, padding="same", groups=3),
        torch.nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
    )


PROBLEMS = [
    Problem("conv1d", lambda: nn.Conv1d(3, 4, 3), lambda: torch.randn(5, 3, 9)),
    Problem("conv1d-stride2-pad1", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(5, 3, 10)),
    Problem("conv1d-same-even-kernel", lambda: nn.Conv1d(3, 4, 4, padding="same"), lambda: torch.randn(4, 3, 9)),
    Problem("conv1d-replicate-groups2", lambda: nn.Conv1d(4, 6, 3, padding=2, padding_mode="replicate", groups=2),
            lambda: torch.randn(4, 4, 8)),
    Problem("conv2d", lambda: nn.Conv2d(3, 4, 3), lambda: torch.randn(4, 3, 6, 7)),
    Problem("conv2d-stride2-pad1", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(4, 3, 7, 8)),
    Problem("conv2d-same-dilation2", lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2),
            lambda: torch.randn(4, 3, 7, 6)),
    Problem("conv2d-same-asym-kernel", lambda: nn.Conv2d(3, 4, (2, 3), padding="same", dilation=(1, 2)),
            lambda: torch.randn(3, 3, 6, 7)),
    Problem("conv2d-valid-nobias", lambda: nn.Conv2d(3, 4, 3, padding="valid", bias=False),
            lambda: torch.randn(4, 3, 6, 6)),
    Problem("conv2d-reflect", lambda: nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode="reflect"),
            lambda: torch.randn(3, 3, 6, 7)),
    Problem("conv2d-replicate", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"),
            lambda: torch.randn(3, 3, 6, 7)),
    Problem("conv2d-circular-same", lambda: nn.Conv2d(3, 4, 4, padding="same", padding_mode="circular"),
            lambda: torch.randn(3, 3, 6, 7)),
    Problem("conv2d-groups2", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), lambda: torch.randn(4, 4, 5, 5)),
    Problem("conv2d-depthwise", lambda: nn.Conv2d(4, 8, 3, stride=2, groups=4), lambda: torch.randn(4, 4, 7, 7)),
    Problem("conv2d-1x1-output", lambda: nn.Conv2d(3, 5, 4), lambda: torch.randn(6, 3, 4, 4)),
    Problem("conv2d-batch1", lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: torch.randn(1, 3, 5, 5)),
    Problem("conv3d-stride2-pad1-groups2", lambda: nn.Conv3d(4, 4, 3, stride=2, padding=1, groups=2),
            lambda: torch.randn(3, 4, 5, 4, 5)),
    Problem("conv3d-circular-dilation2", lambda: nn.Conv3d(2, 3, 2, padding=1, dilation=2, padding_mode="circular"),
            lambda: torch.randn(3, 2, 4, 5, 4)),
    Problem("convT1d", lambda: nn.ConvTranspose1d(3, 4, 3), lambda: torch.randn(4, 3, 6)),
    Problem("convT1d-s2-op1-g2-d2",
            lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2),
            lambda: torch.randn(4, 4, 7)),
    Problem("convT2d-s2-op1-g2-d2",
            lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2),
            lambda: torch.randn(3, 4, 4, 5)),
    Problem("convT2d-nobias-1x1-input", lambda: nn.ConvTranspose2d(3, 4, 3, bias=False), lambda: torch.randn(5, 3, 1, 1)),
    Problem("convT2d-output-size", TransposeToSize, lambda: torch.randn(3, 3, 4, 3)),
    Problem("convT3d-s2-op1-g2-d2",
            lambda: nn.ConvTranspose3d(4, 2, 2, stride=2, padding=1, output_padding=1, groups=2, dilation=2),
            lambda: torch.randn(2, 4, 3, 3, 2)),
    Problem("cnn", _cnn, lambda: torch.randn(3, 3, 8, 8)),
    Problem("cnn-batch1", _cnn, lambda: torch.randn(1, 3, 8, 8)),
    Problem("functional", FunctionalConvs,
            lambda: (torch.randn(4, 2, 9), torch.randn(4, 2, 5, 5), torch.randn(4, 2, 4, 3, 4))),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("problem", PROBLEMS, ids=[p.id for p in PROBLEMS])
def test_conv_matches_torch_and_oracle(problem: Problem, reduction: str, dtype: torch.dtype) -> None:
    check(problem, reduction, dtype)


@pytest.mark.parametrize("problem", PROBLEMS, ids=[p.id for p in PROBLEMS])
def test_single_forward_matches_oracle(problem: Problem) -> None:
    # ``check`` runs two recorded forwards before one backward, so every parameter looks used
    # twice and goes through base.contribute's shared path; this runs exactly one forward, so
    # the chunked per-sample path and the squared shortcut (one position per sample) are used.
    torch.manual_seed(0)
    model = problem.module_fn().double()
    inputs = problem.input_fn()
    inputs = tuple(x.double() for x in inputs) if isinstance(inputs, tuple) else inputs.double()

    def loss_fn(out: torch.Tensor, _: object) -> torch.Tensor:
        weights = torch.linspace(-1, 2, out[0].numel(), dtype=out.dtype).reshape(out[0].shape)
        return (out * weights).square().sum()

    testing.assert_matches_oracle(model, loss_fn, inputs, rtol=1e-9, atol_factor=1e-12)


# Bitwise: output, input grad and parameter grads of the truegrad module equal torch's.
BITWISE = [
    (nn.Conv1d, (4, 6, 3), dict(stride=2, padding=1, groups=2), (3, 4, 9)),
    (nn.Conv2d, (4, 6, 4), dict(padding="same", dilation=(1, 2)), (3, 4, 7, 8)),
    (nn.Conv2d, (4, 6, 3), dict(padding=(1, 2), padding_mode="reflect"), (3, 4, 7, 8)),
    (nn.Conv2d, (4, 4, 3), dict(padding=1, padding_mode="circular", groups=4), (3, 4, 6, 6)),
    (nn.Conv3d, (4, 6, 3), dict(stride=(1, 2, 1), padding=1, padding_mode="replicate", bias=False), (2, 4, 5, 6, 4)),
    (nn.ConvTranspose1d, (4, 6, 3), dict(stride=2, padding=1, output_padding=1, groups=2, dilation=2), (3, 4, 9)),
    (nn.ConvTranspose2d, (4, 6, 3), dict(stride=2, padding=1, output_padding=1, groups=2, dilation=2), (3, 4, 5, 4)),
    (nn.ConvTranspose3d, (4, 6, 3), dict(stride=2, padding=1, output_padding=1, bias=False), (2, 4, 3, 4, 3)),
]


def _bitwise_case(cls: type, args: tuple, kwargs: dict, shape: tuple, autocast: bool) -> None:
    """Output and input gradient bitwise torch's; weight and bias gradients bitwise under
    ``bitwise_grad``, up to rounding without (see grads.py); under bf16 autocast always
    torch's (the per-sample sum is only used in the parameter dtype)."""
    torch.manual_seed(0)
    layer = cls(*args, **kwargs)
    twin = nn.REGISTRY.lookup(cls).torch_type(*args, **kwargs)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(shape)
    results = []
    for m in (layer, twin):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(xi)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype))
        results.append((out, xi.grad, *(p.grad for p in m.parameters())))
    for i, (mine, theirs) in enumerate(zip(*results)):
        if i < 2 or autocast:
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
        else:
            assert_grad_matches(mine, theirs)
    assert all(statistic.has(p) for p in layer.parameters())


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("autocast", [False, True], ids=["f32", "bf16-autocast"])
@pytest.mark.parametrize("case", BITWISE, ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(BITWISE)])
def test_forward_and_grads_are_torchs(case: tuple, autocast: bool, mode: str) -> None:
    with grad_mode(mode):
        _bitwise_case(*case, autocast=autocast)


def test_weight_grad_is_the_sum_of_the_per_sample_gradients_by_default() -> None:
    """The default forms p.grad from the per-sample gradients (no second weight-gradient
    convolution): not bitwise torch's in general, but within rounding of it."""
    layer = nn.Conv2d(3, 4, 3)
    twin = torch.nn.Conv2d(3, 4, 3)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(6, 3, 9, 9)
    layer(x).square().sum().backward()
    twin(x).square().sum().backward()
    per_sample = testing.per_sample_grads(to_torch(layer), lambda o, _: o.square().sum(), x)
    assert not settings.bitwise_grad
    assert_close_to_rounding(layer.weight.grad, per_sample["weight"].sum(0))
    assert_close_to_rounding(layer.weight.grad, twin.weight.grad)


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_functionals_are_torchs(dim: int, mode: str) -> None:
    with grad_mode(mode):
        _functionals_case(dim)


def _functionals_case(dim: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, *[5] * dim)
    w = torch.randn(6, 2, *[3] * dim, requires_grad=True)
    wt = torch.randn(6, 2, *[2] * dim, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    results = []
    for conv, conv_t in ((getattr(TF, f"conv{dim}d"), getattr(TF, f"conv_transpose{dim}d")),
                         (getattr(F, f"conv{dim}d"), getattr(F, f"conv_transpose{dim}d"))):
        xi = x.clone().requires_grad_()
        y = conv(xi, w, b, 1, "same", 2, 2)
        out = conv_t(y, wt, None, 2, 1, 1, 2, 1)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        results.append((out.detach(), xi.grad, w.grad, b.grad, wt.grad))
        w.grad = b.grad = wt.grad = None
    for i, (mine, theirs) in enumerate(zip(*results)):
        if i < 2:
            assert torch.equal(mine, theirs)
        else:
            assert_grad_matches(mine, theirs)


def test_mixing_with_torch_nn_covers_exactly_the_truegrad_layers() -> None:
    model = torch.nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3, stride=2),
        torch.nn.Flatten(), nn.Linear(8, 3),
    )
    x = torch.randn(5, 3, 6, 6)
    loss_fn = lambda o, _: o.square().mean()  # noqa: E731
    testing.assert_matches_oracle(model, loss_fn, x, params=["0.weight", "0.bias", "4.weight", "4.bias"])
    assert not statistic.has(model[2].weight) and not statistic.has(model[2].bias)


@pytest.mark.parametrize("name", ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"])
def test_is_a_drop_in_subclass_with_the_same_state_dict(name: str) -> None:
    layer = getattr(nn, name)(4, 2, 3, groups=2)
    ref = getattr(torch.nn, name)(4, 2, 3, groups=2)
    assert isinstance(layer, getattr(torch.nn, name))
    assert layer.state_dict().keys() == ref.state_dict().keys()
    layer.load_state_dict(ref.state_dict())
    dim = int(name[-2])
    x = torch.randn(2, 4, *[4] * dim)
    assert torch.equal(layer(x), ref(x))
    assert nn.REGISTRY.lookup(getattr(nn, name)).torch_type is getattr(torch.nn, name)


def test_converted_in_place_by_class_assignment() -> None:
    layer = torch.nn.Conv2d(3, 4, 3, padding_mode="circular", padding=1)
    ref = torch.nn.Conv2d(3, 4, 3, padding_mode="circular", padding=1)
    ref.load_state_dict(layer.state_dict())
    layer.__class__ = nn.Conv2d
    x = torch.randn(2, 3, 5, 5)
    layer(x).sum().backward()
    ref(x).sum().backward()
    assert_grad_matches(layer.weight.grad, ref.weight.grad)
    assert statistic.has(layer.weight)


def test_accumulates_over_two_backward_passes() -> None:
    layer = nn.Conv2d(3, 4, 3, padding=1)
    x1, x2 = torch.randn(4, 3, 5, 5), torch.randn(3, 3, 5, 5)
    layer(x1).square().sum().backward()
    first = {n: p.sum_grad_squared.clone() for n, p in layer.named_parameters()}
    layer(x2).square().sum().backward()
    twin = torch.nn.Conv2d(3, 4, 3, padding=1)
    twin.load_state_dict(layer.state_dict())
    loss_fn = lambda o, _: o.square().sum()  # noqa: E731
    second = testing.sum_grad_squared_oracle(twin, loss_fn, x2).sum_grad_squared
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.sum_grad_squared, first[n] + second[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_chunked_and_unchunked_agree(transposed: bool) -> None:
    if transposed:
        layer = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    else:
        layer = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(9, 4, 5, 5)
    layer(x).square().sum().backward()
    whole = {n: p.sum_grad_squared.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    statistic.clear(layer.parameters())
    with nn.settings.configure(chunk_bytes=2 * layer.weight.numel() * 4 * 2):  # 2 samples per chunk
        layer(x).square().sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.sum_grad_squared, whole[n], rtol=1e-6, atol=1e-7)


def test_layer_called_twice_is_exact() -> None:
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.tanh(self.conv(x)))

    testing.assert_matches_oracle(Twice(), lambda o, _: o.square().mean(), torch.randn(4, 3, 5, 5))


def test_unbatched_input_gives_no_statistic() -> None:
    """An unbatched (C, H, W) model input: the model's samples (its dim 0) are the conv's
    channels, so the statistic is absent with the reason; (1, C, H, W) is one exact sample."""
    layer = nn.Conv2d(3, 4, 3, stride=2)
    ref = torch.nn.Conv2d(3, 4, 3, stride=2)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 7, 7)
    out = layer(x)
    assert torch.equal(out, ref(x))
    out.square().sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and not statistic.has(p)
        assert "unbatched" in parameter.reason(p)
    layer.zero_grad()
    layer(x[None]).square().sum().backward()
    for p in layer.parameters():
        torch.testing.assert_close(p.sum_grad_squared, p.grad**2, rtol=1e-5, atol=1e-8)


def test_position_granularity_conv_is_the_per_output_position_statistic() -> None:
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2)
    layer.granularity = "position"
    x = torch.randn(3, 3, 7, 6)
    out = layer(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    patches = F.unfold(x, 3, dilation=2, padding=1, stride=2)  # (N, C_in*k*k, L)
    dy_ = dy.flatten(2)  # (N, C_out, L)
    expected = torch.einsum("nol,npl->op", dy_**2, patches**2).reshape(layer.weight.shape)
    torch.testing.assert_close(layer.weight.sum_grad_squared, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.sum_grad_squared, (dy_**2).sum((0, 2)))
    with pytest.raises(ValueError, match="granularity must be one of"):
        TF.conv2d(x, layer.weight, granularity="pixel")  # type: ignore[arg-type]


def test_position_granularity_transposed_is_the_per_input_position_statistic() -> None:
    stride, padding, dilation = 2, 1, 2
    layer = nn.ConvTranspose1d(2, 3, 3, stride=stride, padding=padding, dilation=dilation, output_padding=1)
    layer.granularity = "position"
    x = torch.randn(3, 2, 5)
    out = layer(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    # y[n, o, t*s + j*d - p] += x[n, i, t] W[i, o, j]: one product per input position t.
    expected = torch.zeros_like(layer.weight)
    for t in range(x.shape[2]):
        for j in range(3):
            pos = t * stride + j * dilation - padding
            if 0 <= pos < out.shape[2]:
                expected[:, :, j] += torch.einsum("ni,no->io", x[:, :, t] ** 2, dy[:, :, pos] ** 2)
    torch.testing.assert_close(layer.weight.sum_grad_squared, expected, rtol=1e-5, atol=1e-6)


def test_position_granularity_equals_sample_with_one_position_per_sample() -> None:
    layer = nn.Conv2d(3, 4, 3)
    x = torch.randn(5, 3, 3, 3)
    with nn.settings.configure(granularity="position"):
        testing.assert_matches_oracle(layer, lambda o, _: o.square().sum(), x)


def test_bf16_autocast_statistic_close_to_float32() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=2),
        torch.nn.GELU(), nn.ConvTranspose2d(8, 4, 3, stride=2, output_padding=1),
    )
    twin = to_torch(model)
    x = torch.randn(6, 3, 10, 10)
    model(x).square().mean().backward()
    full = {n: p.sum_grad_squared.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    statistic.clear(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        out_twin = twin(x)
    assert out.dtype == out_twin.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for n, p in model.named_parameters():
        s = p.sum_grad_squared
        assert s.dtype == torch.float32 and p.grad.dtype == torch.float32
        rel = ((s - full[n]).norm() / full[n].norm()).item()
        assert rel < 2e-2, (n, rel)


def test_frozen_weight_and_no_grad_fall_back() -> None:
    layer = nn.ConvTranspose2d(3, 4, 3, stride=2)
    layer.weight.requires_grad_(False)
    x = torch.randn(4, 3, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    assert statistic.has(layer.bias) and not statistic.has(layer.weight)
    assert x.grad is not None and layer.weight.grad is None
    with torch.no_grad():
        out = layer(x)
    assert out.grad_fn is None and torch.equal(out, torch.nn.functional.conv_transpose2d(
        x, layer.weight, layer.bias, 2))


def test_clear_errors_for_unsupported_options() -> None:
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="padding='same' is not supported for strided"):
        TF.conv2d(x, w, stride=2, padding="same")
    with pytest.raises(RuntimeError, match="Invalid padding string: 'full'"):
        TF.conv2d(x, w, padding="full")
    with pytest.raises(RuntimeError, match="expected stride to be a single integer value or a list of 2"):
        TF.conv2d(x, w, stride=(1, 2, 3))
    with pytest.raises(TypeError, match="'padding' must be tuple of ints"):
        TF.conv_transpose2d(x, w, padding="same")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Only `zeros` padding mode is supported for ConvTranspose2d"):
        _transposed_with_mode("reflect")(x)
    wc = torch.randn(4, 4, 3, 3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="real parameters only"):
        TF.conv2d(x.to(torch.complex64), wc)
    lazy = torch.nn.LazyConv2d(4, 3)
    rule = nn.REGISTRY.lookup(type(lazy))
    assert rule is not None and rule.torch_type is torch.nn.Conv2d
    assert "lazy module" in rule.unsupported(lazy)
    assert rule.unsupported(torch.nn.Conv2d(2, 2, 1)) is None


def _transposed_with_mode(mode: str) -> torch.nn.Module:
    layer = nn.ConvTranspose2d(4, 4, 3)
    layer.padding_mode = mode  # torch's constructor refuses it; a loaded or edited module may not
    return layer
