"""backend="backpack": BackPack's SumGradSquared, added into p.sum_grad_squared.

Every model checks the exact coverage table, outputs and p.grad against plain torch, and
the statistic of every covered parameter against the exact oracle (docs/statistic.md: rtol
1e-4, atol 1e-6 x max).
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from truegrad import statistic, testing
from truegrad.backends import get_backend
from truegrad.backends import backpack as bp
from truegrad.optim import TGAdamW
from zoo import ZOO

pytestmark = [
    pytest.mark.backpack,
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),  # torch.func oracle
]
CTX = pytest.importorskip("backpack.context").CTX  # the extra is installed in the test env
BACKEND = get_backend("backpack")


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def _layers(names: list[str], kind: str, *, reason: str | None = None, params: tuple = ("weight", "bias")) -> dict:
    why = reason or f"BackPack's SumGradSquared has no extension for {kind}"
    return {f"{n}.{p}": f"module '{n}' ({kind}): {why}" for n in names for p in params}


def _no_ext(path: str, kind: str, params: tuple = ("weight", "bias")) -> dict[str, str]:
    return _layers([path], kind, params=params)


TRANSFORMER_UNCOVERED: dict[str, str] = {}
for _i in range(2):
    _p = f"encoder.layers.{_i}"
    TRANSFORMER_UNCOVERED |= _no_ext(f"{_p}.self_attn", "MultiheadAttention", ("in_proj_weight", "in_proj_bias"))
    TRANSFORMER_UNCOVERED |= _layers(
        [f"{_p}.self_attn.out_proj"], "NonDynamicallyQuantizableLinear",
        reason="BackPack's SumGradSquared has no extension for NonDynamicallyQuantizableLinear "
        "(it matches exact classes; this subclasses Linear)",
    )
    TRANSFORMER_UNCOVERED |= _layers([f"{_p}.norm1", f"{_p}.norm2"], "LayerNorm")
TRANSFORMER_UNCOVERED |= _layers(["norm"], "LayerNorm")

GPT_UNCOVERED = {
    "wte.weight": "shared by modules 'wte' (Embedding), 'lm_head' (Linear): BackPack handles each "
    "use on its own, the statistic needs each sample's uses summed before squaring",
    **_layers([f"blocks.{i}.norm{j}" for i in range(2) for j in (1, 2)] + ["norm"], "RMSNorm", params=("weight",)),
}

BERT_UNCOVERED = {
    "embeddings.word_embeddings.weight": "module 'embeddings.word_embeddings' (Embedding): "
    "BackPack: Only padding_idx=None supported.",
    **_layers(
        ["embeddings.LayerNorm"]
        + [f"encoder.layer.{i}.{w}.LayerNorm" for i in range(2) for w in ("attention.output", "output")],
        "LayerNorm",
    ),
}

#: model -> (uncovered {param: reason}, covered params that get no statistic, params whose
#: module's input does not carry the model's samples (refused in the forward, the reason
#: recorded), expected BackPack warnings)
CASES: dict[str, tuple[dict[str, str], set[str], set[str], set[type]]] = {
    "mlp": ({}, set(), set(), set()),
    "alexnet": ({}, set(), set(), set()),
    "grouped_cnn": ({}, set(), set(), set()),
    "resnet_eval": ({}, set(), set(), set()),
    "transformer": (TRANSFORMER_UNCOVERED, set(), set(), {bp.UncoveredParameterWarning}),
    "gpt": (GPT_UNCOVERED, set(), {"wpe.weight"}, {bp.UncoveredParameterWarning}),
    # the pooler is not used by the loss (last_hidden_state): no gradient, no statistic;
    # position_ids (1, T) and the token-type buffer expanded over the batch carry no samples
    "bert": (BERT_UNCOVERED, {"pooler.dense.weight", "pooler.dense.bias"},
             {"embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight"},
             {bp.UncoveredParameterWarning}),
}


def _entry(case: str) -> tuple[Any, nn.Module]:
    entry = ZOO[case.removesuffix("_eval")]
    model = entry.build()
    if case.endswith("_eval"):
        for m in model.modules():  # non-trivial running statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        model.eval()
    return entry, model


def _backward(model: nn.Module, loss: Callable[[], torch.Tensor]) -> None:
    with BACKEND.backward_context():
        loss().backward()


def _assert_clean(model: nn.Module) -> None:
    """Nothing of BackPack's is left on modules or parameters, and its context is off."""
    for name, module in model.named_modules():
        leftovers = {"input0", "input1", "output", "_backpack_extend"} & set(vars(module))
        assert not leftovers, (name, leftovers)
    for name, p in model.named_parameters():
        assert not hasattr(p, bp.SAVEFIELD), name
    assert CTX.get_active_exts() == ()
    assert bp._PENDING == {}


