"""The ``cuda`` backend's block-sparse matmuls (``_C.linear_forward / linear_grad_input / linear_grad_weight``) and its
dispatch, plus masked Adam against the torch backend on the GPU.

* Without a GPU (CI here): the bindings reject bad arguments *before* any CUDA call, naming the
  argument; well-formed calls raise RuntimeError (no device); ``info()`` and ``backend="cuda"``
  say why the backend is unavailable.
* With a GPU (skipped, with the reason, otherwise): every op against a float64 reference for
  every dtype and block size, outputs poisoned with NaN first, edge blocks holding NaN past the
  matrix edge, partial token tiles, densities 0 / 0.3 / 1; bit-identical reruns; split-K; row
  strides; streams; devices.
"""
from __future__ import annotations

import importlib
import os
import shutil

import pytest
import torch

import set_kernels as sk
from conftest import assert_close_scaled, blocks_ref, dense_ref, edge_mask_ref, gen, randn
from set_kernels import backends
from set_kernels.layout import BlockSparseLayout as BSL

HAS_TORCH_CUDA = torch.cuda.is_available()
FAKE = 0x10000  # a plausible non-null address; never dereferenced (the checks fail first)
OPS = ("linear_forward", "linear_grad_input", "linear_grad_weight", "masked_adam_")


def _nvcc_available() -> bool:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return True
    return shutil.which("nvcc") is not None or os.access("/usr/local/cuda/bin/nvcc", os.X_OK)


@pytest.fixture(scope="module")
def C():
    if os.environ.get("SET_KERNELS_BUILD_CUDA", "").strip().lower() in ("0", "false", "off", "no"):
        pytest.skip("SET_KERNELS_BUILD_CUDA=0: set_kernels._C was deliberately not built")
    if not _nvcc_available():
        pytest.skip("nvcc not found: set_kernels._C is not built without it")
    try:
        return importlib.import_module("set_kernels._C")
    except ImportError as exc:
        pytest.fail(f"nvcc is available but set_kernels._C does not import ({exc})")


@pytest.fixture
def no_gpu(C):
    if HAS_TORCH_CUDA or C.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present; this test is about machines without one")


# ------------------------------------------------------------------------------- binding arguments
def _forward_kwargs(**kw):
    d = dict(x=FAKE, ldx=80, values=FAKE, row_ptr=FAKE, col_idx=FAKE, bias=0, y=FAKE, ldy=70, M=33, rows=70,
             cols=80, nnz=3, block_size=32, dtype=0, tf32=False, stream=0, device=-1)
    d.update(kw)
    return d


def _grad_input_kwargs(**kw):
    d = dict(dy=FAKE, lddy=70, values=FAKE, col_ptr=FAKE, row_idx=FAKE, perm=FAKE, dx=FAKE, lddx=80, M=33,
             rows=70, cols=80, nnz=3, block_size=32, dtype=1, tf32=False, stream=0, device=-1)
    d.update(kw)
    return d


def _grad_weight_kwargs(**kw):
    d = dict(dy=FAKE, lddy=70, x=FAKE, ldx=80, block_row=FAKE, col_idx=FAKE, out=FAKE, workspace=FAKE,
             workspace_numel=4 * 3 * 32 * 32, M=33, rows=70, cols=80, nnz=3, block_size=32, dtype=2, splits=4,
             tf32=False, stream=0, device=-1)
    d.update(kw)
    return d


_KWARGS = {"linear_forward": _forward_kwargs, "linear_grad_input": _grad_input_kwargs, "linear_grad_weight": _grad_weight_kwargs}

