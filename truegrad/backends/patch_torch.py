"""``patch_torch``: replace torch's module classes and functionals with truegrad's.

What is replaced (derived from :data:`truegrad.nn.REGISTRY` and
``truegrad.nn.functional.__all__``, so a new rule is patched without touching this file):

* every covered ``torch.nn`` class, in ``torch.nn`` and in its defining module
  (``torch.nn.modules.linear.Linear`` ...), by its ``truegrad.nn`` subclass;
* every covered ``torch.nn.functional`` function, and the ``torch.*`` function
  that ``torch.nn.functional`` re-exports under the same name (``torch.conv2d``,
  ``torch.prelu``, ``torch.bilinear`` ...), by its ``truegrad.nn.functional`` twin.

Safe by construction: idempotent, usable as a context manager, and undone by
:func:`unpatch_torch`, after which every patched name is the original object again.
References taken before patching keep working (they are torch's own objects).
The backend ``PatchTorchBackend`` also converts an existing model in place
(:mod:`truegrad.backends.convert`), for models built before patching.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional

from truegrad._originals import ORIGINALS as _ORIGINALS
from truegrad.backends.base import Backend, Handle, check_model, mark_prepared
from truegrad.backends.convert import convert_modules
from truegrad.backends.patch_model import engine_coverage

__all__ = ["PatchTorchBackend", "is_patched", "patch_torch", "patched_names", "unpatch_torch"]

_LOCK = threading.Lock()


def _targets() -> list[tuple[ModuleType, str, Any]]:
    from truegrad import nn as tnn
    from truegrad.nn import functional as tfunctional

    targets: list[tuple[ModuleType, str, Any]] = []
    for rule in tnn.REGISTRY:
        name = rule.torch_type.__name__
        for owner in (torch.nn, sys.modules[rule.torch_type.__module__]):
            if getattr(owner, name, None) is rule.torch_type:
                targets.append((owner, name, rule.module_type))
    for name in tfunctional.__all__:
        original = getattr(torch.nn.functional, name, None)
        if original is None:
            continue
        replacement = getattr(tfunctional, name)
        targets.append((torch.nn.functional, name, replacement))
        if getattr(torch, name, None) is original:
            targets.append((torch, name, replacement))
    return targets


def is_patched() -> bool:
    """Whether torch is currently patched."""
    return bool(_ORIGINALS)


def patched_names() -> list[str]:
    """Dotted names that are currently patched, e.g. ``torch.nn.functional.linear``."""
    return sorted(f"{owner.__name__}.{name}" for owner, name in _ORIGINALS)


class _PatchHandle(Handle):
    """Returned by :func:`patch_torch`; a context manager that unpatches on exit if this
    call did the patching (a nested ``with patch_torch():`` leaves the outer patch alone)."""

    def __init__(self, owns: bool) -> None:
        super().__init__("patch_torch")
        self.owns = owns
        if owns:
            self.on_undo(unpatch_torch)


def patch_torch() -> Handle:
    """Replace torch's covered module classes and functionals by truegrad's (idempotent).

    Call it before the model is created. Returns a handle: ``handle.undo()`` (or leaving
    ``with patch_torch():``) restores torch if this call patched it; :func:`unpatch_torch`
    restores it unconditionally.
    """
    with _LOCK:
        if _ORIGINALS:
            return _PatchHandle(owns=False)
        for owner, name, replacement in _targets():
            _ORIGINALS[(owner, name)] = getattr(owner, name)
            setattr(owner, name, replacement)
        return _PatchHandle(owns=True)


def unpatch_torch() -> None:
    """Restore every name :func:`patch_torch` replaced (identity-equal to before). Idempotent."""
    with _LOCK:
        while _ORIGINALS:
            (owner, name), original = _ORIGINALS.popitem()
            setattr(owner, name, original)


class PatchTorchBackend(Backend):
    """``backend="patch_torch"``: patch torch and convert the model's existing modules."""

    name = "patch_torch"

    def prepare(self, model: torch.nn.Module) -> Handle:
        check_model(model, self.name)
        handle = Handle(f"patch_torch on {type(model).__qualname__}")
        patch = patch_torch()
        handle.on_undo(patch.undo)
        conversion = convert_modules(model)
        handle.on_undo(conversion.undo)
        return mark_prepared(model, self.name, handle)

    def coverage(self, model: torch.nn.Module) -> dict[str, str | None]:
        return engine_coverage(model)
