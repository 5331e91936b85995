"""Built-in LightningModules for the CLI and the benchmarks.

* :class:`TrueGradModule`: the base; optimizer and schedule are callables (YAML).
* :class:`MLPClassifier`, :class:`CNNClassifier`: digit classifiers (``torchmetrics``
  accuracy).
* :class:`CharGPT`: a small GPT-style character language model (tied embeddings).
"""

from __future__ import annotations

from truegrad_lightning.models.base import TrueGradModule
from truegrad_lightning.models.char_gpt import CharGPT
from truegrad_lightning.models.classifiers import CNNClassifier, Classifier, MLPClassifier

__all__ = ["CNNClassifier", "CharGPT", "Classifier", "MLPClassifier", "TrueGradModule"]
