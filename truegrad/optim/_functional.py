"""One TGAdamW step, in three interchangeable implementations.

All three take the same keyword-only arguments and produce the same numbers
(CONTRACT.md section 4). Per parameter, with gradient ``g``, statistic ``s`` and
step ``t``::

    m = b1*m + (1-b1)*g          v = b2*v + (1-b2)*g*g          u = b3*u + (1-b3)*s
    adam = (m / (1-b1**t)) / max(sqrt(v / (1-b2**t)), eps)
    true = (m / (1-b1**t)) / max(sqrt(u / (1-b3**t)), eps)
    if graft: true = true * norm(adam) / (norm(true) + eps)
    p = p - lr*weight_decay*p
    p = p - lr*true

A parameter whose ``stats[i]`` is ``None`` takes the ``adam`` update and leaves its
``u`` alone (``exp_avg_true_sqs[i]`` may then be ``None`` too).

* ``_single_tensor_tgadamw``: a loop of ordinary tensor ops, one parameter at a time.
* ``_multi_tensor_tgadamw``: the same sequence of ops with ``torch._foreach_*`` over
  all parameters of one device and dtype.
* ``_fused_tgadamw``: one ``torch.compile``-generated kernel pair per parameter
  (a reduction for the two norms, then the update), compiled once with dynamic
  shapes; every state tensor is read and written once more at most.

Low-precision parameters (bf16/fp16) keep float32 state; their update is computed
in float32 and rounded once when written back.

Non-finite values are never replaced: the formula is evaluated with IEEE
arithmetic, as AdamW evaluates its own. A NaN in ``g`` or ``s`` therefore makes the
parameter NaN (with ``graft=True`` the whole tensor, since the grafting norm is NaN),
exactly as a NaN gradient does in ``torch.optim.AdamW``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["tgadamw"]

Tensor = torch.Tensor


def _bias_corrections(step: float, beta1: float, beta2: float, beta3: float) -> tuple[float, float, float]:
    return 1.0 - beta1**step, 1.0 - beta2**step, 1.0 - beta3**step


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
        bc1, bc2, bc3 = _bias_corrections(step_t.item(), beta1, beta2, beta3)  # CPU scalar: no sync

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = exp_avg.div(bc1)
        adam = m_hat.div(exp_avg_sq.div(bc2).sqrt_().clamp_min_(eps))
        if stat is None:
            update = adam
        else:
            assert exp_avg_true_sq is not None
            exp_avg_true_sq.lerp_(stat.to(state_dtype), 1 - beta3)
            true = m_hat.div_(exp_avg_true_sq.div(bc3).sqrt_().clamp_min_(eps))
            if graft:
                norm_adam = torch.linalg.vector_norm(adam)
                norm_true = torch.linalg.vector_norm(true)
                true.mul_(norm_adam.div_(norm_true.add_(eps)))
            update = true
        _apply(param, update, lr, weight_decay)


def _apply(param: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
    """``p = p*(1 - lr*wd) - lr*update``, computed in the update's dtype, rounded once."""
    if param.dtype == update.dtype:
        param.mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
    else:
        param.copy_(param.to(update.dtype).mul_(1 - lr * weight_decay).add_(update, alpha=-lr))


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
        corrections = [_bias_corrections(s.item(), beta1, beta2, beta3) for s in b_steps]  # CPU
        bc1 = [c[0] for c in corrections]

        torch._foreach_lerp_(b_exp_avgs, b_grads, 1 - beta1)
        torch._foreach_mul_(b_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(b_exp_avg_sqs, b_grads, b_grads, value=1 - beta2)
        del b_grads
        m_hat = torch._foreach_div(b_exp_avgs, bc1)
        denom = torch._foreach_div(b_exp_avg_sqs, [c[1] for c in corrections])
        torch._foreach_sqrt_(denom)
        torch._foreach_clamp_min_(denom, eps)
        if not has_stat:
            torch._foreach_div_(m_hat, denom)
            update = m_hat
        else:
            adam = torch._foreach_div(m_hat, denom)
            b_exp_avg_true_sqs = [exp_avg_true_sqs[i] for i in index]
            b_stats = [stats[i] if stats[i].dtype == state_dtype else stats[i].to(state_dtype) for i in index]
            torch._foreach_lerp_(b_exp_avg_true_sqs, b_stats, 1 - beta3)
            del b_stats
            denom = torch._foreach_div(b_exp_avg_true_sqs, [c[2] for c in corrections])
            torch._foreach_sqrt_(denom)
            torch._foreach_clamp_min_(denom, eps)
            torch._foreach_div_(m_hat, denom)
            del denom
            if graft:
                norm_adam = torch._foreach_norm(adam)
                norm_true = torch._foreach_norm(m_hat)
                torch._foreach_add_(norm_true, eps)
                torch._foreach_div_(norm_adam, norm_true)
                torch._foreach_mul_(m_hat, norm_adam)
            del adam
            update = m_hat

        if b_params[0].dtype == state_dtype:
            torch._foreach_mul_(b_params, 1 - lr * weight_decay)
            torch._foreach_add_(b_params, update, alpha=-lr)
        else:
            full = [p.to(state_dtype) for p in b_params]
            torch._foreach_mul_(full, 1 - lr * weight_decay)
            torch._foreach_add_(full, update, alpha=-lr)
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
) -> None:
    """Functional TGAdamW step over lists of tensors (see the module docstring)."""
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
