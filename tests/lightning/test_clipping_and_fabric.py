"""Clipping the statistic gets the factor that was really applied (a custom
``configure_gradient_clipping``, manual optimization), and the Fabric helper under DDP.

Oracles: docs/statistic.md section 3 in closed form. Norm clipping multiplies the exact
statistic by ``coef**2`` with torch's ``coef = min(1, max_norm / (total_norm + 1e-6))``
of the global (mean) gradient; value clipping multiplies each element by
``(clamped / unclamped)**2``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import zoo
from truegrad.testing import sum_grad_squared_oracle

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from test_callback import (  # noqa: E402
    _CheckInWorker,
    N_SAMPLES,
    Module,
    RecordingTGAdamW,
    assert_close,
    cpu_scaler,
    data,
    fit,
    trainer,
)
from truegrad_lightning import TrueGradCallback  # noqa: E402
from truegrad_lightning.callback import _intercept_clipping  # noqa: E402

pytestmark = [
    pytest.mark.lightning,
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*is deprecated"),
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]

NORM_CLIP = 0.05
VALUE_CLIP = 0.01


def clipped_oracle(
    net: torch.nn.Module,
    algorithm: str | None,
    clip: float,
    indices=slice(None),
    grad_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The exact statistic of the batch ``indices`` after clipping the mean gradient.

    ``grad_scale``: the gradients the clip sees are ``grad_scale * grad`` (manual
    optimization under a GradScaler clips the still-scaled gradients); the clip factor is
    what it applies to them, and the unscaled statistic gets its square.
    """
    x, y = data().tensors
    result = sum_grad_squared_oracle(copy.deepcopy(net), F.cross_entropy, x[indices], y[indices])
    if algorithm is None:
        return result.sum_grad_squared
    if algorithm == "norm":
        total = float(torch.nn.utils.get_total_norm(list(result.grad.values()))) * grad_scale
        coef = min(1.0, clip / (total + 1e-6))
        assert coef < 0.9  # the test really clips
        return {n: s * coef**2 for n, s in result.sum_grad_squared.items()}
    expected = {}
    for n, s in result.sum_grad_squared.items():
        g = result.grad[n] * grad_scale
        ratio = torch.where(g == 0, torch.ones_like(g), g.clamp(-clip, clip) / g)
        expected[n] = s * ratio**2
    assert any(bool((g.abs() * grad_scale > clip).any()) for g in result.grad.values())
    return expected


class CustomClip(Module):
    """Overrides ``configure_gradient_clipping``: clips with its own value and algorithm
    (``None``: what the Trainer passes) on the optimizer steps listed in ``clip_steps``
    only."""

    def __init__(self, net, clip_steps, clip_val=None, algorithm=None) -> None:
        super().__init__(net)
        self.clip_steps = set(clip_steps)
        self.clip_val = clip_val
        self.algorithm = algorithm
        self.calls = 0

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        step, self.calls = self.calls, self.calls + 1
        if step not in self.clip_steps:
            return
        self.clip_gradients(
            optimizer,
            gradient_clip_val=self.clip_val if self.clip_val is not None else gradient_clip_val,
            gradient_clip_algorithm=self.algorithm or gradient_clip_algorithm,
        )


class ManualClip(Module):
    """Manual optimization: ``self.clip_gradients`` between backward and ``opt.step()``."""

    def __init__(self, net, clip_val: float, algorithm: str) -> None:
        super().__init__(net)
        self.automatic_optimization = False
        self.clip_val = clip_val
        self.algorithm = algorithm

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        self.manual_backward(F.cross_entropy(self.net(x), y))
        self.clip_gradients(
            opt, gradient_clip_val=self.clip_val, gradient_clip_algorithm=self.algorithm
        )
        opt.step()


