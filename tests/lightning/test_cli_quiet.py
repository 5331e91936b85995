"""A quiet terminal (issue 15, finding 9): a CLI run prints what a user reads, not Lightning's
tips for its cloud products, a deprecation warning of Lightning's own code, a model table with
a FLOPs column of zeros, or ``v_num`` in the progress bar."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

NOISE = ["Tip:", "litlogger", "litmodels", "LeafSpec", "FLOPs", "v_num", "tensorboardX", "Warning"]


@pytest.mark.parametrize("config", ["digits_cnn", "char_gpt"])
def test_a_fit_prints_no_noise(tmp_path: Path, config: str) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    args = [sys.executable, "-m", "truegrad_lightning", "fit", "--config", config,
            "--trainer.max_steps=3", "--trainer.limit_val_batches=1"]
    if config == "char_gpt":
        args += ["--trainer.val_check_interval=3", "--data.init_args.max_chars=20000"]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert [word for word in NOISE if word in output] == [], output
    assert "trainable parameters of" in output  # the one-line model summary
    assert "fit done: 3 steps" in output
    assert "/-2" not in output  # max_steps alone: no "Epoch 0/-2"
