"""TrueGradCallback against the exact oracle (docs/statistic.md section 3)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from unittest.mock import Mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import zoo
from truegrad import statistic
from truegrad.optim.tgadamw import TGAdamW
from truegrad.testing import sum_grad_squared_oracle

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from truegrad_lightning import TrueGradCallback  # noqa: E402

pytestmark = [
    pytest.mark.lightning,
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*is deprecated"),
    # the torch.func oracle
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]

N_SAMPLES = 8
_NO_BACKPACK = importlib.util.find_spec("backpack") is None
BACKPACK = [
    pytest.mark.backpack,
    pytest.mark.skipif(_NO_BACKPACK, reason="needs backpack-for-pytorch"),
]


class RecordingTGAdamW(TGAdamW):
    """TGAdamW that records a clone of every statistic right before it steps."""

    def __init__(self, named_params, **kwargs):
        named_params = list(named_params)
        super().__init__([p for _, p in named_params], **kwargs)
        self.names = [n for n, _ in named_params]
        self.recorded: list[dict[str, torch.Tensor]] = []

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]
        self.recorded.append(
            {
                n: statistic.get(p).detach().clone()
                for n, p in zip(self.names, params)
                if statistic.has(p)
            }
        )
        super().step()
        return loss


class Module(pl.LightningModule):
    def __init__(self, net: torch.nn.Module | None, *, inf_on_step: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.inf_on_step = inf_on_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.inf_on_step is not None and batch_idx == self.inf_on_step:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self):
        # lr=0: the parameters never change, so every step sees the initial weights
        return RecordingTGAdamW(self.net.named_parameters(), lr=0.0, weight_decay=0.0)


class ConfigureModelModule(Module):
    def __init__(self, state: dict) -> None:
        super().__init__(None)
        self._state = state

    def configure_model(self):
        if self.net is None:
            self.net = zoo.mlp()
            self.net.load_state_dict(self._state)


class ManualModule(Module):
    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        self.manual_backward(F.cross_entropy(self.net(x), y))
        opt.step()


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, 12, generator=g)
    return TensorDataset(x, torch.randint(0, 5, (N_SAMPLES,), generator=g))


def cpu_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2**10)


def oracle(net: torch.nn.Module, indices=None) -> dict[str, torch.Tensor]:
    x, y = data().tensors
    if indices is not None:
        x, y = x[indices], y[indices]
    return sum_grad_squared_oracle(copy.deepcopy(net), F.cross_entropy, x, y).sum_grad_squared


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TrueGradCallback()],
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def fit(module: pl.LightningModule, batch_size: int = N_SAMPLES, **kwargs) -> list[dict]:
    """Fit ``module`` on the fixed data; the statistics recorded at each optimizer step."""
    t = trainer(**kwargs)
    t.fit(module, DataLoader(data(), batch_size=batch_size, shuffle=False))
    return t.optimizers[0].recorded


def assert_close(actual: dict, expected: dict, rtol: float = 1e-4, atol_factor: float = 1e-6):
    """docs/statistic.md tolerance: |a - e| <= atol_factor * max|e| + rtol * |e| elementwise."""
    assert set(actual) == set(expected), (set(actual), set(expected))
    for name, e in expected.items():
        a = actual[name].to(torch.float64)
        e = e.to(torch.float64)
        bound = atol_factor * e.abs().max() + rtol * e.abs()
        err = ((a - e).abs() / e.abs().max()).max().item()
        assert bool(((a - e).abs() <= bound).all()), f"{name}: relative error {err:.3e}"


ALL_BACKENDS = pytest.mark.parametrize(
    "backend", ["nn", "patch_torch", "patch_model", pytest.param("backpack", marks=BACKPACK)]
)


@ALL_BACKENDS
def test_single_step_matches_oracle(backend: str) -> None:
    net = zoo.mlp()
    expected = oracle(net)
    recorded = fit(Module(net), callbacks=[TrueGradCallback(backend=backend)])
    assert len(recorded) == 1
    assert_close(recorded[0], expected)
    # undone at teardown: the module classes are plain torch again
    assert type(net[0]) is torch.nn.Linear
    assert all(type(p) is torch.nn.Parameter for p in net.parameters())


@ALL_BACKENDS
def test_accumulation_equals_one_large_batch(backend: str) -> None:
    net = zoo.mlp()
    expected = oracle(net)
    recorded = fit(
        Module(net), batch_size=N_SAMPLES // 2, accumulate_grad_batches=2,
        callbacks=[TrueGradCallback(backend=backend)],
    )
    assert len(recorded) == 1
    assert_close(recorded[0], expected)


@ALL_BACKENDS
def test_fp16_scaler_within_tolerance_and_inf_step_skipped(backend: str) -> None:
    net = zoo.mlp()
    expected_first = oracle(net, slice(0, 4))
    expected_second = oracle(net, slice(4, 8))
    scaler = cpu_scaler()
    module = Module(net, inf_on_step=0)
    recorded = fit(
        module,
        batch_size=4,
        max_steps=-1,
        max_epochs=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[TrueGradCallback(backend=backend)],
    )
    # the inf step is skipped by the scaler: step() runs once, for the second batch only,
    # and the skipped window's statistic does not leak into it
    assert len(recorded) == 1
    assert scaler.get_scale() == 2**9
    assert_close(recorded[0], expected_second, rtol=1e-3, atol_factor=1e-3)
    # and without the forced inf: the first batch matches too
    recorded = fit(
        Module(net),
        batch_size=4,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=cpu_scaler())],
        callbacks=[TrueGradCallback(backend=backend)],
    )
    assert_close(recorded[0], expected_first, rtol=1e-3, atol_factor=1e-3)


@ALL_BACKENDS
def test_bf16_mixed_within_tolerance(backend: str) -> None:
    net = zoo.mlp()
    expected = oracle(net)
    recorded = fit(Module(net), precision="bf16-mixed", callbacks=[TrueGradCallback(backend=backend)])
    assert_close(recorded[0], expected, rtol=2e-2, atol_factor=2e-2)


@ALL_BACKENDS
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping(algorithm: str, backend: str) -> None:
    net = zoo.mlp()
    x, y = data().tensors
    clip = 0.05 if algorithm == "norm" else 0.01
    result = sum_grad_squared_oracle(copy.deepcopy(net), F.cross_entropy, x, y)
    if algorithm == "norm":
        total = torch.nn.utils.get_total_norm(list(result.grad.values()))
        coef = min(1.0, clip / (float(total) + 1e-6))
        assert coef < 0.9  # the test really clips
        expected = {n: s * coef**2 for n, s in result.sum_grad_squared.items()}
    else:
        expected = {}
        for n, s in result.sum_grad_squared.items():
            g = result.grad[n]
            ratio = torch.where(g == 0, torch.ones_like(g), g.clamp(-clip, clip) / g)
            expected[n] = s * ratio**2
        assert any(bool((g.abs() > clip).any()) for g in result.grad.values())
    recorded = fit(
        Module(net), gradient_clip_val=clip, gradient_clip_algorithm=algorithm,
        callbacks=[TrueGradCallback(backend=backend)],
    )
    assert_close(recorded[0], expected)


@ALL_BACKENDS
def test_manual_optimization(backend: str) -> None:
    net = zoo.mlp()
    expected = oracle(net)
    recorded = fit(ManualModule(net), callbacks=[TrueGradCallback(backend=backend)])
    assert len(recorded) == 1
    assert_close(recorded[0], expected)


@ALL_BACKENDS
def test_model_built_in_configure_model(backend: str) -> None:
    reference = zoo.mlp()
    expected = oracle(reference)
    module = ConfigureModelModule(reference.state_dict())
    recorded = fit(module, callbacks=[TrueGradCallback(backend=backend)])
    assert_close(recorded[0], expected)
    assert "configure_model" not in vars(module)  # the wrapper is removed at teardown


class _CheckInWorker(pl.Callback):
    """Runs inside every DDP worker: the statistic the optimizer saw equals the oracle of
    the global batch, and is identical on all ranks (all_gather); then leaves a marker file
    so the parent knows each worker really checked."""

    def __init__(self, directory: Path, expected: dict[str, torch.Tensor]) -> None:
        self.directory = directory
        self.expected = expected

    def on_train_end(self, trainer, pl_module):
        recorded = trainer.optimizers[0].recorded
        assert len(recorded) == 1
        assert_close(recorded[0], self.expected)
        flat = torch.cat([recorded[0][n].flatten() for n in sorted(self.expected)])
        gathered = [torch.empty_like(flat) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(gathered, flat)
        assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks disagree"
        (self.directory / f"rank{trainer.global_rank}.ok").write_text("checked")


@pytest.mark.parametrize(
    ("strategy", "backend"),
    [
        ("ddp_fork", "nn"),
        ("ddp_fork", "patch_torch"),
        ("ddp_fork", "patch_model"),
        pytest.param("ddp_fork", "backpack", marks=BACKPACK),
        pytest.param("ddp_spawn", "patch_torch", marks=pytest.mark.slow),
    ],
)
def test_ddp_equals_one_process(tmp_path: Path, strategy: str, backend: str) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    net = zoo.mlp()
    expected = oracle(net)
    t = trainer(
        devices=2,
        strategy=strategy,
        callbacks=[TrueGradCallback(backend=backend), _CheckInWorker(tmp_path, expected)],
    )
    t.fit(Module(net), DataLoader(data(), batch_size=N_SAMPLES // 2, shuffle=False))
    # an assertion failing in a worker fails fit(); the markers prove both workers checked
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]


def test_fsdp_rejected_at_setup() -> None:
    callback = TrueGradCallback()
    fake_trainer = Mock(strategy=Mock(spec=FSDPStrategy))
    with pytest.raises(MisconfigurationException, match="FSDPStrategy"):
        callback.setup(fake_trainer, Module(zoo.mlp()), "fit")


def test_uncovered_parameter_fails_at_the_first_step() -> None:
    """A parameter that meets the batch in an op truegrad has no rule for (torch.cdist): the
    first optimizer step stops with its name and the reason, before TGAdamW steps."""

    class WithFree(Module):
        def __init__(self, net):
            super().__init__(net)
            self.free = torch.nn.Parameter(torch.zeros(12))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x) + torch.cdist(x, self.free[None]), y)

        def configure_optimizers(self):
            return RecordingTGAdamW(self.named_parameters(), lr=0.0, weight_decay=0.0)

    module = WithFree(zoo.mlp())
    with pytest.raises(MisconfigurationException, match=r"free \(torch.cdist on 'free'"):
        fit(module, callbacks=[TrueGradCallback(backend="nn")])
    assert type(module.net[0]) is torch.nn.Linear  # undone on the exception


def test_two_instances_coexist() -> None:
    a, b = TrueGradCallback(backend="nn"), TrueGradCallback(backend="patch_torch")
    assert a.state_key != b.state_key
    t = trainer(callbacks=[a, b])
    assert len([c for c in t.callbacks if isinstance(c, TrueGradCallback)]) == 2
    assert a.state_dict()["backend"] == "nn"
    a.load_state_dict(b.state_dict())


def test_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="nn_"):
        TrueGradCallback(backend="nn_")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_bytes"):
        TrueGradCallback(chunk_bytes=0)


def test_idempotent_prepare_and_undo_restore_torch() -> None:
    from truegrad.backends.patch_torch import is_patched

    class Twice(Module):
        def configure_model(self):  # net exists already: prepared at setup and again here
            pass

    net = zoo.mlp()
    expected = oracle(net)
    params = list(net.parameters())
    assert not is_patched()
    recorded = fit(Twice(net), callbacks=[TrueGradCallback(backend="patch_torch")])
    assert_close(recorded[0], expected)  # prepared twice, still counted once
    assert not is_patched()
    assert type(net[0]) is torch.nn.Linear
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]


def test_undone_when_training_raises() -> None:
    class Boom(Module):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    net = zoo.mlp()
    with pytest.raises(RuntimeError, match="boom"):
        fit(Boom(net), callbacks=[TrueGradCallback(backend="nn")])
    assert type(net[0]) is torch.nn.Linear


class _MetricsLogger(pl.loggers.Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))


def test_log_statistics_noise_scale() -> None:
    from truegrad.testing import per_sample_grads

    net = zoo.mlp()
    x, y = data().tensors
    g_n = per_sample_grads(copy.deepcopy(net), F.cross_entropy, x, y)  # carry the 1/N of the mean
    n = N_SAMPLES
    sum_s = sum(g.double().square().sum() for g in g_n.values())
    sum_g2 = sum(g.double().sum(0).square().sum() for g in g_n.values())
    # direct form: sample variance of the per-sample-loss gradients N*g_n
    per_loss = torch.cat([(n * g.double()).reshape(n, -1) for g in g_n.values()], dim=1)
    trace = per_loss.var(dim=0, unbiased=True).sum()
    assert torch.allclose(trace, (n * n * sum_s - n * sum_g2) / (n - 1))
    noise = trace / (sum_g2 - trace / n)

    logger = _MetricsLogger()
    callback = TrueGradCallback(log_statistics=True)
    fit(Module(net), callbacks=[callback], logger=logger, log_every_n_steps=1)
    logged = [m for m in logger.metrics if "truegrad/noise_scale" in m]
    assert len(logged) == 1
    assert logged[0]["truegrad/coverage"] == 1.0
    assert logged[0]["truegrad/noise_scale"] == pytest.approx(float(noise), rel=1e-4)


@pytest.mark.parametrize("scaled", [False, True])
def test_fabric_helper(scaled: bool) -> None:
    from lightning.fabric import Fabric
    from lightning.fabric.plugins import MixedPrecision as FabricMixedPrecision

    from truegrad.backends import get_backend
    from truegrad_lightning import fix_statistics

    net = zoo.mlp()
    x, y = data().tensors
    result = sum_grad_squared_oracle(copy.deepcopy(net), F.cross_entropy, x, y)
    clip = 0.05
    total = float(torch.nn.utils.get_total_norm(list(result.grad.values())))
    coef = min(1.0, clip / (total + 1e-6))
    assert coef < 0.9
    expected = {n: s * coef**2 for n, s in result.sum_grad_squared.items()}

    plugins = [FabricMixedPrecision("16-mixed", "cpu", scaler=cpu_scaler())] if scaled else None
    fabric = Fabric(accelerator="cpu", devices=1, plugins=plugins)
    backend = get_backend("patch_torch")
    with backend.prepare(net):
        optimizer = RecordingTGAdamW(net.named_parameters(), lr=0.0, weight_decay=0.0)
        model, optimizer = fabric.setup(net, optimizer)
        optimizer.zero_grad()
        for half in (slice(0, 4), slice(4, 8)):  # two accumulated micro-batches
            with backend.backward_context():
                fabric.backward(F.cross_entropy(model(x[half]), y[half]) / 2)
        fix_statistics(fabric, model, optimizer, clip_norm=clip)
        fabric.clip_gradients(model, optimizer, max_norm=clip)
        optimizer.step()
    recorded = optimizer.optimizer.recorded
    tol = 1e-3 if scaled else 1e-4
    assert_close(recorded[0], expected, rtol=tol, atol_factor=tol)


def test_all_reduce_one_collective_and_missing_statistics() -> None:
    from truegrad_lightning.step import fix_statistics_

    a, b, c = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    for p in (a, b, c):  # a statistic lives with a gradient
        p.grad = torch.zeros(3)
    statistic.add(a, torch.full((3,), 4.0))
    calls = []

    def fake_all_reduce(flat: torch.Tensor) -> None:
        # the other rank has a statistic for a (4) and b (8), none for c
        calls.append(flat.clone())
        flags = torch.tensor([1.0, 1.0, 0.0])
        other = torch.cat([torch.full((3,), 4.0), torch.full((3,), 8.0), torch.zeros(3), flags])
        flat.add_(other)

    fix_statistics_([a, b, c], all_reduce=fake_all_reduce, world_size=2)
    assert len(calls) == 1
    assert torch.equal(statistic.get(a), torch.full((3,), 2.0))  # (4 + 4) / 2**2
    assert torch.equal(statistic.get(b), torch.full((3,), 2.0))  # (0 + 8) / 2**2
    assert statistic.get(c) is None  # no rank had one


@BACKPACK[0]
@BACKPACK[1]
def test_backpack_context_left_when_backward_raises() -> None:
    class BoomInBackward(Module):
        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.net(x)

            def boom(grad):
                raise RuntimeError("boom in backward")

            out.register_hook(boom)
            return F.cross_entropy(out, y)

    callback = TrueGradCallback(backend="backpack")
    net = zoo.mlp()
    with pytest.raises(RuntimeError, match="boom in backward"):
        fit(BoomInBackward(net), callbacks=[callback])
    assert type(net[0]) is torch.nn.Linear
    assert all(not statistic.has(p) for p in net.parameters())
    # BackPack's global state was restored: a fresh run is exact again
    expected = oracle(net)
    assert_close(fit(Module(net), callbacks=[TrueGradCallback(backend="backpack")])[0], expected)


def test_cli_types_reject_bad_values() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TrueGradCallback, "callback")
    ok = parser.parse_args(["--callback.backend=nn", "--callback.chunk_bytes=1024"])
    assert ok.callback.backend == "nn" and ok.callback.chunk_bytes == 1024
    for bad in ("--callback.backend=nn_", "--callback.chunk_bytes=big"):
        with pytest.raises(jsonargparse.ArgumentError):
            parser.parse_args([bad])


def test_coverage_summary_logged(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(Module(zoo.mlp()), callbacks=[TrueGradCallback(backend="nn")])
    assert "backend 'nn' covers 6/6 trainable parameters" in caplog.text


@pytest.mark.parametrize(
    "setting, value", [("chunk_bytes", 64), ("bitwise_grad", True), ("bitwise_grad", False)]
)
def test_nn_setting_applied_while_fitting(setting: str, value: object) -> None:
    """The truegrad.nn setting is active inside the fit and restored after; the statistic is
    still the oracle's (with tiny chunks, and whichever way p.grad is formed)."""
    from truegrad.nn import settings

    seen = []

    class Spy(Module):
        def training_step(self, batch, batch_idx):
            seen.append(getattr(settings, setting))
            return super().training_step(batch, batch_idx)

    before = getattr(settings, setting)
    net = zoo.mlp()
    expected = oracle(net)
    recorded = fit(Spy(net), callbacks=[TrueGradCallback(backend="nn", **{setting: value})])
    assert seen == [value] and getattr(settings, setting) == before
    assert_close(recorded[0], expected)


def test_bitwise_grad_is_validated() -> None:
    with pytest.raises(TypeError, match="bitwise_grad must be True, False or None, got 'yes'"):
        TrueGradCallback(bitwise_grad="yes")  # type: ignore[arg-type]
