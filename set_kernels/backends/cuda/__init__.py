"""The ``cuda`` backend: hand-written CUDA kernels in the compiled module ``set_kernels._C``.

``_C`` is plain pybind11 (no libtorch): tensors are passed as data pointers, element counts, a
dtype code and the current CUDA stream. Importing this module never fails; when ``_C`` was not
built or there is no usable GPU, :func:`availability` says why and the ops raise RuntimeError.

Ops (``SUPPORTED_OPS``): the three block-sparse matmuls ``linear_forward`` (forward, bias fused),
``linear_grad_input`` (dX through the transposed index, no atomics) and ``linear_grad_weight`` (dW on the live
blocks, deterministic split-K), on the tensor cores (wmma) with fp32 accumulation, and the fused
masked Adam/AdamW ``masked_adam_``. fp32, fp16 and bf16; block sizes 16, 32, 64 and 128.

fp32 matmuls run on the tensor cores in one of two modes: a 3xTF32 split (``a*b ~ a_hi*b_hi +
a_hi*b_lo + a_lo*b_hi``, products accurate to ~2^-21 relative, close to fp32; this backend's exact
mode, it has no IEEE fp32 path) or a single TF32 pass (10-bit mantissa inputs, ~1e-3 relative
error, fewer tensor-core operations). The mode follows torch's fp32 matmul precision, read at
every call: ``torch.get_float32_matmul_precision() == "highest"`` (the default) gives 3xTF32,
``"high"`` / ``"medium"`` (or ``torch.backends.cuda.matmul.allow_tf32 = True``) one TF32 pass;
``$SET_KERNELS_FP32_PRECISION`` or :func:`set_kernels.backends.set_fp32_precision` override it
(``"ieee"`` and ``"3xtf32"`` give 3xTF32 here, ``"tf32"`` one pass). See
:mod:`set_kernels.backends._precision`.

The public ops validated the tensors (device, dtype, shape, the layout index); the functions
here only check what the kernels rely on (CUDA tensors, contiguous operands) and ``_C`` checks
its raw arguments (sizes, strides, pointers) before any CUDA call. Kernels run on
``torch.cuda.current_stream()`` of the tensors' device, which is also made current for the call.
"""
from __future__ import annotations

import importlib

import torch

from .. import _precision

NAME = "cuda"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_OPS = ("linear_forward", "linear_grad_input", "linear_grad_weight", "masked_adam_")
BLOCK_SIZES = (16, 32, 64, 128)

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


def _scalar_ptr(t: torch.Tensor | None, keep: list) -> int:
    """Data pointer of an fp32 device copy of a 1-element tensor (0 for None); no host sync."""
    if t is None:
        return 0
    t = t.detach().reshape(1).to(dtype=torch.float32).contiguous()
    keep.append(t)
    return t.data_ptr()


def _fp32_state(s: torch.Tensor, keep: list, copy_back: list) -> torch.Tensor:
    """A moment as the kernel reads it (contiguous fp32): itself, or a copy written back after."""
    if s.dtype != torch.float32 or not s.is_contiguous():
        tmp = torch.empty(s.shape, dtype=torch.float32, device=s.device).copy_(s.detach())
        copy_back.append((s, tmp))
        s = tmp
    keep.append(s)
    return s


def masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, *, step, lr, beta1, beta2, eps,
                 weight_decay, decoupled_weight_decay, grad_scale=None, found_inf=None) -> None:
    """Fused masked Adam/AdamW step, in place, with the ``_C.masked_adam_`` CUDA kernel.

    The tensors were validated by ``set_kernels.ops.masked_adam_`` (same CUDA device, matching
    shapes and dtypes, contiguous params, grads and masks). Params/grads may be fp32/fp16/bf16;
    the kernel keeps the moments in fp32 (moments stored in the param dtype are updated through
    fp32 copies). Launches on the current stream; no host synchronisation.
    """
    ext = _require()
    if not params:
        return
    device = params[0].device
    if masks is None:
        masks = [None] * len(params)
    with torch.cuda.device(device):
        keep: list[torch.Tensor] = []  # temporaries that must outlive the launches
        copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        scale_ptr, inf_ptr = _scalar_ptr(grad_scale, keep), _scalar_ptr(found_inf, keep)
        stream = torch.cuda.current_stream(device).cuda_stream
        groups: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.dtype, []).append(i)
        for dtype, idx in groups.items():
            tables = [[_ptr(params[i]) for i in idx], [_ptr(grads[i]) for i in idx],
                      [_ptr(_fp32_state(exp_avgs[i], keep, copy_back)) for i in idx],
                      [_ptr(_fp32_state(exp_avg_sqs[i], keep, copy_back)) for i in idx],
                      [_ptr(masks[i]) for i in idx]]
            ext.masked_adam_(*tables, [params[i].numel() for i in idx], _DTYPE_CODES[dtype], int(step), float(lr),
                             float(beta1), float(beta2), float(eps), float(weight_decay),
                             bool(decoupled_weight_decay), scale_ptr, inf_ptr, stream, _device_index(device))
        for dst, tmp in copy_back:
            dst.copy_(tmp)


# ------------------------------------------------------------------------------- block-sparse matmuls
def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def allow_tf32() -> bool:
    """Whether fp32 matmuls run in one TF32 pass now (read-only; see the module docstring)."""
    return _precision.backend_precision("cuda") == "tf32"


