"""Results of ``set-kernels bench``: the JSON document, its schema check, the markdown table, the plot.

JSON document (``<stem>.json``; ``schema`` = 1)::

    {
      "schema": 1,
      "meta": {
        "device_type": "cpu" | "cuda",  "device_name": str,  "device_slug": str,
        "cpu": str,  "gpu": str | null,  "threads": int,
        "versions": {"python", "torch", "triton", "numba", "numpy", "set_kernels": str | null},
        "git": {"commit": str | null, "dirty": bool | null},
        "command": str,  "mode": "quick" | "full" | "tiny",  "ops": [str],
        "timing": str,  "started_at": ISO-8601 UTC str,  "wall_s": float,  "grid": {...},
        "loadavg": float | null,  "loadavg_end": float | null   (1-minute load at start and end)
      },
      "ceilings": {"copy": {"bytes": int, "footprint_bytes": int, "written_bytes": int, "gbps": float,
                            "method": str, "median_ms": float, "min_ms": float, ...}},
      "records": [record, ...],
      "skipped": [{"op": str, "pass": str, "impl": str, "reason": str, "case": str}, ...]
    }

Every record (one implementation timed in one comparison group)::

    op          "block_sparse_linear" | "masked_adam_" | "set_mlp_step"
    pass        "forward" | "forward_backward" (linear), "step" (Adam), "train_step" (SET-MLP)
    impl        a backend name ("numba", "triton", "cuda", "torch"), "dense" or "torch_bsr"
    kind        "sparse" (a set_kernels backend), "dense" (torch on the dense weight), "baseline" (torch BSR)
    backend     the backend name for kind "sparse", else null
    shape       {"tokens", "in_features", "out_features"} | {"rows", "cols"} | {"batch", "layers"}
    dtype       "float32", "bfloat16", ...
    block       block size (Adam: the block size of the mask; dense: that of its group)
    density     live fraction of the sparse operand (layout.density: exact, not the nominal value)
    nnz_blocks  live blocks (null for the MLP)
    median_ms, q20_ms, q80_ms, min_ms, max_ms    time of one call (ms); repeats: number of timed calls
    flops, tflops            FLOPs of one call on live blocks (dense: the whole matrix) and FLOP/s / 1e12
    bytes, gbps              minimum bytes of one call, and bytes / median time / 1e9
    copy_gbps, copy_share    the copy ceiling of this group, and gbps / copy_gbps (see below)
    dense_ms     median of the dense baseline in the same group (null when it failed)
    speedup      dense_ms / median_ms
    E            density * dense_ms / median_ms (null for dense): 1.0 = time scales exactly with density
    (set_mlp_step sparse records also: step_ms, evolution_ms, interval: median_ms = step_ms +
    evolution_ms / interval, the SET update amortised over its interval; quantiles likewise shifted)

Absent quantities (no FLOP count for Adam, no bytes for matmuls) are null.

**Copy ceiling** (``ceilings.copy``, and ``copy_gbps`` of every memory-bound record): plain
torch streams that move what the op moves, with no arithmetic: over fp32 buffers as large as the
op's (``footprint_bytes``; masked Adam: mask, param, grad and both moments, whatever the
density), every byte read once and ``written_bytes`` written back in place (masked Adam: param
and both moments), as ``a += b`` and ``c = -c``. It is credited with those bytes, read +
written (``bytes``), which are all it moves: each store goes to a line just read, so there is no
uncounted write-allocate read (``dst.copy_(src)`` on a CPU has one, 1.5x the bytes credited,
which once let masked Adam show 159 % of the copy "ceiling"). It is timed the way the op is and
alongside it (CPU: interleaved in its group; GPU: ``do_bench`` with L2 flushed before each run).
``gbps`` is taken at its fastest run and the op's at its median, so ``copy_share`` can exceed 1
only where the op really moves the same bytes faster. ``ceilings.copy`` is the same reference
measured once at the start on ``grid.copy_bytes`` of buffers, half of them written.
"""
from __future__ import annotations

import json
import math
import os

SCHEMA = 1
META_FIELDS = {"device_type": str, "device_name": str, "device_slug": str, "cpu": str, "threads": int,
               "versions": dict, "git": dict, "command": str, "mode": str, "ops": list, "timing": str,
               "started_at": str, "wall_s": float, "grid": dict}