COMMON_BAD = [
    (dict(dtype=7), ["dtype", "7"]),
    (dict(dtype=-1), ["dtype"]),
    (dict(block_size=24), ["block_size", "24"]),
    (dict(block_size=256), ["block_size"]),
    (dict(block_size=0), ["block_size"]),
    (dict(M=-1), ["M=-1", "negative"]),
    (dict(rows=0), ["rows=0"]),
    (dict(rows=-5), ["rows=-5"]),
    (dict(cols=0), ["cols=0"]),
    (dict(nnz=-1), ["nnz=-1", "negative"]),
    (dict(nnz=100), ["nnz=100", "exceeds"]),
    (dict(stream=-1), ["stream"]),
    (dict(device=-2), ["device"]),
]
PER_OP_BAD = {
    "linear_forward": [
        (dict(x=0), ["x", "null"]), (dict(y=0), ["y", "null"]), (dict(values=0), ["values", "null"]),
        (dict(row_ptr=0), ["row_ptr", "null"]), (dict(col_idx=0), ["col_idx", "null"]),
        (dict(x=-8), ["x", "negative"]), (dict(bias=-8), ["bias", "negative"]),
        (dict(ldx=79), ["ldx=79", "x"]), (dict(ldy=-1), ["ldy", "y"]),
    ],
    "linear_grad_input": [
        (dict(dy=0), ["dy", "null"]), (dict(dx=0), ["dx", "null"]), (dict(values=0), ["values", "null"]),
        (dict(col_ptr=0), ["col_ptr", "null"]), (dict(row_idx=0), ["row_idx", "null"]),
        (dict(perm=0), ["perm", "null"]), (dict(perm=-4), ["perm", "negative"]),
        (dict(lddy=69), ["lddy=69", "dy"]), (dict(lddx=79), ["lddx=79", "dx"]),
    ],
    "linear_grad_weight": [
        (dict(dy=0), ["dy", "null"]), (dict(x=0), ["x", "null"]), (dict(out=0), ["out", "null"]),
        (dict(block_row=0), ["block_row", "null"]), (dict(col_idx=0), ["col_idx", "null"]),
        (dict(workspace=0), ["workspace", "null"]), (dict(workspace=-1), ["workspace", "negative"]),
        (dict(workspace_numel=100), ["workspace_numel=100"]), (dict(workspace_numel=-1), ["workspace_numel"]),
        (dict(splits=0), ["splits=0"]), (dict(splits=10**6), ["splits"]),
        (dict(lddy=69), ["lddy=69", "dy"]), (dict(ldx=10), ["ldx=10", "x"]),
    ],
}
BAD_CASES = [(op, ov, names) for op in _KWARGS for ov, names in COMMON_BAD + PER_OP_BAD[op]]


@pytest.mark.parametrize("op, overrides, names", BAD_CASES,
                         ids=[f"{op}-{'-'.join(f'{k}={v}' for k, v in ov.items())}" for op, ov, _ in BAD_CASES])
def test_binding_rejects_bad_arguments(C, op, overrides, names):
    """ValueError naming the argument, raised before any CUDA call (so also without a GPU)."""
    with pytest.raises(ValueError) as info:
        getattr(C, op)(**_KWARGS[op](**overrides))
    msg = str(info.value)
    assert msg.startswith(f"set_kernels._C.{op}:"), msg
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"


@pytest.mark.parametrize("op", list(_KWARGS))
def test_binding_rejects_wrong_types(C, op):
    with pytest.raises(TypeError):
        getattr(C, op)(**_KWARGS[op](M=1.5))
    pointer = "x" if op == "linear_grad_weight" else "values"
    with pytest.raises(TypeError):
        getattr(C, op)(**_KWARGS[op](**{pointer: "abc"}))


@pytest.mark.parametrize("op", list(_KWARGS))
def test_binding_valid_arguments_reach_the_device_check(C, no_gpu, op):
    """Well-formed arguments pass every check; then the missing device is a RuntimeError naming the op."""
    with pytest.raises(RuntimeError, match=rf"set_kernels\._C\.{op}: no CUDA device available"):
        getattr(C, op)(**_KWARGS[op]())
    # nulls are fine for empty tensors (no tokens): still only the device check (or nothing to do)
    if op == "linear_grad_weight":
        with pytest.raises(RuntimeError, match="no CUDA device available"):
            C.linear_grad_weight(**_grad_weight_kwargs(dy=0, x=0, M=0, workspace=0, workspace_numel=0))
    else:
        assert getattr(C, op)(**_KWARGS[op](M=0, **{k: 0 for k in ("x", "y", "dy", "dx") if k in _KWARGS[op]()})) is None


def test_grad_weight_split_helpers(C):
    assert C.BLOCK_SIZES == (16, 32, 64, 128)
    assert C.linear_grad_weight_splits(0, 10, 32) == 1
    assert C.linear_grad_weight_splits(100, 0, 32) == 1
    assert C.linear_grad_weight_splits(100, 4, 32) == 1  # too few tokens to split
    assert C.linear_grad_weight_splits(10_000, 1, 64) == 20  # ceil(10000 / 512) tokens-bound
    assert C.linear_grad_weight_splits(10**7, 1, 16) == 128  # capped
    assert C.linear_grad_weight_splits(10**7, 4096, 64) == 1  # enough blocks: no split
    for M, nnz, b in [(3000, 7, 16), (70, 3, 128), (10**6, 33, 32)]:
        s = C.linear_grad_weight_splits(M, nnz, b)
        assert 1 <= s <= C.GRAD_WEIGHT_MAX_SPLITS
        assert s == C.linear_grad_weight_splits(M, nnz, b)  # a function of the shape only
    assert C.linear_grad_weight_workspace_numel(1, 10, 32) == 0
    assert C.linear_grad_weight_workspace_numel(3, 10, 32) == 3 * 10 * 32 * 32