@pytest.mark.parametrize("case", list(CASES))
def test_zoo_model(case: str) -> None:
    uncovered, unused, other_dim0, expected_warnings = CASES[case]
    entry, model = _entry(case)
    plain = copy.deepcopy(model)
    inputs, targets = entry.inputs(), entry.targets()
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    coverage = BACKEND.coverage(model)
    assert {n: r for n, r in coverage.items() if r is not None} == uncovered
    assert list(coverage) == names

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = BACKEND.prepare(model)
        with BACKEND.backward_context():
            out = _call(model, inputs)
            entry.loss(out, targets).backward()
    assert {w.category for w in caught if issubclass(w.category, bp.BackPackWarning)} == expected_warnings

    plain_out = _call(plain, inputs)
    entry.loss(plain_out, targets).backward()
    for a, b in zip(_outputs(out), _outputs(plain_out), strict=True):
        assert torch.equal(a, b)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name

    have = {n for n, p in model.named_parameters() if statistic.has(p)}
    assert have == set(names) - set(uncovered) - unused - other_dim0
    after = BACKEND.coverage(model)
    for name in other_dim0:
        assert "its input does not carry the model's samples" in after[name], after[name]
    oracle = testing.sum_grad_squared_oracle(plain, entry.loss, inputs, targets)
    checked = sorted(have)
    assert testing.compare_to_oracle(model, oracle, params=checked, check_grad=False) == []
    _assert_clean(model)
    handle.undo()


def test_position_embedding_of_arange_gets_no_statistic() -> None:
    """Finding 5 of the real-model review: ``wpe(torch.arange(T))`` (GPT-2's ``wpe``, the only
    module of its size, so BackPack's own batch-size check never fired) got ``p.grad**2``.
    Its input does not carry the model's samples: no statistic, the reason recorded, and the
    rest of the model exact."""
    entry = ZOO["gpt"]
    model = entry.build()
    inputs, targets = entry.inputs(), entry.targets()
    plain = copy.deepcopy(model)
    with pytest.warns(bp.UncoveredParameterWarning):
        BACKEND.prepare(model)
    _backward(model, lambda: entry.loss(model(inputs), targets))
    assert model.wpe.weight.grad is not None and not statistic.has(model.wpe.weight)
    assert BACKEND.coverage(model)["wpe.weight"].startswith(
        "module 'wpe' (Embedding): its input does not carry the model's samples"
    )
    covered = [n for n, p in model.named_parameters() if statistic.has(p)]
    assert "blocks.0.attn.qkv.weight" in covered
    oracle = testing.sum_grad_squared_oracle(plain, entry.loss, inputs, targets)
    assert testing.compare_to_oracle(model, oracle, params=covered, check_grad=False) == []


class _OneSampleLayouts(nn.Module):
    """A Linear fed the samples flattened with the positions ``(N*T, D)``, and one fed them
    sequence-first ``(T, N, D)``."""

    def __init__(self, seq_first: bool) -> None:
        super().__init__()
        self.seq_first = seq_first
        self.inp = nn.Linear(3, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))  # (N, T, 4)
        if self.seq_first:
            return self.mix(h.transpose(0, 1)).transpose(0, 1)
        return self.mix(h.reshape(-1, 4)).reshape(h.shape)


