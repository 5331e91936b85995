"""The ``DataLoader`` every built-in datamodule hands out."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


def make_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int, shuffle_seed: int | None = None
) -> DataLoader:
    """Batches of ``dataset`` in order, or shuffled in an order fixed by ``shuffle_seed``
    (its own generator: the global RNGs are neither read nor advanced); the last,
    shorter batch is kept."""
    generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=False,
        shuffle=shuffle_seed is not None,
        generator=generator,
    )
