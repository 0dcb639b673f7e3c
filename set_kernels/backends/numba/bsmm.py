"""Numba kernels for the three block-sparse matmuls (CPU).

All kernels work on numpy views of torch tensors and write every element of their output.

Design (the speed comes from three things):

* **Operands re-laid out once per call.** The dense operand is first copied into a block-major
  layout (``(n_blocks, M, b)`` for the forward and dX kernels, ``(n_blocks, b, M)`` for dW),
  zero-padded past the matrix edge. Gathering b-wide column slices straight out of a row-major
  ``(M, cols)`` matrix walks rows whose stride is a large power of two, which thrashes the caches
  and TLB and was ~10x slower than the arithmetic itself.
* **Dot-product micro-kernel with scalar accumulators.** For a tile of tokens, the x slices of a
  block row's live blocks are packed side by side into ``xp (TT, K)`` and the block row's weights
  into ``wp (b, K)`` so that every output ``y[t, i]`` is one long contiguous dot product over
  ``K = n_blocks_in_row * b``. A 4 x 4 register tile (4 tokens x 4 outputs, 16 scalar
  accumulators) walks K; LLVM vectorises the K loop (one vector accumulator per scalar) and
  only reduces horizontally once per tile. Scalars always live in registers, unlike a numba array.
* **Parallel over independent outputs** (``prange``): block rows (forward), block columns (dX,
  through the transposed index, so no atomics) and live blocks (dW).

Edge blocks: the packed operands are zero beyond ``rows`` / ``cols`` and the weights there are
replaced by 0, so whatever an edge block holds past the matrix edge is ignored; dW writes exact
zeros there.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

_FLAGS = dict(parallel=True, fastmath=True, cache=True)
# Entry points only chain the parallel kernels above them.
_SERIAL = dict(fastmath=True, cache=True)

# Micro-kernel register tile: MR tokens x NR outputs (the kernels below are written for 4 x 4).
_MR = 4
_NR = 4


def token_tile(b: int) -> int:
    """Tokens per tile in the forward / dX kernels (multiple of 4): ~16 KiB of output tile."""
    return max(32, 4096 // b)


# Reduction length per packed chunk (a multiple of every block size): bounds the packed x tile.
K_CHUNK = 1024
# Tokens per chunk of the dW reduction: keeps a block's (b, chunk) operand slices in L2.
M_CHUNK = 1024


@njit(**_FLAGS)
def _to_blocks(a, n, b, nblk):
    """``(nblk, M, b)`` copy of ``a (M, n)``: out[c, t, j] = a[t, c*b + j], zero past column n."""
    M = a.shape[0]
    out = np.empty((nblk, M, b), dtype=a.dtype)
    for t in prange(M):
        for c in range(nblk):
            c0 = c * b
            cn = min(b, n - c0)
            for j in range(cn):
                out[c, t, j] = a[t, c0 + j]
            for j in range(cn, b):
                out[c, t, j] = 0.0
    return out


@njit(**_FLAGS)
def _to_blocks_t(a, n, b, nblk):
    """``(nblk, b, M)`` copy of ``a (M, n)``: out[c, j, t] = a[t, c*b + j], zero past column n."""
    M = a.shape[0]
    out = np.empty((nblk, b, M), dtype=a.dtype)
    TB = 64
    ntile = (M + TB - 1) // TB
    for w in prange(nblk * ntile):
        c = w // ntile
        t0 = (w - c * ntile) * TB
        tn = min(TB, M - t0)
        c0 = c * b
        cn = min(b, n - c0)
        for j in range(cn):
            for t in range(tn):
                out[c, j, t0 + t] = a[t0 + t, c0 + j]
        for j in range(cn, b):
            for t in range(tn):
                out[c, j, t0 + t] = 0.0
    return out


@njit(**_FLAGS)
def _dsd_core(ab, v, ptr, idx, perm, use_perm, trans, bias, has_bias, out, n_out, n_in, b, TT, KC):
    """out (M, n_out) = a (M, n_in) @ Op.T, with Op given block-sparse by a compressed index.

    ``ab`` is ``a`` in ``(ceil(n_in/b), M, b)`` block layout (zero-padded). Output block ``o`` owns
    entries ``ptr[o]:ptr[o+1]``; entry ``e`` is input block ``idx[e]`` with values
    ``v[perm[e] if use_perm else e]``, used as stored (``trans`` False: Op block = v[k], the
    forward W) or transposed (``trans`` True: Op block = v[k].T, for dX = dy @ W).
    """
    M = ab.shape[1]
    n_oblk = ptr.shape[0] - 1
    zero = v.dtype.type(0)
    for ob in prange(n_oblk):
        e0 = ptr[ob]
        nb = ptr[ob + 1] - e0
        o0 = ob * b
        on = min(b, n_out - o0)
        if nb == 0:
            for t in range(M):
                for i in range(on):
                    out[t, o0 + i] = bias[o0 + i] if has_bias else zero
            continue
        K = nb * b
        # Weights of this output block row, side by side: wp[i, kk*b + j] multiplies input
        # element j of the kk-th live input block for output i. Zero past the input edge.
        wp = np.empty((b, K), dtype=v.dtype)
        for kk in range(nb):
            e = e0 + kk
            k = perm[e] if use_perm else e
            jn = min(b, n_in - idx[e] * b)
            q0 = kk * b
            if trans:
                for j in range(jn):
                    for i in range(b):
                        wp[i, q0 + j] = v[k, j, i]
            else:
                for i in range(b):
                    for j in range(jn):
                        wp[i, q0 + j] = v[k, i, j]
            for i in range(b):
                for j in range(jn, b):
                    wp[i, q0 + j] = zero
        KCe = min(KC, K)
        xp = np.empty((TT, KCe), dtype=v.dtype)
        acc = np.empty((TT, b), dtype=v.dtype)
        for t0 in range(0, M, TT):
            tn = min(TT, M - t0)
            tn4 = (tn + 3) // 4 * 4
            for q0 in range(0, K, KCe):
                qn = min(KCe, K - q0)
                # Pack the token tile's input slices for blocks q0/b .. (q0+qn)/b.
                for kq in range(qn // b):
                    cb = idx[e0 + q0 // b + kq]
                    for t in range(tn):
                        for j in range(b):
                            xp[t, kq * b + j] = ab[cb, t0 + t, j]
                for t in range(tn, tn4):
                    for q in range(qn):
                        xp[t, q] = zero
                for ti in range(0, tn4, 4):
                    for ii in range(0, b, 4):
                        a00 = a01 = a02 = a03 = zero
                        a10 = a11 = a12 = a13 = zero
                        a20 = a21 = a22 = a23 = zero
                        a30 = a31 = a32 = a33 = zero
                        for q in range(qn):
                            x0 = xp[ti, q]
                            x1 = xp[ti + 1, q]
                            x2 = xp[ti + 2, q]
                            x3 = xp[ti + 3, q]
                            w0 = wp[ii, q0 + q]
                            w1 = wp[ii + 1, q0 + q]
                            w2 = wp[ii + 2, q0 + q]
                            w3 = wp[ii + 3, q0 + q]
                            a00 += x0 * w0
                            a01 += x0 * w1
                            a02 += x0 * w2
                            a03 += x0 * w3
                            a10 += x1 * w0
                            a11 += x1 * w1
                            a12 += x1 * w2
                            a13 += x1 * w3
                            a20 += x2 * w0
                            a21 += x2 * w1
                            a22 += x2 * w2
                            a23 += x2 * w3
                            a30 += x3 * w0
                            a31 += x3 * w1
                            a32 += x3 * w2
                            a33 += x3 * w3
                        if q0 == 0:
                            acc[ti, ii] = a00
                            acc[ti, ii + 1] = a01
                            acc[ti, ii + 2] = a02
                            acc[ti, ii + 3] = a03
                            acc[ti + 1, ii] = a10
                            acc[ti + 1, ii + 1] = a11
                            acc[ti + 1, ii + 2] = a12
                            acc[ti + 1, ii + 3] = a13
                            acc[ti + 2, ii] = a20
                            acc[ti + 2, ii + 1] = a21
                            acc[ti + 2, ii + 2] = a22
                            acc[ti + 2, ii + 3] = a23
                            acc[ti + 3, ii] = a30
                            acc[ti + 3, ii + 1] = a31
                            acc[ti + 3, ii + 2] = a32
                            acc[ti + 3, ii + 3] = a33
                        else:
                            acc[ti, ii] += a00
                            acc[ti, ii + 1] += a01
                            acc[ti, ii + 2] += a02
                            acc[ti, ii + 3] += a03
                            acc[ti + 1, ii] += a10
                            acc[ti + 1, ii + 1] += a11
                            acc[ti + 1, ii + 2] += a12
                            acc[ti + 1, ii + 3] += a13
                            acc[ti + 2, ii] += a20
                            acc[ti + 2, ii + 1] += a21
                            acc[ti + 2, ii + 2] += a22
                            acc[ti + 2, ii + 3] += a23
                            acc[ti + 3, ii] += a30
                            acc[ti + 3, ii + 1] += a31
                            acc[ti + 3, ii + 2] += a32
                            acc[ti + 3, ii + 3] += a33
            if has_bias:
                for t in range(tn):
                    for i in range(on):
                        out[t0 + t, o0 + i] = acc[t, i] + bias[o0 + i]
            else:
                for t in range(tn):
                    for i in range(on):
                        out[t0 + t, o0 + i] = acc[t, i]


@njit(**_SERIAL)
def dsd(x, v, row_ptr, col_idx, bias, has_bias, out, rows, cols, b, TT, KC):
    """Forward: out (M, rows) = x (M, cols) @ W.T (+ bias)."""
    C = (cols + b - 1) // b
    xb = _to_blocks(x, cols, b, C)
    _dsd_core(xb, v, row_ptr, col_idx, col_idx, False, False, bias, has_bias, out, rows, cols, b, TT, KC)


@njit(**_SERIAL)
def dds(dy, v, col_ptr, row_idx, perm, out, rows, cols, b, TT, KC):
    """Input gradient: out (M, cols) = dy (M, rows) @ W, walking the transposed index."""
    R = (rows + b - 1) // b
    dyb = _to_blocks(dy, rows, b, R)
    _dsd_core(dyb, v, col_ptr, row_idx, perm, True, True, np.empty(0, dtype=v.dtype), False, out, cols, rows, b,
              TT, KC)


@njit(**_FLAGS)
def _sdd_core(dyt, xt, block_row, col_idx, out, rows, cols, b, MC):
    """out[k, i, j] = sum_t dyt[block_row[k], i, t] * xt[col_idx[k], j, t]; 0 past the edges."""
    M = dyt.shape[2]
    nnz = block_row.shape[0]
    zero = out.dtype.type(0)
    for k in prange(nnz):
        rb = block_row[k]
        cb = col_idx[k]
        rn = min(b, rows - rb * b)
        cn = min(b, cols - cb * b)
        if M == 0:
            for i in range(b):
                for j in range(b):
                    out[k, i, j] = zero
            continue
        for m0 in range(0, M, MC):
            mn = min(MC, M - m0)
            for ii in range(0, b, 4):
                for jj in range(0, b, 4):
                    a00 = a01 = a02 = a03 = zero
                    a10 = a11 = a12 = a13 = zero
                    a20 = a21 = a22 = a23 = zero
                    a30 = a31 = a32 = a33 = zero
                    for t in range(m0, m0 + mn):
                        d0 = dyt[rb, ii, t]
                        d1 = dyt[rb, ii + 1, t]
                        d2 = dyt[rb, ii + 2, t]
                        d3 = dyt[rb, ii + 3, t]
                        x0 = xt[cb, jj, t]
                        x1 = xt[cb, jj + 1, t]
                        x2 = xt[cb, jj + 2, t]
                        x3 = xt[cb, jj + 3, t]
                        a00 += d0 * x0
                        a01 += d0 * x1
                        a02 += d0 * x2
                        a03 += d0 * x3
                        a10 += d1 * x0
                        a11 += d1 * x1
                        a12 += d1 * x2
                        a13 += d1 * x3
                        a20 += d2 * x0
                        a21 += d2 * x1
                        a22 += d2 * x2
                        a23 += d2 * x3
                        a30 += d3 * x0
                        a31 += d3 * x1
                        a32 += d3 * x2
                        a33 += d3 * x3
                    if m0 == 0:
                        out[k, ii, jj] = a00
                        out[k, ii, jj + 1] = a01
                        out[k, ii, jj + 2] = a02
                        out[k, ii, jj + 3] = a03
                        out[k, ii + 1, jj] = a10
                        out[k, ii + 1, jj + 1] = a11
                        out[k, ii + 1, jj + 2] = a12
                        out[k, ii + 1, jj + 3] = a13
                        out[k, ii + 2, jj] = a20
                        out[k, ii + 2, jj + 1] = a21
                        out[k, ii + 2, jj + 2] = a22
                        out[k, ii + 2, jj + 3] = a23
                        out[k, ii + 3, jj] = a30
                        out[k, ii + 3, jj + 1] = a31
                        out[k, ii + 3, jj + 2] = a32
                        out[k, ii + 3, jj + 3] = a33
                    else:
                        out[k, ii, jj] += a00
                        out[k, ii, jj + 1] += a01
                        out[k, ii, jj + 2] += a02
                        out[k, ii, jj + 3] += a03
                        out[k, ii + 1, jj] += a10
                        out[k, ii + 1, jj + 1] += a11
                        out[k, ii + 1, jj + 2] += a12
                        out[k, ii + 1, jj + 3] += a13
                        out[k, ii + 2, jj] += a20
                        out[k, ii + 2, jj + 1] += a21
                        out[k, ii + 2, jj + 2] += a22
                        out[k, ii + 2, jj + 3] += a23
                        out[k, ii + 3, jj] += a30
                        out[k, ii + 3, jj + 1] += a31
                        out[k, ii + 3, jj + 2] += a32
                        out[k, ii + 3, jj + 3] += a33
        # Exact zeros past the matrix edge (the padded operands make them +-0 already).
        for i in range(rn, b):
            for j in range(b):
                out[k, i, j] = zero
        for i in range(rn):
            for j in range(cn, b):
                out[k, i, j] = zero


@njit(**_SERIAL)
def sdd(dy, x, block_row, col_idx, out, rows, cols, b, MC):
    """Weight gradient on live blocks: out[k] = dy[:, rows of k].T @ x[:, cols of k]."""
    R = (rows + b - 1) // b
    C = (cols + b - 1) // b
    dyt = _to_blocks_t(dy, rows, b, R)
    xt = _to_blocks_t(x, cols, b, C)
    _sdd_core(dyt, xt, block_row, col_idx, out, rows, cols, b, MC)
