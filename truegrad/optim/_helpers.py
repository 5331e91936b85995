"""What every optimizer implementation of :mod:`truegrad.optim` shares: host scalars of a
step, per-parameter list selection, and the tensor checks that run before any tensor is
changed. Implementations import this module and never each other."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

Tensor = torch.Tensor

__all__ = [
    "_StepScalars", "_check_tensors", "_describe_position", "_keep_float32_state", "_pick", "_step_scalars",
]


class _StepScalars(NamedTuple):
    """Host scalars of one step, with the bias corrections folded in (fewer tensor passes).

    Since ``max(sqrt(v / bc2), eps) = max(sqrt(v), eps * sqrt(bc2)) / sqrt(bc2)``::

        adam = m / max(sqrt(v), eps_v) * k_v        true = m / max(sqrt(u), eps_u) * k_u

    and the grafted update is ``true * ||adam|| / (||true|| + eps)
    = m / max(sqrt(u), eps_u) * k_v * ||adam / k_v|| / (||true / k_u|| + eps / k_u)``.
    """

    eps_v: float  # eps * sqrt(bc2)
    eps_u: float  # eps * sqrt(bc3)
    k_v: float  # sqrt(bc2) / bc1
    k_u: float  # sqrt(bc3) / bc1


def _step_scalars(
    step: float, beta1: float, beta2: float, beta3: float, eps: float
) -> _StepScalars:
    bc1 = 1.0 - beta1**step
    sqrt_bc2, sqrt_bc3 = math.sqrt(1.0 - beta2**step), math.sqrt(1.0 - beta3**step)
    return _StepScalars(eps * sqrt_bc2, eps * sqrt_bc3, sqrt_bc2 / bc1, sqrt_bc3 / bc1)


def _pick(index: list[int], lists: tuple[list, ...]) -> tuple[list, ...]:
    """Entries ``index`` of each of the parallel per-parameter lists (params, grads, ...)."""
    return tuple([lst[i] for i in index] for lst in lists)


# ----------------------------------------------------------------- validation

_STATE_NAMES = ("exp_avg", "exp_avg_sq", "exp_avg_true_sq")


def _describe_position(i: int) -> str:
    return f"parameter index {i} (among the parameters of its group that have a gradient)"


def _check_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    stats: list[Tensor | None],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_true_sqs: list[Tensor | None],
    describe: Callable[[int], str] | None = None,
) -> None:
    """Raise ``ValueError`` when a gradient, statistic or state tensor of a parameter has
    another shape than the parameter, or the statistic lies on another device, before
    any tensor is changed. Every implementation would otherwise fail half-way (after
    updating the moments of earlier parameters), broadcast a statistic of shape
    ``(3, 1)`` over a ``(3, 4)`` parameter without a word, or, in the C kernel, read
    past the end of it. A statistic of the parameter's number of elements in another
    shape is refused as well (``statistic.add`` demands the exact shape).

    ``describe(i)`` names parameter ``i`` of the lists in the message (its name and its
    index in the optimizer); by default its position in the lists.
    """
    # the tensors' own attributes: no __torch_function__ of a subclass (TrueGradParameter)
    # runs for them, nor can one misreport them
    with torch._C.DisableTorchFunctionSubclass():
        for i, p in enumerate(params):
            shape, s = p.shape, stats[i]
            if (
                grads[i].shape == shape
                and exp_avgs[i].shape == shape
                and exp_avg_sqs[i].shape == shape
                and (
                    s is None
                    or (
                        s.shape == shape
                        and s.device == p.device
                        and (exp_avg_true_sqs[i] is None or exp_avg_true_sqs[i].shape == shape)
                    )
                )
            ):
                continue
            checked = (
                ("statistic (sum_grad_squared)", s),
                ("gradient", grads[i]),
                (f"optimizer state {_STATE_NAMES[0]!r}", exp_avgs[i]),
                (f"optimizer state {_STATE_NAMES[1]!r}", exp_avg_sqs[i]),
                (f"optimizer state {_STATE_NAMES[2]!r}", None if s is None else exp_avg_true_sqs[i]),
            )
            for what, t in checked:
                if t is None or (t.shape == shape and (t is not s or t.device == p.device)):
                    continue
                if t.shape != shape:
                    problem = (
                        f"has shape {tuple(t.shape)}, but the parameter has shape {tuple(shape)}; "
                        "it must have exactly the parameter's shape"
                    )
                else:
                    problem = f"is on device {t.device}, but the parameter is on {p.device}"
                name = (describe or _describe_position)(i)
                raise ValueError(
                    f"TGAdamW: the {what} of {name} {problem}. No parameter or optimizer state "
                    "was changed."
                )




def _keep_float32_state(
    optimizer: torch.optim.Optimizer, state_dict: dict, keys: tuple[str, ...]
) -> None:
    """After ``torch.optim.Optimizer.load_state_dict``: put back the float32 (or float64)
    moments ``keys`` of bf16/fp16 parameters, which torch's loader cast to the parameter's
    dtype (losing bits)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    for p, saved_id in zip(params, saved_ids):
        saved = state_dict["state"].get(saved_id)
        if saved is None or p.dtype not in (torch.float16, torch.bfloat16):
            continue
        for key in keys:
            value = saved.get(key)
            if isinstance(value, torch.Tensor) and value.dtype != p.dtype:
                optimizer.state[p][key] = value.to(device=p.device, copy=True)
