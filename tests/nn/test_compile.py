"""torch.compile of a model built from truegrad.nn runs and gives eager's statistic."""

from __future__ import annotations

import torch

from truegrad import nn, statistic


def test_compiled_model_gives_the_eager_statistic() -> None:
    model = torch.nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), torch.nn.GELU(), torch.nn.Flatten(1), nn.Linear(4 * 5 * 5, 3)
    )
    x = torch.randn(6, 2, 5, 5)
    model(x).square().mean().backward()
    eager = {n: (p.grad.clone(), p.sum_grad_squared.clone()) for n, p in model.named_parameters()}
    model.zero_grad()
    statistic.clear(model.parameters())

    compiled = torch.compile(model, backend="aot_eager")  # aot_eager: no C++ toolchain needed
    for _ in range(2):  # second call runs the cached graph
        model.zero_grad()
        statistic.clear(model.parameters())
        compiled(x).square().mean().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, eager[name][0], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(p.sum_grad_squared, eager[name][1], rtol=1e-6, atol=1e-9)


def test_compiled_zoo_models_give_the_eager_statistic() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from zoo import ZOO

    from truegrad.utils import convert

    for name in ("gpt", "transformer"):  # tied embeddings, RMSNorm, MHA, LayerNorm
        entry = ZOO[name]
        model = entry.build()
        convert(model)
        x, y = entry.inputs(), entry.targets()
        entry.loss(model(x), y).backward()
        eager = {n: p.sum_grad_squared.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        statistic.clear(model.parameters())
        entry.loss(torch.compile(model, backend="aot_eager")(x), y).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.sum_grad_squared, eager[n], rtol=1e-5, atol=1e-12, msg=f"{name}: {n}")
