"""Step time of TGAdamW (every implementation) versus torch.optim.AdamW.

Workload: about 10M float32 parameters in 99 tensors of transformer-like shapes
(embedding, 8 blocks of qkv/proj/MLP weights with biases and two LayerNorms). Every
parameter has a fixed gradient and, for TGAdamW, a fixed ``sum_grad_squared``; only
``optimizer.step()`` is timed (no forward/backward, no ``zero_grad``).

This machine is shared and noisy, so the contenders run in alternating blocks of
steps within one process, and each contender's best block (ms/step) is reported,
with the median block beside it. Ratios are taken between best blocks. The first
step of each contender runs before timing and is not timed.

TGAdamW contenders: ``TGAdamW()`` (the default: on CPU the chunked single-tensor loop,
which needs no compiler), ``foreach=True``, ``fused=True`` (on CPU the C kernel of
``truegrad/optim/kernels``, compiled on first use) and ``fused=True`` on the Inductor kernels of
``_fused.py`` (``NATIVE_CPU`` off). One-off costs are reported separately: the C
kernel's compilation (cold, into a temporary directory) and its load from the cache,
and the first Inductor step (warm or cold Inductor cache as found on disk;
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` gives the cold figure).

    python benchmarks/optimizer_step.py            # full run, about 3 minutes
    python benchmarks/optimizer_step.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import truegrad.optim._fused as fused_module
from truegrad.optim import TGAdamW, TGLaProp, TGRMSProp, _native


def shapes(dim: int = 320, layers: int = 8, vocab: int = 1000) -> list[tuple[int, ...]]:
    """99 tensors, 10.2M parameters."""
    out: list[tuple[int, ...]] = [(vocab, dim)]
    for _ in range(layers):
        out += [(3 * dim, dim), (3 * dim,), (dim, dim), (dim,)]  # attention qkv, proj
        out += [(4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]  # MLP
        out += [(dim,)] * 4  # two LayerNorms
    return out + [(dim,), (dim,)]


def make_params(shape_list: list[tuple[int, ...]], grads: list[torch.Tensor], stats: list[torch.Tensor] | None):
    params = []
    for shape, grad, i in zip(shape_list, grads, range(len(grads))):
        p = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.02)
        p.grad = grad  # shared, read-only for every optimizer here
        if stats is not None:
            p.sum_grad_squared = stats[i]
        params.append(p)
    return params


class _Inductor:
    """``TGAdamW(fused=True)`` with the C kernel switched off (the Inductor kernels)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def step(self) -> None:
        fused_module.NATIVE_CPU = False
        try:
            self.opt.step()
        finally:
            fused_module.NATIVE_CPU = True


def contenders(shape_list: list[tuple[int, ...]]) -> dict[str, torch.optim.Optimizer]:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shape_list]
    # a statistic consistent with N=16 samples: sum_n g_n**2 >= g**2 / N
    stats = [g.square() * (1 + torch.rand(g.shape, generator=gen)) for g in grads]
    tg = dict(lr=1e-3, weight_decay=1e-2)  # TGAdamW defaults otherwise (graft=True)
    opts: dict[str, torch.optim.Optimizer] = {
        "AdamW(foreach=False)": torch.optim.AdamW(make_params(shape_list, grads, None), foreach=False, **tg),
        "AdamW(foreach=True)": torch.optim.AdamW(make_params(shape_list, grads, None), foreach=True, **tg),
        "AdamW(fused=True)": torch.optim.AdamW(make_params(shape_list, grads, None), fused=True, **tg),
        "TGAdamW()": TGAdamW(make_params(shape_list, grads, stats), **tg),
        "TGAdamW(foreach=True)": TGAdamW(make_params(shape_list, grads, stats), foreach=True, **tg),
        "TGAdamW(fused=True)": TGAdamW(make_params(shape_list, grads, stats), fused=True, **tg),
        "TGAdamW(fused, Inductor)": _Inductor(  # type: ignore[dict-item]
            TGAdamW(make_params(shape_list, grads, stats), fused=True, **tg)
        ),
        # the rest of the original library's family (single-tensor and foreach paths)
        "TGLaProp()": TGLaProp(make_params(shape_list, grads, stats), **tg),
        "TGLaProp(foreach=True)": TGLaProp(make_params(shape_list, grads, stats), foreach=True, **tg),
        "TGRMSProp()": TGRMSProp(make_params(shape_list, grads, stats), **tg),
        "TGRMSProp(foreach=True)": TGRMSProp(make_params(shape_list, grads, stats), foreach=True, **tg),
    }
    return opts


