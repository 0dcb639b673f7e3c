"""pytest setup for the benchmarks: import the package from this checkout.

(set_kernels.backends.numba points $NUMBA_CACHE_DIR at the checkout's ignored .numba_cache itself.)
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
