"""truegrad.nn.Embedding / EmbeddingBag and their functionals against torch and the exact oracle."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import warnings

import pytest
import torch

from truegrad import _bypass, nn, statistic, testing
from truegrad.nn import functional as TF
from truegrad.nn.rules import embedding as rules

from harness import Problem, check, to_torch

# torch.func has no batching rule for _embedding_bag: the oracle falls back to a loop.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

V, D = 9, 4  # a small vocabulary, so that ids repeat within and across samples


def ids(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.randint(0, V, shape, dtype=dtype)


def masked_vjp_oracle(
    model: torch.nn.Module, inputs: Any, loss_fn: Callable
) -> dict[str, torch.Tensor]:
    """g_n = VJP of the full-batch forward with the output gradient kept on sample n only.

    Independent of torch.func (which cannot vmap ``max_norm``'s in-place renorm, splits
    ``scale_grad_by_freq`` counts per sample, and cannot batch 1-D bags with offsets).
    Runs the plain-torch model, so batch-level quantities (the frequency of an id in the
    batch) are torch's own; checks that the g_n add up to torch's gradient.
    """
    with _bypass.bypass():
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        out = model(*args)
        (dy,) = torch.autograd.grad(loss_fn(out, None), out, retain_graph=True)
        squares = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        for sample in range(out.shape[0]):
            mask = torch.zeros_like(dy)
            mask[sample] = dy[sample]
            grads = torch.autograd.grad(out, list(params.values()), mask, retain_graph=True)
            for name, g in zip(params, grads):
                squares[name] += g.double().square()
                total[name] += g.double()
        full = torch.autograd.grad(out, list(params.values()), dy)
        for name, g in zip(params, full):
            torch.testing.assert_close(total[name], g.double(), rtol=1e-5, atol=1e-7)
    return {n: s.to(statistic.statistic_dtype(params[n].dtype)) for n, s in squares.items()}


class FunctionalEmbedding(torch.nn.Embedding):
    """A user's own module calling the functional API."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.embedding(
            x, self.weight, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq
        )


class FunctionalEmbeddingBag(torch.nn.EmbeddingBag):
    def forward(
        self, x: torch.Tensor, offsets: torch.Tensor | None = None, psw: torch.Tensor | None = None
    ) -> torch.Tensor:
        return TF.embedding_bag(
            x, self.weight, offsets, mode=self.mode, per_sample_weights=psw,
            padding_idx=self.padding_idx, include_last_offset=self.include_last_offset,
        )


