"""BatchNorm and InstanceNorm with the exact per-sample statistic.

Shapes: ``x (N, C, *spatial)`` (BatchNorm also ``(N, C)``), ``w, b (C,)``. With
``x_hat = (x - mean[c]) * invstd[c]`` and ``dy`` the output gradient, sample n's share
of the parameter gradients is

    g_n(w)[c] = sum_s dy[n, c, s] * x_hat[n, c, s]        g_n(b)[c] = sum_s dy[n, c, s]

over the spatial positions s.

* BatchNorm in training mode normalises with the batch statistics, so samples
  interact: ``g_n`` is then the op's own per-sample split of ``p.grad`` (docs/statistic.md
  section 1), with ``x_hat`` from torch's saved batch mean and inverse std. In
  evaluation mode ``x_hat`` uses the running statistics and samples are independent.
* InstanceNorm normalises every (sample, channel) with its own statistics; torch runs
  it as a batch norm of the ``(1, N*C, *spatial)`` reshaped input with the weight
  repeated N times, so the gradient of that repeated weight *is* the per-sample
  gradient ``g_n(w)``, and the statistic comes for free.

Forward and backward call torch's own ops (``_batch_norm_impl_index``, which picks
the native/cuDNN/MIOpen kernel as ``torch.batch_norm`` does, and the matching
backward), so outputs, ``p.grad`` and the running statistics are bitwise torch's.
The statistic is computed in float32 (float64 for float64 parameters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from truegrad._originals import F  # torch's own ops, also under patch_torch
from truegrad.nn import settings
from truegrad.nn.rules import base
from truegrad.nn.rules.normalization import (
    _channels_statistic,
    _suggested_format,
    _verify_batch_size,
)

__all__ = ["batch_norm", "instance_norm"]


def _batch_norm_forward(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``torch.batch_norm``'s kernel choice: ``(out, save_mean, save_invstd, reserve, impl)``."""
    cudnn = torch.backends.cudnn.enabled
    return torch.ops.aten._batch_norm_impl_index(
        input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn
    )


