"""Every backend on models nobody in this project wrote (``tests/realzoo.py``): Hugging Face
architectures from small configs, torch's recurrent and transformer layers in every layout,
parametrizations, the tied-weight and position patterns of real models, PEFT LoRA and
BackPACK's own test problems.

For every model and backend, each trainable parameter either matches the exact oracle of the
whole model (docs/statistic.md section 1: float32 rtol 1e-4, atol 1e-6 x its largest value) or has
no statistic and a recorded reason; :data:`ABSENT` says which, per backend and model, with a
fragment of the reason (no "some"). Outputs equal plain torch's bitwise and ``p.grad`` within
rounding. The default backend covers every parameter the loss reaches.

One tolerance beyond the contract's: a parameter whose exact gradient is zero (an attention
key bias: softmax is invariant to adding the same number to every key's score) has a
statistic of float32 noise on both sides (1e-24 next to statistics of order 1); values below
``1e-10`` times the model's largest statistic are compared as zero.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
import warnings
from typing import Any

import pytest
import torch

from backpack_coverage import BACKPACK_ABSENT
from realzoo import REAL_ZOO
from truegrad import statistic, testing
from truegrad.backends import DEFAULT_BACKEND, get_backend

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

ENGINE_BACKENDS = ("auto", "nn", "patch_torch", "patch_model")

#: The loss does not reach these parameters: no gradient, so no statistic either.
NO_GRADIENT: dict[str, set[str]] = {
    "hf_bert": {"pooler.dense.weight", "pooler.dense.bias"},
    "hf_clip": {"clip.logit_scale"},
}

#: Parameters without a statistic under the engine backends (all four share one engine), per
#: model: a glob over parameter names -> a fragment of the recorded reason. The BackPack
#: backend's table is in ``backpack_coverage.py``.
ENGINE_ABSENT: dict[str, dict[str, str]] = {}


def absent(backend: str, model: str) -> dict[str, str]:
    table = BACKPACK_ABSENT if backend == "backpack" else ENGINE_ABSENT
    return table.get(model, {})


def _matches(name: str, glob: str) -> bool:
    """``glob`` over a parameter name, ``*`` standing for part of one dotted component."""
    pattern = "".join("[^.]*" if c == "*" else re.escape(c) for c in glob)
    return re.fullmatch(pattern, name) is not None


def check_table(result: dict[str, Any], expected: dict[str, str]) -> None:
    """Every parameter without a statistic matches exactly one glob of ``expected`` and its
    reason contains the glob's fragment; every glob matches one at least; every parameter
    with a statistic is exact."""
    wrong = {p: r for p, r in result.items() if r is not None and r.startswith("WRONG")}
    assert not wrong, wrong
    used = set()
    for pname, reason in result.items():
        globs = [g for g in expected if _matches(pname, g)]
        if reason is None:
            assert not globs, f"{pname} is covered, but the table says {globs}"
            continue
        assert len(globs) == 1, f"{pname}: no statistic ({reason}), table globs {globs}"
        assert expected[globs[0]] in reason, (pname, expected[globs[0]], reason)
        used.add(globs[0])
    assert used == set(expected), f"table globs matching nothing: {set(expected) - used}"


def _call(model: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    if hasattr(out, "to_tuple"):
        return _tensors(out.to_tuple())
    return []


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> tuple[Any, ...]:
    """The model's state, inputs, targets, plain outputs and gradients, and the oracle."""
    entry = REAL_ZOO[name]
    torch.manual_seed(0)
    model = entry.build()
    inputs, targets = entry.inputs(), entry.targets()
    state = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    torch.manual_seed(1)
    out = _call(plain, inputs)
    entry.loss(out, targets).backward()
    outputs = [t.detach() for t in _tensors(out)]
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    oracle_model = copy.deepcopy(model)
    if entry.samples_interact:
        oracle_model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = testing.sum_grad_squared_oracle(
            oracle_model, entry.loss, inputs, targets, method=entry.oracle
        )
    return state, inputs, targets, outputs, grads, oracle.sum_grad_squared


def _close(actual: torch.Tensor, expected: torch.Tensor, floor: float) -> float | None:
    a, e = actual.double(), expected.double()
    scale = float(e.abs().max()) if e.numel() else 0.0
    bound = max(1e-6 * scale, floor) + 1e-4 * e.abs()
    diff = (a - e).abs()
    if bool((diff <= bound).all()):
        return None
    return float(diff.max()) / (scale or 1.0)


