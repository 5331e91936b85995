"""Products with a parameter, per sample: matmul, mm, bmm, mv, addmm, einsum, linear.

Internal to the ``patch_model`` backend (:mod:`truegrad.parameter`): it is not part of
:mod:`truegrad.nn.functional`. The op itself runs as torch runs it, so the output and
every gradient are torch's; this module only says how to form the per-sample gradient
of the parameter operand ``q`` from the output gradient ``dy``.

Every supported call is written as one two-operand contraction (:class:`Contraction`)

    y = beta * bias + alpha * einsum("A,B->Y", a, b)

(``x @ W`` is ``"...ik,kj->...ij"``, ``F.linear`` is ``"...k,jk->...j"`` plus ``bias``,
``torch.addmm`` is ``"ik,kj->ij"`` plus ``bias`` ...). The sample index ``n`` is the index
of the other operand ``x`` along which the model's samples lie (its
:class:`~truegrad.engine.samples.Layout`); it must reach the output and not come from
``q``. Sample n contributes

    g_n(q) = alpha * einsum("Y,X->nQ", dy, x)[n]

(every index of ``dy`` and ``x`` that is not ``n`` or one of ``q``'s is summed inside the
sample, e.g. the positions ``t`` of ``x (N, T, K) @ W``), reduced over indices along
which ``q`` is broadcast. When no index is summed inside a sample (``x (N, K) @ W``)
``sum_n g_n**2 = alpha**2 einsum("Y,X->Q", dy**2, x**2)`` exactly, one contraction.

Flattened samples. Code such as Hugging Face's GPT-2 ``Conv1D`` does
``torch.addmm(b, x.view(-1, nx), W)`` on ``x (B, T, nx)``: the rows of the 2-D operand
are ``B * T`` positions. Its layout says so (``(outer, n, inner)`` along the rows), and
the sample index is split into three, the outer and inner parts summed inside the sample.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from truegrad._originals import F
from truegrad.engine.samples import Layout
from truegrad.nn.rules.elementwise import Plan, _on_diagonal, plan_elementwise

__all__ = [
    "Contraction",
    "MATMUL_OPS",
    "contraction",
    "matmul_equation",
    "parse_equation",
    "plan_bias",
    "plan_contraction",
]

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _table() -> dict[Callable[..., Any], str]:
    T = torch.Tensor
    table: dict[Callable[..., Any], str] = {}
    for kind, functions in [
        ("matmul", [torch.matmul, T.matmul, T.__matmul__]),
        ("rmatmul", [T.__rmatmul__]),
        ("mm", [torch.mm, T.mm]),
        ("bmm", [torch.bmm, T.bmm]),
        ("mv", [torch.mv, T.mv]),
        ("addmm", [torch.addmm, T.addmm]),
        ("einsum", [torch.einsum]),
        ("linear", [F.linear]),
    ]:
        for function in functions:
            table[function] = kind
    return table


#: torch function -> kind of contraction (see :func:`contraction`).
MATMUL_OPS: dict[Callable[..., Any], str] = _table()


@dataclasses.dataclass(frozen=True)
class Contraction:
    """``y = beta * bias + alpha * einsum(f"{terms[0]},{terms[1]}->{output}", a, b)``,
    with every ellipsis expanded to letters."""

    terms: tuple[str, str]
    output: str
    a: Any
    b: Any
    alpha: float = 1.0
    bias: Any = None
    beta: float = 1.0

    @property
    def operands(self) -> tuple[Any, Any]:
        return self.a, self.b


def parse_equation(equation: str, ndims: Sequence[int]) -> tuple[list[str], str]:
    """Expand an einsum equation for operands of ``ndims`` dims: ``"...ik,kj"`` ->
    ``(["aik", "kj"], "aij")``, ellipses right-aligned, implicit output as torch forms it.

    Raises:
        ValueError: a malformed equation or a dimension count that does not fit.
    """
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        raise ValueError(
            f"einsum equation {equation!r} has {len(terms)} operands, got {len(ndims)}"
        )
    used = {c for c in eq if c.isalpha()}
    free = [c for c in _LETTERS if c not in used]
    widths = [nd - (len(t) - 3) if "..." in t else 0 for t, nd in zip(terms, ndims)]
    width = max(widths, default=0)
    if width < 0 or width > len(free):
        raise ValueError(f"einsum equation {equation!r} does not fit the operands")
    ellipsis = "".join(free[:width])
    expanded = []
    for term, nd, w in zip(terms, ndims, widths):
        if "..." in term:
            term = term.replace("...", ellipsis[width - w:])
        if len(term) != nd or not all(c.isalpha() for c in term):
            raise ValueError(
                f"einsum equation {equation!r} does not fit operands of {list(ndims)} dims"
            )
        expanded.append(term)
    if arrow:
        output = rhs.replace("...", ellipsis)
    else:
        counts = Counter(c for term in terms for c in term.replace("...", ""))
        output = ellipsis + "".join(sorted(c for c, k in counts.items() if k == 1))
    if not all(c.isalpha() for c in output):
        raise ValueError(f"einsum equation {equation!r} has an invalid output")
    return expanded, output


def matmul_equation(a_ndim: int, b_ndim: int) -> str:
    """The einsum equation of ``torch.matmul`` for operands of these dims (1-D operands
    are vectors, more than 2 dims broadcast as batch dims)."""
    if a_ndim < 1 or b_ndim < 1:
        raise ValueError("matmul needs operands of at least 1 dim")
    a = "k" if a_ndim == 1 else "...ik"
    b = "k" if b_ndim == 1 else "...kj"
    return f"{a},{b}->..." + ("i" if a_ndim > 1 else "") + ("j" if b_ndim > 1 else "")


def _ndim(t: Any) -> int:
    return t.dim() if isinstance(t, torch.Tensor) else -1


def contraction(kind: str, args: tuple, kwargs: dict) -> Contraction | None:
    """The :class:`Contraction` of one call of a :data:`MATMUL_OPS` function, or ``None``
    for a call this module does not handle (``out=``, more operands, odd shapes)."""
    if "out" in kwargs:
        return None
    try:
        if kind == "einsum":
            equation, *ops = args
            if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
                ops = list(ops[0])
            if kwargs or not isinstance(equation, str) or len(ops) != 2:
                return None
            terms, output = parse_equation(equation, [_ndim(o) for o in ops])
            return Contraction((terms[0], terms[1]), output, ops[0], ops[1])
        if kind == "linear":
            names = ("input", "weight", "bias")
            values = dict(zip(names, args))
            values.update(kwargs)
            if set(values) - set(names) or len(args) > 3:
                return None
            x, w, bias = values["input"], values["weight"], values.get("bias")
            if _ndim(w) != 2 or _ndim(x) < 1:
                return None
            terms, output = parse_equation("...k,jk->...j", [_ndim(x), 2])
            return Contraction((terms[0], terms[1]), output, x, w, bias=bias)
        if kind == "addmm":
            names = ("input", "mat1", "mat2")
            values = dict(zip(names, args))
            values.update({k: v for k, v in kwargs.items() if k in names})
            rest = set(kwargs) - set(names) - {"beta", "alpha"}
            matrices = _ndim(values.get("mat1")) == 2 and _ndim(values.get("mat2")) == 2
            if rest or len(args) > 3 or not matrices:
                return None
            alpha, beta = kwargs.get("alpha", 1), kwargs.get("beta", 1)
            if not isinstance(alpha, (int, float)) or not isinstance(beta, (int, float)):
                return None
            return Contraction(("ik", "kj"), "ij", values["mat1"], values["mat2"], float(alpha),
                               values["input"], float(beta))
        if kwargs and set(kwargs) - {"input", "other", "mat2", "vec"}:
            return None
        values = list(args) + list(kwargs.values())
        if len(values) != 2:
            return None
        a, b = values
        if kind == "rmatmul":
            a, b = b, a
        if kind in ("matmul", "rmatmul"):
            if _ndim(a) < 1 or _ndim(b) < 1:
                return None
            terms, output = parse_equation(matmul_equation(a.dim(), b.dim()), [a.dim(), b.dim()])
            return Contraction((terms[0], terms[1]), output, a, b)
        if kind == "mm" and _ndim(a) == 2 and _ndim(b) == 2:
            return Contraction(("ik", "kj"), "ij", a, b)
        if kind == "bmm" and _ndim(a) == 3 and _ndim(b) == 3:
            return Contraction(("bik", "bkj"), "bij", a, b)
        if kind == "mv" and _ndim(a) == 2 and _ndim(b) == 1:
            return Contraction(("ik", "k"), "i", a, b)
    except ValueError:
        return None
    return None


def _split_letter(term: str, letter: str, outer: str, inner: str) -> str:
    return term.replace(letter, outer + letter + inner)


def _fit(g: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Sum ``g`` over dims where ``shape`` has size 1 and ``g`` does not (broadcast)."""
    if tuple(g.shape) == shape:
        return g
    dims = tuple(d for d, (have, want) in enumerate(zip(g.shape, shape)) if want == 1 and have != 1)
    if dims:
        g = g.sum(dims, keepdim=True)
    return g.expand(shape) if tuple(g.shape) != shape else g


