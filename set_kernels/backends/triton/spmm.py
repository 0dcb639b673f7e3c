"""Triton kernels for element sparsity (``block_size == 1``): SpMM forward / dX and SDDMM dW.

At b = 1 a layout is plain CSR (plus its CSC transpose) and ``values`` is ``(nnz, 1, 1)``, read
here as ``(nnz,)``. The block kernels cannot serve it (``tl.dot`` needs tiles of at least 16, and a
1 x 1 "block" would be a tensor-core instruction per scalar), so these kernels are written for
unstructured sparsity: scalar FMAs on CUDA cores, with the memory access pattern as the design
goal.

**Transposed activations.** The three kernels gather *columns* of a token-major matrix:
``x[:, col]`` (forward), ``dy[:, row]`` (dX, dW) and ``x[:, col]`` (dW). In the row-major ``(M,
features)`` layout one such column is ``M`` elements ``features`` apart, i.e. one 32-byte sector
per 2- or 4-byte element. So each op first transposes the gathered operand(s) to ``(features,
M)`` (one ``.t().contiguous()``: a read and a write of the operand). Then the ``BLOCK_M`` tokens of
one connection are one contiguous run (``BLOCK_M * itemsize`` bytes: a full 128-byte line for 64
bf16 tokens), which makes every gather a coalesced (and, when ``M`` is a multiple of 16,
vectorised) load. The transpose costs ``2 * M * features * itemsize`` bytes once; the gathers it
speeds up move ``nnz * M * itemsize`` bytes, so it pays whenever a feature is used by more than
a small fraction of a connection on average (always, in practice). At ``M == 1`` the transpose
is free (a ``(1, n)`` matrix is its own transpose in memory).

**SpMM** (:func:`spmm_forward`, :func:`spmm_grad_input`, one kernel ``_spmm_kernel``). Output ``out (M, n_out)``
with ``out[t, o] = sum_{e in row o} values[e] * inT[idx[e], t]`` (+ bias). A program owns
``BLOCK_R`` consecutive output features and ``BLOCK_M`` tokens. It walks the entries of its
features in chunks of ``KC = 16`` (an ``(BLOCK_R, KC)`` tile of indices and values, entries past
a feature's end masked), gathers the ``(BLOCK_R, BLOCK_M, KC)`` tile ``inT[idx, tokens]`` and
accumulates ``tile * values`` elementwise in fp32. After the loop the ``KC`` partial sums of each
output are added in a fixed pairwise tree, the bias is added in fp32, and the ``(BLOCK_M,
BLOCK_R)`` tile is stored once (``BLOCK_R`` contiguous outputs per token). The forward walks the
CSR index (``row_ptr``, ``col_idx``, values in order); dX walks the CSC index (``col_ptr``,
``row_idx``, values through ``perm``): every output element has one writer, so no atomics. A
feature with no entries gets the bias, or 0. Grid: 1-D, feature groups fastest, so the programs
resident at one time share one token tile of ``inT`` (in L2) and fill whole sectors of the output.

**SDDMM** (:func:`spmm_grad_weight`, ``_sddmm_kernel``). ``dv[e] = sum_t dyT[row[e], t] * xT[col[e], t]``.
A program owns ``BLOCK_E`` consecutive entries (CSR order, so they share few rows of ``dyT``) and
loops over the tokens in chunks of ``TOK = 64``, accumulating ``(BLOCK_E, TOK)`` products
elementwise in fp32; then a fixed pairwise tree sums the ``TOK`` lanes. One writer per entry, no
atomics, no split that depends on the GPU.

**Determinism.** Every output is reduced in an order fixed by the data and by the constants
``KC`` / ``TOK`` only: the autotuned parameters (``BLOCK_M``, ``BLOCK_R``, ``BLOCK_E``,
``num_warps``) choose which outputs a program computes, not how one output is summed (each lane
accumulates its own chunk slot sequentially and the final tree is spelled out with reshape /
split instead of ``tl.sum``, whose order follows the compiled layout). Results are bit-identical
run to run, and whichever config the autotuner picks.

Offsets that scale with ``M`` (``idx * M``, ``t * n_out``) are formed in int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

# Fixed reduction widths (not autotuned: they fix the summation order, see the module docstring).
LOG_KC = 4  # SpMM: entries per chunk, KC = 16
LOG_TOK = 6  # SDDMM: tokens per chunk, TOK = 64

# SpMM configs: (BLOCK_M, BLOCK_R, num_warps); the tile holds BLOCK_R * BLOCK_M * KC elements.
SPMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_R": br}, num_warps=w, num_stages=2)
    for bm, br, w in [(16, 8, 4), (32, 4, 4), (64, 2, 4), (64, 4, 4), (128, 2, 4), (128, 4, 8)]
]
SPMM_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_R": 4}, num_warps=4, num_stages=1)

# SDDMM configs: (BLOCK_E, num_warps); the accumulator holds BLOCK_E * TOK fp32 values.
SDDMM_CONFIGS = [
    triton.Config({"BLOCK_E": be}, num_warps=w, num_stages=2)
    for be, w in [(32, 4), (64, 4), (64, 8), (128, 8)]
]
SDDMM_INTERPRETER_CONFIG = triton.Config({"BLOCK_E": 32}, num_warps=4, num_stages=1)


def _prune_spmm(configs, named_args, **kwargs):
    """Drop token tiles wider than the (bucketed) token count; keep at least the smallest one."""
    args = {**named_args, **kwargs}  # the autotuner passes positional args and keyword args apart
    m_bucket = args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m_bucket)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


@triton.jit
def _tree_sum_last(acc, A: tl.constexpr, B: tl.constexpr, LOG_N: tl.constexpr):
    """``(A, B, 2**LOG_N)`` fp32 -> ``(A, B)``: sum of the last axis in a fixed pairwise order
    (adjacent lanes first), independent of the compiled layout and of the launch config."""
    for i in tl.static_range(LOG_N):
        lo, hi = tl.split(tl.reshape(acc, (A, B, 1 << (LOG_N - 1 - i), 2)))
        acc = lo + hi
    return tl.reshape(acc, (A, B))


@_common.autotune(SPMM_CONFIGS, SPMM_INTERPRETER_CONFIG,
                  key=["M_BUCKET", "n_out", "n_in", "NNZ_BUCKET", "HAS_PERM", "HAS_BIAS"], prune=_prune_spmm)
@triton.jit
def _spmm_kernel(inT_ptr, v_ptr, ptr_ptr, idx_ptr, perm_ptr, bias_ptr, out_ptr, M, n_out, n_in, M_BUCKET, NNZ_BUCKET,
                 HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr, LOG_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """``out[t, o] = sum_{ptr[o] <= e < ptr[o+1]} v[perm[e] or e] * inT[idx[e], t] (+ bias[o])``."""
    KC: tl.constexpr = 1 << LOG_K
    pid = tl.program_id(0)
    n_groups = tl.cdiv(n_out, BLOCK_R)
    pid_m = pid // n_groups  # feature groups fastest: resident programs share one token tile
    offs_r = (pid % n_groups) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < n_out
    start = tl.load(ptr_ptr + offs_r, mask=r_ok, other=0)
    length = tl.load(ptr_ptr + offs_r + 1, mask=r_ok, other=0) - start  # 0 for features past the edge
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_k = tl.arange(0, KC)

    acc = tl.zeros((BLOCK_R, BLOCK_M, KC), dtype=tl.float32)
    k_end = tl.max(length, axis=0)
    for k0 in range(0, k_end, KC):
        kk = k0 + offs_k
        live = kk[None, :] < length[:, None]  # (BLOCK_R, KC)
        ent = start[:, None] + kk[None, :]
        src = tl.load(idx_ptr + ent, mask=live, other=0)
        if HAS_PERM:
            ent = tl.load(perm_ptr + ent, mask=live, other=0)
        w = tl.load(v_ptr + ent, mask=live, other=0.0).to(tl.float32)
        # (BLOCK_R, BLOCK_M, KC): for each entry a contiguous run of BLOCK_M tokens of inT.
        a = tl.load(inT_ptr + src.to(tl.int64)[:, None, :] * M + offs_m[None, :, None],
                    mask=live[:, None, :] & m_ok[None, :, None], other=0.0)
        acc += a.to(tl.float32) * w[:, None, :]

    out = _tree_sum_last(acc, BLOCK_R, BLOCK_M, LOG_K)  # (BLOCK_R, BLOCK_M)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * n_out + offs_r[:, None]
    tl.store(out_ptrs, _common.cast_out(out, out_ptr.dtype.element_ty, INTERPRETED),
             mask=r_ok[:, None] & m_ok[None, :])


@_common.autotune(SDDMM_CONFIGS, SDDMM_INTERPRETER_CONFIG, key=["M_BUCKET", "rows", "cols", "NNZ_BUCKET"])
@triton.jit
def _sddmm_kernel(dyT_ptr, xT_ptr, row_ptr, col_ptr, out_ptr, M, nnz, rows, cols, M_BUCKET, NNZ_BUCKET,
                  INTERPRETED: tl.constexpr, LOG_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """``out[e] = sum_t dyT[row[e], t] * xT[col[e], t]`` for ``BLOCK_E`` consecutive entries."""
    TOK: tl.constexpr = 1 << LOG_T
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < nnz
    a_rows = dyT_ptr + tl.load(row_ptr + offs_e, mask=e_ok, other=0).to(tl.int64)[:, None] * M
    b_rows = xT_ptr + tl.load(col_ptr + offs_e, mask=e_ok, other=0).to(tl.int64)[:, None] * M
    offs_t = tl.arange(0, TOK)[None, :]  # 2-D before the loop: no layout conversion inside it
    acc = tl.zeros((BLOCK_E, TOK), dtype=tl.float32)
    for t0 in range(0, M, TOK):
        t = t0 + offs_t
        ok = e_ok[:, None] & (t < M)
        a = tl.load(a_rows + t, mask=ok, other=0.0)
        b = tl.load(b_rows + t, mask=ok, other=0.0)
        acc += a.to(tl.float32) * b.to(tl.float32)
    out = tl.reshape(_tree_sum_last(tl.reshape(acc, (1, BLOCK_E, TOK)), 1, BLOCK_E, LOG_T), (BLOCK_E,))
    tl.store(out_ptr + offs_e, _common.cast_out(out, out_ptr.dtype.element_ty, INTERPRETED), mask=e_ok)


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """``(features, M)`` contiguous copy of a contiguous ``(M, features)`` matrix."""
    return t.t().contiguous()


def _spmm(inp, values, ptr, idx, perm, bias, n_out: int, n_in: int) -> torch.Tensor:
    M = inp.shape[0]
    out = torch.empty(M, n_out, dtype=inp.dtype, device=inp.device)
    if M == 0 or n_out == 0:
        return out
    nnz = idx.numel()
    if nnz == 0:  # nothing to gather: the bias, or zeros (no launch)
        if bias is None:
            return out.zero_()
        return out.copy_(bias.expand(M, n_out))
    inT = _transposed(inp)
    v = values.reshape(-1)
    with _common.on_device(inp.device):
        _spmm_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_R"]),)](
            inT, v, ptr, idx, perm if perm is not None else idx, bias if bias is not None else out, out,
            M, n_out, n_in, _common.bucket(M), _common.bucket(nnz),
            HAS_PERM=perm is not None, HAS_BIAS=bias is not None, INTERPRETED=_common.INTERPRET, LOG_K=LOG_KC,
        )
    return out


def spmm_forward(x, values, row_ptr, col_idx, bias, rows: int, cols: int) -> torch.Tensor:
    """Forward at b = 1: ``y (M, rows) = x (M, cols) @ W.T + bias``, W in CSR.

    ``x`` ``(M, cols)`` fp32/fp16/bf16 contiguous; ``values`` ``(nnz, 1, 1)`` same dtype, CSR
    order; ``row_ptr`` ``(rows + 1,)`` and ``col_idx`` ``(nnz,)`` int32; ``bias`` ``(rows,)`` or
    None. Returns ``y`` of x's dtype, accumulated in fp32, deterministic.
    """
    rows, cols = int(rows), int(cols)
    _common.check_operands(x=x, values=values, bias=bias)
    return _spmm(x, values, row_ptr, col_idx, None, bias, rows, cols)


def spmm_grad_input(dy, values, col_ptr, row_idx, perm, rows: int, cols: int) -> torch.Tensor:
    """Input gradient at b = 1: ``dx (M, cols) = dy (M, rows) @ W`` through the CSC index.

    ``col_ptr`` ``(cols + 1,)``, ``row_idx`` and ``perm`` ``(nnz,)`` int32; ``values`` in CSR
    order (the q-th CSC entry is ``values[perm[q]]``). One writer per element, no atomics.
    """
    rows, cols = int(rows), int(cols)
    _common.check_operands(dy=dy, values=values)
    return _spmm(dy, values, col_ptr, row_idx, perm, None, cols, rows)


def spmm_grad_weight(dy, x, block_row, col_idx, rows: int, cols: int) -> torch.Tensor:
    """Weight gradient at b = 1 (SDDMM): ``dv (nnz, 1, 1)``, ``dv[e] = sum_t dy[t, row[e]] * x[t, col[e]]``.

    ``dy`` ``(M, rows)`` and ``x`` ``(M, cols)`` fp32/fp16/bf16 contiguous, one dtype; ``block_row``
    and ``col_idx`` ``(nnz,)`` int32 in CSR order. fp32 accumulation, deterministic.
    """
    rows, cols = int(rows), int(cols)
    _common.check_operands(dy=dy, x=x)
    nnz = block_row.numel()
    M = dy.shape[0]
    dv = torch.empty(nnz, 1, 1, dtype=dy.dtype, device=dy.device)
    if nnz == 0:
        return dv
    if M == 0:
        return dv.zero_()
    dyT, xT = _transposed(dy), _transposed(x)
    with _common.on_device(dy.device):
        _sddmm_kernel[lambda meta: (triton.cdiv(nnz, meta["BLOCK_E"]),)](
            dyT, xT, block_row, col_idx, dv, M, nnz, rows, cols, _common.bucket(M), _common.bucket(nnz),
            INTERPRETED=_common.INTERPRET, LOG_T=LOG_TOK,
        )
    return dv
