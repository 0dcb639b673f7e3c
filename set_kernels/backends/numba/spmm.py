"""Numba kernels for element sparsity (``block_size=1``): CSR SpMM, its transpose, and SDDMM (CPU).

At block size 1 a layout is a CSR matrix plus its transposed (CSC) index, and ``values (nnz, 1, 1)``
is read as ``(nnz,)``. The block kernels of :mod:`.bsmm` would pack one-wide blocks and run a
4 x 4 register tile over reductions a few entries long; these kernels are written for unstructured
sparsity instead.

Design:

* **Activations token-major.** Every kernel first transposes its dense operands from ``(M, n)``
  to ``(n, Mp)`` (a parallel copy, O(M * n), by ``VL x VL`` tiles transposed in registers;
  ``Mp`` is ``M`` rounded up to whole 64-byte vectors, the padding zeroed), so that the tokens of
  one feature are one contiguous run. Each live
  connection ``(r, c, w)`` then costs ``out[r, :] += w * in[c, :]`` over whole vectors of tokens:
  the gather is by feature, never by token.
* **Explicit vectors** (:mod:`.simd`). The inner loops are numba intrinsics that emit LLVM vector
  code directly: per live entry one broadcast of the weight and ``nv = Mp / VL`` vector loads and
  FMAs (``VL`` = 16 fp32 / 8 fp64 lanes), the row's accumulators kept in registers (two sets,
  even and odd entries). Written as numba loops over tokens, LLVM had vectorised them 64 tokens at
  a time with alias checks and a scalar remainder, so that a 40-token batch ran mostly scalar:
  the forward at width 1,000 (26 k entries, 40 tokens) went from about 80-110 to 50-65 us.
* **Token tiles.** Tokens are processed ``NV_MAX`` vectors (64 fp32 / 32 fp64) at a time, so that
  a row's accumulators fit the registers and the operand slice a tile touches stays in the
  caches.
* **One gather for both gradients.** When both ``dx`` and ``dW`` are needed, one pass over the
  transposed index gathers each live entry's ``dy`` row once and uses it twice: FMAs into the
  input feature's ``dx`` accumulators, and a dot product with the feature's own ``x`` run (held
  in registers) for ``dW`` (:func:`_backward_t`). That halves the gathers of a backward pass
  against the dX SpMM plus the SDDMM, which remain for the cases that need only one of them, and
  gives the same bits (the same summation order).
* **Prefetch at large widths.** When the gathered operand is larger than the per-core caches
  (``PREFETCH_MIN_BYTES``), the kernels ask for the operand rows of the entry
  ``PREFETCH_AHEAD`` positions on (and, through the transposed index, its permuted value) while
  the current one is summed, through LLVM's prefetch hint; below the threshold the hints cost
  more than they save.
* **Parallel over independent outputs, no atomics.** The forward owns output features (CSR rows),
  dX and the fused backward own input features through the transposed index (so every ``dx``
  element and every ``dW`` entry is written by one thread), and the SDDMM owns live entries. The
  forward and dX accumulate ``ROW_CHUNK`` features x one token tile in a small tile and write it
  straight into the row-major output, as contiguous segments of ``ROW_CHUNK`` values.
* **Token-major between layers.** :func:`_spmm_t` and :func:`_backward_t` can also store their
  tiles token-major (``tm_out``: ``(n_out, Mp)``, padding tokens zeroed), and
  :func:`act_grad_tm` takes the ReLU + dropout gradient in place on such an array. A run of fused
  layers (:func:`set_kernels.backends.numba.relu_dropout_chain_forward`) then keeps its
  activations token-major: each layer's output is already the next layer's transposed operand,
  for its forward and for its backward's ``dW``, and each ``dx`` already the transposed ``dy`` of
  the layer below. Two transposes per step remain (the run's input, the gradient of its output)
  where four per layer were made.
* **Exact sums.** The kernels built on the intrinsics are compiled without fastmath (numba would
  put fast-math flags on the intrinsics' instructions too, and LLVM would then reorder each
  kernel's sums its own way), and say so explicitly (``_EXACT``): a kernel that leaves the flag
  unset inherits it from the fast-math wrapper whose compilation first reaches it.

Cost: O(nnz * M) arithmetic plus O((rows + cols) * M) for the transposes and output writes, with no term in
``rows * cols``. All index arithmetic is in int64 (``nnz`` and ``n * M`` may pass 2**31).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .dropout import keep_element
from .simd import NV_MAX, READOUT_GROUP, VEC_BYTES, column_grads, copy_vectors, dot_entries, lanes, \
    outputs_accumulate, readout_grads, row_accumulate, transpose_act_tile, transpose_tile

_FLAGS = dict(parallel=True, fastmath=True, cache=True)
_SERIAL = dict(fastmath=True, cache=True)
# The kernels built on the intrinsics of .simd: without fastmath, because numba puts its fast-math
# flags on every floating-point instruction of a function, the intrinsics' own included, and LLVM
# would then reorder their sums differently in each kernel (the fused backward and the separate
# dX / dW kernels must agree bit for bit). The intrinsics already emit the FMAs they want.
# ``fastmath=False`` is given explicitly: a kernel that leaves it unset inherits the flag of the
# jitted function whose compilation first reaches it (the fast-math wrappers below, e.g.
# ``linear_backward``), and that variant is the one the dispatcher and the cache then keep for its
# signature: the kernels' sums and NaN tests then depended on which call compiled them first.
_EXACT = dict(parallel=True, fastmath=False, cache=True)
# Reassociation (vectorised sums) but IEEE comparisons: fast-math without "nnan" and "ninf", under
# which LLVM may take ``NaN > 0`` for true.
_REASSOC = dict(parallel=True, fastmath={"nsz", "arcp", "contract", "reassoc"}, cache=True)

# Output features per work item of the forward / dX kernels (one 64-byte fp32 segment per token).
ROW_CHUNK = 16
# Live entries per dW work item.
ENTRY_CHUNK = 1024
# From this many tokens the forward uses _spmm_long, with token tiles of LONG_TILE.
LONG_RUN_MIN = 256
LONG_TILE = 512
# Work items of the transposes: groups of this many vector-wide feature tiles (64 fp32 features,
# four cache lines of each row read), by this many tokens (transpose only).
_TILE_GROUP = 4
_TOKEN_BLOCK = 256
# Entries ahead whose operand rows are prefetched.
PREFETCH_AHEAD = 16
# Prefetch only when the gathered operand outgrows the per-core caches: below that the hints
# cost more than they save (measured about 10 % at width 1000).
PREFETCH_MIN_BYTES = 4 << 20


def padded_tokens(M: int, itemsize: int) -> int:
    """Row length of the transposed operands: ``M`` rounded up to whole vectors (:mod:`.simd`)."""
    vl = VEC_BYTES // itemsize
    return -(-M // vl) * vl


@njit(inline="always")
def _work_item(w, n_tiles, TM, M, RC, n_out):
    """``(t0, tn, o0, rc)`` of work item ``w`` of the forward / dX kernels: tokens ``t0:t0 + tn``
    of token tile ``w % n_tiles``, output features ``o0:o0 + rc`` of chunk ``w // n_tiles``."""
    oc = w // n_tiles
    t0 = np.int64(w - oc * n_tiles) * TM
    o0 = oc * RC
    return t0, min(TM, M - t0), o0, min(RC, n_out - o0)