@pytest.mark.parametrize("seq_first", [False, True], ids=["flattened", "seq-first"])
@pytest.mark.parametrize("n", [1, 3])
def test_one_sample_in_another_layout_is_not_its_rows(seq_first: bool, n: int) -> None:
    """Found by the property tests (issue 12): with one sample, a module fed it flattened
    ``(1*T, D)`` or sequence-first ``(T, 1, D)`` was let through, and BackPack took its T rows
    as T samples: a sum of T squares instead of the square of their sum. No statistic now,
    the reason recorded; the rest of the model exact."""
    torch.manual_seed(0)
    model = _OneSampleLayouts(seq_first)
    x = torch.randn(n, 5, 3)
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BACKEND.prepare(model)
        _backward(model, lambda: model(x).square().mean())
    assert not statistic.has(model.mix.weight) and not statistic.has(model.mix.bias)
    assert "BackPack takes dim 0 of a module's input as the samples" in BACKEND.coverage(model)["mix.weight"]
    oracle = testing.sum_grad_squared_oracle(plain, lambda o, _: o.square().mean(), x)
    assert testing.compare_to_oracle(model, oracle, params=["inp.weight", "inp.bias"]) == []


def test_float64_embedding_is_refused_at_prepare_not_a_crash() -> None:
    """Finding 5: BackPack's Embedding derivative builds a float32 helper and crashed on every
    float64 model with an Embedding. The parameter is uncovered with the reason; the rest of
    the model is exact."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).double()
    x = torch.randint(0, 10, (5, 3))
    plain = copy.deepcopy(model)
    assert "float64 Embedding" in BACKEND.coverage(model)["0.weight"]
    with pytest.warns(bp.UncoveredParameterWarning, match="float64 Embedding"):
        BACKEND.prepare(model)
    _backward(model, lambda: model(x).square().sum())
    assert not statistic.has(model[0].weight)
    oracle = testing.sum_grad_squared_oracle(plain, lambda o, _: o.square().sum(), x)
    assert testing.compare_to_oracle(model, oracle, params=["2.weight", "2.bias"]) == []


def test_parameter_used_outside_its_module_gets_no_statistic() -> None:
    """Finding 2/4 under BackPack: a tied weight also used as ``h @ emb.weight.T`` (or a
    table read as ``.weight``) has a use BackPack never sees: no statistic, the op named."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.mix = nn.Linear(4, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.mix(self.emb(ids))) @ self.emb.weight.T

    model = Tied()
    BACKEND.prepare(model)
    ids = torch.randint(0, 10, (3, 5))
    _backward(model, lambda: model(ids).square().mean())
    assert not statistic.has(model.emb.weight) and statistic.has(model.mix.weight)
    assert "used by Tensor.T outside its module 'emb' (Embedding)" in BACKEND.coverage(model)["emb.weight"]


