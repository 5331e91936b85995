"""PReLU: ``y = x`` where ``x > 0``, else ``a[c] * x``, with the exact per-sample statistic.

Shapes (torch's semantics): ``x (N, C, *)`` with ``a (C,)`` (one slope per channel, the
channel dim being dim 1) or ``a`` of one element (``(1,)`` or ``()``: one slope shared
by every channel). An input with fewer than 2 dims has no channel dim and takes a
one-element ``a`` only. Samples are dim 0 of the input (a 0-d input is one sample).

With ``dy`` the output gradient and ``G = dy * x * (x <= 0)`` (``_prelu_kernel_backward``'s
weight gradient, shaped like ``x``), sample n contributes

    g_n(a)[c] = sum_p G[n, c, p]           (per-channel slopes, over positions p)
    g_n(a)    = sum_{c, p} G[n, c, p]      (one shared slope)

``G`` is what torch's backward forms anyway, so the statistic costs a reduction of it.
Gradients come from ``aten._prelu_kernel_backward`` followed by ``sum_to_size`` exactly as
torch's autograd reduces the broadcast weight, so ``p.grad`` is bitwise torch's.
"""

from __future__ import annotations

from typing import Any

import torch

from truegrad._originals import F, T  # torch's own ops, also under patch_torch
from truegrad.nn import settings
from truegrad.nn.rules import base

__all__ = ["prelu"]


def _broadcast_shape(input: torch.Tensor, weight: torch.Tensor) -> list[int]:
    """The shape ``at::prelu`` views ``weight`` as before ``_prelu_kernel``."""
    if input.dim() == weight.dim():
        return list(weight.shape)
    shape = [1] * input.dim()
    if input.dim() > 1:
        shape[1] = weight.numel()
    return shape


class PReLUFunction(base.RuleFunction):
    """``torch.prelu`` whose backward also writes ``sum_grad_squared`` of the weight."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: torch.Tensor, weight: torch.Tensor, granularity: str
    ) -> torch.Tensor:
        return T.prelu(input, weight)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        input, weight, granularity = inputs
        ctx.save_for_backward(input, weight)
        ctx.compute_dtype = output.dtype
        ctx.granularity = granularity
        ctx.weight_param = base.tracked(weight)
        base.record_use(ctx.weight_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight = base.saved(ctx)
        dtype = ctx.compute_dtype
        shape = _broadcast_shape(input, weight)
        x = input.to(dtype)
        w = weight.to(dtype).reshape(shape)
        grad_input, grad_weight_full = torch.ops.aten._prelu_kernel_backward(grad_output, x, w)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_weight_full.sum_to_size(shape).reshape(weight.shape).to(weight.dtype)
        if ctx.weight_param is not None:
            _statistic(ctx, input, grad_output, grad_weight_full, weight)
        grad_input = grad_input.to(input.dtype) if ctx.needs_input_grad[0] else None
        return grad_input, grad_weight, None


def _statistic(
    ctx: Any,
    input: torch.Tensor,
    grad_output: torch.Tensor,
    grad_weight_full: torch.Tensor,
    weight: torch.Tensor,
) -> None:
    sdt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if grad_weight_full.dtype == sdt:
        g = grad_weight_full
    else:  # low-precision compute: form G again from float32 casts
        x = input.to(sdt)
        g = torch.where(x > 0, 0.0, x * grad_output.to(sdt))
    per_channel = weight.numel() != 1
    if input.dim() == 0:
        per_sample = g.reshape(1, *weight.shape)  # one sample, one position
    elif input.dim() == 1:
        per_sample = g.reshape(-1, *weight.shape)  # N samples of one position each
    elif ctx.granularity == "position" and input.dim() > 2:
        n, c = input.shape[:2]
        rows = g.reshape(n, c, -1).transpose(1, 2)  # (N, P, C)
        per_sample = rows.reshape(-1, c) if per_channel else rows.sum(2).reshape(-1, 1)
        per_sample = per_sample.reshape(-1, *weight.shape)
    else:
        n, c = input.shape[:2]
        per_sample = g.reshape(n, c, -1).sum(2)
        if not per_channel:
            per_sample = per_sample.sum(1)
        per_sample = per_sample.reshape(n, *weight.shape)
    base.contribute(
        ctx.weight_param,
        per_sample.shape[0],
        lambda s, e: per_sample[s:e],
        lambda: per_sample.square().sum(0),
        ctx=ctx,
    )


def prelu(
    input: torch.Tensor,
    weight: torch.Tensor,
    *,
    granularity: settings.Granularity | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.prelu`` that also writes ``sum_grad_squared`` of ``weight``.

    Args:
        input: ``(N, C, *)``, ``(N,)`` or ``()``; dim 0 indexes samples (a 0-d input is one
            sample).
        weight: ``(C,)`` (``C = input.shape[1]``) or one element (``(1,)`` or ``()``).
        granularity: ``None`` (the process-wide setting), ``"sample"`` (exact) or
            ``"position"`` (per-position approximation over dims 2 and beyond, opt-in).

    Returns:
        ``input``'s shape, exactly ``F.prelu(input, weight)``.
    """
    if not base.should_track(weight):
        return F.prelu(input, weight)
    return base.apply(PReLUFunction, input, weight, settings.resolve_granularity(granularity))
