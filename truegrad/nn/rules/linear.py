"""Linear: ``y = x W^T + b`` with the exact per-sample statistic.

Shapes: ``x (N, *, I)`` (or ``(I,)``: one sample), ``W (O, I)``, ``b (O,)``, ``y (N, *, O)``.
With ``dy`` the output gradient, sample n contributes

    g_n(W) = sum_t dy[n, t]^T x[n, t]   (O, I)        g_n(b) = sum_t dy[n, t]   (O,)

over its positions t. For 2-D input (one position per sample) the statistic is one
extra matmul on squared operands, ``(dy**2)^T (x**2)``, exact there. Otherwise the
per-sample products are formed with ``bmm`` in chunks of samples (see
``truegrad.nn.settings.chunk_bytes``), squared and summed; the weight gradient is then
their sum (``settings.grad_from_per_sample``, equal to torch's up to rounding) rather
than a second matmul of the same size. Every other gradient is computed with the very
ops torch's own backward uses (bitwise torch's).
"""

from __future__ import annotations

from typing import Any

import torch

from truegrad._originals import F  # torch's own ops, also under patch_torch
from truegrad.nn import settings
from truegrad.nn.rules import base

__all__ = ["linear"]


class LinearFunction(torch.autograd.Function):
    """``F.linear`` whose backward also writes ``sum_grad_squared`` of weight and bias."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, granularity: str
    ) -> torch.Tensor:
        return F.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        input, weight, bias, granularity = inputs
        ctx.save_for_backward(input, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.compute_dtype = output.dtype
        ctx.granularity = granularity
        ctx.weight_param = base.tracked(weight)
        ctx.bias_param = base.tracked(bias)
        base.record_use(ctx.weight_param, ctx)
        base.record_use(ctx.bias_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight = ctx.saved_tensors
        dtype = ctx.compute_dtype
        grad_input = grad_weight = grad_bias = None
        needs_input, needs_weight, needs_bias, _ = ctx.needs_input_grad
        out_features, in_features = weight.shape
        if ctx.weight_param is not None or ctx.bias_param is not None:
            grad_weight = _statistic(ctx, input, grad_output, weight.dtype)
        if needs_input:
            grad_input = grad_output @ base.cast(weight, dtype)
        if needs_weight or needs_bias:
            dy = grad_output if grad_output.dim() == 2 else grad_output.reshape(-1, out_features)
            if needs_weight and grad_weight is None:
                x = base.cast(input, dtype)
                grad_weight = dy.t() @ (x if x.dim() == 2 else x.reshape(-1, in_features))
            if needs_bias:
                grad_bias = base.cast(dy.sum(0), ctx.bias_dtype)
        if grad_weight is not None:
            grad_weight = base.cast(grad_weight, weight.dtype)
        return grad_input, grad_weight, grad_bias, None


def _statistic(
    ctx: Any, input: torch.Tensor, grad_output: torch.Tensor, param_dtype: torch.dtype
) -> torch.Tensor | None:
    """Hand ``sum_n g_n**2`` of weight and bias to ``base.contribute``; return the weight's
    gradient when it was summed from per-sample products formed here, else ``None``."""
    sdt = torch.float64 if param_dtype == torch.float64 else torch.float32
    out_features = grad_output.shape[-1]
    in_features = input.shape[-1]
    per_position = input.dim() <= 2 or ctx.granularity == "position"
    if per_position:
        # One row per sample (2-D input) or per position (granularity="position").
        dy = base.cast(grad_output.reshape(-1, out_features), sdt)
        x = base.cast(input.reshape(-1, in_features), sdt)
        n = dy.shape[0]
        dy2 = _square(dy, "linear.dy2")
        base.contribute(
            ctx.weight_param,
            n,
            lambda s, e: dy[s:e, :, None] * x[s:e, None, :],
            lambda out: torch.mm(dy2.t(), _square(x, "linear.x2"), out=out),
            ctx=ctx,
            squared_takes_out=True,
        )
        base.contribute(ctx.bias_param, n, lambda s, e: dy[s:e], lambda: dy2.sum(0), ctx=ctx)
        return None
    n = input.shape[0]
    dy3 = base.cast(grad_output.reshape(n, -1, out_features), sdt)
    x3 = base.cast(input.reshape(n, -1, in_features), sdt)

    def per_sample_weight(s: int, e: int) -> torch.Tensor:
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
    return grad_weight


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
) -> torch.Tensor:
    """``torch.nn.functional.linear`` that also writes ``sum_grad_squared``.

    Args:
        input: ``(N, *, in_features)``; dim 0 indexes samples (a 1-D input is one sample).
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or ``None``.
        granularity: ``None`` (the process-wide setting), ``"sample"`` (exact) or
            ``"position"`` (per-position approximation, opt-in).

    Returns:
        ``(N, *, out_features)``, exactly ``F.linear(input, weight, bias)``.
    """
    if not base.should_track(weight, bias):
        return F.linear(input, weight, bias)
    return base.apply(LinearFunction, input, weight, bias, settings.resolve_granularity(granularity))
