"""The one writer of ``p.sum_grad_squared``.

Every backend adds per-backward contributions through :func:`add` (or
:func:`add_sum_of_squares`), the Lightning callback rescales through
:func:`scale_`, and the optimizer reads through :func:`get` and clears through
:func:`clear`. Nothing else touches the attribute, so its invariants
(docs/statistic.md section 2) hold in one place:

* the statistic has the parameter's shape and lives on the gradient's device;
* it is kept in float32 (float64 for a float64 parameter), never half precision,
  so squares of fp16/bf16 gradients neither overflow nor underflow;
* it accumulates across backward passes exactly as ``p.grad`` does;
* it lives and dies with ``p.grad``: once the gradient is cleared (``zero_grad()`` of any
  optimizer or module, ``p.grad = None``, ``set_to_none=False``) or replaced, the statistic
  is no longer read (:func:`get` returns ``None``) and the next backward starts a new one;
* frozen parameters never get it.

How it knows, without a host sync: a post-accumulate-grad hook (registered on a parameter's
first statistic) notes which tensor ``p.grad`` is after each backward and its version
counter. The first write of a later backward starts over when ``p.grad`` is gone, another
tensor, or was modified in place since (zeroed; not checked for a gradient that is a view,
such as a DDP bucket view, whose counter other parameters share); a read returns ``None``
when ``p.grad`` is not the tensor the statistic was accumulated with.
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from truegrad import _compat
from truegrad._weakid import WeakIdMap

__all__ = [
    "ATTRIBUTE",
    "add",
    "add_sum_of_squares",
    "clear",
    "forget",
    "get",
    "has",
    "reusable_buffer",
    "scale_",
    "statistic_dtype",
]

#: Name of the attribute that holds the statistic on each parameter.
ATTRIBUTE = "sum_grad_squared"


def statistic_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype the statistic of a parameter of ``dtype`` is kept in.

    float64 parameters keep a float64 statistic; every other floating dtype
    (float32, bfloat16, float16) keeps float32.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass
class _Stamp:
    """What the statistic of one parameter was accumulated with."""

    grad: weakref.ref | None = None  # p.grad as the last backward (or flush) left it
    version: int = -1  # its version counter then
    written: int = -2  # the backward pass of the last write (-1: outside any, a flush)
    stale: bool = False  # the accumulation hook saw p.grad replaced before this backward
    hook: Any = None


_STAMPS: WeakIdMap[_Stamp] = WeakIdMap()


def _stamp(param: torch.Tensor) -> _Stamp:
    stamp = _STAMPS.get(param)
    if stamp is None:
        stamp = _STAMPS[param] = _Stamp()
        if param.is_leaf:
            stamp.hook = param.register_post_accumulate_grad_hook(_accumulated)
    return stamp


def _note(stamp: _Stamp, grad: torch.Tensor | None) -> None:
    stamp.grad = None if grad is None else weakref.ref(grad)
    stamp.version = -1 if grad is None else grad._version


def _accumulated(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: note the gradient the statistic now goes with. A statistic
    nothing has written to in this backward (BackPack adds its share after the backward) is
    stale when ``p.grad`` is another tensor than after the last backward (it was cleared)."""
    stamp = _STAMPS.get(param)
    if stamp is None:
        return
    grad = param.grad
    if stamp.written != _compat.current_backward_id() and getattr(param, ATTRIBUTE, None) is not None:
        noted = None if stamp.grad is None else stamp.grad()
        if noted is None or noted is not grad:
            stamp.stale = True  # p.grad was cleared (or replaced) before this backward
        elif grad._base is None and grad._version > stamp.version + 1:
            stamp.stale = True  # modified in place before this backward's accumulation (zeroed)
    _note(stamp, grad)


def _outdated(param: torch.Tensor, stamp: _Stamp, backward: int) -> bool:
    """Whether the statistic present describes a gradient ``p.grad`` no longer holds, judged at
    a write of backward pass ``backward`` (``-1``: after the backward, as BackPack writes)."""
    if stamp.stale:
        return True
    if backward == -1 or stamp.written == backward:
        return False  # judged by the hook, or by this backward's first write
    grad = param.grad
    if grad is None:
        return True  # cleared since the backward that wrote it (which left a gradient)
    if stamp.grad is None:
        return False  # never noted (its first write came after its accumulation): no evidence
    if stamp.grad() is not grad:
        return True
    return grad._base is None and grad._version != stamp.version


def forget(params: Iterable[torch.Tensor]) -> None:
    """Remove the accumulation hooks and notes of ``params`` (a backend's ``undo``); a
    statistic they carry stays, and is judged afresh if written again."""
    for param in params:
        stamp = _STAMPS.pop(param)
        if stamp is not None and stamp.hook is not None:
            stamp.hook.remove()


def get(param: torch.Tensor) -> torch.Tensor | None:
    """Return ``param.sum_grad_squared``, or ``None`` when the parameter has none or it
    belongs to a gradient ``p.grad`` no longer holds (cleared or replaced since)."""
    current = getattr(param, ATTRIBUTE, None)
    if current is None:
        return None
    if param.grad is None and _compat.current_backward_id() == -1:
        return None  # no gradient, so nothing it could describe (a loaded model's, a cleared one)
    stamp = _STAMPS.get(param)
    if stamp is not None and stamp.grad is not None:
        noted = stamp.grad()  # None once that gradient was freed
        if stamp.stale or noted is None or noted is not param.grad:
            if _compat.current_backward_id() == -1:  # (during a backward p.grad is in flux)
                return None
    return current


