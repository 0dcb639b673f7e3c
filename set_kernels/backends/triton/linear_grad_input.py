"""Triton input-gradient kernel: ``dx (M, cols) = dy (M, rows) @ W`` through the transposed index.

Each program owns a ``BLOCK_M x b`` tile of dx: ``BLOCK_M`` tokens times input block column
``c``. It walks the live blocks of block column ``c`` through the CSC index (``col_ptr``,
``row_idx``, ``perm`` into the CSR-ordered values) and accumulates ``dy[tile, rows of block] @
values[perm[q]]`` in fp32. Each output element has exactly one writer, so there are no atomics
and the result is deterministic (the reduction order is the CSC order).

Edges: the output features of an edge block beyond ``rows`` are loaded as 0 from both dy and
the block; input features beyond ``cols`` and tokens beyond ``M`` are never stored.

Grid order: as the forward kernel (groups of ``GROUP_M`` token tiles per block column).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

CONFIGS = _common.TOKEN_TILE_CONFIGS
_prune = _common.prune_token_tiles("dy_ptr")


@_common.autotune(CONFIGS, _common.TOKEN_TILE_INTERPRETER_CONFIG, key=["B", "M_BUCKET", "rows", "cols"],
                  prune=_prune)
@triton.jit
def _grad_input_kernel(dy_ptr, v_ptr, col_ptr, row_idx, perm, dx_ptr, M, rows, cols, n_in_blocks, M_BUCKET,
                       B: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, c = _common.grouped_tile(tl.program_id(0), M, n_in_blocks, BLOCK_M, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, B)
    m_ok = offs_m < M
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * rows

    q0 = tl.load(col_ptr + c)
    q1 = tl.load(col_ptr + c + 1)
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    # Indices loaded one iteration ahead, so that the loop pipelines (see linear_forward).
    r = tl.load(row_idx + q0, mask=q0 < q1, other=0)
    k = tl.load(perm + q0, mask=q0 < q1, other=0)
    for q in range(q0, q1):
        r_next = tl.load(row_idx + q + 1, mask=q + 1 < q1, other=0)
        k_next = tl.load(perm + q + 1, mask=q + 1 < q1, other=0)
        i = r * B + offs_b  # output features (rows of W) of this block
        i_ok = i < rows
        g = tl.load(dy_rows + i[None, :], mask=m_ok[:, None] & i_ok[None, :], other=0.0)
        # values[k, i, j] = W[r*B + i, c*B + j]; rows past the edge read as 0.
        w = tl.load(v_ptr + k.to(tl.int64) * (B * B) + offs_b[:, None] * B + offs_b[None, :],
                    mask=i_ok[:, None], other=0.0)
        if INTERPRETED:  # the interpreter's bf16 dot is wrong; fp32 operands are exact
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
        r = r_next
        k = k_next

    j = c * B + offs_b
    j_ok = j < cols
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * cols + j[None, :]
    tl.store(dx_ptrs, _common.cast_out(acc, dx_ptr.dtype.element_ty, INTERPRETED), mask=m_ok[:, None] & j_ok[None, :])


def linear_grad_input(dy, values, col_ptr, row_idx, perm, rows: int, cols: int, block_size: int) -> torch.Tensor:
    """Input gradient ``dx (M, cols) = dy (M, rows) @ W``.

    ``dy`` ``(M, rows)`` fp32/fp16/bf16 contiguous; ``values`` ``(nnz, b, b)`` same dtype, CSR
    order; ``col_ptr`` ``(C + 1,)``, ``row_idx`` and ``perm`` ``(nnz,)`` int32 (the CSC index).
    Returns ``dx`` ``(M, cols)`` of dy's dtype, accumulated in fp32, deterministic.
    """
    b = int(block_size)
    rows, cols = int(rows), int(cols)
    _common.check_operands(dy=dy, values=values)
    M = dy.shape[0]
    dx = torch.empty(M, cols, dtype=dy.dtype, device=dy.device)
    if M == 0 or cols == 0:
        return dx
    n_in = col_ptr.numel() - 1
    with _common.on_device(dy.device):
        _grad_input_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * n_in,)](
            dy, values, col_ptr, row_idx, perm, dx, M, rows, cols, n_in, _common.bucket(M),
            B=b, INTERPRETED=_common.INTERPRET, PRECISION=_common.dot_precision(dy.dtype),
        )
    return dx
