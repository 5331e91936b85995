"""The exact oracles of truegrad.testing cross-checked against each other and against autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from truegrad import statistic, testing


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


MODELS = {"mlp": (mlp, (6,)), "cnn": (cnn, (2, 8, 8))}


def _loss(reduction: str):
    return lambda out, target: nn.functional.cross_entropy(out, target, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_func_oracle_equals_loop_oracle_and_sums_to_grad(name: str, reduction: str) -> None:
    build, shape = MODELS[name]
    model = build().double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    loss_fn = _loss(reduction)
    by_func = testing.per_sample_grads(model, loss_fn, x, y)
    by_loop = testing.per_sample_grads_loop(model, loss_fn, x, y)
    by_chunks = testing.per_sample_grads(model, loss_fn, x, y, chunk_size=2)
    model.zero_grad()
    loss_fn(model(x), y).backward()
    assert set(by_func) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert by_func[n].shape == (5, *p.shape)
        torch.testing.assert_close(by_func[n], by_loop[n], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(by_chunks[n], by_func[n], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(by_func[n].sum(0), p.grad, rtol=1e-12, atol=1e-14)


def test_mean_loss_puts_one_over_n_into_every_sample() -> None:
    model = mlp().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    mean = testing.per_sample_grads(model, _loss("mean"), x, y)
    total = testing.per_sample_grads(model, _loss("sum"), x, y)
    for n in mean:
        torch.testing.assert_close(mean[n] * 4, total[n], rtol=1e-12, atol=1e-14)


def test_statistic_closed_form_for_a_linear_layer() -> None:
    # y = W x, loss = sum(y): g_n = 1 x_n^T, so sum_n g_n**2 = sum_n x_n**2 per column.
    layer = nn.Linear(3, 2, bias=False).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    result = testing.sum_grad_squared_oracle(layer, lambda out, _: out.sum(), x)
    expected = (x**2).sum(0).expand(2, 3)
    torch.testing.assert_close(result.sum_grad_squared["weight"], expected, rtol=1e-12, atol=0)
    assert result.sum_grad_squared["weight"].dtype == torch.float64


def test_single_sample_statistic_is_grad_squared_and_cauchy_schwarz() -> None:
    model = cnn()
    for n_samples in (1, 6):
        x = torch.randn(n_samples, 2, 8, 8)
        y = torch.randint(0, 3, (n_samples,))
        result = testing.sum_grad_squared_oracle(model, _loss("mean"), x, y)
        for name, s in result.sum_grad_squared.items():
            g2 = result.grad[name] ** 2
            assert s.dtype == torch.float32 and (s >= 0).all()
            if n_samples == 1:
                torch.testing.assert_close(s, g2, rtol=1e-5, atol=1e-12)
            else:
                assert (n_samples * s >= g2 * (1 - 1e-5) - 1e-12).all(), name


def test_keyword_inputs_tuple_outputs_tied_and_frozen_parameters() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 10, bias=False)
            self.proj.weight = self.emb.weight  # tied
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

        def forward(self, ids: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.frozen(self.emb(ids)) * scale[:, None, None]
            return self.proj(h), h

    model = Tied().double()
    ids = torch.randint(0, 10, (3, 5))
    scale = torch.rand(3, dtype=torch.float64)

    def loss_fn(out, target):
        logits, hidden = out
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()) + hidden.square().mean()

    target = torch.randint(0, 10, (3, 5))
    inputs = {"ids": ids, "scale": scale}
    by_func = testing.per_sample_grads(model, loss_fn, inputs, target)
    by_loop = testing.per_sample_grads_loop(model, loss_fn, inputs, target)
    assert set(by_func) == {"emb.weight"}  # tied counted once, frozen left out
    torch.testing.assert_close(by_func["emb.weight"], by_loop["emb.weight"], rtol=1e-12, atol=1e-14)
    model.zero_grad()
    loss_fn(model(**inputs), target).backward()
    torch.testing.assert_close(by_func["emb.weight"].sum(0), model.emb.weight.grad, rtol=1e-12, atol=1e-14)


def test_batch_dim_other_than_zero() -> None:
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)  # (T, B, D): samples along dim 1
    loss_fn = lambda out, _: out.square().sum()  # noqa: E731
    by_func = testing.per_sample_grads(layer, loss_fn, x, batch_dim=1)
    by_loop = testing.per_sample_grads_loop(layer, loss_fn, x, batch_dim=1)
    assert by_func["weight"].shape == (5, 2, 3)
    torch.testing.assert_close(by_func["weight"], by_loop["weight"], rtol=1e-12, atol=1e-14)
    x0 = x.transpose(0, 1)
    direct = testing.per_sample_grads(layer, loss_fn, x0)
    torch.testing.assert_close(by_func["weight"], direct["weight"], rtol=1e-12, atol=1e-14)


def test_batchnorm_in_training_mode_is_rejected_with_the_module_name() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in training mode"):
        testing.per_sample_grads(model, lambda o, _: o.sum(), torch.randn(4, 3))
    model.eval()
    testing.per_sample_grads(model, lambda o, _: o.sum(), torch.randn(4, 3))


def test_layer_level_oracle_sums_squares() -> None:
    per_sample = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    torch.testing.assert_close(testing.layer_sum_grad_squared(per_sample), torch.tensor([10.0, 4.25]))


def _set_exact_statistic(model: nn.Module, loss_fn, x, y) -> None:
    result = testing.sum_grad_squared_oracle(model, loss_fn, x, y)
    for n, p in model.named_parameters():
        p.grad = result.grad[n].clone()
        statistic.add(p, result.sum_grad_squared[n])


def test_assert_matches_oracle_passes_and_lists_every_mismatch() -> None:
    model = mlp()
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    loss_fn = _loss("mean")
    _set_exact_statistic(model, loss_fn, x, y)
    testing.assert_matches_oracle(model, loss_fn, x, y, run_backward=False)

    statistic.scale_([model[0].weight], 1.01)  # 1% off
    model[4].bias.sum_grad_squared = None  # missing
    model[2].weight.grad.mul_(2)  # wrong grad
    with pytest.raises(AssertionError) as info:
        testing.assert_matches_oracle(model, loss_fn, x, y, run_backward=False)
    message = str(info.value)
    assert message.startswith("3 mismatch(es)")
    assert "0.weight: sum_grad_squared relative error 1.0" in message
    assert "4.bias: has no sum_grad_squared" in message
    assert "2.weight: grad relative error" in message


def test_assert_matches_oracle_runs_backward_on_plain_torch_and_reports_missing() -> None:
    model = mlp()
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    with pytest.raises(AssertionError, match=r"6 mismatch\(es\)"):
        testing.assert_matches_oracle(model, _loss("mean"), x, y)  # plain torch: no statistic
    # ... yet plain torch's grads match the oracle's sum of per-sample grads.
    assert testing.compare_to_oracle(
        model, testing.sum_grad_squared_oracle(model, _loss("mean"), x, y), params=[]
    ) == []
    result = testing.sum_grad_squared_oracle(model, _loss("mean"), x, y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, result.grad[n], rtol=1e-5, atol=1e-7)


def test_oracle_leaves_a_module_registered_twice_intact() -> None:
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    x = torch.randn(4, 3)
    by_func = testing.per_sample_grads(model, lambda o, _: o.square().mean(), x)
    by_loop = testing.per_sample_grads_loop(model, lambda o, _: o.square().mean(), x)
    assert type(layer.weight) is nn.Parameter and model(x).requires_grad
    torch.testing.assert_close(by_func["0.weight"], by_loop["0.weight"], rtol=1e-5, atol=1e-7)


def test_batchnorm_without_running_statistics_is_rejected_in_eval_mode_too() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\) has no running statistics"):
        testing.sum_grad_squared_oracle(model, lambda o, _: o.sum(), torch.randn(2, 1, 3, 3))
