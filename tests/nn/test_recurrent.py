"""truegrad.nn.rules.recurrent (lstm, gru, rnn_tanh, rnn_relu) against torch and the exact oracle.

Each case calls the rule with the weights of a torch.nn.LSTM / GRU / RNN and checks
(1) outputs and final states bitwise equal to the module's, (2) every ``p.grad``, the input
gradient and the initial-state gradients equal to torch's up to rounding, (3)
``p.sum_grad_squared`` equal to the oracle: the plain module run on each sample alone with
the full-batch loss's output-gradient slice, per-sample gradients squared and summed in
float64.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from grads import assert_close_to_rounding
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from truegrad import statistic
from truegrad.engine.samples import Layout
from truegrad.nn import settings
from truegrad.nn.rules import recurrent

pytestmark = pytest.mark.filterwarnings(
    "ignore:LSTM with projections is not supported with oneDNN",
    "ignore:dropout option adds dropout after all but last recurrent layer",
)

_VF = torch._C._VariableFunctions
FUNCS = {"lstm": recurrent.lstm, "gru": recurrent.gru, "rnn_tanh": recurrent.rnn_tanh,
         "rnn_relu": recurrent.rnn_relu}
MODES = list(FUNCS)
N, T, D, H = 3, 5, 4, 6
LENGTHS = [4, 5, 2]  # packed: unsorted, max T


@dataclasses.dataclass(frozen=True)
class Case:
    mode: str
    layers: int = 1
    bidir: bool = False
    bias: bool = True
    batch_first: bool = False
    hx: bool = False
    packed: bool = False
    proj: int = 0
    dtype: torch.dtype = torch.float32
    dropout: float = 0.0
    n: int = N

    @property
    def id(self) -> str:
        parts = [self.mode, f"L{self.layers}", "bi" if self.bidir else "uni",
                 "bias" if self.bias else "nobias", "bf" if self.batch_first else "tm",
                 "hx" if self.hx else "nohx", "packed" if self.packed else "padded",
                 "f64" if self.dtype == torch.float64 else "f32"]
        if self.proj:
            parts.append(f"proj{self.proj}")
        if self.dropout:
            parts.append(f"drop{self.dropout}")
        return "-".join(parts)

    @property
    def dirs(self) -> int:
        return 2 if self.bidir else 1

    @property
    def h_out(self) -> int:
        return self.proj or H

    @property
    def lengths(self) -> list[int]:
        return LENGTHS[: self.n] if self.n <= len(LENGTHS) else [T] * self.n


def _module(case: Case) -> torch.nn.Module:
    kw = {"input_size": D, "hidden_size": H, "num_layers": case.layers, "bias": case.bias,
          "batch_first": case.batch_first, "bidirectional": case.bidir,
          "dropout": case.dropout, "dtype": case.dtype}
    if case.mode == "lstm":
        return torch.nn.LSTM(**kw, proj_size=case.proj)
    if case.mode == "gru":
        return torch.nn.GRU(**kw)
    return torch.nn.RNN(**kw, nonlinearity="tanh" if case.mode == "rnn_tanh" else "relu")


def _data(case: Case) -> dict:
    """Input, initial states (or None) and the loss weights (padded, module layout)."""
    shape = (case.n, T, D) if case.batch_first else (T, case.n, D)
    x = torch.randn(shape, dtype=case.dtype)
    states = [(case.layers * case.dirs, case.n, case.h_out)]
    if case.mode == "lstm":
        states.append((case.layers * case.dirs, case.n, H))
    hx = [torch.randn(s, dtype=case.dtype) for s in states] if case.hx else None
    out_shape = shape[:2] + (case.dirs * case.h_out,)
    w_out = torch.randn(out_shape, dtype=case.dtype)
    w_states = [torch.randn(s, dtype=case.dtype) for s in states]
    return {"x": x, "hx": hx, "w_out": w_out, "w_states": w_states}


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _pack(case: Case, x: torch.Tensor, lengths: list[int]) -> PackedSequence:
    return pack_padded_sequence(x, lengths, batch_first=case.batch_first, enforce_sorted=False)


def _unpad(case: Case, out: torch.Tensor | PackedSequence) -> torch.Tensor:
    if isinstance(out, PackedSequence):
        return pad_packed_sequence(out, batch_first=case.batch_first, total_length=T)[0]
    return out


def _loss(case: Case, out: torch.Tensor | PackedSequence, states: list[torch.Tensor],
          w_out: torch.Tensor, w_states: list[torch.Tensor]) -> torch.Tensor:
    loss = (_unpad(case, out) * w_out).sum()
    for s, w in zip(states, w_states):
        loss = loss + (s * w).sum()
    return loss


def _run_module(case: Case, m: torch.nn.Module, x: torch.Tensor, hx: list[torch.Tensor] | None,
                lengths: list[int]) -> tuple:
    inp = _pack(case, x, lengths) if case.packed else x
    state = None if hx is None else (tuple(hx) if case.mode == "lstm" else hx[0])
    out, st = m(inp, state)
    return out, list(st) if case.mode == "lstm" else [st]


def _run_ours(case: Case, m: torch.nn.Module, x: torch.Tensor, hx: list[torch.Tensor] | None,
              lengths: list[int], **kw) -> tuple:
    f = FUNCS[case.mode]
    n = x.shape[0] if case.batch_first else x.shape[1]
    if hx is None:  # what the module does without hx
        hx = [torch.zeros(case.layers * case.dirs, n, case.h_out, dtype=x.dtype)]
        if case.mode == "lstm":
            hx.append(torch.zeros(case.layers * case.dirs, n, H, dtype=x.dtype))
    params = m._flat_weights
    settings_ = (m.bias, m.num_layers, float(m.dropout), m.training, m.bidirectional)
    if case.packed:
        ps = _pack(case, x, lengths)
        hs = [h.index_select(1, ps.sorted_indices) for h in hx]
        state = tuple(hs) if case.mode == "lstm" else hs[0]
        res = f(ps.data, ps.batch_sizes, state, params, *settings_, **kw)
        out = PackedSequence(res[0], ps.batch_sizes, ps.sorted_indices, ps.unsorted_indices)
        return out, [s.index_select(1, ps.unsorted_indices) for s in res[1:]]
    state = tuple(hx) if case.mode == "lstm" else hx[0]
    res = f(x, state, params, *settings_, m.batch_first, **kw)
    return res[0], list(res[1:])


def _sample(case: Case, t: torch.Tensor, n: int, state: bool = False) -> torch.Tensor:
    dim = 1 if (state or not case.batch_first) else 0
    return t.narrow(dim, n, 1)


def _oracle(case: Case, m: torch.nn.Module, data: dict) -> list[torch.Tensor]:
    """sum_n g_n**2 (float64) with the plain module run on each sample alone."""
    params = [p for p in m.parameters()]
    total = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for n in range(case.n):
        x = _sample(case, data["x"], n)
        hx = None if data["hx"] is None else [_sample(case, h, n, True) for h in data["hx"]]
        out, states = _run_module(case, m, x, hx, [case.lengths[n]])
        loss = _loss(case, out, states, _sample(case, data["w_out"], n),
                     [_sample(case, w, n, True) for w in data["w_states"]])
        grads = torch.autograd.grad(loss, params)
        for acc, g in zip(total, grads):
            acc += g.double() ** 2
    return total


def _assert_stat(actual: torch.Tensor | None, expected: torch.Tensor, name: str) -> None:
    assert actual is not None, f"{name}: no sum_grad_squared"
    scale = expected.abs().max().item()
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12 * scale, msg=name)
    else:
        torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-6 * scale,
                                   msg=name)


def check(case: Case, ours_calls: int = 1) -> None:
    data = _data(case)
    m = _module(case)
    ref = copy.deepcopy(m)
    oracle_m = copy.deepcopy(m)
    lengths = case.lengths if case.packed else [T] * case.n

    x_ours, x_ref = _leaf(data["x"]), _leaf(data["x"])
    hx_ours = None if data["hx"] is None else [_leaf(h) for h in data["hx"]]
    hx_ref = None if data["hx"] is None else [_leaf(h) for h in data["hx"]]

    out, states = _run_ours(case, m, x_ours, hx_ours, lengths)
    out_ref, states_ref = _run_module(case, ref, x_ref, hx_ref, lengths)
    # (1) bitwise outputs
    if case.packed:
        assert torch.equal(out.data, out_ref.data)
    else:
        assert torch.equal(out, out_ref)
    assert len(states) == len(states_ref)
    for s, s_ref in zip(states, states_ref):
        assert torch.equal(s, s_ref)

    _loss(case, out, states, data["w_out"], data["w_states"]).backward()
    _loss(case, out_ref, states_ref, data["w_out"], data["w_states"]).backward()
    # (2) gradients
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        assert_close_to_rounding(p.grad, p_ref.grad, name)
    assert_close_to_rounding(x_ours.grad, x_ref.grad, "input")
    if hx_ours is not None:
        for h, h_ref in zip(hx_ours, hx_ref):
            assert_close_to_rounding(h.grad, h_ref.grad, "hx")
    # (3) the statistic
    expected = _oracle(case, oracle_m, data)
    for (name, p), e in zip(m.named_parameters(), expected):
        _assert_stat(statistic.get(p), e, name)


# A covering set of settings per mode: layers, directions, bias, batch_first, hx, packing.
SETTINGS = [
    {},
    {"bidir": True, "bias": False, "batch_first": True, "hx": True},
    {"layers": 2, "batch_first": True, "hx": True},
    {"layers": 2, "bidir": True},
    {"layers": 2, "bidir": True, "bias": False, "hx": True},
    {"packed": True, "hx": True},
    {"packed": True, "layers": 2, "bidir": True, "hx": True, "batch_first": True},
    {"packed": True, "layers": 2, "bias": False},
]
CASES = [
    Case(mode, dtype=dtype, **s)
    for mode in MODES
    for dtype in (torch.float32, torch.float64)
    for s in SETTINGS
] + [
    Case("lstm", proj=3, dtype=dtype, **s)
    for dtype in (torch.float32, torch.float64)
    for s in [{}, {"layers": 2, "bidir": True, "hx": True, "batch_first": True},
              {"packed": True, "layers": 2, "bidir": True, "hx": True}]
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_torch_and_oracle(case: Case) -> None:
    check(case)


@pytest.mark.parametrize("mode", MODES)
def test_one_sample_gives_grad_squared(mode: str) -> None:
    case = Case(mode, layers=2, bidir=True, hx=True, n=1, dtype=torch.float64)
    check(case)
    data = _data(case)
    m = _module(case)
    out, states = _run_ours(case, m, _leaf(data["x"]), None, [T])
    _loss(case, out, states, data["w_out"], data["w_states"]).backward()
    for p in m.parameters():
        torch.testing.assert_close(statistic.get(p), p.grad**2, rtol=1e-12, atol=0)


def test_chunked_matches_unchunked() -> None:
    for case in [Case("lstm", layers=2, bidir=True, proj=3, hx=True),
                 Case("gru", packed=True, layers=2, bidir=True, hx=True)]:
        with settings.configure(chunk_bytes=64):
            check(case)


def test_parameter_used_twice() -> None:
    """One LSTM on both halves of the sequence (the second continues from the first's
    state): per-sample gradients are summed over both calls before squaring."""
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(D, H, num_layers=2, dtype=torch.float64)
    ref = copy.deepcopy(lstm)
    x = torch.randn(T + 1, N, D, dtype=torch.float64)
    w = torch.randn(T + 1, N, H, dtype=torch.float64)

    def model(m: torch.nn.Module, x: torch.Tensor, ours: bool) -> torch.Tensor:
        n = x.shape[1]
        h = (torch.zeros(2, n, H, dtype=x.dtype), torch.zeros(2, n, H, dtype=x.dtype))
        outs = []
        for part in (x[:3], x[3:]):
            if ours:
                y, hn, cn = recurrent.lstm(part, h, m._flat_weights, True, 2, 0.0, True, False,
                                           False)
            else:
                y, (hn, cn) = m(part, h)
            h = (hn, cn)
            outs.append(y)
        return torch.cat(outs)

    y = model(lstm, x, True)
    y_ref = model(ref, x, False)
    assert torch.equal(y, y_ref)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    params = list(ref.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for n in range(N):
        loss = (model(ref, x[:, n:n + 1], False) * w[:, n:n + 1]).sum()
        grads = torch.autograd.grad(loss, params)
        for e, g in zip(expected, grads):
            e += g**2
    for p, p_ref, e in zip(lstm.parameters(), ref.parameters(), expected):
        assert_close_to_rounding(p.grad, p_ref.grad)
        _assert_stat(statistic.get(p), e, "shared")


def test_same_tensor_twice_in_params() -> None:
    """One weight in two slots of ``params`` (layer 0's and layer 1's ``w_hh``): one exact
    statistic of the summed per-sample gradients, and torch's gradient."""
    torch.manual_seed(2)
    m = torch.nn.LSTM(D, H, num_layers=2, dtype=torch.float64)
    ref = copy.deepcopy(m)
    x = torch.randn(T, N, D, dtype=torch.float64)
    w = torch.randn(T, N, H, dtype=torch.float64)
    h = (torch.zeros(2, N, H, dtype=torch.float64),) * 2

    def tied(module: torch.nn.Module) -> list[torch.Tensor]:
        flat = list(module._flat_weights)
        flat[5] = flat[1]
        return flat

    out = recurrent.lstm(x, h, tied(m), True, 2, 0.0, True, False, False)[0]
    out_ref = _VF.lstm(x, h, tied(ref), True, 2, 0.0, True, False, False)[0]
    assert torch.equal(out, out_ref)
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    names = [name for name, _ in ref.named_parameters() if name != "weight_hh_l1"]
    params = [ref.get_parameter(name) for name in names]
    expected = [torch.zeros_like(p) for p in params]
    for n in range(N):
        hn = tuple(s[:, n:n + 1] for s in h)
        o = _VF.lstm(x[:, n:n + 1], hn, tied(ref), True, 2, 0.0, True, False, False)[0]
        grads = torch.autograd.grad((o * w[:, n:n + 1]).sum(), params)
        for e, g in zip(expected, grads):
            e += g**2
    for name, e in zip(names, expected):
        assert_close_to_rounding(m.get_parameter(name).grad, ref.get_parameter(name).grad, name)
        _assert_stat(statistic.get(m.get_parameter(name)), e, name)
    assert m.weight_hh_l1.grad is None and statistic.get(m.weight_hh_l1) is None


