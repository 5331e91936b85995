"""TGAdamW (docs/statistic.md section 4) against torch.optim.AdamW, a plain float64
re-implementation of the update, and itself across implementations."""

from __future__ import annotations

import copy

import pytest
import torch

import truegrad.optim._functional as functional_module
import truegrad.optim._fused as fused_module
from truegrad import testing
from truegrad.optim import _native
from truegrad.optim import MissingStatisticError, TGAdamW

IMPLS = {"single": dict(foreach=False), "foreach": dict(foreach=True)}
# "chunked": the single-tensor CPU loop with every parameter in chunks of 3 elements
# (by default parameters under _functional.SMALL elements take the foreach ops)
ALL_IMPLS = [*IMPLS, "chunked"]


def impl_kwargs(impl: str, monkeypatch) -> dict:
    if impl == "chunked":
        monkeypatch.setattr(functional_module, "SMALL", 0)
        monkeypatch.setattr(functional_module, "CHUNK", 3)
        return dict(foreach=False)
    return IMPLS[impl]

# raised by torch itself when torch.compile first imports Inductor
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


# ----------------------------------------------------------------------------- helpers


def per_sample(shape: tuple[int, ...], n: int = 4, dtype: torch.dtype = torch.float64):
    """Gradient ``g = sum_n g_n`` and statistic ``s = sum_n g_n**2`` of ``n`` random
    per-sample gradients (so that ``n * s >= g**2``, Cauchy-Schwarz)."""
    samples = torch.randn(n, *shape, dtype=dtype)
    return samples.sum(0), samples.square().sum(0)


class Reference:
    """docs/statistic.md section 4 in float64, one parameter at a time, no tricks."""

    def __init__(self, groups: list[dict]) -> None:
        self.groups = groups  # dicts with "params" (tensors) and every hyperparameter
        self.state: dict[int, dict] = {}

    def step(self, grads: dict[int, torch.Tensor], stats: dict[int, torch.Tensor | None]) -> None:
        for group in self.groups:
            betas = group["betas"]
            b1, b2, b3 = betas if len(betas) == 3 else (betas[0], betas[1], betas[1])
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                g, s = grads[id(p)].double(), stats[id(p)]
                if group["maximize"]:
                    g = -g
                st = self.state.setdefault(id(p), dict(t=0, m=torch.zeros_like(g), v=torch.zeros_like(g)))
                st["t"] += 1
                t = st["t"]
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                m_hat = st["m"] / (1 - b1**t)
                adam = m_hat / torch.clamp(torch.sqrt(st["v"] / (1 - b2**t)), min=eps)
                if s is None:
                    update = adam
                else:
                    st["u"] = b3 * st.get("u", torch.zeros_like(g)) + (1 - b3) * s.double()
                    update = m_hat / torch.clamp(torch.sqrt(st["u"] / (1 - b3**t)), min=eps)
                    if group["graft"]:
                        update = update * adam.norm() / (update.norm() + eps)
                new = p.double() - lr * wd * p.double()
                new = new - lr * update
                p.copy_(new)


def snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[list, dict]:
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_bitwise_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_bitwise_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_bitwise_equal(x, y)
    else:
        assert a == b


@pytest.fixture
def compile_small(monkeypatch):
    """Send every non-empty parameter through the compiled Inductor kernels (not the C
    kernel of _native.py, not the foreach path)."""
    monkeypatch.setattr(fused_module, "MIN_NUMEL", 2)
    monkeypatch.setattr(fused_module, "NATIVE_CPU", False)


@pytest.fixture
def native_lib():
    """The C kernel of _native.py (compiled once, about a second; skipped without a compiler)."""
    lib = _native.library(build=True)
    if lib is None:
        pytest.skip("no working C compiler for the TGAdamW kernel")
    return lib