RECORD_FIELDS = {"op": str, "pass": str, "impl": str, "kind": str, "shape": dict, "dtype": str,
                 "median_ms": float, "q20_ms": float, "q80_ms": float, "min_ms": float, "max_ms": float,
                 "repeats": int}
NULLABLE_FIELDS = ("backend", "block", "density", "nnz_blocks", "flops", "tflops", "bytes", "gbps",
                   "copy_gbps", "copy_share", "dense_ms", "speedup", "E")
KINDS = ("sparse", "dense", "baseline")


def _is(value, typ) -> bool:
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ) and not (typ is int and isinstance(value, bool))


def validate(doc: dict) -> list[str]:
    """Every way ``doc`` departs from the schema above (an empty list when it conforms)."""
    problems = []
    if not isinstance(doc, dict):
        return ["document: expected a JSON object"]
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA}, got {doc.get('schema')!r}")
    meta = doc.get("meta", {})
    for key, typ in META_FIELDS.items():
        if not _is(meta.get(key), typ):
            problems.append(f"meta.{key}: expected {typ.__name__}, got {meta.get(key)!r}")
    for lib in ("python", "torch", "triton", "numba", "numpy", "set_kernels"):
        if lib not in meta.get("versions", {}):
            problems.append(f"meta.versions.{lib}: missing")
    if "commit" not in meta.get("git", {}):
        problems.append("meta.git.commit: missing")
    copy = doc.get("ceilings", {}).get("copy", {})
    if not (_is(copy.get("gbps"), float) and copy["gbps"] > 0):
        problems.append(f"ceilings.copy.gbps: expected a positive number, got {copy.get('gbps')!r}")
    records = doc.get("records")
    if not isinstance(records, list):
        return problems + ["records: expected a list"]
    for i, rec in enumerate(records):
        problems += [f"records[{i}]: {p}" for p in _record_problems(rec)]
    if not isinstance(doc.get("skipped"), list):
        problems.append("skipped: expected a list")
    return problems


def _record_problems(rec: dict) -> list[str]:
    out = []
    for key, typ in RECORD_FIELDS.items():
        if not _is(rec.get(key), typ):
            out.append(f"{key}: expected {typ.__name__}, got {rec.get(key)!r}")
    for key in NULLABLE_FIELDS:
        if key not in rec:
            out.append(f"{key}: missing (null when not applicable)")
        elif rec[key] is not None and key != "backend" and not _is(rec[key], float):
            out.append(f"{key}: expected a number or null, got {rec[key]!r}")
    if rec.get("kind") not in KINDS:
        out.append(f"kind: expected one of {KINDS}, got {rec.get('kind')!r}")
    if rec.get("kind") == "sparse" and rec.get("backend") != rec.get("impl"):
        out.append("backend: expected the impl name for a sparse record")
    if _is(rec.get("median_ms"), float) and not rec["median_ms"] > 0:
        out.append(f"median_ms: expected > 0, got {rec['median_ms']}")
    numbers = all(_is(rec.get(k), float) for k in ("density", "dense_ms", "median_ms"))
    if rec.get("kind") != "dense" and numbers and rec["median_ms"] > 0:
        expect = rec["density"] * rec["dense_ms"] / rec["median_ms"]
        if rec.get("E") is None or not math.isclose(rec["E"], expect, rel_tol=1e-6):
            out.append(f"E: expected density * dense_ms / median_ms = {expect}, got {rec.get('E')}")
    return out


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")


# ------------------------------------------------------------------------------------ markdown
def _f(v, fmt="{:.2f}", none="-"):
    return none if v is None else fmt.format(v)


def _by_group(records, op):
    """``{group key: {impl: record}}`` for one op, in measurement order."""
    groups = {}
    for r in records:
        if r["op"] == op:
            key = (r["pass"], json.dumps(r["shape"], sort_keys=True), r["dtype"], r["block"], r["density"])
            groups.setdefault(key, {})[r["impl"]] = r
    return groups


