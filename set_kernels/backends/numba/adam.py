"""Numba kernel for the fused masked Adam/AdamW step (CPU).

One pass over ``p, g, m, v`` (and the mask), in parallel over chunks of the flattened tensors.
The math is torch.optim.Adam's (see :func:`set_kernels.backends.numba.masked_adam_`), done in
the dtype of the hyper-parameter array ``hp`` (fp32 for fp32 params, fp64 for fp64 params).

Masked entries are written as 0 only where they are not 0 already: after the first step the
pruned part of p, m and v is all zeros, so those cache lines are only read, never dirtied, which
saves a third of the memory traffic on a sparse weight. (A -0.0 is left as it is; it compares
equal to 0.)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

# Elements per parallel work item.
CHUNK = 1 << 14

# Layout of the hyper-parameter array hp (compute dtype):
HP_BETA1, HP_1M_BETA1, HP_BETA2, HP_1M_BETA2, HP_STEP_SIZE, HP_BC2_SQRT, HP_EPS, HP_P_FACTOR, HP_G_WD, \
    HP_GRAD_SCALE = range(10)
HP_SIZE = 10


@njit(parallel=True, fastmath=True, cache=True)
def adam_step(p, g, m, v, mask, has_mask, hp, coupled_wd, has_scale):
    """In-place Adam step on the flat arrays p, g, m, v; mask (uint8, flat) used when has_mask.

    ``coupled_wd``: add ``hp[HP_G_WD] * p`` to the gradient (Adam's L2 weight decay);
    ``hp[HP_P_FACTOR]`` multiplies p first (1 - lr * wd for AdamW, else 1).
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
        start = c * CHUNK
        stop = min(n, start + CHUNK)
        # 1-D views indexed from 0 (an index numba knows is non-negative vectorises).
        pc = p[start:stop]
        gc = g[start:stop]
        mc = m[start:stop]
        vc = v[start:stop]
        if has_mask:
            kc = mask[start:stop]
            for i in range(stop - start):
                live = kc[i] != 0
                p0 = pc[i]
                m0 = mc[i]
                v0 = vc[i]
                gi = gc[i] if live else zero
                if has_scale:
                    gi = gi / scale
                pi = p0 * p_factor
                if coupled_wd:
                    gi = gi + g_wd * pi
                mi = m0 + omb1 * (gi - m0)
                vi = beta2 * v0 + omb2 * (gi * gi)
                denom = np.sqrt(vi) / bc2_sqrt + eps
                pi = pi - step_size * (mi / denom)
                # Store a masked entry only when it is not 0 already (keeps its line clean).
                if live or p0 != 0:
                    pc[i] = pi if live else zero
                if live or m0 != 0:
                    mc[i] = mi if live else zero
                if live or v0 != 0:
                    vc[i] = vi if live else zero
        else:
            for i in range(stop - start):
                gi = gc[i]
                if has_scale:
                    gi = gi / scale
                pi = pc[i] * p_factor
                if coupled_wd:
                    gi = gi + g_wd * pi
                m0 = mc[i]
                mi = m0 + omb1 * (gi - m0)
                vi = beta2 * vc[i] + omb2 * (gi * gi)
                denom = np.sqrt(vi) / bc2_sqrt + eps
                pc[i] = pi - step_size * (mi / denom)
                mc[i] = mi
                vc[i] = vi
