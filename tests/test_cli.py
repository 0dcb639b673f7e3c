"""The quick CPU comparison behind `set-kernels bench`, on a small size."""
import math
import subprocess
import sys

from set_kernels import bench


def test_run_quick_rows_and_table():
    rows = bench.run_quick(features=256, tokens=16, block_size=32, densities=(0.25,), repeats=1,
                           progress=lambda _msg: None)
    assert [r["op"] for r in rows] == ["forward", "fwd+dX+dW", "masked_adam"]
    for r in rows:
        assert r["t_sparse_ms"] > 0 and r["t_dense_ms"] > 0
        assert math.isclose(r["speedup"], r["t_dense_ms"] / r["t_sparse_ms"], rel_tol=1e-9)
    assert math.isclose(rows[0]["E"], 0.25 * rows[0]["speedup"], rel_tol=1e-9)
    table = bench.format_table(rows)
    assert table.count("\n") == 1 + len(rows)
    assert "| forward | 16x256x256 | 32 | 0.25 |" in table


def test_cli_rejects_unknown_backend():
    out = subprocess.run([sys.executable, "-m", "set_kernels", "bench", "--backend", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "--backend" in out.stderr
