"""Comparison groups: for one shape / dtype / block / density, a callable per implementation.

A :class:`Group` holds the callables that are timed together (interleaved on CPU), what kind of
implementation each is (a set_kernels ``backend``, the ``dense`` torch baseline, or the
``torch_bsr`` baseline: torch's BSR matmul, or its CSR matmul at block size 1), the work each does (FLOPs on live blocks, minimum bytes moved), and the
implementations that could not run, with the reason.

Work counted (so that TFLOP/s and GB/s mean the same thing for every implementation):

* ``block_sparse_linear`` forward: ``2 * tokens * live`` FLOPs, ``live`` = live weight elements
  (``rows * cols`` for dense); forward + backward (dX and dW): three times that.
* ``masked_adam_``: the fewest bytes a fused step must move: the bool mask (1 byte per
  element), then, per live element, read param/grad/exp_avg/exp_avg_sq and write
  param/exp_avg/exp_avg_sq.
* ``set_mlp_step``: ``6 * batch * live`` FLOPs (forward, dX, dW of every layer).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import backends as _backends
from .. import ops
from ..layout import BlockSparseLayout

# Kernels each measured pass needs from a backend.
KERNELS = {
    "forward": ("linear_forward",),
    "forward_backward": ("linear_forward", "linear_grad_input", "linear_grad_weight"),
    "step": ("masked_adam_",),
    "train_step": ("linear_forward", "linear_grad_input", "linear_grad_weight", "masked_adam_"),
}
REFERENCE_NOTE = ("the plain-torch reference backend (the readable test oracle, not a fast path; its "
                  "linear densifies the weight); time it with --backends torch")


@dataclass
class Group:
    """One interleaved comparison: ``fns[impl]`` are timed together."""

    op: str
    pass_: str
    shape: dict
    dtype: str
    block: int | None
    density: float | None
    nnz_blocks: int | None = None
    fns: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)  # impl -> "sparse" | "dense" | "baseline"
    flops: dict = field(default_factory=dict)  # impl -> FLOPs of one call (or absent)
    nbytes: dict = field(default_factory=dict)  # impl -> minimum bytes of one call (or absent)
    extra: dict = field(default_factory=dict)  # impl -> extra record fields
    skipped: list = field(default_factory=list)  # [(impl, reason)]
    postprocess: object = None  # optional callable: {impl: Stats} -> {impl: Stats}, after timing


def select_backends(requested, passes, device: torch.device, dtype: torch.dtype, *, block: int | None = None):
    """``(names, skipped)``: backends that can run every kernel of ``passes`` here, and why not the others.

    ``requested=None`` means every backend in :data:`set_kernels.backends.BACKENDS` except the
    plain-torch reference, and except triton on CPU (its interpreter is far too slow to time).
    """
    kernels = sorted({k for p in passes for k in KERNELS[p]})
    names, skipped = [], []
    for name in (requested or _backends.BACKENDS):
        if requested is None and name == "torch":
            skipped.append((name, REFERENCE_NOTE))
            continue
        if requested is None and name == "triton" and device.type == "cpu":
            skipped.append((name, "triton on CPU runs only in the (very slow) interpreter; "
                                  "time it with --backends triton"))
            continue
        reasons = []
        for k in kernels:
            size = block if k.startswith("linear") else None
            reasons += [r for r in _backends.unsupported_reasons(name, k, device, dtype, size) if r not in reasons]
        if reasons:
            skipped.append((name, "; ".join(reasons)))
        else:
            names.append(name)
    return names, skipped


def _live_elements(layout: BlockSparseLayout) -> int:
    rows, cols = layout.shape
    b = layout.block_size
    br, bc = layout.block_row.long(), layout.col_idx.long()
    return int(((rows - br * b).clamp(max=b) * (cols - bc * b).clamp(max=b)).sum())


def _try_add(group: Group, impl: str, kind: str, build):
    """Add ``impl`` built by ``build()`` (a callable); one trial call. A failure is recorded as skipped."""
    try:
        fn = build()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # a failing GPU launch is reported here, against this impl
    except Exception as exc:  # a baseline torch does not support here (dtype, device, layout)
        group.skipped.append((impl, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
        return
    group.fns[impl], group.kinds[impl] = fn, kind


def _randn(shape, device, dtype, seed: int, scale: float = 1.0, positive: bool = False) -> torch.Tensor:
    """Random data drawn on ``device`` itself (GPU-sized inputs would be slow to draw on the host)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch.empty(shape, device=device, dtype=torch.float32)
    t = t.uniform_(0.0, 1.0, generator=gen) if positive else t.normal_(generator=gen)
    return (t * scale).to(dtype)


