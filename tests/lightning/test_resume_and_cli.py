"""TrueGradCallback with LightningCLI's eagerly built optimizer, and checkpoint resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from truegrad import statistic
from truegrad.optim.tgadamw import TGAdamW

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from truegrad_lightning import TrueGradCallback  # noqa: E402

pytestmark = [
    pytest.mark.lightning,
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*is deprecated"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:You.re resuming from a checkpoint that ended before"),
]

N_SAMPLES = 24
STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_true_sq", "step")


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_SAMPLES, 6, generator=g)
    return TensorDataset(x, torch.randint(0, 3, (N_SAMPLES,), generator=g))


class Tiny(pl.LightningModule):
    """Two Linear layers; an optional bf16 last layer (its input is cast to bf16)."""

    def __init__(self, hidden: int = 8, batch_size: int = 8, bf16_head: bool = False) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.body = torch.nn.Linear(6, hidden)
        self.head = torch.nn.Linear(hidden, 3)
        if bf16_head:
            self.head.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.head(h.to(self.head.weight.dtype)).float()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(data(), batch_size=self.batch_size, shuffle=False, num_workers=0)


class ResumeModule(Tiny):
    """The batch of optimizer step ``t`` is drawn from a generator seeded with ``t``.

    Lightning's own data order after a resume differs from an uninterrupted run when the
    checkpoint falls at an epoch end (the restored epoch re-iterates a fresh loader), so
    the loader only paces the steps and the data is a function of ``global_step``.
    """

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(1000 + self.global_step)
        x = torch.randn(self.batch_size, 6, generator=g)
        y = torch.randint(0, 3, (self.batch_size,), generator=g)
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return TGAdamW(self.parameters(), lr=1e-2, weight_decay=1e-2)


class _RecordStep(pl.Callback):
    """At every optimizer step: which parameters the optimizer holds and which carry a
    statistic."""

    def __init__(self) -> None:
        self.optimizer_param_ids: list[list[int]] = []
        self.with_statistic: list[set[str]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.optimizer_param_ids.append(
            [id(p) for group in optimizer.param_groups for p in group["params"]]
        )
        self.with_statistic.append(
            {
                n
                for n, p in pl_module.named_parameters()
                if statistic.has(p) and bool((statistic.get(p) > 0).any())
            }
        )


def test_lightning_cli_eager_optimizer_trains_converted_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["truegrad-test"])  # only `args` is parsed
    recorder = _RecordStep()
    cli = LightningCLI(
        model_class=Tiny,
        run=False,
        seed_everything_default=0,
        save_config_callback=None,
        args={
            "optimizer": {
                "class_path": "truegrad.optim.TGAdamW",
                "init_args": {"lr": 0.05, "weight_decay": 0.0},
            },
            "trainer": {
                "callbacks": [
                    {
                        "class_path": "truegrad_lightning.TrueGradCallback",
                        "init_args": {"backend": "patch_torch"},
                    }
                ],
                "max_steps": 3,
                "logger": False,
                "enable_checkpointing": False,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "accelerator": "cpu",
                "devices": 1,
            },
        },
    )
    model = cli.model
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, TrueGradCallback)]
    assert len(callbacks) == 1 and callbacks[0].backend == "patch_torch"
    cli.trainer.callbacks.append(recorder)

    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    # the CLI built the optimizer already, on these Parameters, before any callback ran
    eager = model.configure_optimizers()
    assert type(eager) is TGAdamW
    assert [id(p) for g in eager.param_groups for p in g["params"]] == [id(p) for p in params]
    before = [p.detach().clone() for p in params]
    cli.trainer.fit(model)

    optimizer = cli.trainer.optimizers[0]
    assert optimizer is eager
    # the optimizer built by the CLI before fit steps the very Parameters the model uses
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [id(p) for p in params]
    assert recorder.optimizer_param_ids == [[id(p) for p in params]] * 3
    # every parameter carried a (nonzero) statistic at every step
    assert recorder.with_statistic == [set(names)] * 3
    # ...and TGAdamW used it: u (exp_avg_true_sq) exists and every parameter moved
    for p, b in zip(params, before):
        assert int(optimizer.state[p]["step"]) == 3
        assert bool((optimizer.state[p]["exp_avg_true_sq"] > 0).any())
        assert not torch.equal(p.detach(), b)
    assert type(model.body) is torch.nn.Linear  # undone at teardown


def _trainer(tmp_path: Path, max_steps: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )


def _optimizer_state(trainer: pl.Trainer, module: pl.LightningModule) -> list[dict]:
    optimizer = trainer.optimizers[0]
    return [{k: optimizer.state[p][k] for k in STATE_KEYS} for p in module.parameters()]


@pytest.mark.parametrize(
    ("batch_size", "bf16_head"),
    [
        (8, False),  # 3 batches per epoch: the checkpoint at step 3 is at an epoch end
        (12, False),  # 2 batches per epoch: step 3 is in the middle of the second epoch
        (8, True),  # a bf16 parameter: its float32 optimizer state must survive the reload
    ],
)
def test_resume_equals_uninterrupted(tmp_path: Path, batch_size: int, bf16_head: bool) -> None:
    def module() -> ResumeModule:
        pl.seed_everything(0, verbose=False)
        return ResumeModule(batch_size=batch_size, bf16_head=bf16_head)

    # uninterrupted, 6 steps; ModelCheckpoint writes the state after step 3
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=False
    )
    callback = TrueGradCallback(backend="patch_torch")
    full = module()
    t_full = _trainer(tmp_path, 6, [callback, checkpoint])
    t_full.fit(full)
    assert t_full.global_step == 6
    path = tmp_path / "ckpt" / next(
        f.name for f in (tmp_path / "ckpt").iterdir() if "step=3" in f.name
    )

    # the same checkpoint written by hand after a 3-step run is the same state
    first = module()
    t_first = _trainer(tmp_path, 3, [TrueGradCallback(backend="patch_torch")])
    t_first.fit(first)
    manual = tmp_path / "manual.ckpt"
    t_first.save_checkpoint(manual)

    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 3
    assert saved["callbacks"][callback.state_key] == {
        "backend": "patch_torch",
        "chunk_bytes": None,
        "log_statistics": False,
        "bitwise_grad": None,
    }
    saved_opt = saved["optimizer_states"][0]["state"]
    assert len(saved_opt) == 4 and all(set(s) == set(STATE_KEYS) for s in saved_opt.values())
    if bf16_head:
        assert saved["state_dict"]["head.weight"].dtype == torch.bfloat16
        assert saved_opt[2]["exp_avg_sq"].dtype == torch.float32  # head.weight

    for ckpt in (path, manual):
        resumed = module()  # fresh weights: everything must come from the checkpoint
        callback_resumed = TrueGradCallback(backend="patch_torch")
        t_resumed = _trainer(tmp_path, 6, [callback_resumed])
        t_resumed.fit(resumed, ckpt_path=ckpt)
        assert t_resumed.global_step == 6
        assert callback_resumed._loaded_state == saved["callbacks"][callback.state_key]
        for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
            assert a.dtype == b.dtype
            assert torch.equal(a, b), name
        for sa, sb in zip(_optimizer_state(t_full, full), _optimizer_state(t_resumed, resumed)):
            for key in STATE_KEYS:
                assert sa[key].dtype == sb[key].dtype == torch.float32, key
                assert torch.equal(sa[key], sb[key]), key
        assert float(_optimizer_state(t_resumed, resumed)[0]["step"]) == 6.0
    # the run really trained after the checkpoint
    assert not torch.equal(first.body.weight, full.body.weight)


def test_two_callbacks_state_through_checkpoint(tmp_path: Path) -> None:
    a = TrueGradCallback(backend="nn", chunk_bytes=1 << 20)
    b = TrueGradCallback(backend="patch_torch", log_statistics=True)
    assert a.state_key != b.state_key
    module = ResumeModule()
    t = _trainer(tmp_path, 1, [a, b])
    t.fit(module)
    path = tmp_path / "two.ckpt"
    t.save_checkpoint(path)

    saved = torch.load(path, weights_only=True)["callbacks"]
    assert saved[a.state_key] == {
        "backend": "nn", "chunk_bytes": 1 << 20, "log_statistics": False, "bitwise_grad": None
    }
    assert saved[b.state_key] == {
        "backend": "patch_torch",
        "chunk_bytes": None,
        "log_statistics": True,
        "bitwise_grad": None,
    }

    a2 = TrueGradCallback(backend="nn", chunk_bytes=1 << 20)
    b2 = TrueGradCallback(backend="patch_torch", log_statistics=True)
    t2 = _trainer(tmp_path, 2, [b2, a2])  # order does not matter: matched by state_key
    t2.fit(ResumeModule(), ckpt_path=path)
    assert t2.global_step == 2
    assert a2._loaded_state == saved[a.state_key]
    assert b2._loaded_state == saved[b.state_key]
