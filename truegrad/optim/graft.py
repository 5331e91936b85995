r"""Graft and Sign of the original TrueGrad library (5.0.0): optimizers that run other
optimizers and reshape their updates."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from truegrad import statistic
from truegrad._validate import check_bool, check_number, describe
from truegrad.optim._family import ParamsT, default_foreach
from truegrad.optim.weight_decay import (
    WeightDecayBase,
    WeightDecayChain,
    apply_decay,
    check_weight_decay_cls,
)

Tensor = torch.Tensor

__all__ = ["Graft", "Sign"]


class _Wrapper(Optimizer):
    _name = ""
    _inner_names: tuple[str, ...] = ()
    _bools: tuple[str, ...] = ()

    def _check(self, values: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in values.items():
            if key in ("lr", "eps", "weight_decay"):
                out[key] = check_number(self._name, key, value, low=0.0)
            elif key == "foreach":
                out[key] = check_bool(self._name, key, value, allow_none=True)
            elif key in self._bools:
                out[key] = check_bool(self._name, key, value)
        return {**values, **out}

    def _setup(self, params: Any, defaults: dict[str, Any], inner: dict[str, Any], weight_decay_cls: Any) -> None:
        if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
            raise TypeError(f"{self._name}: params must be an iterable of tensors or of parameter groups, got {describe(params)}")
        for name, opt in inner.items():
            if not isinstance(opt, Optimizer):
                raise TypeError(f"{self._name}: {name} must be a torch.optim.Optimizer, got {describe(opt)}")
        defaults = self._check(defaults)
        self.weight_decay_cls: WeightDecayChain | None = check_weight_decay_cls(self._name, weight_decay_cls)
        super().__init__(params, defaults)
        for name, opt in inner.items():
            setattr(self, name, opt)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as torch does, after checking its hyperparameters."""
        if not isinstance(param_group, dict):
            raise TypeError(f"{self._name}: param_group must be a dict with a 'params' entry, got {describe(param_group)}")
        param_group.update(self._check({k: v for k, v in param_group.items() if k != "params"}))
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:  # pickle and deepcopy keep the decay variant
        return {**super().__getstate__(), "weight_decay_cls": self.weight_decay_cls, **{n: getattr(self, n) for n in self._inner_names}}

    def state_dict(self) -> dict[str, Any]:
        """Torch's state dict of this optimizer (the decay state), with the inner optimizers'
        state dicts under their argument names."""
        sd = super().state_dict()
        for name in self._inner_names:
            sd[name] = getattr(self, name).state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        inner = {name: state_dict.pop(name, None) for name in self._inner_names}
        super().load_state_dict(state_dict)
        for name, sd in inner.items():
            if sd is not None:
                getattr(self, name).load_state_dict(sd)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and the statistic ``sum_grad_squared`` of every parameter."""
        super().zero_grad(set_to_none=set_to_none)
        statistic.clear(p for group in self.param_groups for p in group["params"])

    def _decay_and_snapshot(self) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        """Decay (once per parameter with a gradient), then copy every parameter."""
        out = []
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            apply_decay(self.weight_decay_cls, with_grad, [self.state[p] for p in with_grad], group["lr"],
                        group["weight_decay"])
            params = list(group["params"])
            out.append((group, params, [p.detach().clone() for p in params]))
        return out

    @staticmethod
    def _foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
        return group["foreach"] if group["foreach"] is not None else default_foreach(params)


class Graft(_Wrapper):
    r"""Learning-rate grafting (upstream ``truegrad.optim.Graft``, 5.0.0): the direction of
    one optimizer at the per-tensor step size of another ("Magnitude#Direction",
    https://openreview.net/forum?id=FpKgG31Z_i9).

    Per step, with :math:`\theta` after the decay :math:`\theta \leftarrow \theta -
    \gamma\lambda d(\theta)` (once per parameter with a gradient):

    .. math::
        \Delta_M = \mathrm{magnitude.step}(\theta) - \theta, \qquad
        \Delta_D = \mathrm{direction.step}(\theta) - \theta, \qquad
        \theta \leftarrow \theta + \gamma\, \frac{\lVert\Delta_M\rVert_2}{\max(\lVert\Delta_D\rVert_2, \epsilon)}\, \Delta_D

    (norms per tensor, computed in float64; both inner optimizers step from the same
    :math:`\theta`). ``magnitude`` and ``direction`` must optimize the parameters given
    here; turn their own weight decay off. ``state_dict()`` holds theirs under the keys
    ``"magnitude"`` and ``"direction"``.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(10, 2)
        >>> magnitude = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> direction = torch.optim.SGD(model.parameters(), lr=1)
        >>> opt = Graft(model.parameters(), magnitude, direction, weight_decay=0.1)
        >>> model(torch.randn(16, 10)).mean().backward()
        >>> opt.step()
    """

    _name = "Graft"
    _inner_names = ("magnitude", "direction")

    def __init__(
        self,
        params: ParamsT,
        magnitude: Optimizer,
        direction: Optimizer,
        weight_decay: float = 0.0,
        eps: float = 1e-12,
        lr: float = 1.0,
        weight_decay_cls: WeightDecayBase | None = None,
        foreach: bool | None = None,
    ) -> None:
        self._setup(params, {"weight_decay": weight_decay, "eps": eps, "lr": lr, "foreach": foreach},
                    {"magnitude": magnitude, "direction": direction}, weight_decay_cls)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        snaps = self._decay_and_snapshot()
        self.magnitude.step()
        magnitudes = []
        for group, params, orig in snaps:
            if self._foreach(group, params):
                diffs = torch._foreach_sub([p.double() for p in params], [o.double() for o in orig])
                magnitudes.append(torch._foreach_norm(diffs))
                torch._foreach_copy_(params, orig)
            else:
                norms = []
                for p, o in zip(params, orig):
                    norms.append(torch.norm(p.double() - o.double()))
                    p.copy_(o)
                magnitudes.append(norms)
        self.direction.step()
        for (group, params, orig), norms in zip(snaps, magnitudes):
            lr, eps = group["lr"], group["eps"]
            if self._foreach(group, params):
                o64 = [o.double() for o in orig]
                upd = torch._foreach_sub([p.double() for p in params], o64)
                scale = torch._foreach_norm(upd)
                torch._foreach_clamp_min_(scale, eps)
                scale = torch._foreach_div(norms, scale)
                torch._foreach_mul_(scale, lr)
                torch._foreach_mul_(upd, scale)
                torch._foreach_copy_(params, torch._foreach_add(o64, upd))
            else:
                for p, o, m in zip(params, orig, norms):
                    o64 = o.double()
                    update = p.double() - o64
                    p.copy_(o64 + update * m / torch.norm(update).clamp(min=eps) * lr)
        return loss


class Sign(_Wrapper):
    r"""Sign of another optimizer's update (upstream ``truegrad.optim.Sign``, 5.0.0).

    With :math:`\theta` after the decay and :math:`\Delta = \mathrm{base.step}(\theta) - \theta`
    (float64):

    .. math::
        \theta \leftarrow \theta + \gamma\, c\, \operatorname{sign}(\Delta), \qquad
        c = \frac{\lVert\Delta\rVert_2}{\max(\lVert\operatorname{sign}\Delta\rVert_2, \epsilon)}
        \ \text{if graft\_to\_self, else } 1

    (norms per tensor). ``state_dict()`` holds the base optimizer's under ``"base"``.
    """

    _name = "Sign"
    _inner_names = ("base",)
    _bools = ("graft_to_self",)

    def __init__(
        self,
        params: ParamsT,
        base: Optimizer,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        eps: float = 1e-12,
        graft_to_self: bool = True,
        weight_decay_cls: WeightDecayBase | None = None,
        foreach: bool | None = None,
    ) -> None:
        self._setup(params, {"weight_decay": weight_decay, "lr": lr, "eps": eps, "graft_to_self": graft_to_self,
                                 "foreach": foreach}, {"base": base}, weight_decay_cls)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        snaps = self._decay_and_snapshot()
        self.base.step()
        for group, params, orig in snaps:
            lr, eps, to_self = group["lr"], group["eps"], group["graft_to_self"]
            if self._foreach(group, params):
                upd = torch._foreach_sub([p.double() for p in params], [o.double() for o in orig])
                signs = torch._foreach_sign(upd)
                torch._foreach_copy_(params, orig)
                if to_self:
                    scale = torch._foreach_norm(signs)
                    torch._foreach_clamp_min_(scale, eps)
                    scale = torch._foreach_div(torch._foreach_norm(upd), scale)
                    torch._foreach_mul_(scale, lr)
                    torch._foreach_mul_(signs, scale)
                else:
                    torch._foreach_mul_(signs, lr)
                torch._foreach_add_(params, signs)
            else:
                for p, o in zip(params, orig):
                    update = p.double() - o.double()
                    p.copy_(o)
                    sign = torch.sign(update)
                    scale: Any = lr
                    if to_self:
                        scale = scale * update.norm() / sign.norm().clamp(min=eps)
                    p.add_(sign * scale)
        return loss
