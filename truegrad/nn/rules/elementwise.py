"""Elementwise arithmetic with a parameter, per sample: ``y = x (op) q`` with broadcasting.

Internal to the ``patch_model`` backend (:mod:`truegrad.parameter`): it is not part of
:mod:`truegrad.nn.functional`. The op itself runs as torch runs it, so the output and
every gradient are torch's; this module only says how to form the per-sample gradient
of the parameter operand ``q`` from the output gradient ``dy``.

Shapes: ``y (N, *)`` is ``broadcast(x, q)``; dim 0 of ``y`` indexes samples, and ``q``
must not span it (its broadcast shape has size 1 there). With ``f = dy/dq`` elementwise
(``1`` or ``alpha`` for add/sub, the other operand for mul, ``1/x`` or ``-x/q**2`` for
div) sample n contributes

    g_n(q) = sum over the dims that q is broadcast over (except dim 0) of (dy * f)[n]

reshaped to ``q.shape``. Torch's own backward forms the same ``dy * f`` and reduces it
over all broadcast dims including dim 0, so ``sum_n g_n == q.grad``.

:data:`ELEMENTWISE_OPS` lists the functions (``torch.mul``, ``Tensor.__rmul__``,
``Tensor.add_`` ...) with their normal form; :func:`operands` turns a call into
``(a, b, alpha)`` with ``y = a (op) alpha * b``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ELEMENTWISE_OPS", "ElementwiseOp", "Plan", "factor", "operands", "plan_elementwise"]

Factor = Callable[[int, int], "torch.Tensor | float"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to form one operand's per-sample gradients from the output gradient.

    Attributes:
        n_samples: N, the size of the sample dimension.
        per_sample: ``per_sample(dy, start, stop) -> (stop - start, *q.shape)`` in the
            statistic's dtype.
        squared: optional exact shortcut ``squared(dy) -> sum_n g_n**2`` (shape of ``q``).
    """

    n_samples: int
    per_sample: Callable[[torch.Tensor, int, int], torch.Tensor]
    squared: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclasses.dataclass(frozen=True)
class ElementwiseOp:
    """Normal form of one torch function: ``op`` in ``add/sub/mul/div``; ``reflected``:
    the call's first argument is the right operand (``Tensor.__rsub__(self, other)`` is
    ``other - self``); ``inplace``: the first argument is overwritten with the result."""

    op: str
    reflected: bool = False
    inplace: bool = False


def _table() -> dict[Callable[..., Any], ElementwiseOp]:
    T = torch.Tensor
    table: dict[Callable[..., Any], ElementwiseOp] = {}
    for op, functions, reflected, inplace in [
        ("add", [torch.add, T.add, T.__add__, T.__radd__], False, False),
        ("add", [T.add_, T.__iadd__], False, True),
        ("sub", [torch.sub, torch.subtract, T.sub, T.subtract, T.__sub__], False, False),
        ("sub", [T.sub_, T.subtract_, T.__isub__], False, True),
        ("sub", [T.__rsub__], True, False),
        ("rsub", [torch.rsub], False, False),
        ("mul", [torch.mul, torch.multiply, T.mul, T.multiply, T.__mul__, T.__rmul__], False,
         False),
        ("mul", [T.mul_, T.multiply_, T.__imul__], False, True),
        ("div", [torch.div, torch.divide, torch.true_divide, T.div, T.divide, T.true_divide,
                 T.__truediv__], False, False),
        ("div", [T.div_, T.divide_, T.true_divide_, T.__itruediv__], False, True),
        ("div", [T.__rtruediv__], True, False),
    ]:
        for function in functions:
            table[function] = ElementwiseOp(op, reflected, inplace)
    return table


#: torch function -> its normal form.
ELEMENTWISE_OPS: dict[Callable[..., Any], ElementwiseOp] = _table()


