"""``DigitsDataModule``: scikit-learn's bundled 8x8 handwritten digits (no download).

The data (1,797 greyscale 8x8 images of the digits 0-9, pixel values 0..16) ship inside
scikit-learn (``sklearn.datasets.load_digits``), so this module works offline; it needs the
``lightning`` extra, which installs scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from truegrad._optional import require
from truegrad_lightning.data._loading import make_loader

__all__ = ["DigitsDataModule", "stratified_split"]


def _largest_remainder(counts: Sequence[int], fraction: float, total: int) -> list[int]:
    """Per-class sizes ``floor(fraction * count)``, topped up to sum to ``total``.

    The ``total - sum(floors)`` extra items go to the classes with the largest fractional
    remainders (ties: the lower class index first), so the split is stratified and its size
    is exactly ``total``.
    """
    exact = [fraction * c for c in counts]
    sizes = [math.floor(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda k: (-(exact[k] - sizes[k]), k))
    for k in order[: total - sum(sizes)]:
        sizes[k] += 1
    return sizes


def stratified_split(
    targets: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified split of ``range(len(targets))`` into train/val/test indices.

    The validation split has exactly ``floor(val_fraction * N + 0.5)`` items and the test
    split ``floor(test_fraction * N + 0.5)``; each class contributes ``floor(fraction *
    class_count)`` items plus at most one more (largest remainder). Within each class the
    items are chosen by ``numpy.random.RandomState(seed)`` (the global RNG is untouched).
    Each returned index array is sorted (int64).
    """
    targets = np.asarray(targets)
    n = len(targets)
    classes = np.unique(targets)
    counts = [int((targets == c).sum()) for c in classes]
    n_val = math.floor(val_fraction * n + 0.5)
    n_test = math.floor(test_fraction * n + 0.5)
    val_sizes = _largest_remainder(counts, val_fraction, n_val)
    test_sizes = _largest_remainder(counts, test_fraction, n_test)
    rng = np.random.RandomState(seed)
    train, val, test = [], [], []
    for c, count, nv, nt in zip(classes, counts, val_sizes, test_sizes):
        if nv + nt >= count:
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no "
                f"training example of class {c!r} ({count} examples)"
            )
        idx = np.flatnonzero(targets == c)[rng.permutation(count)]
        test.append(idx[:nt])
        val.append(idx[nt : nt + nv])
        train.append(idx[nt + nv :])
    return tuple(np.sort(np.concatenate(part)).astype(np.int64) for part in (train, val, test))


