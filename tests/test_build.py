"""Tests of the build of ``set_kernels._C`` and of the ``cuda`` backend's Python side.

Meant to run after ``pip install --no-build-isolation -e .``, on machines with or without a GPU:

* ``_C`` must have been built whenever nvcc was available (skipped, saying so, when the build
  was disabled with SET_KERNELS_BUILD_CUDA=0 or nvcc is absent);
* without a GPU, every kernel call raises RuntimeError, while the argument checks of the
  binding (which run before the device check) are fully testable;
* with a GPU, the masked Adam kernel is compared against a float64 reference.
"""
from __future__ import annotations

import importlib
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH_CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ helpers
def _find_nvcc() -> str | None:
    """Same search as setup.py: $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(Path(home) / "bin" / "nvcc", os.X_OK):
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None
    )


def _build_skip_reason() -> str | None:
    """Why _C is legitimately absent, or None when it must have been built."""
    if os.environ.get("SET_KERNELS_BUILD_CUDA", "").strip().lower() in ("0", "false", "off", "no"):
        return "SET_KERNELS_BUILD_CUDA=0: set_kernels._C was deliberately not built"
    if _find_nvcc() is None:
        return "nvcc not found (CUDA_HOME/bin, PATH, /usr/local/cuda/bin): set_kernels._C is not built without it"
    return None


@pytest.fixture(scope="module")
def C():
    reason = _build_skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        return importlib.import_module("set_kernels._C")
    except ImportError as exc:
        pytest.fail(f"nvcc is available but set_kernels._C does not import ({exc}); "
                    "was the package installed with `pip install --no-build-isolation -e .`?")


@pytest.fixture(scope="module")
def cuda_backend():
    return importlib.import_module("set_kernels.backends.cuda")


@pytest.fixture
def no_gpu(C):
    if HAS_TORCH_CUDA or C.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present; this test is about machines without one")


def _expected_archs() -> list[str]:
    raw = os.environ.get("SET_KERNELS_CUDA_ARCHS", "").replace(",", ";")
    archs = [a.strip() for a in raw.split(";") if a.strip()] or ["80", "90"]
    out = []
    for a in archs:
        if a.endswith("-virtual"):
            out.append("compute_" + a[: -len("-virtual")])
        elif a[0].isdigit():
            out.append("sm_" + a.removesuffix("-real"))
    return out


FAKE = 0x10000  # a plausible non-null address; never dereferenced by the tests that use it


def _adam_kwargs(**overrides):
    kw = dict(params=[FAKE], grads=[FAKE], exp_avgs=[FAKE], exp_avg_sqs=[FAKE], masks=[0], numels=[16],
              dtype=0, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
              decoupled=True, grad_scale_ptr=0, found_inf_ptr=0, stream=0)
    kw.update(overrides)
    return kw


# ---------------------------------------------------------------------------------------- the build
def test_extension_built_and_imports(C):
    assert Path(C.__file__).resolve().parent.name == "set_kernels"
    assert (C.DTYPE_FLOAT32, C.DTYPE_FLOAT16, C.DTYPE_BFLOAT16) == (0, 1, 2)
    for name in ("masked_adam_", "linear_forward", "linear_grad_input", "linear_grad_weight", "linear_grad_weight_splits",
                 "linear_grad_weight_workspace_numel", "cuda_device_count", "cuda_device_error", "compiled_archs",
                 "cuda_runtime_version", "cuda_driver_version"):
        assert callable(getattr(C, name)), name


def test_compiled_archs(C, cuda_backend):
    archs = list(C.compiled_archs())
    assert archs and all(isinstance(a, str) for a in archs)
    for want in _expected_archs():
        assert want in archs, f"{want} missing from compiled_archs() = {archs}"
    assert cuda_backend.compiled_archs() == archs


def test_runtime_helpers_never_raise(C):
    count = C.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    err = C.cuda_device_error()
    assert isinstance(err, str)
    assert (count == 0) == (err != ""), (count, err)
    assert C.cuda_runtime_version() >= 11000
    assert C.cuda_driver_version() >= 0


def test_no_dynamic_cudart_or_torch_dependency(C):
    readelf = shutil.which("readelf")
    if readelf is None or not sys.platform.startswith("linux"):
        pytest.skip("readelf (binutils) is needed to list the module's shared-library dependencies")
    out = subprocess.run([readelf, "-d", C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line for line in out.splitlines() if "(NEEDED)" in line]
    for lib in ("libcudart", "libcuda.so", "libtorch", "libc10", "libpython"):
        assert not any(lib in line for line in needed), f"_C must not link {lib}: {needed}"


# ----------------------------------------------------------------------------- no GPU on this machine
def test_masked_adam_without_gpu_raises(C, no_gpu):
    with pytest.raises(RuntimeError, match=r"set_kernels\._C\.masked_adam_: no CUDA device available"):
        C.masked_adam_(**_adam_kwargs())
    # empty tensors may have null pointers: still valid arguments, so the device check decides
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        C.masked_adam_(**_adam_kwargs(params=[0], grads=[0], exp_avgs=[0], exp_avg_sqs=[0], numels=[0]))


def test_backend_unavailable_without_gpu(C, cuda_backend, no_gpu):
    ok, reason = cuda_backend.availability()
    assert ok is False
    assert "device" in reason.lower(), reason


def test_backend_masked_adam_raises_without_gpu(C, cuda_backend, no_gpu):
    p = torch.zeros(8)
    with pytest.raises(RuntimeError, match="unavailable"):
        cuda_backend.masked_adam_([p], [torch.ones(8)], [torch.zeros(8)], [torch.zeros(8)], [None],
                                  step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                  decoupled_weight_decay=False)
    assert torch.equal(p, torch.zeros(8))


# --------------------------------------------------------------------------- binding argument checks
@pytest.mark.parametrize("overrides, names", [
    (dict(dtype=7), ["dtype", "7"]),
    (dict(dtype=-1), ["dtype"]),
    (dict(params=[0]), ["params[0]", "null"]),
    (dict(grads=[0]), ["grads[0]", "null"]),
    (dict(exp_avgs=[0]), ["exp_avgs[0]", "null"]),
    (dict(exp_avg_sqs=[0]), ["exp_avg_sqs[0]", "null"]),
    (dict(params=[-5]), ["params[0]", "negative"]),
    (dict(masks=[-1]), ["masks[0]", "negative"]),
    (dict(numels=[-1]), ["numels[0]", "negative"]),
    (dict(grads=[FAKE, FAKE]), ["grads", "len"]),
    (dict(masks=[]), ["masks", "len"]),
    (dict(params=[FAKE, FAKE], grads=[FAKE, FAKE], exp_avgs=[FAKE, FAKE], exp_avg_sqs=[FAKE, FAKE],
          masks=[0, 0]), ["numels", "len"]),
    (dict(step=0), ["step"]),
    (dict(grad_scale_ptr=-8), ["grad_scale_ptr"]),
    (dict(found_inf_ptr=-8), ["found_inf_ptr"]),
    (dict(stream=-1), ["stream"]),
    (dict(device=-2), ["device"]),
])
def test_binding_rejects_bad_arguments(C, overrides, names):
    # These checks run before the device check: ValueError with or without a GPU.
    with pytest.raises(ValueError) as info:
        C.masked_adam_(**_adam_kwargs(**overrides))
    msg = str(info.value)
    assert msg.startswith("set_kernels._C.masked_adam_:"), msg
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"


def test_binding_rejects_wrong_types(C):
    with pytest.raises(TypeError):
        C.masked_adam_(**_adam_kwargs(params=[1.5]))
    with pytest.raises(TypeError):
        C.masked_adam_(**_adam_kwargs(params="abc"))


# ------------------------------------------------------------------------------- Python backend surface
def test_backend_module_surface(cuda_backend):
    assert cuda_backend.NAME == "cuda"
    assert cuda_backend.SUPPORTED_DTYPES == (torch.float32, torch.float16, torch.bfloat16)
    assert cuda_backend.SUPPORTED_OPS == ("linear_forward", "linear_grad_input", "linear_grad_weight", "masked_adam_")
    for op in cuda_backend.SUPPORTED_OPS:
        assert callable(getattr(cuda_backend, op)), op
    ok, reason = cuda_backend.availability()
    assert isinstance(ok, bool) and isinstance(reason, str)
    assert ok == (reason == "")
    assert isinstance(cuda_backend.compiled_archs(), list)


def test_backend_reports_missing_extension(cuda_backend, monkeypatch):
    monkeypatch.setattr(cuda_backend, "_ext", None)
    monkeypatch.setattr(cuda_backend, "_ext_error", "ImportError: No module named 'set_kernels._C'")
    ok, reason = cuda_backend.availability()
    assert not ok
    assert "_C was not built" in reason and "nvcc" in reason, reason
    assert cuda_backend.compiled_archs() == []
    with pytest.raises(RuntimeError, match="not built"):
        cuda_backend.masked_adam_([], [], [], [], [], step=1, lr=1e-3, beta1=0.9, beta2=0.999,
                                  eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False)


@pytest.mark.slow
def test_pure_python_wheel_when_cuda_build_disabled(tmp_path):
    """SET_KERNELS_BUILD_CUDA=0 gives a py3-none-any wheel without _C (built from a copy of the tree)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "set_kernels", src / "set_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    (src / "set_kernels" / "_C.cpython-stale.so").write_bytes(b"stale")  # must not be shipped
    env = dict(os.environ, SET_KERNELS_BUILD_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
         str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    if res.returncode != 0 and "No module named pip" in res.stderr:
        pytest.skip("pip is not available in this environment")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("*.whl"))
    assert len(wheels) == 1 and wheels[0].name.endswith("-py3-none-any.whl"), wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "set_kernels/backends/cuda/__init__.py" in names
    assert not [n for n in names if "/_C." in n], names


