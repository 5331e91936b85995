"""TGAdamW ``fused=True``: the C kernel of ``_native.py`` on the CPU, ``torch.compile``-generated
(Inductor) kernels elsewhere.

CPU parameters take the C kernel (``NATIVE_CPU``; compiled on first use in about a
second, then cached on disk) and its 12 element passes per grafted parameter, one C
call per dtype and step: measured 1.9x ``torch.optim.AdamW(fused=True)`` on 10M float32
parameters in 99 tensors (the Inductor kernels below: 3x, after ~6-9 s of
``torch.compile``). Where no C compiler works, CPU parameters fall back to the Inductor
kernels. The rest of this docstring describes those.

Per parameter of ``numel`` n, with contiguous 1-D aliases of the parameter ``p``, its
gradient ``g``, statistic ``s`` and state ``m, v, u`` (all of shape ``(n,)``; ``m, v,
u`` in the state dtype, float32 for bf16/fp16 parameters) and the step scalars of
``_functional._StepScalars`` (``eps_v = eps*sqrt(bc2)``, ``k_v = sqrt(bc2)/bc1``, and
the same with ``bc3`` for ``u``), one step with ``graft=True`` is::

    # kernel 1 (`_moments_and_coef`): one reduction pass; reads g, s, m, v, u, writes m, v, u
    m = lerp(m, g, 1-b1);  v = b2*v + (1-b2)*g*g;  u = lerp(u, s, 1-b3)
    a = ||m / max(sqrt(v), eps_v)||                      # = ||adam|| / k_v
    t = ||m / max(sqrt(u), eps_u)||                      # = ||true|| / k_u, before grafting
    coef = -lr * k_v * a / (t + eps / k_u)               # 0-d, stays on the device
    # kernel 2 (`_apply_true`): one elementwise pass; reads p, m, u, writes p
    p = p*(1 - lr*wd) + coef * m / max(sqrt(u), eps_u)

i.e. 12 passes over n elements (AdamW: 7), and the numbers of docs/statistic.md section 4
up to float rounding. Without grafting (`_step_true`) or without a statistic
(`_step_adam`, the ``adam`` update) the step is one elementwise kernel (10 and 7
passes). Each kernel is compiled once per process (``compiled_kernels``) with
dynamic shapes and serves every parameter size; the scalars travel in one small
tensor ``h`` on the parameter's device, so a changing ``lr`` or step neither
recompiles nor synchronises host and device.

Parameters with fewer than ``MIN_NUMEL`` elements (where the host cost of a compiled
call exceeds its kernel time), empty ones, and ones whose tensors are not all
contiguous take the ``torch._foreach`` implementation, which computes the same formula.

Cost model: each compiled call costs about 40-100 us of host time (Dynamo guards and
wrappers), two per grafted parameter. On a 2-core CPU with 10M parameters in 99
tensors this is ~7 ms of a ~30 ms step; compiling one graph over the whole parameter
list instead removes it (measured: 20 ms instead of 27.6 ms for the 33 large tensors)
but costs ~45 s of compilation per parameter list and recompiles whenever the list
changes, so the per-parameter kernels are used. On a GPU the host time per tensor,
not the kernels, bounds this implementation when there are many small tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from truegrad.optim import _native
from truegrad.optim._functional import _multi_tensor_tgadamw
from truegrad.optim._helpers import _pick, _step_scalars

__all__ = ["MIN_NUMEL", "NATIVE_CPU", "compiled_kernels"]

Tensor = torch.Tensor

#: Parameters with fewer elements take the ``torch._foreach`` path (see module docstring).
MIN_NUMEL = 1 << 15

#: CPU parameters take the C kernel of ``_native.py`` when it compiles (see module docstring).
NATIVE_CPU = True

# Layout of the scalar tensor ``h`` (state dtype, parameter's device).
_SIGN, _W1, _B2, _W2, _W3, _EPS_V, _EPS_U, _EPS_T, _STEP_V, _STEP_U, _DECAY = range(11)

# realize_reads_threshold: realise a pointwise result as soon as it is read twice, so the
# new m, v, u are written once (into the state) and both norms read them in the same loop.
# cpp.min_chunk_size: parallelise CPU loops whatever the size of the example a kernel was
# compiled for (Inductor otherwise decides from that size, and its on-disk cache would hand
# a serial kernel, compiled for a small tensor, to every later size).
_INDUCTOR_OPTIONS = {"realize_reads_threshold": 1, "cpp.min_chunk_size": 1}


def _moments_and_coef(g: Tensor, s: Tensor, m: Tensor, v: Tensor, u: Tensor, h: Tensor) -> Tensor:
    """Update ``m, v, u`` in place; return the 0-d update coefficient ``coef``."""
    g = g.to(m.dtype) * h[_SIGN]
    m.lerp_(g, h[_W1])
    v.mul_(h[_B2]).addcmul_(g, g, value=h[_W2])
    u.lerp_(s.to(m.dtype), h[_W3])
    norm_adam = (m / v.sqrt().clamp_min(h[_EPS_V])).square().sum().sqrt()  # ||adam|| / k_v
    norm_true = (m / u.sqrt().clamp_min(h[_EPS_U])).square().sum().sqrt()  # ||true|| / k_u
    return norm_adam / (norm_true + h[_EPS_T]) * h[_STEP_V]


def _apply_true(p: Tensor, m: Tensor, u: Tensor, coef: Tensor, h: Tensor) -> None:
    """``p = p*(1 - lr*wd) + coef * m / max(sqrt(u), eps_u)``, rounded once into ``p``."""
    p.copy_(p.to(m.dtype) * h[_DECAY] + m / u.sqrt().clamp_min(h[_EPS_U]) * coef)


def _step_true(p: Tensor, g: Tensor, s: Tensor, m: Tensor, v: Tensor, u: Tensor, h: Tensor) -> None:
    """TrueGrad update without grafting, one elementwise kernel."""
    g = g.to(m.dtype) * h[_SIGN]
    m.lerp_(g, h[_W1])
    v.mul_(h[_B2]).addcmul_(g, g, value=h[_W2])
    u.lerp_(s.to(m.dtype), h[_W3])
    p.copy_(p.to(m.dtype) * h[_DECAY] + m / u.sqrt().clamp_min(h[_EPS_U]) * h[_STEP_U])


def _step_adam(p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor) -> None:
    """AdamW update (parameter without statistic), one elementwise kernel."""
    g = g.to(m.dtype) * h[_SIGN]
    m.lerp_(g, h[_W1])
    v.mul_(h[_B2]).addcmul_(g, g, value=h[_W2])
    p.copy_(p.to(m.dtype) * h[_DECAY] + m / v.sqrt().clamp_min(h[_EPS_V]) * h[_STEP_V])


@functools.cache
def compiled_kernels(threads: int = 0) -> dict[str, Callable[..., Any]]:
    """The four kernels wrapped in ``torch.compile``, created once per process and
    CPU thread count (``threads``, 0 for ``torch.get_num_threads()``); each compiles on
    its first call, once per device and dtype it meets.

    The thread count is part of the Inductor options so that a kernel compiled (or
    cached on disk) for another ``torch.set_num_threads`` is not reused.
    """
    if not torch._dynamo.is_inductor_supported():
        raise RuntimeError(
            "TGAdamW(fused=True) needs torch.compile with the Inductor backend, which is not "
            "supported on this platform; use fused=False (the foreach implementation)."
        )
    options = {**_INDUCTOR_OPTIONS, "cpp.threads": threads or torch.get_num_threads()}
    compile_ = functools.partial(torch.compile, dynamic=True, options=options)
    kernels = (_moments_and_coef, _apply_true, _step_true, _step_adam)
    return {fn.__name__: compile_(fn) for fn in kernels}


def _call(kernel: Callable[..., Any], *args: Any) -> Any:
    try:
        return kernel(*args)
    except torch._dynamo.exc.TorchDynamoException as exc:  # includes Inductor's errors
        raise RuntimeError(
            "TGAdamW(fused=True) could not compile its kernels with torch.compile (Inductor); "
            "use fused=False (the foreach implementation), or fix the torch.compile setup "
            f"(e.g. a C++ compiler for CPU, Triton for GPU). Cause: {type(exc).__name__}: {exc}"
        ) from exc


def _hyper(values: list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The hyperparameters as one tensor on ``device``: copied from pinned memory without
    blocking, so that no host-device synchronisation happens."""
    h = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return h
    try:
        h = h.pin_memory()
    except RuntimeError:  # no pinned memory for this accelerator: a plain copy
        pass
    return h.to(device, non_blocking=True)


