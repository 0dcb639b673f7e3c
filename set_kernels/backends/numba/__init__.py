"""Numba CPU backend: block-sparse matmuls and the fused masked Adam on CPU torch tensors.

The kernels live in :mod:`.bsmm` (blocks), :mod:`.spmm` (element sparsity, ``block_size=1``),
:mod:`.adam`, :mod:`.dropout` and :mod:`.index` (layout indices); they are imported lazily so that importing
this module works without numba (then :func:`availability` says why). Inputs are validated and
made contiguous by the caller (the ops layer); outputs are allocated with torch and written by
the kernels through numpy views.

**Compile cache.** The kernels are compiled with ``cache=True``; the cache goes to a per-user
folder, :func:`cache_dir` (``$XDG_CACHE_HOME/set_kernels/numba``, by default
``~/.cache/set_kernels/numba``; ``%LOCALAPPDATA%\\set_kernels\\numba`` on Windows), in a sub-folder
per source folder (numba's own naming), so that checkouts and environments do not collide.
Nothing is written next to the package (``site-packages`` once installed), and the process is
left alone: neither ``os.environ`` nor ``numba.config.CACHE_DIR`` is touched. This works through
a cache locator that numba consults before its own and that claims only the files of this
folder; every other numba user of the process keeps numba's behaviour. A ``$NUMBA_CACHE_DIR``
set by the user still wins (numba's locator for it is consulted first). When the per-user folder
cannot be written, numba's own chain applies (``__pycache__`` next to the source when writable,
else numba's user-wide cache), as for any numba code. numba stamps a cached kernel with a digest
of the file that defines it; in the per-user folder the stamp also covers :data:`INLINED_SOURCES`
(the intrinsics and helpers compiled into other files' kernels), so that an edit of one of those
files alone recompiles the kernels that use it.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import threading

import numpy as np
import torch

NAME = "numba"
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def cache_dir() -> str:
    """The per-user folder of this backend's compiled kernels (see the module docstring)."""
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "set_kernels", "numba")


_HERE = os.path.dirname(os.path.abspath(__file__))

# Files of this folder whose functions are compiled into the kernels of its other files (LLVM
# intrinsics and inlined helpers): their contents are part of every cached kernel's stamp.
INLINED_SOURCES = ("simd.py", "dropout.py")


def inlined_digests() -> tuple:
    """SHA-256 digests of :data:`INLINED_SOURCES`, read again when a file's size or time changes."""
    out = []
    for name in INLINED_SOURCES:
        path = os.path.join(_HERE, name)
        st = os.stat(path)
        out.append(_file_digest(path, st.st_mtime_ns, st.st_size))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, mtime_ns: int, size: int) -> bytes:  # (mtime, size): the cache key
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


def _set_cache_dir(numba) -> None:
    """Put the kernels of this folder in :func:`cache_dir`, before they are defined (``cache=True``
    finds its locator when a kernel is decorated). Touches no environment variable and no global
    numba setting: it adds a locator class that declines every file outside this folder."""
    try:
        from numba.core import caching
    except ImportError:  # a numba without that module: its own cache locations apply
        return
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    base = getattr(caching, "UserWideCacheLocator", None) or getattr(caching, "_UserWideCacheLocator", None)
    user_dir = getattr(caching, "UserProvidedCacheLocator", None) or getattr(caching, "_UserProvidedCacheLocator", None)
    classes = getattr(impl, "_locator_classes", None)
    if base is None or not isinstance(classes, list):
        return
    if any(getattr(c, "_set_kernels_locator", False) for c in classes):
        return

    class SetKernelsCacheLocator(base):
        """numba's user-wide locator, rooted at :func:`cache_dir`, for the files of this folder only."""

        _set_kernels_locator = True

        def __init__(self, py_func, py_file):
            super().__init__(py_func, py_file)
            self._cache_path = os.path.join(cache_dir(), self.get_suitable_cache_subpath(py_file))

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != _HERE:
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            # numba's stamp is a digest of the kernel's own file; the helpers of INLINED_SOURCES
            # are compiled into kernels of other files, so their digests are part of it too: an
            # edit of simd.py alone would otherwise load stale kernels (a checkout or an upgrade)
            return (super().get_source_stamp(), *inlined_digests())

    # After the $NUMBA_CACHE_DIR locator (the user's explicit choice), before numba's in-tree one.
    at = classes.index(user_dir) + 1 if user_dir in classes else 0
    classes.insert(at, SetKernelsCacheLocator)


