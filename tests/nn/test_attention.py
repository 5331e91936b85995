"""truegrad.nn.MultiheadAttention and truegrad.nn.functional.multi_head_attention_forward
against torch and the exact oracle."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from truegrad import _bypass, nn, parameter, statistic, testing
from truegrad.nn import functional as TF

from harness import Problem, check, to_torch

# The oracle vmaps torch's own attention; some of its kernels have no batching rule.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

E, H, N, L, S = 8, 2, 3, 4, 5  # embed dim, heads, batch, target length, source length


def _mha(**kwargs: Any) -> nn.MultiheadAttention:
    """A truegrad MultiheadAttention with random (non-zero) biases."""
    mha = nn.MultiheadAttention(E, H, **kwargs)
    with torch.no_grad():
        for p in (mha.in_proj_bias, mha.out_proj.bias):
            if p is not None:
                p.normal_()
    return mha


class Attend(torch.nn.Module):
    """A model around ``mha``: its inputs are batch-first (the model's samples are dim 0 of
    its input, docs/statistic.md) and a seq-first layer gets them transposed, as a seq-first model
    does inside. ``key_padding_mask`` is ``(N, S)``, ``head_mask`` (a per-sample 3-D
    ``attn_mask``) is ``(N, H, L, S)``; a 2-D ``attn_mask`` is a buffer. Outputs are
    batch-first too."""

    def __init__(
        self, mha: torch.nn.MultiheadAttention, attn_mask: torch.Tensor | None = None, **call: Any
    ) -> None:
        super().__init__()
        self.mha = mha
        self.register_buffer("attn_mask", attn_mask, persistent=False)
        self.call = call

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_first = self.mha.batch_first
        key = query if key is None else key  # self-attention: query is key is value
        value = key if value is None else value
        if not batch_first:  # the layer is seq-first: transpose, keeping the "is" relations
            t_query = query.transpose(0, 1)
            t_key = t_query if key is query else key.transpose(0, 1)
            t_value = t_key if value is key else value.transpose(0, 1)
            query, key, value = t_query, t_key, t_value
        attn_mask = self.attn_mask
        if head_mask is not None:
            attn_mask = head_mask.reshape(-1, *head_mask.shape[2:])
        out, weights = self.mha(
            query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, **self.call
        )
        if not batch_first:
            out = out.transpose(0, 1)  # attn_weights are batch-first in both layouts
        return out, weights


class Block(torch.nn.Module):
    """Pre-norm transformer block: truegrad attention and MLP, torch.nn LayerNorms. Its input
    is batch-first; a seq-first block transposes it and runs everything seq-first inside."""

    def __init__(self, batch_first: bool, freeze_norms: bool = True) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(E), torch.nn.LayerNorm(E)
        self.attn = _mha(batch_first=batch_first)
        self.fc1, self.fc2 = nn.Linear(E, 2 * E), nn.Linear(2 * E, E)
        if freeze_norms:
            for p in [*self.norm1.parameters(), *self.norm2.parameters()]:
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.attn.batch_first:
            x = x.transpose(0, 1)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))
        return x if self.attn.batch_first else x.transpose(0, 1)


def _x(length: int = L, dim: int = E, batch_first: bool = True) -> torch.Tensor:
    """A model input: batch-first whatever the layer's layout (``batch_first`` is ignored)."""
    return torch.randn(N, length, dim)


def _kpm(batch_first: bool = True, float_mask: bool = False, length: int = S) -> torch.Tensor:
    mask = torch.zeros(N, length, dtype=torch.bool)
    mask[0, -1] = True
    mask[1, :2] = True  # every row keeps unmasked keys
    if float_mask:
        mask = torch.randn(N, length) - 3.0 * mask
    return mask


def _mask2d(length: int = L, float_mask: bool = False) -> torch.Tensor:
    mask = torch.ones(L, length, dtype=torch.bool).triu(1 + length - L)
    return torch.randn(L, length).masked_fill(mask, float("-inf")) if float_mask else mask


def _head_mask(batch_first: bool = True, float_mask: bool = False, length: int = S) -> torch.Tensor:
    mask = torch.rand(N, H, L, length) < 0.3
    mask[..., 0] = False
    return torch.randn(N, H, L, length) - 2.0 * mask if float_mask else mask


