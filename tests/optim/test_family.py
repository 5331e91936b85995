"""The original TrueGrad library's (5.0.0) optimizer family: TGLaProp, TGRMSProp, Graft, Sign
against float64 transcriptions of upstream's update (with the decay applied once per
parameter per step, not once per parameter with a gradient as upstream does), across
implementations, through state_dict, and the 5.0.0 arguments of every TrueGrad optimizer."""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch

from truegrad.optim import (
    Graft,
    MissingStatisticError,
    Sign,
    TGAdamW,
    TGLaProp,
    TGRMSProp,
    WeightDecayToEMA,
)

SHAPES = [(3, 4), (5,), ()]
N = 8  # samples behind a statistic: N * s >= g**2


def make_params(dtype=torch.float64):
    return [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in SHAPES]


def make_data(steps: int, dtype=torch.float64):
    """Per step and parameter: (g, s) with s = g**2 / N + positive noise."""
    out = []
    for _ in range(steps):
        row = []
        for shape in SHAPES:
            g = torch.randn(shape, dtype=dtype)
            row.append((g, g.square() / N + torch.rand(shape, dtype=dtype) * 0.5 + 1e-3))
        out.append(row)
    return out


def give(params, row, without_stat=()):
    for i, (p, (g, s)) in enumerate(zip(params, row)):
        p.grad = g.clone()
        p.sum_grad_squared = None if i in without_stat else s.clone()


# ----------------------------------------------------------------- upstream transcription


def ema_(base, update, beta, step=None):
    base.mul_(beta).add_(update, alpha=1 - beta)
    return base if step is None else base / (1 - beta**step)


def div_ema(base, eps, base_sq, update_sq, beta_sq, step=None):
    return base / ema_(base_sq, update_sq, beta_sq, step).sqrt().clamp(min=eps)


class Upstream:
    """upstream truegrad/optim.py (5.0.0) ``TrueGrad.step`` + ``_inner`` of TGLaProp,
    TGRMSProp and TGAdamW, one parameter at a time, decay once per parameter per step."""

    true_stats: ClassVar[dict] = {"laprop": ["exp_avg_true", "exp_avg_true_sq"], "rmsprop": ["exp_avg_true_sq"],
                  "adamw": ["exp_avg_true_sq"]}
    base_stats: ClassVar[dict] = {"laprop": ["exp_avg", "exp_avg_sq"], "rmsprop": ["exp_avg_sq"], "adamw": ["exp_avg_sq"]}
    shared_stats: ClassVar[dict] = {"laprop": [], "rmsprop": [], "adamw": ["exp_avg"]}

    def __init__(self, kind, params, lr, betas, eps, weight_decay, graft, enforce_baseline=False):
        self.kind, self.params = kind, [p.detach().clone() for p in params]
        self.group = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "graft": graft,
                          "enforce_baseline": enforce_baseline}
        self.state = [{} for _ in params]

    def _inner(self, step, g, s, group, st):
        betas, eps, lr = group["betas"], group["eps"], group["lr"]
        update = base_update = None
        if self.kind == "laprop":
            b1, b2, b3, b4 = (betas[0], betas[1], betas[0], betas[1]) if len(betas) == 2 else betas
            alpha = 1
            if "exp_avg_true_sq" in st:
                update = ema_(st["exp_avg_true"], div_ema(g, eps, st["exp_avg_true_sq"], s, b4, step), b3)
                alpha = -lr / (1 - b3**step)
            if "exp_avg_sq" in st:
                base_update = ema_(st["exp_avg"], div_ema(g, eps, st["exp_avg_sq"], g.square(), b2, step), b1)
                alpha = -lr / (1 - b1**step)
            return base_update, update, alpha
        if self.kind == "rmsprop":
            if isinstance(betas, float):
                b1 = b2 = betas
            elif len(betas) == 1:
                b1 = b2 = betas[0]
            else:
                b1, b2 = betas
            if "exp_avg_true_sq" in st:
                update = div_ema(g, eps, st["exp_avg_true_sq"], s, b2, step)
            if "exp_avg_sq" in st:
                base_update = div_ema(g, eps, st["exp_avg_sq"], g.square(), b1, step)
            return base_update, update, -lr
        b1, b2, b3 = betas if len(betas) == 3 else (betas[0], betas[1], betas[1])
        ema_(st["exp_avg"], g, b1)
        if "exp_avg_true_sq" in st:
            update = div_ema(st["exp_avg"], eps, st["exp_avg_true_sq"], s, b3, step)
        if "exp_avg_sq" in st:
            base_update = div_ema(st["exp_avg"], eps, st["exp_avg_sq"], g.square(), b2, step)
        return base_update, update, -lr / (1 - b1**step)

    def step(self, row, without_stat=()):
        group = self.group
        for i, (p, (g, s)) in enumerate(zip(self.params, row)):
            do_base = i in without_stat or group["enforce_baseline"]
            st = self.state[i]
            if not st:
                st["step"] = 0
                for k in self.shared_stats[self.kind]:
                    st[k] = torch.zeros_like(p)
                if not do_base:
                    for k in self.true_stats[self.kind]:
                        st[k] = torch.zeros_like(p)
                if do_base or group["graft"]:
                    for k in self.base_stats[self.kind]:
                        st[k] = torch.zeros_like(p)
            st["step"] += 1
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])  # L2, once
            base_update, update, alpha = self._inner(st["step"], g, s, group, st)
            if group["graft"] and not do_base:
                alpha = alpha * base_update.norm() / update.norm().add_(group["eps"])
            elif do_base:
                update = base_update
            p.add_(update * alpha)


