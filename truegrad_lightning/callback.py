"""TrueGradCallback: compute ``p.sum_grad_squared`` for a LightningModule."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from truegrad import statistic
from truegrad._validate import check_bool, check_choice, check_int
from truegrad.backends import Backend, Handle, get_backend
from truegrad.nn import settings
from truegrad.optim.tgadamw import TGAdamW
from truegrad_lightning.step import fix_statistics_, trainable_params

__all__ = ["TrueGradCallback"]

_BACKENDS = ("auto", "nn", "patch_torch", "patch_model", "backpack")


def _flattening_strategies() -> tuple[type, ...]:
    from lightning.pytorch import strategies

    names = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")
    return tuple(getattr(strategies, n) for n in names if hasattr(strategies, n))


_CLIP_METHODS = {"clip_grad_by_norm": "clip_norm", "clip_grad_by_value": "clip_value"}


def _clip_wrapper(plugin: Any, original: Any, keyword: str) -> Any:
    """``original`` (a bound ``clip_grad_by_*`` of ``plugin``), preceded by the statistic's
    share of that clip: ``fix_statistics_`` computes the factor from the gradients as they
    are right now and the clip value of this very call."""

    def clip(optimizer: Any, clip_val: float, *args: Any, **kwargs: Any) -> Any:
        fix_statistics_(plugin.main_params(optimizer), **{keyword: clip_val})
        return original(optimizer, clip_val, *args, **kwargs)

    clip._truegrad_clip = True  # type: ignore[attr-defined]
    return clip


@contextlib.contextmanager
def _intercept_clipping(plugin: Any) -> Iterator[None]:
    """Wrap ``plugin.clip_grad_by_norm`` / ``clip_grad_by_value`` on the instance so that
    every clip also applies its factor to the statistic (see :class:`TrueGradCallback`).

    Idempotent: a plugin already wrapped (a second callback instance, a second ``setup``)
    is left alone, and only the context that installed a wrapper removes it. On exit the
    instance gets back exactly what it had (its class's method or an earlier instance
    attribute).
    """
    installed: list[tuple[str, bool, Any]] = []
    for name, keyword in _CLIP_METHODS.items():
        current = getattr(plugin, name, None)
        if current is None or getattr(current, "_truegrad_clip", False):
            continue
        installed.append((name, name in vars(plugin), vars(plugin).get(name)))
        setattr(plugin, name, _clip_wrapper(plugin, current, keyword))
    try:
        yield
    finally:
        for name, had_own, previous in reversed(installed):
            if had_own:
                setattr(plugin, name, previous)
            elif getattr(vars(plugin).get(name), "_truegrad_clip", False):
                delattr(plugin, name)


class TrueGradCallback(Callback):
    r"""Make every backward of the LightningModule write ``p.sum_grad_squared`` and keep
    it consistent with the gradient the optimizer steps with.

    At ``setup`` the module is converted in place by a truegrad backend (no new
    ``Parameter`` objects; a model built in ``configure_model`` is converted right after
    it is built). Once per optimizer step (``on_before_optimizer_step``) the statistic is
    divided by ``S**2`` under a GradScaler, summed over DDP ranks in one all-reduce and
    divided by ``W**2`` (docs/statistic.md section 3). The conversion is undone at
    ``teardown`` and when training raises.

    Gradient clipping is taken from the clip call itself, not predicted from the
    Trainer's settings: while fitting, the precision plugin's ``clip_grad_by_norm`` and
    ``clip_grad_by_value`` (the two methods every Lightning clipping path ends in:
    ``Trainer(gradient_clip_val=...)``, an overridden ``configure_gradient_clipping``
    that clips with its own values or skips steps, and ``self.clip_gradients(...)`` in
    manual optimization) are wrapped on the plugin instance. Right before each real clip
    the wrapper multiplies the statistic by the square of the factor that this call
    applies, computed from the very gradients and clip value it receives with torch's
    own formula (norm: ``clamp(max_norm / (total_norm + 1e-6), max=1)``; value: per
    element ``(clamped / unclamped)**2``, ``0/0`` counting as 1), as tensors, without a
    host sync. A step that does not clip gets no factor. In automatic optimization
    clipping runs after ``on_before_optimizer_step``, so the factor multiplies the
    unscaled, reduced statistic; in manual optimization the user clips before it, and
    the factor multiplies the local statistic before the ``1/S**2`` and the reduction.
    Both orders give the same result: the factor is a multiplier that is identical on
    every rank (DDP has averaged the gradients it is computed from), and in manual
    optimization with a GradScaler it is the factor Lightning really applied to the
    still-scaled gradients. Clipping that bypasses Lightning (calling
    ``torch.nn.utils.clip_grad_norm_`` directly) is not seen: use ``self.clip_gradients``.
    The wrappers are removed at ``teardown`` and when training raises.

    Gradient noise scale (``log_statistics=True``). With ``N`` samples per optimizer step
    (over accumulation and ranks), a loss that is the **mean** over those samples,
    ``G = p.grad`` and ``S = p.sum_grad_squared`` summed over all coordinates of all
    trainable parameters: the per-sample gradients of the per-sample losses are
    ``N g_n``, so the unbiased estimates are

    .. math::
        \widehat{\operatorname{tr}\Sigma} = \frac{N^2\,\textstyle\sum S - N \sum G^2}{N - 1},
        \qquad
        \widehat{|g|^2} = \textstyle\sum G^2 - \widehat{\operatorname{tr}\Sigma} / N,
        \qquad
        B_\text{simple} = \widehat{\operatorname{tr}\Sigma} / \widehat{|g|^2}

    (McCandlish et al. 2018), logged as ``truegrad/noise_scale`` together with
    ``truegrad/trace_sigma``, ``truegrad/grad_sq_norm`` and ``truegrad/coverage`` (the
    fraction of trainable elements that carry a statistic). Values are computed after
    loss unscaling and the DDP reduction, before the Trainer's clipping (in manual
    optimization: after whatever clipping ``training_step`` did). ``N`` is counted from the
    batches (``extract_batch_size`` times the world size).

    Args:
        backend: which truegrad backend prepares the module: ``"auto"`` (default; the
            engine tracks every trainable parameter and follows the model's samples
            through the forward), or one of the original library's doors into the same
            engine (``"nn"``, ``"patch_torch"``, ``"patch_model"``), or ``"backpack"``.
        chunk_bytes: memory bound for per-sample intermediates
            (:mod:`truegrad.nn.settings`), applied while fitting; ``None`` keeps the
            process-wide setting.
        bitwise_grad: ``True`` computes every ``p.grad`` with torch's own backward ops
            (bitwise torch's; ``truegrad.nn.settings.bitwise_grad``), applied while
            fitting; ``None`` keeps the process-wide setting (default: gradients formed
            together with the statistic where cheaper, equal to torch's up to rounding).
        log_statistics: log the gradient noise scale and coverage at the Trainer's
            logging interval.

    Raises:
        TypeError: ``backend`` not a string, ``chunk_bytes`` not an int (a bool, a float or
            a string included) or ``None``, ``log_statistics`` not a bool, ``bitwise_grad``
            not a bool or ``None`` (a string such as ``"no"`` is never taken as a bool).
        ValueError: for an unknown ``backend`` (the message lists the valid ones) or a
            ``chunk_bytes`` below 1.
        MisconfigurationException: at ``setup`` for FSDP, DeepSpeed and other strategies
            that flatten parameters; at ``on_fit_start`` (a reason the backend knows
            before running, BackPack's) or at the first optimizer step (the engine decides
            per use, in the forward) when a :class:`TGAdamW` with ``default_to_adam=False``
            steps parameters that get no statistic, listing each with its reason.

    Example::

        >>> import lightning.pytorch as pl
        >>> from truegrad_lightning import TrueGradCallback
        >>> trainer = pl.Trainer(callbacks=[TrueGradCallback(backend="nn")], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        backend: Literal["auto", "nn", "patch_torch", "patch_model", "backpack"] = "auto",
        chunk_bytes: int | None = None,
        log_statistics: bool = False,
        bitwise_grad: bool | None = None,
    ) -> None:
        owner = "TrueGradCallback"
        backend = check_choice(owner, "backend", backend, _BACKENDS)
        chunk_bytes = check_int(
            owner, "chunk_bytes", chunk_bytes, low=1, allow_none=True, what="an int number of bytes"
        )
        log_statistics = check_bool(owner, "log_statistics", log_statistics)
        bitwise_grad = check_bool(owner, "bitwise_grad", bitwise_grad, allow_none=True)
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        self.bitwise_grad = bitwise_grad
        self.log_statistics = log_statistics
        self._backend: Backend | None = None
        self._handles: list[Handle] = []
        self._module: pl.LightningModule | None = None
        self._resources = contextlib.ExitStack()  # nn settings, active while fitting
        self._backward = contextlib.ExitStack()  # backend.backward_context of one backward
        self._clipping = contextlib.ExitStack()  # clipping interception, active while set up
        self._samples = 0  # samples seen in the current optimizer step (for logging)
        self._checked_first_step = True  # on_fit_start arms the check after the first backward
        self._loaded_state: dict[str, Any] = {}  # what load_state_dict received

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(backend=self.backend)

    # ------------------------------------------------------------------ conversion
    def _get_backend(self) -> Backend:
        if self._backend is None:
            self._backend = get_backend(self.backend)
        return self._backend

    def _prepare(self, pl_module: pl.LightningModule) -> None:
        if not any(p.requires_grad for p in pl_module.parameters()):
            return  # built later, in configure_model
        self._handles.append(self._get_backend().prepare(pl_module))

    def _wrap_configure_model(self, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if "configure_model" in vars(pl_module):
            return
        if not is_overridden("configure_model", pl_module):
            return
        original = pl_module.configure_model
        callback = self

        # no functools.wraps: Lightning's is_overridden would follow __wrapped__ (LIGHTNING_NOTES)
        def configure_model() -> None:
            original()
            callback._prepare(pl_module)

        configure_model._truegrad_original = original  # type: ignore[attr-defined]
        pl_module.configure_model = configure_model  # type: ignore[method-assign]

    def _undo(self) -> None:
        self._backward.close()
        while self._handles:
            self._handles.pop().undo()
        module = self._module
        if module is not None and "configure_model" in vars(module):
            if hasattr(vars(module)["configure_model"], "_truegrad_original"):
                del module.configure_model
        self._module = None
        self._clipping.close()
        self._resources.close()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        rejected = [cls for cls in _flattening_strategies() if isinstance(trainer.strategy, cls)]
        if rejected:
            raise MisconfigurationException(
                f"TrueGradCallback does not support {rejected[0].__name__}: it flattens "
                "or shards parameters, so per-parameter sum_grad_squared cannot be computed. "
                "Use a single device or a DDP strategy (e.g. strategy='ddp')."
            )
        self._module = pl_module
        self._resources.close()
        self._resources.enter_context(
            settings.configure(chunk_bytes=self.chunk_bytes, bitwise_grad=self.bitwise_grad)
        )
        self._prepare(pl_module)
        self._wrap_configure_model(pl_module)
        self._clipping.close()
        self._clipping.enter_context(_intercept_clipping(trainer.precision_plugin))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._undo()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # leave a backward context that the exception interrupted without keeping its results
        self._backward.__exit__(type(exception), exception, exception.__traceback__)
        self._undo()

    # ------------------------------------------------------------------ coverage check
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        coverage = self._get_backend().coverage(pl_module)
        self._raise_for_missing(trainer, pl_module, coverage, None)
        self._checked_first_step = False
        covered = sum(reason is None for reason in coverage.values())
        rank_zero_info(
            f"truegrad: backend {self.backend!r} covers {covered}/{len(coverage)} trainable "
            "parameters"
        )

    def _raise_for_missing(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        coverage: dict[str, str | None],
        missing: Callable[[torch.Tensor], bool] | None,
    ) -> None:
        """Raise if a parameter stepped by a strict TGAdamW (``default_to_adam=False``) gets no
        statistic: ``missing(p)`` says so after a backward; before any (``missing=None``) only
        a reason the backend already knows counts."""
        name_of = {id(p): n for n, p in pl_module.named_parameters()}
        strict: dict[int, torch.Tensor] = {}
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, TGAdamW):
                for group in optimizer.param_groups:
                    if not group["default_to_adam"]:
                        strict.update((id(p), p) for p in group["params"] if p.requires_grad)
        names = [
            f"{name_of[i]} ({coverage.get(name_of[i]) or 'no statistic after backward'})"
            for i, p in strict.items()
            if i in name_of
            and (coverage.get(name_of[i]) is not None if missing is None else missing(p))
        ]
        if names:
            raise MisconfigurationException(
                f"TrueGradCallback(backend={self.backend!r}): {len(names)} trainable "
                "parameter(s) stepped by TGAdamW(default_to_adam=False) get no "
                "sum_grad_squared: " + "; ".join(sorted(names))
                + ". Pick another backend, make these layers supported, or pass "
                "default_to_adam=True to TGAdamW."
            )

    # ------------------------------------------------------------------ backward
    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._backward.close()
        self._backward.enter_context(self._get_backend().backward_context())

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._backward.close()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.log_statistics:
            from lightning.pytorch.utilities.data import extract_batch_size

            try:
                self._samples += extract_batch_size(batch)
            except Exception:  # noqa: BLE001 - logging only
                pass

    @override
    def on_before_zero_grad(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # TGAdamW.zero_grad clears the statistic itself; any other optimizer must not let a
        # skipped (inf/nan) step's statistic leak into the next window.
        if not isinstance(optimizer, TGAdamW):
            statistic.clear(trainable_params(optimizer))

    # ------------------------------------------------------------------ per step
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = trainable_params(optimizer)
        if not getattr(self, "_checked_first_step", True):
            # The engine decides coverage per use, in the forward: after the first backward
            # every parameter with a gradient and no statistic has its reason recorded.
            self._checked_first_step = True
            coverage = self._get_backend().coverage(pl_module)
            self._raise_for_missing(
                trainer, pl_module, coverage,
                lambda p: p.grad is not None and not statistic.has(p),
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        loss_scale = None
        if scaler is not None and scaler.is_enabled():
            scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
            loss_scale = scale if scale is not None else scaler.get_scale()
        world_size = trainer.world_size
        reduce = None
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world_size > 1 and distributed:
            reduce = torch.distributed.all_reduce
        # clipping is applied by the wrapped precision plugin (_intercept_clipping)
        fix_statistics_(params, loss_scale=loss_scale, all_reduce=reduce, world_size=world_size)
        if self.log_statistics:
            self._log(trainer, params)
            self._samples = 0

    def _log(self, trainer: pl.Trainer, params: list[torch.Tensor]) -> None:
        if not trainer._logger_connector.should_update_logs or not trainer.loggers:
            return
        with torch.no_grad():
            total = sum(p.numel() for p in params)
            covered = sum(p.numel() for p in params if statistic.has(p))
            metrics = {"truegrad/coverage": covered / max(total, 1)}
            n = self._samples * trainer.world_size
            stats = [
                (p.grad, statistic.get(p))
                for p in params
                if p.grad is not None and statistic.has(p)
            ]
            if stats and n > 1:
                g2 = sum(g.detach().double().square().sum() for g, _ in stats)
                s = sum(s.double().sum() for _, s in stats)
                trace = (n * n * s - n * g2) / (n - 1)
                grad_sq = g2 - trace / n
                metrics.update(
                    {
                        "truegrad/trace_sigma": float(trace),
                        "truegrad/grad_sq_norm": float(grad_sq),
                        "truegrad/noise_scale": float(trace / grad_sq),
                    }
                )
        if trainer.is_global_zero:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "chunk_bytes": self.chunk_bytes,
            "log_statistics": self.log_statistics,
            "bitwise_grad": self.bitwise_grad,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Configuration comes from __init__; the saved values are informational only.
        self._loaded_state = dict(state_dict)
