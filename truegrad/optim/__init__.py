"""Optimizers that read ``p.sum_grad_squared``, and the original TrueGrad library's family
(TGLaProp, TGRMSProp, Graft, Sign, the weight-decay variants of
:mod:`truegrad.optim.weight_decay`)."""

from truegrad.optim.graft import Graft, Sign
from truegrad.optim.tgadamw import MissingStatisticError, TGAdamW
from truegrad.optim.tglaprop import TGLaProp, TGRMSProp
from truegrad.optim.weight_decay import (
    L1WeightDecay,
    L2WeightDecay,
    LpWeightDecay,
    WeightDecayBase,
    WeightDecayChain,
    WeightDecayToEMA,
    WeightDecayToInit,
    WeightDecayToValue,
)

__all__ = [
    "Graft",
    "L1WeightDecay",
    "L2WeightDecay",
    "LpWeightDecay",
    "MissingStatisticError",
    "Sign",
    "TGAdamW",
    "TGLaProp",
    "TGRMSProp",
    "WeightDecayBase",
    "WeightDecayChain",
    "WeightDecayToEMA",
    "WeightDecayToInit",
    "WeightDecayToValue",
]