CLASSES = {"laprop": TGLaProp, "rmsprop": TGRMSProp, "adamw": TGAdamW}
BETAS = {
    "laprop": [(0.9, 0.99), (0.8, 0.95, 0.7, 0.9)],
    "rmsprop": [(0.9,), (0.8, 0.95), 0.85],
    "adamw": [(0.9, 0.999, 0.99)],
}


@pytest.mark.parametrize("kind,betas", [(k, b) for k, bs in BETAS.items() for b in bs])
@pytest.mark.parametrize("graft", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("partial", [False, True])
def test_matches_upstream(kind, betas, graft, weight_decay, foreach, partial):
    params = make_params()
    without = (1,) if partial else ()
    extra = {"default_to_baseline": True} if partial else {}
    # TGAdamW adds eps to the norm of the bias-corrected update, upstream to that of the
    # uncorrected one (||a|| / (||t|| + eps (1 - beta1^k)) there): equal up to eps
    hp = {"lr": 0.01, "betas": betas, "eps": 1e-12 if kind == "adamw" else 1e-8, "weight_decay": weight_decay, "graft": graft}
    opt = CLASSES[kind](params, foreach=foreach, **hp, **extra)
    ref = Upstream(kind, params, **hp)
    for row in make_data(20):
        give(params, row, without)
        opt.step()
        ref.step(row, without)
    for p, r in zip(params, ref.params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [TGLaProp, TGRMSProp])
@pytest.mark.parametrize("graft", [True, False])
def test_single_equals_foreach(cls, graft):
    results = []
    for foreach in (False, True):
        torch.manual_seed(1)
        params = make_params()
        opt = cls(params, lr=0.01, graft=graft, foreach=foreach, default_to_baseline=True,
                  weight_decay_cls=WeightDecayToEMA(0.9))
        for k, row in enumerate(make_data(20)):
            give(params, row, without_stat=(2,) if k % 3 == 0 else ())
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["laprop", "rmsprop"])
def test_enforce_baseline_ignores_statistics(kind):
    params = make_params()
    opt = CLASSES[kind](params, lr=0.01, enforce_baseline=True)
    ref = Upstream(kind, params, lr=0.01, betas=opt.param_groups[0]["betas"], eps=1e-12,
                   weight_decay=1e-2, graft=True, enforce_baseline=True)
    other = [p.detach().clone().requires_grad_() for p in params]
    opt_base = CLASSES[kind](other, lr=0.01, default_to_adam=True)
    for row in make_data(10):
        give(params, row)
        give(other, row, without_stat=(0, 1, 2))
        opt.step()
        opt_base.step()
        ref.step(row)
    for p, q, r in zip(params, other, ref.params):
        assert torch.equal(p, q)
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)
    assert all("exp_avg_true_sq" not in opt.state[p] for p in params)


