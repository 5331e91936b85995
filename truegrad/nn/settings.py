"""Process-wide settings of the rules (every engine backend and ``truegrad.nn``).

``chunk_bytes``
    Upper bound (default 256 MiB) on the extra memory that per-sample
    intermediates may take during one layer's backward. A Linear on ``(B, T, D)``
    needs the per-sample products ``dy_b^T x_b`` (one weight-sized matrix per
    sample); they are formed for as many samples at once as fit in the bound and
    squared and summed before the next chunk. At least one sample is always
    formed, so a single weight larger than the bound still works.

``granularity``
    ``"sample"`` (default, exact, docs/statistic.md section 1): a sample's contributions
    are summed over all of its positions before squaring. ``"position"``: every
    position (token, pixel) counts as its own sample. Cheaper in memory, but an
    *approximation*: it can be wrong by orders of magnitude where per-sample
    contributions cancel (an attention bias). Opt-in only, never the default. A module's own
    ``granularity`` attribute (``None`` by default) overrides this setting.

``bitwise_grad``
    ``False`` (default): where a layer computes ``p.grad`` together with the
    statistic more cheaply, it does, and ``p.grad`` equals torch's up to float
    rounding (a sum taken in another order), not bitwise: a Linear on ``(N, T, D)``
    and the convolutions sum the per-sample weight gradients they form anyway
    instead of running a second, batched weight-gradient matmul or convolution (the
    largest part of the extra cost on sequence models and CNNs); a Linear on 2-D
    input computes ``dy^T x`` and ``(dy**2)^T (x**2)`` as one batched matmul of two
    (on CPU, each core then runs one whole product). ``True``: every ``p.grad`` is
    computed by the very ops torch's own backward uses, bitwise torch's.

Use :func:`configure` as a context manager to change them temporarily::

    with truegrad.nn.settings.configure(chunk_bytes=64 * 2**20):
        loss.backward()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from truegrad._validate import check_bool, check_int

__all__ = [
    "Granularity",
    "bitwise_grad",
    "chunk_bytes",
    "configure",
    "granularity",
    "resolve_granularity",
]

Granularity = Literal["sample", "position"]
_GRANULARITIES = ("sample", "position")

chunk_bytes: int = 256 * 2**20
granularity: Granularity = "sample"
bitwise_grad: bool = False


def resolve_granularity(value: Granularity | None) -> Granularity:
    """Return ``value`` or, if ``None``, the process-wide setting; validate it."""
    value = granularity if value is None else value
    if value not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {value!r}")
    return value


@contextlib.contextmanager
def configure(
    *,
    chunk_bytes: int | None = None,
    granularity: Granularity | None = None,
    bitwise_grad: bool | None = None,
) -> Iterator[None]:
    """Change the settings for the duration of a ``with`` block; the previous values are
    restored on exit. Every value is checked before any is changed, so a bad one raises
    and changes nothing (``TypeError`` for a value of the wrong type, ``ValueError`` for one
    out of range or not among the choices). The settings are process-wide (backward may run on other threads,
    e.g. CUDA's autograd threads, which must see them): a block changes them for every
    thread while it lasts. Outside a ``with`` block, assign the attribute
    (``truegrad.nn.settings.bitwise_grad = True``)."""
    changes: dict[str, object] = {}
    if chunk_bytes is not None:
        changes["chunk_bytes"] = check_int(
            "settings.configure", "chunk_bytes", chunk_bytes, low=1, what="an int number of bytes"
        )
    if granularity is not None:
        changes["granularity"] = resolve_granularity(granularity)
    if bitwise_grad is not None:
        changes["bitwise_grad"] = check_bool("settings.configure", "bitwise_grad", bitwise_grad)
    global_vars = globals()
    previous = {name: global_vars[name] for name in changes}
    global_vars.update(changes)
    try:
        yield
    finally:
        global_vars.update(previous)
