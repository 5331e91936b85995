"""``backend="backpack"``: BackPack's ``SumGradSquared`` behind truegrad's backend interface.

Needs the optional dependency ``backpack-for-pytorch``, installed without its dependencies
(``pip install --no-deps 'backpack-for-pytorch>=1.7' einops unfoldNd``: it declares
torchvision, which would replace a CPU torch by a CUDA build);
importing this module does not, using the backend does. Usage::

    backend = get_backend("backpack")
    handle = backend.prepare(model)
    with backend.backward_context():
        loss_fn(model(x), y).backward()      # p.sum_grad_squared is *added* to

BackPack computes the numbers: its ``SumGradSquared`` module extensions and derivatives
(``extensions/firstorder/sum_grad_squared``) run for every supported module, activated by
``backpack.backpack(extension)`` exactly as in BackPack. What this module replaces is
BackPack's plumbing; its known failure modes become results, clear errors or named
warnings (all subclasses of :class:`BackPackWarning`):

* **Overwriting.** BackPack writes ``p.sum_grad_squared`` itself and overwrites it on
  every backward. Here it writes a private attribute (:data:`SAVEFIELD`), which is taken
  off the parameter right away; on leaving :meth:`BackPackBackend.backward_context` every
  backward's result is *added* through :func:`truegrad.statistic.add`.
* **Global hooks.** ``backpack.extend`` hooks every non-container module into one
  process-global list; ``CTX.remove_hooks()`` unhooks every model but leaves
  ``_backpack_extend=True``, so a later ``extend`` silently does nothing. Here only
  modules that BackPack's ``SumGradSquared`` handles are hooked, and ``undo()`` removes
  exactly this model's hooks and restores its ``inplace`` flags; preparing again works.
* **Attributes on modules.** BackPack sets ``module.input0``/``module.output`` in every
  forward (kept if backward never runs; a ``TypeError`` for a module with a child called
  ``output``, as in Hugging Face BERT). Here the inputs live in the backward hook's
  closure, are freed with the graph, and are set on the module only while BackPack runs.
* **In-place operations.** BackPack's full backward hooks make a module output modified
  in place (``out += identity`` in a ResNet block, ``ReLU(inplace=True)``) fail in the
  forward. Here a tensor hook on each module output gets the output gradient, so in-place
  operations after a module are fine.
* **BatchNorm in training mode.** BackPack raises ``NotImplementedError`` in backward.
  Here its BatchNorm rule runs anyway: with the batch statistics it is the layer's own
  per-sample split of its gradient (docs/statistic.md section 1, what backend ``"nn"``
  computes), announced once per model by a :class:`BatchNormTrainingWarning`.
* **Mixed precision.** Under bf16/fp16 autocast BackPack fails (``RuntimeError: expected
  scalar type Float but found BFloat16``). Here the output gradient and the inputs are
  cast to float32 (float64 for float64 parameters) before BackPack runs: the statistic is
  computed and kept in float32, as precise as the low-precision ``p.grad`` itself.
* **Weight sharing.** BackPack lets one use of a parameter overwrite the other, silently
  wrong. A parameter owned by several modules (tied embeddings) is reported by
  :meth:`~BackPackBackend.coverage` and gets no statistic; a module called twice in one
  backward gets none either, with a :class:`SharedParameterWarning` naming it.
* **Unsupported modules.** BackPack warns once per module and backward with an unnamed
  ``UserWarning``. Here :meth:`~BackPackBackend.coverage` names every parameter and why,
  and ``prepare`` issues one :class:`UncoveredParameterWarning`.
* **Batch dimension.** BackPack takes dim 0 of each module's input as the samples. When
  the modules of one backward disagree (position embeddings of ``torch.arange(T)``), a
  :class:`BatchDimensionWarning` names them.

``inplace=True`` activations are turned off by ``prepare`` (one ``logging`` info message
on the ``"truegrad"`` logger): BackPack reads a module's stored input in backward, so it
must not change after the forward. A stored input that was modified in place anyway is
detected (tensor version counter) and raises a clear error instead of a wrong statistic.

Supported (exact class, as BackPack looks modules up by ``type(module)``): Linear,
Conv1d/2d/3d, ConvTranspose1d/2d/3d (``padding_mode="zeros"``), BatchNorm1d/2d/3d
(``affine=True, track_running_stats=True``), Embedding (no ``padding_idx``, ``max_norm``,
``scale_grad_by_freq``, ``sparse``), RNN and LSTM (one layer, ``batch_first=True``,
``bias=True``, tanh, no dropout, unidirectional). Inputs are batched along dim 0.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import weakref
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from truegrad import _bypass, _compat, _names, statistic
from truegrad._optional import require
from truegrad.backends.base import Backend, Handle, already_prepared, check_model, mark_prepared
from truegrad.engine import door, forward, samples

__all__ = [
    "BackPackBackend",
    "BackPackWarning",
    "BatchDimensionWarning",
    "BatchNormTrainingWarning",
    "SharedParameterWarning",
    "UncoveredParameterWarning",
]

logger = logging.getLogger("truegrad")

#: Where BackPack writes its per-backward result; never ``statistic.ATTRIBUTE``.
SAVEFIELD = "_truegrad_backpack_sum_grad_squared"


class BackPackWarning(UserWarning):
    """Base class of the BackPack backend's warnings."""


