"""torch.compile of a model built from truegrad.nn runs and gives eager's statistic."""

from __future__ import annotations

from typing import Any

import pytest
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


class _SeqFirst(torch.nn.Module):
    """Samples on dim 0 of the input, moved to dim 1 inside (a sequence-first LSTM), position
    embeddings without a batch dim, a flattened ``(N*T, D)`` head, a tied ``.weight`` use."""

    def __init__(self, layers: Any) -> None:
        super().__init__()
        self.rnn = layers.LSTM(4, 4)
        self.mix = layers.Linear(4, 4)
        self.norm = layers.LayerNorm(4)
        self.embed = layers.Embedding(7, 4)
        self.head = layers.Linear(4, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.rnn(x.transpose(0, 1) * 2)[0]).transpose(0, 1)
        h = torch.nn.functional.gelu(h) + self.embed(torch.arange(x.shape[1])).unsqueeze(0)
        h = self.norm(h.reshape(-1, 4)).view(h.shape) + self.embed(ids)
        tied = (h @ self.embed.weight.T).sum(-1, keepdim=True)
        return self.head(h.flatten(0, 1)).view(h.shape[0], -1, 3) + tied


def _compiled(model: torch.nn.Module, form: str) -> Any:
    if form == "torch.compile(model)":
        return torch.compile(model, backend="aot_eager")
    if form == "model.compile()":
        model.compile(backend="aot_eager")
        return model
    return torch.compile(lambda x, ids: model(x, ids) * 1.0, backend="aot_eager")


FORMS = ["torch.compile(model)", "model.compile()", "compiled function"]


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("setup", ["truegrad.nn", "truegrad.nn + auto", "torch.nn + auto", "torch.nn + nn"])
def test_every_compile_form_is_exact_or_absent_with_the_reason(setup: str, form: str) -> None:
    """docs/statistic.md §1 under torch.compile: a prepared model's forward runs eagerly, exact in
    every form; an unprepared model of truegrad.nn layers is exact through
    ``torch.compile(model)`` (its wrapper's call is the model call, the forward runs eagerly)
    and, traced in place or inside a compiled function, gives no statistic with the reason
    (the samples cannot be followed through compiled ops: it used to take dim 0 of each
    layer's input, wrong for this sequence-first model)."""
    from truegrad import parameter, testing
    from truegrad.backends import get_backend

    layers_name, _, backend = setup.partition(" + ")
    torch.manual_seed(0)
    model = _SeqFirst(nn if layers_name == "truegrad.nn" else torch.nn)
    x, ids = torch.randn(3, 5, 4), torch.randint(0, 7, (3, 5))
    loss = lambda out, _: out.square().sum()  # noqa: E731
    expected = testing.sum_grad_squared_oracle(
        testing.plain_copy(model), loss, (x, ids), method="loop"
    ).sum_grad_squared
    plain = testing.plain_copy(model)
    loss(plain(x, ids), None).backward()
    if backend:
        get_backend(backend).prepare(model)
    compiled = _compiled(model, form)
    exact = backend or form == "torch.compile(model)"
    for _ in range(2):  # the second call runs the cached graph
        model.zero_grad()
        statistic.clear(model.parameters())
        loss(compiled(x, ids), None).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, plain.get_parameter(name).grad, rtol=1e-5, atol=1e-6)
            if exact:
                torch.testing.assert_close(p.sum_grad_squared, expected[name], rtol=1e-4, atol=1e-7, msg=name)
            else:
                assert not statistic.has(p), name
                assert "torch.compile traced" in parameter.reason(p), name
