"""``torch.save``/``torch.load``, pickling and ``copy.deepcopy`` of prepared, converted and
``truegrad.nn`` models (issue 12, finding 9). What a loaded or copied model is, is documented
in :mod:`truegrad.backends.convert`; every claim made there is checked here."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import truegrad.nn as tnn
from truegrad import statistic, testing
from truegrad.backends import get_backend
from truegrad.backends.base import _PREPARED
from truegrad.backends.patch_torch import is_patched
from truegrad.parameter import TrueGradParameter

#: the backends that save support is built for (BackPack only needs not to crash)
ENGINE_BACKENDS = ["auto", "nn", "patch_torch", "patch_model"]
#: backends that swap module classes to ``truegrad.nn``
CONVERTING = {"nn", "patch_torch"}


class Model(nn.Module):
    """Every family the issue names, with small shapes (batch 3, sequence 5, width 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(h)
        h, _ = self.lstm(h)
        h = self.enc(h)
        h = self.conv(h.unsqueeze(1)).mean(1)
        return self.head(h.mean(1))


class TrueGradModel(nn.Module):
    """Built from ``truegrad.nn`` modules: tracked from construction, no backend."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = tnn.Embedding(11, 8)
        self.attn = tnn.MultiheadAttention(8, 2, batch_first=True)
        self.lstm = tnn.LSTM(8, 8, batch_first=True)
        self.head = tnn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h, _ = self.lstm(h)
        return self.head(h.mean(1))


class ScaledLinear(nn.Linear):
    """A user subclass without its own ``forward``: converted to a generated class."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__(n, m)
        self.register_buffer("scale", torch.ones(()))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 11, (3, 5), generator=generator), torch.randint(
        0, 3, (3,), generator=generator
    )


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def _torch_round_trip(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _pickle_round_trip(obj: object) -> object:
    return pickle.loads(pickle.dumps(obj))


ROUND_TRIPS: dict[str, Callable[[object], object]] = {
    "torch.save": _torch_round_trip,
    "pickle": _pickle_round_trip,
    "deepcopy": copy.deepcopy,
}


def _prepare(name: str, model: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPack's coverage warnings
        return get_backend(name).prepare(model)


def _backward(model: nn.Module, backend: str = "auto") -> None:
    x, y = _data()
    with get_backend(backend).backward_context():
        _loss(model(x), y).backward()


def _oracle(model: nn.Module) -> dict[str, torch.Tensor]:
    """The exact statistic of ``model`` (taken before it is prepared: plain torch throughout)."""
    x, y = _data()
    return testing.sum_grad_squared_oracle(testing.plain_copy(model), _loss, x, y).sum_grad_squared


def _assert_exact(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names == list(expected)
    for name, p in model.named_parameters():
        got = statistic.get(p)
        assert got is not None, name
        torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-9, msg=name)


def _assert_independent(model: nn.Module, other: nn.Module) -> None:
    """Equal values, no shared parameter, buffer or storage."""
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in other.named_parameters()]
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert p is not q and p.data_ptr() != q.data_ptr()
        assert torch.equal(p.detach(), q.detach())
    for b, c in zip(model.buffers(), other.buffers(), strict=True):
        assert b is not c and torch.equal(b, c)


def _classes(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


# ------------------------------------------------------------------ the PicklingError (finding 9)


@pytest.mark.parametrize("backend", sorted(CONVERTING))
def test_converted_multihead_attention_pickles(backend: str) -> None:
    """Finding 9: the class generated for ``NonDynamicallyQuantizableLinear`` (MHA's
    ``out_proj``) named itself torch's class, so pickling raised ``PicklingError: Can't pickle
    <class 'torch.nn.modules.linear.NonDynamicallyQuantizableLinear'>: it's not the same object
    as torch.nn.modules.linear.NonDynamicallyQuantizableLinear``."""
    model = nn.MultiheadAttention(8, 2, batch_first=True)
    with _prepare(backend, model):
        converted = type(model.out_proj)
        assert issubclass(converted, tnn.Linear)
        assert issubclass(converted, nn.modules.linear.NonDynamicallyQuantizableLinear)
        for round_trip in (_torch_round_trip, _pickle_round_trip, copy.deepcopy):
            loaded = round_trip(model)
            assert type(loaded.out_proj) is converted  # the same generated class, rebuilt
            assert type(loaded.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
            _assert_independent(loaded, model)


def test_generated_class_of_a_user_subclass_pickles() -> None:
    model = nn.Sequential(ScaledLinear(4, 3))
    with _prepare("nn", model):
        converted = type(model[0])
        assert converted is not ScaledLinear and issubclass(converted, (ScaledLinear, tnn.Linear))
        loaded = _torch_round_trip(model)
    assert type(loaded[0]) is converted and isinstance(loaded[0], ScaledLinear)
    assert torch.equal(loaded[0].scale, model[0].scale)
    x = torch.randn(6, 4)
    expected = testing.sum_grad_squared_oracle(
        testing.plain_copy(loaded), lambda o, _: o.square().sum(), x
    ).sum_grad_squared
    with _prepare("nn", loaded):
        loaded(x).square().sum().backward()
        for name, p in loaded.named_parameters():
            torch.testing.assert_close(statistic.get(p), expected[name], rtol=1e-5, atol=1e-9)


def test_generated_class_loads_in_a_fresh_process(tmp_path) -> None:
    """The file names ``truegrad.backends.convert``'s rebuild function and torch's class,
    never the generated class: a new process (truegrad importable) rebuilds it."""
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "head": nn.Linear(8, 3)})
    path = tmp_path / "model.pt"
    with _prepare("nn", model):
        torch.save(model, path)
    script = textwrap.dedent(
        f"""
        import torch, truegrad.nn as tnn
        from truegrad.parameter import TrueGradParameter
        m = torch.load({str(path)!r}, weights_only=False)
        out = m["attn"].out_proj
        assert isinstance(out, tnn.Linear), type(out).__mro__
        assert isinstance(out, torch.nn.modules.linear.NonDynamicallyQuantizableLinear)
        assert type(m["head"]) is tnn.Linear and type(m["attn"]) is tnn.MultiheadAttention
        assert all(type(p) is TrueGradParameter for p in m.parameters())
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# ------------------------------------------------------------------ a whole model, per backend


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_round_trip_while_prepared(backend: str, how: str) -> None:
    """Saved (or copied) while prepared: the copy has the classes the backend gave the modules
    and ``TrueGradParameter`` parameters, shares nothing with the original, is not prepared
    (no backend is registered on it), and prepared again it gives the exact statistic."""
    torch.manual_seed(0)
    model = Model()
    handle = _prepare(backend, model)
    try:
        _backward(model)  # a checkpoint taken mid-training
        classes = _classes(model)
        copied = ROUND_TRIPS[how](model)
    finally:
        handle.undo()
    before = [statistic.get(p).clone() for p in model.parameters()]
    assert _classes(copied) == classes
    if backend in CONVERTING:
        assert isinstance(copied.head, tnn.Linear) and isinstance(copied.attn.out_proj, tnn.Linear)
        assert isinstance(copied.attn.out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)
    else:
        assert type(copied.head) is nn.Linear
    assert all(type(p) is TrueGradParameter for p in copied.parameters())
    assert all(p.grad is None for p in copied.parameters())  # gradients are not saved
    assert copied not in _PREPARED
    _assert_independent(copied, model)
    assert _classes(model) == _classes(Model())  # the original was undone as usual
    assert all(type(p) is nn.Parameter for p in model.parameters())

    assert not is_patched()  # patch_torch's patch is global, not in the file
    statistic.clear(list(copied.parameters()))  # see test_saved_statistic_is_not_loaded
    expected = _oracle(copied)
    with _prepare(backend, copied) as again:
        assert _PREPARED[copied] == [backend] and is_patched() == (backend == "patch_torch")
        other = "auto" if backend == "patch_model" else "patch_model"
        with pytest.raises(ValueError, match="already prepared"):
            get_backend(other).prepare(copied)
        _backward(copied)
        _assert_exact(copied, expected)
    assert all(
        torch.equal(statistic.get(p), b) for p, b in zip(model.parameters(), before, strict=True)
    )
    # that handle's undo leaves what the file (or the copy) brought: a truegrad model
    assert again.done and _classes(copied) == classes
    assert all(type(p) is TrueGradParameter for p in copied.parameters())


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_copy_of_a_prepared_model_computes_without_prepare(backend: str, how: str) -> None:
    """Like a model built from ``truegrad.nn``, a copy of a prepared model (its parameters are
    ``TrueGradParameter``) computes its own exact statistic before any prepare, and never
    writes the original's (nor the original the copy's)."""
    torch.manual_seed(0)
    model = Model()
    with _prepare(backend, model):
        copied = ROUND_TRIPS[how](model)
        statistic.clear(list(copied.parameters()))
        expected = _oracle(copied)
        _backward(copied)
        assert not any(statistic.has(p) for p in model.parameters())
        _assert_exact(copied, expected)
        expected_model = _oracle(model)
        _backward(model)
        _assert_exact(model, expected_model)
        _assert_exact(copied, expected)  # unchanged by the original's backward


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_round_trip_after_undo_is_plain_torch(backend: str, how: str) -> None:
    torch.manual_seed(0)
    model = Model()
    plain_classes = _classes(model)
    with _prepare(backend, model):
        _backward(model)
    copied = ROUND_TRIPS[how](model)
    assert _classes(copied) == plain_classes
    assert all(type(p) is nn.Parameter for p in copied.parameters())
    _assert_independent(copied, model)
    statistic.clear(list(copied.parameters()))
    expected = _oracle(copied)
    with _prepare(backend, copied):
        _backward(copied)
        _assert_exact(copied, expected)
    assert _classes(copied) == plain_classes  # and undo makes it plain again
    assert all(type(p) is nn.Parameter for p in copied.parameters())


@pytest.mark.parametrize("backend", [*ENGINE_BACKENDS, "backpack"])
def test_state_dict_is_plain_tensors_and_loads_weights_only(backend: str) -> None:
    if backend == "backpack":
        pytest.importorskip("backpack")
    torch.manual_seed(0)
    model = Model()
    with _prepare(backend, model):
        _backward(model, backend)
        state = model.state_dict()
        assert all(type(v) is torch.Tensor for v in state.values())
        buffer = io.BytesIO()
        torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert all(type(v) is torch.Tensor for v in loaded.values())
    torch.manual_seed(1)
    fresh = Model()
    plain_classes = _classes(fresh)
    fresh.load_state_dict(loaded)
    assert _classes(fresh) == plain_classes
    assert all(type(p) is nn.Parameter for p in fresh.parameters())
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach()), name


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
def test_backpack_prepared_model_round_trips(how: str) -> None:
    """BackPack: saving or copying a prepared model does not crash; the copy is plain torch and
    inert until prepared (as ``test_backpack`` checks for ``deepcopy``)."""
    pytest.importorskip("backpack")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(3, 4)
    with _prepare("backpack", model):
        copied = ROUND_TRIPS[how](model)
    assert all(type(p) is nn.Parameter for p in copied.parameters())
    assert _classes(copied) == _classes(model)
    _assert_independent(copied, model)
    statistic.clear(list(copied.parameters()))
    copied(x).square().sum().backward()
    assert not any(statistic.has(p) for p in copied.parameters())
    for p in copied.parameters():
        p.grad = None
    expected = testing.sum_grad_squared_oracle(
        testing.plain_copy(copied), lambda o, _: o.square().sum(), x
    ).sum_grad_squared
    with _prepare("backpack", copied):
        with get_backend("backpack").backward_context():
            copied(x).square().sum().backward()
        for name, p in copied.named_parameters():
            torch.testing.assert_close(statistic.get(p), expected[name], rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------ models built from truegrad.nn


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
def test_truegrad_nn_model_round_trips(how: str) -> None:
    torch.manual_seed(0)
    model = TrueGradModel()
    _backward(model)
    copied = ROUND_TRIPS[how](model)
    assert _classes(copied) == _classes(model)
    assert type(copied.attn) is tnn.MultiheadAttention and type(copied.lstm) is tnn.LSTM
    assert type(copied.emb) is tnn.Embedding
    assert type(copied.head) is tnn.Linear
    assert all(type(p) is TrueGradParameter for p in copied.parameters())
    _assert_independent(copied, model)
    statistic.clear(list(copied.parameters()))
    expected = _oracle(copied)
    before = {name: statistic.get(p).clone() for name, p in model.named_parameters()}
    _backward(copied)  # no backend: truegrad.nn modules compute it themselves
    _assert_exact(copied, expected)
    for name, p in model.named_parameters():
        assert torch.equal(statistic.get(p), before[name]), name  # the original's untouched


# ------------------------------------------------------------------ known gaps (other files)


@pytest.mark.parametrize("backend", ["auto", "backpack"])
def test_saved_statistic_is_not_loaded(backend: str) -> None:
    """A Parameter's pickled state includes ``p.sum_grad_squared`` but not ``p.grad``: a
    loaded model reported a statistic of no gradient, and BackPack added the next backward
    to it (2x). A statistic without its gradient is not read, and one the statistic module
    never wrote is replaced by the next backward's."""
    if backend == "backpack":
        pytest.importorskip("backpack")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with _prepare(backend, model):
        with get_backend(backend).backward_context():
            model(torch.randn(3, 4)).square().sum().backward()
        loaded = _torch_round_trip(model)
    assert all(p.grad is None for p in loaded.parameters())
    assert not any(statistic.has(p) for p in loaded.parameters())
    x = torch.randn(3, 4)
    expected = testing.sum_grad_squared_oracle(
        testing.plain_copy(loaded), lambda out, _: out.square().sum(), x
    ).sum_grad_squared
    chosen = get_backend("auto" if backend == "auto" else "backpack")
    with _prepare(backend, loaded):
        with chosen.backward_context():
            loaded(x).square().sum().backward()
        for name, p in loaded.named_parameters():
            torch.testing.assert_close(statistic.get(p), expected[name], rtol=1e-5, atol=1e-9)


def test_unconverted_module_pickles_while_torch_is_patched() -> None:
    """While torch is patched, torch.nn.modules.sparse.Embedding names truegrad's class, so
    pickle refused torch's own Embedding (here a sparse one, left unconverted)."""
    model = nn.Sequential(nn.Embedding(11, 4, sparse=True), nn.Linear(4, 3))
    with _prepare("patch_torch", model):
        assert not isinstance(model[0], tnn.Embedding)
        _torch_round_trip(model)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("backend", ["auto", "nn", "backpack"])
def test_a_copy_prepared_and_undone_carries_nothing_of_truegrad(backend: str, how: str) -> None:
    """A model copied while prepared carried the model-call hooks, their mark and the eager
    forward; preparing the copy saw the mark, installed nothing, and its undo() could not
    remove what came with the copy."""
    if backend == "backpack":
        pytest.importorskip("backpack")
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with get_backend(backend).prepare(model):
        if how == "deepcopy":
            twin = copy.deepcopy(model)
        else:
            twin = _torch_round_trip(model)
    handle = get_backend(backend).prepare(twin)
    handle.undo()
    for module in twin.modules():
        assert "_truegrad_model_hooks" not in module.__dict__
        assert "forward" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks, module