# ----------------------------------------------------------------------------- AdamW


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("graft", [False, True])
def test_reduces_to_adamw_when_statistic_is_grad_squared(impl, graft, monkeypatch):
    """With s = g**2 (batch of one) u == v, so true == adam; grafting rescales by ~1."""
    w0 = torch.randn(6, 5, dtype=torch.float64)
    p_tg, p_adamw = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    # eps negligible in both: AdamW adds eps outside the sqrt, TGAdamW floors with it
    kwargs = impl_kwargs(impl, monkeypatch)
    tg = TGAdamW([p_tg], lr=0.05, betas=(0.8, 0.95), eps=1e-30, weight_decay=0.1, graft=graft, **kwargs)
    adamw = torch.optim.AdamW([p_adamw], lr=0.05, betas=(0.8, 0.95), eps=1e-30, weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(6, 5, dtype=torch.float64)
        p_tg.grad, p_adamw.grad = g.clone(), g.clone()
        p_tg.sum_grad_squared = g.square()
        tg.step()
        adamw.step()
    torch.testing.assert_close(p_tg, p_adamw, rtol=1e-12, atol=1e-14)
    assert not torch.equal(p_tg.detach(), w0)


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("graft", [True, False])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference(impl, graft, maximize, monkeypatch):
    shapes = [(4, 3), (5,), (2, 3, 2), (7,)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    groups = [
        dict(params=params[:2]),  # defaults: lr 1e-3, betas (0.9, 0.999, 0.999), wd 1e-2, eps 1e-12
        dict(params=params[2:3], lr=0.03, betas=(0.8, 0.9), weight_decay=0.0, eps=1e-8),  # beta3 = beta2
        dict(params=params[3:], lr=0.01, betas=(0.5, 0.7, 0.99), weight_decay=0.3),
    ]
    opt = TGAdamW(groups, graft=graft, maximize=maximize, **impl_kwargs(impl, monkeypatch))
    ref_params = [p.detach().clone() for p in params]
    ref_groups = []
    for group, (lo, hi) in zip(opt.param_groups, [(0, 2), (2, 3), (3, 4)]):
        ref_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ref_params[lo:hi]})
    ref_groups[1]["betas"] = (0.8, 0.9)  # the 2-tuple as the user gave it
    ref = Reference(ref_groups)
    for _ in range(20):
        grads, stats = {}, {}
        for p, r in zip(params, ref_params):
            p.grad, p.sum_grad_squared = per_sample(p.shape)
            grads[id(r)], stats[id(r)] = p.grad, p.sum_grad_squared
        opt.step()
        ref.step(grads, stats)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), r)
    assert opt.param_groups[1]["betas"] == (0.8, 0.9, 0.9)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_default_to_adam_gives_adam_update_to_param_without_statistic(impl, monkeypatch):
    with_stat = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    without = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    kwargs = impl_kwargs(impl, monkeypatch)
    opt = TGAdamW([with_stat, without], lr=0.02, default_to_adam=True, **kwargs)
    refs = [with_stat.detach().clone(), without.detach().clone()]
    ref = Reference([dict(params=refs, **{k: v for k, v in opt.defaults.items()})])
    for _ in range(20):
        with_stat.grad, with_stat.sum_grad_squared = per_sample(with_stat.shape)
        without.grad = torch.randn(5, dtype=torch.float64)
        opt.step()
        ref.step(
            {id(refs[0]): with_stat.grad, id(refs[1]): without.grad},
            {id(refs[0]): with_stat.sum_grad_squared, id(refs[1]): None},
        )
    torch.testing.assert_close(with_stat.detach(), refs[0])
    torch.testing.assert_close(without.detach(), refs[1])
    assert "exp_avg_true_sq" not in opt.state[without]


def test_partial_truegrad_trains():
    """The seed's "Partial TrueGrad" example: only the first Linear has a statistic."""
    model = torch.nn.Sequential(
        torch.nn.Linear(1, 10), torch.nn.LayerNorm(10), torch.nn.ReLU(), torch.nn.Linear(10, 1)
    )
    x = torch.linspace(-2, 2, 16).unsqueeze(1)
    y = torch.sin(2 * x)

    def loss_fn(out, target):
        return torch.nn.functional.mse_loss(out, target)

    opt = TGAdamW(model.parameters(), lr=0.02, default_to_adam=True)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        oracle = testing.sum_grad_squared_oracle(model, loss_fn, x, y).sum_grad_squared
        model[0].weight.sum_grad_squared = oracle["0.weight"]
        model[0].bias.sum_grad_squared = oracle["0.bias"]
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert "exp_avg_true_sq" in opt.state[model[0].weight]
    assert "exp_avg_true_sq" not in opt.state[model[3].weight]


# ----------------------------------------------------------------------------- errors


def _prime(opt, params, steps=2):
    for _ in range(steps):
        for p in params:
            p.grad, p.sum_grad_squared = per_sample(p.shape, dtype=p.dtype)
        opt.step()


