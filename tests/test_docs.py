"""The documents say what the code does, and everything they point to ships with them.

* every signature that README.md or docs/*.md shows (in a fenced block without a language, or
  inline) of a public callable lists exactly its parameters, kinds and defaults;
* every relative link of README.md, CHANGELOG.md and docs/*.md resolves to a file inside the
  repository, and no document points outside it;
* the version is at least 6.0.0 (it supersedes truegrad 5.0.0) and the same everywhere;
* the oracle works on a model that ``backpack.extend`` hooked.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import inspect
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

import truegrad
from truegrad import testing
from truegrad.optim import TGAdamW

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def _signatures() -> dict[str, Any]:
    """The callables whose signatures the documents show, by the name they are shown with."""
    from truegrad_lightning import TrueGradCallback, configure_optimizers
    from truegrad_lightning.schedules import WarmupCosineLR

    return {
        "TrueGradCallback": TrueGradCallback,
        "configure_optimizers": configure_optimizers,
        "WarmupCosineLR": WarmupCosineLR,
        "TGAdamW": TGAdamW,
        "diagnose": truegrad.diagnose,
        "per_sample_grads": testing.per_sample_grads,
        "per_sample_grads_loop": testing.per_sample_grads_loop,
        "sum_grad_squared_oracle": testing.sum_grad_squared_oracle,
        "assert_matches_oracle": testing.assert_matches_oracle,
        "compare_to_oracle": testing.compare_to_oracle,
        "layer_sum_grad_squared": testing.layer_sum_grad_squared,
    }


def _candidate_texts(text: str) -> list[str]:
    """Fenced blocks without a language (signatures, not examples) and inline code spans,
    each with its whitespace collapsed (either may wrap over lines)."""
    texts: list[str] = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        if not lang:
            texts.append(" ".join(body.split()))  # a signature may wrap over lines
    prose = re.sub(r"^```\w*\n.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    texts.extend(" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose))
    return texts


def _shown_signatures(path: Path) -> list[tuple[str, str]]:
    """``(name, parameter text)`` for every ``name(...)`` of a documented callable that parses
    as a parameter list with at least one parameter (a call such as ``TGAdamW(model.parameters())``
    or ``TrueGradCallback()`` does not)."""
    names = _signatures()
    found = []
    pattern = re.compile(r"(?<![\w])(?:[\w]+\.)*(" + "|".join(names) + r")\(")
    for text in _candidate_texts(path.read_text()):
        for match in pattern.finditer(text):
            depth, start = 1, match.end()
            for end in range(start, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            else:
                continue
            params = text[start:end]
            try:
                tree = ast.parse(f"def f({params}): pass")
            except SyntaxError:
                continue
            if _is_signature(tree.body[0].args, names[match.group(1)]):
                found.append((match.group(1), params))
    return found


def _is_signature(args: ast.arguments, function: Any) -> bool:
    """Whether parsed ``name(...)`` text claims to be the signature rather than being a call:
    it starts with the real first parameter and no default is a variable (``x``, ``loss_fn``)
    or an ellipsis (``TrueGradCallback(backend=...)``, an abbreviated call)."""
    listed = args.posonlyargs + args.args + args.kwonlyargs
    if not listed:
        return False
    first = next(iter(inspect.signature(function).parameters))
    if listed[0].arg != first:
        return False
    for node in [*args.defaults, *args.kw_defaults]:
        if isinstance(node, ast.Name) and node.id[:1].islower():
            return False
        if isinstance(node, ast.Constant) and node.value is Ellipsis:
            return False
    return True


def _documented(params: str) -> list[tuple[str, str, Any]]:
    """``(name, kind, default node)`` per parameter of ``def f(params)``."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    out: list[tuple[str, str, Any]] = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for a, d in zip(positional, defaults):
        out.append((a.arg, "POSITIONAL_OR_KEYWORD", d))
    if args.vararg is not None:
        out.append((args.vararg.arg, "VAR_POSITIONAL", None))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        out.append((a.arg, "KEYWORD_ONLY", d))
    if args.kwarg is not None:
        out.append((args.kwarg.arg, "VAR_KEYWORD", None))
    return out


