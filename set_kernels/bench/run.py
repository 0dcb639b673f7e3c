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

import torch

from .._info import cpu_model
from . import cases, mlp, timing
from .grid import DTYPES, Grid
from .report import SCHEMA


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


def plan(grid: Grid, ops, device: torch.device, requested_backends):
    """``[(label, build)]``: ``build()`` returns the list of :class:`cases.Group` of one case."""
    items = []
    if "block_sparse_linear" in ops:
        for tokens, features, dname in grid.linear:
            dt = DTYPES[dname]
            for block in grid.blocks:
                chosen = {p: cases.select_backends(requested_backends, [p], device, dt, block=block)
                          for p in ("forward", "forward_backward")}
                for density in grid.densities:
                    def build(tokens=tokens, features=features, dt=dt, block=block, density=density, chosen=chosen):
                        groups = cases.linear_groups(tokens, features, dt, block, density, device,
                                                     {p: names for p, (names, _) in chosen.items()})
                        for g in groups:
                            g.skipped += chosen.get(g.pass_, ([], []))[1]
                        return groups
                    items.append((f"linear {tokens}x{features} {dname} b={block} d={density}", build))
        for tokens, features, dname in grid.element_linear:  # element sparsity: block size 1
            dt = DTYPES[dname]
            chosen = {p: cases.select_backends(requested_backends, [p], device, dt, block=1)
                      for p in ("forward", "forward_backward")}
            for density in grid.element_densities:
                def build(tokens=tokens, features=features, dt=dt, density=density, chosen=chosen):
                    groups = cases.linear_groups(tokens, features, dt, 1, density, device,
                                                 {p: names for p, (names, _) in chosen.items()})
                    for g in groups:
                        g.skipped += chosen.get(g.pass_, ([], []))[1]
                    return groups
                items.append((f"linear {tokens}x{features} {dname} b=1 d={density}", build))
    if "masked_adam_" in ops:
        for rows, cols, dname in grid.adam:
            dt = DTYPES[dname]
            names, skipped = cases.select_backends(requested_backends, ["step"], device, dt)
            for density in grid.adam_densities:
                def build(rows=rows, cols=cols, dt=dt, density=density, names=names, skipped=skipped):
                    g = cases.adam_group(rows, cols, dt, grid.adam_block, density, device, names)
                    g.skipped += skipped
                    return [g]
                items.append((f"masked_adam_ {rows}x{cols} {dname} d={density}", build))
    if "set_mlp_step" in ops:
        dt = DTYPES[grid.mlp_dtype]
        names, skipped = cases.select_backends(requested_backends, ["train_step"], device, dt)
        blocks = (grid.mlp_block, 1) if grid.mlp_element else (grid.mlp_block,)
        for block in blocks:
            names, skipped = cases.select_backends(requested_backends, ["train_step"], device, dt, block=block)
            for density in grid.mlp_densities:
                def build(density=density, names=names, skipped=skipped, block=block):
                    g = mlp.mlp_group(grid, density, device, names, block=block)
                    g.skipped += skipped
                    return [g]
                items.append((f"set_mlp_step b={block} d={density}", build))
        names, skipped = cases.select_backends(requested_backends, ["train_step"], device, dt, block=1)
        for width, density in grid.mlp_scale:
            def build(width=width, density=density, names=names, skipped=skipped):
                g = mlp.mlp_group(grid, density, device, names, layers=(784, width, width, width, 10), block=1)
                g.skipped += skipped
                return [g]
            items.append((f"set_mlp_step scale width={width} d={density}", build))
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
    """One record per timed implementation of ``group`` (fields documented in :mod:`.report`).

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
    """Time every case of ``grid`` for ``ops`` on ``device``; returns the JSON document (see :mod:`.report`).

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
    for label, build in items:
        bar.set_postfix_str(label)
        try:
            groups = build()
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
