"""Built-in models against the exact oracle on every backend, the model-side optimizer
construction, and WarmupCosineLR."""

from __future__ import annotations

import functools
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from truegrad import statistic
from truegrad.backends import get_backend
from truegrad.optim import TGAdamW
from truegrad.testing import assert_matches_oracle

pl = pytest.importorskip("lightning.pytorch")

from truegrad_lightning import TrueGradCallback  # noqa: E402
from truegrad_lightning.models import CharGPT, CNNClassifier, MLPClassifier  # noqa: E402
from truegrad_lightning.optimizers import lr_factor  # noqa: E402
from truegrad_lightning.schedules import WarmupCosineLR  # noqa: E402

pytestmark = [
    pytest.mark.lightning,
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]
_NO_BACKPACK = importlib.util.find_spec("backpack") is None
ALL_BACKENDS = [
    "nn",
    "patch_torch",
    "patch_model",
    pytest.param("backpack", marks=[pytest.mark.backpack, pytest.mark.skipif(_NO_BACKPACK, reason="needs backpack")]),
]


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _check(
    model: torch.nn.Module, backend: str, loss_fn, x: torch.Tensor, y: torch.Tensor, skip: set[str] = frozenset()
) -> None:
    """One backward through ``backend``; statistic and grad of every parameter but
    ``skip`` (and no statistic at all for those) against the oracle."""
    impl = get_backend(backend)
    if skip and backend == "backpack":  # what it leaves uncovered, it names at prepare
        from truegrad.backends.backpack import UncoveredParameterWarning

        with pytest.warns(UncoveredParameterWarning, match=f"{len(skip)} of .* get no sum_grad_squared"):
            handle = impl.prepare(model)
    else:
        handle = impl.prepare(model)
    try:
        for p in model.parameters():
            p.grad = None
        statistic.clear(list(model.parameters()))
        with impl.backward_context():  # BackPack's backward runs inside its context
            loss_fn(model(x), y).backward()
        names = [n for n, _ in model.named_parameters() if n not in skip]
        assert_matches_oracle(model, loss_fn, x, y, run_backward=False, params=names)
        params = dict(model.named_parameters())
        assert not any(statistic.has(params[n]) for n in skip)
    finally:
        handle.undo()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn", "cnn_group"])
def test_classifiers_match_oracle(kind: str, backend: str) -> None:
    torch.manual_seed(0)
    model = {
        "mlp": lambda: MLPClassifier(hidden_sizes=(16, 12), activation="gelu"),
        "cnn": lambda: CNNClassifier(channels=(4, 6)),
        "cnn_group": lambda: CNNClassifier(channels=(4, 8), norm="group"),
    }[kind]().double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    uncovered = {n: why for n, why in get_backend(backend).coverage(model).items() if why is not None}
    if backend == "backpack" and kind == "cnn_group":  # BackPack has no GroupNorm rule
        assert set(uncovered) == {"net.1.weight", "net.1.bias", "net.5.weight", "net.5.bias"}
        assert all("GroupNorm" in reason for reason in uncovered.values())
    else:
        assert uncovered == {}
    _check(model, backend, F.cross_entropy, x, y, skip=set(uncovered))