# ----------------------------------------------------------------------------- dropout


def _masks(case: Case, seed: int, rows: int) -> list[torch.Tensor]:
    """The masks torch draws between layers (shape-only draws, after ``manual_seed``)."""
    torch.manual_seed(seed)
    shape = (rows, case.dirs * case.h_out) if case.packed else (T, case.n, case.dirs * case.h_out)
    return [torch.dropout(torch.ones(shape, dtype=case.dtype), case.dropout, True)
            for _ in range(case.layers - 1)]


def _dropout_oracle(case: Case, m: torch.nn.Module, data: dict, masks: list[torch.Tensor],
                    packed: PackedSequence | None) -> list[torch.Tensor]:
    """Per-sample gradients through a layer stack with the given masks."""
    flat = m._flat_weights
    per = len(flat) // case.layers
    params = list(m.parameters())
    total = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    op = getattr(_VF, case.mode)
    x_tm = data["x"].transpose(0, 1) if case.batch_first else data["x"]
    w_tm = data["w_out"].transpose(0, 1) if case.batch_first else data["w_out"]
    hx = data["hx"]
    for n in range(case.n):
        length = case.lengths[n] if case.packed else T
        if packed is not None:  # sample n's rows of the packed data
            j = int((packed.sorted_indices == n).nonzero())
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), packed.batch_sizes.cumsum(0)])
            rows = offsets[:length] + j
        x = x_tm[:length, n] if case.packed else x_tm[:, n:n + 1]
        states: list[list[torch.Tensor]] = [[] for _ in hx]
        for layer in range(case.layers):
            sl = slice(layer * case.dirs, (layer + 1) * case.dirs)
            h = [s[sl, n:n + 1] for s in hx]
            state = tuple(h) if case.mode == "lstm" else h[0]
            lp = flat[layer * per:(layer + 1) * per]
            if case.packed:
                sizes = torch.ones(length, dtype=torch.long)
                res = op(x, sizes, state, lp, case.bias, 1, 0.0, True, case.bidir)
            else:
                res = op(x, state, lp, case.bias, 1, 0.0, True, case.bidir, False)
            for acc, s in zip(states, res[1:]):
                acc.append(s)
            x = res[0]
            if layer < case.layers - 1:
                x = x * (masks[layer][rows] if case.packed else masks[layer][:, n:n + 1])
        w = w_tm[:length, n] if case.packed else w_tm[:, n:n + 1]
        loss = (x * w).sum()
        for acc, ws in zip(states, data["w_states"]):
            loss = loss + (torch.cat(acc) * ws[:, n:n + 1]).sum()
        for acc, g in zip(total, torch.autograd.grad(loss, params)):
            acc += g.double() ** 2
    return total


