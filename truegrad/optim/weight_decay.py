r"""Weight-decay variants of the original TrueGrad library (5.0.0), chosen with an
optimizer's ``weight_decay_cls`` argument.

Every variant computes a *decay direction* :math:`d(\theta)` per parameter tensor; the
optimizer then applies it decoupled, scaled by the learning rate as AdamW does,

.. math::
    \theta \leftarrow \theta - \gamma \lambda \, d(\theta)

with learning rate :math:`\gamma` and ``weight_decay`` :math:`\lambda`, **once per parameter
(with a gradient) per step**, before the parameter's update. (Upstream 5.0.0 runs the whole
decay once for every parameter with a gradient, i.e. :math:`P` times per step; this is not
copied.)

Directions, as in upstream:

* :class:`L2WeightDecay`: :math:`d = \theta` (the plain decoupled decay, the default).
* :class:`L1WeightDecay`: :math:`d = \operatorname{sign}(\theta)`.
* :class:`LpWeightDecay` ``(power)``: :math:`d = |\theta|^{p} \operatorname{sign}(\theta)`
  (so :math:`p=1` is L2 and :math:`p=0` is L1).
* :class:`WeightDecayToInit`: :math:`d = \theta - \theta_0`, :math:`\theta_0` the parameter's
  value at its first step (kept in the optimizer state, key ``weight_decay.<i>.target``).
* :class:`WeightDecayToEMA` ``(beta)``: :math:`e_k = \beta e_{k-1} + (1-\beta)\theta`,
  :math:`d = \theta - e_k / (1 - \beta^k)` with :math:`k` the parameter's decay step
  (keys ``weight_decay.<i>.ema`` and ``weight_decay.<i>.step``). Upstream 5.0.0 counts each
  step twice in the debiasing (:math:`1-\beta^{2k}`); this is not copied.
* :class:`WeightDecayChain` ``(*operands)``: composes the directions,
  :math:`d = f_n(\dots f_2(f_1(\theta)))`, where each ``f_i`` receives the previous
  direction (``WeightDecayChain(WeightDecayToInit(), L1WeightDecay())`` decays by
  :math:`\operatorname{sign}(\theta - \theta_0)`).

``<i>`` is the operand's position in its chain (0 for a single variant). All state lives in
``optimizer.state[p]`` and so travels with ``optimizer.state_dict()``.
"""

from __future__ import annotations

from typing import Any

import torch

from truegrad._validate import check_number, describe

Tensor = torch.Tensor

__all__ = [
    "L1WeightDecay",
    "L2WeightDecay",
    "LpWeightDecay",
    "WeightDecayBase",
    "WeightDecayChain",
    "WeightDecayToEMA",
    "WeightDecayToInit",
    "WeightDecayToValue",
    "apply_decay",
    "check_weight_decay_cls",
    "decay_directions",
]


class WeightDecayBase:
    """A decay direction :math:`d = f(x)`; the base class is the identity (L2)."""

    def direction(self, p: Tensor, x: Tensor, state: dict[str, Any], key: str, new: dict[str, Any]) -> Tensor:
        """The direction for parameter ``p`` given the previous operand's direction ``x``.

        ``state`` is the parameter's optimizer state (read only); entries to store go to
        ``new`` under keys starting with ``key`` (committed once the step succeeds)."""
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LpWeightDecay(WeightDecayBase):
    r""":math:`d = |x|^{p} \operatorname{sign}(x)`."""

    def __init__(self, power: float) -> None:
        self.power = check_number(type(self).__name__, "power", power, low=0.0)

    def direction(self, p: Tensor, x: Tensor, state: dict[str, Any], key: str, new: dict[str, Any]) -> Tensor:
        if self.power == 1.0:
            return x
        return x.abs().pow(self.power) * x.sign()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(power={self.power!r})"


class L1WeightDecay(LpWeightDecay):
    r""":math:`d = \operatorname{sign}(x)`."""

    def __init__(self) -> None:
        super().__init__(0.0)

    def __repr__(self) -> str:
        return "L1WeightDecay()"


class L2WeightDecay(LpWeightDecay):
    r""":math:`d = x` (the decoupled L2 decay of AdamW)."""

    def __init__(self) -> None:
        super().__init__(1.0)

    def __repr__(self) -> str:
        return "L2WeightDecay()"


