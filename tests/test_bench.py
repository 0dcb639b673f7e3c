"""``set-kernels bench``: the real command on toy sizes writes a JSON that validates, a markdown
table and a PNG; the derived figures (E, TFLOP/s, GB/s) are computed from the timings."""
import json
import math
import statistics

import pytest
import torch

from set_kernels import bench, cli
from set_kernels.bench import cases, report, schema, timing
from set_kernels.bench.run import records_of, traffic


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["bench", "--quick", "--tiny", "--ops", "block_sparse_linear", "--out", str(out),
                       "--no-progress"])
    return rc, out, buf.getvalue()


def test_bench_quick_writes_json_markdown_png(linear_run):
    rc, out, stdout = linear_run
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["tiny.json", "tiny.md", "tiny.png"]
    assert (out / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "tiny.md").read_text()
    assert "| pass | tokens × in → out |" in md and "![speedup against density](tiny.png)" in md
    assert "| forward | 16 × 256 → 256 | float32 | 32 | 0.25 | numba |" in stdout  # the table is printed


def test_bench_json_validates_and_covers_the_grid(linear_run):
    _, out, stdout = linear_run
    doc = json.loads((out / "tiny.json").read_text())
    assert report.validate(doc) == []
    meta = doc["meta"]
    assert meta["device_type"] == "cpu" and meta["ops"] == ["block_sparse_linear"] and meta["mode"] == "tiny"
    assert meta["versions"]["torch"] == torch.__version__
    recs = doc["records"]
    assert {r["op"] for r in recs} == {"block_sparse_linear"}
    seen = {(r["pass"], r["impl"], r["density"]) for r in recs}
    for density in (0.25, 1.0):
        for impl in ("numba", "dense", "torch_bsr"):
            assert ("forward", impl, density) in seen
        for impl in ("numba", "dense"):
            assert ("forward_backward", impl, density) in seen
    for r in recs:
        assert r["q20_ms"] <= r["median_ms"] <= r["q80_ms"] and r["repeats"] == 2
        assert math.isclose(r["speedup"], r["dense_ms"] / r["median_ms"], rel_tol=1e-9)
        per_call = 2 * 16 * 256 * 256 * (r["density"] if r["kind"] != "dense" else 1)
        assert math.isclose(r["flops"], per_call * (3 if r["pass"] == "forward_backward" else 1), rel_tol=1e-9)
        assert math.isclose(r["tflops"], r["flops"] / (r["median_ms"] * 1e-3) / 1e12, rel_tol=1e-9)
    element = [r for r in recs if r["block"] == 1]  # element sparsity: block size 1
    assert {r["impl"] for r in element} >= {"numba", "dense"}
    assert "| forward | 16 × 256 → 256 | float32 | 1 | 0.1 | numba |" in stdout
    # nothing failed: only the documented, expected omissions are listed
    assert all(s["impl"] in ("triton", "cuda", "torch", "torch_bsr") for s in doc["skipped"])


def test_validate_catches_broken_documents(linear_run):
    _, out, _ = linear_run
    good = json.loads((out / "tiny.json").read_text())
    breakers = [
        lambda d: d.pop("schema"),
        lambda d: d["meta"].pop("git"),
        lambda d: d["meta"]["versions"].pop("numba"),
        lambda d: d["ceilings"]["copy"].update(gbps=0),
        lambda d: d["records"][0].pop("median_ms"),
        lambda d: d["records"][0].pop("E"),
        lambda d: d["records"][0].update(kind="fast"),
        lambda d: d["records"][0].update(median_ms=-1.0),
        lambda d: next(r for r in d["records"] if r["kind"] == "sparse").update(E=123.0),
        lambda d: d.update(records={}),
        lambda d: d["meta"].update(gpu=0),
        lambda d: d["records"][0].update(zeta="x"),  # optional, but typed when present
        lambda d: d["skipped"].append({"op": "x", "pass": "-", "impl": "-", "case": "x"}),
    ]
    for i, br in enumerate(breakers):
        doc = json.loads(json.dumps(good))
        br(doc)
        assert report.validate(doc), f"breaker {i} was not caught"