def test_triton_grad_weight_split_depends_on_the_shape_only(monkeypatch):
    """Both GPU backends choose dW's split-K from the shape alone: the Triton rule is applied with
    a fixed SM count, whatever the device reports (its split count changes the bits)."""
    triton_gw = pytest.importorskip("set_kernels.backends.triton.linear_grad_weight", exc_type=ImportError)
    from set_kernels.backends.triton import _common

    seen = []
    original = triton_gw.choose_splits
    monkeypatch.setattr(triton_gw, "choose_splits", lambda nnz, M, sms: seen.append(sms) or original(nnz, M, sms))
    layout = BSL.random(40, 40, 16, 0.5, generator=gen(5))
    dev = torch.device("cuda" if HAS_TORCH_CUDA else "cpu")
    if not _common.INTERPRET and not HAS_TORCH_CUDA:
        pytest.skip("triton runs neither compiled (no GPU) nor interpreted here")
    lay = layout.to(dev)
    dy, x = randn(40, 40, seed=6).to(dev), randn(40, 40, seed=7).to(dev)
    results = []
    for sms in (4, 108, 132, 1000):
        monkeypatch.setattr(_common, "num_sms", lambda device, _n=sms: _n)
        results.append(triton_gw.linear_grad_weight(dy, x, lay.block_row, lay.col_idx, 40, 40, 16))
    assert seen == [triton_gw.SPLIT_SMS] * 4
    assert all(torch.equal(r, results[0]) for r in results)


# ------------------------------------------------------------------------------ dispatch without GPU
def test_info_says_cuda_unavailable_and_why(C, no_gpu):
    entry = sk.info()["cuda"]
    assert entry["available"] is False
    assert "no CUDA device" in entry["reason"], entry
    assert entry["ops"] == list(OPS)
    assert entry["compiled_archs"] and entry["compiled_archs"] == list(C.compiled_archs())


def _small_problem():
    layout = BSL.random(40, 50, 16, 0.5, generator=gen(1))
    values = randn(layout.nnz_blocks, 16, 16, seed=2)
    x = randn(3, 50, seed=3)
    return layout, values, x


def test_backend_cuda_raises_clearly_for_every_op(C, no_gpu):
    for op in OPS:
        with pytest.raises(RuntimeError, match=rf"backend='cuda' cannot run {op} .*no CUDA device"):
            backends.resolve("cuda", op, torch.device("cpu"), torch.float32)
    layout, values, x = _small_problem()
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run linear_forward.*no CUDA device"):
        sk.ops.block_sparse_linear(x, values, layout, backend="cuda")
    p = torch.zeros(4)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run masked_adam_.*no CUDA device"):
        sk.ops.masked_adam_([p], [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)], [None], step=1, lr=1e-3,
                            beta1=0.9, beta2=0.999, eps=1e-8, backend="cuda")
    assert torch.equal(p, torch.zeros(4))


def test_backend_functions_raise_without_gpu(C, no_gpu):
    cuda = importlib.import_module("set_kernels.backends.cuda")
    layout, values, x = _small_problem()
    calls = {
        "linear_forward": lambda: cuda.linear_forward(x, values, layout.row_ptr, layout.col_idx, None, 40, 50, 16),
        "linear_grad_input": lambda: cuda.linear_grad_input(randn(3, 40), values, layout.col_ptr, layout.row_idx, layout.perm,
                                          40, 50, 16),
        "linear_grad_weight": lambda: cuda.linear_grad_weight(randn(3, 40), x, layout.block_row, layout.col_idx, 40, 50, 16),
    }
    for op, call in calls.items():
        with pytest.raises(RuntimeError, match="set_kernels cuda backend unavailable: no CUDA device"):
            call()


# --------------------------------------------------------------------- fp32 precision (no GPU needed)
@pytest.fixture
def fp32_settings(monkeypatch):
    """Restores torch's fp32 matmul precision (legacy and new API) and the library override."""
    from set_kernels.backends import _precision

    monkeypatch.delenv(_precision.ENV_VAR, raising=False)
    matmul = torch.backends.cuda.matmul
    before, before_new = torch.get_float32_matmul_precision(), getattr(matmul, "fp32_precision", None)
    yield _precision
    _precision.set_fp32_precision(None)
    if before_new is not None:
        matmul.fp32_precision = before_new
    torch.set_float32_matmul_precision(before)


# (torch setting, $SET_KERNELS_FP32_PRECISION, set_fp32_precision) -> (requested, triton, cuda)
PRECISION_TABLE = [
    ("highest", "", None, ("ieee", "ieee", "3xtf32")),
    ("high", "", None, ("tf32", "tf32", "tf32")),
    ("medium", "", None, ("tf32", "tf32", "tf32")),
    ("allow_tf32=True", "", None, ("tf32", "tf32", "tf32")),
    ("allow_tf32=False", "", None, ("ieee", "ieee", "3xtf32")),
    ("fp32_precision=tf32", "", None, ("tf32", "tf32", "tf32")),
    ("high", "ieee", None, ("ieee", "ieee", "3xtf32")),
    ("highest", "3xtf32", None, ("3xtf32", "tf32x3", "3xtf32")),
    ("highest", " TF32 ", None, ("tf32", "tf32", "tf32")),
    ("high", "auto", None, ("tf32", "tf32", "tf32")),
    ("highest", "tf32", "ieee", ("ieee", "ieee", "3xtf32")),
    ("high", "ieee", "3xtf32", ("3xtf32", "tf32x3", "3xtf32")),
    ("highest", "", "tf32", ("tf32", "tf32", "tf32")),
]