def _causal(float_mask: bool) -> torch.Tensor:
    if float_mask:
        return torch.nn.Transformer.generate_square_subsequent_mask(L)
    return torch.ones(L, L, dtype=torch.bool).triu(1)


def _weights_in_loss(out: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """attn_output (N, L, E) and averaged weights (N, L, S') side by side."""
    return torch.cat([out[0], out[1]], -1)  # type: ignore[list-item]


def _per_head_weights_in_loss(out: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    return torch.cat([out[0], out[1].transpose(1, 2).flatten(2)], -1)  # type: ignore[union-attr]


def problem(id: str, module_fn: Any, input_fn: Any, batch_first: bool = True, **kw: Any) -> Problem:
    """A Problem on an :class:`Attend`-style model: the loss sees ``attn_output`` unless
    ``output_fn`` says otherwise; the model's samples are dim 0 of its inputs."""
    output_fn = kw.pop("output_fn", lambda out: out[0])
    return Problem(id, module_fn, input_fn, output_fn, **kw)


def _bf(mask_fn: Any = None, call: dict | None = None, **kw: Any) -> Any:
    """A batch-first :class:`Attend` factory (``mask_fn`` makes its 2-D ``attn_mask``)."""
    return lambda: Attend(_mha(batch_first=True, **kw), mask_fn and mask_fn(), **(call or {}))


def _seq(mask_fn: Any = None, call: dict | None = None, **kw: Any) -> Any:
    """A seq-first :class:`Attend` factory (``mask_fn`` makes its 2-D ``attn_mask``)."""
    return lambda: Attend(_mha(**kw), mask_fn and mask_fn(), **(call or {}))


def _inputs(batch_first: bool = True, key: int | None = None, value: int | None = None,
            query: int = L, **masks: Any) -> Any:
    """Inputs: query (length ``query``), key/value of width ``key``/``value`` (length S; None:
    none, i.e. self-attention or key is value), and masks built by the given callables."""
    def make() -> dict:
        inputs = {"query": _x(query, batch_first=batch_first)}
        if key is not None:
            inputs["key"] = _x(S, key, batch_first)
        if value is not None:
            inputs["value"] = _x(S, value, batch_first)
        return {**inputs, **{name: fn() for name, fn in masks.items()}}

    return make


SEQ = {"batch_first": False}
NO_WEIGHTS = {"need_weights": False}

PROBLEMS = [
    # self-attention, both layouts, projections with and without bias
    problem("self-bf", _bf(), _inputs()),
    problem("self-seq", _seq(), _inputs(False), **SEQ),
    problem("self-nobias-bf", _bf(bias=False), _inputs()),
    problem("self-nobias-seq", _seq(bias=False), _inputs(False), **SEQ),
    # bias_k / bias_v and zero attention
    problem("bias-kv-bf", _bf(add_bias_kv=True), _inputs()),
    problem("zero-attn-bf", _bf(add_zero_attn=True), _inputs()),
    problem("bias-kv-zero-attn-seq", _seq(add_bias_kv=True, add_zero_attn=True), _inputs(False),
            **SEQ),
    # cross-attention: packed weight with key is value or three tensors; kdim/vdim
    problem("cross-kv-same-bf", _bf(), _inputs(key=E)),
    problem("cross-qkv-seq", _seq(), _inputs(False, key=E, value=E), **SEQ),
    problem("cross-kdim-vdim-bf", _bf(kdim=6, vdim=5), _inputs(key=6, value=5)),
    problem("cross-kdim-vdim-nobias-seq", _seq(kdim=6, vdim=5, bias=False),
            _inputs(False, key=6, value=5), **SEQ),
    problem("cross-kdim-bias-kv-zero-attn-bf",
            _bf(kdim=6, vdim=6, add_bias_kv=True, add_zero_attn=True), _inputs(key=6)),
    # masks of every kind
    problem("kpm-bool-bf", _bf(), _inputs(query=S, key_padding_mask=_kpm)),
    problem("kpm-float-seq", _seq(),
            _inputs(False, query=S, key_padding_mask=lambda: _kpm(False, True)), **SEQ),
    problem("mask2d-bool-bf", _bf(lambda: _mask2d(S)), _inputs(key=E)),
    problem("mask2d-float-seq", _seq(lambda: _mask2d(S, float_mask=True)), _inputs(False, key=E),
            **SEQ),
    problem("mask3d-float-bf", _bf(),
            _inputs(key=E, head_mask=lambda: _head_mask(float_mask=True))),
    problem("mask3d-bool-seq", _seq(),
            _inputs(False, key=E, head_mask=lambda: _head_mask(False)), **SEQ),
    problem("mask2d-kpm-bias-kv-zero-attn-bf",
            _bf(lambda: _mask2d(S), add_bias_kv=True, add_zero_attn=True),
            _inputs(key=E, key_padding_mask=_kpm)),
    # is_causal (with its attn_mask), need_weights and average_attn_weights
    problem("causal-weights-bf", _bf(lambda: _causal(True), {"is_causal": True}), _inputs()),
    problem("causal-sdpa-seq", _seq(lambda: _causal(False), {"is_causal": True, **NO_WEIGHTS}),
            _inputs(False), **SEQ),
    problem("causal-sdpa-kpm-bf", _bf(lambda: _causal(False), {"is_causal": True, **NO_WEIGHTS}),
            _inputs(key_padding_mask=lambda: _kpm(length=L))),
    problem("sdpa-bf", _bf(call=NO_WEIGHTS), _inputs()),
    problem("sdpa-mask3d-kpm-bias-kv-zero-attn-seq",
            _seq(call=NO_WEIGHTS, add_bias_kv=True, add_zero_attn=True),
            _inputs(False, key=E, key_padding_mask=lambda: _kpm(False, True),
                    head_mask=lambda: _head_mask(False, True)), **SEQ),
    problem("weights-in-loss-bf", _bf(), _inputs(key=E), output_fn=_weights_in_loss),
    problem("per-head-weights-in-loss-bf", _bf(call={"average_attn_weights": False}), _inputs(),
            output_fn=_per_head_weights_in_loss),
    # dropout: off in eval mode, and p=0 in training
    problem("eval-dropout-bf", lambda: _bf(dropout=0.5)().eval(), _inputs()),
    problem("dropout-zero-seq", _seq(dropout=0.0), _inputs(False), **SEQ),
    # a transformer block: attention, truegrad Linear, torch.nn LayerNorm (frozen here)
    problem("block-bf", lambda: Block(True), _x, output_fn=lambda out: out),
    problem("block-seq", lambda: Block(False), lambda: _x(batch_first=False),
            output_fn=lambda out: out, **SEQ),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("problem", PROBLEMS, ids=[p.id for p in PROBLEMS])
def test_attention_matches_torch_and_oracle(
    problem: Problem, reduction: str, dtype: torch.dtype
) -> None:
    check(problem, reduction, dtype)


def _outputs_and_grads(
    model: torch.nn.Module, inputs: dict, seed: int = 0
) -> tuple[list[torch.Tensor], dict]:
    """The model's outputs (attn_output and, if any, attn_weights) and its parameters' grads
    of the sum of their squares."""
    torch.manual_seed(seed)
    out = model(**inputs)
    tensors = [t for t in out if t is not None]
    torch.stack([t.square().sum() for t in tensors]).sum().backward()
    return tensors, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16-autocast"]
)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "sdpa"])
@pytest.mark.parametrize("average", [True, False], ids=["avg", "per-head"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "seq"])
def test_outputs_weights_and_grads_are_torchs_bitwise(
    batch_first: bool, average: bool, need_weights: bool, dtype: torch.dtype
) -> None:
    model = Attend(_mha(add_bias_kv=True, batch_first=batch_first), need_weights=need_weights,
                   average_attn_weights=average)
    inputs = {"query": _x(batch_first=batch_first), "key": _x(S, batch_first=batch_first),
              "key_padding_mask": _kpm(batch_first), "head_mask": _head_mask(batch_first)}
    if dtype == torch.float64:
        model = model.double()
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    twin = to_torch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours, grads = _outputs_and_grads(model, inputs)
        theirs, twin_grads = _outputs_and_grads(twin, inputs)
    assert len(ours) == len(theirs) == (2 if need_weights else 1)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for name, g in grads.items():
        assert torch.equal(g, twin_grads[name]), name


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "sdpa"])
def test_dropout_grads_match_torch_with_the_same_seed(need_weights: bool) -> None:
    model = Attend(_mha(dropout=0.3, batch_first=True).double(), need_weights=need_weights)
    twin = to_torch(model)
    inputs = {"query": _x().double()}
    ours, grads = _outputs_and_grads(model, inputs, seed=7)
    theirs, twin_grads = _outputs_and_grads(twin, inputs, seed=7)
    assert torch.equal(ours[0], theirs[0])
    for name, g in grads.items():
        assert torch.equal(g, twin_grads[name]), name


