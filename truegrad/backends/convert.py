"""In-place conversion of an existing model's modules to their ``truegrad.nn`` classes.

Each supported module gets ``module.__class__`` swapped for its ``truegrad.nn``
counterpart, and every trainable parameter of the model becomes tracked by the engine
(:func:`truegrad.parameter.track`, a class swap too): no Parameter object is created, so parameter ids, optimizer and DDP
references, ``state_dict`` keys and outputs are unchanged. Lookup follows the MRO:

* a module whose type is exactly a registered ``torch.nn`` type becomes the
  registered ``truegrad.nn`` type;
* a subclass that does not override ``forward`` (e.g. torch's
  ``NonDynamicallyQuantizableLinear``) becomes a cached subclass of both, so
  ``isinstance`` checks against the original subclass still hold;
* a subclass with its own ``forward`` is left alone (its forward decides which ops
  run; ``patch_torch`` covers it if they are torch functionals truegrad replaces).

The handle's ``undo()`` restores every original class. Converting twice is a no-op.
"""

from __future__ import annotations

import torch

from truegrad import _names
from truegrad.backends.base import Handle
from truegrad.nn import REGISTRY
from truegrad.nn.rules import base
from truegrad.nn.rules.registry import Registry, Rule

__all__ = ["convert_modules", "conversion_target"]

_MIXED: dict[tuple[type, type], type] = {}


def _mixed_class(original: type, module_type: type) -> type:
    key = (original, module_type)
    if key not in _MIXED:
        _MIXED[key] = type(
            original.__name__,
            (original, module_type),
            {"__module__": original.__module__, "__qualname__": original.__qualname__,
             "_truegrad_original": original},
        )
    return _MIXED[key]


def conversion_target(module: torch.nn.Module, registry: Registry = REGISTRY) -> tuple[Rule | None, type | None, str | None]:
    """``(rule, new class or None, reason)`` for one module; reason explains a ``None`` class."""
    original = type(module)
    rule = registry.lookup(original)
    if rule is None:
        return None, None, f"{original.__name__} has no truegrad rule"
    if isinstance(module, rule.module_type):
        return rule, None, None  # already converted
    if rule.unsupported is not None:
        reason = rule.unsupported(module)
        if reason:
            return rule, None, reason
    if original is rule.torch_type:
        return rule, rule.module_type, None
    if original.forward is rule.torch_type.forward:
        return rule, _mixed_class(original, rule.module_type), None
    return rule, None, (
        f"{original.__name__} subclasses {rule.torch_type.__name__} with its own forward"
    )


def convert_modules(model: torch.nn.Module, registry: Registry = REGISTRY) -> Handle:
    """Swap every convertible module of ``model`` to its ``truegrad.nn`` class, in place.

    Returns:
        A handle whose ``undo()`` restores the original classes of the modules it changed.
    """
    from truegrad import parameter  # the engine imports truegrad.nn

    handle = Handle(f"truegrad.nn conversion of {type(model).__qualname__}")
    _names.remember(model)
    changed: list[tuple[torch.nn.Module, type]] = []
    for module in model.modules():
        _, target, _ = conversion_target(module, registry)
        if target is not None:
            changed.append((module, type(module)))
            module.__class__ = target
    tracked = parameter.track(model.parameters())

    def restore() -> None:
        for module, original in reversed(changed):
            module.__class__ = original
        parameter.untrack(tracked)
        # hooks and use records the rules attached to the parameters
        base.forget([p for module, _ in changed for p in module.parameters(recurse=False)])

    handle.on_undo(restore)
    return handle
