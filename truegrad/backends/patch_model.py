"""``backend="patch_model"``: parameters become ``TrueGradParameter`` in place.

Works on models whose modules truegrad does not know (custom ``forward`` code with
``x @ self.weight``, ``x * self.scale``, ``torch.addmm(self.bias, x, self.weight)``,
views and chunks of a weight ...), because the parameter itself sees the ops that touch it
(see :mod:`truegrad.parameter` for what is covered and how).

``prepare(model)``:

* swaps ``param.__class__`` to ``TrueGradParameter`` for every trainable parameter (a
  tied parameter once, frozen ones untouched; idempotent): the same objects, so
  optimizer, DDP and ``state_dict`` references stay valid;
* hooks the forward of the model and of every module that has children, so that the
  outermost call records the batch size N (see :mod:`truegrad.parameter`);
* returns a handle whose ``undo()`` restores ``torch.nn.Parameter`` (same ids), removes
  the hooks and forgets recorded reasons.

An op it cannot split per sample leaves that parameter without a statistic and records
why (op and parameter name): :meth:`PatchModelBackend.coverage` and :func:`uncovered`.
The forward result and ``p.grad`` are never changed.
"""

from __future__ import annotations

from typing import Any

import torch

from truegrad import _names, parameter
from truegrad.backends.base import Backend, Handle, check_model, mark_prepared
from truegrad.nn.rules import base
from truegrad.parameter import TrueGradParameter

__all__ = ["PatchModelBackend", "uncovered"]

_NOT_PREPARED = "not a TrueGradParameter: call truegrad.utils.patch_model(model) first"


def _enter(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    parameter.enter_forward(args, kwargs)


def _exit(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    parameter.exit_forward()


class PatchModelBackend(Backend):
    """``backend="patch_model"``: see the module docstring."""

    name = "patch_model"

    def prepare(self, model: torch.nn.Module) -> Handle:
        check_model(model, self.name)
        handle = Handle(f"patch_model on {type(model).__qualname__}")
        _names.remember(model)
        changed = []
        for _, param in model.named_parameters():
            if param.requires_grad and type(param) is torch.nn.Parameter:
                param.__class__ = TrueGradParameter
                changed.append(param)
        buffers = parameter.remember_buffers(model)
        hooks = []
        for module in model.modules():
            # Entry points: the model and its containers (a leaf layer called on its own
            # keeps the dim-0 convention, which is its input's batch dim anyway).
            if module is not model and not any(True for _ in module.children()):
                continue
            if getattr(module, "_truegrad_patch_model", False):
                continue
            module._truegrad_patch_model = True
            hooks.append((module, module.register_forward_pre_hook(_enter, with_kwargs=True)))
            after = module.register_forward_hook(_exit, with_kwargs=True, always_call=True)
            hooks.append((module, after))

        def restore() -> None:
            for module, hook in hooks:
                hook.remove()
                module.__dict__.pop("_truegrad_patch_model", None)
            for param in changed:
                if type(param) is TrueGradParameter:
                    param.__class__ = torch.nn.Parameter
            parameter.forget(changed, buffers)
            base.forget(changed)

        handle.on_undo(restore)
        return mark_prepared(model, self.name, handle)

    def coverage(self, model: torch.nn.Module) -> dict[str, str | None]:
        """``{name: None | reason}`` for every trainable parameter: ``None`` unless a forward
        has recorded why the parameter gets no statistic (or it is not prepared)."""
        result: dict[str, str | None] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if isinstance(param, TrueGradParameter) or type(param) is torch.nn.Parameter:
                result[name] = parameter.reason(param)
            else:
                result[name] = _NOT_PREPARED
        return result


def uncovered(model: torch.nn.Module) -> dict[str, str]:
    """``{name: reason}`` of the model's parameters for which a forward recorded why they get
    no ``sum_grad_squared`` under ``patch_model``."""
    return {
        name: why
        for name, param in model.named_parameters()
        if (why := parameter.reason(param)) is not None
    }