def _same_default(node: Any, actual: Any) -> bool:
    if node is None:
        return actual is inspect.Parameter.empty
    if actual is inspect.Parameter.empty:
        return False
    if isinstance(node, ast.Name):  # a class shown by name: optimizer=TGAdamW
        return getattr(actual, "__name__", None) == node.id
    try:
        value = ast.literal_eval(node)
    except ValueError:  # an expression, not a value: not the code's default
        return False
    if isinstance(value, float):
        return value == actual
    return type(value) is type(actual) and value == actual


def test_every_shown_signature_is_the_real_one() -> None:
    callables = _signatures()
    seen: set[str] = set()
    problems = []
    for path in DOCS:
        for name, params in _shown_signatures(path):
            seen.add(name)
            real = inspect.signature(callables[name])
            actual = [(p.name, p.kind.name, p.default) for p in real.parameters.values()]
            shown = _documented(params)
            where = f"{path.relative_to(ROOT)}: {name}({params})"
            if [(n, k) for n, k, _ in shown] != [(n, k) for n, k, _ in actual]:
                names = [(n, k) for n, k, _ in shown]
                problems.append(f"{where}\n    shows  {names}\n    real   {real}")
                continue
            for (n, _, node), (_, _, default) in zip(shown, actual):
                if not _same_default(node, default):
                    problems.append(f"{where}: default of {n} is {default!r} in the code")
    assert not problems, "\n".join(problems)
    # the README shows every one of them at least once (TrueGradCallback with bitwise_grad)
    readme = {name for name, _ in _shown_signatures(ROOT / "README.md")}
    missing = sorted(set(callables) - readme)
    assert not missing, f"README shows no signature of {missing}"


def test_readme_shows_the_callback_with_every_parameter() -> None:
    from truegrad_lightning import TrueGradCallback

    shown = [p for n, p in _shown_signatures(ROOT / "README.md") if n == "TrueGradCallback"]
    assert shown, "README shows no TrueGradCallback(...) signature"
    for params in shown:
        assert [n for n, _, _ in _documented(params)] == list(
            inspect.signature(TrueGradCallback).parameters
        )


def test_readme_states_what_the_oracle_returns_and_the_argument_orders() -> None:
    text = " ".join(Path(ROOT / "README.md").read_text().split())
    assert "an `OracleResult`" in text
    fields = [f.name for f in dataclasses.fields(testing.OracleResult)]
    assert fields == ["grad", "sum_grad_squared"]
    assert inspect.signature(testing.sum_grad_squared_oracle).return_annotation in (
        "OracleResult",
        testing.OracleResult,
    )
    # the two orders, both documented; the examples pass them by keyword
    assert list(inspect.signature(truegrad.diagnose).parameters)[:4] == [
        "model", "example_inputs", "loss_fn", "targets"
    ]
    assert list(inspect.signature(testing.assert_matches_oracle).parameters)[:4] == [
        "model", "loss_fn", "inputs", "targets"
    ]
    assert "assert_matches_oracle(model, loss_fn=loss_fn, inputs=x, targets=y)" in text
    assert "diagnose(model, example_inputs=x, loss_fn=loss_fn, targets=y)" in text
    # granularity is a module attribute, fractional warmup is documented
    assert 'module.granularity = "position"' in text
    assert "fraction" in text and "warmup_steps" in text


def test_granularity_is_an_attribute_not_a_constructor_argument() -> None:
    from truegrad import nn as tnn

    assert "granularity" not in inspect.signature(tnn.Linear).parameters
    layer = tnn.Linear(3, 2)
    layer.granularity = "position"  # what README and docs/backends.md say to do
    layer(torch.randn(4, 3)).sum().backward()
    assert layer.weight.grad is not None