@pytest.mark.parametrize("named", [False, True])
def test_missing_statistic_raises_and_changes_nothing(named):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2)).double()
    params = list(model.parameters())
    opt = TGAdamW(model.named_parameters() if named else model.parameters())
    _prime(opt, params)
    for p in params:
        p.grad, p.sum_grad_squared = per_sample(p.shape)
    params[2].sum_grad_squared = None  # model[1].weight, index 2, shape (2, 3)
    before = snapshot(opt, params)
    with pytest.raises(MissingStatisticError) as info:
        opt.step()
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "index 2, shape (2, 3)" in message
    assert ("'1.weight'" in message) == named
    assert "default_to_adam=True" in message
    assert "index 0" not in message and "index 1," not in message
    assert_bitwise_equal(snapshot(opt, params), before)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_statistic(set_to_none):
    p = torch.nn.Parameter(torch.randn(3))
    opt = TGAdamW([p])
    _prime(opt, [p], steps=1)
    p.grad, p.sum_grad_squared = per_sample(p.shape, dtype=torch.float32)
    opt.zero_grad(set_to_none=set_to_none)
    assert p.sum_grad_squared is None
    if set_to_none:
        assert p.grad is None
    else:
        assert torch.equal(p.grad, torch.zeros(3))


def test_step_calls_closure_first_and_uses_its_statistic():
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    ref_p = p.detach().clone()
    opt = TGAdamW([p], lr=0.1)
    ref = Reference([dict(params=[ref_p], **opt.defaults)])
    g, s = per_sample(p.shape)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        # the closure creates the gradient and the statistic: step must read them afterwards
        p.grad, p.sum_grad_squared = g.clone(), s.clone()
        return torch.tensor(1.5)

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert loss.item() == 1.5
    ref.step({id(ref_p): g}, {id(ref_p): s})
    torch.testing.assert_close(p.detach(), ref_p)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=-1e-3), r"lr must be a float >= 0, got -0\.001"),
        (dict(eps=-1.0), r"eps must be a float >= 0, got -1\.0"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\] must be a float in \[0, 1\)"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(betas=(0.9, 0.999, 1.5)), r"betas\[2\]"),
        (dict(betas=(0.9, 0.99, 0.99, 0.99)), "2 or 3 elements"),
        (dict(foreach=True, fused=True), "mutually exclusive"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TGAdamW([torch.nn.Parameter(torch.randn(2))], **kwargs)


def test_complex_parameter_rejected():
    with pytest.raises(ValueError, match="complex"):
        TGAdamW([torch.nn.Parameter(torch.randn(2, dtype=torch.complex64))])


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("where", ["grad", "statistic"])
def test_non_finite_values_propagate(impl, where, monkeypatch):
    """No silent replacement: a NaN makes the parameter NaN, as a NaN gradient does in AdamW
    (with grafting the whole tensor, through the norms)."""
    p = torch.nn.Parameter(torch.randn(5))
    p_adamw = torch.nn.Parameter(p.detach().clone())
    opt = TGAdamW([p], **impl_kwargs(impl, monkeypatch))
    g, s = per_sample(p.shape, dtype=torch.float32)
    (g if where == "grad" else s)[1] = float("nan")
    p.grad, p.sum_grad_squared = g, s
    opt.step()
    assert torch.isnan(p).all()
    if where == "grad":
        adamw = torch.optim.AdamW([p_adamw])
        p_adamw.grad = g
        adamw.step()
        assert torch.isnan(p_adamw[1]) and not torch.isnan(p_adamw[0])


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_non_finite_statistic_without_graft_stays_elementwise(impl, monkeypatch):
    p = torch.nn.Parameter(torch.randn(5))
    opt = TGAdamW([p], graft=False, **impl_kwargs(impl, monkeypatch))
    p.grad, s = per_sample(p.shape, dtype=torch.float32)
    s[3] = float("nan")
    p.sum_grad_squared = s
    opt.step()
    assert torch.isnan(p).tolist() == [False, False, False, True, False]


def test_step_counter_is_cpu_float32_scalar():
    p = torch.nn.Parameter(torch.randn(3))
    opt = TGAdamW([p])
    _prime(opt, [p], steps=3)
    step = opt.state[p]["step"]
    assert step.device.type == "cpu" and step.dtype == torch.float32 and step.dim() == 0
    assert step.item() == 3.0


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_decoupled_weight_decay_applied_once(impl, monkeypatch):
    """g = s = 0 gives m = 0 and a zero update (graft=False): p shrinks by exactly 1 - lr*wd."""
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    expected = p.detach().clone()
    opt = TGAdamW([p], lr=0.1, weight_decay=0.5, graft=False, **impl_kwargs(impl, monkeypatch))
    for _ in range(3):
        p.grad, p.sum_grad_squared = torch.zeros_like(p), torch.zeros_like(p)
        opt.step()
        expected = expected * (1 - 0.1 * 0.5)
        assert torch.equal(p.detach(), expected)


# ----------------------------------------------------------------------------- state dict


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("python_step", [False, True])
def test_state_dict_round_trip_is_bitwise(dtype, python_step):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(dtype)
    opt = TGAdamW(model.parameters(), lr=0.01)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    batches = [
        [per_sample(p.shape, dtype=state_dtype) for p in model.parameters()] for _ in range(25)
    ]

    def step(m, o, batch):
        for p, (g, s) in zip(m.parameters(), batch):
            p.grad, p.sum_grad_squared = g.to(dtype), s.clone()
        o.step()

    for batch in batches[:20]:
        step(model, opt, batch)
    model2 = copy.deepcopy(model)
    opt2 = TGAdamW(model2.parameters(), lr=0.01)
    saved = copy.deepcopy(opt.state_dict())
    if python_step:
        for st in saved["state"].values():
            st["step"] = st["step"].item()
    opt2.load_state_dict(saved)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_true_sq"):
            assert opt2.state[p2][key].dtype == state_dtype
        assert opt2.state[p2]["step"].dtype == torch.float32
    for batch in batches[20:]:
        step(model, opt, batch)
        step(model2, opt2, batch)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
        assert_bitwise_equal(opt.state[p], opt2.state[p2])


# ----------------------------------------------------------------------------- implementations


def _three_implementations_run(kind: str, graft: bool, maximize: bool, steps: int = 10):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(5, 7), (0,), (3, 2), (6,)]]
    low = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in [(4, 5), (9,)]]
    kwargs = dict(foreach=kind == "foreach", fused=kind == "fused", graft=graft, maximize=maximize)
    opt = TGAdamW(
        [dict(params=params), dict(params=low, lr=0.05, weight_decay=0.2)], lr=0.1, default_to_adam=True, **kwargs
    )
    for _ in range(steps):
        for j, p in enumerate(params + low):
            g, s = per_sample(p.shape, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
            p.grad = g.to(p.dtype)
            p.sum_grad_squared = None if j == 2 else s  # (3, 2) takes the adam update
        opt.step()
    return params + low, opt


@pytest.mark.parametrize("graft", [True, False])
def test_foreach_equals_single_tensor(graft):
    single, opt_single = _three_implementations_run("single", graft, maximize=not graft)
    foreach, opt_foreach = _three_implementations_run("foreach", graft, maximize=not graft)
    for a, b in zip(single, foreach):
        torch.testing.assert_close(b, a, rtol=1e-14, atol=0)
        for key, value in opt_single.state[a].items():
            torch.testing.assert_close(opt_foreach.state[b][key], value, rtol=1e-14, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("graft", [True, False])
def test_fused_equals_single_tensor(compile_small, graft):
    single, opt_single = _three_implementations_run("single", graft, maximize=not graft)
    fused, opt_fused = _three_implementations_run("fused", graft, maximize=not graft)
    for a, b in zip(single, fused):
        torch.testing.assert_close(b, a)
        for key, value in opt_single.state[a].items():
            torch.testing.assert_close(opt_fused.state[b][key], value)
            assert opt_fused.state[b][key].dtype == value.dtype


def test_fused_falls_back_for_small_and_non_contiguous_parameters():
    """These take the foreach path (no compilation), with the same numbers."""
    results = []
    for kind in ("single", "fused"):
        torch.manual_seed(2)
        params = [
            torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64).t()),  # non-contiguous
            torch.nn.Parameter(torch.randn(7, dtype=torch.float64)),  # below MIN_NUMEL
        ]
        opt = TGAdamW(params, lr=0.1, fused=kind == "fused")
        _prime(opt, params, steps=5)
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-14, atol=0)


