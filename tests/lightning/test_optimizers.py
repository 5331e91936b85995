"""truegrad_lightning.optimizers: parameter groups, the LR schedule, and a real Trainer.fit."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lightning.pytorch")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.optim.lr_scheduler import LambdaLR  # noqa: E402

from truegrad import nn as tnn  # noqa: E402
from truegrad.optim import MissingStatisticError, TGAdamW  # noqa: E402
from truegrad_lightning.optimizers import (  # noqa: E402
    configure_optimizers,
    lr_factor,
    param_groups,
)

pytestmark = pytest.mark.lightning


class Net(torch.nn.Module):
    """Linear, LayerNorm, Embedding tied to the output Linear, a frozen Linear, RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = tnn.Embedding(10, 8)
        self.block = tnn.Linear(8, 8)
        self.ln = tnn.LayerNorm(8)
        self.frozen = tnn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.rms = tnn.RMSNorm(8)
        self.head = tnn.Linear(8, 10)
        self.head.weight = self.emb.weight  # tied
        self.scale = torch.nn.Parameter(torch.ones(()))  # 0-d: no decay


DECAY = ["emb.weight", "block.weight"]
# named_parameters() order: a module's own parameters before its children's
NO_DECAY = ["scale", "block.bias", "ln.weight", "ln.bias", "rms.weight", "head.bias"]


def _names(groups: list[dict]) -> dict[str, list[str]]:
    return {g["name"]: g["param_names"] for g in groups}


def test_param_groups_exact() -> None:
    net = Net()
    groups = param_groups(net, 0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert _names(groups) == {"decay": DECAY, "no_decay": NO_DECAY}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    params = dict(net.named_parameters())
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        assert all(p is params[n] for n, p in zip(g["param_names"], g["params"]))
    flat = [p for g in groups for p in g["params"]]
    assert len(flat) == len({id(p) for p in flat}) == len(DECAY) + len(NO_DECAY)  # tied once
    frozen = {id(p) for p in net.frozen.parameters()}
    assert not frozen & {id(p) for p in flat}
    assert not net.frozen.weight.requires_grad  # nothing changed on the model
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert sum(p.numel() for p in flat) == trainable


def test_param_groups_no_weight_decay_and_explicit_names() -> None:
    class WithPos(Net):
        def __init__(self) -> None:
            super().__init__()
            self.pos = torch.nn.Parameter(torch.zeros(4, 8))
            self.block.no_weight_decay = lambda: {"weight"}  # submodule-relative, timm-style

        def no_weight_decay(self) -> set[str]:
            return {"pos", "does_not_exist"}  # unknown names from the model are ignored

    groups = param_groups(WithPos(), 0.1)
    assert _names(groups) == {
        "decay": ["emb.weight"],
        "no_decay": ["scale", "pos", "block.weight", *NO_DECAY[1:]],
    }

    # An explicit name of the *tied alias* moves the shared tensor; a module name covers its params.
    groups = param_groups(Net(), 0.1, no_decay=("head.weight",))
    assert _names(groups) == {
        "decay": ["block.weight"],
        "no_decay": ["scale", "emb.weight", *NO_DECAY[1:]],
    }
    groups = param_groups(Net(), 0.1, no_decay=["block"])
    assert _names(groups)["decay"] == ["emb.weight"]


def test_empty_group_not_emitted() -> None:
    only_norms = torch.nn.Sequential(tnn.LayerNorm(4), tnn.RMSNorm(4))
    groups = param_groups(only_norms, 0.1)
    assert [(g["name"], g["param_names"], g["weight_decay"]) for g in groups] == [
        ("no_decay", ["0.weight", "0.bias", "1.weight"], 0.0)
    ]
    config = configure_optimizers(only_norms, schedule="constant")
    assert [g["name"] for g in config["optimizer"].param_groups] == ["no_decay"]
    assert param_groups(torch.nn.Linear(2, 2).requires_grad_(False), 0.1) == []


def test_optimizer_class_and_kwargs_respected() -> None:
    config = configure_optimizers(
        Net(),
        optimizer=torch.optim.AdamW,
        lr=3e-4,
        weight_decay=0.05,
        schedule="constant",
        betas=(0.8, 0.9),
    )
    assert set(config) == {"optimizer"}
    opt = config["optimizer"]
    assert type(opt) is torch.optim.AdamW
    assert [(g["name"], g["weight_decay"], g["lr"], g["betas"]) for g in opt.param_groups] == [
        ("decay", 0.05, 3e-4, (0.8, 0.9)),
        ("no_decay", 0.0, 3e-4, (0.8, 0.9)),
    ]
    assert [g["param_names"] for g in opt.param_groups] == [DECAY, NO_DECAY]
    assert [g["param_names"] for g in opt.state_dict()["param_groups"]] == [DECAY, NO_DECAY]


def test_tgadamw_errors_name_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))  # plain torch: no sum_grad_squared
    opt = configure_optimizers(model, schedule="constant")["optimizer"]
    assert isinstance(opt, TGAdamW)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(MissingStatisticError, match=r"'0\.weight'.*'0\.bias'"):
        opt.step()


