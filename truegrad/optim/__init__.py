"""Optimizers that read ``p.sum_grad_squared``."""

from truegrad.optim.tgadamw import MissingStatisticError, TGAdamW

__all__ = ["MissingStatisticError", "TGAdamW"]
