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

CONFIGS = [
    triton.Config({"BLOCK_M": bm, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, w, s in [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 2), (128, 8, 3), (128, 8, 4),
                      (256, 8, 3)]
]
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # the autotuner passes positional args and keyword args apart
    b = args["B"]
    item = args["dy_ptr"].element_size()
    kept = []
    for cfg in configs:
        bm = cfg.kwargs["BLOCK_M"]
        if bm * b > 128 * 128:
            continue
        if _common.smem_bytes(bm * b + b * b, item, cfg.num_stages) > _common.SMEM_BUDGET:
            continue
        kept.append(cfg)
    # none fits: the smallest (the autotuner needs one)
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.num_stages))]


@_common.autotune(CONFIGS, INTERPRETER_CONFIG, key=["B", "M_BUCKET", "rows", "cols"], prune=_prune)
@triton.jit
def _dds_kernel(dy_ptr, v_ptr, col_ptr, row_idx, perm, dx_ptr, M, rows, cols, n_in_blocks, M_BUCKET,
                B: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_M * n_in_blocks
    first_m = (pid // width) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    c = (pid % width) // group_m

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
    _common.check_device(dy, "dy")
    _common.check_operand(dy, "dy", dy.dtype)
    _common.check_operand(values, "values", dy.dtype)
    for t, name in ((col_ptr, "col_ptr"), (row_idx, "row_idx"), (perm, "perm")):
        _common.check_index(t, name)
    M = dy.shape[0]
    dx = torch.empty(M, cols, dtype=dy.dtype, device=dy.device)
    if M == 0 or cols == 0:
        return dx
    n_in = col_ptr.numel() - 1
    with _common.on_device(dy.device):
        _dds_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * n_in,)](
            dy, values, col_ptr, row_idx, perm, dx, M, rows, cols, n_in, _common.bucket(M),
            B=b, INTERPRETED=_common.INTERPRET, PRECISION=_common.dot_precision(dy.dtype),
        )
    return dx