_kernels = None  # (bsmm, adam, numba, spmm, dropout) modules once imported
_import_error = None  # why numba cannot be used, once known


def availability() -> tuple[bool, str]:
    """(True, "") when numba can be imported, else (False, why)."""
    global _import_error
    if _kernels is not None:
        return True, ""
    if _import_error is None:
        try:
            import numba  # noqa: F401
        except ImportError as exc:
            if getattr(exc, "name", None) == "numba":
                _import_error = "numba is not installed (pip install numba)"
            else:
                _import_error = f"numba cannot be imported: {exc}"
        except Exception as exc:  # a broken install (e.g. numpy/llvmlite version mismatch)
            _import_error = f"numba cannot be imported: {type(exc).__name__}: {exc}"
        else:
            _import_error = ""
    return (not _import_error), _import_error


def _load():
    global _kernels
    if _kernels is None:
        ok, why = availability()
        if not ok:
            raise RuntimeError(f"the numba backend is not available: {why}")
        import numba

        _set_cache_dir(numba)  # before the kernels are defined: their caches are located then
        from . import adam, bsmm, dropout, spmm

        _kernels = (bsmm, adam, numba, spmm, dropout)
    _sync_threads(_kernels[2])
    return _kernels


def index_kernels():
    """:mod:`.index` (the layout index builders), or None when numba cannot be used."""
    if not availability()[0]:
        return None
    _load()  # the compile cache is located before the module's kernels are defined
    from . import index

    return index


_numba_threads = None  # numba's raw per-thread thread-count getter (cheaper than numba.get_num_threads)


def _sync_threads(numba) -> None:
    # Use as many threads as torch does (torch.set_num_threads), within numba's pool size. Checked
    # on every call (the user may change either count at any time), through numba's raw getter:
    # numba.get_num_threads() takes a lock and costs about a microsecond.
    global _numba_threads
    n = wanted = torch.get_num_threads()
    pool = numba.config.NUMBA_NUM_THREADS
    if n > pool:
        n = pool
    elif n < 1:
        n = 1
    get = _numba_threads
    if get is None:
        current = numba.get_num_threads()  # starts numba's pool, which defines the raw getter
        if torch.get_num_threads() != wanted:
            # Starting numba's OpenMP pool resets the process's OpenMP thread count, which torch
            # reads back as its own: put torch's back as the user set it.
            torch.set_num_threads(wanted)
        from numba.np.ufunc import parallel

        get = getattr(parallel, "_get_num_threads", None)
        _numba_threads = get if callable(get) else numba.get_num_threads
    else:
        current = get()
    if current != n:
        numba.set_num_threads(n)


_NO_MASK = torch.empty(0, dtype=torch.uint8)

# Scratch for the re-laid-out operands is carved from one buffer per thread and kept between
# calls (when at most this many bytes): a fresh multi-MB allocation costs a page fault per 4 KiB
# when first written, which measured up to a third of a 4096 x 4096 call. At width 1,000,000 the
# element backward needs 384 MB (dy and x transposed, 40 tokens); release_workspace() frees it.
WORKSPACE_CACHE_BYTES = 1 << 30
# Buffers from this size up are asked for transparent huge pages (Linux, madvise): the element
# kernels gather rows of these buffers at random, and with 4 KiB pages nearly every gather at
# width 1,000,000 missed the TLB (forward 0.51 -> 0.36 s, fused backward 0.74 -> 0.62-0.69 s
# per 26 M live entries, 40 tokens, 2 threads).
HUGE_PAGE_MIN_BYTES = 8 << 20
_tls = threading.local()


