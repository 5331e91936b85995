"""PyTorch Lightning integration of truegrad (needs the ``lightning`` extra).

* :class:`TrueGradCallback`: converts the model at setup and makes ``p.sum_grad_squared``
  right under accumulation, mixed precision, clipping and DDP (docs/statistic.md section 3).
* :func:`configure_optimizers`: TGAdamW (or any optimizer) with decay/no-decay groups and a
  warmup + cosine schedule, for ``LightningModule.configure_optimizers``.
* :func:`fix_statistics`: the same per-step fix-up for Lightning Fabric loops.
"""

from __future__ import annotations

from truegrad._optional import require

require("lightning.pytorch", "lightning", purpose="truegrad_lightning")

from truegrad_lightning.callback import TrueGradCallback  # noqa: E402
from truegrad_lightning.fabric import fix_statistics  # noqa: E402
from truegrad_lightning.optimizers import configure_optimizers, lr_factor, param_groups  # noqa: E402

__all__: list[str] = [
    "TrueGradCallback",
    "configure_optimizers",
    "fix_statistics",
    "lr_factor",
    "param_groups",
]
