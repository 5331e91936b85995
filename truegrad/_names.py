"""Qualified parameter names for messages (weakly held; never keeps a parameter alive)."""

from __future__ import annotations

from torch.utils.weak import WeakIdKeyDictionary

import torch

__all__ = ["describe", "remember"]

_NAMES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def remember(model: torch.nn.Module) -> None:
    """Record the qualified name of every parameter of ``model`` (tied ones: first name)."""
    for name, param in model.named_parameters():
        _NAMES.setdefault(param, name)


def describe(param: torch.Tensor) -> str:
    """``'layers.0.weight' (shape (4, 3))`` if the name is known, else ``parameter of shape (4, 3)``."""
    name = _NAMES.get(param)
    shape = tuple(param.shape)
    return f"{name!r} (shape {shape})" if name else f"parameter of shape {shape}"
