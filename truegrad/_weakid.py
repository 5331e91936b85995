"""A weakly keyed map from tensors (by identity) to values, for hot paths.

``torch.utils.weak.WeakIdKeyDictionary`` builds a ``WeakIdRef`` and compares it on
every lookup (about 7 us); rules look up a parameter's state several times per
backward. This map is a plain ``dict`` keyed by ``id(tensor)`` whose entries remove
themselves when the tensor is collected (a weak reference with a callback), so a
lookup is one dict access and an id is never mistaken for a dead tensor's.
"""

from __future__ import annotations

import weakref
from typing import Generic, TypeVar

import torch

__all__ = ["WeakIdMap"]

V = TypeVar("V")


class WeakIdMap(Generic[V]):
    """``tensor -> value`` by identity; never keeps a tensor alive."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, V]] = {}

    def get(self, key: torch.Tensor) -> V | None:
        """The value stored for ``key``, or ``None``."""
        entry = self._entries.get(id(key))
        return None if entry is None else entry[1]

    def __contains__(self, key: torch.Tensor) -> bool:
        return id(key) in self._entries

    def __setitem__(self, key: torch.Tensor, value: V) -> None:
        ident = id(key)
        entries = self._entries

        def drop(ref: weakref.ref, ident: int = ident) -> None:
            # Only the entry this reference belongs to (a replaced entry's ref is dead).
            entry = entries.get(ident)
            if entry is not None and entry[0] is ref:
                del entries[ident]

        entries[ident] = (weakref.ref(key, drop), value)

    def pop(self, key: torch.Tensor, default: V | None = None) -> V | None:
        """Remove ``key`` and return its value (``default`` if absent)."""
        entry = self._entries.pop(id(key), None)
        return default if entry is None else entry[1]

    def __len__(self) -> int:
        return len(self._entries)