DROPOUT_CASES = [
    Case(mode, layers=3 if mode == "lstm" else 2, bidir=True, hx=True, dropout=0.4,
         dtype=torch.float64, packed=packed)
    for mode in MODES for packed in (False, True)
] + [Case("lstm", layers=2, hx=True, dropout=0.5, batch_first=True),
     Case("gru", layers=2, bidir=True, hx=True, dropout=0.3, packed=True),
     Case("lstm", layers=2, bidir=True, hx=True, dropout=0.5, proj=3, batch_first=True)]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=[c.id for c in DROPOUT_CASES])
def test_inter_layer_dropout(case: Case) -> None:
    """Outputs bitwise nn's under the same seed; grads torch's; the statistic exact."""
    data = _data(case)
    m = _module(case)
    ref = copy.deepcopy(m)
    oracle_m = copy.deepcopy(m)
    lengths = case.lengths if case.packed else [T] * case.n
    x_ours, x_ref = _leaf(data["x"]), _leaf(data["x"])
    hx_ours = [_leaf(h) for h in data["hx"]]
    hx_ref = [_leaf(h) for h in data["hx"]]
    torch.manual_seed(7)
    out, states = _run_ours(case, m, x_ours, hx_ours, lengths)
    torch.manual_seed(7)
    out_ref, states_ref = _run_module(case, ref, x_ref, hx_ref, lengths)
    assert torch.equal(out.data if case.packed else out, out_ref.data if case.packed else out_ref)
    for s, s_ref in zip(states, states_ref):
        assert torch.equal(s, s_ref)
    _loss(case, out, states, data["w_out"], data["w_states"]).backward()
    _loss(case, out_ref, states_ref, data["w_out"], data["w_states"]).backward()
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        assert_close_to_rounding(p.grad, p_ref.grad, name)
    assert_close_to_rounding(x_ours.grad, x_ref.grad, "input")
    for h, h_ref in zip(hx_ours, hx_ref):
        assert_close_to_rounding(h.grad, h_ref.grad, "hx")
    packed = _pack(case, data["x"], lengths) if case.packed else None
    masks = _masks(case, 7, packed.data.shape[0] if packed is not None else 0)
    expected = _dropout_oracle(case, oracle_m, data, masks, packed)
    for (name, p), e in zip(m.named_parameters(), expected):
        _assert_stat(statistic.get(p), e, name)