def release_workspace() -> None:
    """Free this thread's cached scratch buffer."""
    _tls.buf = _tls.views = None


def _new_buffer(nbytes: int):
    """An uninitialised uint8 numpy buffer; from ``HUGE_PAGE_MIN_BYTES`` up an anonymous mapping
    advised to use transparent huge pages, where the platform has them (else plain numpy)."""
    import mmap

    import numpy as np

    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes >= HUGE_PAGE_MIN_BYTES and advice is not None:
        try:
            mapping = mmap.mmap(-1, nbytes)
        except (OSError, ValueError):
            return np.empty(nbytes, dtype=np.uint8)
        try:
            mapping.madvise(advice)
        except OSError:  # no THP on this kernel: plain pages, still a valid buffer
            pass
        return np.frombuffer(mapping, dtype=np.uint8)  # the array keeps the mapping alive
    return np.empty(nbytes, dtype=np.uint8)


def _scratch(dtype, *shapes):
    """Uninitialised numpy arrays of ``shapes`` (64-byte aligned), from the per-thread buffer.

    Every call carves from the start of the buffer (the arrays of two calls overlap). The views
    of the last few ``(dtype, shapes)`` are kept with the buffer, so that a repeated call (every
    training step) is a dictionary lookup.
    """
    key = (dtype, shapes)
    views = getattr(_tls, "views", None)
    if views is not None:
        out = views.get(key)
        if out is not None:
            return out
    import numpy as np

    dtype = np.dtype(dtype)
    item = dtype.itemsize
    counts = [math.prod(s) for s in shapes]
    sizes = [-(-n * item // 64) * 64 for n in counts]
    total = sum(sizes) + 64
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.nbytes < total:
        buf = _new_buffer(total)
        if total <= WORKSPACE_CACHE_BYTES:
            _tls.buf, _tls.base = buf, (-buf.ctypes.data) % 64
            _tls.views = views = {}
        else:
            views = None
        base = (-buf.ctypes.data) % 64
    else:
        base = _tls.base
    off = base
    out = []
    for shape, n, size in zip(shapes, counts, sizes):
        out.append(buf[off:off + n * item].view(dtype).reshape(shape))
        off += size
    out = tuple(out)
    if views is not None:
        if len(views) >= _VIEWS_KEPT:
            views.clear()
        views[key] = out
    return out


_VIEWS_KEPT = 32


def _np(t: torch.Tensor):
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _check_index(t: torch.Tensor) -> None:
    # The kernels index raw memory: a cheap assert on what they rely on (the ops check the
    # index's contents, once per tensor version).
    if t.dtype != torch.int32 or not t.is_contiguous():
        raise TypeError(f"numba backend: expected contiguous int32 index tensors, got {t.dtype}")


def _epilogue(key) -> tuple:
    """The element forward's ``(act, scale)`` arguments for a ReLU + dropout key ``(k0, k1,
    threshold, scale)`` (see ``spmm.NO_ACT``)."""
    return np.array([1, *key[:3]], dtype=np.int64), float(key[3])


def linear_forward(x, values, row_ptr, col_idx, bias, rows: int, cols: int, block_size: int,
                   relu_dropout=None) -> torch.Tensor:
    """Forward ``y (M, rows) = x (M, cols) @ W.T + bias`` (bias ``(rows,)`` or None).

    ``relu_dropout`` (block size 1 only): None, or the key ``(k0, k1, threshold, scale)`` of
    :class:`set_kernels.nn.dropout.ReLUDropout`; the output is then that module's output on ``y``
    (the same mask and values, bit for bit), computed as the kernel writes ``y``.
    """
    return _product(x, values, (row_ptr, col_idx), bias, rows, cols, block_size, transposed=False,
                    act=relu_dropout)


def linear_grad_input(dy, values, col_ptr, row_idx, perm, rows: int, cols: int, block_size: int) -> torch.Tensor:
    """Input gradient ``dx (M, cols) = dy (M, rows) @ W``, through the transposed (CSC) index."""
    return _product(dy, values, (col_ptr, row_idx, perm), None, rows, cols, block_size, transposed=True)


def _product(a, values, index, bias, rows: int, cols: int, block_size: int, transposed: bool,
             act=None) -> torch.Tensor:
    """``a (M, n_in) @ W.T`` (forward: ``index`` is ``(row_ptr, col_idx)``) or ``a @ W``
    (``transposed``: ``index`` is ``(col_ptr, row_idx, perm)``), plus ``bias (n_out,)`` or None;
    ``act``: the forward's ReLU + dropout key or None (:func:`linear_forward`)."""
    bsmm, _, _, spmm, dropout = _load()
    b, rows, cols = int(block_size), int(rows), int(cols)
    if act is not None and (b != 1 or transposed):
        raise ValueError("numba backend: the ReLU + dropout epilogue is a forward at block size 1 only")
    n_in, n_out = (rows, cols) if transposed else (cols, rows)
    M = a.shape[0]
    out = torch.empty(M, n_out, dtype=a.dtype)
    if M == 0 or n_out == 0:
        return out
    if n_in == 0 or values.shape[0] == 0:
        out = out.zero_() if bias is None else out.copy_(bias.detach().to(out.dtype).expand(M, n_out))
        if act is not None:  # no product to fuse with: the module's own kernel
            flat = out.view(-1).numpy()
            dropout.dropout(flat, *act, flat, True)
        return out
    for t in index:
        _check_index(t)
    # dense operands contiguous: the kernels read whole rows as vectors (a direct op call may pass views)
    an, vn, idx = _np(a.contiguous()), _np(values), [_np(t) for t in index]
    bias_args = () if transposed else ((vn.reshape(-1)[:0], False) if bias is None else (_np(bias), True))
    if b == 1:
        (aT,) = _scratch(an.dtype, (n_in, spmm.padded_tokens(M, an.itemsize)))
        if transposed:
            spmm.linear_grad_input(an, vn.reshape(-1), *idx, out.numpy(), aT, spmm.ROW_CHUNK)
        else:
            epilogue = (spmm.NO_ACT, 1.0) if act is None else _epilogue(act)
            spmm.linear_forward(an, vn.reshape(-1), *idx, *bias_args, out.numpy(), aT, spmm.ROW_CHUNK, *epilogue)
        return out
    (ab,) = _scratch(an.dtype, (-(-n_in // b), M, b))
    kernel = bsmm.linear_grad_input if transposed else bsmm.linear_forward
    kernel(an, vn, *idx, *bias_args, out.numpy(), rows, cols, b, bsmm.token_tile(b), bsmm.K_CHUNK,
           bsmm.pass_tokens(n_in, b, an.itemsize), ab)
    return out


def linear_grad_weight(dy, x, block_row, col_idx, rows: int, cols: int, block_size: int) -> torch.Tensor:
    """Weight gradient on the live blocks: ``dv (nnz, b, b)``, ``dv[k] = dy[:, rows of k].T @ x[:, cols of k]``."""
    bsmm, _, _, spmm, _ = _load()
    b = int(block_size)
    rows, cols = int(rows), int(cols)
    nnz = block_row.shape[0]
    dv = torch.empty(nnz, b, b, dtype=dy.dtype)
    if nnz == 0:
        return dv
    if dy.shape[0] == 0:
        return dv.zero_()
    _check_index(block_row)
    _check_index(col_idx)
    dyn, xn = _np(dy.contiguous()), _np(x.contiguous())
    M = dyn.shape[0]
    if b == 1:
        Mp = spmm.padded_tokens(M, dyn.itemsize)
        dyT, xT = _scratch(dyn.dtype, (rows, Mp), (cols, Mp))
        spmm.linear_grad_weight(dyn, xn, _np(block_row), _np(col_idx), dv.numpy().reshape(-1), dyT, xT, spmm.ENTRY_CHUNK)
        return dv
    dyt, xt = _scratch(dyn.dtype, (-(-rows // b), b, M), (-(-cols // b), b, M))
    bsmm.linear_grad_weight(dyn, xn, _np(block_row), _np(col_idx), dv.numpy(), rows, cols, b, bsmm.M_CHUNK, dyt, xt)
    return dv


def linear_backward(dy, x, values, col_ptr, row_idx, perm, block_row, col_idx, rows: int, cols: int,
                  block_size: int, need_dx: bool, need_dv: bool):
    """``(dx, dv)`` of the forward in one call (None for what is not needed): at block size 1 the
    two kernels share one transpose of ``dy``; other block sizes call :func:`linear_grad_input` and
    :func:`linear_grad_weight`."""
    b = int(block_size)
    if b != 1 or dy.shape[0] == 0 or values.shape[0] == 0:
        dx = linear_grad_input(dy, values, col_ptr, row_idx, perm, rows, cols, block_size) if need_dx else None
        dv = linear_grad_weight(dy, x, block_row, col_idx, rows, cols, block_size) if need_dv else None
        return dx, dv
    return _element_backward(dy, None, 1.0, x, values, col_ptr, row_idx, perm, block_row, col_idx, rows, cols,
                             need_dx, need_dv)[:2]


def linear_backward_relu_dropout(dy, y, scale: float, x, values, col_ptr, row_idx, perm, block_row, col_idx,
                                 rows: int, cols: int, need_dx: bool, need_dv: bool):
    """``(dx, dv, dbias)`` of :func:`linear_forward` with the ReLU + dropout epilogue (block size
    1), from ``dy (M, rows)``, the gradient of its output ``y (M, rows)``, and the epilogue's
    ``scale``; ``dx``/``dv`` None when not needed. The epilogue's gradient (``dy * scale`` where
    ``y > 0``, else 0) is taken in the transpose of ``dy``, which also sums ``dbias``."""
    if dy.shape[0] == 0 or values.shape[0] == 0:  # nothing to fuse with: the module's own kernel
        g = torch.empty(dy.shape, dtype=dy.dtype)
        _load()[4].relu_dropout_grad(_np(dy).reshape(-1), _np(y).reshape(-1), float(scale), g.view(-1).numpy())
        dx = linear_grad_input(g, values, col_ptr, row_idx, perm, rows, cols, 1) if need_dx else None
        dv = linear_grad_weight(g, x, block_row, col_idx, rows, cols, 1) if need_dv else None
        return dx, dv, g.sum(0)
    return _element_backward(dy, y, scale, x, values, col_ptr, row_idx, perm, block_row, col_idx, rows, cols,
                             need_dx, need_dv)


def _element_backward(dy, y, scale, x, values, col_ptr, row_idx, perm, block_row, col_idx, rows, cols,
                      need_dx, need_dv):
    """The block-size-1 backward for ``M >= 1`` tokens and ``nnz >= 1``: ``(dx, dv, dbias)``,
    ``dbias`` only with the epilogue (``y`` not None)."""
    spmm = _load()[3]
    for t in (col_ptr, row_idx, perm, block_row, col_idx):
        _check_index(t)
    M, nnz = dy.shape[0], values.shape[0]
    dx = torch.empty(M, cols, dtype=dy.dtype)
    dv = torch.empty(nnz, 1, 1, dtype=dy.dtype)
    dbias = torch.empty(rows, dtype=dy.dtype) if y is not None else None
    dyn, xn = _np(dy.contiguous()), _np(x.contiguous())
    Mp = spmm.padded_tokens(M, dyn.itemsize)
    dyT, xT = _scratch(dyn.dtype, (rows, Mp), (cols, Mp))
    yn = dyn[:0] if y is None else _np(y.contiguous())
    dbn = dyn[0, :0] if dbias is None else dbias.numpy()
    spmm.linear_backward(dyn, xn, _np(values).reshape(-1), _np(col_ptr), _np(row_idx), _np(perm), _np(block_row),
                  _np(col_idx), bool(need_dx), bool(need_dv), dx.numpy(), dv.numpy().reshape(-1), dyT, xT,
                  spmm.ROW_CHUNK, spmm.ENTRY_CHUNK, yn, float(scale), dbn)
    return (dx if need_dx else None), (dv if need_dv else None), dbias


def relu_dropout_chain_ok(M: int, values) -> bool:
    """Whether :func:`relu_dropout_chain_forward` serves a run of layers with these ``values``
    on ``M`` tokens: ``1 <= M < spmm.LONG_RUN_MIN`` (the forward kernel of few tokens, which can
    write token-major output) and every layer with live entries."""
    spmm = (_kernels or _load())[3]  # (no thread-count sync: this call runs no kernel)
    return 0 < M < spmm.LONG_RUN_MIN and all(v.shape[0] > 0 for v in values)


def relu_dropout_chain_forward(x, layers, readout=None):
    """``k >= 1`` element layers ``h = ReLUDropout(h @ W_i.T + b_i)``, the activations between
    them kept token-major, and optionally a dense readout ``y = h @ w.T (+ b)`` after them.

    ``x (M, cols_0)`` contiguous, with :func:`relu_dropout_chain_ok`; ``layers``: per layer
    ``(values (nnz_i, 1, 1), bias (rows_i,) or None, row_ptr, col_idx, rows_i, cols_i, key_i)``
    with ``cols_{i+1} == rows_i``, ``key_i`` the epilogue key of :func:`linear_forward`, and the
    index parts int32 numpy arrays of a checked index
    (:func:`set_kernels.ops._library.checked_numpy`); ``readout``: None, or ``(w (n_out,
    rows_last) contiguous, bias (n_out,) or None)`` with ``n_out <= spmm.READOUT_MAX``.
    Returns ``(y, inputs_t)``: ``y (M, rows_last)``, what :func:`linear_forward` with
    ``relu_dropout`` gives layer after layer, bit for bit (the same kernel and sums), or with a
    readout ``y (M, n_out)`` (:func:`.spmm.readout_forward_t`: its own order of summation, not
    ``F.linear``'s); and each layer's input token-major, numpy ``(cols_i, Mp)`` (64-byte aligned,
    padding tokens zero): ``inputs_t[0]`` is ``x`` transposed, ``inputs_t[i]`` layer ``i - 1``'s
    output as the kernel wrote it (with a readout, ``inputs_t[k]`` is the last layer's output,
    the readout's input). A layer's input is then never transposed again: not by the next
    layer's forward, not by the backward (:func:`relu_dropout_chain_backward`).
    """
    spmm = _load()[3]
    xn = _np(x.contiguous())
    M = xn.shape[0]
    Mp = spmm.padded_tokens(M, xn.itemsize)
    a_t = torch.empty(xn.shape[1], Mp, dtype=x.dtype).numpy()  # torch's allocations are 64-byte aligned
    spmm.transpose(xn, a_t)
    inputs_t = [a_t]
    for i, (values, bias, row_ptr, col_idx, rows, cols, key) in enumerate(layers):
        last = i == len(layers) - 1 and readout is None
        out = torch.empty((M, rows) if last else (rows, Mp), dtype=x.dtype)
        vn = _np(values).reshape(-1)
        bn, has_bias = (vn[:0], False) if bias is None else (_np(bias), True)
        on = out.numpy()
        spmm._spmm_t(inputs_t[-1], M, vn, row_ptr, col_idx, col_idx, False, bn, has_bias, on, spmm.ROW_CHUNK,
                     *_epilogue(key), not last)
        if not last:
            inputs_t.append(on)
    if readout is not None:
        w, bias = readout
        wn = _np(w)
        out = torch.empty(M, wn.shape[0], dtype=x.dtype)
        (part,) = _scratch(wn.dtype, (spmm.readout_chunks(wn.shape[1]), wn.shape[0], Mp))
        bn, has_bias = (wn[0, :0], False) if bias is None else (_np(bias), True)
        spmm.readout_forward_t(inputs_t[-1], M, wn, bn, has_bias, out.numpy(), part)
    return out, tuple(inputs_t)


def relu_dropout_chain_backward(dy, y, inputs_t, layers, need_dx: bool, need_dv, need_db, readout=None):
    """The gradients of :func:`relu_dropout_chain_forward` from ``dy``, the gradient of its
    output ``y``: ``(dx (M, cols_0) or None, [dv_i (nnz_i, 1, 1) or None], [dbias_i (rows_i,) or
    None], dw)``, ``dw (n_out, rows_last)`` the readout's weight gradient (None without a readout
    or when ``readout[1]`` is false).

    ``layers``: per layer ``(values, col_ptr, row_idx, perm, block_row, col_idx, rows_i, cols_i,
    scale_i)``, the index parts as in :func:`relu_dropout_chain_forward`; ``need_dv``,
    ``need_db``: per layer; ``readout``: None, or ``(w, need_dw)`` (the readout's bias gradient,
    ``dy.sum(0)``, is the caller's). Last layer first: its epilogue's gradient is taken in the
    transpose of ``dy`` (:func:`.spmm.transpose_act_grad`), or, with a readout, written
    token-major with the readout's gradients (:func:`.spmm.readout_backward_t`); each layer's
    ``dx`` and ``dW`` come from one pass (:func:`.spmm.grads_t`), ``dx`` token-major for every
    layer but the first, so that the epilogue gradient of the layer below is taken in place on it
    (:func:`.spmm.act_grad_tm`), with no transpose. Without a readout, the same values as
    :func:`linear_backward_relu_dropout` layer by layer, bit for bit, apart from the bias
    gradients' order of summation.
    """
    spmm = _load()[3]
    dyn = _np(dy.contiguous())
    M, k = dyn.shape[0], len(layers)
    Mp = inputs_t[0].shape[1]
    rows_last = layers[-1][6]
    db = torch.empty(rows_last, dtype=dy.dtype)
    dw = None
    if readout is None:
        (g_t,) = _scratch(dyn.dtype, (rows_last, Mp))
        spmm.transpose_act_grad(dyn, _np(y.contiguous()), float(layers[-1][8]), g_t, db.numpy())
    else:
        w, need_dw = readout
        wn = _np(w)
        dy_t, g_t = _scratch(dyn.dtype, (wn.shape[0], Mp), (rows_last, Mp))
        spmm.transpose(dyn, dy_t)
        dw = torch.empty(wn.shape, dtype=dy.dtype) if need_dw else None
        spmm.readout_backward_t(dy_t, inputs_t[k], M, wn, float(layers[-1][8]), g_t,
                                wn if dw is None else dw.numpy(), bool(need_dw), db.numpy())
    dvs, dbs, dx = [None] * k, [None] * k, None
    for i in reversed(range(k)):
        values, col_ptr, row_idx, perm, block_row, col_idx, rows, cols, scale = layers[i]
        if i < k - 1:
            db = torch.empty(rows, dtype=dy.dtype)
            spmm.act_grad_tm(g_t, inputs_t[i + 1], M, float(scale), db.numpy())
        dbs[i] = db if need_db[i] else None
        ndx = i > 0 or need_dx
        if not (ndx or need_dv[i]):
            break
        vn = _np(values).reshape(-1)
        dv = torch.empty(values.shape, dtype=dy.dtype) if need_dv[i] else None
        if i > 0:  # the layer below's transposed dy: 64-byte aligned rows (whole cache lines per gather)
            dxn = torch.empty(cols, Mp, dtype=dy.dtype).numpy()
        else:
            dx = torch.empty(M, cols, dtype=dy.dtype) if ndx else None
            dxn = g_t[:0] if dx is None else dx.numpy()
        spmm.grads_t(g_t, inputs_t[i], M, vn, col_ptr, row_idx, perm, block_row, col_idx, ndx, dv is not None, dxn,
                     vn[:0] if dv is None else dv.numpy().reshape(-1), spmm.ROW_CHUNK, spmm.ENTRY_CHUNK, i > 0)
        dvs[i] = dv
        g_t = dxn
    return dx, dvs, dbs, dw


def masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, *, step: int, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, decoupled_weight_decay: bool, grad_scale=None,
                 found_inf=None) -> None:
    """In-place Adam/AdamW step over lists of tensors; masked entries of p, m, v become exactly 0.

    The math is torch.optim.Adam's: ``g = grad / grad_scale``; weight decay either decoupled
    (``p *= 1 - lr * wd``) or added to g (``g += wd * p``); ``m = lerp(m, g, 1 - beta1)``;
    ``v = beta2 * v + (1 - beta2) * g * g``; ``p -= lr / (1 - beta1**step) * m /
    (sqrt(v) / sqrt(1 - beta2**step) + eps)``; in fp32 (fp64 for fp64 params). Nothing changes
    when ``found_inf`` is given and non-zero.
    """
    adam = _load()[1]
    if found_inf is not None and float(found_inf.item()) != 0:
        return
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(masks) == n):
        raise ValueError("masked_adam_: params, grads, exp_avgs, exp_avg_sqs and masks must have the same length")
    step = int(step)
    bc1 = 1 - beta1 ** step
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    wd = float(weight_decay)
    decoupled = bool(decoupled_weight_decay)
    scale = 1.0 if grad_scale is None else float(grad_scale.item())
    hp_values = [0.0] * adam.HP_SIZE
    hp_values[adam.HP_BETA1] = beta1
    hp_values[adam.HP_1M_BETA1] = 1 - beta1
    hp_values[adam.HP_BETA2] = beta2
    hp_values[adam.HP_1M_BETA2] = 1 - beta2
    hp_values[adam.HP_STEP_SIZE] = lr / bc1
    hp_values[adam.HP_BC2_SQRT] = bc2_sqrt
    hp_values[adam.HP_EPS] = eps
    hp_values[adam.HP_P_FACTOR] = 1 - lr * wd if (decoupled and wd != 0) else 1.0
    hp_values[adam.HP_G_WD] = wd
    hp_values[adam.HP_GRAD_SCALE] = scale
    hps = {}
    coupled = wd != 0 and not decoupled
    # The masked kernel feeds masked entries through the update as zeros, which gives exactly 0
    # unless eps == 0 (0/0) or the grad scale is 0 or not finite; then zero them afterwards.
    refill = eps == 0 or not (math.isfinite(scale) and scale != 0)
    for p, g, m, v, mask in zip(params, grads, exp_avgs, exp_avg_sqs, masks):
        if p.numel() == 0:
            continue
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        if acc not in hps:
            hps[acc] = torch.tensor(hp_values, dtype=acc).numpy()
        tensors = (p, g, m, v) if mask is None else (p, g, m, v, mask)
        if any(not t.is_contiguous() or t.numel() != p.numel() for t in tensors):
            raise ValueError("masked_adam_: p, grad, exp_avg, exp_avg_sq and mask must be contiguous and of one size")
        if mask is None:
            mask_np, has_mask = _NO_MASK.numpy(), False
        else:
            mask_np, has_mask = _np(mask.view(torch.uint8)).reshape(-1), True
        adam.masked_adam_(_np(p).reshape(-1), _np(g).reshape(-1), _np(m).reshape(-1), _np(v).reshape(-1), mask_np,
                       has_mask, hps[acc], coupled, grad_scale is not None, adam.RUN)
        if has_mask and refill:
            with torch.no_grad():
                dead = ~mask
                for t in (p, m, v):
                    t.masked_fill_(dead, 0)
