"""Cost of the exact sum_grad_squared statistic versus a plain torch training step.

For each workload, every contender runs forward + backward (+ whatever it needs to
produce ``sum_n g_n**2`` for every parameter) on the same model and batch. Timing is
paired and alternating in one process (this machine is shared and noisy): each round
times every contender for a block of steps (in an order rotated from round to round),
ratios are taken against the plain step of the same round, and the median over rounds
is reported. Peak memory above plain
is the peak of torch's CPU allocations during one step above plain's (torch.profiler).

Allocator: by default glibc is told (``mallopt``) to keep freed memory in the process
(no trimming, no mmap per large block), for every contender alike. With glibc's defaults
a large CPU tensor is page-faulted in again whenever freed memory was handed back to the
kernel, which happens at random between steps and costs up to a third of a step (plain
torch and every contender alike), so ratios scatter by +-15% from run to run; the
setting removes that noise, as a GPU's caching allocator does. ``--malloc default``
measures with glibc's defaults.

Contenders: ``plain`` (torch, no statistic), the truegrad backends (``auto``, the default;
``nn``, ``patch_torch``, ``patch_model``; ``tg-backpack``: truegrad's BackPack backend), and the peers that
compute the same exact statistic: BackPack ``SumGradSquared``, Opacus
``GradSampleModule`` (``(grad_sample**2).sum(0)``) and ``torch.func`` (``vmap(grad)``).

    python benchmarks/backward_overhead.py              # full run, ~5 minutes
    python benchmarks/backward_overhead.py --quick      # smoke run
    python benchmarks/backward_overhead.py --workloads mlp --contenders plain nn
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

StepFn = Callable[[], None]


# ----------------------------------------------------------------------------- workloads


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (Linear q/k/v and output) + MLP."""

    def __init__(self, dim: int = 256, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )
    return model, torch.randn(128, 784), torch.randint(0, 10, (128,))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    return model, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


def transformer() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return Block(), torch.randn(16, 64, 256), torch.randint(0, 10, (16,))


WORKLOADS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]] = {
    "mlp": mlp,
    "cnn": cnn,
    "transformer": transformer,
}


# ----------------------------------------------------------------------------- contenders


def _zero(model: nn.Module) -> None:
    """What ``optimizer.zero_grad()`` does: gradients to ``None`` and, as TGAdamW's
    ``zero_grad`` does, ``truegrad.statistic.clear`` of the statistic."""
    from truegrad import statistic

    params = list(model.parameters())
    for p in params:
        p.grad = None
    statistic.clear(params)


def plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    def step() -> None:
        _zero(model)
        F.cross_entropy(model(x), y).backward()

    return step


def truegrad_auto(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    """The default backend: every trainable parameter tracked by the engine."""
    from truegrad.backends import get_backend

    get_backend("auto").prepare(model)
    return plain(model, x, y)


def truegrad_nn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    """The model's torch.nn layers converted in place to their truegrad.nn classes."""
    from truegrad.backends import get_backend

    get_backend("nn").prepare(model)
    return plain(model, x, y)


def truegrad_patch_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    """truegrad.utils.patch_torch(): patched only while this contender steps (the other
    contenders in this process must see plain torch), the model converted in place."""
    from truegrad.backends import get_backend
    from truegrad.utils import patch_torch, unpatch_torch

    get_backend("patch_torch").prepare(model)
    unpatch_torch()
    step = plain(model, x, y)

    def patched_step() -> None:
        with patch_torch():
            step()

    return patched_step


def truegrad_backpack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    """truegrad's BackPack backend (BackPack's SumGradSquared, accumulated by truegrad)."""
    from truegrad.backends import get_backend

    backend = get_backend("backpack")
    backend.prepare(model)

    def step() -> None:
        _zero(model)
        with backend.backward_context():
            F.cross_entropy(model(x), y).backward()

    return step


def truegrad_patch_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    """The model's parameters turned into TrueGradParameter in place (truegrad.utils.patch_model)."""
    from truegrad.utils import patch_model

    patch_model(model)
    return plain(model, x, y)


def backpack_sgs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    import backpack
    from backpack.extensions import SumGradSquared

    model = backpack.extend(model)
    loss_fn = backpack.extend(nn.CrossEntropyLoss())

    def step() -> None:
        _zero(model)
        with backpack.backpack(SumGradSquared()):
            loss_fn(model(x), y).backward()

    return step


def opacus_sgs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, loss_reduction="mean")
    n = x.shape[0]

    def step() -> None:
        wrapped.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(x), y).backward()
        for p in wrapped.parameters():
            # Opacus undoes the mean's 1/N in grad_sample; the statistic carries it.
            p.sum_grad_squared = p.grad_sample.square().sum(0) / n**2

    return step


def torch_func_sgs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    n = x.shape[0]

    def sample_loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None]) / n

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def step() -> None:
        grads = per_sample(params, x, y)
        for name, p in model.named_parameters():
            p.grad = grads[name].sum(0)
            p.sum_grad_squared = grads[name].square().sum(0)

    return step