def test_tgadamw_enforce_baseline():
    params = make_params()
    opt = TGAdamW(params, lr=0.01, enforce_baseline=True)
    ref = Upstream("adamw", params, lr=0.01, betas=(0.9, 0.999, 0.999), eps=1e-12, weight_decay=1e-2,
                   graft=True, enforce_baseline=True)
    for row in make_data(5):
        give(params, row)
        opt.step()
        ref.step(row)
    for p, r in zip(params, ref.params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [TGLaProp, TGRMSProp, TGAdamW])
def test_default_to_adam_and_default_to_baseline_are_aliases(cls):
    p = torch.nn.Parameter(torch.randn(3))
    for kwargs, expected in [({}, False), ({"default_to_adam": True}, True),
                             ({"default_to_baseline": True}, True),
                             ({"default_to_adam": True, "default_to_baseline": True}, True),
                             ({"default_to_baseline": False}, False)]:
        opt = cls([p], **kwargs)
        key = "default_to_adam" if cls is TGAdamW else "default_to_baseline"
        assert opt.param_groups[0][key] is expected, kwargs
    with pytest.raises(ValueError, match=r"default_to_baseline.*default_to_adam.*default_to_baseline=False.*default_to_adam=True"):
        cls([p], default_to_adam=True, default_to_baseline=False)
    if cls is not TGAdamW:  # TGAdamW's default_to_adam=False cannot be told from the default
        with pytest.raises(ValueError, match="default_to_baseline=True and default_to_adam=False"):
            cls([p], default_to_adam=False, default_to_baseline=True)
    # either name in a group
    q = torch.nn.Parameter(torch.randn(2))
    opt = cls([p])
    opt.add_param_group({"params": [q], "default_to_baseline": True})
    assert opt.param_groups[1]["default_to_adam" if cls is TGAdamW else "default_to_baseline"] is True
    # the switch works under the new name: no error for a parameter without statistic
    p.grad, p.sum_grad_squared = torch.randn(3), None
    cls([p], default_to_baseline=True).step()


