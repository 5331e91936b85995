"""``truegrad.diagnose`` (this module's :func:`diagnose`): what a backend covers on your model, how exact and how costly it is.

::

    report = truegrad.diagnose(model, x, loss_fn, y)
    print(report)

The model is never touched: two deep copies are made, one left as plain torch (run with
every truegrad backend bypassed) and one prepared with the backend. Everything runs with
dropout turned off (a thread-local ``TorchFunctionMode`` makes every dropout the identity,
whatever module or function calls it) and from the same random state, so the copies, and
the oracle, compute the same function. For every trainable parameter the report says
whether it got a statistic and, if not, why (the reason the backend recorded, which names
the op, and the backend that would cover it when the default one does), or that the loss
does not reach it at all ("unused": no gradient, so nothing to cover); and its relative
error ``max|s - s_exact| / max|s_exact|`` against the exact per-sample oracle of
:mod:`truegrad.testing`: the ``torch.func`` one, or the loop one when ``torch.func``
cannot run the model (data-dependent control flow, Hugging Face attention masks); not
for models whose samples interact (BatchNorm in training mode). For the model it reports:

* **backward time ratio**: backend's ``loss.backward()`` over plain torch's, the median
  of ``repeats`` paired measurements (plain and backend alternate; forward not timed);
* **peak memory ratio**: the peak of memory allocated during one forward + backward,
  above what was allocated before it, backend over plain. On CUDA this is
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU it is the
  running sum of the allocations and frees of torch's CPU allocator recorded by
  ``torch.profiler`` (``profile_memory=True``), so tensors made by torch ops are counted
  and memory held outside torch (Python objects, library workspaces) is not.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import sys
import statistics as stats
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from truegrad import _bypass, statistic, testing
from truegrad._validate import check_bool, check_callable, check_choice, check_int, check_module
from truegrad.backends import BACKENDS, DEFAULT_BACKEND, get_backend

__all__ = ["DiagnosisReport", "ParameterDiagnosis", "cpu_peak_bytes", "diagnose"]

SAMPLES_INTERACT = "n/a (samples interact)"


@dataclasses.dataclass(frozen=True)
class ParameterDiagnosis:
    """One trainable parameter.

    Attributes:
        name: qualified name (a tied parameter appears once, under its first name).
        shape: the parameter's shape.
        covered: the backend covers it and it got a statistic.
        reason: why it is not covered (``None`` when it is, or when it is unused).
        relative_error: ``max|s - s_exact| / max|s_exact|`` (``None`` when not computed).
        error_note: why ``relative_error`` is missing, e.g. ``"n/a (samples interact)"``.
        unused: the loss does not reach it (no gradient): nothing to cover.
    """

    name: str
    shape: tuple[int, ...]
    covered: bool
    reason: str | None
    relative_error: float | None
    error_note: str | None = None
    unused: bool = False

    @property
    def error_text(self) -> str:
        if self.relative_error is not None:
            return f"{self.relative_error:.1e}"
        return self.error_note or "-"


@dataclasses.dataclass(frozen=True)
class DiagnosisReport:
    """What :func:`diagnose` found; ``print(report)`` shows it as a table.

    Attributes:
        backend: the backend's name.
        device: where the model ran.
        parameters: one row per trainable parameter, in ``named_parameters`` order.
        backward_time_ratio: median over ``repeats`` of backend backward time / plain.
        backward_seconds: median backend backward time.
        plain_backward_seconds: median plain torch backward time.
        peak_memory_ratio: backend peak / plain peak (``None`` if not measured).
        peak_memory_bytes: backend peak above the memory allocated before the step.
        plain_peak_memory_bytes: the same for plain torch.
        memory_measure: what the memory numbers measure.
        repeats: number of paired timing repeats.
        notes: model-level remarks (oracle not applicable, warnings the backend raised).
    """

    backend: str
    device: str
    parameters: tuple[ParameterDiagnosis, ...]
    backward_time_ratio: float
    backward_seconds: float
    plain_backward_seconds: float
    peak_memory_ratio: float | None
    peak_memory_bytes: int | None
    plain_peak_memory_bytes: int | None
    memory_measure: str
    repeats: int
    notes: tuple[str, ...] = ()

    @property
    def by_name(self) -> dict[str, ParameterDiagnosis]:
        return {row.name: row for row in self.parameters}

    @property
    def uncovered(self) -> list[str]:
        """Parameters the loss reaches that get no statistic."""
        return [row.name for row in self.parameters if not row.covered and not row.unused]

    @property
    def unused(self) -> list[str]:
        """Trainable parameters the loss does not reach (no gradient)."""
        return [row.name for row in self.parameters if row.unused]

    def __str__(self) -> str:
        covered = sum(row.covered for row in self.parameters)
        used = sum(not row.unused for row in self.parameters)
        header = ("parameter", "shape", "covered", "rel. error", "reason")
        rows = [
            (row.name, "x".join(map(str, row.shape)) or "scalar",
             "unused" if row.unused else ("yes" if row.covered else "NO"),
             row.error_text, row.reason or ("no gradient: the loss does not use it" if row.unused else ""))
            for row in self.parameters
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells[:4], widths)) + "  " + cells[4]

        memory = (
            f"{self.peak_memory_ratio:.2f}x plain torch ({_bytes(self.peak_memory_bytes)} vs "
            f"{_bytes(self.plain_peak_memory_bytes)})"
            if self.peak_memory_ratio is not None
            else "not measured"
        )
        unused = len(self.parameters) - used
        out = [
            f"truegrad.diagnose: backend {self.backend!r} on {self.device}: {covered} of "
            f"{used} trainable parameters covered"
            + (f" ({unused} more not used by this loss)" if unused else ""),
            "",
            line(header).rstrip(),
            *(line(r).rstrip() for r in rows),
            "",
            f"backward time: {self.backward_time_ratio:.2f}x plain torch ("
            f"{self.backward_seconds * 1e3:.2f} ms vs {self.plain_backward_seconds * 1e3:.2f} ms, "
            f"median of {self.repeats} paired repeats)",
            f"peak memory:   {memory}",
            f"               measured: {self.memory_measure}",
        ]
        out += [f"note: {note}" for note in self.notes]
        return "\n".join(out)


def cpu_peak_bytes(run: Callable[[], Any]) -> int:
    """Peak of torch's CPU allocations while ``run()`` executes, above where it started:
    the running sum of the profiler's ``[memory]`` events (``torch.profiler``,
    ``profile_memory=True``) in time order, at its highest. Memory allocated before and
    still held is not counted."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence the profiler's native start/stop lines (Kineto writes them to file descriptor
    2, not through ``sys.stderr``) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# ----------------------------------------------------------------------------- running


