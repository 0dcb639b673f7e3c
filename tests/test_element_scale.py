"""Element sparsity in O(nnz) memory: a 300,000 x 300,000 layer with ~600,000 live connections.

A ``rows x cols`` bool tensor of that layer would take 90 GB, its fp32 weight 360 GB. The test runs,
in a fresh process, the layout draw, a forward and backward pass, a ``MaskedAdam`` step and one SET
update, and asserts that the peak resident memory rose by less than 2 GB.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r'''
import json, resource, sys
import torch
import set_kernels as sk
from set_kernels.nn import SparseLinear

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

regrow, n = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
# Warm up: imports, numba kernels (from the cache) and torch's allocator, on a small layer.
small = torch.nn.Sequential(SparseLinear(64, 48, density=0.1, block_size=1))
opt = sk.optim.MaskedAdam(small.parameters(), lr=1e-3)
evo = sk.SET(small, opt, zeta=0.3, interval=1, regrow=regrow)
small(torch.randn(8, 64)).square().sum().backward(); opt.step(); evo.step()
before = peak_mb()

layer = SparseLinear(n, n, density=600_000 / n**2, block_size=1, generator=torch.Generator().manual_seed(0))
model = torch.nn.Sequential(layer)
opt = sk.optim.MaskedAdam(model.parameters(), lr=1e-3)
evo = sk.SET(model, opt, zeta=0.3, interval=1, regrow=regrow, seed=1)
nnz = layer.layout.nnz_blocks
old = layer.layout.index.clone()
x = torch.randn(8, n)
y = model(x)
y.square().sum().backward()
opt.step()
changed = evo.step()
out = {"nnz": nnz, "values": list(layer.values.shape), "changed": changed,
       "moved": int((layer.col_idx != old[n + 1:n + 1 + nnz]).sum()),
       "nnz_after": layer.layout.nnz_blocks, "finite": bool(torch.isfinite(y).all()),
       "rise_mb": peak_mb() - before}
print(json.dumps(out))
'''


# Gradient regrowth forms the dense gradient (in row chunks): O(tokens * rows * cols) time, so it is
# checked on a 30,000 x 30,000 layer, whose dense fp32 gradient alone (3.6 GB) would break the bound.
@pytest.mark.parametrize("regrow,n", [("random", 300_000), ("gradient", 30_000)])
def test_element_layer_stays_within_2gb(regrow, n):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, regrow, str(n)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nnz"] == 600_000 and out["nnz_after"] == 600_000
    assert out["values"] == [600_000, 1, 1]
    assert out["changed"] and out["moved"] > 0
    assert out["finite"]
    assert out["rise_mb"] < 2048, f"peak resident memory rose by {out['rise_mb']:.0f} MB"
