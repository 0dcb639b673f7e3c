"""The ``cuda`` backend: hand-written CUDA kernels in the compiled module ``set_kernels._C``.

``_C`` is plain pybind11 (no libtorch): tensors are passed as data pointers, element counts, a
dtype code and the current CUDA stream. Importing this module never fails; when ``_C`` was not
built or there is no usable GPU, :func:`availability` says why and the ops raise RuntimeError.

Ops (``SUPPORTED_OPS``): the three block-sparse matmuls ``linear_forward`` (forward, bias fused),
``linear_grad_input`` (dX through the transposed index, no atomics) and ``linear_grad_weight`` (dW on the live
blocks, deterministic split-K), on the tensor cores (wmma) with fp32 accumulation, and the fused
masked Adam/AdamW ``masked_adam_``. fp32, fp16 and bf16; block sizes 16, 32, 64 and 128.

fp32 matmuls: by default a 3xTF32 split on the tensor cores (``a*b ~ a_hi*b_hi + a_hi*b_lo +
a_lo*b_hi``, products accurate to ~2^-21 relative, close to fp32). Setting
``set_kernels.backends.cuda.FP32_MATMUL = "tf32"`` opts into a single TF32 pass (10-bit mantissa
inputs, ~1e-3 relative error, fewer tensor-core operations).

Every function validates its tensors (device, dtype, shape, contiguity of what the kernels index)
before calling into ``_C``; kernels run on ``torch.cuda.current_stream()`` of the tensors' device,
which is also made the current device for the call.
"""
from __future__ import annotations

import importlib

import torch

NAME = "cuda"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_OPS = ("linear_forward", "linear_grad_input", "linear_grad_weight", "masked_adam_")
BLOCK_SIZES = (16, 32, 64, 128)
# "3xtf32" (default, ~fp32 accuracy) or "tf32" (one TF32 pass): how fp32 matmuls use the tensor cores.
FP32_MATMUL = "3xtf32"

_C_MODULE = "set_kernels._C"
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # _C.DTYPE_*

_ext = None
_ext_error: str | None = None


