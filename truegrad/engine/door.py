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
from collections.abc import Callable
from typing import Any

import torch

from truegrad import _bypass

__all__ = ["call", "options", "takes"]

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
