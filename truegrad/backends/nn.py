"""``backend="nn"``: the model's modules are (or are converted to) ``truegrad.nn`` modules.

Models built from ``truegrad.nn`` need nothing; an existing ``torch.nn`` model is
converted in place (:mod:`truegrad.backends.convert`). Nothing global is patched:
custom modules that call ``torch.nn.functional`` directly stay uncovered (use
``patch_torch`` for them, or ``truegrad.nn.functional`` in their code).
"""

from __future__ import annotations

import torch

from truegrad.backends.base import Backend, Handle, check_model, mark_prepared
from truegrad.backends.convert import convert_modules
from truegrad.backends.patch_torch import module_coverage

__all__ = ["NNBackend"]


class NNBackend(Backend):
    name = "nn"

    def prepare(self, model: torch.nn.Module) -> Handle:
        check_model(model, self.name)
        return mark_prepared(model, self.name, convert_modules(model))

    def coverage(self, model: torch.nn.Module) -> dict[str, str | None]:
        return module_coverage(model)