def test_dropout_ignored_in_eval_and_single_layer() -> None:
    for case in [Case("lstm", layers=2, dropout=0.5, hx=True), Case("gru", dropout=0.5)]:
        data = _data(case)
        m = _module(case)
        if case.layers > 1:
            m.eval()
        ref = copy.deepcopy(m)
        out, states = _run_ours(case, m, _leaf(data["x"]), data["hx"], [T] * N)
        out_ref, states_ref = _run_module(case, ref, data["x"], data["hx"], [T] * N)
        assert torch.equal(out, out_ref)
        for s, s_ref in zip(states, states_ref):
            assert torch.equal(s, s_ref)


# ----------------------------------------------------------------------------- the rest


def test_untracked_calls_torch() -> None:
    """No trainable leaf: torch's op itself (its own backward), no statistic."""
    m = torch.nn.GRU(D, H, num_layers=2)
    m.requires_grad_(False)
    x = torch.randn(T, N, D, requires_grad=True)
    h = torch.zeros(2, N, H)
    out, hn = recurrent.gru(x, h, m._flat_weights, True, 2, 0.0, True, False, False)
    assert out.grad_fn is not None and "Recurrent" not in type(out.grad_fn).__name__
    ref, ref_h = m(x, h)
    assert torch.equal(out, ref) and torch.equal(hn, ref_h)
    with torch.no_grad():
        m.requires_grad_(True)
        out, _ = recurrent.gru(x, h, m._flat_weights, True, 2, 0.0, True, False, False)
        assert out.grad_fn is None
    out.sum()  # no backward possible, no statistic
    assert all(statistic.get(p) is None for p in m.parameters())


