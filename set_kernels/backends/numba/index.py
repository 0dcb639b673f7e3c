"""Numba builders of a layout's packed index on the CPU, in O(nnz + R + C) (counting, no sort).

:class:`set_kernels.layout.BlockSparseLayout` builds its index with torch ops on any device: a
``repeat_interleave`` for the block rows, a stable sort of the columns for the transposed (CSC)
order and a ``searchsorted`` for its offsets. On the CPU these single passes give the same int32
tensor: a SET update rebuilds every layer's layout, and the sort was about half of a
26,000-entry rebuild (0.9 of 2.1 ms) and most of a 26-million-entry one.

Inputs are trusted (the layout checks hand-made CSR before it gets here): ``row_ptr`` starts at 0,
is non-decreasing and ends at ``nnz``; ``col_idx`` is in ``[0, C)`` and ascending within a row.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


# Entries per row part of pack_index's parallel counting sort: at least this many per column, so
# that the per-part column counts (one int64 per column and part) stay small against the entries.
PACK_ENTRIES_PER_COLUMN = 4


@njit(parallel=True, cache=True)
def pack_index(row_ptr, col_idx, n_cols, out, n_threads):
    """Write ``(row_ptr, col_idx, block_row, col_ptr, row_idx, perm)`` into ``out`` (int32, of
    length ``(R + 1) + (C + 1) + 4 * nnz``); ``row_ptr (R + 1,)`` and ``col_idx (nnz,)`` int64;
    ``n_threads``: the most row parts to use.

    The CSC order is a counting sort of the columns that visits the entries in CSR order, so it is
    stable: within a column, rows ascend (what ``torch.sort(col_idx, stable=True)`` gives). In
    parallel over row parts when there are many entries per column (a SET update at width
    1,000,000, 26 M entries: about 1.5 s serially): each part counts its entries per column, the
    parts' slots in a column follow one another in row order, and each part then writes its own
    entries, so the result is the serial one.
    """
    n_rows = row_ptr.shape[0] - 1
    nnz = col_idx.shape[0]
    o_ci = n_rows + 1
    o_br = o_ci + nnz
    o_cp = o_br + nnz
    o_ri = o_cp + n_cols + 1
    o_pm = o_ri + nnz
    n_parts = max(1, min(n_threads, nnz // (PACK_ENTRIES_PER_COLUMN * (n_cols + 1))))
    # rows of each part: about nnz / n_parts entries each
    bounds = np.empty(n_parts + 1, dtype=np.int64)
    bounds[0] = 0
    r = 0
    for t in range(1, n_parts):
        target = nnz * t // n_parts
        while r < n_rows and row_ptr[r] < target:
            r += 1
        bounds[t] = r
    bounds[n_parts] = n_rows
    counts = np.zeros((n_parts, n_cols + 1), dtype=np.int64)
    for t in prange(n_parts):
        cnt = counts[t]
        for e in range(row_ptr[bounds[t]], row_ptr[bounds[t + 1]]):
            cnt[col_idx[e]] += 1
    # slots: column c's entries of part t start after those of the columns before c and of the
    # parts before t in column c
    run = np.int64(0)
    for c in range(n_cols):
        out[o_cp + c] = run
        for t in range(n_parts):
            q = counts[t, c]
            counts[t, c] = run
            run += q
    out[o_cp + n_cols] = run
    for r in range(n_rows + 1):
        out[r] = row_ptr[r]
    for t in prange(n_parts):
        nxt = counts[t]
        for r in range(bounds[t], bounds[t + 1]):
            for e in range(row_ptr[r], row_ptr[r + 1]):
                c = col_idx[e]
                out[o_ci + e] = c
                out[o_br + e] = r
                q = nxt[c]
                nxt[c] = q + 1
                out[o_ri + q] = r
                out[o_pm + q] = e


@njit(cache=True)
def csr_from_flat(flat, n_cols, row_ptr, col_idx):
    """``row_ptr (R + 1,)`` and ``col_idx (nnz,)`` (int64) of sorted, distinct flat positions
    ``r * C + c`` (int64)."""
    n_rows = row_ptr.shape[0] - 1
    nnz = flat.shape[0]
    r = 0
    row_ptr[0] = 0
    for e in range(nnz):
        row = flat[e] // n_cols
        while r < row:
            r += 1
            row_ptr[r] = e
        col_idx[e] = flat[e] - row * n_cols
    while r < n_rows:
        r += 1
        row_ptr[r] = nnz


# Bits per digit of sort_positions' radix passes (2,048 counters: they stay in L1).
RADIX_BITS = 11
# Below this many keys sort_positions uses np.sort.
RADIX_MIN = 256


@njit(cache=True)
def sort_positions(a):
    """``np.sort(a)`` for non-negative int64 keys ``a`` (a new array): an LSD radix sort in
    ``RADIX_BITS``-bit digits, as many passes as the largest key needs (2 for keys below 2**22,
    the positions of a 2,048 x 2,048 layer; 4 for a 1,000,000 x 1,000,000 one). O(n) per pass;
    numba's ``np.sort`` (a quicksort) was most of a SET update's draw merge (480 us of 8,700
    keys at width 1,000)."""
    n = a.shape[0]
    if n < RADIX_MIN:
        return np.sort(a)
    top = a.max()
    bits = 0
    while bits < 63 and (top >> bits) > 0:
        bits += 1
    radix = 1 << RADIX_BITS
    mask = radix - 1
    src = a.copy()
    dst = np.empty_like(src)
    count = np.empty(radix, dtype=np.int64)
    for shift in range(0, bits, RADIX_BITS):
        count[:] = 0
        for i in range(n):
            count[(src[i] >> shift) & mask] += 1
        total = 0
        for d in range(radix):
            c = count[d]
            count[d] = total
            total += c
        for i in range(n):
            key = src[i]
            d = (key >> shift) & mask
            dst[count[d]] = key
            count[d] += 1
        src, dst = dst, src
    return src


@njit(parallel=True, cache=True)
def flat_positions(block_row, col_idx, n_cols, out):
    """``out[e] = block_row[e] * n_cols + col_idx[e]`` in int64 (the live positions in CSR order)."""
    for e in prange(out.shape[0]):
        out[e] = np.int64(block_row[e]) * n_cols + col_idx[e]


@njit(parallel=True, cache=True)
def gather_or_zero(src, order, fresh, out):
    """``out[p, :] = 0 if fresh[p] else src[order[p], :]`` for ``src, out (n, m)`` of any element
    type (e.g. the raw bits of a float tensor): a SET update's permutation of values and
    optimizer state."""
    n, m = out.shape
    zero = out.dtype.type(0)
    if m == 1:  # element layers: one flat loop (the general one took 7x as long at 104 k entries)
        src1, out1 = src.reshape(n), out.reshape(n)
        for p in prange(n):
            out1[p] = zero if fresh[p] else src1[order[p]]
        return
    chunk = max(1, (1 << 14) // max(m, 1))
    for c in prange((n + chunk - 1) // chunk):
        for p in range(c * chunk, min(n, (c + 1) * chunk)):
            if fresh[p]:
                for j in range(m):
                    out[p, j] = zero
            else:
                q = order[p]
                for j in range(m):
                    out[p, j] = src[q, j]


@njit(cache=True)
def _is_sorted(a) -> bool:
    for i in range(1, a.shape[0]):
        if a[i] < a[i - 1]:
            return False
    return True


@njit(cache=True)
def merge_update(flat, prune_idx, grow_flat, new_flat, order, fresh):
    """The layout after a SET update, without a sort of all its entries.

    ``flat (nnz,)``: the live positions ``r * C + c``, sorted; ``prune_idx (k,)``: the slots
    pruned; ``grow_flat (k,)``: the positions regrown (distinct, none live before; any order,
    sorted as :func:`set_kernels.layout.sample_positions` gives them, which skips a sort).
    Writes ``new_flat (nnz,)``, the new live positions sorted; ``order (nnz,)``, the old slot of
    each new entry (a kept entry's own slot; for the ``j``-th smallest regrown one,
    ``prune_idx[j]``); and ``fresh (nnz,)``, True at the regrown entries. ``torch.sort`` of the
    old positions with the pruned slots overwritten by the regrown ones gives the same
    ``new_flat`` and ``fresh``, and the same ``order`` at every entry that is not fresh.
    O(nnz + k log k).

    Both passes are branch-free (the kept entries compacted, then a merge of two sorted runs that
    end in a sentinel): the branches of a merge of random positions are taken at random, and the
    mispredictions made the earlier branchy loops twice as slow (104,000 entries, 31,200
    regrown: 0.80 against 0.40 ms, with the sort that sorted input now skips).
    """
    nnz = flat.shape[0]
    k = prune_idx.shape[0]
    n_kept = nnz - k
    pruned = np.zeros(nnz, dtype=np.bool_)
    for j in range(k):
        pruned[prune_idx[j]] = True
    big = np.int64(0x7FFFFFFFFFFFFFFF)  # past every position
    kept = np.empty(n_kept + 1, dtype=np.int64)
    slot = np.empty(n_kept + 1, dtype=np.int64)
    n = 0
    for i in range(nnz):  # every entry written, the count advanced past the kept ones
        kept[n] = flat[i]
        slot[n] = i
        n += 1 - np.int64(pruned[i])
    kept[n_kept] = big
    grow = np.empty(k + 1, dtype=np.int64)
    if _is_sorted(grow_flat):
        grow[:k] = grow_flat
    else:
        grow[:k] = sort_positions(grow_flat)
    grow[k] = big
    last = max(k - 1, 0)  # prune_idx is read only where a regrown entry is taken (j < k): clamped for k = 0
    i = 0
    j = 0
    for p in range(nnz):
        a = kept[i]
        b = grow[j]
        g = b < a  # never both sentinels: p < nnz = kept + regrown
        new_flat[p] = b if g else a
        order[p] = prune_idx[min(j, last)] if g else slot[i]
        fresh[p] = g
        j += np.int64(g)
        i += 1 - np.int64(g)


@njit(cache=True)
def _order_key(bits):
    """A float32's bits (as int64, 0 <= bits < 2**32) mapped to an unsigned key with the
    float order (-0.0 taken as +0.0: they compare equal); -1 for a NaN."""
    if (bits & 0x7F800000) == 0x7F800000 and (bits & 0x7FFFFF) != 0:
        return np.int64(-1)
    if bits == 0x80000000:
        bits = np.int64(0)
    if bits & 0x80000000:
        return np.int64(0xFFFFFFFF) ^ bits  # negative: larger magnitude, smaller key
    return bits | np.int64(0x80000000)


@njit(cache=True)
def _digit_of_rank(count, rank, below):
    """The digit whose bucket of ``count`` holds the ``rank``-th key (1-based), with the rank
    within that bucket and ``below`` plus the keys of the buckets before it."""
    d = np.int64(0)
    while rank > count[d]:
        rank -= count[d]
        below += count[d]
        d += 1
    return d, rank, below


@njit(cache=True)
def smallest_k(score_bits, k, out):
    """The indices of the ``k`` smallest of ``score_bits`` (the int32 view of a float32 score),
    ascending, into ``out (k,)`` int64, when that set is unique; returns False (``out`` not
    written) when it is not (a tie at the ``k``-th value across the boundary) or a score is NaN.

    Where it returns True the set is what ``torch.topk(score, k, largest=False)`` gives, whatever
    its order: a radix select (three passes of 11, 11 and 10 bits find the ``k``-th key, a fourth
    collects; the last two digits are counted among the candidates the first one leaves), O(n),
    instead of topk's partial sort. ``1 <= k <= n``.
    """
    n = score_bits.shape[0]
    keys = np.empty(n, dtype=np.uint32)
    # the counts of the keys' top 11 bits, in four interleaved sets (many keys share a few top
    # digits: one set made a chain of increments of the same counter)
    sub = np.zeros((4, 2048), dtype=np.int64)
    for i in range(n):
        key = _order_key(np.int64(score_bits[i]) & 0xFFFFFFFF)
        if key < 0:
            return False
        keys[i] = key
        sub[i & 3, key >> 21] += 1
    count = np.empty(2048, dtype=np.int64)
    for d in range(2048):
        count[d] = sub[0, d] + sub[1, d] + sub[2, d] + sub[3, d]
    # rank: the rank wanted among the keys with the prefix found so far; below: the keys smaller
    # than every key with that prefix
    d, rank, below = _digit_of_rank(count, np.int64(k), np.int64(0))
    prefix = d
    # the keys with that prefix (the candidates), then two more digits among them only
    cand = np.empty(count[d], dtype=np.int64)
    m = 0
    for i in range(n):
        key = np.int64(keys[i])
        if (key >> 21) == prefix:
            cand[m] = key
            m += 1
    for shift, width in ((10, 11), (0, 10)):
        count[:] = 0
        mask = (np.int64(1) << width) - 1
        for j in range(m):
            key = cand[j]
            if (key >> (shift + width)) == prefix:
                count[(key >> shift) & mask] += 1
        d, rank, below = _digit_of_rank(count, rank, below)
        prefix = (prefix << width) | d
    if below + count[d] != k:
        return False  # the k-th key is tied with keys past the boundary: the set is not unique
    j = 0
    for i in range(n):
        if np.int64(keys[i]) <= prefix:
            out[j] = i
            j += 1
    return True


@njit(cache=True)
def merge_draws(have, cand, exclude):
    """The sorted distinct union of ``have`` (sorted, distinct) and ``cand`` (any order, repeats
    allowed), without the positions in ``exclude`` (sorted, distinct); int64. What
    ``torch.unique(torch.cat([have, cand]))`` followed by dropping ``exclude`` gives, in
    O(len(have) + len(exclude) + len(cand) log len(cand))."""
    c = sort_positions(cand)
    out = np.empty(have.shape[0] + c.shape[0], dtype=np.int64)
    n = 0
    i = 0
    j = 0
    x = 0
    n_have, n_c, n_ex = have.shape[0], c.shape[0], exclude.shape[0]
    while i < n_have or j < n_c:
        if j >= n_c or (i < n_have and have[i] <= c[j]):
            v = have[i]
            i += 1
        else:
            v = c[j]
            j += 1
        if n > 0 and out[n - 1] == v:
            continue
        while x < n_ex and exclude[x] < v:
            x += 1
        if x < n_ex and exclude[x] == v:
            continue
        out[n] = v
        n += 1
    return out[:n].copy()


@njit(cache=True)
def select_sorted(have, keep):
    """``sort(have[keep])`` for sorted ``have`` and distinct indices ``keep``, in O(len(have))."""
    take = np.zeros(have.shape[0], dtype=np.bool_)
    for j in range(keep.shape[0]):
        take[keep[j]] = True
    out = np.empty(keep.shape[0], dtype=np.int64)
    n = 0
    for i in range(have.shape[0]):
        if take[i]:
            out[n] = have[i]
            n += 1
    return out