def test_seq_first_layer_splits_by_the_models_samples_not_by_its_dim_0() -> None:
    """A seq-first layer in a model whose input is batch-first: the statistic is that of the
    model's samples (dim 1 inside the layer), not of the layer's dim 0 (its positions)."""
    model = Attend(_mha(), need_weights=False)
    x = _x()
    loss_fn = lambda out, _: out[0].square().sum()  # noqa: E731
    testing.assert_matches_oracle(model, loss_fn, x, rtol=1e-4)
    ours = model.mha.in_proj_weight.sum_grad_squared
    # what treating the layer's dim 0 (the target positions) as the samples would give
    wrong = testing.sum_grad_squared_oracle(to_torch(model), loss_fn, x, batch_dim=1)
    difference = ours - wrong.sum_grad_squared["mha.in_proj_weight"]
    assert difference.abs().max() > 1e-2 * ours.abs().max()


@pytest.mark.parametrize("self_attention", [True, False], ids=["self", "cross"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "seq"])
def test_unbatched_input_gives_no_statistic(batch_first: bool, self_attention: bool) -> None:
    """An unbatched (L, E) model input: the model's samples (its dim 0) are the positions,
    which attend to each other, so the statistic is absent with the reason; output and
    gradients are torch's."""
    mha = _mha(add_bias_kv=True, batch_first=batch_first)
    twin = to_torch(mha)
    q = torch.randn(L, E)
    kv = q if self_attention else torch.randn(S, E)
    kpm = torch.zeros(kv.shape[0], dtype=torch.bool)
    kpm[-1] = True
    out, weights = mha(q, kv, kv, key_padding_mask=kpm)
    ref, ref_weights = twin(q, kv, kv, key_padding_mask=kpm)
    assert out.shape == (L, E) and weights.shape == (L, kv.shape[0] + 1)
    assert torch.equal(out, ref) and torch.equal(weights, ref_weights)
    out.square().sum().backward()
    ref.square().sum().backward()
    for p, t in zip(mha.parameters(), twin.parameters()):
        assert torch.equal(p.grad, t.grad)
        assert not statistic.has(p) and "batched (L, N, E)" in parameter.reason(p)


