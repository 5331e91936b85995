"""``torch.nn.functional`` counterparts with the same signatures that also write
``sum_grad_squared`` of the parameters they are given (trainable leaf tensors).

Custom modules that call ``F.linear(x, self.weight)`` can switch to
``truegrad.nn.functional.linear(x, self.weight)``. A weight that is not a trainable
leaf (a computed tensor) gets its gradient as usual and no statistic.
"""

from truegrad.nn.rules.linear import linear

__all__ = ["linear"]
