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
* it is ``None`` (absent) after the optimizer clears gradients, and frozen
  parameters never get it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

from truegrad._weakid import WeakIdMap

__all__ = [
    "ATTRIBUTE",
    "add",
    "add_sum_of_squares",
    "clear",
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


def get(param: torch.Tensor) -> torch.Tensor | None:
    """Return ``param.sum_grad_squared`` or ``None`` when the parameter has none."""
    return getattr(param, ATTRIBUTE, None)


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
    current = get(param)
    if current is None:
        # A fresh tensor unless the caller owns ``contribution`` (then no copy is needed).
        copy = not (owned and contribution.dtype == dtype)
        setattr(param, ATTRIBUTE, contribution.detach().to(dtype=dtype, copy=copy))
    else:
        current.add_(contribution.detach().to(device=current.device, dtype=dtype))


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
        current = get(param)
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
    if get(param) is not None:
        return None
    spare = _SPARE.pop(param)
    if spare is None or spare.shape != param.shape or spare.dtype != dtype or spare.device != param.device:
        return None
    return spare
