"""torch.library custom ops: schemas, fake (meta) implementations and autograd.

Every op takes the layout as one packed int32 ``index`` tensor (see
:class:`set_kernels.layout.BlockSparseLayout`) plus ``rows``, ``cols`` and ``block_size``. No op
takes a backend: each has one kernel registered for CPU and one for CUDA tensors (the same
function), which picks the backend when it runs, with :func:`set_kernels.backends.choose`
(a ``backends.use()`` block, else ``$SET_KERNELS_BACKEND``, else the device's auto order). So a
``torch.compile``d or ``torch.export``ed graph records no backend. The ops are opaque to
``torch.compile``; validation happens in the public wrappers of :mod:`set_kernels.ops`, before
any op is called, and the layout index is checked once per tensor version (:func:`check_index`).

The three matmuls are each other's transposes (``W`` is ``(rows, cols)``), so every backward is
written with them:

* ``linear_forward(x, W) = x @ W.T``      -> ``dx = linear_grad_input(dy, W)``, ``dW = linear_grad_weight(dy, x)``
* ``linear_grad_input(g, W) = g @ W``     -> ``dg = linear_forward(dz, W)``, ``dW = linear_grad_weight(g, dz)``
* ``linear_grad_weight(g, x) = g.T @ x``  -> ``dg = linear_forward(x, dS)``, ``dx = linear_grad_input(g, dS)``
  (on live blocks only)

Plain eager calls take a shorter road to the same kernels: :class:`EagerLinear` (the forward and
backward of ``linear_forward`` as an ``autograd.Function``) and, in a backward that builds no graph, a
backend's fused ``linear_backward`` when it has one (numba: one transpose of ``dy`` for both
gradients at block size 1). Tracing, fake tensors and double backward use the custom ops.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import List, Optional

import torch
from torch import Tensor

from .. import backends
from ..backends import torch_ref


def split_index(index: Tensor, rows: int, cols: int, block_size: int):
    """Views ``(row_ptr, col_idx, block_row, col_ptr, row_idx, perm)`` of a packed layout index."""
    n_rows, n_cols = -(-rows // block_size), -(-cols // block_size)
    nnz = (index.numel() - n_rows - n_cols - 2) // 4
    return torch.split(index, [n_rows + 1, nnz, nnz, n_cols + 1, nnz, nnz])


def check_index_structure(index, rows: int, cols: int, block_size: int) -> int:
    """O(1) checks of a packed layout index (no data read); returns ``nnz``.

    ``index`` must be a contiguous 1-D int32 tensor of length ``(R + 1) + (C + 1) + 4 * nnz``.
    Raises TypeError / ValueError naming ``index``.
    """
    if not isinstance(index, Tensor):
        raise TypeError(f"index: expected a torch.Tensor, got {type(index).__name__}")
    if index.dtype != torch.int32:
        raise TypeError(f"index: expected an int32 tensor (a BlockSparseLayout's packed index), got dtype {index.dtype}")
    if index.dim() != 1 or not index.is_contiguous():
        raise ValueError(f"index: expected a contiguous 1-D tensor, got shape {tuple(index.shape)}")
    for name, value in (("rows", rows), ("cols", cols), ("block_size", block_size)):
        if value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value}")
    n_rows, n_cols = -(-rows // block_size), -(-cols // block_size)
    rest = index.numel() - n_rows - n_cols - 2
    if rest < 0 or rest % 4:
        raise ValueError(f"index: length {index.numel()} does not fit a {n_rows} x {n_cols} block grid "
                         f"(expected {n_rows + 1} + {n_cols + 1} + 4 * nnz)")
    return rest // 4


# id(index) -> (weakref to it, its _version, (rows, cols, block_size), split views) of indices
# already checked. An entry leaves with its index tensor (the weakref's callback): the split views
# share the index's storage, so an entry that outlived its index kept that storage alive (every
# SET update drops three layouts: at width 1,000,000, 1.2 GB of old indices per epoch).
_CHECKED: dict = {}


def _forget(key: int):
    return lambda ref: _CHECKED.pop(key, None) if _CHECKED.get(key, (None,))[0] is ref else None


def check_index(index: Tensor, rows: int, cols: int, block_size: int) -> tuple:
    """Check that every offset and block index in a packed layout index is in range.

    Run by the real implementations of the ops, before any backend kernel: a hand-built or
    corrupted index raises ValueError instead of making a kernel read out of bounds. Checked
    once per index tensor and in-place version (later calls are a dict lookup); on CUDA the
    first check costs one host sync, and it is skipped while a CUDA graph is being captured.
    Returns the views of :func:`split_index` (cached with the check, as long as ``index`` lives).
    """
    key = (rows, cols, block_size)
    hit = _checked_parts(index, key)
    if hit is not None:
        return hit  # this very tensor, unchanged, was checked for this grid
    nnz = check_index_structure(index, rows, cols, block_size)
    if index.device.type == "meta":
        return split_index(index, rows, cols, block_size)
    if index.is_cuda and torch.cuda.is_current_stream_capturing():
        return split_index(index, rows, cols, block_size)
    n_rows, n_cols = -(-rows // block_size), -(-cols // block_size)
    row_ptr, col_idx, block_row, col_ptr, row_idx, perm = split_index(index, rows, cols, block_size)
    conds = []
    for ptr in (row_ptr, col_ptr):
        conds += [ptr[0] == 0, ptr[-1] == nnz, (ptr[1:] >= ptr[:-1]).all()]
    for idx, bound in ((col_idx, n_cols), (block_row, n_rows), (row_idx, n_rows), (perm, nnz)):
        if idx.numel():
            conds += [idx.min() >= 0, idx.max() < bound]
    ok = torch.stack([c.reshape(()) for c in conds])
    if not bool(ok.all()):  # one host read for all conditions
        names = ["row_ptr[0] == 0", "row_ptr[-1] == nnz", "row_ptr non-decreasing", "col_ptr[0] == 0",
                 "col_ptr[-1] == nnz", "col_ptr non-decreasing"]
        for name, bound in (("col_idx", "C"), ("block_row", "R"), ("row_idx", "R"), ("perm", "nnz")):
            if nnz:
                names += [f"{name} >= 0", f"{name} < {bound}"]
        failed = [n for n, good in zip(names, ok.tolist()) if not good]
        raise ValueError(f"index: not a valid layout index for a {n_rows} x {n_cols} block grid with nnz={nnz} "
                         f"(failed: {', '.join(failed)}); build layouts with BlockSparseLayout.from_csr")
    return _remember(index, key)


def _remember(index: Tensor, key: tuple) -> tuple:
    if len(_CHECKED) > 4096:
        _CHECKED.clear()
    # views of a detached alias: a view of ``index`` itself would keep it alive (its ``_base``),
    # and with it this entry
    parts = split_index(index.detach(), *key)
    # the last slot: the numpy views of a CPU index, made on first request (checked_numpy)
    _CHECKED[id(index)] = (weakref.ref(index, _forget(id(index))), index._version, key, parts, [None])
    return parts


def trust_index(index: Tensor, rows: int, cols: int, block_size: int) -> None:
    """Record ``index`` as checked for this grid without reading it: for indices the library has
    just built from positions it knows are valid (sorted, distinct, in range), such as the layout
    of every SET update, whose check would otherwise cost the next forward pass a dozen
    reductions. An in-place edit afterwards is still caught (the version changes)."""
    check_index_structure(index, rows, cols, block_size)
    if index.device.type != "meta":
        _remember(index, (rows, cols, block_size))


def checked_numpy(index: Tensor, rows: int, cols: int, block_size: int) -> tuple:
    """:func:`check_index`'s views of a CPU index as numpy arrays (int32, contiguous), kept with
    the check as long as ``index`` lives and is unchanged: a training step's kernels then convert
    no index part twice."""
    parts = check_index(index, rows, cols, block_size)
    hit = _CHECKED.get(id(index))
    if hit is None or hit[3] is not parts:  # an index check_index does not remember
        return tuple(p.numpy() for p in parts)
    box = hit[4]
    if box[0] is None:
        box[0] = tuple(p.numpy() for p in parts)
    return box[0]


def checked_nnz(index: Tensor, rows: int, cols: int, block_size: int):
    """``nnz`` of an index :func:`check_index` has already checked for this grid (unchanged since),
    else None: a dict lookup that stands in for :func:`check_index_structure`."""
    parts = _checked_parts(index, (rows, cols, block_size))
    return None if parts is None else parts[1].shape[0]


def _checked_parts(index: Tensor, key: tuple):
    """The cached split views of ``index`` when this very tensor, unchanged since, was checked
    for the grid ``key``; else None."""
    hit = _CHECKED.get(id(index))
    if hit is not None and hit[0]() is index and hit[1] == index._version and hit[2] == key:
        return hit[3]
    return None


_ERRORS = {"ValueError": ValueError, "RuntimeError": RuntimeError, "TypeError": TypeError}


@torch.compiler.assume_constant_result
def _resolve_or_error(backend, op: str, device: torch.device, dtype: torch.dtype,
                      block_size=None) -> tuple[str, str]:
    """``(backend name, "")``, or ``(error type name, message)``; a constant under torch.compile.

    Under ``torch.compile`` this runs once, when the graph is traced, as a check of the request:
    the graph records no backend (its ops choose when they run, :func:`set_kernels.backends.choose`).
    Returning the error instead of raising it lets the caller raise it as the same exception type,
    compiled or not.
    """
    try:
        return backends.resolve(backend, op, device, dtype, block_size), ""
    except (ValueError, RuntimeError, TypeError) as exc:
        return type(exc).__name__, str(exc)


def resolve(backend, op: str, device: torch.device, dtype: torch.dtype, block_size=None) -> str:
    """:func:`set_kernels.backends.resolve`, traceable by torch.compile without a graph break.

    When tracing, a ``backend`` named explicitly is checked but not recorded: the traced op picks
    its backend when the graph runs, and a warning says so once when that pick would differ.
    """
    if not torch.compiler.is_compiling():
        # eager: the cached resolution (the same rules; a failed one is not cached and raises)
        if backend is None or backend == "auto":
            return backends.choose(op, device, dtype, block_size)
        return backends.resolve_named(backend, op, device, dtype, block_size)
    name, error = _resolve_or_error(backend, op, device, dtype, block_size)
    if error:
        raise _ERRORS[name](error)
    if torch.compiler.is_compiling() and backend not in (None, "auto"):
        _note_traced_backend(backend, op, device, dtype, block_size)
    return name


_NOTED: set = set()


@torch.compiler.assume_constant_result
def _note_traced_backend(backend, op, device, dtype, block_size) -> bool:
    runtime, error = _resolve_or_error(None, op, device, dtype, block_size)
    key = (backend, runtime, device.type)
    if not error and runtime != backend and key not in _NOTED:
        _NOTED.add(key)
        warnings.warn(f"backend={backend!r} is not recorded in a torch.compile or torch.export graph: its ops "
                      f"choose their backend when they run, here {runtime!r}. Run the compiled model inside "
                      f"`with set_kernels.backends.use({backend!r}):` (or set ${backends.ENV_VAR}) to use "
                      f"{backend!r} there.", stacklevel=2)
    return True


# ------------------------------------------------------------------------------------- kernels
def _forward(x, values, index, bias, rows, cols, block_size, backend=None):
    name = backend or backends.choose("linear_forward", x.device, x.dtype, block_size)
    row_ptr, col_idx, *_ = check_index(index, rows, cols, block_size)
    return backends.get(name).linear_forward(x, values, row_ptr, col_idx, bias, rows, cols, block_size)


def _grad_input(dy, values, index, rows, cols, block_size, backend=None):
    name = backend or backends.choose("linear_grad_input", dy.device, dy.dtype, block_size)
    _, _, _, col_ptr, row_idx, perm = check_index(index, rows, cols, block_size)
    return backends.get(name).linear_grad_input(dy, values, col_ptr, row_idx, perm, rows, cols, block_size)


def _grad_weight(dy, x, index, rows, cols, block_size, backend=None):
    name = backend or backends.choose("linear_grad_weight", dy.device, dy.dtype, block_size)
    _, col_idx, block_row, *_ = check_index(index, rows, cols, block_size)
    return backends.get(name).linear_grad_weight(dy, x, block_row, col_idx, rows, cols, block_size)


def _define(name: str, schema_fn, kernel, fake):
    """A custom op with one kernel for CPU and CUDA tensors (each picks its backend when it runs,
    :func:`set_kernels.backends.choose`) and a fake (meta) kernel."""
    op = torch.library.custom_op(f"set_kernels::{name}", mutates_args=(), device_types="cpu")(schema_fn)
    op.register_kernel("cuda")(kernel)
    op.register_fake(fake)
    return op


def plain_eager(*tensors) -> bool:
    """Whether the call runs eagerly on plain tensors: no torch.compile / export tracing, no fake
    or functional tensors, no dispatch mode. Then the ops' kernels may be called directly (the
    custom ops and the direct calls run the same code; the direct path skips the dispatcher)."""
    if torch.compiler.is_compiling() or _dispatch_modes():
        return False
    return all(t is None or (type(t) in _PLAIN and not t.is_meta) for t in tensors)


_PLAIN = (Tensor, torch.nn.Parameter)
# Active TorchDispatchModes (FakeTensorMode, proxy tracing, ...); a torch without the query is
# treated as always having one, so that every call keeps the custom ops.
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)


def _using(backend):
    """``backends.use(backend)`` for a named backend; no change for None."""
    return backends.use(backend) if backend else contextlib.nullcontext()


# ------------------------------------------------------------------------------------- forward
def _forward_schema(x: Tensor, values: Tensor, index: Tensor, bias: Optional[Tensor], rows: int, cols: int,
                    block_size: int) -> Tensor:
    """``y (M, rows) = x (M, cols) @ W.T + bias``, W given by ``values (nnz, b, b)`` on the layout."""
    return _forward(x, values, index, bias, rows, cols, block_size)


linear_forward = _define("linear_forward", _forward_schema, _forward,
                         lambda x, values, index, bias, rows, cols, block_size: x.new_empty(x.shape[0], rows))


def _forward_setup(ctx, inputs, output, backend=None):
    x, values, index, bias, rows, cols, block_size = inputs[:7]
    ctx.save_for_backward(x, values, index)
    # The backend of the forward, for the backward: the one an eager call named, else the
    # backends.use() block around the forward (None: the backward chooses when it runs).
    ctx.meta = (rows, cols, block_size, backend or backends.selected())
    ctx.has_bias = bias is not None


def _forward_backward(ctx, dy):
    x, values, index = ctx.saved_tensors
    rows, cols, b, backend = ctx.meta
    dy = dy.contiguous()
    dx = dv = dbias = None
    # A plain eager backward (not create_graph) calls the kernels directly; otherwise the
    # differentiable, traceable custom ops.
    direct = not torch.is_grad_enabled() and plain_eager(dy, x, values)
    need_dx, need_dv = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if direct and (need_dx or need_dv):
        name = backend or backends.choose("linear_grad_input", dy.device, dy.dtype, b)
        fused = getattr(backends.get(name), "linear_backward", None)
        if fused is not None:  # one call for both gradients (a backend may share work between them)
            row_ptr, col_idx, block_row, col_ptr, row_idx, perm = check_index(index, rows, cols, b)
            dx, dv = fused(dy, x, values, col_ptr, row_idx, perm, block_row, col_idx, rows, cols, b, need_dx, need_dv)
        else:
            dx = _grad_input(dy, values, index, rows, cols, b, name) if need_dx else None
            dv = _grad_weight(dy, x, index, rows, cols, b, name) if need_dv else None
    elif need_dx or need_dv:
        with _using(backend):
            dx = linear_grad_input(dy, values, index, rows, cols, b) if need_dx else None
            dv = linear_grad_weight(dy, x, index, rows, cols, b) if need_dv else None
    if ctx.has_bias and ctx.needs_input_grad[3]:
        dbias = dy.sum(0)
    return dx, dv, None, dbias, None, None, None, None


linear_forward.register_autograd(_forward_backward, setup_context=_forward_setup)


class EagerLinear(torch.autograd.Function):
    """``linear_forward`` with its autograd formula, for plain eager calls (see :func:`plain_eager`).

    The same kernels, saved tensors and backward as the custom op, without its dispatch, which
    costs tens of microseconds a call: at small batches (a SET-MLP step at batch 40) that was a
    third of a sparse layer's time. ``backend`` is the name the public op resolved; double
    backward goes through the custom ops.
    """

    @staticmethod
    def forward(ctx, x, values, index, bias, rows, cols, block_size, backend):
        # ctx in forward (not setup_context): apply() then binds no signature, a large part of
        # the saving at small sizes.
        y = _forward(x, values, index, bias, rows, cols, block_size, backend)
        _forward_setup(ctx, (x, values, index, bias, rows, cols, block_size), y, backend)
        return y

    backward = staticmethod(_forward_backward)


# ------------------------------------------------------------------------------- input gradient
def _grad_input_schema(dy: Tensor, values: Tensor, index: Tensor, rows: int, cols: int, block_size: int) -> Tensor:
    """``dx (M, cols) = dy (M, rows) @ W``, walking the transposed index (no atomics)."""
    return _grad_input(dy, values, index, rows, cols, block_size)


linear_grad_input = _define("linear_grad_input", _grad_input_schema, _grad_input,
                            lambda dy, values, index, rows, cols, block_size: dy.new_empty(dy.shape[0], cols))


def _save_operands(ctx, inputs, output):
    """setup_context of linear_grad_input and linear_grad_weight: ``(a, b, index, rows, cols, block_size)``."""
    ctx.save_for_backward(*inputs[:3])
    ctx.meta = tuple(inputs[3:]) + (backends.selected(),)


def _grad_input_backward(ctx, dz):
    g, values, index = ctx.saved_tensors
    rows, cols, b, backend = ctx.meta
    dz = dz.contiguous()
    with _using(backend):
        dg = linear_forward(dz, values, index, None, rows, cols, b) if ctx.needs_input_grad[0] else None
        dv = linear_grad_weight(g, dz, index, rows, cols, b) if ctx.needs_input_grad[1] else None
    return dg, dv, None, None, None, None


linear_grad_input.register_autograd(_grad_input_backward, setup_context=_save_operands)


# ------------------------------------------------------------------------------ weight gradient
def _grad_weight_schema(dy: Tensor, x: Tensor, index: Tensor, rows: int, cols: int, block_size: int) -> Tensor:
    """``dv (nnz, b, b)``: ``dy (M, rows).T @ x (M, cols)`` on the live blocks only."""
    return _grad_weight(dy, x, index, rows, cols, block_size)


def _grad_weight_fake(dy, x, index, rows, cols, block_size):
    nnz = split_index(index, rows, cols, block_size)[1].shape[0]
    return dy.new_empty(nnz, block_size, block_size)


linear_grad_weight = _define("linear_grad_weight", _grad_weight_schema, _grad_weight, _grad_weight_fake)


def _grad_weight_backward(ctx, ds):
    g, x, index = ctx.saved_tensors
    rows, cols, b, backend = ctx.meta
    ds = ds.contiguous()
    with _using(backend):
        dg = linear_forward(x, ds, index, None, rows, cols, b) if ctx.needs_input_grad[0] else None
        dx = linear_grad_input(g, ds, index, rows, cols, b) if ctx.needs_input_grad[1] else None
    return dg, dx, None, None, None, None


linear_grad_weight.register_autograd(_grad_weight_backward, setup_context=_save_operands)


# ---------------------------------------------------------------------- dense <-> block values
@torch.library.custom_op("set_kernels::to_dense", mutates_args=())
def to_dense(values: Tensor, index: Tensor, rows: int, cols: int, block_size: int) -> Tensor:
    """``W (rows, cols)`` from ``values (nnz, b, b)``; zeros outside live blocks."""
    check_index(index, rows, cols, block_size)
    _, col_idx, block_row, *_ = split_index(index, rows, cols, block_size)
    return torch_ref.to_dense(values, block_row, col_idx, rows, cols, block_size)


@to_dense.register_fake
def _(values, index, rows, cols, block_size):
    return values.new_empty(rows, cols)


@torch.library.custom_op("set_kernels::from_dense", mutates_args=())
def from_dense(weight: Tensor, index: Tensor, rows: int, cols: int, block_size: int) -> Tensor:
    """``values (nnz, b, b)``: the live blocks of ``weight (rows, cols)``, zero beyond the edges."""
    check_index(index, rows, cols, block_size)
    _, col_idx, block_row, *_ = split_index(index, rows, cols, block_size)
    return torch_ref.from_dense(weight, block_row, col_idx, rows, cols, block_size)


@from_dense.register_fake
def _(weight, index, rows, cols, block_size):
    nnz = split_index(index, rows, cols, block_size)[1].shape[0]
    return weight.new_empty(nnz, block_size, block_size)


def _layout_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.meta = inputs[2:]


def _to_dense_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return from_dense(grad.contiguous(), index, *ctx.meta), None, None, None, None


def _from_dense_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return to_dense(grad.contiguous(), index, *ctx.meta), None, None, None, None


to_dense.register_autograd(_to_dense_backward, setup_context=_layout_setup)
from_dense.register_autograd(_from_dense_backward, setup_context=_layout_setup)


# -------------------------------------------------------------------------------- masked Adam
def _masked_adam_kernel(params, grads, exp_avgs, exp_avg_sqs, masks, grad_scale, found_inf, step, lr, beta1,
                        beta2, eps, weight_decay, decoupled_weight_decay):
    """The CPU and CUDA kernel of ``masked_adam_``: one fused backend call per backend chosen now
    (:func:`set_kernels.backends.choose`, per parameter dtype; usually exactly one)."""
    if not params:
        return
    chosen = {dt: backends.choose("masked_adam_", params[0].device, dt) for dt in {p.dtype for p in params}}
    groups: dict = {}
    for i, p in enumerate(params):
        groups.setdefault(chosen[p.dtype], []).append(i)
    for name, idx in groups.items():
        pick = (lambda seq: seq) if len(groups) == 1 else (lambda seq: [seq[i] for i in idx])
        backends.get(name).masked_adam_(
            pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(masks), step=step, lr=lr,
            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale, found_inf=found_inf)


@torch.library.custom_op("set_kernels::masked_adam_", mutates_args=("params", "exp_avgs", "exp_avg_sqs"),
                         device_types="cpu")
def masked_adam_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                 exp_avg_sqs: List[Tensor], masks: List[Optional[Tensor]], grad_scale: Optional[Tensor],
                 found_inf: Optional[Tensor], step: int, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, decoupled_weight_decay: bool) -> None:
    """In-place fused masked Adam/AdamW over lists of tensors (see ``set_kernels.ops.masked_adam_``)."""
    _masked_adam_kernel(params, grads, exp_avgs, exp_avg_sqs, masks, grad_scale, found_inf, step, lr, beta1,
                        beta2, eps, weight_decay, decoupled_weight_decay)


masked_adam_.register_kernel("cuda")(_masked_adam_kernel)


@masked_adam_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, masks, grad_scale, found_inf, step, lr, beta1, beta2,
      eps, weight_decay, decoupled_weight_decay):
    return None
