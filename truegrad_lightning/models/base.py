"""The base of the built-in models: the optimizer and schedule come in as callables and
are built in ``configure_optimizers``, after :class:`~truegrad_lightning.TrueGradCallback`
converted the model and after ``configure_model`` built it."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable, ReduceLROnPlateau
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch.optim import Optimizer

from truegrad.optim import TGAdamW
from truegrad_lightning.optimizers import param_groups
from truegrad_lightning.schedules import WarmupCosineLR

__all__ = ["TrueGradModule"]


class TrueGradModule(pl.LightningModule):
    """A LightningModule whose optimizer and learning-rate schedule are callables.

    ``LightningCLI(auto_configure_optimizers=False)`` gives them from YAML
    (``model.optimizer`` / ``model.lr_scheduler`` as ``class_path`` + ``init_args``,
    validated against the optimizer's signature). Building the optimizer in
    ``configure_optimizers`` rather than when the CLI starts means it is built after
    ``configure_model`` and after the model's conversion.

    The optimizer gets two parameter groups (:func:`truegrad_lightning.param_groups`):
    ``"decay"`` takes the optimizer's own ``weight_decay`` (from its ``init_args``) and
    ``"no_decay"`` (biases, norm weights, every parameter with fewer than 2 dims) gets
    0. A :class:`~truegrad_lightning.schedules.WarmupCosineLR` without ``total_steps``
    is given ``trainer.estimated_stepping_batches`` and steps per optimizer step; any
    other scheduler steps per epoch, and Lightning's ``ReduceLROnPlateau`` monitors its
    ``monitor``.

    Args:
        optimizer: ``params -> Optimizer``; default :class:`~truegrad.optim.TGAdamW`
            with its defaults.
        lr_scheduler: ``optimizer -> LRScheduler``, or ``None`` for a constant rate.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = TGAdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    def configure_optimizers(self) -> Optimizer | OptimizerLRSchedulerConfig:
        groups: list[dict[str, Any]] = param_groups(self, weight_decay=0.0)
        if not groups:
            raise ValueError(f"{type(self).__name__} has no trainable parameters")
        for group in groups:
            if group["name"] == "decay":
                del group["weight_decay"]  # the optimizer's configured default applies
        optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, WarmupCosineLR):
            if scheduler.total_steps is None:
                total = self.trainer.estimated_stepping_batches
                if not math.isfinite(total):
                    raise ValueError(
                        "WarmupCosineLR needs the length of training, but it is unbounded "
                        f"(estimated_stepping_batches={total}): set trainer.max_steps or "
                        "trainer.max_epochs, or lr_scheduler.init_args.total_steps"
                    )
                scheduler.set_total_steps(int(total))
            config["interval"] = "step"
        elif isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = scheduler.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}  # type: ignore[typeddict-item]
