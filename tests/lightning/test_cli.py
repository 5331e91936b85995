"""The ``truegrad-lightning`` command and every YAML in ``configs/``."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
yaml = pytest.importorskip("yaml")

from truegrad import statistic  # noqa: E402
from truegrad_lightning import TrueGradCallback  # noqa: E402
from truegrad_lightning.cli import TrueGradCLI, main  # noqa: E402

pytestmark = [
    pytest.mark.lightning,
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*is deprecated"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*The number of training batches.*:UserWarning"),
]

CONFIGS = Path(__file__).parents[2] / "configs"
RUNNABLE = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "multi_gpu")
# What each config must resolve to: (model class, backend of its TrueGradCallback or None,
# optimizer class_path, extra trainer settings).
EXPECTED = {
    "digits_cnn": ("CNNClassifier", "auto", "truegrad.optim.TGAdamW", {}),
    "digits_mlp": ("MLPClassifier", "nn", "truegrad.optim.TGAdamW", {}),
    "digits_backpack": ("CNNClassifier", "backpack", "truegrad.optim.TGAdamW", {}),
    "digits_adamw": ("CNNClassifier", None, "torch.optim.AdamW", {}),
    "char_gpt": ("CharGPT", "auto", "truegrad.optim.TGAdamW", {}),
    "ddp_cpu": ("CNNClassifier", "auto", "truegrad.optim.TGAdamW", {"devices": 2, "strategy": "ddp"}),
    "bf16": ("CNNClassifier", "auto", "truegrad.optim.TGAdamW", {"precision": "bf16-mixed"}),
    "multi_gpu": (
        "CharGPT", "auto", "truegrad.optim.TGAdamW",
        {"accelerator": "gpu", "devices": -1, "strategy": "ddp", "precision": "16-mixed"},
    ),
}


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when given ``args`` while ``sys.argv`` holds pytest's."""
    monkeypatch.setattr(sys, "argv", ["truegrad-lightning"])


def _config(name: str) -> str:
    return str(CONFIGS / f"{name}.yaml")


