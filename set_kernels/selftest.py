"""``set-kernels selftest``: check every backend available here against a float64 reference.

For each device here (``cuda`` when torch sees a GPU, then ``cpu``) and each backend that serves
it (compiled ones first), every op runs on small odd shapes for each dtype and block size the
backend supports:

* ``fwd``, ``dX``, ``dW``: one ``block_sparse_linear`` forward and its backward (``linear_forward``,
  ``linear_grad_input``, ``linear_grad_weight``), on a random layout of density 0.5 whose edge blocks are partial,
  with ``values`` set to NaN past the matrix edge (a kernel must not read them) and every
  Python-side allocation NaN-filled while the op runs, so an output element left unwritten shows
  up as a non-finite result;
* ``adam``, ``adamw``: three steps of ``masked_adam_`` on masked and unmasked tensors, against
  ``torch.optim.Adam`` / ``AdamW`` run in float64 on the same gradients (masked entries of the
  parameter and both moments must be exactly 0).

The reference is computed with dense float64 torch on the CPU from the layout's CSR, without
the package's own ``to_dense``. The error is ``max |result - reference| / max |reference|``.
Bounds: fp64 1e-10; fp32 1e-4 for the matmuls (5e-3 when TF32 is switched on) and 1e-5 for
Adam; fp16 / bf16 twice torch's own error on the same data in that dtype (``F.linear`` and
matmuls, or ``torch.optim.Adam`` with state in that dtype), and never below one unit of that
dtype's precision (``torch.finfo(dtype).eps``).

Combinations a backend does not support are reported as ``skip`` with the dispatcher's reason.
The exit status is 1 when any check fails or none ran, 2 for bad arguments, else 0.

Triton runs on the CPU only in its interpreter (``TRITON_INTERPRET=1`` set before triton is
imported); that is slow, so its shapes are kept tiny there. NaN-filling works by patching
``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty`` for the duration of each op call:
do not run the selftest in a thread of a program that allocates at the same time.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from . import backends, ops
from .layout import BlockSparseLayout

BLOCK_SIZES = (1, 16, 32, 64, 128)
QUICK_BLOCK_SIZES = (1, 32)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
MATMUL_OPS = {"fwd": "linear_forward", "dX": "linear_grad_input", "dW": "linear_grad_weight"}
ADAM_OPS = ("adam", "adamw")
DENSITY = 0.5
# Relative bounds (error over the reference's largest magnitude) where no torch comparison is used.
MATMUL_BOUND = {torch.float64: 1e-10, torch.float32: 1e-4}
TF32_BOUND = 5e-3
ADAM_BOUND = {torch.float64: 1e-10, torch.float32: 1e-5}
ADAM_HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
ADAM_SHAPES = ((37, 13), (5,), (3, 65))
ADAM_STEPS = 3


@dataclasses.dataclass
class Result:
    backend: str
    device: str
    op: str
    dtype: str
    block: str
    status: str  # "PASS", "FAIL" or "skip"
    error: float | None = None
    bound: float | None = None
    note: str = ""


# ------------------------------------------------------------------------------ poisoned outputs
@contextlib.contextmanager
def poisoned_allocations():
    """NaN-fill every floating tensor made by ``torch.empty``/``empty_like``/``Tensor.new_empty``."""
    originals = [(torch, "empty", torch.empty), (torch, "empty_like", torch.empty_like),
                 (torch.Tensor, "new_empty", torch.Tensor.new_empty)]

    def wrap(original):
        def poisoned(*args, **kwargs):
            t = original(*args, **kwargs)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                with torch.no_grad():
                    t.fill_(float("nan"))
            return t
        return poisoned

    for owner, name, original in originals:
        setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


# ----------------------------------------------------------------------------------- reference
def _block_coords(layout: BlockSparseLayout):
    """``(r, c)`` int64 ``(nnz, b, b)``: the matrix coordinates of every values entry, from the CSR."""
    b = layout.block_size
    row_ptr = layout.row_ptr.to("cpu", torch.int64)
    col_idx = layout.col_idx.to("cpu", torch.int64)
    block_row = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1), row_ptr[1:] - row_ptr[:-1])
    ar = torch.arange(b)
    r = (block_row[:, None, None] * b + ar[None, :, None]).expand(-1, b, b)
    c = (col_idx[:, None, None] * b + ar[None, None, :]).expand(-1, b, b)
    return r, c


def _dense64(values: torch.Tensor, layout: BlockSparseLayout) -> torch.Tensor:
    """float64 ``(rows, cols)`` on the CPU; entries past the matrix edge are dropped."""
    rows, cols = layout.shape
    r, c = _block_coords(layout)
    inside = (r < rows) & (c < cols)
    w = torch.zeros(rows, cols, dtype=torch.float64)
    w[r[inside], c[inside]] = values.detach().to("cpu", torch.float64)[inside]
    return w


def _blocks64(dense: torch.Tensor, layout: BlockSparseLayout) -> torch.Tensor:
    """float64 ``(nnz, b, b)``: the live blocks of ``dense (rows, cols)``, zero past the edge."""
    rows, cols = layout.shape
    r, c = _block_coords(layout)
    inside = (r < rows) & (c < cols)
    out = torch.zeros(r.shape, dtype=torch.float64)
    out[inside] = dense.detach().to("cpu", torch.float64)[r[inside], c[inside]]
    return out


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    scale = max(ref.abs().max().item(), 1e-30)
    return (got.detach().to("cpu", torch.float64) - ref).abs().max().item() / scale


def _judge(result: Result, got, ref: torch.Tensor, bound: float) -> Result:
    """Fill ``result`` with the error of ``got`` against ``ref`` and PASS/FAIL it against ``bound``."""
    result.bound = bound
    if got is None:
        result.status, result.note = "FAIL", "no result (no gradient was produced)"
        return result
    if tuple(got.shape) != tuple(ref.shape):
        result.status, result.note = "FAIL", f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        return result
    bad = int((~torch.isfinite(got.detach())).sum().item())
    if bad:
        result.status = "FAIL"
        result.note = f"{bad} non-finite entries (an output element not written, or NaN past the edge read)"
        return result
    result.error = _rel_error(got, ref)
    result.status = "PASS" if result.error <= bound else "FAIL"
    return result


def _low_precision_bound(own_error: float, dtype: torch.dtype) -> float:
    """Twice torch's own error in ``dtype``, at least one unit of ``dtype``'s precision."""
    floor = torch.finfo(dtype).eps
    return max(2.0 * own_error, floor) if math.isfinite(own_error) else floor


def _fp32_matmul_bound(name: str) -> tuple[float, str]:
    """The fp32 bound for backend ``name`` and a note when it runs fp32 matmuls in TF32."""
    mod = backends.load(name)
    tf32 = False
    if name in ("triton", "cuda") and mod is not None:
        tf32 = bool(mod.allow_tf32())  # one TF32 pass now (torch's setting or the library's override)
    return (TF32_BOUND, "TF32 switched on") if tf32 else (MATMUL_BOUND[torch.float32], "")


# ------------------------------------------------------------------------------- matmul checks
def _shape(b: int, tiny: bool) -> tuple[int, int, int]:
    """``(rows, cols, tokens)``: partial edge blocks on both axes (b > 1), odd token counts."""
    if b == 1:
        return (23, 17, 5) if tiny else (37, 29, 19)
    return (b + 5, 2 * b - 7, 5) if tiny else (2 * b + 5, 3 * b - 7, 19)


def _matmul_inputs(b: int, dtype: torch.dtype, tiny: bool):
    rows, cols, M = _shape(b, tiny)
    gen = torch.Generator().manual_seed(1000 + b)
    layout = BlockSparseLayout.random(rows, cols, b, DENSITY, generator=gen)
    scale = 1.0 if dtype in (torch.float32, torch.float64) else 0.5
    values = (torch.randn(layout.nnz_blocks, b, b, generator=gen, dtype=torch.float64) * scale).to(dtype)
    r, c = _block_coords(layout)
    values[(r >= rows) | (c >= cols)] = float("nan")  # past the matrix edge: must never be read
    x = (torch.randn(M, cols, generator=gen, dtype=torch.float64) * scale).to(dtype)
    dy = (torch.randn(M, rows, generator=gen, dtype=torch.float64) * scale).to(dtype)
    bias = torch.randn(rows, generator=gen, dtype=torch.float64).to(dtype)
    return layout, values, x, dy, bias


def _matmul_references(layout, values, x, dy, bias):
    """float64 ``{op: reference}`` from the (dtype-rounded) inputs."""
    w = _dense64(values, layout)
    x64, dy64 = x.double(), dy.double()
    return {"fwd": x64 @ w.T + bias.double(), "dX": dy64 @ w, "dW": _blocks64(dy64.T @ x64, layout)}


def _torch_own(layout, values, x, dy, bias, device):
    """torch's own results in the inputs' dtype on ``device`` (F.linear and matmuls)."""
    w = _dense64(values, layout).to(device, values.dtype)
    xd, dyd = x.to(device), dy.to(device)
    return {"fwd": F.linear(xd, w, bias.to(device)), "dX": dyd @ w, "dW": _blocks64(dyd.T @ xd, layout)}


def check_matmul(name: str, device: torch.device, dtype: torch.dtype, b: int, tiny: bool) -> list[Result]:
    """fwd, dX and dW of ``block_sparse_linear`` on backend ``name``: three results."""
    label = _dtype_label(dtype)
    results = {op: Result(name, device.type, op, label, str(b), "FAIL") for op in MATMUL_OPS}
    layout, values, x, dy, bias = _matmul_inputs(b, dtype, tiny)
    refs = _matmul_references(layout, values, x, dy, bias)
    if dtype in (torch.float16, torch.bfloat16):
        own = _torch_own(layout, values, x, dy, bias, device)
        bounds = {op: _low_precision_bound(_rel_error(own[op], refs[op]), dtype) for op in MATMUL_OPS}
        note = ""
    else:
        bound, note = _fp32_matmul_bound(name) if dtype == torch.float32 else (MATMUL_BOUND[dtype], "")
        bounds = dict.fromkeys(MATMUL_OPS, bound)
    lay = layout.to(device)
    xd = x.to(device).requires_grad_()
    vd = values.to(device).requires_grad_()
    bd, dyd = bias.to(device), dy.to(device)
    got = {}
    try:
        with poisoned_allocations():
            y = ops.block_sparse_linear(xd, vd, lay, bd, backend=name)
            got["fwd"] = y.detach().cpu()
            y.backward(dyd)
            got["dX"] = None if xd.grad is None else xd.grad.cpu()
            got["dW"] = None if vd.grad is None else vd.grad.cpu()
    except Exception as exc:  # a crash fails every op not yet judged
        for op in MATMUL_OPS:
            if op not in got:
                results[op].note = _exception_note(exc)
    for op in MATMUL_OPS:
        if op in got:
            _judge(results[op], got[op], refs[op], bounds[op])
            if note:
                results[op].note = note
    return list(results.values())


# ---------------------------------------------------------------------------------- Adam checks
def _adam_data(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in ADAM_SHAPES]
    masks = [torch.rand(ADAM_SHAPES[0], generator=gen) < 0.6, None, torch.rand(ADAM_SHAPES[2], generator=gen) < 0.3]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in ADAM_SHAPES]
             for _ in range(ADAM_STEPS)]
    return params, masks, grads


def _torch_adam(params, masks, grads, decoupled: bool, dtype: torch.dtype, device) -> tuple[list, list, list]:
    """torch.optim.Adam/AdamW in ``dtype`` on ``device``, masked entries zeroed after every step."""
    ps = [torch.nn.Parameter(p.to(device, dtype, copy=True)) for p in params]
    opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)(ps, foreach=False, **ADAM_HYPER)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.to(device, dtype)
        opt.step()
        with torch.no_grad():
            for p, mask in zip(ps, masks):
                if mask is not None:
                    live = mask.to(device)
                    for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]):
                        t.mul_(live)
    return ([p.detach() for p in ps], [opt.state[p]["exp_avg"] for p in ps],
            [opt.state[p]["exp_avg_sq"] for p in ps])


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().to("cpu", torch.float64).reshape(-1) for t in ts])


def check_adam(name: str, device: torch.device, dtype: torch.dtype, decoupled: bool) -> Result:
    """Three masked Adam (or AdamW) steps on backend ``name`` against float64 torch.optim."""
    result = Result(name, device.type, "adamw" if decoupled else "adam", _dtype_label(dtype), "-", "FAIL")
    params, masks, grads = _adam_data(dtype)
    ref = [_flat(ts) for ts in _torch_adam(params, masks, grads, decoupled, torch.float64, "cpu")]
    if dtype in (torch.float16, torch.bfloat16):
        own = [_flat(ts) for ts in _torch_adam(params, masks, grads, decoupled, dtype, device)]
        bound = _low_precision_bound(max(_rel_error(o, r) for o, r in zip(own, ref)), dtype)
    else:
        bound = ADAM_BOUND[dtype]
    moment_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ps = [p.to(device, copy=True) for p in params]
    ms = [torch.zeros(s, dtype=moment_dtype, device=device) for s in ADAM_SHAPES]
    vs = [torch.zeros(s, dtype=moment_dtype, device=device) for s in ADAM_SHAPES]
    mk = [None if m is None else m.to(device) for m in masks]
    lr, (beta1, beta2) = ADAM_HYPER["lr"], ADAM_HYPER["betas"]
    try:
        for step, step_grads in enumerate(grads, start=1):
            ops.masked_adam_(ps, [g.to(device) for g in step_grads], ms, vs, mk, step=step, lr=lr, beta1=beta1,
                             beta2=beta2, eps=ADAM_HYPER["eps"], weight_decay=ADAM_HYPER["weight_decay"],
                             decoupled_weight_decay=decoupled, backend=name)
        got = [_flat(ts) for ts in (ps, ms, vs)]
    except Exception as exc:
        result.note = _exception_note(exc)
        return result
    dead = _flat([~m if m is not None else torch.zeros(s, dtype=torch.bool) for m, s in zip(masks, ADAM_SHAPES)])
    for part, g in zip(("param", "exp_avg", "exp_avg_sq"), got):
        if (g[dead.bool()] != 0).any():
            result.bound, result.note = bound, f"masked entries of {part} are not exactly 0"
            return result
    worst = max(range(3), key=lambda i: _rel_error(got[i], ref[i]) if torch.isfinite(got[i]).all() else math.inf)
    _judge(result, got[worst], ref[worst], bound)
    return result


# --------------------------------------------------------------------------------------- driver
def _exception_note(exc: Exception) -> str:
    lines = str(exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0][:200]}"


def _dtype_label(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def serves(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` is meant for tensors of ``device`` (whether or not it is available)."""
    mod = backends.load(name)
    devices = getattr(mod, "DEVICES", None) if mod is not None else None
    if devices is None:
        devices = backends._DEVICES[name]
    return devices is None or device.type in devices


