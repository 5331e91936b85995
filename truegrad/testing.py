"""Exact oracles for ``p.sum_grad_squared`` (docs/statistic.md section 1).

Users check their own models with these, and every backend of truegrad is tested
against them.

Definition. For a batch of N samples with loss ``L`` (any reduction), let ``y`` be
the model output and ``dL/dy`` the full-batch output gradient. The gradient that
sample ``n`` contributes to a parameter ``p`` is the vector-Jacobian product

    g_n = (dy_n/dp)^T (dL/dy)_n,

so that ``sum_n g_n == p.grad`` and a ``mean`` loss puts its 1/N into every g_n.
The statistic is ``sum_n g_n ** 2``.

Two independent implementations are provided:

* :func:`per_sample_grads` uses ``torch.func`` (``vmap`` of ``vjp`` over
  ``functional_call``), chunked with ``chunk_size`` to bound memory;
* :func:`per_sample_grads_loop` runs one plain autograd backward per sample and
  uses no ``torch.func`` at all (slow; a cross-check).

Both run inside ``truegrad._bypass.bypass()``: a model built from truegrad modules is
differentiated by torch's own ops, so the oracle never shares code with a backend.

Both assume that samples do not interact (no BatchNorm in training mode, no mixing
across the batch dimension); a model that violates this is rejected with a
``ValueError``. For such layers use a layer-level oracle such as
:func:`layer_sum_grad_squared`.

A model that ``backpack.extend`` hooked works with both: ``torch.func`` cannot run a
module's full backward hook, so :func:`per_sample_grads` detaches BackPACK's two hooks
(``hook_store_io``, ``hook_run_extensions``) while it runs and puts them back, in order,
afterwards. Outside a ``with backpack(...)`` block these hooks only store and delete the
module's inputs and outputs, so the gradients are the same with or without them. Any
other full backward hook is refused by :func:`per_sample_grads` with a ``ValueError``
naming the module (use ``method="loop"``, which runs the hooks as autograd does).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch.utils import _pytree as pytree

from truegrad import _bypass, statistic
from truegrad._validate import (
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_module,
    check_number,
    describe,
)

__all__ = [
    "OracleResult",
    "plain_copy",
    "assert_matches_oracle",
    "compare_to_oracle",
    "layer_sum_grad_squared",
    "per_sample_grads",
    "per_sample_grads_loop",
    "sum_grad_squared_oracle",
]

LossFn = Callable[[Any, Any], torch.Tensor]
Inputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class OracleResult:
    """Reference values for every trainable parameter, keyed by qualified name.

    Attributes:
        grad: ``sum_n g_n`` (equals what ``loss.backward()`` puts into ``p.grad``).
        sum_grad_squared: ``sum_n g_n ** 2`` in the statistic's dtype.
    """

    grad: dict[str, torch.Tensor]
    sum_grad_squared: dict[str, torch.Tensor]


# --------------------------------------------------------------------------- helpers


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` that is plain torch: every ``truegrad.nn`` module turned back
    into its ``torch.nn`` class and every tracked parameter into a ``torch.nn.Parameter``
    (values, names and ``requires_grad`` kept; gradients and statistics dropped). Train it
    side by side with ``model`` to compare outputs and ``p.grad`` with torch's own."""
    from truegrad import nn as tnn
    from truegrad.parameter import TrueGradParameter

    twin = copy.deepcopy(model)
    for module in twin.modules():
        rule = tnn.REGISTRY.lookup(type(module))
        if rule is not None and isinstance(module, rule.module_type):
            original = getattr(type(module), "_truegrad_original", rule.torch_type)
            if torch.nn.utils.parametrize.is_parametrized(module):
                original = _parametrized_twin(type(module), original)
            module.__class__ = original
        for param in module.parameters(recurse=False):
            if isinstance(param, TrueGradParameter):
                param.__class__ = torch.nn.Parameter
            param.grad = None
            statistic.clear([param])
    return twin



_PARAMETRIZED_TWINS: dict[tuple[type, type], type] = {}


