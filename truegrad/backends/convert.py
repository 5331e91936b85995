"""In-place conversion of an existing model's modules to their ``truegrad.nn`` classes.

Each supported module gets ``module.__class__`` swapped for its ``truegrad.nn``
counterpart, and every trainable parameter of the model becomes tracked by the engine
(:func:`truegrad.parameter.track`, a class swap too): no Parameter object is created, so parameter ids, optimizer and DDP
references, ``state_dict`` keys and outputs are unchanged. Lookup follows the MRO:

* a module whose type is exactly a registered ``torch.nn`` type becomes the
  registered ``truegrad.nn`` type;
* a subclass that does not override ``forward`` (e.g. torch's
  ``NonDynamicallyQuantizableLinear``) becomes a cached subclass of both, so
  ``isinstance`` checks against the original subclass still hold;
* a subclass with its own ``forward`` is left alone (its forward decides which ops
  run; ``patch_torch`` covers it if they are torch functionals truegrad replaces).

The handle's ``undo()`` restores every original class. Converting twice is a no-op.

Saving and copying (``torch.save``/``torch.load``, ``pickle``, ``copy.deepcopy``). A whole
model saved or copied keeps what it is at that moment:

* **while prepared** by ``"nn"``/``"patch_torch"`` (converted) or ``"auto"``/``"patch_model"``
  (tracked), it comes back with the ``truegrad.nn`` classes the conversion gave its modules
  (a generated class, such as ``MultiheadAttention.out_proj``'s, is rebuilt by
  :func:`_rebuild_mixed`: the file names torch's or the user's class and the ``truegrad.nn``
  class, never the generated one) and with :class:`~truegrad.parameter.TrueGradParameter`
  parameters, so ``truegrad`` must be importable to load it. It shares no parameter, buffer
  or statistic with the original and is **not prepared**: no backend is registered on it and
  torch is not patched (``patch_torch``'s patch is global, never saved). Like a model built
  from ``truegrad.nn`` modules, its backward already writes the exact statistic; call
  ``prepare`` again with the same backend to register it (a different backend is then
  refused, and ``patch_torch`` patches torch again). That handle's ``undo()`` changes only
  what its ``prepare`` changed: the loaded model stays a truegrad model (for plain torch,
  load its ``state_dict`` into a plain model, or use :func:`truegrad.testing.plain_copy`);
* **after** ``undo()``, or never prepared, it is plain torch, inert until prepared (so is a
  copy of a BackPack-prepared model, whose hooks are inert in a copy);
* ``p.grad`` is never saved. ``p.sum_grad_squared`` rides along in the file (torch pickles a
  parameter's attributes) but is dead: a statistic is read only with the gradient it was
  accumulated with, so the loaded one reads as ``None`` and the next backward replaces it
  (:mod:`truegrad.statistic`);
* ``model.state_dict()`` always holds plain ``torch.Tensor`` s: it loads with
  ``torch.load(..., weights_only=True)`` into a plain torch model.
"""

from __future__ import annotations

import torch

from truegrad import _names
from truegrad.backends.base import Handle
from truegrad.nn import REGISTRY
from truegrad.nn.rules import base
from truegrad.nn.rules.registry import Registry, Rule

__all__ = ["convert_modules", "conversion_target"]

_MIXED: dict[tuple[type, type], type] = {}


def _mixed_class(original: type, module_type: type) -> type:
    """The subclass of ``original`` (a subclass of ``module_type``'s torch class without its own
    ``forward``) and ``module_type``, generated once per pair. It carries ``original``'s
    names (``repr``, error messages), so pickle cannot find it by name: its instances reduce
    to :func:`_rebuild_mixed` of the pair instead (both classes importable by name)."""
    key = (original, module_type)
    cls = _MIXED.get(key)
    if cls is None:
        cls = _MIXED[key] = type(
            original.__name__,
            key,
            {
                "__module__": original.__module__,
                "__qualname__": original.__qualname__,
                "_truegrad_original": original,
                "__reduce_ex__": _reduce_mixed,
            },
        )
    return cls


def _reduce_mixed(self: torch.nn.Module, protocol: int) -> tuple:
    """``__reduce_ex__`` of the generated classes (``pickle``, ``torch.save``, ``copy``)."""
    cls = type(self)
    if _MIXED.get(cls.__bases__) is cls and _pickled_by_default(cls.__bases__[0]):
        return _rebuild_mixed, cls.__bases__, self.__getstate__()
    # a subclass of a generated class (``torch.nn.utils.parametrize`` makes one), or an
    # original class with its own pickling: pickled as the classes above would pickle it
    generated = next(c for c in cls.__mro__ if c.__dict__.get("__reduce_ex__") is _reduce_mixed)
    return super(generated, self).__reduce_ex__(protocol)


def _pickled_by_default(original: type) -> bool:
    reduce_ex, reduce = original.__reduce_ex__, original.__reduce__
    return reduce_ex is object.__reduce_ex__ and reduce is object.__reduce__


def _rebuild_mixed(original: type, module_type: type) -> torch.nn.Module:
    """An empty instance of the generated class of the pair (its state is set by the unpickler,
    ``nn.Module.__setstate__``): what a pickled instance of a generated class names."""
    cls = _mixed_class(original, module_type)
    return cls.__new__(cls)


def conversion_target(module: torch.nn.Module, registry: Registry = REGISTRY) -> tuple[Rule | None, type | None, str | None]:
    """``(rule, new class or None, reason)`` for one module; reason explains a ``None`` class."""
    original = type(module)
    rule = registry.lookup(original)
    if rule is None:
        return None, None, f"{original.__name__} has no truegrad rule"
    if isinstance(module, rule.module_type):
        return rule, None, None  # already converted
    if rule.unsupported is not None:
        reason = rule.unsupported(module)
        if reason:
            return rule, None, reason
    if original is rule.torch_type:
        return rule, rule.module_type, None
    if original.forward is rule.torch_type.forward:
        return rule, _mixed_class(original, rule.module_type), None
    return rule, None, (
        f"{original.__name__} subclasses {rule.torch_type.__name__} with its own forward"
    )


def convert_modules(model: torch.nn.Module, registry: Registry = REGISTRY) -> Handle:
    """Swap every convertible module of ``model`` to its ``truegrad.nn`` class, in place.

    Returns:
        A handle whose ``undo()`` restores the original classes of the modules it changed.
    """
    from truegrad import parameter  # the engine imports truegrad.nn

    handle = Handle(f"truegrad.nn conversion of {type(model).__qualname__}")
    _names.remember(model)
    changed: list[tuple[torch.nn.Module, type]] = []
    for module in model.modules():
        _, target, _ = conversion_target(module, registry)
        if target is not None:
            changed.append((module, type(module)))
            module.__class__ = target
    tracked = parameter.track(model.parameters())

    def restore() -> None:
        for module, original in reversed(changed):
            module.__class__ = original
        parameter.untrack(tracked)
        # hooks and use records the rules attached to the parameters
        base.forget([p for module, _ in changed for p in module.parameters(recurse=False)])

    handle.on_undo(restore)
    return handle
