"""Triton backend: block-sparse matmuls (forward, dX, dW) and the fused masked Adam/AdamW.

One file per op, each holding its kernels, launcher and autotune configs:
:mod:`.linear_forward` (forward, fused bias), :mod:`.linear_grad_input` (input gradient through the transposed
index, no atomics), :mod:`.linear_grad_weight` (weight gradient on live blocks, deterministic split-K) and
:mod:`.masked_adam` (multi-tensor, one launch per dtype group, AMP-aware with no host sync).
Element sparsity (``block_size == 1``, plain CSR) has its own kernels in :mod:`.spmm` (SpMM for
the forward and dX over transposed activations, SDDMM for dW); the op functions of this package
route ``block_size == 1`` there and every other block size to the block kernels. Shared flags and
helpers live in :mod:`._common`. The public ops validated the arguments; the functions here only
check what the kernels rely on (device type, contiguity).

Devices: compiled kernels run CUDA tensors. With ``TRITON_INTERPRET=1`` set before triton is
imported (the test suite does this when there is no GPU), the kernels are interpreted instead
and run CPU tensors only; that is slow and meant for testing, so ``"auto"`` never picks this
backend for CPU tensors.

Dtypes: fp32, fp16 and bf16, accumulated in fp32. fp32 products follow torch's fp32 matmul
precision (``torch.get_float32_matmul_precision()``: ``"highest"``, the default, gives exact fp32
products, ``input_precision="ieee"``; ``"high"`` / ``"medium"`` or ``allow_tf32 = True`` give
TF32), unless ``$SET_KERNELS_FP32_PRECISION`` or :func:`set_kernels.backends.set_fp32_precision`
(``"ieee"``, ``"tf32"``, ``"3xtf32"`` = ``"tf32x3"`` here) say otherwise; see
:mod:`set_kernels.backends._precision`. At b = 1 the products are plain fp32 FMAs, with no TF32
involved. Block sizes 1 (element sparsity), 16, 32, 64, 128.
"""
from __future__ import annotations

import torch

NAME = "triton"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_SIZES = (1, 16, 32, 64, 128)

try:
    from . import _common
except ImportError as exc:  # triton is not installed (or broken)
    _common = None
    _import_error = ("triton is not installed (pip install triton)" if getattr(exc, "name", None) == "triton"
                     else f"triton cannot be imported: {exc}")
except Exception as exc:  # a broken install
    _common = None
    _import_error = f"triton cannot be imported: {type(exc).__name__}: {exc}"
else:
    _import_error = ""

INTERPRET = bool(_common is not None and _common.INTERPRET)
# Devices whose tensors this backend runs (read by the dispatcher).
DEVICES = ("cpu",) if INTERPRET else ("cuda",)

if _common is not None:
    from . import spmm as _spmm
    from .linear_forward import linear_forward as _block_forward
    from .linear_grad_input import linear_grad_input as _block_grad_input
    from .linear_grad_weight import linear_grad_weight as _block_grad_weight
    from .masked_adam import masked_adam_

    def allow_tf32() -> bool:
        """Whether fp32 matmuls run in (one-pass) TF32 now (read-only; the setting is
        :func:`set_kernels.backends.set_fp32_precision` / ``$SET_KERNELS_FP32_PRECISION`` / torch's)."""
        return _common.dot_precision(torch.float32) == "tf32"

    def linear_forward(x, values, row_ptr, col_idx, bias, rows: int, cols: int, block_size: int) -> torch.Tensor:
        """Forward ``y (M, rows) = x (M, cols) @ W.T + bias`` (b = 1: :func:`.spmm.spmm_forward`)."""
        if int(block_size) == 1:
            return _spmm.spmm_forward(x, values, row_ptr, col_idx, bias, rows, cols)
        return _block_forward(x, values, row_ptr, col_idx, bias, rows, cols, block_size)

    def linear_grad_input(dy, values, col_ptr, row_idx, perm, rows: int, cols: int, block_size: int) -> torch.Tensor:
        """Input gradient ``dx (M, cols) = dy (M, rows) @ W`` (b = 1: :func:`.spmm.spmm_grad_input`)."""
        if int(block_size) == 1:
            return _spmm.spmm_grad_input(dy, values, col_ptr, row_idx, perm, rows, cols)
        return _block_grad_input(dy, values, col_ptr, row_idx, perm, rows, cols, block_size)

    def linear_grad_weight(dy, x, block_row, col_idx, rows: int, cols: int, block_size: int, **kwargs) -> torch.Tensor:
        """Weight gradient ``dv (nnz, b, b)`` on live blocks (b = 1: :func:`.spmm.spmm_grad_weight`).

        ``kwargs`` (``splits``) go to the block kernel's split-K; b = 1 takes none.
        """
        if int(block_size) == 1:
            if kwargs:
                raise TypeError(f"block_size 1 takes no options, got {sorted(kwargs)}")
            return _spmm.spmm_grad_weight(dy, x, block_row, col_idx, rows, cols)
        return _block_grad_weight(dy, x, block_row, col_idx, rows, cols, block_size, **kwargs)


def availability() -> tuple[bool, str]:
    """``(True, "")`` when triton can run kernels here, else ``(False, reason)``. Never raises."""
    if _common is None:
        return False, _import_error
    if INTERPRET:
        return True, ""
    try:
        if not torch.cuda.is_available():
            return False, ("no CUDA device (torch.cuda.is_available() is False); to run the kernels on CPU "
                           "tensors in triton's interpreter (slow, for tests), set TRITON_INTERPRET=1 "
                           "before triton is imported")
    except Exception as exc:
        return False, f"CUDA check failed: {type(exc).__name__}: {exc}"
    return True, ""