def test_alexnet_seed_example(caplog: pytest.LogCaptureFixture) -> None:
    """The seed's example: tiny alexnet with inplace ReLUs, TGAdamW, a few steps."""
    entry = ZOO["alexnet"]
    model = entry.build()
    relus = [model[i] for i in (1, 4, 8)]
    with caplog.at_level(logging.INFO, logger="truegrad"):
        handle = BACKEND.prepare(model)
    records = [r for r in caplog.records if r.name == "truegrad"]
    assert len(records) == 1
    assert "turned off inplace on 3 module(s)" in records[0].getMessage()
    assert "'1' (ReLU), '4' (ReLU), '8' (ReLU)" in records[0].getMessage()
    assert [r.inplace for r in relus] == [False, False, False]

    optimizer = TGAdamW(model.parameters(), lr=1e-2)
    x, y = entry.inputs(), entry.targets()
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        with BACKEND.backward_context():
            loss = entry.loss(model(x), y)
            loss.backward()
        assert all(statistic.has(p) for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    handle.undo()
    assert [r.inplace for r in relus] == [True, True, True]


def _per_sample_products(model: nn.Module, entry: Any) -> dict[str, torch.Tensor]:
    """Layer-level oracle (docs/statistic.md section 1, samples interact): each layer's own per-sample
    split of its weight gradient, from its input and full-batch output gradient."""
    seen: dict[nn.Module, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        grads: list[torch.Tensor] = []
        out.register_hook(grads.append)
        seen[module] = (args[0].detach().clone(), grads)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            m.register_forward_hook(hook)
    entry.loss(model(entry.inputs()), entry.targets()).backward()
    result: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if m not in seen:
            continue
        x, (dy,) = seen[m]
        if isinstance(m, nn.BatchNorm2d):
            x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / (x.var((0, 2, 3), unbiased=False, keepdim=True) + m.eps).sqrt()
            per = {"weight": (dy * x_hat).sum((2, 3)), "bias": dy.sum((2, 3))}
        else:
            params = {k: v.detach() for k, v in m.named_parameters()}

            def inner(p: dict, xn: torch.Tensor, dyn: torch.Tensor, m: nn.Module = m) -> torch.Tensor:
                return (torch.func.functional_call(m, p, (xn[None],)) * dyn[None]).sum()

            per = torch.func.vmap(torch.func.grad(inner), in_dims=(None, 0, 0))(params, x, dy)
        for local, g in per.items():
            result[f"{name}.{local}"] = testing.layer_sum_grad_squared(g)
    return result


def test_resnet_train_mode_is_the_layer_level_split() -> None:
    """BackPack refuses BatchNorm in training mode (NotImplementedError in backward); the
    backend computes each layer's own per-sample split, with a named warning."""
    entry = ZOO["resnet"]
    torch.manual_seed(0)
    model = entry.build()
    twin = copy.deepcopy(model)
    BACKEND.prepare(model)
    with pytest.warns(bp.BatchNormTrainingWarning, match=r"BatchNorm 'bn1' \(BatchNorm2d\) \(one of 6"):
        torch.manual_seed(1)
        _backward(model, lambda: entry.loss(model(entry.inputs()), entry.targets()))
    torch.manual_seed(1)
    expected = _per_sample_products(twin, entry)
    assert set(expected) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.sum_grad_squared, expected[name], rtol=1e-4, atol=1e-6 * float(expected[name].max()))
        assert torch.equal(p.grad, dict(twin.named_parameters())[name].grad), name


def _bn_train() -> tuple[nn.Module, Any]:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()), torch.randn(3, 3, 5, 5)


def _resnet_eval() -> tuple[nn.Module, Any]:
    return ZOO["resnet"].build().eval(), ZOO["resnet"].inputs()


def _bert() -> tuple[nn.Module, Any]:
    return ZOO["bert"].build(), ZOO["bert"].inputs()


def _mlp_bf16() -> tuple[nn.Module, Any]:
    return ZOO["mlp"].build(), ZOO["mlp"].inputs()


BACKPACK_ALONE = {
    "batchnorm_training": (_bn_train, NotImplementedError, "BatchNorm module in training mode"),
    "resnet_residual_in_place": (_resnet_eval, RuntimeError, "BackwardHookFunction is a view and is being modified inplace"),
    "bert_child_called_output": (_bert, TypeError, "cannot assign 'torch.FloatTensor' as child module 'output'"),
    "bf16_autocast": (_mlp_bf16, RuntimeError, "expected scalar type Float but found BFloat16"),
}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("case", list(BACKPACK_ALONE))
def test_what_backpack_alone_does(case: str) -> None:
    """The failure modes the backend handles (each works through the backend above)."""
    import backpack
    from backpack.extensions import SumGradSquared

    build, error, message = BACKPACK_ALONE[case]
    model, inputs = build()
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False  # as the backend does; the failures remain
    backpack.extend(model)
    try:
        with pytest.raises(error, match=message):
            with backpack.backpack(SumGradSquared()):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16_autocast"):
                    out = _call(model, inputs)
                    loss = sum(o.float().sum() for o in _outputs(out))
                loss.backward()
    finally:
        CTX.remove_hooks()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # BackPack alone
