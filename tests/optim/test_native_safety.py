"""The C kernel of truegrad/optim/_native.py only ever gets addresses it can use (issue 12,
finding 7): wrong shapes raise the same ``ValueError`` in every implementation before any
tensor changes; tensors the kernel cannot take (non-contiguous, another dtype, another
device, a negated view, wrapper subclasses such as DTensor or TwoTensor) take the
single-tensor loop instead; the kernel's cache key covers everything that changes the
binary. Cases that crashed the process before run in a subprocess, so that a segfault
fails a test instead of killing pytest."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from truegrad.optim import TGAdamW, _native
from truegrad.parameter import TrueGradParameter

ROOT = Path(__file__).resolve().parents[2]

IMPLS = {
    "default": {},
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "single": {"foreach": False},
}

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


@pytest.fixture
def native_lib():
    lib = _native.library(build=True)
    if lib is None:
        pytest.skip("no working C compiler for the TGAdamW kernel")
    return lib


@pytest.fixture
def kernel_calls(native_lib, monkeypatch):
    """Every call of the C entry points, as (dtype suffix, number of tensors); forwarded."""
    calls: list[tuple[str, int]] = []
    for suffix in ("f32", "f64"):
        real = getattr(native_lib, "tgadamw_" + suffix)

        def spy(*args, _real=real, _suffix=suffix):
            calls.append((_suffix, args[0]))
            return _real(*args)

        monkeypatch.setattr(native_lib, "tgadamw_" + suffix, spy)
    return calls


@pytest.fixture
def kernel_forbidden(native_lib, monkeypatch):
    """The C entry points replaced by a recorder that never runs C (so that a tensor that
    reached it cannot crash pytest); the step then fails with an AssertionError."""
    calls: list[str] = []
    for suffix in ("f32", "f64"):

        def refuse(*args, _suffix=suffix):
            calls.append(_suffix)
            raise AssertionError("the C kernel was handed this parameter")

        monkeypatch.setattr(native_lib, "tgadamw_" + suffix, refuse)
    return calls


def _params(dtype=torch.float32, seed=0):
    """Two parameters, (5,) and (3, 4), with gradients and statistics."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))
        for shape in [(5,), (3, 4)]
    ]
    _feed(params, seed)
    return params


def _feed(params, seed):
    gen = torch.Generator().manual_seed(seed + 100)
    for p in params:
        samples = torch.randn(4, *p.shape, generator=gen, dtype=p.dtype)
        p.grad, p.sum_grad_squared = samples.sum(0), samples.square().sum(0)


def _snapshot(params, opt):
    return [
        (p.detach().clone(), p.grad.clone(), {k: v.clone() for k, v in opt.state[p].items()})
        for p in params
    ]


def _assert_unchanged(params, opt, before):
    for p, (value, grad, state) in zip(params, before):
        assert torch.equal(p.detach(), value)
        assert torch.equal(p.grad, grad)
        assert opt.state[p].keys() == state.keys()
        for key, saved in state.items():
            assert torch.equal(opt.state[p][key], saved), key


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad_shape", [(3,), (4, 3), (12,), (3, 1), (), (1, 3, 4)])
def test_wrong_shape_statistic_raises_and_changes_nothing(impl, bad_shape):
    """Every implementation refuses a statistic of another shape than its parameter with
    the same ValueError (index and both shapes), before any tensor changes: fewer elements
    (the C kernel read past them), as many in another shape (the loops failed half-way),
    and broadcastable ones (which the loops applied without a word)."""
    params = _params()
    opt = TGAdamW(params, lr=0.1, **IMPLS[impl])
    opt.step()  # state with exp_avg_true_sq, step counters at 1
    _feed(params, seed=1)
    params[1].sum_grad_squared = torch.rand(bad_shape)
    before = _snapshot(params, opt)
    message = (
        r"TGAdamW: the statistic \(sum_grad_squared\) of parameter index 1, shape \(3, 4\) has shape "
        + re.escape(f"{bad_shape}, but the parameter has shape (3, 4)")
        + r".*No parameter or optimizer state was changed"
    )
    with pytest.raises(ValueError, match=message):
        opt.step()
    _assert_unchanged(params, opt, before)
    # the parameter is still usable once the statistic is right
    params[1].sum_grad_squared = torch.rand(3, 4)
    opt.step()
    assert all(opt.state[p]["step"].item() == 2.0 for p in params)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("what", ["grad", "exp_avg", "exp_avg_sq", "exp_avg_true_sq"])
