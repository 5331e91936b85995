"""Validation loss against optimizer step: AdamW versus TrueGrad-AdamW on every backend.

For one task (a model + a datamodule), each contender trains the same model from the same
initialisation on the same data order for a fixed number of optimizer steps, once per seed,
with the same learning-rate schedule (linear warmup + cosine decay) and, unless overridden,
the same peak learning rate:

* ``adamw``: plain ``torch.optim.AdamW``, no ``TrueGradCallback`` (no statistic computed);
* ``tgadamw-<backend>``: ``truegrad.optim.TGAdamW`` with ``TrueGradCallback(backend=...)``
  for backend in ``nn``, ``patch_torch``, ``patch_model``, ``backpack``.

Every ``--val-every`` optimizer steps the whole validation split is evaluated
(``val_check_interval`` with ``check_val_every_n_epoch=None``) and ``val_loss`` (and
``val_acc`` for the classifiers) are recorded against ``trainer.global_step``; step 0 is
the untrained model, evaluated once per seed before training. Runs are interleaved per seed
(seed 0: every contender, then seed 1, ...), so slow phases of this shared machine spread
over all contenders. Wall time is measured around ``trainer.fit``, and the time spent
inside training batches (forward, backward, statistic, optimizer step) is recorded apart;
torch runs on one thread by default (``--threads``), which keeps the timings of this shared
2-core machine stable, and one short unrecorded warm-up run per contender precedes them.

All four backends compute the same exact statistic ``sum_n g_n**2``, so the TGAdamW
curves of one seed must coincide up to floating-point rounding; the script reports the
largest difference of ``val_loss`` between backends of the same seed (final step and
whole curve), which is a correctness check of the backends as much as a benchmark.

Outputs (under ``--out``, default ``benchmarks/results``):

* ``compare_optimizers_<task>.csv``: long format, one row per (contender, seed, step):
  task, contender, optimizer, backend, seed, step, val_loss, val_acc, wall_s, train_s, lr
  (``val_acc`` empty for char_gpt; ``wall_s``/``train_s``/``lr`` are per run);
* ``compare_optimizers_<task>.png``: mean ``val_loss`` against step per contender with a
  min-max band over seeds, the paired difference to AdamW's ``val_loss`` of the same seed,
  and ``val_acc`` for the classifiers;
* ``compare_optimizers_<task>.txt`` and stdout: the final metrics table, the mean
  ``val_loss`` per step and the backend-agreement check.

Run::

    python benchmarks/compare_optimizers.py                       # digits CNN, 3 seeds
    python benchmarks/compare_optimizers.py --task digits_mlp
    python benchmarks/compare_optimizers.py --task char_gpt --seeds 0   # ~0.25 s/step: ~10 min
    python benchmarks/compare_optimizers.py --quick --seeds 0 --contenders adamw tgadamw-nn
    python benchmarks/compare_optimizers.py --lr 1e-3 --lr-tgadamw 3e-3
    python benchmarks/compare_optimizers.py --replot      # redraw PNG + table from the CSV

Needs the ``lightning`` extra and matplotlib (the ``bench`` extra); ``tgadamw-backpack``
is skipped, with a note, when ``backpack`` is not importable.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import itertools
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("nn", "patch_torch", "patch_model", "backpack")
DEFAULT_CONTENDERS = ("adamw",) + tuple(f"tgadamw-{b}" for b in BACKENDS)
CSV_FIELDS = (
    "task", "contender", "optimizer", "backend", "seed", "step",
    "val_loss", "val_acc", "wall_s", "train_s", "lr",
)  # fmt: skip


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """How to build one task's model and data, and its default budget and hyperparameters."""

    name: str
    make_model: Callable[[Callable[..., Any], Callable[..., Any]], Any]  # (optimizer, sched)
    make_data: Callable[[int], Any]  # seed -> LightningDataModule
    max_steps: int
    val_every: int
    quick_steps: int
    quick_val_every: int
    lr: float
    weight_decay: float
    betas: tuple[float, float, float]  # TGAdamW's; AdamW takes the first two
    warmup: float  # fraction of max_steps
    min_lr_ratio: float = 0.0
    gradient_clip_val: float | None = None
    limit_val_batches: int | float = 1.0
    has_acc: bool = True
    unsupported: dict[str, str] = field(default_factory=dict)  # backend -> why it is skipped
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def _digits_cnn(optimizer: Callable[..., Any], scheduler: Callable[..., Any]) -> Any:
    from truegrad_lightning.models import CNNClassifier

    return CNNClassifier(channels=(32, 64), optimizer=optimizer, lr_scheduler=scheduler)