def _dropouts() -> dict[Any, int]:
    """Dropout functions -> index of their input argument (all return it unchanged here)."""
    F = torch.nn.functional
    table: dict[Any, int] = {}
    for owner in (F, torch, torch.Tensor):
        for name in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                     "feature_alpha_dropout", "feature_dropout"):
            function = getattr(owner, name, None)
            if function is not None:
                table[function] = 0
    return table


class _NoDropout(TorchFunctionMode):
    """Every dropout is the identity, and attention's ``dropout_p`` is 0, in this thread."""

    _TABLE: dict[Any, int] = {}

    def __torch_function__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        table = self._TABLE or self._TABLE.update(_dropouts()) or self._TABLE
        if func in table:
            return args[0] if args else kwargs["input"]
        if func is torch.nn.functional.scaled_dot_product_attention:
            if len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            elif "dropout_p" in kwargs:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _reset(model: torch.nn.Module) -> None:
    params = _trainable(model)
    for p in params:
        p.grad = None
    statistic.clear(params)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _samples_interact(model: torch.nn.Module) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training:
            return f"{name or '<model>'!r} ({type(module).__qualname__}) is in training mode"
    return None


def _relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """``max|a - e| / max(max|e|, floor)``: ``floor`` (a tiny fraction of the model's largest
    statistic) keeps a parameter whose exact gradient is zero, such as an attention key bias,
    from comparing float rounding noise with float rounding noise."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        return math.inf
    scale = max(float(e.abs().max()) if e.numel() else 0.0, floor)
    diff = float((a - e).abs().max()) if e.numel() else 0.0
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return _relative_error(a, b) <= 1e-5


class _Step:
    """One forward + backward of one model copy."""

    def __init__(
        self,
        model: torch.nn.Module,
        inputs: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        targets: Any,
        context: Callable[[], Any],
    ) -> None:
        self.model = model
        self.args, self.kwargs = testing._as_args(inputs)
        self.loss_fn = loss_fn
        self.targets = targets
        self.context = context

    def forward(self) -> torch.Tensor:
        with self.context():
            loss = self.loss_fn(self.model(*self.args, **self.kwargs), self.targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor")
        return loss

    def backward(self, loss: torch.Tensor, backward_context: Callable[[], Any]) -> None:
        with self.context(), backward_context():
            loss.backward()

    def timed(self, backward_context: Callable[[], Any], device: torch.device) -> float:
        _reset(self.model)
        loss = self.forward()
        _sync(device)
        start = time.perf_counter()
        self.backward(loss, backward_context)
        _sync(device)
        return time.perf_counter() - start

    def peak_bytes(self, backward_context: Callable[[], Any], device: torch.device) -> int:
        _reset(self.model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.backward(self.forward(), backward_context)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - before
        return cpu_peak_bytes(lambda: self.backward(self.forward(), backward_context))


def diagnose(
    model: torch.nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    targets: Any = None,
    backend: str = DEFAULT_BACKEND,
    *,
    repeats: int = 5,
    measure_memory: bool = True,
) -> DiagnosisReport:
    """Run ``backend`` on a copy of ``model`` and report coverage, exactness and cost.

    Args:
        model: the model; never modified (deep copies are used; the global RNG state is
            restored afterwards).
        example_inputs: a tensor, a sequence of positional arguments or a mapping of
            keyword arguments, batched along dim 0.
        loss_fn: ``loss_fn(model_output, targets) -> scalar``.
        targets: passed to ``loss_fn``.
        backend: a name from :data:`truegrad.backends.BACKENDS` (default ``"auto"``).
        repeats: paired timing repeats (the median ratio is reported).
        measure_memory: also measure peak memory (on CPU this runs ``torch.profiler``).

    Returns:
        A :class:`DiagnosisReport`; ``print(report)`` shows the table.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, ``loss_fn`` is not callable,
            ``backend`` is not a string, ``repeats`` is not an int or ``measure_memory`` not
            a bool. Nothing is run or copied then.
        ValueError: for an unknown backend name (listing the valid ones) or ``repeats < 1``.
    """
    check_module("diagnose", "model", model)
    check_callable("diagnose", "loss_fn", loss_fn, "callable as loss_fn(output, targets) -> scalar")
    if not isinstance(backend, str):  # an unknown name: get_backend lists the valid ones
        check_choice("diagnose", "backend", backend, BACKENDS)
    repeats = check_int("diagnose", "repeats", repeats, low=1)
    measure_memory = check_bool("diagnose", "measure_memory", measure_memory)
    tracker = get_backend(backend)
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    devices = [device] if device.type == "cuda" else []
    notes: list[str] = []

    with torch.random.fork_rng(devices=devices), _NoDropout():
        tracked = _run_backend(tracker, model, example_inputs, loss_fn, targets, device, repeats,
                               measure_memory, notes)
        results, grads, coverage, pairs, peaks, plain_grads = tracked
        others: dict[str, str] = {}
        missing = [n for n, v in results.items() if v is None and grads.get(n) is not None]
        if missing and tracker.name != DEFAULT_BACKEND:  # would the default cover them?
            default = get_backend(DEFAULT_BACKEND)
            alt = _run_backend(default, model, example_inputs, loss_fn, targets, device, 0,
                               False, [])
            others = {n: DEFAULT_BACKEND for n in missing if alt[0].get(n) is not None}
        oracle, oracle_note = _oracle(model, example_inputs, loss_fn, targets, notes)

    floor = 0.0
    if oracle is not None and oracle.sum_grad_squared:
        floor = 1e-10 * max(float(v.abs().max()) for v in oracle.sum_grad_squared.values() if v.numel())
    rows = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        value = results.get(name)
        if grads.get(name) is None:  # the loss does not reach it
            rows.append(ParameterDiagnosis(
                name=name, shape=tuple(param.shape), covered=False, reason=None,
                relative_error=None, error_note="-", unused=True,
            ))
            continue
        reason = None
        if value is None:
            reason = coverage.get(name) or "no statistic after backward, and no reason recorded"
            if name in others:
                reason += f" (backend {others[name]!r} covers it)"
        error: float | None = None
        note = oracle_note
        if value is None:
            note = "-"
        elif oracle is not None:
            error = _relative_error(value, oracle.sum_grad_squared[name], floor)
        rows.append(ParameterDiagnosis(
            name=name, shape=tuple(param.shape), covered=reason is None, reason=reason,
            relative_error=error, error_note=None if error is not None else note,
        ))
    differ = [n for n, g in grads.items() if not _close(g, plain_grads.get(n))]
    if differ:
        notes.append("p.grad differs from plain torch's for " + ", ".join(differ))

    ratios = [b / a if a > 0 else math.inf for a, b in pairs]
    if device.type == "cuda":
        measure = "torch.cuda.max_memory_allocated during forward+backward, above the start"
    else:
        measure = ("peak of torch's CPU allocations during forward+backward above the start, "
                   "from torch.profiler(profile_memory=True)")
    return DiagnosisReport(
        backend=tracker.name,
        device=str(device),
        parameters=tuple(rows),
        backward_time_ratio=stats.median(ratios),
        backward_seconds=stats.median(b for _, b in pairs),
        plain_backward_seconds=stats.median(a for a, _ in pairs),
        peak_memory_ratio=(peaks[1] / peaks[0] if peaks and peaks[0] > 0 else None),
        peak_memory_bytes=peaks[1] if peaks else None,
        plain_peak_memory_bytes=peaks[0] if peaks else None,
        memory_measure=measure if measure_memory else "not measured",
        repeats=repeats,
        notes=tuple(notes),
    )


def _run_backend(
    tracker: Any,
    model: torch.nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    targets: Any,
    device: torch.device,
    repeats: int,
    measure_memory: bool,
    notes: list[str],
) -> tuple[dict, dict, dict, list, tuple[int, int] | None, dict]:
    """One measured step of ``tracker`` on a copy of ``model`` (and ``repeats`` paired timed
    steps with a plain copy): statistics, gradients, coverage after the step, timing pairs,
    peak memory, plain gradients."""
    plain_model = copy.deepcopy(model)
    tracked_model = copy.deepcopy(model)
    seed = torch.initial_seed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = tracker.prepare(tracked_model)
        try:
            plain = _Step(plain_model, example_inputs, loss_fn, targets, _bypass.bypass)
            tracked = _Step(tracked_model, example_inputs, loss_fn, targets, contextlib.nullcontext)
            no_context = contextlib.nullcontext
            torch.manual_seed(seed)
            tracked.timed(tracker.backward_context, device)  # the run the table reports
            coverage = tracker.coverage(tracked_model)  # after the forward: what it recorded
            results = {n: statistic.get(p) for n, p in tracked_model.named_parameters()}
            results = {n: None if s is None else s.clone() for n, s in results.items()}
            grads = {n: p.grad for n, p in tracked_model.named_parameters() if p.requires_grad}
            torch.manual_seed(seed)
            plain.timed(no_context, device)  # warm-up, and the reference gradients
            plain_grads = {n: p.grad for n, p in plain_model.named_parameters() if p.requires_grad}
            pairs = [
                (plain.timed(no_context, device), tracked.timed(tracker.backward_context, device))
                for _ in range(repeats)
            ]
            peaks: tuple[int, int] | None = None
            if measure_memory:
                peaks = (
                    plain.peak_bytes(no_context, device),
                    tracked.peak_bytes(tracker.backward_context, device),
                )
        finally:
            handle.undo()
    for w in caught:
        text = str(w.message).splitlines()[0]
        note = f"{w.category.__name__}: {text}"
        if note not in notes:
            notes.append(note)
    return results, grads, coverage, pairs, peaks, plain_grads


def _oracle(
    model: torch.nn.Module,
    example_inputs: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    targets: Any,
    notes: list[str],
) -> tuple[testing.OracleResult | None, str | None]:
    """The exact oracle of a copy of ``model``: ``torch.func``, else the loop oracle."""
    interact = _samples_interact(model)
    if interact is not None:
        notes.insert(0, f"no per-sample oracle: {interact}, so samples interact")
        return None, SAMPLES_INTERACT
    failures = []
    for method in ("func", "loop"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. torch.func's "performance drop" notes
                result = testing.sum_grad_squared_oracle(
                    copy.deepcopy(model), loss_fn, example_inputs, targets, method=method
                )
        except Exception as error:  # noqa: BLE001 - the oracle cannot run this model
            failures.append(f"{method}: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        if method == "loop":
            notes.append(f"oracle: the loop oracle (torch.func could not run the model: {failures[0]})")
        return result, None
    notes.insert(0, "oracle failed: " + "; ".join(failures))
    return None, "n/a (oracle failed)"
