"""``torch.nn.functional`` counterparts with the same signatures that also write
``sum_grad_squared`` of the parameters they are given.

Custom modules that call ``F.linear(x, self.weight)`` can switch to
``truegrad.nn.functional.linear(x, self.weight)``. Each function also accepts a keyword-only
``granularity`` (see :mod:`truegrad.nn.settings`) where positions exist.

Every function is a door into the engine (:mod:`truegrad.engine.door`): given a tracked
parameter (every parameter of a ``truegrad.nn`` module, of a model prepared by a backend, or
one it has seen before) it hands the call to the engine, which finds where the model's
samples are (whatever layout the model put them in), counts every other use of the
parameter in the same forward, and runs the rule below. Given a plain tensor, the rule runs
directly with dim 0 of the op's input as the samples (the call is its own model), and the
tensor becomes tracked for the next calls.
"""

import functools as _functools
from collections.abc import Callable as _Callable
from typing import Any as _Any

import torch as _torch

from truegrad import _originals
from truegrad.engine import door as _door
from truegrad.engine import forward as _forward
from truegrad.nn import settings as _settings
from truegrad.nn.rules import attention as _attention
from truegrad.nn.rules import batchnorm as _batchnorm
from truegrad.nn.rules import bilinear as _bilinear
from truegrad.nn.rules import conv as _conv
from truegrad.nn.rules import embedding as _embedding
from truegrad.nn.rules import linear as _linear
from truegrad.nn.rules import normalization as _normalization
from truegrad.nn.rules import prelu as _prelu

_FAMILIES = (_linear, _bilinear, _conv, _embedding, _normalization, _batchnorm, _prelu, _attention)

__all__ = [name for family in _FAMILIES for name in family.__all__]


def _make_door(name: str, rule: _Callable[..., _Any]) -> _Callable[..., _Any]:
    torch_function = getattr(_originals.F, name)

    @_functools.wraps(rule)
    def door(*args: _Any, **kwargs: _Any) -> _Any:
        if _torch.compiler.is_compiling():  # traced: the engine must see the real call
            return traced_door(*args, **kwargs)
        if kwargs.get("granularity") is not None:  # a bad value raises on every path
            _settings.resolve_granularity(kwargs["granularity"])
        if _door.takes(args, kwargs):
            return _door.call(torch_function, args, kwargs)
        if _door.claimed(args, kwargs):  # BackPack computes these: torch's function, no statistic
            return torch_function(*args, **{k: v for k, v in kwargs.items() if k != "granularity"})
        return rule(*args, **kwargs)

    @_torch.compiler.disable
    def traced_door(*args: _Any, **kwargs: _Any) -> _Any:
        """The call, run eagerly, of a door that ``torch.compile`` traced."""
        if _door.takes(args, kwargs) and not _forward.in_call():
            return _door.refuse_traced(f"F.{name}", torch_function, args, kwargs)
        return door(*args, **kwargs)

    door.rule = rule  # type: ignore[attr-defined]
    # torch's Python functionals hand ``handle_torch_function`` the function found under their
    # own name, which is this door while patch_torch is active: the engine maps it back.
    door.torch_function = torch_function  # type: ignore[attr-defined]
    return door


def _install() -> None:
    for family in _FAMILIES:
        for name in family.__all__:
            globals()[name] = _make_door(name, getattr(family, name))


_install()
