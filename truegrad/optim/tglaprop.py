r"""TGLaProp and TGRMSProp: the original TrueGrad library's (5.0.0) LaProp and debiased
RMSProp whose second moment is the sum of squared per-sample gradients."""

from __future__ import annotations

from typing import Any

import torch

from truegrad._validate import describe
from truegrad.optim._family import ParamsT, TrueGradFamily, check_beta
from truegrad.optim.weight_decay import WeightDecayBase

Tensor = torch.Tensor

__all__ = ["TGLaProp", "TGRMSProp"]


def _normalized_single(x: Tensor, sq: Tensor, new_sq: Tensor | None, beta: float, k: float, eps: float) -> Tensor:
    r""":math:`q \leftarrow \beta q + (1-\beta) n` (``n = x^2`` when ``new_sq`` is None), then
    :math:`x / \max(\sqrt{q / (1-\beta^k)}, \epsilon)`."""
    sq.mul_(beta)
    if new_sq is None:
        sq.addcmul_(x, x, value=1.0 - beta)
    else:
        sq.add_(new_sq, alpha=1.0 - beta)
    return x / (sq / (1.0 - beta**k)).sqrt().clamp(min=eps)


def _normalized_foreach(
    xs: list[Tensor], sqs: list[Tensor], new_sqs: list[Tensor] | None, beta: float, ks: list[float], eps: float
) -> list[Tensor]:
    torch._foreach_mul_(sqs, beta)
    if new_sqs is None:
        torch._foreach_addcmul_(sqs, xs, xs, value=1.0 - beta)
    else:
        torch._foreach_add_(sqs, new_sqs, alpha=1.0 - beta)
    denom = torch._foreach_mul(sqs, [1.0 / (1.0 - beta**k) for k in ks])
    torch._foreach_sqrt_(denom)
    torch._foreach_clamp_min_(denom, eps)
    return torch._foreach_div(xs, denom)


def _apply(
    params: list[Tensor],
    true: list[Tensor | None],
    base: list[Tensor | None],
    alpha_true: list[float],
    alpha_base: list[float],
    graft: bool,
    eps: float,
    foreach: bool,
) -> None:
    r"""The step of upstream's ``TrueGrad.step``: with a TrueGrad update :math:`\tau` and
    ``graft``, :math:`\theta \mathrel{+}= \alpha_b \frac{\lVert b\rVert}{\lVert\tau\rVert + \epsilon}\tau`;
    with :math:`\tau` and no graft :math:`\theta \mathrel{+}= \alpha_\tau \tau`; without a
    statistic :math:`\theta \mathrel{+}= \alpha_b b`."""
    grafted = [i for i, t in enumerate(true) if t is not None and graft]
    plain_true = [i for i, t in enumerate(true) if t is not None and not graft]
    plain_base = [i for i, t in enumerate(true) if t is None]
    if not foreach:
        for i in grafted:
            t, b = true[i], base[i]
            params[i].add_(t * (alpha_base[i] * b.norm() / (t.norm() + eps)))
        for i in plain_true:
            params[i].add_(true[i], alpha=alpha_true[i])
        for i in plain_base:
            params[i].add_(base[i], alpha=alpha_base[i])
        return
    if grafted:
        ts = [true[i] for i in grafted]
        b_norms = torch._foreach_norm([base[i] for i in grafted])
        t_norms = torch._foreach_norm(ts)
        torch._foreach_add_(t_norms, eps)
        torch._foreach_div_(b_norms, t_norms)
        torch._foreach_mul_(b_norms, [alpha_base[i] for i in grafted])
        torch._foreach_add_([params[i] for i in grafted], torch._foreach_mul(ts, b_norms))
    for idx, src, alphas in ((plain_true, true, alpha_true), (plain_base, base, alpha_base)):
        if idx:
            torch._foreach_add_([params[i] for i in idx], torch._foreach_mul([src[i] for i in idx], [alphas[i] for i in idx]))


