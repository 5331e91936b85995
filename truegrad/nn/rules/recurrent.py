"""torch's recurrent layers (LSTM, GRU, RNN tanh / relu) with the exact per-sample statistic.

:func:`lstm`, :func:`gru`, :func:`rnn_tanh` and :func:`rnn_relu` take the arguments of
torch's C ops (``torch.lstm`` / ``torch._VF.lstm`` ...), both overloads:

* padded: ``(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
  batch_first)``, ``input (T, N, D)`` or ``(N, T, D)``;
* packed: ``(data, batch_sizes, hx, params, has_biases, num_layers, dropout, train,
  bidirectional)``, the ``data (sum_T, D)`` and int64 ``batch_sizes`` of a ``PackedSequence``
  (time step t is rows ``offset_t : offset_t + batch_sizes[t]``, row ``offset_t + j`` sample j);

``hx`` is ``(h0, c0)`` for the LSTM, ``h0`` otherwise; ``params`` the module's
``_flat_weights``: per layer and direction ``w_ih, w_hh, [b_ih, b_hh], [w_hr]``.

Forward is torch's own op (bitwise torch's outputs). Backward is a hand-written
backpropagation through time over the steps, layer by layer and direction by direction,
from the gate activations recomputed from the layer's input and output (the hidden
state ``h_{t-1}`` of every step is in the layer's output; the LSTM's cell state is
rebuilt by its elementwise recurrence). With ``dg[n, t]`` the gradient of the gate
pre-activations of sample n at step t, sample n's gradients are

    w_ih: sum_t dg[n, t]^T x[n, t]      w_hh: sum_t dg[n, t]^T h[n, t-1]      biases: sum_t dg[n, t]
    w_hr (LSTM projection): sum_t dh[n, t]^T (o * tanh(c))[n, t]

(the GRU's hidden-side gradient differs from its input-side one in the new gate, which
``r`` scales). They are formed in chunks of samples by ``base.contribute`` in float32
(float64 for float64 parameters); ``p.grad`` is their sum (equal to torch's up to float
rounding, also under ``settings.bitwise_grad``: torch's fused kernels' order of sums is
not reproducible), and the input and initial-state gradients are equal to torch's up to
rounding.

A multi-layer model's inner layers are recomputed in backward with torch's op on one
layer. Inter-layer dropout (``dropout > 0``, ``train``, ``num_layers > 1``) runs the
forward layer by layer with torch's one-layer op and the dropout torch applies between
layers (``torch.dropout``, same RNG, same order: bitwise torch's, checked on CPU),
keeping the masks for backward. On other devices (cuDNN's dropout has its own RNG) it
raises ``NotImplementedError``.

torch's op runs in grad mode with the caller's ``requires_grad`` flags (on aliases whose
graph is dropped at once): its CPU kernels round differently otherwise (oneDNN's LSTM in
grad mode, ``matmul`` folding for a weight that requires grad).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from truegrad.engine.samples import Layout
from truegrad.nn.rules import base

__all__ = ["lstm", "gru", "rnn_tanh", "rnn_relu"]  # noqa: RUF022 (torch's order)

#: torch's C ops (not replaceable by ``patch_torch``)
_VF = torch._C._VariableFunctions

_PADDED_NAMES = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train",
                 "bidirectional", "batch_first")
_PACKED_NAMES = ("data", "batch_sizes", "hx", "params", "has_biases", "num_layers", "dropout",
                 "train", "bidirectional")


@dataclasses.dataclass(frozen=True, eq=False)
class _Config:
    mode: str
    packed: bool
    batch_sizes: torch.Tensor | None
    has_biases: bool
    num_layers: int
    dropout: float
    train: bool
    bidirectional: bool
    batch_first: bool
    has_proj: bool
    samples: Layout | None

    @property
    def dirs(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def per_direction(self) -> int:
        """Parameters per layer and direction."""
        return 2 + (2 if self.has_biases else 0) + (1 if self.has_proj else 0)

    @property
    def layered(self) -> bool:
        """Whether the forward runs layer by layer (inter-layer dropout)."""
        return self.dropout > 0 and self.train and self.num_layers > 1


# ----------------------------------------------------------------------------- torch's op


def _op(config: _Config, input: torch.Tensor, hx: Any, params: Sequence[torch.Tensor],
        num_layers: int, dropout: float, batch_first: bool) -> tuple[torch.Tensor, ...]:
    """torch's op on ``input`` (padded or packed data, as ``config`` says)."""
    op = getattr(_VF, config.mode)
    if config.packed:
        return op(input, config.batch_sizes, hx, list(params), config.has_biases, num_layers,
                  dropout, config.train, config.bidirectional)
    return op(input, hx, list(params), config.has_biases, num_layers, dropout, config.train,
              config.bidirectional, batch_first)


