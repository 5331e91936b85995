"""docs/statistic.md section 2 invariants on whole models converted to truegrad.nn."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from truegrad import statistic
from truegrad.utils import convert

sys.path.insert(0, str(Path(__file__).parents[1]))
from zoo import ZOO  # noqa: E402

NAMES = ["mlp", "resnet", "grouped_cnn", "transformer", "gpt", "bert"]


def _run(name: str, batch: slice | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    entry = ZOO[name]
    model = entry.build()
    convert(model)
    x, y = entry.inputs(), entry.targets()
    if batch is not None:
        take = lambda t: t[batch] if isinstance(t, torch.Tensor) else t  # noqa: E731
        x = {k: take(v) for k, v in x.items()} if isinstance(x, dict) else take(x)
        y = take(y)
    out = model(**x) if isinstance(x, dict) else model(x)
    entry.loss(out, y).backward()
    return model


@pytest.mark.parametrize("name", NAMES)
def test_cauchy_schwarz_nonnegative_float32_and_shape(name: str) -> None:
    model = _run(name)
    n = 6 if name == "mlp" else (4 if name in ("resnet", "grouped_cnn", "transformer") else 3)
    for pname, p in model.named_parameters():
        s = statistic.get(p)
        if p.grad is None:  # not reached by the loss (BERT's pooler): no statistic either
            assert s is None, pname
            continue
        assert s is not None, pname
        assert s.shape == p.shape and s.dtype == torch.float32 and s.device == p.device
        assert (s >= 0).all(), pname
        slack = 1e-5 * (p.grad**2) + 1e-12
        assert (n * s >= p.grad**2 - slack).all(), pname


@pytest.mark.parametrize("name", NAMES)
def test_one_sample_statistic_is_grad_squared(name: str) -> None:
    model = _run(name, batch=slice(0, 1))
    for pname, p in model.named_parameters():
        if p.grad is None:
            continue
        torch.testing.assert_close(statistic.get(p), p.grad**2, rtol=1e-4, atol=1e-10, msg=pname)
