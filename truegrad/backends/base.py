"""The one interface every backend implements.

A backend makes backward write ``p.sum_grad_squared`` for the parameters it covers.
The Lightning callback, :func:`truegrad.diagnose` and the seed's entry points in
:mod:`truegrad.utils` all talk to backends through this interface, so a new backend
is one new file plus one line in :data:`truegrad.backends.BACKENDS`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["Backend", "Handle", "already_prepared", "check_model", "mark_prepared"]

#: model -> names of the backends whose handles are active on it (one entry per handle)
_PREPARED: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: backends that may be active on one model together (same mechanism: truegrad.nn modules)
_COMPATIBLE = frozenset({"nn", "patch_torch"})


class Handle:
    """Undo information for one ``prepare``; ``undo()`` runs the undo steps once, newest first."""

    def __init__(self, description: str) -> None:
        self.description = description
        self._steps: list[Callable[[], None]] = []
        self.done = False

    def on_undo(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def undo(self) -> None:
        """Restore what ``prepare`` changed. Idempotent."""
        if self.done:
            return
        self.done = True
        while self._steps:
            self._steps.pop()()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *_: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "undone" if self.done else "active"
        return f"<Handle {self.description} ({state})>"


class Backend(abc.ABC):
    """A way to compute the statistic.

    Subclasses set :attr:`name` and implement :meth:`prepare` and :meth:`coverage`.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def prepare(self, model: torch.nn.Module) -> Handle:
        """Make ``model``'s backward write the statistic, in place (no new Parameter
        objects: optimizer and DDP references stay valid). Idempotent: preparing an
        already prepared model changes nothing more. Returns the undo handle."""

    @abc.abstractmethod
    def coverage(self, model: torch.nn.Module) -> dict[str, str | None]:
        """For every trainable parameter (qualified name): ``None`` if this backend
        covers it once prepared, else the reason why not."""

    @contextlib.contextmanager
    def backward_context(self) -> Iterator[None]:
        """Context every backward must run in (most backends need none)."""
        yield


def check_model(model: object, backend: str) -> torch.nn.Module:
    """Validate a model argument: a ``torch.nn.Module`` with trainable parameters, not
    prepared by an incompatible backend. Every ``prepare`` calls it before it changes
    anything, so a bad model raises (``TypeError``/``ValueError``) and is left untouched."""
    if not isinstance(model, torch.nn.Module):
        from truegrad._validate import short_repr

        raise TypeError(
            f"backend {backend!r} needs a torch.nn.Module, got {type(model).__module__}."
            f"{type(model).__qualname__}: model={short_repr(model)}"
        )
    for other in _PREPARED.get(model, ()):
        if other != backend and {other, backend} != _COMPATIBLE:
            raise ValueError(
                f"{type(model).__qualname__} is already prepared by backend {other!r}; call "
                f"undo() on that handle before preparing it with {backend!r} (two backends "
                "would both add to sum_grad_squared)"
            )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"{type(model).__qualname__} has no trainable parameters (none with "
            f"requires_grad=True): backend {backend!r} has nothing to compute"
        )
    return model


def _run_eagerly(model: torch.nn.Module, handle: Handle) -> None:
    from truegrad.engine import forward  # the engine imports truegrad.nn

    handle.on_undo(forward.run_eagerly(model))


def already_prepared(model: torch.nn.Module, backend: str) -> Handle | None:
    """A handle that does nothing, when ``backend`` is already active on ``model`` (preparing
    twice changes nothing; undoing the second handle must not undo the first), else ``None``."""
    if backend in _PREPARED.get(model, ()):
        handle = Handle(f"{backend} on {type(model).__qualname__} (already prepared: nothing to undo)")
        handle.done = True
        return handle
    return None


def mark_prepared(model: torch.nn.Module, backend: str, handle: Handle) -> Handle:
    """Record that ``backend`` is active on ``model`` until ``handle.undo()`` (and make its
    forward run eagerly under ``torch.compile``); returns ``handle``."""
    active = _PREPARED.get(model)
    if active is None:
        active = _PREPARED[model] = []
    active.append(backend)
    from truegrad.engine import forward  # the engine imports truegrad.nn

    handle.on_undo(forward.hook_model(model))
    _run_eagerly(model, handle)

    def unmark() -> None:
        entries = _PREPARED.get(model)
        if entries is not None and backend in entries:
            entries.remove(backend)
            if not entries:
                _PREPARED.pop(model, None)

    handle.on_undo(unmark)
    return handle