def _linear_table(records) -> list[str]:
    lines = ["| pass | tokens × in → out | dtype | block | density | backend | ms | dense ms | speedup | E | "
             "TFLOP/s | torch BSR ms | vs BSR |", "|" + "---|" * 13]
    for impls in _by_group(records, "block_sparse_linear").values():
        bsr = impls.get("torch_bsr")
        for r in impls.values():
            if r["kind"] != "sparse":
                continue
            s = r["shape"]
            lines.append(
                f"| {r['pass'].replace('_', '+')} | {s['tokens']} × {s['in_features']} → {s['out_features']} | "
                f"{r['dtype']} | {r['block']} | {r['density']:.3g} | {r['impl']} | {r['median_ms']:.3g} | "
                f"{_f(r['dense_ms'], '{:.3g}')} | {_f(r['speedup'], '{:.2f}x')} | {_f(r['E'])} | "
                f"{_f(r['tflops'], '{:.3g}')} | {_f(bsr and bsr['median_ms'], '{:.3g}')} | "
                f"{_f(bsr and bsr['median_ms'] / r['median_ms'], '{:.2f}x')} |")
    return lines


def _adam_table(records) -> list[str]:
    lines = ["| rows × cols | dtype | mask block | density | backend | ms | dense ms | speedup | E | GB/s | "
             "copy GB/s | % of copy | dense GB/s |", "|" + "---|" * 13]
    for impls in _by_group(records, "masked_adam_").values():
        dense = impls.get("dense")
        for r in impls.values():
            if r["kind"] != "sparse":
                continue
            s = r["shape"]
            lines.append(
                f"| {s['rows']} × {s['cols']} | {r['dtype']} | {r['block']} | {r['density']:.3g} | {r['impl']} | "
                f"{r['median_ms']:.3g} | {_f(r['dense_ms'], '{:.3g}')} | {_f(r['speedup'], '{:.2f}x')} | "
                f"{_f(r['E'])} | {_f(r['gbps'], '{:.3g}')} | {_f(r['copy_gbps'], '{:.3g}')} | "
                f"{_f(r['copy_share'] and 100 * r['copy_share'], '{:.0f}%')} | "
                f"{_f(dense and dense['gbps'], '{:.3g}')} |")
    return lines


def _mlp_table(records) -> list[str]:
    lines = ["| layers | batch | dtype | block | density | backend | step ms | SET update ms | amortised ms | "
             "dense ms | speedup | E |", "|" + "---|" * 12]
    for impls in _by_group(records, "set_mlp_step").values():
        for r in impls.values():
            if r["kind"] != "sparse":
                continue
            s = r["shape"]
            lines.append(
                f"| {'-'.join(map(str, s['layers']))} | {s['batch']} | {r['dtype']} | {r['block']} | "
                f"{r['density']:.3g} | {r['impl']} | {r['step_ms']:.3g} | {r['evolution_ms']:.3g} (every "
                f"{r['interval']}) | {r['median_ms']:.3g} | {_f(r['dense_ms'], '{:.3g}')} | "
                f"{_f(r['speedup'], '{:.2f}x')} | {_f(r['E'])} |")
    return lines