def _batch_norm_backward(
    impl_index: int,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    save_mean: torch.Tensor,
    save_invstd: torch.Tensor,
    reserve: torch.Tensor,
    training: bool,
    eps: float,
    mask: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward torch's autograd runs for the kernel ``impl_index`` chose."""
    if training and impl_index == 1:  # cuDNN
        dy = grad_output.contiguous(memory_format=_suggested_format(input))
        return torch.ops.aten._batch_norm_impl_index_backward(
            1, input, dy, weight, running_mean, running_var,
            save_mean, save_invstd, True, eps, mask, reserve.clone(),
        )
    if training and impl_index == 2:  # MIOpen
        return torch.ops.aten._batch_norm_impl_index_backward(
            2, input, grad_output.contiguous(), weight, running_mean, running_var,
            save_mean, save_invstd, True, eps, mask, reserve,
        )
    return torch.ops.aten.native_batch_norm_backward(
        grad_output, input, weight, running_mean, running_var,
        save_mean, save_invstd, training, eps, mask,
    )


def _running_invstd(running_var: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.rsqrt(running_var.to(dtype) + eps)


# --------------------------------------------------------------------------- BatchNorm


class BatchNormFunction(base.RuleFunction):
    """``torch.batch_norm`` whose backward also writes ``sum_grad_squared`` of weight and bias."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        granularity: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        return _batch_norm_forward(
            input, weight, bias, running_mean, running_var, training, momentum, eps
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, running_mean, running_var, weight, bias, training, _, eps, granularity = inputs
        _, save_mean, save_invstd, reserve, impl_index = output
        ctx.mark_non_differentiable(save_mean, save_invstd, reserve)
        # The running statistics are read by the backward only in evaluation mode.
        keep = not training
        ctx.save_for_backward(
            input,
            weight,
            running_mean if keep else None,
            running_var if keep else None,
            save_mean,
            save_invstd,
            reserve,
        )
        ctx.impl_index = impl_index
        ctx.training = training
        ctx.eps = eps
        ctx.granularity = granularity
        ctx.weight_param = base.tracked(weight)
        ctx.bias_param = base.tracked(bias)
        base.record_use(ctx.weight_param, ctx)
        base.record_use(ctx.bias_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        input, weight, running_mean, running_var, save_mean, save_invstd, reserve = (
            base.saved(ctx)
        )
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]]
        grad_input, grad_weight, grad_bias = _batch_norm_backward(
            ctx.impl_index, grad_output, input, weight, running_mean, running_var,
            save_mean, save_invstd, reserve, ctx.training, ctx.eps, mask,
        )
        if ctx.weight_param is not None or ctx.bias_param is not None:
            if ctx.training:
                mean, invstd = save_mean, save_invstd
            else:
                ref = ctx.weight_param if ctx.weight_param is not None else ctx.bias_param
                dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
                mean, invstd = running_mean, _running_invstd(running_var, ctx.eps, dtype)
            _channels_statistic(ctx, input, grad_output, mean, invstd)
        return grad_input, None, None, grad_weight, grad_bias, None, None, None, None


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    granularity: settings.Granularity | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` that also writes ``sum_grad_squared``.

    In training mode the batch statistics are used (and the running statistics, if
    given, are updated in place exactly as torch does); ``g_n`` is then the op's own
    per-sample split ``sum_s dy[n,c,s] * x_hat[n,c,s]`` with ``x_hat`` from the batch
    statistics. In evaluation mode ``x_hat`` uses the running statistics.

    Args:
        input: ``(N, C)`` or ``(N, C, *spatial)``; dim 0 indexes samples.
        running_mean, running_var: ``(C,)`` or ``None``.
        weight, bias: ``(C,)`` or ``None``.
        training: use (and update) batch statistics.
        momentum: the running statistics' update factor.
        eps: added to the variance.
        granularity: ``None``, ``"sample"`` or ``"position"`` (every spatial location
            of every sample its own sample; an approximation).

    Returns:
        exactly ``F.batch_norm(...)`` with the same arguments.
    """
    if not base.should_track(weight, bias) or input.numel() == 0:
        return F.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    granularity = settings.resolve_granularity(granularity)
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    return base.apply(
        BatchNormFunction,
        input, running_mean, running_var, weight, bias, training, momentum, eps, granularity
    )[0]


# --------------------------------------------------------------------------- InstanceNorm


def _repeat(t: torch.Tensor | None, times: int) -> torch.Tensor | None:
    return None if t is None else t.repeat(times)


class InstanceNormFunction(base.RuleFunction):
    """``torch.instance_norm`` whose backward also writes ``sum_grad_squared`` of its parameters."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        use_input_stats: bool,
        momentum: float,
        eps: float,
        granularity: str,
    ) -> tuple[torch.Tensor, ...]:
        b, c = input.shape[0], input.shape[1]
        running_mean_ = _repeat(running_mean, b)
        running_var_ = _repeat(running_var, b)
        reshaped = input.contiguous().view(1, b * c, *input.shape[2:])
        out, save_mean, save_invstd, reserve, impl_index = _batch_norm_forward(
            reshaped, _repeat(weight, b), _repeat(bias, b), running_mean_, running_var_,
            use_input_stats, momentum, eps,
        )
        # As torch: after a training step the running statistics become the mean over
        # the batch of the updated per-sample copies; evaluation leaves them untouched.
        if use_input_stats and running_mean_ is not None and running_mean is not None:
            running_mean.copy_(running_mean_.view(b, c).mean(0))
        if use_input_stats and running_var_ is not None and running_var is not None:
            running_var.copy_(running_var_.view(b, c).mean(0))
        empty = input.new_empty(0)
        return (
            out.view(input.shape),
            save_mean,
            save_invstd,
            reserve,
            impl_index,
            empty if running_mean_ is None else running_mean_,
            empty if running_var_ is None else running_var_,
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, _, _, weight, bias, use_input_stats, _, eps, granularity = inputs
        _, save_mean, save_invstd, reserve, impl_index, running_mean_, running_var_ = output
        ctx.mark_non_differentiable(save_mean, save_invstd, reserve, running_mean_, running_var_)
        # The (repeated) running statistics are read by the backward only in evaluation mode.
        keep = not use_input_stats
        ctx.save_for_backward(
            input,
            weight,
            running_mean_ if keep else None,
            running_var_ if keep else None,
            save_mean,
            save_invstd,
            reserve,
        )
        ctx.impl_index = impl_index
        ctx.training = use_input_stats
        ctx.eps = eps
        ctx.granularity = granularity
        ctx.weight_param = base.tracked(weight)
        ctx.bias_param = base.tracked(bias)
        base.record_use(ctx.weight_param, ctx)
        base.record_use(ctx.bias_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        input, weight, running_mean_, running_var_, save_mean, save_invstd, reserve = (
            base.saved(ctx)
        )
        b, c = input.shape[0], input.shape[1]
        shape = (1, b * c, *input.shape[2:])
        # A tracked parameter requires grad, so its per-sample gradients are computed.
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]]
        grad_input, grad_weight_, grad_bias_ = _batch_norm_backward(
            ctx.impl_index,
            grad_output.reshape(shape),
            input.contiguous().view(shape),
            _repeat(weight, b),
            running_mean_,
            running_var_,
            save_mean,
            save_invstd,
            reserve,
            ctx.training,
            ctx.eps,
            mask,
        )
        if grad_input is not None:
            grad_input = grad_input.reshape(input.shape)
        grad_weight = _repeat_backward(grad_weight_, b, c) if ctx.needs_input_grad[3] else None
        grad_bias = _repeat_backward(grad_bias_, b, c) if ctx.needs_input_grad[4] else None
        if ctx.weight_param is not None or ctx.bias_param is not None:
            _instance_statistic(
                ctx, input, grad_output, grad_weight_, grad_bias_,
                running_mean_, running_var_, save_mean, save_invstd,
            )
        return grad_input, None, None, grad_weight, grad_bias, None, None, None, None


def _repeat_backward(grad: torch.Tensor, b: int, c: int) -> torch.Tensor:
    """Autograd's gradient of ``t.repeat(b)`` for ``t`` of shape ``(c,)``."""
    if b == 1:
        return grad.reshape(c)
    return grad.reshape(b, c).sum([0])


def _instance_statistic(
    ctx: Any,
    input: torch.Tensor,
    grad_output: torch.Tensor,
    grad_weight_: torch.Tensor | None,
    grad_bias_: torch.Tensor | None,
    running_mean_: torch.Tensor | None,
    running_var_: torch.Tensor | None,
    save_mean: torch.Tensor,
    save_invstd: torch.Tensor,
) -> None:
    """Statistic of InstanceNorm's weight/bias: per sample, the rows of the repeated
    parameters' gradients; per position (opt-in), ``dy * x_hat`` of every (n, s)."""
    b, c = input.shape[0], input.shape[1]
    spatial = math.prod(input.shape[2:])
    if ctx.granularity == "position" and spatial > 1:
        ref = ctx.weight_param if ctx.weight_param is not None else ctx.bias_param
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        if ctx.training:
            mean, invstd = save_mean, save_invstd
        else:
            mean, invstd = running_mean_, _running_invstd(running_var_, ctx.eps, dtype)
        _channels_statistic(ctx, input, grad_output, mean, invstd)
        return
    # The repeated weight's gradient holds one row of per-channel gradients per sample.
    for param, per_channel in ((ctx.weight_param, grad_weight_), (ctx.bias_param, grad_bias_)):
        if param is None:
            continue
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        per_sample = per_channel.reshape(b, c).to(dtype)
        base.contribute(
            param,
            b,
            lambda s, e, g=per_sample: g[s:e],
            lambda g=per_sample: g.square().sum(0),
            ctx=ctx,
        )


def _verify_spatial_size(size: Sequence[int]) -> None:
    values = 1
    for extent in size[2:]:
        values *= extent
    if values == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {list(size)}"
        )


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    granularity: settings.Granularity | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.instance_norm`` that also writes ``sum_grad_squared``.

    Every (sample, channel) is normalised with its own statistics
    (``use_input_stats=True``) or with the running ones; samples never interact, and
    ``g_n(w)[c] = sum_s dy[n,c,s] * x_hat[n,c,s]``, ``g_n(b)[c] = sum_s dy[n,c,s]``.

    Args:
        input: ``(N, C, *spatial)``; dim 0 indexes samples.
        running_mean, running_var: ``(C,)`` or ``None``; updated in place as torch does.
        weight, bias: ``(C,)`` or ``None``.
        use_input_stats: normalise with each instance's statistics.
        momentum: the running statistics' update factor.
        eps: added to the variance.
        granularity: ``None``, ``"sample"`` or ``"position"`` (every spatial location
            of every sample its own sample; an approximation).

    Returns:
        exactly ``F.instance_norm(...)`` with the same arguments.
    """
    if not base.should_track(weight, bias) or input.numel() == 0:
        return F.instance_norm(
            input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
        )
    granularity = settings.resolve_granularity(granularity)
    if use_input_stats:
        _verify_spatial_size(input.size())
    elif running_mean is None or running_var is None:
        raise RuntimeError(
            "Expected running_mean and running_var to be defined when use_input_stats is false"
        )
    return base.apply(
        InstanceNormFunction,
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, granularity
    )[0]
