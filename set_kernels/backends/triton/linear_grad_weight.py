"""Triton weight-gradient kernel on the live blocks: ``dv[k] = dy[:, rows of k].T @ x[:, cols of k]``.

One program per live block (axis 0, CSR order, so neighbouring programs share a block row of dy
in L2) reduces over tokens in ``BLOCK_K`` chunks with ``tl.dot`` into an fp32 ``b x b``
accumulator. Entries of an edge block beyond ``rows`` / ``cols`` are written as exact zeros.

**Split-K.** With few live blocks and many tokens there are too few programs to fill the GPU.
Then the tokens are cut into ``splits`` contiguous ranges (grid axis 1); each (block, split)
program writes its fp32 partial sum to a workspace ``(splits, nnz, b, b)`` and a second kernel
adds the partials of each block in split order and casts. No atomics: the result is
bit-for-bit reproducible, run to run. Rule (:func:`choose_splits`): split only when
``nnz < sms`` and ``M >= 2 * SPLIT_MIN_TOKENS``; then use enough splits for about two programs
per SM, each reducing at least ``SPLIT_MIN_TOKENS`` tokens, at most ``MAX_SPLITS``.

The split count changes the order of the sum, hence the bits of the result. So :func:`linear_grad_weight`
applies the rule with a fixed ``sms = SPLIT_SMS`` (132, an H100/H200), not the device's own
count: the split depends on the shape only, as in the cuda backend, and the same shape splits
the same way on every GPU (an A100 with 108 SMs just gets a few more programs than it has
slots). Bits can still differ between GPU models for other reasons (see docs/how-it-works.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

# Split-K rule parameters (see the module docstring); module attributes so tests can lower them.
SPLIT_MIN_TOKENS = 1024
MAX_SPLITS = 64
SPLIT_SMS = 132  # the SM count the split rule assumes on every GPU (shape-only splits)

CONFIGS = [
    triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bk, w, s in [(32, 4, 3), (32, 8, 2), (32, 8, 3), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 3),
                      (128, 8, 4)]
]
INTERPRETER_CONFIG = triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=1)


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # the autotuner passes positional args and keyword args apart
    b = args["B"]
    item = args["dy_ptr"].element_size()
    kept = [cfg for cfg in configs
            if _common.smem_bytes(2 * cfg.kwargs["BLOCK_K"] * b, item, cfg.num_stages) <= _common.SMEM_BUDGET
            and not (b >= 128 and cfg.num_warps < 8)]  # a 128 x 128 fp32 accumulator wants 8 warps
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_K"], c.num_stages, -c.num_warps))]


@_common.autotune(CONFIGS, INTERPRETER_CONFIG, key=["B", "M_BUCKET", "rows", "cols", "TOKENS_PER_SPLIT"],
                  prune=_prune)
@triton.jit
def _grad_weight_kernel(dy_ptr, x_ptr, block_row, col_idx, out_ptr, M, rows, cols, nnz, TOKENS_PER_SPLIT, M_BUCKET,
                        B: tl.constexpr, PARTIAL: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    k = tl.program_id(0)
    s = tl.program_id(1)
    r = tl.load(block_row + k)
    c = tl.load(col_idx + k)
    offs_b = tl.arange(0, B)
    i = r * B + offs_b
    j = c * B + offs_b
    i_ok = i < rows
    j_ok = j < cols

    t_begin = s * TOKENS_PER_SPLIT
    t_end = min(M, t_begin + TOKENS_PER_SPLIT)
    acc = tl.zeros((B, B), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_K):
        t = t0 + tl.arange(0, BLOCK_K)
        t_ok = t < t_end
        t64 = t.to(tl.int64)[:, None]
        g = tl.load(dy_ptr + t64 * rows + i[None, :], mask=t_ok[:, None] & i_ok[None, :], other=0.0)
        xx = tl.load(x_ptr + t64 * cols + j[None, :], mask=t_ok[:, None] & j_ok[None, :], other=0.0)
        if INTERPRETED:  # the interpreter's bf16 dot is wrong; fp32 operands are exact
            g = g.to(tl.float32)
            xx = xx.to(tl.float32)
        acc = tl.dot(tl.trans(g), xx, acc, input_precision=PRECISION)

    acc = tl.where(i_ok[:, None] & j_ok[None, :], acc, 0.0)  # exact zeros past the edges
    offs = offs_b[:, None] * B + offs_b[None, :]
    if PARTIAL:
        tl.store(out_ptr + (s.to(tl.int64) * nnz + k) * (B * B) + offs, acc)
    else:
        tl.store(out_ptr + k.to(tl.int64) * (B * B) + offs, _common.cast_out(acc, out_ptr.dtype.element_ty, INTERPRETED))


@triton.jit
def _sum_splits_kernel(ws_ptr, out_ptr, nnz, n_splits, B: tl.constexpr, INTERPRETED: tl.constexpr):
    """out[k] = sum over s (in order) of ws[s, k]; one program per block."""
    k = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, B)[:, None] * B + tl.arange(0, B)[None, :]
    acc = tl.zeros((B, B), dtype=tl.float32)
    for s in range(0, n_splits):
        acc += tl.load(ws_ptr + (k + s * nnz) * (B * B) + offs)  # k is int64
    tl.store(out_ptr + k * (B * B) + offs, _common.cast_out(acc, out_ptr.dtype.element_ty, INTERPRETED))


def choose_splits(nnz: int, M: int, sms: int) -> int:
    """Token splits for the dW reduction (1 = no split-K); see the module docstring."""
    if nnz >= sms or M < 2 * SPLIT_MIN_TOKENS:
        return 1
    return max(1, min(triton.cdiv(2 * sms, nnz), M // SPLIT_MIN_TOKENS, MAX_SPLITS))


def linear_grad_weight(dy, x, block_row, col_idx, rows: int, cols: int, block_size: int, *, splits=None) -> torch.Tensor:
    """Weight gradient on the live blocks: ``dv (nnz, b, b)``, ``dv[k] = dy[:, rows of k].T @ x[:, cols of k]``.

    ``dy`` ``(M, rows)`` and ``x`` ``(M, cols)`` fp32/fp16/bf16 contiguous, one dtype;
    ``block_row`` and ``col_idx`` ``(nnz,)`` int32 (CSR order). Returns ``dv`` of dy's dtype,
    accumulated in fp32, zero beyond the matrix edges; fp32 products in the precision of
    :func:`._common.dot_precision`. ``splits``: force the number of token splits (None:
    :func:`choose_splits`); the split path is deterministic too.
    """
    b = int(block_size)
    rows, cols = int(rows), int(cols)
    _common.check_operands(dy=dy, x=x)
    nnz = block_row.numel()
    M = dy.shape[0]
    dv = torch.empty(nnz, b, b, dtype=dy.dtype, device=dy.device)
    if nnz == 0:
        return dv
    if M == 0:
        return dv.zero_()
    if splits is None:
        splits = choose_splits(nnz, M, SPLIT_SMS)
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits: expected an int >= 1 or None, got {splits!r}")
    per_split = triton.cdiv(triton.cdiv(M, splits), 16) * 16
    splits = triton.cdiv(M, per_split)
    common = dict(B=b, INTERPRETED=_common.INTERPRET, PRECISION=_common.dot_precision(dy.dtype))
    with _common.on_device(dy.device):
        if splits == 1:
            _grad_weight_kernel[(nnz, 1)](dy, x, block_row, col_idx, dv, M, rows, cols, nnz, per_split, _common.bucket(M),
                                  PARTIAL=False, **common)
            return dv
        ws = torch.empty(splits, nnz, b, b, dtype=torch.float32, device=dy.device)
        _grad_weight_kernel[(nnz, splits)](dy, x, block_row, col_idx, ws, M, rows, cols, nnz, per_split, _common.bucket(M),
                                   PARTIAL=True, **common)
        _sum_splits_kernel[(nnz,)](ws, dv, nnz, splits, B=b, INTERPRETED=_common.INTERPRET, num_warps=4)
    return dv
