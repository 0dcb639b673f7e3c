"""Triton fused masked Adam/AdamW: one launch per group of tensors of one (param dtype, moment
dtype, with or without a mask), usually one or two launches per optimizer step.

**Multi-tensor.** The tensors of a group are described by three small int64 tables:
``addrs (n, 5)`` (addresses of p, g, m, v and the bool mask, 0 for no mask), ``numels (n,)`` and
``chunk_start (n + 1,)`` (prefix sums of each tensor's number of ``CHUNK``-element chunks).
Program ``pid`` finds its tensor by a binary search over ``chunk_start`` and updates one chunk
of it, so tensors of very different sizes share one grid with no idle programs. The addresses
are cast to typed pointers inside the kernel (the element types are compile-time constants of
the group). This works compiled and under the interpreter (whose CPU tensors' addresses are the
host addresses it reads).

**Table uploads, streams and CUDA graphs** (:func:`_tables_for`). A table goes up from pinned
memory with a non-blocking copy on the current stream, the stream the kernel then runs on, so
the copy is ordered before every launch that reads it. Tables are cached by the tuple of
addresses and sizes *and the stream*: an optimizer stepping the same tensors on one stream
uploads once, and a table is never read from a stream its upload is not ordered with (one
uploaded behind a busy side stream is not reused on another). During CUDA-graph capture the
table is always built afresh: its upload is captured into the graph (replayed before the kernel
at every replay) and the table and its pinned source are kept for the life of the process,
never evicted, since the graph may be replayed at any time. Reusing a cached table there would
be wrong twice: the cache may later free it under the graph, and a table whose upload was
captured into another graph holds nothing until that graph runs.

**Memory access.** A chunk that lies wholly inside its tensor (all but the last of each tensor)
is processed with unmasked loads and stores; with every address of the group 16-byte aligned
(checked on the host, the usual case) they compile to 16-byte vector accesses. The last chunk
of each tensor uses bounds-masked accesses.

**Math** (fp32, as ``torch.optim.Adam``): ``g = grad / grad_scale``; AdamW: ``p *= 1 - lr*wd``,
Adam-L2: ``g += wd * p``; ``m += (1 - beta1) * (g - m)``; ``v = beta2 * v + (1 - beta2) * g*g``;
``p -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)``, with IEEE
division and square root. Where the mask is False, p, m and v become exactly 0.

**AMP.** ``grad_scale`` and ``found_inf`` are read by the kernel from device memory (no host
sync). When ``found_inf`` is non-zero the element count is taken as 0, so every load and store
is masked off: nothing changes.

No autotuning here: the kernel updates in place, and autotuning would run it several times.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from . import _common

BLOCK = 1024  # elements per vector step
ITERS = 4  # vector steps per program
CHUNK = BLOCK * ITERS  # elements per program
NUM_WARPS = 4
TABLE_CACHE_SIZE = 16  # groups of tensors whose tables are kept on the device

_tables: OrderedDict = OrderedDict()  # eager tables, LRU, keyed by (device, stream, group)
_graph_tables: list = []  # tables captured into CUDA graphs, with their pinned sources: never freed


@triton.jit
def _adam_chunk(p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, base, n, scale, omb1, beta2, omb2, step_size, bc2_sqrt, eps,
                p_factor, g_wd, P_DT: tl.constexpr, S_DT: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_SCALE: tl.constexpr, COUPLED_WD: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                BOUNDED: tl.constexpr, INTERPRETED: tl.constexpr):
    """Elements ``base : base + BLOCK * ITERS`` of one tensor; ``BOUNDED``: mask off ``>= n``."""
    for it in tl.static_range(ITERS):
        offs = tl.max_contiguous(tl.multiple_of(base + it * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
        if BOUNDED:
            ok = offs < n
            p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if HAS_MASK:
                live = tl.load(mask_ptr + offs, mask=ok, other=1) != 0
        else:  # a full chunk: unmasked, so that the loads and stores vectorise
            p = tl.load(p_ptr + offs).to(tl.float32)
            g = tl.load(g_ptr + offs).to(tl.float32)
            m = tl.load(m_ptr + offs).to(tl.float32)
            v = tl.load(v_ptr + offs).to(tl.float32)
            if HAS_MASK:
                live = tl.load(mask_ptr + offs) != 0
        if HAS_SCALE:
            g = tl.div_rn(g, scale)
        p = p * p_factor
        if COUPLED_WD:
            g = g + g_wd * p
        m = m + omb1 * (g - m)
        v = beta2 * v + omb2 * (g * g)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - step_size * tl.div_rn(m, denom)
        if HAS_MASK:
            p = tl.where(live, p, 0.0)
            m = tl.where(live, m, 0.0)
            v = tl.where(live, v, 0.0)
        p = _common.cast_out(p, P_DT, INTERPRETED)
        m = _common.cast_out(m, S_DT, INTERPRETED)
        v = _common.cast_out(v, S_DT, INTERPRETED)
        if BOUNDED:
            tl.store(p_ptr + offs, p, mask=ok)
            tl.store(m_ptr + offs, m, mask=ok)
            tl.store(v_ptr + offs, v, mask=ok)
        else:
            tl.store(p_ptr + offs, p)
            tl.store(m_ptr + offs, m)
            tl.store(v_ptr + offs, v)


@triton.jit
def _masked_adam_kernel(addrs, numels, chunk_start, n_tensors, scale_ptr, inf_ptr,
                        omb1, beta2, omb2, step_size, bc2_sqrt, eps, p_factor, g_wd,
                        P_DT: tl.constexpr, S_DT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr,
                        HAS_INF: tl.constexpr, COUPLED_WD: tl.constexpr, LOG_N: tl.constexpr, BLOCK: tl.constexpr,
                        ITERS: tl.constexpr, ALIGNED: tl.constexpr, INTERPRETED: tl.constexpr):
    pid = tl.program_id(0)
    # Binary search: the tensor t with chunk_start[t] <= pid < chunk_start[t + 1].
    lo = pid * 0
    hi = lo + n_tensors
    for _ in tl.static_range(LOG_N):
        mid = (lo + hi) // 2
        right = tl.load(chunk_start + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    t = lo.to(tl.int64)
    chunk = pid - tl.load(chunk_start + t)
    n = tl.load(numels + t)
    row = addrs + t * 5
    p_ptr = tl.load(row).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DT))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(S_DT))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(S_DT))
    mask_ptr = tl.load(row + 4).to(tl.pointer_type(tl.int8))
    if ALIGNED:  # every address of the group is 16-byte aligned: allow vector loads and stores
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        mask_ptr = tl.multiple_of(mask_ptr, 16)

    if HAS_INF:  # nothing is loaded or stored when found_inf is set
        n = tl.where(tl.load(inf_ptr) == 0.0, n, 0)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr)

    base = chunk.to(tl.int64) * (BLOCK * ITERS)
    if base + BLOCK * ITERS <= n:
        _adam_chunk(p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, base, n, scale, omb1, beta2, omb2, step_size, bc2_sqrt,
                    eps, p_factor, g_wd, P_DT, S_DT, HAS_MASK, HAS_SCALE, COUPLED_WD, BLOCK, ITERS, False, INTERPRETED)
    else:
        _adam_chunk(p_ptr, g_ptr, m_ptr, v_ptr, mask_ptr, base, n, scale, omb1, beta2, omb2, step_size, bc2_sqrt,
                    eps, p_factor, g_wd, P_DT, S_DT, HAS_MASK, HAS_SCALE, COUPLED_WD, BLOCK, ITERS, True, INTERPRETED)


def _device_scalar(t):
    """A 1-element fp32 tensor (no host sync), or None; the device was checked by the caller."""
    return None if t is None else t.detach().reshape(1).to(torch.float32)


def _stream_id(device: torch.device) -> int:
    """The current stream of ``device`` (0 for CPU tensors, which the interpreter runs in order)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _tables_for(key, rows, device):
    """Device tables ``(addrs, numels, chunk_start, n_chunks)`` for one group of ``rows``.

    Uploaded on, and cached for, the current stream of ``device``; built afresh (and kept
    forever) while that stream is capturing a CUDA graph. See the module docstring.
    """
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (_stream_id(device),) + tuple(key)
    hit = None if capturing else _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    numels = [r[5] for r in rows]
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + triton.cdiv(n, CHUNK))
    host = torch.tensor([list(r[:5]) for r in rows], dtype=torch.int64).reshape(-1)
    host = torch.cat([host, torch.tensor(numels, dtype=torch.int64), torch.tensor(starts, dtype=torch.int64)])
    if device.type == "cuda":
        host = host.pin_memory()
        dev = host.to(device, non_blocking=True)  # ordered on the current stream (captured if capturing)
    else:
        dev = host
    n = len(rows)
    entry = (dev[:5 * n], dev[5 * n:6 * n], dev[6 * n:], starts[-1])
    if capturing:
        _graph_tables.append((host, dev))
        return entry
    _tables[key] = entry
    while len(_tables) > TABLE_CACHE_SIZE:
        _tables.popitem(last=False)  # freed in stream order: only this key's stream used it
    return entry


