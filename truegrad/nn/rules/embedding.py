"""Embedding and EmbeddingBag: table look-ups with the exact per-sample statistic.

Embedding. Shapes: ids ``x (N, *)`` (integers; a 0-D id is one sample), weight
``W (V, D)``, output ``y (N, *, D)``. With ``dy`` the output gradient, sample n
contributes to row v

    g_n[v] = sum over positions t of sample n with x[n, t] == v of s[v] * dy[n, t]   (D,)

where ``s[v] = 1 / count(v)`` with ``scale_grad_by_freq`` (count over the whole batch, as
torch's backward divides) and ``1`` otherwise; the ``padding_idx`` row gets nothing.
The weight gradient is sparse in v, so ``sum_n g_n**2`` is formed without any
``(N, V, D)`` tensor: the entries ``(n, x[n, t])`` are grouped by the key ``n * V + x``
(one sort, no host synchronisation), the ``dy`` rows of each group are summed, squared
and added into a ``(V, D)`` accumulator by row. That costs what the gradient costs,
``O(N T D)`` plus a sort of the ``N T`` keys. The dense per-sample gradients ``(c, V, D)``
are formed only for a parameter used twice in one forward (tied input/output
embeddings), where :func:`truegrad.nn.rules.base.contribute` needs them.

EmbeddingBag. Ids are grouped into bags (the rows of a 2-D ``x (B, L)``, or the segments
of a 1-D ``x`` given by ``offsets``); the output ``y (B, D)`` reduces each bag, and **each
bag is one sample**. For ``mode="sum"``/``"mean"`` index i of bag b contributes
``c_i * dy[b]`` to row ``x[i]``, with ``c_i`` = ``per_sample_weights[i]`` (sum) or ``1``,
divided by the bag's size (mean, padding excluded) and by torch's frequency factor
(``scale_grad_by_freq``); the same grouping by ``b * V + x[i]`` gives the statistic.
For ``mode="max"`` column d of bag b goes to one row only (the arg-max
``max_indices[b, d]``), so ``sum_b g_b**2`` is a scatter-add of ``dy**2``.

Gradients are computed with torch's own backward kernels
(``embedding_dense_backward``, ``_embedding_bag_backward``,
``_embedding_bag_per_sample_weights_backward``) from what torch's forward returns, so
``p.grad`` and the ``per_sample_weights`` gradient are bitwise torch's. ``max_norm``
renormalises the weight in place in forward, exactly as ``torch.nn.functional`` does.
Sparse gradients (``sparse=True``) are not supported.
"""

from __future__ import annotations

from typing import Any

import torch

from truegrad._originals import F  # torch's own ops, also under patch_torch
from truegrad.engine.samples import Layout
from truegrad.nn import settings
from truegrad.nn.rules import base

__all__ = ["embedding", "embedding_bag"]

#: Message of the error raised for ``sparse=True`` (modules, functionals, conversion).
SPARSE_UNSUPPORTED = (
    "truegrad does not support sparse=True (sparse gradients) for embeddings: "
    "construct the layer with sparse=False (dense gradients) to get sum_grad_squared"
)

_MODES = {"sum": 0, "mean": 1, "max": 2}
_MODE_MAX = 2
_MODE_MEAN = 1


# --------------------------------------------------------------------------- grouping


def _grouped_squares(
    sample: torch.Tensor, row: torch.Tensor, values: torch.Tensor, num_rows: int
) -> torch.Tensor:
    """``out[v] = sum_n (sum_{i: sample_i = n, row_i = v} values_i) ** 2``, shape ``(V, D)``.

    Entries are grouped by the key ``sample * V + row`` with one sort (no host sync):
    the values of a group are summed (the per-sample gradient's non-zero rows), squared,
    and added to their row.

    Args:
        sample: ``(E,)`` int64, the sample of each entry.
        row: ``(E,)`` int64, the table row of each entry.
        values: ``(E, D)`` the gradient each entry adds to its row.
        num_rows: V.
    """
    keys = sample * num_rows + row
    sorted_keys, order = torch.sort(keys)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_sorted = starts.cumsum(0) - 1  # group id of the sorted entries, in [0, E)
    group = torch.empty_like(group_sorted).scatter_(0, order, group_sorted)
    sums = torch.zeros_like(values).index_add_(0, group, values)
    # Row of each group (groups never formed keep row 0 and a zero sum).
    group_row = torch.zeros_like(group_sorted).scatter_(0, group_sorted, sorted_keys % num_rows)
    out = values.new_zeros(num_rows, values.shape[1])
    return out.index_add_(0, group_row, sums.square())


