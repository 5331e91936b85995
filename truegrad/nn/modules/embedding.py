"""Drop-in ``torch.nn.Embedding`` and ``torch.nn.EmbeddingBag`` with the exact statistic."""

from __future__ import annotations

import torch

from truegrad.nn import settings
from truegrad.nn.functional import embedding, embedding_bag
from truegrad.nn.rules.embedding import SPARSE_UNSUPPORTED
from truegrad.nn.modules._tracked import Tracked
from truegrad.nn.rules.registry import Rule

__all__ = ["Embedding", "EmbeddingBag"]


class Embedding(Tracked, torch.nn.Embedding):
    """``torch.nn.Embedding`` (same constructor, parameters and ``state_dict``) whose
    backward also writes ``weight.sum_grad_squared``.

    Dim 0 of the ids indexes samples: for ids ``(N, T)`` sample n's gradient is
    ``g_n[v] = sum_{t: ids[n, t] = v} dy[n, t]`` (see :mod:`truegrad.nn.rules.embedding`).
    ``sparse=True`` is not supported.

    Attributes:
        granularity: ``None`` (use ``truegrad.nn.settings.granularity``), ``"sample"`` or
            ``"position"``; a class attribute, settable per instance.
    """

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.sparse:
            raise ValueError(SPARSE_UNSUPPORTED)
        return embedding(
            input,
            self.weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
            granularity=self.granularity,
        )


class EmbeddingBag(Tracked, torch.nn.EmbeddingBag):
    """``torch.nn.EmbeddingBag`` (same constructor, parameters and ``state_dict``) whose
    backward also writes ``weight.sum_grad_squared``; each bag (row of the output) is one
    sample. ``sparse=True`` is not supported.

    Attributes:
        granularity: always ``None``: a bag's output has no positions, so there is no
            per-position approximation.
    """

    granularity: settings.Granularity | None = None

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.sparse:
            raise ValueError(SPARSE_UNSUPPORTED)
        return embedding_bag(
            input,
            self.weight,
            offsets,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.mode,
            self.sparse,
            per_sample_weights,
            self.include_last_offset,
            self.padding_idx,
        )


def _unsupported(module: torch.nn.Module) -> str | None:
    return SPARSE_UNSUPPORTED if getattr(module, "sparse", False) else None


RULES = [
    Rule(torch.nn.Embedding, Embedding, ("weight",), unsupported=_unsupported),
    Rule(torch.nn.EmbeddingBag, EmbeddingBag, ("weight",), unsupported=_unsupported),
]
