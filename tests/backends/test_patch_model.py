"""backend="patch_model": parameters become TrueGradParameter in place.

Every model checks the exact coverage table (which parameters get a statistic, and the
recorded reason of every other one), outputs and p.grad against plain torch (a deep copy
made before patching), and the statistic of every covered parameter against the exact
oracle on an unpatched deep copy (docs/statistic.md: rtol 1e-4, atol 1e-6 x max).
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from truegrad import statistic, testing
from truegrad.backends import get_backend
from truegrad.backends.patch_model import PatchModelBackend, uncovered
from truegrad.nn import settings
from truegrad.optim import TGAdamW
from truegrad.parameter import DerivedTensor, TrueGradParameter
from truegrad.utils import patch_model
from grads import GRAD_MODES, assert_grad_matches, grad_mode
from zoo import ZOO

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]

#: The parameter gets no gradient at all in the test's loss (so no statistic, no reason).
NO_GRAD = "<no gradient>"

Expected = dict[str, str | None]  # name -> None (covered) | NO_GRAD | fragment of the reason


# ----------------------------------------------------------------------------- harness


def _as_args(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    return tuple(inputs), {}


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [v for v in out if isinstance(v, torch.Tensor)]
    return _tensors(out.to_tuple())


def check(
    model: nn.Module,
    inputs: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    targets: Any,
    expected: Expected,
    *,
    oracle: bool = True,
    exact_grads: bool = True,
) -> nn.Module:
    """Patch ``model``, run forward/backward, and check everything against plain torch and the
    oracle. ``expected`` names every trainable parameter of the model."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(expected) == sorted(names), "the table must name every trainable parameter"
    twin = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    args, kwargs = _as_args(inputs)
    out_plain = twin(*args, **kwargs)
    loss_fn(out_plain, targets).backward()
    patch_model(model)
    out = model(*args, **kwargs)
    loss_fn(out, targets).backward()
    for a, b in zip(_tensors(out), _tensors(out_plain), strict=True):
        assert torch.equal(a, b)
    plain_params = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        q = plain_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            if exact_grads:  # bitwise, or within rounding where formed from per-sample sums
                assert_grad_matches(p.grad, q.grad, name)
            else:  # see test_zoo: a shared rule that is not bitwise
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    coverage = PatchModelBackend().coverage(model)
    missing = uncovered(model)
    covered = [n for n, want in expected.items() if want is None]
    for name, want in expected.items():
        p = dict(model.named_parameters())[name]
        if want is None:
            assert statistic.get(p) is not None, f"{name}: no statistic ({missing.get(name)})"
            assert coverage[name] is None and name not in missing
        elif want == NO_GRAD:
            assert p.grad is None and statistic.get(p) is None and coverage[name] is None, name
        else:
            assert statistic.get(p) is None, f"{name} has a statistic but should not"
            assert want in coverage[name] and f"'{name}'" in coverage[name], coverage[name]
            assert missing[name] == coverage[name]
    if oracle and covered:
        expected_values = testing.sum_grad_squared_oracle(reference, loss_fn, inputs, targets)
        problems = testing.compare_to_oracle(
            model, expected_values, params=covered, check_grad=False
        )
        assert not problems, problems
    return model


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


