"""The model call: which tensors are the model's samples, followed through its forward.

A sample is one index of dim 0 of the model's input (docs/statistic.md section 1). The *model call*
is the outermost ``nn.Module`` call of a thread while truegrad tracks anything (a prepared
model, a ``truegrad.nn`` module, an active ``patch_torch``): module hooks installed with
:func:`torch.nn.modules.module.register_module_forward_pre_hook` while there is at least one
:class:`Tracking` token alive (reference-counted; the last release removes them). That call

* records N, the batch size: dim 0 of its first positional tensor argument (else of the
  keyword tensors, by the most common dim-0 size: ``position_ids`` of shape ``(1, T)`` next to
  ``input_ids (N, T)`` do not fool it);
* tags every tensor argument whose dim 0 has size N with ``Layout(0, N)``
  (:mod:`truegrad.engine.samples`); other arguments are constants;
* pushes a ``TorchFunctionMode`` for the duration of the call that tags every tensor the
  forward computes with where its samples are (:func:`truegrad.engine.samples.propagate`).

Ops that use a parameter read these tags to split their contributions per sample, whatever
the layout (sequence-first, flattened to ``(N*T, D)``, transposed ...). Other threads see
their own calls only (thread-local state); the hooks themselves are process-wide while any
token lives, and cost one Python call per module call.

Nothing is tracked inside ``truegrad._bypass.bypass()`` (the oracles), inside ``torch.func``
transforms, or while ``torch.compile`` traces.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from truegrad import _bypass, _compat
from truegrad.engine import samples

__all__ = [
    "Tracking", "acquire", "add_observer", "batch_size", "enter", "exit", "hook_model",
    "in_call", "remove_observer", "track_module",
]

_STATE = threading.local()
_LOCK = threading.RLock()  # reentrant: a token may be released by the garbage collector
_USERS = 0  # live Tracking tokens
_OPEN = 0  # module calls in progress, in all threads, entered through the global hooks
_HOOKS: list[Any] = []


#: callables ``observer(func, args, kwargs, result)`` told about every torch function of a
#: model call after it ran (the BackPack backend checks where its modules' parameters are
#: used); add and remove only
_OBSERVERS: list[Callable[[Any, tuple, dict, Any], None]] = []


def add_observer(observer: Callable[[Any, tuple, dict, Any], None]) -> None:
    """Tell ``observer`` about every torch function of every model call (reference-counted:
    add it once per user, remove it as often)."""
    with _LOCK:
        _OBSERVERS.append(observer)


def remove_observer(observer: Callable[[Any, tuple, dict, Any], None]) -> None:
    with _LOCK:
        if observer in _OBSERVERS:
            _OBSERVERS.remove(observer)


class _Tracker(TorchFunctionMode):
    """Tags the outputs of every torch function of a model call (see the module docstring)."""

    def __torch_function__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        func = getattr(func, "torch_function", func)  # a truegrad door: torch's own function
        result = func(*args, **kwargs)
        if not torch.is_grad_enabled():
            # Nothing recorded for backward (inside a rule's own forward, optimizer updates): a
            # tensor made here and used later reads as a constant, which the engine handles
            # exactly (a computation on parameters meeting the samples later) or refuses.
            return result
        for observer in tuple(_OBSERVERS):
            observer(func, args, kwargs, result)
        try:
            samples.propagate(func, args, kwargs, result)
        except Exception:  # noqa: BLE001 - following the samples must never break a forward
            samples.lose(func, result)
        return result


#: keyword arguments that hold the batch, most telling first: a model's inputs, then a layer's
#: (a Hugging Face layer recomputed by activation checkpointing is called with keywords only)
_NAMED_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features",
                 "input", "x", "inputs", "hidden_states", "hidden_state", "src", "query")


def _batch(args: tuple, kwargs: dict) -> int | None:
    for value in args:
        leaves = [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.dim() > 0]
        if leaves:
            return leaves[0].shape[0]
    for name in _NAMED_INPUTS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    sizes = Counter(
        t.shape[0] for t in pytree.tree_leaves(kwargs) if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    return sizes.most_common(1)[0][0] if sizes else None


def _tracking_disabled() -> bool:
    return (
        _bypass.bypassed()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.compiler.is_compiling()
    )


class _Call:
    __slots__ = ("n", "epoch", "mode", "adopts")

    def __init__(self, n: int | None, epoch: int, mode: _Tracker | None, adopts: bool) -> None:
        self.n = n
        self.epoch = epoch
        self.mode = mode
        #: a call found by the global hooks (a model of truegrad.nn modules, no backend): a
        #: plain trainable parameter met by a tracked op is tracked from then on (one a
        #: parametrization registered on a truegrad.nn module); a prepared model's call
        #: leaves that to its backend (prepare again) and records why it has no statistic
        self.adopts = adopts


def adopts_parameters() -> bool:
    """Whether the model call in progress tracks plain parameters it meets (see ``_Call``)."""
    call = getattr(_STATE, "call", None)
    return call is not None and call.adopts


def enter(args: tuple, kwargs: dict, adopts: bool = False) -> None:
    """Start of a module call (pre-hook): the outermost one begins a model call."""
    depth = getattr(_STATE, "depth", 0)
    _STATE.depth = depth + 1
    if depth:
        return
    if _tracking_disabled():
        _STATE.call = None
        return
    n = _batch(args, kwargs)
    epoch = samples.new_epoch()
    if n is not None:
        layout = samples.Layout(0, n)
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n:
                samples.tag(t, layout)
    mode = _Tracker()
    mode.__enter__()
    _STATE.call = _Call(n, epoch, mode, adopts)


def exit() -> None:
    """End of a module call (forward hook, also after an exception)."""
    depth = getattr(_STATE, "depth", 0) - 1
    _STATE.depth = max(depth, 0)
    if depth > 0:
        return
    call = getattr(_STATE, "call", None)
    _STATE.call = None
    if call is not None and call.mode is not None:
        try:
            call.mode.__exit__(None, None, None)
        except Exception:  # the forward left another mode on top of ours: leave them be
            pass


def in_call() -> bool:
    """Whether a tracked model call is in progress in this thread."""
    return getattr(_STATE, "call", None) is not None


def batch_size() -> int | None:
    """N of the model call in progress, or ``None`` outside one."""
    call = getattr(_STATE, "call", None)
    return None if call is None else call.n


# ----------------------------------------------------------------------------- the hooks


def _model_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    enter(args, kwargs)


def _model_post_hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    exit()


class _HookFlag:
    """The mark (in ``module.__dict__``) that a module carries the model-call hooks. A copy
    of the module (``copy.deepcopy``, ``torch.save``/``torch.load``) carries a copy of the mark
    and of the hooks; :data:`_FLAGS` tells the genuine mark from a copied one."""


#: module -> the mark hook_model put on it in this process (weak keys)
_FLAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_KEY = "_truegrad_model_hooks"


def _strip_copied_hooks(module: torch.nn.Module) -> None:
    """Remove model-call hooks a module carries from the module it was copied from (no handle
    of this process can remove them)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, hook in hooks.items() if hook in (_model_pre_hook, _model_post_hook)]:
            del hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)