@njit(inline="always")
def _store_tile(tile, out, t0, tn, o0, rc):
    """``out[t0 + t, o0 + i] = tile[i, t]`` for ``t < tn``, ``i < rc``: a kernel's ``(rc, tn)``
    token-major tile written into the row-major output. Whole vectors of features go as ``VL x VL``
    blocks transposed in registers (:func:`.simd.transpose_tile`; ``tile`` has whole vectors of
    tokens), the rest as row segments of one value at a time."""
    VL = lanes(out.itemsize)
    full = rc - rc % VL
    for k0 in range(0, full, VL):
        for tt in range(0, tn, VL):
            transpose_tile(tile, k0, tt, VL, out, t0 + tt, o0 + k0, min(VL, tn - tt))
    if full < rc:
        for t in range(tn):
            dst = out[t0 + t, o0:o0 + rc]
            for i in range(full, rc):
                dst[i] = tile[i, t]


# The forward's epilogue, ``act`` (int64 (4,)): ``[on, k0, k1, threshold]``. When ``on`` the
# output is ``relu(y) * scale`` where ``.dropout.keep_element(i, k0, k1, threshold)`` for its
# row-major index ``i``, else 0: what :mod:`.dropout`'s fused ReLU + dropout gives on ``y``.
NO_ACT = np.zeros(4, dtype=np.int64)