def _set_torch(setting):
    matmul = torch.backends.cuda.matmul
    if setting.startswith("allow_tf32="):
        torch.set_float32_matmul_precision("medium")
        matmul.allow_tf32 = setting.endswith("True")
    elif setting.startswith("fp32_precision="):
        if not hasattr(matmul, "fp32_precision"):
            pytest.skip("this torch has no torch.backends.cuda.matmul.fp32_precision")
        matmul.fp32_precision = setting.split("=")[1]
    else:
        torch.set_float32_matmul_precision(setting)


@pytest.mark.parametrize("setting, env, override, expected", PRECISION_TABLE,
                         ids=[f"{t}-{e.strip() or 'noenv'}-{o}" for t, e, o, _ in PRECISION_TABLE])
def test_fp32_precision_mapping_and_precedence(monkeypatch, fp32_settings, setting, env, override, expected):
    """set_fp32_precision > $SET_KERNELS_FP32_PRECISION > torch's own setting; what each GPU
    backend then runs (triton's input_precision; the cuda kernels' exact mode is 3xTF32)."""
    _set_torch(setting)
    if env:
        monkeypatch.setenv(fp32_settings.ENV_VAR, env)
    fp32_settings.set_fp32_precision(override)
    requested, triton_precision, cuda_mode = expected
    assert fp32_settings.fp32_precision() == requested
    assert backends.fp32_precision() == requested  # the public re-export
    assert fp32_settings.backend_precision("triton") == triton_precision
    assert fp32_settings.backend_precision("cuda") == cuda_mode
    for dtype in (torch.float16, torch.bfloat16):  # the setting is about fp32 only
        assert fp32_settings.backend_precision("triton", dtype) == "tf32"
        assert fp32_settings.backend_precision("cuda", dtype) == "3xtf32"


def test_cuda_backend_passes_the_tf32_flag_it_chose(fp32_settings):
    """The cuda backend's Python side turns the setting into _C's tf32 flag (fp32 only), at every call."""
    cuda = importlib.import_module("set_kernels.backends.cuda")
    torch.set_float32_matmul_precision("highest")
    assert cuda._mode(torch.float32) == (0, False) and not cuda.allow_tf32()
    torch.set_float32_matmul_precision("high")
    assert cuda._mode(torch.float32) == (0, True) and cuda.allow_tf32()
    assert cuda._mode(torch.float16) == (1, False) and cuda._mode(torch.bfloat16) == (2, False)
    fp32_settings.set_fp32_precision("3xtf32")
    assert cuda._mode(torch.float32) == (0, False)
    fp32_settings.set_fp32_precision("ieee")  # no IEEE path in _C: its exact mode, 3xTF32
    assert cuda._mode(torch.float32) == (0, False)
    assert not hasattr(cuda, "FP32_MATMUL")


def test_fp32_precision_rejects_unknown_values(monkeypatch, fp32_settings):
    with pytest.raises(ValueError, match="set_fp32_precision: expected one of 'ieee', 'tf32', '3xtf32'"):
        backends.set_fp32_precision("fp64")
    monkeypatch.setenv(fp32_settings.ENV_VAR, "bf16")
    with pytest.raises(ValueError, match="SET_KERNELS_FP32_PRECISION: expected one of"):
        fp32_settings.fp32_precision()
    backends.set_fp32_precision("tf32")  # an explicit override does not read the env var
    assert fp32_settings.fp32_precision() == "tf32"


# ------------------------------------------------------------------------------------------ GPU tests
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
BLOCKS = [16, 32, 64, 128]
DENSITIES = [0.0, 0.3, 1.0]
FP32_REL = 2e-5  # 3xTF32 + fp32 accumulation, relative to the reference's largest entry
SLEEP_CYCLES = 200_000_000  # torch.cuda._sleep: ~0.1 s at 2 GHz, longer at idle clocks


@pytest.fixture(scope="module")
def cuda():
    """The cuda backend module on a usable GPU; skips (saying why) without one."""
    if not HAS_TORCH_CUDA:
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    mod = importlib.import_module("set_kernels.backends.cuda")
    ok, why = mod.availability()
    major, _ = torch.cuda.get_device_capability()
    if not ok and major < 8:
        pytest.skip(f"the cuda backend needs sm_80+: {why}")
    assert ok, why  # a GPU, an sm_80+ device and a built _C: the backend must be usable
    return mod