@pytest.mark.parametrize("backend", ["nn", "patch_torch", "patch_model"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_char_gpt_matches_oracle(backend: str, norm: str) -> None:
    """Tied embeddings, expanded position ids and causal attention: exact per sample."""
    torch.manual_seed(0)
    model = CharGPT(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, norm=norm).double()
    assert model.lm_head.weight is model.wte.weight
    ids = torch.randint(0, 11, (4, 8))
    _check(model, backend, _lm_loss, ids, torch.roll(ids, -1, dims=1))


def test_char_gpt_builds_from_datamodule_vocab() -> None:
    from truegrad_lightning.data import CharDataModule

    data = CharDataModule(corpus="zen", block_size=16, batch_size=8)
    model = CharGPT(block_size=16, n_layer=1, n_head=2, n_embd=16)
    assert not model.built and model.hparams.vocab_size is None
    trainer = pl.Trainer(
        max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[TrueGradCallback(backend="patch_model")],
    )
    trainer.fit(model, datamodule=data)
    assert model.built and model.hparams.vocab_size == data.vocab_size == 45
    assert model.wte.num_embeddings == model.lm_head.out_features == 45
    assert isinstance(trainer.optimizers[0], TGAdamW)
    # the optimizer was built after configure_model: it steps every layer's parameters
    stepped = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert stepped == {id(p) for p in model.parameters()}


def test_char_gpt_rejects_data_longer_than_context() -> None:
    from truegrad_lightning.data import CharDataModule

    data = CharDataModule(corpus="zen", block_size=16, batch_size=8)
    model = CharGPT(vocab_size=data.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"data.block_size=16 is longer than model.block_size=8"):
        trainer.fit(model, datamodule=data)


def test_model_argument_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="n_embd=10 must be divisible by n_head=4"):
        CharGPT(vocab_size=5, n_embd=10, n_head=4)
    with pytest.raises(ValueError, match=r"input_size=8 must be divisible by 2\*\*len\(channels\) = 16"):
        CNNClassifier(channels=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="kernel_size=2 must be odd"):
        CNNClassifier(kernel_size=2)
    with pytest.raises(ValueError, match=r"MLPClassifier: dropout=1.0 must be in \[0, 1\)"):
        MLPClassifier(dropout=1.0)


def test_optimizer_groups_take_the_configured_weight_decay() -> None:
    model = CNNClassifier(
        channels=(4, 4), optimizer=functools.partial(TGAdamW, lr=0.5, weight_decay=0.25)
    )
    opt = model.configure_optimizers()
    assert isinstance(opt, TGAdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == 0.25 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["param_names"] == ["net.0.weight", "net.3.weight", "net.7.weight"]
    assert groups["no_decay"]["param_names"] == ["net.0.bias", "net.3.bias", "net.7.bias"]
    assert all(g["lr"] == 0.5 for g in opt.param_groups)


def test_warmup_cosine_total_steps_filled_from_trainer() -> None:
    model = MLPClassifier(
        hidden_sizes=(8,),
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        lr_scheduler=functools.partial(WarmupCosineLR, warmup_steps=0.25, min_lr_ratio=0.1),
    )
    model.trainer = type("T", (), {"estimated_stepping_batches": 8})()  # type: ignore[assignment]
    config = model.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert scheduler.total_steps == 8
    seen = []
    for _ in range(10):
        seen.append(config["optimizer"].param_groups[0]["lr"])
        config["optimizer"].step()
        scheduler.step()
    expected = [
        lr_factor(s, schedule="cosine", warmup_steps=2, total_steps=8, min_lr_ratio=0.1) for s in range(10)
    ]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[0] == pytest.approx(1 / 3) and seen[2] == 1.0 and seen[8] == pytest.approx(0.1)
    # the schedule's state holds plain numbers only (checkpoints load with weights_only=True)
    state = scheduler.state_dict()
    assert state["lr_lambdas"][0] == {
        "schedule": "cosine", "warmup_steps": 0.25, "total_steps": 8, "min_lr_ratio": 0.1
    }
    torch.save(state, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def test_warmup_cosine_errors() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=r"warmup_steps=10 \(10 steps\) is longer than training \(5 steps\)"):
        WarmupCosineLR(opt, total_steps=5, warmup_steps=10)
    with pytest.raises(ValueError, match="unknown schedule 'cos'"):
        WarmupCosineLR(opt, schedule="cos")  # type: ignore[arg-type]
    unbounded = WarmupCosineLR(opt)
    opt.step()
    with pytest.raises(RuntimeError, match="stepped before its total_steps was set"):
        unbounded.step()
    assert math.isclose(opt.param_groups[0]["lr"], 1.0)
