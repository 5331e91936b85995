"""Optional dependencies: import them on use, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["INSTALL", "require"]

#: The command that installs an extra's module without touching torch, where the plain
#: ``pip install 'truegrad[extra]'`` cannot: backpack-for-pytorch declares torchvision,
#: which would replace a CPU torch by a CUDA build (or break ``import lightning``).
INSTALL = {
    "backpack": "pip install --no-deps 'backpack-for-pytorch>=1.7' einops unfoldNd",
}


def require(module: str, extra: str, *, purpose: str) -> ModuleType:
    """Import ``module`` or raise ``ModuleNotFoundError`` naming ``truegrad[extra]``.

    Args:
        module: the module to import, e.g. ``"backpack"``.
        extra: the truegrad extra that installs it, e.g. ``"backpack"``.
        purpose: what needs it, for the message (e.g. ``"the BackPack backend"``).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        command = INSTALL.get(extra, f"pip install 'truegrad[{extra}]'")
        raise ModuleNotFoundError(
            f"{purpose} needs the optional dependency {module!r}, which is not installed: "
            f"{command}"
        ) from error