def test_frozen_and_non_leaf_weights() -> None:
    """Frozen weights get neither gradient nor statistic; a non-leaf weight (computed from a
    parameter) passes its gradient on without a statistic; the others are exact."""
    case = Case("lstm", layers=2, bidir=True, hx=True, dtype=torch.float64)
    data = _data(case)
    m = _module(case)
    ref = copy.deepcopy(m)
    m.weight_hh_l0.requires_grad_(False)
    ref.weight_hh_l0.requires_grad_(False)
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    scale_ref = _leaf(scale)
    flat = list(m._flat_weights)
    flat[4] = m.weight_ih_l0_reverse * scale  # non-leaf
    h = tuple(data["hx"])
    out, hn, cn = recurrent.lstm(data["x"], h, flat, True, 2, 0.0, True, True, False)
    flat_ref = list(ref._flat_weights)
    flat_ref[4] = ref.weight_ih_l0_reverse * scale_ref
    out_ref, hn_ref, cn_ref = _VF.lstm(data["x"], h, flat_ref, True, 2, 0.0, True, True, False)
    assert torch.equal(out, out_ref) and torch.equal(hn, hn_ref) and torch.equal(cn, cn_ref)
    (out * data["w_out"]).sum().backward()
    (out_ref * data["w_out"]).sum().backward()
    assert_close_to_rounding(scale.grad, scale_ref.grad, "scale")
    assert m.weight_hh_l0.grad is None and statistic.get(m.weight_hh_l0) is None
    # the non-leaf's parameter gets its gradient through the product, no statistic of its own
    assert statistic.get(m.weight_ih_l0_reverse) is None
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        if p.requires_grad:
            assert_close_to_rounding(p.grad, p_ref.grad, name)
    # exact statistic of the other leaves
    params = [p for name, p in ref.named_parameters()
              if p.requires_grad and name != "weight_ih_l0_reverse"]
    expected = [torch.zeros_like(p) for p in params]
    for n in range(N):
        xn = data["x"][:, n:n + 1]
        hn_ = tuple(s[:, n:n + 1] for s in h)
        flat_n = list(ref._flat_weights)
        flat_n[4] = ref.weight_ih_l0_reverse * scale_ref
        o = _VF.lstm(xn, hn_, flat_n, True, 2, 0.0, True, True, False)[0]
        grads = torch.autograd.grad((o * data["w_out"][:, n:n + 1]).sum(), params)
        for e, g in zip(expected, grads):
            e += g**2
    ours = [p for name, p in m.named_parameters()
            if p.requires_grad and name != "weight_ih_l0_reverse"]
    for p, e in zip(ours, expected):
        _assert_stat(statistic.get(p), e, "leaf")