CONTENDERS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], StepFn]] = {
    "plain": plain,
    "auto": truegrad_auto,
    "nn": truegrad_nn,
    "patch_torch": truegrad_patch_torch,
    "patch_model": truegrad_patch_model,
    "tg-backpack": truegrad_backpack,
    "backpack": backpack_sgs,
    "opacus": opacus_sgs,
    "torch.func": torch_func_sgs,
}
PEERS = ("backpack", "opacus", "torch.func")
OWN_BACKENDS = ("auto", "nn", "patch_torch", "patch_model")


# ----------------------------------------------------------------------------- measurement


def build(workload: str, contender: str) -> StepFn:
    torch.manual_seed(0)
    model, x, y = WORKLOADS[workload]()
    return CONTENDERS[contender](copy.deepcopy(model), x, y)


def time_block(step: StepFn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure_time(workload: str, contenders: list[str], rounds: int, steps: int) -> dict[str, dict]:
    fns: dict[str, StepFn] = {}
    errors: dict[str, str] = {}
    for name in contenders:
        try:
            fn = build(workload, name)
            fn()  # warm-up, also surfaces unsupported layers
            fns[name] = fn
        except Exception as error:  # a peer that cannot handle the workload is reported, not fatal
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    times: dict[str, list[float]] = {name: [] for name in fns}
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        # Rotate who goes first: a step right after another model's is slower (its weights
        # were evicted from cache), which would otherwise always hit the same contender.
        order = names[r % len(names):] + names[: r % len(names)]
        block = {name: time_block(fns[name], steps) for name in order}
        for name, t in block.items():
            times[name].append(t)
            ratios[name].append(t / block["plain"])
    result = {
        name: {"ms": 1e3 * statistics.median(times[name]), "ratio": statistics.median(ratios[name])}
        for name in fns
    }
    result.update({name: {"error": err} for name, err in errors.items()})
    return result


def _peak_mib(step: StepFn) -> float:
    """Peak of torch's CPU allocations during one step, above the start (torch.profiler).

    Buffers a contender keeps between steps (truegrad's reused per-sample scratch buffer,
    Opacus' grad_sample) are allocated in the warm-up step and not counted here; they are
    listed separately in the README.
    """
    from truegrad.diagnosis import cpu_peak_bytes

    step()
    return cpu_peak_bytes(step) / 2**20  # quiet: it silences the profiler's native lines


def measure_memory(workload: str, contenders: list[str]) -> dict[str, float]:
    """Peak MiB of each contender minus plain's (same process, one step each)."""
    peaks = {}
    for name in contenders:
        try:
            peaks[name] = _peak_mib(build(workload, name))
        except Exception:
            peaks[name] = float("nan")
    return {name: peaks[name] - peaks["plain"] for name in contenders if name != "plain"}


def steady_malloc() -> bool:
    """Make glibc keep freed memory (see the module docstring); False if not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(
            libc.mallopt(m_trim_threshold, 2**31 - 1)
        )
    except (OSError, AttributeError, TypeError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--malloc", choices=["steady", "default"], default="steady",
                        help="glibc allocator: keep freed memory (default) or glibc's defaults")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 step, no memory")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.no_memory = 2, 1, True
    contenders = ["plain", *[c for c in args.contenders if c != "plain"]]
    warnings.filterwarnings("ignore")
    malloc = "steady (glibc keeps freed memory)" if args.malloc == "steady" and steady_malloc() else "glibc defaults"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc: {malloc}; median of "
          f"{args.rounds} paired rounds of {args.steps} step(s); ratio = contender / plain in the same round")
    results = {}
    for workload in args.workloads:
        timing = measure_time(workload, contenders, args.rounds, args.steps)
        memory = {} if args.no_memory else measure_memory(workload, contenders)
        results[workload] = {"time": timing, "memory_mib": memory}
        # tg-backpack is BackPack plus truegrad's bookkeeping: compared with BackPack, not
        # held to the goal, which is about truegrad's own backends.
        ours = [c for c in contenders if c in OWN_BACKENDS and "ratio" in timing.get(c, {})]
        peers = [timing[c]["ratio"] for c in PEERS if "ratio" in timing.get(c, {})]
        print(f"\n{workload}")
        print(f"  {'contender':<12} {'ms/step':>9} {'x plain':>8} {'+MiB':>8}")
        for name in contenders:
            t = timing[name]
            if "error" in t:
                print(f"  {name:<12} {'n/a':>9} {'':>8} {'':>8}  ({t['error']})")
                continue
            mem = memory.get(name)
            mem_s = "" if mem is None else f"{mem:8.0f}"
            print(f"  {name:<12} {t['ms']:9.1f} {t['ratio']:8.2f} {mem_s:>8}")
        if peers:
            best = min(peers)
            for name in ours:
                verdict = "faster" if timing[name]["ratio"] < best else "NOT faster"
                print(f"  {name} is {verdict} than the fastest peer ({best:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
