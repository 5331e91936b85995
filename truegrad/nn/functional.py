"""``torch.nn.functional`` counterparts with the same signatures that also write
``sum_grad_squared`` of the parameters they are given (trainable leaf tensors).

Custom modules that call ``F.linear(x, self.weight)`` can switch to
``truegrad.nn.functional.linear(x, self.weight)``. A weight that is not a trainable
leaf (a computed tensor) gets its gradient as usual and no statistic. Each function
also accepts a keyword-only ``granularity`` (see :mod:`truegrad.nn.settings`) where
positions exist.
"""

from truegrad.nn.rules import attention as _attention
from truegrad.nn.rules import batchnorm as _batchnorm
from truegrad.nn.rules import bilinear as _bilinear
from truegrad.nn.rules import conv as _conv
from truegrad.nn.rules import embedding as _embedding
from truegrad.nn.rules import linear as _linear
from truegrad.nn.rules import normalization as _normalization
from truegrad.nn.rules import prelu as _prelu
from truegrad.nn.rules.attention import *  # noqa: F401,F403
from truegrad.nn.rules.batchnorm import *  # noqa: F401,F403
from truegrad.nn.rules.bilinear import *  # noqa: F401,F403
from truegrad.nn.rules.conv import *  # noqa: F401,F403
from truegrad.nn.rules.embedding import *  # noqa: F401,F403
from truegrad.nn.rules.linear import *  # noqa: F401,F403
from truegrad.nn.rules.normalization import *  # noqa: F401,F403
from truegrad.nn.rules.prelu import *  # noqa: F401,F403

_FAMILIES = (_linear, _bilinear, _conv, _embedding, _normalization, _batchnorm, _prelu, _attention)

__all__ = [name for family in _FAMILIES for name in family.__all__]
