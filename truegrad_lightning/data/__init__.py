"""Built-in ``LightningDataModule``\\ s that need no download.

* :class:`DigitsDataModule`: scikit-learn's bundled 8x8 handwritten digits (10 classes).
* :class:`CharDataModule`: character-level language modelling on Python's own
  documentation text (``pydoc_data``) or the Zen of Python.
"""

from __future__ import annotations

from truegrad_lightning.data.chars import CharDataModule
from truegrad_lightning.data.digits import DigitsDataModule

__all__ = ["CharDataModule", "DigitsDataModule"]