def test_derived_figures():
    group = cases.Group(op="masked_adam_", pass_="step", shape={"rows": 4, "cols": 4}, dtype="float32", block=16,
                        density=0.25, nnz_blocks=1, kinds={"numba": "sparse", "dense": "dense"},
                        flops={}, nbytes={"numba": 1000, "dense": 1000})
    st = lambda ms: timing.Stats(median_ms=ms, q20_ms=ms, q80_ms=ms, min_ms=ms, max_ms=ms, repeats=3)  # noqa: E731
    recs = {r["impl"]: r for r in records_of(group, {"numba": st(2.0), "dense": st(10.0)}, copy_gbps=1e-3)}
    assert recs["numba"]["speedup"] == 5.0 and recs["numba"]["E"] == 1.25 and recs["dense"]["E"] is None
    assert math.isclose(recs["numba"]["gbps"], 1000 / 2e-3 / 1e9) and math.isclose(recs["numba"]["copy_share"], 0.5)
    assert recs["numba"]["copy_gbps"] == 1e-3 and recs["numba"]["flops"] is None
    assert recs["numba"]["tflops"] is None and recs["numba"]["backend"] == "numba" and recs["dense"]["backend"] is None


def test_copy_ceiling_is_like_for_like():
    """The reference streams over buffers of the op's size, reads them all and writes back what the
    op writes (in place: no write-allocate reads), is credited with exactly that, at its fastest run."""
    n = 1 << 16
    c = timing.copy_ceiling(torch.device("cpu"), 17 * n, 12 * n)  # masked Adam fp32: 17 bytes read, 12 written
    assert (c.footprint, c.written, c.moved) == (17 * n, 12 * n, 29 * n)
    st = timing.Stats(median_ms=2.0, q20_ms=1.5, q80_ms=3.0, min_ms=1.0, max_ms=4.0, repeats=5)
    assert math.isclose(c.gbps(st), c.moved / 1e-3 / 1e9)
    rec = c.record(st)
    assert rec["bytes"] == 29 * n and rec["footprint_bytes"] == 17 * n and rec["written_bytes"] == 12 * n
    # What fn does: a += b over 5n bytes each, c = -c over 7n bytes, nothing else.
    cells = {name: cell.cell_contents for name, cell in zip(c.fn.__code__.co_freevars, c.fn.__closure__)}
    a, b, cc = cells["a"], cells["b"], cells["c"]
    assert 4 * a.numel() == 4 * b.numel() == 5 * n and 4 * cc.numel() == 7 * n
    before_a, before_c = a.clone(), cc.clone()
    c.fn()
    assert torch.equal(a, before_a + b) and torch.equal(cc, -before_c)
    assert timing.copy_ceiling(torch.device("cpu"), 1 << 20).written == 1 << 19  # default: half written
    with pytest.raises(ValueError, match="written"):
        timing.copy_ceiling(torch.device("cpu"), 100, 20)


def test_adam_traffic():
    group = cases.Group(op="masked_adam_", pass_="step", shape={"rows": 4, "cols": 8}, dtype="float32", block=16,
                        density=0.25, nbytes={"numba": 1})
    assert traffic(group) == (32 * (1 + 4 * 4), 32 * 3 * 4)  # reads mask, p, g, m, v; writes p, m, v
    group.dtype = "bfloat16"
    assert traffic(group) == (32 * (1 + 2 * 2 + 2 * 4), 32 * (2 + 2 * 4))  # fp32 moments
    group.nbytes = {}
    assert traffic(group) is None


def test_summarize_matches_torch_quantiles():
    ts = torch.rand(11, generator=torch.Generator().manual_seed(3)).tolist()
    s = timing.summarize(ts)
    q = torch.quantile(torch.tensor(ts, dtype=torch.float64), torch.tensor([0.2, 0.8], dtype=torch.float64))
    assert s.median_ms == statistics.median(ts) and s.repeats == 11
    assert math.isclose(s.q20_ms, q[0].item()) and math.isclose(s.q80_ms, q[1].item())
    assert s.min_ms == min(ts) and s.max_ms == max(ts)


def test_default_backends_skip_reference_and_cpu_triton():
    names, skipped = cases.select_backends(None, ["forward"], torch.device("cpu"), torch.float32)
    assert "torch" not in names and "triton" not in names and "numba" in names
    assert {n for n, _ in skipped} >= {"torch", "triton"}
    names, skipped = cases.select_backends(["torch"], ["forward_backward"], torch.device("cpu"), torch.float32)
    assert names == ["torch"] and skipped == []
    names, skipped = cases.select_backends(["numba"], ["forward"], torch.device("cpu"), torch.bfloat16)
    assert names == [] and "bfloat16" in skipped[0][1]


