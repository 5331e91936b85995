"""Drop-in ``torch.nn.Bilinear`` with the exact statistic; see :mod:`truegrad.nn.rules.bilinear`."""

from __future__ import annotations

import torch

from truegrad.nn import settings
from truegrad.nn.functional import bilinear
from truegrad.nn.modules._tracked import Tracked
from truegrad.nn.rules.registry import Rule

__all__ = ["Bilinear"]


class Bilinear(Tracked, torch.nn.Bilinear):
    """``torch.nn.Bilinear`` (same constructor, parameters and ``state_dict``) whose backward
    also writes ``weight.sum_grad_squared`` and ``bias.sum_grad_squared``.

    Inputs ``(N, *, in1_features)`` and ``(N, *, in2_features)``: dim 0 indexes samples.

    Attributes:
        granularity: ``None`` (use ``truegrad.nn.settings.granularity``), ``"sample"`` or
            ``"position"``; a class attribute, settable per instance.
    """

    granularity: settings.Granularity | None = None

    def forward(self, input1: torch.Tensor, input2: torch.Tensor) -> torch.Tensor:
        return bilinear(input1, input2, self.weight, self.bias, granularity=self.granularity)


RULES = [Rule(torch.nn.Bilinear, Bilinear, ("weight", "bias"))]
