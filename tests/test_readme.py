"""The README's first example runs as written and its model then gets the exact statistic."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from truegrad import statistic, testing

README = Path(__file__).parents[1] / "README.md"


def test_the_use_example_runs_and_is_exact() -> None:
    text = README.read_text()
    use = text[text.index("## Use") :]
    block = re.search(r"```python\n(.*?)```", use, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    model, optim = namespace["model"], namespace["optim"]
    assert type(optim).__name__ == "TGAdamW"
    x = torch.randn(16, 1)
    expected = testing.sum_grad_squared_oracle(
        testing.plain_copy(model), lambda out, _: out.mean(), x
    ).sum_grad_squared
    model(x).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(statistic.get(p), expected[name], rtol=1e-4, atol=1e-9)
    namespace["handle"].undo()
