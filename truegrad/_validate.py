"""Argument checks shared by the public entry points.

Every check raises with a message of one form,
``"<owner>: <name> must be <what is valid>, got <repr of the value> (<its type>)"``:

* ``TypeError`` for a value of the wrong type: a string, ``None`` or an int where a bool is
  expected, a bool or a string where a number is, ...;
* ``ValueError`` for a value of the right type that is out of range (NaN included) or not
  one of the valid choices, which the message lists.

A check only reads its value and returns it normalised (a number as ``float``/``int``, a bool
as ``bool``): callers check every argument before they change anything.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_int",
    "check_module",
    "check_number",
    "describe",
    "short_repr",
]

_MAX_REPR = 80


def short_repr(value: Any) -> str:
    """``repr(value)``, shortened to about one line."""
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def describe(value: Any) -> str:
    """``repr(value)`` (shortened) and its type: ``'x' (str)``."""
    text = short_repr(value)
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{text} ({name})"


def _fail(error: type[Exception], owner: str, name: str, expected: str, value: Any) -> Exception:
    return error(f"{owner}: {name} must be {expected}, got {describe(value)}")


def _is_bool(value: Any) -> bool:
    """A real bool: ``bool`` or numpy's ``bool_`` (never a truthy string or an int)."""
    if isinstance(value, bool):
        return True
    kind = type(value)
    return kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")


def check_bool(owner: str, name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """``value`` as a ``bool`` (``bool`` or ``numpy.bool_``; ``None`` if ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not _is_bool(value):
        expected = "True, False or None" if allow_none else "True or False (a bool)"
        raise _fail(TypeError, owner, name, expected, value)
    return bool(value)


def _range_text(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> str:
    if low is not None and high is not None:
        return f"in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    if low is not None:
        return f"{'>=' if low_inclusive else '>'} {low:g}"
    if high is not None:
        return f"{'<=' if high_inclusive else '<'} {high:g}"
    return "finite"


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    finite: bool = True,
    allow_none: bool = False,
    kind: str = "float",
) -> float | None:
    """``value`` as a ``float``: an int or a float (numpy's included), not a bool, a string or
    a tensor; never NaN, finite unless ``finite=False``, within ``[low, high]`` (each end
    inclusive or not)."""
    if value is None and allow_none:
        return None
    where = _range_text(low, high, low_inclusive, high_inclusive)
    expected = f"a {kind} {where}" + (" or None" if allow_none else "")
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise _fail(TypeError, owner, name, expected, value)
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)):
        raise _fail(ValueError, owner, name, expected, value)
    too_low = low is not None and (number < low if low_inclusive else number <= low)
    too_high = high is not None and (number > high if high_inclusive else number >= high)
    if too_low or too_high:
        raise _fail(ValueError, owner, name, expected, value)
    return number


def check_int(
    owner: str,
    name: str,
    value: Any,
    *,
    low: int | None = None,
    high: int | None = None,
    allow_none: bool = False,
    what: str = "an int",
) -> int | None:
    """``value`` as an ``int`` (numpy's included; not a bool, a float or a string) within
    ``[low, high]``."""
    if value is None and allow_none:
        return None
    where = _range_text(low, high, True, True)
    expected = f"{what} {where}" + (" or None" if allow_none else "")
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise _fail(TypeError, owner, name, expected, value)
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise _fail(ValueError, owner, name, expected, value)
    return number


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any], *, allow_none: bool = False) -> Any:
    """``value`` if it is one of ``choices`` (compared by type and value). A value of another
    type than every choice is a ``TypeError``, an unknown one of the same type a
    ``ValueError``; both list the choices."""
    choices = tuple(choices)
    if value is None and allow_none:
        return None
    listed = ", ".join(map(repr, choices)) + (" or None" if allow_none else "")
    expected = f"one of {listed}"
    types = tuple({type(c) for c in choices})
    if not isinstance(value, types) or (_is_bool(value) and not any(_is_bool(c) for c in choices)):
        raise _fail(TypeError, owner, name, expected, value)
    if value not in choices:
        raise _fail(ValueError, owner, name, expected, value)
    return value


def check_module(owner: str, name: str, value: Any) -> torch.nn.Module:
    """``value`` if it is a ``torch.nn.Module``."""
    if not isinstance(value, torch.nn.Module):
        raise _fail(TypeError, owner, name, "a torch.nn.Module", value)
    return value


def check_callable(owner: str, name: str, value: Any, what: str = "callable") -> Callable[..., Any]:
    """``value`` if it is callable."""
    if not callable(value):
        raise _fail(TypeError, owner, name, what, value)
    return value
