"""The statistic module: the one writer of p.sum_grad_squared (docs/statistic.md section 2)."""

from __future__ import annotations

import pytest
import torch

from truegrad import statistic


def _with_grad(p: torch.nn.Parameter) -> torch.nn.Parameter:
    """A statistic is read only beside a gradient (it lives and dies with ``p.grad``)."""
    p.grad = torch.zeros_like(p)
    return p


def test_add_creates_a_float32_copy_and_accumulates() -> None:
    p = _with_grad(torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.bfloat16)))
    c = torch.full((3, 2), 2.0, dtype=torch.bfloat16)
    statistic.add(p, c)
    s = statistic.get(p)
    assert s is not None and s.dtype == torch.float32 and s.shape == p.shape
    c.fill_(100.0)  # no aliasing of the first contribution
    assert torch.equal(s, torch.full((3, 2), 2.0))
    statistic.add(p, torch.full((3, 2), 0.5))
    assert torch.equal(statistic.get(p), torch.full((3, 2), 2.5))


def test_float64_parameter_keeps_float64() -> None:
    p = _with_grad(torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)))
    statistic.add(p, torch.ones(4, dtype=torch.float64) / 3)
    assert statistic.get(p).dtype == torch.float64
    assert statistic.get(p)[0].item() == 1 / 3


def test_add_sum_of_squares_is_exact_in_float32_for_fp16_extremes() -> None:
    p = _with_grad(torch.nn.Parameter(torch.zeros(2, dtype=torch.float16)))
    per_sample = torch.tensor([[60000.0, 1e-4], [60000.0, 1e-4]], dtype=torch.float16)
    statistic.add_sum_of_squares(p, per_sample)
    expected = 2 * per_sample[0].float() ** 2
    torch.testing.assert_close(statistic.get(p), expected, rtol=1e-6, atol=0)
    assert torch.isfinite(statistic.get(p)).all() and (statistic.get(p) > 0).all()


def test_shape_mismatch_is_a_clear_error() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"contribution of shape \(4,\) does not match .* \(3,\)"):
        statistic.add(p, torch.zeros(4))


def test_frozen_parameter_never_gets_it() -> None:
    p = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    statistic.add(p, torch.ones(3))
    assert not statistic.has(p)


def test_clear_and_scale() -> None:
    ps = [_with_grad(torch.nn.Parameter(torch.zeros(2))) for _ in range(3)]
    statistic.add(ps[0], torch.ones(2))
    statistic.add(ps[1], torch.full((2,), 3.0))
    statistic.scale_(ps, torch.tensor(0.25))
    assert torch.equal(statistic.get(ps[1]), torch.full((2,), 0.75))
    assert statistic.get(ps[2]) is None
    statistic.clear(ps)
    assert all(getattr(p, statistic.ATTRIBUTE, None) is None for p in ps)


def test_a_statistic_without_a_gradient_is_not_read() -> None:
    """Outside backward, a statistic beside no gradient describes nothing (a loaded model's,
    one whose gradient was set to None): ``get`` returns None, ``has`` is False."""
    p = _with_grad(torch.nn.Parameter(torch.zeros(2)))
    statistic.add(p, torch.ones(2))
    assert torch.equal(statistic.get(p), torch.ones(2))
    p.grad = None
    assert statistic.get(p) is None and not statistic.has(p)


def _step(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer(x).square().sum().backward()
    return layer.weight.sum_grad_squared


@pytest.mark.parametrize(
    "shape, bitwise",
    [((8, 64), True), ((4, 3, 64), False)],
    ids=["2d-matmul-out", "3d-per-sample-sum-out"],
)
def test_cleared_statistic_nobody_holds_is_reused_and_the_values_are_right(
    shape: tuple[int, ...], bitwise: bool
) -> None:
    """The squared-operand matmul (2-D input; under bitwise_grad, as the default's paired
    matmul writes a fresh pair) and the chunked per-sample sum write into the kept buffer."""
    from truegrad import nn, testing

    layer = nn.Linear(64, 32)
    x1, x2 = torch.randn(*shape), torch.randn(*shape)
    with nn.settings.configure(bitwise_grad=bitwise):
        ptr = _step(layer, x1).data_ptr()
        statistic.clear(layer.parameters())
        layer.zero_grad()
        stat = _step(layer, x2)
    assert stat.data_ptr() == ptr  # written into the kept buffer
    twin = torch.nn.Linear(64, 32)
    twin.load_state_dict(layer.state_dict())
    expected = testing.sum_grad_squared_oracle(twin, lambda o, _: o.square().sum(), x2)
    torch.testing.assert_close(stat, expected.sum_grad_squared["weight"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("holder", ["reference", "view"])
def test_a_statistic_somebody_holds_is_never_overwritten(holder: str) -> None:
    from truegrad import nn

    layer = nn.Linear(64, 32)
    first = _step(layer, torch.randn(8, 64))
    kept = first if holder == "reference" else first.view(-1)
    snapshot = kept.clone()
    del first
    statistic.clear(layer.parameters())
    layer.zero_grad()
    second = _step(layer, torch.randn(8, 64))
    assert torch.equal(kept, snapshot)
    assert second.data_ptr() != kept.data_ptr()


def test_reusable_buffer_only_for_a_matching_empty_statistic() -> None:
    p = torch.nn.Parameter(torch.zeros(3, 2))
    statistic.add(p, torch.ones(3, 2), owned=True)
    assert statistic.reusable_buffer(p, torch.float32) is None  # it has a statistic
    statistic.clear([p])
    assert statistic.reusable_buffer(p, torch.float64) is None  # wrong dtype: dropped
    statistic.add(p, torch.ones(3, 2), owned=True)
    statistic.clear([p])
    buffer = statistic.reusable_buffer(p, torch.float32)
    assert buffer is not None and buffer.shape == p.shape
    assert statistic.reusable_buffer(p, torch.float32) is None  # handed out once