def has(param: torch.Tensor) -> bool:
    """Whether ``param`` currently carries a statistic (a Python check, no host sync)."""
    return get(param) is not None


def add(param: torch.Tensor, contribution: torch.Tensor, *, owned: bool = False) -> None:
    """Add ``contribution`` (already ``sum_n g_n**2``, shape of ``param``) to the statistic.

    The statistic is created lazily on ``contribution``'s device in
    :func:`statistic_dtype` of the parameter; later contributions are cast and
    added in place. ``contribution`` is never aliased: the first call copies it.

    Args:
        param: the parameter (a leaf tensor with ``requires_grad=True``).
        contribution: tensor of ``param.shape``, the sum over the samples of one
            backward pass of the squared per-sample gradients.
        owned: the caller hands ``contribution`` over (a fresh temporary nobody else
            references); if its dtype is already right it is stored without a copy.

    Raises:
        ValueError: if the shape of ``contribution`` differs from ``param``'s.
    """
    if contribution.shape != param.shape:
        raise ValueError(
            f"sum_grad_squared contribution of shape {tuple(contribution.shape)} does not match "
            f"the parameter's shape {tuple(param.shape)}"
        )
    if not param.requires_grad:
        return
    dtype = statistic_dtype(param.dtype)
    current = _current(param)
    if current is None:
        # A fresh tensor unless the caller owns ``contribution`` (then no copy is needed).
        copy = not (owned and contribution.dtype == dtype)
        setattr(param, ATTRIBUTE, contribution.detach().to(dtype=dtype, copy=copy))
    else:
        current.add_(contribution.detach().to(device=current.device, dtype=dtype))


def _current(param: torch.Tensor) -> torch.Tensor | None:
    """The statistic a write adds to: ``None`` (a new one) when the one present is outdated;
    records the write (see :class:`_Stamp`)."""
    known = _STAMPS.get(param) is not None
    stamp = _stamp(param)
    backward = _compat.current_backward_id()
    current = getattr(param, ATTRIBUTE, None)
    if current is not None and (not known or _outdated(param, stamp, backward)):
        # (one this module never wrote: loaded with a pickled model, whose gradient is not)
        clear([param])
        current = None
    stamp.stale = False
    stamp.written = backward
    if backward == -1:  # a write after the backward: it goes with the gradient as it is
        _note(stamp, param.grad)
    return current


def add_sum_of_squares(param: torch.Tensor, per_sample: torch.Tensor, *, owned: bool = False) -> None:
    """Add ``sum_n per_sample[n] ** 2`` (computed in float32 or better) to the statistic.

    Args:
        param: the parameter.
        per_sample: per-sample gradients of shape ``(N, *param.shape)``.
        owned: nobody else reads ``per_sample``: it is squared in place.
    """
    dtype = statistic_dtype(param.dtype)
    values = per_sample.detach()
    if owned and values.dtype == dtype:
        squares = values.square_()
    else:
        squares = values.to(dtype).square()
    add(param, squares.sum(0), owned=True)


def scale_(params: Iterable[torch.Tensor], factor: float | torch.Tensor) -> None:
    """Multiply every present statistic of ``params`` by ``factor`` in place.

    ``factor`` may be a 0-d tensor (e.g. ``1 / S**2`` of a GradScaler) so that no
    host synchronisation is needed.
    """
    for param in params:
        current = get(param)
        if current is not None:
            current.mul_(factor)


#: CPU statistics dropped by :func:`clear` that nothing else referenced, kept per
#: parameter so the next backward writes into them (see :func:`reusable_buffer`).
_SPARE: WeakIdMap[torch.Tensor] = WeakIdMap()


def _only_referenced_here(tensor: torch.Tensor) -> bool:
    """Whether the caller's local variable is the only reference to ``tensor`` and to its
    memory: no other Python reference (``getrefcount`` sees the caller's variable, this
    function's parameter and its own argument), no C++ reference, and no view sharing
    the storage (its use count is the tensor plus the temporary storage object)."""
    return (
        sys.getrefcount(tensor) <= 3
        and tensor._base is None
        and tensor._use_count() == 1  # no C++ reference to the same tensor either
        and torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) <= 2
    )


def clear(params: Iterable[torch.Tensor]) -> None:
    """Set the statistic of every parameter in ``params`` to ``None``.

    A CPU statistic that nothing else references (no variable, no view) is kept aside
    and reused as the storage of the parameter's next statistic: a fresh parameter-sized
    CPU tensor per step is page-faulted in by the kernel every time glibc has handed
    freed memory back, which costs as much as computing it. A statistic somebody still
    holds is simply dropped, never overwritten.
    """
    for param in params:
        current = getattr(param, ATTRIBUTE, None)
        if current is None:
            continue
        setattr(param, ATTRIBUTE, None)
        if current.device.type == "cpu" and _only_referenced_here(current):
            _SPARE[param] = current


def reusable_buffer(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Storage for the parameter's next statistic, if :func:`clear` kept one.

    Returns an uninitialised-content tensor of ``param.shape`` in ``dtype`` on
    ``param``'s device, to be filled completely (``out=``) and handed to :func:`add`
    with ``owned=True``; ``None`` when the parameter has a statistic already or no
    matching buffer was kept. Each buffer is returned once.
    """
    current = getattr(param, ATTRIBUTE, None)
    if current is not None:
        stamp = _STAMPS.get(param)
        if stamp is None or not _outdated(param, stamp, _compat.current_backward_id()):
            return None
        clear([param])  # outdated: its storage is the next statistic's
    spare = _SPARE.pop(param)
    if spare is None or spare.shape != param.shape or spare.dtype != dtype or spare.device != param.device:
        return None
    return spare