# ------------------------------------------------------------------------------------------ GPU tests
requires_gpu = pytest.mark.skipif(not HAS_TORCH_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.float16: dict(rtol=2e-3, atol=1e-4),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3)}
SIZES = [0, 1, 7, 256, 257, 5000, 300_001] + [33] * 35  # > 32 tensors: several launches


@pytest.fixture
def gpu_backend(C, cuda_backend):
    if not HAS_TORCH_CUDA:
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    ok, reason = cuda_backend.availability()
    assert ok, reason
    return cuda_backend


def _reference(p, g, m, v, mask, *, step, lr, beta1, beta2, eps, weight_decay, decoupled, scale=None):
    """torch.optim.Adam/AdamW math in float64; returns (param in its dtype, fp32 m, fp32 v)."""
    p64, g64, m64, v64 = p.double(), g.double(), m.double(), v.double()
    if scale is not None:
        g64 = g64 / scale
    if weight_decay:
        if decoupled:
            p64 = p64 * (1 - lr * weight_decay)
        else:
            g64 = g64 + weight_decay * p64
    m64 = m64 + (1 - beta1) * (g64 - m64)
    v64 = beta2 * v64 + (1 - beta2) * g64 * g64
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    p64 = p64 - (lr / bc1) * m64 / (v64.sqrt() / math.sqrt(bc2) + eps)
    if mask is not None:
        p64, m64, v64 = (torch.where(mask, t, torch.zeros_like(t)) for t in (p64, m64, v64))
    return p64.to(p.dtype), m64.float(), v64.float()