def _dense_per_sample(
    sample: torch.Tensor,
    row: torch.Tensor,
    values: torch.Tensor,
    num_rows: int,
    start: int,
    stop: int,
) -> torch.Tensor:
    """Dense per-sample gradients ``(stop - start, V, D)`` of samples ``start:stop``.

    Entries of other samples are routed to a scratch row that is dropped.
    """
    count = stop - start
    local = sample - start
    inside = (local >= 0) & (local < count)
    flat = torch.where(inside, local * num_rows + row, count * num_rows)
    out = values.new_zeros(count * num_rows + 1, values.shape[1]).index_add_(0, flat, values)
    return out[:-1].view(count, num_rows, values.shape[1])


# --------------------------------------------------------------------------- embedding


class EmbeddingFunction(base.RuleFunction):
    """``torch.embedding`` whose backward also writes ``weight.sum_grad_squared``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: torch.Tensor,
        weight: torch.Tensor,
        padding_idx: int,
        scale_grad_by_freq: bool,
        granularity: str,
        samples: Layout | None,
    ) -> torch.Tensor:
        return torch.embedding(weight, input, padding_idx, scale_grad_by_freq, False)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        input, weight, padding_idx, scale_grad_by_freq, granularity, samples = inputs
        ctx.samples = samples
        ctx.save_for_backward(input)
        ctx.num_weights = weight.shape[0]
        ctx.weight_dtype = weight.dtype
        ctx.padding_idx = padding_idx
        ctx.scale_grad_by_freq = scale_grad_by_freq
        ctx.granularity = granularity
        ctx.weight_param = base.tracked(weight)
        base.record_use(ctx.weight_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (input,) = base.saved(ctx)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.embedding_dense_backward(
                grad_output, input, ctx.num_weights, ctx.padding_idx, ctx.scale_grad_by_freq
            ).to(ctx.weight_dtype)
        if ctx.weight_param is not None:
            _embedding_statistic(ctx, input, grad_output)
        return None, grad_weight, None, None, None, None


def _embedding_statistic(ctx: Any, input: torch.Tensor, grad_output: torch.Tensor) -> None:
    sdt = torch.float64 if ctx.weight_dtype == torch.float64 else torch.float32
    num_rows = ctx.num_weights
    dim = grad_output.shape[-1]
    if ctx.granularity != "position":
        (input,) = base.sample_major(ctx.samples, 0, input)
        (grad_output,) = base.sample_major(ctx.samples, 1, grad_output)
    ids = input.reshape(-1).long()
    values = grad_output.reshape(-1, dim).to(sdt)
    coef = None
    if ctx.scale_grad_by_freq:
        counts = torch.zeros(num_rows, dtype=sdt, device=ids.device)
        counts.index_add_(0, ids, torch.ones_like(ids, dtype=sdt))
        coef = counts.reciprocal()[ids]
    if ctx.padding_idx >= 0:
        keep = (ids != ctx.padding_idx).to(sdt)
        coef = keep if coef is None else coef * keep
    if coef is not None:
        values = values * coef[:, None]

    if input.dim() <= 1 or ctx.granularity == "position":
        # One position per sample: the per-sample gradient is a single row.
        n = ids.numel()
        base.contribute(
            ctx.weight_param,
            n,
            lambda s, e: _dense_per_sample(
                torch.arange(e - s, device=ids.device), ids[s:e], values[s:e], num_rows, 0, e - s
            ),
            lambda: values.new_zeros(num_rows, dim).index_add_(0, ids, values.square()),
            ctx=ctx,
        )
        return
    n = input.shape[0]
    per = ids.numel() // max(n, 1)  # positions per sample; samples s:e are entries s*per:e*per
    sample = torch.arange(ids.numel(), device=ids.device) // max(per, 1)

    def per_sample(s: int, e: int) -> torch.Tensor:
        part = slice(s * per, e * per)
        return _dense_per_sample(sample[part], ids[part], values[part], num_rows, s, e)

    def accumulate(pending: torch.Tensor) -> None:
        """Each entry's row added to its sample's slice of ``pending (n, V, D)``."""
        flat = pending.view(n * num_rows, dim)
        flat.index_add_(0, sample * num_rows + ids, values.to(flat.dtype))

    base.contribute(
        ctx.weight_param,
        n,
        per_sample,
        lambda: _grouped_squares(sample, ids, values, num_rows),
        ctx=ctx,
        accumulate=accumulate,
    )


def embedding(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
    *,
    granularity: settings.Granularity | None = None,
    samples: Layout | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.embedding`` that also writes ``weight.sum_grad_squared``.

    Args:
        input: integer ids ``(N, *)``; dim 0 indexes samples (a 0-D id is one sample).
        weight: ``(V, D)``.
        padding_idx: row that gets no gradient (and no statistic); may be negative.
        max_norm: renormalise the looked-up rows in place (under ``no_grad``) to this norm.
        norm_type: the p of the p-norm of ``max_norm``.
        scale_grad_by_freq: divide row v's gradient by the count of v in the batch.
        sparse: must be ``False`` when ``weight`` is tracked.
        granularity: ``None`` (the process-wide setting), ``"sample"`` (exact) or
            ``"position"`` (every id its own sample; opt-in approximation).
        samples: where the model's samples are in ``input`` (set by the engine), ``None``:
            dim 0.

    Returns:
        ``(N, *, D)``, exactly ``F.embedding(input, weight, ...)``.

    Raises:
        ValueError: ``sparse=True`` with a tracked weight.
    """
    if not base.should_track(weight):
        return F.embedding(
            input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse
        )
    if sparse:
        raise ValueError(SPARSE_UNSUPPORTED)
    granularity = settings.resolve_granularity(granularity)
    if padding_idx is not None:
        if not -weight.size(0) <= padding_idx < weight.size(0):
            raise AssertionError("Padding_idx must be within num_embeddings")
        if padding_idx < 0:
            padding_idx = weight.size(0) + padding_idx
    else:
        padding_idx = -1
    if max_norm is not None:
        input = input.contiguous()
        with torch.no_grad():
            torch.embedding_renorm_(weight.detach(), input, max_norm, norm_type)
    return base.apply(
        EmbeddingFunction, input, weight, padding_idx, scale_grad_by_freq, granularity, samples
    )