class FunctionalAttention(torch.nn.Module):
    """A custom module calling ``truegrad.nn.functional.multi_head_attention_forward`` with
    separate projection weights, seq-first inside (its inputs are batch-first), with static
    keys and values."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Parameter(torch.randn(E, E) / 3)
        self.k = torch.nn.Parameter(torch.randn(E, 6) / 3)
        self.v = torch.nn.Parameter(torch.randn(E, 5) / 3)
        self.b = torch.nn.Parameter(torch.randn(3 * E))
        self.out = torch.nn.Parameter(torch.randn(E, E) / 3)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                static_v: torch.Tensor | None = None) -> torch.Tensor:
        if static_v is not None:  # (N, H, S, E / H) -> (N * H, S, E / H)
            static_v = static_v.reshape(-1, *static_v.shape[2:])
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        return TF.multi_head_attention_forward(
            query, key, value, E, H, None, self.b, None, None, False, 0.0, self.out, None,
            use_separate_proj_weight=True, q_proj_weight=self.q, k_proj_weight=self.k,
            v_proj_weight=self.v, static_v=static_v, need_weights=False,
        )[0].transpose(0, 1)


@pytest.mark.parametrize("static", [False, True], ids=["projected", "static-v"])
def test_functional_matches_torch_and_oracle(static: bool) -> None:
    torch.manual_seed(0)
    model = FunctionalAttention().double()
    inputs = [_x(), _x(S, 6), _x(S, 5)]
    if static:
        inputs.append(torch.randn(N, H, S, E // H))
    inputs = tuple(t.double() for t in inputs)
    out = model(*inputs)
    with _bypass.bypass():  # torch's own multi_head_attention_forward
        ref = model(*inputs)
        ref_grads = torch.autograd.grad(
            ref.square().sum(), list(model.parameters()), allow_unused=True
        )
    assert torch.equal(out, ref)
    out.square().sum().backward()
    for p, g in zip(model.parameters(), ref_grads):
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
    assert (model.v.grad is None) == static  # as torch: a discarded projection gets no grad
    covered = ["q", "k", "b", "out"] if static else None  # as torch: v gets no gradient
    testing.assert_matches_oracle(
        model, lambda o, _: o.square().sum(), inputs, rtol=1e-9, params=covered
    )


def test_is_a_drop_in_subclass_with_the_same_state_dict() -> None:
    for kwargs in ({}, {"kdim": 6, "vdim": 5, "add_bias_kv": True, "bias": False}):
        layer = nn.MultiheadAttention(E, H, **kwargs)
        ref = torch.nn.MultiheadAttention(E, H, **kwargs)
        assert isinstance(layer, torch.nn.MultiheadAttention)
        assert layer.state_dict().keys() == ref.state_dict().keys()
        layer.load_state_dict(ref.state_dict())
    assert nn.REGISTRY.lookup(nn.MultiheadAttention).torch_type is torch.nn.MultiheadAttention


def test_inference_runs_torchs_forward_fast_path_included() -> None:
    layer = _mha(batch_first=True).eval()
    twin = to_torch(layer)
    x = _x()
    with torch.no_grad():
        ours, theirs = layer(x, x, x), twin(x, x, x)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert not statistic.has(layer.in_proj_weight)


def test_accumulates_over_two_backward_passes() -> None:
    model = Attend(_mha(kdim=6, vdim=6, add_bias_kv=True, batch_first=True))
    first_in, second_in = {"query": _x(), "key": _x(S, 6)}, {"query": _x(), "key": _x(S, 6)}
    loss_fn = lambda out, _: out[0].square().sum()  # noqa: E731
    loss_fn(model(**first_in), None).backward()
    first = {n: p.sum_grad_squared.clone() for n, p in model.named_parameters()}
    loss_fn(model(**second_in), None).backward()
    second = testing.sum_grad_squared_oracle(to_torch(model), loss_fn, second_in).sum_grad_squared
    for n, p in model.named_parameters():
        torch.testing.assert_close(
            p.sum_grad_squared, first[n] + second[n], rtol=1e-4, atol=1e-6, msg=n
        )


@pytest.mark.parametrize("kdim", [None, 6], ids=["packed", "separate"])
def test_chunked_and_unchunked_agree(kdim: int | None) -> None:
    model = Attend(_mha(kdim=kdim, vdim=kdim, add_bias_kv=True, batch_first=True))
    inputs = {"query": torch.randn(9, L, E), "key": torch.randn(9, S, kdim or E)}
    model(**inputs)[0].square().sum().backward()
    whole = {n: p.sum_grad_squared.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    statistic.clear(model.parameters())
    # 2 samples of out_proj.weight per chunk, 1 of in_proj_weight
    with nn.settings.configure(chunk_bytes=2 * E * E * 4 * 2):
        model(**inputs)[0].square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.sum_grad_squared, whole[n], rtol=1e-5, atol=0, msg=n)


def test_layer_called_twice_is_exact() -> None:
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = _mha(add_bias_kv=True, batch_first=True)

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            h = self.attn(x, memory, memory)[0]
            return self.attn(torch.tanh(h), x, x)[0]

    testing.assert_matches_oracle(Twice(), lambda o, _: o.square().mean(), (_x(), _x()))


def test_block_with_trainable_torch_layer_norms_covers_the_truegrad_layers() -> None:
    model = Block(batch_first=False, freeze_norms=False)
    x = _x(batch_first=False)
    covered = [n for n, _ in model.named_parameters() if not n.startswith("norm")]
    loss_fn = lambda o, _: o.square().mean()  # noqa: E731
    testing.assert_matches_oracle(model, loss_fn, x, params=covered)
    assert not statistic.has(model.norm1.weight) and not statistic.has(model.norm2.bias)


@pytest.mark.parametrize(
    "kdim,frozen",
    [
        (None, ("out_proj.weight", "out_proj.bias", "bias_v")),
        (None, ("in_proj_weight",)),
        (6, ("k_proj_weight",)),
    ],
    ids=["out-proj-bias-v", "in-proj-weight", "k-proj-weight"],
)
def test_frozen_parameters_get_no_statistic(kdim: int | None, frozen: tuple[str, ...]) -> None:
    model = Attend(_mha(kdim=kdim, vdim=kdim, add_bias_kv=True, batch_first=True))
    params = dict(model.mha.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    covered = [f"mha.{n}" for n, p in params.items() if p.requires_grad]
    inputs = {"query": _x(), "key": _x(S, kdim or E)}
    testing.assert_matches_oracle(model, lambda o, _: o[0].square().sum(), inputs, params=covered)
    assert not any(statistic.has(params[name]) or params[name].grad is not None for name in frozen)


def test_position_granularity_is_the_per_position_approximation() -> None:
    mha = _mha(add_bias_kv=True, batch_first=True)
    x = _x()
    mha(x, x, x)[0].sum().backward()
    exact = {n: p.sum_grad_squared.clone() for n, p in mha.named_parameters()}
    mha.zero_grad()
    statistic.clear(mha.parameters())
    mha.granularity = "position"
    mha(x, x, x)[0].sum().backward()
    # d(sum)/dy = 1: every (query position, sample) adds 1 to out_proj.bias's statistic
    torch.testing.assert_close(mha.out_proj.bias.sum_grad_squared, torch.full((E,), float(N * L)))
    approx = mha.in_proj_weight.sum_grad_squared
    assert not torch.allclose(approx, exact["in_proj_weight"], rtol=1e-2)
    # bias_k/bias_v have one position per sample: position and sample granularity agree
    torch.testing.assert_close(mha.bias_k.sum_grad_squared, exact["bias_k"])
    torch.testing.assert_close(mha.bias_v.sum_grad_squared, exact["bias_v"])
    with pytest.raises(ValueError, match="granularity must be one of"):
        TF.multi_head_attention_forward(
            x, x, x, E, H, mha.in_proj_weight, None, None, None, False, 0.0, mha.out_proj.weight,
            None, granularity="token",  # type: ignore[arg-type]
        )


def test_bf16_autocast_statistic_close_to_float32_and_forward_dtype_is_torchs() -> None:
    model = Attend(_mha(add_bias_kv=True, batch_first=True))
    twin = to_torch(model)
    inputs = {"query": _x(), "key": _x(S), "key_padding_mask": _kpm()}
    model(**inputs)[0].square().mean().backward()
    full = {n: p.sum_grad_squared.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    statistic.clear(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = model(**inputs)
        ref, ref_weights = twin(**inputs)
    assert out.dtype == ref.dtype == torch.bfloat16 and weights.dtype == ref_weights.dtype
    out.float().square().mean().backward()
    for n, p in model.named_parameters():
        s = p.sum_grad_squared
        assert s.dtype == torch.float32 and p.grad.dtype == torch.float32
        rel = ((s - full[n]).norm() / full[n].norm()).item()
        assert rel < 2e-2, (n, rel)


def test_torchs_errors() -> None:
    mha = _mha(batch_first=True)
    x = _x()
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        mha(x, x, x, is_causal=True)
    with pytest.raises(AssertionError, match="Expected key_padded_mask"):
        mha(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="The shape of the 2D attn_mask is"):
        mha(x, x, x, attn_mask=torch.zeros(L, L + 1))
    with pytest.raises(AssertionError, match="query should be unbatched 2D or batched 3D tensor"):
        mha(x[None], x[None], x[None])
    with pytest.raises(AssertionError, match="only bool and floating types of attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.long))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mha(x, x, x, key_padding_mask=_kpm(length=L), attn_mask=_mask2d(L, float_mask=True))
    messages = [str(w.message) for w in caught]
    assert any("mismatched key_padding_mask and attn_mask is deprecated" in m for m in messages)
