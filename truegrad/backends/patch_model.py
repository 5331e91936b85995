"""``backend="patch_model"``: parameters become ``TrueGradParameter`` in place.

Works on models whose modules truegrad does not know (custom ``forward`` code with
``x @ self.weight``, ``x * self.scale``, ``torch.addmm(self.bias, x, self.weight)``,
views and chunks of a weight ...), because the parameter itself sees the ops that touch it
(see :mod:`truegrad.parameter` for what is covered and how).

``prepare(model)``:

* swaps ``param.__class__`` to ``TrueGradParameter`` for every trainable parameter (a
  tied parameter once, frozen ones untouched; idempotent): the same objects, so
  optimizer, DDP and ``state_dict`` references stay valid;
* while tracked parameters live, every model call is tracked: the outermost module call
  records the batch and follows the samples through the forward
  (:mod:`truegrad.engine.forward`);
* returns a handle whose ``undo()`` restores ``torch.nn.Parameter`` (same ids) and forgets
  recorded reasons.

An op it cannot split per sample leaves that parameter without a statistic and records
why (op and parameter name): :meth:`PatchModelBackend.coverage` and :func:`uncovered`.
The forward result and ``p.grad`` are never changed.
"""

from __future__ import annotations

import torch

from truegrad import _names, parameter
from truegrad.backends.base import Backend, Handle, already_prepared, check_model, mark_prepared
from truegrad.parameter import TrueGradParameter

__all__ = ["AutoBackend", "PatchModelBackend", "engine_coverage", "uncovered"]



class PatchModelBackend(Backend):
    """``backend="patch_model"``: see the module docstring."""

    name = "patch_model"

    def prepare(self, model: torch.nn.Module) -> Handle:
        check_model(model, self.name)
        if (done := already_prepared(model, self.name)) is not None:
            return done
        handle = Handle(f"patch_model on {type(model).__qualname__}")
        _names.remember(model)
        changed = parameter.track(model.parameters())
        handle.on_undo(lambda: parameter.untrack(changed))
        return mark_prepared(model, self.name, handle)

    def coverage(self, model: torch.nn.Module) -> dict[str, str | None]:
        """``{name: None | reason}`` for every trainable parameter: ``None`` unless a forward
        has recorded why the parameter gets no statistic (or it is not prepared)."""
        return engine_coverage(model)


class AutoBackend(PatchModelBackend):
    """``backend="auto"``, the default: the engine on every trainable parameter, nothing else
    changed (no module classes swapped, nothing patched globally). The same numbers as
    ``"nn"``, ``"patch_torch"`` and ``"patch_model"``, which are the seed's doors into the
    same engine."""

    name = "auto"


def engine_coverage(model: torch.nn.Module) -> dict[str, str | None]:
    """Coverage by the engine (every backend but BackPack), for every trainable parameter:
    the reason a forward recorded why it gets no statistic, else ``None`` (covered). The
    engine decides per use, in the forward: before any forward every parameter it can track
    (a ``torch.nn.Parameter``) reads ``None``, and one it cannot (another tensor subclass)
    says so."""
    result: dict[str, str | None] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if isinstance(param, TrueGradParameter) or type(param) is torch.nn.Parameter:
            result[name] = parameter.reason(param)
        else:
            result[name] = f"a {type(param).__name__}, which truegrad does not track"
    return result


def uncovered(model: torch.nn.Module) -> dict[str, str]:
    """``{name: reason}`` of the model's parameters for which a forward recorded why they get
    no ``sum_grad_squared`` under ``patch_model``."""
    return {
        name: why
        for name, param in model.named_parameters()
        if (why := parameter.reason(param)) is not None
    }