# --------------------------------------------------------------------------- embedding bag


class EmbeddingBagFunction(base.RuleFunction):
    """``torch.embedding_bag`` whose backward also writes ``weight.sum_grad_squared``.

    Returns torch's four outputs ``(output, offset2bag, bag_size, max_indices)``; only the
    first is differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: torch.Tensor,
        weight: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: torch.Tensor | None,
        scale_grad_by_freq: bool,
        mode: int,
        include_last_offset: bool,
        padding_idx: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.embedding_bag(
            weight,
            input,
            offsets,
            scale_grad_by_freq,
            mode,
            False,
            per_sample_weights,
            include_last_offset,
            padding_idx,
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, outputs: tuple) -> None:
        input, weight, offsets, per_sample_weights, scale_grad_by_freq, mode = inputs[:6]
        padding_idx = inputs[7]
        output, offset2bag, bag_size, max_indices = outputs
        ctx.mark_non_differentiable(offset2bag, bag_size, max_indices)
        input, offsets = input.contiguous(), offsets.contiguous()
        # The table is needed for the per_sample_weights gradient only (as in torch).
        psw_grad = per_sample_weights is not None and per_sample_weights.requires_grad
        ctx.save_for_backward(
            input, offsets, offset2bag, bag_size, max_indices, per_sample_weights,
            weight if psw_grad else None,
        )
        ctx.num_weights = weight.shape[0]
        ctx.weight_dtype = weight.dtype
        ctx.psw_dtype = None if per_sample_weights is None else per_sample_weights.dtype
        ctx.scale_grad_by_freq = scale_grad_by_freq
        ctx.mode = mode
        if padding_idx is None:
            padding_idx = -1
        elif padding_idx < 0:
            padding_idx += weight.shape[0]
        ctx.padding_idx = padding_idx
        ctx.weight_param = base.tracked(weight)
        base.record_use(ctx.weight_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        input, offsets, offset2bag, bag_size, max_indices, psw, weight = base.saved(ctx)
        grad_weight = grad_psw = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten._embedding_bag_backward(
                grad_output, input, offsets, offset2bag, bag_size, max_indices, ctx.num_weights,
                ctx.scale_grad_by_freq, ctx.mode, False, psw, ctx.padding_idx,
            ).to(ctx.weight_dtype)
        if ctx.needs_input_grad[3]:
            grad_psw = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_output, weight.to(grad_output.dtype), input, offsets, offset2bag, ctx.mode,
                ctx.padding_idx,
            ).to(ctx.psw_dtype)
        if ctx.weight_param is not None:
            _bag_statistic(ctx, grad_output, input, offsets, offset2bag, bag_size, max_indices, psw)
        return None, grad_weight, None, grad_psw, None, None, None, None


def _offset2bag(offsets: torch.Tensor, num_indices: int) -> torch.Tensor:
    """Bag of every index, built from ``offsets`` as torch's backward builds it."""
    marks = torch.zeros(num_indices + 1, dtype=torch.long, device=offsets.device)
    marks.index_add_(0, offsets.long(), torch.ones_like(offsets, dtype=torch.long))
    marks[0] -= 1
    return marks.cumsum(0)[:num_indices]