def test_accumulates_over_backward_passes() -> None:
    """Each backward adds (BackPack alone overwrites ``sum_grad_squared``)."""
    entry = ZOO["mlp"]
    model = entry.build()
    batches = [(entry.inputs(), entry.targets()) for _ in range(3)]
    expected = [testing.sum_grad_squared_oracle(model, entry.loss, x, y) for x, y in batches]
    BACKEND.prepare(model)
    _backward(model, lambda: entry.loss(model(batches[0][0]), batches[0][1]))
    with BACKEND.backward_context():  # two backward passes in one context add up too
        for x, y in batches[1:]:
            entry.loss(model(x), y).backward()
    for name, p in model.named_parameters():
        total = sum(e.sum_grad_squared[name] for e in expected)
        torch.testing.assert_close(p.sum_grad_squared, total, rtol=1e-4, atol=1e-6 * float(total.max()))
    _assert_clean(model)

    import backpack
    from backpack.extensions import SumGradSquared

    alone = entry.build()
    last = testing.sum_grad_squared_oracle(alone, entry.loss, *batches[1])
    backpack.extend(alone)
    try:
        for x, y in batches[:2]:
            with backpack.backpack(SumGradSquared()):
                entry.loss(alone(x), y).backward()
        torch.testing.assert_close(alone[0].weight.sum_grad_squared, last.sum_grad_squared["0.weight"])
    finally:
        CTX.remove_hooks()


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_module_called_twice_gets_no_statistic_and_a_named_warning() -> None:
    model = Twice()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    assert set(BACKEND.coverage(model).values()) == {None}  # only the backward can tell
    BACKEND.prepare(model)
    with pytest.warns(bp.SharedParameterWarning, match=r"'inner.bias' \(shape \(4,\)\), 'inner.weight'"):
        _backward(model, lambda: F.cross_entropy(model(x), y))
    assert not statistic.has(model.inner.weight) and not statistic.has(model.inner.bias)
    oracle = testing.sum_grad_squared_oracle(model, F.cross_entropy, x, y)
    assert testing.compare_to_oracle(model, oracle, params=["head.weight", "head.bias"]) == []
    _assert_clean(model)


class TiedPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)
        self.b.weight = nn.Parameter(self.a.weight[:3].detach().clone())
        self.a.weight = self.b.weight  # a (3, 4) weight used by both (a's output has 3 features)
        self.a.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(torch.cat([self.a(x), x[:, :1]], 1)))


def test_parameter_shared_by_two_modules() -> None:
    model = TiedPair()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    assert BACKEND.coverage(model) == {
        "a.weight": "shared by modules 'a' (Linear), 'b' (Linear): BackPack handles each use on its "
        "own, the statistic needs each sample's uses summed before squaring",
        "a.bias": None,
        "b.bias": None,
    }
    with pytest.warns(bp.UncoveredParameterWarning, match="1 of 3 trainable parameters"):
        BACKEND.prepare(model)
    _backward(model, lambda: F.cross_entropy(model(x), y))
    assert not statistic.has(model.a.weight)
    oracle = testing.sum_grad_squared_oracle(model, F.cross_entropy, x, y)
    assert testing.compare_to_oracle(model, oracle, params=["a.bias", "b.bias"]) == []
    _assert_clean(model)


def test_undo_and_prepare_again() -> None:
    entry = ZOO["mlp"]
    model = entry.build()
    x, y = entry.inputs(), entry.targets()
    first = BACKEND.prepare(model)
    entry.loss(model(x), y).backward()  # outside backward_context: BackPack is off
    assert not any(statistic.has(p) for p in model.parameters())
    for p in model.parameters():
        p.grad = None
    second = BACKEND.prepare(model)  # idempotent: nothing more is hooked
    assert [len(m._forward_hooks) for m in model] == [1, 0, 1, 0, 1]
    _backward(model, lambda: entry.loss(model(x), y))
    oracle = testing.sum_grad_squared_oracle(model, entry.loss, x, y)
    assert testing.compare_to_oracle(model, oracle) == []  # added once, not twice
    second.undo()
    assert [len(m._forward_hooks) for m in model] == [1, 0, 1, 0, 1]
    first.undo()
    assert [len(m._forward_hooks) for m in model] == [0] * 5
    statistic.clear(model.parameters())
    _backward(model, lambda: entry.loss(model(x), y))
    assert not any(statistic.has(p) for p in model.parameters())
    _assert_clean(model)

    again = BACKEND.prepare(model)
    for p in model.parameters():
        p.grad = None
    _backward(model, lambda: entry.loss(model(x), y))
    assert testing.compare_to_oracle(model, oracle) == []
    again.undo()


