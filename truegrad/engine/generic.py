"""The generic per-sample rule: any op that keeps the samples apart, by ``torch.func``.

For an op ``y = f(x, q)`` where ``q`` is a tracked parameter (or a tensor computed from
parameters only) and ``x`` carries the model's samples, and for which no dedicated rule
exists (``torch.cat`` of a class token onto the batch, ``torch.where``, a gather, a
convolution with a weight-normed kernel ...), sample n's gradient of ``q`` is the op's
vector-Jacobian product at sample n alone:

    g_n(q) = (d f(x_n, q) / d q)^T dy_n

with ``x_n`` sample n's slice of every operand that carries the samples and ``dy_n`` its
slice of the output gradient. It is computed with ``torch.func.vjp`` vectorised over the
samples (``vmap``), in chunks of samples. This is exact exactly when the op keeps samples
apart (``y``'s slice n depends on ``x_n`` only), which is what
:mod:`truegrad.engine.samples` knows of the ops in its table; random ops (dropout, whose
mask a replay would not see) and batch norm in training (which mixes samples) are never
replayed.

An operand ``q`` that itself has one slice per sample (``q.expand(N, ...)`` of a class
token, or a tensor of the batch's shape computed from parameters) is narrowed to one slice
when it is expanded, and otherwise sliced per sample with the others.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from truegrad.engine import samples
from truegrad.nn.rules.elementwise import Plan, _on_diagonal

_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching rule"


def vmap_quietly(function: Callable[..., Any], *args: Any, in_dims: Any = 0) -> Any:
    """``torch.func.vmap(function, in_dims)(*args)`` without torch's "no batching rule,
    performance drop" warning: ops like ``_weight_norm_interface_backward`` fall back to a loop
    inside ``vmap``, which is correct; a user training a weight-normed model should not see a
    torch-internal warning every step because truegrad computes its statistic."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
        return torch.func.vmap(function, in_dims=in_dims)(*args)

__all__ = ["RANDOM", "plan"]


def _random_ops() -> set[Any]:
    F = torch.nn.functional
    T = torch.Tensor
    names = ["dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
             "feature_alpha_dropout", "rrelu", "gumbel_softmax"]
    found: set[Any] = set()
    for name in names:
        for owner in (F, torch, T):
            function = getattr(owner, name, None)
            if function is not None:
                found.add(function)
    for name in ["bernoulli", "bernoulli_", "normal_", "uniform_", "multinomial", "rand_like",
                 "randn_like", "randint_like", "dropout_", "exponential_", "random_"]:
        for owner in (torch, T):
            function = getattr(owner, name, None)
            if function is not None:
                found.add(function)
    return found


#: ops whose result depends on the random generator (never replayed)
RANDOM = _random_ops()


def _refusal(func: Any, args: tuple, kwargs: dict) -> str | None:
    if func in RANDOM:
        return "a random op, whose draw a per-sample replay would not see"
    name = getattr(func, "__name__", "")
    if name == "batch_norm":
        training = args[5] if len(args) > 5 else kwargs.get("training", False)
        if training:
            return "batch norm in training mode mixes the samples"
    if samples.rule_for(func) is None:
        return "no rule says how this op treats the samples"
    return None