@njit(inline="always")
def _store_tile_tm(tile, outT, t0, tn, o0, rc, M):
    """``outT[o0 + i, t0 + t] = tile[i, t]`` for ``t < tn``, ``i < rc``, into a token-major
    ``outT (n_out, Mp)``; the padding tokens ``M:Mp`` of those rows are zeroed when this tile is
    the last one (the next kernel reads whole vectors of every row)."""
    zero = outT.dtype.type(0)
    pad = t0 + tn == M
    nv = (tn + lanes(outT.itemsize) - 1) // lanes(outT.itemsize)
    for i in range(rc):
        dst = outT[o0 + i]
        copy_vectors(tile[i], 0, dst, t0, nv)  # whole vectors: past tn only padding, zeroed below
        if pad:
            for t in range(M, outT.shape[1]):
                dst[t] = zero


@njit(inline="always")
def _apply_act(tile, t0, tn, o0, rc, n_out, act, scale):
    """The ReLU + dropout epilogue of ``act`` (see ``NO_ACT``) on a ``(rc, tn)`` token-major tile
    of an ``(M, n_out)`` output, in place (a loop over tokens, which vectorises: element ``(t, o)``
    has the row-major index ``t * n_out + o``)."""
    n_out = np.int64(n_out)
    zero = tile.dtype.type(0)
    s = tile.dtype.type(scale)
    k0, k1, threshold = act[1], act[2], act[3]
    first = np.int64(t0) * n_out + o0
    same_high = (first >> 32) == ((np.int64(t0 + tn - 1) * n_out + o0 + rc - 1) >> 32)
    for i in range(rc):
        row = tile[i]
        base = first + i
        if same_high:  # the usual case (fewer than 2**32 outputs): one key for the whole tile
            for t in range(tn):
                keep = keep_element(np.int64(t) * n_out + base, k0, k1, threshold, first)
                a = row[t]
                row[t] = (a if a > zero else zero) * s if keep else zero
        else:
            for t in range(tn):
                idx = np.int64(t) * n_out + base
                keep = keep_element(idx, k0, k1, threshold, idx)
                a = row[t]
                row[t] = (a if a > zero else zero) * s if keep else zero


@njit(inline="always")
def _finish_tile(tile, out, t0, tn, o0, rc, M, n_out, act, scale, tm_out):
    """The epilogue ``act`` (if on), then the tile into ``out``: row-major ``(M, n_out)``, or
    token-major ``(n_out, Mp)`` when ``tm_out``."""
    if act[0]:
        _apply_act(tile, t0, tn, o0, rc, n_out, act, scale)
    if tm_out:
        _store_tile_tm(tile, out, t0, tn, o0, rc, M)
    else:
        _store_tile(tile, out, t0, tn, o0, rc)


@njit(inline="always")
def _zero_padding(out, j_lo, j_vec, j_hi, M):
    """The padding tokens of rows ``j_lo:j_hi`` of a transposed ``out (n, Mp)`` that no tile wrote:
    from ``M`` rounded up to whole vectors for the rows of whole tiles (``j_lo:j_vec``, whose
    last tile wrote zeros up to there), from ``M`` for the rows copied one value at a time."""
    VL = lanes(out.itemsize)
    zero = out.dtype.type(0)
    t_vec = (M + VL - 1) // VL * VL
    for j in range(j_lo, j_hi):
        dst = out[j]
        for t in range(t_vec if j < j_vec else M, out.shape[1]):
            dst[t] = zero


