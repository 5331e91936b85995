"""TrueGrad: exact sums of squared per-sample gradients and the TrueGrad-AdamW optimizer.

The core package imports only ``torch``. Submodules are loaded on first use::

    from truegrad import nn          # drop-in modules with hand-written backward
    from truegrad.optim import TGAdamW
    from truegrad import testing     # exact oracles for p.sum_grad_squared
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = ("backends", "nn", "optim", "statistic", "testing", "utils")

if TYPE_CHECKING:  # pragma: no cover
    from truegrad import nn, optim, statistic, testing  # noqa: F401

__all__ = [*_SUBMODULES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"truegrad.{name}")
    raise AttributeError(f"module 'truegrad' has no attribute {name!r}")
