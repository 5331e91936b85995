"""Catalogue of bad arguments to every public entry point (issue 12, finding 10 and build).

Each case builds fresh objects, makes one call with one bad argument and expects an
exception of a fitting type (``TypeError`` for a wrong type, ``ValueError`` for a value out of
range or an unknown choice) whose message names the argument and shows the bad value (every
``.*``-separated part of a case's pattern must be found in the message, in any order). Where
the call could change something (an optimizer's groups, a model's classes and parameters, the
process-wide settings, torch's patch), a snapshot taken before the call must equal the one
taken after it: a call that fails changes nothing.

The cases whose id starts with ``finding-`` are the ten findings of the issue, verbatim.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch

import truegrad
from truegrad import nn as tnn
from truegrad import statistic, testing, utils
from truegrad.backends import BACKENDS, get_backend
from truegrad.backends import base as backends_base
from truegrad.backends.patch_torch import is_patched
from truegrad.nn import functional as tF
from truegrad.nn import settings
from truegrad.optim import TGAdamW

Snapshot = Callable[[], Any]


class Case(NamedTuple):
    id: str
    make: Callable[[], tuple[Callable[[], Any], Snapshot]]
    error: type[BaseException]
    match: str


CASES: list[Case] = []


def case(id: str, error: type[BaseException], match: str) -> Callable:
    """Register ``make() -> (call, snapshot)`` as one case of the catalogue."""

    def register(make: Callable[[], tuple[Callable[[], Any], Snapshot]]) -> Callable:
        CASES.append(Case(id, make, error, match))
        return make

    return register


def simple(id: str, error: type[BaseException], match: str, call: Callable[[], Any]) -> None:
    """A case with nothing to compare (the call creates what it fails on)."""
    CASES.append(Case(id, lambda: (call, lambda: None), error, match))


# ----------------------------------------------------------------------------- snapshots


def _tensor(t: torch.Tensor | None) -> Any:
    return None if t is None else (t.dtype, tuple(t.shape), t.detach().cpu().tolist())


def model_snapshot(model: torch.nn.Module) -> Any:
    """Everything a failed prepare/diagnose/oracle call must leave as it was."""
    return (
        [type(m) for m in model.modules()],
        [
            (n, type(p), p.requires_grad, _tensor(p), _tensor(p.grad), _tensor(statistic.get(p)))
            for n, p in model.named_parameters()
        ],
        list(backends_base._PREPARED.get(model, ())),
        is_patched(),
    )


def optimizer_snapshot(opt: torch.optim.Optimizer) -> Any:
    return (
        [
            (sorted(k for k in g if k != "params"), [id(p) for p in g["params"]],
             {k: v for k, v in g.items() if k not in ("params", "param_names")})
            for g in opt.param_groups
        ],
        {id(p): sorted(s) for p, s in opt.state.items()},
        [_tensor(p) for g in opt.param_groups for p in g["params"]],
    )


def settings_snapshot() -> Any:
    return (settings.chunk_bytes, settings.granularity, settings.bitwise_grad, is_patched())


def params(n: int = 1) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(2, 2)) for _ in range(n)]


def complex_param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def loss(out: torch.Tensor, _: Any) -> torch.Tensor:
    return out.square().mean()


X = torch.randn(5, 3)
NAN = float("nan")


# ----------------------------------------------------------------------------- TGAdamW()


def _tgadamw(id: str, error: type[BaseException], match: str, **kwargs: Any) -> None:
    simple(id, error, match, lambda: TGAdamW(params(), **kwargs))


_tgadamw("finding-TGAdamW(eps='x')", TypeError, r"eps.*'x'", eps="x")
_tgadamw("finding-TGAdamW(weight_decay=None)", TypeError, r"weight_decay.*None", weight_decay=None)
_tgadamw("finding-TGAdamW(graft='False')", TypeError, r"graft.*'False'", graft="False")
_tgadamw("finding-TGAdamW(default_to_adam='False')", TypeError, r"default_to_adam.*'False'",
         default_to_adam="False")
_tgadamw("TGAdamW(lr='x')", TypeError, r"lr.*'x'", lr="x")
_tgadamw("TGAdamW(lr=None)", TypeError, r"lr.*None", lr=None)
_tgadamw("TGAdamW(lr=True)", TypeError, r"lr.*True", lr=True)
_tgadamw("TGAdamW(lr=-1.0)", ValueError, r"lr.*-1\.0", lr=-1.0)
_tgadamw("TGAdamW(lr=nan)", ValueError, r"lr.*nan", lr=NAN)
_tgadamw("TGAdamW(lr=inf)", ValueError, r"lr.*inf", lr=math.inf)
_tgadamw("TGAdamW(lr=tensor)", TypeError, r"lr.*tensor\(0\.1", lr=torch.tensor(0.1))
_tgadamw("TGAdamW(betas=(0.9,))", ValueError, r"betas.*\(0\.9,\)", betas=(0.9,))
_tgadamw("TGAdamW(betas=4 values)", ValueError, r"betas.*\(0\.9, 0\.99, 0\.99, 0\.99\)",
         betas=(0.9, 0.99, 0.99, 0.99))
_tgadamw("TGAdamW(betas=(1.0, 0.999))", ValueError, r"betas\[0\].*1\.0.*\[0, 1\)", betas=(1.0, 0.999))
_tgadamw("TGAdamW(betas=(0.9, -0.1))", ValueError, r"betas\[1\].*-0\.1", betas=(0.9, -0.1))
_tgadamw("TGAdamW(betas=(nan, 0.9))", ValueError, r"betas\[0\].*nan", betas=(NAN, 0.9))
_tgadamw("TGAdamW(betas='ab')", TypeError, r"betas.*'ab'", betas="ab")
_tgadamw("TGAdamW(betas=('0.9', '0.999'))", TypeError, r"betas\[0\].*'0\.9'", betas=("0.9", "0.999"))
_tgadamw("TGAdamW(betas=None)", TypeError, r"betas.*None", betas=None)
_tgadamw("TGAdamW(betas=(True, 0.9))", TypeError, r"betas\[0\].*True", betas=(True, 0.9))
_tgadamw("TGAdamW(eps=-1.0)", ValueError, r"eps.*-1\.0", eps=-1.0)
_tgadamw("TGAdamW(eps=nan)", ValueError, r"eps.*nan", eps=NAN)
_tgadamw("TGAdamW(eps=None)", TypeError, r"eps.*None", eps=None)
_tgadamw("TGAdamW(weight_decay=-0.1)", ValueError, r"weight_decay.*-0\.1", weight_decay=-0.1)
_tgadamw("TGAdamW(weight_decay='0.1')", TypeError, r"weight_decay.*'0\.1'", weight_decay="0.1")
_tgadamw("TGAdamW(weight_decay=inf)", ValueError, r"weight_decay.*inf", weight_decay=math.inf)
_tgadamw("TGAdamW(graft=None)", TypeError, r"graft.*None", graft=None)
_tgadamw("TGAdamW(graft=1)", TypeError, r"graft.*1", graft=1)
_tgadamw("TGAdamW(default_to_adam=None)", TypeError, r"default_to_adam.*None", default_to_adam=None)
_tgadamw("TGAdamW(foreach='no')", TypeError, r"foreach.*'no'", foreach="no")
_tgadamw("TGAdamW(foreach=1)", TypeError, r"foreach.*1", foreach=1)
_tgadamw("TGAdamW(maximize='no')", TypeError, r"maximize.*'no'", maximize="no")
_tgadamw("TGAdamW(maximize=None)", TypeError, r"maximize.*None", maximize=None)
_tgadamw("TGAdamW(fused='yes')", TypeError, r"fused.*'yes'", fused="yes")
_tgadamw("TGAdamW(foreach=True, fused=True)", ValueError, r"foreach.*fused", foreach=True, fused=True)
simple("TGAdamW([])", ValueError, r"params.*empty", lambda: TGAdamW([]))
simple("TGAdamW(None)", TypeError, r"params.*None", lambda: TGAdamW(None))
simple("TGAdamW(tensor)", TypeError, r"params.*Tensor", lambda: TGAdamW(torch.randn(2)))
simple("TGAdamW(['x'])", TypeError, r"params.*'x'", lambda: TGAdamW(["x"]))
simple("TGAdamW([1.0])", TypeError, r"params.*1\.0", lambda: TGAdamW([1.0]))
simple("TGAdamW([complex])", ValueError, r"index 0.*complex", lambda: TGAdamW([complex_param()]))
simple("TGAdamW([real, complex])", ValueError, r"index 1.*complex64",
       lambda: TGAdamW([*params(), complex_param()]))
simple("TGAdamW(named complex)", ValueError, r"'w'.*complex",
       lambda: TGAdamW([("w", complex_param())]))
simple("TGAdamW(duplicate)", ValueError, r"index 1.*more than once",
       lambda: TGAdamW(params() * 2))
simple("TGAdamW(group lr=-1)", ValueError, r"lr.*-1",
       lambda: TGAdamW([{"params": params(), "lr": -1}]))
simple("TGAdamW(group graft='yes')", TypeError, r"graft.*'yes'",
       lambda: TGAdamW([{"params": params(), "graft": "yes"}]))


# ----------------------------------------------------------------------------- add_param_group


def _add_group(id: str, error: type[BaseException], match: str, group: Callable[[list], Any]) -> None:
    def make() -> tuple[Callable[[], Any], Snapshot]:
        existing = params()
        opt = TGAdamW(existing)
        return (lambda: opt.add_param_group(group(existing))), lambda: optimizer_snapshot(opt)

    CASES.append(Case(id, make, error, match))


_add_group("finding-add_param_group(lr=-1.0)", ValueError, r"lr.*-1\.0",
           lambda _: {"params": params(), "lr": -1.0})
_add_group("finding-add_param_group(complex)", ValueError, r"index 1.*complex",
           lambda _: {"params": [complex_param()]})
_add_group("add_param_group(param of group 0)", ValueError, r"index 1.*already in parameter group 0",
           lambda existing: {"params": existing})
_add_group("add_param_group(duplicate)", ValueError, r"index 2.*more than once",
           lambda _: {"params": params() * 2})
_add_group("add_param_group(lr='x')", TypeError, r"lr.*'x'", lambda _: {"params": params(), "lr": "x"})
_add_group("add_param_group(lr=nan)", ValueError, r"lr.*nan", lambda _: {"params": params(), "lr": NAN})
_add_group("add_param_group(graft='False')", TypeError, r"graft.*'False'",
           lambda _: {"params": params(), "graft": "False"})
_add_group("add_param_group(eps='x')", TypeError, r"eps.*'x'", lambda _: {"params": params(), "eps": "x"})
_add_group("add_param_group(weight_decay=None)", TypeError, r"weight_decay.*None",
           lambda _: {"params": params(), "weight_decay": None})
_add_group("add_param_group(betas=(0.9,))", ValueError, r"betas.*\(0\.9,\)",
           lambda _: {"params": params(), "betas": (0.9,)})
_add_group("add_param_group(maximize='no')", TypeError, r"maximize.*'no'",
           lambda _: {"params": params(), "maximize": "no"})
_add_group("add_param_group(foreach+fused)", ValueError, r"foreach.*fused",
           lambda _: {"params": params(), "foreach": True, "fused": True})
_add_group("add_param_group(['x'])", TypeError, r"params.*'x'", lambda _: {"params": ["x"]})
_add_group("add_param_group(no params)", ValueError, r"param_group.*'params'", lambda _: {"lr": 0.1})
_add_group("add_param_group('x')", TypeError, r"param_group.*'x'", lambda _: "x")


# ----------------------------------------------------------------------------- step


def _sparse_case(default_to_adam: bool) -> tuple[Callable[[], Any], Snapshot]:
    emb = torch.nn.Embedding(4, 3, sparse=True)
    lin = torch.nn.Linear(3, 1)
    opt = TGAdamW([*lin.named_parameters(prefix="lin"), *emb.named_parameters(prefix="emb")],
                  default_to_adam=default_to_adam)
    lin(emb(torch.tensor([0, 2]))).sum().backward()
    for p in lin.parameters():  # the dense parameters have their statistic
        statistic.add(p, p.grad.square())
    return opt.step, lambda: optimizer_snapshot(opt)


CASES.append(Case("finding-step(sparse gradient)", lambda: _sparse_case(False), RuntimeError,
                  r"'emb\.weight'.*sparse"))
CASES.append(Case("step(sparse gradient, default_to_adam)", lambda: _sparse_case(True), RuntimeError,
                  r"'emb\.weight'.*sparse"))


# ----------------------------------------------------------------------------- callback


def _callback(id: str, error: type[BaseException], match: str, **kwargs: Any) -> None:
    def call() -> None:
        from truegrad_lightning import TrueGradCallback

        TrueGradCallback(**kwargs)

    simple(id, error, match, call)


_callback("finding-TrueGradCallback(log_statistics='no')", TypeError, r"log_statistics.*'no'",
          log_statistics="no")
_callback("TrueGradCallback(log_statistics=None)", TypeError, r"log_statistics.*None", log_statistics=None)
_callback("TrueGradCallback(backend='nope')", ValueError, r"backend.*'nope'.*'auto'", backend="nope")
_callback("TrueGradCallback(backend=None)", TypeError, r"backend.*None", backend=None)
_callback("TrueGradCallback(chunk_bytes=0)", ValueError, r"chunk_bytes.*0", chunk_bytes=0)
_callback("TrueGradCallback(chunk_bytes=-1)", ValueError, r"chunk_bytes.*-1", chunk_bytes=-1)
_callback("TrueGradCallback(chunk_bytes='1')", TypeError, r"chunk_bytes.*'1'", chunk_bytes="1")
_callback("TrueGradCallback(chunk_bytes=True)", TypeError, r"chunk_bytes.*True", chunk_bytes=True)
_callback("TrueGradCallback(chunk_bytes=1.5)", TypeError, r"chunk_bytes.*1\.5", chunk_bytes=1.5)
_callback("TrueGradCallback(bitwise_grad='yes')", TypeError, r"bitwise_grad.*'yes'", bitwise_grad="yes")
_callback("TrueGradCallback(bitwise_grad=1)", TypeError, r"bitwise_grad.*1", bitwise_grad=1)


# ----------------------------------------------------------------------------- configure_optimizers


_NET = object()  # the default module of a case: a fresh net()


def _configure(id: str, error: type[BaseException], match: str, module: Any = _NET, **kwargs: Any) -> None:
    def make() -> tuple[Callable[[], Any], Snapshot]:
        from truegrad_lightning.optimizers import configure_optimizers

        model = net() if module is _NET else module
        kwargs.setdefault("total_steps", 10)

        def snapshot() -> Any:
            return model_snapshot(model) if isinstance(model, torch.nn.Module) else None

        return (lambda: configure_optimizers(model, **kwargs)), snapshot

    CASES.append(Case(id, make, error, match))


_configure("finding-configure_optimizers('x')", TypeError, r"module.*'x'", module="x")
_configure("configure_optimizers(None)", TypeError, r"module.*None", module=None)
_configure("configure_optimizers(lr=-1)", ValueError, r"lr.*-1", lr=-1)
_configure("configure_optimizers(lr='x')", TypeError, r"lr.*'x'", lr="x")
_configure("configure_optimizers(lr=None)", TypeError, r"lr.*None", lr=None)
_configure("configure_optimizers(weight_decay=None)", TypeError, r"weight_decay.*None", weight_decay=None)
_configure("configure_optimizers(warmup_steps=-1)", ValueError, r"warmup_steps.*-1", warmup_steps=-1)
_configure("configure_optimizers(warmup_steps='x')", TypeError, r"warmup_steps.*'x'", warmup_steps="x")
_configure("configure_optimizers(warmup_steps=True)", TypeError, r"warmup_steps.*True", warmup_steps=True)
_configure("configure_optimizers(warmup_steps=1.5)", ValueError, r"warmup_steps.*1\.5", warmup_steps=1.5)
_configure("configure_optimizers(schedule='cosin')", ValueError, r"schedule.*'cosin'.*'cosine'",
           schedule="cosin")
_configure("configure_optimizers(total_steps=0)", ValueError, r"total_steps.*0", total_steps=0)
_configure("configure_optimizers(total_steps='x')", TypeError, r"total_steps.*'x'", total_steps="x")
_configure("configure_optimizers(min_lr_ratio=2)", ValueError, r"min_lr_ratio.*2", min_lr_ratio=2)
_configure("configure_optimizers(optimizer='x')", TypeError, r"optimizer.*'x'", optimizer="x")
_configure("configure_optimizers(graft='False')", TypeError, r"graft.*'False'", graft="False")


# ----------------------------------------------------------------------------- diagnose


def _diagnose(id: str, error: type[BaseException], match: str, **kwargs: Any) -> None:
    def make() -> tuple[Callable[[], Any], Snapshot]:
        model = net()
        args = {"model": model, "example_inputs": X, "loss_fn": loss, "repeats": 1,
                "measure_memory": False, **kwargs}

        def snapshot() -> Any:
            return model_snapshot(model), settings_snapshot()

        return (lambda: truegrad.diagnose(**args)), snapshot

    CASES.append(Case(id, make, error, match))


simple("finding-diagnose('x')", TypeError, r"model.*'x'",
       lambda: truegrad.diagnose("x", X, loss))
_diagnose("diagnose(model=None)", TypeError, r"model.*None", model=None)
_diagnose("diagnose(loss_fn=3)", TypeError, r"loss_fn.*3", loss_fn=3)
_diagnose("diagnose(repeats=0)", ValueError, r"repeats.*0", repeats=0)
_diagnose("diagnose(repeats='2')", TypeError, r"repeats.*'2'", repeats="2")
_diagnose("diagnose(repeats=True)", TypeError, r"repeats.*True", repeats=True)
_diagnose("diagnose(backend='nope')", ValueError, r"backend.*'nope'.*'auto'", backend="nope")
_diagnose("diagnose(backend=None)", TypeError, r"backend.*None", backend=None)
_diagnose("diagnose(measure_memory='no')", TypeError, r"measure_memory.*'no'", measure_memory="no")


# ----------------------------------------------------------------------------- backends


simple("get_backend('nope')", ValueError, r"'nope'.*'auto'", lambda: get_backend("nope"))
simple("get_backend(None)", ValueError, r"None.*'auto'", lambda: get_backend(None))


def _prepare(id: str, error: type[BaseException], match: str, backend: str,
             model: Callable[[], Any]) -> None:
    def make() -> tuple[Callable[[], Any], Snapshot]:
        m = model()

        def snapshot() -> Any:
            return (model_snapshot(m) if isinstance(m, torch.nn.Module) else None), settings_snapshot()

        return (lambda: get_backend(backend).prepare(m)), snapshot

    CASES.append(Case(id, make, error, match))


for _name in BACKENDS:
    _prepare(f"{_name}.prepare('x')", TypeError, rf"{_name}.*model.*'x'", _name, lambda: "x")
    _prepare(f"{_name}.prepare(None)", TypeError, rf"{_name}.*model.*None", _name, lambda: None)
    _prepare(f"{_name}.prepare(no trainable)", ValueError, rf"Linear.*no trainable parameters.*{_name}",
             _name, lambda: torch.nn.Linear(2, 2).requires_grad_(False))


def _twice_make() -> tuple[Callable[[], Any], Snapshot]:
    model = net()
    get_backend("auto").prepare(model)
    return (lambda: get_backend("nn").prepare(model)), lambda: model_snapshot(model)


CASES.append(Case("nn.prepare(model prepared by auto)", _twice_make, ValueError,
                  r"already prepared by backend 'auto'.*'nn'"))


def _undo_make() -> tuple[Callable[[], Any], Snapshot]:
    model = net()
    handle = get_backend("patch_model").prepare(model)
    return (lambda: handle.undo("x")), lambda: model_snapshot(model)


CASES.append(Case("handle.undo('x')", _undo_make, TypeError, r"undo.*positional argument"))

simple("convert('x')", TypeError, r"model.*'x'", lambda: utils.convert("x"))
simple("convert(None)", TypeError, r"model.*None", lambda: utils.convert(None))
simple("patch_model(None)", TypeError, r"model.*None", lambda: utils.patch_model(None))
simple("patch_model(3)", TypeError, r"model.*3", lambda: utils.patch_model(3))
CASES.append(Case("patch_torch('x')", lambda: ((lambda: utils.patch_torch("x")), settings_snapshot),
                  TypeError, r"patch_torch.*positional argument"))


# ----------------------------------------------------------------------------- truegrad.nn


def _module(id: str, build: Callable[[], torch.nn.Module], x: Callable[[], torch.Tensor], value: Any) -> None:
    def make() -> tuple[Callable[[], Any], Snapshot]:
        m = build()
        m.granularity = value
        inp = x()
        return (lambda: m(inp)), lambda: model_snapshot(m)

    CASES.append(Case(id, make, ValueError, rf"granularity.*{re.escape(repr(value))}.*'sample'"))


_module("nn.Linear(granularity='token')", lambda: tnn.Linear(3, 4), lambda: torch.randn(2, 5, 3), "token")
_module("nn.Conv1d(granularity='pixel')", lambda: tnn.Conv1d(2, 3, 3), lambda: torch.randn(2, 2, 6), "pixel")
_module("nn.LayerNorm(granularity=5)", lambda: tnn.LayerNorm(3), lambda: torch.randn(2, 4, 3), 5)
_module("nn.Embedding(granularity='token')", lambda: tnn.Embedding(5, 3),
        lambda: torch.randint(0, 5, (2, 4)), "token")


def _functional(id: str, call: Callable[[Any], Any], value: Any = "token") -> None:
    CASES.append(Case(id, lambda: ((lambda: call(value)), lambda: None), ValueError,
                      rf"granularity.*{re.escape(repr(value))}.*'sample'"))


_functional("F.linear(plain weight, granularity='token')",
            lambda g: tF.linear(torch.randn(2, 3), torch.randn(4, 3, requires_grad=True), granularity=g))
_functional("F.linear(no grad, granularity='token')",
            lambda g: tF.linear(torch.randn(2, 3), torch.randn(4, 3), granularity=g))
_functional("F.linear(Parameter, granularity='token')",
            lambda g: tF.linear(torch.randn(2, 3), torch.nn.Parameter(torch.randn(4, 3)), granularity=g))
_functional("F.conv1d(granularity='pixel')",
            lambda g: tF.conv1d(torch.randn(2, 2, 6), torch.randn(3, 2, 3, requires_grad=True), granularity=g),
            "pixel")
_functional("F.layer_norm(granularity='all')",
            lambda g: tF.layer_norm(torch.randn(2, 4, 3), (3,), torch.ones(3, requires_grad=True),
                                    granularity=g), "all")
_functional("F.embedding(granularity='token')",
            lambda g: tF.embedding(torch.randint(0, 5, (2, 4)), torch.randn(5, 3, requires_grad=True),
                                   granularity=g))


# ----------------------------------------------------------------------------- settings


def _settings(id: str, error: type[BaseException], match: str, **kwargs: Any) -> None:
    def call() -> None:
        with settings.configure(**kwargs):
            pass

    CASES.append(Case(id, lambda: (call, settings_snapshot), error, match))


_settings("configure(chunk_bytes='x')", TypeError, r"chunk_bytes.*'x'", chunk_bytes="x")
_settings("configure(chunk_bytes=0)", ValueError, r"chunk_bytes.*0", chunk_bytes=0)
_settings("configure(chunk_bytes=True)", TypeError, r"chunk_bytes.*True", chunk_bytes=True)
_settings("configure(granularity='token')", ValueError, r"granularity.*'token'.*'sample'",
          chunk_bytes=1024, granularity="token")
_settings("configure(bitwise_grad='True')", TypeError, r"bitwise_grad.*'True'",
          chunk_bytes=1024, bitwise_grad="True")


# ----------------------------------------------------------------------------- oracles


def _oracle(id: str, error: type[BaseException], match: str, function: Callable, *args: Any,
            model: Any = None, **kwargs: Any) -> None:
    def make() -> tuple[Callable[[], Any], Snapshot]:
        m = net() if model is None else model

        def snapshot() -> Any:
            return model_snapshot(m) if isinstance(m, torch.nn.Module) else None

        return (lambda: function(m, *args, **kwargs)), snapshot

    CASES.append(Case(id, make, error, match))


for _f in (testing.sum_grad_squared_oracle, testing.per_sample_grads, testing.per_sample_grads_loop):
    _n = _f.__name__
    _oracle(f"{_n}('x')", TypeError, rf"{_n}.*model.*'x'", _f, loss, X, model="x")
    _oracle(f"{_n}(loss_fn='x')", TypeError, rf"{_n}.*loss_fn.*'x'", _f, "x", X)
    _oracle(f"{_n}(batch_dim=5)", ValueError, rf"{_n}.*batch_dim.*5", _f, loss, X, batch_dim=5)
    _oracle(f"{_n}(batch_dim=-3)", ValueError, rf"{_n}.*batch_dim.*-3", _f, loss, X, batch_dim=-3)
    _oracle(f"{_n}(batch_dim='0')", TypeError, rf"{_n}.*batch_dim.*'0'", _f, loss, X, batch_dim="0")
_oracle("sum_grad_squared_oracle(method='bogus')", ValueError, r"method.*'bogus'.*'func'",
        testing.sum_grad_squared_oracle, loss, X, method="bogus")
_oracle("sum_grad_squared_oracle(chunk_size=0)", ValueError, r"chunk_size.*0",
        testing.sum_grad_squared_oracle, loss, X, chunk_size=0)
_oracle("per_sample_grads(chunk_size='2')", TypeError, r"chunk_size.*'2'",
        testing.per_sample_grads, loss, X, chunk_size="2")
_EXPECTED = testing.OracleResult(grad={}, sum_grad_squared={})
_oracle("compare_to_oracle('x')", TypeError, r"model.*'x'", testing.compare_to_oracle, _EXPECTED, model="x")
_oracle("compare_to_oracle(expected='x')", TypeError, r"expected.*'x'", testing.compare_to_oracle, "x")
_oracle("compare_to_oracle(rtol=-1)", ValueError, r"rtol.*-1", testing.compare_to_oracle, _EXPECTED, rtol=-1)
_oracle("compare_to_oracle(atol_factor=nan)", ValueError, r"atol_factor.*nan",
        testing.compare_to_oracle, _EXPECTED, atol_factor=NAN)
_oracle("compare_to_oracle(check_grad='no')", TypeError, r"check_grad.*'no'",
        testing.compare_to_oracle, _EXPECTED, check_grad="no")
_oracle("compare_to_oracle(params='0.weight')", TypeError, r"params.*'0\.weight'",
        testing.compare_to_oracle, _EXPECTED, params="0.weight")
_oracle("assert_matches_oracle('x')", TypeError, r"model.*'x'", testing.assert_matches_oracle, loss, X,
        model="x")
_oracle("assert_matches_oracle(run_backward='no')", TypeError, r"run_backward.*'no'",
        testing.assert_matches_oracle, loss, X, run_backward="no")
_oracle("assert_matches_oracle(rtol='x')", TypeError, r"rtol.*'x'", testing.assert_matches_oracle, loss, X,
        rtol="x")
_oracle("assert_matches_oracle(batch_dim=2)", ValueError, r"batch_dim.*2", testing.assert_matches_oracle,
        loss, X, batch_dim=2)
simple("layer_sum_grad_squared('x')", TypeError, r"per_sample_weight_grads.*'x'",
       lambda: testing.layer_sum_grad_squared("x"))
simple("layer_sum_grad_squared(complex)", ValueError, r"per_sample_weight_grads.*complex",
       lambda: testing.layer_sum_grad_squared(torch.randn(2, 3, dtype=torch.complex64)))
simple("layer_sum_grad_squared(sparse)", ValueError, r"per_sample_weight_grads.*sparse",
       lambda: testing.layer_sum_grad_squared(torch.randn(2, 3).to_sparse()))
simple("layer_sum_grad_squared(0-d)", ValueError, r"per_sample_weight_grads.*0 dimensions",
       lambda: testing.layer_sum_grad_squared(torch.tensor(1.0)))


# ----------------------------------------------------------------------------- the test


@pytest.mark.parametrize("item", CASES, ids=[c.id for c in CASES])
def test_bad_input(item: Case) -> None:
    if "TrueGradCallback" in item.id or "configure_optimizers" in item.id:
        pytest.importorskip("lightning")
    if item.id.startswith("backpack"):
        pytest.importorskip("backpack")
    call, snapshot = item.make()
    before = snapshot()
    with pytest.raises(item.error) as info:
        call()
    message = str(info.value)
    for part in item.match.split(".*"):  # each part, in any order
        assert re.search(part, message), f"{part!r} not in the message: {message}"
    assert snapshot() == before, "the failed call changed something"


def test_catalogue_size() -> None:
    assert len(CASES) >= 80
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.id.startswith("finding-") for c in CASES) == 10


def test_numpy_bool_and_int_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    opt = TGAdamW(params(), lr=np.float64(1e-3), graft=np.bool_(False), eps=0)
    assert opt.param_groups[0]["graft"] is False and opt.param_groups[0]["eps"] == 0.0
    assert isinstance(opt.param_groups[0]["lr"], float)


def test_failed_add_param_group_leaves_the_group_dict_alone() -> None:
    opt = TGAdamW(params())
    group = {"params": params(), "betas": (0.9, 0.99), "lr": -1.0}
    with pytest.raises(ValueError):
        opt.add_param_group(group)
    assert group["betas"] == (0.9, 0.99) and "eps" not in group and len(opt.param_groups) == 1