def _shape(b: int):
    """Partial edge blocks on both axes and a partial token tile."""
    return 2 * b + 5, 3 * b - 7, 77


def _inputs(b, density, dtype, seed=0, with_bias=True):
    rows, cols, M = _shape(b)
    layout = BSL.random(rows, cols, b, density, generator=gen(seed))
    scale = 1.0 if dtype == torch.float32 else 0.5
    values = randn(layout.nnz_blocks, b, b, seed=seed + 1, scale=scale)
    values[~edge_mask_ref(layout)] = float("nan")  # past the matrix edge: must be ignored
    x = randn(M, cols, seed=seed + 2, scale=scale)
    dy = randn(M, rows, seed=seed + 3, scale=scale)
    bias = randn(rows, seed=seed + 4) if with_bias else None
    cast = (lambda t: None if t is None else t.to(dtype))
    return layout, cast(values), cast(x), cast(dy), cast(bias)


def _check(what, got, ref, own, dtype):
    """fp32: relative to the reference scale; fp16/bf16: within 2x torch's own error + 1 ulp of scale."""
    got = got.detach().cpu().double()
    assert torch.isfinite(got).all(), f"{what}: non-finite entries (unwritten output or edge NaN read)"
    if dtype == torch.float32:
        assert_close_scaled(got, ref, FP32_REL, what)
        return
    if ref.numel() == 0:
        return
    err = (got - ref).abs().max().item()
    own_err = (own.detach().cpu().double() - ref).abs().max().item()
    slack = torch.finfo(dtype).eps * ref.abs().max().item()
    assert err <= 2 * own_err + slack, f"{what}: error {err:.3e} > 2 x torch's {own_err:.3e} + {slack:.1e}"


def _run_all(cuda, layout, values, x, dy, bias, dev, **gw_kw):
    rows, cols = layout.shape
    b = layout.block_size
    lay = layout.to(dev)
    v, xd, dyd = values.to(dev), x.to(dev), dy.to(dev)
    bd = bias.to(dev) if bias is not None else None
    y = cuda.linear_forward(xd, v, lay.row_ptr, lay.col_idx, bd, rows, cols, b)
    dx = cuda.linear_grad_input(dyd, v, lay.col_ptr, lay.row_idx, lay.perm, rows, cols, b)
    dv = cuda.linear_grad_weight(dyd, xd, lay.block_row, lay.col_idx, rows, cols, b, **gw_kw)
    torch.cuda.synchronize()
    return y, dx, dv


@pytest.mark.gpu
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_ops_match_float64_reference(cuda, poison_alloc, dtype, b, density):
    layout, values, x, dy, bias = _inputs(b, density, dtype, seed=b)
    dev = torch.device("cuda")
    y, dx, dv = _run_all(cuda, layout, values, x, dy, bias, dev)

    w = dense_ref(values.double().nan_to_num(0.0), layout)  # blocks cropped at the edge: NaN gone
    x64, dy64 = x.double(), dy.double()
    ref_y = x64 @ w.T + bias.double()
    ref_dx = dy64 @ w
    ref_dv = blocks_ref(dy64.T @ x64, layout)
    # torch's own error for the same computation in this dtype (cuBLAS, fp32 accumulation)
    wd = w.to(dev, dtype)
    own_y = torch.nn.functional.linear(x.to(dev), wd, bias.to(dev))
    own_dx = dy.to(dev) @ wd
    own_dv = blocks_ref((dy.to(dev).T @ x.to(dev)).cpu(), layout).to(dtype)
    _check("linear_forward", y, ref_y, own_y, dtype)
    _check("linear_grad_input", dx, ref_dx, own_dx, dtype)
    _check("linear_grad_weight", dv, ref_dv, own_dv, dtype)
    outside = ~edge_mask_ref(layout)
    assert torch.equal(dv.cpu()[outside], torch.zeros_like(dv.cpu()[outside])), "dW past the edge is not exactly 0"
    if density == 0.0:
        assert torch.equal(y.cpu(), bias.expand_as(y.cpu())), "empty rows must give exactly the bias"
        assert torch.equal(dx.cpu(), torch.zeros_like(dx.cpu()))


