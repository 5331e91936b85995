"""Learning-rate schedules usable from YAML (LightningCLI ``LRSchedulerCallable``).

:class:`WarmupCosineLR` is the warmup + cosine (or linear, or constant) schedule of
:func:`truegrad_lightning.configure_optimizers` as an ``LRScheduler`` class, so a config
can pick it::

    model:
      lr_scheduler:
        class_path: truegrad_lightning.schedules.WarmupCosineLR
        init_args: {warmup_steps: 0.05, min_lr_ratio: 0.1}

Its length is usually unknown when the YAML is written: with ``total_steps`` left out, the
built-in models (:class:`truegrad_lightning.models.TrueGradModule`) fill it in from
``trainer.estimated_stepping_batches`` right after building it.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["Schedule", "WarmupCosineLR", "check_warmup_steps", "lr_factor"]

Schedule = Literal["cosine", "linear", "constant"]
_SCHEDULES: tuple[str, ...] = get_args(Schedule)


def lr_factor(
    step: int,
    *,
    schedule: Schedule,
    warmup_steps: int,
    total_steps: int | float,
    min_lr_ratio: float,
) -> float:
    r"""The learning-rate multiplier after ``step`` optimizer steps (what ``LambdaLR`` uses).

    With :math:`W` = ``warmup_steps``, :math:`T` = ``total_steps``, :math:`m` =
    ``min_lr_ratio``, and :math:`p = \min(1, (s - W) / \max(1, T - W))`:

    - :math:`s < W`: :math:`(s + 1) / (W + 1)` (linear warmup, as in nanoGPT);
    - ``"cosine"``: :math:`m + (1 - m)\,(1 + \cos \pi p) / 2`;
    - ``"linear"``: :math:`m + (1 - m)(1 - p)`;
    - ``"constant"``: :math:`1`.

    The factor is 1 at :math:`s = W` and reaches :math:`m` at :math:`s = T` (after the
    last step), then stays there. ``total_steps`` may be ``inf`` for ``"constant"``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)


class _ScheduleFactor:
    """Picklable ``lr_lambda``; plain attributes, so ``LambdaLR.state_dict()`` keeps them
    and checkpoints load with ``weights_only=True``."""

    def __init__(
        self,
        schedule: str,
        warmup_steps: int | float,
        total_steps: int | None,
        min_lr_ratio: float,
    ) -> None:
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def resolved_warmup(self) -> int:
        """Warmup in steps (a fraction is resolved against ``total_steps``, which
        ``__call__`` and ``set_total_steps`` make sure is known by then)."""
        if isinstance(self.warmup_steps, float):
            return round(self.warmup_steps * self.total_steps)  # type: ignore[operator]
        return self.warmup_steps

    def __call__(self, step: int) -> float:
        if self.total_steps is None and (
            self.schedule != "constant" or isinstance(self.warmup_steps, float)
        ):
            if step == 0:  # LambdaLR.__init__ evaluates step 0; set_total_steps redoes it
                return 1.0
            raise RuntimeError(
                f"WarmupCosineLR(schedule={self.schedule!r}) stepped before its "
                "total_steps was set: pass total_steps=... or call set_total_steps(...)"
            )
        total: int | float = math.inf if self.total_steps is None else self.total_steps
        return lr_factor(
            step,
            schedule=self.schedule,  # type: ignore[arg-type]
            warmup_steps=self.resolved_warmup(),
            total_steps=total,
            min_lr_ratio=self.min_lr_ratio,
        )


