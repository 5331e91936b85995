"""TGAdamW step on CPU with a small C kernel (OpenMP), loaded through ``ctypes``.

The kernel (``kernels/tgadamw.c`` and ``kernels/tgadamw_body.h``, shipped in the package)
is plain C11 with no torch headers: it is compiled once with the system C
compiler (``cc -O3 -march=native -fopenmp``; about a second) into the torch extensions
directory (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), under a name
that hashes everything that changes the binary (``_cache_key``): the source, the exact
compiler command line with its flags (``-march=native``, ``-fopenmp``, ...), the
compiler's identity (the file it resolves to and its ``--version`` output) and the CPU
``-march=native`` built for (model and feature flags from ``/proc/cpuinfo``,
``platform.machine()``, ``platform.processor()``), and is reused by every later process
with the same key (finding it costs each process one ``cc --version``, a few ms). It works on raw pointers of contiguous float32/float64
tensors and runs its loops on ``torch.get_num_threads()`` OpenMP threads (the
``libgomp`` torch already loaded), serially below ``PAR_MIN`` elements.

Per parameter of n elements (``_StepScalars`` as in ``_functional``), ``graft=True``::

    # moments_norms: one pass, reads g, s, m, v, u, writes m, v, u; sums in float64
    m = lerp(m, g, 1-b1);  v = b2*v + (1-b2)*g*g;  u = lerp(u, s, 1-b3)
    A += (m / max(sqrt(v), eps_v))**2;    T += (m / max(sqrt(u), eps_u))**2
    # host: coef = -lr * k_v * sqrt(A) / (sqrt(T) + eps / k_u)
    # apply_true: one pass, reads p, m, u, writes p
    p = p*(1 - lr*wd) + coef * (m / max(sqrt(u), eps_u))

i.e. 12 element passes (fused AdamW: 7), the second one partly from cache. With
``graft=False`` and for parameters without statistic one pass each (``step_true``: 10
element passes, ``step_adam``: 7). Host cost: one ``ctypes`` call per state dtype and
step (``tgadamw_f32``/``tgadamw_f64`` loop over the parameters in C, the coefficient is
computed there), plus ~10-15 us of Python per parameter (the checks of every tensor,
pointers, step scalars). Measured on 10M float32 parameters in 99 tensors (2 cores): 1.9x
``torch.optim.AdamW(fused=True)``, the floor set by the traffic being 13/7 = 1.86x.

bf16/fp16 parameters (float32 state) go through float32 copies of the parameter and
gradient, the parameter rounded once at the end, as in ``_functional``.

The kernel only ever sees addresses it can use: before any tensor changes, every
tensor of every parameter (parameter, gradient, statistic, ``exp_avg``, ``exp_avg_sq``,
``exp_avg_true_sq``) is checked (``_pointer``): a ``torch.Tensor``, ``nn.Parameter``
or subclass without ``__torch_dispatch__`` (``TrueGradParameter`` qualifies; wrapper
subclasses such as FSDP2's DTensor, FakeTensor or ``TwoTensor``, whose ``data_ptr()``
is 0, do not), strided and not nested, on the CPU, of the state dtype, of the
parameter's shape, contiguous, without a lazy negation bit, its elements inside an
allocated storage. No dispatch mode or functorch transform may be active. A parameter
with any tensor that fails goes whole to ``_single_tensor_tgadamw``, which computes
the same formula (and raises where torch cannot do it: DTensor's grafting norms,
e.g.). A gradient, statistic or state of another shape than its parameter is a user
error that ``tgadamw`` refuses before this module is reached (``ValueError``, as in
every implementation). Parameters written through raw pointers get their autograd
version counter bumped, as an in-place op does.

``library(build=True)`` compiles the kernel when it is not cached yet (about half a
second, once per machine) and returns ``None`` when no compiler works: with a warning
for ``fused=True`` (which then takes the Inductor kernels), quietly for the default CPU
path of ``TGAdamW()`` (which then runs the single-tensor loop). ``library(build=False)``
only loads a cached kernel. The norms of the grafting step are summed per thread in
float64 and the partial sums added in thread order, so a step is deterministic for a
given thread count (an OpenMP ``reduction`` would add them in arrival order). The compiler is
``$CC``, else ``cc``/``gcc``/``clang`` on the ``PATH``; ``TRUEGRAD_NATIVE=0`` switches
the kernel off (``fused=True`` then uses the Inductor kernels, the default the
single-tensor loop).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from typing import Any

import torch
import torch._appdirs
from torch.autograd.graph import increment_version

from truegrad.optim._functional import _single_tensor_tgadamw
from truegrad.optim._helpers import _pick, _step_scalars

__all__ = ["library", "build_seconds", "PAR_MIN"]

Tensor = torch.Tensor

#: Loops over fewer elements run on one thread (OpenMP's fork/join costs more).
PAR_MIN = 1 << 16

#: The kernel's source files, shipped in the package (``truegrad/optim/kernels``):
#: ``tgadamw.c`` instantiates ``tgadamw_body.h`` for float and double.
KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
_SOURCES = ("tgadamw.c", "tgadamw_body.h")


def _source() -> str:
    """The kernel's source text (both files), as hashed into the cache key."""
    parts = []
    for name in _SOURCES:
        with open(os.path.join(KERNEL_DIR, name)) as f:
            parts.append(f"/* {name} */\n{f.read()}")
    return "".join(parts)