HALVES = (slice(0, N_SAMPLES // 2), slice(N_SAMPLES // 2, N_SAMPLES))


def test_custom_configure_gradient_clipping_skips_a_step() -> None:
    """Trainer(gradient_clip_val) set, but the module clips on its first step only: the
    second step's statistic must stay unclipped (a prediction from the Trainer's settings
    would clip it)."""
    net = zoo.mlp()
    expected = [
        clipped_oracle(net, "norm", NORM_CLIP, HALVES[0]),
        clipped_oracle(net, None, NORM_CLIP, HALVES[1]),
    ]
    recorded = fit(
        CustomClip(net, clip_steps=[0]),
        batch_size=N_SAMPLES // 2,
        max_steps=-1,
        max_epochs=1,
        gradient_clip_val=NORM_CLIP,
        gradient_clip_algorithm="norm",
    )
    assert len(recorded) == 2
    assert_close(recorded[0], expected[0])
    assert_close(recorded[1], expected[1])


@pytest.mark.parametrize(("algorithm", "clip"), [("norm", NORM_CLIP), ("value", VALUE_CLIP)])
def test_custom_configure_gradient_clipping_own_values(algorithm: str, clip: float) -> None:
    """No Trainer clipping at all; the module clips with its own value and algorithm."""
    net = zoo.mlp()
    expected = clipped_oracle(net, algorithm, clip)
    module = CustomClip(net, clip_steps=[0], clip_val=clip, algorithm=algorithm)
    t = trainer()
    t.fit(module, DataLoader(data(), batch_size=N_SAMPLES, shuffle=False))
    assert_close(t.optimizers[0].recorded[0], expected)
    # the precision plugin is back to its class's methods after fit
    assert "clip_grad_by_norm" not in vars(t.precision_plugin)
    assert "clip_grad_by_value" not in vars(t.precision_plugin)


@pytest.mark.parametrize(("algorithm", "clip"), [("norm", NORM_CLIP), ("value", VALUE_CLIP)])
def test_manual_optimization_with_clipping(algorithm: str, clip: float) -> None:
    net = zoo.mlp()
    expected = clipped_oracle(net, algorithm, clip)
    recorded = fit(ManualClip(net, clip, algorithm))
    assert len(recorded) == 1
    assert_close(recorded[0], expected)


def test_manual_optimization_clipping_under_grad_scaler() -> None:
    """Manual optimization + GradScaler: Lightning clips the still-scaled gradients (it
    unscales inside ``opt.step()``), so the factor really applied is
    ``max_norm / (S * total + 1e-6)``; the statistic gets its square and ``1/S**2``."""
    net = zoo.mlp()
    scaler = cpu_scaler()
    expected = clipped_oracle(net, "norm", NORM_CLIP, grad_scale=scaler.get_scale())
    recorded = fit(
        ManualClip(net, NORM_CLIP, "norm"),
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    assert len(recorded) == 1
    assert_close(recorded[0], expected, rtol=1e-3, atol_factor=1e-3)


def test_clip_factor_matches_the_clipped_gradient() -> None:
    """Model-free consistency: whatever clipping did to ``p.grad`` (recorded by the
    optimizer), the statistic got its square, elementwise."""

    class GradRecorder(RecordingTGAdamW):
        def step(self, closure=None):
            self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
            return super().step(closure)

    class Manual(ManualClip):
        def configure_optimizers(self):
            return GradRecorder(self.net.named_parameters(), lr=0.0, weight_decay=0.0)

    net = zoo.mlp()
    x, y = data().tensors
    result = sum_grad_squared_oracle(copy.deepcopy(net), F.cross_entropy, x, y)
    t = trainer()
    t.fit(Manual(net, VALUE_CLIP, "value"), DataLoader(data(), batch_size=N_SAMPLES))
    opt = t.optimizers[0]
    for name, grad in zip(opt.names, opt.grads):
        g = result.grad[name]
        ratio = torch.where(g == 0, torch.ones_like(g), grad / g)
        expected = {name: result.sum_grad_squared[name] * ratio**2}
        assert_close({name: opt.recorded[0][name]}, expected)


def test_clipping_interception_idempotent_and_undone() -> None:
    from lightning.pytorch.plugins.precision import Precision

    plugin = Precision()
    with _intercept_clipping(plugin):
        wrapper = vars(plugin)["clip_grad_by_norm"]
        with _intercept_clipping(plugin):  # a second callback / setup: not wrapped twice
            assert vars(plugin)["clip_grad_by_norm"] is wrapper
        assert vars(plugin)["clip_grad_by_norm"] is wrapper  # the inner exit left it alone
    assert "clip_grad_by_norm" not in vars(plugin)
    assert "clip_grad_by_value" not in vars(plugin)


def test_clipping_interception_undone_when_training_raises() -> None:
    class Boom(ManualClip):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    t = trainer()
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(Boom(zoo.mlp(), NORM_CLIP, "norm"), DataLoader(data(), batch_size=N_SAMPLES))
    assert "clip_grad_by_norm" not in vars(t.precision_plugin)


# ---------------------------------------------------------------------- DDP


@pytest.mark.parametrize("mode", ["manual_norm", "custom_value"])
def test_ddp_clipping_equals_one_process(tmp_path: Path, mode: str) -> None:
    """Two ranks of 4 samples, clipped (manual: before the reduction; automatic custom
    clipping: after it) equal one process clipping the mean gradient of all 8."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    net = zoo.mlp()
    if mode == "manual_norm":
        expected = clipped_oracle(net, "norm", NORM_CLIP)
        module = ManualClip(net, NORM_CLIP, "norm")
    else:
        expected = clipped_oracle(net, "value", VALUE_CLIP)
        module = CustomClip(net, clip_steps=[0], clip_val=VALUE_CLIP, algorithm="value")
    t = trainer(
        devices=2,
        strategy="ddp_fork",
        callbacks=[TrueGradCallback(), _CheckInWorker(tmp_path, expected)],
    )
    t.fit(module, DataLoader(data(), batch_size=N_SAMPLES // 2, shuffle=False))
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]


# ---------------------------------------------------------------------- Fabric DDP


def _fabric_worker(fabric, net, expected, directory: str) -> str:
    """One rank: 4 samples in 2 accumulated micro-batches (the first under no_sync), the
    helper, Fabric's norm clipping, one step; asserts here, in the worker."""
    from truegrad.backends import get_backend
    from truegrad_lightning import fix_statistics

    rank, world = fabric.global_rank, fabric.world_size
    x, y = data().tensors
    per_rank = N_SAMPLES // world
    x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
    backend = get_backend("patch_torch")
    with backend.prepare(net):
        optimizer = RecordingTGAdamW(net.named_parameters(), lr=0.0, weight_decay=0.0)
        model, optimizer = fabric.setup(net, optimizer)
        optimizer.zero_grad()
        micro = per_rank // 2
        for i in range(2):
            part = slice(i * micro, (i + 1) * micro)
            with fabric.no_backward_sync(model, enabled=i == 0):
                with backend.backward_context():
                    fabric.backward(F.cross_entropy(model(x[part]), y[part]) / 2)
        fix_statistics(fabric, model, optimizer, clip_norm=NORM_CLIP)
        fabric.clip_gradients(model, optimizer, max_norm=NORM_CLIP)
        optimizer.step()
    recorded = optimizer.optimizer.recorded
    assert len(recorded) == 1
    assert_close(recorded[0], expected)
    flat = torch.cat([recorded[0][n].flatten() for n in sorted(expected)])
    gathered = fabric.all_gather(flat)
    assert gathered.shape[0] == world
    assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks disagree"
    Path(directory, f"rank{rank}.ok").write_text("checked")
    return "checked"


def test_fabric_helper_ddp_equals_one_process(tmp_path: Path) -> None:
    from lightning.fabric import Fabric

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    net = zoo.mlp()
    expected = clipped_oracle(net, "norm", NORM_CLIP)  # the global batch of 8, clipped
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork")
    # a failing assertion in either worker raises here
    assert fabric.launch(_fabric_worker, net, expected, str(tmp_path)) == "checked"
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]