def default_path() -> str:
    """Which implementation ``TGAdamW(params)`` (foreach=None, fused=None) runs here."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    _, foreach = _default_to_fused_or_foreach([torch.zeros(1)], differentiable=False, use_fused=False)
    return "foreach" if foreach else "single-tensor"


def kernel_build_times() -> tuple[float | None, float | None]:
    """(cold compilation into a temporary directory, load of the cached library) in seconds."""
    import os
    import tempfile

    compiler = _native._compiler()
    cold = None
    if compiler:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            try:
                _native._build(compiler, os.path.join(tmp, "lib.so"))
                cold = time.perf_counter() - start
            except Exception:  # noqa: BLE001 - reported as "n/a"
                pass
    _native.library(build=True)  # into the cache, if not there yet
    _native._clear()
    start = time.perf_counter()
    loaded = _native.library(build=False) is not None  # what a later process does
    warm = time.perf_counter() - start
    return cold, warm if loaded else None


def timed(fn: Callable[[], object], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few short rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 15, quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per block (default 5, quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave as is)")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 15)
    steps = args.steps or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)

    shape_list = shapes()
    numel = sum(torch.Size(s).numel() for s in shape_list)
    cold, warm = kernel_build_times()  # leaves the kernel compiled for fused=True
    opts = contenders(shape_list)
    first: dict[str, float] = {}
    for name, opt in opts.items():  # warm-up; includes torch.compile for Inductor
        first[name] = timed(opt.step, 1)
        timed(opt.step, 1)

    blocks: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            blocks[name].append(timed(opt.step, steps))
    best = {name: min(b) for name, b in blocks.items()}
    median = {name: statistics.median(b) for name, b in blocks.items()}

    fused_ref, foreach_ref = best["AdamW(fused=True)"], best["AdamW(foreach=True)"]
    print(
        f"optimizer.step() on {numel / 1e6:.1f}M float32 parameters in {len(shape_list)} tensors, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{rounds} alternating rounds x {steps} steps"
    )
    print(f"{'contender':<24}{'best ms':>9}{'median ms':>11}{'/ AdamW fused':>15}{'/ AdamW foreach':>17}")
    for name in opts:
        print(
            f"{name:<24}{best[name]:>9.2f}{median[name]:>11.2f}"
            f"{best[name] / fused_ref:>14.2f}x{best[name] / foreach_ref:>16.2f}x"
        )
    def seconds(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f} s"

    print(
        f"C kernel (fused=True on CPU): one-off compilation {seconds(cold)} (cold), "
        f"load from the cache {'n/a' if warm is None else f'{warm * 1e3:.1f} ms'} (warm)"
    )
    compile_s = (first["TGAdamW(fused, Inductor)"] - best["TGAdamW(fused, Inductor)"]) / 1e3
    print(f"Inductor kernels: one-off torch.compile (first step minus a step): {compile_s:.1f} s")

    tg = {name: best[name] for name in opts if name.startswith("TGAdamW")}  # the goals are TGAdamW's
    fastest = min(tg, key=tg.get)
    print(
        f"goal 1: fastest TGAdamW path {fastest} = {tg[fastest] / fused_ref:.2f}x AdamW(fused=True) "
        f"(goal <= 2.00x): {'met' if tg[fastest] <= 2.0 * fused_ref else 'NOT met'}"
    )
    print(f"goal 2: TGAdamW() runs the {default_path()} path here")
    name = "TGAdamW()"
    print(
        f"  {name} (default, no compiler) = {tg[name] / foreach_ref:.2f}x AdamW(foreach=True) "
        f"(goal <= 1.00x): {'met' if tg[name] <= foreach_ref else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