def _parametrized_twin(cls: type, base: type) -> type:
    """The class ``torch.nn.utils.parametrize`` made for a parametrized ``truegrad.nn``
    module (``ParametrizedLinear``, a subclass of ``truegrad.nn.Linear`` holding the
    parametrized properties), rebuilt on the torch class ``base``."""
    twin = _PARAMETRIZED_TWINS.get((cls, base))
    if twin is None:
        attributes = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        twin = _PARAMETRIZED_TWINS[(cls, base)] = type(cls.__name__, (base,), attributes)
    return twin


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by qualified name; a tied parameter appears once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _restoring_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Put every module's parameters and buffers back afterwards.

    ``torch.func.functional_call`` swaps tensors into modules and back; a module
    registered under two names (``Sequential(lin, act, lin)``) is restored with the
    swapped-in detached tensor. Restoring the dictionaries themselves is exact.
    """
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        yield
    finally:
        for module, parameters, buffers in saved:
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)


def _restores_model(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``function(model, ...)`` inside :func:`_restoring_parameters`."""

    @functools.wraps(function)
    def wrapper(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        check_module(function.__name__, "model", model)  # before anything reads it
        with _restoring_parameters(model):
            return function(model, *args, **kwargs)

    return wrapper


def _check_independent_samples(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            continue
        if module.training or module.running_mean is None:
            why = "is in training mode" if module.training else "has no running statistics"
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) {why}: it normalises with batch "
                "statistics, so its samples interact and the per-sample oracle does not "
                "apply. Call model.eval() (with running statistics) for a per-sample "
                "oracle, or use truegrad.testing.layer_sum_grad_squared for the layer-level one."
            )


_BACKPACK_HOOKS = ("hook_store_io", "hook_run_extensions")


def _is_backpack_hook(hook: Any) -> bool:
    """Whether ``hook`` is one of the two hooks that ``backpack.extend`` registers."""
    return getattr(hook, "__module__", None) == "backpack" and getattr(
        hook, "__name__", None
    ) in _BACKPACK_HOOKS


@contextlib.contextmanager
def _without_backpack_hooks(model: torch.nn.Module) -> Iterator[None]:
    """Detach BackPACK's forward and full backward hooks from every module of ``model``
    for the duration (``torch.func`` cannot run a full backward hook: its
    ``BackwardHookFunction`` has no ``setup_context``), then restore every hook dictionary
    as it was, in its order. Outside ``with backpack(...)`` these hooks do not change any
    gradient. Any other full backward hook raises ``ValueError`` (before anything runs)."""
    saved: list[tuple[torch.nn.Module, dict, dict]] = []
    try:
        for name, module in model.named_modules():
            forward, backward = module._forward_hooks, module._backward_hooks
            if any(_is_backpack_hook(h) for h in (*forward.values(), *backward.values())):
                saved.append((module, dict(forward), dict(backward)))
                for hooks in (forward, backward):
                    for key in [k for k, h in hooks.items() if _is_backpack_hook(h)]:
                        del hooks[key]
            if module._backward_pre_hooks or (
                module._backward_hooks and module._is_full_backward_hook
            ):
                raise ValueError(
                    f"per_sample_grads: module {name or '<model>'!r} ({type(module).__name__}) "
                    "has a full backward hook, which torch.func cannot run; use "
                    "sum_grad_squared_oracle(..., method='loop') or per_sample_grads_loop, "
                    "which run the hook as autograd does"
                )
        yield
    finally:
        for module, forward, backward in saved:
            module._forward_hooks.clear()
            module._forward_hooks.update(forward)
            module._backward_hooks.clear()
            module._backward_hooks.update(backward)


def _as_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Model call arguments: a tensor or other single object, a sequence of positional
    arguments, or a mapping of keyword arguments."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return tuple(inputs), {}
    return (inputs,), {}


