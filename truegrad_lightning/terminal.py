"""What the command line prints: only what a user reads.

Lightning 2.6 prints, on every run, tips for its cloud products, a deprecation warning of its
own pytree code, a model summary with a FLOPs column of zeros (FLOPs are only counted with an
``example_input_array``), a progress bar with ``v_num`` and, when training is bounded by
``max_steps`` alone (``max_epochs=-1``), ``Epoch 0/-2``. The CLI
(:mod:`truegrad_lightning.cli`) calls :func:`quiet_lightning` once and :func:`quiet_trainer`
on each Trainer it builds; library users' own Trainers are left alone.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count

__all__ = [
    "CompactModelSummary",
    "StepsRichProgressBar",
    "fix_progress_bar",
    "quiet_lightning",
    "quiet_trainer",
]


class _NoTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ..." advertisements (litlogger, litmodels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


_FILTER = _NoTips()


def quiet_lightning() -> None:
    """No tips on Lightning's rank-zero loggers, no ``LeafSpec`` deprecation warning from
    Lightning's own pytree helper. Idempotent."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # logger=True means a CSVLogger here: Lightning's advice to install tensorboard is noise
    warnings.filterwarnings("ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed")


class StepsRichProgressBar(RichProgressBar):
    """``RichProgressBar`` without ``v_num`` and, when the number of epochs is unbounded
    (``max_epochs=-1``, training bounded by ``max_steps``), without the epoch total
    (Lightning's writes ``Epoch 0/-2``)."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            description = description.replace(f"Epoch {current_epoch}/{max_epochs - 1}", f"Epoch {current_epoch}", 1)
        return description

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class _QuietTQDMProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` without ``v_num``."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class CompactModelSummary(ModelSummary):
    """The model summary as one line: class, trainable and total parameters, size, and the
    modules in eval mode when there are any (no table of zeros)."""

    def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        params = list(pl_module.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        megabytes = sum(p.numel() * p.element_size() for p in params) / 1e6
        in_eval = sum(not m.training for m in pl_module.modules())
        text = (
            f"model: {type(pl_module).__name__}, {get_human_readable_count(trainable)} trainable "
            f"parameters of {get_human_readable_count(total)} ({get_formatted_model_size(megabytes)} MB)"
        )
        if in_eval:
            text += f", {in_eval} modules in eval mode"
        print(text)


def fix_progress_bar(trainer: Trainer) -> None:
    """Replace ``trainer``'s progress bar by :class:`StepsRichProgressBar` (or a TQDM bar
    without ``v_num``) with the same settings if it is exactly Lightning's (any other bar,
    or none, is left alone). Call it after the Trainer is built and before it runs."""
    replacements = {RichProgressBar: StepsRichProgressBar, TQDMProgressBar: _QuietTQDMProgressBar}
    for i, callback in enumerate(trainer.callbacks):
        cls = replacements.get(type(callback))
        if cls is not None:
            replacement = cls.__new__(cls)
            replacement.__dict__.update(callback.__dict__)
            trainer.callbacks[i] = replacement


def quiet_trainer(trainer: Trainer) -> None:
    """:func:`fix_progress_bar`, and Lightning's table summary (``ModelSummary`` or
    ``RichModelSummary``, exactly) replaced by :class:`CompactModelSummary` with the same
    depth."""
    fix_progress_bar(trainer)
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) in (ModelSummary, RichModelSummary):
            trainer.callbacks[i] = CompactModelSummary(max_depth=callback._max_depth)