def _fake_attached(module: torch.nn.Module, total: float) -> torch.nn.Module:
    module.trainer = SimpleNamespace(estimated_stepping_batches=total)
    return module


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_closed_form(schedule: str) -> None:
    lr, warmup, total, m = 1e-3, 10, 100, 0.1
    config = configure_optimizers(
        _fake_attached(Net(), total), lr=lr, schedule=schedule, warmup_steps=warmup, min_lr_ratio=m
    )
    assert config["lr_scheduler"]["interval"] == "step"
    assert config["lr_scheduler"]["frequency"] == 1
    opt, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, LambdaLR)
    lrs = []
    for _ in range(total + 20):
        group_lrs = {g["lr"] for g in opt.param_groups}
        assert len(group_lrs) == 1
        lrs.append(group_lrs.pop())
        opt.step()  # no gradients: a no-op, keeps LambdaLR from warning
        scheduler.step()
    assert lrs[0] == pytest.approx(lr * 1 / 11)  # (s + 1) / (W + 1)
    assert lrs[warmup - 1] == pytest.approx(lr * 10 / 11)
    assert lrs[warmup] == pytest.approx(lr)  # end of warmup: peak
    assert lrs[55] == pytest.approx(lr * (m + (1 - m) * 0.5))  # middle of the decay, both shapes
    p = (32 - warmup) / (total - warmup)  # a quarter of the way, where the shapes differ
    expected = m + (1 - m) * (0.5 * (1 + math.cos(math.pi * p)) if schedule == "cosine" else 1 - p)
    assert lrs[32] == pytest.approx(lr * expected)
    assert lrs[total] == pytest.approx(lr * m)  # end
    assert lrs[-1] == pytest.approx(lr * m)  # stays there
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))
    factors = [
        lr_factor(s, schedule=schedule, warmup_steps=warmup, total_steps=total, min_lr_ratio=m)
        for s in range(len(lrs))
    ]
    assert [lr * f for f in factors] == pytest.approx(lrs)

    # settings are plain values in the scheduler's state_dict and round-trip
    state = scheduler.state_dict()
    assert state["lr_lambdas"][0] == {
        "schedule": schedule,
        "warmup_steps": 10,
        "total_steps": 100,
        "min_lr_ratio": m,
    }
    other = configure_optimizers(Net(), lr=lr, schedule=schedule, total_steps=7)
    other = other["lr_scheduler"]["scheduler"]
    other.load_state_dict(state)
    assert other.lr_lambdas[0](55) == pytest.approx(m + (1 - m) * 0.5)


