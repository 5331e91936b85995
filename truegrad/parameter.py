"""``TrueGradParameter``: a parameter that sees the ops that touch it (``patch_model``).

:func:`truegrad.utils.patch_model` swaps ``param.__class__`` of every trainable parameter
to :class:`TrueGradParameter` in place (same object: optimizer and DDP references stay
valid). Its ``__torch_function__`` sees every torch function called on it, and

* runs every op exactly as torch runs it: the forward result and ``p.grad`` never change
  (where truegrad's functionals take over, their outputs and gradients are torch's
  bitwise, see :mod:`truegrad.nn.functional`);
* **functionals** with a truegrad rule (everything in ``truegrad.nn.functional.__all__``:
  linear, conv*, embedding, the normalisations, prelu, bilinear, multi-head attention)
  go to that rule;
* **elementwise** ``x (op) p`` (add/sub/mul/div with broadcasting, see
  :mod:`truegrad.nn.rules.elementwise`) and **products** (matmul/mm/bmm/mv/addmm/einsum,
  and ``F.linear`` on a view of the parameter, see :mod:`truegrad.nn.rules.matmul`) run as
  torch's op; a hook on the result gets ``dy`` and forms the per-sample gradients (only
  for the parameters whose gradient this backward accumulates: ``autograd.grad`` with
  respect to inputs leaves the statistic alone). The parameter may not span the sample
  dim, unless it is merely expanded along it (``p.expand(N, ...)``, stride 0);
* **computations on parameters alone** (the view family ``view/reshape/transpose/t/
  permute/expand/chunk/split/unbind/narrow/select/[...]/squeeze/unsqueeze/flatten/.T/
  .mT``, casts ``.to(dtype)``, ``cat``/``stack``, and other pure ops whose only inputs are
  parameters and constants) return a :class:`DerivedTensor` that remembers how it was made
  from its parameters. When it meets the batch in a supported op, its per-sample
  gradients are mapped back to each parameter with the vector-Jacobian product of that
  computation (``torch.func.vjp``, vectorised over samples with ``vmap``): exact by the
  chain rule, because the computation does not depend on the sample;
* **anything else** that carries gradient to a parameter while grad is enabled (e.g.
  ``torch.cumsum(p, 0)`` in the forward) runs as torch's op and *poisons* the parameter:
  none of its uses in that forward give a statistic (the backward restores the statistic
  the parameter had before), and the reason naming the op and the parameter is recorded
  (``PatchModelBackend().coverage(model)``, :func:`truegrad.backends.patch_model.uncovered`).
  Never a partial, silently wrong statistic.

Which dim indexes samples. A sample is one index of dim 0 of the op's input (docs/statistic.md),
checked against the batch size of the model call: the outermost forward of a prepared
model (or of one of its containers) records N, dim 0 of its first tensor argument. An op
whose sample dim has another size is not split (its parameters are poisoned), except a
2-D operand of a product that is exactly a flattening of a ``(N, ...)`` tensor
(:func:`truegrad.nn.rules.matmul.flattened_samples`: GPT-2's ``Conv1D``).
A tensor that does not require grad is batch data when it is (a view of) a model input;
a constant when it is (a view of) a buffer of the model, 1-D (``torch.arange`` positions),
or has 2+ dims with size 1 in dim 0 (``position_ids (1, T)``) while N > 1; batch data
otherwise (dim 0 of size N, or batch data in another layout that the ops then refuse).
So ``F.embedding(positions, wpe)`` is a computation on the parameter alone and
``x + wpe(positions)`` a broadcast elementwise use. Outside any forward of a prepared
model, dim 0 of the op's input is taken as the sample dim. Batch-first models are
assumed: in a seq-first model dim 0 is the sequence, which the batch-size check refuses
unless the lengths coincide.

Several uses of one parameter in one forward (tied weights, q/k/v chunks of one matrix,
a view and the parameter itself) are each recorded with ``base.record_use``; their
per-sample gradients are summed before squaring by ``base.contribute``. A second backward
through a retained graph (``retain_graph=True``) cannot be split again (the operands were
released after the first, as torch releases its saved tensors): the parameters of such
uses end that backward without a statistic, with the reason recorded.

Ops that carry no gradient (shape/dtype queries, ``detach``, comparisons, anything under
``no_grad`` such as optimizer updates and ``torch._foreach_*``) pass straight through.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from truegrad import _bypass, _compat, _names, _originals, statistic
from truegrad._weakid import WeakIdMap
from truegrad.engine import door, forward, generic, samples
from truegrad.nn.rules import base
from truegrad.nn.rules import elementwise as _elementwise_rule
from truegrad.nn.rules import linear as _linear_rule
from truegrad.nn.rules import matmul as _matmul_rule
from truegrad.nn.rules import recurrent as _recurrent_rule

__all__ = [
    "DerivedTensor",
    "TrueGradParameter",
    "batch_size",
    "forget",
    "reason",
    "track",
    "untrack",
]

_plain = torch._C._disabled_torch_function_impl
_DETACH = torch.Tensor.detach
_NoSubclass = torch._C.DisableTorchFunctionSubclass


# ----------------------------------------------------------------------------- model calls


def _epoch() -> int:
    return samples.current_epoch()


def batch_size() -> int | None:
    """N of the model call in progress, or ``None`` outside one."""
    return forward.batch_size()


# ----------------------------------------------------------------------------- poison


class _Record:
    """One poisoning op of one forward; alive as long as that forward's graph."""

    __slots__ = ("__weakref__",)


@dataclasses.dataclass
class _Poison:
    records: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)
    epoch: int = 0
    snapshot: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    clear_once: bool = False
    hook: Any = None


_POISON: WeakIdKeyDictionary = WeakIdKeyDictionary()
_REASONS: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: parameter -> the model call (epoch) its reason concerns, for reasons about one forward only
_TRANSIENT: WeakIdKeyDictionary = WeakIdKeyDictionary()


def reason(param: torch.Tensor) -> str | None:
    """The recorded reason why ``param`` gets no statistic, or ``None``."""
    epoch = _TRANSIENT.get(param)
    if epoch is not None and epoch != _epoch():
        _TRANSIENT.pop(param, None)
        _REASONS.pop(param, None)
    return _REASONS.get(param)


def forget(params: list[torch.Tensor]) -> None:
    """Drop recorded reasons, poison and hooks of ``params`` (``undo`` of a backend)."""
    for param in params:
        _REASONS.pop(param, None)
        _TRANSIENT.pop(param, None)
        state = _POISON.pop(param, None)
        if state is not None and state.hook is not None:
            state.hook.remove()