def operands(spec: ElementwiseOp, args: tuple, kwargs: dict) -> tuple[Any, Any, Any, str] | None:
    """``(a, b, alpha, op)`` with ``y = a + alpha*b``, ``a - alpha*b``, ``a * b`` or
    ``a / b``; ``None`` for a call this module does not handle (``out=``,
    ``rounding_mode``, unexpected arguments)."""
    if "out" in kwargs or kwargs.get("rounding_mode") is not None:
        return None
    if set(kwargs) - {"input", "other", "alpha", "rounding_mode"} or len(args) > 2:
        return None
    values = list(args)
    if not values and "input" in kwargs:
        values.append(kwargs["input"])
    if len(values) == 1 and "other" in kwargs:
        values.append(kwargs["other"])
    if len(values) != 2:
        return None
    a, b = values
    alpha = kwargs.get("alpha", 1)
    if alpha is not None and not isinstance(alpha, (int, float)):
        return None
    if spec.op == "rsub":  # torch.rsub(a, b, alpha) = b - alpha * a
        return b, a, alpha, "sub"
    if spec.reflected:
        a, b = b, a
    return a, b, alpha, spec.op


def _rows(t: torch.Tensor | float, ndim: int, start: int, stop: int) -> torch.Tensor | float:
    """Rows ``start:stop`` of ``t`` broadcast against an output of ``ndim`` dims."""
    if not isinstance(t, torch.Tensor) or t.dim() < ndim or t.shape[0] == 1:
        return t
    return t[start:stop]


def factor(
    op: str, q_first: bool, a: Any, b: Any, alpha: float, q_value: torch.Tensor, ndim: int,
    dtype: torch.dtype,
) -> Factor:
    """``dy/dq`` of ``y = a (op) b`` as a function of the sample range (rows of the
    other operand), where ``q`` is ``a`` (``q_first``) or ``b``."""
    other = b if q_first else a

    def cast(t: Any) -> Any:
        return t.detach().to(dtype) if isinstance(t, torch.Tensor) else t

    if op == "add":
        value = 1 if q_first else alpha
        return lambda s, e: value
    if op == "sub":
        value = 1 if q_first else -alpha
        return lambda s, e: value
    if op == "mul":
        return lambda s, e: cast(_rows(other, ndim, s, e))
    if op == "div" and q_first:  # y = q / x
        return lambda s, e: cast(_rows(other, ndim, s, e)).reciprocal()
    if op == "div":  # y = x / q: dy/dq = -x / q**2
        q2 = cast(q_value).square()
        return lambda s, e: -cast(_rows(other, ndim, s, e)) / q2
    raise ValueError(f"unknown elementwise op {op!r}")


def plan_elementwise(
    out_shape: torch.Size, q_shape: torch.Size, dydq: Factor, dtype: torch.dtype
) -> Plan | str:
    """The per-sample plan of ``q`` in an elementwise op with output ``out_shape``, or the
    reason why there is none (``q`` spans the sample dimension, 0-d output)."""
    ndim = len(out_shape)
    if ndim == 0:
        return "the result is 0-d: it has no sample dimension"
    if len(q_shape) > ndim:
        return "the parameter has more dimensions than the result"
    aligned = (1,) * (ndim - len(q_shape)) + tuple(q_shape)
    if aligned[0] != 1 and out_shape[0] != 1:
        return (
            f"the parameter (broadcast to {tuple(aligned)}) spans dim 0 of the result "
            f"{tuple(out_shape)}, the sample dimension"
        )
    summed = tuple(d for d in range(1, ndim) if aligned[d] == 1 and out_shape[d] != 1)
    n = out_shape[0]

    def per_sample(dy: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        g = dy[start:stop].to(dtype)
        f = dydq(start, stop)
        if not (isinstance(f, (int, float)) and f == 1):
            g = g * f
        if summed:
            g = g.sum(summed, keepdim=True)
        return g.reshape(stop - start, *q_shape)

    return Plan(n, per_sample)
