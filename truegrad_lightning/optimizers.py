"""``configure_optimizers`` for LightningModules: TGAdamW (or any optimizer) with
decay / no-decay parameter groups and an optional warmup + cosine learning-rate schedule.

Usage::

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return configure_optimizers(self, lr=3e-4, warmup_steps=0.05)
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.utilities.types import OptimizerConfig, OptimizerLRSchedulerConfig
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.optim import Optimizer

from truegrad._validate import check_callable, check_module
from truegrad.optim import TGAdamW
from truegrad_lightning.schedules import (
    _SCHEDULES,
    Schedule,
    WarmupCosineLR,
    check_warmup_steps,
    lr_factor,
)

__all__ = ["Schedule", "configure_optimizers", "lr_factor", "param_groups"]

log = logging.getLogger(__name__)


#: Modules whose parameters never get weight decay, whatever their shape.
#: ``_NormBase`` covers BatchNorm*, SyncBatchNorm and InstanceNorm* (and their lazy forms);
#: truegrad.nn's normalization layers subclass these torch classes.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    _NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)


def param_groups(
    module: nn.Module,
    weight_decay: float,
    no_decay: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``module`` into a decay and a no-decay group.

    A parameter gets **no** weight decay if any of its names (tied parameters have
    several):

    - ends with ``bias``;
    - belongs to a normalization layer (LayerNorm, RMSNorm, GroupNorm, BatchNorm,
      InstanceNorm, LocalResponseNorm, and subclasses such as ``truegrad.nn.LayerNorm``);
    - is listed by a ``no_weight_decay()`` method of ``module`` or of one of its
      submodules (timm's convention; names are relative to that submodule and names
      that match nothing are ignored);
    - is listed in ``no_decay``;

    or if it has fewer than 2 dimensions (nanoGPT's rule: scalars, gains, biases). All
    other parameters get ``weight_decay``. A name in ``no_decay`` or ``no_weight_decay()``
    is a qualified parameter name (``"encoder.pos_emb"``) or a module name, which covers
    every parameter under that module (``"encoder"``).

    Parameters with ``requires_grad=False`` are left out. Tied parameters appear once,
    under the name ``module.named_parameters()`` gives them (its first name). Nothing
    on ``module`` is changed.

    Args:
        module: the model (any ``nn.Module``, e.g. a ``LightningModule``).
        weight_decay: the decay group's ``weight_decay`` (the no-decay group gets 0).
        no_decay: extra names whose parameters get no weight decay.

    Returns:
        ``[{"params": [...], "param_names": [...], "weight_decay": weight_decay, "name":
        "decay"}, {..., "weight_decay": 0.0, "name": "no_decay"}]`` in
        ``named_parameters()`` order, leaving out a group that would be empty (so the
        list is empty when nothing is trainable). ``"param_names"`` is what
        ``torch.optim.Optimizer`` stores for ``named_parameters()`` input, so optimizer
        error messages (TGAdamW's) and ``state_dict()`` name the parameters; ``"name"``
        makes ``LearningRateMonitor`` log ``lr-<Optimizer>/decay`` and ``.../no_decay``.

    Raises:
        TypeError: ``no_decay`` is a single string (pass a tuple of names).
        ValueError: ``weight_decay`` is negative or not finite, or a name in
            ``no_decay`` matches no parameter or module of ``module``.
    """
    weight_decay = _check_number("weight_decay", weight_decay)
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
    if isinstance(no_decay, str):
        raise TypeError(
            f"no_decay must be an iterable of names, got the string {no_decay!r}; "
            f"write no_decay=({no_decay!r},)"
        )
    explicit = list(no_decay)

    # Every name of every parameter, tied ones included, to match names against.
    all_names: dict[str, nn.Parameter] = dict(module.named_parameters(remove_duplicate=False))
    module_names = {name for name, _ in module.named_modules(remove_duplicate=False) if name}
    skip: set[int] = set()

    def covered(name: str) -> list[nn.Parameter]:
        prefix = name + "."
        return [p for n, p in all_names.items() if n == name or n.startswith(prefix)]

    for name in explicit:
        if not isinstance(name, str):
            raise TypeError(f"no_decay names must be strings, got {name!r}")
        matched = covered(name)
        if not matched:
            close = difflib.get_close_matches(name, [*all_names, *module_names], n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"no_decay name {name!r} matches no parameter or module of "
                f"{type(module).__name__}{hint}"
            )
        skip.update(id(p) for p in matched)

    for prefix, sub in module.named_modules(remove_duplicate=False):
        if isinstance(sub, _NORM_TYPES):
            skip.update(id(p) for p in sub.parameters(recurse=False))
        declared = getattr(sub, "no_weight_decay", None)
        if callable(declared):
            for name in declared():
                skip.update(id(p) for p in covered(f"{prefix}.{name}" if prefix else name))

    for name, p in all_names.items():
        if name == "bias" or name.endswith(".bias"):
            skip.add(id(p))

    decay: list[tuple[str, nn.Parameter]] = []
    no_decay_params: list[tuple[str, nn.Parameter]] = []
    for name, p in module.named_parameters():  # de-duplicates tied parameters
        if not p.requires_grad:
            continue
        (no_decay_params if id(p) in skip or p.ndim < 2 else decay).append((name, p))

    groups = [
        _group(decay, weight_decay, "decay"),
        _group(no_decay_params, 0.0, "no_decay"),
    ]
    return [g for g in groups if g["params"]]


