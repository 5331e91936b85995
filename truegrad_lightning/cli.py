"""The ``truegrad-lightning`` command (also ``python -m truegrad_lightning``).

A :class:`~lightning.pytorch.cli.LightningCLI` with the subcommands ``fit``, ``validate``,
``test`` and ``predict``, ``--config`` files (see ``configs/``) and ``--print_config``::

    truegrad-lightning fit --config configs/digits_cnn.yaml
    truegrad-lightning fit --config configs/digits_cnn.yaml --trainer.max_epochs=3 \
        --model.optimizer.init_args.lr=3e-3
    truegrad-lightning fit --config configs/char_gpt.yaml --print_config

Any LightningModule and LightningDataModule can be named by ``class_path``; the built-in
ones are :mod:`truegrad_lightning.models` and :mod:`truegrad_lightning.data`. The
optimizer is **not** built by the CLI (``auto_configure_optimizers=False``): models take an
``OptimizerCallable`` (default :class:`~truegrad.optim.TGAdamW`) and build it in
``configure_optimizers``, after :class:`~truegrad_lightning.TrueGradCallback` (set under
``trainer.callbacks``) converted the model and after ``configure_model``. Every value is
checked against the type hints of the class it configures before anything runs, so a
misspelt backend, a ``betas`` of the wrong length or an unknown key stops the command with
jsonargparse's message naming the field.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.loggers import CSVLogger

__all__ = ["TrueGradCLI", "fit_summary", "main"]


class TrueGradCLI(LightningCLI):
    """LightningCLI for truegrad: any model / datamodule class by ``class_path``, the
    optimizer built by the model, the config saved next to the logs, and a readable
    summary after ``fit`` (:func:`fit_summary`).

    Keyword arguments are LightningCLI's; these defaults differ: ``model_class=None``
    and ``datamodule_class=None`` (any subclass, chosen in the config),
    ``auto_configure_optimizers=False``, ``save_config_kwargs={"overwrite": True}``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": "Train with TrueGrad-AdamW (truegrad)."})
        super().__init__(*args, **kwargs)

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            sample = _sample_text(self.model, self.datamodule)
            if sample is not None:
                print(f"sample after training:\n{sample}\n")
            print(fit_summary(self.trainer))


def fit_summary(trainer: Trainer) -> str:
    """One line after ``fit``: steps, the final validation metrics, and where the
    checkpoint and the metrics CSV were written."""
    metrics = {
        name: float(value)
        for name, value in sorted(trainer.callback_metrics.items())
        if name.startswith("val_") and isinstance(value, torch.Tensor) and value.numel() == 1
    }
    shown = " ".join(
        f"{name}={value:.4f}" if math.isfinite(value) else f"{name}={value}"
        for name, value in metrics.items()
    )
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        # ddp_fork / ddp_spawn: the loops ran in the workers; weights, metrics and the
        # checkpoint path came back, the step counters did not
        parts = [f"fit done in {trainer.world_size} worker processes"]
    else:
        parts = [f"fit done: {trainer.global_step} steps, {trainer.current_epoch} epochs"]
    parts.append(shown or "no validation metrics")
    checkpoint = trainer.checkpoint_callback
    path = getattr(checkpoint, "best_model_path", "") or getattr(checkpoint, "last_model_path", "")
    parts.append(f"checkpoint: {path or 'none written'}")
    csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    if csv is not None:
        parts.append(f"metrics CSV: {csv.experiment.metrics_file_path}")
    elif trainer.loggers and trainer.loggers[0].log_dir:
        parts.append(f"logs: {trainer.loggers[0].log_dir}")
    return " | ".join(parts)


def _sample_text(model: LightningModule, datamodule: LightningDataModule | None) -> str | None:
    """200 characters sampled from a character LM after ``fit`` (``None`` for others)."""
    generate = getattr(model, "generate", None)
    decode = getattr(datamodule, "decode", None)
    encode = getattr(datamodule, "encode", None)
    if generate is None or decode is None or encode is None:
        return None
    was_training = model.training
    model.eval()
    try:
        try:
            prompt = encode("\n")[None].to(model.device)
        except (KeyError, ValueError):  # no newline in the vocabulary
            prompt = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        generator = torch.Generator(model.device).manual_seed(0)
        ids = generate(prompt, max_new_tokens=200, temperature=0.8, generator=generator)
    finally:
        model.train(was_training)
    return decode(ids[0, 1:].tolist())


def main(args: ArgsType = None) -> None:
    """Entry point of ``truegrad-lightning``; ``args`` replaces ``sys.argv[1:]``."""
    TrueGradCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
