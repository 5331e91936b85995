"""The seed's entry points, as thin calls into :mod:`truegrad.backends`.

* :func:`patch_torch` / :func:`unpatch_torch`: replace torch's module classes and
  functionals with ``truegrad.nn`` ones (call before creating the model), and undo it.
* :func:`convert`: convert an existing model's modules to ``truegrad.nn`` in place.
* :func:`patch_model`: turn an existing model's parameters into ``TrueGradParameter``
  in place (works for custom modules that use ordinary tensor ops on parameters).
"""

from __future__ import annotations

import torch

from truegrad.backends import get_backend
from truegrad.backends.base import Handle
from truegrad.backends.patch_torch import is_patched, patch_torch, patched_names, unpatch_torch

__all__ = ["convert", "is_patched", "patch_model", "patch_torch", "patched_names", "unpatch_torch"]


def convert(model: torch.nn.Module) -> Handle:
    """Swap every supported module of ``model`` for its ``truegrad.nn`` class, in place.

    No Parameter object is created (ids, optimizer references and ``state_dict`` keys
    are unchanged). Idempotent. ``handle.undo()`` restores the original classes.
    """
    return get_backend("nn").prepare(model)


def patch_model(model: torch.nn.Module) -> Handle:
    """Turn every trainable parameter of ``model`` into a ``TrueGradParameter`` in place.

    Returns the undo handle (``handle.undo()`` restores plain ``nn.Parameter``).
    """
    return get_backend("patch_model").prepare(model)
