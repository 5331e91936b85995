"""LayerNorm, RMSNorm and GroupNorm with the exact per-sample statistic.

Each op normalises groups of elements, ``x_hat = (x - mean) * rstd`` (RMSNorm:
``mean = 0``), and scales/shifts elementwise, ``y = x_hat * w + b``. With ``dy`` the
output gradient, the weight gradient is ``sum dy * x_hat`` and the bias gradient
``sum dy`` over everything the parameter is broadcast over. Sample n's share is the
same sum restricted to sample n (dim 0 of the input):

* LayerNorm / RMSNorm, ``x (N, *, *normalized_shape)``, ``w, b (*normalized_shape)``::

      g_n(w) = sum_t dy[n, t] * x_hat[n, t]        g_n(b) = sum_t dy[n, t]

  over the positions t (the ``*`` dims) of sample n. An input with no dims before
  ``normalized_shape`` is one sample.
* GroupNorm, ``x (N, C, *spatial)``, ``w, b (C,)``::

      g_n(w)[c] = sum_s dy[n, c, s] * x_hat[n, c, s]     g_n(b)[c] = sum_s dy[n, c, s]

The normalisation statistics are torch's own (``native_layer_norm`` returns mean and
rstd, ``native_group_norm`` mean and rstd per (sample, group), ``_fused_rms_norm``
rstd), so nothing is recomputed but ``x_hat`` on the fly. Gradients come from torch's
own backward kernels (``native_layer_norm_backward``, ``native_group_norm_backward``,
``_fused_rms_norm_backward`` where torch's autograd uses it, otherwise the very
sequence of ops with which autograd differentiates torch's composite RMSNorm), so
``p.grad`` is bitwise torch's.

The statistic is computed in float32 (float64 for float64 parameters) from casts;
per-sample intermediates are formed in chunks of samples bounded by
``truegrad.nn.settings.chunk_bytes``. With ``granularity="position"`` every position
(a row of LayerNorm/RMSNorm, a spatial location of GroupNorm) counts as its own
sample: an opt-in approximation.

Autocast: on CPU torch applies no autocast policy to these ops; on devices where it
does (CUDA runs ``layer_norm``, ``group_norm`` and ``rms_norm`` in float32) the same
float32 casts are applied before the op, so the output dtype is torch's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from truegrad._originals import F  # torch's own ops, also under patch_torch
from truegrad.engine.samples import Layout
from truegrad.nn import settings
from truegrad.nn.rules import base

__all__ = ["group_norm", "layer_norm", "rms_norm"]

_Shape = int | Sequence[int] | torch.Size


# --------------------------------------------------------------------------- shared helpers


def _stat_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


#: Working-set size of one step of the elementwise statistic passes: small enough to
#: stay in cache and to reuse the allocator's blocks (large temporaries cost page faults
#: on CPU), never above ``settings.chunk_bytes``.
_STEP_BYTES = 2 * 2**20


def _chunk(bytes_per_item: int) -> int:
    """How many items of ``bytes_per_item`` extra memory one step may work on."""
    return max(1, min(settings.chunk_bytes, _STEP_BYTES) // max(1, bytes_per_item))


def _chunked_cat(
    start: int, stop: int, bytes_per_item: int, fn: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """``fn(a, b)`` over sub-ranges of ``[start, stop)`` within the memory bound, concatenated."""
    step = _chunk(bytes_per_item)
    if stop - start <= step:
        return fn(start, stop)
    return torch.cat([fn(a, min(stop, a + step)) for a in range(start, stop, step)])


def _chunked_sum(
    count: int, bytes_per_item: int, fn: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """``sum_k fn(a_k, b_k)`` over sub-ranges of ``[0, count)`` within the memory bound."""
    step = _chunk(bytes_per_item)
    total = fn(0, min(count, step))
    for a in range(step, count, step):
        total = total + fn(a, min(count, a + step))
    return total


_AUTOCAST_KEYS = {
    "cpu": "AutocastCPU",
    "cuda": "AutocastCUDA",
    "xpu": "AutocastXPU",
    "mps": "AutocastMPS",
}


def _autocast_fp32(op: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Apply the autocast policy that torch applies to ``aten::op`` on these tensors' device.

    Torch's autocast rules for normalisation ops are float32 policies (CUDA:
    ``layer_norm``, ``group_norm``, ``rms_norm``); on CPU there are none. A tensor is
    cast to float32 when it is floating point of lower precision, as autocast does;
    the cast is recorded by autograd outside the rule, exactly as in torch's graph.
    """
    first = tensors[0]
    assert first is not None
    device_type = first.device.type
    key = _AUTOCAST_KEYS.get(device_type)
    if (
        key is None
        or not torch.is_autocast_enabled(device_type)
        or not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)
    ):
        return tensors
    return tuple(
        t.float()
        if t is not None and t.is_floating_point() and t.dtype in (torch.float16, torch.bfloat16)
        and t.device.type == device_type
        else t
        for t in tensors
    )


