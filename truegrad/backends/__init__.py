"""Backends: the ways to make backward write ``p.sum_grad_squared``.

======================  =======================================================
name                    what it does
======================  =======================================================
``"auto"``              the default: every trainable parameter tracked by the engine
                        (exact on every op it knows, absent with a reason elsewhere)
``"nn"``                converts the model's modules to ``truegrad.nn`` in place
``"patch_torch"``       patches torch's classes/functionals, then converts in place
``"patch_model"``       turns parameters into ``TrueGradParameter`` in place
``"backpack"``          BackPack's ``SumGradSquared`` (``backpack-for-pytorch``, installed with ``--no-deps``)
======================  =======================================================
"""

from __future__ import annotations

import importlib
from typing import Literal, get_args

from truegrad.backends.base import Backend, Handle

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "Backend", "BackendName", "Handle", "get_backend"]

BackendName = Literal["auto", "nn", "patch_torch", "patch_model", "backpack"]

#: backend name -> "module:Class" (imported on use, so optional dependencies stay optional)
BACKENDS: dict[str, str] = {
    "auto": "truegrad.backends.patch_model:AutoBackend",
    "nn": "truegrad.backends.nn:NNBackend",
    "patch_torch": "truegrad.backends.patch_torch:PatchTorchBackend",
    "patch_model": "truegrad.backends.patch_model:PatchModelBackend",
    "backpack": "truegrad.backends.backpack:BackPackBackend",
}
assert tuple(BACKENDS) == get_args(BackendName)

#: the backend used when none is named: exact wherever the engine can follow the samples
DEFAULT_BACKEND = "auto"


def get_backend(name: str) -> Backend:
    """Instantiate the backend called ``name``.

    Raises:
        ValueError: for an unknown name, listing the valid choices.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown truegrad backend {name!r}; valid choices: {', '.join(map(repr, BACKENDS))}")
    module_name, _, class_name = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)()