def check_warmup_steps(warmup_steps: object, prefix: str = "") -> None:
    """Validate a warmup length: an int number of steps >= 0, or a float fraction of the
    total in ``[0, 1)``. ``prefix`` starts the error message (who was given it).

    Raises:
        TypeError: neither an int nor a float (``bool`` included).
        ValueError: a negative int or a fraction outside ``[0, 1)``.
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, float)):
        raise TypeError(
            f"{prefix}warmup_steps must be an int (steps) or a float in [0, 1) (a fraction), "
            f"got {warmup_steps!r}"
        )
    if isinstance(warmup_steps, int) and warmup_steps < 0:
        raise ValueError(f"{prefix}Invalid warmup_steps: {warmup_steps} (must be >= 0)")
    if isinstance(warmup_steps, float) and not 0.0 <= warmup_steps < 1.0:
        raise ValueError(
            f"{prefix}Invalid warmup_steps: {warmup_steps} (a float is a fraction of total_steps "
            "and must be in [0, 1); pass an int for a number of steps)"
        )


class WarmupCosineLR(LambdaLR):
    r"""Linear warmup, then cosine (or linear) decay to ``min_lr_ratio * lr``; step it
    after every optimizer step (``interval: step``).

    The multiplier after ``s`` steps is :func:`truegrad_lightning.lr_factor`: with
    :math:`W` warmup steps and :math:`T` total steps, :math:`(s + 1) / (W + 1)` for
    :math:`s < W`, then :math:`m + (1 - m)(1 + \cos \pi p)/2` with
    :math:`p = \min(1, (s - W)/(T - W))`.

    Args:
        optimizer: the optimizer whose groups' ``lr`` are scheduled (each group keeps its
            own base ``lr``).
        total_steps: optimizer steps of the whole run; ``None`` until
            :meth:`set_total_steps` is called (the built-in models do it with
            ``trainer.estimated_stepping_batches``).
        warmup_steps: steps of linear warmup; a float in ``[0, 1)`` is a fraction of
            ``total_steps``.
        min_lr_ratio: the final learning rate as a fraction of the base one, in ``[0, 1]``.
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` after the warmup.

    Raises:
        ValueError: an unknown ``schedule``, a negative ``warmup_steps`` or a fraction
            outside ``[0, 1)``, ``min_lr_ratio`` outside ``[0, 1]``, ``total_steps < 1``,
            or a warmup longer than training.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup_steps: int | float = 0,
        min_lr_ratio: float = 0.0,
        schedule: Schedule = "cosine",
    ) -> None:
        if schedule not in _SCHEDULES:
            raise ValueError(
                f"WarmupCosineLR: unknown schedule {schedule!r}; expected one of "
                + ", ".join(map(repr, _SCHEDULES))
            )
        check_warmup_steps(warmup_steps, "WarmupCosineLR: ")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"WarmupCosineLR: min_lr_ratio={min_lr_ratio} must be in [0, 1]")
        # not kept as an attribute of its own: LambdaLR.state_dict() saves every attribute
        super().__init__(optimizer, _ScheduleFactor(schedule, warmup_steps, None, float(min_lr_ratio)))
        if total_steps is not None:
            self.set_total_steps(total_steps)

    @property
    def total_steps(self) -> int | None:
        """The run's length in optimizer steps, or ``None`` while unknown."""
        return self.lr_lambdas[0].total_steps  # type: ignore[union-attr]

    def set_total_steps(self, total_steps: int) -> None:
        """Set the run's length and recompute the current learning rates.

        Raises:
            TypeError, ValueError: ``total_steps`` is not an int >= 1, or the warmup is
                longer than it.
        """
        if isinstance(total_steps, bool) or not isinstance(total_steps, int):
            raise TypeError(f"WarmupCosineLR: total_steps must be an int, got {total_steps!r}")
        if total_steps < 1:
            raise ValueError(f"WarmupCosineLR: total_steps={total_steps} must be >= 1")
        factor = self.lr_lambdas[0]
        factor.total_steps = total_steps  # type: ignore[union-attr]
        warmup = factor.resolved_warmup()  # type: ignore[union-attr]
        if warmup > total_steps:
            raise ValueError(
                f"WarmupCosineLR: warmup_steps={factor.warmup_steps} ({warmup} steps) is "  # type: ignore[union-attr]
                f"longer than training ({total_steps} steps)"
            )
        values = [base_lr * factor(self.last_epoch) for base_lr in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = values