_CFLAGS = [
    "-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c11", "-shared", "-fPIC",
    f"-DPAR_MIN={PAR_MIN}",
]

_P, _D = ctypes.c_void_p, ctypes.c_double
_ARGTYPES = [ctypes.c_int64] + [_P] * 11 + [_D] * 8 + [ctypes.c_int, ctypes.c_int]

_lock = threading.Lock()
_loaded: dict[str, Any] = {}
#: Seconds spent compiling the kernel in this process (0.0 when it came from the cache).
build_seconds: float | None = None


def _compiler() -> str | None:
    env = os.environ.get("CC")
    return env or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _command(compiler: str, src: str, out: str) -> list[str]:
    """The exact compiler command line of the kernel (``_build``; its cache key)."""
    return [compiler, *_CFLAGS, src, "-o", out]


def _compiler_identity(compiler: str) -> str:
    """What tells this compiler from another one of the same name: the file ``compiler``
    resolves to (through symlinks such as ``cc -> gcc-12``) and its ``--version`` output
    (gcc and clang print the version, the target and the build); the exit status and
    error when that fails (the build then fails as well)."""
    resolved = shutil.which(compiler) or compiler
    try:
        resolved = os.path.realpath(resolved)
        done = subprocess.run(
            [compiler, "--version"],
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        output = (done.stdout + done.stderr).decode(errors="replace")
        version = f"rc={done.returncode}\n{output}"
    except (OSError, subprocess.SubprocessError) as exc:
        version = f"{type(exc).__name__}: {exc}"
    return f"{resolved}\n{version}"


#: Lines of /proc/cpuinfo that describe what ``-march=native`` compiles for: the model
#: (x86: vendor, family, model, name; ARM: implementer, architecture, variant, part) and
#: the instruction set extensions (x86 ``flags``, ARM ``Features``).
_CPU_KEYS = (
    "vendor_id",
    "cpu family",
    "model",
    "model name",
    "stepping",
    "flags",
    "cpu implementer",
    "cpu architecture",
    "cpu variant",
    "cpu part",
    "cpu revision",
    "features",
    "isa",
    "uarch",
)


def _cpu_description() -> str:
    """The CPU ``-march=native`` builds for: the first processor's entries of
    ``/proc/cpuinfo`` named in ``_CPU_KEYS`` (model and feature flags), with
    ``platform.machine()`` and ``platform.processor()`` (all there is without
    ``/proc/cpuinfo``)."""
    lines = [
        f"platform.machine: {platform.machine()}",
        f"platform.processor: {platform.processor()}",
    ]
    seen: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if seen:
                        break  # the end of the first processor's entries
                    continue
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in _CPU_KEYS and key not in seen:
                    seen.add(key)
                    lines.append(f"{key}: {' '.join(value.split())}")
    except OSError:
        pass
    return "\n".join(lines)


def _cache_key(compiler: str, compiler_id: str | None = None, cpu: str | None = None) -> str:
    """Hex digest naming the compiled library: everything that changes the binary, i.e. the
    source, the exact command line (compiler and ``_CFLAGS``, ``-march=native`` and
    ``-fopenmp`` among them), the compiler's identity (``_compiler_identity``) and the
    CPU it builds for (``_cpu_description``, since ``-march=native`` depends on it)."""
    if compiler_id is None:
        compiler_id = _compiler_identity(compiler)
    if cpu is None:
        cpu = _cpu_description()
    command = "\0".join(_command(compiler, "<src>", "<out>"))
    key = f"{_source()}\1{command}\1{compiler_id}\1{cpu}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _cache_path(compiler: str) -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.realpath(
        torch._appdirs.user_cache_dir(appname="torch_extensions")
    )
    return os.path.join(root, "truegrad_tgadamw", f"libtgadamw_{_cache_key(compiler)}.so")


