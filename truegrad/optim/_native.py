"""TGAdamW step on CPU with a small C kernel (OpenMP), loaded through ``ctypes``.

The kernel is plain C11 with no torch headers: it is compiled once with the system C
compiler (``cc -O3 -march=native -fopenmp``; about a second) into the torch extensions
directory (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), under a name
that hashes the source, the flags, the compiler and this CPU's feature flags, and is
reused by every later process. It works on raw pointers of contiguous float32/float64
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
computed there), plus ~5-10 us of Python per parameter (checks, pointers, step
scalars). Measured on 10M float32 parameters in 99 tensors (2 cores): 1.9x
``torch.optim.AdamW(fused=True)``, the floor set by the traffic being 13/7 = 1.86x.

bf16/fp16 parameters (float32 state) go through float32 copies of the parameter and
gradient, the parameter rounded once at the end, as in ``_functional``. Tensors the
kernel does not take (not on the CPU, not contiguous, other dtypes) take
``_single_tensor_tgadamw``, which computes the same formula. Parameters written
through raw pointers get their autograd version counter bumped, as an in-place op does.

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

from truegrad.optim._functional import _pick, _single_tensor_tgadamw, _step_scalars

__all__ = ["library", "build_seconds", "PAR_MIN"]

Tensor = torch.Tensor

#: Loops over fewer elements run on one thread (OpenMP's fork/join costs more).
PAR_MIN = 1 << 16

_BODY = r"""
/* h: scalar arguments, see _native.py */
static void moments_norms_SUF(int64_t n, const T *g, const T *s, T *m, T *v, T *u,
                       double sign_, double w1_, double b2_, double w2_, double w3_,
                       double eps_v_, double eps_u_, double *out, int nt) {
    const T sign = (T)sign_, w1 = (T)w1_, b2 = (T)b2_, w2 = (T)w2_, w3 = (T)w3_;
    const T eps_v = (T)eps_v_, eps_u = (T)eps_u_;
    /* per-thread partial sums, added in thread order afterwards: an OpenMP reduction
       combines them in arrival order, which would make the step nondeterministic */
    double part[2 * MAXT];
    if (nt > MAXT) nt = MAXT;
    for (int t = 0; t < 2 * nt; t++) part[t] = 0.0;
    #pragma omp parallel num_threads(nt) if(n >= PAR_MIN)
    {
        int me = omp_get_thread_num(), count = omp_get_num_threads();
        int64_t chunk = (n + count - 1) / count, lo = me * chunk;
        int64_t hi = lo + chunk < n ? lo + chunk : n;
        double sa = 0.0, st = 0.0;
        #pragma omp simd reduction(+:sa, st)
        for (int64_t i = lo; i < hi; i++) {
            T gi = g[i] * sign;
            T mi = LERP(m[i], gi, w1);
            T vi = v[i] * b2 + w2 * gi * gi;
            T ui = LERP(u[i], s[i], w3);
            m[i] = mi; v[i] = vi; u[i] = ui;
            T a = mi / MAXN(SQRT(vi), eps_v);
            T t = mi / MAXN(SQRT(ui), eps_u);
            sa += (double)a * (double)a;
            st += (double)t * (double)t;
        }
        part[2 * me] = sa; part[2 * me + 1] = st;
    }
    double sa = 0.0, st = 0.0;
    for (int t = 0; t < nt; t++) { sa += part[2 * t]; st += part[2 * t + 1]; }
    out[0] = sa; out[1] = st;
}

static void apply_true_SUF(int64_t n, T *p, const T *m, const T *u,
                    double decay_, double eps_u_, double coef_, int nt) {
    const T decay = (T)decay_, eps_u = (T)eps_u_, coef = (T)coef_;
    #pragma omp parallel for simd num_threads(nt) if(n >= PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        T t = m[i] / MAXN(SQRT(u[i]), eps_u);
        p[i] = p[i] * decay + coef * t;
    }
}