@pytest.mark.gpu
@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_ops_are_deterministic(cuda, dtype, b):
    """Two runs on the same inputs are bit-identical (split-K included: many tokens, few blocks)."""
    rows, cols = 2 * b + 3, 2 * b + 9
    layout = BSL.random(rows, cols, b, 0.5, generator=gen(5))
    dev = torch.device("cuda")
    M = 2500
    values = randn(layout.nnz_blocks, b, b, seed=6).to(dtype)
    x, dy = randn(M, cols, seed=7).to(dtype), randn(M, rows, seed=8).to(dtype)
    assert cuda._load_ext().linear_grad_weight_splits(M, layout.nnz_blocks, b) > 1, "the test must exercise split-K"
    first = _run_all(cuda, layout, values, x, dy, None, dev)
    second = _run_all(cuda, layout, values, x, dy, None, dev)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_grad_weight_split_k_matches_reference(cuda, poison_alloc, dtype):
    """Forced split counts (1, 3, 7, more than the tokens allow) against the float64 reference."""
    b = 32
    layout = BSL.random(100, 70, b, 0.6, generator=gen(9))
    M = 1000
    x, dy = randn(M, 70, seed=10).to(dtype), randn(M, 100, seed=11).to(dtype)
    ref = blocks_ref(dy.double().T @ x.double(), layout)
    own = blocks_ref((dy.cuda().T @ x.cuda()).cpu(), layout).to(dtype)
    lay = layout.to("cuda")
    results = []
    for splits in (1, 3, 7, 40):
        dv = cuda.linear_grad_weight(dy.cuda(), x.cuda(), lay.block_row, lay.col_idx, 100, 70, b, splits=splits)
        torch.cuda.synchronize()
        _check(f"linear_grad_weight splits={splits}", dv, ref, own, dtype)
        results.append(dv)
    again = cuda.linear_grad_weight(dy.cuda(), x.cuda(), lay.block_row, lay.col_idx, 100, 70, b, splits=7)
    assert torch.equal(again, results[2])


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 63, 64, 65, 200])
def test_gpu_token_counts_and_row_strides(cuda, poison_alloc, M):
    """Partial token tiles, and inputs whose rows are strided (views of wider tensors)."""
    b, rows, cols = 64, 150, 130
    layout = BSL.random(rows, cols, b, 0.7, generator=gen(12))
    values = randn(layout.nnz_blocks, b, b, seed=13).cuda()
    x_wide, dy_wide = randn(M, cols + 11, seed=14).cuda(), randn(M, rows + 5, seed=15).cuda()
    x, dy = x_wide[:, 3:3 + cols], dy_wide[:, :rows]
    assert M == 1 or (x.stride(0) != cols and dy.stride(0) != rows)
    lay = layout.to("cuda")
    y = cuda.linear_forward(x, values, lay.row_ptr, lay.col_idx, None, rows, cols, b)
    dx = cuda.linear_grad_input(dy, values, lay.col_ptr, lay.row_idx, lay.perm, rows, cols, b)
    dv = cuda.linear_grad_weight(dy, x, lay.block_row, lay.col_idx, rows, cols, b)
    w = dense_ref(values.cpu(), layout)
    x64, dy64 = x.cpu().double(), dy.cpu().double()
    assert_close_scaled(y.cpu(), x64 @ w.T, FP32_REL, "linear_forward")
    assert_close_scaled(dx.cpu(), dy64 @ w, FP32_REL, "linear_grad_input")
    assert_close_scaled(dv.cpu(), blocks_ref(dy64.T @ x64, layout), FP32_REL, "linear_grad_weight")


@pytest.mark.gpu
def test_gpu_tf32_mode(cuda, fp32_settings):
    """One TF32 pass (torch's "high", or SET_KERNELS_FP32_PRECISION=tf32) stays within TF32
    accuracy; the default (torch's "highest": 3xTF32) is more accurate."""
    b = 64
    layout, values, x, dy, bias = _inputs(b, 1.0, torch.float32, seed=21)
    values = values.nan_to_num(0.0)
    w = dense_ref(values, layout)
    ref = x.double() @ w.T + bias.double()
    lay = layout.to("cuda")
    rows, cols = layout.shape
    errs = {}
    for setting in ("highest", "high"):
        torch.set_float32_matmul_precision(setting)
        y = cuda.linear_forward(x.cuda(), values.cuda(), lay.row_ptr, lay.col_idx, bias.cuda(), rows, cols, b)
        errs[setting] = (y.cpu().double() - ref).abs().max().item() / ref.abs().max().item()
    assert errs["highest"] <= FP32_REL, errs
    assert errs["high"] <= 5e-3, errs


@pytest.mark.gpu
def test_gpu_public_op_with_autograd(cuda):
    """block_sparse_linear(backend='cuda'): forward and all three gradients against float64."""
    b = 32
    layout, values, x, dy, bias = _inputs(b, 0.3, torch.float32, seed=31)
    values = values.nan_to_num(0.0)
    v, xx, bb = (t.cuda().requires_grad_() for t in (values, x.reshape(7, 11, -1), bias))
    y = sk.ops.block_sparse_linear(xx, v, layout.to("cuda"), bb, backend="cuda")
    y.backward(dy.cuda().reshape(7, 11, -1))
    w = dense_ref(values, layout)
    x64, dy64 = x.double(), dy.double()
    assert_close_scaled(y.detach().cpu().reshape(77, -1), x64 @ w.T + bias.double(), FP32_REL, "y")
    assert_close_scaled(xx.grad.cpu().reshape(77, -1), dy64 @ w, FP32_REL, "dx")
    assert_close_scaled(v.grad.cpu(), blocks_ref(dy64.T @ x64, layout), FP32_REL, "dW")
    assert_close_scaled(bb.grad.cpu(), dy64.sum(0), FP32_REL, "dbias")