def _snapshot(param: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    current = statistic.get(param)
    return (None, None) if current is None else (current, current.clone())


def _discard_pending(param: torch.Tensor) -> None:
    # Per-sample gradients that base.contribute keeps for a parameter used several times.
    base.discard_pending(param)


def _after_grad(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook of a poisoned parameter: take back this backward's
    contributions (restore the statistic from before them)."""
    state = _POISON.get(param)
    if state is None:
        return
    if state.clear_once:
        state.clear_once = False
        _discard_pending(param)
        statistic.clear([param])
        state.snapshot = (None, None)
        return
    if not state.records:
        return
    _discard_pending(param)
    before, value = state.snapshot
    current = statistic.get(param)
    if before is not None and current is before:
        current.copy_(value)
    else:  # nothing before, or the user cleared it since: nothing to keep
        statistic.clear([param])
    state.snapshot = _snapshot(param)  # for another backward through the same graph


def _state(param: torch.Tensor) -> _Poison:
    state = _POISON.get(param)
    if state is None:
        state = _POISON[param] = _Poison()
    if state.hook is None:
        state.hook = param.register_post_accumulate_grad_hook(_after_grad)
    return state


def _touch(param: torch.Tensor) -> None:
    """A supported use in a new model call forgets poison left by an earlier call."""
    if _POISON:
        state = _POISON.get(param)
        if state is not None and state.records and state.epoch != _epoch():
            state.records.clear()


def _poison(ours: list[torch.Tensor], op: str, detail: str, outputs: list[torch.Tensor]) -> None:
    record = _Record()
    for out in outputs:
        if out.grad_fn is not None:
            out.grad_fn.metadata.setdefault("truegrad_poison", []).append(record)
    epoch = _epoch()
    for param in _sources_of(ours):
        _REASONS[param] = (
            f"{op} on {_names.describe(param)}: {detail}; it gets no sum_grad_squared"
        )
        _TRANSIENT.pop(param, None)
        state = _state(param)
        if state.records and state.epoch != epoch:
            state.records.clear()
        if not state.records:
            state.snapshot = _snapshot(param)
        state.records.add(record)
        state.epoch = epoch


def abandon_statistic(param: torch.Tensor, detail: str) -> None:
    """The running backward cannot give ``param`` its exact statistic (``detail`` says why):
    the parameter ends it with none, the reason recorded for ``coverage()``/diagnose. Called
    by the rules' :func:`~truegrad.nn.rules.base.contribute`."""
    _clear_after_this_backward(param, detail)


def _clear_after_this_backward(param: torch.Tensor, detail: str, transient: bool = False) -> None:
    """No statistic for ``param`` from the coming backward, for ``detail``; a ``transient``
    reason is forgotten once a later model call begins (it concerned this forward only)."""
    _REASONS[param] = (
        f"{_names.describe(param)}: {detail}; it gets no sum_grad_squared"
    )
    if transient:
        _TRANSIENT[param] = _epoch()
    else:
        _TRANSIENT.pop(param, None)
    _state(param).clear_once = True


# ----------------------------------------------------------------------------- classification


def _is_ours(t: Any) -> bool:
    return isinstance(t, (TrueGradParameter, DerivedTensor)) and t.requires_grad


def _kind(t: Any) -> str:
    """``"ours"`` (a trainable TrueGradParameter or a DerivedTensor), ``"sample"`` (carries
    the model's samples, see :func:`_layout`), ``"lost"`` (carries them through an op that
    was not followed) or ``"const"`` (no batch)."""
    if not isinstance(t, torch.Tensor):
        return "const"
    if isinstance(t, (TrueGradParameter, DerivedTensor)):
        return "ours" if t.requires_grad else "const"
    tagged = samples.layout_of(t)
    if isinstance(tagged, samples.Layout):
        return "sample"
    if isinstance(tagged, (samples.Lost, samples.Packed)):
        return "lost"  # packed data: only the recurrent handler takes it (it reads the tag)
    in_call = forward.in_call()
    if t.requires_grad and not t.is_leaf and (in_call or t.dim() == 0):
        return "lost"  # it carries gradient from a computation whose samples were not followed
    if in_call or t.dim() == 0:
        return "const"
    return "sample"  # outside any model call: dim 0 of the op's input (the op is the model)


def _met_untracked(param: torch.nn.Parameter) -> bool:
    """A trainable plain parameter used by an op together with tracked ones in a model call:
    one created after the rest (a parametrization registered later: weight_norm's ``original0``).
    In a model of ``truegrad.nn`` modules it is tracked from now on, without a statistic for
    this backward (its earlier uses in this forward were not seen); in a prepared model it
    stays untracked, with the reason. Returns whether it is tracked now."""
    if forward.adopts_parameters():
        track([param])
        _clear_after_this_backward(
            param, "it was first seen in the middle of a forward (created after the model's "
            "other parameters: a parametrization registered later?), so its earlier uses in "
            "this forward were not counted; it is exact from the next forward on",
            transient=True,
        )
        return True
    _REASONS[param] = (
        f"{_names.describe(param)}: a trainable parameter the backend did not track (created "
        "after the model was prepared: a parametrization registered later?); prepare the "
        "model again to cover it; it gets no sum_grad_squared"
    )
    _TRANSIENT.pop(param, None)
    return False


def _layout(t: torch.Tensor) -> samples.Layout:
    """Where the samples are in a tensor of kind ``"sample"``."""
    tagged = samples.layout_of(t)
    if isinstance(tagged, samples.Layout):
        return tagged
    return samples.Layout(0, t.shape[0])


def _lost_reason(values: Any) -> str | None:
    """Why the first tensor of kind ``"lost"`` among ``values`` cannot be split per sample."""
    for t in values:
        if _kind(t) != "lost":
            continue
        tagged = samples.layout_of(t)
        if isinstance(tagged, samples.Lost):
            return tagged.describe()
        if isinstance(tagged, samples.Packed):
            return "it meets a PackedSequence's data, which only the recurrent layers take"
        if t.dim() == 0:
            return "it meets a 0-d tensor computed from the samples (a loss): no sample dimension"
        return (
            "it meets a tensor computed outside the model's forward (or by an op truegrad did "
            "not see), whose samples truegrad cannot follow"
        )
    return None


def _leaves(args: tuple, kwargs: dict) -> Iterator[Any]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


def _ours_in(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [t for t in _leaves(args, kwargs) if _is_ours(t)]


def _sources(q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return q._tg_sources if isinstance(q, DerivedTensor) else (q,)


def sources_of(q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The parameters a tracked tensor stands for: itself, or those a derived tensor (a
    parametrization's weight, a computation on parameters alone) was computed from."""
    return _sources(q)


def _sources_of(ours: list[torch.Tensor]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for q in ours:
        for s in _sources(q):
            if not any(s is f for f in found):
                found.append(s)
    return found


def _stat_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(s.dtype == torch.float64 for s in _sources(q)) else torch.float32


def _broadcast_layout(x: torch.Tensor, layout: samples.Layout, out: torch.Tensor) -> samples.Layout | None:
    """Where ``x``'s samples are in ``out``, a broadcast of ``x`` (right-aligned)."""
    pos = layout.dim + out.dim() - x.dim()
    if not 0 <= pos < out.dim() or out.shape[pos] != x.shape[layout.dim]:
        return None
    return layout.at(pos)


def _op_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__self__", None)
    if name in ("__get__", "__set__") and owner is not None:
        return f"Tensor.{getattr(owner, '__name__', '?')}"
    qualname = getattr(func, "__qualname__", name)
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return "Tensor." + qualname.split(".", 1)[1]
    module = getattr(func, "__module__", None) or "torch"
    if module.startswith("torch._C") or module == "torch" or module == "torch.functional":
        module = {"torch._C._nn": "torch.nn.functional"}.get(module, "torch")
    return f"{module}.{name}"


# ----------------------------------------------------------------------------- derived tensors


def _replayer(q: torch.Tensor, sources: list[torch.Tensor]) -> Callable[[tuple], torch.Tensor]:
    if isinstance(q, TrueGradParameter):
        index = next(i for i, s in enumerate(sources) if s is q)
        return lambda src: src[index]
    fn = q._tg_fn
    indices = [next(i for i, s in enumerate(sources) if s is t) for t in q._tg_sources]
    return lambda src: fn(*[src[i] for i in indices])


def _derive(
    func: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    result: Any,
    ours: list[torch.Tensor],
    *,
    cast: bool = False,
) -> Any:
    """Wrap the grad-carrying tensors of ``result`` (computed from parameters and constants
    only) as :class:`DerivedTensor` that can replay the computation from the parameters."""
    sources = _sources_of(ours)
    if cast:  # a dtype/device cast: the identity for gradients
        fn = _replayer(args[0], sources)

        def replay(*src: torch.Tensor) -> Any:
            return fn(src)
    else:
        flat, spec = pytree.tree_flatten((args, kwargs))
        slots = [(i, _replayer(leaf, sources)) for i, leaf in enumerate(flat) if _is_ours(leaf)]
        template = [None if _is_ours(leaf) else leaf for leaf in flat]

        def replay(*src: torch.Tensor) -> Any:
            leaves = list(template)
            for i, fn in slots:
                leaves[i] = fn(src)
            a, k = pytree.tree_unflatten(leaves, spec)
            return func(*a, **k)

    out_leaves, out_spec = pytree.tree_flatten(result)
    single = len(out_leaves) == 1 and isinstance(result, torch.Tensor)
    wrapped = []
    for j, leaf in enumerate(out_leaves):
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad and not _is_ours(leaf):
            derived = leaf.as_subclass(DerivedTensor)
            derived._tg_sources = tuple(sources)
            derived._tg_fn = replay if single else functools.partial(_select, replay, j)
            wrapped.append(derived)
        else:
            wrapped.append(leaf)
    return pytree.tree_unflatten(wrapped, out_spec)


def _select(replay: Callable[..., Any], j: int, *src: torch.Tensor) -> torch.Tensor:
    return pytree.tree_leaves(replay(*src))[j]


class _Mapper:
    """Maps per-sample gradients of a :class:`DerivedTensor` to its parameters (vmapped vjp)."""

    def __init__(self, q: DerivedTensor, dtype: torch.dtype) -> None:
        primals = [s.detach().to(dtype) for s in q._tg_sources]
        out, self.vjp = torch.func.vjp(q._tg_fn, *primals)
        self.out_dtype = out.dtype
        self.sources = q._tg_sources
        self.dtype = dtype

    def __call__(self, g: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        index = next(i for i, s in enumerate(self.sources) if s is param)
        grads = generic.vmap_quietly(self.vjp, g.to(self.out_dtype))
        return grads[index].to(self.dtype)


# ----------------------------------------------------------------------------- observed uses


class _Use:
    """One supported use (one op call) of one or more parameters; the autograd context
    handed to ``base.record_use``/``base.contribute``. Alive as long as the graph."""

    __slots__ = ("__weakref__", "terms", "n", "nodes")

    def __init__(self, terms: list[tuple[torch.Tensor, _elementwise_rule.Plan]], n: int) -> None:
        self.terms: list[tuple[torch.Tensor, _elementwise_rule.Plan]] | None = terms
        self.n = n
        self.nodes: dict[int, Any] = {}  # id(param) -> its AccumulateGrad node


def _observe(out: torch.Tensor, terms: list[tuple[torch.Tensor, _elementwise_rule.Plan]]) -> None:
    """Record the use and hook ``out``: its gradient ``dy`` gives every term's per-sample
    gradients, mapped to the parameters and handed to ``base.contribute``."""
    use = _Use(terms, terms[0][1].n_samples)
    params = _sources_of([q for q, _ in terms])
    for param in params:
        _touch(param)
        base.record_use(param, use)
        use.nodes[id(param)] = torch.autograd.graph.get_gradient_edge(param).node
    holder = [use]

    def hook(dy: torch.Tensor) -> None:
        with torch.no_grad(), _NoSubclass():
            _contribute(holder[0], params, dy)

    out.register_hook(hook)


def _contribute(use: _Use, params: list[torch.Tensor], dy: torch.Tensor) -> None:
    active = [p for p in params if torch._C._will_engine_execute_node(use.nodes[id(p)])]
    if not active:
        return
    if use.terms is None:  # a second backward through a graph whose inputs were released
        for param in active:
            _clear_after_this_backward(
                param, "a second backward through the same graph (retain_graph=True) cannot be "
                "split per sample"
            )
        return
    terms, use.terms = use.terms, None  # release the saved operands, as torch does
    mappers: dict[int, _Mapper] = {}
    for param in active:
        items = [(q, plan) for q, plan in terms if any(s is param for s in _sources(q))]
        dtype = base.stat_dtype(param)
        for q, _ in items:
            if isinstance(q, DerivedTensor) and id(q) not in mappers:
                mappers[id(q)] = _Mapper(q, _stat_dtype(q))

        def per_sample(
            start: int, stop: int, items: list = items, param: torch.Tensor = param
        ) -> torch.Tensor:
            total = None
            for q, plan in items:
                g = plan.per_sample(dy, start, stop)
                if isinstance(q, DerivedTensor):
                    g = mappers[id(q)](g, param)
                total = g if total is None else total + g
            return total.to(base.stat_dtype(param))

        squared = None
        if len(items) == 1 and items[0][0] is param and items[0][1].squared is not None:
            shortcut = items[0][1].squared

            def squared() -> torch.Tensor:
                return shortcut(dy).to(dtype)

        sample_numel = max(plan.sample_numel for _, plan in items)
        base.contribute(param, use.n, per_sample, squared, ctx=use, sample_numel=sample_numel)


# ----------------------------------------------------------------------------- handlers


def _grad_outputs(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result] if result.requires_grad else []
    if isinstance(result, (tuple, list)):
        leaves = pytree.tree_leaves(result)
        return [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return []


def _node(t: torch.Tensor) -> Any:
    if t.grad_fn is not None:
        return t.grad_fn
    if t.requires_grad:
        return torch.autograd.graph.get_gradient_edge(t).node
    return None


def _flows(outs: list[torch.Tensor], ours: list[torch.Tensor], stops: set) -> bool:
    """Whether the graph of ``outs`` reaches one of ``ours`` before any node in ``stops``
    (the nodes of the op's other inputs): does the op carry gradient to a parameter?"""
    targets = {_node(q) for q in ours} - {None}
    stack = [o.grad_fn for o in outs if o.grad_fn is not None]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node in targets:
            return True
        if node in seen or node in stops:
            continue
        seen.add(node)
        if len(seen) > 10_000:
            return True
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return False


def _inplace(func: Callable[..., Any]) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in (
        "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__",
        "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__ifloordiv__",
        "__imod__", "__imatmul__",
    )


def _lookup(table: dict[Any, Any], func: Callable[..., Any]) -> Any:
    try:
        return table.get(func)
    except TypeError:  # an unhashable callable
        return None


def _generic(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Any op without a rule: run it as torch does; derive it if it is a pure computation
    on parameters and constants; poison the parameters it carries gradient to otherwise."""
    shape_only = _lookup(_SHAPE_ONLY, func)
    if shape_only is not None and len(args) == 2 and not kwargs and _is_ours(args[0]):
        other = args[1]
        if isinstance(other, torch.Tensor) and not _is_ours(other):  # p.expand_as(x): x's shape
            return _generic(shape_only, (args[0], tuple(other.shape)), {})
    if func in _BACKWARDS and any(isinstance(t, DerivedTensor) for t in _leaves(args, kwargs)):
        roots = [t for t in _leaves(args, kwargs) if isinstance(t, DerivedTensor)]
        detail = "the loss is computed from parameters alone: no op on the way sees the samples"
        _poison(_ours_in(args, kwargs), _op_name(func), detail, roots)
    before = None
    first = args[0] if args else None
    inplace = isinstance(first, torch.Tensor) and not _is_ours(first) and _inplace(func)
    if inplace:
        before = _node(args[0])
    result = func(*args, **kwargs)
    ours = _ours_in(args, kwargs)
    if not ours:
        return result
    outs = _grad_outputs(result)
    if inplace and args[0].requires_grad and not any(o is args[0] for o in outs):
        outs.append(args[0])
    if not outs:
        return result
    if any(o is q for o in outs for q in ours):
        return result  # the op returned the parameter itself (contiguous(), to(same dtype))
    derivable = _lookup(_DERIVABLE, func)
    if derivable is None and func not in generic.RANDOM and not _inplace(func):
        derivable = "pure"  # any other deterministic op is replayable on parameters alone
    if derivable is not None and not inplace:
        cast = derivable == "cast"
        if cast and _is_ours(args[0]):
            return _derive(func, args, kwargs, result, [args[0]], cast=True)
        leaves = pytree.tree_leaves((args, kwargs))
        if not cast and not any(_kind(t) in ("sample", "lost") for t in leaves):
            return _derive(func, args, kwargs, result, ours)
    leaves = pytree.tree_leaves((args, kwargs))
    others = [t for t in leaves if isinstance(t, torch.Tensor) and not _is_ours(t)]
    stops = {_node(t) for t in others if t is not args[0] or not inplace} - {None}
    if before is not None:
        stops.add(before)
    if not _flows(outs, ours, stops):
        return result
    detail = _lost_reason(leaves)
    if detail is None and not inplace and any(_kind(t) == "sample" for t in leaves):
        plans = generic.plan(func, args, kwargs, result, ours, _unbroadcast, _stat_dtype)
        if not isinstance(plans, str):
            _observe(result, plans)
            return result
        detail = plans
    if detail is None:
        detail = (
            "truegrad cannot split this op per sample"
            if derivable is not None else "truegrad has no rule for this op"
        )
    _poison(ours, _op_name(func), detail, outs)
    return result


def _replayed(func: Callable[..., Any], args: tuple, kwargs: dict, ours: list[torch.Tensor], why: str) -> Any:
    """Run the op as torch does and give ``ours`` the generic per-sample rule
    (:mod:`truegrad.engine.generic`); poison them with the reason if it does not apply."""
    result = func(*args, **kwargs)
    plans = generic.plan(func, args, kwargs, result, ours, _unbroadcast, _stat_dtype)
    if isinstance(plans, str):
        _poison(ours, _op_name(func), f"{why}, and {plans}", _grad_outputs(result))
        return result
    _observe(result, plans)
    return result


def _unsupported(
    func: Callable[..., Any], args: tuple, kwargs: dict, ours: list[torch.Tensor], detail: str
) -> Any:
    """Run the op as torch does and poison ``ours`` with ``detail``."""
    result = func(*args, **kwargs)
    outs = _grad_outputs(result)
    if not outs and _inplace(func) and args and isinstance(args[0], torch.Tensor):
        outs = [args[0]]
    _poison(ours, _op_name(func), detail, outs)
    return result


def _unbroadcast(q: torch.Tensor, axis: int) -> torch.Tensor:
    """``q`` itself, or, when ``q`` is a derived tensor expanded along ``axis`` (stride 0, every
    slice the same function of the parameters: ``p.expand(N, ...)``), its first slice
    ``q.narrow(axis, 0, 1)``, which broadcasts to the same values. The op's samples may run
    along such an axis."""
    if not isinstance(q, DerivedTensor) or not 0 <= axis < q.dim():
        return q
    if q.shape[axis] <= 1 or q.stride(axis) != 0:
        return q
    args = (q, axis, 0, 1)
    return _derive(torch.Tensor.narrow, args, {}, q.narrow(*args[1:]), [q])


def _elementwise(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    spec = _elementwise_rule.ELEMENTWISE_OPS[func]
    parsed = _elementwise_rule.operands(spec, args, kwargs)
    if parsed is None:
        return _generic(func, args, kwargs)
    a, b, alpha, op = parsed
    ka, kb = _kind(a), _kind(b)
    if "ours" not in (ka, kb):
        return _generic(func, args, kwargs)
    ours = [t for t, k in ((a, ka), (b, kb)) if k == "ours"]
    if "lost" in (ka, kb):
        return _unsupported(func, args, kwargs, ours, _lost_reason((a, b)) or "")
    if "sample" not in (ka, kb):
        if spec.inplace:
            return _generic(func, args, kwargs)
        return _derive(func, args, kwargs, func(*args, **kwargs), ours)
    q_first = ka == "ours"
    q = a if q_first else b
    x = b if q_first else a
    if spec.inplace and q_first:
        return func(*args, **kwargs)  # torch refuses in-place ops on a leaf (or its view)
    x_layout = _layout(x)
    old = a.detach().clone() if spec.inplace and op in ("mul", "div") else a
    result = func(*args, **kwargs)
    out = args[0] if spec.inplace else result
    other = old if not q_first else b
    dtype = _stat_dtype(q)
    out_layout = _broadcast_layout(x, x_layout, out)
    if out_layout is None:
        _poison(ours, _op_name(func), "the operand carrying the samples is broadcast", [out])
        return result
    q_axis = out_layout.dim - (out.dim() - q.dim())
    q = _unbroadcast(q, q_axis)
    plan = _elementwise_rule.plan_elementwise(
        out.shape, q.shape, out_layout, dtype, op=op, q_first=q_first, other=other,
        other_layout=x_layout, alpha=alpha, q_value=q.detach(),
    )
    if isinstance(plan, str):
        _poison(ours, _op_name(func), plan, [out])
        return result
    _observe(out, [(q, plan)])
    return result


def _as_linear(
    kind: str, func: Callable[..., Any], args: tuple, kwargs: dict, c: Any, ka: str, kb: str,
    kbias: str,
) -> Any:
    """``x @ W``, ``torch.mm(x, W)``, ``torch.addmm(b, x, W)`` with ``W`` a tracked parameter
    ``(in, out)`` and ``x`` carrying the samples in its leading dims: the Linear rule (its
    weight gradient formed from the per-sample products it forms anyway, not a second
    matmul), bitwise the same forward. ``None``: not such a call."""
    if kind not in ("matmul", "mm", "addmm") or ka != "sample" or kb != "ours":
        return None
    w, x = c.b, c.a
    if not isinstance(w, TrueGradParameter) or w.dim() != 2 or not isinstance(x, torch.Tensor):
        return None
    if x.dim() < 2 or c.alpha != 1 or c.beta != 1:
        return None
    layout = _layout(x)
    if layout.dim >= x.dim() - 1:
        return None  # the samples are in the contracted dim
    bias = c.bias
    if bias is not None and (
        kbias not in ("ours", "const") or isinstance(bias, DerivedTensor)
        or not isinstance(bias, torch.Tensor) or bias.dim() != 1 or kwargs
    ):
        return None
    if kind == "addmm":
        op = _originals.T.addmm
    else:
        op = _originals.T.mm if kind == "mm" else _originals.T.matmul
    _touch(w)
    if bias is not None and kbias == "ours":
        _touch(bias)
    with _NoSubclass():
        return _linear_rule.product(op, x, w, bias, samples=layout)


def _matmul(func: Callable[..., Any], args: tuple, kwargs: dict, kind: str | None = None) -> Any:
    kind = kind or _matmul_rule.MATMUL_OPS[func]
    c = _matmul_rule.contraction(kind, args, kwargs)
    if c is None:
        return _generic(func, args, kwargs)
    ka, kb = _kind(c.a), _kind(c.b)
    kbias = _kind(c.bias) if c.bias is not None else "const"
    ours = [t for t, k in ((c.a, ka), (c.b, kb), (c.bias, kbias)) if k == "ours"]
    if not ours:
        return _generic(func, args, kwargs)
    if "lost" in (ka, kb, kbias):
        return _unsupported(func, args, kwargs, ours, _lost_reason((c.a, c.b, c.bias)) or "")
    if "sample" not in (ka, kb, kbias):
        return _derive(func, args, kwargs, func(*args, **kwargs), ours)
    if "sample" not in (ka, kb):
        detail = "the batch enters only through the added term"
        return _unsupported(func, args, kwargs, ours, detail)
    if ka == "sample" and kb == "sample":
        detail = "both factors carry the samples"
        return _unsupported(func, args, kwargs, ours, detail)
    fast = _as_linear(kind, func, args, kwargs, c, ka, kb, kbias)
    if fast is not None:
        return fast
    result = func(*args, **kwargs)
    x_index = 0 if ka == "sample" else 1
    x = c.operands[x_index]
    x_layout = _layout(x)
    n_letter = c.terms[x_index][x_layout.dim]
    detail = None
    out_layout = None
    if n_letter not in c.output:
        detail = "the product sums over the samples (their index is contracted)"
    else:
        out_layout = x_layout.at(c.output.index(n_letter))
    terms: list[tuple[torch.Tensor, _elementwise_rule.Plan]] = []
    index = 1 - x_index  # the parameter's operand
    if detail is None and (ka, kb)[index] == "ours":
        operand = c.operands[index]
        narrowed = _unbroadcast(operand, c.terms[index].find(n_letter))
        plan_c = c
        if narrowed is not operand:
            plan_c = dataclasses.replace(c, **{"ab"[index]: narrowed})
        dtype = _stat_dtype(operand)
        plan = _matmul_rule.plan_contraction(plan_c, index, result.shape, dtype, x_layout)
        if isinstance(plan, str):
            detail = plan
        else:
            terms.append((narrowed, plan))
    if detail is None and kbias == "ours":
        assert out_layout is not None
        bias = c.bias
        if bias.dim() == result.dim():
            bias = _unbroadcast(bias, out_layout.dim)
        dtype = _stat_dtype(bias)
        plan = _matmul_rule.plan_bias(result.shape, bias.shape, c.beta, dtype, out_layout)
        if isinstance(plan, str):
            detail = f"the added term: {plan}"
        else:
            terms.append((bias, plan))
    if detail is not None:
        _poison(ours, _op_name(func), detail, [result])
        return result
    _observe(result, terms)
    return result


# ----------------------------------------------------------------------------- truegrad functionals

_PARAMETER_ARGUMENTS = frozenset({
    "weight", "bias", "in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj_weight",
    "out_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
})


def _first_dim(t: Any, unbatched_below: int = 2) -> int | None:
    if not isinstance(t, torch.Tensor):
        return None
    return t.shape[0] if t.dim() >= unbatched_below else 1


#: functionals whose samples may be anywhere in the leading dims of these arguments (they act
#: on the trailing dims); they get the layout as ``samples=``
_LEADING = {
    "linear": ("input",),
    "layer_norm": ("input",),
    "rms_norm": ("input",),
    "embedding": ("input",),
    "bilinear": ("input1", "input2"),
}


def _rule_layout(name: str, arguments: dict[str, Any]) -> samples.Layout | str:
    """Where the samples are for one call of the truegrad functional ``name``, or why the
    rule cannot split this call per sample."""
    if name in _LEADING:
        layouts = []
        for key in _LEADING[name]:
            x = arguments.get(key)
            if not isinstance(x, torch.Tensor) or _kind(x) != "sample":
                return f"its {key!r} argument does not carry the samples"
            layouts.append(_layout(x))
        if any(lay != layouts[0] for lay in layouts[1:]):
            return "its inputs carry the samples in different layouts"
        return layouts[0]
    if name == "multi_head_attention_forward":
        x = arguments.get("query")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or _kind(x) != "sample":
            return "its query does not carry the samples in a batched (L, N, E) layout"
        layout = _layout(x)
        if layout.n == 1:  # one sample: all of it, in the layer's batch dim too
            return samples.Layout(1, 1)
        if layout != samples.Layout(1, layout.n):
            return f"the samples are in {layout.describe()} of the query, not in its batch dim 1"
        return layout
    if name == "embedding_bag":
        x, offsets = arguments.get("input"), arguments.get("offsets")
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            carrier = x
        elif isinstance(offsets, torch.Tensor):
            carrier = offsets
        else:
            return "its bags do not carry the samples"
    else:
        carrier = arguments.get("input")
    if not isinstance(carrier, torch.Tensor) or _kind(carrier) != "sample":
        return "its input does not carry the samples"
    layout = _layout(carrier)
    if layout.n == 1:  # one sample: all of it, in the layer's batch dim too
        layout = samples.Layout(0, 1)
    if layout != samples.Layout(0, layout.n):
        return f"the samples are in {layout.describe()} of its input, not in its batch dim 0"
    weight = arguments.get("weight")
    if name.startswith("conv") and isinstance(weight, torch.Tensor) and carrier.dim() != weight.dim():
        return "an unbatched convolution: dim 0 of its input is channels, not samples"
    if name == "embedding_bag" and carrier is offsets:
        bags = offsets.numel() - (1 if arguments.get("include_last_offset") else 0)
        if bags != layout.n:
            return "its bags are not the samples"
    return layout


def _pure(name: str, arguments: dict[str, Any]) -> bool:
    """Whether replaying the functional has no side effect (may be derived)."""
    if name in ("embedding", "embedding_bag"):
        return arguments.get("max_norm") is None
    if name == "batch_norm":
        return not arguments.get("training", False)
    if name == "instance_norm":
        return arguments.get("running_mean") is None and arguments.get("running_var") is None
    if name == "multi_head_attention_forward":
        return not arguments.get("training", True) or not arguments.get("dropout_p", 0.0)
    return True


def _options_reason(name: str, arguments: dict[str, Any]) -> str | None:
    if name in ("embedding", "embedding_bag") and arguments.get("sparse"):
        return "sparse=True (sparse gradients) is not supported"
    return None


@dataclasses.dataclass(frozen=True)
class _Functional:
    name: str
    truegrad: Callable[..., Any]
    positional: tuple[str, ...]  # names that may be given by position, in order
    defaults: dict[str, Any]  # every name (keyword-only included) -> its default

    @classmethod
    def of(cls, name: str, function: Callable[..., Any]) -> _Functional:
        parameters = inspect.signature(function).parameters.values()
        by_position = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        positional = tuple(p.name for p in parameters if p.kind in by_position)
        empty = inspect.Parameter.empty
        defaults = {p.name: None if p.default is empty else p.default for p in parameters}
        return cls(name, function, positional, defaults)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any] | None:
        """The call's arguments by name, defaults filled in (``None``: not a valid call)."""
        if len(args) > len(self.positional) or not kwargs.keys() <= self.defaults.keys():
            return None
        arguments = dict(self.defaults)
        for name, value in zip(self.positional, args):
            if name in kwargs:
                return None
            arguments[name] = value
        arguments.update(kwargs)
        return arguments


def _linear_fast(spec: _Functional, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``F.linear(x, W[, b])``, the most common call, without the general binding: tracked
    parameters, ``x`` carrying the samples in its leading dims. Anything else: the general
    path (:func:`_functional`)."""
    if not kwargs and 2 <= len(args) <= 3:
        x, w = args[0], args[1]
        b = args[2] if len(args) == 3 else None
        if (
            type(w) is TrueGradParameter
            and (b is None or type(b) is TrueGradParameter)
            and type(x) is torch.Tensor
            and w.requires_grad
            and (b is None or b.requires_grad)
        ):
            layout = samples.layout_of(x)
            if (
                isinstance(layout, samples.Layout)
                and layout.dim < x.dim() - 1
                and (forward.in_call() or layout.n == x.shape[0])
            ):
                if _POISON:
                    _touch(w)
                    if b is not None:
                        _touch(b)
                granularity = door.options().get("granularity")
                return _linear_rule.linear(x, w, b, granularity=granularity, samples=layout)
    return _functional(spec, func, args, kwargs)


def _functional(spec: _Functional, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    arguments = spec.bind(args, kwargs)
    if arguments is None:
        return _generic(func, args, kwargs)
    in_params = [v for k, v in arguments.items() if k in _PARAMETER_ARGUMENTS and _is_ours(v)]
    elsewhere = [
        t for k, v in arguments.items() if k not in _PARAMETER_ARGUMENTS
        for t in (v if isinstance(v, (list, tuple)) else (v,)) if _is_ours(t)
    ]
    ours = in_params + elsewhere
    if not ours:
        return _generic(func, args, kwargs)
    leaves = list(_leaves(args, kwargs))
    lost = _lost_reason(leaves)
    if lost is not None:
        return _unsupported(func, args, kwargs, ours, lost)
    if not any(_kind(t) == "sample" for t in leaves):
        if _pure(spec.name, arguments):
            return _derive(func, args, kwargs, func(*args, **kwargs), ours)
        detail = "a side-effecting call on parameters without a batch"
        return _unsupported(func, args, kwargs, ours, detail)
    if elsewhere:
        return _unsupported(func, args, kwargs, ours, "a parameter is passed as the data argument")
    derived = any(isinstance(t, DerivedTensor) for t in in_params)
    if spec.name == "linear" and derived:
        return _matmul(func, args, kwargs, kind="linear")
    if derived:
        detail = "its rule takes parameters, not tensors computed from them"
        return _replayed(func, args, kwargs, ours, detail)
    detail = _options_reason(spec.name, arguments)
    layout = _rule_layout(spec.name, arguments) if detail is None else detail
    if isinstance(layout, str):
        return _unsupported(func, args, kwargs, ours, layout)
    for param in in_params:
        _touch(param)
    extra = {k: v for k, v in door.options().items() if k in spec.defaults and k != "samples"}
    if spec.name in _LEADING:
        extra["samples"] = layout
    try:
        return spec.truegrad(*args, **kwargs, **extra)
    except (ValueError, NotImplementedError) as error:
        return _unsupported(func, args, kwargs, ours, f"truegrad's rule refused it ({error})")


def _recurrent(rule: Callable[..., Any], func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``torch.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu`` with tracked weights: the
    recurrent rule, with the samples on the layer's batch dim (padded input) or in packed
    data of the model's samples."""
    ours = _ours_in(args, kwargs)
    if not ours:
        return _generic(func, args, kwargs)
    if any(isinstance(q, DerivedTensor) for q in ours):
        return _replayed(func, args, kwargs, ours, "its rule takes parameters")
    packed = _recurrent_rule._is_packed(args, kwargs)
    x = args[0] if args else kwargs.get("input", kwargs.get("data"))
    layout: samples.Layout | None = None
    detail = None
    tagged = samples.layout_of(x)
    if packed:
        if not isinstance(tagged, samples.Packed) and forward.in_call():
            detail = "its packed data is not packed from the model's samples"
    else:
        batch_first = args[8] if len(args) > 8 else kwargs.get("batch_first", False)
        kind = _kind(x)
        if kind == "lost":
            detail = _lost_reason([x])
        elif kind != "sample" or not isinstance(x, torch.Tensor) or x.dim() != 3:
            detail = "its input does not carry the samples in a batched layout"
        else:
            layout = _layout(x)
            want = 0 if batch_first else 1
            if layout.n == 1:
                layout = samples.Layout(want, 1)
            elif not layout.plain or layout.dim != want:
                detail = (f"the samples are in {layout.describe()} of its input, not in its batch "
                          f"dim {want}")
    if detail is not None:
        return _unsupported(func, args, kwargs, ours, detail)
    for param in ours:
        _touch(param)
    try:
        return rule(*args, samples=layout, **kwargs)
    except (ValueError, NotImplementedError) as error:
        return _unsupported(func, args, kwargs, ours, f"truegrad's rule refused it ({error})")


# ----------------------------------------------------------------------------- tables


def _derivable() -> dict[Any, str]:
    T = torch.Tensor
    table: dict[Any, str] = {}
    tensor_methods = [
        "view", "view_as", "reshape", "reshape_as", "transpose", "t", "permute", "expand",
        "expand_as", "chunk", "split", "split_with_sizes", "tensor_split", "unbind", "narrow",
        "select", "__getitem__", "squeeze", "unsqueeze", "flatten", "unflatten", "movedim",
        "moveaxis", "swapaxes", "swapdims", "diagonal", "contiguous", "clone", "repeat", "tile",
        "flip", "roll", "index_select", "neg", "__neg__", "abs", "exp", "log", "sqrt", "rsqrt",
        "square", "pow", "__pow__", "__rpow__", "sigmoid", "tanh", "sin", "cos", "sum", "mean",
        "norm", "clamp", "clip", "reciprocal", "softmax", "log_softmax", "tril", "triu",
        "outer", "masked_fill",
    ]
    torch_functions = [
        "transpose", "t", "permute", "reshape", "chunk", "split", "tensor_split", "unbind",
        "narrow", "select", "squeeze", "unsqueeze", "flatten", "unflatten", "movedim", "moveaxis",
        "swapaxes", "swapdims", "diagonal", "cat", "concat", "concatenate", "stack", "flip",
        "roll", "tile", "clone", "index_select", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
        "square", "pow", "sigmoid", "tanh", "sum", "mean", "norm", "clamp", "tril", "triu",
        "softmax", "log_softmax", "outer", "masked_fill", "where",
    ]
    for name in tensor_methods:
        if hasattr(T, name):
            table[getattr(T, name)] = "pure"
    for name in torch_functions:
        if hasattr(torch, name):
            table[getattr(torch, name)] = "pure"
    for name in ("softplus", "relu", "gelu", "silu", "normalize", "softmax", "log_softmax", "pad"):
        if hasattr(torch.nn.functional, name):
            table[getattr(_originals.F, name)] = "pure"
    for name in ("_weight_norm", "norm_except_dim"):  # weight_norm parametrizations
        if hasattr(torch, name):
            table[getattr(torch, name)] = "pure"
    for name in ("T", "mT"):
        table[getattr(T, name).__get__] = "pure"
    for name in ("to", "float", "double", "half", "bfloat16", "type", "type_as", "cpu", "cuda"):
        if hasattr(T, name):
            table[getattr(T, name)] = "cast"
    return table


_DERIVABLE: dict[Any, str] = _derivable()
_BACKWARDS = frozenset({torch.Tensor.backward, torch.autograd.backward})
_VIEW_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "real", "imag"})
#: ``p.expand_as(x)`` and friends use only ``x.shape``: ``p.expand(x.shape)``.
_SHAPE_ONLY: dict[Any, Any] = {
    torch.Tensor.expand_as: torch.Tensor.expand,
    torch.Tensor.view_as: torch.Tensor.view,
    torch.Tensor.reshape_as: torch.Tensor.reshape,
}
_HANDLERS: dict[Any, Callable[[Callable[..., Any], tuple, dict], Any]] = {}


def _handlers() -> dict[Any, Callable[[Callable[..., Any], tuple, dict], Any]]:
    if _HANDLERS:
        return _HANDLERS
    from truegrad.nn import functional as tfunctional

    table: dict[Any, Callable[[Callable[..., Any], tuple, dict], Any]] = {}
    for function in _elementwise_rule.ELEMENTWISE_OPS:
        table[function] = _elementwise
    for function in _matmul_rule.MATMUL_OPS:
        table[function] = _matmul
    for name in _recurrent_rule.__all__:  # torch.lstm & co. (what nn.LSTM's forward calls)
        table[getattr(torch, name)] = functools.partial(_recurrent, getattr(_recurrent_rule, name))
    for name in tfunctional.__all__:
        # torch's function (also while patch_torch has replaced the name by truegrad's)
        original = getattr(_originals.F, name, None)
        if original is None:
            continue
        rule = getattr(tfunctional, name).rule  # the rule itself, not its door
        spec = _Functional.of(name, rule)
        handler = _linear_fast if name == "linear" else _functional
        table[original] = functools.partial(handler, spec)
    _HANDLERS.update(table)
    return _HANDLERS


# ----------------------------------------------------------------------------- the classes


def _torch_function(
    cls: type, func: Callable[..., Any], types: tuple, args: tuple = (), kwargs: dict | None = None
) -> Any:
    if kwargs is None:
        kwargs = {}
    if func is _DETACH and _compat.called_by_parameter_new():
        # torch.nn.Parameter(p) (parametrize re-registering a tracked weight) needs the
        # subclass kept; every other detach() gives a plain tensor (state_dict, user code)
        with _NoSubclass():
            plain = args[0].detach()
        return torch.Tensor._make_subclass(cls, plain, False)
    if not torch.is_grad_enabled() or _bypass.bypassed():
        return _plain(func, types, args, kwargs)
    func = getattr(func, "torch_function", func)  # a truegrad door (patch_torch): torch's own
    handler = _lookup(_HANDLERS or _handlers(), func)
    if handler is None and getattr(func, "__name__", None) in ("__get__", "__set__", "__delete__"):
        # attribute access (p.shape, p.grad = None ...): only .T/.mT/.H/.mH make views
        attribute = getattr(func.__self__, "__name__", "")
        if func.__name__ != "__get__" or attribute not in _VIEW_ATTRIBUTES:
            return _plain(func, types, args, kwargs)
    if torch.compiler.is_compiling():
        # traced in a forward the engine does not follow (a prepared model's forward runs
        # eagerly): torch's op; the doors of the parameter's own module refuse its statistic
        return _plain(func, types, args, kwargs)
    if not forward.in_call():
        return _outside_call(handler, func, args, kwargs)
    for value in (*args, *kwargs.values()):
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if type(t) is torch.nn.Parameter and t.requires_grad:
                _met_untracked(t)
    with _NoSubclass():
        if handler is None:
            return _generic(func, args, kwargs)
        return handler(func, args, kwargs)


@torch.compiler.disable
def _outside_call(handler: Any, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """A use outside any model call: the op is the model (dim 0 of its input holds the
    samples). Never compiled: such a use may come from a compiled region (after a graph
    break ``torch.compile`` compiles every frame it calls, the engine's own included)."""
    with _NoSubclass():
        if handler is None:
            return _generic(func, args, kwargs)
        return handler(func, args, kwargs)


class TrueGradParameter(torch.nn.Parameter):
    """A ``torch.nn.Parameter`` whose uses give the exact per-sample statistic.

    Created in place by :func:`truegrad.utils.patch_model` (``param.__class__`` swap) or as
    ``TrueGradParameter(data)``. Behaves as a parameter everywhere (``isinstance(p,
    nn.Parameter)``, ``state_dict`` holds plain tensors, ``copy.deepcopy`` and pickling
    keep the class); see the module docstring for what its ops do.
    """

    __torch_function__ = classmethod(_torch_function)  # type: ignore[assignment]

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = True) -> TrueGradParameter:
        param = super().__new__(cls, data, requires_grad)
        _hold_tracking(param)
        return param

    def __reduce_ex__(self, proto: Any) -> tuple:
        with _NoSubclass():
            state = torch._utils._get_obj_state(self)
            return _rebuild, (self.data, self.requires_grad, state)

    def __repr__(self) -> str:
        with _NoSubclass():
            text = repr(self.data)
            if self.requires_grad:
                text = text[:-1] + ", requires_grad=True)"
            return "TrueGradParameter containing:\n" + text


def _rebuild(data: torch.Tensor, requires_grad: bool, state: Any) -> TrueGradParameter:
    param = TrueGradParameter(data, requires_grad)
    return torch._utils._set_obj_state(param, state)


#: tracked parameter -> the token that keeps model calls tracked while it lives
_TOKENS: WeakIdMap[forward.Tracking] = WeakIdMap()


def _hold_tracking(param: torch.Tensor) -> None:
    if param not in _TOKENS:
        token = forward.acquire()
        _TOKENS[param] = token
        weakref.finalize(param, token.release)


def track(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Make every trainable plain ``nn.Parameter`` among ``params`` a
    :class:`TrueGradParameter` in place (same object: optimizer, DDP and ``state_dict``
    references stay valid); returns the ones it changed (for :func:`untrack`). The caller
    makes the model's calls model calls (:func:`truegrad.engine.forward.hook_model`, or a
    :class:`~truegrad.engine.forward.Tracking` token)."""
    changed = []
    for param in params:
        if param.requires_grad and type(param) is torch.nn.Parameter:
            param.__class__ = TrueGradParameter
            changed.append(param)
    return changed


def untrack(params: Iterable[torch.Tensor]) -> None:
    """Undo :func:`track` for ``params`` (back to ``torch.nn.Parameter``, same objects)."""
    params = list(params)
    for param in params:
        if type(param) is TrueGradParameter:
            param.__class__ = torch.nn.Parameter
        token = _TOKENS.pop(param)
        if token is not None:
            token.release()
    forget(params)
    base.forget(params)


class DerivedTensor(torch.Tensor):
    """A tensor computed from :class:`TrueGradParameter` s and constants only (a view, a
    cast, a chunk ...). It is the same values as torch's result, on the same graph; it
    remembers ``_tg_sources`` (the parameters) and ``_tg_fn`` (``fn(*sources) -> self``),
    so per-sample gradients of it map back to the parameters."""

    _tg_sources: tuple[torch.Tensor, ...]
    _tg_fn: Callable[..., torch.Tensor]

    __torch_function__ = classmethod(_torch_function)  # type: ignore[assignment]

    def __repr__(self) -> str:
        with _NoSubclass():
            return f"DerivedTensor({self.data!r})"
