"""PyTorch Lightning integration of truegrad (needs the ``lightning`` extra)."""

from __future__ import annotations

from truegrad._optional import require

require("lightning.pytorch", "lightning", purpose="truegrad_lightning")

__all__: list[str] = []