class UncoveredParameterWarning(BackPackWarning):
    """Trainable parameters that BackPack cannot give a statistic (listed with the reason)."""


class SharedParameterWarning(BackPackWarning):
    """A parameter used more than once in one backward: BackPack handles each use on its
    own, which is not the statistic, so the parameter gets none."""


class BatchDimensionWarning(BackPackWarning):
    """Modules of one backward saw different sizes of dim 0 (e.g. position embeddings of an
    unbatched ``torch.arange(T)``): their statistics are not over the same samples."""


class BatchNormTrainingWarning(BackPackWarning):
    """BatchNorm in training mode: samples interact, the statistic is each layer's own
    per-sample split of its gradient (docs/statistic.md section 1)."""


# ----------------------------------------------------------------------------- BackPack


def _backpack() -> Any:
    return require("backpack", "backpack", purpose="the BackPack backend (backend='backpack')")


@functools.cache
def _extension() -> Any:
    """The one ``SumGradSquared`` instance all prepared models use (BackPack activates
    extensions by instance, through ``backpack.backpack(extension)``)."""
    _backpack()
    from backpack.extensions import SumGradSquared
    from backpack.extensions.firstorder.sum_grad_squared.batchnorm_nd import SGSBatchNormNd

    class SGSBatchNormAnyMode(SGSBatchNormNd):
        """BackPack's BatchNorm rule without its refusal of training mode: in training mode
        it normalises with the batch statistics, which is the layer's per-sample split."""

        def check_hyperparameters_module_extension(self, *args: Any) -> None:
            return None

    class PrivateSumGradSquared(SumGradSquared):
        """``SumGradSquared`` saving to :data:`SAVEFIELD` instead of ``sum_grad_squared``."""

        def __init__(self) -> None:
            super().__init__()
            self.savefield = SAVEFIELD
            for bn in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d):
                self.set_module_extension(bn, SGSBatchNormAnyMode(), overwrite=True)
            # BackPack keeps its table private; it maps exact classes to module extensions.
            self.table: dict[type, Any] = dict(self._BackpropExtension__module_extensions)

    return PrivateSumGradSquared()


def _active() -> bool:
    from backpack.context import CTX

    return _extension() in CTX.get_active_exts()