@pytest.mark.parametrize("cls", [TGLaProp, TGRMSProp])
def test_missing_statistic_names_parameter(cls):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    opt = cls(model.named_parameters())
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad, p.sum_grad_squared = torch.randn_like(p), torch.rand_like(p)
    model[1].weight.sum_grad_squared = None
    with pytest.raises(MissingStatisticError, match=r"'1\.weight' \(index 2, shape \(1, 3\)\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state


# ----------------------------------------------------------------- state_dict


def _roundtrip(build, feed):
    """Save after 5 steps, load into a fresh optimizer, 5 more steps == 10 uninterrupted."""
    data = make_data(10)
    torch.manual_seed(5)
    params_a, opt_a = build()
    for row in data:
        feed(params_a, row)
        opt_a.step()
    torch.manual_seed(5)
    params_b, opt_b = build()
    for row in data[:5]:
        feed(params_b, row)
        opt_b.step()
    saved = copy.deepcopy(opt_b.state_dict())
    params_c = [p.detach().clone().requires_grad_() for p in params_b]
    torch.manual_seed(6)
    _, opt_c = build(params_c)
    opt_c.load_state_dict(saved)
    for row in data[5:]:
        feed(params_c, row)
        opt_c.step()
    for a, c in zip(params_a, params_c):
        assert torch.equal(a, c)


def _inner_pair(params):
    return (torch.optim.Adam(params, lr=0.05), torch.optim.SGD(params, lr=1.0, momentum=0.9))


BUILDERS = {
    "TGLaProp": lambda ps: TGLaProp(ps, lr=0.01, weight_decay_cls=WeightDecayToEMA(0.9)),
    "TGRMSProp": lambda ps: TGRMSProp(ps, lr=0.01, betas=(0.8, 0.9), foreach=True),
    "TGAdamW": lambda ps: TGAdamW(ps, lr=0.01, weight_decay_cls=WeightDecayToEMA(0.9), foreach=False),
    "Graft": lambda ps: Graft(ps, *_inner_pair(ps), weight_decay=0.1, weight_decay_cls=WeightDecayToEMA(0.9)),
    "Sign": lambda ps: Sign(ps, torch.optim.Adam(ps, lr=0.05), lr=0.5, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_state_dict_round_trip(name):
    def build(params=None):
        params = params if params is not None else make_params()
        return params, BUILDERS[name](params)

    _roundtrip(build, give)


# ----------------------------------------------------------------- Graft and Sign


def upstream_graft_step(params, magnitude, direction, lr, eps, weight_decay):
    """upstream Graft.step (5.0.0) with the decay once per parameter."""
    with torch.no_grad():
        for p in params:
            p.add_(p, alpha=-lr * weight_decay)
        original = [p.detach().clone() for p in params]
        magnitude.step()
        norms = []
        for o, p in zip(original, params):
            norms.append(torch.norm(o.double() - p.double()))
            p.copy_(o)
        direction.step()
        for o, p, m in zip(original, params, norms):
            update = p.double() - o.double()
            p.copy_(o.double() + update * m / torch.norm(update).clamp(min=eps) * lr)


def upstream_sign_step(params, base, lr, eps, weight_decay, graft_to_self):
    with torch.no_grad():
        for p in params:
            p.add_(p, alpha=-lr * weight_decay)
        original = [p.detach().clone() for p in params]
        base.step()
        for o, p in zip(original, params):
            update = p.double() - o.double()
            p.copy_(o)
            scale = lr
            sign_update = torch.sign(update)
            if graft_to_self:
                scale = scale * update.norm() / sign_update.norm().clamp(min=eps)
            p.add_(sign_update * scale)


def _two_copies():
    params = make_params()
    return params, [p.detach().clone().requires_grad_() for p in params]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("inner", ["torch", "truegrad"])
def test_graft_matches_upstream(weight_decay, foreach, inner):
    params, ref = _two_copies()

    def pair(ps):
        if inner == "torch":
            return torch.optim.Adam(ps, lr=0.05), torch.optim.SGD(ps, lr=1.0, momentum=0.9)
        return TGRMSProp(ps, lr=0.05, weight_decay=0), TGLaProp(ps, lr=1.0, weight_decay=0, graft=False)

    opt = Graft(params, *pair(params), weight_decay=weight_decay, lr=0.7, foreach=foreach)
    ref_pair = pair(ref)
    for row in make_data(20):
        give(params, row)
        give(ref, row)
        opt.step()
        upstream_graft_step(ref, *ref_pair, lr=0.7, eps=1e-12, weight_decay=weight_decay)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("graft_to_self", [True, False])
def test_sign_matches_upstream(weight_decay, foreach, graft_to_self):
    params, ref = _two_copies()
    opt = Sign(params, TGLaProp(params, lr=0.05, weight_decay=0), lr=0.3, weight_decay=weight_decay,
               graft_to_self=graft_to_self, foreach=foreach)
    ref_base = TGLaProp(ref, lr=0.05, weight_decay=0)
    for row in make_data(20):
        give(params, row)
        give(ref, row)
        opt.step()
        upstream_sign_step(ref, ref_base, lr=0.3, eps=1e-12, weight_decay=weight_decay,
                           graft_to_self=graft_to_self)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-10, atol=1e-12)


def test_graft_of_adam_by_itself_is_adam():
    """Magnitude == direction: the grafted update is the inner optimizer's (self-graft)."""
    params, ref = _two_copies()
    opt = Graft(params, torch.optim.Adam(params, lr=0.05), torch.optim.Adam(params, lr=0.05))
    ref_opt = torch.optim.Adam(ref, lr=0.05)
    for row in make_data(3):
        give(params, row)
        give(ref, row)
        opt.step()
        ref_opt.step()
    # magnitude and direction are two Adams with the same history: the update is Adam's
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------- argument checks


@pytest.mark.parametrize("cls", [TGLaProp, TGRMSProp])
@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"lr": -1.0}, ValueError, r"lr.*-1"),
        ({"lr": "0.1"}, TypeError, r"lr.*'0.1'"),
        ({"eps": float("nan")}, ValueError, r"eps"),
        ({"weight_decay": -0.5}, ValueError, r"weight_decay.*>= 0.*-0.5"),
        ({"graft": "yes"}, TypeError, r"graft.*'yes'"),
        ({"enforce_baseline": 1}, TypeError, r"enforce_baseline"),
        ({"default_to_baseline": "True"}, TypeError, r"default_to_baseline"),
        ({"foreach": 2}, TypeError, r"foreach"),
        ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\].*\[0, 1\).*1"),
        ({"betas": (0.9, 0.9, 0.9)}, ValueError, r"betas"),
        ({"betas": "0.9"}, TypeError, r"betas"),
        ({"weight_decay_cls": "L2"}, TypeError, r"weight_decay_cls.*'L2'"),
        ({"weight_decay_cls": WeightDecayToEMA}, TypeError, r"weight_decay_cls.*WeightDecayToEMA\(\)"),
    ],
)
def test_bad_arguments(cls, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        cls([torch.nn.Parameter(torch.randn(2))], **kwargs)


def test_bad_arguments_of_graft_and_sign():
    p = torch.nn.Parameter(torch.randn(2))
    adam = torch.optim.Adam([p])
    with pytest.raises(TypeError, match=r"Graft: direction must be a torch.optim.Optimizer"):
        Graft([p], adam, "sgd")
    with pytest.raises(ValueError, match=r"Graft: lr"):
        Graft([p], adam, adam, lr=-1.0)
    with pytest.raises(TypeError, match=r"Sign: graft_to_self"):
        Sign([p], adam, graft_to_self="no")
    with pytest.raises(TypeError, match=r"Sign: base"):
        Sign([p], None)
    with pytest.raises(ValueError, match=r"TGLaProp: betas"):
        TGLaProp([p]).add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "betas": (0.1,)})


