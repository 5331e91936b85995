"""validate / test / predict after fit (issue 15, findings 4, 5, 6 and 11).

* the digits test split is disjoint from the training and validation splits, and not empty
  by default (``test`` used to report the validation split that picked the checkpoint);
* without ``--ckpt_path`` the CLI takes the latest run's best checkpoint and says so, or
  refuses in one line when there is none (it used to evaluate an untrained model);
* ``predict`` writes ``predictions.csv`` and shows its path and a few rows;
* non-fit runs log into the training run's folder (no new ``version_N``, no "dirpath has
  changed" warning);
* the built-in models' validation metrics are averaged over DDP ranks.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn")

import lightning.pytorch as pl
import torch.nn.functional as F

from truegrad_lightning.cli import TrueGradCLI
from truegrad_lightning.data import CharDataModule, DigitsDataModule
from truegrad_lightning.data.digits import stratified_split
from truegrad_lightning.evaluation import find_checkpoint, run_folder
from truegrad_lightning.models import CharGPT, MLPClassifier
from truegrad_lightning.predictions import PredictionCSVWriter

pytestmark = pytest.mark.lightning

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "digits_cnn.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


_CLI = TrueGradCLI


def _versions(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "lightning_logs" / "digits_cnn").glob("version_*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """digits_cnn trained for 2 short epochs (3 steps each) in a fresh folder."""
    folder = tmp_path_factory.mktemp("eval")
    before = os.getcwd()
    os.chdir(folder)
    try:
        cli = _CLI(
            args=["fit", "--config", CONFIG, "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1",
                  "--trainer.limit_train_batches=3", *QUIET]
        )
    finally:
        os.chdir(before)
    best = Path(folder, cli.trainer.checkpoint_callback.best_model_path)
    assert best.is_file()
    return folder, best, float(cli.trainer.checkpoint_callback.best_model_score)


# ------------------------------------------------------------------ finding 4: the splits


@pytest.mark.parametrize("kwargs", [{}, {"val_fraction": 0.1, "test_fraction": 0.3, "seed": 5}])
def test_digits_splits_are_disjoint_and_test_is_not_empty_by_default(kwargs: dict) -> None:
    dm = DigitsDataModule(**kwargs)
    from sklearn.datasets import load_digits

    targets = load_digits().target
    train, val, test = stratified_split(targets, dm.val_fraction, dm.test_fraction, dm.seed)
    assert len(test) > 0 and len(val) > 0
    sets = [set(train.tolist()), set(val.tolist()), set(test.tolist())]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert len(sets[0] | sets[1] | sets[2]) == len(targets)
    assert len(dm.test_dataset) == len(test)
    # the loaders give those splits
    assert torch.equal(torch.cat([y for _, y in dm.test_dataloader()]), torch.as_tensor(targets[test]))
    assert torch.equal(torch.cat([y for _, y in dm.val_dataloader()]), torch.as_tensor(targets[val]))


def test_test_reports_the_test_split_not_the_validation_split(trained, monkeypatch, capsys) -> None:
    folder, best, best_val_acc = trained
    monkeypatch.chdir(folder)
    tested = _CLI(args=["test", "--config", CONFIG, "--ckpt_path", str(best), *QUIET])
    dm = tested.datamodule
    model = tested.model.eval()
    with torch.no_grad():
        x, y = dm.test_dataset.tensors
        expected = float((model(x).argmax(-1) == y).double().mean())
    assert float(tested.trainer.callback_metrics["test_acc"]) == pytest.approx(expected, abs=1e-6)
    assert float(tested.trainer.callback_metrics["test_acc"]) != best_val_acc


# ------------------------------------------------- finding 4: no --ckpt_path; finding 6: folders


def test_no_ckpt_path_takes_the_latest_best_checkpoint_and_says_so(trained, monkeypatch, capsys) -> None:
    folder, best, _ = trained
    monkeypatch.chdir(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tested = _CLI(args=["test", "--config", CONFIG, *QUIET])
    out = capsys.readouterr().out
    line = f"test: no --ckpt_path given, using the best checkpoint of the latest run: {best.relative_to(folder)}"
    assert line in out.splitlines(), out
    assert tested.trainer.ckpt_path == str(best.relative_to(folder))
    # results go next to the training run's checkpoints, no new version_N, no warning
    assert _versions(folder) == ["version_0"]
    assert (folder / "lightning_logs/digits_cnn/version_0/test/metrics.csv").is_file()
    messages = [str(w.message) for w in caught]
    assert not any("dirpath has changed" in m for m in messages), messages
    assert not any("exists and is not empty" in m for m in messages), messages


def test_validate_and_repeated_runs_create_no_version_folders(trained, monkeypatch) -> None:
    folder, best, best_val_acc = trained
    monkeypatch.chdir(folder)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            validated = _CLI(args=["validate", "--config", CONFIG, "--ckpt_path", str(best), *QUIET])
        messages = [str(w.message) for w in caught]
        assert not any("dirpath has changed" in m or "not empty" in m for m in messages), messages
    assert float(validated.trainer.callback_metrics["val_acc"]) == pytest.approx(best_val_acc, abs=1e-6)
    assert _versions(folder) == ["version_0"]
    assert run_folder(best) == folder / "lightning_logs/digits_cnn/version_0"
    assert (run_folder(best) / "validate" / "metrics.csv").is_file()


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_no_checkpoint_refuses_in_one_line(subcommand: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        _CLI(args=[subcommand, "--config", CONFIG, *QUIET])
    message = str(exc.value.code)
    assert "\n" not in message
    assert message.startswith(f"truegrad-lightning {subcommand}: error: no checkpoint to {subcommand}")
    assert "--ckpt_path" in message
    assert not (tmp_path / "lightning_logs").exists()  # a failed run leaves no version_N


def test_missing_ckpt_file_refuses_in_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"--ckpt_path nowhere.ckpt is not a file$"):
        _CLI(args=["test", "--config", CONFIG, "--ckpt_path", "nowhere.ckpt", *QUIET])
    assert not (tmp_path / "lightning_logs").exists()


# ------------------------------------------------------------------ finding 5: predictions


def test_predict_writes_a_csv_and_shows_rows(trained, monkeypatch, capsys) -> None:
    folder, _, _ = trained
    monkeypatch.chdir(folder)
    capsys.readouterr()
    predicted = _CLI(args=["predict", "--config", CONFIG, "--ckpt_path", "best", *QUIET])
    out = capsys.readouterr().out.splitlines()
    path = Path("lightning_logs/digits_cnn/version_0/predict/predictions.csv")
    header = next(i for i, line in enumerate(out) if line.startswith("predictions: "))
    assert out[header].startswith(f"predictions: {path} (359 rows, accuracy ")
    assert out[header + 1].split() == ["index", "target", "predicted", "probability"]
    assert len(out[header + 2 : header + 7]) == 5 and out[header + 7] == "... (354 more)"
    with (folder / path).open() as f:
        rows = list(csv.DictReader(f))
    dm = predicted.datamodule
    x, y = dm.test_dataset.tensors
    model = predicted.model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    assert [int(r["index"]) for r in rows] == list(range(359))
    assert [int(r["target"]) for r in rows] == y.tolist()
    assert [int(r["predicted"]) for r in rows] == probs.argmax(-1).tolist()
    assert all(0 <= int(r["predicted"]) < 10 for r in rows)
    chosen = probs.max(-1).values.tolist()
    assert all(float(r["probability"]) == pytest.approx(p, abs=1e-5) for r, p in zip(rows, chosen))
    assert _versions(folder) == ["version_0"]
    # Lightning still returns the classes
    assert torch.equal(torch.cat(predicted.trainer.predict_loop.predictions), probs.argmax(-1))


def test_char_gpt_prediction_rows(tmp_path: Path) -> None:
    dm = CharDataModule(corpus="zen", block_size=16, batch_size=4)
    model = CharGPT(block_size=16, n_layer=1, n_head=2, n_embd=16)
    writer = PredictionCSVWriter(output_dir=str(tmp_path), show=2)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[writer],
    )
    trainer.predict(model, datamodule=dm)
    with (tmp_path / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "context", "target", "predicted", "probability", "accuracy"]
    windows = dm.val_dataset
    assert len(rows) == len(windows) == 5
    for row, (x, y) in zip(rows, windows):
        esc = lambda s: s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
        assert row["context"] == esc(dm.decode(x))
        assert row["target"] == esc(dm.decode(y[-1:]))
        assert len(row["predicted"]) in (1, 2) and 0 < float(row["probability"]) <= 1
        assert 0 <= float(row["accuracy"]) <= 1
    assert writer.path == tmp_path / "predictions.csv"


# ------------------------------------------------------------------ finding 11: DDP metrics


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_validation_loss_is_the_mean_over_all_ranks(tmp_path: Path) -> None:
    """2 CPU processes (ddp_fork): each rank validates its half (every other image) of the
    180 validation images; the logged val_loss and val_acc are those of all 180, not rank 0's half."""
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, val_fraction=0.1, test_fraction=0.2, flatten=True)
    model = MLPClassifier(hidden_sizes=(16,))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(model, datamodule=dm)
    model.eval()
    x, y = dm.val_dataset.tensors
    assert len(y) % 2 == 0  # no sample padded in by the DistributedSampler
    with torch.no_grad():
        logits = model(x)
    loss = float(F.cross_entropy(logits, y))
    acc = float((logits.argmax(-1) == y).double().mean())
    halves = [float(F.cross_entropy(logits[r::2], y[r::2])) for r in range(2)]
    assert not math.isclose(halves[0], loss, rel_tol=1e-5)  # the test can tell them apart
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(acc, abs=1e-6)