class WeightDecayToValue(WeightDecayBase):
    r""":math:`d = x - t`, decay towards a per-parameter target :math:`t` (subclasses say which)."""

    def target(self, p: Tensor, state: dict[str, Any], key: str, new: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def direction(self, p: Tensor, x: Tensor, state: dict[str, Any], key: str, new: dict[str, Any]) -> Tensor:
        return x - self.target(p, state, key, new)


class WeightDecayToInit(WeightDecayToValue):
    r""":math:`d = x - \theta_0`, :math:`\theta_0` the parameter at its first step."""

    def target(self, p: Tensor, state: dict[str, Any], key: str, new: dict[str, Any]) -> Tensor:
        name = key + ".target"
        if name in state:
            return state[name]
        new[name] = p.detach().clone(memory_format=torch.preserve_format)
        return new[name]


class WeightDecayToEMA(WeightDecayToValue):
    r""":math:`e_k = \beta e_{k-1} + (1-\beta)\theta`, :math:`d = x - e_k/(1-\beta^k)`."""

    def __init__(self, beta: float = 0.999) -> None:
        self.beta = check_number("WeightDecayToEMA", "beta", beta, low=0.0, high=1.0, high_inclusive=False)

    def target(self, p: Tensor, state: dict[str, Any], key: str, new: dict[str, Any]) -> Tensor:
        ema = state.get(key + ".ema")
        k = int(state.get(key + ".step", 0)) + 1
        fresh = p.detach() * (1.0 - self.beta) if ema is None else ema * self.beta + p.detach() * (1.0 - self.beta)
        new[key + ".ema"], new[key + ".step"] = fresh, k
        return fresh / (1.0 - self.beta**k)

    def __repr__(self) -> str:
        return f"WeightDecayToEMA(beta={self.beta!r})"


class WeightDecayChain(WeightDecayBase):
    """The composition of ``operands`` (applied first to last)."""

    def __init__(self, *operands: WeightDecayBase) -> None:
        for i, op in enumerate(operands):
            if not isinstance(op, WeightDecayBase) or isinstance(op, WeightDecayChain):
                raise TypeError(
                    f"WeightDecayChain: operands[{i}] must be a weight-decay variant (L1WeightDecay, "
                    f"L2WeightDecay, LpWeightDecay, WeightDecayToInit, WeightDecayToEMA), got {describe(op)}"
                )
        self.operands = tuple(operands)

    def direction(self, p: Tensor, x: Tensor, state: dict[str, Any], key: str, new: dict[str, Any]) -> Tensor:
        for i, op in enumerate(self.operands):
            x = op.direction(p, x, state, f"{key}.{i}", new)
        return x

    def __repr__(self) -> str:
        return f"WeightDecayChain({', '.join(map(repr, self.operands))})"


def check_weight_decay_cls(owner: str, value: Any) -> WeightDecayChain | None:
    """``weight_decay_cls`` as a chain (a single variant is wrapped), or ``None``."""
    if value is None:
        return None
    if isinstance(value, dict) and "class_path" in value:
        value = _from_config(owner, value)
    if isinstance(value, WeightDecayChain):
        return value
    if isinstance(value, WeightDecayBase):
        return WeightDecayChain(value)
    if isinstance(value, type) and issubclass(value, WeightDecayBase):
        raise TypeError(
            f"{owner}: weight_decay_cls must be a weight-decay instance such as "
            f"{value.__name__}() (or WeightDecayChain(...)) or None, got the class {value.__name__}"
        )
    raise TypeError(
        f"{owner}: weight_decay_cls must be a weight-decay instance (truegrad.optim.weight_decay: "
        "L1WeightDecay(), L2WeightDecay(), LpWeightDecay(power), WeightDecayToInit(), "
        f"WeightDecayToEMA(beta), WeightDecayChain(...)) or None, got {describe(value)}"
    )


def decay_directions(
    chain: WeightDecayChain, params: list[Tensor], states: list[dict[str, Any]]
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Directions :math:`d(\\theta)` of ``params`` and the state entries to commit after the
    step (nothing is changed here)."""
    directions, news = [], []
    for p, state in zip(params, states):
        new: dict[str, Any] = {}
        directions.append(chain.direction(p, p.detach(), state, "weight_decay", new))
        news.append(new)
    return directions, news


def apply_decay(
    chain: WeightDecayChain | None,
    params: list[Tensor],
    states: list[dict[str, Any]],
    lr: float,
    weight_decay: float,
) -> None:
    r""":math:`\theta \leftarrow \theta - \gamma\lambda d(\theta)` once for each of ``params``
    and commit the variants' state; with ``chain=None`` the plain decoupled
    :math:`\theta \leftarrow (1-\gamma\lambda)\theta`."""
    if chain is None:
        if weight_decay != 0:
            for p in params:
                p.mul_(1.0 - lr * weight_decay)
        return
    directions, news = decay_directions(chain, params, states)
    for p, d, state, new in zip(params, directions, states, news):
        if weight_decay != 0:
            p.add_(d, alpha=-lr * weight_decay)
        state.update(new)


_VARIANTS = ("L1WeightDecay", "L2WeightDecay", "LpWeightDecay", "WeightDecayToInit", "WeightDecayToEMA")


def _from_config(owner: str, config: dict[str, Any]) -> WeightDecayBase:
    """A variant from a LightningCLI/jsonargparse dict ``{"class_path": ..., "init_args": {...}}``
    (LightningCLI hands an optimizer's nested class arguments over as such dicts). Only the
    variants of this module are built; a chain is ``{"class_path": "...WeightDecayChain",
    "init_args": {"operands": [<variant dicts>]}}``."""
    path = config["class_path"]
    name = path.rsplit(".", 1)[-1] if isinstance(path, str) else None
    args = config.get("init_args") or {}
    if path not in (name, f"{__name__}.{name}", f"truegrad.optim.{name}") or not isinstance(args, dict):
        name = None
    if name == "WeightDecayChain":
        operands = args.get("operands", [])
        return WeightDecayChain(*(_from_config(owner, op) if isinstance(op, dict) else op for op in operands))
    if name not in _VARIANTS:
        raise ValueError(
            f"{owner}: weight_decay_cls's class_path must name one of {', '.join(_VARIANTS)} or "
            f"WeightDecayChain (of truegrad.optim.weight_decay), got {describe(config)}"
        )
    return globals()[name](**args)
