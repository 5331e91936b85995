"""The real artifact, as a newcomer gets it (issue 15): a wheel built from a copy of the
repository, installed with its ``lightning`` extra into a fresh venv that has only the CPU
torch, then ``truegrad-lightning fit`` and ``predict`` run from an empty folder.

Checks that no CUDA package or torchvision came along, that the packaged config is found by
name, that ``fit`` prints the checkpoint it wrote and that ``predict`` with that checkpoint
writes one CSV row per predicted sample with valid classes.

Slow (a venv and three pip installs from the local wheel mirror, then a short training):
about 3-4 minutes on 2 shared CPU cores. It needs pip's configured package sources (the CPU
``torch==2.13.0`` wheel and the lightning extra's packages).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the CPU wheel (scripts/setup.sh's TORCH_SPEC)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 900) -> str:
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{output[-6000:]}"
    return done.stdout


def _copy_sources(dest: Path) -> None:
    """The repository's tracked and untracked, not ignored, files (what a clone of the work
    in progress would hold; a ``git clone`` would miss uncommitted changes)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.fail("needs git to list the repository's files")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def test_wheel_installs_without_cuda_and_the_main_job_runs(tmp_path: Path) -> None:
    started = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.monotonic() - started - sum(timings.values()), 1)

    source, dist, venv, work = (tmp_path / n for n in ("src", "dist", "venv", "work"))
    _copy_sources(source)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "-w", str(dist), str(source)], cwd=tmp_path)
    wheels = list(dist.glob("truegrad-*.whl"))
    assert len(wheels) == 1, wheels
    lap("build wheel")

    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, TORCH], cwd=tmp_path)  # first, so nothing later picks a torch of its own
    _run([*pip, f"{wheels[0]}[lightning]"], cwd=tmp_path)
    listed = _run([str(venv / "bin" / "python"), "-m", "pip", "list"], cwd=tmp_path)
    bad = [line for line in listed.splitlines() if re.match(r"(?i)(nvidia|torchvision)", line)]
    assert not bad, f"CUDA packages or torchvision were installed: {bad}"
    torch_line = next(line for line in listed.splitlines() if line.split()[:1] == ["torch"])
    assert torch_line.split()[1].startswith("2.13.0"), torch_line
    lap("venv + installs")

    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    cli = str(venv / "bin" / "truegrad-lightning")
    # the configs are packaged (truegrad_lightning/configs): a bare name works from any folder
    packaged = (ROOT / "truegrad_lightning" / "configs" / "digits_cnn.yaml").is_file()
    config = "digits_cnn" if packaged else str(ROOT / "configs" / "digits_cnn.yaml")
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    # one short epoch (5 steps) so that validation runs and the best checkpoint is written
    out = _run([cli, "fit", "--config", config, "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=5", *quiet], cwd=work, env=env)
    summary = [line for line in out.splitlines() if line.startswith("fit done: ")]
    assert summary, out[-3000:]
    assert summary[-1].startswith("fit done: 5 steps, 1 epochs | val_acc="), summary[-1]
    checkpoint = re.search(r"\| checkpoint: (\S+) \|", summary[-1])
    assert checkpoint and (work / checkpoint[1]).is_file(), summary[-1]
    lap("fit")

    out = _run([cli, "predict", "--config", config, "--ckpt_path", checkpoint[1], *quiet],
               cwd=work, env=env)
    shown = [line for line in out.splitlines() if line.startswith("predictions: ")]
    assert len(shown) == 1, out[-3000:]
    match = re.fullmatch(r"predictions: (\S+) \((\d+) rows, accuracy ([0-9.]+)\)", shown[0])
    assert match, shown[0]
    path = work / match[1]
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    assert header == ["index", "target", "predicted", "probability"]
    assert len(rows) == int(match[2]) == 359  # the default test split of the digits
    assert [int(r[0]) for r in rows] == list(range(359))
    assert all(0 <= int(r[1]) < 10 and 0 <= int(r[2]) < 10 for r in rows)
    assert all(0.0 < float(r[3]) <= 1.0 for r in rows)
    # predict logged into the training run's folder: still a single version_N
    assert len(list((work / "lightning_logs" / "digits_cnn").glob("version_*"))) == 1
    lap("predict")
    print(f"wheel install test timings (s): {timings}, total {sum(timings.values()):.1f}")
