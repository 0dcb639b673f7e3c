"""Results of ``set-kernels bench``: the JSON document, the markdown tables, the plot.

The document and its check are defined in :mod:`.schema` (rendered in benchmarks/README.md);
the copy ceiling of the memory-bound rows is :class:`.timing.CopyCeiling`.
"""
from __future__ import annotations

import json
import os

from .schema import validate  # noqa: F401  (the document's check, re-exported)


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


def _table(records, op, columns) -> list[str]:
    """One row per sparse record of ``op``; ``columns``: ``[(header, cell(record, {impl: record of its group}))]``."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for impls in _by_group(records, op).values():
        lines += ["| " + " | ".join(cell(r, impls) for _, cell in columns) + " |"
                  for r in impls.values() if r["kind"] == "sparse"]
    return lines


def _col(header, key, fmt="{}", impl=None):
    """A column showing ``key`` of the row's record (of its group's ``impl`` record, if given)."""
    def cell(r, impls):
        src = impls.get(impl) if impl else r
        return _f(src and src[key], fmt)
    return header, cell


def _case(block="block"):
    return [_col("dtype", "dtype"), _col(block, "block"), _col("density", "density", "{:.3g}"),
            _col("backend", "impl")]


_VS_DENSE = [_col("dense ms", "dense_ms", "{:.3g}"), _col("speedup", "speedup", "{:.2f}x"), _col("E", "E", "{:.2f}")]
_LINEAR = [("pass", lambda r, g: r["pass"].replace("_", "+")),
           ("tokens × in → out", lambda r, g: "{tokens} × {in_features} → {out_features}".format(**r["shape"])),
           *_case(), _col("ms", "median_ms", "{:.3g}"), *_VS_DENSE, _col("TFLOP/s", "tflops", "{:.3g}"),
           _col("torch BSR ms", "median_ms", "{:.3g}", impl="torch_bsr"),
           ("vs BSR", lambda r, g: _f(g.get("torch_bsr") and g["torch_bsr"]["median_ms"] / r["median_ms"], "{:.2f}x"))]
_ADAM = [("rows × cols", lambda r, g: "{rows} × {cols}".format(**r["shape"])), *_case("mask block"),
         _col("ms", "median_ms", "{:.3g}"), *_VS_DENSE, _col("GB/s", "gbps", "{:.3g}"),
         _col("copy GB/s", "copy_gbps", "{:.3g}"),
         ("% of copy", lambda r, g: _f(r["copy_share"] and 100 * r["copy_share"], "{:.0f}%")),
         _col("dense GB/s", "gbps", "{:.3g}", impl="dense")]
_MLP = [("layers", lambda r, g: "-".join(map(str, r["shape"]["layers"]))),
        ("batch", lambda r, g: str(r["shape"]["batch"])), *_case(), _col("step ms", "step_ms", "{:.3g}"),
        ("SET update ms", lambda r, g: f"{r['evolution_ms']:.3g} (every {r['interval']})"),
        _col("amortised ms", "median_ms", "{:.3g}"), *_VS_DENSE]
SECTIONS = (("block_sparse_linear", "## block_sparse_linear: y = x @ W.T (forward) and its dX, dW", _LINEAR),
            ("masked_adam_", "## masked_adam_: one step against torch.optim.Adam(fused=True) + mask "
             "multiplies (GB/s on the minimum bytes: mask + live p, grad, moments)", _ADAM),
            ("set_mlp_step", "## set_mlp_step: one SET-MLP training step (forward, backward, MaskedAdam, "
             "SET update / interval) against the dense MLP with torch.optim.Adam(fused=True)", _MLP))


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
    for op, title, columns in SECTIONS:
        if any(r["op"] == op for r in recs):
            out += ["", title, "", *_table(recs, op, columns)]
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
