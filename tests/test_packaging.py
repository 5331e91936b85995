"""truegrad imports and works with only torch; optional dependencies fail with the extra's name."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"lightning", "pytorch_lightning", "backpack", "torchmetrics",
                                      "jsonargparse", "transformers", "opacus"}:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_core_works_with_only_torch() -> None:
    result = _run(
        """
        import torch, truegrad
        from truegrad import testing
        from truegrad.optim import TGAdamW
        model = torch.nn.Linear(3, 1)
        x = torch.randn(4, 3)
        r = testing.sum_grad_squared_oracle(model, lambda o, _: o.sum(), x)
        for n, p in model.named_parameters():
            p.grad = r.grad[n]; p.sum_grad_squared = r.sum_grad_squared[n]
        TGAdamW(model.parameters()).step()
        assert not any(m.split(".")[0] in {"lightning", "backpack"} for m in sys.modules)
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_lightning_integration_without_lightning_names_the_extra() -> None:
    result = _run("import truegrad_lightning")
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr
    assert "pip install 'truegrad[lightning]'" in result.stderr


def test_tests_and_benchmarks_are_not_packaged() -> None:
    import tomllib
    from pathlib import Path

    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(include) == ["truegrad", "truegrad.*", "truegrad_lightning", "truegrad_lightning.*"]