def test_wrong_shape_gradient_or_state_raises_and_changes_nothing(impl, what):
    """A gradient of another shape (``p.grad.data = ...``) or optimizer state of another
    shape (a state_dict of another model): the same ValueError from every path."""
    params = _params()
    opt = TGAdamW(params, lr=0.1, **IMPLS[impl])
    opt.step()
    _feed(params, seed=1)
    if what == "grad":
        params[1].grad.data = torch.randn(12)
        label = "gradient"
    else:
        opt.state[params[1]][what] = torch.zeros(4, 3)
        label = f"optimizer state '{what}'"
    before = _snapshot(params, opt)
    with pytest.raises(ValueError, match=re.escape(f"the {label} of parameter index 1, ")):
        opt.step()
    _assert_unchanged(params, opt, before)


@pytest.mark.parametrize("impl", IMPLS)
def test_statistic_on_another_device_raises_and_changes_nothing(impl):
    params = _params()
    opt = TGAdamW(params, lr=0.1, **IMPLS[impl])
    opt.step()
    _feed(params, seed=1)
    params[0].sum_grad_squared = torch.rand(5, device="meta")
    before = _snapshot(params, opt)
    with pytest.raises(
        ValueError,
        match=r"statistic \(sum_grad_squared\) of parameter index 0, .*is on device meta, "
        r"but the parameter is on cpu",
    ):
        opt.step()
    _assert_unchanged(params, opt, before)


def test_error_names_the_parameter_when_the_caller_describes_it():
    from truegrad.optim._functional import tgadamw

    p = torch.nn.Parameter(torch.randn(3, 4))
    zeros = torch.zeros(3, 4)
    with pytest.raises(
        ValueError, match=r"the statistic \(sum_grad_squared\) of 'layer.weight' \(index 7"
    ):
        tgadamw(
            [p], [torch.randn(3, 4)], [torch.rand(3)], [zeros.clone()], [zeros.clone()],
            [zeros.clone()], [torch.tensor(0.0)], foreach=False, fused=False, lr=0.1,
            beta1=0.9, beta2=0.99, beta3=0.99, eps=1e-8, weight_decay=0.0, graft=True,
            maximize=False, describe=lambda i: f"'layer.weight' (index {7 + i}, shape (3, 4))",
        )  # fmt: skip


# --------------------------------------------------------------------------- the kernel's checks


def test_pointer_accepts_only_what_the_kernel_can_take():
    f32, shape = torch.float32, torch.Size([3, 4])
    t = torch.randn(3, 4)
    assert _native._pointer(t, f32, shape, 12) == t.data_ptr()
    tgp = TrueGradParameter(torch.randn(3, 4))  # a plain Parameter subclass: accepted
    assert _native._plain_class(TrueGradParameter)
    assert _native._pointer(tgp, f32, shape, 12) == tgp.data_ptr()
    view = torch.randn(20)[5:17].view(3, 4)  # storage offset: accepted, address of element 0
    assert _native._pointer(view, f32, shape, 12) == view.data_ptr()
    refused = {
        "transposed": torch.randn(4, 3).t(),
        "float64": torch.randn(3, 4, dtype=torch.float64),
        "other shape, same numel": torch.randn(12),
        "meta": torch.randn(3, 4, device="meta"),
        "sparse": torch.randn(3, 4).to_sparse(),
        "negated view": torch._neg_view(torch.randn(3, 4)),
    }
    freed = torch.randn(3, 4)
    freed.untyped_storage().resize_(0)  # as FSDP frees unsharded parameters
    refused["freed storage"] = freed
    shrunk = torch.randn(3, 4)
    shrunk.untyped_storage().resize_(8 * 4)
    refused["shrunk storage"] = shrunk
    try:
        from torch.testing._internal.two_tensor import TwoTensor

        refused["TwoTensor"] = TwoTensor(torch.randn(3, 4), torch.randn(3, 4))
        assert not _native._plain_class(TwoTensor)
    except ImportError:
        pass
    for name, bad in refused.items():
        assert _native._pointer(bad, f32, shape, 12) is None, name
    assert _native._pointer(torch.randn(0, 4), f32, torch.Size([0, 4]), 0) == 0  # nothing touched


