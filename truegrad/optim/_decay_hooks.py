"""``TGAdamW(weight_decay_cls=...)`` without touching ``TGAdamW.step``: a step pre-hook
computes every parameter's decay direction from its value before the step and sets each
group's ``weight_decay`` to 0 for the step; a step post-hook restores ``weight_decay`` and
applies :math:`\\theta \\leftarrow \\theta - \\gamma\\lambda d(\\theta_{\\text{before}})` to the
parameters the step updated (those with a gradient), committing the variants' state. Since
TGAdamW's update does not depend on :math:`\\theta`, this equals decaying first and updating
after. If ``step`` raises (nothing changed), the next step, ``state_dict()`` or
``restore`` puts ``weight_decay`` back first."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from truegrad.optim.weight_decay import WeightDecayChain, decay_directions

__all__ = ["install", "restore"]


def restore(opt: Optimizer) -> None:
    """Put back the ``weight_decay`` of every group a failed step left at 0."""
    pending = opt.__dict__.get("_truegrad_decay_pending")
    if pending:
        for group, wd, *_ in pending:
            group["weight_decay"] = wd
    opt.__dict__["_truegrad_decay_pending"] = []


@torch.no_grad()
def _pre(opt: Optimizer, args: Any, kwargs: Any) -> None:
    restore(opt)
    chain: WeightDecayChain | None = opt.__dict__.get("weight_decay_cls")
    if chain is None:
        return
    pending = []
    for group in opt.param_groups:
        params = list(group["params"])  # all of them: a closure may give more a gradient
        directions, news = decay_directions(chain, params, [opt.state.get(p, {}) for p in params])
        directions = [d.clone() if d.data_ptr() == p.data_ptr() else d for p, d in zip(params, directions)]
        pending.append((group, group["weight_decay"], params, directions, news))
        group["weight_decay"] = 0.0
    opt.__dict__["_truegrad_decay_pending"] = pending


@torch.no_grad()
def _post(opt: Optimizer, args: Any, kwargs: Any) -> None:
    pending = opt.__dict__.get("_truegrad_decay_pending") or []
    opt.__dict__["_truegrad_decay_pending"] = []
    for group, wd, params, directions, news in pending:
        group["weight_decay"] = wd
        for p, d, new in zip(params, directions, news):
            if p.grad is None:
                continue
            if wd != 0:
                p.add_(d, alpha=-group["lr"] * wd)
            opt.state[p].update(new)


def install(opt: Optimizer, chain: WeightDecayChain | None) -> None:
    """Set ``opt.weight_decay_cls`` and, for a chain, register the two hooks (once)."""
    opt.__dict__["weight_decay_cls"] = chain
    opt.__dict__["_truegrad_decay_pending"] = []
    if chain is not None and not opt.__dict__.get("_truegrad_decay_hooks"):
        opt.__dict__["_truegrad_decay_hooks"] = (
            opt.register_step_pre_hook(_pre),
            opt.register_step_post_hook(_post),
            opt.register_state_dict_pre_hook(restore),
        )