def _normalized_shape(normalized_shape: _Shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


def _rows_statistic(
    ctx: Any,
    input: torch.Tensor,
    grad_output: torch.Tensor,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    normalized_shape: tuple[int, ...],
) -> None:
    """Statistic of weight/bias of LayerNorm or RMSNorm (``mean=None``).

    Rows are the ``M`` vectors of ``D = prod(normalized_shape)`` elements that are
    normalised, with ``mean``/``rstd`` of shape ``(M, 1)`` after reshaping; sample n owns
    ``T = M / N`` consecutive rows (with ``granularity="position"`` every row is a sample).
    """
    weight_param, bias_param = ctx.weight_param, ctx.bias_param
    ref = weight_param if weight_param is not None else bias_param
    sdt = _stat_dtype(ref.dtype)
    if ctx.granularity != "position":
        trailing = len(normalized_shape)
        input, grad_output, rstd = base.sample_major(ctx.samples, trailing, input, grad_output, rstd)
        if mean is not None:
            (mean,) = base.sample_major(ctx.samples, trailing, mean)
    d = math.prod(normalized_shape)
    rows = input.numel() // d if d else 0
    x2 = input.reshape(rows, d)
    dy2 = grad_output.reshape(rows, d)
    mean2 = None if mean is None else mean.reshape(rows, 1)
    rstd2 = rstd.reshape(rows, 1)
    if ctx.granularity == "position":
        units, per_unit = rows, 1
    else:
        units = 1 if input.dim() == len(normalized_shape) else input.shape[0]
        per_unit = rows // units if units else 0
    row_bytes = d * max(1, torch.finfo(sdt).bits // 8) * 2

    def weight_rows(r0: int, r1: int) -> torch.Tensor:
        """``dy * x_hat`` of rows ``r0:r1``, a fresh tensor."""
        x = x2[r0:r1].to(sdt)
        if mean2 is not None:
            x_hat = torch.sub(x, mean2[r0:r1].to(sdt)).mul_(rstd2[r0:r1])
        else:
            x_hat = torch.mul(x, rstd2[r0:r1].to(sdt))
        return x_hat.mul_(dy2[r0:r1])

    def bias_rows(r0: int, r1: int) -> torch.Tensor:
        """``dy`` of rows ``r0:r1`` (may alias ``grad_output``: never modified in place)."""
        return dy2[r0:r1].to(sdt)

    uses = ((weight_param, weight_rows, True), (bias_param, bias_rows, False))
    for param, rows_fn, fresh in uses:
        if param is None:
            continue

        def per_sample(s: int, e: int, rows_fn: Callable = rows_fn) -> torch.Tensor:
            def summed(a: int, b: int) -> torch.Tensor:
                return rows_fn(a * per_unit, b * per_unit).reshape(b - a, per_unit, d).sum(1)

            sums = _chunked_cat(s, e, per_unit * row_bytes, summed)
            return sums.reshape(e - s, *normalized_shape)

        squared = None
        if per_unit == 1:  # one row per sample: square the rows directly

            def squared(rows_fn: Callable = rows_fn, fresh: bool = fresh) -> torch.Tensor:
                def part(a: int, b: int) -> torch.Tensor:
                    terms = rows_fn(a, b)
                    return (terms.square_() if fresh else terms.square()).sum(0)

                return _chunked_sum(units, row_bytes, part).reshape(normalized_shape)

        base.contribute(param, units, per_sample, squared, ctx=ctx)


def _channels_statistic(
    ctx: Any,
    input: torch.Tensor,
    grad_output: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> None:
    """Statistic of per-channel weight/bias (GroupNorm, BatchNorm, InstanceNorm).

    ``input``/``grad_output`` are ``(N, C, *spatial)``; ``mean`` and ``rstd`` become
    ``(N, C)`` by ``reshape(-1, C)`` and broadcasting (per channel ``(C,)``, or per
    sample and channel ``(N, C)`` or ``(N * C,)``). Per sample,
    ``g_n(w)[c] = rstd[n,c] * sum_s dy[n,c,s] * (x[n,c,s] - mean[n,c])`` (centred before
    the product, so no cancellation) and ``g_n(b)[c] = sum_s dy[n,c,s]``; with
    ``ctx.granularity == "position"`` every (n, s) is its own sample.
    """
    weight_param, bias_param = ctx.weight_param, ctx.bias_param
    ref = weight_param if weight_param is not None else bias_param
    if ref is None:
        return
    sdt = _stat_dtype(ref.dtype)
    n, c = input.shape[0], input.shape[1]
    x3 = input.reshape(n, c, -1)
    dy3 = grad_output.reshape(n, c, -1)
    spatial = x3.shape[2]
    mean_nc = mean.reshape(-1, c).expand(n, c).to(sdt)
    rstd_nc = rstd.reshape(-1, c).expand(n, c).to(sdt)
    sample_bytes = c * spatial * max(1, torch.finfo(sdt).bits // 8) * 2

    def weight_terms(a: int, b: int) -> torch.Tensor:
        """``dy * (x - mean)`` of samples ``a:b``, a fresh tensor (``rstd`` not applied)."""
        return torch.sub(x3[a:b].to(sdt), mean_nc[a:b, :, None]).mul_(dy3[a:b])

    def bias_terms(a: int, b: int) -> torch.Tensor:
        """``dy`` of samples ``a:b`` (may alias ``grad_output``: never modified in place)."""
        return dy3[a:b].to(sdt)

    if ctx.granularity == "position" and spatial > 1:
        for param, terms in ((weight_param, weight_terms), (bias_param, bias_terms)):
            if param is None:
                continue
            scaled = param is weight_param

            def products(
                a: int, b: int, terms: Callable = terms, scaled: bool = scaled
            ) -> torch.Tensor:
                t = terms(a, b)
                return t.mul_(rstd_nc[a:b, :, None]) if scaled else t

            def per_position(s: int, e: int, products: Callable = products) -> torch.Tensor:
                a, b = s // spatial, (e - 1) // spatial + 1  # positions (n, s) in row-major order
                rows = products(a, b).transpose(1, 2).reshape(-1, c)
                return rows[s - a * spatial : e - a * spatial]

            def squared(products: Callable = products) -> torch.Tensor:
                def part(a: int, b: int) -> torch.Tensor:
                    return products(a, b).square().sum((0, 2))

                return _chunked_sum(n, sample_bytes, part)

            base.contribute(param, n * spatial, per_position, squared, ctx=ctx)
        return

    for param, terms in ((weight_param, weight_terms), (bias_param, bias_terms)):
        if param is None:
            continue
        per_sample = _chunked_cat(0, n, sample_bytes, lambda a, b, terms=terms: terms(a, b).sum(2))
        if param is weight_param:
            per_sample = per_sample.mul_(rstd_nc)
        base.contribute(
            param,
            n,
            lambda s, e, g=per_sample: g[s:e],
            lambda g=per_sample: g.square().sum(0),
            ctx=ctx,
        )


# --------------------------------------------------------------------------- LayerNorm


class LayerNormFunction(base.RuleFunction):
    """``native_layer_norm`` whose backward also writes ``sum_grad_squared`` of weight and bias."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: torch.Tensor,
        normalized_shape: tuple[int, ...],
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        granularity: str,
        samples: Layout | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.aten.native_layer_norm(input, list(normalized_shape), weight, bias, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, normalized_shape, weight, bias, _, granularity, samples = inputs
        ctx.samples = samples
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        ctx.normalized_shape = normalized_shape
        ctx.granularity = granularity
        ctx.weight_param = base.tracked(weight)
        ctx.bias_param = base.tracked(bias)
        base.record_use(ctx.weight_param, ctx)
        base.record_use(ctx.bias_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias, mean, rstd = base.saved(ctx)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
            grad_output, input, list(ctx.normalized_shape), mean, rstd, weight, bias, mask
        )
        if ctx.weight_param is not None or ctx.bias_param is not None:
            _rows_statistic(ctx, input, grad_output, mean, rstd, ctx.normalized_shape)
        return grad_input, None, grad_weight, grad_bias, None, None, None


def layer_norm(
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    granularity: settings.Granularity | None = None,
    samples: Layout | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.layer_norm`` that also writes ``sum_grad_squared``.

    Args:
        input: ``(N, *, *normalized_shape)``; dim 0 indexes samples (an input of
            exactly ``normalized_shape`` is one sample).
        normalized_shape: the trailing shape normalised over.
        weight, bias: ``normalized_shape`` or ``None``.
        eps: added to the variance.
        granularity: ``None`` (the process-wide setting), ``"sample"`` (exact) or
            ``"position"`` (per-position approximation, opt-in).

    Returns:
        exactly ``F.layer_norm(input, normalized_shape, weight, bias, eps)``.
    """
    if not base.should_track(weight, bias):
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    granularity = settings.resolve_granularity(granularity)
    input, weight, bias = _autocast_fp32("layer_norm", input, weight, bias)
    shape = _normalized_shape(normalized_shape)
    return base.apply(LayerNormFunction, input, shape, weight, bias, eps, granularity, samples)[0]


# --------------------------------------------------------------------------- RMSNorm


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return {torch.float16: torch.float32, torch.bfloat16: torch.float32}.get(dtype, dtype)


_FUSED_RMS: dict[tuple, bool] = {}


def _channels_last(input: torch.Tensor) -> bool:
    if input.dim() == 4:
        return input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    if input.dim() == 5:
        channels_last = input.is_contiguous(memory_format=torch.channels_last_3d)
        return channels_last and not input.is_contiguous()
    return False


def _uses_fused_rms(input: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether torch's autograd differentiates ``rms_norm`` here with ``_fused_rms_norm_backward``
    (a device kernel) rather than through its composite ops. Probed once per device and dtypes."""
    if _channels_last(input) or input.is_complex():
        return False
    if weight is not None and weight.dtype != input.dtype:
        return False
    key = (input.device.type, input.dtype)
    if key not in _FUSED_RMS:
        no_autocast = (
            torch.autocast(input.device.type, enabled=False)
            if input.device.type in _AUTOCAST_KEYS
            else contextlib.nullcontext()
        )
        with torch.enable_grad(), no_autocast:
            probe = torch.ones(2, 2, device=input.device, dtype=input.dtype, requires_grad=True)
            out = torch.rms_norm(probe, [2], torch.ones(2, device=input.device, dtype=input.dtype))
        _FUSED_RMS[key] = type(out.grad_fn).__name__.startswith("FusedRmsNorm")
    return _FUSED_RMS[key]


def _rms_composite_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    normalized_shape: tuple[int, ...],
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients autograd computes through torch's composite RMSNorm
    ``((x.to(opmath) * rsqrt(mean(x**2) + eps)) * w).type_as(x)``, op for op."""
    nd = len(normalized_shape)
    inner = tuple(range(input.dim() - nd, input.dim()))
    outer = tuple(range(input.dim() - nd))
    up = input.to(_opmath(input.dtype))
    xr = up * rstd
    grad_input = grad_weight = None
    if weight is not None:
        g = grad_output.to(torch.promote_types(xr.dtype, weight.dtype))
        if mask[1]:
            gw = g * xr
            grad_weight = (gw.sum(outer) if outer else gw).to(weight.dtype)
        gxr = (g * weight).to(xr.dtype)
    else:
        gxr = grad_output.to(xr.dtype)
    if mask[0]:
        grad_up = gxr * rstd
        grad_r = (gxr * up).sum(inner, keepdim=True)
        grad_m = (grad_r * -0.5) * rstd.pow(3)
        grad_sq = grad_m / math.prod(normalized_shape)
        grad_input = (grad_up + grad_sq * (up * 2.0)).to(input.dtype)
    return grad_input, grad_weight


class RMSNormFunction(base.RuleFunction):
    """``_fused_rms_norm`` whose backward also writes ``sum_grad_squared`` of the weight."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: torch.Tensor,
        normalized_shape: tuple[int, ...],
        weight: torch.Tensor,
        eps: float | None,
        fused: bool,
        granularity: str,
        samples: Layout | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.aten._fused_rms_norm(input, list(normalized_shape), weight, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, normalized_shape, weight, _, fused, granularity, samples = inputs
        ctx.samples = samples
        _, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(input, weight, rstd)
        ctx.normalized_shape = normalized_shape
        ctx.fused = fused
        ctx.granularity = granularity
        ctx.weight_param = base.tracked(weight)
        ctx.bias_param = None
        base.record_use(ctx.weight_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        input, weight, rstd = base.saved(ctx)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2]]
        if ctx.fused:
            grad_input, grad_weight = torch.ops.aten._fused_rms_norm_backward(
                grad_output, input, list(ctx.normalized_shape), rstd, weight, mask
            )
        else:
            grad_input, grad_weight = _rms_composite_backward(
                grad_output, input, ctx.normalized_shape, rstd, weight, mask
            )
        if ctx.weight_param is not None:
            _rows_statistic(ctx, input, grad_output, None, rstd, ctx.normalized_shape)
        return grad_input, None, grad_weight, None, None, None, None


def rms_norm(
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    granularity: settings.Granularity | None = None,
    samples: Layout | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.rms_norm`` that also writes ``weight.sum_grad_squared``.

    ``y = x * rsqrt(mean(x**2) + eps) * w`` over the trailing ``normalized_shape``;
    ``eps=None`` uses the machine epsilon of the computation dtype (float32 for
    float16/bfloat16 input), as torch does.

    Args:
        input: ``(N, *, *normalized_shape)``; dim 0 indexes samples.
        normalized_shape: the trailing shape normalised over.
        weight: ``normalized_shape`` or ``None``.
        eps: see above.
        granularity: ``None``, ``"sample"`` or ``"position"`` (see :func:`layer_norm`).

    Returns:
        exactly ``F.rms_norm(input, normalized_shape, weight, eps)``.
    """
    if not base.should_track(weight):
        return F.rms_norm(input, normalized_shape, weight, eps)
    granularity = settings.resolve_granularity(granularity)
    input, weight = _autocast_fp32("rms_norm", input, weight)
    assert input is not None and weight is not None
    shape = _normalized_shape(normalized_shape)
    fused = _uses_fused_rms(input, weight)
    return base.apply(RMSNormFunction, input, shape, weight, eps, fused, granularity, samples)[0]


# --------------------------------------------------------------------------- GroupNorm


def _suggested_format(input: torch.Tensor) -> torch.memory_format:
    if _channels_last(input):
        return torch.channels_last if input.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


class GroupNormFunction(base.RuleFunction):
    """``native_group_norm`` whose backward also writes ``sum_grad_squared`` of weight and bias."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: torch.Tensor,
        num_groups: int,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        granularity: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c = input.shape[0], input.shape[1]
        hxw = math.prod(input.shape[2:])
        return torch.ops.aten.native_group_norm(input, weight, bias, n, c, hxw, num_groups, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, num_groups, weight, bias, _, granularity = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(input, weight, mean, rstd)
        ctx.num_groups = num_groups
        ctx.granularity = granularity
        ctx.weight_param = base.tracked(weight)
        ctx.bias_param = base.tracked(bias)
        base.record_use(ctx.weight_param, ctx)
        base.record_use(ctx.bias_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        input, weight, mean, rstd = base.saved(ctx)
        n, c = input.shape[0], input.shape[1]
        hxw = math.prod(input.shape[2:])
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        if input.device.type == "cpu":
            fmt = _suggested_format(input)
            dy, x = grad_output.contiguous(memory_format=fmt), input.contiguous(memory_format=fmt)
        elif input.device.type == "xpu":
            dy, x = grad_output, input
        else:
            dy, x = grad_output.contiguous(), input.contiguous()
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
            dy, x, mean, rstd, weight, n, c, hxw, ctx.num_groups, mask
        )
        if ctx.weight_param is not None or ctx.bias_param is not None:
            per_group = c // ctx.num_groups
            _channels_statistic(
                ctx,
                input,
                grad_output,
                mean.repeat_interleave(per_group, dim=1),
                rstd.repeat_interleave(per_group, dim=1),
            )
        return grad_input, None, grad_weight, grad_bias, None, None


def _verify_batch_size(size: Sequence[int]) -> None:
    values = size[0]
    for extent in size[2:]:
        values *= extent
    if values == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(size)}"
        )


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    granularity: settings.Granularity | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.group_norm`` that also writes ``sum_grad_squared``.

    Args:
        input: ``(N, C, *spatial)``; dim 0 indexes samples.
        num_groups: groups the ``C`` channels are split into.
        weight, bias: ``(C,)`` or ``None``.
        eps: added to the variance.
        granularity: ``None``, ``"sample"`` or ``"position"`` (every spatial location
            of every sample its own sample; an approximation).

    Returns:
        exactly ``F.group_norm(input, num_groups, weight, bias, eps)``.
    """
    if not base.should_track(weight, bias) or input.dim() < 2 or input.numel() == 0:
        return F.group_norm(input, num_groups, weight, bias, eps)
    granularity = settings.resolve_granularity(granularity)
    _verify_batch_size([input.size(0) * input.size(1) // num_groups, num_groups, *input.size()[2:]])
    input, weight, bias = _autocast_fp32("group_norm", input, weight, bias)
    assert input is not None
    # As torch's ``group_norm``: the kernel wants input contiguous in its memory format.
    fmt = _suggested_format(input) if input.device.type == "cpu" else torch.contiguous_format
    input = input.contiguous(memory_format=fmt)
    return base.apply(GroupNormFunction, input, num_groups, weight, bias, eps, granularity)[0]