def test_deepcopy_of_a_prepared_model_is_inert_until_prepared() -> None:
    entry = ZOO["mlp"]
    model = entry.build()
    BACKEND.prepare(model)
    clone = copy.deepcopy(model)
    x, y = entry.inputs(), entry.targets()
    _backward(clone, lambda: entry.loss(clone(x), y))
    assert not any(statistic.has(p) for p in [*clone.parameters(), *model.parameters()])
    BACKEND.prepare(clone)
    _backward(clone, lambda: entry.loss(clone(x), y))
    assert all(statistic.has(p) for p in clone.parameters())
    assert not any(statistic.has(p) for p in model.parameters())


class Failing(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_failed_backward_adds_nothing_and_restores_backpack() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    BACKEND.prepare(model)
    x = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="boom"):
        # the head's hook runs, then the Function before the first layer raises
        _backward(model, lambda: model[2](Failing.apply(model[1](model[0](x)))).sum())
    assert not any(statistic.has(p) for p in model.parameters())
    _assert_clean(model)


def test_input_modified_in_place_is_a_clear_error() -> None:
    lin = nn.Linear(3, 2)
    BACKEND.prepare(lin)
    h = torch.randn(4, 3, requires_grad=True) * 1.0
    with pytest.raises(RuntimeError, match=r"input 0 of module '<model>' \(Linear\) was modified in place"):
        with BACKEND.backward_context():
            out = lin(h)
            h.mul_(2.0)
            (out.sum() + h.sum()).backward()
    _assert_clean(lin)