static void step_true_SUF(int64_t n, T *p, const T *g, const T *s, T *m, T *v, T *u,
                   double sign_, double w1_, double b2_, double w2_, double w3_,
                   double eps_u_, double decay_, double coef_, int nt) {
    const T sign = (T)sign_, w1 = (T)w1_, b2 = (T)b2_, w2 = (T)w2_, w3 = (T)w3_;
    const T eps_u = (T)eps_u_, decay = (T)decay_, coef = (T)coef_;
    #pragma omp parallel for simd num_threads(nt) if(n >= PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        T gi = g[i] * sign;
        T mi = LERP(m[i], gi, w1);
        T ui = LERP(u[i], s[i], w3);
        m[i] = mi; v[i] = v[i] * b2 + w2 * gi * gi; u[i] = ui;
        p[i] = p[i] * decay + coef * (mi / MAXN(SQRT(ui), eps_u));
    }
}

static void step_adam_SUF(int64_t n, T *p, const T *g, T *m, T *v,
                   double sign_, double w1_, double b2_, double w2_,
                   double eps_v_, double decay_, double coef_, int nt) {
    const T sign = (T)sign_, w1 = (T)w1_, b2 = (T)b2_, w2 = (T)w2_;
    const T eps_v = (T)eps_v_, decay = (T)decay_, coef = (T)coef_;
    #pragma omp parallel for simd num_threads(nt) if(n >= PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        T gi = g[i] * sign;
        T mi = LERP(m[i], gi, w1);
        T vi = v[i] * b2 + w2 * gi * gi;
        m[i] = mi; v[i] = vi;
        p[i] = p[i] * decay + coef * (mi / MAXN(SQRT(vi), eps_v));
    }
}

