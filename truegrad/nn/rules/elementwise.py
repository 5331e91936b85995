"""Elementwise arithmetic with a parameter, per sample: ``y = x (op) q`` with broadcasting.

Internal to the ``patch_model`` backend (:mod:`truegrad.parameter`): it is not part of
:mod:`truegrad.nn.functional`. The op itself runs as torch runs it, so the output and
every gradient are torch's; this module only says how to form the per-sample gradient
of the parameter operand ``q`` from the output gradient ``dy``.

Shapes: ``y`` is ``broadcast(x, q)``; the samples are where the model's samples are in ``y``
(a :class:`~truegrad.engine.samples.Layout`: a dim, possibly a flattened one), and ``q``
must not span that dim (its broadcast shape has size 1 there). With ``f = dy/dq``
elementwise (``1`` or ``alpha`` for add/sub, the other operand for mul, ``1/x`` or
``-x/q**2`` for div) sample n contributes

    g_n(q) = sum over the positions of sample n and the dims q is broadcast over of dy * f

reshaped to ``q.shape``. Torch's own backward forms the same ``dy * f`` and reduces it
over all broadcast dims including the samples', so ``sum_n g_n == q.grad``.

:data:`ELEMENTWISE_OPS` lists the functions (``torch.mul``, ``Tensor.__rmul__``,
``Tensor.add_`` ...) with their normal form; :func:`operands` turns a call into
``(a, b, alpha)`` with ``y = a (op) alpha * b``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from truegrad.engine.samples import Layout

__all__ = ["ELEMENTWISE_OPS", "ElementwiseOp", "Plan", "operands", "plan_elementwise"]

@dataclasses.dataclass(frozen=True)
class Plan:
    """How to form one operand's per-sample gradients from the output gradient.

    Attributes:
        n_samples: N, the size of the sample dimension.
        per_sample: ``per_sample(dy, start, stop) -> (stop - start, *q.shape)`` in the
            statistic's dtype.
        squared: optional exact shortcut ``squared(dy) -> sum_n g_n**2`` (shape of ``q``).
        sample_numel: number of elements of one sample's gradient of ``q``.
    """

    n_samples: int
    per_sample: Callable[[torch.Tensor, int, int], torch.Tensor]
    squared: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: elements of one sample's gradient of the operand (to bound the memory of a chunk)
    sample_numel: int = 0


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


def _samples_view(t: torch.Tensor, layout: Layout, start: int, stop: int) -> torch.Tensor:
    """Samples ``start:stop`` of ``t`` with its samples' dim split into ``(outer, n, inner)``
    (so ``t.dim() + 2`` dims; the samples on dim ``layout.dim + 1``)."""
    return t.unflatten(layout.dim, (layout.outer, layout.n, layout.inner)).narrow(
        layout.dim + 1, start, stop - start
    )


def plan_elementwise(
    out_shape: torch.Size,
    q_shape: torch.Size,
    out_layout: Layout,
    dtype: torch.dtype,
    *,
    op: str = "add",
    q_first: bool = True,
    other: torch.Tensor | None = None,
    other_layout: Layout | None = None,
    alpha: float = 1.0,
    q_value: torch.Tensor | None = None,
) -> Plan | str:
    """The per-sample plan of ``q`` in ``y = a (op) b`` with output ``out_shape``, or the
    reason why there is none (``q`` spans the samples' dim).

    Args:
        out_layout: where the samples are in ``y`` (and in ``dy``).
        op: ``add``/``sub``/``mul``/``div``; ``q_first``: ``q`` is ``a`` (else ``b``).
        other: the operand that carries the samples (needed for ``mul``/``div``), with
            ``other_layout`` its own layout.
        alpha: ``y = a + alpha * b`` (``add``/``sub``).
        q_value: the value of ``q`` (needed for ``x / q``).
    """
    ndim = len(out_shape)
    if ndim == 0:
        return "the result is 0-d: it has no sample dimension"
    if len(q_shape) > ndim:
        return "the parameter has more dimensions than the result"
    d = out_layout.dim
    aligned = (1,) * (ndim - len(q_shape)) + tuple(q_shape)
    layout_sizes = (out_layout.outer, out_layout.n, out_layout.inner)
    spans = aligned[d] != 1 and out_layout.size != 1
    if spans and aligned[d] != out_layout.size:
        return f"the parameter (broadcast to {tuple(aligned)}) only partly covers the samples' dim {d}"
    split = aligned[:d] + (layout_sizes if spans else (1, 1, 1)) + aligned[d + 1:]
    grown = tuple(out_shape[:d]) + layout_sizes + tuple(out_shape[d + 1:])
    summed = tuple(i for i in range(ndim + 2) if i != d + 1 and split[i] == 1 and grown[i] != 1)
    if op in ("add", "sub"):
        constant = (1 if q_first else alpha) * (1 if op == "add" or q_first else -1)
    elif op in ("mul", "div"):
        if other is None or other_layout is None:
            return "the other operand carries no samples"
        constant = None
    else:
        raise ValueError(f"unknown elementwise op {op!r}")
    q_split = None
    if op == "div" and not q_first:
        assert q_value is not None
        q_split = q_value.detach().to(dtype).square().reshape(split)

    def per_sample(dy: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        g = _samples_view(dy, out_layout, start, stop).to(dtype)
        if constant is not None:
            if constant != 1:
                g = g * constant
        else:
            x = _samples_view(other.detach(), other_layout, start, stop).to(dtype)
            if op == "mul":
                g = g * x
            elif q_first:  # y = q / x
                g = g / x
            else:  # y = x / q: dy/dq = -x / q**2
                g = g * (-x / q_split)
        if summed:
            g = g.sum(summed, keepdim=True)
        if spans:  # q has one slice per sample: sample j's gradient lives in slice start + j
            return _on_diagonal(g, d + 1, start, stop, split).reshape(stop - start, *q_shape)
        return g.movedim(d + 1, 0).reshape(stop - start, *q_shape)

    return Plan(out_layout.n, per_sample, sample_numel=math.prod(q_shape))


def _on_diagonal(g: torch.Tensor, axis: int, start: int, stop: int, shape: Sequence[int]) -> torch.Tensor:
    """Per-sample gradients of an operand that spans the samples: ``g`` holds the gradient
    of samples ``start:stop`` along ``axis`` (each only in its own slice); returns
    ``(stop - start, *shape)`` zeros except sample j's slice ``start + j`` of ``axis``."""
    count = stop - start
    out = g.new_zeros((count, *shape))
    diagonal = torch.diagonal(out.narrow(axis + 1, start, count), dim1=0, dim2=axis + 1)
    diagonal.copy_(g.movedim(axis, -1))
    return out