def _bag_statistic(
    ctx: Any,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    offsets: torch.Tensor,
    offset2bag: torch.Tensor,
    bag_size: torch.Tensor,
    max_indices: torch.Tensor,
    psw: torch.Tensor | None,
) -> None:
    sdt = torch.float64 if ctx.weight_dtype == torch.float64 else torch.float32
    num_rows = ctx.num_weights
    n_bags, dim = grad_output.shape
    dy = grad_output.to(sdt)
    if ctx.mode == _MODE_MAX:
        # Column d of bag b reaches row max_indices[b, d] only; empty bags reach nothing.
        dy = dy * (bag_size != 0).to(sdt)[:, None]
        arg = max_indices.long()
        base.contribute(
            ctx.weight_param,
            n_bags,
            lambda s, e: dy.new_zeros(e - s, num_rows, dim).scatter_add_(
                1, arg[s:e, None, :], dy[s:e, None, :]
            ),
            lambda: dy.new_zeros(num_rows, dim).scatter_add_(0, arg, dy.square()),
            ctx=ctx,
        )
        return

    ids = input.long()
    if ids.numel() != 0 and offset2bag.numel() == 0:  # torch's sum fast path returns none
        bag = _offset2bag(offsets, ids.numel())
    else:
        bag = offset2bag.long()
    # Guard malformed offsets (indices past the last bag) against out-of-range rows.
    valid = bag < n_bags
    bag = bag.clamp(max=max(n_bags - 1, 0))
    coef = valid.to(sdt) if psw is None else psw.to(sdt) * valid
    if ctx.padding_idx >= 0:
        coef = coef * (ids != ctx.padding_idx)
    if ctx.mode == _MODE_MEAN:
        size = bag_size.to(sdt)
        coef = coef / torch.where(size != 0, size, torch.ones_like(size))[bag]
    if ctx.scale_grad_by_freq:
        saved = (input, offsets, offset2bag, bag_size, max_indices)
        coef = coef * _frequency_factor(saved, n_bags, num_rows, ctx.padding_idx, sdt)[ids]
    values = dy[bag] * coef[:, None]
    base.contribute(
        ctx.weight_param,
        n_bags,
        lambda s, e: _dense_per_sample(bag, ids, values, num_rows, s, e),
        lambda: _grouped_squares(bag, ids, values, num_rows),
        ctx=ctx,
    )


