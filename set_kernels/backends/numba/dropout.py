"""Numba dropout: a counter-based 32-bit hash per element, vectorised (CPU).

``keep[i] = hash(k0, k1, i) >= threshold`` (``threshold = p * 2**32``), where ``(k0, k1)`` are
the low and high 32 bits of a 64-bit seed and the hash is two rounds of murmur3's ``fmix32``
finaliser, ``fmix32(fmix32(lo(i) + k0) ^ (k1 + hi(i) * golden))`` (``lo``, ``hi``: the halves of
the 64-bit element index): both halves of the seed enter, the second after a non-linear bijection,
so two seeds do not give shifted or permuted copies of one stream. The mask depends only on
``(seed, i)``: deterministic and independent of the thread count. The hash is written as an LLVM
intrinsic in 32-bit arithmetic (numba would widen it to 64 bits), so the loop vectorises with
32-bit lanes (a 64-bit hash does not vectorise on AVX2, which has no 64-bit multiply): about
12 us a call for a 40 x 1000 fp32 activation on one thread, against 60 us with splitmix64 (Zen 4).

The same kernel serves the forward and the backward pass, ``out = src * (scale if keep else 0)``
with ``src = x`` then ``src = grad``: the backward pass recomputes the mask from the seed instead
of keeping it. Tensors below ``PARALLEL_MIN`` elements run serially.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

_GOLDEN = np.uint64(0x9E3779B9)

# Elements per work item of the parallel kernel (a power of two below 2**32: a chunk never
# straddles a change of the index's high half); small, so that a 40 x 1000 activation splits
# evenly over two threads (10 items).
CHUNK = 1 << 12
# Below this many elements the serial kernel is used. In isolation a parallel launch costs more
# than a serial 40 x 1000 mask, but inside a SET-MLP step the activation was just written by
# both threads of the sparse layer: the parallel kernels, each thread reading what it can from
# its own cache, measured 1.86 -> 1.74 ms a step (width 1000, batch 40, 2 threads; A/B in one
# process).
PARALLEL_MIN = 1 << 15


@intrinsic
def _hash(typingctx, i, k0, k1):
    """``fmix32(fmix32(lo32(i) + k0) ^ k1)`` (murmur3's finaliser), in 32-bit arithmetic: numba
    widens integer scalars to 64 bits, which would leave the vectorised loop with 64-bit lanes."""
    sig = types.uint32(types.int64, types.uint32, types.uint32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)

        def fmix32(h):
            h = builder.xor(h, builder.lshr(h, ir.Constant(i32, 16)))
            h = builder.mul(h, ir.Constant(i32, 0x85EBCA6B))
            h = builder.xor(h, builder.lshr(h, ir.Constant(i32, 13)))
            h = builder.mul(h, ir.Constant(i32, 0xC2B2AE35))
            return builder.xor(h, builder.lshr(h, ir.Constant(i32, 16)))

        h = fmix32(builder.add(builder.trunc(args[0], i32), args[1]))
        return fmix32(builder.xor(h, args[2]))

    return sig, codegen


@njit(inline="always", cache=True)
def _keys(high_from, k0, k1):
    """The two 32-bit hash keys for the indices that share the high 32 bits of ``high_from``."""
    hi = np.uint64(high_from) >> np.uint64(32)
    key0 = np.uint32(np.uint64(k0) & np.uint64(0xFFFFFFFF))
    key1 = np.uint32((np.uint64(k1) + hi * _GOLDEN) & np.uint64(0xFFFFFFFF))
    return key0, key1


@njit(inline="always", cache=True)
def keep_element(i, k0, k1, threshold, high_from):
    """Whether element ``i`` is kept: the mask of :func:`_apply`, one element at a time (the
    epilogue of the element forward, :mod:`.spmm`, draws the same masks as this module). The
    high half of the index is read from ``high_from``, which must share it with ``i`` (pass
    ``i``, or a loop-invariant index of the same 2**32 run, so that the loop vectorises)."""
    key0, key1 = _keys(high_from, k0, k1)
    return _hash(i, key0, key1) >= np.uint32(threshold)


@njit(inline="always", fastmath=True, cache=True)
def _apply(src, out, i0, i1, k0, k1, threshold, scale, relu):
    """``out[i] = f(src[i]) * scale`` where ``hash(k0, k1, i) >= threshold``, else 0, for ``i0 <= i < i1``
    (``i0`` and ``i1 - 1`` share the high 32 bits of the index); ``f`` is ``max(., 0)`` when
    ``relu``, else the identity."""
    key0, key1 = _keys(i0, k0, k1)
    t = np.uint32(threshold)
    zero = src.dtype.type(0)
    s = src.dtype.type(scale)
    a = src[i0:i1]
    b = out[i0:i1]
    if relu:
        for j in range(i1 - i0):
            h = _hash(i0 + j, key0, key1)
            b[j] = max(a[j], zero) * s if h >= t else zero
    else:
        for j in range(i1 - i0):
            h = _hash(i0 + j, key0, key1)
            b[j] = a[j] * s if h >= t else zero


@njit(fastmath=True, cache=True)
def dropout_serial(src, k0, k1, threshold, scale, out, relu=False):
    """``out = src * mult`` (``relu(src) * mult`` when ``relu``) over flat arrays, ``mult[i] =
    scale`` where ``hash(k0, k1, i) >= threshold`` and 0 elsewhere; one thread."""
    n = src.shape[0]
    i0 = np.int64(0)
    while i0 < n:
        i1 = min(n, i0 + (np.int64(1) << 32))  # runs that share the high half of the index
        _apply(src, out, i0, i1, k0, k1, threshold, scale, relu)
        i0 = i1


@njit(parallel=True, fastmath=True, cache=True)
def dropout_parallel(src, k0, k1, threshold, scale, out, relu=False):
    """:func:`dropout_serial`, chunks in parallel (the same result)."""
    n = src.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        i0 = np.int64(c) * CHUNK
        _apply(src, out, i0, min(n, i0 + CHUNK), k0, k1, threshold, scale, relu)


def dropout(src, k0: int, k1: int, threshold: int, scale: float, out, relu: bool = False) -> None:
    """The serial or the parallel kernel by size (flat, contiguous numpy arrays of one dtype);
    ``relu`` fuses a ReLU before the dropout."""
    (dropout_parallel if src.shape[0] >= PARALLEL_MIN else dropout_serial)(src, k0, k1, threshold, scale, out, relu)


@njit(inline="always", fastmath=True, cache=True)
def _grad_range(grad, y, scale, out, i0, i1):
    zero = grad.dtype.type(0)
    s = grad.dtype.type(scale)
    g = grad[i0:i1]
    a = y[i0:i1]
    b = out[i0:i1]
    for j in range(i1 - i0):
        b[j] = g[j] * s if a[j] > zero else zero


@njit(fastmath=True, cache=True)
def _relu_dropout_grad_serial(grad, y, scale, out):
    _grad_range(grad, y, scale, out, 0, grad.shape[0])


@njit(parallel=True, fastmath=True, cache=True)
def _relu_dropout_grad_parallel(grad, y, scale, out):
    n = grad.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        i0 = np.int64(c) * CHUNK
        _grad_range(grad, y, scale, out, i0, min(n, i0 + CHUNK))


def relu_dropout_grad(grad, y, scale: float, out) -> None:
    """Backward of the fused ReLU + dropout from its output ``y``: ``out = grad * scale`` where
    ``y > 0`` and 0 elsewhere (``y > 0`` exactly where the element was kept and its input was
    positive; flat, contiguous numpy arrays of one dtype). No hash is recomputed."""
    kernel = _relu_dropout_grad_parallel if grad.shape[0] >= PARALLEL_MIN else _relu_dropout_grad_serial
    kernel(grad, y, scale, out)