def test_fractional_warmup_is_a_fraction_of_total_steps() -> None:
    from truegrad_lightning import configure_optimizers

    model = torch.nn.Linear(3, 2)
    config = configure_optimizers(model, lr=1.0, warmup_steps=0.25, total_steps=40)
    factor = config["lr_scheduler"]["scheduler"].lr_lambdas[0]
    # round(0.25 * 40) = 10 warmup steps, as the documents say: (s + 1) / (W + 1) before W
    assert factor(0) == pytest.approx(1 / 11)
    assert factor(9) == pytest.approx(10 / 11)
    assert factor(10) == pytest.approx(1.0)


# --------------------------------------------------------------------------- links


def _links(path: Path) -> list[str]:
    text = path.read_text()
    return re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'(?:src|href)="([^"]+)"', text)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(path: Path) -> None:
    problems = []
    for link in _links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
            continue  # https:, mailto:, an anchor of the same page
        target = (path.parent / link.split("#", 1)[0]).resolve()
        if not target.is_relative_to(ROOT):
            problems.append(f"{link}: outside the repository")
        elif not target.exists():
            problems.append(f"{link}: no such file")
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


@pytest.mark.parametrize(
    "path", [*DOCS, ROOT / "pyproject.toml"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_document_points_outside_the_repository(path: Path) -> None:
    text = path.read_text()
    for needle in ("../shared", "CONTRACT.md", "/work/"):
        assert needle not in text, f"{path.relative_to(ROOT)} mentions {needle!r}"
    for script in re.findall(r"scripts/[\w.-]+\.sh", text):
        assert (ROOT / script).exists(), f"{path.relative_to(ROOT)} mentions missing {script}"


# --------------------------------------------------------------------------- version


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"(\d+(?:\.\d+)*)", text).group(1).split("."))


def test_version_supersedes_5_and_is_the_same_everywhere() -> None:
    version = _pyproject()["project"]["version"]
    assert _version_tuple(version) >= (6, 0, 0)
    assert truegrad.__version__ == version
    assert f"## {version}" in (ROOT / "CHANGELOG.md").read_text()
    # every installed metadata of this checkout (the editable install's dist-info in
    # site-packages, an egg-info left in the checkout by a build) says the same version
    for dist in importlib.metadata.distributions(name="truegrad"):
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
        editable_here = direct.get("dir_info", {}).get("editable") and Path(
            direct.get("url", "").removeprefix("file://")
        ).resolve() == ROOT
        in_checkout = Path(str(dist.locate_file(""))).resolve() == ROOT
        if editable_here or in_checkout:
            assert dist.version == version, (
                f"installed metadata of this checkout says {dist.version}, pyproject.toml "
                f"{version}: run `pip install -e .` again (scripts/setup.sh does)"
            )


def test_requirement_floors_are_what_runs_here() -> None:
    project = _pyproject()["project"]
    floor = re.fullmatch(r">=\s*(\d+\.\d+)", project["requires-python"]).group(1)
    assert sys.version_info[:2] >= _version_tuple(floor)
    (torch_req,) = [d for d in project["dependencies"] if d.startswith("torch")]
    torch_floor = re.fullmatch(r"torch>=(\d+\.\d+)", torch_req).group(1)
    assert _version_tuple(torch.__version__) >= _version_tuple(torch_floor)
    assert _version_tuple(torch_floor) >= (2, 13), "the floor must be the tested torch"


# --------------------------------------------------------------------------- oracle + BackPACK