def _alias(t: torch.Tensor | None) -> torch.Tensor | None:
    """A plain leaf sharing ``t``'s data and its ``requires_grad``."""
    if t is None:
        return None
    alias = _plain(t)
    return alias.requires_grad_() if t.requires_grad else alias


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, as a plain ``torch.Tensor``."""
    with torch._C.DisableTorchFunctionSubclass():
        return torch.Tensor.detach(t)


def _as_torch_runs_it(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` (tensors and lists of tensors) as the caller's op would run: in
    grad mode and with the same ``requires_grad`` flags (torch's CPU kernels round
    differently otherwise: oneDNN's LSTM in grad mode, ``matmul`` folding for a weight
    that requires grad), on aliases, so that the graph it builds is dropped at once."""
    aliased = [[_alias(t) for t in a] if isinstance(a, (list, tuple)) else
               (_alias(a) if isinstance(a, torch.Tensor) else a) for a in args]
    with torch.enable_grad():
        result = function(*aliased)
    if isinstance(result, torch.Tensor):
        return result.detach()
    return type(result)(_detach_all(r) for r in result)


def _detach_all(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach_all(v) for v in value)
    return value


def _layer_hx(config: _Config, h0: torch.Tensor, c0: torch.Tensor | None, layer: int) -> Any:
    rows = slice(layer * config.dirs, (layer + 1) * config.dirs)
    return (h0[rows], c0[rows]) if config.mode == "lstm" else h0[rows]


def _layer_params(config: _Config, params: Sequence[torch.Tensor],
                  layer: int) -> list[torch.Tensor]:
    size = config.per_direction * config.dirs
    return list(params[layer * size:(layer + 1) * size])


def _one_layer(config: _Config, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None,
               params: Sequence[torch.Tensor], layer: int) -> tuple[torch.Tensor, ...]:
    """torch's op on one layer, time-major (``x`` time-major padded or packed data)."""
    return _op(config, x, _layer_hx(config, h0, c0, layer), _layer_params(config, params, layer),
               1, 0.0, False)


