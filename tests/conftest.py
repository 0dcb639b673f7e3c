"""Shared helpers for the set_kernels test suite.

The float64 oracle here is written from scratch with plain loops and dense torch: it never calls
``set_kernels.ops`` (so a bug in ``to_dense`` cannot hide a bug in a kernel).
"""
from __future__ import annotations

# First, before anything imports triton: without a CUDA device, triton kernels run in triton's
# interpreter on CPU tensors (TRITON_INTERPRET is read when triton is imported), which is how the
# triton backend is tested in CI. torch is imported only to ask; it does not import triton.
import os  # noqa: E402

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402

import pytest  # noqa: E402

# (set_kernels.backends.numba caches its compiled kernels per user, under ~/.cache/set_kernels/numba.)
from set_kernels import backends

# CPU backends that every CPU installation must have: unavailable => the tests FAIL.
REQUIRED_CPU_BACKENDS = ("torch", "numba")
# triton interpreting CPU tensors (no GPU, triton installed): then it must work, like a CPU backend.
TRITON_INTERPRETED = (os.environ.get("TRITON_INTERPRET") == "1"
                      and importlib.util.find_spec("triton") is not None)
# Backends whose unavailability FAILS a test (others skip with the reason).
REQUIRED_BACKENDS = REQUIRED_CPU_BACKENDS + (("triton",) if TRITON_INTERPRETED else ())
# GPU backends that refuse CPU tensors: tested only where a GPU exists; otherwise skipped with the
# reason. (An interpreted triton runs CPU tensors; tests/test_triton.py checks the refusal then.)
GPU_BACKENDS = ("cuda",) if TRITON_INTERPRETED else ("triton", "cuda")


def require_backend(name: str) -> None:
    """Fail (required backend) or skip (GPU backend) unless backend ``name`` is available."""
    ok, why = backends.availability(name)
    if ok:
        return
    if name in REQUIRED_BACKENDS:
        pytest.fail(f"required backend {name!r} is unavailable: {why}")
    pytest.skip(f"backend {name!r} unavailable: {why}")


@pytest.fixture(params=REQUIRED_CPU_BACKENDS)
def cpu_backend(request) -> str:
    """Each required CPU backend, failing the test when it is unavailable."""
    require_backend(request.param)
    return request.param


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests start with no $SET_KERNELS_BACKEND, so that 'auto' means auto, and with no cached
    backend availability (a test may patch a backend; the cache must not outlive the patch)."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends.clear_cache()
    yield
    backends.clear_cache()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Seeded standard-normal tensor (never zeros)."""
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


# --------------------------------------------------------------------------- layout oracle
def csr_blocks(layout) -> list[tuple[int, int]]:
    """``[(block_row, block_col), ...]`` in values order, read from row_ptr / col_idx with a loop."""
    row_ptr = layout.row_ptr.tolist()
    col_idx = layout.col_idx.tolist()
    out = []
    for r in range(len(row_ptr) - 1):
        for k in range(row_ptr[r], row_ptr[r + 1]):
            out.append((r, col_idx[k]))
    return out


def dense_ref(values: torch.Tensor, layout) -> torch.Tensor:
    """float64 ``(rows, cols)``: each block placed into a zero ``(R*b, C*b)`` matrix, then cropped."""
    b = layout.block_size
    n_rows, n_cols = layout.grid
    full = torch.zeros(n_rows * b, n_cols * b, dtype=torch.float64)
    for k, (r, c) in enumerate(csr_blocks(layout)):
        full[r * b:(r + 1) * b, c * b:(c + 1) * b] = values[k].detach().double()
    return full[: layout.shape[0], : layout.shape[1]]


def blocks_ref(dense: torch.Tensor, layout) -> torch.Tensor:
    """float64 ``(nnz, b, b)``: the live blocks of ``dense (rows, cols)``, zero beyond the edges."""
    b = layout.block_size
    n_rows, n_cols = layout.grid
    full = torch.zeros(n_rows * b, n_cols * b, dtype=torch.float64)
    full[: dense.shape[0], : dense.shape[1]] = dense.detach().double()
    blocks = [full[r * b:(r + 1) * b, c * b:(c + 1) * b] for r, c in csr_blocks(layout)]
    if not blocks:
        return torch.zeros(0, b, b, dtype=torch.float64)
    return torch.stack(blocks)


def edge_mask_ref(layout) -> torch.Tensor:
    """bool ``(nnz, b, b)``: True where a block entry lies inside the ``(rows, cols)`` matrix."""
    ones = torch.ones(layout.shape, dtype=torch.float64)
    return blocks_ref(ones, layout) != 0


def linear_ref(x, values, layout, bias, dy):
    """float64 forward and gradients of ``y = x @ W.T + bias`` for upstream gradient ``dy``.

    Returns ``(y, dx, dvalues, dbias)``; ``dvalues`` is zero beyond the matrix edges.
    """
    w = dense_ref(values, layout)
    x64 = x.detach().double().reshape(-1, layout.shape[1])
    dy64 = dy.detach().double().reshape(-1, layout.shape[0])
    y = x64 @ w.T
    if bias is not None:
        y = y + bias.detach().double()
    dx = dy64 @ w
    dw = dy64.T @ x64
    dvalues = blocks_ref(dw, layout)
    dbias = dy64.sum(0) if bias is not None else None
    lead = tuple(x.shape[:-1])
    return y.reshape(*lead, -1), dx.reshape(*lead, -1), dvalues, dbias


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """``max |actual - expected| <= rel * max(|expected|, 1e-30)`` (error relative to the reference scale)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite entries (an element was not written?)"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().item()
    err = (a - expected).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: max error {err:.3e} > {rel:g} x scale {scale:.3e}"


