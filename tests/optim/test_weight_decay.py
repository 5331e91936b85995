"""The weight-decay variants of truegrad.optim.weight_decay against their closed forms, once
per parameter per step, decoupled (scaled by lr), with state through state_dict, under
TGLaProp, TGRMSProp, Graft, Sign and TGAdamW (whose decay runs in step hooks)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from truegrad.optim import (
    Graft,
    L1WeightDecay,
    L2WeightDecay,
    LpWeightDecay,
    MissingStatisticError,
    Sign,
    TGAdamW,
    TGLaProp,
    TGRMSProp,
    WeightDecayChain,
    WeightDecayToEMA,
    WeightDecayToInit,
)

LR, WD = 0.1, 0.2
C = LR * WD
SHAPES = [(3, 4), (5,), ()]


def params_away_from_zero():
    return [torch.nn.Parameter((torch.rand(s, dtype=torch.float64) + 1.0) * torch.randn(s).sign().double()
                               .where(torch.randn(s) != 0, torch.ones(s, dtype=torch.float64)))
            for s in SHAPES]


def zero_update(params):
    """A gradient and statistic whose update is 0 in every optimizer here (0 / max(0, eps))."""
    for p in params:
        p.grad = torch.zeros_like(p)
        p.sum_grad_squared = torch.zeros_like(p)


def build(cls_name, params, chain):
    if cls_name == "TGLaProp":
        return TGLaProp(params, lr=LR, weight_decay=WD, weight_decay_cls=chain)
    if cls_name == "TGRMSProp":
        return TGRMSProp(params, lr=LR, weight_decay=WD, weight_decay_cls=chain, foreach=True)
    if cls_name == "TGAdamW":
        return TGAdamW(params, lr=LR, weight_decay=WD, weight_decay_cls=chain)
    if cls_name == "Graft":
        return Graft(params, torch.optim.SGD(params, lr=1.0), torch.optim.SGD(params, lr=1.0), lr=LR,
                     weight_decay=WD, weight_decay_cls=chain)
    return Sign(params, torch.optim.SGD(params, lr=1.0), lr=LR, weight_decay=WD, weight_decay_cls=chain)


OPTIMIZERS = ["TGLaProp", "TGRMSProp", "TGAdamW", "Graft", "Sign"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_l2_closed_form_once_per_step(name):
    """p_k = (1 - lr wd)^k p_0, for every parameter (not P times per step as upstream)."""
    params = params_away_from_zero()
    p0 = [p.detach().clone() for p in params]
    opt = build(name, params, L2WeightDecay())
    for _ in range(7):
        zero_update(params)
        opt.step()
    for p, q in zip(params, p0):
        torch.testing.assert_close(p.detach(), q * (1 - C) ** 7, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_none_is_plain_l2(name):
    params = params_away_from_zero()
    p0 = [p.detach().clone() for p in params]
    opt = build(name, params, None)
    for _ in range(3):
        zero_update(params)
        opt.step()
    for p, q in zip(params, p0):
        torch.testing.assert_close(p.detach(), q * (1 - C) ** 3, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_l1_closed_form(name):
    """p_k = p_0 - k lr wd sign(p_0) while no coordinate crosses 0 (|p_0| >= 1 > 5 lr wd)."""
    params = params_away_from_zero()
    p0 = [p.detach().clone() for p in params]
    opt = build(name, params, L1WeightDecay())
    for _ in range(5):
        zero_update(params)
        opt.step()
    for p, q in zip(params, p0):
        torch.testing.assert_close(p.detach(), q - 5 * C * q.sign(), rtol=1e-12, atol=1e-15)


def test_lp_recursion():
    params = params_away_from_zero()
    ref = [p.detach().clone() for p in params]
    opt = TGLaProp(params, lr=LR, weight_decay=WD, weight_decay_cls=LpWeightDecay(2.5))
    for _ in range(4):
        zero_update(params)
        opt.step()
        ref = [r - C * r.abs().pow(2.5) * r.sign() for r in ref]
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_decay_to_init_closed_form(name):
    """The first step records p_0 (no pull: p - p_0 = 0); moved to p_0 + delta, the distance
    then shrinks as (1 - lr wd)^(k-1): p_k - p_0 = (1 - lr wd)^(k-1) delta."""
    params = params_away_from_zero()
    p0 = [p.detach().clone() for p in params]
    delta = [torch.randn_like(p) for p in params]
    opt = build(name, params, WeightDecayToInit())
    zero_update(params)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, p0))
    with torch.no_grad():
        for p, d in zip(params, delta):
            p.add_(d)
    for _ in range(6):
        zero_update(params)
        opt.step()
    for p, q, d in zip(params, p0, delta):
        torch.testing.assert_close(p.detach() - q, d * (1 - C) ** 6, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_decay_to_ema_recursion(name):
    """e_k = beta e_{k-1} + (1-beta) p_{k-1}; p_k = p_{k-1} - lr wd (p_{k-1} - e_k / (1-beta^k)),
    debiased with 1 - beta^k (upstream counts each step twice: 1 - beta^(2k))."""
    beta = 0.7
    params = params_away_from_zero()
    opt = build(name, params, WeightDecayToEMA(beta))
    ref = [p.detach().clone() for p in params]
    ema = [torch.zeros_like(r) for r in ref]
    for k in range(1, 9):
        zero_update(params)
        opt.step()
        with torch.no_grad():
            for p in params:  # move away, so that the EMA lags
                p.mul_(1.05)
        ema = [beta * e + (1 - beta) * r for e, r in zip(ema, ref)]
        ref = [(r - C * (r - e / (1 - beta**k))) * 1.05 for r, e in zip(ref, ema)]
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-14)


def test_chain_composes():
    """WeightDecayChain(ToInit, L1): p -= lr wd sign(p - p_0)."""
    params = params_away_from_zero()
    p0 = [p.detach().clone() for p in params]
    opt = TGLaProp(params, lr=LR, weight_decay=WD,
                   weight_decay_cls=WeightDecayChain(WeightDecayToInit(), L1WeightDecay()))
    zero_update(params)
    opt.step()
    with torch.no_grad():
        for p in params:
            p.add_(3.0)
    zero_update(params)
    opt.step()
    for p, q in zip(params, p0):
        torch.testing.assert_close(p.detach(), q + 3.0 - C, rtol=1e-12, atol=1e-14)
    assert "weight_decay.0.target" in opt.state[params[0]]


def test_decay_with_updates_equals_update_then_decay_of_the_old_value():
    """With a real update u_k (from a weight_decay=0 run), decay to init gives
    p_k = p_{k-1} + u_k - lr wd (p_{k-1} - p_0), in every TrueGrad optimizer."""
    for cls in (TGLaProp, TGRMSProp, TGAdamW):
        torch.manual_seed(3)
        params = params_away_from_zero()
        free = [p.detach().clone().requires_grad_() for p in params]
        opt = cls(params, lr=LR, weight_decay=WD, weight_decay_cls=WeightDecayToInit())
        opt_free = cls(free, lr=LR, weight_decay=0.0)
        ref = [p.detach().clone() for p in params]
        p0 = [p.detach().clone() for p in params]
        for _ in range(6):
            before = [f.detach().clone() for f in free]
            for p, f in zip(params, free):
                g = torch.randn_like(p)
                p.grad, f.grad = g.clone(), g.clone()
                s = g.square() / 4 + torch.rand_like(p)
                p.sum_grad_squared, f.sum_grad_squared = s.clone(), s.clone()
            opt.step()
            opt_free.step()
            ref = [r + (f.detach() - b) - C * (r - q) for r, f, b, q in zip(ref, free, before, p0)]
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12, msg=cls.__name__)


def test_parameters_without_gradient_are_not_decayed():
    params = params_away_from_zero()
    p0 = [p.detach().clone() for p in params]
    for opt in (TGLaProp(params, lr=LR, weight_decay=WD, weight_decay_cls=L2WeightDecay()),
                TGAdamW(params, lr=LR, weight_decay=WD, weight_decay_cls=L2WeightDecay())):
        zero_update(params)
        params[1].grad = None
        opt.step()
    assert torch.equal(params[1], p0[1])
    torch.testing.assert_close(params[0].detach(), p0[0] * (1 - C) ** 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("variant", ["init", "ema"])
def test_decay_state_round_trip(name, variant):
    """Saved after 5 steps, loaded into a fresh optimizer (and params): 5 more steps equal an
    uninterrupted run bit for bit; the target and the EMA travel with state_dict."""
    def chain():
        return WeightDecayToInit() if variant == "init" else WeightDecayToEMA(0.8)

    torch.manual_seed(4)
    grads = [[torch.randn(s, dtype=torch.float64) for s in SHAPES] for _ in range(10)]

    def feed(params, k):
        for p, g in zip(params, grads[k]):
            p.grad = g.clone()
            p.sum_grad_squared = g.square() + 0.5

    torch.manual_seed(9)
    a = params_away_from_zero()
    opt_a = build(name, a, chain())
    for k in range(10):
        feed(a, k)
        opt_a.step()
    torch.manual_seed(9)
    b = params_away_from_zero()
    opt_b = build(name, b, chain())
    for k in range(5):
        feed(b, k)
        opt_b.step()
    saved = copy.deepcopy(opt_b.state_dict())
    c = [p.detach().clone().requires_grad_() for p in b]
    opt_c = build(name, c, chain())
    opt_c.load_state_dict(saved)
    for k in range(5, 10):
        feed(c, k)
        opt_c.step()
    for x, y in zip(a, c):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cls", [TGLaProp, TGAdamW])
def test_deepcopy_and_pickle_keep_the_variant(cls):
    params = params_away_from_zero()
    opt = cls(params, lr=LR, weight_decay=WD, weight_decay_cls=WeightDecayToEMA(0.5))
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert isinstance(other.weight_decay_cls, WeightDecayChain)
        assert other.weight_decay_cls.operands[0].beta == 0.5
    copied = copy.deepcopy(opt)
    q = copied.param_groups[0]["params"]
    zero_update(q)
    q0 = [x.detach().clone() for x in q]
    copied.step()  # first EMA step: target = p, no pull
    assert all(torch.equal(x, y) for x, y in zip(q, q0))


def test_tgadamw_failed_step_changes_nothing_and_keeps_weight_decay():
    params = params_away_from_zero()
    p0 = [p.detach().clone() for p in params]
    opt = TGAdamW(params, lr=LR, weight_decay=WD, weight_decay_cls=WeightDecayToInit())
    zero_update(params)
    params[0].sum_grad_squared = None
    with pytest.raises(MissingStatisticError):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, p0))
    assert opt.state_dict()["param_groups"][0]["weight_decay"] == WD
    assert all("weight_decay.0.target" not in opt.state[p] for p in params)
    zero_update(params)
    opt.step()
    assert opt.param_groups[0]["weight_decay"] == WD


def test_default_tgadamw_has_no_hooks():
    opt = TGAdamW([torch.nn.Parameter(torch.randn(2))])
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert opt.weight_decay_cls is None


def test_bad_variants():
    with pytest.raises(ValueError, match=r"WeightDecayToEMA: beta.*\[0, 1\).*1"):
        WeightDecayToEMA(1.0)
    with pytest.raises(TypeError, match=r"beta.*'0.9'"):
        WeightDecayToEMA("0.9")
    with pytest.raises(ValueError, match=r"power.*>= 0.*-1"):
        LpWeightDecay(-1)
    with pytest.raises(TypeError, match=r"operands\[1\]"):
        WeightDecayChain(L1WeightDecay(), "L2")
    p = torch.nn.Parameter(torch.randn(2))
    with pytest.raises(TypeError, match=r"TGAdamW: weight_decay_cls.*L2WeightDecay\(\)"):
        TGAdamW([p], weight_decay_cls=L2WeightDecay)
    with pytest.raises(TypeError, match=r"Graft: weight_decay_cls"):
        Graft([p], torch.optim.SGD([p], lr=1.0), torch.optim.SGD([p], lr=1.0), weight_decay_cls=0.1)
