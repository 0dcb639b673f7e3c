"""Functional ops: thin, checked wrappers over the ``torch.ops.set_kernels`` custom ops.

Each wrapper validates its arguments before any work (``TypeError`` for types and dtypes,
``ValueError`` for shapes, values and devices), resolves the backend (see
:mod:`set_kernels.backends`) and calls the custom op. A plain eager call (no torch.compile or
export tracing, no fake tensors or dispatch modes) of ``block_sparse_linear`` runs the same kernels
and autograd formulas through :class:`~set_kernels.ops._library.EagerLinear` instead, which skips
the custom-op dispatch (tens of microseconds a call, a large share of a small layer's time).
"""
from __future__ import annotations

import torch

from .. import backends
from .._checks import check_same_device, check_tensor
from ..layout import BlockSparseLayout
from . import _library

__all__ = ["block_sparse_linear", "to_dense", "from_dense", "masked_adam_"]


def _check_layout(layout) -> BlockSparseLayout:
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout: expected a BlockSparseLayout, got {type(layout).__name__}")
    # O(1): the packed index must fit the layout's grid (the ops check its contents once, and an
    # index already checked for this grid fits it: a dict lookup instead).
    nnz = None if torch.compiler.is_compiling() else _library.checked_nnz(layout.index, *layout.shape,
                                                                           layout.block_size)
    if nnz is None:
        nnz = _library.check_index_structure(layout.index, *layout.shape, layout.block_size)
    if nnz != layout.nnz_blocks:
        raise ValueError(f"layout: its index holds {nnz} blocks but nnz_blocks is {layout.nnz_blocks}")
    return layout


def _autocast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t


def _autocast_dtype(device: torch.device):
    """The autocast dtype when autocast is on for ``device`` (a matmul is cast to it), else None."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _check_values(values, layout: BlockSparseLayout) -> torch.Tensor:
    check_tensor("values", values, floating=True)
    b = layout.block_size
    expected = (layout.nnz_blocks, b, b)
    if tuple(values.shape) != expected:
        raise ValueError(f"values: expected shape {expected} (nnz_blocks, block_size, block_size), "
                         f"got {tuple(values.shape)}")
    return values


def block_sparse_linear(x, values, layout, bias=None, *, backend=None) -> torch.Tensor:
    """``y = x @ to_dense(values, layout).T + bias``, touching only live blocks.

    Args:
        x: ``(..., cols)`` floating tensor, any number of leading dims.
        values: ``(nnz_blocks, b, b)``, same dtype and device as ``x``, in the layout's CSR order.
        layout: :class:`BlockSparseLayout` of shape ``(rows, cols)`` on the same device.
        bias: ``(rows,)`` or None.
        backend: None/"auto" (a :func:`set_kernels.backends.use` block, else
            ``$SET_KERNELS_BACKEND``, else the device's auto order), "triton", "cuda", "numba" or
            "torch". In eager calls it decides the forward and its backward; under
            ``torch.compile``/``torch.export`` it is checked but not recorded (the graph's ops
            choose when they run; a warning says so when that differs).

    Returns:
        ``(..., rows)`` tensor. Gradients flow to ``x``, ``values`` and ``bias``.

    Under ``torch.autocast`` (a float16 or bfloat16 autocast dtype) the op runs in that dtype,
    like ``F.linear``: ``x``, ``values`` and ``bias`` are cast, the result has the autocast dtype,
    and gradients come back in the inputs' own dtypes. The backend must support that dtype.

    Raises:
        TypeError: a non-tensor or non-floating argument, mismatched dtypes, or a non-layout.
        ValueError: a shape mismatch, tensors on different devices, or an unknown backend name.
        RuntimeError: the requested backend is not available for this device and dtype.
    """
    layout = _check_layout(layout)
    check_tensor("x", x, floating=True)
    _check_values(values, layout)
    rows, cols = layout.shape
    if x.dim() == 0 or x.shape[-1] != cols:
        raise ValueError(f"x: expected last dimension {cols} (the layout's cols), got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (rows,):
            raise ValueError(f"bias: expected shape ({rows},), got {tuple(bias.shape)}")
    device = x.device
    if values.device != device or layout.index.device != device or (bias is not None and bias.device != device):
        check_same_device(x=x, values=values, bias=bias, layout=layout.index)  # raises, naming the tensor
    cast = _autocast_dtype(device)
    if cast is not None:
        # Autocast, like F.linear: fp16/bf16/fp32 operands are cast to the autocast dtype (fp64
        # ones are left alone), the kernels accumulate in fp32, and gradients flow back through
        # the casts in each input's own dtype.
        x, values = _autocast(x, cast), _autocast(values, cast)
        bias = None if bias is None else _autocast(bias, cast)
    if values.dtype != x.dtype:
        raise TypeError(f"values: expected dtype {x.dtype} (the dtype of x), got {values.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias: expected dtype {x.dtype} (the dtype of x), got {bias.dtype}")
    name = _library.resolve(backend, "linear_forward", device, x.dtype, layout.block_size)
    flat = x.dim() == 2
    x2 = x.contiguous() if flat else x.reshape(-1, cols).contiguous()
    values = values.contiguous()
    args = (x2, values, layout.index, bias, rows, cols, layout.block_size)
    if _library.plain_eager(x2, values, bias):
        y = _library.EagerLinear.apply(*args, name)
    elif backend is None or backend == "auto" or torch.compiler.is_compiling():
        # A traced graph records no backend: its ops choose when they run (see backends.use).
        y = _library.linear_forward(*args)
    else:
        with backends.use(backend):
            y = _library.linear_forward(*args)
    return y if flat else y.reshape(*x.shape[:-1], rows)


def to_dense(values, layout) -> torch.Tensor:
    """``W (rows, cols)`` from ``values (nnz_blocks, b, b)``; zeros outside live blocks."""
    layout = _check_layout(layout)
    _check_values(values, layout)
    check_same_device(values=values, layout=layout.index)
    return _library.to_dense(values.contiguous(), layout.index, *layout.shape, layout.block_size)


def from_dense(weight, layout) -> torch.Tensor:
    """``values (nnz_blocks, b, b)``: the live blocks of ``weight (rows, cols)``.

    Parts of edge blocks that lie beyond ``rows`` / ``cols`` are zero.
    """
    layout = _check_layout(layout)
    check_tensor("weight", weight, floating=True)
    if tuple(weight.shape) != layout.shape:
        raise ValueError(f"weight: expected shape {layout.shape} (the layout's shape), got {tuple(weight.shape)}")
    check_same_device(weight=weight, layout=layout.index)
    return _library.from_dense(weight.contiguous(), layout.index, *layout.shape, layout.block_size)


from ._adam import masked_adam_  # noqa: E402  (the fused optimizer op, checked there)