def _make_state(dtype, masked, gen, sizes=SIZES):
    dev = "cuda"
    params = [torch.randn(n, generator=gen).to(dev, dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(dev, dtype) for n in sizes]
    m = [torch.zeros(n, device=dev) for n in sizes]
    v = [torch.zeros(n, device=dev) for n in sizes]
    masks = [(torch.rand(n, generator=gen) > 0.3).to(dev) if masked else None for n in sizes]
    return params, grads, m, v, masks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
def test_gpu_masked_adam_matches_float64_reference(gpu_backend, dtype, masked, decoupled):
    gen = torch.Generator().manual_seed(1234)
    params, grads, m, v, masks = _make_state(dtype, masked, gen)
    wd = 0.05
    for step in (1, 2, 3):
        grads = [torch.randn(g.numel(), generator=gen).to("cuda", dtype) for g in grads]
        expected = [_reference(p, g, a, b, k, step=step, weight_decay=wd, decoupled=decoupled, **HP)
                    for p, g, a, b, k in zip(params, grads, m, v, masks)]
        gpu_backend.masked_adam_(params, grads, m, v, masks, step=step, weight_decay=wd,
                                 decoupled_weight_decay=decoupled, **HP)
        torch.cuda.synchronize()
        for i, (p, a, b, k, (ep, em, ev)) in enumerate(zip(params, m, v, masks, expected)):
            torch.testing.assert_close(p, ep, **TOL[dtype], msg=lambda s: f"step {step} param {i}: {s}")
            torch.testing.assert_close(a, em, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b, ev, rtol=1e-5, atol=1e-8)
            if k is not None:
                off = ~k
                assert (p[off] == 0).all() and (a[off] == 0).all() and (b[off] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("decoupled", [False, True])
def test_gpu_matches_torch_optim(gpu_backend, decoupled):
    gen = torch.Generator().manual_seed(7)
    shapes = [(3, 5), (1000,), (64, 65)]
    ours = [torch.randn(s, generator=gen).cuda() for s in shapes]
    theirs = [p.clone().requires_grad_(True) for p in ours]
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(theirs, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    for step in range(1, 6):
        grads = [torch.randn(s, generator=gen).cuda() for s in shapes]
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        opt.step()
        gpu_backend.masked_adam_(ours, grads, m, v, [None] * len(ours), step=step, lr=1e-2, beta1=0.9,
                                 beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=decoupled)
    for p, t in zip(ours, theirs):
        torch.testing.assert_close(p, t.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_found_inf_skips_everything(gpu_backend, dtype):
    gen = torch.Generator().manual_seed(3)
    params, grads, m, v, masks = _make_state(dtype, True, gen, sizes=[10, 1000])
    m = [torch.rand_like(a) for a in m]
    before = [t.clone() for t in params + m + v]
    found_inf = torch.ones(1, device="cuda")
    gpu_backend.masked_adam_(params, grads, m, v, masks, step=4, weight_decay=0.1,
                             decoupled_weight_decay=True, found_inf=found_inf, **HP)
    torch.cuda.synchronize()
    for a, b in zip(params + m + v, before):
        assert torch.equal(a, b)
    # found_inf == 0: the step happens
    gpu_backend.masked_adam_(params, grads, m, v, masks, step=4, weight_decay=0.1,
                             decoupled_weight_decay=True, found_inf=torch.zeros(1, device="cuda"), **HP)
    torch.cuda.synchronize()
    assert not torch.equal(params[1], before[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_grad_scale(gpu_backend, dtype):
    gen = torch.Generator().manual_seed(5)
    scale = 1024.0  # a power of two: unscaling is exact, results must be bitwise equal
    a = _make_state(dtype, False, gen, sizes=[17, 4097])
    b = tuple([t.clone() if t is not None else None for t in lst] for lst in a)
    pa, ga, ma, va, ka = a
    pb, gb, mb, vb, kb = b
    gb = [g * scale for g in gb]
    gpu_backend.masked_adam_(pa, ga, ma, va, ka, step=1, weight_decay=0.0, decoupled_weight_decay=False, **HP)
    gpu_backend.masked_adam_(pb, gb, mb, vb, kb, step=1, weight_decay=0.0, decoupled_weight_decay=False,
                             grad_scale=torch.full((1,), scale, device="cuda"), **HP)
    torch.cuda.synchronize()
    for x, y in zip(pa + ma + va, pb + mb + vb):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_gpu_runs_on_the_current_stream(gpu_backend):
    """The kernel launches on the current stream: checked so that a launch elsewhere FAILS.

    The gradient is written on a side stream behind a long ``torch.cuda._sleep`` and the update
    is queued right after it on that stream. On that stream the kernel sees the fresh gradient;
    on the legacy default stream (which does not wait for torch's non-blocking side streams) it
    would run at once on the stale one. Host syncs are forbidden meanwhile (they would hide it).
    """
    gen = torch.Generator().manual_seed(11)
    params, grads, m, v, masks = _make_state(torch.float32, True, gen, sizes=[1 << 20])
    expected = _reference(params[0], grads[0], m[0], v[0], masks[0], step=1, weight_decay=0.0,
                          decoupled=False, **HP)
    stale = [torch.full_like(grads[0], 1e3)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # ~0.1 s at 2 GHz
            stale[0].copy_(grads[0])
            gpu_backend.masked_adam_(params, stale, m, v, masks, step=1, weight_decay=0.0,
                                     decoupled_weight_decay=False, **HP)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    torch.testing.assert_close(params[0], expected[0], **TOL[torch.float32])


@pytest.mark.gpu
def test_gpu_low_precision_moments_are_supported(gpu_backend):
    gen = torch.Generator().manual_seed(13)
    params, grads, m, v, masks = _make_state(torch.bfloat16, False, gen, sizes=[300])
    m16, v16 = [m[0].bfloat16()], [v[0].bfloat16()]
    ref = _reference(params[0], grads[0], m[0], v[0], None, step=1, weight_decay=0.0, decoupled=False, **HP)
    gpu_backend.masked_adam_(params, grads, m16, v16, masks, step=1, weight_decay=0.0,
                             decoupled_weight_decay=False, **HP)
    torch.cuda.synchronize()
    torch.testing.assert_close(params[0], ref[0], **TOL[torch.bfloat16])
    torch.testing.assert_close(m16[0].float(), ref[1], rtol=1.6e-2, atol=1e-3)


@pytest.mark.gpu
@requires_gpu
def test_gpu_binding_accepts_empty_tensors(C):
    C.masked_adam_(**_adam_kwargs(params=[0], grads=[0], exp_avgs=[0], exp_avg_sqs=[0], numels=[0]))
    torch.cuda.synchronize()
