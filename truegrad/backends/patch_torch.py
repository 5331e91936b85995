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

import copyreg
import sys
import threading
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional

from truegrad import _originals
from truegrad._originals import ORIGINALS as _ORIGINALS
from truegrad.backends.base import Backend, Handle, already_prepared, check_model, mark_prepared
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
    """Returned by :func:`patch_torch`: one reference to the patch. Torch stays patched while
    any handle is active; the last ``undo()`` (or ``with`` exit) restores it. ``owns`` says
    whether this call did the patching."""

    def __init__(self, owns: bool, generation: int) -> None:
        super().__init__("patch_torch")
        self.owns = owns
        self.on_undo(lambda: _release(generation))


_USERS = 0  # active patch_torch handles
_GENERATION = 0  # bumped by unpatch_torch(): handles of an earlier patch release nothing


def _release(generation: int) -> None:
    global _USERS
    with _LOCK:
        if generation != _GENERATION or _USERS == 0:
            return
        _USERS -= 1
        if _USERS == 0:
            _restore()


def patch_torch() -> Handle:
    """Replace torch's covered module classes and functionals by truegrad's.

    Call it before the model is created. Reference-counted: every call returns a handle,
    torch stays patched while any is active, and ``handle.undo()`` (or leaving
    ``with patch_torch():``) of the last one restores torch; :func:`unpatch_torch` restores
    it unconditionally. The patch is process-wide: while it is active, every thread that
    builds a ``torch.nn.Linear`` (or another covered class) gets truegrad's class, and calls
    of the covered ``torch.nn.functional`` functions go through truegrad's (which act as
    torch's for tensors truegrad does not track).
    """
    global _USERS
    with _LOCK:
        owns = not _ORIGINALS
        if owns:
            for owner, name, replacement in _targets():
                original = getattr(owner, name)
                _ORIGINALS[(owner, name)] = original
                setattr(owner, name, replacement)
                if isinstance(original, type):
                    copyreg.pickle(original, _reduce_unpatched)
        _USERS += 1
        return _PatchHandle(owns=owns, generation=_GENERATION)


def _restore() -> None:
    while _ORIGINALS:
        (owner, name), original = _ORIGINALS.popitem()
        setattr(owner, name, original)
        if copyreg.dispatch_table.get(original) is _reduce_unpatched:
            del copyreg.dispatch_table[original]


def _reduce_unpatched(module: torch.nn.Module) -> tuple:
    """Pickling (``torch.save``, ``pickle``, ``copy.deepcopy``) of an instance of a torch
    class while ``patch_torch`` has put truegrad's class under its name: pickle would look the
    class up by name, find truegrad's and refuse. The instance is rebuilt from torch's own
    class (looked up when loading, patched or not) and its state."""
    cls = type(module)
    return (_rebuild_unpatched, (cls.__module__, cls.__qualname__), module.__getstate__())


def _rebuild_unpatched(module_name: str, qualname: str) -> torch.nn.Module:
    owner = sys.modules[module_name]
    cls = _originals.Unpatched(owner).__getattr__(qualname)
    return cls.__new__(cls)


def unpatch_torch() -> None:
    """Restore every name :func:`patch_torch` replaced (identity-equal to before), whatever
    handles are still active (their ``undo()`` then does nothing). Idempotent."""
    global _USERS, _GENERATION
    with _LOCK:
        _restore()
        _USERS = 0
        _GENERATION += 1


class PatchTorchBackend(Backend):
    """``backend="patch_torch"``: patch torch and convert the model's existing modules."""

    name = "patch_torch"

    def prepare(self, model: torch.nn.Module) -> Handle:
        check_model(model, self.name)
        if (done := already_prepared(model, self.name)) is not None:
            return done
        handle = Handle(f"patch_torch on {type(model).__qualname__}")
        patch = patch_torch()
        handle.on_undo(patch.undo)
        conversion = convert_modules(model)
        handle.on_undo(conversion.undo)
        return mark_prepared(model, self.name, handle)

    def coverage(self, model: torch.nn.Module) -> dict[str, str | None]:
        return engine_coverage(model)
