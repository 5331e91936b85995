"""Drop-in ``torch.nn`` modules whose backward also writes ``p.sum_grad_squared``.

Mix them freely with ``torch.nn``: every class subclasses its ``torch.nn``
counterpart (same constructor, parameter names and ``state_dict`` keys), so
``isinstance(m, torch.nn.Linear)`` holds and existing checkpoints load.
"""

from truegrad.nn import functional, settings
from truegrad.nn.modules import linear as _linear
from truegrad.nn.modules.linear import Linear
from truegrad.nn.rules.registry import Registry, Rule

#: Every covered ``torch.nn`` type and its ``truegrad.nn`` replacement.
REGISTRY = Registry([*_linear.RULES])

__all__ = ["REGISTRY", "Linear", "Registry", "Rule", "functional", "settings"]
