"""Drop-in ``torch.nn`` modules whose backward also writes ``p.sum_grad_squared``.

Mix them freely with ``torch.nn``: every class subclasses its ``torch.nn``
counterpart (same constructor, parameter names and ``state_dict`` keys), so
``isinstance(m, torch.nn.Linear)`` holds and existing checkpoints load.
:data:`REGISTRY` maps each covered ``torch.nn`` type to its rule (looked up along
the MRO).
"""

from truegrad.nn import functional, settings
from truegrad.nn.modules import activation as _activation
from truegrad.nn.modules import bilinear as _bilinear
from truegrad.nn.modules import conv as _conv
from truegrad.nn.modules import embedding as _embedding
from truegrad.nn.modules import linear as _linear
from truegrad.nn.modules import normalization as _normalization
from truegrad.nn.modules import recurrent as _recurrent
from truegrad.nn.modules.activation import *  # noqa: F401,F403
from truegrad.nn.modules.bilinear import *  # noqa: F401,F403
from truegrad.nn.modules.conv import *  # noqa: F401,F403
from truegrad.nn.modules.embedding import *  # noqa: F401,F403
from truegrad.nn.modules.linear import *  # noqa: F401,F403
from truegrad.nn.modules.normalization import *  # noqa: F401,F403
from truegrad.nn.modules.recurrent import *  # noqa: F401,F403
from truegrad.nn.rules.registry import Registry, Rule

_FAMILIES = (_linear, _bilinear, _conv, _embedding, _normalization, _activation, _recurrent)

#: Every covered ``torch.nn`` type and its ``truegrad.nn`` replacement.
REGISTRY = Registry(rule for family in _FAMILIES for rule in family.RULES)

__all__ = [
    "REGISTRY",
    "Registry",
    "Rule",
    "functional",
    "settings",
    *(name for family in _FAMILIES for name in family.__all__),
]
