"""One TGAdamW step, in three interchangeable implementations.

All three take the same keyword-only arguments and produce the same numbers
(docs/statistic.md section 4). Per parameter, with gradient ``g``, statistic ``s`` and
step ``t``::

    m = b1*m + (1-b1)*g          v = b2*v + (1-b2)*g*g          u = b3*u + (1-b3)*s
    adam = (m / (1-b1**t)) / max(sqrt(v / (1-b2**t)), eps)
    true = (m / (1-b1**t)) / max(sqrt(u / (1-b3**t)), eps)
    if graft: true = true * norm(adam) / (norm(true) + eps)
    p = p - lr*weight_decay*p
    p = p - lr*true

A parameter whose ``stats[i]`` is ``None`` takes the ``adam`` update and leaves its
``u`` alone (``exp_avg_true_sqs[i]`` may then be ``None`` too).

All three fold the bias corrections into host scalars (``_StepScalars``):
``max(sqrt(v / bc2), eps) = max(sqrt(v), eps*sqrt(bc2)) / sqrt(bc2)``, so that no
tensor pass is spent on ``m / bc1``, ``v / bc2`` or ``u / bc3``; ``adam`` is
materialised only for its norm (``graft=True``), and the update is added with one
``addcdiv_``/``addcmul_``.

* ``_single_tensor_tgadamw``: a loop of ordinary tensor ops, one parameter at a time.
  On the CPU (contiguous tensors of one dtype, the usual case) parameters under
  ``SMALL`` (8K) elements, whose cost is host overhead, go through the ``_foreach``
  ops together, and each larger one through ``_chunked_cpu_step``: chunks of ``CHUNK``
  (512K) elements, so that the ~11 ops on a chunk find it in cache; one scratch tensor
  per call (the size of the largest parameter) instead of a fresh temporary per op;
  grafting norms summed per chunk on the host (``.item()`` of CPU tensors, no
  synchronisation), ``||adam||**2`` as ``sum(m * (m / max(v, eps_v**2)))``, the update
  added with a host-scalar ``alpha``. With ``graft=True`` that is ~28 element passes
  (the tensor-op loop used on other devices: ~32, plus an allocation per temporary).
  Measured on 10M float32 parameters in 99 tensors, 2 cores: 33-34 ms per step, i.e.
  0.96x ``torch.optim.AdamW(foreach=True)`` when that takes its usual 36 ms, but 1.4x
  in runs where AdamW's temporaries happen to be served without page faults (23 ms).
* ``_multi_tensor_tgadamw``: the same sequence of ops as the unchunked loop with
  ``torch._foreach_*`` over all parameters of one device and dtype (bitwise the same
  results as that loop on CPU; the chunked loop sums the norms in another order, so
  ulps of the grafting scale).
* ``_fused_tgadamw`` (``_fused.py``): on the CPU the C kernel of ``_native.py`` (12
  element passes, about 1.9x fused AdamW), elsewhere ``torch.compile``-generated
  kernels, per parameter one reduction pass (moments and both norms) and one update
  pass, compiled once per process with dynamic shapes; equal up to float rounding.
* The C kernel is compiled only for ``fused=True``; ``TGAdamW()`` on the CPU runs the
  single-tensor loop (no compiler needed).

Before any of them runs, ``tgadamw`` checks the shapes (``_check_tensors``): a
gradient, statistic or state tensor of another shape than its parameter, or a
statistic on another device, raises the same ``ValueError`` for every implementation,
before any tensor is changed.

Low-precision parameters (bf16/fp16) keep float32 state; their update is computed
in float32 and rounded once when written back.

Non-finite values are never replaced: the formula is evaluated with IEEE
arithmetic, as AdamW evaluates its own. A NaN in ``g`` or ``s`` therefore makes the
parameter NaN (with ``graft=True`` the whole tensor, since the grafting norm is NaN),
exactly as a NaN gradient does in ``torch.optim.AdamW``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch

from truegrad.optim._helpers import (
    _check_tensors,
    _pick,
    _step_scalars,
    _StepScalars,
)

__all__ = ["tgadamw"]

Tensor = torch.Tensor


# ----------------------------------------------------------------- single tensor

def _single_tensor_tgadamw(
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
    small = [i for i, p in enumerate(params) if p.numel() < SMALL and p.device.type == "cpu"]
    if small:
        # host cost dominates these: one _foreach op per op for all of them (same ops as
        # the unchunked loop below, bitwise the same results on CPU)
        lists = (params, grads, stats, exp_avgs, exp_avg_sqs, exp_avg_true_sqs, state_steps)
        _multi_tensor_tgadamw(
            *_pick(small, lists),
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            eps=eps,
            weight_decay=weight_decay,
            graft=graft,
            maximize=maximize,
        )
        if len(small) == len(params):
            return
        large = sorted(set(range(len(params))) - set(small))
        params, grads, stats, exp_avgs, exp_avg_sqs, exp_avg_true_sqs, state_steps = _pick(
            large, lists
        )
    decay = 1.0 - lr * weight_decay
    cpu_scratch: Tensor | None = None  # as large as the largest CPU parameter, for this call only
    for i, param in enumerate(params):
        grad = grads[i]
        stat = stats[i]
        exp_avg, exp_avg_sq, exp_avg_true_sq = exp_avgs[i], exp_avg_sqs[i], exp_avg_true_sqs[i]
        state_dtype = exp_avg.dtype
        if grad.dtype != state_dtype:
            grad = grad.to(state_dtype)
        if maximize:
            grad = -grad
        step_t = state_steps[i]
        step_t += 1
        c = _step_scalars(step_t.item(), beta1, beta2, beta3, eps)  # CPU scalar: no sync

        # p (a float32 copy for bf16/fp16 parameters) after weight decay; rounded once at the end
        full = param if param.dtype == state_dtype else param.to(state_dtype)
        tensors = (full, grad, stat, exp_avg, exp_avg_sq, exp_avg_true_sq)
        if param.device.type == "cpu" and _chunkable(*tensors):
            if cpu_scratch is None or cpu_scratch.dtype != state_dtype:
                n_max = max(
                    p.numel()
                    for p, m in zip(params, exp_avgs)
                    if m.dtype == state_dtype and p.device.type == "cpu"
                )
                cpu_scratch = torch.empty(n_max, dtype=state_dtype)
            _chunked_cpu_step(
                full.view(-1),
                grad.view(-1),
                None if stat is None else stat.view(-1),
                exp_avg.view(-1),
                exp_avg_sq.view(-1),
                None if exp_avg_true_sq is None else exp_avg_true_sq.view(-1),
                cpu_scratch,
                c,
                beta1=beta1,
                beta2=beta2,
                beta3=beta3,
                lr=lr,
                eps=eps,
                decay=decay,
                graft=graft,
            )
            if full is not param:
                param.copy_(full)
            continue
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        del grad
        if decay != 1.0:
            full.mul_(decay)
        if stat is None:
            denom = exp_avg_sq.sqrt().clamp_min_(c.eps_v)
            full.addcdiv_(exp_avg, denom, value=-lr * c.k_v)
        else:
            assert exp_avg_true_sq is not None
            exp_avg_true_sq.lerp_(stat.to(state_dtype), 1 - beta3)
            if graft:
                # one scratch tensor: adam / k_v (needed for its norm only), then true / k_u
                scratch = exp_avg_sq.sqrt().clamp_min_(c.eps_v)
                adam = torch.div(exp_avg, scratch, out=scratch)
                norm_adam = torch.linalg.vector_norm(adam)
                denom = torch.sqrt(exp_avg_true_sq, out=scratch).clamp_min_(c.eps_u)
                true = torch.div(exp_avg, denom, out=scratch)
                # lr * true * ||adam|| / (||true|| + eps) = true/k_u * scale
                norm_true = torch.linalg.vector_norm(true).add_(eps / c.k_u)
                scale = norm_adam.div_(norm_true).mul_(-lr * c.k_v)
                full.addcmul_(true, scale)
            else:
                denom = exp_avg_true_sq.sqrt().clamp_min_(c.eps_u)
                full.addcdiv_(exp_avg, denom, value=-lr * c.k_u)
        if full is not param:
            param.copy_(full)


#: CPU parameters with fewer elements go through ``_multi_tensor_tgadamw`` together.
SMALL = 1 << 13

#: Elements per chunk of ``_chunked_cpu_step`` (2 MiB of float32 per tensor: the tensors
#: of a chunk stay in the last-level cache between the ops on it). Measured with 2 threads:
#: 128K-element chunks lose ~10% and 32K ~50% to per-op and thread fork/join overhead.
CHUNK = 1 << 19


def _chunkable(*tensors: Tensor | None) -> bool:
    dtype = tensors[0].dtype  # type: ignore[union-attr]
    return all(
        t is None
        or (t.device.type == "cpu" and t.dtype == dtype and not t.is_sparse and t.is_contiguous())
        for t in tensors
    )


def _chunked_cpu_step(
    p: Tensor,
    g: Tensor,
    s: Tensor | None,
    m: Tensor,
    v: Tensor,
    u: Tensor | None,
    scratch: Tensor,
    c: _StepScalars,
    *,
    beta1: float,
    beta2: float,
    beta3: float,
    lr: float,
    eps: float,
    decay: float,
    graft: bool,
) -> None:
    """One parameter's step on flat contiguous CPU tensors, in chunks of ``CHUNK`` elements.

    Same formula and elementwise ops as the general loop, with the CPU in mind: the ops
    of a chunk run while it is in cache; ``scratch`` (at least ``p.numel()`` elements)
    replaces every temporary; the grafting norms are summed per chunk on the host (CPU
    scalars, so ``.item()`` does not synchronise anything) and ``||adam / k_v||**2`` is
    ``sum(m * (m / max(v, eps_v**2)))`` (one pass less than ``sqrt``, ``clamp``, ``div``,
    ``norm``; the ``sqrt`` form is kept when ``eps_v**2`` underflows in the state dtype).
    With ``graft=True`` the chunks leave ``true / k_u`` in ``scratch`` and ``p`` is
    updated after the loop (``mul_`` and ``add_``), once the scale is known.
    """
    n = p.numel()
    if s is None or not graft:
        # AdamW update (no statistic) or TrueGrad without grafting: one loop, no norms
        if s is None:
            denom_src, floor, value = v, c.eps_v, -lr * c.k_v
        else:
            denom_src, floor, value = u, c.eps_u, -lr * c.k_u
        for a in range(0, n, CHUNK):
            b = min(n, a + CHUNK)
            gc, mc, vc, bc, pc = g[a:b], m[a:b], v[a:b], scratch[: b - a], p[a:b]
            mc.lerp_(gc, 1 - beta1)
            vc.mul_(beta2).addcmul_(gc, gc, value=1 - beta2)
            if s is not None:
                u[a:b].lerp_(s[a:b], 1 - beta3)  # type: ignore[index]
            torch.sqrt(denom_src[a:b], out=bc).clamp_min_(floor)  # type: ignore[index]
            if decay != 1.0:
                pc.mul_(decay)
            pc.addcdiv_(mc, bc, value=value)
        return
    assert u is not None
    eps_v2 = c.eps_v * c.eps_v
    dot = eps_v2 >= torch.finfo(m.dtype).tiny
    sum_adam = sum_true = 0.0
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        gc, mc, vc, uc, bc = g[a:b], m[a:b], v[a:b], u[a:b], scratch[a:b]
        mc.lerp_(gc, 1 - beta1)
        vc.mul_(beta2).addcmul_(gc, gc, value=1 - beta2)
        uc.lerp_(s[a:b], 1 - beta3)
        if dot:  # (m / max(sqrt(v), eps_v))**2 = m * (m / max(v, eps_v**2))
            torch.clamp(vc, min=eps_v2, out=bc)
            sum_adam += torch.dot(mc, torch.div(mc, bc, out=bc)).item()
        else:
            torch.sqrt(vc, out=bc).clamp_min_(c.eps_v)
            torch.div(mc, bc, out=bc)
            sum_adam += torch.dot(bc, bc).item()
        torch.sqrt(uc, out=bc).clamp_min_(c.eps_u)
        torch.div(mc, bc, out=bc)  # true / k_u, kept for the update
        sum_true += torch.dot(bc, bc).item()
    # lr * true * ||adam|| / (||true|| + eps) = true/k_u * scale
    scale = -lr * c.k_v * _div(math.sqrt(sum_adam), math.sqrt(sum_true) + eps / c.k_u)
    if decay != 1.0:
        p.mul_(decay)
    p.add_(scratch[:n], alpha=scale)


def _div(a: float, b: float) -> float:
    """``a / b`` for ``a >= 0`` (or NaN) with IEEE semantics at ``b == 0``, as tensor ops."""
    if b == 0.0:
        return math.inf if a > 0.0 else math.nan
    return a / b


# ----------------------------------------------------------------- multi tensor


def _multi_tensor_tgadamw(
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
    # Buckets of parameters that share device, dtype and whether they carry a statistic:
    # each bucket runs the same op sequence as the single-tensor loop with _foreach ops.
    buckets: dict[tuple[torch.device, torch.dtype, bool], list[int]] = defaultdict(list)
    for i, param in enumerate(params):
        buckets[(param.device, param.dtype, stats[i] is not None)].append(i)
    decay = 1.0 - lr * weight_decay

    for (_, _, has_stat), index in buckets.items():
        b_params = [params[i] for i in index]
        b_exp_avgs = [exp_avgs[i] for i in index]
        b_exp_avg_sqs = [exp_avg_sqs[i] for i in index]
        b_steps = [state_steps[i] for i in index]
        state_dtype = b_exp_avgs[0].dtype
        b_grads = [grads[i] if grads[i].dtype == state_dtype else grads[i].to(state_dtype) for i in index]
        if maximize:
            b_grads = torch._foreach_neg(b_grads)

        torch._foreach_add_(b_steps, 1)
        cs = [_step_scalars(s.item(), beta1, beta2, beta3, eps) for s in b_steps]  # CPU

        torch._foreach_lerp_(b_exp_avgs, b_grads, 1 - beta1)
        torch._foreach_mul_(b_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(b_exp_avg_sqs, b_grads, b_grads, value=1 - beta2)
        del b_grads
        full = b_params
        if b_params[0].dtype != state_dtype:
            full = [p.to(state_dtype) for p in b_params]
        if decay != 1.0:
            torch._foreach_mul_(full, decay)
        if not has_stat:
            denom = torch._foreach_sqrt(b_exp_avg_sqs)
            torch._foreach_clamp_min_(denom, [c.eps_v for c in cs])
            torch._foreach_addcdiv_(full, b_exp_avgs, denom, [-lr * c.k_v for c in cs])
        else:
            b_exp_avg_true_sqs = [exp_avg_true_sqs[i] for i in index]
            b_stats = [stats[i] if stats[i].dtype == state_dtype else stats[i].to(state_dtype) for i in index]
            torch._foreach_lerp_(b_exp_avg_true_sqs, b_stats, 1 - beta3)
            del b_stats
            if graft:
                # adam / k_v first (needed for its norm only), so that at most two
                # temporaries are alive at a time
                denom = torch._foreach_sqrt(b_exp_avg_sqs)
                torch._foreach_clamp_min_(denom, [c.eps_v for c in cs])
                adam = torch._foreach_div(b_exp_avgs, denom)
                del denom
                norm_adam = torch._foreach_norm(adam)
                del adam
                denom = torch._foreach_sqrt(b_exp_avg_true_sqs)
                torch._foreach_clamp_min_(denom, [c.eps_u for c in cs])
                true = torch._foreach_div(b_exp_avgs, denom)
                del denom
                norm_true = torch._foreach_norm(true)
                torch._foreach_add_(norm_true, [eps / c.k_u for c in cs])
                torch._foreach_div_(norm_adam, norm_true)
                torch._foreach_mul_(norm_adam, [-lr * c.k_v for c in cs])
                torch._foreach_addcmul_(full, true, norm_adam)
            else:
                denom = torch._foreach_sqrt(b_exp_avg_true_sqs)
                torch._foreach_clamp_min_(denom, [c.eps_u for c in cs])
                torch._foreach_addcdiv_(full, b_exp_avgs, denom, [-lr * c.k_u for c in cs])
        if full is not b_params:
            torch._foreach_copy_(b_params, full)


# ----------------------------------------------------------------- dispatch


def tgadamw(
    params: list[Tensor],
    grads: list[Tensor],
    stats: list[Tensor | None],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_true_sqs: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    foreach: bool,
    fused: bool,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    graft: bool,
    maximize: bool,
    describe: Callable[[int], str] | None = None,
) -> None:
    """Functional TGAdamW step over lists of tensors (see the module docstring).

    ``fused=True``: ``_fused._fused_tgadamw`` (the C kernel of ``_native.py`` for CPU
    tensors, compiled when needed; Inductor kernels elsewhere). ``foreach=True``:
    ``_multi_tensor_tgadamw``. Otherwise ``_single_tensor_tgadamw`` (the default on the
    CPU: no compiler needed).

    Every implementation starts from the same check (``_check_tensors``): a gradient,
    statistic or state tensor whose shape is not its parameter's, or a statistic on
    another device, raises ``ValueError`` naming the parameter (``describe(i)``, by
    default its position in the lists), before any tensor is changed.
    """
    _check_tensors(params, grads, stats, exp_avgs, exp_avg_sqs, exp_avg_true_sqs, describe)
    if fused:
        from truegrad.optim._fused import _fused_tgadamw

        impl = _fused_tgadamw
    elif foreach:
        impl = _multi_tensor_tgadamw
    else:
        impl = _single_tensor_tgadamw
    impl(
        params,
        grads,
        stats,
        exp_avgs,
        exp_avg_sqs,
        exp_avg_true_sqs,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        beta3=beta3,
        eps=eps,
        weight_decay=weight_decay,
        graft=graft,
        maximize=maximize,
    )