def _problem() -> tuple[torch.nn.Module, Any, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    return model, torch.nn.CrossEntropyLoss(), torch.randn(6, 4), torch.randint(0, 3, (6,))


@pytest.mark.backpack
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # BackPACK's extend()
def test_oracle_runs_on_a_backpack_extended_model() -> None:
    backpack = pytest.importorskip("backpack")
    model, loss_fn, x, y = _problem()
    expected = testing.sum_grad_squared_oracle(model, loss_fn, x, y)
    backpack.extend(model)
    hooks = [(dict(m._forward_hooks), dict(m._backward_hooks)) for m in model.modules()]
    result = testing.sum_grad_squared_oracle(model, loss_fn, x, y)  # the default, torch.func
    for name in expected.sum_grad_squared:
        torch.testing.assert_close(result.sum_grad_squared[name], expected.sum_grad_squared[name])
        torch.testing.assert_close(result.grad[name], expected.grad[name])
    testing.assert_matches_oracle(model, loss_fn=loss_fn, inputs=x, targets=y, params=[])
    # BackPACK's hooks are back, in order, and BackPACK itself still works on the model
    assert [(dict(m._forward_hooks), dict(m._backward_hooks)) for m in model.modules()] == hooks
    from backpack.extensions import SumGradSquared

    with backpack.backpack(SumGradSquared()):
        loss_fn(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            p.sum_grad_squared, expected.sum_grad_squared[name], rtol=1e-4, atol=1e-8
        )


def test_oracle_refuses_another_full_backward_hook_with_the_way_out() -> None:
    model, loss_fn, x, y = _problem()
    expected = testing.sum_grad_squared_oracle(model, loss_fn, x, y)
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    refusal = r"module '2' \(Linear\) has a full backward hook.*method='loop'"
    with pytest.raises(ValueError, match=refusal):
        testing.sum_grad_squared_oracle(model, loss_fn, x, y)
    result = testing.sum_grad_squared_oracle(model, loss_fn, x, y, method="loop")
    for name, value in expected.sum_grad_squared.items():
        torch.testing.assert_close(result.sum_grad_squared[name], value)


# --------------------------------------------------------------------------- quoted messages


def _string_texts(node: ast.AST) -> str | None:
    """The text of a string literal, an f-string (each ``{...}`` as ``\\0``) or a ``+`` chain
    of them; ``None`` for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) else "\0" for v in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string_texts(node.left), _string_texts(node.right)
        if left is not None or right is not None:
            return (left if left is not None else "\0") + (right if right is not None else "\0")
    return None


def _message_corpus() -> list[str]:
    texts = []
    for package in ("truegrad", "truegrad_lightning"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                text = _string_texts(node)
                if text:
                    texts.append(text)
    return texts


def _quotes(piece: str, text: str) -> bool:
    """Whether ``piece`` is a window of a message built from ``text`` (its ``\\0`` slots filled
    with runtime values), at least half of it the literal text of the code: ``piece ==
    suffix(P_i) + x + P_i+1 + x + ... + P_j-1 + x + prefix(P_j)`` for the literal parts ``P``."""
    if piece in text:
        return True
    parts = text.split("\0")
    if len(parts) == 1 or not any(
        len(p) >= 6 and (p[:12] in piece or p[-12:] in piece) for p in parts
    ):
        return False
    for i, head in enumerate(parts):
        for k in range(len(head) + 1):
            suffix = head[k:]
            if not piece.startswith(suffix):
                continue
            rest = piece[len(suffix):]
            for j in range(i + 1, len(parts)):
                mids, tail = parts[i + 1 : j], parts[j]
                pattern = "(.*?)" + "".join(re.escape(m) + "(.*?)" for m in mids)
                for e in range(len(tail), -1, -1):
                    if not rest.endswith(tail[:e]):
                        continue
                    literal = len(suffix) + sum(map(len, mids)) + e
                    core = rest[: len(rest) - e]
                    if 2 * literal >= len(piece) and re.fullmatch(pattern, core, flags=re.DOTALL):
                        return True
    return False


def test_troubleshooting_quotes_the_messages_the_code_raises() -> None:
    """Every ``SomeError: message`` span of docs/troubleshooting.md is the code's text: each
    literal piece between the placeholders (``<...>``, ``...``) occurs in one message."""
    corpus = _message_corpus()
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", text)]
    quoted = [
        m.group(2)
        for s in spans
        if (m := re.match(r"(\w+(?:Error|Warning|Exception)): (.*)", s))
    ]
    assert len(quoted) >= 25, quoted
    problems = []
    for message in quoted:
        for piece in re.split(r"<[^>]*>|\.\.\.|\(\.\.\.\)", message):
            piece = piece.strip(" ;,")
            if len(piece) >= 8 and not any(_quotes(piece, t) for t in corpus):
                problems.append(f"{piece!r}   (in {message[:60]!r})")
    assert not problems, "not in the code:\n  " + "\n  ".join(problems)
