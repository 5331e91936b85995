"""``truegrad-lightning diagnose``: truegrad.diagnose on one training batch of the
configured model and datamodule, with the configured backend; exit status 1 when a
trainable parameter would be uncovered with a strict TGAdamW."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")

from truegrad_lightning.cli import TrueGradCLI, training_step_loss
from truegrad_lightning.models import CNNClassifier

pytestmark = [
    pytest.mark.lightning,
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
]
FAST = ["--repeats=1", "--measure_memory=false"]
TINY_GPT = [
    "--model.init_args.n_layer=1", "--model.init_args.n_embd=16", "--model.init_args.n_head=2",
    "--model.init_args.block_size=16", "--data.init_args.block_size=16",
    "--data.init_args.batch_size=4", "--data.init_args.max_chars=3000",
]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["truegrad-lightning"])
    monkeypatch.chdir(tmp_path)


def test_diagnose_digits_cnn_covers_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = TrueGradCLI(args=["diagnose", "--config", "digits_cnn", *FAST])
    report = cli.diagnose_report
    assert report.backend == "auto" and report.uncovered == [] and not report.unused
    assert [row.name for row in report.parameters] == [n for n, _ in cli.model.named_parameters()]
    assert all(row.covered and row.relative_error < 1e-4 for row in report.parameters)
    out = capsys.readouterr().out
    assert "net.0.weight" in out and "rel. error" in out and "backward time" in out
    assert "covered by backend 'auto'" in out.splitlines()[-1]
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("config.yaml"))


def test_diagnose_takes_the_backend_option(capsys: pytest.CaptureFixture[str]) -> None:
    cli = TrueGradCLI(args=["diagnose", "--config", "digits_mlp", "--truegrad.backend=patch_model", *FAST])
    assert cli.diagnose_report.backend == "patch_model" and not cli.diagnose_report.uncovered
    cli = TrueGradCLI(args=["diagnose", "--config", "digits_mlp", *FAST])  # the config's callback
    assert cli.diagnose_report.backend == "nn"


def test_diagnose_exits_1_when_a_parameter_is_uncovered(capsys: pytest.CaptureFixture[str]) -> None:
    """BackPack on the char GPT: the position embedding of arange(T), the tied embedding
    and the LayerNorms get no statistic."""
    pytest.importorskip("backpack")
    with pytest.raises(SystemExit) as exit_info:
        TrueGradCLI(args=["diagnose", "--config", "char_gpt", "--truegrad.backend=backpack", *TINY_GPT, *FAST])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "wpe.weight" in captured.out and "NO" in captured.out
    [line] = [line for line in captured.err.splitlines() if line.startswith("truegrad-lightning diagnose:")]
    assert "get no statistic with backend 'backpack'" in line and "wpe.weight" in line


def test_diagnose_char_gpt_auto_covers_everything(capsys: pytest.CaptureFixture[str]) -> None:
    cli = TrueGradCLI(args=["diagnose", "--config", "char_gpt", *TINY_GPT, *FAST])
    assert cli.diagnose_report.uncovered == []
    assert max(row.relative_error for row in cli.diagnose_report.parameters) < 1e-3


def test_training_step_loss_is_the_trained_loss() -> None:
    model = CNNClassifier(channels=(4,), input_size=8)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    inputs, loss_fn = training_step_loss(model, (x, y))
    assert inputs is not None and torch.equal(inputs, x)
    expected = torch.nn.functional.cross_entropy(model(x), y)
    assert torch.allclose(loss_fn(model(x), (x, y)), expected)


def test_training_step_that_does_not_call_the_model_is_refused() -> None:
    class Direct(CNNClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

    with pytest.raises(ValueError, match="exactly once; Direct.training_step called it 0 times"):
        training_step_loss(Direct(channels=(4,)), (torch.randn(2, 1, 8, 8), torch.tensor([0, 1])))
