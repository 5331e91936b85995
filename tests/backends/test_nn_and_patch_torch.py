"""Backends "nn" (in-place conversion) and "patch_torch" on the model zoo, and their safety."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from zoo import ZOO

from truegrad import statistic, testing
from truegrad.backends import get_backend
from truegrad.utils import convert, is_patched, patch_torch, patched_names, unpatch_torch

#: parameters without the exact statistic, per zoo model, with why. Every other one is exact:
#: position embeddings of arange(T) and GPT-2's Conv1D (addmm on a flattened operand)
#: included, since the engine follows the model's samples wherever the model puts them.
NOT_EXACT: dict[str, dict[str, str]] = {
    "mlp": {},
    "resnet": {},
    "alexnet": {},
    "grouped_cnn": {},
    "transformer": {},
    "gpt": {},
    "bert": {
        "pooler.dense.weight": "no gradient",  # the loss does not reach BERT's pooler
        "pooler.dense.bias": "no gradient",
    },
    "gpt2": {},
}


def _call(model: torch.nn.Module, x):
    return model(**x) if isinstance(x, dict) else model(x)


@pytest.mark.parametrize("backend", ["nn", "patch_torch"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo(name: str, backend: str) -> None:
    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.build()
    if entry.samples_interact:
        model.eval()  # BatchNorm with running statistics: the per-sample oracle applies
    x, y = entry.inputs(), entry.targets()
    plain = copy.deepcopy(model)
    expected = testing.sum_grad_squared_oracle(plain, entry.loss, x, y)
    entry.loss(_call(plain, x), y).backward()

    handle = get_backend(backend).prepare(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # nothing is approximate
            out = _call(model, x)
            entry.loss(out, y).backward()
        assert torch.equal(
            out if isinstance(out, torch.Tensor) else out[0],
            (lambda o: o if isinstance(o, torch.Tensor) else o[0])(_call(plain, x)),
        )
        not_exact = NOT_EXACT[name]
        for pname, p in model.named_parameters():
            q = dict(plain.named_parameters())[pname]
            reason = not_exact.get(pname)
            if reason == "no gradient":
                assert p.grad is None and not statistic.has(p), pname
                continue
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=pname)
            problems = testing.compare_to_oracle(model, expected, params=[pname], check_grad=False)
            assert not problems, problems
    finally:
        handle.undo()
        unpatch_torch()


def test_patch_torch_seed_example_with_the_zoo_resnet() -> None:
    from zoo import TinyResNet

    from truegrad.optim import TGAdamW

    with patch_torch():  # call before model creation, otherwise complete freedom
        model = TinyResNet()
        optim = TGAdamW(model.parameters(), lr=1e-7, weight_decay=0)
        inp = torch.randn((2, 3, 8, 8))  # constant input/output to overfit
        tgt = torch.randint(0, 5, (2,))
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(inp), tgt)
            loss.backward()
            assert all(statistic.has(p) for p in model.parameters())
            optim.step()
    assert not is_patched()


def test_unpatch_restores_every_name_by_identity_and_old_references_work() -> None:
    originals = {
        "Linear": torch.nn.Linear,
        "Conv2d": torch.nn.Conv2d,
        "LayerNorm": torch.nn.LayerNorm,
        "MultiheadAttention": torch.nn.MultiheadAttention,
        "modules.linear.Linear": torch.nn.modules.linear.Linear,
        "F.linear": F.linear,
        "F.conv2d": F.conv2d,
        "torch.conv2d": torch.conv2d,
        "F.layer_norm": F.layer_norm,
        "F.embedding": F.embedding,
    }
    linear_before = F.linear
    handle = patch_torch()
    names = patched_names()
    assert "torch.nn.functional.linear" in names and "torch.nn.Linear" in names and "torch.conv2d" in names
    assert torch.nn.Linear is not originals["Linear"] and F.linear is not originals["F.linear"]
    second = patch_torch()
    assert second.owns is False  # a second call changes nothing in torch, counts a user
    second.undo()
    assert is_patched()  # the first handle still holds the patch
    layer = torch.nn.Linear(3, 2)
    # a reference taken before patching still computes (without a statistic)
    plain_out = linear_before(torch.randn(4, 3), layer.weight)
    assert plain_out.shape == (4, 2)
    handle.undo()
    assert not is_patched() and patched_names() == []
    assert torch.nn.Linear is originals["Linear"]
    assert torch.nn.Conv2d is originals["Conv2d"]
    assert torch.nn.LayerNorm is originals["LayerNorm"]
    assert torch.nn.MultiheadAttention is originals["MultiheadAttention"]
    assert torch.nn.modules.linear.Linear is originals["modules.linear.Linear"]
    assert F.linear is originals["F.linear"] and F.conv2d is originals["F.conv2d"]
    assert torch.conv2d is originals["torch.conv2d"] and F.layer_norm is originals["F.layer_norm"]
    assert F.embedding is originals["F.embedding"]
    unpatch_torch()  # idempotent


def test_nested_context_managers_leave_the_outer_patch_alone() -> None:
    with patch_torch():
        with patch_torch():
            pass
        assert is_patched()
    assert not is_patched()


def test_patch_torch_covers_a_custom_module_that_calls_functionals() -> None:
    class Custom(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight)

    model = Custom()
    with patch_torch():
        testing.assert_matches_oracle(model, lambda o, _: o.square().mean(), torch.randn(5, 2, 4))
    assert get_backend("nn").coverage(model) == {"weight": None}
    with get_backend("nn").prepare(model):  # the engine covers it without patching torch
        testing.assert_matches_oracle(model, lambda o, _: o.square().mean(), torch.randn(5, 2, 4))
    assert get_backend("patch_torch").coverage(model) == {"weight": None}


def test_convert_keeps_parameters_state_dict_and_outputs_and_undo_restores_classes() -> None:
    entry = ZOO["transformer"]
    model = entry.build()
    ids = {n: id(p) for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    x = entry.inputs()
    before = model(x)
    classes = [type(m) for m in model.modules()]
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = convert(model)
    assert convert(model).description  # idempotent: converting again is harmless
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), before)
    assert any(type(m).__module__.startswith("truegrad") for m in model.modules())
    entry.loss(model(x), entry.targets()).backward()
    optim.step()  # the optimizer holds the same Parameter objects: it trains the converted model
    assert not torch.equal(model(x), before)
    handle.undo()
    assert [type(m) for m in model.modules()] == classes


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown truegrad backend 'torch_nn'; valid choices: 'auto', 'nn', 'patch_torch', 'patch_model', 'backpack'"):
        get_backend("torch_nn")
    with pytest.raises(TypeError, match=r"backend 'nn' needs a torch.nn.Module, got builtins.list"):
        get_backend("nn").prepare([torch.nn.Linear(2, 2)])  # type: ignore[arg-type]
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"Linear has no trainable parameters"):
        get_backend("patch_torch").prepare(frozen)
    model = torch.nn.Linear(2, 2)
    handle = get_backend("patch_model").prepare(model)
    with pytest.raises(ValueError, match=r"already prepared by backend 'patch_model'; call undo\(\)"):
        get_backend("nn").prepare(model)
    handle.undo()
    get_backend("nn").prepare(model).undo()  # fine once undone


def test_undo_removes_the_hooks_the_rules_attached() -> None:
    from truegrad.nn.rules import base

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    handle = convert(model)
    model(torch.randn(5, 3)).sum().backward()
    assert all(p in base._STATE for p in model.parameters())
    handle.undo()
    assert not any(p in base._STATE for p in model.parameters())
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
