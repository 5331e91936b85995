"""The per-step fix-up of ``p.sum_grad_squared``, shared by the callback and Fabric.

Right before ``optimizer.step()`` the statistic must describe exactly the ``p.grad``
the optimizer steps with (docs/statistic.md section 3). Backward leaves it in the units of
the local, loss-scaled, unclipped backward; :func:`fix_statistics_` brings it to the
optimizer's units, in this order:

1. loss scaling: divide by ``S**2``;
2. data parallelism: sum over ranks in ONE flattened all-reduce, divide by ``W**2``;
3. clipping: multiply by the norm-clipping factor squared, or, for value clipping,
   elementwise by ``(clamped / unclamped)**2`` (``0/0`` counts as 1).

The clipping factor is computed from the gradients as they are at the call, with torch's
own formula, so the call must come right before the clip it describes. The Lightning
callback calls it with only ``clip_norm``/``clip_value`` from inside the precision
plugin's ``clip_grad_by_*`` (so it sees the clip that really happens, whoever asked for
it); the Fabric helper calls it with everything, before ``fabric.clip_gradients``.

All factors stay tensors: nothing here synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from truegrad import statistic

__all__ = ["fix_statistics_", "trainable_params"]

AllReduce = Callable[[torch.Tensor], Any]


def trainable_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's trainable parameters in param-group order, each once."""
    seen: set[int] = set()
    params = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _all_reduce_statistics(
    params: list[torch.Tensor], all_reduce: AllReduce, world_size: int
) -> None:
    """Sum every statistic over ranks with one collective, then divide by ``W**2``.

    Every rank passes the same parameters in the same order. A parameter without a
    statistic on this rank contributes zeros; the flat buffer ends with one presence flag
    per parameter, so such a parameter gets the reduced statistic exactly when some rank
    had one (a parameter uncovered on every rank keeps none, and TGAdamW still reports
    it or falls back to AdamW). Reading those flags is the only host sync, and it
    happens only when some parameter lacks a statistic on this rank.
    """
    stats = [statistic.get(p) for p in params]
    present = [s for s in stats if s is not None]
    if not params:
        return
    # decided from the parameters alone, so every rank builds the same buffer
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    device = present[0].device if present else params[0].device
    pieces = [
        s.reshape(-1).to(dtype)
        if s is not None
        else torch.zeros(p.numel(), dtype=dtype, device=device)
        for p, s in zip(params, stats)
    ]
    flags = torch.tensor([float(s is not None) for s in stats], dtype=dtype).to(device)
    flat = torch.cat([*pieces, flags])
    all_reduce(flat)
    total = flat.numel() - len(params)
    flat[:total].div_(float(world_size) ** 2)
    missing_locally = [i for i, s in enumerate(stats) if s is None]
    elsewhere = flat[total:][missing_locally].tolist() if missing_locally else []
    has_elsewhere = dict(zip(missing_locally, elsewhere))
    offset = 0
    for i, (p, s) in enumerate(zip(params, stats)):
        chunk = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
        if s is not None:
            s.copy_(chunk)
        elif has_elsewhere[i] > 0:
            statistic.add(p, chunk)  # zeros here, the other ranks' contributions


def fix_statistics_(
    params: Iterable[torch.Tensor],
    *,
    loss_scale: float | torch.Tensor | None = None,
    grads_unscaled: bool = True,
    all_reduce: AllReduce | None = None,
    world_size: int = 1,
    clip_norm: float | None = None,
    norm_type: float = 2.0,
    clip_value: float | None = None,
) -> None:
    """Bring every ``p.sum_grad_squared`` of ``params`` to the optimizer's units, in place.

    Args:
        params: the optimizer's trainable parameters, in the same order on every rank.
        loss_scale: the GradScaler scale ``S`` of this accumulation window (float or 0-d
            tensor); the statistic is divided by ``S**2``.
        grads_unscaled: whether ``p.grad`` has already been divided by ``S`` (Lightning:
            yes; Fabric before ``clip_gradients``: no). Only matters for clipping.
        all_reduce: in-place sum over ranks of a flat tensor (``None``: no reduction).
        world_size: number of ranks ``W``; the reduced statistic is divided by ``W**2``.
        clip_norm: the ``max_norm`` that ``clip_grad_norm_`` will apply after this call.
        norm_type: the norm of ``clip_grad_norm_``.
        clip_value: the value ``clip_grad_value_`` will clamp the gradients to.
    """
    params = list(params)
    if clip_norm is not None and clip_value is not None:
        raise ValueError("pass at most one of clip_norm and clip_value")
    inv_scale: torch.Tensor | float | None = None
    if loss_scale is not None:
        inv_scale = (
            loss_scale.detach().double().reciprocal().float()
            if isinstance(loss_scale, torch.Tensor)
            else 1.0 / float(loss_scale)
        )
        statistic.scale_(params, inv_scale * inv_scale)  # type: ignore[operator]
    if all_reduce is not None and world_size > 1:
        _all_reduce_statistics(params, all_reduce, world_size)

    with_grad = [p for p in params if p.grad is not None and statistic.has(p)]
    if not with_grad:
        return
    grad_factor = None if grads_unscaled else inv_scale  # grads the clip will see = grad * this
    if clip_norm is not None:
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
        if grad_factor is not None:
            total = total * grad_factor
        # the same coefficient torch.nn.utils.clip_grad_norm_ applies
        coef = torch.clamp(clip_norm / (total + 1e-6), max=1.0)
        statistic.scale_(with_grad, coef * coef)
    elif clip_value is not None:
        for p in with_grad:
            g = p.grad.detach().to(statistic.get(p).dtype)
            if grad_factor is not None:
                g = g * grad_factor
            ratio = torch.where(g == 0, torch.ones_like(g), g.clamp(-clip_value, clip_value) / g)
            statistic.get(p).mul_(ratio.square())  # type: ignore[union-attr]