def hook_model(model: torch.nn.Module) -> Callable[[], None]:
    """Make every call of ``model`` (and of its containers, for calls of a submodule on its
    own) a model call; returns the function that removes the hooks. Idempotent."""
    handles = []
    for module in model.modules():
        if module is not model and not any(True for _ in module.children()):
            continue
        flag = module.__dict__.get(_KEY)
        if flag is not None:
            if _FLAGS.get(module) is flag:
                continue  # hooked already
            _strip_copied_hooks(module)  # copied with its hooks from a prepared model
        flag = module.__dict__[_KEY] = _FLAGS[module] = _HookFlag()
        handles.append(module.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
        handles.append(
            module.register_forward_hook(_model_post_hook, with_kwargs=True, always_call=True)
        )
        handles.append(_Flag(module))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


class _Flag:
    """Removes the mark that a module carries the model-call hooks."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = weakref.ref(module)

    def remove(self) -> None:
        module = self.module()
        if module is not None:
            module.__dict__.pop(_KEY, None)
            _FLAGS.pop(module, None)


class EagerForward:
    """``model.forward`` of a model the engine follows: the class's forward, never traced by
    ``torch.compile``. The engine follows the model's samples by seeing every op of the
    forward, which a compiled graph hides; so ``torch.compile(model)`` runs such a model's
    forward eagerly (exactly), and the rest of the program compiles as usual. Picklable."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.compiler.disable
    def __call__(self, *args: object, **kwargs: object) -> object:
        return type(self.model).forward(self.model, *args, **kwargs)


#: model -> number of handles that gave it its EagerForward (weak keys)
_EAGER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def run_eagerly(model: torch.nn.Module) -> Callable[[], None]:
    """Give ``model`` an :class:`EagerForward` (unless the user set an instance ``forward``);
    returns the function that takes it away once no handle needs it. An EagerForward copied
    from a prepared model (``copy.deepcopy``, ``torch.load``) is taken over."""
    current = model.__dict__.get("forward")
    if current is not None and not isinstance(current, EagerForward):
        return lambda: None  # the user's own
    if current is None or current.model is not model:
        model.forward = EagerForward(model)  # type: ignore[method-assign]
        _EAGER[model] = 0
    _EAGER[model] = _EAGER.get(model, 0) + 1
    done = []

    def restore() -> None:
        if done:
            return
        done.append(True)
        count = _EAGER.get(model, 1) - 1
        if count > 0:
            _EAGER[model] = count
            return
        _EAGER.pop(model, None)
        if isinstance(model.__dict__.get("forward"), EagerForward):
            del model.__dict__["forward"]

    return restore


def _holds_tracked(model: torch.nn.Module) -> bool:
    from truegrad.parameter import TrueGradParameter  # it imports this module

    return any(isinstance(p, TrueGradParameter) for p in model.parameters())


def _compiled_wrapper_call(wrapper: torch.nn.Module) -> bool:
    """The call of ``torch.compile(model)``'s wrapper (eager, before the wrapped model is
    traced): when ``model`` holds tracked parameters (``truegrad.nn`` modules) and no backend
    prepared it, its forward is made to run eagerly and this call is the model call (the
    wrapper's arguments are the model's). Returns whether it is."""
    model = getattr(wrapper, "_orig_mod", None)
    if not isinstance(model, torch.nn.Module) or _FLAGS.get(model) is not None:
        return False  # a prepared model: its own hooks count it
    if not isinstance(model.__dict__.get("forward"), EagerForward):
        if "forward" in model.__dict__ or not _holds_tracked(model):
            return False
        run_eagerly(model)
    return True


def _pre_hook(module: torch.nn.Module, args: tuple) -> None:
    if torch.compiler.is_compiling():
        return  # traced: a compiled forward hides its ops, so it is no model call (see door)
    if module.__dict__.get(_KEY) is not None:
        return  # its own hooks (which see the keyword arguments) count it
    if isinstance(module, _compat.optimized_module_type()) and not _compiled_wrapper_call(module):
        return  # torch.compile's wrapper: the model call is the wrapped module's
    stack = getattr(_STATE, "global_calls", None)
    if stack is None:
        stack = _STATE.global_calls = []
    outermost = not getattr(_STATE, "depth", 0)
    stack.append((id(module), outermost))
    _opened(1)  # every call entered here: the hooks must stay until its post-hook has run
    if outermost:
        enter(args, _compat.module_call_kwargs(), adopts=True)
    else:
        _STATE.depth += 1  # an inner module call: nothing to record


def _post_hook(module: torch.nn.Module, args: tuple, *rest: Any) -> None:
    if torch.compiler.is_compiling():
        return
    stack = getattr(_STATE, "global_calls", None)
    if not stack or stack[-1][0] != id(module):
        return  # its pre-hook did not run (its own hooks count it, torch.compile's wrapper,
        # or the hooks were installed during its call)
    stack.pop()
    exit()
    _opened(-1)


class Tracking:
    """A token that keeps the model-call hooks installed while it is alive (or until
    :meth:`release`). Tokens are counted; the hooks go when the last one is released."""

    __slots__ = ("_released", "__weakref__")

    def __init__(self) -> None:
        self._released = False
        _add_user()

    def release(self) -> None:
        if not self._released:
            self._released = True
            _remove_user()

    def __del__(self) -> None:  # pragma: no cover - depends on the garbage collector
        try:
            self.release()
        except Exception:
            pass


def _add_user() -> None:
    global _USERS
    with _LOCK:
        _USERS += 1
        if not _HOOKS:
            from torch.nn.modules import module as _module

            _HOOKS.append(_module.register_module_forward_pre_hook(_pre_hook))
            _HOOKS.append(_module.register_module_forward_hook(_post_hook, always_call=True))


def _remove_user() -> None:
    global _USERS
    with _LOCK:
        _USERS -= 1
        _drop_hooks_if_unused()


def _drop_hooks_if_unused() -> None:
    """Remove the global hooks when no token lives and no call entered through them is still
    open (a token released by the garbage collector in the middle of a forward must not take
    away the hook that closes that forward)."""
    if _USERS == 0 and _OPEN == 0:
        while _HOOKS:
            _HOOKS.pop().remove()


def _opened(delta: int) -> None:
    global _OPEN
    with _LOCK:
        _OPEN += delta
        if delta < 0:
            _drop_hooks_if_unused()


def acquire() -> Tracking:
    """A new token (see :class:`Tracking`)."""
    return Tracking()


def track_module(module: torch.nn.Module) -> None:
    """Keep the hooks installed for as long as ``module`` lives (``truegrad.nn`` modules)."""
    token = Tracking()
    weakref.finalize(module, token.release)


def users() -> int:
    """Number of live tokens (for tests)."""
    return _USERS