def _instance_reason(module: torch.nn.Module, module_ext: Any) -> str | None:
    """Why BackPack cannot handle this instance of a supported class, or ``None``."""
    padding_mode = getattr(module, "padding_mode", "zeros")
    if padding_mode != "zeros":
        return (
            f"padding_mode={padding_mode!r}: BackPack convolves the unpadded input, which "
            "is only right for padding_mode='zeros'"
        )
    if isinstance(getattr(module, "padding", None), str) and module.padding != "valid":
        return f"padding={module.padding!r}: BackPack supports numeric padding only"
    if any(getattr(module, "output_padding", ())):
        return f"output_padding={module.output_padding}: BackPack's transposed convolution fails on it"
    if isinstance(module, torch.nn.Embedding) and module.weight.dtype == torch.float64:
        return (
            "a float64 Embedding: BackPack's Embedding derivative builds a float32 helper "
            "and fails on it (backend 'auto' is exact here)"
        )
    check = getattr(getattr(module_ext, "derivatives", None), "_check_parameters", None)
    if check is not None:
        try:
            check(module)
        except NotImplementedError as error:
            return f"BackPack: {error}"
    return None


def _module_reason(module: torch.nn.Module, local: str) -> str | None:
    """Why BackPack cannot compute the statistic of ``module``'s parameter ``local``."""
    table = _extension().table
    module_ext = table.get(type(module))
    if module_ext is None:
        near = next((k for k in type(module).__mro__[1:] if k in table), None)
        detail = (
            f" (it matches exact classes; this subclasses {near.__qualname__})" if near else ""
        )
        return f"BackPack's SumGradSquared has no extension for {type(module).__qualname__}{detail}"
    if local not in getattr(module_ext, "_ModuleExtension__params", ()):
        return f"BackPack's extension for {type(module).__qualname__} does not compute {local!r}"
    return _instance_reason(module, module_ext)


