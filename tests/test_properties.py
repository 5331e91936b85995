"""Property tests (issue 12): random stacks of the registry's layers, in random shapes and
layouts, satisfy the invariants of docs/statistic.md and the whole-model oracle under every
backend.

A model is drawn as a list of blocks over a ``(N, T, D)`` activation (batch first at the
model's boundary; inside, blocks move the samples as real models do: channels-first for the
convolutions and norms, sequence-first for attention and the recurrent layers when drawn so,
``(N*T, D)`` for a flattened Linear). Every block is one of the registry's ``torch.nn``
layers (or the same Linear used twice, a tied parameter), followed by ``tanh``. Some
parameters are drawn frozen.

Per backend, after one forward and backward of a mean-squared loss:

* the output equals plain torch's bitwise and ``p.grad`` matches it;
* every trainable parameter's statistic has ``p``'s shape, float32 (float64 for float64
  models), is ``>= 0`` and satisfies Cauchy-Schwarz ``N * s >= g**2``; with one sample
  ``s == g**2``;
* it matches the exact oracle (per-sample loop, float64 sums) to float32 tolerance; BackPack
  may instead give none, with a reason recorded for the parameter (never another number);
* frozen parameters get none;
* a second backward adds to it exactly as to ``p.grad`` (twice the oracle).

Examples are derandomized (a fixed sequence, so CI is reproducible); set
``TRUEGRAD_HYPOTHESIS=explore`` to draw fresh ones and more of them.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from truegrad import statistic, testing
from truegrad.backends import get_backend

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_EXPLORE = os.environ.get("TRUEGRAD_HYPOTHESIS") == "explore"
settings.register_profile(
    "truegrad",
    max_examples=300 if _EXPLORE else 40,
    deadline=None,
    derandomize=not _EXPLORE,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

BACKENDS = ["auto", "nn", "patch_torch", "patch_model", "backpack"]


# ----------------------------------------------------------------------------- blocks


def _channels_first(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N, T, D) -> (N, D, T) -> layer -> (N, T, D')``."""
    return layer(x.transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    """One drawn layer with the reshaping around it; ``spec`` names it in failures. (No
    closures over ``self``: ``copy.deepcopy`` must give an independent block.)"""

    def __init__(self, spec: tuple, d_in: int) -> None:
        super().__init__()
        self.spec = spec
        self.kind, self.opts = kind, opts = spec
        self.d_out = opts.get("d_out", d_in)
        d_out = self.d_out
        bias = opts.get("bias", True)
        if kind in ("linear", "linear_flat"):  # linear_flat: samples and positions in one dim
            self.layer = nn.Linear(d_in, d_out, bias=bias)
        elif kind == "tied":  # one Linear used twice: per-sample sums over both uses
            self.layer = nn.Linear(d_in, d_in, bias=bias)
        elif kind == "bilinear":
            self.layer = nn.Bilinear(d_in, d_in, d_out, bias=bias)
        elif kind in ("conv1d", "conv_transpose1d"):
            k = opts["kernel"]
            cls = nn.Conv1d if kind == "conv1d" else nn.ConvTranspose1d
            self.layer = cls(d_in, d_out, k, padding=k // 2, bias=bias)
        elif kind in ("conv2d", "conv_transpose2d"):
            k = opts["kernel"]
            cls = nn.Conv2d if kind == "conv2d" else nn.ConvTranspose2d
            self.layer = cls(d_in, d_out, (k, 1), padding=(k // 2, 0), bias=bias)
        elif kind == "conv3d":
            k = opts["kernel"]
            self.layer = nn.Conv3d(d_in, d_out, (k, 1, 1), padding=(k // 2, 0, 0), bias=bias)
        elif kind == "layer_norm":
            self.layer = nn.LayerNorm(d_in, bias=bias)
        elif kind == "rms_norm":
            self.layer = nn.RMSNorm(d_in)
        elif kind == "group_norm":
            self.layer = nn.GroupNorm(opts["groups"], d_in)
        elif kind == "instance_norm":
            self.layer = nn.InstanceNorm1d(d_in, affine=True)
        elif kind == "batch_norm_eval":  # a per-channel affine map: samples stay apart
            self.layer = nn.BatchNorm1d(d_in)
            with torch.no_grad():
                self.layer.running_mean.normal_()
                self.layer.running_var.uniform_(0.5, 2.0)
            self.layer.eval()
        elif kind == "prelu":
            self.layer = nn.PReLU(d_in if opts["per_channel"] else 1, init=0.1)
        elif kind == "attention":
            self.layer = nn.MultiheadAttention(
                d_in, opts["heads"], bias=bias, add_bias_kv=opts["bias_kv"],
                batch_first=opts["batch_first"],
            )
        elif kind in ("rnn", "lstm", "gru"):
            cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind]
            extra = {"proj_size": opts["proj"]} if kind == "lstm" and opts.get("proj") else {}
            hidden = opts["hidden"]
            self.layer = cls(
                d_in, hidden, num_layers=opts["layers"], bias=bias, batch_first=opts["batch_first"],
                bidirectional=opts["bidirectional"], **extra,
            )
            self.d_out = (extra.get("proj_size") or hidden) * (2 if opts["bidirectional"] else 1)
        else:  # pragma: no cover - a spec the strategy cannot draw
            raise AssertionError(spec)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        kind, layer = self.kind, self.layer
        if kind == "linear_flat":
            return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.d_out)
        if kind == "tied":
            return layer(torch.tanh(layer(x)))
        if kind == "bilinear":
            return layer(x, torch.tanh(x))
        if kind in ("conv1d", "conv_transpose1d", "group_norm", "instance_norm", "batch_norm_eval",
                    "prelu"):
            return _channels_first(layer, x)
        if kind in ("conv2d", "conv_transpose2d"):
            return layer(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        if kind == "conv3d":
            return layer(x.transpose(1, 2)[..., None, None])[..., 0, 0].transpose(1, 2)
        if kind == "attention":
            batch_first = self.opts["batch_first"]
            x = x if batch_first else x.transpose(0, 1)
            out = layer(x, x, x, need_weights=False)[0]
            return out if batch_first else out.transpose(0, 1)
        if kind in ("rnn", "lstm", "gru"):
            batch_first = self.opts["batch_first"]
            out = layer(x if batch_first else x.transpose(0, 1))[0]
            return out if batch_first else out.transpose(0, 1)
        return layer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.run(x))


class Stack(nn.Module):
    """An input layer (an Embedding of token ids, or a Linear of features), the drawn
    blocks, and nothing after them: the output is ``(N, T, D_last)``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        d = spec["width"]
        if spec["tokens"]:
            self.inp: nn.Module = nn.Embedding(spec["vocab"], d)
        else:
            self.inp = nn.Linear(spec["features"], d)
        blocks = []
        for block in spec["blocks"]:
            blocks.append(Block(block, d))
            d = blocks[-1].d_out
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return h


# ----------------------------------------------------------------------------- strategies


@st.composite
def block_specs(draw: st.DrawFn, width: int) -> tuple:
    kind = draw(st.sampled_from([
        "linear", "linear_flat", "tied", "bilinear", "conv1d", "conv_transpose1d", "conv2d",
        "conv_transpose2d", "conv3d", "layer_norm", "rms_norm", "group_norm", "instance_norm",
        "batch_norm_eval", "prelu", "attention", "rnn", "lstm", "gru",
    ]))
    opts: dict[str, Any] = {"bias": draw(st.booleans())}
    if kind in ("linear", "linear_flat", "bilinear", "conv1d", "conv_transpose1d", "conv2d",
                "conv_transpose2d", "conv3d"):
        opts["d_out"] = width  # keeps the widths (divisible for norms and heads) fixed
    if kind.startswith("conv"):
        opts["kernel"] = draw(st.sampled_from([1, 3]))
    if kind == "group_norm":
        opts["groups"] = draw(st.sampled_from([g for g in (1, 2, width) if width % g == 0]))
    if kind == "prelu":
        opts["per_channel"] = draw(st.booleans())
    if kind == "attention":
        opts["heads"] = draw(st.sampled_from([1, 2]))
        opts["bias_kv"] = draw(st.booleans())
        opts["batch_first"] = draw(st.booleans())
    if kind in ("rnn", "lstm", "gru"):
        opts["layers"] = draw(st.integers(1, 2))
        opts["bidirectional"] = draw(st.booleans())
        opts["batch_first"] = draw(st.booleans())
        opts["hidden"] = width // 2 if opts["bidirectional"] else width
        if kind == "lstm" and draw(st.booleans()):
            opts["proj"] = opts["hidden"] - 1
    return (kind, opts)


@st.composite
def models(draw: st.DrawFn) -> dict[str, Any]:
    width = draw(st.sampled_from([4, 6]))
    return {
        "width": width,
        "tokens": draw(st.booleans()),
        "vocab": 7,
        "features": draw(st.integers(2, 5)),
        "blocks": draw(st.lists(block_specs(width), min_size=1, max_size=3)),
        "batch": draw(st.integers(1, 3)),
        "length": draw(st.integers(3, 5)),  # a norm over 2 values is degenerate (output ±1)
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "frozen": draw(st.integers(0, 2**16)),  # which parameters are frozen (bit mask)
        "seed": draw(st.integers(0, 2**16)),
    }


# ----------------------------------------------------------------------------- the check


def _build(spec: dict[str, Any]) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(spec["seed"])
    model = Stack(spec).to(spec["dtype"])
    for i, (_, p) in enumerate(model.named_parameters()):
        if spec["frozen"] >> (i % 16) & 1 and i % 3 == 0:  # about one in six frozen
            p.requires_grad_(False)
    n, t = spec["batch"], spec["length"]
    if spec["tokens"]:
        x = torch.randint(0, spec["vocab"], (n, t))
    else:
        x = torch.randn(n, t, spec["features"], dtype=spec["dtype"])
    with torch.no_grad():
        target = torch.randn_like(model(x))
    return model, x, target


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).square().mean()


def check_backend(spec: dict[str, Any], backend: str) -> None:
    model, x, target = _build(spec)
    if not any(p.requires_grad for p in model.parameters()):
        return
    plain = copy.deepcopy(model)
    plain_out = plain(x)
    _loss(plain_out, target).backward()
    oracle = testing.sum_grad_squared_oracle(copy.deepcopy(model), _loss, x, target, method="loop")

    chosen = get_backend(backend)
    with warnings.catch_warnings():  # BackPack's coverage warnings: coverage() is checked below
        warnings.simplefilter("ignore")
        handle = chosen.prepare(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(x)
            with chosen.backward_context():
                _loss(out, target).backward()
        assert torch.equal(out.detach(), plain_out.detach()), "output differs from plain torch"
        coverage = chosen.coverage(model)
        n = spec["batch"]
        # Float noise: a parameter whose exact gradient is zero (a bias before a norm that
        # removes it) holds rounding noise on every side; like tests/backends/
        # test_real_models.py, values below 1e-10 x the model's largest statistic (and
        # gradients below 1e-6 x its largest gradient) count as zero.
        floor = 1e-10 * max(float(v.abs().max()) for v in oracle.sum_grad_squared.values())
        grad_noise = 1e-6 * max(float(q.grad.abs().max()) for q in plain.parameters() if q.grad is not None)
        first: dict[str, torch.Tensor] = {}
        for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
            value = statistic.get(p)
            if not p.requires_grad:
                assert value is None, f"{name}: a frozen parameter got a statistic"
                continue
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=grad_noise)
            if value is None:
                assert backend == "backpack", f"{name}: no statistic ({coverage.get(name)})"
                assert coverage.get(name), f"{name}: no statistic and no reason recorded"
                continue
            assert value.shape == p.shape and value.dtype == statistic.statistic_dtype(p.dtype), name
            assert bool((value >= 0).all()), f"{name}: negative statistic"
            # Cauchy-Schwarz, N s >= g**2, for g beyond its rounding noise
            g = (p.grad.abs() - 10 * grad_noise).clamp_min(0)
            assert bool((n * value >= g.square() * (1 - 1e-4)).all()), f"{name}: Cauchy-Schwarz"
            expected = oracle.sum_grad_squared[name]
            atol = 1e-6 * float(expected.abs().max()) + floor
            # float32 rounding where a gradient is a sum of terms that nearly cancel: the
            # oracle's own gradient (per-sample runs) and plain torch's differ there by more
            # than 1e-4 relative, so squares may differ by 2 |g| delta
            delta = (oracle.grad[name].to(q.grad.dtype) - q.grad).abs() + grad_noise
            bound = 1e-4 * expected.abs() + atol + 2 * n * expected.sqrt() * delta
            excess = ((value - expected).abs() - bound).max()
            assert excess <= 0, (
                f"{name}: not the oracle's statistic: {value.flatten()[:6].tolist()} vs "
                f"{expected.flatten()[:6].tolist()} (exceeds the bound by {float(excess):.3g})"
            )
            if n == 1:  # one sample: the statistic is the squared gradient (p.grad and the
                # statistic are summed in different orders: a gradient that is a sum of terms
                # which nearly cancel differs by more than 1e-4 relative; squared, twice that)
                torch.testing.assert_close(value, p.grad.square().to(value.dtype), rtol=1e-3,
                                           atol=atol + (10 * grad_noise) ** 2, msg=lambda m: f"{name}: {m}")
            first[name] = value.clone()

        # accumulates across backward passes exactly as p.grad does
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(x)
            with chosen.backward_context():
                _loss(out, target).backward()
        for name, p in model.named_parameters():
            if name in first:
                value = statistic.get(p)
                assert value is not None, f"{name}: the statistic vanished on the second backward"
                torch.testing.assert_close(value, 2 * first[name], rtol=1e-5, atol=2 * floor,
                                           msg=lambda m: f"{name}: {m}")
    finally:
        handle.undo()


def _spec(blocks: list[tuple], **overrides: Any) -> dict[str, Any]:
    spec = {"width": 4, "tokens": False, "vocab": 7, "features": 2, "blocks": blocks, "batch": 1,
            "length": 3, "dtype": torch.float32, "frozen": 0, "seed": 0}
    return {**spec, **overrides}


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(
            b,
            marks=[pytest.mark.backpack, pytest.mark.skipif(
                importlib.util.find_spec("backpack") is None, reason="needs backpack-for-pytorch")]
            if b == "backpack" else [],
        )
        for b in BACKENDS
    ],
)
@settings(settings.get_profile("truegrad"))
@given(spec=models())
# found by exploring: BackPack let one sample through flattened (1*T, D) or sequence-first
# (T, 1, D), and took its T rows as T samples
@example(spec=_spec([("linear_flat", {"bias": False, "d_out": 4})]))
@example(spec=_spec([("attention", {"bias": True, "heads": 1, "bias_kv": False, "batch_first": False}),
                     ("linear", {"bias": True, "d_out": 4})]))
@example(spec=_spec([("gru", {"bias": True, "layers": 1, "bidirectional": False, "batch_first": False,
                              "hidden": 4}), ("linear_flat", {"bias": True, "d_out": 4})], batch=3))
def test_random_stacks_satisfy_the_contract(backend: str, spec: dict[str, Any]) -> None:
    check_backend(spec, backend)


def test_every_registry_layer_is_drawn() -> None:
    """The strategy covers each registry entry that acts on a sequence (the 3-d and
    image-only types are covered by their own tests)."""
    from truegrad.nn import REGISTRY

    drawn = {nn.Linear, nn.Bilinear, nn.Conv1d, nn.ConvTranspose1d, nn.Conv2d, nn.ConvTranspose2d,
             nn.Conv3d, nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.InstanceNorm1d,
             nn.BatchNorm1d, nn.PReLU, nn.MultiheadAttention, nn.RNN, nn.LSTM, nn.GRU}
    elsewhere = {nn.ConvTranspose3d, nn.EmbeddingBag, nn.BatchNorm2d, nn.BatchNorm3d,
                 nn.InstanceNorm2d, nn.InstanceNorm3d}
    assert {rule.torch_type for rule in REGISTRY} == drawn | elsewhere