@contextlib.contextmanager
def triton_first_config(enabled: bool = True):
    """Let every Triton kernel of the backend use the first config its pruning keeps, untimed.

    Autotuning compiles and times every config of every kernel for every new shape and dtype:
    minutes on a cold cache, for a selftest that should take seconds. While this is active each
    autotuner keeps one candidate (the first of its pruned list, so a config the kernel would
    consider anyway), and the choices made are dropped again on exit, so later calls in the same
    process autotune as usual. Does nothing when triton is not loaded or is interpreting (one
    config there anyway), or when this triton's autotuner has no ``prune_configs``.
    """
    patched = []
    Autotuner = None
    if enabled:
        try:
            from triton.runtime.autotuner import Autotuner
        except Exception:  # triton missing or broken: nothing to pin
            pass
    if Autotuner is not None:
        for mod_name, mod in list(sys.modules.items()):
            if not mod_name.startswith("set_kernels.backends.triton.") or mod is None:
                continue
            for obj in vars(mod).values():
                if isinstance(obj, Autotuner) and callable(getattr(obj, "prune_configs", None)) \
                        and "prune_configs" not in vars(obj) and isinstance(getattr(obj, "cache", None), dict):
                    original = obj.prune_configs
                    obj.prune_configs = (lambda kwargs, _o=original: list(_o(kwargs))[:1])
                    patched.append((obj, set(obj.cache)))
    try:
        yield bool(patched)
    finally:
        for obj, keys in patched:
            del obj.prune_configs
            for key in [k for k in obj.cache if k not in keys]:
                del obj.cache[key]