@njit(**_EXACT)
def transpose(a, out):
    """``out[:, :M] = a (M, n).T`` and ``out[:, M:] = 0``, for ``out (n, Mp)`` with ``Mp >= M``.

    Work items are ``_TILE_GROUP`` tiles of ``VL`` features (one vector) by up to ``_TOKEN_BLOCK``
    tokens. Each ``VL x VL`` tile is read as ``VL`` row vectors of ``a`` and transposed in
    registers (:func:`.simd.transpose_tile`), so every load and store is a whole vector; a
    partial last token tile reads zeros past row ``M - 1`` and so writes the padding itself.
    Features past the last whole vector, or an ``out`` whose rows are not whole vectors, are
    copied one value at a time. The padding columns are zeroed, so that the vector loops may read
    whole vectors of every row. (At 40 x 4000 fp32 about 2x faster than the scalar copy by
    columns it replaced.)
    """
    M, n = a.shape
    Mp = out.shape[1]
    VL = lanes(out.itemsize)
    vec = Mp % VL == 0 and Mp >= M
    group = _TILE_GROUP * VL
    n_groups = (n + group - 1) // group
    n_blocks = max(1, (M + _TOKEN_BLOCK - 1) // _TOKEN_BLOCK)
    for w in prange(n_groups * n_blocks):
        fg = w // n_blocks
        tb = w - fg * n_blocks
        j_lo = fg * group
        j_hi = min(n, j_lo + group)
        j_vec = j_lo + (j_hi - j_lo) // VL * VL if vec else j_lo  # features of whole tiles: j_lo:j_vec
        t_lo = tb * _TOKEN_BLOCK
        t_hi = min(M, t_lo + _TOKEN_BLOCK)
        for t0 in range(t_lo, t_hi, VL):
            for j0 in range(j_lo, j_vec, VL):
                transpose_tile(a, t0, j0, min(VL, M - t0), out, j0, t0, VL)
        for j in range(j_vec, j_hi):
            dst = out[j]
            for t in range(t_lo, t_hi):
                dst[t] = a[t, j]
        if tb == n_blocks - 1:
            _zero_padding(out, j_lo, j_vec, j_hi, M)


@njit(**_EXACT)
def _spmm_t(aT, M, v, ptr, idx, perm, use_perm, bias, has_bias, out, RC, act, scale, tm_out):
    """``out (M, n_out) = (Op @ aT[:, :M]).T`` with Op sparse in compressed rows (or, when
    ``tm_out``, its token-major ``out (n_out, Mp) = Op @ aT``, padding tokens zero).

    Output feature ``o`` owns entries ``ptr[o]:ptr[o+1]``; entry ``e`` reads row ``idx[e]`` of
    ``aT (n_in, Mp)`` (rows zero-padded to whole vectors) with weight ``v[perm[e] if use_perm
    else e]``. ``bias (n_out,)`` is added when ``has_bias``. Work items are ``RC`` output
    features x one token tile (``NV_MAX`` vectors); each row of the tile is one
    :func:`.simd.row_accumulate` (the row's entries summed in vector registers), and the tile is
    written to ``out`` as ``RC``-wide contiguous row segments, so no transposed output has to be
    copied back. When ``use_perm`` is false ``perm`` must be an array as long as ``idx``.
    ``act``, ``scale``: the epilogue (``NO_ACT``: none).
    """
    n_out = ptr.shape[0] - 1
    if tm_out and (out.shape[0] != n_out or out.shape[1] != aT.shape[1]):
        raise ValueError("_spmm_t: a token-major output must be (n_out, Mp) with the operand's Mp")
    VL = lanes(aT.itemsize)
    TM = NV_MAX * VL
    if aT.shape[1] % VL != 0 or aT.shape[1] < M:
        raise ValueError("_spmm_t: aT rows must be padded to whole vectors")
    last = np.int64(idx.shape[0]) - 1
    n_tiles = (M + TM - 1) // TM
    n_chunks = (n_out + RC - 1) // RC
    n_items = n_chunks * n_tiles
    n_blocks = min(n_items, 256)  # one scratch tile per block of consecutive work items
    zero = v.dtype.type(0)
    pf = aT.shape[0] * aT.shape[1] * aT.itemsize >= PREFETCH_MIN_BYTES
    ahead = np.int64(PREFETCH_AHEAD)
    for blk in prange(n_blocks):
        tile = np.empty((RC, TM), dtype=v.dtype)
        for w in range(blk * n_items // n_blocks, (blk + 1) * n_items // n_blocks):
            t0, tn, o0, rc = _work_item(w, n_tiles, TM, M, RC, n_out)
            nv = (tn + VL - 1) // VL
            for i in range(rc):
                o = o0 + i
                b0 = bias[o] if has_bias else zero
                row_accumulate(tile[i], aT, idx, v, perm, use_perm, np.int64(ptr[o]), np.int64(ptr[o + 1]), t0,
                               np.int64(nv), b0, pf, last, ahead)
            _finish_tile(tile, out, t0, tn, o0, rc, M, n_out, act, scale, tm_out)


@njit(**_SERIAL)
def linear_forward(x, v, row_ptr, col_idx, bias, has_bias, y, xT, RC, act, scale):
    """Forward ``y (M, rows) = x (M, cols) @ W.T (+ bias)``, then the epilogue ``act``/``scale``
    (``NO_ACT``: none); ``xT (cols, Mp)`` scratch. Up to ``LONG_RUN_MIN`` tokens :func:`_spmm_t`
    (vector registers), from there :func:`_spmm_long`."""
    transpose(x, xT)
    if x.shape[0] >= LONG_RUN_MIN:
        _spmm_long(xT, x.shape[0], v, row_ptr, col_idx, bias, has_bias, y, LONG_TILE, RC, act, scale)
    else:
        _spmm_t(xT, x.shape[0], v, row_ptr, col_idx, col_idx, False, bias, has_bias, y, RC, act, scale, False)


@njit(**_FLAGS)
def _spmm_long(aT, M, v, ptr, idx, bias, has_bias, out, TM, RC, act, scale):
    """The forward for many tokens: ``out (M, n_out) = (W @ aT[:, :M]).T`` over CSR, ``TM`` tokens
    per tile, a row's entries consumed eight (then four, then one) at a time into an accumulator
    row in L1, ``acc += w0 * x0 + ... + w7 * x7`` as numba loops over the tokens, which LLVM
    vectorises well at these lengths. For 512 tokens this reads each gathered row as one long
    contiguous run (what the hardware prefetcher follows), where :func:`_spmm_t`'s 64-token
    tiles read it in 256-byte pieces: 4096 x 4096 at density 0.05, 18 against 25 ms."""
    n_out = ptr.shape[0] - 1
    n_tiles = (M + TM - 1) // TM
    n_chunks = (n_out + RC - 1) // RC
    n_items = n_chunks * n_tiles
    n_blocks = min(n_items, 256)
    zero = v.dtype.type(0)
    for blk in prange(n_blocks):
        tile = np.empty((RC, TM), dtype=v.dtype)
        for w in range(blk * n_items // n_blocks, (blk + 1) * n_items // n_blocks):
            t0, tn, o0, rc = _work_item(w, n_tiles, TM, M, RC, n_out)
            for i in range(rc):
                o = o0 + i
                acc = tile[i, :tn]
                b0 = bias[o] if has_bias else zero
                for t in range(tn):
                    acc[t] = b0
                e = np.int64(ptr[o])
                e1 = np.int64(ptr[o + 1])
                while e + 8 <= e1:
                    w0, w1, w2, w3 = v[e], v[e + 1], v[e + 2], v[e + 3]
                    w4, w5, w6, w7 = v[e + 4], v[e + 5], v[e + 6], v[e + 7]
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
                while e < e1:
                    w0 = v[e]
                    x0 = aT[idx[e], t0:t0 + tn]
                    for t in range(tn):
                        acc[t] += w0 * x0[t]
                    e += 1
            _finish_tile(tile, out, t0, tn, o0, rc, M, n_out, act, scale, False)


@njit(**_SERIAL)
def linear_grad_input(dy, v, col_ptr, row_idx, perm, dx, dyT, RC):
    """Input gradient ``dx (M, cols) = dy (M, rows) @ W`` through the transposed index."""
    transpose(dy, dyT)
    _spmm_t(dyT, dy.shape[0], v, col_ptr, row_idx, perm, True, v[:0], False, dx, RC, NO_ACT, 1.0, False)


@njit(**_EXACT)
def transpose_act_grad(dy, y, scale, out, dbias):
    """The gradient through the forward's ReLU + dropout epilogue, transposed: ``out[:, :M] =
    (dy * scale * (y > 0)).T``, ``out[:, M:] = 0``, and ``dbias[j] = sum_t out[j, t]`` (tokens in
    order), for ``dy, y (M, n)`` and ``out (n, Mp)``. ``y > 0`` exactly where the epilogue kept
    the element and its input was positive (as in :func:`.dropout.relu_dropout_grad`).

    Work items are ``_TILE_GROUP`` tiles of ``VL`` features, all tokens (each bias gradient is
    summed by one thread); each ``VL x VL`` tile is read as row vectors of ``dy`` and ``y``,
    masked, summed into the bias gradient and transposed in registers
    (:func:`.simd.transpose_act_tile`). Features past the last whole vector go one value at a
    time, the sums in the same order.
    """
    M, n = dy.shape
    Mp = out.shape[1]
    zero = out.dtype.type(0)
    s = out.dtype.type(scale)
    VL = lanes(out.itemsize)
    vec = Mp % VL == 0 and Mp >= M and M > 0
    group = _TILE_GROUP * VL
    for fg in prange((n + group - 1) // group):
        j_lo = fg * group
        j_hi = min(n, j_lo + group)
        j_vec = j_lo + (j_hi - j_lo) // VL * VL if vec else j_lo
        for t0 in range(0, M if j_vec > j_lo else 0, VL):
            for j0 in range(j_lo, j_vec, VL):
                transpose_act_tile(dy, y, t0, j0, min(VL, M - t0), s, out, j0, t0, dbias, t0 == 0)
        for j in range(j_vec, j_hi):
            dst = out[j]
            total = zero
            for t in range(M):
                g = dy[t, j] * s if y[t, j] > zero else zero
                dst[t] = g
                total += g
            dbias[j] = total
        _zero_padding(out, j_lo, j_vec, j_hi, M)


@njit(**_SERIAL)
def linear_backward(dy, x, v, col_ptr, row_idx, perm, row, col, need_dx, need_dv, dx, dv, dyT, xT, RC, EC,
                    y, scale, dbias):
    """Both gradients of the forward from one transpose of ``dy``: ``dx (M, cols) = dy @ W`` when
    ``need_dx`` and ``dv[e] = sum_t dy[t, row[e]] * x[t, col[e]]`` when ``need_dv``. When ``y``
    (the forward's output, ``(M, rows)``) is not empty, the forward had the ReLU + dropout
    epilogue: ``dy`` is the gradient of its output, taken back through it
    (:func:`transpose_act_grad`), and ``dbias (rows,)`` receives the bias gradient."""
    if y.shape[0] == dy.shape[0] and y.size > 0:
        transpose_act_grad(dy, y, scale, dyT, dbias)
    else:
        transpose(dy, dyT)
    if need_dv:
        transpose(x, xT)
    grads_t(dyT, xT, dy.shape[0], v, col_ptr, row_idx, perm, row, col, need_dx, need_dv, dx, dv, RC, EC, False)


@njit(**_SERIAL)
def grads_t(dyT, xT, M, v, col_ptr, row_idx, perm, row, col, need_dx, need_dv, dx, dv, RC, EC, tm_out):
    """The gradients from token-major operands ``dyT (rows, Mp)`` and ``xT (cols, Mp)`` (``xT``
    read only when ``need_dv``): ``dx = dy @ W`` when ``need_dx``, row-major ``(M, cols)`` or
    token-major ``(cols, Mp)`` when ``tm_out``, and ``dv[e] = dot(dyT[row[e]], xT[col[e]])``
    when ``need_dv``. Both from one pass (:func:`_backward_t`) when both are needed."""
    if need_dx and need_dv:
        _backward_t(dyT, xT, M, v, col_ptr, row_idx, perm, dx, dv, RC, tm_out)
    elif need_dx:
        _spmm_t(dyT, M, v, col_ptr, row_idx, perm, True, v[:0], False, dx, RC, NO_ACT, 1.0, tm_out)
    elif need_dv:
        _sddmm_t(dyT, xT, M, row, col, dv, EC)


@njit(**_REASSOC)
def act_grad_tm(gT, yT, M, scale, dbias):
    """:func:`transpose_act_grad` on operands already token-major, in place: ``gT[j, t] =
    gT[j, t] * scale if yT[j, t] > 0 else 0`` for ``t < M`` (NaN is not > 0), and ``dbias[j] =
    sum_t gT[j, t]``, for ``gT, yT (n, Mp)``; the padding tokens are left as they are. The sum is
    vectorised over tokens (partial sums, then added), so its order differs from the token order
    of :func:`transpose_act_grad`: a sum in token order over one feature's row would be a serial
    chain of additions per feature."""
    zero = gT.dtype.type(0)
    s = gT.dtype.type(scale)
    for j in prange(gT.shape[0]):
        g = gT[j]
        a = yT[j]
        total = zero
        for t in range(M):
            r = g[t] * s if a[t] > zero else zero
            g[t] = r
            total += r
        dbias[j] = total


@njit(**_EXACT)
def _backward_t(dyT, xT, M, v, col_ptr, row_idx, perm, dx, dv, RC, tm_out):
    """``dx (M, cols) = dy @ W`` and ``dv[e] = dot(dyT[row[e], :M], xT[col[e], :M])`` in one pass
    over the transposed index: each live entry's ``dyT`` row is gathered once and serves both
    (:func:`.simd.column_grads`), which halves the gathers of a backward pass against the dX
    SpMM plus the SDDMM. Work items are ``RC`` input features, all token tiles (so that every
    ``dv`` entry is summed over the tiles by one thread; no atomics); ``dx`` is written as in
    :func:`_spmm_t`: row-major ``(M, cols)``, or token-major ``(cols, Mp)`` when ``tm_out``."""
    n_in = col_ptr.shape[0] - 1
    VL = lanes(xT.itemsize)
    TM = NV_MAX * VL
    if xT.shape[1] % VL != 0 or dyT.shape[1] != xT.shape[1] or xT.shape[1] < M:
        raise ValueError("_backward_t: operand rows must be padded to the same whole vectors")
    if tm_out and (dx.shape[0] != n_in or dx.shape[1] != xT.shape[1]):
        raise ValueError("_backward_t: a token-major dx must be (cols, Mp) with the operands' Mp")
    last = np.int64(row_idx.shape[0]) - 1
    n_tiles = (M + TM - 1) // TM
    n_chunks = (n_in + RC - 1) // RC
    n_blocks = min(n_chunks, 256)
    pf = dyT.shape[0] * dyT.shape[1] * dyT.itemsize >= PREFETCH_MIN_BYTES
    ahead = np.int64(PREFETCH_AHEAD)
    for blk in prange(n_blocks):
        tile = np.empty((RC, TM), dtype=v.dtype)
        for ic in range(blk * n_chunks // n_blocks, (blk + 1) * n_chunks // n_blocks):
            c0 = ic * RC
            rc = min(RC, n_in - c0)
            for tt in range(n_tiles):
                t0 = np.int64(tt) * TM
                tn = min(TM, M - t0)
                nv = (tn + VL - 1) // VL
                for i in range(rc):
                    c = np.int64(c0 + i)
                    column_grads(tile[i], dyT, xT, c, row_idx, v, perm, dv, np.int64(col_ptr[c]),
                                 np.int64(col_ptr[c + 1]), t0, np.int64(nv), tt == 0, pf, last, ahead)
                _finish_tile(tile, dx, t0, tn, c0, rc, M, n_in, NO_ACT, 1.0, tm_out)


@njit(**_EXACT)
def _sddmm_t(dyT, xT, M, row, col, out, EC):
    """``out[e] = dot(dyT[row[e], :M], xT[col[e], :M])`` for every live entry ``e``; both operands'
    rows zero-padded to whole vectors (:func:`.simd.dot_entries`, ``EC`` entries per work item)."""
    VL = lanes(xT.itemsize)
    if xT.shape[1] % VL != 0 or dyT.shape[1] != xT.shape[1] or xT.shape[1] < M:
        raise ValueError("_sddmm_t: operand rows must be padded to the same whole vectors")
    nnz = np.int64(row.shape[0])
    nv = np.int64((M + VL - 1) // VL)
    n_chunks = (nnz + EC - 1) // EC
    pf = xT.shape[0] * xT.shape[1] * xT.itemsize >= PREFETCH_MIN_BYTES
    ahead = np.int64(PREFETCH_AHEAD)
    for c in prange(n_chunks):
        e0 = np.int64(c) * EC
        e1 = min(nnz, e0 + EC)
        dot_entries(dyT, xT, row, col, out, e0, e1, nv, pf, nnz - 1, ahead)


@njit(**_SERIAL)
def linear_grad_weight(dy, x, row, col, out, dyT, xT, EC):
    """Weight gradient on live entries: ``out[e] = sum_t dy[t, row[e]] * x[t, col[e]]``."""
    transpose(dy, dyT)
    transpose(x, xT)
    _sddmm_t(dyT, xT, dy.shape[0], row, col, out, EC)


# ---------------------------------------------------------------------- dense readout of a fused run
# Most outputs of a dense readout that a fused run takes in (:func:`readout_forward_t`).
READOUT_MAX = 16
# Input features per work item of the readout's forward (each item sums them into its own
# partial output; the partials are added in order, so the sums do not depend on the threads).
READOUT_CHUNK = 512


def readout_chunks(n_in: int) -> int:
    """Partial outputs of :func:`readout_forward_t` for ``n_in`` input features."""
    return max(1, -(-n_in // READOUT_CHUNK))


@njit(**_EXACT)
def readout_forward_t(aT, M, w, bias, has_bias, out, part):
    """``out (M, n_out) = (w @ aT[:, :M]).T (+ bias)``: a dense layer ``w (n_out, n_in)`` on the
    token-major ``aT (n_in, Mp)`` (the output of a fused run's last layer, rows zero-padded to
    whole vectors), ``n_out <= READOUT_MAX``.

    Work items are ``READOUT_CHUNK`` input features x one group of up to ``READOUT_GROUP``
    outputs x one token tile (:func:`.simd.outputs_accumulate`: each operand row is loaded once
    per group); each chunk's sums go to ``part (readout_chunks(n_in), n_out, Mp)``, and
    ``out[t, o] = bias[o] + part[0, o, t] + part[1, o, t] + ...`` in chunk order, so the result
    does not depend on the number of threads."""
    n_out, n_in = w.shape
    VL = lanes(aT.itemsize)
    TM = NV_MAX * VL
    if aT.shape[0] != n_in or aT.shape[1] % VL != 0 or aT.shape[1] < M or n_out > READOUT_MAX:
        raise ValueError("readout_forward_t: aT must be (n_in, Mp), rows padded to whole vectors; n_out <= READOUT_MAX")
    n_chunks = (n_in + READOUT_CHUNK - 1) // READOUT_CHUNK
    if part.shape[0] < n_chunks or part.shape[1] < n_out or part.shape[2] != aT.shape[1]:
        raise ValueError("readout_forward_t: part must be (readout_chunks(n_in), n_out, Mp)")
    n_tiles = (M + TM - 1) // TM
    n_groups = (n_out + READOUT_GROUP - 1) // READOUT_GROUP
    gs = (n_out + n_groups - 1) // max(n_groups, 1)
    per_chunk = n_groups * n_tiles
    for it in prange(n_chunks * per_chunk):
        c = it // per_chunk
        grp = (it - c * per_chunk) // n_tiles
        t0 = np.int64(it - c * per_chunk - grp * n_tiles) * TM
        o0 = grp * gs
        f0 = np.int64(c) * READOUT_CHUNK
        outputs_accumulate(part[c], w, o0, min(gs, n_out - o0), aT, f0, min(n_in, f0 + READOUT_CHUNK), t0,
                           (min(TM, M - t0) + VL - 1) // VL)
    zero = w.dtype.type(0)
    for t in range(M):
        for o in range(n_out):
            s = bias[o] if has_bias else zero
            for c in range(n_chunks):
                s += part[c, o, t]
            out[t, o] = s


@njit(**_EXACT)
def readout_backward_t(dyT, aT, M, w, scale, dhT, dw, need_dw, dbias):
    """The gradients of :func:`readout_forward_t` when its input ``aT`` is the output of a ReLU +
    dropout epilogue with ``scale``: from ``dyT (n_out, Mp)``, the transposed gradient of ``out``
    (padding tokens zero),

    * ``dhT (n_in, Mp)``: the gradient of the epilogue's input, token-major (``(dy @ w) * scale``
      where ``aT > 0``, else 0; padding tokens zero), and ``dbias (n_in,)`` its sum over tokens
      (the bias gradient of the layer below);
    * ``dw (n_out, n_in) = dy.T @ a`` when ``need_dw``.

    Work items are ``_TILE_GROUP`` blocks of ``VL`` input features (:func:`.simd.readout_grads`),
    so every value is written by one thread; the sums do not depend on the number of threads."""
    n_out, n_in = w.shape
    VL = lanes(aT.itemsize)
    Mp = aT.shape[1]
    if (aT.shape[0] != n_in or Mp % VL != 0 or Mp < M or dyT.shape[0] != n_out or dyT.shape[1] != Mp
            or dhT.shape[0] != n_in or dhT.shape[1] != Mp or dbias.shape[0] != n_in
            or (need_dw and (dw.shape[0] != n_out or dw.shape[1] != n_in))):
        raise ValueError("readout_backward_t: the operands' shapes do not match")
    n_blocks = (n_in + VL - 1) // VL
    n_items = (n_blocks + _TILE_GROUP - 1) // _TILE_GROUP
    nvt = Mp // VL
    for it in prange(n_items):
        tile = np.empty((n_out, VL), dtype=w.dtype)
        for blk in range(it * _TILE_GROUP, min(n_blocks, (it + 1) * _TILE_GROUP)):
            f0 = np.int64(blk) * VL
            nf = min(VL, n_in - f0)
            readout_grads(tile, dhT, w, dyT, aT, scale, dbias, f0, nf, nvt, need_dw)
            if need_dw:
                for o in range(n_out):
                    if nf == VL:
                        copy_vectors(tile[o], 0, dw[o], f0, 1)
                    else:
                        for i in range(nf):
                            dw[o, f0 + i] = tile[o, i]