def test_fused_without_torch_compile_raises(monkeypatch, compile_small):  # Inductor path
    monkeypatch.setattr(torch._dynamo, "is_inductor_supported", lambda: False)
    fused_module.compiled_kernels.cache_clear()
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = TGAdamW([p], fused=True)
    p.grad, p.sum_grad_squared = per_sample(p.shape, dtype=torch.float32)
    try:
        with pytest.raises(RuntimeError, match=r"fused=True"):
            opt.step()
    finally:
        fused_module.compiled_kernels.cache_clear()


# ----------------------------------------------------------------------------- C kernel, chunks


def _run(kind: str, dtype: torch.dtype, graft: bool, maximize: bool, steps: int = 8, **extra):
    """Parameters of ``dtype`` (one empty, one without statistic: default_to_adam) and two
    bf16 ones, through ``kind`` ("single", "foreach" or "fused")."""
    torch.manual_seed(3)
    shapes = [(5, 7), (0,), (3, 2), (6,), (40,)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    low = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in [(4, 5), (9,)]]
    kwargs = dict(single=dict(foreach=False), foreach=dict(foreach=True), fused=dict(fused=True))[kind]
    opt = TGAdamW(
        [dict(params=params), dict(params=low, lr=0.05, weight_decay=0.2)],
        lr=0.1,
        default_to_adam=True,
        graft=graft,
        maximize=maximize,
        **kwargs,
        **extra,
    )
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for _ in range(steps):
        for j, p in enumerate(params + low):
            g, s = per_sample(p.shape, dtype=state_dtype if j < len(params) else torch.float32)
            p.grad = g.to(p.dtype)
            p.sum_grad_squared = None if j == 2 else s  # (3, 2) takes the adam update
        opt.step()
    return params + low, opt