@pytest.mark.gpu
def test_gpu_runs_on_current_stream(cuda):
    """Every op launches on the current stream: checked so that a launch elsewhere FAILS.

    The inputs are written on a side stream behind a long ``torch.cuda._sleep``, and each op is
    queued right after them, on that stream. Launched there, a kernel reads the fresh inputs;
    launched on the legacy default stream (which does not wait for torch's non-blocking side
    streams) or any other, it runs at once and reads the stale ones. No host sync is allowed in
    between (it would hide the mistake), hence the sync debug mode.
    """
    b = 32
    layout, values, x, dy, _ = _inputs(b, 1.0, torch.float32, seed=41)
    values = values.nan_to_num(0.0)
    rows, cols = layout.shape
    lay = layout.to("cuda")
    fresh = [t.cuda() for t in (values, x, dy)]
    stale = [-t for t in fresh]  # same shapes, other values
    v, xd, dyd = stale
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            torch.cuda._sleep(SLEEP_CYCLES)
            for dst, src in zip(stale, fresh):
                dst.copy_(src)
            y = cuda.linear_forward(xd, v, lay.row_ptr, lay.col_idx, None, rows, cols, b)
            dx = cuda.linear_grad_input(dyd, v, lay.col_ptr, lay.row_idx, lay.perm, rows, cols, b)
            dv = cuda.linear_grad_weight(dyd, xd, lay.block_row, lay.col_idx, rows, cols, b, splits=3)  # + the reduce pass
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    w = dense_ref(values, layout)
    assert_close_scaled(y.cpu(), x.double() @ w.T, FP32_REL, "linear_forward on a busy side stream")
    assert_close_scaled(dx.cpu(), dy.double() @ w, FP32_REL, "linear_grad_input on a busy side stream")
    assert_close_scaled(dv.cpu(), blocks_ref(dy.double().T @ x.double(), layout), FP32_REL,
                        "linear_grad_weight (split) on a busy side stream")


