"""What every ``truegrad.nn`` module shares: its parameters are tracked from construction."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Tracked"]


class Tracked(torch.nn.Module):
    """Mixin (first base of every ``truegrad.nn`` class): after torch's constructor, the
    module's trainable parameters become :class:`~truegrad.parameter.TrueGradParameter` (the
    same objects), so that every use of them, also outside the module (tied weights, a
    ``.weight`` read directly), is seen by the engine."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from truegrad import parameter  # the engine imports truegrad.nn
        from truegrad.engine import forward

        parameter.track(self.parameters())
        # the model this module ends up in is not known: while it lives, the outermost
        # module call of a thread is the model call (global module hooks)
        forward.track_module(self)