def test_find_checkpoint_without_runs(tmp_path: Path) -> None:
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    assert find_checkpoint(trainer) is None


# ------------------------------------------------------ finding 11: "Epoch 0/-2" (char_gpt)


def test_step_bounded_training_shows_no_negative_epoch_total() -> None:
    """char_gpt.yaml sets max_steps only: Lightning makes max_epochs -1 and its
    RichProgressBar (the default when rich is installed) described the epoch as "Epoch 0/-2"."""
    pytest.importorskip("rich")
    from lightning.pytorch.callbacks import RichProgressBar

    from truegrad_lightning.terminal import StepsRichProgressBar, fix_progress_bar

    def train(fix: bool) -> str:
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_model_summary=False,
            callbacks=[RichProgressBar(leave=False)],
        )
        if fix:
            fix_progress_bar(trainer)
            assert isinstance(trainer.progress_bar_callback, StepsRichProgressBar)
        model = MLPClassifier(hidden_sizes=(8,), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        trainer.fit(model, datamodule=DigitsDataModule(flatten=True))
        assert trainer.max_epochs == -1
        return trainer.progress_bar_callback._get_train_description(0).strip()

    assert train(fix=False) == "Epoch 0/-2"  # Lightning's own bar
    assert train(fix=True) == "Epoch 0"