def test_fused_path_takes_the_kernel_and_matches_the_loop(kernel_calls):
    """Ordinary float32 parameters (a TrueGradParameter among them) take the C kernel with
    fused=True and match foreach=False."""
    results = []
    for kwargs in ({"fused": True}, {"foreach": False}):
        gen = torch.Generator().manual_seed(3)
        params = [
            torch.nn.Parameter(torch.randn(64, 33, generator=gen)),
            TrueGradParameter(torch.randn(7, generator=gen)),
            torch.nn.Parameter(torch.randn(1000, generator=gen)),
        ]
        opt = TGAdamW(params, lr=0.01, weight_decay=0.1, default_to_adam=True, **kwargs)
        for step in range(3):
            _feed(params, seed=step)
            params[2].sum_grad_squared = None  # the AdamW update, in the kernel too
            opt.step()
        results.append(params)
    assert kernel_calls == [("f32", 3)] * 3  # all three parameters, every step
    for a, b in zip(*results):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)


def test_kernel_not_handed_a_wrapper_subclass(kernel_forbidden):
    """A TwoTensor parameter (a wrapper subclass with __torch_dispatch__, as DTensor is)
    never reaches the kernel (its data_ptr() is 0: the kernel crashed the process) and
    gets the update of the single-tensor loop on each of its halves."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    grads = [torch.randn(3, 4, generator=gen) for _ in range(2)]
    stats = [torch.rand(3, 4, generator=gen) for _ in range(2)]
    for kwargs in ({}, {"fused": True}):
        p = torch.nn.Parameter(two_tensor.TwoTensor(a.clone(), b.clone()))
        opt = TGAdamW([p], lr=0.1, **kwargs)
        refs = [torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())]
        ref_opt = TGAdamW(refs, lr=0.1, foreach=False)
        for _ in range(3):
            p.grad = two_tensor.TwoTensor(grads[0].clone(), grads[1].clone())
            p.sum_grad_squared = two_tensor.TwoTensor(stats[0].clone(), stats[1].clone())
            opt.step()
            for r, g, s in zip(refs, grads, stats):
                r.grad, r.sum_grad_squared = g.clone(), s.clone()
            ref_opt.step()
        assert type(p.data).__name__ == "TwoTensor"
        torch.testing.assert_close(p.a, refs[0].detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(p.b, refs[1].detach(), rtol=0, atol=1e-6)
    assert kernel_forbidden == []


def test_kernel_not_called_under_a_dispatch_mode(kernel_forbidden):
    """A TorchDispatchMode must see every op: the step takes the loop under one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    params = _params()
    with Count():
        TGAdamW(params).step()
    assert kernel_forbidden == [] and Count.ops > 0


# --------------------------------------------------------------------------- odd tensors, in a subprocess

