"""Numba kernels for element sparsity (``block_size=1``): CSR SpMM, its transpose, and SDDMM (CPU).

At block size 1 a layout is a CSR matrix plus its transposed (CSC) index, and ``values (nnz, 1, 1)``
is read as ``(nnz,)``. The block kernels of :mod:`.bsmm` would pack one-wide blocks and run a
4 x 4 register tile over reductions a few entries long; these kernels are written for unstructured
sparsity instead.

Design:

* **Activations token-major.** Every kernel first transposes its dense operands from ``(M, n)``
  to ``(n, M)`` (a tiled, parallel copy, O(M * n)), so that the tokens of one feature are one
  contiguous run. Each live connection ``(r, c, w)`` then costs one contiguous, vectorised
  ``out[r, :] += w * in[c, :]`` over the tokens of a tile: the gather is by feature, never by
  token, and LLVM turns the token loop into packed FMAs.
* **Token tiles.** Tokens are processed ``TM`` at a time (the whole batch when it is small), so
  that the operand slice a tile touches, ``n_in * TM`` values, stays in the caches while a row's
  entries gather from it.
* **Eight entries per pass.** The forward and dX kernels consume a row's entries eight (then
  four) at a time, ``acc += w0 * x0 + ... + w7 * x7``: fewer loads and stores of the accumulator,
  and eight operand rows in flight, which matters at large widths where each is a cache miss
  (about 10 % faster than four at 5 million live entries).
* **Prefetch at large widths.** When the gathered operand is larger than the per-core caches
  (``PREFETCH_MIN_BYTES``), the kernels ask for the operand rows of the entries
  ``PREFETCH_AHEAD`` positions on (and, for dX, their permuted values) while the current ones are
  summed, through LLVM's prefetch hint. At width 1,000,000 that took the forward from about 660
  to 480-570 ms and the SDDMM from about 550 to 440-460 ms per 26 million live entries (40
  tokens, 2 threads); below the threshold the hints cost more than they save.
* **Parallel over independent outputs, no atomics.** The forward owns output features (CSR rows),
  dX owns input features through the transposed index (so every ``dx`` element is written by one
  thread), and dW owns live entries (each a dot product of two contiguous token runs). The
  forward and dX accumulate ``ROW_CHUNK`` features x ``TOKEN_TILE`` tokens in a small tile and
  write it straight into the row-major output, as contiguous segments of ``ROW_CHUNK`` values.

Cost: O(nnz * M) arithmetic plus O((rows + cols) * M) for the transposes and output writes, with no term in
``rows * cols``. All index arithmetic is in int64 (``nnz`` and ``n * M`` may pass 2**31).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

_FLAGS = dict(parallel=True, fastmath=True, cache=True)
_SERIAL = dict(fastmath=True, cache=True)

# Tokens per tile: 2 KiB of fp32 per feature row of a tile.
TOKEN_TILE = 512
# Output features per work item of the forward / dX kernels (one 64-byte fp32 segment per token).
ROW_CHUNK = 16
# Live entries per dW work item.
ENTRY_CHUNK = 1024
# Tile edge of the transposes; columns per work item, and the most bytes of them, of the few-token path.
_T = 32
_COLS = 64
_COLS_BYTES = 16 << 10
# Entries ahead whose operand rows are prefetched, and most cache lines prefetched per row.
PREFETCH_AHEAD = 16
PREFETCH_LINES = 4
# Prefetch only when the gathered operand outgrows the per-core caches: below that the hints
# cost more than they save (measured about 10 % at width 1000).
PREFETCH_MIN_BYTES = 4 << 20


def _prefetch_codegen(context, builder, signature, args):
    aryty = signature.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    inds = [context.cast(builder, a, t, types.intp) for a, t in zip(args[1:], signature.args[1:])]
    ptr = cgutils.get_item_pointer2(context, builder, data=ary.data, shape=cgutils.unpack_tuple(builder, ary.shape),
                                    strides=cgutils.unpack_tuple(builder, ary.strides), layout=aryty.layout,
                                    inds=inds, wraparound=False, boundscheck=False)
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0")
    # read, keep in all cache levels, data
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
    return context.get_dummy_value()


@intrinsic
def _prefetch(typingctx, arr, i):
    """Hint the cache to load the line holding ``arr[i]`` (1-D). No fault for any address."""
    return types.void(arr, i), _prefetch_codegen


@intrinsic
def _prefetch2(typingctx, arr, i, j):
    """Hint the cache to load the line holding ``arr[i, j]`` (2-D, ``j`` may run past the row)."""
    return types.void(arr, i, j), _prefetch_codegen


@njit(inline="always")
def _prefetch_row(a, r, t0, n_lines, step):
    for k in range(n_lines):
        _prefetch2(a, r, t0 + k * step)


@njit(**_FLAGS)
def transpose(a, out):
    """``out (n, M) = a (M, n).T``.

    Few tokens (``M * _COLS`` values fit ``_COLS_BYTES``, e.g. M <= 64 in fp32): each work item
    copies ``_COLS`` whole columns of ``a``, all M rows, so the rows it reads stay in L1 (at
    40 x 1000 fp32 about 7 us against 18-26 us for square tiles: a SET-MLP step makes eight
    such transposes). More tokens: ``_T x _T`` tiles (both sides stay cache-friendly).
    """
    M, n = a.shape
    if M * _COLS * a.itemsize <= _COLS_BYTES:
        n_items = (n + _COLS - 1) // _COLS
        for w in prange(n_items):
            n0 = w * _COLS
            for j in range(n0, min(n, n0 + _COLS)):
                dst = out[j]
                for i in range(M):
                    dst[i] = a[i, j]
        return
    nt_m = (M + _T - 1) // _T
    nt_n = (n + _T - 1) // _T
    for w in prange(nt_m * nt_n):
        bm = w // nt_n
        bn = w - bm * nt_n
        m0 = bm * _T
        n0 = bn * _T
        mn = min(_T, M - m0)
        nn = min(_T, n - n0)
        for j in range(nn):
            dst = out[n0 + j, m0:m0 + mn]
            for i in range(mn):
                dst[i] = a[m0 + i, n0 + j]


@njit(**_FLAGS)
def _spmm_t(aT, v, ptr, idx, perm, use_perm, bias, has_bias, out, TM, RC):
    """``out (M, n_out) = (Op @ aT).T`` with Op sparse in compressed rows.

    Output feature ``o`` owns entries ``ptr[o]:ptr[o+1]``; entry ``e`` reads row ``idx[e]`` of
    ``aT (n_in, M)`` with weight ``v[perm[e] if use_perm else e]``. ``bias (n_out,)`` is added
    when ``has_bias``. Work items are ``RC`` output features x ``TM`` tokens: their results are
    accumulated token-major in a small ``(RC, TM)`` tile and written to ``out`` as ``RC``-wide
    contiguous row segments, so no transposed output has to be copied back.
    """
    n_out = ptr.shape[0] - 1
    M = aT.shape[1]
    last = idx.shape[0] - 1
    n_tiles = (M + TM - 1) // TM
    n_chunks = (n_out + RC - 1) // RC
    n_items = n_chunks * n_tiles
    n_blocks = min(n_items, 256)  # one scratch tile per block of consecutive work items
    zero = v.dtype.type(0)
    step = max(1, 64 // aT.itemsize)  # elements per cache line
    D = PREFETCH_AHEAD
    pf = aT.shape[0] * aT.shape[1] * aT.itemsize >= PREFETCH_MIN_BYTES
    for blk in prange(n_blocks):
        tile = np.empty((RC, TM), dtype=v.dtype)
        for w in range(blk * n_items // n_blocks, (blk + 1) * n_items // n_blocks):
            oc = w // n_tiles
            t0 = (w - oc * n_tiles) * TM
            tn = min(TM, M - t0)
            o0 = oc * RC
            rc = min(RC, n_out - o0)
            n_lines = min(PREFETCH_LINES, (tn + step - 1) // step)
            for i in range(rc):
                o = o0 + i
                acc = tile[i, :tn]
                b0 = bias[o] if has_bias else zero
                for t in range(tn):
                    acc[t] = b0
                e0 = np.int64(ptr[o])
                e1 = np.int64(ptr[o + 1])
                e = e0
                while e + 8 <= e1:
                    # the operand rows of the entries D ahead are fetched while these eight are
                    # summed: at large widths every row is a cache miss
                    if pf:
                        for k in range(8):
                            f = min(e + D + k, last)
                            _prefetch_row(aT, idx[f], t0, n_lines, step)
                            if use_perm:
                                _prefetch(v, perm[f])
                    if use_perm:
                        w0 = v[perm[e]]
                        w1 = v[perm[e + 1]]
                        w2 = v[perm[e + 2]]
                        w3 = v[perm[e + 3]]
                        w4 = v[perm[e + 4]]
                        w5 = v[perm[e + 5]]
                        w6 = v[perm[e + 6]]
                        w7 = v[perm[e + 7]]
                    else:
                        w0 = v[e]
                        w1 = v[e + 1]
                        w2 = v[e + 2]
                        w3 = v[e + 3]
                        w4 = v[e + 4]
                        w5 = v[e + 5]
                        w6 = v[e + 6]
                        w7 = v[e + 7]
                    x0 = aT[idx[e], t0:t0 + tn]
                    x1 = aT[idx[e + 1], t0:t0 + tn]
                    x2 = aT[idx[e + 2], t0:t0 + tn]
                    x3 = aT[idx[e + 3], t0:t0 + tn]
                    x4 = aT[idx[e + 4], t0:t0 + tn]
                    x5 = aT[idx[e + 5], t0:t0 + tn]
                    x6 = aT[idx[e + 6], t0:t0 + tn]
                    x7 = aT[idx[e + 7], t0:t0 + tn]
                    for t in range(tn):
                        acc[t] += (w0 * x0[t] + w1 * x1[t] + w2 * x2[t] + w3 * x3[t]) + \
                                  (w4 * x4[t] + w5 * x5[t] + w6 * x6[t] + w7 * x7[t])
                    e += 8
                while e + 4 <= e1:
                    if use_perm:
                        w0 = v[perm[e]]
                        w1 = v[perm[e + 1]]
                        w2 = v[perm[e + 2]]
                        w3 = v[perm[e + 3]]
                    else:
                        w0 = v[e]
                        w1 = v[e + 1]
                        w2 = v[e + 2]
                        w3 = v[e + 3]
                    x0 = aT[idx[e], t0:t0 + tn]
                    x1 = aT[idx[e + 1], t0:t0 + tn]
                    x2 = aT[idx[e + 2], t0:t0 + tn]
                    x3 = aT[idx[e + 3], t0:t0 + tn]
                    for t in range(tn):
                        acc[t] += w0 * x0[t] + w1 * x1[t] + w2 * x2[t] + w3 * x3[t]
                    e += 4
                while e < e1:
                    w0 = v[perm[e]] if use_perm else v[e]
                    x0 = aT[idx[e], t0:t0 + tn]
                    for t in range(tn):
                        acc[t] += w0 * x0[t]
                    e += 1
            for t in range(tn):
                dst = out[t0 + t, o0:o0 + rc]
                for i in range(rc):
                    dst[i] = tile[i, t]


@njit(**_SERIAL)
def linear_forward(x, v, row_ptr, col_idx, bias, has_bias, y, xT, TM, RC):
    """Forward ``y (M, rows) = x (M, cols) @ W.T (+ bias)``; ``xT (cols, M)`` scratch."""
    transpose(x, xT)
    _spmm_t(xT, v, row_ptr, col_idx, col_idx, False, bias, has_bias, y, TM, RC)


@njit(**_SERIAL)
def linear_grad_input(dy, v, col_ptr, row_idx, perm, dx, dyT, TM, RC):
    """Input gradient ``dx (M, cols) = dy (M, rows) @ W`` through the transposed index."""
    transpose(dy, dyT)
    _spmm_t(dyT, v, col_ptr, row_idx, perm, True, v[:0], False, dx, TM, RC)


@njit(**_SERIAL)
def linear_backward(dy, x, v, col_ptr, row_idx, perm, row, col, need_dx, need_dv, dx, dv, dyT, xT, TM, RC, EC):
    """Both gradients of the forward from one transpose of ``dy``: ``dx (M, cols) = dy @ W`` when
    ``need_dx`` and ``dv[e] = sum_t dy[t, row[e]] * x[t, col[e]]`` when ``need_dv``."""
    transpose(dy, dyT)
    if need_dx:
        _spmm_t(dyT, v, col_ptr, row_idx, perm, True, v[:0], False, dx, TM, RC)
    if need_dv:
        transpose(x, xT)
        _sddmm_t(dyT, xT, row, col, dv, EC)


@njit(**_FLAGS)
def _sddmm_t(dyT, xT, row, col, out, EC):
    """``out[e] = dot(dyT[row[e], :], xT[col[e], :])`` for every live entry ``e``."""
    nnz = row.shape[0]
    M = dyT.shape[1]
    zero = out.dtype.type(0)
    n_chunks = (nnz + EC - 1) // EC
    step = max(1, 64 // xT.itemsize)
    n_lines = min(PREFETCH_LINES, (M + step - 1) // step)
    pf = xT.shape[0] * M * xT.itemsize >= PREFETCH_MIN_BYTES
    for c in prange(n_chunks):
        e0 = np.int64(c) * EC
        e1 = min(nnz, e0 + EC)
        for e in range(e0, e1):
            if pf:  # rows are gathered at random
                f = min(e + PREFETCH_AHEAD, nnz - 1)
                _prefetch_row(xT, col[f], 0, n_lines, step)
                _prefetch_row(dyT, row[f], 0, n_lines, step)
            a = dyT[row[e]]
            b = xT[col[e]]
            s = zero
            for t in range(M):
                s += a[t] * b[t]
            out[e] = s


@njit(**_SERIAL)
def linear_grad_weight(dy, x, row, col, out, dyT, xT, EC):
    """Weight gradient on live entries: ``out[e] = sum_t dy[t, row[e]] * x[t, col[e]]``."""
    transpose(dy, dyT)
    transpose(x, xT)
    _sddmm_t(dyT, xT, row, col, out, EC)
