"""Step time of TGAdamW (single-tensor, foreach, fused) versus torch.optim.AdamW.

Workload: about 10M float32 parameters in 99 tensors of transformer-like shapes
(embedding, 8 blocks of qkv/proj/MLP weights with biases and two LayerNorms). Every
parameter has a fixed gradient and, for TGAdamW, a fixed ``sum_grad_squared``; only
``optimizer.step()`` is timed (no forward/backward, no ``zero_grad``).

This machine is shared and noisy, so the contenders run in alternating blocks of
steps within one process, and each contender's best block (ms/step) is reported,
with the median block beside it. Ratios are taken between best blocks. The first
step of each contender runs before timing; for ``fused=True`` it includes the one-off
``torch.compile`` cost, reported separately (warm or cold Inductor cache as found on
disk; ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` gives the cold figure).

    python benchmarks/optimizer_step.py            # full run, about 2 minutes
    python benchmarks/optimizer_step.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from truegrad.optim import TGAdamW


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
        "TGAdamW(foreach=False)": TGAdamW(make_params(shape_list, grads, stats), foreach=False, **tg),
        "TGAdamW(foreach=True)": TGAdamW(make_params(shape_list, grads, stats), foreach=True, **tg),
        "TGAdamW(fused=True)": TGAdamW(make_params(shape_list, grads, stats), fused=True, **tg),
    }
    return opts


def default_path() -> str:
    """Which implementation ``TGAdamW(params)`` (foreach=None, fused=None) runs here."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    _, foreach = _default_to_fused_or_foreach([torch.zeros(1)], differentiable=False, use_fused=False)
    return "TGAdamW(foreach=True)" if foreach else "TGAdamW(foreach=False)"


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
    opts = contenders(shape_list)
    first: dict[str, float] = {}
    for name, opt in opts.items():  # warm-up; includes torch.compile for fused=True
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
    compile_s = (first["TGAdamW(fused=True)"] - best["TGAdamW(fused=True)"]) / 1e3
    print(f"TGAdamW(fused=True) one-off compile (first step minus a step): {compile_s:.1f} s")

    tg = {name: best[name] for name in opts if name.startswith("TGAdamW")}
    fastest = min(tg, key=tg.get)
    default = default_path()
    print(
        f"goal 1: fastest TGAdamW path {fastest} = {tg[fastest] / fused_ref:.2f}x AdamW(fused=True) "
        f"(goal <= 2.00x): {'met' if tg[fastest] <= 2.0 * fused_ref else 'NOT met'}"
    )
    print(
        f"goal 2: default TGAdamW path {default} = {tg[default] / foreach_ref:.2f}x AdamW(foreach=True) "
        f"(goal <= 1.00x): {'met' if tg[default] <= foreach_ref else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