def _assert_runs_close(a_run, b_run, **tol):
    (a_params, a_opt), (b_params, b_opt) = a_run, b_run
    for a, b in zip(a_params, b_params):
        close = tol if a.dtype == torch.float64 else {}
        torch.testing.assert_close(b, a, **close)
        assert a_opt.state[a].keys() == b_opt.state[b].keys()
        for key, value in a_opt.state[a].items():
            torch.testing.assert_close(b_opt.state[b][key], value, **close)
            assert b_opt.state[b][key].dtype == value.dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("graft", [True, False])
@pytest.mark.parametrize("maximize", [False, True])
def test_native_equals_single_tensor(native_lib, dtype, graft, maximize):
    """fused=True on CPU runs the C kernel: the same numbers up to float rounding (float64
    to 1e-12), bf16 parameters with float32 state, an empty parameter, default_to_adam."""
    _assert_runs_close(
        _run("single", dtype, graft, maximize),
        _run("fused", dtype, graft, maximize),
        rtol=1e-12,
        atol=1e-14,
    )


@pytest.mark.parametrize("graft", [True, False])
def test_native_matches_reference(native_lib, graft):
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(4, 3), (5,)]]
    refs = [p.detach().clone() for p in params]
    opt = TGAdamW(params, lr=0.03, weight_decay=0.1, graft=graft, fused=True)
    ref = Reference([dict(params=refs, **{k: v for k, v in opt.defaults.items()})])
    for _ in range(20):
        for p, r in zip(params, refs):
            p.grad, p.sum_grad_squared = per_sample(p.shape)
        opt.step()
        ref.step(
            {id(r): p.grad for p, r in zip(params, refs)},
            {id(r): p.sum_grad_squared for p, r in zip(params, refs)},
        )
    for p, r in zip(params, refs):
        torch.testing.assert_close(p.detach(), r)


def test_native_falls_back_for_non_contiguous_parameters(native_lib):
    """A non-contiguous parameter takes the single-tensor loop (same numbers, bitwise)."""
    results = []
    for kind in ("single", "fused"):
        torch.manual_seed(2)
        params = [
            torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64).t()),  # non-contiguous
            torch.nn.Parameter(torch.randn(7, dtype=torch.float64)),  # C kernel
        ]
        kwargs = dict(foreach=False) if kind == "single" else dict(fused=True)
        opt = TGAdamW(params, lr=0.1, **kwargs)
        _prime(opt, params, steps=5)
        results.append(params)
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=0)


def test_native_marks_parameters_modified_for_autograd(native_lib):
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = TGAdamW([p], fused=True)
    p.grad, p.sum_grad_squared = per_sample(p.shape, dtype=torch.float32)
    version = p._version
    opt.step()
    assert p._version > version