class TiedLM(torch.nn.Module):
    """Embedding whose weight is reused as the output projection (tied input/output)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(x)))
        return TF.linear(h, self.emb.weight)


class TiedBag(torch.nn.Module):
    def __init__(self, mode: str = "sum") -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(V, D, mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.linear(torch.tanh(self.bag(x)), self.bag.weight)


class OffsetsFirst(torch.nn.Module):
    """A model over a ragged batch: bags given as flat ids and offsets. The model's samples are
    dim 0 of its first input (docs/statistic.md), so the offsets (one per bag) come first."""

    def __init__(self, bag: torch.nn.Module) -> None:
        super().__init__()
        self.bag = bag

    def forward(self, offsets: torch.Tensor, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return self.bag(x, offsets, *rest)


class ScaledBags(torch.nn.Module):
    """Bags with ``include_last_offset`` (offsets has one entry more than there are bags), each
    bag's output scaled by a per-bag input that comes first: the samples are the bags."""

    def __init__(self, bag: torch.nn.Module) -> None:
        super().__init__()
        self.bag = bag

    def forward(self, scale: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.bag(x, offsets) * scale[:, None]


OFFSETS = lambda: torch.tensor([0, 3, 3, 7, 8])  # noqa: E731  (5 bags over 11 ids, one empty)
LAST_OFFSETS = lambda: torch.tensor([0, 4, 4, 9, 11])  # noqa: E731  (include_last_offset)
MODES = ("sum", "mean", "max")
PADDED = lambda pad: torch.cat([torch.full((5, 2), pad), ids(5, 4)], 1)  # noqa: E731

PROBLEMS = [
    # Embedding: samples along dim 0, ids repeat within and across samples.
    Problem("emb-2d", lambda: nn.Embedding(V, D), lambda: ids(5, 6)),
    Problem("emb-1d", lambda: nn.Embedding(V, D), lambda: ids(7)),
    Problem("emb-3d", lambda: nn.Embedding(V, D), lambda: ids(3, 2, 4)),
    Problem("emb-int32", lambda: nn.Embedding(V, D), lambda: ids(4, 5, dtype=torch.int32)),
    Problem("emb-padding", lambda: nn.Embedding(V, D, padding_idx=0), lambda: PADDED(0)),
    Problem("emb-padding-neg", lambda: nn.Embedding(V, D, padding_idx=-1), lambda: ids(4, 6)),
    Problem("emb-linear", lambda: torch.nn.Sequential(nn.Embedding(V, D), nn.Linear(D, 3)),
            lambda: ids(4, 5)),
    Problem("emb-functional", lambda: FunctionalEmbedding(V, D, padding_idx=2), lambda: ids(4, 5)),
    Problem("tied-2d", TiedLM, lambda: ids(4, 5)),
    Problem("tied-1d", TiedLM, lambda: ids(6)),
    Problem("emb-freq", lambda: nn.Embedding(V, D, scale_grad_by_freq=True), lambda: ids(5, 6),
            layer_oracle=masked_vjp_oracle),
    Problem("emb-freq-padding", lambda: nn.Embedding(V, D, padding_idx=1, scale_grad_by_freq=True),
            lambda: ids(5, 6), layer_oracle=masked_vjp_oracle),
    Problem("emb-max-norm", lambda: nn.Embedding(V, D, max_norm=1.0), lambda: ids(4, 5),
            layer_oracle=masked_vjp_oracle),
    # EmbeddingBag: every bag (row of the output) is one sample.
    *(Problem(f"bag-{mode}-2d", lambda mode=mode: nn.EmbeddingBag(V, D, mode=mode),
              lambda: ids(5, 4))
      for mode in MODES),
    *(Problem(f"bag-{mode}-2d-padding",
              lambda mode=mode: nn.EmbeddingBag(V, D, mode=mode, padding_idx=3), lambda: PADDED(3))
      for mode in MODES),
    Problem("bag-sum-2d-psw", lambda: nn.EmbeddingBag(V, D, mode="sum"),
            lambda: (ids(5, 4), None, torch.randn(5, 4))),
    Problem("bag-linear", lambda: torch.nn.Sequential(nn.EmbeddingBag(V, D), nn.Linear(D, 3)),
            lambda: ids(5, 4)),
    Problem("bag-functional", lambda: FunctionalEmbeddingBag(V, D, mode="max"), lambda: ids(5, 4)),
    Problem("tied-bag-sum", TiedBag, lambda: ids(5, 4)),
    Problem("tied-bag-max", lambda: TiedBag("max"), lambda: ids(5, 4)),
    *(Problem(f"bag-{mode}-1d-offsets",
              lambda mode=mode: OffsetsFirst(nn.EmbeddingBag(V, D, mode=mode)),
              lambda: (OFFSETS(), ids(11)), layer_oracle=masked_vjp_oracle)
      for mode in MODES),
    *(Problem(f"bag-{mode}-1d-last-offset-padding",
              lambda mode=mode: ScaledBags(nn.EmbeddingBag(
                  V, D, mode=mode, include_last_offset=True, padding_idx=2)),
              lambda: (torch.rand(4) + 0.5, ids(11), LAST_OFFSETS()),
              layer_oracle=masked_vjp_oracle)
      for mode in MODES),
    Problem("bag-sum-1d-psw-padding",
            lambda: OffsetsFirst(nn.EmbeddingBag(V, D, mode="sum", padding_idx=0)),
            lambda: (OFFSETS(), ids(11), torch.randn(11)), layer_oracle=masked_vjp_oracle),
    Problem("bag-functional-1d-psw", lambda: OffsetsFirst(FunctionalEmbeddingBag(V, D, mode="sum")),
            lambda: (OFFSETS(), ids(11), torch.randn(11)), layer_oracle=masked_vjp_oracle),
    *(Problem(f"bag-{mode}-freq",
              lambda mode=mode: OffsetsFirst(nn.EmbeddingBag(V, D, mode=mode, scale_grad_by_freq=True)),
              lambda: (OFFSETS(), ids(11)), layer_oracle=masked_vjp_oracle)
      for mode in ("sum", "mean")),
    Problem("bag-mean-max-norm", lambda: nn.EmbeddingBag(V, D, max_norm=1.0), lambda: ids(5, 4),
            layer_oracle=masked_vjp_oracle),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("problem", PROBLEMS, ids=[p.id for p in PROBLEMS])
def test_embedding_matches_torch_and_oracle(
    problem: Problem, reduction: str, dtype: torch.dtype
) -> None:
    check(problem, reduction, dtype)


MODULES = {
    "emb": (lambda: torch.nn.Embedding(V, D, padding_idx=1), lambda: (ids(5, 6),)),
    "emb-freq": (lambda: torch.nn.Embedding(V, D, scale_grad_by_freq=True), lambda: (ids(5, 6),)),
    "emb-max-norm": (lambda: torch.nn.Embedding(V, D, max_norm=0.5), lambda: (ids(5, 6),)),
    "bag-sum-psw": (lambda: torch.nn.EmbeddingBag(V, D, mode="sum", padding_idx=0),
                    lambda: (ids(11), OFFSETS(), torch.randn(11, requires_grad=True))),
    "bag-mean-freq": (lambda: torch.nn.EmbeddingBag(V, D, scale_grad_by_freq=True),
                      lambda: (ids(5, 4),)),
    "bag-max": (lambda: torch.nn.EmbeddingBag(V, D, mode="max", include_last_offset=True),
                lambda: (ids(11), LAST_OFFSETS())),
    "bag-max-norm": (lambda: torch.nn.EmbeddingBag(V, D, mode="sum", max_norm=0.5),
                     lambda: (ids(5, 4),)),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_gradients_are_torchs_bitwise(name: str) -> None:
    """p.grad, the per_sample_weights gradient and the max_norm-renormalised weight."""
    make, inputs_fn = MODULES[name]
    torch.manual_seed(0)
    ref = make()
    ref.weight.data.mul_(2.0)  # row norms above max_norm
    ours = copy.deepcopy(ref)
    ours.__class__ = nn.REGISTRY.lookup(type(ref)).module_type  # conversion in place
    inputs = inputs_fn()
    outs = []
    for module in (ref, ours):
        args = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in inputs)
        out = module(*args)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outs.append((out, args))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(ref.weight, ours.weight)  # same in-place renorm for max_norm
    assert torch.equal(ref.weight.grad, ours.weight.grad)
    assert statistic.has(ours.weight)
    for a, b in zip(outs[0][1], outs[1][1]):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert torch.equal(a.grad, b.grad)  # per_sample_weights is an input with a gradient


def test_max_norm_renormalises_the_weight_in_place_like_torch() -> None:
    torch.manual_seed(0)
    ours = nn.Embedding(V, D, max_norm=1.0)
    ref = torch.nn.Embedding(V, D, max_norm=1.0)
    ref.load_state_dict(ours.state_dict())
    x = torch.tensor([[1, 2, 2], [5, 1, 7]])
    ours(x).sum().backward()
    ref(x).sum().backward()
    assert torch.equal(ours.weight, ref.weight)
    norms = ours.weight.detach().norm(dim=1)
    assert (norms[[1, 2, 5, 7]] <= 1.0).all() and (norms[[0, 3]] > 1.0).all()
    assert torch.equal(ours.weight.grad, ref.weight.grad)


def test_padding_row_gets_no_statistic() -> None:
    layer = nn.Embedding(V, D, padding_idx=0)
    bag = nn.EmbeddingBag(V, D, mode="mean", padding_idx=0)
    x = torch.tensor([[0, 1, 0], [2, 0, 1]])
    layer(x).square().sum().backward()
    bag(x).square().sum().backward()
    for p in (layer.weight, bag.weight):
        assert torch.equal(p.sum_grad_squared[0], torch.zeros(D))
        assert (p.sum_grad_squared[1] > 0).all()


def test_repeated_id_in_a_sample_is_summed_before_squaring() -> None:
    layer = nn.Embedding(V, D)
    x = torch.tensor([[3, 3], [3, 4]])
    layer(x).sum().backward()  # dy = 1: sample 0 gives 2 on row 3, sample 1 gives 1 on rows 3 and 4
    torch.testing.assert_close(layer.weight.sum_grad_squared[3], torch.full((D,), 5.0))
    torch.testing.assert_close(layer.weight.sum_grad_squared[4], torch.full((D,), 1.0))
    assert torch.equal(layer.weight.sum_grad_squared[0], torch.zeros(D))


def test_bag_scale_grad_by_freq_uses_torchs_own_per_row_factor() -> None:
    """torch's CPU kernel scales the i-th distinct row by 1 / count(i-th sorted id);
    the per-sample split must add up to torch's gradient whatever that factor is."""
    bag = nn.EmbeddingBag(V, D, mode="sum", scale_grad_by_freq=True)
    x = torch.tensor([1, 2, 2, 4, 0, 4, 4, 6, 1, 3])
    offsets = torch.tensor([0, 3, 3, 6])
    model = OffsetsFirst(bag)
    model(offsets, x).sum().backward()
    ref = testing.plain_copy(model)
    expected = masked_vjp_oracle(ref, (offsets, x), lambda o, _: o.sum())
    torch.testing.assert_close(bag.weight.sum_grad_squared, expected["bag.weight"])


def test_accumulates_over_two_backward_passes() -> None:
    model = torch.nn.Sequential(nn.Embedding(V, D), nn.Linear(D, 2))
    bag = nn.EmbeddingBag(V, D, mode="sum")
    x1, x2 = ids(5, 3), ids(4, 3)
    loss_fn = lambda o, _: o.square().sum()  # noqa: E731
    for m in (model, bag):
        m(x1).square().sum().backward()
        first = {n: p.sum_grad_squared.clone() for n, p in m.named_parameters()}
        m(x2).square().sum().backward()
        second = testing.sum_grad_squared_oracle(m, loss_fn, x2).sum_grad_squared
        for n, p in m.named_parameters():
            torch.testing.assert_close(
                p.sum_grad_squared, first[n] + second[n], rtol=1e-5, atol=1e-7
            )


@pytest.mark.parametrize("which", ["emb", "bag-sum", "bag-max"])
def test_chunked_and_unchunked_agree(which: str) -> None:
    """The statistic does not depend on chunk_bytes (the exact shortcut needs no chunks)."""
    make = {
        "emb": lambda: nn.Embedding(V, D),
        "bag-sum": lambda: nn.EmbeddingBag(V, D, mode="sum"),
        "bag-max": lambda: nn.EmbeddingBag(V, D, mode="max"),
    }[which]
    torch.manual_seed(0)
    model = make()
    x = ids(8, 5)
    model(x).square().sum().backward()
    whole = {n: p.sum_grad_squared.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    statistic.clear(model.parameters())
    with nn.settings.configure(chunk_bytes=2 * V * D * 4 * 2):  # 2 samples per chunk
        model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.sum_grad_squared, whole[n], rtol=1e-6, atol=0)


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_dense_per_sample_chunks_match_the_grouped_squares(chunk: int) -> None:
    """The two routes that base.contribute may take give the same exact statistic."""
    n, entries = 8, 30
    sample = torch.randint(0, n, (entries,))  # unordered, as bags of a 1-D input may be
    row = torch.randint(0, V, (entries,))
    values = torch.randn(entries, D, dtype=torch.float64)
    grouped = rules._grouped_squares(sample, row, values, V)
    dense = sum(
        rules._dense_per_sample(sample, row, values, V, s, min(n, s + chunk)).square().sum(0)
        for s in range(0, n, chunk)
    )
    per_sample = torch.zeros(n, V, D, dtype=torch.float64)
    per_sample.index_put_((sample, row), values, accumulate=True)
    torch.testing.assert_close(grouped, per_sample.square().sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense, grouped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_bytes", [16, 3 * V * D * 4 * 2], ids=["1-sample", "3-samples"])
def test_tied_over_the_memory_bound_is_exact(chunk_bytes: int) -> None:
    """The tied embedding's pending per-sample gradients do not fit the bound: both uses are
    formed chunk by chunk at the last one, exact (was: per-use squares and a warning)."""
    with nn.settings.configure(chunk_bytes=chunk_bytes), warnings.catch_warnings():
        warnings.simplefilter("error")
        testing.assert_matches_oracle(TiedLM(), lambda o, _: o.square().mean(), ids(7, 3))


def test_position_granularity_is_the_per_position_approximation() -> None:
    layer = nn.Embedding(V, D)
    layer.granularity = "position"
    x = torch.tensor([[3, 3, 4], [3, 5, 5]])
    layer(x).sum().backward()
    counts = torch.bincount(x.flatten(), minlength=V).float()
    torch.testing.assert_close(layer.weight.sum_grad_squared, counts[:, None].expand(V, D))
    with pytest.raises(ValueError, match="granularity must be one of"):
        TF.embedding(x, layer.weight, granularity="token")  # type: ignore[arg-type]


def test_bf16_autocast_statistic_close_to_float32() -> None:
    torch.manual_seed(0)
    for make, x in (
        (lambda: torch.nn.Sequential(nn.Embedding(32, 16), nn.Linear(16, 8)), ids(8, 6)),
        (lambda: torch.nn.Sequential(nn.EmbeddingBag(32, 16, mode="sum"), nn.Linear(16, 8)),
         ids(8, 6)),
    ):
        model = make()
        twin = to_torch(model)
        model(x).square().mean().backward()
        full = {n: p.sum_grad_squared.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        statistic.clear(model.parameters())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model[0](x)
            out = model[1](hidden)
            assert hidden.dtype == twin[0](x).dtype  # torch's forward dtype under autocast
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        for n, p in model.named_parameters():
            s = p.sum_grad_squared
            assert s.dtype == torch.float32 and p.grad.dtype == torch.float32
            rel = ((s - full[n]).norm() / full[n].norm()).item()
            assert rel < 2e-2, (n, rel)


def test_is_a_drop_in_subclass_with_the_same_state_dict() -> None:
    pairs = (
        (nn.Embedding(V, D, padding_idx=0), torch.nn.Embedding(V, D, padding_idx=0)),
        (nn.EmbeddingBag(V, D, mode="max"), torch.nn.EmbeddingBag(V, D, mode="max")),
    )
    for ours, ref in pairs:
        assert isinstance(ours, type(ref))
        assert ours.state_dict().keys() == ref.state_dict().keys()
        ours.load_state_dict(ref.state_dict())
        x = ids(3, 4)
        assert torch.equal(ours(x), ref(x))
        rule = nn.REGISTRY.lookup(type(ours))
        assert rule.torch_type is type(ref) and rule.parameters == ("weight",)
        assert rule.unsupported(ref) is None


def test_sparse_is_refused_with_a_clear_error() -> None:
    match = r"sparse=True.*sparse=False"
    pairs = (
        (nn.Embedding(V, D, sparse=True), torch.nn.Embedding(V, D, sparse=True)),
        (nn.EmbeddingBag(V, D, mode="sum", sparse=True),
         torch.nn.EmbeddingBag(V, D, mode="sum", sparse=True)),
    )
    for ours, ref in pairs:
        with pytest.raises(ValueError, match=match):
            ours(ids(2, 3))
        assert "sparse=True" in nn.REGISTRY.lookup(type(ref)).unsupported(ref)
    weight = torch.nn.Parameter(torch.randn(V, D))
    with pytest.raises(ValueError, match=match):
        TF.embedding(ids(2, 3), weight, sparse=True)
    with pytest.raises(ValueError, match=match):
        TF.embedding_bag(ids(2, 3), weight, mode="sum", sparse=True)


def test_torchs_argument_errors_are_kept() -> None:
    weight = torch.nn.Parameter(torch.randn(V, D))
    with pytest.raises(ValueError, match="max mode does not support scaling"):
        TF.embedding_bag(ids(2, 3), weight, mode="max", scale_grad_by_freq=True)
    with pytest.raises(NotImplementedError, match="only supported for mode='sum'"):
        TF.embedding_bag(ids(2, 3), weight, mode="mean", per_sample_weights=torch.randn(2, 3))
    with pytest.raises(ValueError, match="offsets has to be a 1D Tensor but got None"):
        TF.embedding_bag(ids(6), weight)


def test_cauchy_schwarz_and_single_sample() -> None:
    for layer in (nn.Embedding(V, D), nn.EmbeddingBag(V, D)):
        x = ids(7, 4)
        layer(x).square().mean().backward()
        p = layer.weight
        assert (p.sum_grad_squared >= 0).all()
        assert (7 * p.sum_grad_squared >= p.grad**2 * (1 - 1e-5) - 1e-10).all()
        layer.zero_grad()
        statistic.clear(layer.parameters())
        layer(x[:1]).square().mean().backward()
        torch.testing.assert_close(p.sum_grad_squared, p.grad**2, rtol=1e-5, atol=1e-10)


def test_frozen_and_no_grad() -> None:
    layer = nn.Embedding(V, D)
    bag = nn.EmbeddingBag(V, D, mode="sum")
    layer.weight.requires_grad_(False)
    bag.weight.requires_grad_(False)
    psw = torch.randn(2, 3, requires_grad=True)
    (layer(ids(2, 3)).sum() + bag(ids(2, 3), per_sample_weights=psw).sum()).backward()
    assert psw.grad is not None
    assert not statistic.has(bag.weight) and not statistic.has(layer.weight)
    with torch.no_grad():
        assert nn.Embedding(V, D)(ids(2, 3)).shape == (2, 3, D)


@pytest.mark.parametrize("positions", ["1d", "1xT", "NxT"])
def test_position_embedding_without_a_batch_dim_is_exact(positions: str) -> None:
    """Finding 3 of the real-model review: wpe(arange(T)) or wpe(arange(T)[None]) added to
    (N, T, D) got the whole batch as one sample under nn/patch_torch. The engine follows the
    positions' rows to where they meet the batch, so the statistic is the model's."""

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(10, 4)
            self.wpe = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(ids.shape[1])
            pos = {"1d": pos, "1xT": pos[None], "NxT": pos.expand(ids.shape[0], -1)}[positions]
            return self.head(self.wte(ids) + self.wpe(pos))

    model = Model()
    ids = torch.randint(0, 10, (3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        testing.assert_matches_oracle(model, lambda o, _: o.square().mean(), ids)
    # what the per-op statistic gave before (positions as samples) differs from the model's
    per_position = (model.wpe.weight.grad ** 2)
    assert not torch.allclose(model.wpe.weight.sum_grad_squared, per_position, rtol=1e-3)
