"""Multi-head attention with the exact per-sample statistic of every parameter.

:func:`multi_head_attention_forward` is ``torch.nn.functional.multi_head_attention_forward``
(same signature; masks, ``is_causal``, ``add_bias_kv``, ``add_zero_attn``,
``static_k``/``static_v``, dropout, ``need_weights``, unbatched input) line by line, in
torch's seq-first layout ``(T, N, E)`` (samples in dim 1), with the three operations that
touch parameters replaced by autograd Functions that also write ``sum_grad_squared``:

* the in-projection (:class:`InProjectionFunction`): ``q = x_q W_q^T + b_q``,
  ``k = x_k W_k^T + b_k``, ``v = x_v W_v^T + b_v``, where ``W_q, W_k, W_v`` are the row
  blocks of ``in_proj_weight (3E, E)`` (or the separate ``q/k/v_proj_weight (E, E_*)`` when
  ``kdim``/``vdim`` differ from ``embed_dim``) and ``b_q, b_k, b_v`` those of
  ``in_proj_bias (3E,)``. The projections are ONE use of each parameter, so sample n's
  gradient of a packed parameter is the concatenation of its blocks' (disjoint rows):

      g_n(in_proj_weight) = [sum_l dq[l,n]^T x_q[l,n];
                             sum_s dk[s,n]^T x_k[s,n];
                             sum_s dv[s,n]^T x_v[s,n]]
      g_n(in_proj_bias)   = [sum_l dq[l,n]; sum_s dk[s,n]; sum_s dv[s,n]]

  formed with ``bmm`` over chunks of samples (``truegrad.nn.settings.chunk_bytes``),
  squared and summed;
* ``bias_k``/``bias_v`` ``(1, 1, E)``, repeated over the batch and appended to the keys and
  values (:class:`AppendBiasFunction`): ``g_n`` is the gradient of sample n's appended row;
* the out-projection on the ``(L * N, E)`` rows torch forms (:class:`OutProjectionFunction`):
  ``g_n(W) = sum_l dy[l,n]^T a[l,n]``, ``g_n(b) = sum_l dy[l,n]``.

The Functions run the very ``F.linear`` calls torch's functional runs (self-attention: one
linear on the packed weight; encoder-decoder: a ``[E, 2E]`` split; otherwise three), and their
backward uses the ops of torch's autograd formulas (``dy @ W``, ``dy^T x``, ``sum_to_size``,
``cat`` for split/chunk), so outputs and ``p.grad`` are bitwise torch's. The attention core
(scores, masks, softmax, dropout, weighted sum) is torch's own code path: it has no
parameters and never mixes samples.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from truegrad._originals import F  # torch's own ops, also under patch_torch
from truegrad.nn import settings
from truegrad.nn.rules import base

__all__ = ["multi_head_attention_forward"]

#: In-projection modes, as torch's ``_in_projection_packed`` / ``_in_projection`` choose them.
_SELF, _KV, _THREE, _SEPARATE = "self", "kv", "three", "separate"


def _stat_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _groups(
    mode: str,
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    weight: torch.Tensor | None,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    v_weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, int]]:
    """The ``F.linear`` calls of torch's in-projection: ``(input index, x, w, b, blocks)``;
    the output of a call is ``blocks`` consecutive q/k/v blocks side by side."""
    if mode == _SELF:
        return [(0, query, weight, bias, 3)]  # type: ignore[list-item]
    if mode == _KV:
        embed_dim = query.shape[-1]
        w_q, w_kv = weight.split([embed_dim, 2 * embed_dim])  # type: ignore[union-attr]
        b_q, b_kv = (None, None) if bias is None else bias.split([embed_dim, 2 * embed_dim])
        return [(0, query, w_q, b_q, 1), (1, key, w_kv, b_kv, 2)]  # type: ignore[list-item]
    if mode == _SEPARATE:
        ws: tuple = (q_weight, k_weight, v_weight)
    else:
        ws = weight.chunk(3)  # type: ignore[union-attr]
    bs = (None, None, None) if bias is None else bias.chunk(3)
    xs = (query, key, value)
    return [(j, xs[j], ws[j], bs[j], 1) for j in range(3)]  # type: ignore[misc]


def _split_blocks(y: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """torch's ``unflatten/unsqueeze/transpose/squeeze/contiguous`` split of a packed projection."""
    if blocks == 1:
        return [y]
    packed = y.unflatten(-1, (blocks, y.shape[-1] // blocks)).unsqueeze(0).transpose(0, -2)
    packed = packed.squeeze(-2).contiguous()
    return [packed[i] for i in range(blocks)]


def _join_blocks(grads: list[torch.Tensor]) -> torch.Tensor:
    """The gradient of :func:`_split_blocks`'s input from its outputs' gradients."""
    if len(grads) == 1:
        return grads[0]
    stacked = torch.stack(grads)  # (blocks, T, N, E)
    return stacked.permute(1, 2, 0, 3).reshape(*stacked.shape[1:3], -1)


def _per_sample_products(dy: torch.Tensor, x: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """``g_n = sum_t dy[t, n]^T x[t, n]`` for samples ``s:e`` of seq-first ``(T, N, *)`` tensors."""
    return torch.bmm(dy[:, s:e].permute(1, 2, 0), x[:, s:e].transpose(0, 1))


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t (T, N, D)`` as ``(T * N, D)`` rows, zero-padded to ``rows`` rows."""
    flat = t.reshape(-1, t.shape[-1])
    return F.pad(flat, (0, 0, 0, rows - flat.shape[0])) if flat.shape[0] < rows else flat


class InProjectionFunction(base.RuleFunction):
    """The q/k/v in-projection of torch's ``multi_head_attention_forward`` as one use of each
    parameter.

    Inputs (seq-first): ``query (L, N, E_q)``, ``key (S, N, E_k)``, ``value (S, N, E_v)``;
    ``mode`` says which of torch's paths runs: ``"self"`` (query is key is value; ``key``
    and ``value`` are ``None``; one linear on the packed ``weight (3E, E)``), ``"kv"`` (key is
    value; ``value`` is ``None``; linears on ``weight``'s ``[E, 2E]`` row split), ``"three"``
    (three linears on ``weight``'s row chunks) or ``"separate"`` (``q/k/v_weight``, ``weight``
    ``None``). ``bias (3E,)`` or ``None``.
    Returns ``q (L, N, E)``, ``k (S, N, E)``, ``v (S, N, E)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        weight: torch.Tensor | None,
        q_weight: torch.Tensor | None,
        k_weight: torch.Tensor | None,
        v_weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mode: str,
        granularity: str,
    ) -> tuple[torch.Tensor, ...]:
        outputs: list[torch.Tensor] = []
        groups = _groups(mode, query, key, value, weight, q_weight, k_weight, v_weight, bias)
        for _, x, w, b, blocks in groups:
            outputs.extend(_split_blocks(F.linear(x, w, b), blocks))
        return tuple(outputs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        query, key, value, weight, q_weight, k_weight, v_weight, bias, mode, granularity = inputs
        ctx.save_for_backward(query, key, value, weight, q_weight, k_weight, v_weight, bias)
        ctx.mode = mode
        ctx.compute_dtype = output[0].dtype
        ctx.granularity = granularity
        ctx.params = tuple(base.tracked(p) for p in (weight, q_weight, k_weight, v_weight, bias))
        for param in ctx.params:
            base.record_use(param, ctx)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, weight, q_weight, k_weight, v_weight, bias = base.saved(ctx)
        dtype = ctx.compute_dtype
        needs = ctx.needs_input_grad
        groups = _groups(ctx.mode, query, key, value, weight, q_weight, k_weight, v_weight, bias)
        grad_inputs: list[torch.Tensor | None] = [None, None, None]
        grad_ws: list[torch.Tensor] = []
        grad_bs: list[torch.Tensor] = []
        products = []  # (dy, x) of every linear call, in the compute dtype
        block = 0
        for index, x, w, b, blocks in groups:
            dy = _join_blocks(list(grads[block : block + blocks]))
            block += blocks
            x_c = x.to(dtype)
            dy2 = dy.reshape(-1, dy.shape[-1])
            if needs[index]:
                grad_inputs[index] = dy2.mm(w.to(dtype)).view(x.shape).to(x.dtype)
            if needs[3] if weight is not None else needs[4 + index]:
                grad_ws.append(dy2.t().mm(x_c.reshape(-1, x.shape[-1])))
            if b is not None and needs[7]:
                # torch reduces the 2-D addmm gradient (contiguous x) or the 3-D one (matmul path).
                grad_bs.append((dy2 if x.is_contiguous() else dy).sum_to_size(b.shape))
            products.append((dy, x_c))
        grad_weight = grad_q_weight = grad_k_weight = grad_v_weight = grad_bias = None
        if weight is not None and needs[3]:
            grad_weight = (grad_ws[0] if len(grad_ws) == 1 else torch.cat(grad_ws)).to(weight.dtype)
        if weight is None:
            separate = iter(grad_ws)
            grad_q_weight, grad_k_weight, grad_v_weight = (
                next(separate).to(w.dtype) if needs[4 + j] else None
                for j, w in enumerate((q_weight, k_weight, v_weight))
            )
        if bias is not None and needs[7]:
            grad_bias = (grad_bs[0] if len(grad_bs) == 1 else torch.cat(grad_bs)).to(bias.dtype)
        if any(p is not None for p in ctx.params):
            _in_projection_statistic(ctx, products)
        weight_grads = (grad_weight, grad_q_weight, grad_k_weight, grad_v_weight, grad_bias)
        return (*grad_inputs, *weight_grads, None, None)


def _in_projection_statistic(ctx: Any, products: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    weight, q_weight, k_weight, v_weight, bias = ctx.params
    sdt = _stat_dtype(next(p for p in ctx.params if p is not None).dtype)
    dys = [dy.to(sdt) for dy, _ in products]
    xs = [x.to(sdt) for _, x in products]
    n = xs[0].shape[1]
    if ctx.granularity == "position" or all(x.shape[0] == 1 for x in xs):
        # Every (position, sample) row is a "sample" (or each sample has one position): the
        # squared shortcut is exact for it. Shorter calls are zero-padded to the longest.
        n = max(x.shape[0] * x.shape[1] for x in xs)
        dys = [_rows(dy, n) for dy in dys]
        xs = [_rows(x, n) for x in xs]

        def weight_part(j: int, s: int, e: int) -> torch.Tensor:
            return dys[j][s:e, :, None] * xs[j][s:e, None, :]

        def weight_squared(j: int) -> torch.Tensor:
            return dys[j].square().t() @ xs[j].square()

        def bias_part(j: int, s: int, e: int) -> torch.Tensor:
            return dys[j][s:e]

        def bias_squared(j: int) -> torch.Tensor:
            return dys[j].square().sum(0)

        shortcut = True
    else:

        def weight_part(j: int, s: int, e: int) -> torch.Tensor:
            return _per_sample_products(dys[j], xs[j], s, e)

        def bias_part(j: int, s: int, e: int) -> torch.Tensor:
            return dys[j][:, s:e].sum(0)

        shortcut = False
    calls = range(len(products))

    def packed_weight_part(s: int, e: int) -> torch.Tensor:
        parts = [weight_part(j, s, e) for j in calls]  # disjoint row blocks of the weight
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    if weight is not None:
        base.contribute(
            weight,
            n,
            packed_weight_part,
            (lambda: torch.cat([weight_squared(j) for j in calls])) if shortcut else None,
            ctx=ctx,
        )
    for j, param in enumerate((q_weight, k_weight, v_weight)):
        base.contribute(
            param,
            n,
            lambda s, e, j=j: weight_part(j, s, e),
            (lambda j=j: weight_squared(j)) if shortcut else None,
            ctx=ctx,
        )
    base.contribute(
        bias,
        n,
        lambda s, e: torch.cat([bias_part(j, s, e) for j in calls], 1),
        (lambda: torch.cat([bias_squared(j) for j in calls])) if shortcut else None,
        ctx=ctx,
    )


class AppendBiasFunction(base.RuleFunction):
    """``bias (1, 1, E)`` repeated over the batch: ``bias.repeat(1, N, 1)``, ``(1, N, E)``.

    Sample n's gradient is its column of the output gradient, ``g_n = grad[0, n]``, so the
    statistic needs no intermediate beyond the gradient itself.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(bias: torch.Tensor, batch_size: int) -> torch.Tensor:  # type: ignore[override]
        return bias.repeat(1, batch_size, 1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        bias, batch_size = inputs
        ctx.bias_shape = bias.shape
        ctx.bias_dtype = bias.dtype
        ctx.batch_size = batch_size
        ctx.bias_param = base.tracked(bias)
        base.record_use(ctx.bias_param, ctx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        # torch's repeat_backward: view the repeats as their own dim and sum it
        n, width = ctx.batch_size, ctx.bias_shape[-1]
        grad_bias = grad.reshape(1, n, 1, width).sum([1]).to(ctx.bias_dtype)
        if ctx.bias_param is not None:
            per_sample = grad.to(_stat_dtype(ctx.bias_dtype)).reshape(n, *ctx.bias_shape)
            base.contribute(
                ctx.bias_param,
                n,
                lambda s, e: per_sample[s:e],
                lambda: per_sample.square().sum(0),
                ctx=ctx,
            )
        return grad_bias, None


def _repeat_bias(bias: torch.Tensor, batch_size: int) -> torch.Tensor:
    if base.tracked(bias) is None:
        return bias.repeat(1, batch_size, 1)
    return base.apply(AppendBiasFunction, bias, batch_size)


class OutProjectionFunction(base.RuleFunction):
    """``F.linear`` on the ``(L * N, E)`` rows of torch's attention output, rows ordered
    ``(l, n)``: sample n is every ``batch_size``-th row, starting at row n."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        batch_size: int,
        granularity: str,
    ) -> torch.Tensor:
        return F.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        input, weight, bias, batch_size, granularity = inputs
        ctx.save_for_backward(input, weight)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.batch_size = batch_size
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
        x = input.to(dtype)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.mm(weight.to(dtype)).to(input.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_output.t().mm(x).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype)
        if ctx.weight_param is not None or ctx.bias_param is not None:
            sdt = _stat_dtype(weight.dtype)
            dy, x = grad_output.to(sdt), input.to(sdt)
            n = ctx.batch_size
            if ctx.granularity == "position" or dy.shape[0] == n:  # one row per "sample"
                dy2 = dy.square()
                rows = dy.shape[0]
                base.contribute(
                    ctx.weight_param,
                    rows,
                    lambda s, e: dy[s:e, :, None] * x[s:e, None, :],
                    lambda: dy2.t() @ x.square(),
                    ctx=ctx,
                )
                base.contribute(
                    ctx.bias_param, rows, lambda s, e: dy[s:e], lambda: dy2.sum(0), ctx=ctx
                )
            else:
                dy3, x3 = dy.view(-1, n, dy.shape[-1]), x.view(-1, n, x.shape[-1])
                base.contribute(
                    ctx.weight_param, n, lambda s, e: _per_sample_products(dy3, x3, s, e), ctx=ctx
                )
                base.contribute(ctx.bias_param, n, lambda s, e: dy3[:, s:e].sum(0), ctx=ctx)
        return grad_input, grad_weight, grad_bias, None, None


def _out_projection(
    attn: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    batch_size: int,
    granularity: str,
) -> torch.Tensor:
    if not base.should_track(weight, bias):
        return F.linear(attn, weight, bias)
    return base.apply(OutProjectionFunction, attn, weight, bias, batch_size, granularity)


def multi_head_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: torch.Tensor | None,
    in_proj_bias: torch.Tensor | None,
    bias_k: torch.Tensor | None,
    bias_v: torch.Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    training: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: torch.Tensor | None = None,
    k_proj_weight: torch.Tensor | None = None,
    v_proj_weight: torch.Tensor | None = None,
    static_k: torch.Tensor | None = None,
    static_v: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    granularity: settings.Granularity | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch.nn.functional.multi_head_attention_forward`` that also writes ``sum_grad_squared``.

    Same arguments and results as torch's (see its documentation), in its seq-first layout:
    ``query (L, N, E)``, ``key (S, N, E_k)``, ``value (S, N, E_v)``, samples in dim 1; or
    unbatched ``(L, E)``, ``(S, E_k)``, ``(S, E_v)`` (one sample). Every trainable leaf among
    ``in_proj_weight``, ``in_proj_bias``, ``q/k/v_proj_weight``, ``bias_k``, ``bias_v``,
    ``out_proj_weight``, ``out_proj_bias`` gets the exact statistic: sample n's gradient,
    summed over its query and key positions, squared.

    Args:
        granularity: ``None`` (the process-wide setting), ``"sample"`` (exact) or
            ``"position"`` (every position of a projection's input counts as a sample;
            an opt-in approximation).

    Returns:
        ``(attn_output (L, N, E), attn_weights (N, L, S) / (N, H, L, S) or None)``, bitwise
        torch's.
    """
    params = (in_proj_weight, in_proj_bias, q_proj_weight, k_proj_weight, v_proj_weight,
              bias_k, bias_v, out_proj_weight, out_proj_bias)
    if not base.should_track(*params):
        return F.multi_head_attention_forward(
            query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
            bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
            training=training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=use_separate_proj_weight,
            q_proj_weight=q_proj_weight, k_proj_weight=k_proj_weight, v_proj_weight=v_proj_weight,
            static_k=static_k, static_v=static_v, average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
    granularity = settings.resolve_granularity(granularity)
    # From here on torch's function, with the parameter ops through truegrad's Functions.
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:  # (unsqueezed tensors are never each other, as in torch)
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    self_attention = query is key and key is value
    key_is_value = key is value
    tgt_len, bsz, embed_dim = query.shape
    src_len, _, _ = key.shape

    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
            "module method `generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the is_causal hint goes to scaled_dot_product_attention as is
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if key_padding_mask is not None:
            is_causal = False

    if embed_dim != embed_dim_to_check:
        raise AssertionError(
            f"was expecting embedding dimension of {embed_dim_to_check}, but got {embed_dim}"
        )
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    if use_separate_proj_weight:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(
                f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                f"{value.shape[:2]}"
            )
    elif key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")

    # in-projection: one use of every projection parameter
    if use_separate_proj_weight:
        if q_proj_weight is None or k_proj_weight is None or v_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is True but q/k/v_proj_weight is None")
        for name, w, width in (
            ("query", q_proj_weight, embed_dim),
            ("key", k_proj_weight, key.shape[-1]),
            ("value", v_proj_weight, value.shape[-1]),
        ):
            if w.shape != (embed_dim, width):
                raise AssertionError(
                    f"expecting {name} weights shape of {(embed_dim, width)}, but got {w.shape}"
                )
        # torch computes the projections that static_k/static_v replace and discards them:
        # those weights get no gradient there, so they take no part here either.
        if static_k is not None:
            k_proj_weight = k_proj_weight.detach()
        if static_v is not None:
            v_proj_weight = v_proj_weight.detach()
        mode, packed = _SEPARATE, None
        inputs = (query, key, value)
    else:
        if in_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
        packed, q_proj_weight, k_proj_weight, v_proj_weight = in_proj_weight, None, None, None
        if self_attention:
            mode, inputs = _SELF, (query, None, None)
        elif key_is_value:
            mode, inputs = _KV, (query, key, None)
        else:
            mode, inputs = _THREE, (query, key, value)
    projection_weights = (packed, q_proj_weight, k_proj_weight, v_proj_weight, in_proj_bias)
    q, k, v = base.apply(InProjectionFunction, *inputs, *projection_weights, mode, granularity)

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            correct_2d_size = (tgt_len, src_len)
            if attn_mask.shape != correct_2d_size:
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                    f"{correct_2d_size}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            correct_3d_size = (bsz * num_heads, tgt_len, src_len)
            if attn_mask.shape != correct_3d_size:
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{correct_3d_size}."
                )
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    if bias_k is not None and bias_v is not None:
        if static_k is not None:
            raise AssertionError("bias cannot be added to static key.")
        if static_v is not None:
            raise AssertionError("bias cannot be added to static value.")
        k = torch.cat([k, _repeat_bias(bias_k, bsz)])
        v = torch.cat([v, _repeat_bias(bias_v, bsz)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    elif bias_k is not None:
        raise AssertionError("bias_k is set but bias_v is None")
    elif bias_v is not None:
        raise AssertionError("bias_v is set but bias_k is None")

    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    if static_k is None:
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    else:
        _check_static(static_k, "static_k", bsz * num_heads, head_dim)
        k = static_k
    if static_v is None:
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    else:
        _check_static(static_v, "static_v", bsz * num_heads, head_dim)
        v = static_v

    if add_zero_attn:
        zero_attn_shape = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zero_attn_shape, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zero_attn_shape, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))

    src_len = k.size(1)
    if key_padding_mask is not None:
        if key_padding_mask.shape[0] != bsz:
            raise AssertionError(
                f"Expected key_padded_mask.shape[0] to be {bsz}, but got "
                f"{key_padding_mask.shape[0]}"
            )
        if key_padding_mask.shape[1] != src_len:
            raise AssertionError(
                f"Expected key_padded_mask.shape[1] to be {src_len}, but got "
                f"{key_padding_mask.shape[1]}"
            )
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len)
            .expand(-1, num_heads, -1, -1)
            .reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

    if not training:
        dropout_p = 0.0

    if need_weights:
        _, _, head = q.shape
        q_scaled = q * math.sqrt(1.0 / float(head))
        if attn_mask is not None:
            attn_output_weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            attn_output_weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        attn_output_weights = F.softmax(attn_output_weights, dim=-1)
        if dropout_p > 0.0:
            attn_output_weights = F.dropout(attn_output_weights, p=dropout_p)
        attn_output = torch.bmm(attn_output_weights, v)
        attn_output = attn_output.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        attn_output = _out_projection(attn_output, out_proj_weight, out_proj_bias, bsz, granularity)
        attn_output = attn_output.view(tgt_len, bsz, attn_output.size(1))
        attn_output_weights = attn_output_weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            attn_output_weights = attn_output_weights.mean(dim=1)
        if not is_batched:
            attn_output = attn_output.squeeze(1)
            attn_output_weights = attn_output_weights.squeeze(0)
        return attn_output, attn_output_weights

    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    attn_output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    attn_output = attn_output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    attn_output = _out_projection(attn_output, out_proj_weight, out_proj_bias, bsz, granularity)
    attn_output = attn_output.view(tgt_len, bsz, attn_output.size(1))
    if not is_batched:
        attn_output = attn_output.squeeze(1)
    return attn_output, None


def _check_static(t: torch.Tensor, name: str, rows: int, head_dim: int) -> None:
    if t.size(0) != rows:
        raise AssertionError(f"expecting {name}.size(0) of {rows}, but got {t.size(0)}")
    if t.size(2) != head_dim:
        raise AssertionError(f"expecting {name}.size(2) of {head_dim}, but got {t.size(2)}")
