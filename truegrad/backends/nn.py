"""``backend="nn"``: the model's modules are (or are converted to) ``truegrad.nn`` modules.

Models built from ``truegrad.nn`` need nothing; an existing ``torch.nn`` model is
converted in place (:mod:`truegrad.backends.convert`) and every trainable parameter becomes
tracked by the engine, so custom modules (``x @ self.weight``, ``x * self.scale``) are
covered too, exactly as by ``patch_model``. Nothing global is patched.
"""

from __future__ import annotations

import torch

from truegrad.backends.base import Backend, Handle, already_prepared, check_model, mark_prepared
from truegrad.backends.convert import convert_modules
from truegrad.backends.patch_model import engine_coverage

__all__ = ["NNBackend"]


class NNBackend(Backend):
    name = "nn"

    def prepare(self, model: torch.nn.Module) -> Handle:
        check_model(model, self.name)
        if (done := already_prepared(model, self.name)) is not None:
            return done
        return mark_prepared(model, self.name, convert_modules(model))

    def coverage(self, model: torch.nn.Module) -> dict[str, str | None]:
        return engine_coverage(model)