class DigitsDataModule(LightningDataModule):
    """The 8x8 handwritten digits bundled with scikit-learn, as a ``LightningDataModule``.

    1,797 images, 10 classes (digits 0-9, 174-183 images each). Pixels are scaled to
    [0, 1] (``pixel / 16``) and then standardised with the **training split's** scalar mean
    and (population, ``correction=0``) standard deviation, stored as :attr:`mean` and
    :attr:`std`; so the training inputs have mean 0 and std 1 exactly (up to float32
    rounding), while validation/test inputs use the same affine map.

    Batches are ``(x, y)``:

    * ``x``: ``float32`` of shape ``(B, 1, 8, 8)``, or ``(B, 64)`` with ``flatten=True``;
    * ``y``: ``int64`` of shape ``(B,)`` with values in ``0..9``.

    The split is stratified and deterministic for a fixed ``seed`` (a
    ``numpy.random.RandomState(seed)``; the global RNGs are neither used nor changed). The
    validation split has ``floor(val_fraction * 1797 + 0.5)`` images and the test split
    ``floor(test_fraction * 1797 + 0.5)``, every class contributing its share rounded by the
    largest-remainder rule. Sizes:

    * defaults (``val_fraction=0.2, test_fraction=0.2``): train 1079 / val 359 / test 359;
    * ``val_fraction=0.1, test_fraction=0.2``: train 1258 / val 180 / test 359;
    * ``val_fraction=0.2, test_fraction=0.0``: train 1438 / val 359 / test 0.

    The three splits are disjoint: the validation split, which picks the best checkpoint,
    is never the split that ``test`` reports. :meth:`test_dataloader` and
    :meth:`predict_dataloader` give the test split. With ``test_fraction=0`` there is no
    test split: :meth:`test_dataloader` raises ``ValueError`` (testing on the validation
    split would report the numbers that chose the checkpoint), while
    :meth:`predict_dataloader` gives the validation split.

    :meth:`train_dataloader` shuffles with a ``torch.Generator`` seeded with ``seed``: the
    order of every epoch is deterministic for a fixed ``seed`` (each epoch still differs
    from the previous one), and the last, smaller batch is kept (``drop_last=False``).
    Validation/test/predict loaders are not shuffled.

    The data are built on the first call to :meth:`setup` or first access of
    :attr:`train_dataset`, :attr:`val_dataset` or :attr:`test_dataset` (no download,
    so :meth:`prepare_data` does nothing).

    Args:
        batch_size: samples per batch for every loader (>= 1).
        val_fraction: fraction of the images in the validation split, in (0, 1).
        test_fraction: fraction of the images in the test split, in [0, 1);
            ``val_fraction + test_fraction`` must be < 1; 0 means no test split.
        seed: seeds the split and the training-loader shuffle.
        flatten: give inputs of shape ``(64,)`` instead of ``(1, 8, 8)``.
        num_workers: ``DataLoader`` worker processes (>= 0).
    """

    #: number of classes (digits 0-9)
    num_classes: int = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        flatten: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1, got {val_fraction!r} + "
                f"{test_fraction!r} = {val_fraction + test_fraction!r}"
            )
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self.flatten = bool(flatten)
        self.num_workers = num_workers
        #: training split's mean and std of ``pixel / 16`` (set when the data are built)
        self.mean: float | None = None
        self.std: float | None = None
        self._datasets: dict[str, TensorDataset] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input: ``(1, 8, 8)``, or ``(64,)`` with ``flatten=True``."""
        return (64,) if self.flatten else (1, 8, 8)

    def _build(self) -> dict[str, TensorDataset]:
        if self._datasets is None:
            datasets = require(
                "sklearn.datasets", "lightning", purpose="truegrad_lightning.data.DigitsDataModule"
            )
            bunch = datasets.load_digits()
            images = torch.as_tensor(bunch.images, dtype=torch.float64) / 16.0  # (N, 8, 8)
            targets = torch.as_tensor(bunch.target, dtype=torch.int64)
            train, val, test = stratified_split(
                bunch.target, self.val_fraction, self.test_fraction, self.seed
            )
            train_images = images[torch.from_numpy(train)]
            self.mean = float(train_images.mean())
            self.std = float(train_images.std(correction=0))
            x = ((images - self.mean) / self.std).to(torch.float32)
            x = x.reshape(len(x), *self.input_shape)
            self._datasets = {
                name: TensorDataset(x[torch.from_numpy(i)], targets[torch.from_numpy(i)])
                for name, i in (("train", train), ("val", val), ("test", test))
            }
        return self._datasets

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits (once; later calls do nothing)."""
        self._build()

    @property
    def train_dataset(self) -> TensorDataset:
        """Training split: ``(x float32 (N, *input_shape), y int64 (N,))``."""
        return self._build()["train"]

    @property
    def val_dataset(self) -> TensorDataset:
        """Validation split: ``(x float32 (N, *input_shape), y int64 (N,))``."""
        return self._build()["val"]

    @property
    def test_dataset(self) -> TensorDataset:
        """Test split (empty, ``N = 0``, when ``test_fraction == 0``)."""
        return self._build()["test"]

    def _loader(self, dataset: TensorDataset, shuffle: bool = False) -> DataLoader:
        seed = self.seed if shuffle else None
        return make_loader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, shuffle_seed=seed
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, order fixed by ``seed``."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in split order."""
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in split order; ``ValueError`` when ``test_fraction == 0``."""
        test = self.test_dataset
        if not len(test):
            raise ValueError(
                "DigitsDataModule(test_fraction=0) has no test split, and testing on the "
                "validation split would report the numbers that picked the checkpoint: set "
                "data.init_args.test_fraction > 0 (default 0.2) and train again, or run "
                "`validate` instead"
            )
        return self._loader(test)

    def predict_dataloader(self) -> DataLoader:
        """Test batches, in split order (the validation split when ``test_fraction == 0``)."""
        test = self.test_dataset
        return self._loader(test if len(test) else self.val_dataset)