# Relative tolerances against the float64 reference scale.
TOL = {torch.float32: 1e-4, torch.float64: 1e-11}




@pytest.fixture
def poison_alloc(monkeypatch):
    """Make uninitialised torch allocations (torch.empty, empty_like, Tensor.new_empty) NaN-filled.

    The ops allocate their own outputs (with torch, also in the numba backend), so this is how a
    test "poisons" them: a kernel that leaves any output element unwritten then returns a NaN,
    which the comparison catches. numpy is deliberately left alone: numba resolves ``np.empty``
    when it compiles, and a patched one would not compile.
    """

    def _nan_fill(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
            with torch.no_grad():
                t.fill_(float("nan"))
        return t

    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        original = getattr(owner, name)

        def poisoned(*args, _original=original, **kwargs):
            return _nan_fill(_original(*args, **kwargs))

        monkeypatch.setattr(owner, name, poisoned)
    yield


# Backends that run on CUDA tensors ("torch" serves any device).
CUDA_BACKENDS = ("triton", "cuda", "torch")


def require_cuda_backend(name: str, op: str, dtype: torch.dtype) -> torch.device:
    """Skip, with the reason, unless backend ``name`` can run ``op`` on CUDA tensors of ``dtype``."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    device = torch.device("cuda")
    reasons = backends.unsupported_reasons(name, op, device, dtype)
    if reasons:
        pytest.skip(f"backend {name!r} cannot run {op} on cuda {dtype}: {'; '.join(reasons)}")
    return device


# Hypothesis profiles (tests/test_fuzz.py): a bounded "ci" budget by default, and a "long" one
# for local runs with `pytest tests/test_fuzz.py --hypothesis-profile=long`. Registered here so
# that the option, which hypothesis applies when pytest starts, can find them.
try:
    from hypothesis import HealthCheck, settings as _hyp_settings
except ImportError:  # hypothesis is a test dependency; test_fuzz.py fails clearly without it
    pass
else:
    _hyp_settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True,
                                   suppress_health_check=[HealthCheck.too_slow])
    _hyp_settings.register_profile("long", max_examples=400, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ------------------------------------------------------------------------- markers and time limit
# Tests that need a GPU carry the marker `gpu`, so that a GPU session can run them alone
# (`pytest -m gpu`). A file that marks some of its tests `@pytest.mark.gpu` itself is taken as
# it is. In the other files a test is marked here by name: when its name (with its parameters)
# holds the word "gpu" or "cuda" between separators (`_`, `-`, `[`, `]`), e.g. test_gpu_ops...,
# test_op_cuda_matches..., test_x[cuda-bfloat16], and it does not use the `no_gpu` fixture. The
# rule errs towards marking: a marked test that needs no GPU costs a skip or a second there,
# while a GPU test left unmarked would never run in the GPU session. `slow` marks tests worth
# leaving out of a short run (`-m "not slow"`).
_GPU_WORD = re.compile(r"(?:^|[_\-\[\]])(?:gpu|cuda)(?=$|[_\-\[\]])", re.IGNORECASE)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skips without one); select with -m gpu")
    config.addinivalue_line("markers", "slow: takes more than a few seconds; leave out with -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    marks_itself = {item.path for item in items if item.get_closest_marker("gpu") is not None}
    for item in items:
        if item.path in marks_itself or "no_gpu" in getattr(item, "fixturenames", ()):
            continue
        if _GPU_WORD.search(item.name):
            item.add_marker(pytest.mark.gpu)


# $SET_KERNELS_TEST_TIMEOUT (seconds) fails any single test that runs longer (SIGALRM, so the run
# goes on with the next test). A hang inside C code (a CUDA kernel that never returns) is not
# interrupted: benchmarks/gpu_session.sh also puts each pytest run under `timeout`.
_TEST_TIMEOUT = float(os.environ.get("SET_KERNELS_TEST_TIMEOUT", "0") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if _TEST_TIMEOUT <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        pytest.fail(f"{item.nodeid} ran past SET_KERNELS_TEST_TIMEOUT={_TEST_TIMEOUT:g} s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, _TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
