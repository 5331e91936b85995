"""Drop-in bilinear modules (work in progress)."""

from __future__ import annotations

from truegrad.nn.rules.registry import Rule

__all__: list[str] = []

RULES: list[Rule] = []