# Per device, the backends in this order: compiled first, JIT-compiled next, the reference last.
CHECK_ORDER = ("cuda", "triton", "numba", "torch")


def run(devices, names, dtypes, block_sizes, *, report=None,
        autotune: bool = False) -> tuple[list[Result], dict[str, str]]:
    """All checks; returns the results and ``{backend: reason}`` for backends checked nowhere.

    ``report(result)`` is called as each check finishes (skips included). ``autotune``: let
    Triton autotune as in real use (see :func:`triton_first_config`).
    """
    results: list[Result] = []
    unchecked: dict[str, str] = {}

    def add(res: Result) -> None:
        results.append(res)
        if report is not None:
            report(res)

    names = sorted(names, key=CHECK_ORDER.index)
    for name in names:
        ok, why = backends.availability(name)
        if not ok:
            unchecked[name] = why
        elif not any(serves(name, d) for d in devices):
            unchecked[name] = f"it serves none of the devices checked ({', '.join(map(str, devices))})"
    for device in devices:
        for name in names:
            if name not in unchecked and serves(name, device):
                _check_backend(name, device, dtypes, block_sizes, add, autotune)
    return results, unchecked


def _check_backend(name: str, device: torch.device, dtypes, block_sizes, add, autotune: bool = False) -> None:
    """Every check of backend ``name`` on ``device``; ``add(result)`` for each."""
    tiny = name == "triton" and device.type == "cpu"  # the interpreter: slow
    with triton_first_config(name == "triton" and not autotune):
        for dtype in dtypes:
            label = _dtype_label(dtype)
            for b in block_sizes:
                reasons = sorted({r for kernel in MATMUL_OPS.values()
                                  for r in backends.unsupported_reasons(name, kernel, device, dtype, b)})
                if reasons:
                    for op in MATMUL_OPS:
                        add(Result(name, device.type, op, label, str(b), "skip", note="; ".join(reasons)))
                else:
                    for res in check_matmul(name, device, dtype, b, tiny):
                        add(res)
            reasons = backends.unsupported_reasons(name, "masked_adam_", device, dtype)
            for op in ADAM_OPS:
                if reasons:
                    add(Result(name, device.type, op, label, "-", "skip", note="; ".join(reasons)))
                else:
                    add(check_adam(name, device, dtype, decoupled=(op == "adamw")))


