"""``fit`` without a config adds the TrueGradCallback that the built-in models' TGAdamW needs
(issue 15, finding 3), and ``--truegrad.backend`` sets the backend of the callback wherever
it is."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch")
yaml = pytest.importorskip("yaml")

from lightning.pytorch.callbacks import ModelCheckpoint

from truegrad_lightning import TrueGradCallback
from truegrad_lightning.cli import TrueGradCLI, main

pytestmark = [
    pytest.mark.lightning,
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*The number of training batches.*:UserWarning"),
]
NO_CONFIG = ["--model", "truegrad_lightning.models.CNNClassifier", "--data", "truegrad_lightning.data.DigitsDataModule"]
TINY = ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["truegrad-lightning"])
    monkeypatch.chdir(tmp_path)


@pytest.fixture()
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build everything, run nothing."""
    monkeypatch.setattr(TrueGradCLI, "_run_subcommand", lambda self, subcommand: None)


def _truegrad_callbacks(cli: TrueGradCLI) -> list[TrueGradCallback]:
    return [c for c in cli.trainer.callbacks if isinstance(c, TrueGradCallback)]


def _added_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "added TrueGradCallback" in line]


def test_fit_without_config_trains_with_an_added_callback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It stopped at the first step with MissingStatisticError: TGAdamW (the built-in
    models' default) needs p.sum_grad_squared and nothing computed it."""
    cli = TrueGradCLI(args=["fit", *NO_CONFIG, *TINY])
    assert cli.trainer.global_step == 3
    [callback] = _truegrad_callbacks(cli)
    assert callback.backend == "auto" and callback is cli.added_callback
    err = capsys.readouterr().err
    [line] = _added_lines(err)
    assert line == (
        "truegrad-lightning: added TrueGradCallback(backend='auto') because the model's TGAdamW "
        "needs p.sum_grad_squared and no TrueGradCallback is configured (choose the backend with "
        "--truegrad.backend)"
    )
    # the saved config reproduces the run: it has the callback
    [saved] = list(tmp_path.rglob("config.yaml"))
    callbacks = yaml.safe_load(saved.read_text())["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == ["truegrad_lightning.TrueGradCallback"]
    assert callbacks[0]["init_args"]["backend"] == "auto"


def test_backend_option_without_config(no_run: None, capsys: pytest.CaptureFixture[str]) -> None:
    cli = TrueGradCLI(args=["fit", *NO_CONFIG, "--truegrad.backend", "nn"])
    assert [c.backend for c in _truegrad_callbacks(cli)] == ["nn"]
    assert "backend='nn'" in _added_lines(capsys.readouterr().err)[0]


def test_backend_option_sets_the_configured_callback(no_run: None, capsys: pytest.CaptureFixture[str]) -> None:
    """``--trainer.callbacks.init_args.backend=nn`` landed on ModelCheckpoint (the last
    callback); ``--truegrad.backend`` finds the TrueGradCallback wherever it is."""
    cli = TrueGradCLI(args=["fit", "--config", "digits_cnn", "--truegrad.backend=nn"])
    assert [c.backend for c in _truegrad_callbacks(cli)] == ["nn"]
    assert any(isinstance(c, ModelCheckpoint) for c in cli.trainer.callbacks)
    assert not _added_lines(capsys.readouterr().err)  # it was configured: nothing added
    saved = cli.config["fit"]["trainer"]["callbacks"]
    assert [c.init_args.backend for c in saved if c.class_path.endswith("TrueGradCallback")] == ["nn"]


def test_backend_option_in_a_config_file(tmp_path: Path, no_run: None) -> None:
    from truegrad_lightning.cli import CONFIG_DIR

    config = tmp_path / "mine.yaml"
    config.write_text((CONFIG_DIR / "digits_mlp.yaml").read_text() + "truegrad:\n  backend: patch_model\n")
    cli = TrueGradCLI(args=["fit", "--config", str(config)])
    assert [c.backend for c in _truegrad_callbacks(cli)] == ["patch_model"]


@pytest.mark.parametrize(
    ("args", "added"),
    [
        (["fit", "--config", "digits_adamw"], None),  # AdamW needs no statistic
        (["fit", "--config", "digits_adamw", "--truegrad.backend=nn"], "nn"),  # asked for
        (["fit", *NO_CONFIG, "--model.init_args.optimizer=torch.optim.AdamW"], None),
        (["fit", *NO_CONFIG, "--model.init_args.optimizer.init_args.default_to_adam=true"], None),
        (["validate", *NO_CONFIG], None),  # no optimizer step
        (["fit", "--config", "digits_cnn"], None),  # configured already
    ],
)
def test_callback_added_only_when_needed_or_asked(
    args: list[str], added: str | None, no_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = TrueGradCLI(args=args)
    lines = _added_lines(capsys.readouterr().err)
    if added is None:
        assert not lines and cli.added_callback is None
    else:
        assert len(lines) == 1 and cli.added_callback is not None
        assert cli.added_callback.backend == added


def test_main_runs_without_config(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's newcomer command, through the entry point's function."""
    main(["fit", *NO_CONFIG, "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false", "--truegrad.backend=nn"])
    out = capsys.readouterr().out
    assert "fit done: 2 steps" in out