def _frequency_factor(
    saved: tuple[torch.Tensor, ...],
    n_bags: int,
    num_rows: int,
    padding_idx: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The factor ``(V,)`` by which torch's ``scale_grad_by_freq`` scales each row's gradient.

    Taken from torch's own kernel (one backward of unit gradients of width 1) rather than
    assumed: ``1 / count(v)`` on CUDA, while the CPU kernel of torch 2.x divides the
    entries of the i-th distinct row by the count of the i-th *sorted* index instead.
    Either way it is one factor per row, which is all that ``sum_n g_n == p.grad`` needs.
    """
    input = saved[0]
    ids = input.long()
    ones = torch.ones(n_bags, 1, dtype=dtype, device=input.device)
    # mode 0 (sum), no per_sample_weights: each entry adds its row's factor once.
    scaled = torch.ops.aten._embedding_bag_backward(
        ones, *saved, num_rows, True, 0, False, None, padding_idx
    )[:, 0]
    counts = torch.zeros(num_rows, dtype=dtype, device=input.device)
    counts.index_add_(0, ids, torch.ones_like(ids, dtype=dtype))
    return scaled / counts.clamp(min=1)


def embedding_bag(
    input: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.embedding_bag`` that also writes ``weight.sum_grad_squared``.

    Each bag (a row of a 2-D ``input``, or a segment of a 1-D ``input`` given by
    ``offsets``) is one sample. ``per_sample_weights`` (an input, not a parameter) gets
    its gradient as in torch and no statistic.

    Args:
        input: ``(B, L)`` or ``(E,)`` integer ids.
        weight: ``(V, D)``.
        offsets: ``(B,)`` (``(B + 1,)`` with ``include_last_offset``) for a 1-D ``input``.
        max_norm, norm_type, scale_grad_by_freq, mode, per_sample_weights,
            include_last_offset, padding_idx: as in torch.
        sparse: must be ``False`` when ``weight`` is tracked.

    Returns:
        ``(B, D)``, exactly ``F.embedding_bag(input, weight, ...)``.

    Raises:
        ValueError: ``sparse=True`` with a tracked weight, and torch's own argument errors.
    """
    if not base.should_track(weight):
        return F.embedding_bag(
            input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
            per_sample_weights, include_last_offset, padding_idx,
        )
    if sparse:
        raise ValueError(SPARSE_UNSUPPORTED)
    if per_sample_weights is not None and input.size() != per_sample_weights.size():
        raise ValueError(
            f"embedding_bag: If per_sample_weights ({per_sample_weights.shape}) is not None, "
            f"then it must have the same shape as the input ({input.shape})"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"weight has to be a 2D Tensor, but got Tensor of dimension {weight.dim()}"
        )
    if input.dim() == 2 and input.is_nested:
        include_last_offset = True
        offsets = input.offsets()
        input = input.values().reshape(-1)
        if per_sample_weights is not None:
            if not per_sample_weights.is_nested:
                raise ValueError(
                    "If input is nested, then per_sample_weights must be nested if specified"
                )
            per_sample_weights = per_sample_weights.values().reshape(-1)
    elif input.dim() == 2:
        if offsets is not None:
            raise ValueError(
                "if input is 2D, then offsets has to be None, as input is treated is a mini-batch "
                f"of fixed length sequences. However, found offsets of type {type(offsets)}"
            )
        offsets = torch.arange(
            0, input.numel(), input.size(1), dtype=input.dtype, device=input.device
        )
        include_last_offset = False
        input = input.reshape(-1)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets has to be a 1D Tensor but got None")
        if offsets.dim() != 1:
            raise ValueError("offsets has to be a 1D Tensor")
    else:
        raise ValueError(
            f"input has to be 1D or 2D Tensor, but got Tensor of dimension {input.dim()}"
        )
    if mode not in _MODES:
        raise ValueError("mode has to be one of sum, mean or max")
    if mode == "max" and scale_grad_by_freq:
        raise ValueError("max mode does not support scaling the gradient by the frequency")
    if max_norm is not None:
        with torch.no_grad():
            torch.embedding_renorm_(weight.detach(), input, max_norm, norm_type)
    if per_sample_weights is not None and mode != "sum":
        raise NotImplementedError(
            "embedding_bag: per_sample_weights was not None. per_sample_weights is only supported "
            f"for mode='sum' (got mode='{mode}'). Please open a feature request on GitHub."
        )
    output, *_ = base.apply(
        EmbeddingBagFunction,
        input, weight, offsets, per_sample_weights, scale_grad_by_freq, _MODES[mode],
        include_last_offset, padding_idx,
    )
    return output
