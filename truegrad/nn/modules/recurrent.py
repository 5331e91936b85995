"""Drop-in ``torch.nn.RNN``, ``LSTM`` and ``GRU`` with the exact statistic; see
:mod:`truegrad.nn.rules.recurrent` for the math (backpropagation through time with each
sample's gradient summed over its time steps before squaring)."""

from __future__ import annotations

import torch

from truegrad.nn.modules._tracked import Tracked
from truegrad.nn.rules.registry import Rule

__all__ = ["GRU", "LSTM", "RNN"]


class RNN(Tracked, torch.nn.RNN):
    """``torch.nn.RNN`` (same constructor, parameters and ``state_dict``) whose backward also
    writes ``sum_grad_squared`` of every weight and bias: every layer and direction, both
    ``batch_first`` settings, packed sequences. Its forward is torch's; the tracked weights
    hand ``torch.rnn_tanh``/``rnn_relu`` to the engine."""


class LSTM(Tracked, torch.nn.LSTM):
    """``torch.nn.LSTM`` (same constructor, parameters and ``state_dict``) whose backward also
    writes ``sum_grad_squared`` of every weight and bias, ``proj_size`` included; see
    :class:`RNN`."""


class GRU(Tracked, torch.nn.GRU):
    """``torch.nn.GRU`` (same constructor, parameters and ``state_dict``) whose backward also
    writes ``sum_grad_squared`` of every weight and bias; see :class:`RNN`."""


def _names(prefixes: tuple[str, ...], layers: int = 8) -> tuple[str, ...]:
    return tuple(
        f"{p}_l{i}{suffix}" for i in range(layers) for suffix in ("", "_reverse") for p in prefixes
    )


_RNN_PARAMETERS = _names(("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

RULES = [
    Rule(torch.nn.RNN, RNN, _RNN_PARAMETERS),
    Rule(torch.nn.LSTM, LSTM, _RNN_PARAMETERS + _names(("weight_hr",))),
    Rule(torch.nn.GRU, GRU, _RNN_PARAMETERS),
]