_CASES = r"""
import json, sys, tempfile
import torch
from truegrad.optim import TGAdamW, _native

lib = _native.library(build=True)
if lib is None:
    print(json.dumps({"no_kernel": True}), flush=True)
    sys.exit(0)
calls = []
for suffix in ("f32", "f64"):
    real = getattr(lib, "tgadamw_" + suffix)
    def spy(*args, _real=real):
        calls.append(args[0])
        return _real(*args)
    setattr(lib, "tgadamw_" + suffix, spy)

def data(seed, shape=(64, 48)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(2)] + [torch.rand(shape, generator=gen)]

def odd(case, w, g, s):
    # (parameter, gradient, statistic) in the odd form of `case`
    if case == "transposed statistic":
        return w, g, s.t().contiguous().t()
    if case == "transposed gradient":
        return w, g.t().contiguous().t(), s
    if case == "float64 statistic":
        return w, g, s.double()
    if case == "negated-view statistic":
        return w, g, torch._neg_view(-s)
    if case == "meta statistic":
        return w, g, s.to("meta")
    if case == "bf16 parameter, transposed gradient":
        return w.bfloat16(), g.bfloat16().t().contiguous().t(), s
    raise KeyError(case)

def run(case, kwargs):
    del calls[:]
    out = {"case": case, "impl": "fused" if kwargs else "default"}
    print(json.dumps({"start": out}), flush=True)  # names the case if the process dies
    try:
        w, g, s = data(0)
        p = torch.nn.Parameter(odd(case, w, g, s)[0].clone())
        # the reference: the single-tensor loop on ordinary tensors of the same values
        ref = torch.nn.Parameter(p.detach().clone())
        opt, ref_opt = TGAdamW([p], lr=0.1, **kwargs), TGAdamW([ref], lr=0.1, foreach=False)
        for step in range(3):
            w, g, s = data(step + 1)
            _, p.grad, p.sum_grad_squared = odd(case, w, g, s)
            ref.grad, ref.sum_grad_squared = g.to(p.dtype), s
            opt.step()
            ref_opt.step()
        out["outcome"] = "ok"
        diff = (p.detach().double() - ref.detach().double()).abs()
        out["max_rel"] = (diff / ref.detach().double().abs().clamp_min(1.0)).max().item()
    except Exception as exc:
        out["outcome"] = "error"
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["kernel_calls"] = len(calls)
    print(json.dumps(out), flush=True)

for case in sys.argv[1:]:
    if case != "dtensor":
        for kwargs in ({}, {"fused": True}):
            run(case, kwargs)

if "dtensor" in sys.argv[1:]:
    # FSDP2's parameters: DTensors (one process, one rank, gloo)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group(
        "gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1
    )
    mesh = init_device_mesh("cpu", (1,))
    for kwargs in ({}, {"fused": True}, {"foreach": False}):
        del calls[:]
        out = {"case": "dtensor", "impl": "fused" if kwargs.get("fused") else ("single" if kwargs else "default")}
        print(json.dumps({"start": out}), flush=True)
        dt = lambda t: distribute_tensor(t.clone(), mesh, [Shard(0)])
        w, g, s = data(0)
        p = torch.nn.Parameter(dt(w))
        try:
            p.grad, p.sum_grad_squared = dt(g), dt(s)
            TGAdamW([p], lr=0.1, **kwargs).step()
            out["outcome"] = "ok"
            out["value"] = p.to_local().sum().item()
        except Exception as exc:
            out["outcome"] = "error"
            out["error"] = type(exc).__name__
        out["kernel_calls"] = len(calls)
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()
"""

_ODD_CASES = [
    "transposed statistic",
    "transposed gradient",
    "float64 statistic",
    "negated-view statistic",
    "bf16 parameter, transposed gradient",
    "meta statistic",
]


@pytest.fixture(scope="module")
def odd_results():
    """One subprocess runs every odd case for the default path and fused=True."""
    if _native.library(build=True) is None:
        pytest.skip("no working C compiler for the TGAdamW kernel")
    cases = list(_ODD_CASES)
    if torch.distributed.is_available() and torch.distributed.is_gloo_available():
        cases.append("dtensor")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CASES), *cases],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = {(r["case"], r["impl"]): r for r in lines if "case" in r}
    last = next((r["start"] for r in reversed(lines) if "start" in r), None)
    return proc, results, last


