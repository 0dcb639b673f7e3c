"""Numba kernels for the three block-sparse matmuls (CPU).

All kernels work on numpy views of torch tensors and write every element of their output.

Design (the speed comes from four things):

* **Operands re-laid out once per call.** The dense operand is first copied into a block-major
  layout (``(n_blocks, M, b)`` for the forward and dX kernels, ``(n_blocks, b, M)`` for dW),
  zero-padded past the matrix edge. Gathering b-wide column slices straight out of a row-major
  ``(M, cols)`` matrix walks rows whose stride is a large power of two, which thrashes the caches
  and TLB and was several times slower than the arithmetic itself.
* **Dot-product micro-kernel with scalar accumulators.** For a tile of tokens, the x slices of a
  block row's live blocks are packed side by side into ``xp (TT, K)`` and the block row's weights
  into ``wp (b, K)`` so that every output ``y[t, i]`` is one long contiguous dot product over
  ``K = n_blocks_in_row * b``. A 4 x 4 register tile (4 tokens x 4 outputs, 16 scalar
  accumulators) walks K; LLVM vectorises the K loop (one vector accumulator per scalar) and
  reduces horizontally only once per tile. Scalars always live in registers, unlike a numba array.
* **Inner loops index 1-D views with a ``range(n)`` counter.** Numba wraps negative indices;
  an index such as ``q0 + q`` may be negative as far as it knows, and the wrap-around test
  turns the vectorised loads into gathers (4x slower). Slicing first keeps the index provably
  non-negative. (Views inside a ``prange`` body make numba drop ``noalias`` on the arrays; that
  is harmless here because the hot loops only load. The Adam kernel, whose hot loop stores to
  three arrays, uses unsigned indices instead.)
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
# Entry points only chain the parallel kernels below them.
_SERIAL = dict(fastmath=True, cache=True)


def token_tile(b: int) -> int:
    """Tokens per tile in the forward / dX kernels (a multiple of 4): a ~16 KiB output tile."""
    return max(32, 4096 // b)


# Reduction length per packed chunk (a multiple of every block size): bounds the packed x tile.
K_CHUNK = 512
# Bytes of the block-laid-out dense operand one pass over the weights may touch (see _forward_core).
PASS_BYTES = 8 << 20


def pass_tokens(n_in: int, b: int, itemsize: int) -> int:
    """Tokens per pass over the weights in the forward / dX kernels (a multiple of the tile)."""
    tt = token_tile(b)
    per_token = -(-n_in // b) * b * itemsize
    return max(tt, PASS_BYTES // per_token // tt * tt)


# Tokens per chunk of the dW reduction: keeps a block's (b, chunk) operand slices in L2.
M_CHUNK = 1024
# Tokens per tile of the (n_blocks, b, M) transpose.
_T_TILE = 64


@njit(**_FLAGS)
def _to_blocks(a, n, b, out):
    """Fill ``out (nblk, M, b)`` from ``a (M, n)``: out[c, t, j] = a[t, c*b + j], zero past column n."""
    M = a.shape[0]
    nblk = out.shape[0]
    for t in prange(M):
        row = a[t]
        for c in range(nblk):
            c0 = c * b
            cn = min(b, n - c0)
            src = row[c0:c0 + cn]
            dst = out[c, t]
            for j in range(cn):
                dst[j] = src[j]
            for j in range(b - cn):
                dst[cn + j] = 0.0


@njit(**_FLAGS)
def _to_blocks_t(a, n, b, out):
    """Fill ``out (nblk, b, M)`` from ``a (M, n)``: out[c, j, t] = a[t, c*b + j], zero past column n."""
    M = a.shape[0]
    nblk = out.shape[0]
    TB = _T_TILE
    ntile = (M + TB - 1) // TB
    for w in prange(nblk * ntile):
        c = w // ntile
        t0 = (w - c * ntile) * TB
        tn = min(TB, M - t0)
        c0 = c * b
        cn = min(b, n - c0)
        # Through a small contiguous tile: reading a column of ``a`` directly strides by the
        # (often power-of-two) row length and thrashes the L1 sets.
        tile = np.empty((TB, b), dtype=a.dtype)
        for t in range(tn):
            src = a[t0 + t, c0:c0 + cn]
            dst = tile[t]
            for j in range(cn):
                dst[j] = src[j]
        for j in range(cn):
            col = tile[:tn, j]
            dst = out[c, j, t0:t0 + tn]
            for t in range(tn):
                dst[t] = col[t]
        for j in range(cn, b):
            dst = out[c, j, t0:t0 + tn]
            for t in range(tn):
                dst[t] = 0.0


@njit(**_FLAGS)
def _forward_core(ab, v, ptr, idx, perm, use_perm, trans, bias, has_bias, out, n_out, n_in, b, TT, KC, MS):
    """out (M, n_out) = a (M, n_in) @ Op.T, with Op given block-sparse by a compressed index.

    ``ab`` is ``a`` in ``(ceil(n_in/b), M, b)`` block layout (zero-padded). Output block ``o`` owns
    entries ``ptr[o]:ptr[o+1]``; entry ``e`` is input block ``idx[e]`` with values
    ``v[perm[e] if use_perm else e]``, used as stored (``trans`` False: Op block = v[k], the
    forward W) or transposed (``trans`` True: Op block = v[k].T, for dX = dy @ W).
    ``TT`` (a multiple of 4) tokens per tile, ``KC`` (a multiple of b) reduction chunk, ``MS``
    (a multiple of TT) tokens per pass over all the weights: a pass re-reads its tokens' slice of
    ``ab`` once per output block row, so that slice should stay in cache.
    """
    M = ab.shape[1]
    n_oblk = ptr.shape[0] - 1
    zero = v.dtype.type(0)
    for s0 in range(0, M, MS):
        s1 = min(M, s0 + MS)
        for ob in prange(n_oblk):
            e0 = ptr[ob]
            nb = ptr[ob + 1] - e0
            o0 = ob * b
            on = min(b, n_out - o0)
            brow = bias[o0:o0 + on] if has_bias else bias[:0]
            if nb == 0:
                for t in range(s0, s1):
                    orow = out[t, o0:o0 + on]
                    if has_bias:
                        for i in range(on):
                            orow[i] = brow[i]
                    else:
                        for i in range(on):
                            orow[i] = zero
                continue
            K = nb * b
            # Weights of this output block row side by side: wp[i, kk*b + j] multiplies input
            # element j of the kk-th live input block for output i. Zero past the input edge.
            wp = np.empty((b, K), dtype=v.dtype)
            for kk in range(nb):
                e = e0 + kk
                k = perm[e] if use_perm else e
                jn = min(b, n_in - idx[e] * b)
                q0 = kk * b
                blk = v[k]
                if trans:
                    # Contiguous writes, strided reads from the (L1-resident) block.
                    for i in range(b):
                        src = blk[:jn, i]
                        dst = wp[i, q0:q0 + b]
                        for j in range(jn):
                            dst[j] = src[j]
                else:
                    for i in range(b):
                        src = blk[i]
                        dst = wp[i, q0:q0 + b]
                        for j in range(jn):
                            dst[j] = src[j]
                for i in range(b):
                    dst = wp[i, q0:q0 + b]
                    for j in range(b - jn):
                        dst[jn + j] = zero
            KCe = min(KC, K)
            xp = np.empty((TT, KCe), dtype=v.dtype)
            acc = np.empty((TT, b), dtype=v.dtype)
            for t0 in range(s0, s1, TT):
                tn = min(TT, s1 - t0)
                tn4 = (tn + 3) // 4 * 4
                for q0 in range(0, K, KCe):
                    qn = min(KCe, K - q0)
                    # Pack the token tile's input slices for the blocks of this chunk.
                    for kq in range(qn // b):
                        cb = idx[e0 + q0 // b + kq]
                        for t in range(tn):
                            src = ab[cb, t0 + t]
                            dst = xp[t, kq * b:kq * b + b]
                            for j in range(b):
                                dst[j] = src[j]
                    for t in range(tn, tn4):
                        dst = xp[t]
                        for q in range(qn):
                            dst[q] = zero
                    first = q0 == 0
                    for ti in range(0, tn4, 4):
                        xr0 = xp[ti, :qn]
                        xr1 = xp[ti + 1, :qn]
                        xr2 = xp[ti + 2, :qn]
                        xr3 = xp[ti + 3, :qn]
                        for ii in range(0, b, 4):
                            wr0 = wp[ii, q0:q0 + qn]
                            wr1 = wp[ii + 1, q0:q0 + qn]
                            wr2 = wp[ii + 2, q0:q0 + qn]
                            wr3 = wp[ii + 3, q0:q0 + qn]
                            a00 = a01 = a02 = a03 = zero
                            a10 = a11 = a12 = a13 = zero
                            a20 = a21 = a22 = a23 = zero
                            a30 = a31 = a32 = a33 = zero
                            for q in range(qn):
                                x0 = xr0[q]
                                x1 = xr1[q]
                                x2 = xr2[q]
                                x3 = xr3[q]
                                w0 = wr0[q]
                                w1 = wr1[q]
                                w2 = wr2[q]
                                w3 = wr3[q]
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
                            if not first:
                                a00 += acc[ti, ii]
                                a01 += acc[ti, ii + 1]
                                a02 += acc[ti, ii + 2]
                                a03 += acc[ti, ii + 3]
                                a10 += acc[ti + 1, ii]
                                a11 += acc[ti + 1, ii + 1]
                                a12 += acc[ti + 1, ii + 2]
                                a13 += acc[ti + 1, ii + 3]
                                a20 += acc[ti + 2, ii]
                                a21 += acc[ti + 2, ii + 1]
                                a22 += acc[ti + 2, ii + 2]
                                a23 += acc[ti + 2, ii + 3]
                                a30 += acc[ti + 3, ii]
                                a31 += acc[ti + 3, ii + 1]
                                a32 += acc[ti + 3, ii + 2]
                                a33 += acc[ti + 3, ii + 3]
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
                for t in range(tn):
                    orow = out[t0 + t, o0:o0 + on]
                    arow = acc[t]
                    if has_bias:
                        for i in range(on):
                            orow[i] = arow[i] + brow[i]
                    else:
                        for i in range(on):
                            orow[i] = arow[i]


@njit(**_SERIAL)
def linear_forward(x, v, row_ptr, col_idx, bias, has_bias, out, rows, cols, b, TT, KC, MS, xb):
    """Forward: out (M, rows) = x (M, cols) @ W.T (+ bias); xb: scratch (ceil(cols/b), M, b)."""
    _to_blocks(x, cols, b, xb)
    _forward_core(xb, v, row_ptr, col_idx, col_idx, False, False, bias, has_bias, out, rows, cols, b, TT, KC, MS)


@njit(**_SERIAL)
def linear_grad_input(dy, v, col_ptr, row_idx, perm, out, rows, cols, b, TT, KC, MS, dyb):
    """Input gradient: out (M, cols) = dy (M, rows) @ W through the transposed index;
    dyb: scratch (ceil(rows/b), M, b)."""
    _to_blocks(dy, rows, b, dyb)
    _forward_core(dyb, v, col_ptr, row_idx, perm, True, True, np.empty(0, dtype=v.dtype), False, out, cols, rows, b,
              TT, KC, MS)


@njit(**_FLAGS)
def _grad_weight_core(dyt, xt, block_row, col_idx, out, rows, cols, b, MC):
    """out[k, i, j] = sum_t dyt[block_row[k], i, t] * xt[col_idx[k], j, t]; 0 past the edges."""
    M = dyt.shape[2]
    nnz = block_row.shape[0]
    zero = out.dtype.type(0)
    for k in prange(nnz):
        rb = block_row[k]
        cb = col_idx[k]
        rn = min(b, rows - rb * b)
        cn = min(b, cols - cb * b)
        o = out[k]
        if M == 0:
            for i in range(b):
                orow = o[i]
                for j in range(b):
                    orow[j] = zero
            continue
        d = dyt[rb]
        x = xt[cb]
        for m0 in range(0, M, MC):
            mn = min(MC, M - m0)
            first = m0 == 0
            for ii in range(0, b, 4):
                d0 = d[ii, m0:m0 + mn]
                d1 = d[ii + 1, m0:m0 + mn]
                d2 = d[ii + 2, m0:m0 + mn]
                d3 = d[ii + 3, m0:m0 + mn]
                for jj in range(0, b, 4):
                    x0 = x[jj, m0:m0 + mn]
                    x1 = x[jj + 1, m0:m0 + mn]
                    x2 = x[jj + 2, m0:m0 + mn]
                    x3 = x[jj + 3, m0:m0 + mn]
                    a00 = a01 = a02 = a03 = zero
                    a10 = a11 = a12 = a13 = zero
                    a20 = a21 = a22 = a23 = zero
                    a30 = a31 = a32 = a33 = zero
                    for t in range(mn):
                        u0 = d0[t]
                        u1 = d1[t]
                        u2 = d2[t]
                        u3 = d3[t]
                        y0 = x0[t]
                        y1 = x1[t]
                        y2 = x2[t]
                        y3 = x3[t]
                        a00 += u0 * y0
                        a01 += u0 * y1
                        a02 += u0 * y2
                        a03 += u0 * y3
                        a10 += u1 * y0
                        a11 += u1 * y1
                        a12 += u1 * y2
                        a13 += u1 * y3
                        a20 += u2 * y0
                        a21 += u2 * y1
                        a22 += u2 * y2
                        a23 += u2 * y3
                        a30 += u3 * y0
                        a31 += u3 * y1
                        a32 += u3 * y2
                        a33 += u3 * y3
                    if not first:
                        a00 += o[ii, jj]
                        a01 += o[ii, jj + 1]
                        a02 += o[ii, jj + 2]
                        a03 += o[ii, jj + 3]
                        a10 += o[ii + 1, jj]
                        a11 += o[ii + 1, jj + 1]
                        a12 += o[ii + 1, jj + 2]
                        a13 += o[ii + 1, jj + 3]
                        a20 += o[ii + 2, jj]
                        a21 += o[ii + 2, jj + 1]
                        a22 += o[ii + 2, jj + 2]
                        a23 += o[ii + 2, jj + 3]
                        a30 += o[ii + 3, jj]
                        a31 += o[ii + 3, jj + 1]
                        a32 += o[ii + 3, jj + 2]
                        a33 += o[ii + 3, jj + 3]
                    o[ii, jj] = a00
                    o[ii, jj + 1] = a01
                    o[ii, jj + 2] = a02
                    o[ii, jj + 3] = a03
                    o[ii + 1, jj] = a10
                    o[ii + 1, jj + 1] = a11
                    o[ii + 1, jj + 2] = a12
                    o[ii + 1, jj + 3] = a13
                    o[ii + 2, jj] = a20
                    o[ii + 2, jj + 1] = a21
                    o[ii + 2, jj + 2] = a22
                    o[ii + 2, jj + 3] = a23
                    o[ii + 3, jj] = a30
                    o[ii + 3, jj + 1] = a31
                    o[ii + 3, jj + 2] = a32
                    o[ii + 3, jj + 3] = a33
        # Exact zeros past the matrix edge (the zero-padded operands give +-0 there).
        for i in range(rn, b):
            orow = o[i]
            for j in range(b):
                orow[j] = zero
        for i in range(rn):
            orow = o[i]
            for j in range(b - cn):
                orow[cn + j] = zero


@njit(**_SERIAL)
def linear_grad_weight(dy, x, block_row, col_idx, out, rows, cols, b, MC, dyt, xt):
    """Weight gradient on live blocks: out[k] = dy[:, rows of k].T @ x[:, cols of k];
    dyt, xt: scratch (ceil(rows/b), b, M) and (ceil(cols/b), b, M)."""
    _to_blocks_t(dy, rows, b, dyt)
    _to_blocks_t(x, cols, b, xt)
    _grad_weight_core(dyt, xt, block_row, col_idx, out, rows, cols, b, MC)