def _bsr(weight: torch.Tensor, block: int) -> torch.Tensor:
    """torch's own compressed sparse weight: BSR with ``block x block`` blocks, CSR at block 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse BSR support is in beta"
        return weight.to_sparse_csr() if block == 1 else weight.to_sparse_bsr((block, block))


def linear_groups(tokens: int, features: int, dtype: torch.dtype, block: int, density: float, device,
                  backends: dict, *, seed: int = 0):
    """The forward and forward+backward groups of ``y = x @ W.T``, ``x (tokens, features)``,
    ``W (features, features)`` with ``density`` of its ``block x block`` blocks live.

    ``backends`` maps each pass to the backend names to time (see :func:`select_backends`).
    """
    gen = torch.Generator().manual_seed(seed)
    layout = BlockSparseLayout.random(features, features, block, density, generator=gen).to(device)
    x = _randn((tokens, features), device, dtype, seed)
    weight = _randn((features, features), device, dtype, seed + 1, scale=features**-0.5)
    dy = _randn((tokens, features), device, dtype, seed + 2)
    values = ops.from_dense(weight, layout)
    live = _live_elements(layout)
    shape = {"tokens": tokens, "in_features": features, "out_features": features}
    common = dict(op="block_sparse_linear", shape=shape, dtype=str(dtype).replace("torch.", ""), block=block,
                  density=layout.density, nnz_blocks=layout.nnz_blocks)

    fwd = Group(pass_="forward", **common)
    for name in backends["forward"]:
        _try_add(fwd, name, "sparse", lambda name=name: lambda: ops.block_sparse_linear(x, values, layout,
                                                                                         backend=name))
        fwd.flops[name] = 2 * tokens * live
    _try_add(fwd, "dense", "dense", lambda: lambda: F.linear(x, weight))
    fwd.flops["dense"] = 2 * tokens * features * features

    def bsr_fn():
        w_bsr = _bsr(ops.to_dense(values, layout), block)
        return lambda: torch.sparse.mm(w_bsr, x.t()).t()  # torch's BSR matmul wants the sparse operand first
    _try_add(fwd, "torch_bsr", "baseline", bsr_fn)
    fwd.flops["torch_bsr"] = 2 * tokens * live

    bwd = Group(pass_="forward_backward", **common)
    xs = x.detach().clone().requires_grad_(True)
    vs = values.detach().clone().requires_grad_(True)
    wd = weight.detach().clone().requires_grad_(True)
    for name in backends["forward_backward"]:
        def sparse_step(name=name):
            return lambda: torch.autograd.grad(ops.block_sparse_linear(xs, vs, layout, backend=name), (xs, vs), dy)
        _try_add(bwd, name, "sparse", sparse_step)
        bwd.flops[name] = 6 * tokens * live
    _try_add(bwd, "dense", "dense", lambda: lambda: torch.autograd.grad(F.linear(xs, wd), (xs, wd), dy))
    bwd.flops["dense"] = 6 * tokens * features * features
    bwd.skipped.append(("torch_bsr", "torch's BSR tensors have no backward for this product; forward only"))
    return [fwd, bwd]


ADAM_HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


def adam_group(rows: int, cols: int, dtype: torch.dtype, block: int, density: float, device, names,
               *, seed: int = 1) -> Group:
    """One masked Adam step on a ``(rows, cols)`` parameter whose mask keeps ``density`` of the
    ``block x block`` blocks: each backend's fused ``masked_adam_`` against
    ``torch.optim.Adam(fused=True)`` plus the two mask multiplies (``grad *= mask``, ``param *= mask``)."""
    gen = torch.Generator().manual_seed(seed)
    layout = BlockSparseLayout.random(rows, cols, block, density, generator=gen).to(device)
    mask = layout.element_mask()
    moment_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    shape = (rows, cols)
    p0, g0 = _randn(shape, device, dtype, seed) * mask, _randn(shape, device, dtype, seed + 1)
    m0 = _randn(shape, device, moment_dtype, seed + 2, scale=0.01) * mask
    v0 = _randn(shape, device, moment_dtype, seed + 3, scale=1e-4, positive=True) * mask
    live = int(mask.sum())
    group = Group(op="masked_adam_", pass_="step", shape={"rows": rows, "cols": cols},
                  dtype=str(dtype).replace("torch.", ""), block=block, density=layout.density,
                  nnz_blocks=layout.nnz_blocks)
    nbytes = rows * cols + live * (3 * dtype.itemsize + 4 * moment_dtype.itemsize)

    for name in names:
        def sparse(name=name):
            p, g, m, v, step = p0.clone(), g0.clone(), m0.clone(), v0.clone(), [0]

            def one_step():
                step[0] += 1
                ops.masked_adam_([p], [g], [m], [v], [mask], step=step[0], backend=name, **ADAM_HYPER)
            return one_step
        _try_add(group, name, "sparse", sparse)

    def dense():
        p = torch.nn.Parameter(p0.clone())
        p.grad = g0.clone()
        opt = torch.optim.Adam([p], lr=ADAM_HYPER["lr"], betas=(ADAM_HYPER["beta1"], ADAM_HYPER["beta2"]),
                               eps=ADAM_HYPER["eps"], fused=True)
        opt.step()  # creates the state; then start from the same moments as the sparse runs
        opt.state[p]["exp_avg"].copy_(m0)
        opt.state[p]["exp_avg_sq"].copy_(v0)
        fmask = mask.to(dtype)  # multiplying by a float mask is torch's fastest way to apply it

        @torch.no_grad()
        def one_step():
            p.grad.mul_(fmask)
            opt.step()
            p.mul_(fmask)
        return one_step
    _try_add(group, "dense", "dense", dense)
    for impl in list(group.fns):
        group.nbytes[impl] = nbytes
    return group