def test_schedule_variants() -> None:
    # fractional warmup, explicit total_steps (no trainer)
    opt = configure_optimizers(Net(), lr=1.0, warmup_steps=0.1, total_steps=50)["optimizer"]
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 6)  # W = 5
    # constant after warmup; unbounded training is fine then
    unbounded = _fake_attached(Net(), math.inf)
    config = configure_optimizers(unbounded, lr=1.0, schedule="constant", warmup_steps=3)
    scheduler = config["lr_scheduler"]["scheduler"]
    factors = [scheduler.lr_lambdas[0](s) for s in (0, 2, 3, 10**6)]
    assert factors == pytest.approx([0.25, 0.75, 1, 1])
    # no warmup, cosine: starts at the peak
    opt = configure_optimizers(_fake_attached(Net(), 4), lr=2.0)["optimizer"]
    assert opt.param_groups[1]["lr"] == 2.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1e-3}, ValueError, r"Invalid lr: -0\.001"),
        ({"lr": float("nan")}, ValueError, r"Invalid lr: nan"),
        ({"lr": "1e-3"}, TypeError, r"lr must be a float, got '1e-3'"),
        ({"weight_decay": -0.1}, ValueError, r"Invalid weight_decay: -0\.1"),
        ({"schedule": "cosin"}, ValueError, r"Unknown schedule 'cosin': expected one of 'cosine'"),
        ({"min_lr_ratio": 1.5}, ValueError, r"Invalid min_lr_ratio: 1\.5"),
        ({"warmup_steps": -1}, ValueError, r"Invalid warmup_steps: -1"),
        ({"warmup_steps": 1.5}, ValueError, r"Invalid warmup_steps: 1\.5"),
        ({"warmup_steps": True}, TypeError, r"warmup_steps must be an int.*True"),
        (
            {"warmup_steps": 101},
            ValueError,
            r"warmup_steps=101 \(101 steps\) is longer than training \(100 steps\)",
        ),
        ({"total_steps": 0}, ValueError, r"Invalid total_steps: 0"),
        (
            {"no_decay": ("blok",)},
            ValueError,
            r"no_decay name 'blok' matches no parameter.*did you mean 'block'",
        ),
        ({"no_decay": "block"}, TypeError, r"no_decay must be an iterable of names.*'block'"),
    ],
)
def test_bad_values(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        configure_optimizers(_fake_attached(Net(), 100), **kwargs)


def test_bad_training_length() -> None:
    with pytest.raises(ValueError, match="Net is not attached to a Trainer.*total_steps="):
        configure_optimizers(Net())
    with pytest.raises(ValueError, match=r"unbounded \(estimated_stepping_batches=inf\)"):
        configure_optimizers(_fake_attached(Net(), math.inf))
    with pytest.raises(ValueError, match="Linear has no trainable parameters"):
        configure_optimizers(torch.nn.Linear(2, 2).requires_grad_(False), schedule="constant")


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            tnn.Linear(4, 8), tnn.LayerNorm(8), torch.nn.Tanh(), tnn.Linear(8, 1)
        )

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
        return torch.utils.data.DataLoader(data, batch_size=4)

    def configure_optimizers(self):  # noqa: ANN201 - what users write
        return configure_optimizers(self, lr=0.1, warmup_steps=1, min_lr_ratio=0.2)


def test_trainer_fit_logs_group_learning_rates(tmp_path) -> None:
    model = TinyModule()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=[LearningRateMonitor(logging_interval="step")],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)  # TGAdamW would raise if a statistic were missing
    assert trainer.global_step == 3
    assert isinstance(trainer.optimizers[0], TGAdamW)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"lr-TGAdamW/decay", "lr-TGAdamW/no_decay"} <= set(rows[0])
    logged = {int(r["step"]): (float(r["lr-TGAdamW/decay"]), float(r["lr-TGAdamW/no_decay"]))
              for r in rows if r["lr-TGAdamW/decay"]}
    # total = estimated_stepping_batches = 3, W = 1: 0.1 * [1/2, 1, 0.2 + 0.8 * (1 + cos(pi/2)) / 2]
    expected = [0.05, 0.1, 0.1 * (0.2 + 0.8 * 0.5)]
    assert sorted(logged) == [0, 1, 2]
    for step, value in enumerate(expected):
        assert logged[step] == pytest.approx((value, value))