def _print_config(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def _parse_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        TrueGradCLI(args=args, run=False)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_every_config_is_covered_and_documented() -> None:
    assert sorted(EXPECTED) == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    for name in EXPECTED:
        first = Path(_config(name)).read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, f"{name}.yaml must say what it demonstrates"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_print_config_round_trips_and_resolves(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    printed = _print_config(["fit", "--config", _config(name)], capsys)
    config = yaml.safe_load(printed)
    model_class, backend, optimizer, trainer_settings = EXPECTED[name]
    assert config["model"]["class_path"].endswith("." + model_class)
    assert config["model"]["init_args"]["optimizer"]["class_path"] == optimizer
    callbacks = [c for c in config["trainer"]["callbacks"] or [] if c["class_path"].endswith("TrueGradCallback")]
    assert [c["init_args"]["backend"] for c in callbacks] == ([backend] if backend else [])
    for key, value in trainer_settings.items():
        assert config["trainer"][key] == value, key
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert _print_config(["fit", "--config", str(again)], capsys) == printed


def test_multi_gpu_resolves_to_ddp_and_fp16_mixed(capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU config cannot run here: check what Lightning makes of its settings."""
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
    from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT

    trainer = yaml.safe_load(_print_config(["fit", "--config", _config("multi_gpu")], capsys))["trainer"]
    assert StrategyRegistry.get(trainer["strategy"]).__class__ is DDPStrategy
    valid_precisions = {v for literal in get_args(_PRECISION_INPUT) for v in get_args(literal)}
    assert trainer["precision"] in valid_precisions
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == ("gpu", -1, "16-mixed")


class CheckInWorker(pl.Callback):
    """Asserts inside every (DDP worker) process: each optimizer step sees a finite
    statistic on every trainable parameter (TGAdamW configs) or none (AdamW), and the
    run makes ``steps`` steps; then leaves a marker file named after its rank."""

    def __init__(self, marker_dir: Path, with_statistic: bool, steps: int) -> None:
        self.marker_dir, self.with_statistic, self.steps = marker_dir, with_statistic, steps
        self.checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        assert params
        for p in params:
            assert statistic.has(p) == self.with_statistic
            if self.with_statistic:
                s = statistic.get(p)
                assert s.dtype == torch.float32 and s.shape == p.shape
                assert bool(torch.isfinite(s).all()) and bool((s >= 0).all())
        self.checked += 1

    def on_train_end(self, trainer, pl_module) -> None:
        assert trainer.global_step == self.steps == self.checked
        (self.marker_dir / f"rank{trainer.global_rank}").write_text(str(trainer.world_size))


@pytest.mark.parametrize("name", RUNNABLE)
def test_config_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    """Two training and two validation batches of each config (DDP: 2 forked CPU
    processes, checked inside the workers)."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", _config(name), "--trainer.fast_dev_run=2"]
    if name == "ddp_cpu":
        args.append("--trainer.strategy=ddp_fork")  # never the popen "ddp" launcher under pytest
    backend = EXPECTED[name][1]
    markers = tmp_path / "markers"
    markers.mkdir()
    check = CheckInWorker(markers, with_statistic=backend is not None, steps=2)
    cli = TrueGradCLI(args=args, trainer_defaults={"callbacks": [check]})
    trainer = cli.trainer
    world_size = 2 if name == "ddp_cpu" else 1
    assert sorted(p.name for p in markers.iterdir()) == [f"rank{r}" for r in range(world_size)]
    assert all(p.read_text() == str(world_size) for p in markers.iterdir())
    assert torch.isfinite(trainer.callback_metrics["val_loss"])  # from rank 0
    callbacks = [c for c in trainer.callbacks if isinstance(c, TrueGradCallback)]
    assert [c.backend for c in callbacks] == ([backend] if backend else [])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    steps = " in 2 worker processes" if name == "ddp_cpu" else ": 2 steps, 1 epochs"
    assert summary.startswith(f"fit done{steps} | val_"), summary
    assert summary.endswith("| checkpoint: none written"), summary  # fast_dev_run writes nothing


def test_digits_cnn_reaches_95_percent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The main job as configured (12 epochs, seed 0), then test and predict from its best
    checkpoint, found without --ckpt_path (the latest run's best, said in one line). The test
    split is disjoint from the training and validation splits (issue 15, finding 4: it was
    the validation split, so test_acc repeated the best val_acc)."""
    monkeypatch.chdir(tmp_path)
    cli = TrueGradCLI(args=["fit", "--config", "digits_cnn"])
    val_acc = float(cli.trainer.callback_metrics["val_acc"])
    assert val_acc >= 0.95
    line = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(
        r"fit done: 204 steps, 12 epochs \| val_acc=(\S+) val_loss=(\S+) \| checkpoint: (\S+) \| "
        r"metrics CSV: (\S+)",
        line,
    )
    assert match, line
    assert float(match[1]) == pytest.approx(val_acc, abs=1e-4)
    checkpoint, metrics = Path(match[3]), Path(match[4])
    assert checkpoint.is_file() and metrics.is_file()
    with metrics.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_acc")]
    assert len(rows) == 12 and float(rows[-1]["val_acc"]) == pytest.approx(val_acc, abs=1e-6)

    tested = TrueGradCLI(args=["test", "--config", "digits_cnn"])
    assert f"using the best checkpoint of the latest run: {checkpoint}" in capsys.readouterr().out
    data = tested.datamodule
    sizes = [len(data.train_dataset), len(data.val_dataset), len(data.test_dataset)]
    assert sizes == [1079, 359, 359]  # disjoint splits: tests/lightning/test_evaluation.py
    model = type(tested.model).load_from_checkpoint(checkpoint).eval()
    images, labels = data.test_dataset.tensors
    with torch.no_grad():
        accuracy = float((model(images).argmax(-1) == labels).double().mean())
    assert float(tested.trainer.callback_metrics["test_acc"]) == pytest.approx(accuracy, abs=1e-6)
    assert accuracy >= 0.9

    predicted = TrueGradCLI(args=["predict", "--config", "digits_cnn", "--ckpt_path", str(checkpoint)])
    classes = torch.cat(predicted.trainer.predict_loop.predictions)
    assert float((classes == labels).double().mean()) == pytest.approx(accuracy, abs=1e-6)
    table = checkpoint.parents[1] / "predict" / "predictions.csv"
    with table.open() as f:
        written = list(csv.DictReader(f))
    assert [int(r["predicted"]) for r in written] == classes.tolist()
    assert sorted(p.name for p in checkpoint.parents[2].iterdir()) == ["version_0"]  # no new version


def test_misspelt_backend_rejected_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(_config("digits_cnn")).read_text().replace("backend: auto", "backend: autp"))
    err = _parse_error(["fit", "--config", str(bad)], capsys)
    assert "trainer.callbacks.init_args.backend=autp" in err
    assert "valid values: 'auto', 'nn', 'patch_torch', 'patch_model', 'backpack'" in err


@pytest.mark.parametrize(
    ("name", "betas", "expected"),
    [
        ("digits_cnn", "[0.9,0.99,0.9,0.5]", "expected a tuple with 3 elements"),
        ("digits_cnn", "[0.9]", "expected a tuple with 3 elements"),
        ("digits_adamw", "[0.9,0.99,0.9]", "expected a tuple with 2 elements"),
    ],
)
def test_wrong_length_betas_rejected_naming_the_field(
    name: str, betas: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _parse_error(
        ["fit", "--config", _config(name), f"--model.init_args.optimizer.init_args.betas={betas}"], capsys
    )
    assert f"model.init_args.optimizer.init_args.betas={betas.replace(',', ', ')}" in err
    assert expected in err


def test_two_betas_accepted_for_tgadamw(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/statistic.md §4: a 2-tuple reuses beta2 for beta3."""
    printed = _print_config(
        ["fit", "--config", _config("digits_cnn"), "--model.init_args.optimizer.init_args.betas=[0.9,0.95]"],
        capsys,
    )
    assert yaml.safe_load(printed)["model"]["init_args"]["optimizer"]["init_args"]["betas"] == [0.9, 0.95]


def test_unknown_key_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    err = _parse_error(["fit", "--config", _config("digits_cnn"), "--model.init_args.chanels=[3]"], capsys)
    assert "model.init_args.chanels=[3]: CNNClassifier has no option 'chanels'" in err


def test_console_script_and_module_entry_points(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "truegrad-lightning"
    assert script.is_file(), "pip install -e . installs the truegrad-lightning console script"
    for command in ([str(script)], [sys.executable, "-m", "truegrad_lightning"]):
        done = subprocess.run(
            [*command, "fit", "--config", _config("digits_mlp"), "--print_config"],
            capture_output=True, text=True, cwd=tmp_path, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert yaml.safe_load(done.stdout)["model"]["class_path"] == "truegrad_lightning.models.MLPClassifier"
