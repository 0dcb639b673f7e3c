"""pytest setup for the benchmarks: import the package from this checkout, cache numba kernels in it."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Before numba is imported: keep its on-disk JIT cache in the (git-ignored) repo folder.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(ROOT, ".numba_cache"))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