def _digits_mlp(optimizer: Callable[..., Any], scheduler: Callable[..., Any]) -> Any:
    from truegrad_lightning.models import MLPClassifier

    return MLPClassifier(
        in_features=64, hidden_sizes=(128, 128), optimizer=optimizer, lr_scheduler=scheduler
    )


def _char_gpt(optimizer: Callable[..., Any], scheduler: Callable[..., Any]) -> Any:
    from truegrad_lightning.models import CharGPT

    return CharGPT(
        block_size=128, n_layer=2, n_head=4, n_embd=128, optimizer=optimizer, lr_scheduler=scheduler
    )


def _digits_data(seed: int, flatten: bool) -> Any:
    from truegrad_lightning.data import DigitsDataModule

    return DigitsDataModule(batch_size=64, val_fraction=0.2, seed=seed, flatten=flatten)


def _char_data(seed: int) -> Any:
    from truegrad_lightning.data import CharDataModule

    return CharDataModule(corpus="python_docs", block_size=128, batch_size=32, seed=seed)


# Digits settings are those of configs/digits_cnn.yaml and digits_adamw.yaml (1438 training
# images, 23 steps per epoch: 240 steps ~ 10.4 epochs); char_gpt those of char_gpt.yaml.
TASKS: dict[str, Task] = {
    "digits_cnn": Task(
        "digits_cnn", _digits_cnn, partial(_digits_data, flatten=False),
        max_steps=240, val_every=20, quick_steps=12, quick_val_every=4,
        lr=3e-3, weight_decay=1e-2, betas=(0.9, 0.999, 0.999), warmup=0.05,
    ),
    "digits_mlp": Task(
        "digits_mlp", _digits_mlp, partial(_digits_data, flatten=True),
        max_steps=240, val_every=20, quick_steps=12, quick_val_every=4,
        lr=3e-3, weight_decay=1e-2, betas=(0.9, 0.999, 0.999), warmup=0.05,
    ),
    "char_gpt": Task(
        "char_gpt", _char_gpt, _char_data,
        max_steps=600, val_every=50, quick_steps=6, quick_val_every=3,
        lr=2e-3, weight_decay=0.1, betas=(0.9, 0.99, 0.99), warmup=0.07, min_lr_ratio=0.1,
        gradient_clip_val=1.0, limit_val_batches=20, has_acc=False,
        unsupported={
            "backpack": "BackPack has no SumGradSquared for LayerNorm and the tied "
            "embedding/head weight (TrueGradCallback refuses it)",
        },
    ),
}  # fmt: skip


@torch.no_grad()
def initial_eval(task: Task, model: Any, datamodule: Any) -> tuple[float, float | None]:
    """``(val_loss, val_acc)`` of the untrained model over the validation batches that the
    Trainer evaluates, averaged as Lightning averages them (per sample, or per batch
    weighted by its size), computed outside any Trainer so no backend is involved."""
    datamodule.setup("fit")
    if hasattr(model, "configure_model") and hasattr(model, "built") and not model.built:
        model._build(datamodule.vocab_size)  # CharGPT builds its layers from the data
    was_training = model.training
    model.eval()
    total_loss, total_correct, total_n = 0.0, 0, 0
    limit = task.limit_val_batches
    for i, (x, y) in enumerate(datamodule.val_dataloader()):
        if isinstance(limit, int) and i >= limit:
            break
        logits = model(x)
        if task.has_acc:
            loss = F.cross_entropy(logits, y)
            total_correct += int((logits.argmax(-1) == y).sum())
        else:
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        total_loss += float(loss) * len(x)
        total_n += len(x)
    model.train(was_training)
    return total_loss / total_n, (total_correct / total_n if task.has_acc else None)


