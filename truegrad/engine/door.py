"""The functional door: ``truegrad.nn.functional`` calls with tracked parameters enter the engine.

A ``truegrad.nn.functional`` function (and so every ``truegrad.nn`` module's forward) that is
given a tracked parameter (:class:`~truegrad.parameter.TrueGradParameter` or a tensor derived
from one) while gradients are recorded calls **torch's own function** instead: the parameter's
``__torch_function__`` hands the call to the engine, which checks where the model's samples
are, records the use (tied weights), and runs the rule with the layout it found; the model
call's tracking mode sees the call and tags its output. The door's own options
(``granularity``) travel with the call in a thread-local stack read by the engine.

Untracked parameters (plain tensors) are computed by the rule directly, with dim 0 of the
op's input as the samples.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from truegrad import _bypass

__all__ = [
    "call",
    "claim",
    "claimed",
    "options",
    "refuse_traced",
    "refuse_traced_module",
    "release",
    "takes",
]

_STATE = threading.local()
_OPTION_NAMES = ("granularity", "samples")


def _is_tracked(t: Any) -> bool:
    from truegrad.parameter import DerivedTensor, TrueGradParameter

    return isinstance(t, (TrueGradParameter, DerivedTensor)) and t.requires_grad


def takes(args: tuple, kwargs: dict) -> bool:
    """Whether this call must go through the engine (a tracked parameter among its arguments,
    gradients recorded, no bypass and no ``torch.func`` transform)."""
    if not torch.is_grad_enabled() or _bypass.bypassed():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            if any(_is_tracked(v) for v in value):
                return True
        elif _is_tracked(value):
            return True
    return False


#: parameters another backend computes the statistic of (BackPack): a door given one runs
#: torch's function, so that ``patch_torch`` active in the same process adds nothing to it
_CLAIMED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def claim(params: Iterable[torch.Tensor], backend: str) -> None:
    for param in params:
        _CLAIMED[param] = backend


def release(params: Iterable[torch.Tensor]) -> None:
    for param in params:
        _CLAIMED.pop(param, None)


def claimed(args: tuple, kwargs: dict) -> bool:
    """Whether a parameter among the arguments is computed by another backend."""
    if not _CLAIMED:
        return False
    for value in (*args, *kwargs.values()):
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor) and t in _CLAIMED:
                return True
    return False


def call(torch_function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``torch_function(*args, **kwargs)`` with the door's own keyword options (removed from
    ``kwargs``) available to the engine through :func:`options`."""
    kwargs = dict(kwargs)
    found = {name: kwargs.pop(name) for name in _OPTION_NAMES if name in kwargs}
    stack = getattr(_STATE, "stack", None)
    if stack is None:
        stack = _STATE.stack = []
    stack.append(found)
    try:
        return torch_function(*args, **kwargs)
    finally:
        stack.pop()


def options() -> dict[str, Any]:
    """The options of the innermost door call in progress (``{}`` outside one)."""
    stack = getattr(_STATE, "stack", None)
    return stack[-1] if stack else {}


_TRACED_REASON = (
    "{op} ran inside a forward that torch.compile traced with no backend preparing the model "
    "(model.compile(), or a compiled function calling the model), which hides where the "
    "model's samples are; compile with torch.compile(model), or prepare the model before "
    "compiling (truegrad.backends.get_backend('auto').prepare(model), or TrueGradCallback): "
    "its forward then runs eagerly and exactly"
)


def refuse_traced(name: str, torch_function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """A door that ``torch.compile`` traced inside a forward the engine does not follow (no
    model call in progress when it runs): the ops around it ran compiled, out of the
    engine's sight, so where the model's samples are in its input is unknown. Computes
    torch's function and leaves every tracked parameter of the call without a statistic for
    the coming backward, with the reason (docs/statistic.md: exact or absent)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in _OPTION_NAMES}
    _abandon_tracked((*args, *kwargs.values()), _TRACED_REASON.format(op=name))
    with _bypass.bypass():
        return torch_function(*args, **kwargs)


def refuse_traced_module(module: torch.nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """:func:`refuse_traced` for a ``truegrad.nn`` module whose forward calls torch directly
    (the recurrent layers): its parameters get no statistic for the coming backward."""
    _abandon_tracked(tuple(module.parameters()), _TRACED_REASON.format(op=type(module).__name__))
    with _bypass.bypass():
        return forward(*args, **kwargs)


def _abandon_tracked(values: tuple, detail: str) -> None:
    from truegrad import parameter

    for value in values:
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if _is_tracked(t):
                for source in parameter.sources_of(t):
                    parameter.abandon_statistic(source, detail)