def test_rmsprop_betas_forms():
    p = torch.nn.Parameter(torch.randn(2))
    assert TGRMSProp([p], betas=0.8).param_groups[0]["betas"] == (0.8, 0.8)
    assert TGRMSProp([p], betas=(0.8,)).param_groups[0]["betas"] == (0.8, 0.8)
    assert TGRMSProp([p], betas=(0.8, 0.7)).param_groups[0]["betas"] == (0.8, 0.7)
    assert TGLaProp([p], betas=(0.8, 0.7)).param_groups[0]["betas"] == (0.8, 0.7, 0.8, 0.7)


# ----------------------------------------------------------------- LightningCLI


@pytest.mark.parametrize(
    "class_path,init_args",
    [
        ("truegrad.optim.TGLaProp", {"lr": 0.01, "betas": [0.8, 0.9, 0.7, 0.95], "default_to_baseline": True}),
        ("truegrad.optim.TGRMSProp", {"betas": 0.9, "enforce_baseline": True, "foreach": False}),
        ("truegrad.optim.TGRMSProp", {"betas": [0.9, 0.8], "default_to_adam": True}),
        ("truegrad.optim.TGAdamW", {"lr": 0.01, "default_to_baseline": True, "enforce_baseline": False}),
        (
            "truegrad.optim.TGLaProp",
            {"weight_decay_cls": {"class_path": "truegrad.optim.WeightDecayToEMA", "init_args": {"beta": 0.9}}},
        ),
        (
            "truegrad.optim.TGAdamW",
            {"weight_decay_cls": {"class_path": "truegrad.optim.LpWeightDecay", "init_args": {"power": 2}}},
        ),
    ],
)
def test_built_from_a_lightning_cli_dict(class_path, init_args):
    """The type hints validate the YAML (jsonargparse, as LightningCLI's optimizer arguments),
    and LightningCLI's instantiate_class builds the optimizer from the dict, nested decay
    variants included (they arrive as class_path dicts)."""
    jsonargparse = pytest.importorskip("jsonargparse")
    pytest.importorskip("lightning")
    from lightning.pytorch.cli import instantiate_class

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(torch.optim.Optimizer, "optimizer", skip={"params"}, instantiate=False)
    cfg = parser.parse_object({"optimizer": {"class_path": class_path, "init_args": init_args}})
    init = parser.dump(cfg, format="json")  # what LightningCLI hands to instantiate_class
    import json

    init = json.loads(init)["optimizer"]
    model = torch.nn.Linear(2, 1)
    opt = instantiate_class(model.parameters(), init)
    assert type(opt).__name__ == class_path.rsplit(".", 1)[1]
    if "weight_decay_cls" in init_args:
        assert opt.weight_decay_cls is not None
    for key, value in init_args.items():
        if key in ("lr", "enforce_baseline", "foreach"):
            assert opt.param_groups[0][key] == value