def test_grids_cover_the_issue():
    for dev in ("cpu", "cuda"):
        full = bench.default_grid(dev, "full")
        assert full.densities == (0.05, 0.1, 0.25, 0.5, 1.0) and full.blocks == (16, 32, 64, 128)
        assert len({f for _, f, _ in full.linear}) >= 2 and full.mlp_densities == (0.03, 0.1)
        assert tuple(full.mlp_layers) == (784, 1000, 1000, 1000, 10)
    assert len({d for _, _, d in bench.default_grid("cuda", "full").linear}) >= 2


def test_slug():
    assert bench.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.slug("Intel(R) Xeon(R) Platinum 8480+") == "intel-xeon-platinum-8480"
    assert bench.slug("AMD EPYC") == "amd-epyc"


def test_bench_adam_and_set_mlp_step(tmp_path, monkeypatch):
    sizes = []
    real = timing.copy_ceiling

    def spy(device, footprint, written=None):
        sizes.append((footprint, written))
        return real(device, footprint, written)

    monkeypatch.setattr(timing, "copy_ceiling", spy)
    g = bench.default_grid("cpu", "tiny")
    doc = bench.run("cpu", g, ("masked_adam_", "set_mlp_step"), mode="tiny", progress=False)
    assert report.validate(doc) == []
    (rows, cols, _), = g.adam
    # The start-of-run ceiling, then one reference per Adam group, moving the op's bytes.
    assert sizes == [(g.copy_bytes, None)] + [(rows * cols * 17, rows * cols * 12)] * len(g.adam_densities)
    assert doc["ceilings"]["copy"]["footprint_bytes"] == g.copy_bytes
    adam = [r for r in doc["records"] if r["op"] == "masked_adam_"]
    assert {r["impl"] for r in adam} == {"numba", "dense"}
    for r in adam:  # never credited with more bytes than its reference moves (equal at density 1)
        assert r["bytes"] <= rows * cols * 29 and 0 < r["copy_share"] <= 1, (r["impl"], r["copy_share"])
        assert r["copy_gbps"] > 0 and math.isclose(r["copy_share"], r["gbps"] / r["copy_gbps"])
    mlp = [r for r in doc["records"] if r["op"] == "set_mlp_step"]
    assert {(r["impl"], round(r["density"], 1)) for r in mlp} >= {("numba", 0.0), ("numba", 0.1), ("dense", 0.0)}
    assert {r["block"] for r in mlp if r["kind"] == "sparse"} == {g.mlp_block, 1}  # blocks and element sparsity
    for r in mlp:
        if r["kind"] == "sparse":
            assert r["interval"] == g.mlp_interval and r["evolution_ms"] > 0
            assert math.isclose(r["median_ms"], r["step_ms"] + r["evolution_ms"] / r["interval"], rel_tol=1e-9)
    assert not [s for s in doc["skipped"] if s["impl"] == "-"]
    paths = bench.write_all(doc, str(tmp_path), "x")
    assert "set_mlp_step" in open(paths["md"]).read()


def test_mlp_scale_case_skips_the_dense_mlp_and_builds_element_layers(monkeypatch):
    from set_kernels.bench import grid as grid_mod, mlp

    monkeypatch.setattr(mlp, "DENSE_LIMIT", 1000)
    g = grid_mod.default_grid("cpu", "tiny")
    group = mlp.mlp_group(g, 0.05, torch.device("cpu"), ["numba"], layers=(64, 300, 300, 10), block=1)
    assert group.block == 1 and "dense" not in group.fns
    assert any(impl == "dense" and "weights" in why for impl, why in group.skipped)
    assert set(group.fns) == {"numba", "numba/set_update"}
    group.fns["numba"]()  # one training step runs
    group.fns["numba/set_update"]()
    assert 0.03 < group.density < 0.07
    # below the limit the dense MLP is built and timed
    monkeypatch.setattr(mlp, "DENSE_LIMIT", 10**9)
    group = mlp.mlp_group(g, 0.05, torch.device("cpu"), ["numba"], layers=(64, 300, 300, 10), block=1)
    assert "dense" in group.fns


def _rec(op, pass_, impl, kind, shape, ms, dense_ms, density=0.25, block=32, **kw):
    """The fields of a record that the markdown reads."""
    return {"op": op, "pass": pass_, "impl": impl, "kind": kind, "shape": shape, "dtype": "float32", "block": block,
            "density": density, "median_ms": ms, "tflops": None, "gbps": None, "copy_gbps": None, "copy_share": None,
            "dense_ms": dense_ms, "speedup": dense_ms / ms, "E": density * dense_ms / ms if kind != "dense" else None,
            **kw}


