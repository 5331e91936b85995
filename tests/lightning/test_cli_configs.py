"""The built-in configs ship inside the package and are found by name from anywhere
(issue 15, finding 7); ``truegrad-lightning configs`` lists them."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch")
yaml = pytest.importorskip("yaml")

from truegrad_lightning import cli
from truegrad_lightning.cli import CONFIG_DIR, builtin_configs, main, resolve_config

pytestmark = pytest.mark.lightning
ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["truegrad-lightning"])


def test_packaged_configs_are_identical_copies_of_the_repository_ones() -> None:
    """``configs/`` (what a clone's README commands name) and ``truegrad_lightning/configs/``
    (what the wheel ships) are the same files, byte for byte: edit one, copy it over."""
    repo = {p.name: p.read_bytes() for p in (ROOT / "configs").glob("*.yaml")}
    packaged = {p.name: p.read_bytes() for p in CONFIG_DIR.glob("*.yaml")}
    assert CONFIG_DIR == ROOT / "truegrad_lightning" / "configs"
    assert sorted(packaged) == sorted(repo) and len(repo) >= 8
    for name, content in repo.items():
        assert packaged[name] == content, f"configs/{name} differs from truegrad_lightning/configs/{name}"


def test_configs_are_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["package-data"]["truegrad_lightning"] == ["configs/*.yaml"]


def test_every_config_starts_with_a_one_line_description() -> None:
    configs = builtin_configs()
    for name, (path, description) in configs.items():
        first, second = path.read_text().splitlines()[:2]
        assert first == f"# {description}" and 30 <= len(description) <= 95, name
        assert description.endswith(".") and second == "#", name


def test_configs_subcommand_lists_names_and_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    main(["configs"])
    out = capsys.readouterr().out
    for name, (_, description) in builtin_configs().items():
        assert any(line.split(None, 1) == [name, description] for line in out.splitlines()), name
    assert "--config NAME" in out


def test_config_by_bare_name_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for spelling in ("digits_mlp", "digits_mlp.yaml"):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", spelling, "--print_config"])
        assert exit_info.value.code in (0, None)
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["model"]["class_path"] == "truegrad_lightning.models.MLPClassifier"
    with pytest.raises(SystemExit):
        main(["fit", "--config=digits_cnn", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["class_path"].endswith("CNNClassifier")


def test_a_real_path_wins_over_the_built_in_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    mine = (CONFIG_DIR / "digits_cnn.yaml").read_text().replace("channels: [32, 64]", "channels: [8, 16]")
    (tmp_path / "digits_cnn").write_text(mine)  # a file named like a built-in config
    assert resolve_config("digits_cnn") == "digits_cnn"
    assert resolve_config("nothing_like_it") == "nothing_like_it"
    assert resolve_config("digits_adamw") == str(CONFIG_DIR / "digits_adamw.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "digits_cnn", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["channels"] == [8, 16]


def test_missing_config_names_the_built_in_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "digits_cnnn"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) <= 3, err
    assert "digits_cnnn" in err and "does not exist" in err
    assert "digits_cnn, digits_mlp" in err and "--help" in err
    assert "did you mean the built-in config 'digits_cnn'?" in err


def test_config_help_says_names_work(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "built-in config by name" in " ".join(capsys.readouterr().out.split())
    assert cli.PROG == "truegrad-lightning"
