"""Reaches into private parts of torch, each in one place with the public behaviour it stands for.

``tests/test_compat.py`` checks every one of them against the installed torch, so a release
that moves one fails there loudly instead of making truegrad quietly wrong.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["module_call_kwargs", "optimized_module_type"]


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
