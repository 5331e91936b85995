"""Drop-in normalisation modules with the exact statistic.

Every class subclasses its ``torch.nn`` counterpart (same constructor, parameters,
buffers and ``state_dict``) and overrides only ``forward``, which runs torch's own
logic (running-statistics bookkeeping, ``num_batches_tracked``, ``momentum=None``
cumulative averages, input checks) with the ``truegrad.nn.functional`` op in place
of torch's.
"""

from __future__ import annotations

import warnings

import torch

from truegrad.nn import settings
from truegrad.nn.functional import batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from truegrad.nn.modules._tracked import Tracked
from truegrad.nn.rules.registry import Rule

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
]


class LayerNorm(Tracked, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` whose backward also writes ``weight.sum_grad_squared`` and
    ``bias.sum_grad_squared``: ``g_n(w) = sum_t dy[n,t] * x_hat[n,t]``, ``g_n(b) = sum_t dy[n,t]``
    over the positions t of sample n (dim 0).

    One extension over torch (where torch raises): a ``normalized_shape`` with leading
    singleton dimensions also accepts inputs without them, as in the original TrueGrad
    README's ``LayerNorm([1, 10])`` applied to a ``(16, 10)`` activation. The input is
    viewed with the singleton dimensions inserted, so the result is exactly torch's
    ``LayerNorm(10)`` with the weight viewed as ``(10,)``.

    Attributes:
        granularity: ``None`` (use ``truegrad.nn.settings.granularity``), ``"sample"`` or
            ``"position"``; a class attribute, settable per instance.
    """

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        shape = list(self.normalized_shape)
        singletons = _missing_leading_singletons(input, shape)
        if singletons:
            at = input.dim() - (len(shape) - singletons)
            input = input.reshape(*input.shape[:at], *([1] * singletons), *input.shape[at:])
        out = layer_norm(input, shape, self.weight, self.bias, self.eps, granularity=self.granularity)
        if singletons:
            out = out.reshape(*out.shape[:at], *out.shape[at + singletons :])
        return out


def _missing_leading_singletons(input: torch.Tensor, shape: list[int]) -> int:
    """How many leading 1s of ``shape`` the input lacks (0 when its trailing dims match)."""
    if list(input.shape[-len(shape) :]) == shape:
        return 0
    leading = 0
    while leading < len(shape) and shape[leading] == 1:
        leading += 1
    rest = shape[leading:]
    if leading and rest and list(input.shape[-len(rest) :]) == rest:
        return leading
    return 0


class RMSNorm(Tracked, torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` whose backward also writes ``weight.sum_grad_squared``:
    ``g_n(w) = sum_t dy[n,t] * x[n,t] * rstd[n,t]`` over the positions t of sample n.

    Attributes:
        granularity: as :class:`LayerNorm`.
    """

    granularity: settings.Granularity | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = list(self.normalized_shape)
        return rms_norm(x, shape, self.weight, self.eps, granularity=self.granularity)


class GroupNorm(Tracked, torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` whose backward also writes the statistic of weight and bias:
    ``g_n(w)[c] = sum_s dy[n,c,s] * x_hat[n,c,s]``, ``g_n(b)[c] = sum_s dy[n,c,s]``.

    Attributes:
        granularity: as :class:`LayerNorm` (positions are spatial locations).
    """

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, granularity=self.granularity
        )


class _BatchNormForward(torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.modules.batchnorm._BatchNorm.forward`` calling :func:`batch_norm`."""

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum = self.momentum
        exponential_average_factor = 0.0 if momentum is None else momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if momentum is None:  # cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:  # exponential moving average
                    exponential_average_factor = momentum
        # Batch statistics in training mode, and in evaluation mode without buffers.
        if self.training:
            bn_training = True
        else:
            bn_training = self.running_mean is None and self.running_var is None
        # Buffers are passed only to be updated (training, tracked) or used (evaluation).
        pass_buffers = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
            granularity=self.granularity,
        )


class BatchNorm1d(Tracked, _BatchNormForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` (input ``(N, C)`` or ``(N, C, L)``) whose backward also writes
    the statistic of weight and bias.

    ``g_n(w)[c] = sum_s dy[n,c,s] * x_hat[n,c,s]`` and ``g_n(b)[c] = sum_s dy[n,c,s]``, with
    ``x_hat`` from the batch statistics in training mode (samples interact there, and
    this is the op's own per-sample split of ``p.grad``) and from the running statistics
    in evaluation mode. Running statistics and ``num_batches_tracked`` evolve exactly as
    torch's.

    Attributes:
        granularity: as :class:`LayerNorm` (positions are the L locations).
    """


class BatchNorm2d(Tracked, _BatchNormForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (input ``(N, C, H, W)``); see :class:`BatchNorm1d`."""


class BatchNorm3d(Tracked, _BatchNormForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` (input ``(N, C, D, H, W)``); see :class:`BatchNorm1d`."""


class _InstanceNormForward(torch.nn.modules.instancenorm._InstanceNorm):
    """``torch.nn.modules.instancenorm._InstanceNorm.forward`` calling :func:`instance_norm`."""

    granularity: settings.Granularity | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        no_batch_dim = self._get_no_batch_dim()
        feature_dim = input.dim() - no_batch_dim
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features"
                    f" ({self.num_features}), but got: {input.size(feature_dim)}."
                )
            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=2,
            )
        if input.dim() == no_batch_dim:
            return self._instance_norm(input.unsqueeze(0)).squeeze(0)
        return self._instance_norm(input)

    def _instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        return instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
            granularity=self.granularity,
        )


class InstanceNorm1d(Tracked, _InstanceNormForward, torch.nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` (input ``(N, C, L)`` or ``(C, L)``) whose backward also
    writes the statistic of weight and bias (``affine=True``).

    Every (sample, channel) is normalised on its own, so samples never interact:
    ``g_n(w)[c] = sum_s dy[n,c,s] * x_hat[n,c,s]``, ``g_n(b)[c] = sum_s dy[n,c,s]``.

    Attributes:
        granularity: as :class:`LayerNorm` (positions are the L locations).
    """


class InstanceNorm2d(Tracked, _InstanceNormForward, torch.nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` (input ``(N, C, H, W)``); see :class:`InstanceNorm1d`."""


class InstanceNorm3d(Tracked, _InstanceNormForward, torch.nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` (input ``(N, C, D, H, W)``); see :class:`InstanceNorm1d`."""


RULES = [
    Rule(torch.nn.LayerNorm, LayerNorm, ("weight", "bias")),
    Rule(torch.nn.RMSNorm, RMSNorm, ("weight",)),
    Rule(torch.nn.GroupNorm, GroupNorm, ("weight", "bias")),
    Rule(torch.nn.BatchNorm1d, BatchNorm1d, ("weight", "bias")),
    Rule(torch.nn.BatchNorm2d, BatchNorm2d, ("weight", "bias")),
    Rule(torch.nn.BatchNorm3d, BatchNorm3d, ("weight", "bias")),
    Rule(torch.nn.InstanceNorm1d, InstanceNorm1d, ("weight", "bias")),
    Rule(torch.nn.InstanceNorm2d, InstanceNorm2d, ("weight", "bias")),
    Rule(torch.nn.InstanceNorm3d, InstanceNorm3d, ("weight", "bias")),
]
