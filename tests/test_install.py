"""Installing truegrad's optional parts never pulls a CUDA torch or torchvision (issue 15,
finding 1: ``pip install 'truegrad[backpack]'`` replaced the CPU torch by a CUDA build plus
torchvision, about twenty ``nvidia-*`` packages).

The dry-run test resolves the documented commands with pip in a fresh venv that has only the
CPU torch, as a user's machine would; it needs the package registry and is skipped without
it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from truegrad._optional import INSTALL

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(r"^(nvidia-.*|torchvision|torch|triton)$", re.IGNORECASE)
TORCH = "torch==2.13.0"  # the CPU wheel (scripts/setup.sh's TORCH_SPEC)


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def test_no_extra_declares_a_package_that_pulls_torchvision() -> None:
    """backpack-for-pytorch declares torchvision: no extra may list it (nor torchvision)."""
    for extra, requirements in _extras().items():
        names = {_name(r) for r in requirements}
        assert not names & {"backpack-for-pytorch", "torchvision"}, (extra, names)


def test_the_missing_backpack_message_gives_the_no_deps_command() -> None:
    code = (
        "import sys; sys.modules['backpack'] = None\n"
        "from truegrad.backends import get_backend\n"
        "try:\n    get_backend('backpack')\nexcept ModuleNotFoundError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert INSTALL["backpack"] in out.stdout, out.stdout + out.stderr
    readme = (ROOT / "README.md").read_text()
    assert INSTALL["backpack"] in readme
    assert "pip install 'truegrad[backpack]'" not in readme


def _pip(venv: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def _would_install(venv: Path, *requirements: str, tmp: Path) -> set[str]:
    report = tmp / "report.json"
    result = _pip(venv, "install", "--dry-run", "--quiet", "--report", str(report), *requirements)
    assert result.returncode == 0, result.stderr[-2000:]
    return {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_documented_installs_keep_the_cpu_torch(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    probe = _pip(venv, "download", "--no-deps", "--dest", str(tmp_path / "probe"),
                 "backpack-for-pytorch>=1.7", timeout=180)
    if probe.returncode != 0:
        pytest.skip(f"the package registry is not reachable: {probe.stderr.strip()[-300:]}")
    installed = _pip(venv, "install", "--quiet", TORCH)
    assert installed.returncode == 0, installed.stderr[-2000:]

    # the command of the error message and the README
    command = shlex.split(INSTALL["backpack"])
    assert command[:2] == ["pip", "install"]
    wanted = _would_install(venv, *command[2:], tmp=tmp_path)
    assert "backpack-for-pytorch" in wanted
    assert not {n for n in wanted if FORBIDDEN.match(n)}, wanted

    # truegrad itself with each extra a user installs
    for extra in ("backpack", "lightning"):
        wanted = _would_install(venv, f"{ROOT}[{extra}]", tmp=tmp_path)
        assert "truegrad" in wanted
        assert not {n for n in wanted if FORBIDDEN.match(n)}, (extra, wanted)
