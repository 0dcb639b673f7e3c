"""Triton forward kernel: ``y (M, rows) = x (M, cols) @ W.T + bias`` with W block-sparse (CSR).

Each program owns a ``BLOCK_M x b`` output tile: ``BLOCK_M`` tokens times one output block
(block row ``r`` of W). It walks the live blocks of that block row through ``row_ptr`` /
``col_idx`` and accumulates ``x[tile, cols of block] @ values[e].T`` in fp32 with ``tl.dot``,
then adds the bias and stores once. Every output element is written (a block row with no live
block gives the bias, or 0).

Edges: the input features of an edge block beyond ``cols`` are loaded as 0 from both x and the
block (so whatever the block holds there is ignored); output features beyond ``rows`` and tokens
beyond ``M`` are never stored.

Grid order: a 1-D grid swizzled in groups of ``GROUP_M`` token tiles (:func:`._common.grouped_tile`):
consecutive programs walk ``GROUP_M`` token tiles for one output block row, then the next block
row, so a wave of resident programs re-reads the same few x tiles and block rows of W from L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

CONFIGS = _common.TOKEN_TILE_CONFIGS
_prune = _common.prune_token_tiles("x_ptr")


@_common.autotune(CONFIGS, _common.TOKEN_TILE_INTERPRETER_CONFIG, key=["B", "M_BUCKET", "rows", "cols", "HAS_BIAS"],
                  prune=_prune)
@triton.jit
def _forward_kernel(x_ptr, v_ptr, row_ptr, col_idx, bias_ptr, y_ptr, M, rows, cols, n_out_blocks, M_BUCKET,
                    B: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, r = _common.grouped_tile(tl.program_id(0), M, n_out_blocks, BLOCK_M, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, B)
    m_ok = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * cols

    e0 = tl.load(row_ptr + r)
    e1 = tl.load(row_ptr + r + 1)
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    # The block column is loaded one iteration ahead: a tile address that depends on a load made
    # in the same iteration keeps triton's pipeliner from multi-buffering the loop (seen in the
    # compiled shared-memory size), so the index load is carried over instead.
    c = tl.load(col_idx + e0, mask=e0 < e1, other=0)
    for e in range(e0, e1):
        c_next = tl.load(col_idx + e + 1, mask=e + 1 < e1, other=0)
        j = c * B + offs_b  # input features of this block
        j_ok = j < cols
        xt = tl.load(x_rows + j[None, :], mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        # values[e, i, j] = W[r*B + i, c*B + j]; features past the edge read as 0.
        w = tl.load(v_ptr + tl.cast(e, tl.int64) * (B * B) + offs_b[:, None] * B + offs_b[None, :],
                    mask=j_ok[None, :], other=0.0)
        if INTERPRETED:  # the interpreter's bf16 dot is wrong; fp32 operands are exact
            xt = xt.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(xt, tl.trans(w), acc, input_precision=PRECISION)
        c = c_next

    i = r * B + offs_b
    i_ok = i < rows
    if HAS_BIAS:
        acc += tl.load(bias_ptr + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * rows + i[None, :]
    tl.store(y_ptrs, _common.cast_out(acc, y_ptr.dtype.element_ty, INTERPRETED), mask=m_ok[:, None] & i_ok[None, :])


def linear_forward(x, values, row_ptr, col_idx, bias, rows: int, cols: int, block_size: int) -> torch.Tensor:
    """Forward ``y (M, rows) = x (M, cols) @ W.T + bias``.

    ``x`` ``(M, cols)`` fp32/fp16/bf16 contiguous; ``values`` ``(nnz, b, b)`` same dtype, CSR
    order; ``row_ptr`` ``(R + 1,)`` and ``col_idx`` ``(nnz,)`` int32; ``bias`` ``(rows,)`` or None
    (checked by the public op). Returns ``y`` ``(M, rows)`` of x's dtype, accumulated in fp32;
    fp32 products in the precision of :func:`._common.dot_precision`.
    """
    b = int(block_size)
    rows, cols = int(rows), int(cols)
    _common.check_operands(x=x, values=values, bias=bias)
    M = x.shape[0]
    y = torch.empty(M, rows, dtype=x.dtype, device=x.device)
    if M == 0 or rows == 0:
        return y
    n_out = row_ptr.numel() - 1
    with _common.on_device(x.device):
        _forward_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * n_out,)](
            x, values, row_ptr, col_idx, bias if bias is not None else y, y, M, rows, cols, n_out, _common.bucket(M),
            B=b, HAS_BIAS=bias is not None, INTERPRETED=_common.INTERPRET, PRECISION=_common.dot_precision(x.dtype),
        )
    return y
