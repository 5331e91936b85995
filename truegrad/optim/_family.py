"""What TGLaProp and TGRMSProp share (the original library's ``TrueGrad`` base class): argument
checks, the baseline/statistic choice per parameter, weight decay, state handling."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer, _get_foreach_kernels_supported_devices

from truegrad import statistic
from truegrad._validate import check_bool, check_number, describe
from truegrad.optim._helpers import _keep_float32_state
from truegrad.optim.tgadamw import MissingStatisticError
from truegrad.optim.weight_decay import (
    WeightDecayBase,
    WeightDecayChain,
    apply_decay,
    check_weight_decay_cls,
)

Tensor = torch.Tensor
ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]


def resolve_default_to_baseline(owner: str, default_to_baseline: Any, default_to_adam: Any) -> bool:
    """The value of the two names of one switch (``default_to_adam`` is its older name)."""
    a = check_bool(owner, "default_to_baseline", default_to_baseline, allow_none=True)
    b = check_bool(owner, "default_to_adam", default_to_adam, allow_none=True)
    if a is not None and b is not None and a != b:
        raise ValueError(
            f"{owner}: default_to_baseline and default_to_adam are two names of one switch "
            f"(default_to_adam is its older name); give one, or both equal, got "
            f"default_to_baseline={default_to_baseline!r} and default_to_adam={default_to_adam!r}"
        )
    return bool(a if a is not None else b if b is not None else False)


def check_number_arg(owner: str, name: str, value: Any) -> float:
    return check_number(owner, name, value, low=0.0)  # type: ignore[return-value]


def check_beta(owner: str, name: str, value: Any) -> float:
    return check_number(owner, name, value, low=0.0, high=1.0, high_inclusive=False)  # type: ignore[return-value]


def describe_param(p: Tensor, index: int, name: str | None) -> str:
    where = f"index {index}, shape {tuple(p.shape)}"
    return f"{name!r} ({where})" if name else f"parameter {where}"


def default_foreach(params: list[Tensor]) -> bool:
    devices = _get_foreach_kernels_supported_devices()
    return all(p.device.type in devices and p.is_floating_point() for p in params)


class TrueGradFamily(Optimizer):
    """Base of TGLaProp and TGRMSProp. Subclasses set ``_name``, ``_true_keys``,
    ``_base_keys``, ``_shared_keys``, implement ``_check_betas`` and ``_update`` (one group,
    parallel lists; ``foreach`` says which implementation)."""

    _name = "TrueGrad"
    _true_keys: tuple[str, ...] = ()
    _base_keys: tuple[str, ...] = ()
    _shared_keys: tuple[str, ...] = ()
    _HYPER = ("lr", "betas", "eps", "weight_decay", "graft", "default_to_baseline", "enforce_baseline", "foreach")

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        betas: Any,
        eps: float,
        weight_decay: float,
        graft: bool,
        default_to_baseline: bool | None,
        enforce_baseline: bool,
        weight_decay_cls: WeightDecayBase | None,
        foreach: bool | None,
        default_to_adam: bool | None,
    ) -> None:
        if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
            raise TypeError(
                f"{self._name}: params must be an iterable of tensors, of (name, tensor) pairs or of "
                f"parameter-group dicts, got {describe(params)}"
            )
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "graft": graft,
            "default_to_baseline": resolve_default_to_baseline(self._name, default_to_baseline, default_to_adam),
            "enforce_baseline": enforce_baseline, "foreach": foreach,
        }
        defaults = self._check_hyper(defaults)
        self.weight_decay_cls: WeightDecayChain | None = check_weight_decay_cls(self._name, weight_decay_cls)
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- checks

    def _check_betas(self, betas: Any) -> tuple[float, ...]:
        raise NotImplementedError

    def _check_hyper(self, values: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in values.items():
            if key == "betas":
                out[key] = self._check_betas(value)
            elif key in ("lr", "eps", "weight_decay"):
                out[key] = check_number_arg(self._name, key, value)
            elif key == "foreach":
                out[key] = check_bool(self._name, key, value, allow_none=True)
            else:
                out[key] = check_bool(self._name, key, value)
        return out

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as torch does, after checking its hyperparameters (``default_to_adam``
        is accepted as the older name of ``default_to_baseline``); nothing changes on error."""
        if not isinstance(param_group, dict):
            raise TypeError(f"{self._name}: param_group must be a dict with a 'params' entry, got {describe(param_group)}")
        values = {k: param_group[k] for k in self._HYPER if k in param_group}
        if "default_to_adam" in param_group:
            values["default_to_baseline"] = resolve_default_to_baseline(
                self._name, param_group.get("default_to_baseline"), param_group["default_to_adam"]
            )
        values = self._check_hyper(values)
        param_group.pop("default_to_adam", None)
        param_group.update(values)
        super().add_param_group(param_group)

    # ---------------------------------------------------------------- state

    def __getstate__(self) -> dict[str, Any]:  # pickle and deepcopy keep the decay variant
        return {**super().__getstate__(), "weight_decay_cls": self.weight_decay_cls}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, keeping float32 moments of low-precision parameters in float32."""
        super().load_state_dict(state_dict)
        _keep_float32_state(self, state_dict, self._true_keys + self._base_keys + self._shared_keys)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and the statistic ``sum_grad_squared`` of every parameter."""
        super().zero_grad(set_to_none=set_to_none)
        statistic.clear(p for group in self.param_groups for p in group["params"])

    # ---------------------------------------------------------------- step

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        stats: list[Tensor | None],
        states: list[dict[str, Any]],
        foreach: bool,
    ) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step: per parameter with a gradient, the decay, then the update.

        Raises:
            MissingStatisticError: a parameter has a gradient but no statistic, and its
                group has neither ``default_to_baseline`` nor ``enforce_baseline``; no
                parameter is changed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        collected, missing, index = [], [], 0
        for group in self.param_groups:
            names = group.get("param_names")
            params, grads, stats = [], [], []
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = describe_param(p, index + j, names[j] if names else None)
                if p.grad.layout != torch.strided:
                    raise RuntimeError(f"{self._name} does not support sparse gradients: {where} has one")
                stat = None if group["enforce_baseline"] else statistic.get(p)
                if stat is None and not (group["enforce_baseline"] or group["default_to_baseline"]):
                    missing.append(where)
                for what, t in (("gradient", p.grad), ("statistic (sum_grad_squared)", stat)):
                    if t is not None and (t.shape != p.shape or t.device != p.device):
                        raise ValueError(
                            f"{self._name}: the {what} of {where} has shape {tuple(t.shape)} on "
                            f"{t.device}; it must have the parameter's shape {tuple(p.shape)} and "
                            f"device {p.device}. No parameter or optimizer state was changed."
                        )
                params.append(p)
                grads.append(p.grad)
                stats.append(stat)
            index += len(group["params"])
            collected.append((group, params, grads, stats))
        if missing:
            raise MissingStatisticError(
                f"{self._name}: {len(missing)} parameter(s) have a gradient but no sum_grad_squared: "
                + "; ".join(missing)
                + ". Compute the statistic for them with a truegrad backend, or pass "
                "default_to_baseline=True (older name: default_to_adam) to give such parameters "
                "the baseline update."
            )
        for group, params, grads, stats in collected:
            if not params:
                continue
            states = []
            for p, s in zip(params, stats):
                state = self.state[p]
                dtype = statistic.statistic_dtype(p.dtype)
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                keys = self._shared_keys
                if s is not None:
                    keys += self._true_keys
                if s is None or group["graft"]:
                    keys += self._base_keys
                for key in keys:
                    if key not in state:
                        state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["step"] += 1
                states.append(state)
            apply_decay(self.weight_decay_cls, params, states, group["lr"], group["weight_decay"])
            foreach = group["foreach"]
            if foreach is None:
                foreach = default_foreach(params)
            self._update(group, params, grads, stats, states, bool(foreach))
        return loss
