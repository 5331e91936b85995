"""Linear: ``y = x W^T + b`` with the exact per-sample statistic.

Shapes: ``x (N, *, I)`` (or ``(I,)``: one sample), ``W (O, I)``, ``b (O,)``, ``y (N, *, O)``.
With ``dy`` the output gradient, sample n contributes

    g_n(W) = sum_t dy[n, t]^T x[n, t]   (O, I)        g_n(b) = sum_t dy[n, t]   (O,)

over its positions t. For 2-D input (one position per sample) the statistic is one
extra matmul on squared operands, ``(dy**2)^T (x**2)``, exact there. Otherwise the
per-sample products are formed with ``bmm`` in chunks of samples (see
``truegrad.nn.settings.chunk_bytes``), squared and summed; the weight gradient is then
their sum (unless ``settings.bitwise_grad``; equal to torch's up to rounding) rather
than a second matmul of the same size. On CPU the 2-D case computes the weight gradient
and the statistic as one batched matmul of two (``_paired_statistic``), also unless
``settings.bitwise_grad``. Every other gradient is computed with the very ops torch's
own backward uses (bitwise torch's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from truegrad._originals import F  # torch's own ops, also under patch_torch
from truegrad.engine.samples import Layout
from truegrad.nn import settings
from truegrad.nn.rules import base

__all__ = ["linear"]


class LinearFunction(base.RuleFunction):
    """``F.linear`` whose backward also writes ``sum_grad_squared`` of weight and bias.

    With ``product`` given, the weight is ``(in_features, out_features)`` and the forward is
    that product as the model called it: ``torch.addmm(bias, input, weight)`` (Hugging Face
    GPT-2's ``Conv1D``) or ``input @ weight`` (``torch.mm``/``matmul``), bitwise torch's."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        granularity: str,
        samples: Layout | None,
        product: Callable[..., torch.Tensor] | None,
    ) -> torch.Tensor:
        if product is None:
            return F.linear(input, weight, bias)
        return product(input, weight) if bias is None else product(bias, input, weight)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        input, weight, bias, granularity, samples, product = inputs
        ctx.save_for_backward(input, weight)
        ctx.samples = samples
        ctx.in_out = product is not None  # the weight is (in_features, out_features)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.compute_dtype = output.dtype
        ctx.granularity = granularity
        ctx.weight_param = base.tracked(weight)
        ctx.bias_param = base.tracked(bias)
        base.record_use(ctx.weight_param, ctx)
        base.record_use(ctx.bias_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight = base.saved(ctx)
        dtype = ctx.compute_dtype
        grad_input = grad_weight = grad_bias = None
        needs_input, needs_weight, needs_bias, *_ = ctx.needs_input_grad
        weight_oi = weight.t() if ctx.in_out else weight  # (out_features, in_features)
        out_features, in_features = weight_oi.shape
        if needs_input:
            grad_input = grad_output @ base.cast(weight_oi, dtype)
        if ctx.weight_param is not None or ctx.bias_param is not None:
            grad_weight, grad_bias = _statistic(ctx, input, grad_output, weight.dtype)
        if (needs_weight and grad_weight is None) or (needs_bias and grad_bias is None):
            dy = grad_output if grad_output.dim() == 2 else grad_output.reshape(-1, out_features)
            if needs_weight and grad_weight is None:
                x = base.cast(input, dtype)
                x = x if x.dim() == 2 else x.reshape(-1, in_features)
                grad_weight = x.t() @ dy if ctx.in_out else dy.t() @ x  # torch's own product
            if needs_bias and grad_bias is None:
                grad_bias = dy.sum(0)
        if grad_weight is not None:
            grad_weight = base.cast(grad_weight, weight.dtype)
        if grad_bias is not None:
            grad_bias = base.cast(grad_bias, ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None


def _statistic(
    ctx: Any, input: torch.Tensor, grad_output: torch.Tensor, param_dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Hand ``sum_n g_n**2`` of weight and bias to ``base.contribute``; return the weight
    and bias gradients where they were computed together with it, ``None`` where not."""
    sdt = torch.float64 if param_dtype == torch.float64 else torch.float32
    out_features = grad_output.shape[-1]
    in_features = input.shape[-1]
    if ctx.granularity != "position":
        input, grad_output = base.sample_major(ctx.samples, 1, input, grad_output)
    per_position = input.dim() <= 2 or ctx.granularity == "position"
    if per_position:
        # One row per sample (2-D input) or per position (granularity="position").
        dy = base.cast(grad_output.reshape(-1, out_features), sdt)
        x = base.cast(input.reshape(-1, in_features), sdt)
        if _paired(ctx, dy, x, sdt):
            return _paired_statistic(ctx, dy, x)
        n = dy.shape[0]
        dy2 = _square(dy, "linear.dy2")
        if ctx.in_out:  # the weight is (in, out): the products transposed
            base.contribute(
                ctx.weight_param,
                n,
                lambda s, e: x[s:e, :, None] * dy[s:e, None, :],
                lambda: torch.mm(_square(x, "linear.x2").t(), dy2),
                ctx=ctx,
            )
        else:
            base.contribute(
                ctx.weight_param,
                n,
                lambda s, e: dy[s:e, :, None] * x[s:e, None, :],
                lambda out: torch.mm(dy2.t(), _square(x, "linear.x2"), out=out),
                ctx=ctx,
                squared_takes_out=True,
            )
        base.contribute(ctx.bias_param, n, lambda s, e: dy[s:e], lambda: dy2.sum(0), ctx=ctx)
        return None, None
    n = input.shape[0]
    dy3 = base.cast(grad_output.reshape(n, -1, out_features), sdt)
    x3 = base.cast(input.reshape(n, -1, in_features), sdt)

    def per_sample_weight(s: int, e: int) -> torch.Tensor:
        if ctx.in_out:  # the weight is (in, out): x_n^T dy_n, contiguous in its layout
            out = base.scratch((e - s, in_features, out_features), sdt, dy3.device)
            return torch.bmm(x3[s:e].transpose(1, 2), dy3[s:e], out=out)
        out = base.scratch((e - s, out_features, in_features), sdt, dy3.device)
        return torch.bmm(dy3[s:e].transpose(1, 2), x3[s:e], out=out)

    grad_weight = base.contribute(
        ctx.weight_param,
        n,
        per_sample_weight,
        ctx=ctx,
        per_sample_owned=True,
        with_grad=ctx.compute_dtype == sdt,  # not under autocast: torch's grad is low precision
    )
    base.contribute(ctx.bias_param, n, lambda s, e: dy3[s:e].sum(1), ctx=ctx)
    return grad_weight, None


def _paired(ctx: Any, dy: torch.Tensor, x: torch.Tensor, sdt: torch.dtype) -> bool:
    """Whether the weight's gradient and statistic are one batched matmul here: on CPU,
    unless ``settings.bitwise_grad``, in the parameter's own precision (not under
    autocast), with the stacked operands within ``settings.chunk_bytes``, when this is
    the weight's only use in the backward (a shared weight needs per-sample products),
    and when the weight has no gradient yet: the gradient then becomes ``p.grad`` as is,
    a view sharing one block with the statistic, which is what both occupy anyway (an
    accumulating backward would keep a dead gradient half alive with the statistic)."""
    weight = ctx.weight_param
    return (
        weight is not None
        and not ctx.in_out
        and weight.grad is None
        and not settings.bitwise_grad
        and ctx.compute_dtype == sdt
        and dy.device.type == "cpu"
        and 2 * dy.shape[0] * (dy.shape[1] + x.shape[1]) * dy.element_size() <= settings.chunk_bytes
        and base.exclusive_use(weight, ctx)
    )


def _paired_statistic(
    ctx: Any, dy: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dy^T x`` and ``(dy**2)^T (x**2)`` as ONE ``bmm`` over the stacked pairs
    ``[dy, dy**2]`` and ``[x, x**2]`` (``dy (n, O)``, ``x (n, I)``): with two cores each
    runs one whole product, faster than both cooperating on one after the other (MKL).

    Returns:
        The weight gradient ``(O, I)`` and the bias gradient ``(O,)`` (``None`` without a
        tracked bias); the statistics are handed to ``base.contribute``.
    """
    n, out_features = dy.shape
    in_features = x.shape[1]
    pair_dy = base.scratch((2, n, out_features), dy.dtype, dy.device, "linear.dy_pair")
    pair_x = base.scratch((2, n, in_features), x.dtype, x.device, "linear.x_pair")
    pair_dy[0].copy_(dy)
    torch.square(dy, out=pair_dy[1])
    pair_x[0].copy_(x)
    torch.square(x, out=pair_x[1])
    both = torch.bmm(pair_dy.transpose(1, 2), pair_x)  # (2, O, I): gradient, statistic
    base.contribute(
        ctx.weight_param, n, lambda s, e: dy[s:e, :, None] * x[s:e, None, :], lambda: both[1], ctx=ctx
    )
    if ctx.bias_param is None:
        return both[0], None
    base.contribute(ctx.bias_param, n, lambda s, e: dy[s:e], lambda: pair_dy[1].sum(0), ctx=ctx)
    return both[0], dy.sum(0)


#: Temporaries from this many elements (128 KiB of float32, glibc's initial mmap threshold)
#: on are squared into scratch.
_SCRATCH_NUMEL = 1 << 15


def _square(t: torch.Tensor, slot: str) -> torch.Tensor:
    """``t**2``; a large CPU one into a reused scratch buffer (a fresh one is page-faulted
    in each time glibc has returned the memory; small blocks come from its free lists)."""
    if t.numel() < _SCRATCH_NUMEL or t.device.type != "cpu":
        return t.square()
    return torch.square(t, out=base.scratch(tuple(t.shape), t.dtype, t.device, slot))


def linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    granularity: settings.Granularity | None = None,
    samples: Layout | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.linear`` that also writes ``sum_grad_squared``.

    Args:
        input: ``(N, *, in_features)``; dim 0 indexes samples (a 1-D input is one sample),
            unless ``samples`` says where they are.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or ``None``.
        granularity: ``None`` (the process-wide setting), ``"sample"`` (exact) or
            ``"position"`` (per-position approximation, opt-in).
        samples: where the model's samples are in ``input`` (set by the engine; any
            leading dim, possibly flattened), ``None``: dim 0.

    Returns:
        ``(N, *, out_features)``, exactly ``F.linear(input, weight, bias)``.
    """
    if not base.should_track(weight, bias):
        return F.linear(input, weight, bias)
    granularity = settings.resolve_granularity(granularity)
    return base.apply(LinearFunction, input, weight, bias, granularity, samples, None)


def product(
    op: Callable[..., torch.Tensor],
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    samples: Layout | None = None,
) -> torch.Tensor:
    """``op(input, weight)`` or ``op(bias, input, weight)`` for a weight of shape
    ``(in_features, out_features)``: ``torch.addmm(bias, x, W)`` (Hugging Face GPT-2's
    ``Conv1D``), ``x @ W``, ``torch.mm(x, W)``, computed exactly as ``op`` computes it, with
    the Linear rule's backward (per-sample products summed over each sample's positions,
    the weight gradient formed from them). Internal to the engine (the caller checks that
    ``op`` is such a product with ``alpha == beta == 1``)."""
    granularity = settings.resolve_granularity(None)
    return base.apply(LinearFunction, input, weight, bias, granularity, samples, op)
