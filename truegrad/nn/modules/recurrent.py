"""Drop-in ``torch.nn.RNN``, ``LSTM`` and ``GRU`` with the exact statistic; see
:mod:`truegrad.nn.rules.recurrent` for the math (backpropagation through time with each
sample's gradient summed over its time steps before squaring)."""

from __future__ import annotations

from typing import Any

import torch

from truegrad.engine import door as _door
from truegrad.engine import forward as _forward
from truegrad.nn.modules._tracked import Tracked
from truegrad.nn.rules.registry import Rule

__all__ = ["GRU", "LSTM", "RNN"]


class _Recurrent(Tracked):
    """The forward of the recurrent classes: torch's, run eagerly also under
    ``torch.compile`` (the rule needs the real call; a recurrent layer is one fused op anyway).
    Called by a compiled forward the engine does not follow, its parameters get no
    statistic, with the reason (see :func:`truegrad.engine.door.refuse_traced`)."""

    @torch.compiler.disable
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        forward = super().forward
        if _forward.in_call() or not _door.takes(tuple(self.parameters()), {}):
            return forward(*args, **kwargs)
        return _door.refuse_traced_module(self, forward, args, kwargs)


class RNN(_Recurrent, torch.nn.RNN):
    """``torch.nn.RNN`` (same constructor, parameters and ``state_dict``) whose backward also
    writes ``sum_grad_squared`` of every weight and bias: every layer and direction, both
    ``batch_first`` settings, packed sequences. Its forward is torch's; the tracked weights
    hand ``torch.rnn_tanh``/``rnn_relu`` to the engine."""


class LSTM(_Recurrent, torch.nn.LSTM):
    """``torch.nn.LSTM`` (same constructor, parameters and ``state_dict``) whose backward also
    writes ``sum_grad_squared`` of every weight and bias, ``proj_size`` included; see
    :class:`RNN`."""


class GRU(_Recurrent, torch.nn.GRU):
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