def format_markdown(doc: dict, *, image: str | None = None) -> str:
    """The whole document as markdown: a header (device, versions, commit, command), one table per op."""
    m, recs = doc["meta"], doc["records"]
    v, git = m["versions"], m["git"]
    commit = (git.get("commit") or "unknown")[:10] + (" (with uncommitted changes)" if git.get("dirty") else "")
    copy = doc["ceilings"]["copy"]
    out = [f"# set-kernels bench: {m['device_name']} ({m['device_type']}, {m['threads']} threads)", "",
           f"- command: `{m['command']}` ({m['mode']} grid), commit `{commit}`, {m['started_at']}, "
           f"{m['wall_s']:.0f} s, 1-min load average {m.get('loadavg')} at start, {m.get('loadavg_end')} at end",
           f"- torch {v['torch']}, triton {v['triton']}, numba {v['numba']}, numpy {v['numpy']}, "
           f"python {v['python']}",
           f"- timing: {m['timing']}",
           f"- copy ceiling: {copy['gbps']:.1f} GB/s at the start (in-place `a += b` over "
           f"{copy.get('footprint_bytes', copy['bytes']) / 2**20:.0f} MiB, bytes read + written, fastest run); "
           "each memory-bound group times it again alongside (\"copy GB/s\"), on buffers as large as the op's and "
           "moving the bytes it moves at density 1 (Adam: mask, p, g, m, v read; p, m, v written); \"% of copy\" "
           "= the op's GB/s at its median over that",
           "- E = density × T_dense / T_sparse (1.0: time scales exactly with density); speedup = "
           "T_dense / T_sparse; TFLOP/s counts live blocks only; vs BSR = T(torch BSR matmul) / T_sparse"]
    if image:
        out += ["", f"![speedup against density]({image})"]
    sections = (("block_sparse_linear", "## block_sparse_linear: y = x @ W.T (forward) and its dX, dW",
                 _linear_table),
                ("masked_adam_", "## masked_adam_: one step against torch.optim.Adam(fused=True) + mask "
                 "multiplies (GB/s on the minimum bytes: mask + live p, grad, moments)", _adam_table),
                ("set_mlp_step", "## set_mlp_step: one SET-MLP training step (forward, backward, MaskedAdam, "
                 "SET update / interval) against the dense MLP with torch.optim.Adam(fused=True)", _mlp_table))
    for op, title, table in sections:
        if any(r["op"] == op for r in recs):
            out += ["", title, "", *table(recs)]
    if doc["skipped"]:
        out += ["", "Not timed:"]
        seen = set()
        for s in doc["skipped"]:
            key = (s["op"], s["impl"], s["reason"])
            if key not in seen:
                seen.add(key)
                out.append(f"- {s['op']} {s['pass']} / {s['impl']}: {s['reason']}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ plot
PLOT_EXTRA = "bench"  # the extra of pyproject.toml that brings matplotlib


class MissingExtraError(ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra."""


def require_plotting() -> None:
    """Raise :class:`MissingExtraError` unless matplotlib can be imported (it draws ``<mode>.png``).

    ``set-kernels bench`` calls this before it times anything, so that a missing extra costs
    nothing but the message."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            f"the benchmark plot needs matplotlib, which cannot be imported ({exc}); install the "
            f"'{PLOT_EXTRA}' extra: pip install 'set-kernels[{PLOT_EXTRA}]'") from exc


def _panels(records):
    """``{panel title: {line label: [(density, speedup)]}}``; lines per (impl, block)."""
    panels = {}
    for r in records:
        if r["kind"] == "dense" or r["speedup"] is None:
            continue
        s = r["shape"]
        if r["op"] == "block_sparse_linear":
            title = f"{r['pass'].replace('_', '+')} {s['tokens']}×{s['in_features']}→{s['out_features']} {r['dtype']}"
        elif r["op"] == "masked_adam_":
            title = f"masked Adam {s['rows']}×{s['cols']} {r['dtype']}"
        else:
            title = f"SET-MLP step, batch {s['batch']} {r['dtype']}"
        label = f"{r['impl']} b={r['block']}"
        panels.setdefault(title, {}).setdefault(label, []).append((r["density"], r["speedup"]))
    return panels


def plot(doc: dict, path: str) -> None:
    """Speedup over dense against density, one line per (implementation, block size), ideal 1/density."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(doc["records"])
    n = max(1, len(panels))
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
    blocks = sorted({int(label.split("b=")[1]) for lines in panels.values() for label in lines})
    colors = {b: plt.cm.viridis(i / max(1, len(blocks) - 1) * 0.85) for i, b in enumerate(blocks)}
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        all_d = sorted({d for pts in lines.values() for d, _ in pts if d > 0})
        if all_d:
            ax.plot(all_d, [1 / d for d in all_d], "k:", lw=1.5, label="ideal 1/density")
        ax.axhline(1.0, color="0.6", lw=0.8)
        def order(item):
            impl, block = item[0].split(" b=")
            return (impl == "torch_bsr", impl, int(block))
        for label, pts in sorted(lines.items(), key=order):
            pts = sorted(p for p in pts if p[0] > 0)
            impl, block = label.split(" b=")
            style = "--" if impl == "torch_bsr" else "-"
            marker = {"torch_bsr": "x", "numba": "o", "triton": "s", "cuda": "^", "torch": "d"}.get(impl, "v")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, color=colors[int(block)],
                    label=label, ms=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("density")
        ax.set_ylabel("speedup over dense torch")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    m = doc["meta"]
    fig.suptitle(f"set-kernels bench ({m['mode']}): {m['device_name']}, commit {(m['git'].get('commit') or '?')[:10]}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (4.2 * nrows)))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(doc: dict, out_dir: str, stem: str) -> dict:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir``; returns their paths.

    Raises :class:`MissingExtraError` before writing anything when matplotlib is missing."""
    require_plotting()
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
    write_json(doc, paths["json"])
    plot(doc, paths["png"])
    with open(paths["md"], "w") as f:
        f.write(format_markdown(doc, image=os.path.basename(paths["png"])))
    return paths