def _fixed_doc():
    lin, adam, mlp = ({"tokens": 16, "in_features": 256, "out_features": 256}, {"rows": 256, "cols": 512},
                      {"batch": 8, "layers": [64, 128, 10]})
    meta = {"device_type": "cpu", "device_name": "Test CPU", "threads": 2, "git": {"commit": "0123456789abcdef",
            "dirty": True}, "command": "set-kernels bench", "mode": "tiny", "timing": "wall clock", "wall_s": 12.4,
            "started_at": "2024-01-01T00:00:00+00:00", "versions": dict.fromkeys(("python", "torch", "triton",
                                                                                  "numba", "numpy"), "1")}
    return {"meta": meta, "ceilings": {"copy": {"bytes": 3 << 20, "footprint_bytes": 2 << 20, "gbps": 10.5}},
            "records": [
                _rec("block_sparse_linear", "forward", "numba", "sparse", lin, 2.0, 4.0, tflops=1e-3),
                _rec("block_sparse_linear", "forward", "dense", "dense", lin, 4.0, 4.0, tflops=2e-3),
                _rec("block_sparse_linear", "forward", "torch_bsr", "baseline", lin, 5.0, 4.0, tflops=4e-4),
                _rec("block_sparse_linear", "forward_backward", "numba", "sparse", lin, 6.5, 12.0, tflops=9.2e-4),
                _rec("block_sparse_linear", "forward_backward", "dense", "dense", lin, 12.0, 12.0),
                _rec("masked_adam_", "step", "numba", "sparse", adam, 0.5, 1.5, gbps=0.4, copy_gbps=0.8,
                     copy_share=0.5),
                _rec("masked_adam_", "step", "dense", "dense", adam, 1.5, 1.5, gbps=0.1333),
                _rec("set_mlp_step", "train_step", "numba", "sparse", mlp, 3.05, 6.1, density=0.1, block=16,
                     step_ms=3.0, evolution_ms=0.5, interval=10)],
            "skipped": [{"op": "block_sparse_linear", "pass": p, "impl": "torch", "reason": "reference"}
                        for p in ("forward", "forward_backward")]}


EXPECTED_TABLES = """\
## block_sparse_linear: y = x @ W.T (forward) and its dX, dW

| pass | tokens × in → out | dtype | block | density | backend | ms | dense ms | speedup | E | TFLOP/s | torch BSR ms | vs BSR |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| forward | 16 × 256 → 256 | float32 | 32 | 0.25 | numba | 2 | 4 | 2.00x | 0.50 | 0.001 | 5 | 2.50x |
| forward+backward | 16 × 256 → 256 | float32 | 32 | 0.25 | numba | 6.5 | 12 | 1.85x | 0.46 | 0.00092 | - | - |

## masked_adam_: one step against torch.optim.Adam(fused=True) + mask multiplies (GB/s on the minimum bytes: mask + live p, grad, moments)

| rows × cols | dtype | mask block | density | backend | ms | dense ms | speedup | E | GB/s | copy GB/s | % of copy | dense GB/s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| 256 × 512 | float32 | 32 | 0.25 | numba | 0.5 | 1.5 | 3.00x | 0.75 | 0.4 | 0.8 | 50% | 0.133 |

## set_mlp_step: one SET-MLP training step (forward, backward, MaskedAdam, SET update / interval) against the dense MLP with torch.optim.Adam(fused=True)

| layers | batch | dtype | block | density | backend | step ms | SET update ms | amortised ms | dense ms | speedup | E |
|---|---|---|---|---|---|---|---|---|---|---|---|
| 64-128-10 | 8 | float32 | 16 | 0.1 | numba | 3 | 0.5 (every 10) | 3.05 | 6.1 | 2.00x | 0.20 |

Not timed:
- block_sparse_linear forward / torch: reference
"""


def test_markdown_tables_of_a_fixed_document():
    """The three op tables (one builder) as they were written before it: rows of sparse records only,
    their group's dense and BSR figures beside them, "-" where a figure is missing."""
    md = report.format_markdown(_fixed_doc(), image="x.png")
    assert md[md.index("\n## ") + 1:] == EXPECTED_TABLES
    assert "commit `0123456789 (with uncommitted changes)`" in md and "![speedup against density](x.png)" in md


def test_schema_markdown_lists_every_field_and_the_readme_points_to_it():
    from pathlib import Path

    md = schema.markdown()
    assert all(f"| `{name}` | {typ} |" in md for fields in schema.SECTIONS.values() for name, typ, _ in fields)
    readme = Path(__file__).resolve().parent.parent / "benchmarks" / "README.md"
    assert "print(schema.markdown())" in readme.read_text() and "bench/schema.py" in readme.read_text()