def plan_contraction(
    c: Contraction,
    q_index: int,
    out_shape: torch.Size,
    dtype: torch.dtype,
    x_layout: Layout,
) -> Plan | str:
    """The per-sample plan of operand ``q_index`` (0: ``a``, 1: ``b``) of ``c``, or the reason
    why there is none.

    Args:
        out_shape: shape of ``einsum(...)`` (and of ``dy``).
        dtype: dtype of the statistic.
        x_layout: where the samples are in the other operand ``x`` (which carries them).
    """
    q_term, x_term = c.terms[q_index], c.terms[1 - q_index]
    q, x = c.operands[q_index], c.operands[1 - q_index]
    out = c.output
    n = x_term[x_layout.dim]
    if n not in out:
        return "the product sums over the samples (their index is contracted)"
    q_shape = tuple(q.shape)
    full_q_shape = q_shape
    unsqueeze = None  # q has size 1 along the sample index (broadcast): a (1, ...) operand
    spans = False  # q has one slice per sample along the sample index
    if n in q_term:
        at = q_term.index(n)
        if q_shape[at] == 1 and x_layout.size != 1:
            unsqueeze = at
            q_term = q_term.replace(n, "")
            q_shape = q_shape[:at] + q_shape[at + 1:]
        elif q_shape[at] == x_layout.size:
            spans = True
        else:
            return f"the parameter only partly covers the samples' index {n!r} of the product"
    if len(set(q_term)) != len(q_term):
        return "the parameter has a repeated index (a diagonal)"
    q_split = list(q_shape)
    if any(ch not in out and ch not in x_term for ch in q_term):
        return "an index of the parameter appears in no other operand"
    x_shape = list(x.shape)
    dy_shape = list(out_shape)
    out_axis = out.index(n)
    if dy_shape[out_axis] != x_layout.size:
        return "the samples' index of the product does not match the operand carrying them"
    if not x_layout.plain:  # the samples' index is (outer, n, inner): split it into three
        free = [ch for ch in _LETTERS if ch not in out + x_term + q_term]
        o_letter, i_letter = free[0], free[1]
        axis = x_layout.dim
        sizes = [x_layout.outer, x_layout.n, x_layout.inner]
        x_shape[axis:axis + 1] = sizes
        dy_shape[out_axis:out_axis + 1] = sizes
        x_term = _split_letter(x_term, n, o_letter, i_letter)
        out = _split_letter(out, n, o_letter, i_letter)
        if spans:
            at = q_term.index(n)
            q_split[at:at + 1] = sizes
            q_term = _split_letter(q_term, n, o_letter, i_letter)
    axis = x_term.index(n)
    d_axis = out.index(n)
    equation = f"{out},{x_term}->{q_term}" if spans else f"{out},{x_term}->{n}{q_term}"
    alpha = c.alpha
    x_value = x.detach()

    def per_sample(dy: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        d = dy.reshape(dy_shape).narrow(d_axis, start, stop - start).to(dtype)
        xs = x_value.reshape(x_shape).narrow(axis, start, stop - start).to(dtype)
        g = torch.einsum(equation, d, xs)
        if alpha != 1:
            g = g * alpha
        if spans:  # sample j's gradient lives in q's slice start + j of the sample index
            g = _fit(g, tuple(q_split[: q_term.index(n)]) + (stop - start,) + tuple(q_split[q_term.index(n) + 1:]))
            placed = _on_diagonal(g, q_term.index(n), start, stop, q_split)
            return placed.reshape(stop - start, *full_q_shape)
        g = _fit(g, (stop - start, *q_shape))
        return g if unsqueeze is None else g.unsqueeze(1 + unsqueeze)

    squared = None
    letters = set(out) | set(x_term)
    sizes = dict(zip(out, dy_shape)) | dict(zip(x_term, x_shape))
    if not spans and letters <= {n, *q_term} and all(sizes.get(ch) == s for ch, s in zip(q_term, q_shape)):
        sq_equation = f"{out},{x_term}->{q_term}"

        def squared(dy: torch.Tensor) -> torch.Tensor:
            d2 = dy.reshape(dy_shape).to(dtype).square()
            g = torch.einsum(sq_equation, d2, x_value.reshape(x_shape).to(dtype).square())
            g = g * (alpha * alpha) if alpha != 1 else g
            return g if unsqueeze is None else g.unsqueeze(unsqueeze)

    return Plan(x_layout.n, per_sample, squared, sample_numel=math.prod(full_q_shape))


def plan_bias(
    out_shape: torch.Size,
    bias_shape: torch.Size,
    beta: float,
    dtype: torch.dtype,
    out_layout: Layout,
) -> Plan | str:
    """The per-sample plan of the added ``bias`` of ``addmm``/``linear``
    (``y = beta * bias + ...``); ``out_layout``: where the samples are in ``y``."""
    return plan_elementwise(out_shape, bias_shape, out_layout, dtype, alpha=beta, q_first=False)