# ---------------------------------------------------------------------------------------- table
COLUMNS = ("backend", "device", "op", "dtype", "block", "max error", "bound", "result")
WIDTHS = (8, 6, 6, 5, 6, 10, 10, 0)


def format_row(cells) -> str:
    return "  ".join(str(c).ljust(w) if w else str(c) for c, w in zip(cells, WIDTHS)).rstrip()


def result_cells(r: Result) -> tuple:
    err = "-" if r.error is None else f"{r.error:.2e}"
    bound = "-" if r.bound is None else f"{r.bound:.2e}"
    verdict = r.status if not r.note else f"{r.status} ({r.note})"
    return (r.backend, r.device, r.op, r.dtype, r.block, err, bound, verdict)


def merged_skips(results: list[Result]) -> list[tuple]:
    """One row per (backend, device, dtype, reason): the skipped ops and block sizes listed."""
    groups: dict[tuple, tuple[list, list]] = {}
    for r in results:
        if r.status == "skip":
            ops_, blocks = groups.setdefault((r.backend, r.device, r.dtype, r.note), ([], []))
            for item, seen in ((r.op, ops_), (r.block, blocks)):
                if item not in seen:
                    seen.append(item)
    rows = []
    for (backend, device, dtype, note), (o, b) in groups.items():
        every_op = set(o) == set(MATMUL_OPS) | set(ADAM_OPS)
        b = [x for x in b if x != "-"]
        rows.append((backend, device, "all" if every_op else ",".join(o), dtype,
                     "all" if every_op or not b else ",".join(b), "-", "-", f"skip ({note})"))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", default=None, metavar="A,B",
                        help=f"comma-separated backends to check (default: every one of {', '.join(backends.BACKENDS)} "
                             "that is available)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="check one device only (default: cpu, and cuda when torch sees a GPU)")
    parser.add_argument("--quick", action="store_true",
                        help=f"block sizes {', '.join(map(str, QUICK_BLOCK_SIZES))} only")
    parser.add_argument("--block-sizes", default=None, metavar="B,B",
                        help=f"comma-separated block sizes (default: {', '.join(map(str, BLOCK_SIZES))})")
    parser.add_argument("--dtypes", default=None, metavar="D,D",
                        help=f"comma-separated dtypes from {', '.join(DTYPES)} (default: all)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--triton-autotune", action="store_true",
                        help="let Triton autotune every kernel as in real use (slow on a cold cache; by default "
                             "each kernel runs the first config its pruning keeps)")


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _parse(args) -> tuple[list, list, list, list]:
    """``(devices, backend names, dtypes, block sizes)``; raises ValueError for bad values."""
    names = _split(args.backends) or list(backends.BACKENDS)
    for n in names:
        if n not in backends.BACKENDS:
            raise ValueError(f"--backends: unknown backend {n!r} (choose from {', '.join(backends.BACKENDS)})")
    dtypes = []
    for d in _split(args.dtypes) or list(DTYPES):
        if d not in DTYPES:
            raise ValueError(f"--dtypes: unknown dtype {d!r} (choose from {', '.join(DTYPES)})")
        dtypes.append(DTYPES[d])
    try:
        blocks = [int(b) for b in _split(args.block_sizes)]
    except ValueError:
        raise ValueError(f"--block-sizes: expected comma-separated integers, got {args.block_sizes!r}") from None
    blocks = blocks or list(QUICK_BLOCK_SIZES if args.quick else BLOCK_SIZES)
    for b in blocks:
        if b not in BLOCK_SIZES:
            raise ValueError(f"--block-sizes: {b} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        raise ValueError("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    kinds = [args.device] if args.device else (["cuda", "cpu"] if has_cuda else ["cpu"])  # the GPU first
    return [torch.device(k) for k in kinds], names, dtypes, blocks


def main(args) -> int:
    """Run the selftest for parsed ``args`` (see :func:`add_arguments`); returns the exit status."""
    try:
        devices, names, dtypes, blocks = _parse(args)
    except ValueError as exc:
        print(f"set-kernels selftest: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    where = ", ".join(str(d) + (f" ({torch.cuda.get_device_name()})" if d.type == "cuda" else "") for d in devices)
    print(f"set-kernels selftest: torch {torch.__version__}, devices {where}; error = max|result - float64 "
          f"reference| / max|reference|")
    print(format_row(COLUMNS))

    def report(r: Result) -> None:
        if r.status != "skip":
            print(format_row(result_cells(r)), flush=True)

    results, unchecked = run(devices, names, dtypes, blocks, report=report, autotune=args.triton_autotune)
    for row in merged_skips(results):
        print(format_row(row))
    for name, why in unchecked.items():
        print(f"not checked: {name}: {why}")
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "skip")}
    wall = time.perf_counter() - start
    print(f"selftest: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['skip']} skipped "
          f"({wall:.1f} s)")
    if args.json:
        doc = {"torch": torch.__version__, "devices": [str(d) for d in devices], "wall_s": wall, "counts": counts,
               "unchecked": unchecked, "results": [dataclasses.asdict(r) for r in results]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    sys.stdout.flush()
    if counts["FAIL"]:
        print("selftest: FAILED", file=sys.stderr)
        return 1
    if not counts["PASS"]:
        print("selftest: nothing was checked", file=sys.stderr)
        return 1
    return 0