def clear_table_cache() -> None:
    """Drop the cached pointer tables (not those captured into CUDA graphs, which may be replayed)."""
    _tables.clear()


def masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, *, step, lr, beta1, beta2, eps,
                 weight_decay, decoupled_weight_decay, grad_scale=None, found_inf=None) -> None:
    """In-place fused masked Adam/AdamW over lists of tensors (one launch per dtype group).

    ``params``: fp32/fp16/bf16 contiguous tensors of any shape; ``grads``: same shapes and
    dtypes; ``exp_avgs``/``exp_avg_sqs``: same shapes, fp32 (or the param dtype), contiguous;
    ``masks``: bool tensors of the param shapes or None. ``step`` (int >= 1) is the step count
    after this update. ``grad_scale``/``found_inf``: optional 1-element tensors on the params'
    device, read by the kernel. Masked entries of p, m and v become exactly 0; nothing changes
    when ``found_inf`` is non-zero.

    The arguments were checked by ``set_kernels.ops.masked_adam_`` or ``MaskedAdam`` (names,
    shapes, dtypes, devices, hyper-parameters); only what the kernel's memory accesses rely on is
    asserted here, in one test per tensor: one device, equal element counts, contiguous p, m, v
    and mask, a grad of p's dtype, m and v of one dtype, bool masks, 1-element scalars.
    """
    n = len(params)
    if masks is None:
        masks = [None] * n
    assert len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(masks) == n, "masked_adam_: list lengths differ"
    if n == 0:
        return
    device = params[0].device
    _common.check_device(params[0], "params[0]")
    for t in (grad_scale, found_inf):
        if t is not None and (t.numel() != 1 or t.device != device):
            raise ValueError(f"masked_adam_ (triton): grad_scale and found_inf must be 1-element tensors on {device}")
    scale_t = _device_scalar(grad_scale)
    inf_t = _device_scalar(found_inf)

    groups: dict[tuple, list] = {}
    keep = []  # contiguous copies that must live until the launches are queued
    for i, (p, g, m, v, mask) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, masks)):
        numel = p.numel()
        if not (p.dtype in _common.TL_DTYPES and g.dtype == p.dtype and v.dtype == m.dtype
                and m.dtype in _common.TL_DTYPES and g.device == device and m.device == device
                and v.device == device and p.is_contiguous() and m.is_contiguous() and v.is_contiguous()
                and g.numel() == numel and m.numel() == numel and v.numel() == numel
                and (mask is None or (mask.dtype == torch.bool and mask.device == device
                                      and mask.is_contiguous() and mask.numel() == numel))):
            raise ValueError(f"masked_adam_ (triton): the tensors of params[{i}] do not fit the kernel (dtype, "
                             "device, size or contiguity); call set_kernels.ops.masked_adam_, which says which")
        if numel == 0:
            continue
        if not g.is_contiguous():
            g = g.contiguous()
            keep.append(g)
        row = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), 0 if mask is None else mask.data_ptr(), numel)
        groups.setdefault((p.dtype, m.dtype, mask is not None), []).append(row)

    bc1 = 1 - beta1 ** step
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    wd = float(weight_decay)
    decoupled = bool(decoupled_weight_decay)
    p_factor = 1 - lr * wd if (decoupled and wd != 0) else 1.0
    with _common.on_device(device):
        for (p_dtype, s_dtype, has_mask), rows in groups.items():
            key = (str(device), p_dtype, s_dtype, has_mask, tuple(rows))
            aligned = all(addr % 16 == 0 for row in rows for addr in row[:5])
            addrs, numels, starts, n_chunks = _tables_for(key, rows, device)
            _masked_adam_kernel[(n_chunks,)](
                addrs, numels, starts, len(rows),
                scale_t if scale_t is not None else starts, inf_t if inf_t is not None else starts,
                *(float(h) for h in (1 - beta1, beta2, 1 - beta2, lr / bc1, bc2_sqrt, eps, p_factor, wd)),
                P_DT=_common.TL_DTYPES[p_dtype], S_DT=_common.TL_DTYPES[s_dtype], HAS_MASK=has_mask,
                HAS_SCALE=scale_t is not None, HAS_INF=inf_t is not None,
                COUPLED_WD=(wd != 0 and not decoupled), LOG_N=max(1, len(rows).bit_length()),
                BLOCK=BLOCK, ITERS=ITERS, ALIGNED=aligned,
                INTERPRETED=_common.INTERPRET, num_warps=NUM_WARPS,
            )
    del keep
