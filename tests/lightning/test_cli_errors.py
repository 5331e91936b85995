"""Errors of the ``truegrad-lightning`` command (issue 15, finding 10): a few lines naming
the field, the bad value and what is valid, before anything runs; no abbreviated options;
its own name in the usage; one line without the lightning extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch")

from truegrad_lightning.cli import TrueGradCLI, condense_error, main

pytestmark = pytest.mark.lightning
ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["truegrad-lightning"])


@pytest.fixture()
def no_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if a Trainer is built: the error must come before."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a Trainer was built before the error")

    monkeypatch.setattr(TrueGradCLI, "instantiate_trainer", refuse)


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("Seed set to")]
    assert 1 <= len(lines) <= 3, err  # not a 48-line usage dump
    assert "usage:" not in err and "--trainer.max_steps" not in err
    assert "truegrad-lightning fit --help" in err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.norm=bogus"], ["model.init_args.norm=bogus", "'none', 'batch', 'group'"]),
        (["--model.init_args.channelz=3"], ["model.init_args.channelz", "no option 'channelz'", "channels"]),
        (["--model.init_args.dropout=abc"], ["model.init_args.dropout=abc", "expected a float"]),
        (["--trainer.max_epochs=abc"], ["trainer.max_epochs=abc", "expected an int"]),
        (["--truegrad.backend=bogus"], ["truegrad.backend=bogus", "'auto', 'nn', 'patch_torch'"]),
        (
            ["--model.init_args.optimizer.init_args.lrr=2"],
            ["optimizer.init_args.lrr", "TGAdamW has no option 'lrr'", "weight_decay"],
        ),
        (
            ["--model.init_args.optimizer.init_args.betas=[0.9]"],
            ["optimizer.init_args.betas=[0.9]", "tuple with 3 elements"],
        ),
        (
            ["--trainer.callbacks.init_args.backend=nn"],
            ["trainer.callbacks.init_args.backend=nn", "--truegrad.backend"],
        ),
    ],
)
def test_bad_values_fail_in_a_few_lines_naming_field_value_and_choices(
    args: list[str], expected: list[str], capsys: pytest.CaptureFixture[str], no_trainer: None
) -> None:
    line = _error(["fit", "--config", "digits_cnn", *args], capsys)
    assert line.startswith("truegrad-lightning fit: error: ")
    for text in expected:
        assert text in line, line


def test_bad_value_in_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_trainer: None) -> None:
    from truegrad_lightning.cli import CONFIG_DIR

    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIG_DIR / "digits_cnn.yaml").read_text().replace("backend: auto", "backend: autp"))
    line = _error(["fit", "--config", str(bad)], capsys)
    assert "trainer.callbacks.init_args.backend=autp" in line and "'auto', 'nn'" in line
    assert "class_path" not in line  # not the whole section back


@pytest.mark.parametrize(
    ("option", "field"),
    [
        ("--model.init_args.optimizer.init_args.lr=-1", "lr must be a float >= 0, got -1.0"),
        ("--model.init_args.optimizer.init_args.weight_decay=-0.5", "weight_decay must be a float >= 0"),
        ("--model.init_args.lr_scheduler.init_args.warmup_steps=-3", "warmup_steps"),
    ],
)
def test_optimizer_arguments_are_checked_before_the_trainer_runs(
    option: str, field: str, capsys: pytest.CaptureFixture[str], no_trainer: None
) -> None:
    """It passed parsing and died at configure_optimizers with a 51-line traceback."""
    line = _error(["fit", "--config", "digits_cnn", option], capsys)
    assert "model.init_args." in line and field in line, line


def test_option_names_are_not_abbreviated(capsys: pytest.CaptureFixture[str], no_trainer: None) -> None:
    """``--trainer.max_epoch=3`` was silently taken as ``max_epochs``."""
    line = _error(["fit", "--config", "digits_cnn", "--trainer.max_epoch=3"], capsys)
    assert "unrecognized arguments: --trainer.max_epoch=3" in line
    assert "did you mean --trainer.max_epochs?" in line


def test_unknown_model_name(capsys: pytest.CaptureFixture[str], no_trainer: None) -> None:
    line = _error(["fit", "--model", "CNNClassifer"], capsys)
    assert "model=CNNClassifer" in line and "CNNClassifier" in line and "CharGPT" in line


def test_condense_error_passes_other_messages_through() -> None:
    assert condense_error("unrecognized arguments: --x") == "unrecognized arguments: --x"
    message = 'Parser key "config": File does not exist: \'/nope.yaml\''
    assert condense_error(message).startswith("config: File does not exist: '/nope.yaml'")


def test_module_usage_names_the_command(tmp_path: Path) -> None:
    """``python -m truegrad_lightning --help`` said ``usage: __main__.py``."""
    done = subprocess.run(
        [sys.executable, "-m", "truegrad_lightning", "--help"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: truegrad-lightning"), done.stdout[:200]
    assert "__main__" not in done.stdout
    for subcommand in ("fit", "validate", "test", "predict", "diagnose", "configs"):
        assert subcommand in done.stdout


def test_entry_point_is_outside_the_lightning_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["scripts"]["truegrad-lightning"] == "truegrad._cli:main"


BLOCK_LIGHTNING = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lightning" or name.startswith("lightning."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    sys.argv = ["truegrad-lightning", "fit", "--config", "digits_cnn"]
    from truegrad._cli import main
    main()
    """
)


def test_without_the_lightning_extra_the_command_prints_one_line(tmp_path: Path) -> None:
    """It printed a traceback; now the one line ``import truegrad_lightning`` gives."""
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_LIGHTNING], capture_output=True, text=True, cwd=tmp_path, timeout=300,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "lightning.pytorch" in lines[0] and "pip install 'truegrad[lightning]'" in lines[0]
