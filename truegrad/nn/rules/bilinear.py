"""Bilinear: ``y[..., o] = x1[...]^T A[o] x2[...] + b[o]`` with the exact per-sample statistic.

Shapes: ``x1 (N, *, I1)``, ``x2 (N, *, I2)`` (same leading dims; 1-D inputs are one
sample), ``A (O, I1, I2)``, ``b (O,)``, ``y (N, *, O)``. With ``dy`` the output gradient,
sample n contributes, summed over its positions t,

    g_n(A)[o, i, j] = sum_t dy[n, t, o] x1[n, t, i] x2[n, t, j]      (O, I1, I2)
    g_n(b)[o]       = sum_t dy[n, t, o]                               (O,)

For 2-D inputs (one position per sample) the statistic is one einsum on squared
operands, ``sum_n dy[n]**2 (x) x1[n]**2 (x) x2[n]**2``, exact there and as costly as the
weight gradient. Otherwise the per-sample tensors are formed by an einsum over chunks of
samples (``truegrad.nn.settings.chunk_bytes``), squared and summed.

Gradients use the ops of torch's own backward: ``F.bilinear`` is ``aten._trilinear`` on
inputs flattened to 2-D plus a broadcast bias, and ``_trilinear``'s backward is three
``_trilinear`` calls with permuted index lists; the bias gradient is ``sum_to_size``.
So ``p.grad`` is bitwise torch's.
"""

from __future__ import annotations

from typing import Any

import torch

from truegrad._originals import F  # torch's own ops, also under patch_torch
from truegrad.engine.samples import Layout
from truegrad.nn import settings
from truegrad.nn.rules import base

__all__ = ["bilinear"]

# Index lists of ``aten._trilinear`` as used by ``at::bilinear`` (i1 = x1, i2 = A, i3 = x2).
_EXPAND1, _EXPAND2, _EXPAND3, _SUMDIM = [1, 3], [0], [1, 2], [2, 3]


class BilinearFunction(base.RuleFunction):
    """``F.bilinear`` whose backward also writes ``sum_grad_squared`` of weight and bias."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input1: torch.Tensor,
        input2: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        granularity: str,
        samples: Layout | None,
    ) -> torch.Tensor:
        return F.bilinear(input1, input2, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        input1, input2, weight, bias, granularity, samples = inputs
        ctx.samples = samples
        ctx.save_for_backward(input1, input2, weight)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.compute_dtype = output.dtype
        ctx.granularity = granularity
        ctx.weight_param = base.tracked(weight)
        ctx.bias_param = base.tracked(bias)
        base.record_use(ctx.weight_param, ctx)
        base.record_use(ctx.bias_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input1, input2, weight = base.saved(ctx)
        dtype = ctx.compute_dtype
        out_features, in1, in2 = weight.shape
        tri = torch.ops.aten._trilinear
        x1 = input1.to(dtype).reshape(-1, in1)
        x2 = input2.to(dtype).reshape(-1, in2)
        w = weight.to(dtype)
        dy = grad_output.reshape(-1, out_features)
        grad_input1 = grad_input2 = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input1 = tri(dy, w, x2, _SUMDIM, _EXPAND2, _EXPAND3, _EXPAND1)
            grad_input1 = grad_input1.reshape(input1.shape).to(input1.dtype)
        if ctx.needs_input_grad[1]:
            grad_input2 = tri(x1, w, dy, _EXPAND1, _EXPAND2, _SUMDIM, _EXPAND3)
            grad_input2 = grad_input2.reshape(input2.shape).to(input2.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = tri(x1, dy, x2, _EXPAND1, _SUMDIM, _EXPAND3, _EXPAND2).to(weight.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_output.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype)
        if ctx.weight_param is not None or ctx.bias_param is not None:
            _statistic(ctx, input1, input2, grad_output, weight.dtype)
        return grad_input1, grad_input2, grad_weight, grad_bias, None, None


def _statistic(
    ctx: Any,
    input1: torch.Tensor,
    input2: torch.Tensor,
    grad_output: torch.Tensor,
    param_dtype: torch.dtype,
) -> None:
    sdt = torch.float64 if param_dtype == torch.float64 else torch.float32
    out_features = grad_output.shape[-1]
    in1, in2 = input1.shape[-1], input2.shape[-1]
    if ctx.granularity != "position":
        input1, input2, grad_output = base.sample_major(ctx.samples, 1, input1, input2, grad_output)
    n = 1 if input1.dim() == 1 else input1.shape[0]
    if input1.dim() <= 2 or ctx.granularity == "position":
        # One row per sample (2-D input) or per position (opt-in approximation).
        dy = grad_output.reshape(-1, out_features).to(sdt)
        x1 = input1.reshape(-1, in1).to(sdt)
        x2 = input2.reshape(-1, in2).to(sdt)
        dy2 = dy.square()
        rows = dy.shape[0]
        base.contribute(
            ctx.weight_param,
            rows,
            lambda s, e: torch.einsum("no,ni,nj->noij", dy[s:e], x1[s:e], x2[s:e]),
            lambda: torch.einsum("no,ni,nj->oij", dy2, x1.square(), x2.square()),
            ctx=ctx,
        )
        base.contribute(ctx.bias_param, rows, lambda s, e: dy[s:e], lambda: dy2.sum(0), ctx=ctx)
        return
    dy3 = grad_output.reshape(n, -1, out_features).to(sdt)
    x13 = input1.reshape(n, -1, in1).to(sdt)
    x23 = input2.reshape(n, -1, in2).to(sdt)
    base.contribute(
        ctx.weight_param,
        n,
        lambda s, e: torch.einsum("nto,nti,ntj->noij", dy3[s:e], x13[s:e], x23[s:e]),
        ctx=ctx,
    )
    base.contribute(ctx.bias_param, n, lambda s, e: dy3[s:e].sum(1), ctx=ctx)


def bilinear(
    input1: torch.Tensor,
    input2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    granularity: settings.Granularity | None = None,
    samples: Layout | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.bilinear`` that also writes ``sum_grad_squared``.

    Args:
        input1: ``(N, *, in1_features)``; dim 0 indexes samples (a 1-D input is one sample).
        input2: ``(N, *, in2_features)`` with the same leading dims as ``input1``.
        weight: ``(out_features, in1_features, in2_features)``.
        bias: ``(out_features,)`` or ``None``.
        granularity: ``None`` (the process-wide setting), ``"sample"`` (exact) or
            ``"position"`` (per-position approximation, opt-in).

    Returns:
        ``(N, *, out_features)``, exactly ``F.bilinear(input1, input2, weight, bias)``.
    """
    if not base.should_track(weight, bias):
        return F.bilinear(input1, input2, weight, bias)
    granularity = settings.resolve_granularity(granularity)
    return base.apply(BilinearFunction, input1, input2, weight, bias, granularity, samples)