def _flat(t: Tensor) -> Tensor:
    """1-D alias of a contiguous tensor that is not a view (``_base`` is None), so that
    one compiled kernel serves parameters of every rank; it shares ``t``'s memory and
    version counter, so in-place writes are seen by autograd's checks."""
    return t.view(-1).detach()


def _is_fusable(tensors: list[Tensor | None]) -> bool:
    return all(t is None or t.is_contiguous() for t in tensors)


def _fused_tgadamw(
    params: list[Tensor],
    grads: list[Tensor],
    stats: list[Tensor | None],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_true_sqs: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    graft: bool,
    maximize: bool,
) -> None:
    lists = (params, grads, stats, exp_avgs, exp_avg_sqs, exp_avg_true_sqs, state_steps)
    hyper = dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        beta3=beta3,
        eps=eps,
        weight_decay=weight_decay,
        graft=graft,
        maximize=maximize,
    )
    if NATIVE_CPU and any(p.device.type == "cpu" for p in params):
        lib = _native.library(build=True)
        if lib is not None:  # CPU parameters: the C kernel (_native.py); others continue here
            cpu = [i for i, p in enumerate(params) if p.device.type == "cpu"]
            if len(cpu) == len(params):
                _native._native_tgadamw(*lists, lib=lib, **hyper)
                return
            _native._native_tgadamw(*_pick(cpu, lists), lib=lib, **hyper)
            other = [i for i, p in enumerate(params) if p.device.type != "cpu"]
            lists = _pick(other, lists)
            params, grads, stats, exp_avgs, exp_avg_sqs, exp_avg_true_sqs, state_steps = lists

    fused, rest = [], []
    for i, param in enumerate(params):
        tensors = [param, grads[i], stats[i], exp_avgs[i], exp_avg_sqs[i], exp_avg_true_sqs[i]]
        big = param.numel() >= MIN_NUMEL
        (fused if big and not grads[i].is_sparse and _is_fusable(tensors) else rest).append(i)
    if rest:
        _multi_tensor_tgadamw(*_pick(rest, lists), **hyper)
    if not fused:
        return

    kernels = compiled_kernels(torch.get_num_threads())
    torch._foreach_add_([state_steps[i] for i in fused], 1)
    hypers: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}
    for i in fused:
        m = exp_avgs[i]
        step = state_steps[i].item()  # CPU scalar: no device synchronisation
        key = (step, m.dtype, m.device)
        h = hypers.get(key)
        if h is None:
            c = _step_scalars(step, beta1, beta2, beta3, eps)
            values = [-1.0 if maximize else 1.0, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - beta3]
            values += [c.eps_v, c.eps_u, eps / c.k_u, -lr * c.k_v, -lr * c.k_u]
            values.append(1.0 - lr * weight_decay)
            h = hypers[key] = _hyper(values, m.dtype, m.device)
        p, g, m, v = _flat(params[i]), _flat(grads[i]), _flat(m), _flat(exp_avg_sqs[i])
        stat, u = stats[i], exp_avg_true_sqs[i]
        if stat is None:
            _call(kernels["_step_adam"], p, g, m, v, h)
            continue
        assert u is not None
        s, u = _flat(stat), _flat(u)
        if graft:
            coef = _call(kernels["_moments_and_coef"], g, s, m, v, u, h)
            _call(kernels["_apply_true"], p, m, u, coef, h)
        else:
            _call(kernels["_step_true"], p, g, s, m, v, u, h)