def _load_ext():
    """The compiled module, or None (the import error is kept in ``_ext_error``)."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = importlib.import_module(_C_MODULE)
        except Exception as exc:  # ImportError, or OSError from a broken binary
            _ext_error = f"{type(exc).__name__}: {exc}"
    return _ext


def _arch_number(arch: str) -> int | None:
    """``"sm_90a"`` -> 90, ``"compute_80"`` -> 80."""
    digits = "".join(ch for ch in arch.split("_")[-1] if ch.isdigit())
    return int(digits) if digits else None


def availability() -> tuple[bool, str]:
    """``(True, "")`` when the cuda backend can run here, else ``(False, reason)``. Never raises."""
    try:
        ext = _load_ext()
        if ext is None:
            return False, f"{_C_MODULE} was not built ({_ext_error}); reinstall with nvcc on PATH"
        if not torch.cuda.is_available():
            return False, "no CUDA device (torch.cuda.is_available() is False)"
        if ext.cuda_device_count() == 0:
            return False, (f"no CUDA device visible to {_C_MODULE} ({ext.cuda_device_error()}; "
                           f"it uses CUDA runtime {_version(ext.cuda_runtime_version())}, "
                           f"driver supports {_version(ext.cuda_driver_version())})")
        major, minor = torch.cuda.get_device_capability()
        device_arch = 10 * major + minor
        archs = [a for a in (_arch_number(x) for x in ext.compiled_archs()) if a is not None]
        if archs and device_arch < min(archs):
            return False, (f"the GPU is sm_{device_arch}, older than every architecture {_C_MODULE} "
                           f"was built for ({', '.join(ext.compiled_archs())}); rebuild with "
                           f"SET_KERNELS_CUDA_ARCHS={device_arch}")
        return True, ""
    except Exception as exc:  # never raise from an availability probe
        return False, f"cuda backend check failed: {type(exc).__name__}: {exc}"


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


def compiled_archs() -> list[str]:
    """GPU architectures ``_C`` was built for, e.g. ``["sm_80", "sm_90"]``; ``[]`` if not built."""
    ext = _load_ext()
    if ext is None:
        return []
    try:
        return list(ext.compiled_archs())
    except Exception:
        return []


def _require():
    ok, why = availability()
    if not ok:
        raise RuntimeError(f"set_kernels cuda backend unavailable: {why}")
    return _ext


def _scalar_ptr(name: str, t: torch.Tensor | None, device: torch.device, keep: list) -> int:
    """Data pointer of an fp32 device copy of a 1-element tensor (0 for None); no host sync."""
    if t is None:
        return 0
    if t.numel() != 1 or t.device != device:
        raise ValueError(f"{name}: expected a 1-element tensor on {device}, got shape "
                         f"{tuple(t.shape)} on {t.device}")
    t = t.detach().reshape(1).to(dtype=torch.float32).contiguous()
    keep.append(t)
    return t.data_ptr()


def masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, *, step, lr, beta1, beta2, eps,
                 weight_decay, decoupled_weight_decay, grad_scale=None, found_inf=None) -> None:
    """Fused masked Adam/AdamW step, in place, with the ``_C.masked_adam`` CUDA kernel.

    The tensors were validated by ``set_kernels.ops.masked_adam_`` (same CUDA device, matching
    shapes, contiguous params and moments, grads of the param dtype). Params/grads may be
    fp32/fp16/bf16; the kernel keeps the moments in fp32 (moments stored in the param dtype are
    updated through fp32 copies). Launches on the current stream; no host synchronisation.
    """
    ext = _require()
    n = len(params)
    if masks is None:
        masks = [None] * n
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(masks) == n):
        raise ValueError("masked_adam_: params, grads, exp_avgs, exp_avg_sqs and masks must have the same length")
    if n == 0:
        return
    device = params[0].device
    if device.type != "cuda":
        raise ValueError(f"masked_adam_: the cuda backend needs CUDA tensors, got {device}")

    with torch.cuda.device(device):
        keep: list[torch.Tensor] = []  # temporaries that must outlive the launches
        scale_ptr = _scalar_ptr("grad_scale", grad_scale, device, keep)
        inf_ptr = _scalar_ptr("found_inf", found_inf, device, keep)
        stream = torch.cuda.current_stream(device).cuda_stream
        copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []

        groups: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            if p.dtype not in _DTYPE_CODES:
                raise TypeError(f"params[{i}]: the cuda backend supports float32, float16 and bfloat16, got {p.dtype}")
            groups.setdefault(p.dtype, []).append(i)

        for dtype, idx in groups.items():
            ptrs: dict[str, list[int]] = {k: [] for k in ("p", "g", "m", "v", "mask")}
            numels: list[int] = []
            for i in idx:
                p, g, m, v, mask = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], masks[i]
                if not p.is_contiguous():
                    raise ValueError(f"params[{i}]: expected a contiguous tensor")
                for name, t in (("params", p), ("grads", g), ("exp_avgs", m), ("exp_avg_sqs", v), ("masks", mask)):
                    if t is not None and t.device != device:
                        raise ValueError(f"{name}[{i}]: expected a tensor on {device}, got {t.device}")
                if g.dtype != p.dtype:
                    raise TypeError(f"grads[{i}]: expected dtype {p.dtype} (params[{i}]), got {g.dtype}")
                if g.numel() != p.numel():
                    raise ValueError(f"grads[{i}]: expected {p.numel()} elements, got {g.numel()}")
                g = g.contiguous()
                state = []
                for name, s in (("exp_avgs", m), ("exp_avg_sqs", v)):
                    if s.numel() != p.numel():
                        raise ValueError(f"{name}[{i}]: expected {p.numel()} elements")
                    if s.dtype != torch.float32 or not s.is_contiguous():
                        # a fresh contiguous fp32 copy (Tensor.to may return a strided self)
                        tmp = torch.empty(s.shape, dtype=torch.float32, device=s.device).copy_(s.detach())
                        copy_back.append((s, tmp))
                        s = tmp
                    state.append(s)
                if mask is not None:
                    if mask.dtype != torch.bool:
                        raise TypeError(f"masks[{i}]: expected a bool tensor, got dtype {mask.dtype}")
                    if mask.numel() != p.numel():
                        raise ValueError(f"masks[{i}]: expected {p.numel()} elements, got {mask.numel()}")
                    mask = mask.contiguous()
                keep += [g] + state + ([mask] if mask is not None else [])
                ptrs["p"].append(p.data_ptr())
                ptrs["g"].append(g.data_ptr())
                ptrs["m"].append(state[0].data_ptr())
                ptrs["v"].append(state[1].data_ptr())
                ptrs["mask"].append(mask.data_ptr() if mask is not None else 0)
                numels.append(p.numel())
            ext.masked_adam(
                ptrs["p"], ptrs["g"], ptrs["m"], ptrs["v"], ptrs["mask"], numels,
                _DTYPE_CODES[dtype], int(step), float(lr), float(beta1), float(beta2), float(eps),
                float(weight_decay), bool(decoupled_weight_decay), scale_ptr, inf_ptr, stream,
                _device_index(device),
            )
        for dst, tmp in copy_back:
            dst.copy_(tmp)


# ------------------------------------------------------------------------------- block-sparse matmuls
def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _tf32(dtype: torch.dtype) -> bool:
    if FP32_MATMUL not in ("3xtf32", "tf32"):
        raise ValueError(f"set_kernels.backends.cuda.FP32_MATMUL: expected '3xtf32' or 'tf32', got {FP32_MATMUL!r}")
    return dtype == torch.float32 and FP32_MATMUL == "tf32"


def _check_block(block_size) -> int:
    b = int(block_size)
    if b not in BLOCK_SIZES:
        raise ValueError(f"block_size: the cuda backend supports {BLOCK_SIZES}, got {block_size}")
    return b


def _check_sizes(rows, cols) -> tuple[int, int]:
    rows, cols = int(rows), int(cols)
    if rows < 1 or cols < 1:
        raise ValueError(f"rows, cols: expected positive sizes, got {rows} x {cols}")
    return rows, cols


def _float_tensor(name: str, t, device=None, dtype=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name}: the cuda backend needs CUDA tensors, got one on {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if dtype is None:
        if t.dtype not in _DTYPE_CODES:
            raise TypeError(f"{name}: the cuda backend supports float32, float16 and bfloat16, got {t.dtype}")
    elif t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    return t


def _dense(name: str, t, width: int, device=None, dtype=None) -> torch.Tensor:
    """A 2-D ``(M, width)`` CUDA tensor whose rows are contiguous (a row stride is allowed)."""
    t = _float_tensor(name, t, device, dtype)
    if t.dim() != 2 or t.shape[1] != width:
        raise ValueError(f"{name}: expected shape (M, {width}), got {tuple(t.shape)}")
    if (width > 1 and t.stride(1) != 1) or (t.shape[0] > 1 and t.stride(0) < width):
        t = t.contiguous()
    return t


def _row_stride(t: torch.Tensor) -> int:
    """Row stride in elements (torch reports arbitrary strides for size-1 dimensions)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _values(values, nnz_or_none, b: int, device, dtype) -> torch.Tensor:
    v = _float_tensor("values", values, device, dtype)
    if v.dim() != 3 or tuple(v.shape[1:]) != (b, b) or (nnz_or_none is not None and v.shape[0] != nnz_or_none):
        want = f"({nnz_or_none if nnz_or_none is not None else 'nnz'}, {b}, {b})"
        raise ValueError(f"values: expected shape {want}, got {tuple(v.shape)}")
    return v.contiguous()


