"""``PredictionCSVWriter``: ``predict`` writes its predictions to a CSV file and shows a few.

Lightning's ``predict`` keeps the predictions in memory and prints nothing but a progress bar.
This callback writes one row per predicted sample to ``predictions.csv`` (in ``output_dir``,
by default the run's log directory), prints its path in one line and the first rows as a
small table::

    predictions: lightning_logs/digits_cnn/version_0/predict/predictions.csv (359 rows, accuracy 0.9777)
    index  target  predicted  probability
        0       0          0     0.999871
        ...

The columns come from the model: a LightningModule with a ``prediction_rows(batch,
predictions)`` method returns one ``dict`` per sample (the built-in models do:
:meth:`truegrad_lightning.models.Classifier.prediction_rows` gives ``target``,
``predicted``, ``probability``; :meth:`truegrad_lightning.models.CharGPT.prediction_rows`
the end of each window and the greedy next character). For other models each sample's
output is written as it is (tensor rows as numbers or a JSON list; ``dict`` outputs one
column per key). The first column, ``index``, is the sample's position in the predict
dataset. Under DDP every rank writes its own file (``predictions-rank1.csv``, ...).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["PredictionCSVWriter", "default_rows"]


def _value(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.numel() == 1:
            x = x.item()
        else:
            return json.dumps(x.tolist())
    if isinstance(x, float):
        return round(x, 6)
    return x


def default_rows(predictions: Any, batch_size: int | None = None) -> list[dict[str, Any]]:
    """One row per sample of a model's ``predict_step`` output (models without
    ``prediction_rows``): a tensor's rows go to a ``prediction`` column, a ``dict``'s
    entries to one column each; anything else is one row with its ``str``."""
    if isinstance(predictions, torch.Tensor) and predictions.dim() >= 1:
        return [{"prediction": _value(row)} for row in predictions]
    if isinstance(predictions, dict):
        columns = {k: v for k, v in predictions.items()}
        n = next(
            (len(v) for v in columns.values() if isinstance(v, torch.Tensor) and v.dim() >= 1), None
        )
        if n is not None:
            return [
                {
                    k: _value(v[i] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v)
                    for k, v in columns.items()
                }
                for i in range(n)
            ]
        return [{k: _value(v) for k, v in columns.items()}]
    return [{"prediction": _value(predictions)}]


class PredictionCSVWriter(BasePredictionWriter):
    """Writes ``predict``'s predictions to ``<output_dir>/<filename>`` and shows ``show`` rows.

    Args:
        output_dir: the folder; ``None`` means the Trainer's ``log_dir`` (the logger's
            folder; ``default_root_dir`` without a logger).
        filename: name of the CSV file (``-rank<r>`` is added before the suffix on ranks
            other than 0 under DDP).
        show: how many rows to print after the path (0: only the path line).
    """

    def __init__(
        self, output_dir: str | None = None, filename: str = "predictions.csv", show: int = 5
    ) -> None:
        super().__init__(write_interval="batch")
        if isinstance(show, bool) or not isinstance(show, int) or show < 0:
            raise ValueError(f"show must be an integer >= 0, got {show!r}")
        if not filename or os.sep in filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        self.output_dir = output_dir
        self.filename = filename
        self.show = show
        self._rows: list[dict[str, Any]] = []
        #: the file written by the last ``predict`` (``None`` before)
        self.path: Path | None = None

    def file_path(self, trainer: Trainer) -> Path:
        """Where this rank's CSV goes."""
        folder = self.output_dir or trainer.log_dir or trainer.default_root_dir
        name = self.filename
        if trainer.world_size > 1 and trainer.global_rank > 0:
            stem, dot, suffix = name.rpartition(".")
            name = f"{stem}-rank{trainer.global_rank}.{suffix}" if dot else f"{name}-rank{trainer.global_rank}"
        return Path(folder) / name

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        make_rows = getattr(pl_module, "prediction_rows", None)
        rows = make_rows(batch, prediction) if callable(make_rows) else default_rows(prediction)
        if batch_indices is None or len(batch_indices) != len(rows):
            start = len([r for r in self._rows if r.get("_dataloader", 0) == dataloader_idx])
            batch_indices = range(start, start + len(rows))
        multiple = len(trainer.num_predict_batches) > 1
        for index, row in zip(batch_indices, rows):
            head: dict[str, Any] = {"dataloader": dataloader_idx} if multiple else {}
            head["index"] = int(index)
            self._rows.append({**head, **{k: _value(v) for k, v in row.items()}, "_dataloader": dataloader_idx})

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        rows = [{k: v for k, v in r.items() if k != "_dataloader"} for r in self._rows]
        self._rows = []
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        path = self.file_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        self.path = path
        if trainer.is_global_zero:
            print(self.summary(path, rows, columns))

    def summary(self, path: Path, rows: list[dict[str, Any]], columns: list[str]) -> str:
        """The path line (with the accuracy where ``target`` and ``predicted`` are columns)
        and the first ``show`` rows as an aligned table."""
        extra = f"{len(rows)} rows"
        if rows and "target" in columns and "predicted" in columns:
            hits = sum(r.get("target") == r.get("predicted") for r in rows)
            extra += f", accuracy {hits / len(rows):.4f}"
        lines = [f"predictions: {path} ({extra})"]
        shown = rows[: self.show]
        if shown:
            cells = [columns] + [[str(r.get(c, "")) for c in columns] for r in shown]
            widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
            for row in cells:
                lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip())
            if len(rows) > len(shown):
                lines.append(f"... ({len(rows) - len(shown)} more)")
        return "\n".join(lines)