# ----------------------------------------------------------------------------- runs


def _recorder_class() -> type:
    from lightning.pytorch.callbacks import Callback

    class Recorder(Callback):
        """Records ``(global_step, val_loss, val_acc)`` after every validation and the time
        spent inside training batches."""

        def __init__(self) -> None:
            self.points: list[tuple[int, float, float | None]] = []
            self.train_s = 0.0
            self._t0 = 0.0

        def on_train_batch_start(
            self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
        ) -> None:
            self._t0 = time.perf_counter()

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            self.train_s += time.perf_counter() - self._t0

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking:
                return
            metrics = trainer.callback_metrics
            acc = metrics.get("val_acc")
            self.points.append(
                (
                    int(trainer.global_step),
                    float(metrics["val_loss"]),
                    None if acc is None else float(acc),
                )
            )

    return Recorder


@dataclass
class RunResult:
    contender: str
    seed: int
    points: list[tuple[int, float, float | None]]
    wall_s: float
    train_s: float
    lr: float = float("nan")


def contender_parts(contender: str) -> tuple[str, str]:
    """``"adamw"`` -> ``("AdamW", "none")``; ``"tgadamw-nn"`` -> ``("TGAdamW", "nn")``."""
    if contender == "adamw":
        return "AdamW", "none"
    prefix, _, backend = contender.partition("-")
    if prefix != "tgadamw" or backend not in BACKENDS:
        raise ValueError(
            f"unknown contender {contender!r}: expected 'adamw' or 'tgadamw-<backend>' with "
            f"backend in {BACKENDS}"
        )
    return "TGAdamW", backend


def run_one(task: Task, contender: str, seed: int, args: argparse.Namespace) -> RunResult:
    import lightning.pytorch as pl

    from truegrad.optim import TGAdamW
    from truegrad_lightning import TrueGradCallback
    from truegrad_lightning.schedules import WarmupCosineLR

    optimizer_name, backend = contender_parts(contender)
    wd = task.weight_decay
    if optimizer_name == "AdamW":
        lr = args.lr_adamw if args.lr_adamw is not None else args.lr
        optimizer = partial(torch.optim.AdamW, lr=lr, betas=task.betas[:2], weight_decay=wd)
    else:
        lr = args.lr_tgadamw if args.lr_tgadamw is not None else args.lr
        optimizer = partial(TGAdamW, lr=lr, betas=task.betas, weight_decay=wd)
    scheduler = partial(WarmupCosineLR, warmup_steps=task.warmup, min_lr_ratio=task.min_lr_ratio)

    pl.seed_everything(seed, workers=True, verbose=False)
    datamodule = task.make_data(seed)
    model = task.make_model(optimizer, scheduler)
    step0 = initial_eval(task, model, datamodule)

    recorder = _recorder_class()()
    callbacks: list[Any] = [recorder]
    if backend != "none":
        callbacks.insert(0, TrueGradCallback(backend=backend))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.max_steps,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=task.limit_val_batches,
        num_sanity_val_steps=0,
        gradient_clip_val=task.gradient_clip_val,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic="warn",
        **task.trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    wall_s = time.perf_counter() - start
    points = [(0, step0[0], step0[1]), *recorder.points]
    return RunResult(contender, seed, points, wall_s, recorder.train_s, lr)


# ----------------------------------------------------------------------------- output