@pytest.mark.parametrize("case", ["mlp", "alexnet"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_statistic_in_float32(case: str, dtype: torch.dtype) -> None:
    """BackPack alone fails ("expected scalar type Float but found BFloat16"); the backend
    casts the output gradient and inputs to float32 first. The statistic is within 2e-2
    (Frobenius) of float32's, or, for conv layers behind several low-precision layers, no
    further from it than 1.5 times the low-precision p.grad is from float32's p.grad."""
    entry = ZOO[case]
    model = entry.build()
    x, y = entry.inputs(), entry.targets()
    oracle = testing.sum_grad_squared_oracle(model, entry.loss, x, y)
    with torch.autocast("cpu", dtype=dtype):
        plain_dtype = model(x).dtype
    BACKEND.prepare(model)
    with BACKEND.backward_context():
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
            loss = entry.loss(out, y)
        loss.backward()
    assert out.dtype == plain_dtype == dtype
    for name, p in model.named_parameters():
        s = p.sum_grad_squared
        assert s.dtype == torch.float32
        e, g = oracle.sum_grad_squared[name], oracle.grad[name]
        grad_error = float((p.grad - g).norm() / g.norm())
        bound = 2e-2 if case == "mlp" else max(2e-2, 1.5 * grad_error)
        assert float((s - e).norm() / e.norm()) < bound, name


def test_frozen_parameters_are_left_out() -> None:
    entry = ZOO["mlp"]
    model = entry.build()
    model[0].requires_grad_(False)
    assert list(BACKEND.coverage(model)) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    BACKEND.prepare(model)
    _backward(model, lambda: entry.loss(model(entry.inputs()), entry.targets()))
    assert [statistic.has(p) for p in model.parameters()] == [False, False, True, True, True, True]


class MyLinear(nn.Linear):
    pass


def test_coverage_of_unsupported_options() -> None:
    model = nn.ModuleDict({
        "circular": nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"),
        "same": nn.Conv2d(2, 2, 3, padding="same"),
        "outpad": nn.ConvTranspose2d(2, 2, 3, stride=2, output_padding=1),
        "padidx": nn.Embedding(5, 2, padding_idx=0),
        "bn": nn.BatchNorm1d(2, track_running_stats=False),
        "lstm": nn.LSTM(2, 2),
        "sub": MyLinear(2, 2),
        "fine": nn.ConvTranspose1d(2, 4, 3, stride=2, groups=2),
    })
    reasons = {n.split(".")[0]: r for n, r in BACKEND.coverage(model).items()}
    assert reasons == {
        "circular": "module 'circular' (Conv2d): padding_mode='circular': BackPack convolves the "
        "unpadded input, which is only right for padding_mode='zeros'",
        "same": "module 'same' (Conv2d): padding='same': BackPack supports numeric padding only",
        "outpad": "module 'outpad' (ConvTranspose2d): output_padding=(1, 1): BackPack's transposed "
        "convolution fails on it",
        "padidx": "module 'padidx' (Embedding): BackPack: Only padding_idx=None supported.",
        "bn": "module 'bn' (BatchNorm1d): BackPack: Only implemented for track_running_stats=True",
        "lstm": "module 'lstm' (LSTM): BackPack: Batch axis must be first.",
        "sub": "module 'sub' (MyLinear): BackPack's SumGradSquared has no extension for MyLinear "
        "(it matches exact classes; this subclasses Linear)",
        "fine": None,
    }
    with pytest.warns(bp.UncoveredParameterWarning, match=r"15 of 17 trainable parameters of ModuleDict"):
        handle = BACKEND.prepare(model)
    assert [name for name, m in model.items() if m._forward_hooks] == ["fine"]
    handle.undo()


class WithLayers(nn.Module):
    def __init__(self, layer: nn.Module, features: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.LazyLinear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out.flatten(1))


LAYERS = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (4, 3, 9)),
    "conv3d_groups": (lambda: nn.Conv3d(2, 4, 2, padding=1, groups=2), (3, 2, 4, 4, 4)),
    "conv2d_valid_dilated": (lambda: nn.Conv2d(3, 4, 3, padding="valid", dilation=2), (4, 3, 7, 7)),
    "convtranspose2d_groups": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 4, 5, 5)),
    "embedding": (lambda: nn.Embedding(10, 4), None),
    "linear_4d": (lambda: nn.Linear(3, 4), (4, 2, 3, 3)),
    "batchnorm1d_eval": (lambda: nn.BatchNorm1d(3).eval(), (4, 3, 5)),
    "rnn": (lambda: nn.RNN(3, 5, batch_first=True), (4, 6, 3)),
    "lstm": (lambda: nn.LSTM(3, 5, batch_first=True), (4, 6, 3)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_supported_layers_match_the_oracle(layer: str) -> None:
    build, shape = LAYERS[layer]
    module = build()
    x = torch.randint(0, 10, (4, 5)) if shape is None else torch.randn(shape)
    if isinstance(module, nn.BatchNorm1d):
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
        module.weight.data.uniform_(0.5, 2)
    model = WithLayers(module, 0)
    model(x)  # materialise the lazy head
    y = torch.arange(x.shape[0]) % 3
    method = "loop" if isinstance(module, nn.RNNBase) else "func"  # vmap cannot batch RNNs
    oracle = testing.sum_grad_squared_oracle(model, F.cross_entropy, x, y, method=method)
    assert set(BACKEND.coverage(model).values()) == {None}
    BACKEND.prepare(model)
    _backward(model, lambda: F.cross_entropy(model(x), y))
    assert testing.compare_to_oracle(model, oracle) == []
    _assert_clean(model)


def test_without_backpack_the_error_names_the_extra() -> None:
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "backpack":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
        import truegrad.backends.backpack as bp       # importing needs no backpack
        from truegrad.backends import get_backend
        try:
            get_backend("backpack")
        except ModuleNotFoundError as error:
            print(error)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "the BackPack backend (backend='backpack') needs the optional dependency 'backpack', "
        "which is not installed: pip install --no-deps 'backpack-for-pytorch>=1.7' einops unfoldNd"
    )