def _build(compiler: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        for name in _SOURCES:
            shutil.copyfile(os.path.join(KERNEL_DIR, name), os.path.join(tmp, name))
        src = os.path.join(tmp, _SOURCES[0])
        out = os.path.join(tmp, os.path.basename(path))
        subprocess.run(_command(compiler, src, out), check=True, capture_output=True, timeout=300)
        os.replace(out, path)  # atomic: concurrent processes never load a partial file


def library(build: bool = False, warn: bool = True) -> Any | None:
    """The loaded kernel library, or ``None`` (not on this platform, not yet compiled and
    ``build=False``, or compilation failed). Compiles at most once per process; a
    failure warns (``RuntimeWarning``) when ``warn``."""
    global build_seconds
    if "lib" in _loaded:
        return _loaded["lib"]
    if not build and "failed" in _loaded:
        return None
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        if os.environ.get("TRUEGRAD_NATIVE", "1") == "0" or os.name != "posix":
            return None
        if "path" not in _loaded:
            compiler = _compiler()
            _loaded["path"] = _cache_path(compiler) if compiler else None
            _loaded["compiler"] = compiler
        path = _loaded["path"]
        if path is None:
            return None
        if not os.path.exists(path):
            if not build or "failed" in _loaded:
                return None
            start = time.perf_counter()
            try:
                _build(_loaded["compiler"], path)
            except (OSError, subprocess.SubprocessError) as exc:
                _loaded["failed"] = True
                detail = getattr(exc, "stderr", b"") or b""
                if not warn:
                    return None
                warnings.warn(
                    "TGAdamW(fused=True): could not compile the CPU kernel with "
                    f"{_loaded['compiler']} ({type(exc).__name__}: {exc} "
                    f"{detail.decode(errors='replace')[-500:]}); CPU parameters take the "
                    "torch.compile kernels instead",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return None
            build_seconds = time.perf_counter() - start
        elif build_seconds is None:
            build_seconds = 0.0
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            _loaded["failed"] = True
            return None
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"tgadamw_{suffix}")
            fn.argtypes, fn.restype = _ARGTYPES, None
        _loaded["lib"] = lib
        return lib


def _clear() -> None:
    """Forget the loaded library (tests)."""
    global build_seconds
    _loaded.clear()
    build_seconds = None


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_LOW = (torch.float16, torch.bfloat16)
_STRIDED = torch.strided
_Parameter = torch.nn.Parameter

#: Tensor classes already judged by ``_plain_class`` (a plain dict: a weak one costs a
#: weak reference per lookup, and tensor classes are few and live as long as the program).
_PLAIN_CLASSES: dict[type, bool] = {Tensor: True, torch.nn.Parameter: True}


def _plain_class(cls: type) -> bool:
    """Whether tensors of class ``cls`` keep their elements in their own storage, as a
    ``torch.Tensor`` does: ``torch.Tensor``, ``torch.nn.Parameter`` and subclasses that
    define no ``__torch_dispatch__`` (``TrueGradParameter`` only overrides
    ``__torch_function__``). A class that defines it is a wrapper (DTensor, FakeTensor,
    ``TwoTensor``, ...) whose elements live elsewhere, and whose ``data_ptr()`` is 0."""
    plain = _PLAIN_CLASSES.get(cls)
    if plain is None:
        mro = cls.__mro__
        plain = Tensor in mro and all(
            "__torch_dispatch__" not in vars(k) for k in mro[: mro.index(Tensor)]
        )
        _PLAIN_CLASSES[cls] = plain
    return plain


def _dense_cpu(t: Tensor, shape: torch.Size) -> bool:
    """``t`` is a dense CPU tensor of ``shape`` (``to`` makes a kernel operand of it)."""
    return (
        _plain_class(type(t))
        and t.layout == _STRIDED
        and not t.is_nested
        and t.is_cpu
        and t.shape == shape
    )


def _pointer(t: Tensor, dtype: torch.dtype, shape: torch.Size, n: int) -> int | None:
    """The address the kernel may read and write ``t`` at, as ``n = shape.numel()``
    elements of ``dtype``; ``None`` when it may not. That needs a dense contiguous CPU
    tensor of that dtype and shape, of a class that holds its own elements
    (``_plain_class``), without a lazy negation bit, whose elements lie inside an
    allocated storage (a storage freed or shrunk with ``resize_``, as FSDP does, does
    not hold them). Under 1 us; every tensor passes here before its address goes to C."""
    cls = type(t)
    if not (
        (cls is Tensor or cls is _Parameter or _plain_class(cls))
        and t.layout == _STRIDED
        and not t.is_nested
        and t.is_cpu
        and t.dtype == dtype
        and t.shape == shape
        and t.is_contiguous()
        and not t.is_neg()
    ):
        return None
    if n == 0:
        return 0  # the kernel touches no element
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # no storage (a functorch or functional wrapper)
        return None
    base, offset, size = storage.data_ptr(), t.storage_offset(), dtype.itemsize
    if base == 0 or (offset + n) * size > storage.nbytes():
        return None
    return base + offset * size


def _modes_active() -> bool:
    """A ``TorchDispatchMode`` (FakeTensorMode, FlopCounterMode, ...) or a functorch
    transform (vmap, grad) is active: they must see every op, which a C call bypasses."""
    return (
        torch._C._len_torch_dispatch_stack() > 0
        or torch._C._functorch.peek_interpreter_stack() is not None
    )


def _native_tgadamw(
    params: list[Tensor],
    grads: list[Tensor],
    stats: list[Tensor | None],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_true_sqs: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    graft: bool,
    maximize: bool,
    lib: Any,
) -> None:
    """One C call per state dtype; parameters the kernel does not take go to
    ``_single_tensor_tgadamw`` (see the module docstring).

    Before any tensor changes, every tensor of every parameter (parameter, gradient,
    statistic, ``exp_avg``, ``exp_avg_sq``, ``exp_avg_true_sq``) passes ``_pointer``
    (class, dtype, shape, layout, device, contiguity, storage); a parameter with one
    tensor that does not goes to the loop whole, and only addresses ``_pointer``
    returned reach C. (Shapes other than the parameter's were refused before that:
    ``tgadamw`` runs ``_check_tensors`` for every implementation.)
    """
    lists = (params, grads, stats, exp_avgs, exp_avg_sqs, exp_avg_true_sqs, state_steps)
    rest: list[int] = []
    # per state dtype: parameter indices and their (n, p, g, s, m, v, u) addresses
    batches: dict[torch.dtype, tuple[list[int], list[tuple[int, ...]]]] = {}
    copies: list[tuple[Tensor, Tensor]] = []  # (bf16/fp16 parameter, its float32 copy)
    keep: list[Tensor] = []  # the float32 copies of bf16/fp16 gradients, until the C call
    modes = _modes_active()
    # the tensors' own attributes: no __torch_function__ of a subclass (TrueGradParameter)
    # runs, so none can misreport a shape or an address (and none costs its Python time)
    with torch._C.DisableTorchFunctionSubclass():
        for i, p in enumerate(params):
            g, s, m, v, u = grads[i], stats[i], exp_avgs[i], exp_avg_sqs[i], exp_avg_true_sqs[i]
            dtype, shape = m.dtype, p.shape
            if modes or dtype not in _SUFFIX:
                rest.append(i)
                continue
            full = p
            if p.dtype in _LOW and dtype == torch.float32:
                if not (_dense_cpu(p, shape) and _dense_cpu(g, shape) and g.is_floating_point()):
                    rest.append(i)
                    continue
                # float32 copies, the parameter rounded once at the end (as in _functional)
                full = p.to(dtype, memory_format=torch.contiguous_format)
                g = g.to(dtype, memory_format=torch.contiguous_format)
            n = shape.numel()
            ptrs = (
                _pointer(full, dtype, shape, n),
                _pointer(g, dtype, shape, n),
                0 if s is None else _pointer(s, dtype, shape, n),
                _pointer(m, dtype, shape, n),
                _pointer(v, dtype, shape, n),
                0 if s is None else (None if u is None else _pointer(u, dtype, shape, n)),
            )
            if None in ptrs:
                rest.append(i)
                continue
            index, addresses = batches.setdefault(dtype, ([], []))
            index.append(i)
            # (n == 0: every address may be 0, and a statistic's 0 means "none" in C; no
            # element is touched either way)
            addresses.append((n, *ptrs))
            if full is not p:
                copies.append((p, full))
                keep.append(g)

        nt = torch.get_num_threads()
        decay = 1.0 - lr * weight_decay
        sign = -1.0 if maximize else 1.0
        scalars: dict[float, Any] = {}
        for dtype, (index, addresses) in batches.items():
            steps = [state_steps[i] for i in index]
            torch._foreach_add_(steps, 1)
            cs = []
            for t in steps:
                step = t.item()  # CPU scalar
                c = scalars.get(step)
                if c is None:
                    c = scalars[step] = _step_scalars(step, beta1, beta2, beta3, eps)
                cs.append(c)
            k = len(index)
            vp, dbl = ctypes.c_void_p * k, ctypes.c_double * k
            ns, p_, g_, s_, m_, v_, u_ = zip(*addresses)
            eps_v, eps_u, k_v, k_u = zip(*cs)
            getattr(lib, "tgadamw_" + _SUFFIX[dtype])(
                k,
                (ctypes.c_int64 * k)(*ns),
                vp(*p_),
                vp(*g_),
                vp(*[a or None for a in s_]),  # NULL: no statistic, the AdamW update
                vp(*m_),
                vp(*v_),
                vp(*[a or None for a in u_]),
                dbl(*eps_v),
                dbl(*eps_u),
                dbl(*k_v),
                dbl(*k_u),
                sign,
                1.0 - beta1,
                beta2,
                1.0 - beta2,
                1.0 - beta3,
                decay,
                lr,
                eps,
                int(graft),
                nt,
            )
            # written through raw pointers: tell autograd, as in-place ops would
            low = {id(p) for p, _ in copies}
            increment_version([params[i] for i in index if id(params[i]) not in low])
    del keep
    for param, full in copies:
        param.copy_(full)
    if rest:
        _single_tensor_tgadamw(
            *_pick(rest, lists),
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            eps=eps,
            weight_decay=weight_decay,
            graft=graft,
            maximize=maximize,
        )
