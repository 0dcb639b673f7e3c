"""``set-kernels bench``: block-sparse ops, masked Adam and a SET-MLP step against dense torch.

    set-kernels bench --quick                        # the README's main job (CPU: ~1-2 minutes)
    set-kernels bench --device cuda --out DIR        # the full grid on a GPU

For every case of the grid (:mod:`.grid`) the implementations are timed together (:mod:`.timing`):
each available set_kernels backend, dense torch on the same shapes, and torch's own BSR matmul
for the forward. Results go to ``--out`` (default ``benchmarks/results/<device-slug>/``) as
``<mode>.json`` (every measurement, schema in :mod:`.schema`), ``<mode>.md`` and ``<mode>.png``.
"""
from __future__ import annotations

from .grid import OPS, Grid, canonical_ops, default_grid, with_overrides
from .report import format_markdown, plot, validate, write_all
from .run import device_name, run, slug

__all__ = ["OPS", "Grid", "canonical_ops", "default_grid", "device_name", "format_markdown", "plot", "run",
           "slug", "validate", "with_overrides", "write_all"]
