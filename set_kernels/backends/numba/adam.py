"""Numba kernel for the fused masked Adam/AdamW step (CPU).

One pass over ``p, g, m, v`` (and the mask), in parallel over chunks of the flattened tensors.
The math is torch.optim.Adam's (see :func:`set_kernels.backends.numba.masked_adam_`), done in
the dtype of the hyper-parameter array ``hp`` (fp32 for fp32 params, fp64 for fp64 params).

Masked entries come out as exactly 0. Runs of entries that are all masked (most of a block-sparse
weight) skip the arithmetic and are written only where not 0 already: after the first step the
pruned part of p, m and v is all zeros, so those cache lines are read but never dirtied.

**Non-finite values.** The kernels are compiled with :data:`FASTMATH`, LLVM's fast-math flags
*without* ``nnan`` and ``ninf``: gradients, weights or moments may hold NaN or Inf (a diverging
run, an fp16 overflow, an AMP step about to be skipped), and the kernel must then behave as
IEEE arithmetic does, as ``torch.optim.Adam`` does: NaN and Inf propagate through the update of
live entries, ``sqrt(inf) = inf`` and ``m / inf = 0``, and the tests ``x != 0`` and the selects
that zero the masked entries see NaN as NaN. (With ``nnan``/``ninf`` LLVM may fold those tests
and, on x86, replace the division and square root by reciprocal estimates that turn Inf into
NaN.) Reassociation and contraction stay on: they are what vectorises the loops.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

# Elements per parallel work item (a multiple of RUN).
CHUNK = 1 << 14
# Elements per all-masked test in the masked kernel: one 32-wide block row segment.
RUN = 32

# Layout of the hyper-parameter array hp (compute dtype):
HP_BETA1, HP_1M_BETA1, HP_BETA2, HP_1M_BETA2, HP_STEP_SIZE, HP_BC2_SQRT, HP_EPS, HP_P_FACTOR, HP_G_WD, \
    HP_GRAD_SCALE = range(10)
HP_SIZE = 10

# fastmath=True minus "nnan" and "ninf" (see the module docstring), and minus "afn": approximate
# sqrt/division are not wanted where Inf must stay Inf.
FASTMATH = frozenset({"nsz", "arcp", "contract", "reassoc"})


@njit(inline="always", fastmath=set(FASTMATH))
def _update(p0, g0, m0, v0, omb1, beta2, omb2, step_size, bc2_sqrt, eps, p_factor, g_wd, scale, coupled_wd,
            has_scale):
    """One element of the Adam step: (new p, new m, new v)."""
    gi = g0
    if has_scale:
        gi = gi / scale
    pi = p0 * p_factor
    if coupled_wd:
        gi = gi + g_wd * pi
    mi = m0 + omb1 * (gi - m0)
    vi = beta2 * v0 + omb2 * (gi * gi)
    denom = np.sqrt(vi) / bc2_sqrt + eps
    return pi - step_size * (mi / denom), mi, vi


@njit(parallel=True, fastmath=set(FASTMATH), cache=True)
def masked_adam_(p, g, m, v, mask, has_mask, hp, coupled_wd, has_scale, run):
    """In-place Adam step on the flat arrays p, g, m, v; mask (uint8, flat) used when has_mask.

    ``coupled_wd``: add ``hp[HP_G_WD] * p`` to the gradient (Adam's L2 weight decay);
    ``hp[HP_P_FACTOR]`` multiplies p first (1 - lr * wd for AdamW, else 1).

    Masked: the arrays are walked in runs of RUN elements. A run with no live entry (most of a
    block-sparse mask) skips the arithmetic and only zeroes state that is not 0 yet, so after the
    first step its p, m, v lines are read but never written back. Other runs do the full update
    with branch-free selects.
    """
    n = p.shape[0]
    omb1 = hp[HP_1M_BETA1]
    beta2 = hp[HP_BETA2]
    omb2 = hp[HP_1M_BETA2]
    step_size = hp[HP_STEP_SIZE]
    bc2_sqrt = hp[HP_BC2_SQRT]
    eps = hp[HP_EPS]
    p_factor = hp[HP_P_FACTOR]
    g_wd = hp[HP_G_WD]
    scale = hp[HP_GRAD_SCALE]
    zero = hp.dtype.type(0)
    nchunk = (n + CHUNK - 1) // CHUNK
    for c in prange(nchunk):
        # Index with unsigned integers and take no views of the arrays here: numba then neither
        # tests for negative (wrap-around) indices nor sees aliases, so it marks the arrays
        # noalias and LLVM vectorises the loops (a view anywhere in the body loses that).
        first = c * CHUNK
        count = min(n, first + CHUNK) - first
        base = np.uint64(first)
        if has_mask:
            nrun = count // run
            for r in range(nrun):
                b0 = base + np.uint64(r * run)
                n_live = 0
                for j in range(run):
                    n_live += mask[b0 + np.uint64(j)]
                if n_live == 0:
                    # All masked: nothing to compute; write only state that is not 0 yet.
                    mag = zero
                    for j in range(run):
                        i = b0 + np.uint64(j)
                        mag += abs(p[i]) + abs(m[i]) + abs(v[i])
                    if mag != 0:
                        for j in range(run):
                            i = b0 + np.uint64(j)
                            p[i] = zero
                            m[i] = zero
                            v[i] = zero
                    continue
                # Masked entries enter as p = g = m = v = 0, for which the update gives exactly 0
                # (selecting the inputs keeps the loop branch-free).
                for j in range(run):
                    i = b0 + np.uint64(j)
                    live = mask[i] != 0
                    pn, mn, vn = _update(p[i] if live else zero, g[i] if live else zero, m[i] if live else zero,
                                         v[i] if live else zero, omb1, beta2, omb2, step_size, bc2_sqrt, eps,
                                         p_factor, g_wd, scale, coupled_wd, has_scale)
                    p[i] = pn
                    m[i] = mn
                    v[i] = vn
            b0 = base + np.uint64(nrun * run)
            for j in range(count - nrun * run):
                i = b0 + np.uint64(j)
                live = mask[i] != 0
                pn, mn, vn = _update(p[i] if live else zero, g[i] if live else zero, m[i] if live else zero,
                                     v[i] if live else zero, omb1, beta2, omb2, step_size, bc2_sqrt, eps, p_factor,
                                     g_wd, scale, coupled_wd, has_scale)
                p[i] = pn
                m[i] = mn
                v[i] = vn
        else:
            for j in range(count):
                i = base + np.uint64(j)
                pn, mn, vn = _update(p[i], g[i], m[i], v[i], omb1, beta2, omb2, step_size, bc2_sqrt, eps, p_factor,
                                     g_wd, scale, coupled_wd, has_scale)
                p[i] = pn
                m[i] = mn
                v[i] = vn