def test_default_on_cpu_compiles_nothing_and_is_the_loop(monkeypatch):
    """Issue 14: TGAdamW() with default arguments compiled C (-march=native) on its first
    step on the CPU. The default is the fastest path that needs no compiler, the chunked
    single-tensor loop; only fused=True builds the kernel."""
    builds = []
    monkeypatch.setattr(_native, "library", lambda build=False, warn=True: builds.append(build))
    monkeypatch.setattr(_native, "_native_tgadamw", lambda *a, **k: builds.append("kernel"))
    ref = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    p = torch.nn.Parameter(ref.detach().clone())
    for q in (ref, p):
        q.grad = torch.linspace(-1, 1, 7, dtype=torch.float64)
        q.sum_grad_squared = q.grad.square() * 3
    TGAdamW([p]).step()
    TGAdamW([ref], foreach=False).step()
    assert builds == [] and torch.equal(p, ref)


@pytest.mark.parametrize("graft", [True, False])
def test_chunked_single_tensor_equals_foreach(monkeypatch, graft):
    """Chunks of 3 elements (the CPU loop of _functional) against the unchunked foreach ops
    (the grafting norms are summed in another order: ulps of the scale, hence the atol)."""
    monkeypatch.setattr(functional_module, "CHUNK", 3)
    monkeypatch.setattr(functional_module, "SMALL", 0)
    _assert_runs_close(
        _run("foreach", torch.float64, graft, True),
        _run("single", torch.float64, graft, True),
        rtol=1e-14,
        atol=1e-15,
    )


def test_single_tensor_without_dot_form_when_eps_squared_underflows():
    """float32 with eps=1e-30: eps**2 underflows, the grafting norm keeps the sqrt form
    (a zero gradient must not give 0/0)."""
    p = torch.nn.Parameter(torch.randn(6))
    opt = TGAdamW([p], eps=1e-30, foreach=False)
    p.grad, p.sum_grad_squared = torch.zeros(6), torch.zeros(6)
    opt.step()
    assert torch.isfinite(p).all()
    _assert_runs_close(
        _run("foreach", torch.float32, True, False, eps=1e-30),
        _run("single", torch.float32, True, False, eps=1e-30),
    )


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """_native as in a new process, with an empty kernel cache under tmp_path."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    _native._clear()
    yield tmp_path
    _native._clear()


def test_native_kernel_compiled_by_fused_true_and_reused_from_disk(fresh_native):
    assert _native.library(build=False) is None  # empty cache: nothing to load
    p = torch.nn.Parameter(torch.randn(5))
    p.grad, p.sum_grad_squared = torch.randn(5), torch.rand(5)
    TGAdamW([p]).step()  # the default compiles nothing
    assert not list(fresh_native.rglob("*.so"))
    TGAdamW([p], fused=True).step()  # fused=True compiles the kernel on its first step
    if _native.library(build=False) is None:
        pytest.skip("no working C compiler")
    assert _native.build_seconds > 0 and len(list(fresh_native.rglob("*.so"))) == 1
    _native._clear()  # a later process: loaded from the cache, no compilation
    assert _native.library(build=False) is not None and _native.build_seconds == 0.0


def test_kernel_source_ships_in_the_package():
    """The C source is a file of the package (not a string in Python), hashed into the
    cache key together with the exact compiler command (flags, PAR_MIN)."""
    from pathlib import Path

    kernels = Path(_native.KERNEL_DIR)
    assert (kernels / "tgadamw.c").is_file() and (kernels / "tgadamw_body.h").is_file()
    source = _native._source()
    assert (kernels / "tgadamw_body.h").read_text() in source
    assert f"-DPAR_MIN={_native.PAR_MIN}" in _native._command("cc", "a.c", "a.so")


def test_native_grafting_step_is_deterministic():
    """Per-thread partial sums added in order: the same bits on every run."""
    if _native.library(build=True) is None:
        pytest.skip("no working C compiler")
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(1 << 18, generator=g)
    results = []
    for _ in range(3):
        p = torch.nn.Parameter(torch.ones(1 << 18))
        p.grad, p.sum_grad_squared = grad, grad.square() * 4
        opt = TGAdamW([p], fused=True)
        for _ in range(3):
            opt.step()
        results.append(p.detach().clone())
    assert all(torch.equal(r, results[0]) for r in results)


def test_native_compile_failure_warns_and_returns_none(fresh_native, monkeypatch):
    monkeypatch.setattr(_native, "_compiler", lambda: "false")  # exits 1
    with pytest.warns(RuntimeWarning, match="could not compile the CPU kernel"):
        assert _native.library(build=True) is None
    assert _native.library(build=True) is None  # tried once per process
