"""torch's own functions, whether or not ``patch_torch`` has replaced them.

``patch_torch`` records every name it replaces in :data:`ORIGINALS`. Rules call torch
through the :data:`F` and :data:`T` proxies below, so that their forward (and their
fallback when nothing is tracked) always reaches torch's op, never truegrad's
replacement of it (which would recurse).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.nn.functional

__all__ = ["F", "ORIGINALS", "T", "Unpatched"]

#: (owner module, attribute name) -> the object ``patch_torch`` replaced
ORIGINALS: dict[tuple[ModuleType, str], Any] = {}


class Unpatched:
    """Attribute access on ``module`` that sees through ``patch_torch``."""

    __slots__ = ("_module",)

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        original = ORIGINALS.get((self._module, name))
        return original if original is not None else getattr(self._module, name)


#: ``torch.nn.functional`` as torch defines it
F = Unpatched(torch.nn.functional)
#: ``torch`` as torch defines it
T = Unpatched(torch)
