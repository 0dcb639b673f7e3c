"""Explicit-vector inner loops of the element kernels (:mod:`.spmm`), written as numba intrinsics.

LLVM does not vectorise the element kernels' inner loops well when they are written as numba
loops over tokens: a loop ``acc[t] += w * x[t]`` of runtime length (the batch) gets a 64-token
vector body that a 40-token batch never enters, alias checks between the accumulator and every
gathered row, and a scalar remainder. These intrinsics emit the loops directly in LLVM IR with
vectors of one cache line (16 fp32 or 8 fp64 lanes, ``VL``): each live entry costs one broadcast
of its weight and ``nv`` vector loads and FMAs, with the accumulators in registers for the whole
row.

Contract (the callers in :mod:`.spmm` keep it; nothing is checked here, as in any kernel):

* the dense operands are C-contiguous 2-D arrays whose rows are padded with zeros to a multiple
  of ``VL`` values, so that ``nv = ceil(M / VL)`` whole vectors can be loaded from every row
  (see :func:`lanes`);
* index arrays are 1-D integer arrays (any width), values 1-D, all of one float dtype;
* every index read is in range (the ops check the layout once per index tensor).

**Editing this file:** numba's compile cache keys a kernel on its own source file. The
per-user cache of this backend also stamps the kernels with this file's digest
(``INLINED_SOURCES``), so they are recompiled; numba's own cache locations
(``$NUMBA_CACHE_DIR``) do not: clear them when this file changes.

**Tile transposes** (:func:`transpose_tile`, :func:`transpose_act_tile`): a ``VL x VL`` tile is
read as ``VL`` row vectors and transposed in registers by ``log2(VL)`` rounds of two-source
shuffles, so that a transpose moves whole vectors instead of one value at a time.

Prefetching (``pf``): at large widths every gathered row is a cache miss, so the rows of the
entry ``ahead`` positions on (clamped at ``last``) are requested while the current one is summed,
through LLVM's prefetch hint; below that size the hints cost more than they save.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# Vector width in bytes (one cache line; one AVX-512 register, two AVX2 ones).
VEC_BYTES = 64
# Most vectors per row of one row_accumulate call: token tiles of 64 fp32 / 32 fp64 values.
NV_MAX = 4

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


@njit(inline="always")
def lanes(itemsize):
    """Values per vector for an element size in bytes (16 for fp32, 8 for fp64)."""
    return VEC_BYTES // itemsize


def _prefetch(builder, ptr) -> None:
    i8p = ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]),
                                        "llvm.prefetch.p0")
    # read, keep in all cache levels, data
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


class _Gen:
    """IR helpers shared by the intrinsics: typed loads, vectors of ``dtype``, FMA, reduction."""

    def __init__(self, context, builder, dtype):
        self.c, self.b = context, builder
        self.elt = context.get_value_type(dtype)
        self.itemsize = context.get_abi_sizeof(self.elt)
        self.VL = VEC_BYTES // self.itemsize
        self.vty = ir.VectorType(self.elt, self.VL)
        name = f"llvm.fma.v{self.VL}f{self.itemsize * 8}"
        self.fma_fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(self.vty, [self.vty] * 3), name)
        self.zero = ir.Constant(self.vty, [ir.Constant(self.elt, 0.0)] * self.VL)

    def arg(self, val, ty, to):
        return self.c.cast(self.b, val, ty, to)

    def array(self, ty, val):
        return self.c.make_array(ty)(self.c, self.b, val)

    def index(self, arr, ty, e):
        """``arr[e]`` of a 1-D integer array, as int64."""
        val = self.b.load(self.b.gep(arr.data, [e]))
        return self.c.cast(self.b, val, ty.dtype, types.int64)

    def row_stride(self, arr):
        """Row stride of a C-contiguous 2-D array, in elements."""
        return self.b.sdiv(cgutils.unpack_tuple(self.b, arr.strides)[0], ir.Constant(_I64, self.itemsize))

    def splat(self, x):
        b = self.b
        u = ir.Constant(self.vty, ir.Undefined)
        v0 = b.insert_element(u, x, ir.Constant(_I32, 0))
        return b.shuffle_vector(v0, u, ir.Constant(ir.VectorType(_I32, self.VL), [0] * self.VL))

    def vload(self, base, k):
        p = self.b.gep(base, [k if isinstance(k, ir.Value) else ir.Constant(_I64, k * self.VL)])
        return self.b.load(self.b.bitcast(p, self.vty.as_pointer()), align=self.itemsize)

    def vstore(self, val, base, k):
        p = self.b.gep(base, [k if isinstance(k, ir.Value) else ir.Constant(_I64, k * self.VL)])
        self.b.store(val, self.b.bitcast(p, self.vty.as_pointer()), align=self.itemsize)

    def fma(self, a, x, acc):
        return self.b.call(self.fma_fn, [a, x, acc])

    def hsum(self, v):
        """Sum of the lanes of ``v`` (a halving tree)."""
        b, n = self.b, self.VL
        while n > 1:
            n //= 2
            lo = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
            hi = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
            v = b.fadd(lo, hi)
        return b.extract_element(v, ir.Constant(_I32, 0))

    def tile_dot(self, ds, xs):
        """``sum_k ds[k] * xs[k]`` as one vector: a product, then FMAs in order of ``k`` (the
        order every dot of one token tile uses, so that all kernels agree bit for bit)."""
        dot = self.b.fmul(ds[0], xs[0])
        for d, x in zip(ds[1:], xs[1:]):
            dot = self.fma(d, x, dot)
        return dot

    def per_nv(self, nv, name, body, top=NV_MAX, default=None):
        """A switch on ``nv``: ``body(n)`` emits the code for ``n`` vectors, ``1 <= n <= top``;
        ``default()`` the code for other values (None: they do nothing)."""
        b = self.b
        end = b.append_basic_block(f"{name}.end")
        other = end if default is None else b.append_basic_block(f"{name}.other")
        switch = b.switch(nv, other)
        for n in range(1, top + 1):
            block = b.append_basic_block(f"{name}.nv{n}")
            switch.add_case(ir.Constant(_I64, n), block)
            b.position_at_end(block)
            body(n)
            b.branch(end)
        if default is not None:
            b.position_at_end(other)
            default()
            b.branch(end)
        b.position_at_end(end)

    def per_flag(self, flag, body, likely=None):
        """``body(value)`` emitted once for each value of the runtime boolean ``flag``, behind one
        test: the code of each case tests no flag inside it."""
        with self.b.if_else(flag, likely=likely) as (yes, no):
            for value, block in ((True, yes), (False, no)):
                with block:
                    body(value)

    def per_flags(self, flag, pf, loop):
        """``loop(value, prefetch)`` for each value of the runtime booleans ``flag`` and ``pf``
        (``pf`` rarely true): :meth:`per_flag` twice."""
        self.per_flag(flag, lambda value: self.per_flag(pf, lambda prefetch: loop(value, prefetch), likely=False))

    def row_sums(self, n, init, e0, e1, entry, out):
        """``entry(e, accs)`` for ``e0 <= e < e1`` in order, ``accs`` alternating between two sets
        of ``n`` vector accumulators (even and odd entries: half the FMA dependency chain; the
        even set starts at the vector ``init``, the odd at 0); stores their sums to ``out[:n*VL]``."""
        b = self.b
        even = [cgutils.alloca_once_value(b, init) for _ in range(n)]
        odd = [cgutils.alloca_once_value(b, self.zero) for _ in range(n)]
        two = ir.Constant(_I64, 2)
        count = b.sub(e1, e0)
        pairs = b.sdiv(count, two)
        with cgutils.for_range(b, pairs) as loop:
            e = b.add(e0, b.mul(loop.index, two))
            entry(e, even)
            entry(b.add(e, ir.Constant(_I64, 1)), odd)
        with b.if_then(b.icmp_signed("!=", b.mul(pairs, two), count)):
            entry(b.sub(e1, ir.Constant(_I64, 1)), even)
        for k, (x, y) in enumerate(zip(even, odd)):
            self.vstore(b.fadd(b.load(x), b.load(y)), out, k)

    def prefetch_vectors(self, base, n) -> None:
        """Prefetch the ``n`` vectors (cache lines) from ``base``."""
        for k in range(n):
            _prefetch(self.b, self.b.gep(base, [ir.Constant(_I64, k * self.VL)]))

    def clamp(self, e, ahead, last):
        f = self.b.add(e, ahead)
        return self.b.select(self.b.icmp_signed("<", f, last), f, last)


def _floats_match(*arrays) -> bool:
    return all(isinstance(a, types.Array) and isinstance(a.dtype, types.Float) for a in arrays) and \
        len({a.dtype for a in arrays}) == 1


@intrinsic
def row_accumulate(typingctx, tile, aT, idx, v, perm, use_perm, e0, e1, t0, nv, init, pf, last, ahead):
    """``tile[:nv*VL] = init + sum_{e0 <= e < e1} v[perm[e] if use_perm else e] * aT[idx[e], t0:t0 + nv*VL]``.

    ``tile`` 1-D (at least ``nv * VL`` values), ``aT (n_in, Mp)``, ``1 <= nv <= NV_MAX`` (other
    values leave ``tile`` unwritten). ``perm`` is read (not used) when ``use_perm`` is false, so
    it must then be an array of at least ``e1`` entries (the callers pass ``idx``). Two sets of
    accumulators (even and odd entries) halve the FMA dependency chain.
    """
    if not _floats_match(tile, aT, v):
        return None
    sig = types.void(tile, aT, idx, v, perm, use_perm, e0, e1, t0, nv, init, pf, last, ahead)

    def codegen(context, builder, signature, args):
        st = signature.args
        g = _Gen(context, builder, st[1].dtype)
        e0_, e1_, t0_, nv_, last_, ahead_ = (g.arg(args[i], st[i], types.int64) for i in (6, 7, 8, 9, 12, 13))
        use_perm_, pf_ = g.arg(args[5], st[5], types.boolean), g.arg(args[11], st[11], types.boolean)
        init_vec = g.splat(g.arg(args[10], st[10], st[1].dtype))
        T, A, Iw, Vw, Pw = (g.array(st[i], args[i]) for i in range(5))
        rs = g.row_stride(A)

        def weight(e, permuted):
            j = g.index(Pw, st[4], e) if permuted else e
            return g.splat(builder.load(builder.gep(Vw.data, [j])))

        def row(e):
            return builder.gep(A.data, [builder.add(builder.mul(g.index(Iw, st[2], e), rs), t0_)])

        def body(n):
            def loop(permuted, prefetch):
                def entry(e, accs):
                    if prefetch:
                        f = g.clamp(e, ahead_, last_)
                        g.prefetch_vectors(row(f), n)
                        if permuted:
                            _prefetch(builder, builder.gep(Vw.data, [g.index(Pw, st[4], f)]))
                    w, base = weight(e, permuted), row(e)
                    for k in range(n):
                        builder.store(g.fma(w, g.vload(base, k), builder.load(accs[k])), accs[k])

                g.row_sums(n, init_vec, e0_, e1_, entry, T.data)

            # the flags tested once per row, not per entry (LLVM left the tests and the unused
            # perm load in the loop, and ran out of registers for it)
            g.per_flags(use_perm_, pf_, loop)

        g.per_nv(nv_, "acc", body)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dot_entries(typingctx, a, b, row, col, out, e0, e1, nv, pf, last, ahead):
    """``out[e] = dot(a[row[e], :nv*VL], b[col[e], :nv*VL])`` for ``e0 <= e < e1``.

    ``a (n_a, Mp)``, ``b (n_b, Mp)`` zero-padded rows, ``out`` 1-D; any ``nv >= 0``. Summed per
    token tile of ``NV_MAX`` vectors (:meth:`_Gen.tile_dot`, then the lanes), the tiles' sums
    added in order: the order of :func:`column_grads`, so both give the same bits.
    """
    if not _floats_match(a, b, out):
        return None
    sig = types.void(a, b, row, col, out, e0, e1, nv, pf, last, ahead)

    def codegen(context, builder, signature, args):
        st = signature.args
        g = _Gen(context, builder, st[0].dtype)
        e0_, e1_, nv_, last_, ahead_ = (g.arg(args[i], st[i], types.int64) for i in (5, 6, 7, 9, 10))
        pf_ = g.arg(args[8], st[8], types.boolean)
        A, B, R, C, O = (g.array(st[i], args[i]) for i in range(5))
        rs_a, rs_b = g.row_stride(A), g.row_stride(B)
        n_lines = builder.select(builder.icmp_signed("<", nv_, ir.Constant(_I64, NV_MAX)), nv_,
                                 ir.Constant(_I64, NV_MAX))
        groups = builder.sdiv(nv_, ir.Constant(_I64, NV_MAX))
        rest = builder.srem(nv_, ir.Constant(_I64, NV_MAX))
        total = cgutils.alloca_once(builder, g.elt)

        def loop(prefetch, n_fixed):
            # n_fixed: the vectors of a one-tile row (nv <= NV_MAX, the usual case), unrolled;
            # None: any nv, a loop over whole tiles and a switch for the rest
            with cgutils.for_range(builder, builder.sub(e1_, e0_)) as it:
                e = builder.add(e0_, it.index)
                ra = builder.gep(A.data, [builder.mul(g.index(R, st[2], e), rs_a)])
                rb = builder.gep(B.data, [builder.mul(g.index(C, st[3], e), rs_b)])
                if prefetch:
                    f = g.clamp(e, ahead_, last_)
                    pa = builder.gep(A.data, [builder.mul(g.index(R, st[2], f), rs_a)])
                    pb = builder.gep(B.data, [builder.mul(g.index(C, st[3], f), rs_b)])
                    if n_fixed is None:
                        with cgutils.for_range(builder, n_lines) as line:
                            off = builder.mul(line.index, ir.Constant(_I64, g.VL))
                            _prefetch(builder, builder.gep(pa, [off]))
                            _prefetch(builder, builder.gep(pb, [off]))
                    else:
                        g.prefetch_vectors(pa, n_fixed)
                        g.prefetch_vectors(pb, n_fixed)
                builder.store(ir.Constant(g.elt, 0.0), total)

                def add_tile(base, n):
                    offs = [builder.add(base, ir.Constant(_I64, k * g.VL)) for k in range(n)]
                    dot = g.tile_dot([g.vload(ra, o) for o in offs], [g.vload(rb, o) for o in offs])
                    builder.store(builder.fadd(builder.load(total), g.hsum(dot)), total)

                if n_fixed is not None:
                    add_tile(ir.Constant(_I64, 0), n_fixed)
                else:
                    with cgutils.for_range(builder, groups) as grp:
                        add_tile(builder.mul(grp.index, ir.Constant(_I64, NV_MAX * g.VL)), NV_MAX)
                    base = builder.mul(groups, ir.Constant(_I64, NV_MAX * g.VL))
                    g.per_nv(rest, "dot.rest", lambda n: add_tile(base, n), top=NV_MAX - 1)
                builder.store(builder.load(total), builder.gep(O.data, [e]))

        # The flag and, for rows of one tile, the vector count are tested once per call, not per
        # entry: one loop for each (the same sums, in the same order)
        g.per_flag(pf_, lambda prefetch: g.per_nv(nv_, "dot", lambda n: loop(prefetch, n),
                                                  default=lambda: loop(prefetch, None)), likely=False)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def column_grads(typingctx, tile, dyT, xT, c, idx, v, perm, dv, e0, e1, t0, nv, first, pf, last, ahead):
    """Both gradients of one input feature ``c`` over one token tile, from one gather per entry.

    For the entries ``e0 <= e < e1`` of column ``c`` (the transposed index: ``idx[e]`` is the
    output feature, ``perm[e]`` the entry's position in ``v`` and ``dv``), with ``d = dyT[idx[e],
    t0:t0 + nv*VL]`` and ``x = xT[c, t0:t0 + nv*VL]`` (held in registers):

    * ``tile[:nv*VL] = sum_e v[perm[e]] * d`` (the input gradient of feature ``c``);
    * ``dv[perm[e]] = dot(d, x)`` when ``first``, else ``dv[perm[e]] += dot(d, x)`` (the weight
      gradient, summed over token tiles by the caller).

    ``1 <= nv <= NV_MAX``; rows of ``dyT`` and ``xT`` zero-padded to whole vectors.
    """
    if not _floats_match(tile, dyT, xT, v, dv):
        return None
    sig = types.void(tile, dyT, xT, c, idx, v, perm, dv, e0, e1, t0, nv, first, pf, last, ahead)

    def codegen(context, builder, signature, args):
        st = signature.args
        g = _Gen(context, builder, st[1].dtype)
        c_, e0_, e1_, t0_, nv_, last_, ahead_ = (g.arg(args[i], st[i], types.int64) for i in (3, 8, 9, 10, 11, 14, 15))
        first_, pf_ = g.arg(args[12], st[12], types.boolean), g.arg(args[13], st[13], types.boolean)
        T, D, X = (g.array(st[i], args[i]) for i in range(3))
        Iw, Vw, Pw, DV = (g.array(st[i], args[i]) for i in (4, 5, 6, 7))
        rs_d = g.row_stride(D)
        xrow = builder.gep(X.data, [builder.add(builder.mul(c_, g.row_stride(X)), t0_)])

        def drow(e):
            return builder.gep(D.data, [builder.add(builder.mul(g.index(Iw, st[4], e), rs_d), t0_)])

        def body(n):
            xs = [g.vload(xrow, k) for k in range(n)]

            def loop(is_first, prefetch):
                def entry(e, accs):
                    if prefetch:
                        f = g.clamp(e, ahead_, last_)
                        g.prefetch_vectors(drow(f), n)
                        _prefetch(builder, builder.gep(Vw.data, [g.index(Pw, st[6], f)]))
                    p = g.index(Pw, st[6], e)
                    w = g.splat(builder.load(builder.gep(Vw.data, [p])))
                    base = drow(e)
                    ds = [g.vload(base, k) for k in range(n)]
                    for k in range(n):
                        builder.store(g.fma(w, ds[k], builder.load(accs[k])), accs[k])
                    s = g.hsum(g.tile_dot(ds, xs))
                    slot = builder.gep(DV.data, [p])
                    builder.store(s if is_first else builder.fadd(builder.load(slot), s), slot)

                g.row_sums(n, g.zero, e0_, e1_, entry, T.data)

            g.per_flags(first_, pf_, loop)  # the flags tested once per column, not per entry

        g.per_nv(nv_, "col", body)
        return context.get_dummy_value()

    return sig, codegen


# ----------------------------------------------------------------------------- tile transposes
def _transpose_vectors(g, vs):
    """The ``VL x VL`` transpose of the rows ``vs`` (``VL`` vectors): ``log2(VL)`` rounds, each
    interleaving row ``i`` with row ``i + VL/2`` into rows ``2i`` (their low halves) and ``2i + 1``
    (their high halves). After ``log2(VL)`` of these perfect shuffles row ``k`` holds column ``k``.
    One two-source shuffle per row and round (``vpermt2ps`` on AVX-512)."""
    b, VL = g.b, g.VL
    half = VL // 2
    mask = ir.VectorType(_I32, VL)
    lo = ir.Constant(mask, [j // 2 + (VL if j % 2 else 0) for j in range(VL)])
    hi = ir.Constant(mask, [half + j // 2 + (VL if j % 2 else 0) for j in range(VL)])
    for _ in range(VL.bit_length() - 1):
        rows = []
        for i in range(half):
            rows += [b.shuffle_vector(vs[i], vs[i + half], lo), b.shuffle_vector(vs[i], vs[i + half], hi)]
        vs = rows
    return vs


def _tile_rows(g, arr, r0, c0, nr):
    """``VL`` vectors: ``arr[r0 + k, c0:c0 + VL]`` for ``k < nr`` (``1 <= nr <= VL``), zero for
    the others (rows that may not exist: nothing past row ``r0 + nr - 1`` is read). A whole tile
    is loaded straight; a partial one through a stack buffer of zeros."""
    b = g.b
    rs = g.row_stride(arr)
    buf = cgutils.alloca_once(b, ir.ArrayType(g.vty, g.VL))

    def slot(k):
        return b.gep(buf, [ir.Constant(_I64, 0), k if isinstance(k, ir.Value) else ir.Constant(_I64, k)])

    def row(k):
        return b.gep(arr.data, [b.add(b.mul(b.add(r0, k), rs), c0)])

    with b.if_else(b.icmp_signed("==", nr, ir.Constant(_I64, g.VL)), likely=True) as (whole, part):
        with whole:
            direct = [g.vload(row(ir.Constant(_I64, k)), 0) for k in range(g.VL)]
            whole_end = b.block
        with part:
            for k in range(g.VL):
                b.store(g.zero, slot(k))
            with cgutils.for_range(b, nr) as loop:
                b.store(g.vload(row(loop.index), 0), slot(loop.index))
            buffered = [b.load(slot(k)) for k in range(g.VL)]
            part_end = b.block
    rows = []
    for v_whole, v_part in zip(direct, buffered):  # a whole tile stays in registers
        phi = b.phi(g.vty)
        phi.add_incoming(v_whole, whole_end)
        phi.add_incoming(v_part, part_end)
        rows.append(phi)
    return rows


def _store_columns(g, dst, d0, t0, cols, nd=None):
    """``dst[d0 + k, t0:t0 + VL] = cols[k]`` for ``k < nd`` (``1 <= nd <= VL``; None: all ``VL``):
    nothing is written past row ``d0 + nd - 1``."""
    b = g.b
    rs = g.row_stride(dst)

    def row(k):
        return b.gep(dst.data, [b.add(b.mul(b.add(d0, k), rs), t0)])

    def store_all():
        for k, v in enumerate(cols):
            g.vstore(v, row(ir.Constant(_I64, k)), 0)

    if nd is None:
        store_all()
        return
    with b.if_else(b.icmp_signed("==", nd, ir.Constant(_I64, g.VL)), likely=True) as (whole, part):
        with whole:
            store_all()
        with part:
            buf = cgutils.alloca_once(b, ir.ArrayType(g.vty, g.VL))
            for k, v in enumerate(cols):
                b.store(v, b.gep(buf, [ir.Constant(_I64, 0), ir.Constant(_I64, k)]))
            with cgutils.for_range(b, nd) as loop:
                g.vstore(b.load(b.gep(buf, [ir.Constant(_I64, 0), loop.index])), row(loop.index), 0)


def _c_arrays(matrices, vectors=()) -> bool:
    """Whether the argument types are C-contiguous arrays of one float dtype: 2-D ``matrices``
    and 1-D ``vectors`` (what the tile intrinsics index directly)."""
    arrays = (*matrices, *vectors)
    return (_floats_match(*arrays) and all(a.layout == "C" for a in arrays)
            and all(a.ndim == 2 for a in matrices) and all(a.ndim == 1 for a in vectors))


@intrinsic
def transpose_tile(typingctx, src, r0, c0, nr, dst, d0, t0, nd):
    """``dst[d0 + k, t0 + i] = src[r0 + i, c0 + k]`` for ``k < nd`` and ``i < VL``, with the rows
    ``i >= nr`` of ``src`` read as zeros (``1 <= nr, nd <= VL``): one ``VL x VL`` tile of a
    transpose.

    ``src`` and ``dst`` C-contiguous 2-D arrays of one float dtype; ``src`` has rows up to
    ``r0 + nr - 1`` and columns ``c0:c0 + VL``, ``dst`` rows up to ``d0 + nd - 1`` and columns
    ``t0:t0 + VL`` (nothing is checked here)."""
    if not _c_arrays((src, dst)):
        return None
    sig = types.void(src, r0, c0, nr, dst, d0, t0, nd)

    def codegen(context, builder, signature, args):
        st = signature.args
        g = _Gen(context, builder, st[0].dtype)
        r0_, c0_, nr_, d0_, t0_, nd_ = (g.arg(args[i], st[i], types.int64) for i in (1, 2, 3, 5, 6, 7))
        S, D = g.array(st[0], args[0]), g.array(st[4], args[4])
        _store_columns(g, D, d0_, t0_, _transpose_vectors(g, _tile_rows(g, S, r0_, c0_, nr_)), nd_)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def transpose_act_tile(typingctx, dy, y, r0, c0, nr, scale, dst, d0, t0, dbias, first):
    """:func:`transpose_tile` of ``g = dy * scale if y > 0 else 0`` (the ReLU + dropout
    epilogue's gradient), and the bias gradient of its ``VL`` columns:
    ``dbias[c0:c0 + VL] = (0 if first else dbias[c0:c0 + VL]) + g[r0] + g[r0 + 1] + ...``, the rows
    in order (the rows ``i >= nr`` add zeros, which change no sum that starts at +0).

    ``dy``, ``y`` ``(M, n)`` and ``dst`` C-contiguous 2-D, ``dbias`` 1-D, one float dtype."""
    if not _c_arrays((dy, y, dst), (dbias,)):
        return None
    sig = types.void(dy, y, r0, c0, nr, scale, dst, d0, t0, dbias, first)

    def codegen(context, builder, signature, args):
        st = signature.args
        g = _Gen(context, builder, st[0].dtype)
        b = builder
        r0_, c0_, nr_, d0_, t0_ = (g.arg(args[i], st[i], types.int64) for i in (2, 3, 4, 7, 8))
        s = g.splat(g.arg(args[5], st[5], st[0].dtype))
        first_ = g.arg(args[10], st[10], types.boolean)
        DY, Y, D, DB = (g.array(st[i], args[i]) for i in (0, 1, 6, 9))
        gs = [b.select(b.fcmp_ordered(">", yv, g.zero), b.fmul(dv, s), g.zero)
              for dv, yv in zip(_tile_rows(g, DY, r0_, c0_, nr_), _tile_rows(g, Y, r0_, c0_, nr_))]
        sums = b.gep(DB.data, [c0_])
        total = b.select(first_, g.zero, g.vload(sums, 0))
        for v in gs:
            total = b.fadd(total, v)
        g.vstore(total, sums, 0)
        _store_columns(g, D, d0_, t0_, _transpose_vectors(g, gs))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def copy_vectors(typingctx, src, s0, dst, d0, n):
    """``dst[d0:d0 + n*VL] = src[s0:s0 + n*VL]``: ``n`` whole vectors between two 1-D arrays of one
    float dtype (in range; nothing is checked here). A numba loop of a runtime length of a few
    vectors runs scalar (its vector body is 64 values wide)."""
    if not (_floats_match(src, dst) and src.ndim == dst.ndim == 1):
        return None
    sig = types.void(src, s0, dst, d0, n)

    def codegen(context, builder, signature, args):
        st = signature.args
        g = _Gen(context, builder, st[0].dtype)
        s0_, d0_, n_ = (g.arg(args[i], st[i], types.int64) for i in (1, 3, 4))
        S, D = g.array(st[0], args[0]), g.array(st[2], args[2])
        ps, pd = builder.gep(S.data, [s0_]), builder.gep(D.data, [d0_])
        with cgutils.for_range(builder, n_) as loop:
            k = builder.mul(loop.index, ir.Constant(_I64, g.VL))
            g.vstore(g.vload(ps, k), pd, k)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------- dense readout of a fused run
# Most outputs summed in one pass over the operand by outputs_accumulate (``ng * nv``
# accumulators: at most 24 vectors, with the operand's ``nv`` and the weight's broadcast).
READOUT_GROUP = 6
# Input features per pass of readout_grads' input gradient (independent FMA chains: their
# accumulators, up to NV_MAX vectors each, stay in registers).
_DH_FEATURES = 4


@intrinsic
def outputs_accumulate(typingctx, dst, w, o0, ng, aT, f0, f1, t0, nv):
    """``dst[o0 + j, t0:t0 + nv*VL] = sum_{f0 <= f < f1} w[o0 + j, f] * aT[f, t0:t0 + nv*VL]`` for
    ``j < ng``: ``ng`` outputs of a dense layer over one range of input features and one token
    tile, each operand row loaded once for all ``ng`` outputs (``1 <= ng <= READOUT_GROUP``,
    ``1 <= nv <= NV_MAX``; other values write nothing). The sum of each lane runs over ``f`` in
    order, one FMA per feature.

    ``dst (n_out, Mp)``, ``w (n_out, n_in)``, ``aT (n_in, Mp)``: C-contiguous, one float dtype,
    ``aT``'s rows zero-padded to whole vectors."""
    if not _c_arrays((dst, w, aT)):
        return None
    sig = types.void(dst, w, o0, ng, aT, f0, f1, t0, nv)

    def codegen(context, builder, signature, args):
        st = signature.args
        g = _Gen(context, builder, st[0].dtype)
        b = builder
        o0_, ng_, f0_, f1_, t0_, nv_ = (g.arg(args[i], st[i], types.int64) for i in (2, 3, 5, 6, 7, 8))
        D, W, A = g.array(st[0], args[0]), g.array(st[1], args[1]), g.array(st[4], args[4])
        rs_d, rs_w, rs_a = g.row_stride(D), g.row_stride(W), g.row_stride(A)

        def body(m, n):
            accs = [[cgutils.alloca_once_value(b, g.zero) for _ in range(n)] for _ in range(m)]
            wrows = [b.gep(W.data, [b.mul(b.add(o0_, ir.Constant(_I64, j)), rs_w)]) for j in range(m)]
            with cgutils.for_range(b, b.sub(f1_, f0_)) as loop:
                f = b.add(f0_, loop.index)
                base = b.gep(A.data, [b.add(b.mul(f, rs_a), t0_)])
                xs = [g.vload(base, k) for k in range(n)]
                for j in range(m):
                    wv = g.splat(b.load(b.gep(wrows[j], [f])))
                    for k in range(n):
                        b.store(g.fma(wv, xs[k], b.load(accs[j][k])), accs[j][k])
            for j in range(m):
                row = b.gep(D.data, [b.add(b.mul(b.add(o0_, ir.Constant(_I64, j)), rs_d), t0_)])
                for k in range(n):
                    g.vstore(b.load(accs[j][k]), row, k)

        g.per_nv(ng_, "outs.ng", lambda m: g.per_nv(nv_, f"outs.ng{m}", lambda n: body(m, n)), top=READOUT_GROUP)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def readout_grads(typingctx, tile, dhT, w, dyT, aT, scale, dbias, f0, nf, nvt, need_dw):
    """Both gradients of a dense readout ``y = a @ w.T`` (``w (n_out, n_in)``) for the input
    features ``f0 <= f < f0 + nf`` (``1 <= nf <= VL``), all tokens, from the token-major
    ``dyT (n_out, Mp)`` (the gradient of ``y``) and ``aT (n_in, Mp)`` (the readout's input, which
    is the output of a ReLU + dropout epilogue):

    * ``dhT[f, :] = g`` with ``g = (sum_o w[o, f] * dyT[o, :]) * scale`` where ``aT[f, :] > 0``,
      else 0: the gradient of the epilogue's input, token-major (the ``o`` summed in order), and
      ``dbias[f] = sum(g)`` (per lane over the vectors, then the lanes);
    * when ``need_dw``: ``tile[o, i] = sum_t dyT[o, t] * aT[f0 + i, t]`` for every ``o`` and
      ``i < VL`` (``tile (n_out, VL)``; lanes ``i >= nf`` are zero), the ``t`` in order: each
      ``VL x VL`` tile of ``aT`` is transposed in registers, so that one FMA serves ``VL``
      features.

    ``nvt`` vectors of tokens (``Mp / VL``); every array C-contiguous, one float dtype, ``dyT``
    and ``aT`` zero-padded past the tokens."""
    if not _c_arrays((tile, dhT, w, dyT, aT), (dbias,)):
        return None
    sig = types.void(tile, dhT, w, dyT, aT, scale, dbias, f0, nf, nvt, need_dw)

    def codegen(context, builder, signature, args):
        st = signature.args
        g = _Gen(context, builder, st[0].dtype)
        b = builder
        f0_, nf_, nvt_ = (g.arg(args[i], st[i], types.int64) for i in (7, 8, 9))
        s = g.splat(g.arg(args[5], st[5], st[0].dtype))
        need_dw_ = g.arg(args[10], st[10], types.boolean)
        T, DH, W, DY, A, DB = (g.array(st[i], args[i]) for i in (0, 1, 2, 3, 4, 6))
        rs_t, rs_dh, rs_w, rs_dy, rs_a = (g.row_stride(x) for x in (T, DH, W, DY, A))
        n_out = cgutils.unpack_tuple(b, W.shape)[0]
        vl = ir.Constant(_I64, g.VL)

        # the input gradient, token-major, with the epilogue's gradient and the bias sums:
        # _DH_FEATURES features at a time, token tiles of up to NV_MAX vectors (independent FMA chains over o)
        def features(fs):
            rows = [(b.gep(A.data, [b.mul(f, rs_a)]), b.gep(DH.data, [b.mul(f, rs_dh)])) for f in fs]
            totals = [cgutils.alloca_once_value(b, g.zero) for _ in fs]
            for tot in totals:
                b.store(g.zero, tot)
            n_tiles = b.sdiv(b.add(nvt_, ir.Constant(_I64, NV_MAX - 1)), ir.Constant(_I64, NV_MAX))
            with cgutils.for_range(b, n_tiles) as kl:
                k0 = b.mul(kl.index, ir.Constant(_I64, NV_MAX))
                t0 = b.mul(k0, vl)
                left = b.sub(nvt_, k0)
                n_here = b.select(b.icmp_signed("<", left, ir.Constant(_I64, NV_MAX)), left,
                                  ir.Constant(_I64, NV_MAX))

                def body(n):
                    accs = [[cgutils.alloca_once_value(b, g.zero) for _ in range(n)] for _ in fs]
                    for row in accs:
                        for a in row:
                            b.store(g.zero, a)
                    with cgutils.for_range(b, n_out) as ol:
                        dyrow = b.gep(DY.data, [b.add(b.mul(ol.index, rs_dy), t0)])
                        dys = [g.vload(dyrow, k) for k in range(n)]
                        wrow = b.gep(W.data, [b.mul(ol.index, rs_w)])
                        for f, row in zip(fs, accs):
                            wv = g.splat(b.load(b.gep(wrow, [f])))
                            for k in range(n):
                                b.store(g.fma(wv, dys[k], b.load(row[k])), row[k])
                    for (arow, drow), row, tot in zip(rows, accs, totals):
                        for k in range(n):
                            keep = b.fcmp_ordered(">", g.vload(b.gep(arow, [t0]), k), g.zero)
                            gv = b.select(keep, b.fmul(b.load(row[k]), s), g.zero)
                            g.vstore(gv, b.gep(drow, [t0]), k)
                            b.store(b.fadd(b.load(tot), gv), tot)

                g.per_nv(n_here, "dh", body)
            for f, tot in zip(fs, totals):
                b.store(g.hsum(b.load(tot)), b.gep(DB.data, [f]))

        group = ir.Constant(_I64, _DH_FEATURES)
        groups = b.sdiv(nf_, group)
        with cgutils.for_range(b, groups) as gl:
            f = b.add(f0_, b.mul(gl.index, group))
            features([b.add(f, ir.Constant(_I64, j)) for j in range(_DH_FEATURES)])
        with cgutils.for_range(b, b.sub(nf_, b.mul(groups, group))) as rl:
            features([b.add(f0_, b.add(b.mul(groups, group), rl.index))])

        # the weight gradient: per token tile, VL features' values of each token as one vector
        with b.if_then(need_dw_):
            with cgutils.for_range(b, n_out) as ol:
                g.vstore(g.zero, b.gep(T.data, [b.mul(ol.index, rs_t)]), 0)
            with cgutils.for_range(b, nvt_) as kl:
                t0 = b.mul(kl.index, vl)
                cols = _transpose_vectors(g, _tile_rows(g, A, f0_, t0, nf_))
                with cgutils.for_range(b, n_out) as ol:
                    slot = b.gep(T.data, [b.mul(ol.index, rs_t)])
                    dyrow = b.gep(DY.data, [b.add(b.mul(ol.index, rs_dy), t0)])
                    acc = g.vload(slot, 0)
                    for i in range(g.VL):
                        acc = g.fma(g.splat(b.load(b.gep(dyrow, [ir.Constant(_I64, i)]))), cols[i], acc)
                    g.vstore(acc, slot, 0)
        return context.get_dummy_value()

    return sig, codegen