def _ptr(t: torch.Tensor | None) -> int:
    """Data pointer of a tensor a kernel reads or writes flat (0 for None). What the kernels rely on
    is checked here, for every such pointer: a CUDA tensor, contiguous (the public ops passed
    contiguous tensors and checked everything else)."""
    if t is None:
        return 0
    _check_cuda(t)
    if not t.is_contiguous():
        raise ValueError(f"the cuda backend needs a contiguous tensor here, got shape {tuple(t.shape)} "
                         f"and strides {t.stride()}")
    return t.data_ptr()


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A dense ``(M, width)`` operand as the kernels read it, and its row stride: rows of unit
    stride, a row stride of at least the width (a column slice of a wider tensor is read in
    place); any other layout is copied to a contiguous tensor first."""
    _check_cuda(t)
    if (t.shape[1] > 1 and t.stride(1) != 1) or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else t.shape[1])  # torch reports any stride for size-1 dims


def _check_cuda(t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors, got one on {t.device}")


def _mode(dtype: torch.dtype) -> tuple[int, bool]:
    """``(dtype code, tf32 flag)`` of a matmul on ``dtype``: one TF32 pass or 3xTF32 for fp32."""
    return _DTYPE_CODES[dtype], _precision.backend_precision("cuda", dtype) == "tf32"


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _linear(op: str, a, values, index, rows: int, cols: int, block_size: int, out_width: int) -> torch.Tensor:
    """``linear_forward`` / ``linear_grad_input``, which share their ``_C`` signature: ``a`` the dense
    operand, ``index`` its three index pointers (row_ptr, col_idx, bias / col_ptr, row_idx, perm)."""
    ext = _require()
    (a, lda), M, device = _rows(a), a.shape[0], a.device
    out = torch.empty(M, out_width, dtype=a.dtype, device=device)
    if M == 0:
        return out
    with torch.cuda.device(device):
        getattr(ext, op)(a.data_ptr(), lda, _ptr(values), *map(_ptr, index), _ptr(out), out_width, M, int(rows),
                         int(cols), values.shape[0], int(block_size), *_mode(a.dtype), _stream(device),
                         _device_index(device))
    return out


def linear_forward(x, values, row_ptr, col_idx, bias, rows: int, cols: int, block_size: int) -> torch.Tensor:
    """Forward ``y (M, rows) = x (M, cols) @ W.T + bias`` with the ``_C.linear_forward`` kernel.

    x: ``(M, cols)``, fp32/fp16/bf16 CUDA tensor; values: ``(nnz, b, b)`` of x's dtype, CSR order;
    row_ptr: int32 ``(R + 1,)``; col_idx: int32 ``(nnz,)``; bias: ``(rows,)`` of x's dtype or None.
    Returns y ``(M, rows)`` of x's dtype (accumulated in fp32, bias added before the one rounding).
    """
    return _linear("linear_forward", x, values, (row_ptr, col_idx, bias), rows, cols, block_size, int(rows))


def linear_grad_input(dy, values, col_ptr, row_idx, perm, rows: int, cols: int, block_size: int) -> torch.Tensor:
    """Input gradient ``dx (M, cols) = dy (M, rows) @ W`` with ``_C.linear_grad_input`` (CSC walk, no atomics).

    dy: ``(M, rows)``; values: ``(nnz, b, b)`` in CSR order; col_ptr: int32 ``(C + 1,)``;
    row_idx, perm: int32 ``(nnz,)`` (CSC order, ``perm`` maps to the values index).
    Returns dx ``(M, cols)`` of dy's dtype.
    """
    return _linear("linear_grad_input", dy, values, (col_ptr, row_idx, perm), rows, cols, block_size, int(cols))


def linear_grad_weight(dy, x, block_row, col_idx, rows: int, cols: int, block_size: int, *, splits=None) -> torch.Tensor:
    """Weight gradient on the live blocks with ``_C.linear_grad_weight``: ``dv (nnz, b, b)``,
    ``dv[k] = dy[:, rows of k].T @ x[:, cols of k]``; exact zeros past the matrix edge.

    dy: ``(M, rows)``, x: ``(M, cols)`` of one dtype; block_row, col_idx: int32 ``(nnz,)``.
    The tokens are split deterministically (``_C.linear_grad_weight_splits``, a function of the shape) and
    the fp32 partials summed in a fixed order; ``splits`` overrides the split count (tests).
    """
    ext = _require()
    (dy, lddy), (x, ldx) = _rows(dy), _rows(x)
    b, M, nnz, device = int(block_size), dy.shape[0], block_row.numel(), dy.device
    out = torch.empty(nnz, b, b, dtype=dy.dtype, device=device)
    if nnz == 0:
        return out
    splits = int(splits) if splits is not None else ext.linear_grad_weight_splits(M, nnz, b)
    code, tf32 = _mode(dy.dtype)
    with torch.cuda.device(device):
        ws_numel = ext.linear_grad_weight_workspace_numel(splits, nnz, b) if M > 0 else 0
        ws = torch.empty(ws_numel, dtype=torch.float32, device=device) if ws_numel else None
        ext.linear_grad_weight(dy.data_ptr(), lddy, x.data_ptr(), ldx, _ptr(block_row), _ptr(col_idx), _ptr(out),
                               _ptr(ws), ws_numel, M, int(rows), int(cols), nnz, b, code, splits, tf32,
                               _stream(device), _device_index(device))
    return out
