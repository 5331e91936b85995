"""The seven findings of the real-model review, each in a few lines, on every engine backend.

Before the engine, each of these gave a wrong number with no warning (or a number with a
warning, which TGAdamW stepped with anyway), or a crash, or no statistic and no reason. Now
every parameter gets the exact statistic of the model's samples (docs/statistic.md section 1), or
none with the reason recorded. (BackPack's share of findings 2 and 5 is tested in
``tests/backends/test_backpack.py``, diagnose's finding 7 in ``tests/test_diagnose.py``.)
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from truegrad import testing
from truegrad.backends import get_backend

BACKENDS = ["auto", "nn", "patch_torch", "patch_model"]
V, D, N, T = 11, 6, 3, 5


def _exact(model: nn.Module, backend: str, x: torch.Tensor, method: str = "func") -> None:
    """Prepare ``model`` with ``backend`` and check every parameter against the oracle of the
    whole model (``method``: ``torch.func`` or one backward per sample, for layers that
    ``vmap`` cannot run); no warning may be raised on the way."""
    plain = testing.plain_copy(model)
    loss = lambda out, _: out.square().mean()  # noqa: E731
    expected = testing.sum_grad_squared_oracle(plain, loss, x, method=method)
    with get_backend(backend).prepare(model), warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(model(x), None).backward()
        problems = testing.compare_to_oracle(model, expected)
    assert not problems, problems


class ScaledEmbedding(nn.Embedding):
    """Gemma's / Bart's scaled word embedding: a subclass with its own forward."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * D**0.5


class ScaledTied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = ScaledEmbedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_1_tied_weight_of_an_embedding_subclass_with_its_own_forward(backend: str) -> None:
    """Only the Linear use was counted (relative error 0.8-0.98) and coverage said covered."""
    _exact(ScaledTied(), backend, torch.randint(0, V, (N, T)))


class FunctionTied(nn.Module):
    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use
        self.embed = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(ids)))
        return h @ self.embed.weight.T if self.use == "matmul" else F.linear(h, self.embed.weight)


@pytest.mark.parametrize("use", ["matmul", "F.linear"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_2_tied_weight_whose_second_use_is_a_function_call(backend: str, use: str) -> None:
    """``h @ emb.weight.T`` was wrong under patch_torch/convert, ``F.linear(h, emb.weight)``
    under convert."""
    _exact(FunctionTied(use), backend, torch.randint(0, V, (N, T)))


class Positions(nn.Module):
    def __init__(self, shape: str) -> None:
        super().__init__()
        self.shape = shape
        self.wte = nn.Embedding(V, D)
        self.wpe = nn.Embedding(T, D)
        self.head = nn.Linear(D, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1])
        pos = pos if self.shape == "T" else pos[None]
        return self.head(self.wte(ids) + self.wpe(pos))


class SeqFirstTransformer(nn.Module):
    """A sequence-first ``nn.TransformerEncoderLayer`` inside a batch-first model."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(D, 2, 12, dropout=0.0)
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x.transpose(0, 1)).transpose(0, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["arange(T)", "(1, T)", "seq-first", "seq-first T == N"])
def test_3_positions_and_layouts_without_the_batch_on_dim_0(case: str, backend: str) -> None:
    """Position ids of arange(T) or (1, T), and the layers of a sequence-first transformer,
    got p.grad**2 (the whole batch as one sample) with a BatchSizeWarning."""
    if case.startswith("seq-first"):
        n = T if "T == N" in case else N
        _exact(SeqFirstTransformer(), backend, torch.randn(n, T, D))
    else:
        _exact(Positions("T" if case == "arange(T)" else "1T"), backend, torch.randint(0, V, (N, T)))


class TableRead(nn.Module):
    """DeBERTa's ``rel_embeddings.weight``: a module's weight used without calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(2 * T, D)
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) @ self.table.weight[:D].T


@pytest.mark.parametrize("backend", BACKENDS)
def test_4_weight_used_without_calling_its_module(backend: str) -> None:
    """No statistic, no reason, and coverage said covered."""
    _exact(TableRead(), backend, torch.randn(N, T, D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_5_float64_model_with_an_embedding(backend: str) -> None:
    """(BackPack crashed on it; every engine backend is exact in float64 too.)"""
    _exact(ScaledTied().double(), backend, torch.randint(0, V, (N, T)))


class Everything(nn.Module):
    """Finding 6's list of what was uncovered everywhere: recurrent layers, a custom RMSNorm
    written with elementwise ops, GPT-2's Conv1D (addmm on a flattened operand), a class token
    concatenated onto the batch, weight_norm / spectral_norm."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.lstm = nn.LSTM(D, D, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(2 * D, D)
        self.norm_weight = nn.Parameter(torch.rand(D) + 0.5)
        self.conv1d_w = nn.Parameter(torch.randn(D, D) / 3)
        self.conv1d_b = nn.Parameter(torch.randn(D))
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(D, D))
        self.sn = nn.utils.parametrizations.spectral_norm(nn.Linear(D, D)).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.lstm(x)[0]
        x = self.gru(x.transpose(0, 1))[0].transpose(0, 1)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
        x = torch.addmm(self.conv1d_b, x.reshape(-1, D), self.conv1d_w).view(x.shape)
        return self.sn(self.wn(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_6_what_was_uncovered_everywhere(backend: str) -> None:
    # vmap cannot run a sequence-first GRU on one sample (it builds an unbatched hidden state)
    _exact(Everything(), backend, torch.randn(N, T, D), method="loop")
