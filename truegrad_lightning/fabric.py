"""Fabric helper: the callback's per-step fix-up of ``p.sum_grad_squared`` for a Fabric loop."""

from __future__ import annotations

from typing import Any

import torch

from truegrad_lightning.step import fix_statistics_, trainable_params

__all__ = ["fix_statistics"]


def fix_statistics(
    fabric: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    loss_scale: float | torch.Tensor | None = None,
) -> None:
    """Bring ``p.sum_grad_squared`` to the units of the gradient the optimizer will step with.

    Call it once per optimizer step, after the last ``fabric.backward`` of the
    accumulation window and before ``fabric.clip_gradients`` / ``optimizer.step()``. It
    divides by ``S**2`` under a GradScaler (taken from ``fabric``'s precision plugin
    unless ``loss_scale`` is given), sums over ranks with one ``fabric.all_reduce`` and
    divides by ``W**2``, and applies the square of the clipping factor that
    ``fabric.clip_gradients(model, optimizer, max_norm=clip_norm)`` or
    ``clip_val=clip_value`` will apply next (pass the same values). ``model`` is the
    module the backend prepared (kept for symmetry with ``fabric.clip_gradients``).

    Example::

        backend = truegrad.backends.get_backend("auto")
        handle = backend.prepare(model)                    # before fabric.setup
        model, optimizer = fabric.setup(model, TGAdamW(model.parameters()))
        for x, y in loader:
            optimizer.zero_grad()                          # also clears the statistic
            with backend.backward_context():
                fabric.backward(F.cross_entropy(model(x), y))
            fix_statistics(fabric, model, optimizer, clip_norm=1.0)
            fabric.clip_gradients(model, optimizer, max_norm=1.0)
            optimizer.step()
        handle.undo()
    """
    del model
    inner = getattr(optimizer, "optimizer", optimizer)  # unwrap Fabric's _FabricOptimizer
    grads_unscaled = True
    if loss_scale is None:
        scaler = getattr(getattr(fabric, "strategy", None), "precision", None)
        scaler = getattr(scaler, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
            loss_scale = scale if scale is not None else scaler.get_scale()
            # fabric.clip_gradients unscales first; unscaled already if it was called before
            states = getattr(scaler, "_per_optimizer_states", {})
            state = states.get(id(inner), {}) if isinstance(states, dict) else {}
            grads_unscaled = str(state.get("stage", "")).endswith("UNSCALED")
    world_size = int(getattr(fabric, "world_size", 1))

    def all_reduce(buffer: torch.Tensor) -> None:
        buffer.copy_(fabric.all_reduce(buffer, reduce_op="sum"))

    fix_statistics_(
        trainable_params(inner),
        loss_scale=loss_scale,
        grads_unscaled=grads_unscaled,
        all_reduce=all_reduce if world_size > 1 else None,
        world_size=world_size,
        clip_norm=clip_norm,
        clip_value=clip_value,
    )