def _index(name: str, t, numel: int, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: expected an int32 index tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if t.dim() != 1 or t.numel() != numel:
        raise ValueError(f"{name}: expected shape ({numel},), got {tuple(t.shape)}")
    return t.contiguous()


def _grid(rows: int, cols: int, b: int, nnz: int, name: str) -> tuple[int, int]:
    """The ``(R, C)`` block grid of a ``rows x cols`` matrix; ``name`` holds ``nnz`` blocks, at most ``R * C``."""
    n_rows, n_cols = -(-rows // b), -(-cols // b)
    if nnz > n_rows * n_cols:
        raise ValueError(f"{name}: {nnz} blocks exceed the {n_rows * n_cols} blocks of a {rows} x {cols} matrix")
    return n_rows, n_cols


def linear_forward(x, values, row_ptr, col_idx, bias, rows: int, cols: int, block_size: int) -> torch.Tensor:
    """Forward ``y (M, rows) = x (M, cols) @ W.T + bias`` with the ``_C.linear_forward`` kernel.

    x: ``(M, cols)``, fp32/fp16/bf16 CUDA tensor; values: ``(nnz, b, b)`` of x's dtype, CSR order;
    row_ptr: int32 ``(R + 1,)``; col_idx: int32 ``(nnz,)``; bias: ``(rows,)`` of x's dtype or None.
    Returns y ``(M, rows)`` of x's dtype (accumulated in fp32, bias added before the one rounding).
    """
    ext = _require()
    b = _check_block(block_size)
    rows, cols = _check_sizes(rows, cols)
    x = _dense("x", x, cols)
    device, dtype = x.device, x.dtype
    v = _values(values, None, b, device, dtype)
    nnz = v.shape[0]
    n_rows, n_cols = _grid(rows, cols, b, nnz, "values")
    row_ptr = _index("row_ptr", row_ptr, n_rows + 1, device)
    col_idx = _index("col_idx", col_idx, nnz, device)
    if bias is not None:
        bias = _float_tensor("bias", bias, device, dtype)
        if tuple(bias.shape) != (rows,):
            raise ValueError(f"bias: expected shape ({rows},), got {tuple(bias.shape)}")
        bias = bias.contiguous()
    M = x.shape[0]
    y = torch.empty(M, rows, dtype=dtype, device=device)
    if M == 0:
        return y
    with torch.cuda.device(device):
        ext.linear_forward(x.data_ptr(), _row_stride(x), v.data_ptr(), row_ptr.data_ptr(), col_idx.data_ptr(),
                     bias.data_ptr() if bias is not None else 0, y.data_ptr(), y.stride(0), M, rows, cols, nnz,
                     b, _DTYPE_CODES[dtype], _tf32(dtype), torch.cuda.current_stream(device).cuda_stream,
                     _device_index(device))
    return y


def linear_grad_input(dy, values, col_ptr, row_idx, perm, rows: int, cols: int, block_size: int) -> torch.Tensor:
    """Input gradient ``dx (M, cols) = dy (M, rows) @ W`` with ``_C.linear_grad_input`` (CSC walk, no atomics).

    dy: ``(M, rows)``; values: ``(nnz, b, b)`` in CSR order; col_ptr: int32 ``(C + 1,)``;
    row_idx, perm: int32 ``(nnz,)`` (CSC order, ``perm`` maps to the values index).
    Returns dx ``(M, cols)`` of dy's dtype.
    """
    ext = _require()
    b = _check_block(block_size)
    rows, cols = _check_sizes(rows, cols)
    dy = _dense("dy", dy, rows)
    device, dtype = dy.device, dy.dtype
    v = _values(values, None, b, device, dtype)
    nnz = v.shape[0]
    n_rows, n_cols = _grid(rows, cols, b, nnz, "values")
    col_ptr = _index("col_ptr", col_ptr, n_cols + 1, device)
    row_idx = _index("row_idx", row_idx, nnz, device)
    perm = _index("perm", perm, nnz, device)
    M = dy.shape[0]
    dx = torch.empty(M, cols, dtype=dtype, device=device)
    if M == 0:
        return dx
    with torch.cuda.device(device):
        ext.linear_grad_input(dy.data_ptr(), _row_stride(dy), v.data_ptr(), col_ptr.data_ptr(), row_idx.data_ptr(),
                     perm.data_ptr(), dx.data_ptr(), dx.stride(0), M, rows, cols, nnz, b, _DTYPE_CODES[dtype],
                     _tf32(dtype), torch.cuda.current_stream(device).cuda_stream, _device_index(device))
    return dx


def linear_grad_weight(dy, x, block_row, col_idx, rows: int, cols: int, block_size: int, *, splits=None) -> torch.Tensor:
    """Weight gradient on the live blocks with ``_C.linear_grad_weight``: ``dv (nnz, b, b)``,
    ``dv[k] = dy[:, rows of k].T @ x[:, cols of k]``; exact zeros past the matrix edge.

    dy: ``(M, rows)``, x: ``(M, cols)`` of one dtype; block_row, col_idx: int32 ``(nnz,)``.
    The tokens are split deterministically (``_C.linear_grad_weight_splits``, a function of the shape) and
    the fp32 partials summed in a fixed order; ``splits`` overrides the split count (tests).
    """
    ext = _require()
    b = _check_block(block_size)
    rows, cols = _check_sizes(rows, cols)
    dy = _dense("dy", dy, rows)
    device, dtype = dy.device, dy.dtype
    x = _dense("x", x, cols, device, dtype)
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"x: expected {dy.shape[0]} rows (the tokens of dy), got {x.shape[0]}")
    if not isinstance(block_row, torch.Tensor):
        raise TypeError(f"block_row: expected a torch.Tensor, got {type(block_row).__name__}")
    nnz = block_row.numel()
    _grid(rows, cols, b, nnz, "block_row")
    block_row = _index("block_row", block_row, nnz, device)
    col_idx = _index("col_idx", col_idx, nnz, device)
    M = dy.shape[0]
    out = torch.empty(nnz, b, b, dtype=dtype, device=device)
    if nnz == 0:
        return out
    if splits is None:
        splits = ext.linear_grad_weight_splits(M, nnz, b)
    splits = int(splits)
    with torch.cuda.device(device):
        ws_numel = ext.linear_grad_weight_workspace_numel(splits, nnz, b) if M > 0 else 0
        ws = torch.empty(ws_numel, dtype=torch.float32, device=device) if ws_numel else None
        ext.linear_grad_weight(dy.data_ptr(), _row_stride(dy), x.data_ptr(), _row_stride(x), block_row.data_ptr(),
                     col_idx.data_ptr(), out.data_ptr(), ws.data_ptr() if ws is not None else 0, ws_numel, M,
                     rows, cols, nnz, b, _DTYPE_CODES[dtype], splits, _tf32(dtype),
                     torch.cuda.current_stream(device).cuda_stream, _device_index(device))
    return out
