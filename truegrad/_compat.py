"""Reaches into private parts of torch, each in one place with the public behaviour it stands for.

``tests/test_compat.py`` checks every one of them against the installed torch, so a release
that moves one fails there loudly instead of making truegrad quietly wrong.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

__all__ = [
    "called_by_parameter_new",
    "current_backward_id",
    "module_call_kwargs",
    "optimized_module_type",
]


def current_backward_id() -> int:
    """An id of the backward pass running in this thread (autograd's graph task id), ``-1``
    outside one. Per-backward state (per-sample gradients kept for a shared parameter) is
    tagged with it, so that what a backward interrupted by an exception left behind is never
    added to the next one. ``torch._C._current_graph_task_id`` (torch 2.1 - 2.13)."""
    return int(torch._C._current_graph_task_id())


def module_call_kwargs() -> dict[str, Any]:
    """The keyword arguments of the ``nn.Module`` call whose global forward pre-hook is running.

    ``torch.nn.modules.module.register_module_forward_pre_hook`` hooks get ``(module, args)``
    only (the per-module ``with_kwargs`` option does not exist for global hooks), but a model
    called as ``model(input_ids=...)`` has its batch in the keywords. ``Module._call_impl``
    (torch 2.4 - 2.13) calls the hooks from its nested ``inner()`` whose frame holds ``kwargs``;
    this reads it from the caller's frame. Returns ``{}`` when the frame is not found.
    """
    frame = sys._getframe(2)  # 0: this function, 1: the hook, 2: Module._call_impl (inner)
    for _ in range(3):
        if frame is None:
            break
        if frame.f_code.co_name in ("inner", "_call_impl") and "kwargs" in frame.f_code.co_varnames + frame.f_code.co_cellvars + frame.f_code.co_freevars:
            value = frame.f_locals.get("kwargs")
            if isinstance(value, dict):
                return value
        frame = frame.f_back
    return {}


def optimized_module_type() -> type:
    """The class of what ``torch.compile(module)`` returns (an ``nn.Module`` wrapping the
    original; its hooks fire before the wrapped module's)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


_PARAMETER_NEW = torch.nn.Parameter.__new__.__code__


def called_by_parameter_new() -> bool:
    """Whether the ``__torch_function__`` handler calling this runs ``data.detach()`` for
    ``torch.nn.Parameter(data)`` (frame 2: ``Parameter.__new__``). For a tensor subclass,
    ``Parameter.__new__`` (torch 2.0 - 2.13) requires ``detach()`` to keep the subclass, which
    ``torch.nn.utils.parametrize`` relies on when it re-registers a parameter."""
    frame = sys._getframe(2)  # 0: this function, 1: the handler, 2: its caller
    return frame is not None and frame.f_code is _PARAMETER_NEW