def test_autograd_grad_leaves_statistic_alone() -> None:
    """torch.autograd.grad for the input only: no statistic (as p.grad is left alone)."""
    m = torch.nn.RNN(D, H)
    x = torch.randn(T, N, D, requires_grad=True)
    out, _ = recurrent.rnn_tanh(x, torch.zeros(1, N, H), m._flat_weights, True, 1, 0.0, True,
                                False, False)
    (gx,) = torch.autograd.grad(out.sum(), x)
    (gx_ref,) = torch.autograd.grad(m(x)[0].sum(), x)
    assert_close_to_rounding(gx, gx_ref)
    assert all(statistic.get(p) is None and p.grad is None for p in m.parameters())


def test_keyword_arguments_and_samples() -> None:
    m = torch.nn.GRU(D, H, batch_first=True)
    x = torch.randn(N, T, D)
    h = torch.zeros(1, N, H)
    out, hn = recurrent.gru(input=x, hx=h, params=m._flat_weights, has_biases=True, num_layers=1,
                            dropout=0.0, train=True, bidirectional=False, batch_first=True,
                            samples=Layout(0, N))
    ref, ref_h = m(x, h)
    assert torch.equal(out, ref) and torch.equal(hn, ref_h)
    out.sum().backward()
    assert all(statistic.get(p) is not None for p in m.parameters())


def test_errors() -> None:
    m = torch.nn.LSTM(D, H)
    h = (torch.zeros(1, H), torch.zeros(1, H))
    with pytest.raises(ValueError, match="unbatched"):
        recurrent.lstm(torch.randn(T, D), h, m._flat_weights, True, 1, 0.0, True, False, False)
    h = (torch.zeros(1, N, H), torch.zeros(1, N, H))
    for layout in [Layout(0, N), Layout(1, N, inner=2)]:
        with pytest.raises(ValueError, match="batch dim"):
            recurrent.lstm(torch.randn(T, N, D), h, m._flat_weights, True, 1, 0.0, True, False,
                           False, samples=layout)
    with pytest.raises(ValueError, match="batch dim"):
        recurrent.lstm(torch.randn(N, T, D), h, m._flat_weights, True, 1, 0.0, True, False, True,
                       samples=Layout(1, T))
    assert recurrent.__all__ == ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def test_dropout_off_cpu_is_refused() -> None:
    """Inter-layer dropout in training off the CPU (cuDNN's masks): NotImplementedError."""
    m = torch.nn.LSTM(D, H, num_layers=2, dropout=0.5, device="meta")
    x = torch.randn(T, N, D, device="meta")
    h = (torch.zeros(2, N, H, device="meta"),) * 2
    with pytest.raises(NotImplementedError, match="dropout"):
        recurrent.lstm(x, h, m._flat_weights, True, 2, 0.5, True, False, False)