/* One step over k tensors of one dtype. s[j] == NULL: AdamW update of tensor j. */
void tgadamw_SUF(int64_t k, const int64_t *n, T **p, T **g, T **s, T **m, T **v, T **u,
                 const double *eps_v, const double *eps_u, const double *k_v, const double *k_u,
                 double sign, double w1, double b2, double w2, double w3, double decay,
                 double lr, double eps, int graft, int nt) {
    double sums[2];
    for (int64_t j = 0; j < k; j++) {
        if (s[j] == 0) {
            step_adam_SUF(n[j], p[j], g[j], m[j], v[j], sign, w1, b2, w2, eps_v[j], decay,
                          -lr * k_v[j], nt);
        } else if (graft) {
            moments_norms_SUF(n[j], g[j], s[j], m[j], v[j], u[j], sign, w1, b2, w2, w3,
                              eps_v[j], eps_u[j], sums, nt);
            /* lr * true * ||adam|| / (||true|| + eps), with k_v, k_u folded in (_StepScalars) */
            double coef = -lr * k_v[j] * (sqrt(sums[0]) / (sqrt(sums[1]) + eps / k_u[j]));
            apply_true_SUF(n[j], p[j], m[j], u[j], decay, eps_u[j], coef, nt);
        } else {
            step_true_SUF(n[j], p[j], g[j], s[j], m[j], v[j], u[j], sign, w1, b2, w2, w3,
                          eps_u[j], decay, -lr * k_u[j], nt);
        }
    }
}
"""

# torch's lerp (weight < 0.5: a + w*(b-a), else b - (b-a)*(1-w)); max that keeps a NaN
# in its first argument, as clamp_min does.
_HEADER = r"""
#include <stdint.h>
#include <math.h>
#include <omp.h>
#define PAR_MIN %d
#define MAXT 256
#define LERP(a, b, w) ((w) < (T)0.5 ? (a) + (w) * ((b) - (a)) : (b) - ((b) - (a)) * ((T)1 - (w)))
#define MAXN(x, e) ((x) < (e) ? (e) : (x))
""" % PAR_MIN


def _source() -> str:
    parts = [_HEADER]
    for ctype, suffix, sqrt in (("float", "f32", "sqrtf"), ("double", "f64", "sqrt")):
        parts.append(f"#define T {ctype}\n#define SQRT {sqrt}\n")
        parts.append(_BODY.replace("_SUF", "_" + suffix))
        parts.append("#undef T\n#undef SQRT\n")
    return "".join(parts)


_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c11", "-shared", "-fPIC"]

_P, _D = ctypes.c_void_p, ctypes.c_double
_ARGTYPES = [ctypes.c_int64] + [_P] * 11 + [_D] * 8 + [ctypes.c_int, ctypes.c_int]

_lock = threading.Lock()
_loaded: dict[str, Any] = {}
#: Seconds spent compiling the kernel in this process (0.0 when it came from the cache).
build_seconds: float | None = None


def _compiler() -> str | None:
    env = os.environ.get("CC")
    return env or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_path(compiler: str) -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.realpath(
        torch._appdirs.user_cache_dir(appname="torch_extensions")
    )
    key = "\0".join([_source(), " ".join(_CFLAGS), compiler, platform.machine(), _cpu_flags()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(root, "truegrad_tgadamw", f"libtgadamw_{digest}.so")


def _build(compiler: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        src = os.path.join(tmp, "tgadamw.c")
        with open(src, "w") as f:
            f.write(_source())
        out = os.path.join(tmp, os.path.basename(path))
        cmd = [compiler, *_CFLAGS, src, "-o", out]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
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
    """One C call per state dtype; tensors the kernel does not take go to
    ``_single_tensor_tgadamw`` (see the module docstring)."""
    rest: list[int] = []
    batches: dict[torch.dtype, list[int]] = {}
    copies: list[tuple[Tensor, Tensor]] = []  # (bf16/fp16 parameter, its float32 copy)
    full_params, full_grads = list(params), list(grads)
    for i, p in enumerate(params):
        g, s, m, v, u = grads[i], stats[i], exp_avgs[i], exp_avg_sqs[i], exp_avg_true_sqs[i]
        dtype = m.dtype
        low = p.dtype in _LOW and dtype == torch.float32
        if low and p.device.type == "cpu":
            # float32 copies, the parameter rounded once at the end (as in _functional)
            p = full_params[i] = p.to(dtype, memory_format=torch.contiguous_format)
            g = full_grads[i] = g.to(dtype, memory_format=torch.contiguous_format)
        # m, v, u are created like p (same device, preserve_format); g has p's device
        if (
            dtype in _SUFFIX
            and p.device.type == "cpu"
            and p.dtype == dtype
            and g.dtype == dtype
            and v.dtype == dtype
            and p.is_contiguous()
            and g.is_contiguous()
            and m.is_contiguous()
            and v.is_contiguous()
            and (
                s is None
                or (
                    u is not None
                    and s.dtype == dtype
                    and u.dtype == dtype
                    and s.device.type == "cpu"
                    and s.is_contiguous()
                    and u.is_contiguous()
                )
            )
        ):
            batches.setdefault(dtype, []).append(i)
            if p is not params[i]:
                copies.append((params[i], p))
        else:
            rest.append(i)

    nt = torch.get_num_threads()
    decay = 1.0 - lr * weight_decay
    sign = -1.0 if maximize else 1.0
    scalars: dict[float, Any] = {}
    for dtype, index in batches.items():
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
        ptrs, dbl = ctypes.c_void_p * k, ctypes.c_double * k
        eps_v, eps_u, k_v, k_u = zip(*cs)
        getattr(lib, "tgadamw_" + _SUFFIX[dtype])(
            k,
            (ctypes.c_int64 * k)(*[params[i].numel() for i in index]),
            ptrs(*[full_params[i].data_ptr() for i in index]),
            ptrs(*[full_grads[i].data_ptr() for i in index]),
            ptrs(*[None if stats[i] is None else stats[i].data_ptr() for i in index]),
            ptrs(*[exp_avgs[i].data_ptr() for i in index]),
            ptrs(*[exp_avg_sqs[i].data_ptr() for i in index]),
            ptrs(*[None if stats[i] is None else exp_avg_true_sqs[i].data_ptr() for i in index]),
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
        increment_version([params[i] for i in index if full_params[i] is params[i]])
    for param, full in copies:
        param.copy_(full)
    if rest:
        lists = (params, grads, stats, exp_avgs, exp_avg_sqs, exp_avg_true_sqs, state_steps)
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
