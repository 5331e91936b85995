"""Drop-in ``torch.nn.PReLU`` and ``torch.nn.MultiheadAttention`` with the exact statistic;
see :mod:`truegrad.nn.rules.prelu` and :mod:`truegrad.nn.rules.attention` for the math."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from truegrad.nn import settings
from truegrad.nn.rules import base
from truegrad.nn.functional import multi_head_attention_forward, prelu
from truegrad.nn.modules._tracked import Tracked
from truegrad.nn.rules.registry import Rule

__all__ = ["MultiheadAttention", "PReLU"]


class PReLU(Tracked, torch.nn.PReLU):
    """``torch.nn.PReLU`` (same constructor, parameters and ``state_dict``) whose backward
    also writes ``weight.sum_grad_squared``.

    Input ``(N, C, *)`` (dim 0 indexes samples, dim 1 channels), ``(N,)`` or ``()``.

    Attributes:
        granularity: ``None`` (use ``truegrad.nn.settings.granularity``), ``"sample"`` or
            ``"position"``; a class attribute, settable per instance.
    """

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return prelu(input, self.weight, granularity=self.granularity)


class MultiheadAttention(Tracked, torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` (same constructor, parameters and ``state_dict``) whose
    backward also writes ``sum_grad_squared`` of ``in_proj_weight`` (or ``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``),
    ``in_proj_bias``, ``bias_k``, ``bias_v``, ``out_proj.weight`` and ``out_proj.bias``.

    Samples are the layer's own batch dimension: dim 0 of ``(N, L, E)`` inputs when
    ``batch_first=True``, dim 1 of ``(L, N, E)`` inputs when ``batch_first=False``; an
    unbatched ``(L, E)`` input is one sample. Every option of torch's forward is supported
    (masks of every kind, ``is_causal``, ``need_weights``, ``average_attn_weights``,
    ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim``, ``bias=False``, dropout).
    Outputs, attention weights and gradients are bitwise torch's (the forward runs torch's
    ops in torch's order, see :mod:`truegrad.nn.rules.attention`). When no gradient is
    recorded (``torch.no_grad()``, inference) torch's own forward runs, fast path included.

    Attributes:
        granularity: ``None`` (use ``truegrad.nn.settings.granularity``), ``"sample"`` or
            ``"position"``; a class attribute, settable per instance.
    """

    granularity: settings.Granularity | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        params = (
            self.in_proj_weight,
            self.in_proj_bias,
            self.q_proj_weight,
            self.k_proj_weight,
            self.v_proj_weight,
            self.bias_k,
            self.bias_v,
            self.out_proj.weight,
            self.out_proj.bias,
        )
        if not base.should_track(*params) or query.is_nested or key.is_nested or value.is_nested:
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
            )
        # As torch's module: canonical (float) masks first, warning on mismatched mask types.
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:  # as torch: transposes that keep the "is" relations
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        attn_output, attn_output_weights = multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=self.q_proj_weight if separate else None,
            k_proj_weight=self.k_proj_weight if separate else None,
            v_proj_weight=self.v_proj_weight if separate else None,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            granularity=self.granularity,
        )
        if self.batch_first and is_batched:
            return attn_output.transpose(1, 0), attn_output_weights
        return attn_output, attn_output_weights


RULES = [
    Rule(torch.nn.PReLU, PReLU, ("weight",)),
    Rule(
        torch.nn.MultiheadAttention,
        MultiheadAttention,
        (
            "in_proj_weight",
            "in_proj_bias",
            "q_proj_weight",
            "k_proj_weight",
            "v_proj_weight",
            "bias_k",
            "bias_v",
            "out_proj.weight",
            "out_proj.bias",
        ),
    ),
]
