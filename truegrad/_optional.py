"""Optional dependencies: import them on use, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


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
        raise ModuleNotFoundError(
            f"{purpose} needs the optional dependency {module!r}, which is not installed: "
            f"pip install 'truegrad[{extra}]'"
        ) from error