class TGLaProp(TrueGradFamily):
    r"""TrueGrad-LaProp (upstream ``truegrad.optim.TGLaProp``, 5.0.0).

    LaProp normalises the gradient by the running second moment *before* the momentum.
    With gradient :math:`g`, statistic :math:`s = \sum_n g_n^2` and step :math:`k`
    (per parameter):

    .. math::
        \begin{aligned}
          & u_k = \beta_4 u_{k-1} + (1-\beta_4) s, \qquad
            \hat m_k = \beta_3 \hat m_{k-1} + (1-\beta_3)
              \frac{g}{\max(\sqrt{u_k / (1-\beta_4^k)}, \epsilon)} \\
          & v_k = \beta_2 v_{k-1} + (1-\beta_2) g^2, \qquad
            m_k = \beta_1 m_{k-1} + (1-\beta_1)
              \frac{g}{\max(\sqrt{v_k / (1-\beta_2^k)}, \epsilon)} \\
          & \theta \leftarrow \theta - \gamma\lambda\, d(\theta) \quad\text{(decay, once per step)} \\
          & \text{graft:}\ \theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^k}
              \frac{\lVert m_k\rVert}{\lVert \hat m_k\rVert + \epsilon} \hat m_k, \quad
            \text{no graft:}\ \theta \leftarrow \theta - \frac{\gamma}{1-\beta_3^k} \hat m_k, \quad
            \text{baseline:}\ \theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^k} m_k
        \end{aligned}

    The baseline (LaProp) update is taken by parameters without a statistic when
    ``default_to_baseline`` (older name ``default_to_adam``), and by every parameter when
    ``enforce_baseline``; otherwise a missing statistic raises
    :class:`~truegrad.optim.MissingStatisticError`. :math:`d(\theta) = \theta` unless
    ``weight_decay_cls`` says otherwise (:mod:`truegrad.optim.weight_decay`).

    Args:
        betas: :math:`(\beta_1, \beta_2)` (then :math:`\beta_3=\beta_1, \beta_4=\beta_2`) or
            :math:`(\beta_1, \beta_2, \beta_3, \beta_4)`, each in ``[0, 1)``.
        foreach: multi-tensor (``torch._foreach_*``) implementation; ``None`` picks it on
            devices with foreach kernels (not the CPU).

    State per parameter: ``step``, ``exp_avg`` (m) and ``exp_avg_sq`` (v) when the
    baseline is used or grafted, ``exp_avg_true`` (:math:`\hat m`) and ``exp_avg_true_sq`` (u)
    once a statistic was seen, plus the decay variant's entries.
    """

    _name = "TGLaProp"
    _true_keys = ("exp_avg_true", "exp_avg_true_sq")
    _base_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] | tuple[float, float, float, float] = (0.9, 0.99),
        eps: float = 1e-12,
        weight_decay: float = 1e-2,
        graft: bool = True,
        default_to_baseline: bool | None = None,
        enforce_baseline: bool = False,
        weight_decay_cls: WeightDecayBase | None = None,
        foreach: bool | None = None,
        default_to_adam: bool | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, graft, default_to_baseline, enforce_baseline,
                         weight_decay_cls, foreach, default_to_adam)

    def _check_betas(self, betas: Any) -> tuple[float, ...]:
        if not isinstance(betas, (tuple, list)) or len(betas) not in (2, 4):
            error = TypeError if not isinstance(betas, (tuple, list)) else ValueError
            raise error(
                "TGLaProp: betas must be 2 floats (beta1, beta2) or 4 (beta1, beta2, beta3, beta4), "
                f"each in [0, 1), got {describe(betas)}"
            )
        checked = tuple(check_beta("TGLaProp", f"betas[{i}]", b) for i, b in enumerate(betas))
        return checked + checked if len(checked) == 2 else checked

    def _update(self, group, params, grads, stats, states, foreach) -> None:  # type: ignore[no-untyped-def]
        b1, b2, b3, b4 = group["betas"]
        lr, eps, graft = group["lr"], group["eps"], group["graft"]
        ks = [st["step"].item() for st in states]
        n = len(params)
        true: list[Tensor | None] = [None] * n
        base: list[Tensor | None] = [None] * n
        t_idx = [i for i in range(n) if stats[i] is not None]
        b_idx = [i for i in range(n) if stats[i] is None or graft]
        if foreach:
            if t_idx:
                d = _normalized_foreach([grads[i] for i in t_idx], [states[i]["exp_avg_true_sq"] for i in t_idx],
                                        [stats[i] for i in t_idx], b4, [ks[i] for i in t_idx], eps)
                ms = [states[i]["exp_avg_true"] for i in t_idx]
                torch._foreach_mul_(ms, b3)
                torch._foreach_add_(ms, d, alpha=1.0 - b3)
                for i, m in zip(t_idx, ms):
                    true[i] = m
            if b_idx:
                d = _normalized_foreach([grads[i] for i in b_idx], [states[i]["exp_avg_sq"] for i in b_idx],
                                        None, b2, [ks[i] for i in b_idx], eps)
                ms = [states[i]["exp_avg"] for i in b_idx]
                torch._foreach_mul_(ms, b1)
                torch._foreach_add_(ms, d, alpha=1.0 - b1)
                for i, m in zip(b_idx, ms):
                    base[i] = m
        else:
            for i in t_idx:
                d = _normalized_single(grads[i], states[i]["exp_avg_true_sq"], stats[i], b4, ks[i], eps)
                true[i] = states[i]["exp_avg_true"].mul_(b3).add_(d, alpha=1.0 - b3)
            for i in b_idx:
                d = _normalized_single(grads[i], states[i]["exp_avg_sq"], None, b2, ks[i], eps)
                base[i] = states[i]["exp_avg"].mul_(b1).add_(d, alpha=1.0 - b1)
        _apply(params, true, base, [-lr / (1.0 - b3**k) for k in ks], [-lr / (1.0 - b1**k) for k in ks],
               graft, eps, foreach)