def plan(
    func: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    result: Any,
    ours: list[torch.Tensor],
    unbroadcast: Callable[[torch.Tensor, int], torch.Tensor],
    dtype_of: Callable[[torch.Tensor], torch.dtype],
) -> list[tuple[torch.Tensor, Plan]] | str:
    """The per-sample plans of the tracked operands ``ours`` of ``result = func(*args,
    **kwargs)``, or the reason why there are none.

    Args:
        unbroadcast: ``unbroadcast(q, dim)``: ``q``, or its first slice along ``dim`` when it
            is expanded there (a replayable tensor computed from ``q``).
        dtype_of: the dtype of the statistic of ``q``'s parameters.
    """
    why = _refusal(func, args, kwargs)
    if why is not None:
        return why
    if not isinstance(result, torch.Tensor) or not result.is_floating_point():
        return "the op does not return one floating-point tensor"
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tagged: list[tuple[torch.Tensor, samples.Layout]] = []
    for leaf in leaves:
        tag = samples.layout_of(leaf) if isinstance(leaf, torch.Tensor) else None
        if isinstance(tag, samples.Layout):
            if not tag.plain:
                return "the samples are flattened into another dim of an operand"
            tagged.append((leaf, tag))
    if not tagged:
        return "no operand carries the samples"
    rule = samples.rule_for(func)
    try:
        out_tags = rule(func, args, kwargs, result, tagged)
    except Exception:
        return "truegrad cannot follow the samples through this call"
    if len(out_tags) != 1 or not isinstance(out_tags[0], samples.Layout) or not out_tags[0].plain:
        return "the samples do not come out as one dim of the result"
    out_layout = out_tags[0]
    n = out_layout.n

    # Operands of ours that have one slice per sample: narrow an expanded one, slice the rest.
    slots = {id(q): i for i, q in enumerate(ours)}
    replay_ours: list[torch.Tensor] = []
    spanning: dict[int, int] = {}  # index in ours -> its samples' dim
    for i, q in enumerate(ours):
        dim = _spanning_dim(func, args, kwargs, result, tagged, q, out_layout)
        if dim is None:
            replay_ours.append(q)
            continue
        narrowed = unbroadcast(q, dim)
        if narrowed is not q:
            replay_ours.append(narrowed)
        else:
            replay_ours.append(q)
            spanning[i] = dim
    by_id = {id(t): lay for t, lay in tagged}
    batched = [(k, leaf, by_id[id(leaf)].dim) for k, leaf in enumerate(leaves)
               if isinstance(leaf, torch.Tensor) and id(leaf) in by_id]
    positions = {id(q): [k for k, leaf in enumerate(leaves) if leaf is q] for q in ours}
    compute = torch.float64 if any(dtype_of(q) == torch.float64 for q in ours) else torch.float32
    values = [q.detach().to(compute) for q in replay_ours]
    frozen = [
        leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves
    ]
    cache: dict[tuple[int, int, int], list[torch.Tensor]] = {}

    def all_grads(dy: torch.Tensor, start: int, stop: int) -> list[torch.Tensor]:
        key = (id(dy), start, stop)
        if key in cache:
            return cache[key]
        cache.clear()
        count = stop - start
        xs = [frozen[k].narrow(dim, start, count) for k, _, dim in batched]
        xs = [x.to(compute) if x.is_floating_point() else x for x in xs]
        sliced = [values[i].narrow(dim, start, count) for i, dim in spanning.items()]
        d = dy.narrow(out_layout.dim, start, count).to(compute)

        def one(*per: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x_parts = per[: len(batched)]
            q_parts = dict(zip(spanning, per[len(batched): len(batched) + len(spanning)]))
            dy_n = per[-1]
            base = list(frozen)
            for (k, _, dim), part in zip(batched, x_parts):
                base[k] = part.unsqueeze(dim)
            primals = [
                q_parts[i].unsqueeze(spanning[i]) if i in q_parts else values[i]
                for i in range(len(ours))
            ]

            def replay(*qs: torch.Tensor) -> torch.Tensor:
                call = list(base)
                for i, q in enumerate(ours):
                    for k in positions[id(q)]:
                        call[k] = qs[i]
                a, kw = pytree.tree_unflatten(call, spec)
                return func(*a, **kw).to(compute)

            _, vjp = torch.func.vjp(replay, *primals)
            grads = vjp(dy_n.unsqueeze(out_layout.dim))
            return tuple(
                g.squeeze(spanning[i]) if i in spanning else g for i, g in enumerate(grads)
            )

        in_dims = tuple([dim for _, _, dim in batched] + list(spanning.values()) + [out_layout.dim])
        grads = vmap_quietly(one, *xs, *sliced, d, in_dims=in_dims)
        result_grads = []
        for i, g in enumerate(grads):
            if i in spanning:  # sample j's gradient lives in slice start + j
                g = _on_diagonal(g.movedim(0, spanning[i]), spanning[i], start, stop, tuple(values[i].shape))
            result_grads.append(g)
        cache[key] = result_grads
        return result_grads

    plans = []
    for i, q in enumerate(replay_ours):
        dtype = dtype_of(ours[i])

        def per_sample(dy: torch.Tensor, start: int, stop: int, i: int = i, dtype: torch.dtype = dtype) -> torch.Tensor:
            return all_grads(dy, start, stop)[i].to(dtype)

        plans.append((q, Plan(n, per_sample, sample_numel=sum(v.numel() for v in values))))
    del slots
    return plans


def _spanning_dim(
    func: Any,
    args: tuple,
    kwargs: dict,
    result: torch.Tensor,
    tagged: list[tuple[torch.Tensor, samples.Layout]],
    q: torch.Tensor,
    out_layout: samples.Layout,
) -> int | None:
    """The dim along which ``q`` has one slice per sample in this op, if any: the dim at
    which ``q``, seen as carrying the samples, would give the same samples in the result."""
    rule = samples.rule_for(func)
    found = []
    for dim in range(q.dim()):
        if q.shape[dim] != out_layout.n or out_layout.n == 1:
            continue
        try:
            tags = rule(func, args, kwargs, result, tagged + [(q, samples.Layout(dim, out_layout.n))])
        except Exception:
            continue
        if tags and tags[0] == out_layout:
            found.append(dim)
    return found[0] if len(found) == 1 else None