def _owners(model: torch.nn.Module) -> dict[int, list[tuple[str, torch.nn.Module, str]]]:
    owners: dict[int, list[tuple[str, torch.nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, param in module.named_parameters(recurse=False, remove_duplicate=False):
            entry = (module_name, module, local)
            if not any(m is module and l == local for _, m, l in owners.get(id(param), [])):
                owners.setdefault(id(param), []).append(entry)
    return owners


def _where(module_name: str, module: torch.nn.Module) -> str:
    return f"{module_name or '<model>'!r} ({type(module).__qualname__})"


def _coverage(model: torch.nn.Module) -> dict[str, str | None]:
    owners = _owners(model)
    result: dict[str, str | None] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        uses = owners.get(id(param), [])
        if len(uses) > 1:
            result[name] = (
                "shared by modules " + ", ".join(_where(n, m) for n, m, _ in uses)
                + ": BackPack handles each use on its own, the statistic needs each sample's "
                "uses summed before squaring"
            )
            continue
        module_name, module, local = uses[0]
        reason = _module_reason(module, local)
        if reason is not None:
            result[name] = f"module {_where(module_name, module)}: {reason}"
        else:
            result[name] = _REASON.get(param)
    return result


# ----------------------------------------------------------------------------- hooks


class _ModelState:
    """What the hooks of one ``prepare`` share (no reference to any module)."""

    def __init__(self, batchnorms: int) -> None:
        self.batchnorms = batchnorms
        self.warned_batchnorm = False


def _strip_copied_hooks(module: torch.nn.Module) -> None:
    """Remove the (inert) hooks a module copied from a prepared one carries, which no handle
    of this process can remove."""
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for key in [
            k for k, h in hooks.items()
            if isinstance(h, _Hook) or isinstance(getattr(h, "__self__", None), _Hook)
        ]:
            del hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)
            module._forward_pre_hooks_with_kwargs.pop(key, None)


class _Hook:
    """The forward hook of one module; inert unless it is the module's registered hook
    (a ``copy.deepcopy`` of a prepared model copies hooks, which must not run twice)."""

    def __init__(self, name: str, locals_: tuple[str, ...], state: _ModelState) -> None:
        self.name = name
        self.locals = locals_  # parameters whose result is kept (shared ones are not)
        self.state = state
        self.handle: torch.utils.hooks.RemovableHandle | None = None
        self.pre_handle: torch.utils.hooks.RemovableHandle | None = None

    def enter(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: uses of the module's parameters are its own until it returns."""
        if _HOOKED.get(module) is self:
            _active_modules().append(module)

    def _refuse(self, module: torch.nn.Module, why: str) -> None:
        for local in self.locals:
            param = getattr(module, local, None)
            if param is not None:
                _REFUSED[param] = f"module {_where(self.name, module)}: {why}"

    def _check_input(self, module: torch.nn.Module, x: torch.Tensor) -> str | None:
        """Why BackPack's dim-0 split of this module's input is not the model's samples."""
        if module.__class__ is torch.nn.Embedding and module.weight.dtype == torch.float64:
            return _instance_reason(module, None) or None
        if not forward.in_call():
            return None  # the module is called on its own: it is the model
        tag = samples.layout_of(x)
        if isinstance(tag, samples.Lost):
            return tag.describe()
        if tag is None:
            return (
                "its input does not carry the model's samples (positions such as "
                "torch.arange(T), a table indexed without a batch): BackPack would take its "
                "dim 0 as the samples"
            )
        if not tag.plain or tag.dim != 0:
            if tag.n == 1 and x.dim() and x.shape[0] == 1:
                return None  # one sample and one row: BackPack's split is the whole input
            return (
                f"its input carries the model's samples in {tag.describe()}, but BackPack "
                "takes dim 0 of a module's input as the samples"
            )
        return None

    def __deepcopy__(self, memo: dict) -> _Hook:
        return self

    def __call__(
        self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> None:
        if _HOOKED.get(module) is not self:
            return
        stack = _active_modules()
        if stack and stack[-1] is module:
            stack.pop()
        if (
            not torch.is_grad_enabled()
            or _bypass.bypassed()
            or torch._C._functorch.peek_interpreter_stack() is not None
        ):
            return
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        inputs = list(args) or [v for v in kwargs.values() if isinstance(v, torch.Tensor)][:1]
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        why = self._check_input(module, inputs[0])
        if why is not None:
            self._refuse(module, why)
            return
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training:
            self._warn_batchnorm(module)
        saved = [(x.detach(), x._version) if isinstance(x, torch.Tensor) else (x, None) for x in inputs]
        # BackPack reads the output's values only for RNN/LSTM; otherwise its shape.
        kept_out = (out.detach(), out._version) if isinstance(module, torch.nn.RNNBase) else (
            torch.zeros((), dtype=out.dtype, device=out.device).expand(out.shape), None
        )
        out.register_hook(functools.partial(_run_extension, self, module, saved, kept_out))

    def _warn_batchnorm(self, module: torch.nn.Module) -> None:
        if self.state.warned_batchnorm:
            return
        self.state.warned_batchnorm = True
        warnings.warn(
            f"truegrad backend 'backpack': BatchNorm {_where(self.name, module)} (one of "
            f"{self.state.batchnorms} in this model) is in training mode, so samples interact "
            "through the batch statistics. Its statistic, and that of every layer before it, "
            "is the layer's own per-sample split of its gradient (docs/statistic.md section 1, as "
            "backend 'nn' computes it), not a sum over independent samples. BackPack itself "
            "refuses this; call model.eval() for independent samples.",
            BatchNormTrainingWarning,
            stacklevel=3,
        )


#: module -> its registered hook (weak keys: a dropped model takes its entries along).
_HOOKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: parameter -> why a forward since the last backward_context exit gave BackPack nothing to
#: compute, or a use it does not see (weak keys); emptied by every flush
_REFUSED: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: parameter -> the reason it got no statistic from the last flush (for coverage)
_REASON: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: parameter of a hooked module -> (weak reference to the module, its name) for the use check
_WATCHED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_THREAD = threading.local()


def _active_modules() -> list[torch.nn.Module]:
    """Hooked modules whose forward is running in this thread (innermost last)."""
    stack = getattr(_THREAD, "modules", None)
    if stack is None:
        stack = _THREAD.modules = []
    return stack


def _observe_use(func: Any, args: tuple, kwargs: dict, result: Any) -> None:
    """Engine observer: an op that carries gradient from a watched parameter outside its own
    module's forward (``h @ emb.weight.T``, a table read as ``.weight``) is a use BackPack
    never sees, so the parameter must not get BackPack's number for this forward."""
    if not _WATCHED or not torch.is_grad_enabled():
        return
    outs = [result] if isinstance(result, torch.Tensor) else (
        [r for r in result if isinstance(r, torch.Tensor)] if isinstance(result, (tuple, list)) else []
    )
    if not any(o.requires_grad for o in outs):
        return  # a query (.dtype, .shape), a detached read: not a use of the gradient
    for value in (*args, *kwargs.values()):
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if not isinstance(t, torch.Tensor) or t not in _WATCHED:
                continue
            module_ref, name = _WATCHED[t]
            module = module_ref()
            if module is None or any(m is module for m in _active_modules()):
                continue
            op = samples._name(func)
            _REFUSED[t] = (
                f"used by {op} outside its module {_where(name, module)}: BackPack computes "
                "each module's own use only, and the statistic needs every use of the parameter"
            )


def _refuse_tracked(model: torch.nn.Module) -> None:
    """BackPack on parameters the engine tracks (``truegrad.nn`` modules, a model built while
    ``patch_torch`` was active) would add a second statistic to the engine's."""
    from truegrad.parameter import TrueGradParameter

    tracked = [n for n, p in model.named_parameters() if isinstance(p, TrueGradParameter)]
    if tracked:
        shown = ", ".join(repr(n) for n in tracked[:5]) + (" ..." if len(tracked) > 5 else "")
        raise ValueError(
            f"backend 'backpack' cannot prepare {type(model).__qualname__}: {len(tracked)} of its "
            f"parameters ({shown}) belong to truegrad.nn modules (or the model was built while "
            "patch_torch was active), which compute sum_grad_squared themselves, and BackPack "
            "would add a second statistic. Build the model from torch.nn, or use backend "
            "'auto' (the same statistic)."
        )


def _float(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    return x


def _run_extension(
    hook: _Hook,
    module: torch.nn.Module,
    saved: list[tuple[Any, int | None]],
    kept_out: tuple[torch.Tensor, int | None],
    grad: torch.Tensor,
) -> None:
    """Tensor hook on a module's output: run BackPack's extension on this use."""
    if not _active():
        return
    for index, (x, version) in enumerate([*saved, kept_out]):
        if version is not None and x._version != version:
            what = "output" if index == len(saved) else f"input {index}"
            raise RuntimeError(
                f"truegrad backend 'backpack': the {what} of module {_where(hook.name, module)} "
                "was modified in place after its forward, but BackPack computes the statistic "
                "from its value at forward time. Avoid in-place operations on it."
            )
    params = [(local, getattr(module, local)) for local in hook.locals]
    params = [(local, p) for local, p in params if p is not None and p.requires_grad]
    if not params:
        return
    dtype = torch.float64 if any(p.dtype == torch.float64 for _, p in params) else torch.float32
    stash = {f"input{i}": _float(x, dtype) for i, (x, _) in enumerate(saved)}
    stash["output"] = _float(kept_out[0], dtype)
    for key, value in stash.items():
        setattr(module, key, value)
    try:
        _extension()(module, (None,), (grad.to(dtype),))
    finally:
        for key in stash:
            module.__dict__.pop(key, None)
    # BackPack wrote every parameter of its table (shared ones too): take all, keep ours.
    results = {
        local: p.__dict__.pop(SAVEFIELD, None)
        for local, p in module.named_parameters(recurse=False)
    }
    task = _compat.current_backward_id()
    with _LOCK:
        pending = _PENDING.setdefault(task, _Task())
        pending.sizes.setdefault(grad.shape[0], []).append(_where(hook.name, module))
        for local, p in params:
            value = results.get(local)
            if value is None:
                continue
            entry = pending.results.get(id(p))
            if entry is None:
                pending.results[id(p)] = [p, value, 1]
            else:
                entry[2] += 1


class _Task:
    """What the hooks of one backward (autograd graph task) produced."""

    def __init__(self) -> None:
        self.results: dict[int, list[Any]] = {}  # id(param) -> [param, result, number of uses]
        self.sizes: dict[int, list[str]] = {}  # batch size (dim 0) -> modules that saw it


_LOCK = threading.Lock()
_PENDING: dict[int, _Task] = {}  # graph task id -> _Task
#: held by backward_context: BackPack's extension context is process-wide state
_BACKWARD_LOCK = threading.RLock()


def _flush(keep: bool) -> None:
    """Add every pending result to the statistic (``keep``) or drop them all."""
    with _LOCK:
        tasks = list(_PENDING.values())
        _PENDING.clear()
        refused = dict(_REFUSED.items())
        _REFUSED.clear()
    if not keep:
        return
    for param, why in refused.items():
        _REASON[param] = why
    shared: set[str] = set()
    sizes: list[str] = []
    for task in tasks:
        for param, value, uses in task.results.values():
            if uses > 1:
                shared.add(_names.describe(param))
                _REASON[param] = (
                    f"used {uses} times in one backward (a module called more than once): "
                    "BackPack handles each use on its own, the statistic needs each sample's "
                    "uses summed before squaring"
                )
            elif param not in refused:
                statistic.add(param, value, owned=True)
                _REASON.pop(param, None)
        if len(task.sizes) > 1:
            groups = sorted(task.sizes.items(), key=lambda item: -len(item[1]))
            sizes.append("; ".join(
                f"{size} for {len(where)} modules" if i == 0 and len(where) > 3
                else f"{size} for {', '.join(where)}"
                for i, (size, where) in enumerate(groups)
            ))
    if shared:
        warnings.warn(
            "truegrad backend 'backpack': " + ", ".join(sorted(shared))
            + " used more than once in one backward (a module called twice, or a parameter "
            "shared by modules): BackPack handles each use on its own, which is not the "
            "statistic (each sample's uses must be summed before squaring), so it gets no "
            "sum_grad_squared from this backward. Use backend 'nn' for exact shared uses.",
            SharedParameterWarning,
            stacklevel=4,
        )
    for text in sizes:
        warnings.warn(
            "truegrad backend 'backpack': modules disagree on the batch size (dim 0 of their "
            f"input) in one backward: {text}. BackPack takes dim 0 of each module's input as "
            "the samples, so a module fed an unbatched or broadcast input (e.g. position "
            "embeddings of torch.arange(T)) or a flattened (B*T, D) input sums over other "
            "'samples' than the rest of the model.",
            BatchDimensionWarning,
            stacklevel=4,
        )


# ----------------------------------------------------------------------------- backend


class BackPackBackend(Backend):
    """``backend="backpack"``: BackPack's ``SumGradSquared``, added into the statistic.

    Raises:
        ModuleNotFoundError: on construction if ``backpack-for-pytorch`` is not installed,
            naming the command that installs it without touching torch.
    """

    name = "backpack"

    def __init__(self) -> None:
        self._backpack = _backpack()
        _extension()

    def coverage(self, model: torch.nn.Module) -> dict[str, str | None]:
        """Per trainable parameter ``None`` or why BackPack cannot cover it: its module has
        no ``SumGradSquared`` extension (exact class), an unsupported option, or the
        parameter is shared by several modules. A module called twice in one forward is
        only seen at backward (:class:`SharedParameterWarning`)."""
        return _coverage(model)

    def prepare(self, model: torch.nn.Module) -> Handle:
        """Hook every supported module of ``model`` and turn off ``inplace`` flags.

        Idempotent: modules hooked by an earlier ``prepare`` are left alone. Returns a
        handle whose ``undo()`` removes this call's hooks and restores its flags.
        """
        check_model(model, self.name)
        if (done := already_prepared(model, self.name)) is not None:
            return done
        _refuse_tracked(model)
        _names.remember(model)
        handle = Handle(f"backpack on {type(model).__qualname__}")
        coverage = _coverage(model)
        uncovered = {n: r for n, r in coverage.items() if r is not None}
        owners = _owners(model)
        shared = {pid for pid, uses in owners.items() if len(uses) > 1}
        state = _ModelState(
            sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        )
        hooked: list[torch.nn.Module] = []
        switched: list[tuple[str, torch.nn.Module]] = []
        for module_name, module in model.named_modules():
            if getattr(module, "inplace", None) is True:
                module.inplace = False
                switched.append((module_name, module))
            if module in _HOOKED:
                continue
            locals_ = tuple(
                local
                for local, p in module.named_parameters(recurse=False)
                if p.requires_grad and id(p) not in shared and _module_reason(module, local) is None
            )
            if not locals_:
                continue
            _strip_copied_hooks(module)
            hook = _Hook(module_name, locals_, state)
            hook.handle = module.register_forward_hook(hook, with_kwargs=True, always_call=True)
            hook.pre_handle = module.register_forward_pre_hook(hook.enter, with_kwargs=True)
            _HOOKED[module] = hook
            hooked.append(module)
            for local in locals_:
                # a weak reference: the module holds the parameter (key), which must not be
                # kept alive by its own entry
                _WATCHED[getattr(module, local)] = (weakref.ref(module), module_name)
        claimed = [p for module in hooked for p in module.parameters(recurse=False)]
        door.claim(claimed, self.name)
        handle.on_undo(lambda: door.release(claimed))
        forward.add_observer(_observe_use)

        def restore() -> None:
            forward.remove_observer(_observe_use)
            for module in hooked:
                hook = _HOOKED.get(module)
                if hook is not None and hook.handle is not None:
                    hook.handle.remove()
                    if hook.pre_handle is not None:
                        hook.pre_handle.remove()
                    del _HOOKED[module]
                for param in module.parameters(recurse=False):
                    _WATCHED.pop(param, None)
                    _REFUSED.pop(param, None)
                    _REASON.pop(param, None)
                statistic.forget(module.parameters(recurse=False))
            for _, module in switched:
                module.inplace = True

        handle.on_undo(restore)
        if switched:
            logger.info(
                "truegrad backend 'backpack': turned off inplace on %d module(s) (BackPack "
                "reads module inputs in backward, so they must not change after the "
                "forward): %s; handle.undo() turns them back on",
                len(switched),
                ", ".join(_where(n, m) for n, m in switched),
            )
        if uncovered:
            shown = list(uncovered.items())[:8]
            more = len(uncovered) - len(shown)
            warnings.warn(
                f"truegrad backend 'backpack': {len(uncovered)} of {len(coverage)} trainable "
                f"parameters of {type(model).__qualname__} get no sum_grad_squared:\n  "
                + "\n  ".join(f"{n}: {r}" for n, r in shown)
                + (f"\n  ... and {more} more (backend.coverage(model) lists all)" if more else ""),
                UncoveredParameterWarning,
                stacklevel=2,
            )
        return mark_prepared(model, self.name, handle)

    @contextlib.contextmanager
    def backward_context(self) -> Iterator[None]:
        """Run the backward(s) of prepared models inside this; on exit every backward's
        result is added to ``p.sum_grad_squared``. If the block raises, nothing is added
        and BackPack's global state is restored all the same. BackPack's own state is
        process-wide, so blocks of different threads run one at a time (a lock)."""
        with _BACKWARD_LOCK:
            try:
                with self._backpack.backpack(_extension()):
                    yield
            except BaseException:
                _flush(keep=False)
                raise
            _flush(keep=True)
