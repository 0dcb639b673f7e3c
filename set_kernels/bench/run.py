"""Run a benchmark grid: plan the comparison groups, time them with a progress bar, build the document."""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from functools import partial

import torch

from .._info import cpu_model
from . import cases, mlp, timing
from .grid import DTYPES, Grid
from .schema import SCHEMA


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def slug(name: str) -> str:
    """A filesystem-safe lower-case name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    s = re.sub(r"\((r|tm|c)\)", "", name.lower())
    s = re.sub(r"[^a-z0-9.]+", "-", s).strip("-.")
    return s or "unknown-device"


def _version(lib: str):
    try:
        return __import__(lib).__version__
    except Exception:  # missing, or broken on this machine
        return None


def git_info() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout this package runs from."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--",
                                 "set_kernels", "csrc", "python"], capture_output=True, text=True, timeout=10)
        dirty = bool(status.stdout.strip()) if sha and status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        sha, dirty = None, None
    return {"commit": sha, "dirty": dirty}


def metadata(device: torch.device, mode: str, ops, grid: Grid, command: str) -> dict:
    import set_kernels

    name = device_name(device)
    timing_doc = ("triton.testing.do_bench (CUDA events, L2 flushed before each run): median and 20/80% "
                  f"quantiles over ~{grid.rep_ms} ms of runs after warm-up" if device.type == "cuda" else
                  f"CPU wall clock, implementations of a group interleaved, {grid.repeats} repeats after "
                  f"{grid.warmup} warm-up call(s) each; median and 20/80% quantiles")
    return {
        "device_type": device.type, "device_name": name, "device_slug": slug(name), "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
                     "numba": _version("numba"), "numpy": _version("numpy"), "set_kernels": set_kernels.__version__},
        "git": git_info(), "command": command, "mode": mode, "ops": list(ops), "timing": timing_doc,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": 0.0, "grid": dataclasses.asdict(grid), "loadavg": _loadavg(),
    }


def _loadavg():
    """The 1-minute load average (how busy the machine was), or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


@dataclasses.dataclass
class Case:
    """One case of a grid: ``build()`` makes its comparison group(s) (:mod:`.cases`, :mod:`.mlp`).

    ``chosen``: ``{pass: (backend names, [(backend, why not)])}`` from :func:`.cases.select_backends`."""

    op: str
    label: str  # "linear 512x4096 float32 b=32 d=0.05": the progress bar, skipped[].case
    chosen: dict
    build: object

    def groups(self) -> list:
        """The built groups, with the backends not selected listed as skipped."""
        groups = self.build()
        groups = groups if isinstance(groups, list) else [groups]
        for g in groups:
            g.skipped += self.chosen.get(g.pass_, ([], []))[1]
        return groups

    @property
    def impls(self) -> dict:
        """``{pass: [impl]}``: what the groups time (the parameters of the pytest-benchmark suites)."""
        out = {}
        for pass_, (names, _) in self.chosen.items():
            if pass_ == "train_step":  # the SET update is timed on its own (see .mlp)
                names = [x for n in names for x in (n, f"{n}/set_update")]
            out[pass_] = names + ["dense"] + (["torch_bsr"] if pass_ == "forward" else [])
        return out


def plan(grid: Grid, ops, device: torch.device, requested_backends) -> list[Case]:
    """Every case of ``grid`` for ``ops``, in measurement order (``set-kernels bench`` and the
    pytest-benchmark suites time these)."""
    def select(passes, dname, block=None):
        return {p: cases.select_backends(requested_backends, [p], device, DTYPES[dname], block=block) for p in passes}

    items = []
    if "block_sparse_linear" in ops:  # block sizes, then element sparsity (block 1) on its own shapes
        for sizes, blocks, densities in ((grid.linear, grid.blocks, grid.densities),
                                         (grid.element_linear, (1,), grid.element_densities)):
            for tokens, features, dname in sizes:
                for block in blocks:
                    chosen = select(("forward", "forward_backward"), dname, block)
                    names = {p: n for p, (n, _) in chosen.items()}
                    items += [Case("block_sparse_linear", f"linear {tokens}x{features} {dname} b={block} d={d}",
                                   chosen, partial(cases.linear_groups, tokens, features, DTYPES[dname], block, d,
                                                   device, names)) for d in densities]
    if "masked_adam_" in ops:
        for rows, cols, dname in grid.adam:
            chosen = select(("step",), dname)
            items += [Case("masked_adam_", f"masked_adam_ {rows}x{cols} {dname} d={d}", chosen,
                           partial(cases.adam_group, rows, cols, DTYPES[dname], grid.adam_block, d, device,
                                   chosen["step"][0])) for d in grid.adam_densities]
    if "set_mlp_step" in ops:
        blocks = (grid.mlp_block, 1) if grid.mlp_element else (grid.mlp_block,)
        mlps = [(f"b={b} d={d}", d, b, None) for b in blocks for d in grid.mlp_densities]
        mlps += [(f"scale width={w} d={d}", d, 1, (784, w, w, w, 10)) for w, d in grid.mlp_scale]
        for name, density, block, layers in mlps:
            chosen = select(("train_step",), grid.mlp_dtype, block)
            items.append(Case("set_mlp_step", f"set_mlp_step {name}", chosen,
                              partial(mlp.mlp_group, grid, density, device, chosen["train_step"][0], layers=layers,
                                      block=block)))
    return items


_COPY = "__copy_ceiling__"


