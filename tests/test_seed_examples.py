"""The original TrueGrad README's examples run as written (finite loops instead of
``while True``; torchvision/hub models replaced by the test zoo's equivalents)."""

from __future__ import annotations

import torch

from truegrad import statistic


def test_nn_example() -> None:
    from truegrad import nn
    from truegrad.optim import TGAdamW

    # define model by mixing truegrad.nn and torch.nn
    model = torch.nn.Sequential(nn.Linear(1, 10),
                                nn.LayerNorm([1, 10]),
                                torch.nn.ReLU(),
                                nn.Linear(10, 1))
    optim = TGAdamW(model.parameters())  # truegrad.optim.TGAdamW instead of torch.optim.AdamW

    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):  # standard training loop
        input = torch.randn((16, 1))
        model(input).mean().backward()
        assert all(statistic.has(p) for p in model.parameters())
        optim.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_layernorm_with_leading_singleton_equals_torch_layernorm_over_the_rest() -> None:
    from truegrad import nn, testing

    layer = nn.LayerNorm([1, 10])
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(16, 10)
    expected = torch.nn.functional.layer_norm(x, [10], layer.weight.view(10), layer.bias.view(10))
    assert torch.equal(layer(x), expected)
    assert layer(x[:, None, :]).shape == (16, 1, 10)  # torch's own layout still works
    testing.assert_matches_oracle(layer, lambda o, _: o.square().mean(), x)


def test_partial_truegrad_example() -> None:
    from truegrad import nn
    from truegrad.optim import TGAdamW

    model = torch.nn.Sequential(nn.Linear(1, 10),  # Weights coming from truegrad.nn
                                nn.LayerNorm([1, 10]),
                                torch.nn.ReLU(),
                                torch.nn.Linear(10, 1))  # Weights coming torch.nn

    optim = TGAdamW(model.parameters(), default_to_adam=True)

    # standard training loop
    losses = []
    for i in range(60):
        input = torch.randn((16, 1))
        loss = model(input).mean()
        loss.backward()
        assert not statistic.has(model[3].weight) and statistic.has(model[0].weight)
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    # minimising the mean output drives it down
    assert sum(losses[-10:]) < sum(losses[:10])