def _result(odd_results, case, impl):
    proc, results, last = odd_results
    assert proc.returncode >= 0, (
        f"the process died of signal {-proc.returncode} (a crash) in {last}; "
        f"stderr: {proc.stderr[-2000:]}"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return results[(case, impl)]


@pytest.mark.parametrize("impl", ["default", "fused"])
@pytest.mark.parametrize(
    "case",
    [c for c in _ODD_CASES if c != "meta statistic"],
)
def test_odd_tensors_take_the_loop_with_the_same_result(odd_results, case, impl):
    """Non-contiguous, float64, negated-view statistics and non-contiguous gradients: the
    single-tensor loop, equal to the reference within 1e-6 (a bf16 parameter's transposed
    gradient is copied into a contiguous float32 gradient and still takes the kernel)."""
    result = _result(odd_results, case, impl)
    assert result["outcome"] == "ok", result
    # bf16: the kernel and the loop agree in float32; a rounding to bf16 may differ by 1 ulp
    assert result["max_rel"] <= (2.0**-7 if case.startswith("bf16") else 1e-6), result
    # the default never takes the kernel (it compiles nothing); fused=True does where it can
    expected = 3 if case.startswith("bf16") and impl == "fused" else 0
    assert result["kernel_calls"] == expected, result


@pytest.mark.parametrize("impl", ["default", "fused"])
def test_meta_statistic_is_a_clear_error(odd_results, impl):
    result = _result(odd_results, "meta statistic", impl)
    assert result["outcome"] == "error" and result["kernel_calls"] == 0, result
    assert result["error"].startswith("ValueError: TGAdamW: the statistic (sum_grad_squared)")
    assert "is on device meta" in result["error"]


def test_dtensor_parameter_does_not_crash(odd_results):
    """FSDP2's DTensor parameters crashed the process in the kernel; they now take the
    single-tensor loop: the default and fused=True do exactly what foreach=False does
    (today torch refuses an op of the grafting norm on a DTensor: an exception)."""
    proc, results, _ = odd_results
    if ("dtensor", "single") not in results and proc.returncode == 0:
        pytest.skip("torch.distributed with gloo is not available")
    single = _result(odd_results, "dtensor", "single")
    for impl in ("default", "fused"):
        result = _result(odd_results, "dtensor", impl)
        assert result["kernel_calls"] == 0, result
        assert {k: v for k, v in result.items() if k != "impl"} == {
            k: v for k, v in single.items() if k != "impl"
        }


# --------------------------------------------------------------------------- cache key


def test_cache_key_covers_source_command_compiler_and_cpu(monkeypatch):
    base = {"compiler_id": "gcc 12.2.0", "cpu": "model name: X\nflags: avx2"}
    key = _native._cache_key("cc", **base)
    assert key == _native._cache_key("cc", **base)  # deterministic
    assert _native._cache_key("clang", **base) != key
    assert _native._cache_key("cc", compiler_id="gcc 13.1.0", cpu=base["cpu"]) != key
    assert (
        _native._cache_key(
            "cc", compiler_id=base["compiler_id"], cpu="model name: X\nflags: avx2 avx512f"
        )
        != key
    )
    assert (
        _native._cache_key("cc", compiler_id=base["compiler_id"], cpu="model name: Y\nflags: avx2")
        != key
    )
    for flags in (
        [f for f in _native._CFLAGS if f != "-fopenmp"],
        [f if f != "-march=native" else "-march=x86-64" for f in _native._CFLAGS],
        [*_native._CFLAGS, "-ffast-math"],
    ):
        monkeypatch.setattr(_native, "_CFLAGS", flags)
        assert _native._cache_key("cc", **base) != key, flags
    monkeypatch.undo()
    monkeypatch.setattr(_native, "_source", lambda: "/* another kernel */")
    assert _native._cache_key("cc", **base) != key


def test_cache_key_defaults_describe_this_machine(monkeypatch, tmp_path):
    cpu = _native._cpu_description()
    assert "platform.machine: " in cpu
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for field in ("model name", "flags", "Features"):
            match = re.search(rf"^{field}\s*:\s*(.*)$", text, re.MULTILINE)
            if match:
                assert " ".join(match.group(1).split()) in cpu, field
    command = _native._command("cc", "<src>", "<out>")
    assert "-march=native" in command and "-fopenmp" in command
    # the cache path is named by the key of this compiler and this CPU
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    compiler = _native._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    identity = _native._compiler_identity(compiler)
    assert "rc=0" in identity and re.search(r"\d+\.\d+", identity)
    path = _native._cache_path(compiler)
    assert path.endswith(f"libtgadamw_{_native._cache_key(compiler, identity, cpu)}.so")
    monkeypatch.setattr(_native, "_cpu_description", lambda: cpu + " avx10")
    assert _native._cache_path(compiler) != path
