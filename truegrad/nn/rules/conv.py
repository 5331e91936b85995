"""Convolutions (``conv{1,2,3}d``, ``conv_transpose{1,2,3}d``) with the exact per-sample statistic.

Shapes, with ``d`` spatial dims, ``G`` groups and ``N`` samples (dim 0 of the input; an
unbatched input ``(C_in, *S)`` is one sample):

* convolution: ``x (N, C_in, *S)``, ``W (C_out, C_in/G, *k)``, ``b (C_out,)``,
  ``y (N, C_out, *S_out)``;
* transposed convolution: ``x (N, C_in, *S)``, ``W (C_in, C_out/G, *k)``, ``b (C_out,)``,
  ``y (N, C_out, *S_out)``.

Sample n contributes the weight gradient of the convolution applied to sample n alone,
summed over all of its positions, and the bias gradient summed over its output positions:

    g_n(W) = dW(x[n:n+1], dy[n:n+1])   (shape of W)        g_n(b) = sum_t dy[n, :, t]   (C_out,)

where ``dW(x, dy)`` is the weight gradient that ``torch.ops.aten.convolution_backward``
returns. The per-sample weight gradients of c samples come from ONE such call ("batch as
groups"): the chunk's input is viewed as ``(1, c*C_in, *S)``, its output gradient as
``(1, c*C_out, *S_out)``, and the convolution is taken with ``c*G`` groups; group
``n*G + j`` then sees exactly sample n's group j, and the returned weight gradient of shape
``(c*C_out, C_in/G, *k)`` (transposed: ``(c*C_in, C_out/G, *k)``) is the c per-sample
gradients stacked. Cost: the FLOPs of the weight gradient, no unfolded copy of the input.
Chunks are bounded by ``truegrad.nn.settings.chunk_bytes`` (see ``base.contribute``).

``granularity="position"`` (opt-in approximation) counts every output position of a
convolution (every input position of a transposed one: the position a weight tap is
applied at) as its own sample. Each weight element receives exactly one product
``x * dy`` per such position, so the per-position squares sum to the weight gradient of
the squared operands, ``dW(x**2, dy**2)``: one extra weight-gradient call, exact for that
per-position definition, and equal to the per-sample statistic only when a sample has a
single position (e.g. a 1x1 spatial output). The bias gets ``sum_{n,t} dy[n, :, t]**2``.

The weight and bias gradients are the sums of those per-sample gradients
(unless ``settings.bitwise_grad``; equal to torch's up to rounding), so torch's
``convolution_backward`` is then asked for the input gradient only (and skipped for a
first layer, whose input needs none). Otherwise gradients are
``torch.ops.aten.convolution_backward`` with the very arguments autograd passes for
``aten.convolution``, bitwise torch's. ``padding="same"`` is
resolved as torch does (an odd total padding is a zero pad of the right end, then a
symmetric padding), and non-``zeros`` padding modes are an ``F.pad`` before a convolution
with padding 0 (what ``torch.nn.ConvNd`` does), so those gradients are torch's too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from truegrad._originals import F  # torch's own ops, also under patch_torch
from truegrad.nn import settings
from truegrad.nn.rules import base

__all__ = [
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
]

IntOrTuple = int | Sequence[int]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class ConvFunction(base.RuleFunction):
    """``aten.convolution`` (through ``F.conv*``, so autocast applies) whose backward also
    writes ``sum_grad_squared`` of weight and bias. ``input`` is batched ``(N, C, *S)`` and
    ``padding`` is a list of ints (callers resolve strings and padding modes)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        transposed: bool,
        output_padding: list[int],
        groups: int,
        granularity: str,
    ) -> torch.Tensor:
        dim = weight.dim() - 2
        if transposed:
            return _CONV_TRANSPOSE[dim](
                input, weight, bias, stride, padding, output_padding, groups, dilation
            )
        return _CONV[dim](input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        input, weight, bias, stride, padding, dilation, transposed, out_pad, groups, gran = inputs
        ctx.save_for_backward(input, weight)
        ctx.args = (stride, padding, dilation, transposed, out_pad, groups)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.compute_dtype = output.dtype
        ctx.granularity = gran
        ctx.weight_param = base.tracked(weight)
        ctx.bias_param = base.tracked(bias)
        base.record_use(ctx.weight_param, ctx)
        base.record_use(ctx.bias_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight = base.saved(ctx)
        dtype = ctx.compute_dtype
        stride, padding, dilation, transposed, output_padding, groups = ctx.args
        grad_input = grad_weight = grad_bias = None
        if ctx.weight_param is not None or ctx.bias_param is not None:
            grad_weight, grad_bias = _statistic(ctx, input, weight, grad_output)
        mask = [
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1] and grad_weight is None,
            ctx.needs_input_grad[2] and grad_bias is None,
        ]
        if any(mask):
            grads = torch.ops.aten.convolution_backward(
                grad_output,
                base.cast(input, dtype),
                base.cast(weight, dtype),
                ctx.bias_sizes,
                stride,
                padding,
                dilation,
                transposed,
                output_padding,
                groups,
                mask,
            )
            grad_input = grads[0]
            grad_weight = grads[1] if mask[1] else grad_weight
            grad_bias = grads[2] if mask[2] else grad_bias
        if grad_input is not None:
            grad_input = base.cast(grad_input, input.dtype)
        if grad_weight is not None:
            grad_weight = base.cast(grad_weight, weight.dtype)
        if grad_bias is not None:
            grad_bias = base.cast(grad_bias, ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _statistic(
    ctx: Any, input: torch.Tensor, weight: torch.Tensor, grad_output: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Hand ``sum_n g_n**2`` of weight and bias to ``base.contribute`` (module docstring).

    Returns the weight and bias gradients where they were summed from the per-sample
    gradients formed here (unless ``settings.bitwise_grad``), ``None`` where not."""
    stride, padding, dilation, transposed, output_padding, groups = ctx.args
    sdt = base.stat_dtype(weight)
    # Under autocast torch's gradients are half precision: then they come from torch's op.
    with_grad = ctx.compute_dtype == sdt
    n = input.shape[0]
    dy = base.cast(grad_output, sdt)
    spatial = tuple(range(2, dy.dim()))
    per_position = ctx.granularity == "position"
    grad_weight = grad_bias = None
    if ctx.weight_param is not None:
        x = base.cast(input, sdt)

        def weight_grad(x_: torch.Tensor, dy_: torch.Tensor, samples: int) -> torch.Tensor:
            # Only the weight's shape matters for the weight gradient: a stride-0 view.
            shape = (samples * weight.shape[0], *weight.shape[1:])
            w_ = dy_.new_zeros(()).expand(shape)
            return torch.ops.aten.convolution_backward(
                dy_, x_, w_, None, stride, padding, dilation, transposed, output_padding,
                samples * groups, [False, True, False],
            )[1]

        def per_sample_weight(start: int, stop: int) -> torch.Tensor:
            c = stop - start
            xs = x[start:stop].reshape(1, c * x.shape[1], *x.shape[2:])
            dys = dy[start:stop].reshape(1, c * dy.shape[1], *dy.shape[2:])
            return weight_grad(xs, dys, c).reshape(c, *weight.shape)

        # A weight tap is applied at every output position of a convolution (every input
        # position of a transposed one). With one such position per sample the per-sample
        # gradient is a single product, and the squared operands give the statistic exactly.
        taps = (input if transposed else grad_output).shape[2:].numel()
        grad_weight = base.contribute(
            ctx.weight_param,
            n,
            per_sample_weight,
            (lambda: weight_grad(x.square(), dy.square(), 1))
            if per_position or taps == 1
            else None,
            ctx=ctx,
            per_sample_owned=True,  # a fresh result of convolution_backward
            with_grad=with_grad,
        )
    if ctx.bias_param is not None:
        grad_bias = base.contribute(
            ctx.bias_param,
            n,
            lambda s, e: dy[s:e].sum(spatial),
            (lambda: dy.square().sum((0, *spatial)))
            if per_position or grad_output.shape[2:].numel() == 1
            else None,
            ctx=ctx,
            per_sample_owned=True,  # a fresh sum
            with_grad=with_grad,
        )
    return grad_weight, grad_bias


def _expand(value: IntOrTuple, dim: int, name: str) -> list[int]:
    """``value`` as a list of ``dim`` ints (a single int or 1-element sequence is repeated)."""
    if isinstance(value, int):
        return [value] * dim
    values = [int(v) for v in value]
    if len(values) == 1:
        return values * dim
    if len(values) != dim:
        raise RuntimeError(
            f"expected {name} to be a single integer value or a list of {dim} values to match "
            f"the convolution dimensions, but got {name}={values}"
        )
    return values


def _batched(input: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(N, C, *S)`` view of ``input`` and whether it was unbatched ``(C, *S)``."""
    if input.dim() == weight.dim() - 1:
        return input.unsqueeze(0), True
    return input, False


def _same_padding(
    input: torch.Tensor, weight: torch.Tensor, stride: list[int], dilation: list[int]
) -> tuple[torch.Tensor, list[int]]:
    """Resolve ``padding="same"`` exactly as ATen's ``convolution_same`` does.

    Total padding ``d*(k-1)`` per dim, ``left = total // 2``; an odd total adds one zero on
    the right through ``F.pad`` (``constant_pad_nd``) so the rest is symmetric.
    """
    if any(s != 1 for s in stride):
        raise RuntimeError("padding='same' is not supported for strided convolutions")
    dim = weight.dim() - 2
    left: list[int] = []
    pad_nd = [0] * (2 * dim)
    for i in range(dim):
        total = dilation[i] * (weight.shape[i + 2] - 1)
        left.append(total // 2)
        pad_nd[2 * (dim - 1 - i) + 1] = total - 2 * (total // 2)
    if any(pad_nd):
        input = F.pad(input, pad_nd)
    return input, left


def _convolution(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: IntOrTuple,
    padding: IntOrTuple | str,
    dilation: IntOrTuple,
    transposed: bool,
    output_padding: IntOrTuple,
    groups: int,
    granularity: settings.Granularity | None,
) -> torch.Tensor:
    dim = weight.dim() - 2
    gran = settings.resolve_granularity(granularity)
    if weight.is_complex():
        raise ValueError(
            "truegrad convolutions support real parameters only: complex parameters have no "
            "real sum of squared per-sample gradients"
        )
    x, unbatched = _batched(input, weight)
    stride_ = _expand(stride, dim, "stride")
    dilation_ = _expand(dilation, dim, "dilation")
    output_padding_ = _expand(output_padding, dim, "output_padding")
    if isinstance(padding, str):
        if transposed:
            raise TypeError(
                f"conv_transpose{dim}d(): argument 'padding' must be tuple of ints, not str"
            )
        if padding == "valid":
            padding_ = [0] * dim
        elif padding == "same":
            x, padding_ = _same_padding(x, weight, stride_, dilation_)
        else:
            raise RuntimeError(f"Invalid padding string: '{padding}'")
    else:
        padding_ = _expand(padding, dim, "padding")
    out = base.apply(
        ConvFunction,
        x, weight, bias, stride_, padding_, dilation_, transposed, output_padding_, groups, gran
    )
    return out.squeeze(0) if unbatched else out


def _doc(name: str, transposed: bool) -> str:
    weight = "(C_in, C_out/groups, *k)" if transposed else "(C_out, C_in/groups, *k)"
    return f"""``torch.nn.functional.{name}`` that also writes ``sum_grad_squared``.

    Same signature and result as torch's; falls back to torch's op when neither ``weight``
    nor ``bias`` is a trainable leaf or gradients are not recorded.

    Args:
        input: ``(N, C_in, *S)`` (dim 0 indexes samples) or unbatched ``(C_in, *S)``.
        weight: ``{weight}``.
        bias: ``(C_out,)`` or ``None``.
        granularity: ``None`` (the process-wide setting), ``"sample"`` (exact) or
            ``"position"`` (per-position approximation, opt-in; see the module docstring).

    Returns:
        ``(N, C_out, *S_out)``, exactly ``F.{name}(...)``.
    """


def conv1d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    *,
    granularity: settings.Granularity | None = None,
) -> torch.Tensor:
    if not base.should_track(weight, bias):
        return F.conv1d(input, weight, bias, stride, padding, dilation, groups)
    return _convolution(
        input, weight, bias, stride, padding, dilation, False, 0, groups, granularity
    )


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    *,
    granularity: settings.Granularity | None = None,
) -> torch.Tensor:
    if not base.should_track(weight, bias):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return _convolution(
        input, weight, bias, stride, padding, dilation, False, 0, groups, granularity
    )


def conv3d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    *,
    granularity: settings.Granularity | None = None,
) -> torch.Tensor:
    if not base.should_track(weight, bias):
        return F.conv3d(input, weight, bias, stride, padding, dilation, groups)
    return _convolution(
        input, weight, bias, stride, padding, dilation, False, 0, groups, granularity
    )


def conv_transpose1d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
    *,
    granularity: settings.Granularity | None = None,
) -> torch.Tensor:
    if not base.should_track(weight, bias):
        return F.conv_transpose1d(
            input, weight, bias, stride, padding, output_padding, groups, dilation
        )
    return _convolution(
        input, weight, bias, stride, padding, dilation, True, output_padding, groups, granularity
    )


def conv_transpose2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
    *,
    granularity: settings.Granularity | None = None,
) -> torch.Tensor:
    if not base.should_track(weight, bias):
        return F.conv_transpose2d(
            input, weight, bias, stride, padding, output_padding, groups, dilation
        )
    return _convolution(
        input, weight, bias, stride, padding, dilation, True, output_padding, groups, granularity
    )


def conv_transpose3d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
    *,
    granularity: settings.Granularity | None = None,
) -> torch.Tensor:
    if not base.should_track(weight, bias):
        return F.conv_transpose3d(
            input, weight, bias, stride, padding, output_padding, groups, dilation
        )
    return _convolution(
        input, weight, bias, stride, padding, dilation, True, output_padding, groups, granularity
    )


for _fn in (conv1d, conv2d, conv3d):
    _fn.__doc__ = _doc(_fn.__name__, transposed=False)
for _fn in (conv_transpose1d, conv_transpose2d, conv_transpose3d):
    _fn.__doc__ = _doc(_fn.__name__, transposed=True)
del _fn