def _batch_size(args: Any, batch_dim: int) -> int:
    leaves = [x for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise ValueError("inputs contain no tensor, so there is no batch dimension")
    sizes = {x.shape[batch_dim] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch size along dim {batch_dim}: {sorted(sizes)}")
    return sizes.pop()


def _select(tree: Any, index: int, batch_dim: int) -> Any:
    """Sample ``index`` of every tensor leaf, keeping a batch dimension of size 1."""
    return pytree.tree_map(
        lambda x: x.narrow(batch_dim, index, 1) if isinstance(x, torch.Tensor) else x, tree
    )


def _output_grad(
    model: torch.nn.Module, loss_fn: LossFn, args: tuple, kwargs: dict, targets: Any
) -> tuple[Any, Any]:
    """Full-batch output and ``dL/d output`` (same pytree structure, ``None`` leaves kept)."""
    with torch.enable_grad():
        params = {n: p.detach() for n, p in model.named_parameters()}
        with _restoring_parameters(model):
            output = torch.func.functional_call(model, params, args, kwargs, strict=False)
        leaves, spec = pytree.tree_flatten(output)
        float_leaves = [
            x.detach().requires_grad_(True)
            if isinstance(x, torch.Tensor) and x.is_floating_point()
            else x
            for x in leaves
        ]
        output = pytree.tree_unflatten(float_leaves, spec)
        loss = loss_fn(output, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor")
        wrt = [x for x in float_leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads_iter = iter(grads)
    grad_leaves = []
    for x in float_leaves:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            g = next(grads_iter)
            grad_leaves.append(torch.zeros_like(x) if g is None else g.detach())
        else:
            grad_leaves.append(None)
    return output, pytree.tree_unflatten(grad_leaves, spec)


def _float_pairs(output: Any, grad_output: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    outs, grads = [], []
    for y, g in zip(pytree.tree_leaves(output), pytree.tree_leaves(grad_output, is_leaf=lambda x: x is None)):
        if g is not None:
            outs.append(y)
            grads.append(g)
    return outs, grads


def _squared_sum(per_sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    wide = per_sample.to(torch.float64)
    return wide.square().sum(0).to(dtype)


def _check_oracle_args(
    owner: str,
    model: Any,
    loss_fn: Any,
    inputs: Any,
    batch_dim: Any,
    chunk_size: Any = None,
) -> None:
    """The argument checks of the public oracles, before anything runs: ``TypeError`` for a
    wrong type, ``ValueError`` for a ``batch_dim`` that some input tensor does not have or a
    ``chunk_size`` below 1."""
    check_module(owner, "model", model)
    check_callable(owner, "loss_fn", loss_fn, "callable as loss_fn(output, targets) -> scalar tensor")
    check_int(owner, "batch_dim", batch_dim)
    check_int(owner, "chunk_size", chunk_size, low=1, allow_none=True)
    for x in pytree.tree_leaves(_as_args(inputs)):
        if isinstance(x, torch.Tensor) and not -x.dim() <= batch_dim < x.dim():
            valid = f"in [{-x.dim()}, {x.dim() - 1}]" if x.dim() else "a dimension (none exists)"
            raise ValueError(
                f"{owner}: batch_dim must be {valid} for an input tensor of shape "
                f"{tuple(x.shape)}, got {describe(batch_dim)}"
            )


def _check_tolerances(owner: str, rtol: Any, atol_factor: Any, check_grad: Any, params: Any) -> None:
    check_number(owner, "rtol", rtol, low=0.0)
    check_number(owner, "atol_factor", atol_factor, low=0.0)
    check_bool(owner, "check_grad", check_grad)
    if params is not None and (isinstance(params, (str, bytes)) or not isinstance(params, Iterable)):
        raise TypeError(
            f"{owner}: params must be None or an iterable of parameter names (a list of str), "
            f"got {describe(params)}"
        )


# --------------------------------------------------------------------------- oracles


@_bypass.bypass()
@_restores_model
def per_sample_grads(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any = None,
    *,
    batch_dim: int = 0,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``g_n`` of every trainable parameter, with ``torch.func``.

    Args:
        model: the model; its parameters and buffers are read, never changed.
        loss_fn: ``loss_fn(model_output, targets) -> scalar``; any reduction.
        inputs: a tensor, a sequence of positional arguments, or a mapping of keyword
            arguments; every tensor is batched along ``batch_dim``.
        targets: passed to ``loss_fn`` unchanged (the loss sees the whole batch).
        batch_dim: the batch dimension of the inputs and of the outputs.
        chunk_size: number of samples vectorised at once (``None``: all), to bound memory.

    Returns:
        ``{qualified name: tensor of shape (N, *p.shape)}`` in the parameter's dtype.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, ``loss_fn`` not callable,
            ``batch_dim`` or ``chunk_size`` not an int.
        ValueError: if samples interact (BatchNorm in training mode), inputs are malformed,
            ``batch_dim`` is not a dimension of every input tensor or ``chunk_size < 1``,
            or a module has a full backward hook other than BackPACK's (see the module
            docstring: BackPACK's are detached while the oracle runs).
    """
    _check_oracle_args("per_sample_grads", model, loss_fn, inputs, batch_dim, chunk_size)
    _check_independent_samples(model)
    with _without_backpack_hooks(model):
        return _per_sample_grads_func(model, loss_fn, inputs, targets, batch_dim, chunk_size)


def _per_sample_grads_func(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any,
    batch_dim: int,
    chunk_size: int | None,
) -> dict[str, torch.Tensor]:
    """The body of :func:`per_sample_grads`, after its checks."""
    args, kwargs = _as_args(inputs)
    _batch_size((args, kwargs), batch_dim)
    params = {n: p.detach() for n, p in _trainable(model).items()}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = {n: b for n, b in model.named_buffers()}
    _, grad_output = _output_grad(model, loss_fn, args, kwargs, targets)

    def one_sample(sample_args: tuple, sample_kwargs: dict, sample_grad_out: Any) -> dict:
        batched = pytree.tree_map(
            lambda x: x.unsqueeze(batch_dim) if isinstance(x, torch.Tensor) else x,
            (sample_args, sample_kwargs, sample_grad_out),
        )
        b_args, b_kwargs, b_grad_out = batched

        def forward(trainable: dict) -> list[torch.Tensor]:
            out = torch.func.functional_call(
                model, {**trainable, **frozen, **buffers}, b_args, b_kwargs, strict=False
            )
            outs, _ = _float_pairs(out, b_grad_out)
            return outs

        outs, vjp_fn = torch.func.vjp(forward, params)
        _, grads = _float_pairs(outs, b_grad_out)
        return vjp_fn(grads)[0]

    in_dims = pytree.tree_map(
        lambda x: batch_dim if isinstance(x, torch.Tensor) else None,
        (args, kwargs, grad_output),
        is_leaf=lambda x: x is None,
    )
    result = torch.func.vmap(
        one_sample, in_dims=in_dims, out_dims=0, randomness="error", chunk_size=chunk_size
    )(args, kwargs, grad_output)
    return dict(result)


@_bypass.bypass()
@_restores_model
def per_sample_grads_loop(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any = None,
    *,
    batch_dim: int = 0,
) -> dict[str, torch.Tensor]:
    """The same as :func:`per_sample_grads` with one plain autograd backward per sample.

    Uses no ``torch.func``; the model is run on each sample alone and
    ``torch.autograd.grad`` is taken with that sample's slice of the full-batch
    output gradient. Slow, plainly correct, and independent of ``torch.func``. Raises as
    :func:`per_sample_grads` does.
    """
    _check_oracle_args("per_sample_grads_loop", model, loss_fn, inputs, batch_dim)
    _check_independent_samples(model)
    args, kwargs = _as_args(inputs)
    n_samples = _batch_size((args, kwargs), batch_dim)
    params = _trainable(model)
    _, grad_output = _output_grad(model, loss_fn, args, kwargs, targets)
    per_sample: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for index in range(n_samples):
        s_args, s_kwargs = _select((args, kwargs), index, batch_dim)
        s_grad_out = pytree.tree_map(
            lambda x: x.narrow(batch_dim, index, 1) if isinstance(x, torch.Tensor) else x,
            grad_output,
            is_leaf=lambda x: x is None,
        )
        with torch.enable_grad():
            out = model(*s_args, **s_kwargs)
            outs, grads = _float_pairs(out, s_grad_out)
            g = torch.autograd.grad(outs, list(params.values()), grads, allow_unused=True)
        for (name, p), gi in zip(params.items(), g):
            per_sample[name].append(torch.zeros_like(p) if gi is None else gi.detach())
    return {name: torch.stack(gs) for name, gs in per_sample.items()}


@_bypass.bypass()
def sum_grad_squared_oracle(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any = None,
    *,
    batch_dim: int = 0,
    chunk_size: int | None = None,
    method: Literal["func", "loop"] = "func",
) -> OracleResult:
    """``sum_n g_n`` and ``sum_n g_n ** 2`` for every trainable parameter.

    The squares are summed in float64 and returned in the statistic's dtype
    (float32, or float64 for float64 parameters). ``method="loop"`` uses
    :func:`per_sample_grads_loop` instead of ``torch.func``. Raises as
    :func:`per_sample_grads` does, and ``ValueError`` for another ``method``.
    """
    check_choice("sum_grad_squared_oracle", "method", method, ("func", "loop"))
    _check_oracle_args("sum_grad_squared_oracle", model, loss_fn, inputs, batch_dim, chunk_size)
    if method == "func":
        grads = per_sample_grads(
            model, loss_fn, inputs, targets, batch_dim=batch_dim, chunk_size=chunk_size
        )
    elif method == "loop":
        grads = per_sample_grads_loop(model, loss_fn, inputs, targets, batch_dim=batch_dim)
    return OracleResult(
        grad={n: g.sum(0) for n, g in grads.items()},
        sum_grad_squared={
            n: _squared_sum(g, statistic.statistic_dtype(g.dtype)) for n, g in grads.items()
        },
    )


def layer_sum_grad_squared(
    per_sample_weight_grads: torch.Tensor,
) -> torch.Tensor:
    """Layer-level oracle: ``sum_n G[n] ** 2`` of a layer's own per-sample split.

    For layers whose samples interact (BatchNorm in training mode) ``g_n`` is the
    op's own per-sample split of its weight gradient: capture the layer's input and
    output gradient, form the per-sample products (shape ``(N, *p.shape)``) and
    pass them here. Summed in float64, returned in float32/float64.

    Raises:
        TypeError: ``per_sample_weight_grads`` is not a tensor.
        ValueError: it is not a dense real floating-point tensor with a sample dimension.
    """
    owner, name, value = "layer_sum_grad_squared", "per_sample_weight_grads", per_sample_weight_grads
    expected = "a dense real floating-point tensor of shape (N, *p.shape)"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be {expected}, got {describe(value)}")
    problem = None
    if value.layout != torch.strided:
        problem = f"a sparse tensor ({value.layout})"
    elif not value.is_floating_point():
        problem = f"a {str(value.dtype).removeprefix('torch.')} tensor"
        problem += " (complex)" if value.is_complex() else ""
    elif value.dim() == 0:
        problem = "a tensor of 0 dimensions (no sample dimension)"
    if problem is not None:
        raise ValueError(f"{owner}: {name} must be {expected}, got {problem}")
    return _squared_sum(per_sample_weight_grads, statistic.statistic_dtype(per_sample_weight_grads.dtype))


# --------------------------------------------------------------------------- comparison


def _mismatch(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol_factor: float
) -> float | None:
    """Relative error ``max|a-e| / max|e|`` if the tolerance is violated, else ``None``."""
    if actual.shape != expected.shape:
        return float("inf")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    scale = e.abs().max() if e.numel() else torch.tensor(0.0, dtype=torch.float64)
    diff = (a - e).abs()
    bound = atol_factor * scale + rtol * e.abs()
    if bool((diff <= bound).all()) and bool(torch.isfinite(a).all()):
        return None
    denom = float(scale) if float(scale) > 0 else 1.0
    return float(diff.max()) / denom if diff.numel() else float("inf")


def compare_to_oracle(
    model: torch.nn.Module,
    expected: OracleResult,
    *,
    rtol: float = 1e-4,
    atol_factor: float = 1e-6,
    check_grad: bool = True,
    params: Iterable[str] | None = None,
) -> list[str]:
    """Compare ``p.sum_grad_squared`` (and ``p.grad``) of ``model`` with ``expected``.

    A value matches when ``|actual - expected| <= atol_factor * max|expected| + rtol *
    |expected|`` elementwise (docs/statistic.md: rtol 1e-4, atol 1e-6 times the largest value).

    Args:
        params: names to check (default: every parameter in ``expected``); a checked
            parameter without a statistic is a mismatch.

    Returns:
        One line per mismatch (empty when everything matches).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, ``expected`` not an
            :class:`OracleResult`, a tolerance not a number, ``check_grad`` not a bool or
            ``params`` not an iterable of names.
        ValueError: a tolerance negative or NaN.
    """
    check_module("compare_to_oracle", "model", model)
    if not isinstance(expected, OracleResult):
        raise TypeError(
            "compare_to_oracle: expected must be an OracleResult (from sum_grad_squared_oracle), "
            f"got {describe(expected)}"
        )
    _check_tolerances("compare_to_oracle", rtol, atol_factor, check_grad, params)
    names = list(expected.sum_grad_squared) if params is None else list(params)
    model_params = dict(model.named_parameters())
    problems: list[str] = []
    for name in names:
        if name not in model_params:
            problems.append(f"{name}: no such parameter in the model")
            continue
        p = model_params[name]
        sgs = statistic.get(p)
        if sgs is None:
            problems.append(f"{name}: has no sum_grad_squared")
        else:
            err = _mismatch(sgs, expected.sum_grad_squared[name], rtol, atol_factor)
            if err is not None:
                problems.append(f"{name}: sum_grad_squared relative error {err:.3e}")
            if sgs.dtype != statistic.statistic_dtype(p.dtype):
                problems.append(f"{name}: sum_grad_squared has dtype {sgs.dtype}")
        if check_grad:
            if p.grad is None:
                problems.append(f"{name}: has no grad")
            else:
                err = _mismatch(p.grad, expected.grad[name], rtol, atol_factor)
                if err is not None:
                    problems.append(f"{name}: grad relative error {err:.3e}")
    return problems


def assert_matches_oracle(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Any = None,
    *,
    run_backward: bool = True,
    rtol: float = 1e-4,
    atol_factor: float = 1e-6,
    check_grad: bool = True,
    params: Iterable[str] | None = None,
    batch_dim: int = 0,
    chunk_size: int | None = None,
) -> None:
    """Check a model's statistic and gradient against the exact ``torch.func`` oracle.

    With ``run_backward=True`` the gradients and statistics of the model are cleared,
    one forward/backward of ``loss_fn(model(inputs), targets)`` is run (through
    whatever backend the model uses), and the result is compared; otherwise the
    values already on the parameters are compared.

    Raises:
        AssertionError: one error listing every mismatching parameter by qualified
            name with its relative error.
        TypeError, ValueError: a bad argument (as :func:`per_sample_grads` and
            :func:`compare_to_oracle`), checked before anything runs.
    """
    owner = "assert_matches_oracle"
    _check_oracle_args(owner, model, loss_fn, inputs, batch_dim, chunk_size)
    check_bool(owner, "run_backward", run_backward)
    _check_tolerances(owner, rtol, atol_factor, check_grad, params)
    expected = sum_grad_squared_oracle(
        model, loss_fn, inputs, targets, batch_dim=batch_dim, chunk_size=chunk_size
    )
    if run_backward:
        trainable = list(_trainable(model).values())
        for p in trainable:
            p.grad = None
        statistic.clear(trainable)
        args, kwargs = _as_args(inputs)
        loss_fn(model(*args, **kwargs), targets).backward()
    problems = compare_to_oracle(
        model, expected, rtol=rtol, atol_factor=atol_factor, check_grad=check_grad, params=params
    )
    if problems:
        raise AssertionError(
            f"{len(problems)} mismatch(es) against the exact oracle "
            f"(rtol={rtol}, atol={atol_factor} x max):\n  " + "\n  ".join(problems)
        )