class Lambda(nn.Module):
    """``fn(x, *parameters)`` with named parameters ``p0``, ``p1`` ..."""

    def __init__(self, fn: Callable[..., torch.Tensor], *shapes: tuple[int, ...]) -> None:
        super().__init__()
        self.fn = fn
        for i, shape in enumerate(shapes):
            # p0 is kept away from 0 (it divides in some cases)
            self.register_parameter(f"p{i}", nn.Parameter(torch.randn(shape) + 1.5 * (i == 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.parameters())


def check_op(fn: Callable[..., torch.Tensor], x_shape: tuple[int, ...], *shapes: tuple[int, ...],
             expected: Expected | None = None, hidden: bool = True) -> nn.Module:
    """``fn(h, *params)`` on ``h = x`` (model input) or ``h = tanh(Linear(x))`` (an activation)."""
    op = Lambda(fn, *shapes)
    model = nn.Sequential(nn.Linear(x_shape[-1], x_shape[-1]), nn.Tanh(), op) if hidden else op
    x = torch.randn(x_shape)
    target = torch.randn_like(model(x).detach())
    if expected is None:
        expected = {n: None for n, _ in model.named_parameters()}
    return check(model, x, _mse, target, expected)


# ----------------------------------------------------------------------------- the zoo

#: Everything not listed is covered (and must match the oracle exactly).
ZOO_UNCOVERED: dict[str, Expected] = {
    "mlp": {},
    "resnet": {},
    "alexnet": {},
    "grouped_cnn": {},
    "transformer": {},
    "gpt": {},
    # the pooler output is not in the test's loss
    "bert": {"pooler.dense.weight": NO_GRAD, "pooler.dense.bias": NO_GRAD},
    "gpt2": {},
}


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name: str, mode: str) -> None:
    with grad_mode(mode):
        _zoo_case(name)


def _zoo_case(name: str) -> None:
    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.build()
    if entry.samples_interact:
        model.eval()  # the per-sample oracle needs BatchNorm on running statistics
    expected = {n: None for n, _ in model.named_parameters()} | ZOO_UNCOVERED[name]
    # gpt: truegrad's RMSNorm rule is not bitwise torch's there (the nn backend shows the
    # same); every other model: p.grad is bitwise plain torch's under bitwise_grad, within
    # rounding without.
    check(model, entry.inputs(), entry.loss, entry.targets(), expected, exact_grads=name != "gpt")


def test_resnet_training_mode_matches_nn_backend() -> None:
    """BatchNorm in training mode (samples interact): covered, grads and running statistics
    equal plain torch's, statistics equal the nn backend's (the same layer-level split)."""
    entry = ZOO["resnet"]
    torch.manual_seed(0)
    model = entry.build()
    expected = {n: None for n, _ in model.named_parameters()}
    inputs, targets = entry.inputs(), entry.targets()
    twin = copy.deepcopy(model)
    get_backend("nn").prepare(twin)
    entry.loss(twin(inputs), targets).backward()
    check(model, inputs, entry.loss, targets, expected, oracle=False)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(statistic.get(p), statistic.get(q), rtol=1e-6, atol=0, msg=name)
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.equal(a, b)


def test_gpt2_conv1d_addmm_recovers_samples_from_the_flattened_view() -> None:
    """``Conv1D`` does ``addmm(b, x.view(-1, nx), W)``: the statistic is per sample (summed
    over the sequence), not per row; the oracle check in test_zoo["gpt2"] is exact."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = Conv1D(6, 4)
    x = torch.randn(3, 5, 4)
    target = torch.randn(3, 5, 6)
    check(model, x, _mse, target, {"weight": None, "bias": None})


def test_addmm_on_rows_flattened_position_major_is_exact() -> None:
    """A 2-D operand whose rows are ordered position-major (``reshape`` of a transposed
    ``(N, T, K)``: row ``t*N + n`` is sample n) is followed: exact."""

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rows = x.transpose(0, 1).reshape(-1, x.shape[-1])  # (T*N, K), a copy
        return torch.addmm(b, rows, w).view(x.shape[1], x.shape[0], -1).transpose(0, 1)

    check_op(fn, (3, 5, 4), (4, 6), (6,), hidden=False)


# ----------------------------------------------------------------------------- elementwise


ELEMENTWISE = {
    "x*p (D,)": (lambda x, p: x * p, (6, 5), (5,)),
    "x*p (D,) on (N,T,D)": (lambda x, p: x * p, (4, 3, 5), (5,)),
    "p*x (1,D)": (lambda x, p: p * x, (6, 5), (1, 5)),
    "x*p (C,1,1) on (N,C,H,W)": (lambda x, p: x * p, (3, 4, 5, 5), (4, 1, 1)),
    "torch.mul": (lambda x, p: torch.mul(x, p), (6, 5), (5,)),
    "p/x": (lambda x, p: p / (x.abs() + 1.0), (6, 5), (5,)),
    "x/p": (lambda x, p: x / p, (6, 5), (5,)),
    "torch.div(x, p)": (lambda x, p: torch.div(x, p), (4, 3, 5), (3, 1)),
    "x-p": (lambda x, p: x - p, (6, 5), (5,)),
    "p-x": (lambda x, p: p - x, (6, 5), (5,)),
    "2-p+x": (lambda x, p: (2 - p) + x, (6, 5), (5,)),
    "torch.add alpha": (lambda x, p: torch.add(x, p, alpha=0.5), (6, 5), (5,)),
    "x.sub alpha": (lambda x, p: x.sub(p, alpha=2.0), (6, 5), (5,)),
    "torch.rsub": (lambda x, p: torch.rsub(p, x, alpha=3.0), (6, 5), (5,)),
    "x+=p in place": (lambda x, p: x.clone().__iadd__(p), (6, 5), (5,)),
    "x.mul_(p) in place": (lambda x, p: (x * 1.0).mul_(p), (6, 5), (5,)),
    "x.div_(p) in place": (lambda x, p: (x * 1.0).div_(p), (6, 5), (5,)),
    "scale and shift": (lambda x, p, q: x * p + q, (4, 3, 5), (3, 5), (5,)),
    "x*s 0-d parameter": (lambda x, s: x * s, (6, 5), ()),
    "x*p then in place on the result": (lambda x, p: (x * p).mul_(2.0), (6, 5), (5,)),
}


@pytest.mark.parametrize("hidden", [False, True], ids=["input", "activation"])
@pytest.mark.parametrize("case", list(ELEMENTWISE))
def test_elementwise(case: str, hidden: bool) -> None:
    fn, x_shape, *shapes = ELEMENTWISE[case]
    check_op(fn, x_shape, *shapes, hidden=hidden)


def test_elementwise_parameter_spanning_the_sample_dim_is_exact() -> None:
    """A parameter with one row per sample (the oracle cannot run such a model on one sample):
    sample n's gradient is nonzero in row n only, ``dy[n] * x[n]``, so the statistic is
    ``(dy * x)**2``."""
    torch.manual_seed(0)
    model = Lambda(lambda x, p: x * p, (6, 5))
    patch_model(model)
    x = torch.randn(6, 5)
    out = model(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    torch.testing.assert_close(statistic.get(model.p0), (dy * x) ** 2)


def test_elementwise_on_a_seq_first_tensor_is_exact() -> None:
    """dim 0 of the op is not the batch (the model's input has N=3, the op sees T=5 first)."""
    check_op(lambda x, p: (x.transpose(0, 1) * p).transpose(0, 1), (3, 5, 4), (4,), hidden=False)


# ----------------------------------------------------------------------------- products


PRODUCTS = {
    "x@W": (lambda x, w: x @ w, (6, 4), (4, 3)),
    "x@W on (N,T,K)": (lambda x, w: x @ w, (3, 5, 4), (4, 3)),
    "W@x on (N,K,L)": (lambda x, w: w @ x.transpose(1, 2), (3, 5, 4), (2, 4)),
    "torch.matmul x@v": (lambda x, v: torch.matmul(x, v), (3, 5, 4), (4,)),
    "torch.mm": (lambda x, w: torch.mm(x, w), (6, 4), (4, 3)),
    "torch.mv": (lambda x, v: torch.mv(x, v), (6, 4), (4,)),
    "addmm": (lambda x, w, b: torch.addmm(b, x, w), (6, 4), (4, 3), (3,)),
    "addmm beta alpha": (lambda x, w, b: torch.addmm(b, x, w, beta=0.5, alpha=2.0),
                         (6, 4), (4, 3), (1, 3)),
    "addmm flattened view": (
        lambda x, w, b: torch.addmm(b, x.view(-1, 4), w).view(x.shape[0], 5, 3),
        (3, 5, 4), (4, 3), (3,)),
    "einsum ntk,km": (lambda x, w: torch.einsum("ntk,km->ntm", x, w), (3, 5, 4), (4, 2)),
    "einsum list operands": (lambda x, w: torch.einsum("nk,mk->nm", [x, w]), (6, 4), (3, 4)),
    "einsum param first": (lambda x, w: torch.einsum("km,ntk->ntm", w, x), (3, 5, 4), (4, 2)),
    "einsum ellipsis": (lambda x, w: torch.einsum("...k,km->...m", x, w), (3, 5, 4), (4, 2)),
    "einsum implicit": (lambda x, w: torch.einsum("nk,kp", x, w), (6, 4), (4, 2)),
    "einsum broadcast head": (
        lambda x, w: torch.einsum("nhd,hd->nh", x.view(x.shape[0], 2, 2), w), (3, 4), (2, 2)),
    "F.linear on a view": (lambda x, w, b: F.linear(x, w.t(), b), (3, 5, 4), (4, 3), (3,)),
    "F.linear flattened view": (
        lambda x, w, b: F.linear(x.reshape(-1, 4), w, b).view(x.shape[0], 5, 3),
        (3, 5, 4), (3, 4), (3,)),
}


@pytest.mark.parametrize("case", list(PRODUCTS))
def test_products(case: str) -> None:
    fn, x_shape, *shapes = PRODUCTS[case]
    check_op(fn, x_shape, *shapes, hidden=False)


def test_linear_on_rows_flattened_position_major_is_exact() -> None:
    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        rows = x.transpose(0, 1).reshape(-1, 4)  # (T*N, K): a copy, rows are positions
        return F.linear(rows, w).view(5, x.shape[0], 3).transpose(0, 1)

    check_op(fn, (3, 5, 4), (3, 4), hidden=False)


def test_products_of_activations() -> None:
    check_op(lambda x, w: torch.einsum("ntk,km->ntm", x, w), (3, 5, 4), (4, 2), hidden=True)


def test_einsum_with_the_samples_in_output_dim_1_is_exact() -> None:
    check_op(lambda x, w: torch.einsum("km,nk->mn", w, x).t(), (6, 4), (4, 3), hidden=False)


def test_product_summing_over_the_samples_is_recorded() -> None:
    """``x^T @ W`` contracts the samples' index: no per-sample split exists."""
    check_op(lambda x, w: (x.t() @ w).sum(0, keepdim=True).expand(x.shape[0], -1), (6, 4), (6, 3),
             hidden=False, expected={"p0": "sums over the samples"})


BROADCAST = {
    "bmm of an expanded parameter": (lambda x, w: torch.bmm(x, w.expand(x.shape[0], -1, -1)),
                                     (6, 5, 4), (1, 4, 3)),
    "bmm of an unsqueezed, expanded parameter": (
        lambda x, w: torch.bmm(x, w.unsqueeze(0).expand(x.shape[0], 4, 3)), (6, 5, 4), (4, 3)),
    "x * p.expand_as(x)": (lambda x, p: x * p.expand_as(x), (6, 4), (4,)),
    "x + b.expand(N, D)": (lambda x, b: x + b.expand(x.shape[0], -1), (6, 4), (1, 4)),
    "addmm with an expanded bias": (lambda x, w, b: torch.addmm(b.expand(x.shape[0], 3), x, w),
                                    (6, 4), (4, 3), (3,)),
}


@pytest.mark.parametrize("case", list(BROADCAST))
def test_parameter_broadcast_over_the_batch(case: str) -> None:
    """A parameter expanded over the sample dim (stride 0) is the same for every sample."""
    fn, x_shape, *shapes = BROADCAST[case]
    check_op(fn, x_shape, *shapes, hidden=False)


def test_squared_shortcut_equals_per_sample_path() -> None:
    """x (N, K) @ W uses the one-contraction shortcut; the per-sample path (forced by a
    second use of W) gives the same statistic."""
    torch.manual_seed(0)
    a = Lambda(lambda x, w: x @ w, (4, 3))
    b = copy.deepcopy(a)
    b.fn = lambda x, w: x @ w + 0.0 * (x @ w)
    x, t = torch.randn(6, 4), torch.randn(6, 3)
    for m in (a, b):
        patch_model(m)
        _mse(m(x), t).backward()
    torch.testing.assert_close(statistic.get(a.p0), statistic.get(b.p0), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- views


VIEWS = {
    "view": (lambda x, p: x @ p.view(4, 3), (12,)),
    "reshape": (lambda x, p: x @ p.reshape(4, -1), (12,)),
    "transpose": (lambda x, p: x @ p.transpose(0, 1), (3, 4)),
    "t": (lambda x, p: x @ p.t(), (3, 4)),
    ".T": (lambda x, p: x @ p.T, (3, 4)),
    ".mT": (lambda x, p: x @ p.mT, (3, 4)),
    "permute": (lambda x, p: x @ p.permute(1, 0), (3, 4)),
    "expand": (lambda x, p: x * p.expand(4), (1,)),
    "expand to 2-D": (lambda x, p: x.unsqueeze(1) * p.expand(2, 4), (4,)),
    "chunk": (lambda x, p: sum(x @ c for c in p.chunk(2, dim=1)), (4, 6)),
    "split": (lambda x, p: torch.cat([x @ c for c in p.split([1, 2], dim=1)], -1), (4, 3)),
    "unbind": (lambda x, p: torch.stack([x * r for r in p.unbind(0)], 1), (2, 4)),
    "narrow": (lambda x, p: x @ p.narrow(1, 1, 2), (4, 5)),
    "select": (lambda x, p: x * p.select(0, 1), (3, 4)),
    "getitem": (lambda x, p: x @ p[1:, ::2], (5, 6)),
    "getitem index tensor": (lambda x, p: x * p[torch.tensor([0, 2, 2, 1])], (3,)),
    "squeeze": (lambda x, p: x * p.squeeze(0), (1, 4)),
    "unsqueeze": (lambda x, p: x + p.unsqueeze(0), (4,)),
    "flatten": (lambda x, p: x * p.flatten(), (2, 2)),
    "view of a view": (lambda x, p: x @ p.view(3, 4).t()[:, :2], (12,)),
    "to(float64)": (lambda x, p: (x.double() @ p.to(torch.float64)).float(), (4, 3)),
    "scaled by a constant": (lambda x, p: x @ (p * 0.5), (4, 3)),
    "nonlinear function of the parameter": (lambda x, p: x * F.softplus(p), (4,)),
    "cat of two parameters": (lambda x, p, q: x @ torch.cat([p, q], 1), (4, 2), (4, 1)),
    "product of two parameters": (lambda x, p, q: x @ (p @ q), (4, 2), (2, 3)),
    "exp of the parameter": (lambda x, p: x * p.exp(), (4,)),
}


@pytest.mark.parametrize("case", list(VIEWS))
def test_views(case: str) -> None:
    fn, *shapes = VIEWS[case]
    model = check_op(fn, (6, 4), *shapes, hidden=False)
    assert all(type(p) is TrueGradParameter for p in model.parameters())


def test_qkv_chunks_of_one_weight_are_exact() -> None:
    """Three views of one weight (MHA-style in_proj chunked into q/k/v) used in three ops:
    the per-sample gradients of the three uses are summed before squaring."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_proj = nn.Parameter(torch.randn(12, 4) / 2)
            self.bias = nn.Parameter(torch.randn(12) / 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            wq, wk, wv = self.in_proj.chunk(3)
            bq, bk, bv = self.bias.chunk(3)
            q, k, v = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
            return torch.softmax(q @ k.transpose(1, 2), -1) @ v

    torch.manual_seed(0)
    model = Attention()
    x = torch.randn(3, 5, 4)
    check(model, x, _mse, torch.randn(3, 5, 4), {"in_proj": None, "bias": None})


def test_parameter_used_directly_and_through_a_view_is_exact() -> None:
    check_op(lambda x, w: F.linear(x, w) + x @ w.t(), (3, 5, 4), (4, 4), hidden=True)


def test_derived_tensor_keeps_values_and_graph() -> None:
    p = TrueGradParameter(torch.randn(4, 3))
    v = p.t()
    assert isinstance(v, DerivedTensor) and torch.equal(v, p.detach().t()) and v.requires_grad
    with torch.no_grad():
        assert type(p.t()) is torch.Tensor


# ----------------------------------------------------------------------------- poison


class Poisoned(nn.Module):
    """``scale`` meets the batch in ``torch.cdist``, an op truegrad knows no rule for."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x - torch.cdist(x, self.scale[None]))


def test_unknown_op_poisons_its_parameter_and_what_follows() -> None:
    """An op truegrad has no rule for: the parameter that meets the batch there gets no
    statistic, and neither does any parameter after it (the samples are not followed
    through the op); every reason names the op."""
    torch.manual_seed(0)
    model = check(Poisoned(), torch.randn(6, 4), _mse, torch.randn(6, 3),
                  {"scale": "torch.cdist", "linear.weight": "torch.cdist", "linear.bias": "torch.cdist"})
    assert "'scale'" in uncovered(model)["scale"]
    assert "the batch went through torch.cdist" in uncovered(model)["linear.weight"]


def test_any_pure_computation_on_a_parameter_is_followed() -> None:
    """A computation on parameters alone (here torch.cumsum) is replayed exactly where it
    meets the batch."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.rand(4) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.cumsum(self.scale, 0)

    torch.manual_seed(0)
    check(Model(), torch.randn(6, 4), _mse, torch.randn(6, 4), {"scale": None})


def test_penalty_in_the_loss_is_recorded() -> None:
    """A weight penalty added to the loss is not part of any sample's gradient: the parameter
    gets no statistic (its p.grad is torch's, penalty included)."""

    class Penalised(nn.Linear):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return super().forward(x), 1e-2 * self.weight.pow(2).sum()

    def loss(out: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return _mse(out[0], target) + out[1]

    torch.manual_seed(0)
    check(Penalised(4, 3), torch.randn(6, 4), loss, torch.randn(6, 3),
          {"weight": "0-d tensor", "bias": None}, oracle=False)


def test_poison_takes_back_earlier_uses_and_keeps_accumulated_statistic() -> None:
    """A parameter used by a supported op first and then poisoned gets nothing from this
    forward; what it had from an earlier clean backward stays."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))
            self.poison = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.linear(x, self.w)
            return y + torch.cdist(y, self.w) if self.poison else y

    torch.manual_seed(0)
    model = Model()
    patch_model(model)
    x = torch.randn(5, 4)
    model(x).pow(2).mean().backward()
    clean = statistic.get(model.w).clone()
    model.poison = True
    model(x).pow(2).mean().backward()
    assert torch.equal(statistic.get(model.w), clean)
    assert "torch.cdist" in uncovered(model)["w"]
    statistic.clear([model.w])
    model(x).pow(2).mean().backward()
    assert statistic.get(model.w) is None


def test_ops_without_gradient_do_not_poison() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    patch_model(model)
    w = model.weight
    _ = (w.shape, w.dtype, w.device, w.size(0), w.numel(), w.detach(), w > 0, w.data)
    _ = w.norm().item(), w.T.shape
    _ = torch.zeros_like(w), torch.randn(5, 4).to(w)
    with torch.no_grad():
        _ = torch.cumsum(w, 0), w * 2
    model(torch.randn(5, 4)).sum().backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    optimizer.step()
    assert uncovered(model) == {} and statistic.get(w) is not None


def test_grad_wrt_inputs_does_not_contribute() -> None:
    """``autograd.grad`` with respect to the input (a gradient penalty) runs the hooks of the
    ops on the way but does not touch p.grad: it must not touch the statistic either."""
    torch.manual_seed(0)
    model = Lambda(lambda x, w: x @ w, (4, 3))
    patch_model(model)
    x = torch.randn(6, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(model(x).sum(), x)
    assert statistic.get(model.p0) is None and model.p0.grad is None


# ----------------------------------------------------------------------------- accumulation, chunks


def test_two_backwards_accumulate() -> None:
    torch.manual_seed(0)
    model = Lambda(lambda x, w, b: torch.einsum("ntk,km->ntm", x, w) * b, (4, 3), (3,))
    x1, x2 = torch.randn(3, 5, 4), torch.randn(2, 5, 4)
    ref1, ref2 = copy.deepcopy(model), copy.deepcopy(model)
    patch_model(model)
    for x in (x1, x2):
        model(x).pow(2).sum().backward()
    loss = lambda out, _: out.pow(2).sum()  # noqa: E731
    o1 = testing.sum_grad_squared_oracle(ref1, loss, x1)
    o2 = testing.sum_grad_squared_oracle(ref2, loss, x2)
    for name, p in model.named_parameters():
        both = o1.sum_grad_squared[name] + o2.sum_grad_squared[name]
        torch.testing.assert_close(statistic.get(p), both)


def test_small_chunks_equal_unchunked() -> None:
    torch.manual_seed(0)
    model = Lambda(lambda x, w, b: (x @ w.t()[:, :3]) * b, (5, 4), (3,))
    twin = copy.deepcopy(model)
    x = torch.randn(6, 7, 4)
    patch_model(model)
    patch_model(twin)
    model(x).pow(2).mean().backward()
    with settings.configure(chunk_bytes=64):
        twin(x).pow(2).mean().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(statistic.get(p), statistic.get(q), rtol=1e-6, atol=0)


def test_bf16_autocast_statistic_close_to_float32() -> None:
    torch.manual_seed(0)
    head = Lambda(lambda x, w: x @ w.t() * 0.5, (6, 8))
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), head)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 5, 8)
    patch_model(model)
    patch_model(twin)
    model(x).pow(2).mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = twin(x)
        assert out.dtype == copy.deepcopy(twin)(x).dtype
    out.float().pow(2).mean().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        s, t = statistic.get(p), statistic.get(q)
        assert t.dtype == torch.float32
        assert ((s - t).norm() / s.norm()).item() < 2e-2


# ----------------------------------------------------------------------------- prepare / undo


def test_undo_restores_identity_and_class() -> None:
    torch.manual_seed(0)
    model = ZOO["gpt"].build()
    before = {name: (id(p), type(p)) for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = patch_model(model)
    assert all(type(p) is TrueGradParameter for p in model.parameters())
    assert all(p is q for p, q in zip(model.parameters(), optimizer.param_groups[0]["params"]))
    assert model.wte.weight is model.lm_head.weight
    ZOO["gpt"].loss(model(ZOO["gpt"].inputs()), ZOO["gpt"].targets()).backward()
    handle.undo()
    assert {name: (id(p), type(p)) for name, p in model.named_parameters()} == before
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    handle.undo()  # idempotent


def test_patching_twice_is_a_no_op() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    first = patch_model(model)
    hooks = [len(m._forward_pre_hooks) for m in model.modules()]
    second = patch_model(model)
    assert [len(m._forward_pre_hooks) for m in model.modules()] == hooks
    second.undo()
    assert all(type(p) is TrueGradParameter for p in model.parameters())
    first.undo()
    assert all(type(p) is nn.Parameter for p in model.parameters())


def test_frozen_parameters_are_left_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    patch_model(model)
    assert type(model[0].weight) is nn.Parameter and type(model[0].bias) is TrueGradParameter
    model(torch.randn(5, 3)).sum().backward()
    assert statistic.get(model[0].weight) is None and statistic.get(model[0].bias) is not None
    assert "0.weight" not in PatchModelBackend().coverage(model)


def test_non_module_raises_type_error() -> None:
    with pytest.raises(TypeError, match=r"needs a torch.nn.Module, got builtins.dict"):
        patch_model({"weight": torch.zeros(1)})  # type: ignore[arg-type]


def test_model_without_trainable_parameters_raises_value_error() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        patch_model(model)


def test_coverage_before_and_after() -> None:
    torch.manual_seed(0)
    model = Poisoned()
    backend = PatchModelBackend()
    assert backend.coverage(model) == {"scale": None, "linear.weight": None, "linear.bias": None}
    backend.prepare(model)
    model(torch.randn(3, 4)).sum().backward()
    coverage = backend.coverage(model)
    assert "torch.cdist" in coverage["scale"] and "torch.cdist" in coverage["linear.weight"]


def test_deepcopy_pickle_and_state_dict() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    patch_model(model)
    model(torch.randn(5, 3)).sum().backward()
    clone = copy.deepcopy(model)
    assert all(type(p) is TrueGradParameter for p in clone.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), clone.parameters()))
    state = model.state_dict()
    assert all(type(v) is torch.Tensor for v in state.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    fresh.load_state_dict(torch.load(buffer))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    restored = pickle.loads(pickle.dumps(model[0].weight))
    assert type(restored) is TrueGradParameter and torch.equal(restored, model[0].weight)
    x = torch.randn(5, 3)
    clone(x).sum().backward()  # the copy works on its own
    assert all(statistic.get(p) is not None for p in clone.parameters())


def test_seed_example_runs() -> None:
    """The seed's README example, with the zoo's small BERT instead of from_pretrained."""
    torch.manual_seed(0)
    model = ZOO["bert"].build()
    patch_model(model)
    optim = TGAdamW(model.parameters())
    out = model(**ZOO["bert"].inputs())
    out[0].mean().backward()
    before = model.embeddings.word_embeddings.weight.detach().clone()
    optim.step()
    assert not torch.equal(before, model.embeddings.word_embeddings.weight)
    assert uncovered(model) == {}


def test_writing_a_parameter_into_an_activation_is_recorded() -> None:
    def fn(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        h = x * 1.0
        h[:, 0] = p[0]
        return h

    check_op(fn, (6, 4), (4,), hidden=False, expected={"p0": "Tensor.__setitem__"})


def test_weight_norm_parametrization_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    x = torch.randn(6, 5, 4)
    check(model, x, _mse, torch.randn(6, 5, 3), {n: None for n, _ in model.named_parameters()})


def test_second_backward_through_a_retained_graph_gives_no_statistic() -> None:
    """The operands an elementwise use keeps for the statistic are released after the first
    backward (as torch releases its saved tensors); a second backward through the retained
    graph cannot be split, so the parameter ends without a statistic and says why."""
    torch.manual_seed(0)
    model = Lambda(lambda x, w: x * w, (4,))
    patch_model(model)
    loss = model(torch.randn(6, 4)).pow(2).mean()
    loss.backward(retain_graph=True)
    assert statistic.get(model.p0) is not None
    loss.backward()
    assert statistic.get(model.p0) is None and "retain_graph" in uncovered(model)["p0"]


def test_second_backward_through_a_retained_product_adds_up() -> None:
    """A product ``x @ W`` runs the Linear rule, whose saved tensors are retained with the
    graph: the second backward adds its statistic exactly as it adds to ``p.grad``."""
    torch.manual_seed(0)
    model = Lambda(lambda x, w: x @ w, (4, 3))
    plain = testing.plain_copy(model)
    patch_model(model)
    x = torch.randn(6, 4)
    loss = model(x).pow(2).mean()
    loss.backward(retain_graph=True)
    once = statistic.get(model.p0).clone()
    loss.backward()
    torch.testing.assert_close(statistic.get(model.p0), 2 * once)
    expected = testing.sum_grad_squared_oracle(plain, lambda o, _: o.pow(2).mean(), x)
    torch.testing.assert_close(once, expected.sum_grad_squared["p0"], rtol=1e-4, atol=1e-7)


def test_ddp_on_a_patched_model(tmp_path: Any) -> None:
    """DDP (gloo, one process) wraps the same parameter objects; the statistic is exact."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        reference = copy.deepcopy(model)
        patch_model(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert all(p is q for p, q in zip(ddp.module.parameters(), model.parameters()))
        x, y = torch.randn(6, 4), torch.randn(6, 3)
        _mse(ddp(x), y).backward()
        expected = testing.sum_grad_squared_oracle(reference, _mse, x, y)
        assert testing.compare_to_oracle(model, expected) == []
    finally:
        if owned:
            dist.destroy_process_group()