def run(name: str, backend: str) -> dict[str, Any]:
    """Prepare a copy of the model with ``backend``, run one step, check outputs and grads
    against plain torch, and return ``{parameter: None (exact) | reason | "WRONG ..."}``."""
    entry = REAL_ZOO[name]
    state, inputs, targets, outputs, grads, oracle = _reference(name)
    model = copy.deepcopy(state)
    chosen = get_backend(backend)
    handle = chosen.prepare(model)
    try:
        torch.manual_seed(1)
        out = _call(model, inputs)
        with chosen.backward_context():
            entry.loss(out, targets).backward()
        for mine, plain in zip(_tensors(out), outputs, strict=True):
            assert torch.equal(mine.detach(), plain), f"{name}/{backend}: output differs"
        coverage = chosen.coverage(model)
        floor = 1e-10 * max(float(v.abs().max()) for v in oracle.values() if v.numel())
        result: dict[str, Any] = {}
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if pname in NO_GRADIENT.get(name, ()):
                assert p.grad is None and not statistic.has(p), pname
                continue
            torch.testing.assert_close(p.grad, grads[pname], rtol=1e-4, atol=1e-6, msg=pname)
            value = statistic.get(p)
            if value is None:
                result[pname] = coverage.get(pname) or "NO REASON RECORDED"
                continue
            if entry.samples_interact:  # BatchNorm in training mode: invariants only here
                n = next(t for t in _tensors(inputs) if t.dim()).shape[0] if not isinstance(
                    inputs, torch.Tensor) else inputs.shape[0]
                assert (value >= 0).all() and (n * value >= p.grad**2 * (1 - 1e-4) - 1e-12).all()
                result[pname] = None
                continue
            error = _close(value, oracle[pname], floor)
            result[pname] = None if error is None else f"WRONG: relative error {error:.2e}"
        return result
    finally:
        handle.undo()


NAMES = sorted(REAL_ZOO)


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_engine_backends_are_exact_or_absent_with_the_reason(name: str, backend: str) -> None:
    check_table(run(name, backend), absent(backend, name))


@pytest.mark.backpack
@pytest.mark.skipif(importlib.util.find_spec("backpack") is None, reason="needs backpack-for-pytorch")
@pytest.mark.parametrize("name", NAMES)
def test_backpack_is_exact_or_absent_with_the_reason(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPack's own and the backend's named warnings
        result = run(name, "backpack")
    check_table(result, absent("backpack", name))


def test_the_default_backend_covers_every_parameter_the_loss_reaches() -> None:
    assert DEFAULT_BACKEND == "auto"
    assert not ENGINE_ABSENT, "the default backend leaves parameters without a statistic"


CHECKPOINTED = ["hf_gpt2", "hf_llama", "hf_bert", "hf_t5", "hf_bart", "hf_vit", "hf_gpt_neox", "hf_whisper"]


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", CHECKPOINTED)
def test_gradient_checkpointing(name: str, use_reentrant: bool) -> None:
    """Hugging Face's ``gradient_checkpointing_enable()`` (torch.utils.checkpoint around every
    layer). Non-reentrant (transformers' default): the layers are recomputed during backward,
    inside the rules' backward, and the recomputation runs through the engine exactly as the
    forward did (it ran through plain torch and the checkpoint failed on a different number of
    saved tensors): every parameter exact. Reentrant: the forward runs the layers without
    gradients, so what the model does with their outputs cannot be followed; the layers'
    parameters are exact (their nested backward is followed), the others absent with the
    reason, none wrong."""
    state, inputs, targets, outputs, grads, oracle = _reference(name)
    entry = REAL_ZOO[name]
    model = copy.deepcopy(state)
    assert model.supports_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    backend = get_backend(DEFAULT_BACKEND)
    handle = backend.prepare(model)
    try:
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _call(model, inputs)
            entry.loss(out, targets).backward()
        coverage = backend.coverage(model)
        floor = 1e-10 * max(float(v.abs().max()) for v in oracle.values() if v.numel())
        exact = checked = 0
        for pname, p in model.named_parameters():
            if pname in NO_GRADIENT.get(name, ()) or not p.requires_grad:
                continue
            checked += 1
            torch.testing.assert_close(p.grad, grads[pname], rtol=1e-4, atol=1e-6, msg=pname)
            value = statistic.get(p)
            if value is None:
                assert use_reentrant and coverage[pname], (pname, coverage[pname])
                continue
            assert _close(value, oracle[pname], floor) is None, pname
            exact += 1
        assert exact == checked if not use_reentrant else exact >= checked // 2, (exact, checked)
    finally:
        handle.undo()
