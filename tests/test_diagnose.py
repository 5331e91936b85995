"""truegrad.diagnose: coverage, error against the exact oracle, cost, on copies of the model."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from truegrad import statistic
from truegrad.diagnosis import SAMPLES_INTERACT, DiagnosisReport, diagnose
from zoo import ZOO


def _table_lines(report: DiagnosisReport) -> list[str]:
    lines = str(report).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("parameter"))
    return lines[start : start + 1 + len(report.parameters)]


def test_mlp_with_nn_is_covered_and_exact_and_the_model_is_untouched() -> None:
    entry = ZOO["mlp"]
    model = entry.build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    x, y = entry.inputs(), entry.targets()
    rng = torch.get_rng_state()

    report = diagnose(model, x, entry.loss, y, backend="nn", repeats=2)

    names = [n for n, _ in model.named_parameters()]
    assert [row.name for row in report.parameters] == names
    assert all(row.covered and row.reason is None for row in report.parameters)
    assert all(row.relative_error is not None and row.relative_error < 1e-4 for row in report.parameters)
    assert report.uncovered == []
    assert report.backend == "nn" and report.repeats == 2
    assert report.backward_time_ratio > 0 and report.backward_seconds > 0
    assert report.peak_memory_ratio is not None and report.peak_memory_ratio > 0
    assert report.plain_peak_memory_bytes and report.plain_peak_memory_bytes > 0
    assert "torch.profiler" in report.memory_measure
    # the user's model: same classes, values, no grads, no statistics, same RNG state
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None and not statistic.has(p) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)

    text = str(report)
    assert all(name in text for name in names)
    assert "6 of 6 trainable parameters covered" in text
    assert "median of 2 paired repeats" in text
    table = _table_lines(report)
    assert table[0].split() == ["parameter", "shape", "covered", "rel.", "error", "reason"]
    for column in ("shape", "covered", "rel. error"):  # aligned: every cell starts under its header
        at = table[0].index(column)
        assert all(line[at - 2 : at] == "  " and line[at] != " " for line in table[1:]), column


class Gain(nn.Module):
    """A custom module whose parameter is used by a plain tensor op (no module rule: the
    engine follows the op itself)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class WithCustom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = Gain(12)
        self.head = nn.Linear(12, 5)
        self.unused = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gain(x))


def test_custom_module_is_covered_and_unused_parameters_are_reported() -> None:
    report = diagnose(
        WithCustom(), torch.randn(6, 12), F.cross_entropy, torch.randint(0, 5, (6,)),
        backend="nn", repeats=1, measure_memory=False,
    )
    rows = report.by_name
    for name in ("gain.gain", "head.weight", "head.bias"):
        assert rows[name].covered and rows[name].relative_error < 1e-4
    for name in ("unused.weight", "unused.bias"):
        assert rows[name].unused and not rows[name].covered and rows[name].reason is None
    assert report.uncovered == [] and report.unused == ["unused.weight", "unused.bias"]
    assert report.peak_memory_ratio is None and "not measured" in str(report)
    line = next(line for line in str(report).splitlines() if line.startswith("unused.weight"))
    assert line.split()[2] == "unused" and line.endswith("no gradient: the loss does not use it")
    assert "3 of 3 trainable parameters covered (2 more not used by this loss)" in str(report)


def test_batchnorm_in_training_mode_has_no_per_sample_oracle() -> None:
    entry = ZOO["resnet"]
    report = diagnose(
        entry.build(), entry.inputs(), entry.loss, entry.targets(), backend="nn", repeats=1,
        measure_memory=False,
    )
    assert len(report.parameters) == 20
    assert all(row.covered for row in report.parameters)
    assert {row.error_text for row in report.parameters} == {SAMPLES_INTERACT}
    assert all(row.relative_error is None for row in report.parameters)
    assert report.notes[0] == (
        "no per-sample oracle: 'bn1' (BatchNorm2d) is in training mode, so samples interact"
    )
    assert str(report).count("n/a (samples interact)") == 20


@pytest.mark.backpack
def test_backend_with_a_backward_context_names_the_backend_that_covers_the_rest() -> None:
    """BackPack runs its backward inside ``backend.backward_context()``; what it leaves
    without a statistic says why, and that the default backend covers it."""
    pytest.importorskip("backpack")
    entry = ZOO["gpt"]
    report = diagnose(
        entry.build(), entry.inputs(), entry.loss, entry.targets(), backend="backpack",
        repeats=1, measure_memory=False,
    )
    rows = report.by_name
    assert rows["wte.weight"].reason.startswith("shared by modules 'wte' (Embedding), 'lm_head' (Linear)")
    assert rows["wpe.weight"].reason.startswith(
        "module 'wpe' (Embedding): its input does not carry the model's samples"
    )
    assert not rows["norm.weight"].covered
    assert rows["blocks.0.attn.qkv.weight"].covered
    assert rows["blocks.0.attn.qkv.weight"].relative_error < 1e-4
    assert len(report.uncovered) == 7
    assert all(rows[n].reason.endswith("(backend 'auto' covers it)") for n in report.uncovered)


def test_unknown_backend_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown truegrad backend 'nope'; valid choices: 'auto', 'nn'"):
        diagnose(nn.Linear(2, 1), torch.randn(3, 2), lambda out, _: out.sum(), backend="nope")


def test_default_backend_is_auto() -> None:
    assert inspect.signature(diagnose).parameters["backend"].default == "auto"


@pytest.mark.parametrize("bad", [{"model": "x"}, {"loss_fn": 3}, {"repeats": 0}, {"repeats": "2"}])
def test_bad_arguments_are_named(bad: dict) -> None:
    args = {"model": nn.Linear(2, 1), "example_inputs": torch.randn(3, 2),
            "loss_fn": lambda out, _: out.sum(), **bad}
    name = next(iter(bad))
    with pytest.raises((TypeError, ValueError), match=name):
        diagnose(**args)


def test_hugging_face_model_with_dropout_and_a_padding_mask() -> None:
    """Finding 7 of the real-model review: dropout in training mode and a Hugging Face
    attention mask made torch.func's oracle fail, then "p.grad differs" was a false alarm.
    Dropout is off for the comparison (same function everywhere), the loop oracle takes over
    where torch.func cannot run, and every parameter is exact."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16,
                        hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = BertModel(config).train()
    ids = torch.randint(1, 30, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    target = torch.randn(3, 6, 16)
    report = diagnose(
        model, {"input_ids": ids, "attention_mask": mask},
        lambda out, t: F.mse_loss(out.last_hidden_state, t), target, repeats=1,
        measure_memory=False,
    )
    assert not any("differs" in note for note in report.notes), report.notes
    assert any(note.startswith("oracle: the loop oracle") for note in report.notes)
    assert report.uncovered == []
    assert report.unused == ["pooler.dense.weight", "pooler.dense.bias"]
    for row in report.parameters:
        if not row.unused:
            assert row.relative_error is not None and row.relative_error < 1e-4, row


def test_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    """The profiler that measures CPU memory says nothing on the terminal."""
    entry = ZOO["mlp"]
    diagnose(entry.build(), entry.inputs(), entry.loss, entry.targets(), repeats=1)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
