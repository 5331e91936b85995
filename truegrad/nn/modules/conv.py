"""Drop-in ``torch.nn`` convolutions (``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d``) with the
exact statistic; see :mod:`truegrad.nn.rules.conv` for the math.

Every option of the torch classes is supported: stride, padding (ints, ``"same"``,
``"valid"``), every ``padding_mode`` (a non-``zeros`` mode is an ``F.pad`` before a
convolution with padding 0, as torch does), dilation, groups, ``bias=False``, and for the
transposed ones ``output_padding`` and the forward's ``output_size``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from truegrad.nn import settings
from truegrad.nn import functional as rules
from truegrad.nn.modules._tracked import Tracked
from truegrad.nn.rules.registry import Rule

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


def _conv_forward(
    module: torch.nn.modules.conv._ConvNd, input: torch.Tensor, fn: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """``torch.nn.ConvNd._conv_forward`` with ``fn`` (a truegrad functional) as the op."""
    dim = module.weight.dim() - 2
    if module.padding_mode != "zeros":
        padded = F.pad(input, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return fn(
            padded, module.weight, module.bias, module.stride, [0] * dim, module.dilation,
            module.groups, granularity=module.granularity,
        )
    return fn(
        input, module.weight, module.bias, module.stride, module.padding, module.dilation,
        module.groups, granularity=module.granularity,
    )


def _conv_transpose_forward(
    module: torch.nn.modules.conv._ConvTransposeNd,
    input: torch.Tensor,
    output_size: list[int] | None,
    fn: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """``torch.nn.ConvTransposeNd.forward`` with ``fn`` (a truegrad functional) as the op."""
    dim = module.weight.dim() - 2
    if module.padding_mode != "zeros":
        raise ValueError(f"Only `zeros` padding mode is supported for {type(module).__name__}")
    output_padding = module._output_padding(
        input, output_size, module.stride, module.padding, module.kernel_size, dim, module.dilation
    )
    return fn(
        input, module.weight, module.bias, module.stride, module.padding, output_padding,
        module.groups, module.dilation, granularity=module.granularity,
    )


class Conv1d(Tracked, torch.nn.Conv1d):
    """``torch.nn.Conv1d`` (same constructor, parameters and ``state_dict``) whose backward
    also writes ``weight.sum_grad_squared`` and ``bias.sum_grad_squared``.

    Attributes:
        granularity: ``None`` (use ``truegrad.nn.settings.granularity``), ``"sample"`` or
            ``"position"``; a class attribute, settable per instance.
    """

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _conv_forward(self, input, rules.conv1d)


class Conv2d(Tracked, torch.nn.Conv2d):
    """``torch.nn.Conv2d`` (same constructor, parameters and ``state_dict``) whose backward
    also writes ``weight.sum_grad_squared`` and ``bias.sum_grad_squared``.

    Attributes:
        granularity: ``None`` (use ``truegrad.nn.settings.granularity``), ``"sample"`` or
            ``"position"``; a class attribute, settable per instance.
    """

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _conv_forward(self, input, rules.conv2d)


class Conv3d(Tracked, torch.nn.Conv3d):
    """``torch.nn.Conv3d`` (same constructor, parameters and ``state_dict``) whose backward
    also writes ``weight.sum_grad_squared`` and ``bias.sum_grad_squared``.

    Attributes:
        granularity: ``None`` (use ``truegrad.nn.settings.granularity``), ``"sample"`` or
            ``"position"``; a class attribute, settable per instance.
    """

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _conv_forward(self, input, rules.conv3d)


class ConvTranspose1d(Tracked, torch.nn.ConvTranspose1d):
    """``torch.nn.ConvTranspose1d`` (same constructor, parameters and ``state_dict``) whose
    backward also writes ``weight.sum_grad_squared`` and ``bias.sum_grad_squared``.

    Attributes:
        granularity: ``None`` (use ``truegrad.nn.settings.granularity``), ``"sample"`` or
            ``"position"``; a class attribute, settable per instance.
    """

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return _conv_transpose_forward(self, input, output_size, rules.conv_transpose1d)


class ConvTranspose2d(Tracked, torch.nn.ConvTranspose2d):
    """``torch.nn.ConvTranspose2d`` (same constructor, parameters and ``state_dict``) whose
    backward also writes ``weight.sum_grad_squared`` and ``bias.sum_grad_squared``.

    Attributes:
        granularity: ``None`` (use ``truegrad.nn.settings.granularity``), ``"sample"`` or
            ``"position"``; a class attribute, settable per instance.
    """

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return _conv_transpose_forward(self, input, output_size, rules.conv_transpose2d)


class ConvTranspose3d(Tracked, torch.nn.ConvTranspose3d):
    """``torch.nn.ConvTranspose3d`` (same constructor, parameters and ``state_dict``) whose
    backward also writes ``weight.sum_grad_squared`` and ``bias.sum_grad_squared``.

    Attributes:
        granularity: ``None`` (use ``truegrad.nn.settings.granularity``), ``"sample"`` or
            ``"position"``; a class attribute, settable per instance.
    """

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return _conv_transpose_forward(self, input, output_size, rules.conv_transpose3d)


def _unsupported(module: torch.nn.Module) -> str | None:
    """Why a convolution cannot be covered: uninitialised lazy or complex parameters."""
    has_uninitialized = getattr(module, "has_uninitialized_params", None)
    if has_uninitialized is not None and has_uninitialized():
        return "its parameters are not initialised yet (a lazy module): run one forward first"
    if module.weight.is_complex():  # type: ignore[union-attr]
        return "complex parameters have no real sum of squared per-sample gradients"
    return None


RULES = [
    Rule(torch.nn.Conv1d, Conv1d, ("weight", "bias"), _unsupported),
    Rule(torch.nn.Conv2d, Conv2d, ("weight", "bias"), _unsupported),
    Rule(torch.nn.Conv3d, Conv3d, ("weight", "bias"), _unsupported),
    Rule(torch.nn.ConvTranspose1d, ConvTranspose1d, ("weight", "bias"), _unsupported),
    Rule(torch.nn.ConvTranspose2d, ConvTranspose2d, ("weight", "bias"), _unsupported),
    Rule(torch.nn.ConvTranspose3d, ConvTranspose3d, ("weight", "bias"), _unsupported),
]
