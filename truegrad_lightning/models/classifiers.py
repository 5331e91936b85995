"""Image classifiers for the built-in digits data: an MLP and a small CNN.

Both take images ``(N, C, H, W)`` (the MLP also flat ``(N, F)`` inputs), return logits
``(N, num_classes)``, train with the mean cross-entropy (the reduction the statistic's
docs/statistic.md assumes) and log ``train_loss``/``train_acc``, ``val_loss``/``val_acc`` and
``test_loss``/``test_acc`` (``torchmetrics`` multiclass accuracy). Layers are plain
``torch.nn`` modules: every truegrad backend converts them, BackPack included.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from truegrad.optim import TGAdamW
from truegrad_lightning.models.base import TrueGradModule

__all__ = ["CNNClassifier", "Classifier", "MLPClassifier"]

Activation = Literal["relu", "gelu", "tanh"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class Classifier(TrueGradModule):
    """Training, validation, test and predict steps of a classifier ``self.net``.

    ``batch`` is ``(inputs, targets)`` with integer targets ``(N,)``; ``predict_step``
    returns the predicted classes ``(N,)``, and :meth:`prediction_rows` the rows ``predict``
    writes to its CSV file. ``val_loss``/``test_loss`` are averaged over all ranks under DDP
    (``sync_dist=True``), as the accuracies are.
    """

    net: nn.Module

    def __init__(
        self,
        num_classes: int,
        optimizer: OptimizerCallable = TGAdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        if num_classes < 2:
            raise ValueError(f"{type(self).__name__}: num_classes={num_classes} must be >= 2")
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        accuracy(logits.detach(), y)
        on_step = stage == "train"
        # validation/test losses are averaged over every rank (DDP); the accuracy metric
        # object syncs itself when it is computed at the end of the epoch
        self.log(
            f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True,
            sync_dist=stage != "train",
        )
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(-1)

    @torch.no_grad()
    def prediction_rows(
        self, batch: tuple[torch.Tensor, torch.Tensor] | torch.Tensor, predictions: torch.Tensor
    ) -> list[dict[str, int | float]]:
        """One row per sample for :class:`~truegrad_lightning.predictions.PredictionCSVWriter`:
        ``target`` (when the batch has targets), ``predicted`` (the class ``predict_step``
        returned) and ``probability`` (its softmax probability)."""
        has_targets = isinstance(batch, (tuple, list)) and len(batch) > 1
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = torch.softmax(self(x).float(), dim=-1)
        predicted = predictions.reshape(-1).long()
        chosen = probs.gather(1, predicted[:, None])[:, 0].tolist()
        rows: list[dict[str, int | float]] = []
        for i, (cls, p) in enumerate(zip(predicted.tolist(), chosen)):
            row: dict[str, int | float] = {"target": int(batch[1][i])} if has_targets else {}
            row.update(predicted=cls, probability=round(p, 6))
            rows.append(row)
        return rows


class MLPClassifier(Classifier):
    """Flatten, then ``Linear -> activation (-> Dropout)`` per hidden size, then a
    ``Linear`` to the logits.

    Args:
        in_features: input features after flattening (64 for 8x8 digits).
        hidden_sizes: width of each hidden layer.
        num_classes: number of classes.
        activation: ``"relu"``, ``"gelu"`` or ``"tanh"``.
        dropout: dropout probability after each hidden activation.
        optimizer, lr_scheduler: see :class:`~truegrad_lightning.models.TrueGradModule`.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden_sizes: tuple[int, ...] = (128, 128),
        num_classes: int = 10,
        activation: Activation = "relu",
        dropout: float = 0.0,
        optimizer: OptimizerCallable = TGAdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        _check_probability(self, "dropout", dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)


class CNNClassifier(Classifier):
    """Per entry of ``channels``: ``Conv2d(k, padding k//2) (-> norm) -> ReLU ->
    MaxPool2d(2)``; then flatten ``(N, channels[-1] * (input_size / 2**len(channels))**2)``
    and a ``Linear`` to the logits. On 8x8 digits with the defaults: 8 -> 4 -> 2.

    Args:
        in_channels: channels of the input images.
        input_size: height (= width) of the input images; must be divisible by
            ``2**len(channels)``.
        channels: output channels of each conv block.
        num_classes: number of classes.
        kernel_size: odd conv kernel size.
        norm: ``"none"``, ``"batch"`` (BatchNorm2d; its statistic is the layer-level
            per-sample split, docs/statistic.md section 1) or ``"group"`` (GroupNorm, 8 groups
            or fewer).
        dropout: dropout probability before the last layer.
        optimizer, lr_scheduler: see :class:`~truegrad_lightning.models.TrueGradModule`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        input_size: int = 8,
        channels: tuple[int, ...] = (32, 64),
        num_classes: int = 10,
        kernel_size: int = 3,
        norm: Literal["none", "batch", "group"] = "none",
        dropout: float = 0.0,
        optimizer: OptimizerCallable = TGAdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        _check_probability(self, "dropout", dropout)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"CNNClassifier: kernel_size={kernel_size} must be odd and >= 1")
        if not channels or input_size % 2 ** len(channels):
            raise ValueError(
                f"CNNClassifier: input_size={input_size} must be divisible by "
                f"2**len(channels) = {2 ** len(channels)} (channels={tuple(channels)})"
            )
        layers: list[nn.Module] = []
        width = in_channels
        for c in channels:
            layers.append(nn.Conv2d(width, c, kernel_size, padding=kernel_size // 2, bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(c))
            elif norm == "group":
                layers.append(nn.GroupNorm(_groups(c), c))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            width = c
        side = input_size // 2 ** len(channels)
        layers.append(nn.Flatten())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width * side * side, num_classes))
        self.net = nn.Sequential(*layers)


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def _check_probability(module: nn.Module, name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{type(module).__name__}: {name}={value} must be in [0, 1)")