def _forward_layered(config: _Config, input: torch.Tensor, h0: torch.Tensor,
                     c0: torch.Tensor | None, params: Sequence[torch.Tensor]
                     ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """torch's multi-layer op with inter-layer dropout, one layer at a time as torch runs it:
    each layer's (time-major) output goes through ``torch.dropout`` before the next layer.
    The mask is drawn as ``torch.dropout`` of ones (the same RNG draws: they depend on the
    shape only) and multiplied in as torch's dropout does. Returns the outputs and, per
    inner layer, its output before dropout and the mask."""
    x = input.transpose(0, 1) if (config.batch_first and not config.packed) else input
    hs: list[torch.Tensor] = []
    cs: list[torch.Tensor] = []
    saved: list[torch.Tensor] = []
    y = x
    for layer in range(config.num_layers):
        res = _one_layer(config, x, h0, c0, params, layer)
        y = res[0]
        hs.append(res[1])
        if config.mode == "lstm":
            cs.append(res[2])
        if layer < config.num_layers - 1:
            noise = torch.dropout(torch.ones_like(y), config.dropout, True)
            x = y * noise  # what torch's dropout computes, with the same draws
            saved += [y, noise]
    if config.batch_first and not config.packed:
        y = y.transpose(0, 1)
    outs = (y, torch.cat(hs, 0)) + ((torch.cat(cs, 0),) if config.mode == "lstm" else ())
    return outs, saved


# ----------------------------------------------------------------------------- sequences


class _Seq:
    """The time steps: ``T`` steps of ``N`` samples, ``bs[t]`` of them active at step t
    (a prefix: packed samples are sorted by length), and the conversion between the op's
    representation and time-major padded ``(T, N, F)`` (zeros where a sample has ended)."""

    def __init__(self, config: _Config, input: torch.Tensor) -> None:
        self.config = config
        device = input.device
        if config.packed:
            assert config.batch_sizes is not None
            self.bs = [int(b) for b in config.batch_sizes.tolist()]
            self.T = len(self.bs)
            self.N = self.bs[0] if self.bs else 0
            self.index = torch.cat(
                [torch.arange(b, device=device) + t * self.N for t, b in enumerate(self.bs)]
            ) if self.bs else torch.zeros(0, dtype=torch.long, device=device)
            sizes = config.batch_sizes.to(device)
            self.lengths = (sizes[None, :] > torch.arange(self.N, device=device)[:, None]).sum(1)
        else:
            self.T, self.N = input.shape[:2]
            if config.batch_first:
                self.N, self.T = self.T, self.N
            self.bs = [self.N] * self.T
            self.lengths = torch.full((self.N,), self.T, dtype=torch.long, device=device)

    def to_tm(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Time-major padded ``(T, N, F)`` in ``dtype`` of a tensor in the op's layout."""
        if self.config.packed:
            out = t.new_zeros((self.T * self.N, t.shape[-1]), dtype=dtype)
            out.index_copy_(0, self.index, base.cast(t, dtype))
            return out.view(self.T, self.N, -1)
        if self.config.batch_first:
            t = t.transpose(0, 1)
        return base.cast(t, dtype)

    def to_tm_inner(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Like :meth:`to_tm` for an inner layer's tensor (always time-major when padded)."""
        if self.config.packed:
            return self.to_tm(t, dtype)
        return base.cast(t, dtype)

    def from_tm(self, t: torch.Tensor) -> torch.Tensor:
        """The op's layout of a time-major padded tensor."""
        if self.config.packed:
            return t.reshape(self.T * self.N, -1).index_select(0, self.index)
        return t.transpose(0, 1) if self.config.batch_first else t


# ----------------------------------------------------------------------------- BPTT


@dataclasses.dataclass
class _Term:
    """Sample n's gradient of one parameter: ``sum_t a[t, n]^T b[t, n]`` (a weight), or
    ``sum_t a[t, n]`` (a bias, ``b`` None); ``a`` and ``b`` time-major ``(T, N, *)``."""

    a: torch.Tensor
    b: torch.Tensor | None = None

    def per_sample(self, s: int, e: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.b is None:
            return self.a[:, s:e].sum(0)
        a = self.a[:, s:e].permute(1, 2, 0)  # (n, O, T)
        b = self.b[:, s:e].transpose(0, 1)  # (n, T, I)
        return torch.bmm(a, b) if out is None else torch.bmm(a, b, out=out)

    def total(self) -> torch.Tensor:
        if self.b is None:
            return self.a.sum((0, 1))
        return self.a.reshape(-1, self.a.shape[-1]).t() @ self.b.reshape(-1, self.b.shape[-1])

    def shape(self) -> tuple[int, ...]:
        if self.b is None:
            return (self.a.shape[-1],)
        return (self.a.shape[-1], self.b.shape[-1])


def _previous_hidden(y: torch.Tensor, h0: torch.Tensor, reverse: bool, seq: _Seq) -> torch.Tensor:
    """``h_{t-1}`` of every step (time-major, ``h0`` where a sample starts)."""
    if not reverse:
        return torch.cat([h0[None], y[:-1]], 0)
    prev = torch.cat([y[1:], h0[None]], 0)
    if seq.config.packed and seq.N:
        starts = (seq.lengths - 1).clamp(min=0)
        prev[starts, torch.arange(seq.N, device=prev.device)] = h0
    return prev


def _steps(seq: _Seq, reverse: bool) -> range:
    """The steps in backward order."""
    return range(seq.T) if reverse else range(seq.T - 1, -1, -1)


def _lstm_direction(seq: _Seq, x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor,
                    h0: torch.Tensor, c0: torch.Tensor, dh: torch.Tensor, dc: torch.Tensor,
                    w: list[torch.Tensor | None], reverse: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[_Term | None]]:
    """One LSTM layer direction: ``(dgates, dh0, dc0, terms)`` (terms per parameter slot
    ``w_ih, w_hh, b_ih, b_hh, w_hr``)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = w
    T, N = seq.T, seq.N
    prev = _previous_hidden(y, h0, reverse, seq)
    gates = torch.matmul(x, w_ih.t()) + torch.matmul(prev, w_hh.t())  # type: ignore[union-attr]
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    H = gates.shape[-1] // 4
    ifo = gates.view(T, N, 4, H)
    i, f, g, o = ifo.unbind(2)
    i, f, o, g = i.sigmoid(), f.sigmoid(), o.sigmoid(), g.tanh()
    c_all = torch.zeros(T, N, H, dtype=gates.dtype, device=gates.device)
    c_prev = torch.zeros_like(c_all)
    c = c0.clone()
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        b = seq.bs[t]
        c_prev[t, :b] = c[:b]
        c[:b] = f[t, :b] * c[:b] + i[t, :b] * g[t, :b]
        c_all[t, :b] = c[:b]
    tc = c_all.tanh()
    # d gates / d c_t for i, f, g (stacked), and do, dc from dh_unprojected
    fac3 = torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], 2)  # (T,N,3,H)
    fac_o = tc * o * (1 - o)
    fac_c = o * (1 - tc * tc)
    dgates = torch.zeros(T, N, 4 * H, dtype=gates.dtype, device=gates.device)
    dg4 = dgates.view(T, N, 4, H)
    dh_proj = torch.zeros_like(y) if w_hr is not None else None
    dh = dh.clone()
    dc = dc.clone()
    for t in _steps(seq, reverse):
        b = seq.bs[t]
        dht = dh[:b] + dy[t, :b]
        if w_hr is not None:
            dh_proj[t, :b] = dht  # type: ignore[index]
            dht = dht @ w_hr
        dct = dc[:b] + dht * fac_c[t, :b]
        torch.mul(dct[:, None, :], fac3[t, :b], out=dg4[t, :b, :3])
        torch.mul(dht, fac_o[t, :b], out=dg4[t, :b, 3])
        dc[:b] = dct * f[t, :b]
        dh[:b] = dgates[t, :b] @ w_hh
    terms: list[_Term | None] = [_Term(dgates, x), _Term(dgates, prev), None, None, None]
    if b_ih is not None:
        terms[2] = terms[3] = _Term(dgates)
    if w_hr is not None:
        terms[4] = _Term(dh_proj, o * tc)  # type: ignore[arg-type]
    return dgates, dh, dc, terms


def _gru_direction(seq: _Seq, x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor,
                   h0: torch.Tensor, dh: torch.Tensor, w: list[torch.Tensor | None], reverse: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, list[_Term | None]]:
    """One GRU layer direction: ``(d input-side gates, dh0, terms)``."""
    w_ih, w_hh, b_ih, b_hh, _ = w
    T, N = seq.T, seq.N
    prev = _previous_hidden(y, h0, reverse, seq)
    gi = torch.matmul(x, w_ih.t())  # type: ignore[union-attr]
    gh = torch.matmul(prev, w_hh.t())  # type: ignore[union-attr]
    if b_ih is not None:
        gi = gi + b_ih
        gh = gh + b_hh
    H = gi.shape[-1] // 3
    gi_r, gi_z, gi_n = gi.view(T, N, 3, H).unbind(2)
    gh_r, gh_z, gh_n = gh.view(T, N, 3, H).unbind(2)
    r = (gi_r + gh_r).sigmoid()
    z = (gi_z + gh_z).sigmoid()
    n = (gi_n + r * gh_n).tanh()
    fac_n = (1 - z) * (1 - n * n)
    fac_z = (prev - n) * z * (1 - z)
    fac_r = gh_n * r * (1 - r)
    dgi = torch.zeros(T, N, 3 * H, dtype=gi.dtype, device=gi.device)
    dgh = torch.zeros_like(dgi)
    dgi3 = dgi.view(T, N, 3, H)
    dgh3 = dgh.view(T, N, 3, H)
    dh = dh.clone()
    for t in _steps(seq, reverse):
        b = seq.bs[t]
        dht = dh[:b] + dy[t, :b]
        dn = torch.mul(dht, fac_n[t, :b], out=dgi3[t, :b, 2])
        torch.mul(dht, fac_z[t, :b], out=dgi3[t, :b, 1])
        torch.mul(dn, fac_r[t, :b], out=dgi3[t, :b, 0])
        dgh3[t, :b, :2] = dgi3[t, :b, :2]
        torch.mul(dn, r[t, :b], out=dgh3[t, :b, 2])
        dh[:b] = dht * z[t, :b] + dgh[t, :b] @ w_hh
    terms: list[_Term | None] = [_Term(dgi, x), _Term(dgh, prev), None, None, None]
    if b_ih is not None:
        terms[2] = _Term(dgi)
        terms[3] = _Term(dgh)
    return dgi, dh, terms


def _rnn_direction(seq: _Seq, x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor,
                   h0: torch.Tensor, dh: torch.Tensor, w: list[torch.Tensor | None], reverse: bool,
                   relu: bool) -> tuple[torch.Tensor, torch.Tensor, list[_Term | None]]:
    """One Elman RNN layer direction: ``(d pre-activations, dh0, terms)``."""
    w_hh, b_ih = w[1], w[2]
    T, N = seq.T, seq.N
    prev = _previous_hidden(y, h0, reverse, seq)
    fac = (y > 0).to(y.dtype) if relu else 1 - y * y
    dpre = torch.zeros(T, N, y.shape[-1], dtype=y.dtype, device=y.device)
    dh = dh.clone()
    for t in _steps(seq, reverse):
        b = seq.bs[t]
        d = torch.mul(dh[:b] + dy[t, :b], fac[t, :b], out=dpre[t, :b])
        dh[:b] = d @ w_hh
    terms: list[_Term | None] = [_Term(dpre, x), _Term(dpre, prev), None, None, None]
    if b_ih is not None:
        terms[2] = terms[3] = _Term(dpre)
    return dpre, dh, terms


# ----------------------------------------------------------------------------- Function


class RecurrentFunction(base.RuleFunction):
    """torch's recurrent op whose backward also writes ``sum_grad_squared`` of its weights."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, config: _Config, input: torch.Tensor, h0: torch.Tensor,
        c0: torch.Tensor | None, *params: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        saved: list[torch.Tensor] = []
        if config.layered:
            outs, saved = _as_torch_runs_it(
                lambda *a: _forward_layered(config, *a), input, h0, c0, list(params))
        else:
            outs = _as_torch_runs_it(
                lambda x, h, c, p: _op(config, x, (h, c) if c is not None else h, p,
                                       config.num_layers, config.dropout, config.batch_first),
                input, h0, c0, list(params))
        outs = tuple(outs)
        ctx.config = config
        ctx.n_params = len(params)
        ctx.save_for_backward(input, h0, c0, outs[0], *params, *saved)
        ctx.tracked = [base.tracked(p) for p in params]
        for p in ctx.tracked:
            base.record_use(p, ctx)
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        config: _Config = ctx.config
        saved = base.saved(ctx)
        input, h0, c0, output = saved[:4]
        # plain tensors: a parameter subclass sees none of the backward's own ops
        params = [_plain(p) for p in saved[4:4 + ctx.n_params]]
        extra = saved[4 + ctx.n_params:]
        return _backward(ctx, config, input, h0, c0, output, params, extra, grads)


def _backward(ctx: Any, config: _Config, input: torch.Tensor, h0: torch.Tensor,
              c0: torch.Tensor | None, output: torch.Tensor, params: list[torch.Tensor],
              extra: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
              ) -> tuple[torch.Tensor | None, ...]:
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    seq = _Seq(config, input)
    L, dirs, mode = config.num_layers, config.dirs, config.mode
    needs = ctx.needs_input_grad
    tracked: list[torch.Tensor | None] = ctx.tracked

    # every layer's input and output, time-major padded
    xs: list[torch.Tensor] = [seq.to_tm(input, dtype)]
    ys: list[torch.Tensor] = []
    noises: list[torch.Tensor] = []
    if config.layered:
        for layer in range(L - 1):
            y, noise = extra[2 * layer], extra[2 * layer + 1]
            ys.append(seq.to_tm_inner(y, dtype))
            noises.append(seq.to_tm_inner(noise, dtype))
            xs.append(seq.to_tm_inner(y * noise, dtype))
    elif L > 1:
        x = input.transpose(0, 1) if (config.batch_first and not config.packed) else input
        for layer in range(L - 1):
            x = _as_torch_runs_it(
                lambda *a, layer=layer: _one_layer(config, *a, layer)[0], x, h0, c0,
                base.saved(ctx)[4:4 + len(params)])  # as in forward: requires_grad flags
            ys.append(seq.to_tm_inner(x, dtype))
            xs.append(ys[-1])
    ys.append(seq.to_tm(output, dtype))

    def zeros_like_state(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros(t.shape, dtype=dtype, device=t.device)

    g_out, g_h = grads[0], grads[1]
    g_c = grads[2] if mode == "lstm" else None
    dy_all = seq.to_tm(g_out, dtype) if g_out is not None else torch.zeros_like(ys[-1])
    dh_n = base.cast(g_h, dtype) if g_h is not None else zeros_like_state(h0)
    dc_n = None
    if mode == "lstm":
        assert c0 is not None
        dc_n = base.cast(g_c, dtype) if g_c is not None else zeros_like_state(c0)
    h0c = base.cast(h0, dtype)
    c0c = base.cast(c0, dtype) if c0 is not None else None
    dh0 = torch.zeros(h0.shape, dtype=dtype, device=h0.device)
    dc0 = torch.zeros(c0.shape, dtype=dtype, device=c0.device) if c0 is not None else None

    # a tensor given more than once in params gets one statistic of the summed uses
    counts: dict[int, int] = {}
    for p in tracked:
        if p is not None:
            counts[id(p)] = counts.get(id(p), 0) + 1
    deferred: dict[int, list[tuple[int, _Term]]] = {}
    param_grads: list[torch.Tensor | None] = [None] * len(params)
    per = config.per_direction
    offset = 4  # config, input, h0, c0

    for layer in range(L - 1, -1, -1):
        x, y = xs[layer], ys[layer]
        dx = torch.zeros_like(x)
        H_out = y.shape[-1] // dirs
        for d in range(dirs):
            k = layer * dirs + d
            first = k * per
            slots = params[first:first + per]
            w: list[torch.Tensor | None] = [base.cast(slots[0], dtype), base.cast(slots[1], dtype),
                                            None, None, None]
            if config.has_biases:
                w[2], w[3] = base.cast(slots[2], dtype), base.cast(slots[3], dtype)
            if config.has_proj:
                w[4] = base.cast(slots[-1], dtype)
            cols = slice(d * H_out, (d + 1) * H_out)
            yd, dyd = y[..., cols], dy_all[..., cols]
            reverse = d == 1
            if mode == "lstm":
                assert c0c is not None and dc_n is not None and dc0 is not None
                dgin, dh0k, dc0k, terms = _lstm_direction(
                    seq, x, yd, dyd, h0c[k], c0c[k], dh_n[k], dc_n[k], w, reverse)
                dc0[k] = dc0k
            elif mode == "gru":
                dgin, dh0k, terms = _gru_direction(seq, x, yd, dyd, h0c[k], dh_n[k], w, reverse)
            else:
                dgin, dh0k, terms = _rnn_direction(seq, x, yd, dyd, h0c[k], dh_n[k], w, reverse,
                                                   mode == "rnn_relu")
            dh0[k] = dh0k
            dx += torch.matmul(dgin, w[0])  # type: ignore[arg-type]
            # slot order in params: w_ih, w_hh, [b_ih, b_hh], [w_hr]
            slot_terms = terms[:2] + (terms[2:4] if config.has_biases else []) + (
                terms[4:5] if config.has_proj else [])
            for j, term in enumerate(slot_terms):
                index = first + j
                assert term is not None
                param = tracked[index]
                if param is not None and counts[id(param)] > 1:
                    deferred.setdefault(id(param), []).append((index, term))
                    continue
                param_grads[index] = _hand_over(ctx, param, params[index], [term], seq.N,
                                                needs[offset + index])
        if layer > 0:
            dy_all = dx * noises[layer - 1] if config.layered else dx
        else:
            dy_all = dx

    for uses in deferred.values():
        index = uses[0][0]
        param_grads[index] = _hand_over(ctx, tracked[index], params[index], [t for _, t in uses],
                                        seq.N, True)

    grad_input = seq.from_tm(dy_all).to(input.dtype) if needs[1] else None
    grad_h0 = dh0.to(h0.dtype) if needs[2] else None
    grad_c0 = dc0.to(c0.dtype) if (c0 is not None and dc0 is not None and needs[3]) else None
    return (None, grad_input, grad_h0, grad_c0, *param_grads)


def _hand_over(ctx: Any, param: torch.Tensor | None, value: torch.Tensor, terms: list[_Term],
               n: int, needs_grad: bool) -> torch.Tensor | None:
    """Hand the statistic of ``param`` (sum of ``terms`` per sample) to ``base.contribute``;
    return its gradient (``None`` when not needed)."""
    grad = None
    if param is not None:
        sdt = base.stat_dtype(param)
        shape = terms[0].shape()

        def per_sample(s: int, e: int) -> torch.Tensor:
            if len(shape) == 1:  # a bias: a fresh sum over the steps
                out = terms[0].per_sample(s, e)
            else:
                out = terms[0].per_sample(s, e, base.scratch((e - s, *shape), sdt, value.device))
            for term in terms[1:]:
                out.add_(term.per_sample(s, e))
            return out

        grad = base.contribute(param, n, per_sample, ctx=ctx, per_sample_owned=True, with_grad=True)
    if grad is None and needs_grad:
        grad = terms[0].total()
        for term in terms[1:]:
            grad = grad + term.total()
    if grad is None:
        return None
    return grad.to(value.dtype).view(value.shape)


# ----------------------------------------------------------------------------- public ops


def _is_packed(args: tuple, kwargs: dict) -> bool:
    if "data" in kwargs or "batch_sizes" in kwargs:
        return True
    if len(args) >= 2:
        second = args[1]
        return (isinstance(second, torch.Tensor) and second.dim() == 1
                and second.dtype == torch.int64)
    return False


def _bind(mode: str, args: tuple, kwargs: dict) -> tuple[bool, dict[str, Any]]:
    packed = _is_packed(args, kwargs)
    names = _PACKED_NAMES if packed else _PADDED_NAMES
    if len(args) > len(names):
        raise TypeError(
            f"{mode}() takes {len(names)} positional arguments but {len(args)} were given")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names or key in bound:
            raise TypeError(f"{mode}() got an unexpected or repeated argument {key!r}")
        bound[key] = value
    missing = [name for name in names if name not in bound]
    if missing:
        raise TypeError(f"{mode}() missing arguments: {', '.join(missing)}")
    return packed, bound


def _call(mode: str, args: tuple, kwargs: dict, samples: Layout | None) -> tuple[torch.Tensor, ...]:
    packed, bound = _bind(mode, args, kwargs)
    params = list(bound["params"])
    if not base.should_track(*params):
        return getattr(_VF, mode)(*args, **kwargs)
    hx = bound["hx"]
    if mode == "lstm":
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    input = bound["data"] if packed else bound["input"]
    batch_first = False if packed else bool(bound["batch_first"])
    if packed:
        if input.dim() != 2:
            raise ValueError(f"truegrad: {mode} on packed data needs (sum_T, features) data, "
                             f"got shape {tuple(input.shape)}")
        samples = None  # the batch is given by batch_sizes
    else:
        if input.dim() == 2:
            raise ValueError(f"truegrad: {mode} on an unbatched 2-D input (no batch dim) has no "
                             "samples to take the statistic over; add a batch dim of size 1")
        if input.dim() != 3:
            raise ValueError(f"truegrad: {mode} needs a 3-D input, got shape {tuple(input.shape)}")
        if samples is not None and not (samples.plain and samples.dim == (0 if batch_first else 1)):
            raise ValueError(
                f"truegrad: {mode} takes the samples on its batch dim "
                f"(dim {0 if batch_first else 1}, batch_first={batch_first}); they are on "
                f"{samples.describe()} of its input")
    num_layers = int(bound["num_layers"])
    dirs = 2 if bound["bidirectional"] else 1
    has_biases = bool(bound["has_biases"])
    base_count = 2 + (2 if has_biases else 0)
    has_proj = mode == "lstm" and len(params) == num_layers * dirs * (base_count + 1)
    if len(params) != num_layers * dirs * (base_count + (1 if has_proj else 0)):
        raise ValueError(f"truegrad: {mode} got {len(params)} weights for {num_layers} layer(s), "
                         f"{dirs} direction(s) and has_biases={has_biases}")
    config = _Config(
        mode=mode,
        packed=packed,
        batch_sizes=bound["batch_sizes"] if packed else None,
        has_biases=has_biases,
        num_layers=num_layers,
        dropout=float(bound["dropout"]),
        train=bool(bound["train"]),
        bidirectional=bool(bound["bidirectional"]),
        batch_first=batch_first,
        has_proj=has_proj,
        samples=samples,
    )
    if config.layered and input.device.type != "cpu":
        raise NotImplementedError(
            f"truegrad: {mode} with inter-layer dropout (dropout={config.dropout}, "
            f"num_layers={num_layers}) in training on {input.device.type}: torch runs it in "
            "cuDNN or another fused kernel whose dropout masks cannot be reproduced, so the "
            "exact statistic is only supported on CPU (or with dropout=0 / in eval mode)")
    outs = base.apply(RecurrentFunction, config, input, h0, c0, *params)
    return tuple(outs)


def lstm(*args: Any, samples: Layout | None = None, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """``torch.lstm`` (both overloads) that also writes ``sum_grad_squared``.

    Padded: ``lstm(input, (h0, c0), params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)``; packed: ``lstm(data, batch_sizes, (h0, c0), params,
    has_biases, num_layers, dropout, train, bidirectional)``. ``params`` per layer and
    direction: ``w_ih, w_hh, [b_ih, b_hh], [w_hr]`` (``w_hr`` with ``proj_size > 0``).

    Args:
        samples: where the model's samples are in ``input`` (padded only: its batch dim,
            plain; ``None``: the batch dim). Ignored for packed data.

    Returns:
        ``(output, h_n, c_n)``, bitwise torch's.
    """
    return _call("lstm", args, kwargs, samples)


def gru(*args: Any, samples: Layout | None = None, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """``torch.gru`` (both overloads, ``hx`` a tensor) that also writes ``sum_grad_squared``.
    Returns ``(output, h_n)``, bitwise torch's. See :func:`lstm`."""
    return _call("gru", args, kwargs, samples)


def rnn_tanh(*args: Any, samples: Layout | None = None, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """``torch.rnn_tanh`` (both overloads) that also writes ``sum_grad_squared``.
    Returns ``(output, h_n)``, bitwise torch's. See :func:`lstm`."""
    return _call("rnn_tanh", args, kwargs, samples)


def rnn_relu(*args: Any, samples: Layout | None = None, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """``torch.rnn_relu`` (both overloads) that also writes ``sum_grad_squared``.
    Returns ``(output, h_n)``, bitwise torch's. See :func:`lstm`."""
    return _call("rnn_relu", args, kwargs, samples)