def test_lightning_cli_refuses_bad_types():
    jsonargparse = pytest.importorskip("jsonargparse")
    for cls, bad in [(TGLaProp, {"betas": [0.9, 0.9, 0.9]}), (TGLaProp, {"graft": "maybe"}),
                     (TGRMSProp, {"betas": [0.9, 0.9, 0.9]}), (TGLaProp, {"lr": "fast"})]:
        parser = jsonargparse.ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "opt", skip={"params"}, instantiate=False)
        with pytest.raises((jsonargparse.ArgumentError, ValueError, TypeError)):
            parser.parse_object({"opt": bad})


def test_weight_decay_cls_dict_must_name_a_variant():
    p = torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="class_path must name one of"):
        TGLaProp([p], weight_decay_cls={"class_path": "os.system", "init_args": {}})


# ----------------------------------------------------------------- dtypes, shapes, zero_grad


@pytest.mark.parametrize("cls", [TGLaProp, TGRMSProp])
@pytest.mark.parametrize("foreach", [False, True])
def test_bf16_parameters_keep_float32_state(cls, foreach):
    params = make_params(torch.bfloat16)
    opt = cls(params, lr=0.01, foreach=foreach)
    for row in make_data(3, torch.bfloat16):
        give(params, row)
        opt.step()
    assert all(v.dtype == torch.float32 for p in params for k, v in opt.state[p].items() if k != "step")
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)
    fresh = [p.detach().clone().requires_grad_() for p in params]
    other = cls(fresh, lr=0.01, foreach=foreach)
    other.load_state_dict(opt.state_dict())
    for p, q in zip(params, fresh):
        for k, v in opt.state[p].items():
            assert torch.equal(other.state[q][k], v) and other.state[q][k].dtype == v.dtype


@pytest.mark.parametrize("cls", [TGLaProp, TGRMSProp])
def test_statistic_of_another_shape_is_refused(cls):
    params = make_params()
    opt = cls(params)
    give(params, make_data(1)[0])
    params[0].sum_grad_squared = torch.ones(3, 1, dtype=torch.float64)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"statistic \(sum_grad_squared\) of parameter index 0.*\(3, 1\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and not opt.state


@pytest.mark.parametrize("make", [lambda ps: TGLaProp(ps), lambda ps: Sign(ps, torch.optim.SGD(ps, lr=1.0)),
                                  lambda ps: Graft(ps, torch.optim.SGD(ps, lr=1.0), torch.optim.SGD(ps, lr=1.0))])
def test_zero_grad_clears_the_statistic(make):
    params = make_params()
    opt = make(params)
    give(params, make_data(1)[0])
    opt.zero_grad()
    assert all(p.grad is None and getattr(p, "sum_grad_squared", None) is None for p in params)


@pytest.mark.parametrize("which", ["graft", "sign"])
def test_graft_and_sign_single_equals_foreach(which):
    results = []
    for foreach in (False, True):
        torch.manual_seed(2)
        params = make_params()
        if which == "graft":
            opt = Graft(params, torch.optim.Adam(params, lr=0.05), torch.optim.SGD(params, lr=1.0, momentum=0.5),
                        lr=0.5, weight_decay=0.1, weight_decay_cls=WeightDecayToEMA(0.8), foreach=foreach)
        else:
            opt = Sign(params, torch.optim.Adam(params, lr=0.05), lr=0.5, weight_decay=0.1, foreach=foreach)
        for row in make_data(20):
            give(params, row)
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_exports():
    from truegrad import optim

    for name in ("TGAdamW", "TGLaProp", "TGRMSProp", "Graft", "Sign", "L1WeightDecay", "L2WeightDecay",
                 "LpWeightDecay", "WeightDecayToInit", "WeightDecayToEMA", "WeightDecayToValue",
                 "WeightDecayChain", "MissingStatisticError"):
        assert name in optim.__all__ and hasattr(optim, name)