def traffic(group: cases.Group) -> tuple[int, int] | None:
    """``(footprint, written)`` of a memory-bound group's op: the bytes of its buffers (each read
    once) and the bytes it writes back, at full density; what its copy reference moves.

    masked Adam reads the bool mask, param and grad (param dtype), exp_avg and exp_avg_sq (fp32
    for 16-bit params, else the param dtype), and writes param, exp_avg and exp_avg_sq. None for
    the compute-bound ops (no copy reference)."""
    if not group.nbytes:
        return None
    if group.op == "masked_adam_":
        p = DTYPES[group.dtype].itemsize
        s = 4 if p < 4 else p
        n = group.shape["rows"] * group.shape["cols"]
        return n * (1 + 2 * p + 2 * s), n * (p + 2 * s)
    raise ValueError(f"traffic: no byte counts known for the memory-bound op {group.op!r}")


def records_of(group: cases.Group, stats: dict, copy_gbps: float) -> list[dict]:
    """One record per timed implementation of ``group`` (fields: :mod:`.schema`).

    ``copy_gbps``: the copy ceiling the group's GB/s are compared with (timed along with it, on
    buffers as large as the op's, moving its bytes: :func:`traffic`, :class:`.timing.CopyCeiling`)."""
    dense = stats.get("dense")
    dense_ms = dense.median_ms if dense is not None else None
    out = []
    for impl, st in stats.items():
        kind = group.kinds[impl]
        rec = {"op": group.op, "pass": group.pass_, "impl": impl, "kind": kind,
               "backend": impl if kind == "sparse" else None, "shape": group.shape, "dtype": group.dtype,
               "block": group.block, "density": group.density, "nnz_blocks": group.nnz_blocks, **st.as_dict()}
        rec.update(group.extra.get(impl, {}))
        secs = rec["median_ms"] * 1e-3
        flops, nbytes = group.flops.get(impl), group.nbytes.get(impl)
        rec["flops"] = flops
        rec["tflops"] = flops / secs / 1e12 if flops else None
        rec["bytes"] = nbytes
        rec["gbps"] = nbytes / secs / 1e9 if nbytes else None
        rec["copy_gbps"] = copy_gbps if nbytes else None
        rec["copy_share"] = rec["gbps"] / copy_gbps if nbytes else None
        rec["dense_ms"] = dense_ms
        rec["speedup"] = dense_ms / rec["median_ms"] if dense_ms else None
        rec["E"] = group.density * rec["speedup"] if kind != "dense" and dense_ms else None
        out.append(rec)
    return out


def run(device, grid: Grid, ops, *, backends=None, mode: str = "custom", command: str = "",
        progress: bool = True, log=None) -> dict:
    """Time every case of ``grid`` for ``ops`` on ``device``; returns the JSON document (see :mod:`.schema`).

    ``backends``: backend names to time (None: every available one except the plain-torch
    reference, and triton on CPU). A case that fails is listed under ``skipped`` with its error.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t_start = time.perf_counter()
    doc = {"schema": SCHEMA, "meta": metadata(device, mode, ops, grid, command), "ceilings": {}, "records": [],
           "skipped": []}
    items = plan(grid, ops, device, backends)
    bar = tqdm(total=len(items) + 1, file=sys.stderr, disable=not progress, desc="bench", dynamic_ncols=True)
    bar.set_postfix_str("copy bandwidth")
    doc["ceilings"]["copy"] = timing.copy_bandwidth(device, footprint=grid.copy_bytes, repeats=max(3, grid.repeats),
                                                    rep_ms=grid.rep_ms)
    bar.update()
    copy_gbps = doc["ceilings"]["copy"]["gbps"]
    for case in items:
        label = case.label
        bar.set_postfix_str(label)
        try:
            groups = case.groups()
        except Exception as exc:  # keep the rest of the run; the failure is reported
            doc["skipped"].append({"op": label.split()[0], "pass": "-", "impl": "-", "case": label,
                                   "reason": f"{type(exc).__name__}: {exc}"})
            log(f"set-kernels bench: {label} failed: {type(exc).__name__}: {exc}")
            bar.update()
            continue
        for g in groups:
            for impl, reason in g.skipped:
                doc["skipped"].append({"op": g.op, "pass": g.pass_, "impl": impl, "case": label, "reason": reason})
            if not g.fns:
                continue
            fns = dict(g.fns)
            ceiling = None
            if g.nbytes:  # memory-bound: time a copy reference of its size with it (CopyCeiling)
                ceiling = timing.copy_ceiling(device, *traffic(g))
                fns[_COPY] = ceiling.fn
            try:
                stats = timing.time_group(fns, device, repeats=grid.repeats, warmup=grid.warmup,
                                          rep_ms=grid.rep_ms)
            except Exception as exc:  # e.g. a GPU kernel failing only under repetition
                doc["skipped"].append({"op": g.op, "pass": g.pass_, "impl": "-", "case": label,
                                       "reason": f"timing failed: {type(exc).__name__}: {exc}"})
                log(f"set-kernels bench: timing {label} {g.pass_} failed: {type(exc).__name__}: {exc}")
                continue
            group_copy = stats.pop(_COPY, None)
            if g.postprocess is not None:
                stats = g.postprocess(stats)
            gbps = ceiling.gbps(group_copy) if group_copy else copy_gbps
            del ceiling, fns  # free the reference's buffers before the next group
            doc["records"] += records_of(g, stats, gbps)
        del groups
        bar.update()
    bar.close()
    doc["meta"]["wall_s"] = time.perf_counter() - t_start
    doc["meta"]["loadavg_end"] = _loadavg()
    return doc
