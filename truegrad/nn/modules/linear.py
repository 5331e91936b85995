"""Drop-in ``torch.nn.Linear`` with the exact statistic."""

from __future__ import annotations

import torch

from truegrad.nn import settings
from truegrad.nn.functional import linear
from truegrad.nn.modules._tracked import Tracked
from truegrad.nn.rules.registry import Rule

__all__ = ["Linear"]


class Linear(Tracked, torch.nn.Linear):
    """``torch.nn.Linear`` (same constructor, parameters and ``state_dict``) whose backward
    also writes ``weight.sum_grad_squared`` and ``bias.sum_grad_squared``.

    Attributes:
        granularity: ``None`` (use ``truegrad.nn.settings.granularity``), ``"sample"`` or
            ``"position"``; a class attribute, settable per instance.
    """

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias, granularity=self.granularity)


RULES = [Rule(torch.nn.Linear, Linear, ("weight", "bias"))]