@pytest.mark.gpu
def test_gpu_ops_capture_in_a_cuda_graph(cuda):
    """The ops can be captured in a CUDA graph (capture runs on a side stream: a launch on another
    stream, a host sync or an allocation outside the graph's pool raises), and replays are right."""
    b = 64
    layout, values, x, dy, bias = _inputs(b, 0.5, torch.float32, seed=43)
    values = values.nan_to_num(0.0)
    rows, cols = layout.shape
    lay = layout.to("cuda")
    v, xd, dyd, bd = (t.cuda() for t in (values, x, dy, bias))

    def step():
        return (cuda.linear_forward(xd, v, lay.row_ptr, lay.col_idx, bd, rows, cols, b),
                cuda.linear_grad_input(dyd, v, lay.col_ptr, lay.row_idx, lay.perm, rows, cols, b),
                cuda.linear_grad_weight(dyd, xd, lay.block_row, lay.col_idx, rows, cols, b, splits=2))

    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        step()
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, dx, dv = step()
    for seed in (1, 2):  # new inputs in place, then replay
        x2, dy2 = randn(*x.shape, seed=100 + seed), randn(*dy.shape, seed=200 + seed)
        xd.copy_(x2)
        dyd.copy_(dy2)
        graph.replay()
        torch.cuda.synchronize()
        w = dense_ref(values, layout)
        assert_close_scaled(y.cpu(), x2.double() @ w.T + bias.double(), FP32_REL, f"graph replay {seed}: y")
        assert_close_scaled(dx.cpu(), dy2.double() @ w, FP32_REL, f"graph replay {seed}: dx")
        assert_close_scaled(dv.cpu(), blocks_ref(dy2.double().T @ x2.double(), layout), FP32_REL,
                            f"graph replay {seed}: dW")


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["linear_forward", "linear_grad_weight"])
def test_gpu_fp32_long_reductions_stay_within_the_bound(cuda, op):
    """3xTF32 over K of 4,000 to 16,000: the per-tile promotion keeps the tensor cores' own
    accumulation (which may truncate) from piling up over a long reduction; the bound is the
    short-K one, FP32_REL. Emulated with truncating accumulation and no promotion, the error
    would be ~4e-5 at K = 4096 and ~1e-4 at 16384 (csrc/bsmm_sm80.cuh)."""
    b = 64
    if op == "linear_forward":  # K = cols: one output block row of 64 live blocks
        rows, cols, M = 64, 64 * 64, 256
    else:  # K = tokens, one split (no split-K to shorten it)
        rows, cols, M = 64, 64, 16384
    layout = BSL.random(rows, cols, b, 1.0, generator=gen(71))
    values = randn(layout.nnz_blocks, b, b, seed=72)
    x, dy = randn(M, cols, seed=73), randn(M, rows, seed=74)
    lay = layout.to("cuda")
    if op == "linear_forward":
        got = cuda.linear_forward(x.cuda(), values.cuda(), lay.row_ptr, lay.col_idx, None, rows, cols, b)
        ref = x.double() @ dense_ref(values, layout).T
    else:
        got = cuda.linear_grad_weight(dy.cuda(), x.cuda(), lay.block_row, lay.col_idx, rows, cols, b, splits=1)
        ref = blocks_ref(dy.double().T @ x.double(), layout)
    assert_close_scaled(got.cpu(), ref, FP32_REL, f"{op}, K = {cols if op == 'linear_forward' else M}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TORCH_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_follows_the_tensors_device(cuda):
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1, current device unchanged."""
    b = 32
    layout, values, x, dy, bias = _inputs(b, 0.5, torch.float32, seed=51)
    values = values.nan_to_num(0.0)
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    y, dx, dv = _run_all(cuda, layout, values, x, dy, bias, dev)
    assert torch.cuda.current_device() == 0
    assert y.device == dev
    w = dense_ref(values, layout)
    assert_close_scaled(y.cpu(), x.double() @ w.T + bias.double(), FP32_REL, "y on cuda:1")
    assert_close_scaled(dv.cpu(), blocks_ref(dy.double().T @ x.double(), layout), FP32_REL, "dW on cuda:1")


@pytest.mark.gpu
def test_gpu_rejects_bad_tensors(cuda):
    """Bad arguments are refused at the public op boundary (backend="cuda"), naming the argument;
    the backend functions themselves only refuse what the kernels cannot read (CPU tensors)."""
    b = 16
    layout, values, x, dy, bias = _inputs(b, 1.0, torch.float32, seed=61)
    lay = layout.to("cuda")
    rows, cols = layout.shape
    v, xd = values.cuda(), x.cuda()
    op = sk.ops.block_sparse_linear
    with pytest.raises(ValueError, match="the cuda backend needs CUDA tensors"):
        cuda.linear_forward(x, v, lay.row_ptr, lay.col_idx, None, rows, cols, b)
    with pytest.raises(ValueError, match="device"):
        op(x, v, lay, backend="cuda")
    with pytest.raises(TypeError, match="values: expected dtype"):
        op(xd, v.half(), lay, backend="cuda")
    with backends.use("cuda"), pytest.raises(TypeError, match="index: expected an int32"):
        torch.ops.set_kernels.linear_forward(xd, v, lay.index.long(), None, rows, cols, b)
    with pytest.raises(ValueError, match="x: expected last dimension"):
        op(xd[:, :-1], v, lay, backend="cuda")
    small = BSL.random(rows, cols, 8, 1.0, generator=gen(62)).to("cuda")
    with pytest.raises(RuntimeError, match="block sizes"):
        op(xd, torch.zeros(small.nnz_blocks, 8, 8, device="cuda"), small, backend="cuda")
    with pytest.raises(RuntimeError, match="float64"):
        op(xd.double(), v.double(), lay, backend="cuda")


# ---------------------------------------------------------------------------------- masked Adam (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("decoupled", [False, True])
def test_gpu_masked_adam_matches_torch_backend(cuda, dtype, decoupled):
    g = gen(71)
    shapes = [(33, 17), (1000,), (5,), (64, 64)]
    base = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    masks = [None if i == 1 else torch.rand(s, generator=g) > 0.3 for i, s in enumerate(shapes)]
    states = {}
    for name in ("cuda", "torch"):
        params = [p.clone().cuda() for p in base]
        m = [torch.zeros(s, device="cuda") for s in shapes]
        v = [torch.zeros(s, device="cuda") for s in shapes]
        mk = [k.cuda() if k is not None else None for k in masks]
        for step in range(1, 4):
            grads = [torch.randn(s, generator=gen(100 + step)).to(dtype).cuda() for s in shapes]
            sk.ops.masked_adam_(params, grads, m, v, mk, step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=0.05, decoupled_weight_decay=decoupled, backend=name)
        torch.cuda.synchronize()
        states[name] = (params, m, v)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=1e-4),
           torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3)}[dtype]
    for ours, ref in zip(states["cuda"][0], states["torch"][0]):
        torch.testing.assert_close(ours, ref, **tol)
    # fp32 moments; with 16-bit params an ulp of difference in p feeds the next step's gradient (L2)
    moment_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-5)
    for part in (1, 2):
        for ours, ref in zip(states["cuda"][part], states["torch"][part]):
            torch.testing.assert_close(ours, ref, **moment_tol)
    for p, k in zip(states["cuda"][0], masks):
        if k is not None:
            assert torch.equal(p[~k.cuda()], torch.zeros_like(p[~k.cuda()]))
