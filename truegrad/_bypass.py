"""A switch that makes every truegrad backend behave as plain torch for a while.

The oracles of :mod:`truegrad.testing` run inside :func:`bypass`, so that a model
built from ``truegrad.nn`` modules is differentiated by torch's own ops only: the
reference never shares code with what it checks.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["bypass", "bypassed"]

_STATE = threading.local()


def bypassed() -> bool:
    """Whether backends must act as plain torch in this thread."""
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def bypass() -> Iterator[None]:
    """Within this context truegrad functionals call torch's ops and write no statistic."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1