def write_csv(path: Path, task: Task, results: Sequence[RunResult]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            optimizer_name, backend = contender_parts(r.contender)
            for step, loss, acc in r.points:
                writer.writerow(
                    {
                        "task": task.name,
                        "contender": r.contender,
                        "optimizer": optimizer_name,
                        "backend": backend,
                        "seed": r.seed,
                        "step": step,
                        "val_loss": repr(loss),
                        "val_acc": "" if acc is None else repr(acc),
                        "wall_s": f"{r.wall_s:.3f}",
                        "train_s": f"{r.train_s:.3f}",
                        "lr": repr(r.lr),
                    }
                )


def read_csv(path: Path) -> list[RunResult]:
    """The runs of a CSV written by :func:`write_csv`, in file order."""
    runs: dict[tuple[str, int], RunResult] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            key = (row["contender"], int(row["seed"]))
            if key not in runs:
                runs[key] = RunResult(
                    key[0], key[1], [], float(row["wall_s"]), float(row["train_s"]),
                    float(row.get("lr") or "nan"),
                )
            acc = float(row["val_acc"]) if row["val_acc"] else None
            runs[key].points.append((int(row["step"]), float(row["val_loss"]), acc))
    return list(runs.values())


def _by_contender(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    grouped: dict[str, list[RunResult]] = {}
    for r in results:
        grouped.setdefault(r.contender, []).append(r)
    return grouped


_STYLES = {
    "adamw": dict(color="black", linestyle="-", marker="o"),
    "tgadamw-nn": dict(color="tab:blue", linestyle="-", marker="s"),
    "tgadamw-patch_torch": dict(color="tab:orange", linestyle="--", marker="^"),
    "tgadamw-patch_model": dict(color="tab:green", linestyle=":", marker="v"),
    "tgadamw-backpack": dict(color="tab:red", linestyle="-.", marker="x"),
}


def write_plot(
    path: Path,
    task: Task,
    results: Sequence[RunResult],
    seeds: Sequence[int],
    args: argparse.Namespace,
) -> None:
    """Panels: mean val_loss (log y) with a min-max band over seeds; the paired difference
    ``val_loss - AdamW's val_loss`` of the same seed (when AdamW ran); val_acc (zoomed).
    Bands are drawn for AdamW and the first TGAdamW backend only: the backends' curves
    coincide, and stacked translucent bands would hide that."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = _by_contender(results)
    baseline = {r.seed: r for r in grouped.get("adamw", [])}
    first_tg = next((c for c in grouped if c.startswith("tgadamw-")), None)
    kinds = ["loss"]
    kinds += ["diff"] if baseline and first_tg else []
    kinds += ["acc"] if task.has_acc else []
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.6 * len(kinds), 4.6), squeeze=False)
    ax_of = dict(zip(kinds, axes[0]))
    for contender, runs in grouped.items():
        style = {"markersize": 4, "linewidth": 1.4, "alpha": 0.9, **_STYLES.get(contender, {})}
        band = contender in ("adamw", first_tg)
        steps = [p[0] for p in runs[0].points]
        series = {
            "loss": [[r.points[i][1] for r in runs] for i in range(len(steps))],
            "acc": [[r.points[i][2] for r in runs] for i in range(len(steps))]
            if task.has_acc
            else [],
        }
        if "diff" in kinds and contender != "adamw":
            series["diff"] = [
                [r.points[i][1] - baseline[r.seed].points[i][1] for r in runs if r.seed in baseline]
                for i in range(len(steps))
            ]
        for kind, values in series.items():
            if kind not in ax_of or not values or not values[0]:
                continue
            ax = ax_of[kind]
            ax.plot(steps, [statistics.fmean(v) for v in values], label=contender, **style)
            if band and len(values[0]) > 1:
                ax.fill_between(
                    steps, [min(v) for v in values], [max(v) for v in values],
                    color=style.get("color"), alpha=0.15, linewidth=0,
                )  # fmt: skip
    lr_a = args.lr_adamw if args.lr_adamw is not None else args.lr
    lr_t = args.lr_tgadamw if args.lr_tgadamw is not None else args.lr
    lr_note = f"peak lr {lr_a:g}" if lr_a == lr_t else f"peak lr AdamW {lr_a:g} / TGAdamW {lr_t:g}"
    ax = ax_of["loss"]
    losses = [p[1] for r in results for p in r.points]
    if max(losses) > 10 * min(losses) > 0:  # log scale only where it spreads the curve out
        ax.set_yscale("log")
        ax.set_ylabel("validation loss (log scale)")
    else:
        ax.set_ylabel("validation loss")
    ax.set_title("val_loss: mean over seeds, band = min-max")
    ax.legend(fontsize=8)
    if "diff" in ax_of:
        ax = ax_of["diff"]
        ax.axhline(0.0, color="black", linewidth=1.0)
        ax.set_ylabel("val_loss - AdamW val_loss (same seed)")
        ax.set_title("paired difference to AdamW (< 0: better)")
        ax.legend(fontsize=8)
    if "acc" in ax_of:
        ax = ax_of["acc"]
        ax.set_ylim(0.9, 1.0)
        ax.set_ylabel("validation accuracy (zoomed to 0.9-1)")
        ax.set_title("val_acc: mean over seeds, band = min-max")
    for ax in ax_of.values():
        ax.set_xlabel("optimizer step")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        f"{task.name}: {len(seeds)} seed(s) {list(seeds)}, {args.max_steps} steps "
        f"(val every {args.val_every}), warmup-cosine, {lr_note}; TGAdamW backends overlap"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def backend_agreement(results: Sequence[RunResult]) -> tuple[float, float, list[str]]:
    """Largest ``|val_loss_a - val_loss_b|`` over pairs of TGAdamW backends of one seed: at
    the final step, and over every recorded step; and which backends were compared."""
    tg = [r for r in results if r.contender.startswith("tgadamw-")]
    names = sorted({r.contender for r in tg})
    final_diff, curve_diff = 0.0, 0.0
    for seed in sorted({r.seed for r in tg}):
        runs = [r for r in tg if r.seed == seed]
        for a, b in itertools.combinations(runs, 2):
            final_diff = max(final_diff, abs(a.points[-1][1] - b.points[-1][1]))
            for pa, pb in zip(a.points, b.points, strict=True):
                curve_diff = max(curve_diff, abs(pa[1] - pb[1]))
    return final_diff, curve_diff, names


def report(task: Task, results: Sequence[RunResult], seeds: Sequence[int]) -> str:
    grouped = _by_contender(results)
    lines = []
    final_step = results[0].points[-1][0]
    lines.append(f"task {task.name}: {len(seeds)} seed(s) {list(seeds)}, final step {final_step}")
    base_ms = None
    if "adamw" in grouped:
        base_ms = statistics.fmean(r.train_s / max(1, r.points[-1][0]) for r in grouped["adamw"])
    header = (
        f"{'contender':<22}{'final val_loss':>22}{'final val_acc':>22}{'best val_loss':>15}"
        f"{'wall s':>9}{'train ms/step':>15}{'vs adamw':>10}{'paired final diff to adamw':>30}"
    )
    baseline = {r.seed: r for r in grouped.get("adamw", [])}
    lines += [header, "-" * len(header)]
    for contender, runs in grouped.items():
        loss_m, loss_s = _mean_std([r.points[-1][1] for r in runs])
        if task.has_acc:
            acc_m, acc_s = _mean_std([r.points[-1][2] for r in runs])  # type: ignore[misc]
            acc = f"{acc_m:.4f} ± {acc_s:.4f}"
        else:
            acc = "-"
        best = statistics.fmean(min(p[1] for p in r.points) for r in runs)
        wall = statistics.fmean(r.wall_s for r in runs)
        ms = statistics.fmean(1e3 * r.train_s / max(1, r.points[-1][0]) for r in runs)
        ratio = f"{ms / (1e3 * base_ms):.2f}x" if base_ms else "-"
        diffs = [
            r.points[-1][1] - baseline[r.seed].points[-1][1] for r in runs if r.seed in baseline
        ]
        paired = "-"
        if diffs and contender != "adamw":
            d_m, d_s = _mean_std(diffs)
            paired = f"{d_m:+.4f} ± {d_s:.4f}"
        lines.append(
            f"{contender:<22}{f'{loss_m:.4f} ± {loss_s:.4f}':>22}{acc:>22}{best:>15.4f}"
            f"{wall:>9.1f}{ms:>15.1f}{ratio:>10}{paired:>30}"
        )
    # mean val_loss per step, one column per contender
    lines.append("")
    lines.append("mean val_loss over seeds per step")
    names = list(grouped)
    lines.append(f"{'step':>6}" + "".join(f"{n:>22}" for n in names))
    for i, (step, *_rest) in enumerate(grouped[names[0]][0].points):
        row = f"{step:>6}"
        for n in names:
            vals = [r.points[i][1] for r in grouped[n]]
            row += f"{statistics.fmean(vals):>22.4f}"
        lines.append(row)
    final_diff, curve_diff, tg_names = backend_agreement(results)
    if len(tg_names) > 1:
        lines.append("")
        lines.append(
            f"TGAdamW backend agreement ({', '.join(tg_names)}), same seed: max |diff val_loss| "
            f"final step {final_diff:.3g}, any step {curve_diff:.3g}"
            + ("  (bitwise equal)" if curve_diff == 0.0 else "")
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="digits_cnn")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--val-every", type=int, default=None, help="validate every k steps")
    parser.add_argument("--lr", type=float, default=None, help="peak lr of every optimizer")
    parser.add_argument("--lr-adamw", type=float, default=None, help="overrides --lr for AdamW")
    parser.add_argument("--lr-tgadamw", type=float, default=None, help="overrides --lr for TGAdamW")
    parser.add_argument("--contenders", nargs="+", default=list(DEFAULT_CONTENDERS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: on a shared 2-core machine 2 threads made "
        "step times swing by 10x between runs; 0 keeps torch's default)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="train nothing: redraw the PNG and reprint the table from the CSV in --out",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed warm-up run of each contender (skipped anyway with --quick)",
    )
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    if args.max_steps is None:
        args.max_steps = task.quick_steps if args.quick else task.max_steps
    if args.val_every is None:
        args.val_every = task.quick_val_every if args.quick else task.val_every
    if args.lr is None:
        args.lr = task.lr
    if args.max_steps < 1 or args.val_every < 1:
        parser.error("--max-steps and --val-every must be >= 1")
    if args.max_steps % args.val_every:
        parser.error(
            f"--max-steps {args.max_steps} must be a multiple of --val-every {args.val_every} "
            "(so the last point is the end of training)"
        )
    for c in args.contenders:
        try:
            contender_parts(c)
        except ValueError as e:
            parser.error(str(e))
    args.contenders = list(dict.fromkeys(args.contenders))
    args.seeds = list(dict.fromkeys(args.seeds))
    return args


@contextlib.contextmanager
def _quiet_process(threads: int) -> Iterator[None]:
    """Lightning's loggers at ERROR, its chatty warnings ignored and torch on ``threads``
    threads (0: unchanged) while running; everything is put back afterwards, so ``main``
    can be called in-process (tests) without changing the caller's state."""
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO)

    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {name: logging.getLogger(name).level for name in names}
    old_threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*training batches.*logging interval.*")
        # lightning 2.6's _pytree on torch >= 2.10; not ours to fix
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
        try:
            for name in names:
                logging.getLogger(name).setLevel(logging.ERROR)
            if threads > 0:
                torch.set_num_threads(threads)
            yield
        finally:
            torch.set_num_threads(old_threads)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    task = TASKS[args.task]
    csv_path = args.out / f"compare_optimizers_{task.name}.csv"
    png_path = args.out / f"compare_optimizers_{task.name}.png"
    if args.replot:
        results = read_csv(csv_path)
        seeds = list(dict.fromkeys(r.seed for r in results))
        steps = [p[0] for p in results[0].points]
        args.max_steps, args.val_every = steps[-1], steps[1] - steps[0]
        lrs = {("adamw" if r.contender == "adamw" else "tg"): r.lr for r in results}
        args.lr = lrs.get("adamw", lrs.get("tg", args.lr))
        args.lr_adamw, args.lr_tgadamw = lrs.get("adamw"), lrs.get("tg")
        write_plot(png_path, task, results, seeds, args)
        text = report(task, results, seeds)
        png_path.with_suffix(".txt").write_text(text + "\n")
        print(text)
        print(f"\nredrew {png_path} and its .txt from {csv_path}")
        return 0
    contenders = list(args.contenders)
    if "tgadamw-backpack" in contenders and importlib.util.find_spec("backpack") is None:
        print("note: backpack is not importable; skipping tgadamw-backpack")
        contenders.remove("tgadamw-backpack")
    for backend, why in task.unsupported.items():
        if f"tgadamw-{backend}" in contenders:
            print(f"note: skipping tgadamw-{backend} on {task.name}: {why}")
            contenders.remove(f"tgadamw-{backend}")
    if not contenders:
        print("no contender left to run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with _quiet_process(args.threads):
        return _run(args, task, contenders, csv_path, png_path)


def _run(
    args: argparse.Namespace, task: Task, contenders: list[str], csv_path: Path, png_path: Path
) -> int:
    print(
        f"{task.name}: contenders {contenders}, seeds {args.seeds}, {args.max_steps} steps, "
        f"val every {args.val_every}, lr {args.lr:g}"
        + (f" (AdamW {args.lr_adamw:g})" if args.lr_adamw is not None else "")
        + (f" (TGAdamW {args.lr_tgadamw:g})" if args.lr_tgadamw is not None else "")
        + f", torch threads {torch.get_num_threads()}",
        flush=True,
    )
    total_start = time.perf_counter()
    if not (args.quick or args.no_warmup):
        # first calls pay for lazy imports, allocator growth and backend set-up: one short,
        # unrecorded run of each contender keeps that out of the first seed's wall time
        warm = argparse.Namespace(**{**vars(args), "max_steps": 4, "val_every": 4})
        for contender in contenders:
            run_one(task, contender, args.seeds[0], warm)
        print(f"warm-up runs: {time.perf_counter() - total_start:.1f} s", flush=True)
    results: list[RunResult] = []
    for seed in args.seeds:  # seed-major: contenders interleaved within each seed
        for contender in contenders:
            r = run_one(task, contender, seed, args)
            results.append(r)
            last = r.points[-1]
            acc = "" if last[2] is None else f" val_acc {last[2]:.4f}"
            print(
                f"  seed {seed} {contender:<20} step {last[0]} val_loss {last[1]:.4f}{acc} "
                f"({r.wall_s:.1f} s)",
                flush=True,
            )
    write_csv(csv_path, task, results)
    write_plot(png_path, task, results, args.seeds, args)
    text = report(task, results, args.seeds)
    png_path.with_suffix(".txt").write_text(text + "\n")
    print()
    print(text)
    elapsed = time.perf_counter() - total_start
    print(f"\ntotal {elapsed:.1f} s; wrote {csv_path}, {png_path} and .txt")
    bad = [r for r in results if not all(math.isfinite(p[1]) for p in r.points)]
    if bad:
        print(f"non-finite val_loss in {[(r.contender, r.seed) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