class TGRMSProp(TrueGradFamily):
    r"""TrueGrad-RMSProp, debiased (upstream ``truegrad.optim.TGRMSProp``, 5.0.0): like
    TGLaProp with :math:`\beta_1 = \beta_3 = 0` (no momentum).

    .. math::
        \begin{aligned}
          & u_k = \beta_2 u_{k-1} + (1-\beta_2) s, \qquad
            \tau = \frac{g}{\max(\sqrt{u_k / (1-\beta_2^k)}, \epsilon)} \\
          & v_k = \beta_1 v_{k-1} + (1-\beta_1) g^2, \qquad
            b = \frac{g}{\max(\sqrt{v_k / (1-\beta_1^k)}, \epsilon)} \\
          & \theta \leftarrow \theta - \gamma\lambda\, d(\theta) \quad\text{(decay, once per step)} \\
          & \text{graft:}\ \theta \leftarrow \theta - \gamma \frac{\lVert b\rVert}{\lVert\tau\rVert + \epsilon}\tau,
            \quad \text{no graft:}\ \theta \leftarrow \theta - \gamma\tau, \quad
            \text{baseline:}\ \theta \leftarrow \theta - \gamma b
        \end{aligned}

    ``betas``: a float or ``(beta,)`` (both :math:`\beta_1=\beta_2`), or
    :math:`(\beta_1, \beta_2)`; :math:`\beta_1` is the baseline's, :math:`\beta_2` the
    statistic's. Baseline, decay and ``foreach`` as in :class:`TGLaProp`. State:
    ``step``, ``exp_avg_sq`` (v), ``exp_avg_true_sq`` (u).
    """

    _name = "TGRMSProp"
    _true_keys = ("exp_avg_true_sq",)
    _base_keys = ("exp_avg_sq",)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: float | tuple[float] | tuple[float, float] = (0.9,),
        eps: float = 1e-12,
        weight_decay: float = 1e-2,
        graft: bool = True,
        default_to_baseline: bool | None = None,
        enforce_baseline: bool = False,
        weight_decay_cls: WeightDecayBase | None = None,
        foreach: bool | None = None,
        default_to_adam: bool | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, graft, default_to_baseline, enforce_baseline,
                         weight_decay_cls, foreach, default_to_adam)

    def _check_betas(self, betas: Any) -> tuple[float, ...]:
        if not isinstance(betas, (tuple, list)):
            if isinstance(betas, (int, float)) and not isinstance(betas, bool):
                betas = (betas,)
            else:
                raise TypeError(
                    f"TGRMSProp: betas must be a float in [0, 1) or a tuple of 1 or 2 such floats, got {describe(betas)}"
                )
        if len(betas) not in (1, 2):
            raise ValueError(
                f"TGRMSProp: betas must have 1 or 2 elements (beta1[, beta2]) in [0, 1), got {describe(betas)}"
            )
        checked = tuple(check_beta("TGRMSProp", f"betas[{i}]", b) for i, b in enumerate(betas))
        return checked + checked if len(checked) == 1 else checked

    def _update(self, group, params, grads, stats, states, foreach) -> None:  # type: ignore[no-untyped-def]
        b1, b2 = group["betas"]
        lr, eps, graft = group["lr"], group["eps"], group["graft"]
        ks = [st["step"].item() for st in states]
        n = len(params)
        true: list[Tensor | None] = [None] * n
        base: list[Tensor | None] = [None] * n
        t_idx = [i for i in range(n) if stats[i] is not None]
        b_idx = [i for i in range(n) if stats[i] is None or graft]
        if foreach:
            if t_idx:
                d = _normalized_foreach([grads[i] for i in t_idx], [states[i]["exp_avg_true_sq"] for i in t_idx],
                                        [stats[i] for i in t_idx], b2, [ks[i] for i in t_idx], eps)
                for i, x in zip(t_idx, d):
                    true[i] = x
            if b_idx:
                d = _normalized_foreach([grads[i] for i in b_idx], [states[i]["exp_avg_sq"] for i in b_idx],
                                        None, b1, [ks[i] for i in b_idx], eps)
                for i, x in zip(b_idx, d):
                    base[i] = x
        else:
            for i in t_idx:
                true[i] = _normalized_single(grads[i], states[i]["exp_avg_true_sq"], stats[i], b2, ks[i], eps)
            for i in b_idx:
                base[i] = _normalized_single(grads[i], states[i]["exp_avg_sq"], None, b1, ks[i], eps)
        _apply(params, true, base, [-lr] * n, [-lr] * n, graft, eps, foreach)
