"""``CharDataModule``: character-level language modelling on text that ships with Python.

No download: the corpus is either the Python documentation topics of the standard library's
``pydoc_data.topics`` module (several hundred KB of English prose and code) or the Zen of
Python (the ``this`` module, 856 characters; only useful for tiny tests).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import math
from typing import Literal, get_args

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from truegrad_lightning.data._loading import make_loader

__all__ = ["CharDataModule", "CharWindows", "Corpus", "load_corpus"]

Corpus = Literal["python_docs", "zen"]
_CORPORA: tuple[str, ...] = get_args(Corpus)


def load_corpus(corpus: Corpus) -> str:
    """The full text of ``corpus`` (no truncation).

    * ``"python_docs"``: the values of ``pydoc_data.topics.topics`` joined (no separator)
      in sorted-key order; its length depends on the Python version (464,970 characters
      on CPython 3.11.7).
    * ``"zen"``: the Zen of Python, ``codecs.decode(this.s, "rot13")`` (856 characters,
      45 distinct); importing ``this`` prints it, so stdout is redirected meanwhile.
    """
    if corpus == "python_docs":
        from pydoc_data.topics import topics

        return "".join(topics[key] for key in sorted(topics))
    if corpus == "zen":
        with contextlib.redirect_stdout(io.StringIO()):
            import this
        return codecs.decode(this.s, "rot13")
    raise ValueError(f"corpus must be one of {_CORPORA}, got {corpus!r}")


def _num_windows(length: int, block_size: int, stride: int) -> int:
    return max(0, (length - block_size - 1) // stride + 1)


class CharWindows(Dataset):
    """Windows of a 1-D ``int64`` id tensor for next-token prediction.

    Item ``k`` is ``(x, y)`` with ``i = k * stride``, ``x = ids[i : i + block_size]`` and
    ``y = ids[i + 1 : i + block_size + 1]`` (both ``int64`` of shape ``(block_size,)``);
    there are ``(len(ids) - block_size - 1) // stride + 1`` items (0 if ``len(ids) <=
    block_size``). Windows never read past the end of ``ids``.
    """

    def __init__(self, ids: Tensor, block_size: int, stride: int) -> None:
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.ids = ids
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return _num_windows(len(self.ids), self.block_size, self.stride)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"window {index} out of range for {n} windows")
        i = index * self.stride
        window = self.ids[i : i + self.block_size + 1]
        return window[:-1], window[1:]


class CharDataModule(LightningDataModule):
    """Character-level language modelling on a corpus bundled with Python.

    The text is ``load_corpus(corpus)[:max_chars]``; the vocabulary is the sorted set of
    its characters (id ``k`` is the ``k``-th smallest code point), so :attr:`vocab_size`
    is known right after ``__init__`` (LightningCLI can link ``data.vocab_size`` to the
    model with ``apply_on="instantiate"``). The whole corpus is encoded in ``__init__``.

    The split is contiguous: the first ``n - n_val`` characters are the training text and
    the last ``n_val = floor(val_fraction * n + 0.5)`` the validation text; windows never
    cross the boundary, so no training target appears in a validation window.

    Batches are ``(x, y)``, both ``int64`` of shape ``(B, block_size)``, with ``y`` ``x``
    shifted left by one character (see :class:`CharWindows`). Training windows start every
    ``train_stride`` characters (default ``block_size // 2``: half-overlapping); validation
    windows every ``block_size`` characters (non-overlapping). :meth:`train_dataloader`
    shuffles with a ``torch.Generator`` seeded with ``seed`` (deterministic order for a
    fixed ``seed``); the test and predict loaders give the validation windows.

    Sizes:

    * defaults (``corpus="python_docs", block_size=128, val_fraction=0.1,
      max_chars=200_000``): 200,000 characters (180,000 train / 20,000 val), 2,811
      training and 156 validation windows; ``vocab_size`` depends on the Python version's
      documentation text (100 on CPython 3.11.7);
    * ``corpus="zen", block_size=16`` (other arguments default): 856 characters (770 / 86),
      ``vocab_size`` 45, 95 training and 5 validation windows.

    With the Zen corpus the default ``block_size=128`` is too large for its 86-character
    validation text, which raises ``ValueError``.

    Args:
        corpus: ``"python_docs"`` or ``"zen"`` (see :func:`load_corpus`).
        block_size: characters per sample (>= 1).
        batch_size: samples per batch (>= 1).
        val_fraction: fraction of the characters in the validation text, in (0, 1).
        max_chars: keep only the first ``max_chars`` characters (>= 1); ``None`` keeps all.
        seed: seeds the training-loader shuffle.
        num_workers: ``DataLoader`` worker processes (>= 0).
        train_stride: distance between training window starts (>= 1); ``None`` means
            ``max(1, block_size // 2)``.
    """

    def __init__(
        self,
        corpus: Corpus = "python_docs",
        block_size: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        max_chars: int | None = 200_000,
        seed: int = 0,
        num_workers: int = 0,
        train_stride: int | None = None,
    ) -> None:
        super().__init__()
        if corpus not in _CORPORA:
            raise ValueError(f"corpus must be one of {_CORPORA}, got {corpus!r}")
        for name, value, low in (
            ("block_size", block_size, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if max_chars is not None and (
            isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1
        ):
            raise ValueError(f"max_chars must be an integer >= 1 or None, got {max_chars!r}")
        if train_stride is not None and (
            isinstance(train_stride, bool) or not isinstance(train_stride, int) or train_stride < 1
        ):
            raise ValueError(f"train_stride must be an integer >= 1 or None, got {train_stride!r}")
        self.save_hyperparameters()
        self.corpus = corpus
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.max_chars = max_chars
        self.seed = int(seed)
        self.num_workers = num_workers
        self.train_stride = max(1, block_size // 2) if train_stride is None else train_stride

        text = load_corpus(corpus)
        #: the (truncated) corpus
        self.text: str = text if max_chars is None else text[:max_chars]
        #: id -> character
        self.itos: list[str] = sorted(set(self.text))
        #: character -> id
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}
        self._codes = np.array([ord(c) for c in self.itos], dtype=np.int64)
        #: the whole corpus encoded, ``int64`` of shape ``(len(text),)``
        self.ids: Tensor = self.encode(self.text)

        n = len(self.ids)
        n_val = math.floor(self.val_fraction * n + 0.5)
        #: the training text, ``ids[: n - n_val]``, and the validation text, ``ids[n - n_val :]``
        self.train_ids: Tensor = self.ids[: n - n_val]
        self.val_ids: Tensor = self.ids[n - n_val :]
        for split, ids in (("training", self.train_ids), ("validation", self.val_ids)):
            if len(ids) < block_size + 1:
                raise ValueError(
                    f"block_size={block_size} is too large: the {split} text of corpus "
                    f"{corpus!r} has {len(ids)} characters, fewer than block_size + 1"
                )
        self._train = CharWindows(self.train_ids, block_size, self.train_stride)
        self._val = CharWindows(self.val_ids, block_size, block_size)

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters in the (truncated) corpus."""
        return len(self.itos)

    def encode(self, text: str) -> Tensor:
        """Character ids of ``text``: ``int64`` of shape ``(len(text),)``.

        Raises ``ValueError`` naming the first character that is not in the vocabulary.
        """
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codes, codes)
        found = self._codes[np.minimum(ids, len(self._codes) - 1)]
        bad = (ids >= len(self._codes)) | (found != codes)
        if bad.any():
            char = text[int(np.flatnonzero(bad)[0])]
            raise ValueError(
                f"character {char!r} is not in the vocabulary of corpus {self.corpus!r}"
            )
        return torch.from_numpy(ids)

    def decode(self, ids: Tensor | list[int]) -> str:
        """The text of a 1-D sequence of ids (a tensor of any integer dtype, or a list)."""
        if isinstance(ids, Tensor):
            if ids.dim() > 1:
                raise ValueError(f"ids must be 0-D or 1-D, got shape {tuple(ids.shape)}")
            ids = ids.reshape(-1).tolist()
        return "".join(self.itos[i] for i in ids)

    @property
    def train_dataset(self) -> CharWindows:
        """Training windows (stride ``train_stride``)."""
        return self._train

    @property
    def val_dataset(self) -> CharWindows:
        """Validation windows (stride ``block_size``, non-overlapping)."""
        return self._val

    def _loader(self, dataset: CharWindows, shuffle: bool = False) -> DataLoader:
        seed = self.seed if shuffle else None
        return make_loader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, shuffle_seed=seed
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training windows, order fixed by ``seed``."""
        return self._loader(self._train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation windows, in text order."""
        return self._loader(self._val)

    def test_dataloader(self) -> DataLoader:
        """The validation windows (there is no separate test text)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The validation windows."""
        return self.val_dataloader()
