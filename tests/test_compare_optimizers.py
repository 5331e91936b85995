"""Smoke test of benchmarks/compare_optimizers.py: a tiny in-process run of three contenders."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

pytestmark = pytest.mark.lightning

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_optimizers.py"
CONTENDERS = ("adamw", "tgadamw-nn", "tgadamw-patch_torch")


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_optimizers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def test_quick_run_writes_csv_png_and_backends_agree(tmp_path: Path, capsys) -> None:
    script = _load_script()
    argv = ["--quick", "--seeds", "0", "--out", str(tmp_path), "--contenders", *CONTENDERS]
    rc = script.main(argv)
    assert rc == 0

    task = script.TASKS["digits_cnn"]
    csv_path = tmp_path / "compare_optimizers_digits_cnn.csv"
    png_path = tmp_path / "compare_optimizers_digits_cnn.png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and tuple(rows[0]) == script.CSV_FIELDS
    expected_steps = list(range(0, task.quick_steps + 1, task.quick_val_every))  # 0, 4, 8, 12
    curves: dict[str, list[float]] = {}
    for contender in CONTENDERS:
        mine = [r for r in rows if r["contender"] == contender]
        assert [int(r["step"]) for r in mine] == expected_steps, contender
        assert {r["seed"] for r in mine} == {"0"}
        assert {r["task"] for r in mine} == {"digits_cnn"}
        assert all(math.isfinite(float(r["val_loss"])) for r in mine)
        assert all(0.0 <= float(r["val_acc"]) <= 1.0 for r in mine)
        assert all(float(r["wall_s"]) > 0 for r in mine)
        curves[contender] = [float(r["val_loss"]) for r in mine]
    assert {r["optimizer"] for r in rows if r["contender"] == "adamw"} == {"AdamW"}
    assert {r["backend"] for r in rows if r["contender"] == "tgadamw-nn"} == {"nn"}

    # the same untrained model for every contender of a seed
    assert len({c[0] for c in curves.values()}) == 1
    # training moved the loss down
    assert all(c[-1] < c[0] for c in curves.values())
    # both backends compute the same exact statistic, and on one thread (the script's
    # default) "nn" and "patch_torch" give bitwise-equal curves (measured: 39/39 points of
    # the full 3-seed, 240-step digits_cnn run). patch_model and backpack differ from them
    # by at most 6e-8 in val_loss (one float32 ulp), so only this pair is held to equality.
    nn_curve, pt_curve = curves["tgadamw-nn"], curves["tgadamw-patch_torch"]
    assert nn_curve == pt_curve, [a - b for a, b in zip(nn_curve, pt_curve)]

    out = capsys.readouterr().out
    assert "TGAdamW backend agreement" in out
    for contender in CONTENDERS:
        assert contender in out
