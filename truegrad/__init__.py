"""TrueGrad: exact sums of squared per-sample gradients and the TrueGrad-AdamW optimizer.

The core package imports only ``torch``. Submodules are loaded on first use::

    from truegrad import nn          # drop-in modules with hand-written backward
    from truegrad.optim import TGAdamW
    from truegrad import testing     # exact oracles for p.sum_grad_squared
    truegrad.diagnose(model, inputs, loss_fn, targets)  # coverage, exactness, cost
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "6.0.0"

_SUBMODULES = ("backends", "diagnosis", "nn", "optim", "statistic", "testing", "utils")

if TYPE_CHECKING:  # pragma: no cover
    from truegrad import backends, diagnosis, nn, optim, statistic, testing, utils  # noqa: F401
    from truegrad.diagnosis import diagnose  # noqa: F401

__all__ = [*_SUBMODULES, "__version__", "diagnose"]


def __getattr__(name: str) -> Any:
    if name == "diagnose":  # truegrad.diagnose(model, inputs, loss_fn, ...): the report
        return importlib.import_module("truegrad.diagnosis").diagnose
    if name in _SUBMODULES:
        return importlib.import_module(f"truegrad.{name}")
    raise AttributeError(f"module 'truegrad' has no attribute {name!r}")
