"""What every rule shares: which tensors get a statistic, and how a rule hands it over.

A rule's ``backward`` computes gradients exactly as torch does and then calls
:func:`contribute` once per parameter with

* ``per_sample(start, stop)``: the per-sample gradients of samples ``start:stop``,
  shape ``(stop - start, *param.shape)``, in float32 (float64 for float64 params);
* optionally ``squared()``: ``sum_n g_n**2`` computed by a cheaper exact route
  (e.g. one matmul on squared operands for a Linear on 2-D input).

:func:`contribute` squares and sums in chunks of samples bounded by
``truegrad.nn.settings.chunk_bytes`` and writes through :mod:`truegrad.statistic`.

Parameters used more than once in one forward (tied weights, a module called
twice) are recorded in forward by :func:`record_use` (a weak set of the autograd
contexts whose backward is still to come, so a forward that is never backwarded
is forgotten with its graph). Their per-sample gradients
are kept until the last use's backward has arrived, summed, and only then squared,
so the statistic stays exact; a post-accumulate-grad hook finalises whatever is
pending when the parameter's gradient is complete. Kept densely, ``(N, *param.shape)``,
while that fits in the memory bound; beyond it each use keeps its ``per_sample`` function
(with the operands it reads) and the last use sums all of them chunk by chunk of samples,
so the statistic is exact whatever the bound, at the cost of forming each use's per-sample
gradients when the last one arrives. Uses from model calls with different batch sizes in
one backward cannot be paired sample by sample: the parameter then gets no statistic for
this backward, and the reason is recorded (never a sum of per-use squares).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import threading
import weakref

from collections.abc import Callable
from typing import Any

import torch

from truegrad import _bypass, _compat, statistic
from truegrad._weakid import WeakIdMap
from truegrad.engine.samples import Layout
from truegrad.nn import settings

__all__ = [
    "RuleFunction",
    "apply",
    "cast",
    "contribute",
    "discard_pending",
    "exclusive_use",
    "forget",
    "in_functorch",
    "record_use",
    "release_scratch",
    "sample_major",
    "scratch",
    "should_track",
    "stat_dtype",
    "tracked",
]

PerSample = Callable[[int, int], torch.Tensor]


def in_functorch() -> bool:
    """Whether we run inside a ``torch.func`` transform (then no statistic is written)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def tracked(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` if it is a trainable leaf (a parameter that gets a statistic), else ``None``."""
    if t is None or not isinstance(t, torch.Tensor) or not t.requires_grad or not t.is_leaf:
        return None
    return t


def should_track(*params: torch.Tensor | None) -> bool:
    """Whether a functional must go through its autograd Function: gradients are being
    recorded, backends are not bypassed (see ``truegrad._bypass``), and at least one of
    ``params`` is a trainable leaf. Otherwise it calls torch's op directly."""
    return (
        torch.is_grad_enabled()
        and not _bypass.bypassed()
        and any(tracked(p) is not None for p in params)
    )


_NoSubclass = torch._C.DisableTorchFunctionSubclass


class RuleFunction(torch.autograd.Function):
    """Base of every rule's autograd Function: its ``setup_context`` and ``backward`` run
    with tensor-subclass dispatch off, so that reading a tracked parameter's attributes and
    using it in torch ops there costs a plain tensor's price (the engine's
    ``TrueGradParameter.__torch_function__`` has nothing to do in a rule)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("setup_context", "backward"):
            method = cls.__dict__.get(name)
            if isinstance(method, staticmethod):
                wrapped = _without_subclass(method.__func__, unpack=name == "backward")
                setattr(cls, name, staticmethod(wrapped))


def _without_subclass(function: Callable[..., Any], unpack: bool = False) -> Callable[..., Any]:
    """``function`` run with subclass dispatch off; with ``unpack``, a backward whose saved
    tensors are unpacked first, with dispatch on: under activation checkpointing
    (``torch.utils.checkpoint``) unpacking recomputes the checkpointed forward, which must
    go through the engine exactly as the original forward did (same rules, same saved
    tensors), not through plain torch."""

    def wrapped(*args: Any) -> Any:
        if not unpack:
            with _NoSubclass():
                return function(*args)
        ctx = args[0]
        ctx._tg_saved = ctx.saved_tensors  # once: a checkpoint allows a single unpacking
        try:
            with _NoSubclass():
                return function(*args)
        finally:
            ctx._tg_saved = None

    wrapped.__name__ = function.__name__
    wrapped.__qualname__ = function.__qualname__
    wrapped.__doc__ = function.__doc__
    return wrapped


def saved(ctx: Any) -> tuple[torch.Tensor, ...]:
    """``ctx.saved_tensors`` of a rule's backward, unpacked once by :class:`RuleFunction`
    (activation checkpointing refuses a second unpacking)."""
    cached = getattr(ctx, "_tg_saved", None)
    return ctx.saved_tensors if cached is None else cached


_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_functorch_active = torch._C._are_functorch_transforms_active
#: per Function class: (number of forward parameters, torch's C ``apply`` bound to it)
_DIRECT_APPLY: dict[type, tuple[int, Callable[..., torch.Tensor]]] = {}


def _direct_apply(function: type[torch.autograd.Function]) -> tuple[int, Callable[..., torch.Tensor]]:
    entry = _DIRECT_APPLY.get(function)
    if entry is None:
        arity = len(inspect.signature(function.forward).parameters)
        bound = torch._C._FunctionBase.__dict__["apply"].__get__(None, function)
        entry = _DIRECT_APPLY[function] = (arity, bound)
    return entry


def apply(function: type[torch.autograd.Function], *args: object) -> torch.Tensor:
    """Run ``function.apply(*args)`` eagerly, also inside ``torch.compile``.

    A rule's backward writes the statistic as a Python side effect, which a traced
    backward graph would drop; so ``torch.compile`` breaks the graph around each rule
    and runs it eagerly (its neighbours still compile). In eager mode the
    ``torch.compiler.disable`` wrapper (about 15 us a call) is skipped.
    """
    if torch.compiler.is_compiling():
        return _apply_eagerly(function, *args)
    return _apply(function, *args)


@torch.compiler.disable
def _apply_eagerly(function: type[torch.autograd.Function], *args: object) -> torch.Tensor:
    return _apply(function, *args)


def _apply(function: type[torch.autograd.Function], *args: object) -> torch.Tensor:
    """``function.apply(*args)``.

    Outside ``torch.func`` transforms, with every forward argument given, this calls
    torch's C ``apply`` directly: ``Function.apply`` would otherwise rebuild
    ``inspect.signature(forward)`` on every call to fill in defaults (about 50 us per
    op, as much as a small layer's whole backward).
    """
    arity, direct = _direct_apply(function)
    if len(args) == arity and not _functorch_active():
        return direct(*[_unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a for a in args])
    return function.apply(*args)


#: per thread (two threads training two models must not share a buffer): (device, dtype,
#: slot) -> buffer; a thread's buffers go with it
_SCRATCH = threading.local()


def scratch(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: str = "per_sample"
) -> torch.Tensor:
    """A reusable buffer for one chunk of per-sample gradients (see :func:`contribute`'s
    ``per_sample_owned``) or another large temporary. Fresh large CPU tensors are
    page-faulted in on every backward, which costs as much as squaring them; one buffer
    per thread, device, dtype and ``slot`` (a rule needing two at once uses two slots), as
    large as the largest request so far (at most ``settings.chunk_bytes`` plus one sample),
    avoids that. Only valid until the next call for the same slot in the same thread."""
    numel = math.prod(shape)
    key = (device, dtype, slot)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def release_scratch() -> None:
    """Free the buffers :func:`scratch` keeps for this thread."""
    _SCRATCH.buffers = {}


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call when ``t`` already has ``dtype`` (hot paths)."""
    return t if t.dtype == dtype else t.to(dtype)


def stat_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype per-sample products of ``param`` are formed in (float32, or float64)."""
    return statistic.statistic_dtype(param.dtype)


@dataclasses.dataclass
class _UseState:
    #: autograd contexts of recorded uses whose backward has not run yet; a use whose
    #: graph is dropped without backward disappears by itself (weak references).
    live: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)
    pending: torch.Tensor | None = None
    #: uses over the memory bound: ``(per_sample, sample_numel)`` of each, summed chunk by
    #: chunk of samples when the last use arrives.
    deferred: list[tuple[PerSample, int]] = dataclasses.field(default_factory=list)
    n_samples: int | None = None  # N of the uses kept (pending or deferred)
    abandoned: bool = False  # this backward's uses cannot be paired: no statistic
    backward: int = -1  # the backward pass (graph task) the kept state belongs to
    hook: torch.utils.hooks.RemovableHandle | None = None


_STATE: WeakIdMap[_UseState] = WeakIdMap()


def _finalize(param: torch.Tensor) -> None:
    state = _STATE.get(param)
    if state is None:
        return
    state.abandoned = False
    if state.pending is None and not state.deferred:
        return
    pending, state.pending = state.pending, None
    deferred, state.deferred = state.deferred, []
    n_samples, state.n_samples = state.n_samples, None
    if not deferred:
        assert pending is not None
        statistic.add_sum_of_squares(param, pending, owned=True)
        return
    assert n_samples is not None
    dtype = stat_dtype(param)
    widest = max([param.numel()] + [numel for _, numel in deferred])
    chunk = max(1, settings.chunk_bytes // max(1, widest * 4 * 2))
    total: torch.Tensor | None = None
    for start in range(0, n_samples, chunk):
        stop = min(n_samples, start + chunk)
        if pending is not None:
            grads = pending[start:stop]  # ours: summed into in place
        else:  # a copy: a per_sample result may be a scratch buffer the next one reuses
            grads = deferred[0][0](start, stop).to(dtype, copy=True)
        for per_sample, _ in deferred[0 if pending is not None else 1 :]:
            grads.add_(per_sample(start, stop))
        squares = grads.square_().sum(0)
        total = squares if total is None else total.add_(squares)
    assert total is not None
    statistic.add(param, total, owned=True)


def _abandon(param: torch.Tensor, state: _UseState, detail: str) -> None:
    """This backward's uses of ``param`` cannot give its exact statistic: drop what is kept,
    record why, and have the parameter end the backward with no statistic."""
    from truegrad import parameter  # the engine records reasons; it imports this module

    state.pending, state.deferred, state.n_samples = None, [], None
    state.abandoned = True
    parameter.abandon_statistic(param, detail)


def record_use(param: torch.Tensor | None, ctx: Any = None) -> None:
    """Record one use of ``param`` by the autograd context ``ctx`` (call in ``setup_context``
    and pass the same ``ctx`` to :func:`contribute`)."""
    if param is None or ctx is None or in_functorch():
        return
    state = _STATE.get(param)
    if state is None:
        state = _STATE[param] = _UseState()
    if state.hook is None and len(state.live) > 0:
        # A second live use: per-sample gradients may be kept pending (see contribute),
        # so the parameter's finished gradient must flush them. Single-use parameters
        # (almost all) need no hook and pay no Python call per backward.
        state.hook = param.register_post_accumulate_grad_hook(_finalize)
    state.live.add(ctx)


def discard_pending(param: torch.Tensor) -> None:
    """Drop per-sample gradients kept for a shared parameter (its statistic is abandoned)."""
    state = _STATE.get(param)
    if state is not None:
        state.pending, state.deferred, state.n_samples = None, [], None


def _accumulates(param: torch.Tensor, state: _UseState | None) -> bool:
    """Whether the running backward accumulates into ``param.grad``: not when it is
    ``torch.autograd.grad(..., inputs=[x])`` for other tensors (a gradient penalty),
    which must leave the statistic alone just as it leaves ``p.grad`` alone.

    The parameter's AccumulateGrad node is looked up every time (a few us), never cached:
    the node holds the parameter, so a cache keyed by the parameter would keep it alive."""
    try:
        with torch._C.DisableTorchFunctionSubclass():  # TrueGradParameter: its own node
            node = torch.autograd.graph.get_gradient_edge(param).node
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # not inside a backward pass: a direct call
        return True


def exclusive_use(param: torch.Tensor | None, ctx: Any) -> bool:
    """Whether :func:`contribute` for ``param`` from ``ctx`` will take the plain route: a
    tracked parameter outside ``torch.func``, accumulated by this backward, with ``ctx``
    its only live use and nothing pending (so a ``squared`` shortcut is what is used)."""
    if param is None or in_functorch():
        return False
    state = _STATE.get(param)
    if state is not None:
        live = state.live
        if state.pending is not None or len(live) - (1 if ctx in live else 0) > 0:
            return False
    return _accumulates(param, state)


def forget(params: list[torch.Tensor]) -> None:
    """Drop use records and hooks of ``params`` (used by conversions' ``undo``)."""
    for param in params:
        state = _STATE.pop(param, None)
        if state is not None and state.hook is not None:
            state.hook.remove()
    statistic.forget(params)


def sample_major(layout: Layout | None, keep: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` with the model's samples on dim 0: each as ``(N, P, *last keep dims)``.

    ``layout`` says where the samples are (the engine's
    :class:`~truegrad.engine.samples.Layout`, any leading dim, possibly flattened); ``None``
    or plain dim 0 returns the tensors unchanged (a rule then takes dim 0 of its input as the
    samples, as it always has). Rules call this at the start of their statistic.
    """
    if layout is None or (layout.dim == 0 and layout.plain):
        return tensors
    return tuple(layout.group(t, keep) for t in tensors)


def contribute(
    param: torch.Tensor | None,
    n_samples: int,
    per_sample: PerSample,
    squared: Callable[[], torch.Tensor] | None = None,
    *,
    ctx: Any = None,
    per_sample_owned: bool = False,
    with_grad: bool = False,
    squared_takes_out: bool = False,
    sample_numel: int = 0,
    accumulate: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor | None:
    """Add ``sum_n g_n**2`` of one use of ``param`` to its statistic (see module docstring).

    Args:
        param: the parameter (``None``: nothing to do).
        n_samples: N, the number of samples of this use.
        per_sample: ``per_sample(start, stop) -> (stop - start, *param.shape)``.
        squared: optional exact shortcut returning ``sum_n g_n**2`` directly, as a fresh
            tensor (it may be stored as the statistic without a copy).
        ctx: the autograd context that recorded this use with :func:`record_use`.
        per_sample_owned: what ``per_sample`` returns is read by nobody else (a fresh
            result, or a :func:`scratch` buffer valid until the next call), so it is
            squared in place.
        with_grad: the caller would like this use's gradient ``sum_n g_n`` from the
            per-sample gradients formed here (unless ``settings.bitwise_grad``).
        squared_takes_out: ``squared`` is called as ``squared(out)`` with ``out`` the
            storage to write the result into (``None``: allocate), so that a CPU
            statistic reuses the buffer of the last one (``statistic.reusable_buffer``).
        sample_numel: elements ``per_sample`` forms per sample on the way (when more than
            the parameter's: the gradient of a tensor computed from it), for the chunk bound.
        accumulate: optional ``accumulate(pending)`` adding this use's per-sample gradients
            into ``pending (N, *param.shape)`` in place, for a parameter used several times
            (an embedding's rows: far cheaper than forming them densely to add them).

    Returns:
        With ``with_grad``, when the per-sample gradients of all N samples were formed
        here: their sum ``(*param.shape)`` in :func:`stat_dtype`, the gradient of this
        use up to float rounding. Otherwise ``None``: the caller computes the gradient.
    """
    if param is None or in_functorch():
        return None
    state = _STATE.get(param)
    if not _accumulates(param, state):
        if state is not None:
            state.live.discard(ctx)
        return None
    with_grad = with_grad and squared is None and not settings.bitwise_grad
    others = 0
    if state is not None:
        state.live.discard(ctx)
        others = len(state.live)
        backward = _compat.current_backward_id()
        if state.backward != backward:  # kept by a backward an exception interrupted: drop
            state.pending, state.deferred, state.n_samples = None, [], None
            state.abandoned = False
            state.backward = backward
    shared = state is not None and (
        others > 0 or state.pending is not None or bool(state.deferred) or state.abandoned
    )
    if shared:
        assert state is not None
        if state.abandoned:
            return None
        if state.n_samples is not None and state.n_samples != n_samples:
            _abandon(
                param,
                state,
                f"it is used by model calls with different batch sizes ({state.n_samples} and "
                f"{n_samples}) in one backward, whose samples cannot be paired; call the model "
                "once per backward, or with the same batch size",
            )
            return None
        state.n_samples = n_samples
        pending_bytes = n_samples * param.numel() * torch.empty((), dtype=stat_dtype(param)).element_size()
        grad = None
        if pending_bytes <= settings.chunk_bytes:
            if accumulate is not None:  # sparse per-sample gradients added where they belong
                if state.pending is None:
                    state.pending = torch.zeros(
                        (n_samples, *param.shape), dtype=stat_dtype(param), device=param.device
                    )
                accumulate(state.pending)
            else:
                grads = per_sample(0, n_samples)
                grad = grads.sum(0) if with_grad else None
                if state.pending is None:  # a dense copy the later uses add into
                    state.pending = grads.clone(memory_format=torch.contiguous_format)
                else:
                    state.pending.add_(grads)
        else:  # over the bound: formed chunk by chunk with the other uses at the end
            state.deferred.append((per_sample, max(param.numel(), sample_numel)))
        if others == 0:
            _finalize(param)
        return grad
    if squared is not None:
        if squared_takes_out:
            out = statistic.reusable_buffer(param, stat_dtype(param))
            statistic.add(param, squared(out), owned=True)
        else:
            statistic.add(param, squared(), owned=True)
        return None
    per_sample_bytes = max(1, max(param.numel(), sample_numel) * 4 * (1 if per_sample_owned else 2))
    chunk = max(1, settings.chunk_bytes // per_sample_bytes)
    total: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    for start in range(0, n_samples, chunk):
        grads = per_sample(start, min(n_samples, start + chunk))
        if with_grad:
            part_grad = grads.sum(0)
            grad = part_grad if grad is None else grad.add_(part_grad)
        squares = grads.square_() if per_sample_owned else grads.square()
        if total is None:
            out = statistic.reusable_buffer(param, squares.dtype)
            total = squares.sum(0) if out is None else torch.sum(squares, 0, out=out)
        else:
            total.add_(squares.sum(0))
    if total is not None:
        statistic.add(param, total, owned=True)
    return grad
