"""truegrad.nn normalisation layers (LayerNorm, RMSNorm, GroupNorm, BatchNorm, InstanceNorm)
and their functionals against torch and the exact oracles."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from truegrad import nn, statistic, testing
from truegrad.nn import functional as TF

from harness import Problem, check, to_torch

# --------------------------------------------------------------------------- oracles


def _stat_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _capture(model: torch.nn.Module, kind: type, inputs: Any, loss_fn: Callable) -> dict[str, dict]:
    """Run ``model`` forward/backward once; per layer of ``kind``: its input ``x``, output
    gradient ``dy`` and (evaluation-mode BatchNorm) the running statistics it used."""
    captured: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name, layer in model.named_modules():
        if not isinstance(layer, kind):
            continue

        def hook(mod: torch.nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            record = captured[name] = {"x": args[0].detach()}
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and not mod.training and (
                mod.running_mean is not None
            ):
                record["mean"] = mod.running_mean.detach().clone()
                record["var"] = mod.running_var.detach().clone()
            out.register_hook(lambda g: record.__setitem__("dy", g.detach()))

        handles.append(layer.register_forward_hook(hook))
    try:
        loss_fn(model(inputs), None).backward()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _channel_layer_oracle(kind: type) -> Callable[..., dict[str, torch.Tensor]]:
    def oracle(model: torch.nn.Module, inputs: Any, loss_fn: Callable) -> dict[str, torch.Tensor]:
        """Layer-level oracle: the op's own per-sample split, in float64.

        ``g_n(w)[c] = sum_s dy * x_hat``, ``g_n(b)[c] = sum_s dy``, with ``x_hat`` from
        the statistics the layer normalises with: per (sample, group) for GroupNorm; for
        BatchNorm the batch statistics (mean and biased variance over (N, spatial)) or,
        in evaluation mode, the running ones. The batch statistics do not depend on the
        running ones, so the twin's extra running-statistics updates do not matter.
        """
        expected = {}
        layers = dict(model.named_modules())
        for name, record in _capture(model, kind, inputs, loss_fn).items():
            layer = layers[name]
            x, dy = record["x"].double(), record["dy"].double()
            n, c = x.shape[:2]
            x3, dy3 = x.reshape(n, c, -1), dy.reshape(n, c, -1)
            if isinstance(layer, torch.nn.GroupNorm):
                xg = x.reshape(n, layer.num_groups, -1)
                per_group = c // layer.num_groups
                mean = xg.mean(2).repeat_interleave(per_group, 1)[:, :, None]
                var = xg.var(2, unbiased=False).repeat_interleave(per_group, 1)[:, :, None]
            elif "mean" in record:
                mean, var = record["mean"].double()[:, None], record["var"].double()[:, None]
            else:
                mean = x3.mean((0, 2))[:, None]
                var = x3.var((0, 2), unbiased=False)[:, None]
            x_hat = (x3 - mean) / torch.sqrt(var + layer.eps)
            prefix = f"{name}." if name else ""
            for pname, per_sample in (("weight", (dy3 * x_hat).sum(2)), ("bias", dy3.sum(2))):
                p = getattr(layer, pname)
                if p is not None and p.requires_grad:
                    sgs = testing.layer_sum_grad_squared(per_sample)
                    expected[prefix + pname] = sgs.to(_stat_dtype(p))
        return expected

    return oracle


#: For BatchNorm, whose samples interact in training mode.
BN_ORACLE = _channel_layer_oracle(torch.nn.modules.batchnorm._BatchNorm)
#: For GroupNorm with one value per group on 2-D input: torch refuses a lone sample
#: ("more than 1 value per channel"), so the torch.func oracle cannot run there.
GN_ORACLE = _channel_layer_oracle(torch.nn.GroupNorm)


def func_oracle_without_running_stats(
    model: torch.nn.Module, inputs: Any, loss_fn: Callable
) -> dict[str, torch.Tensor]:
    """torch.func oracle for InstanceNorm in training mode with ``track_running_stats=True``.

    Samples are independent, but ``vmap`` refuses the in-place running-statistics
    update; in training mode those statistics do not affect the output, so the oracle
    runs on a copy that does not track them.
    """
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and m.training:
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    return testing.sum_grad_squared_oracle(model, loss_fn, inputs).sum_grad_squared


# --------------------------------------------------------------------------- problems


class FunctionalNorms(torch.nn.Module):
    """A user's own module calling the functionals on (N, C, L) input."""

    def __init__(self, c: int = 4, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups
        self.ln_w = torch.nn.Parameter(torch.randn(c, 6))
        self.ln_b = torch.nn.Parameter(torch.randn(c, 6))
        self.rms_w = torch.nn.Parameter(torch.randn(6))
        self.gn_w = torch.nn.Parameter(torch.randn(c))
        self.gn_b = torch.nn.Parameter(torch.randn(c))
        self.in_w = torch.nn.Parameter(torch.randn(c))
        self.in_b = torch.nn.Parameter(torch.randn(c))
        self.register_buffer("rm", torch.randn(c))
        self.register_buffer("rv", torch.rand(c) + 0.5)
        self.bn_w = torch.nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Parallel branches: stacked normalisations cancel most of each other's
        # parameter gradients, which makes a float32 comparison ill-conditioned.
        ln = torch.tanh(TF.layer_norm(x, [x.shape[1], 6], self.ln_w, self.ln_b))
        rms = torch.sin(TF.rms_norm(x, [6], self.rms_w, 1e-4))
        gn = TF.group_norm(x, self.groups, self.gn_w, self.gn_b)
        inst = TF.instance_norm(x, None, None, self.in_w, self.in_b)
        bn = TF.batch_norm(x, self.rm, self.rv, self.bn_w, None, False)
        return ln * rms + gn * inst + bn


def _bn(cls: type, c: int, train: bool = True, **kw: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        m = cls(c, **kw)
        if m.affine:
            with torch.no_grad():
                m.weight.normal_()
                m.bias.normal_()
        if m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
        return m.train(train)

    return build


def _affine(m: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


def _after_linear(norm: torch.nn.Module, features: int) -> torch.nn.Module:
    """``norm`` behind a truegrad Linear, so that the harness checks the gradient and
    statistic flowing through the norm's input gradient (a norm without parameters
    has none of its own)."""
    return torch.nn.Sequential(nn.Linear(features, features), norm)


def _shifted(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape) * 2 + 1


#: InstanceNorm with parameters and running statistics.
TRACKED = {"affine": True, "track_running_stats": True}

PROBLEMS = [
    # LayerNorm
    Problem("ln-2d", lambda: _affine(nn.LayerNorm(5)), _shifted(6, 5)),
    Problem("ln-3d", lambda: _affine(nn.LayerNorm(5)), _shifted(3, 4, 5)),
    Problem("ln-2dims-3d", lambda: _affine(nn.LayerNorm((4, 5))), _shifted(3, 4, 5)),
    Problem("ln-2dims-4d", lambda: _affine(nn.LayerNorm((2, 5))), _shifted(3, 2, 2, 5)),
    Problem("ln-nobias-3d", lambda: _affine(nn.LayerNorm(5, bias=False)), _shifted(3, 4, 5)),
    Problem("ln-noaffine-2d", lambda: _after_linear(nn.LayerNorm(5, elementwise_affine=False), 5),
            _shifted(6, 5)),
    Problem("ln-noaffine-3d", lambda: _after_linear(nn.LayerNorm(5, elementwise_affine=False), 5),
            _shifted(3, 4, 5)),
    Problem("ln-1-sample", lambda: _affine(nn.LayerNorm(5)), _shifted(1, 3, 5)),
    # RMSNorm
    Problem("rms-2d", lambda: _affine(nn.RMSNorm(5)), _shifted(6, 5)),
    Problem("rms-3d-eps", lambda: _affine(nn.RMSNorm(5, eps=1e-3)), _shifted(3, 4, 5)),
    Problem("rms-2dims-3d", lambda: _affine(nn.RMSNorm((4, 5))), _shifted(3, 4, 5)),
    Problem("rms-2dims-eps", lambda: _affine(nn.RMSNorm([4, 5], eps=1e-2)), _shifted(3, 4, 5)),
    Problem("rms-noaffine", lambda: _after_linear(nn.RMSNorm(5, elementwise_affine=False), 5),
            _shifted(3, 4, 5)),
    # GroupNorm
    *[
        Problem(
            f"gn-{g}g-{'x'.join(map(str, shape))}",
            lambda g=g: _affine(nn.GroupNorm(g, 4)),
            _shifted(*shape),
            layer_oracle=GN_ORACLE if (g, len(shape)) == (4, 2) else None,
        )
        for g in (1, 2, 4)
        for shape in ((6, 4), (3, 4, 2, 3))
    ],
    Problem("gn-2g-layer-oracle", lambda: _affine(nn.GroupNorm(2, 4)), _shifted(3, 4, 2, 3),
            layer_oracle=GN_ORACLE),
    Problem("gn-nobias", lambda: _affine(nn.GroupNorm(2, 4, bias=False)), _shifted(3, 4, 5)),
    Problem("gn-3d", lambda: _affine(nn.GroupNorm(2, 4)), _shifted(3, 4, 5)),
    Problem("gn-noaffine", lambda: _after_linear(nn.GroupNorm(1, 5, affine=False), 5),
            _shifted(3, 5, 5)),
    # BatchNorm in training mode (samples interact: layer-level oracle)
    Problem("bn1d-2d-train", _bn(nn.BatchNorm1d, 4), _shifted(6, 4), layer_oracle=BN_ORACLE),
    Problem("bn1d-3d-train", _bn(nn.BatchNorm1d, 4), _shifted(3, 4, 5), layer_oracle=BN_ORACLE),
    Problem("bn2d-train", _bn(nn.BatchNorm2d, 3), _shifted(3, 3, 2, 4), layer_oracle=BN_ORACLE),
    Problem("bn3d-train", _bn(nn.BatchNorm3d, 3), _shifted(2, 3, 2, 2, 3), layer_oracle=BN_ORACLE),
    Problem("bn2d-train-momentum-none", _bn(nn.BatchNorm2d, 3, momentum=None), _shifted(3, 3, 2, 2),
            layer_oracle=BN_ORACLE),
    Problem("bn2d-train-no-running-stats", _bn(nn.BatchNorm2d, 3, track_running_stats=False),
            _shifted(3, 3, 2, 2), layer_oracle=BN_ORACLE),
    Problem("bn2d-eval-no-running-stats", _bn(nn.BatchNorm2d, 3, False, track_running_stats=False),
            _shifted(3, 3, 2, 2), layer_oracle=BN_ORACLE),
    Problem("bn1d-train-noaffine", lambda: _after_linear(_bn(nn.BatchNorm1d, 5, affine=False)(), 5),
            _shifted(3, 5, 5), layer_oracle=BN_ORACLE),
    Problem("bn-mlp-train", lambda: torch.nn.Sequential(nn.Linear(5, 4), _bn(nn.BatchNorm1d, 4)(),
                                                        torch.nn.Tanh(), nn.Linear(4, 2)),
            _shifted(6, 5), layer_oracle=BN_ORACLE),
    # BatchNorm in evaluation mode (samples independent: torch.func oracle)
    Problem("bn1d-2d-eval", _bn(nn.BatchNorm1d, 4, False), _shifted(6, 4)),
    Problem("bn1d-3d-eval", _bn(nn.BatchNorm1d, 4, False), _shifted(3, 4, 5)),
    Problem("bn2d-eval", _bn(nn.BatchNorm2d, 3, False), _shifted(3, 3, 2, 4)),
    Problem("bn3d-eval", _bn(nn.BatchNorm3d, 3, False), _shifted(2, 3, 2, 2, 3)),
    # InstanceNorm (samples independent)
    Problem("in1d-train", _bn(nn.InstanceNorm1d, 4, **TRACKED), _shifted(3, 4, 5),
            layer_oracle=func_oracle_without_running_stats),
    Problem("in2d-train", _bn(nn.InstanceNorm2d, 3, **TRACKED),
            _shifted(3, 3, 2, 3), layer_oracle=func_oracle_without_running_stats),
    Problem("in3d-train", _bn(nn.InstanceNorm3d, 3, **TRACKED),
            _shifted(2, 3, 2, 2, 2), layer_oracle=func_oracle_without_running_stats),
    Problem("in1d-affine-only", _bn(nn.InstanceNorm1d, 4, affine=True), _shifted(3, 4, 5)),
    Problem("in1d-eval", _bn(nn.InstanceNorm1d, 4, False, **TRACKED), _shifted(3, 4, 5)),
    Problem("in2d-eval", _bn(nn.InstanceNorm2d, 3, False, **TRACKED),
            _shifted(3, 3, 2, 3)),
    Problem("in3d-eval", _bn(nn.InstanceNorm3d, 3, False, **TRACKED),
            _shifted(2, 3, 2, 2, 2)),
    # the functionals in a user's module
    Problem("functional", FunctionalNorms, _shifted(3, 4, 6)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("problem", PROBLEMS, ids=[p.id for p in PROBLEMS])
def test_normalization_matches_torch_and_oracle(
    problem: Problem, reduction: str, dtype: torch.dtype
) -> None:
    check(problem, reduction, dtype)


# --------------------------------------------------------------------------- torch equivalence


MODULES = [
    (nn.LayerNorm, torch.nn.LayerNorm, (5,)),
    (nn.RMSNorm, torch.nn.RMSNorm, (5,)),
    (nn.GroupNorm, torch.nn.GroupNorm, (2, 4)),
    (nn.BatchNorm1d, torch.nn.BatchNorm1d, (4,)),
    (nn.BatchNorm2d, torch.nn.BatchNorm2d, (4,)),
    (nn.BatchNorm3d, torch.nn.BatchNorm3d, (4,)),
    (nn.InstanceNorm1d, torch.nn.InstanceNorm1d, (4,)),
    (nn.InstanceNorm2d, torch.nn.InstanceNorm2d, (4,)),
    (nn.InstanceNorm3d, torch.nn.InstanceNorm3d, (4,)),
]


@pytest.mark.parametrize("ours, theirs, args", MODULES, ids=[m[1].__name__ for m in MODULES])
def test_is_a_drop_in_subclass_with_the_same_state_dict(
    ours: type, theirs: type, args: tuple
) -> None:
    kwargs = {"affine": True, "track_running_stats": True} if "Instance" in theirs.__name__ else {}
    layer, ref = ours(*args, **kwargs), theirs(*args, **kwargs)
    assert isinstance(layer, theirs)
    assert layer.state_dict().keys() == ref.state_dict().keys()
    layer.load_state_dict(ref.state_dict())
    assert nn.REGISTRY.lookup(ours).torch_type is theirs
    assert nn.REGISTRY.lookup(theirs).module_type is ours


def _bn_input(cls: type, n: int = 4) -> torch.Tensor:
    dims = {"1d": (5,), "2d": (2, 3), "3d": (2, 2, 2)}[cls.__name__[-2:]]
    return torch.randn(n, 4, *dims) * 2 + 1


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize(
    "cls",
    [
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    ],
    ids=lambda c: c.__name__,
)
def test_running_statistics_are_torchs_bitwise(cls: type, momentum: float | None) -> None:
    model = cls(4, momentum=momentum, affine=True, track_running_stats=True)
    ref = to_torch(torch.nn.Sequential(model))[0]
    assert type(ref) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                         torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)
    for step in range(3):
        x = _bn_input(cls)
        if step == 2:  # an evaluation forward must leave the statistics alone
            model.eval()
            ref.eval()
        out, out_ref = model(x), ref(x)
        assert torch.equal(out, out_ref)
        out.square().sum().backward()
        out_ref.square().sum().backward()
        assert torch.equal(model.weight.grad, ref.weight.grad)
        assert torch.equal(model.bias.grad, ref.bias.grad)
    assert torch.equal(model.running_mean, ref.running_mean)
    assert torch.equal(model.running_var, ref.running_var)
    assert torch.equal(model.num_batches_tracked, ref.num_batches_tracked)
    assert int(model.num_batches_tracked) == (2 if "Batch" in cls.__name__ else 0)


def _grads_and_stats(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (p.grad.clone(), p.sum_grad_squared.clone()) for n, p in model.named_parameters()}


def _clear(model: torch.nn.Module) -> None:
    model.zero_grad()
    statistic.clear(model.parameters())


class ChannelStack(torch.nn.Module):
    """(N, L, 6) -> Linear -> the norm under test -> Linear; under autocast the norm sees
    bfloat16 input, as in a mixed-precision model. Channel norms get (N, C, L)."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(6, 4)
        self.norm = norm
        self.out = torch.nn.Linear(4, 3)
        self.channels_first = not isinstance(norm, (torch.nn.LayerNorm, torch.nn.RMSNorm))

    def norm_input(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inp(x)
        return y.transpose(1, 2) if self.channels_first else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.norm_input(x))
        return self.out(torch.tanh(y.transpose(1, 2) if self.channels_first else y))


NORMS = [
    ("ln", lambda: _affine(nn.LayerNorm(4))),
    ("rms", lambda: _affine(nn.RMSNorm(4))),
    ("gn", lambda: _affine(nn.GroupNorm(2, 4))),
    ("bn-train", _bn(nn.BatchNorm1d, 4)),
    ("bn-eval", _bn(nn.BatchNorm1d, 4, False)),
    ("in-train", _bn(nn.InstanceNorm1d, 4, **TRACKED)),
]


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("make", [m for _, m in NORMS], ids=[n for n, _ in NORMS])
def test_bf16_autocast_output_dtype_and_statistic(make: Callable[[], torch.nn.Module]) -> None:
    torch.manual_seed(0)
    model = ChannelStack(make())
    twin = to_torch(model)
    x = torch.randn(8, 7, 6) * 2
    model(x).square().mean().backward()
    full = {n: p.sum_grad_squared.clone() for n, p in model.norm.named_parameters()}
    _clear(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.norm(model.norm_input(x))
        ref = twin.norm(twin.norm_input(x))
        assert out.dtype == ref.dtype
        assert torch.equal(out, ref)
        y, y_ref = model(x), twin(x)
    y.float().square().mean().backward()
    y_ref.float().square().mean().backward()
    ref_params = dict(twin.norm.named_parameters())
    for n, p in model.norm.named_parameters():
        assert torch.equal(p.grad, ref_params[n].grad), n
        s = p.sum_grad_squared
        assert s.dtype == torch.float32 and p.grad.dtype == torch.float32
        rel = ((s - full[n]).norm() / full[n].norm()).item()
        assert rel < 2e-2, (n, rel)


CHUNKED = [
    ("ln-3d", lambda: _affine(nn.LayerNorm(6)), (9, 4, 6)),
    ("ln-2d", lambda: _affine(nn.LayerNorm(6)), (9, 6)),
    ("rms-3d", lambda: _affine(nn.RMSNorm((4, 6))), (9, 4, 6)),
    ("gn", lambda: _affine(nn.GroupNorm(3, 6)), (9, 6, 2, 3)),
    ("bn-train", _bn(nn.BatchNorm2d, 6), (9, 6, 2, 3)),
    ("in-train", _bn(nn.InstanceNorm2d, 6, affine=True), (9, 6, 2, 3)),
]


@pytest.mark.parametrize("granularity", ["sample", "position"])
@pytest.mark.parametrize("make, shape", [c[1:] for c in CHUNKED], ids=[c[0] for c in CHUNKED])
def test_chunked_and_unchunked_agree(
    make: Callable[[], torch.nn.Module], shape: tuple, granularity: str
) -> None:
    layer = make()
    layer.granularity = granularity
    x = torch.randn(*shape) * 2 + 1
    target = torch.randn(*shape)
    layer(x).sub(target).square().sum().backward()
    whole = _grads_and_stats(layer)
    _clear(layer)
    with nn.settings.configure(chunk_bytes=64):  # one or two samples per chunk
        layer(x).sub(target).square().sum().backward()
    for n, (grad, sgs) in _grads_and_stats(layer).items():
        assert torch.equal(grad, whole[n][0])
        torch.testing.assert_close(sgs, whole[n][1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("make, shape", [c[1:] for c in CHUNKED], ids=[c[0] for c in CHUNKED])
def test_accumulates_over_two_backward_passes(
    make: Callable[[], torch.nn.Module], shape: tuple
) -> None:
    layer = make()
    x1, x2 = torch.randn(*shape) + 1, torch.randn(*shape) * 3
    firsts = []
    for x in (x1, x2):
        layer(x).square().mean().backward()
        firsts.append({n: p.sum_grad_squared.clone() for n, p in layer.named_parameters()})
        _clear(layer)
    layer(x1).square().mean().backward()
    layer(x2).square().mean().backward()
    for n, p in layer.named_parameters():
        expected = firsts[0][n] + firsts[1][n]
        torch.testing.assert_close(p.sum_grad_squared, expected, rtol=1e-6, atol=0)


def _x4() -> torch.Tensor:
    return torch.randn(3, 4, 5, 6) * 2 + 1


def _channels_last() -> torch.Tensor:
    return _x4().to(memory_format=torch.channels_last)


def _transposed() -> torch.Tensor:
    return _x4().transpose(2, 3)


def _half(dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: (torch.randn(3, 4, 6) * 2).to(dtype)


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5


#: (id, our functional, torch's, input, parameter shapes and dtype)
LAYOUTS = [
    ("gn-channels-last", TF.group_norm, torch.nn.functional.group_norm, _channels_last, (2,), 4),
    ("gn-transposed", TF.group_norm, torch.nn.functional.group_norm, _transposed, (2,), 4),
    ("ln-channels-last", TF.layer_norm, torch.nn.functional.layer_norm, _channels_last, ([6],), 6),
    ("ln-transposed", TF.layer_norm, torch.nn.functional.layer_norm, _transposed, ([5],), 5),
    ("rms-channels-last", TF.rms_norm, torch.nn.functional.rms_norm, _channels_last, ([6],), 6),
    ("rms-transposed", TF.rms_norm, torch.nn.functional.rms_norm, _transposed, ([5],), 5),
    *[
        (f"{name}-{tag}", ours, theirs, make, (*_stats(), None, None, train), 4)
        for name, ours, theirs in (
            ("bn", TF.batch_norm, torch.nn.functional.batch_norm),
            ("in", TF.instance_norm, torch.nn.functional.instance_norm),
        )
        for tag, make in (("channels-last", _channels_last), ("transposed", _transposed))
        for train in (True, False)
    ],
    *[
        (f"{name}-{str(dtype)[6:]}", ours, theirs, _half(dtype), args, (size, dtype))
        for dtype in (torch.bfloat16, torch.float16)
        for name, ours, theirs, args, size in (
            ("ln", TF.layer_norm, torch.nn.functional.layer_norm, ([6],), 6),
            ("rms", TF.rms_norm, torch.nn.functional.rms_norm, ([6],), 6),
            ("gn", TF.group_norm, torch.nn.functional.group_norm, (2,), 4),
            ("bn", TF.batch_norm, torch.nn.functional.batch_norm, (None,) * 4 + (True,), 4),
            ("in", TF.instance_norm, torch.nn.functional.instance_norm, (None,) * 4 + (True,), 4),
        )
    ],
]


@pytest.mark.parametrize(
    "ours, theirs, make_input, args, params", [c[1:] for c in LAYOUTS], ids=[c[0] for c in LAYOUTS]
)
def test_layouts_and_low_precision_are_torchs_bitwise(
    ours: Callable,
    theirs: Callable,
    make_input: Callable[[], torch.Tensor],
    args: tuple,
    params: Any,
) -> None:
    """Output (values, dtype, strides), input gradient and parameter gradients equal torch's
    bitwise for channels-last and non-contiguous input and for float16/bfloat16."""
    size, dtype = params if isinstance(params, tuple) else (params, torch.float32)
    torch.manual_seed(0)
    x0 = make_input()
    w0, b0 = torch.randn(size).to(dtype), torch.randn(size).to(dtype)
    results = []
    for fn in (ours, theirs):
        x = x0.detach().clone().requires_grad_()
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        call_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        if fn in (TF.batch_norm, torch.nn.functional.batch_norm, TF.instance_norm,
                  torch.nn.functional.instance_norm):
            call_args[2:4] = [w, b]  # (running_mean, running_var, weight, bias, training)
            out = fn(x, *call_args)
        elif fn in (TF.rms_norm, torch.nn.functional.rms_norm):
            out = fn(x, *call_args, w)
        else:
            out = fn(x, *call_args, w, b)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(grad.to(out.dtype))
        results.append((out, x.grad, w.grad, b.grad, call_args))
    (out, gx, gw, gb, state), (out_t, gx_t, gw_t, gb_t, state_t) = results
    assert out.dtype == out_t.dtype and out.stride() == out_t.stride()
    for a, e in ((out, out_t), (gx, gx_t), (gw, gw_t)):
        assert torch.equal(a, e)
    if gb_t is not None:
        assert torch.equal(gb, gb_t)
    for a, e in zip(state, state_t):  # running statistics
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, e)


# --------------------------------------------------------------------------- semantics


def test_position_granularity_is_the_per_position_approximation() -> None:
    ln = _affine(nn.LayerNorm(5))
    ln.granularity = "position"
    x = torch.randn(3, 4, 5)
    r = torch.randn(3, 4, 5)
    (ln(x) * r).sum().backward()
    x_hat = torch.nn.functional.layer_norm(x, (5,))
    torch.testing.assert_close(ln.weight.sum_grad_squared, (r * x_hat).square().sum((0, 1)))
    torch.testing.assert_close(ln.bias.sum_grad_squared, r.square().sum((0, 1)))

    bn = _bn(nn.BatchNorm2d, 3)()
    bn.granularity = "position"
    x, r = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    (bn(x) * r).sum().backward()
    x_hat = torch.nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(bn.weight.sum_grad_squared, (r * x_hat).square().sum((0, 2, 3)))
    torch.testing.assert_close(bn.bias.sum_grad_squared, r.square().sum((0, 2, 3)))

    gn = _affine(nn.GroupNorm(2, 4))
    gn.granularity = "position"
    x, r = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    (gn(x) * r).sum().backward()
    x_hat = torch.nn.functional.group_norm(x, 2)
    torch.testing.assert_close(gn.weight.sum_grad_squared, (r * x_hat).square().sum((0, 2)))
    torch.testing.assert_close(gn.bias.sum_grad_squared, r.square().sum((0, 2)))

    inorm = _bn(nn.InstanceNorm1d, 3, affine=True)()
    inorm.granularity = "position"
    x, r = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    (inorm(x) * r).sum().backward()
    x_hat = torch.nn.functional.instance_norm(x)
    torch.testing.assert_close(inorm.weight.sum_grad_squared, (r * x_hat).square().sum((0, 2)))
    torch.testing.assert_close(inorm.bias.sum_grad_squared, r.square().sum((0, 2)))
    with pytest.raises(ValueError, match="granularity must be one of"):
        w = torch.ones(2, requires_grad=True)
        TF.layer_norm(x, [2], w, granularity="token")  # type: ignore[arg-type]


def test_exact_statistic_differs_from_the_per_position_one() -> None:
    """Per-sample sums cancel across positions; the default must not square per position."""
    gn = nn.GroupNorm(2, 2)
    x = torch.randn(5, 2, 6)
    gn(x).sum().backward()  # dy = 1 and one channel per group: sum_s x_hat[n, c, s] = 0
    per_position = (torch.nn.functional.group_norm(x, 2) ** 2).sum((0, 2))
    assert (gn.weight.sum_grad_squared < 1e-9 * per_position).all()


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: _affine(nn.LayerNorm(5)), torch.randn(1, 5)),
        (lambda: _affine(nn.RMSNorm((2, 5))), torch.randn(1, 2, 5)),
        (lambda: _bn(nn.InstanceNorm1d, 3, **TRACKED)(), torch.randn(1, 3, 6)),
        (lambda: _affine(nn.GroupNorm(2, 4)), torch.randn(1, 4, 3)),
    ],
    ids=["ln-one-sample", "rms-one-sample", "in-one-sample", "gn-one-sample"],
)
def test_single_sample_statistic_is_the_squared_gradient(
    make: Callable[[], torch.nn.Module], x: torch.Tensor
) -> None:
    # float64: in float32 a gradient summed over positions with cancellation differs from
    # the per-sample sum by rounding (relative 4e-5 seen), which is not what this checks
    layer = make().double()
    layer(x.double()).sin().sum().backward()
    for p in layer.parameters():
        torch.testing.assert_close(p.sum_grad_squared, p.grad**2, rtol=1e-10, atol=1e-20)


def test_cauchy_schwarz() -> None:
    model = torch.nn.Sequential(_bn(nn.BatchNorm1d, 4)(), torch.nn.Tanh(), _affine(nn.LayerNorm(4)))
    model(torch.randn(7, 4) * 2).square().mean().backward()
    for p in model.parameters():
        assert (p.sum_grad_squared >= 0).all()
        assert (7 * p.sum_grad_squared >= p.grad**2 * (1 - 1e-5) - 1e-10).all()


def test_layer_called_twice_is_exact() -> None:
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = _affine(nn.LayerNorm(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(torch.tanh(self.norm(x)) * 3)

    testing.assert_matches_oracle(Twice(), lambda o, _: o.square().mean(), torch.randn(4, 3, 5))


def test_frozen_parameters_and_no_grad() -> None:
    ln = _affine(nn.LayerNorm(3))
    ln.bias.requires_grad_(False)
    ln(torch.randn(4, 2, 3)).sin().sum().backward()
    assert statistic.has(ln.weight) and not statistic.has(ln.bias)
    bn = _bn(nn.BatchNorm1d, 3)()
    with torch.no_grad():
        bn(torch.randn(4, 3))
    assert int(bn.num_batches_tracked) == 1 and not statistic.has(bn.weight)


def test_clear_errors_as_torch() -> None:
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nn.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):
        w = torch.ones(3, requires_grad=True)
        TF.batch_norm(torch.randn(4, 3), None, None, w, None, True, 0.1, 0.0)
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        nn.InstanceNorm1d(3, affine=True)(torch.randn(2, 3, 1))
    with pytest.raises(RuntimeError, match="Expected running_mean and running_var to be defined"):
        w = torch.ones(3, requires_grad=True)
        TF.instance_norm(torch.randn(2, 3, 4), weight=w, use_input_stats=False)
    with pytest.raises(ValueError, match="to match num_features"):
        nn.InstanceNorm1d(3, affine=True)(torch.randn(2, 4, 5))
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        TF.group_norm(torch.randn(2, 5, 3), 2, torch.ones(5, requires_grad=True))