def configure_optimizers(
    module: nn.Module,
    *,
    optimizer: Callable[..., Optimizer] = TGAdamW,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    no_decay: Iterable[str] = (),
    schedule: Schedule = "cosine",
    warmup_steps: int | float = 0,
    min_lr_ratio: float = 0.0,
    total_steps: int | None = None,
    **optimizer_kwargs: Any,
) -> OptimizerConfig | OptimizerLRSchedulerConfig:
    """Build the optimizer (and schedule) a ``LightningModule.configure_optimizers`` returns.

    The optimizer gets two parameter groups from :func:`param_groups` (decay and
    no-decay; frozen parameters left out, tied ones once, parameter names attached).
    The schedule is a :class:`~truegrad_lightning.schedules.WarmupCosineLR` (a
    ``LambdaLR``) stepped after every optimizer step (see
    :func:`lr_factor`): linear warmup over ``warmup_steps``, then cosine (or linear)
    decay to ``min_lr_ratio * lr`` at the end of training, or constant.

    Args:
        module: the LightningModule (or any ``nn.Module``) to optimize.
        optimizer: the optimizer class, or any callable ``(param_groups, lr=...,
            **optimizer_kwargs) -> Optimizer`` (``functools.partial``, LightningCLI's
            ``OptimizerCallable``). Default :class:`~truegrad.optim.TGAdamW`.
        lr: peak learning rate.
        weight_decay: weight decay of the decay group (the other group gets 0).
        no_decay: extra parameter or module names to exclude from weight decay.
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"``.
        warmup_steps: optimizer steps of linear warmup; a float in ``[0, 1)`` is a
            fraction of ``total_steps``.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (``"cosine"`` and
            ``"linear"``).
        total_steps: optimizer steps of the whole run; default
            ``module.trainer.estimated_stepping_batches`` (which accounts for
            ``max_steps``, ``max_epochs``, ``accumulate_grad_batches`` and devices).
            Only read when a schedule is needed.
        **optimizer_kwargs: passed to ``optimizer`` (``betas``, ``graft``,
            ``default_to_adam``, ``foreach``, ...).

    Returns:
        ``{"optimizer": opt}`` for ``schedule="constant"`` without warmup, otherwise
        ``{"optimizer": opt, "lr_scheduler": {"scheduler": WarmupCosineLR, "interval":
        "step", "frequency": 1}}``.

    Raises:
        TypeError: ``module`` not a ``torch.nn.Module``, ``optimizer`` not callable, a
            non-numeric ``lr``/``weight_decay``/``min_lr_ratio``, a bool or
            otherwise non-numeric ``warmup_steps``, a non-int ``total_steps``, or
            ``no_decay`` given as one string.
        ValueError: ``lr`` or ``weight_decay`` negative, ``min_lr_ratio`` outside
            ``[0, 1]``, an unknown ``schedule``, a negative ``warmup_steps`` or a
            fractional one outside ``[0, 1)``, warmup longer than training, a
            ``no_decay`` name matching nothing, no trainable parameters, or no way to
            know the total number of steps (no trainer attached, or unbounded training).

    Example::

        >>> import torch
        >>> from truegrad import nn
        >>> model = torch.nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        >>> config = configure_optimizers(model, lr=1e-2, warmup_steps=2, total_steps=10)
        >>> [(g["name"], g["param_names"]) for g in config["optimizer"].param_groups]
        [('decay', ['0.weight']), ('no_decay', ['0.bias', '1.weight', '1.bias'])]
        >>> round(config["optimizer"].param_groups[0]["lr"], 6)  # 1e-2 * (0 + 1) / (2 + 1)
        0.003333
    """
    check_module("configure_optimizers", "module", module)
    check_callable(
        "configure_optimizers", "optimizer", optimizer,
        "an optimizer class or a callable (param_groups, lr=..., **optimizer_kwargs) -> Optimizer",
    )
    lr = _check_number("lr", lr)
    if not lr >= 0.0:
        raise ValueError(f"Invalid lr: {lr} (must be >= 0)")
    if schedule not in _SCHEDULES:
        expected = ", ".join(map(repr, _SCHEDULES))
        raise ValueError(f"Unknown schedule {schedule!r}: expected one of {expected}")
    min_lr_ratio = _check_number("min_lr_ratio", min_lr_ratio)
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"Invalid min_lr_ratio: {min_lr_ratio} (must be in [0, 1])")
    check_warmup_steps(warmup_steps)
    if total_steps is not None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int):
            raise TypeError(f"total_steps must be an int or None, got {total_steps!r}")
        if total_steps < 1:
            raise ValueError(f"Invalid total_steps: {total_steps} (must be >= 1)")

    groups = param_groups(module, weight_decay, no_decay)
    if not groups:
        raise ValueError(
            f"{type(module).__name__} has no trainable parameters (requires_grad=True)"
        )
    for group in groups:
        log.info(
            "%s: %d tensors, %d parameters, weight_decay=%g",
            group["name"],
            len(group["params"]),
            sum(p.numel() for p in group["params"]),
            group["weight_decay"],
        )
    opt = optimizer(groups, lr=lr, **optimizer_kwargs)

    if schedule == "constant" and warmup_steps == 0:
        return {"optimizer": opt}

    total = total_steps if total_steps is not None else _estimated_stepping_batches(module)
    if not math.isfinite(total):
        if schedule != "constant" or isinstance(warmup_steps, float):
            raise ValueError(
                f"Training is unbounded (estimated_stepping_batches={total}), so schedule="
                f"{schedule!r} with warmup_steps={warmup_steps!r} has no length: set "
                "Trainer(max_steps=...) or max_epochs, or pass total_steps=..."
            )
        total = math.inf  # constant after an int warmup needs no end
    warmup = round(warmup_steps * total) if isinstance(warmup_steps, float) else warmup_steps
    if warmup > total:
        raise ValueError(
            f"warmup_steps={warmup_steps} ({warmup} steps) is longer than training "
            f"({total} steps)"
        )
    scheduler = WarmupCosineLR(
        opt,
        total_steps=int(total) if math.isfinite(total) else None,
        warmup_steps=warmup,
        min_lr_ratio=min_lr_ratio,
        schedule=schedule,
    )
    return {
        "optimizer": opt,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }


def _group(named: list[tuple[str, nn.Parameter]], weight_decay: float, name: str) -> dict[str, Any]:
    return {
        "params": [p for _, p in named],
        "param_names": [n for n, _ in named],
        "weight_decay": weight_decay,
        "name": name,
    }


def _check_number(what: str, value: Any) -> float:
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a float, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {what}: {value} (must be finite)")
    return float(value)


def _estimated_stepping_batches(module: nn.Module) -> int | float:
    """``module.trainer.estimated_stepping_batches`` (an int, or ``inf`` for unbounded
    training), the one place that reads the trainer."""
    try:
        trainer = module.trainer
    except (AttributeError, RuntimeError):  # plain nn.Module / LightningModule not attached
        trainer = None
    if trainer is None:
        raise ValueError(
            f"{type(module).__name__} is not attached to a Trainer, so the schedule's length is "
            "unknown: pass total_steps=..., or call configure_optimizers from "
            "LightningModule.configure_optimizers"
        )
    total = trainer.estimated_stepping_batches
    if not total >= 1:
        raise ValueError(f"Invalid estimated_stepping_batches: {total} (must be >= 1)")
    return total if math.isinf(total) else int(total)
