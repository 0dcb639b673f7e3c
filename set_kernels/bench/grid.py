"""The measurement grids of ``set-kernels bench`` (and of the pytest-benchmark suites).

One :class:`Grid` per (device type, mode). ``quick`` is the README's main job (well under 3
minutes on a 2-core CPU); ``full`` is what is committed under ``benchmarks/results/<device>/``;
``tiny`` exists for the CI tests only (same code path, toy sizes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

OPS = ("block_sparse_linear", "masked_adam_", "set_mlp_step")
OP_ALIASES = {"masked_adam": "masked_adam_", "linear": "block_sparse_linear", "set_mlp": "set_mlp_step"}
DENSITIES = (0.05, 0.1, 0.25, 0.5, 1.0)
ELEMENT_DENSITIES = (0.01, 0.05, 0.1)
BLOCKS = (16, 32, 64, 128)
MLP_LAYERS = (784, 1000, 1000, 1000, 10)
MLP_DENSITIES = (0.03, 0.1)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


@dataclass
class Grid:
    """What to measure. Linear weights are square ``features x features``; inputs ``(tokens, features)``."""

    linear: list = field(default_factory=list)  # [(tokens, features, dtype name)]
    blocks: tuple = BLOCKS
    densities: tuple = DENSITIES
    # Element sparsity (block size 1): its own shapes and (lower) densities.
    element_linear: list = field(default_factory=list)  # [(tokens, features, dtype name)]
    element_densities: tuple = ELEMENT_DENSITIES
    adam: list = field(default_factory=list)  # [(rows, cols, dtype name)]
    adam_block: int = 32  # the masks are block masks of this block size
    adam_densities: tuple = DENSITIES
    mlp_layers: tuple = MLP_LAYERS
    mlp_batch: int = 128
    mlp_densities: tuple = MLP_DENSITIES
    mlp_block: int = 16
    mlp_element: bool = True  # also the SET-MLP with element sparsity (block size 1)
    # Scale cases (full grid): [(hidden width, total density)] of a 784-W-W-W-10 element SET-MLP.
    mlp_scale: list = field(default_factory=list)
    mlp_dtype: str = "float32"
    mlp_interval: int = 100  # SET topology update every this many steps (its cost is amortised)
    repeats: int = 5  # CPU: interleaved repeats per group
    warmup: int = 1  # CPU: untimed calls per callable before the repeats
    rep_ms: int = 100  # GPU: do_bench repetition time
    copy_bytes: int = 256 << 20  # size of the buffer copied for the bandwidth ceiling

    def replace(self, **kw) -> "Grid":
        return dataclasses.replace(self, **kw)


def default_grid(device_type: str, mode: str) -> Grid:
    """The grid for ``device_type`` ("cpu" or "cuda") and ``mode`` ("quick", "full" or "tiny")."""
    if mode not in ("quick", "full", "tiny"):
        raise ValueError(f"mode: expected 'quick', 'full' or 'tiny', got {mode!r}")
    if mode == "tiny":  # CI only: toy sizes through the real code path
        return Grid(linear=[(16, 256, "float32")], blocks=(32,), densities=(0.25, 1.0),
                    element_linear=[(16, 256, "float32")], element_densities=(0.1,),
                    adam=[(256, 256, "float32")], adam_densities=(0.25,), mlp_layers=(64, 128, 128, 10),
                    mlp_batch=8, mlp_interval=10, repeats=2, warmup=1, rep_ms=10, copy_bytes=4 << 20)
    if device_type == "cuda":
        if mode == "quick":
            return Grid(linear=[(8192, 4096, "bfloat16")], blocks=(32, 64, 128),
                        element_linear=[(8192, 4096, "bfloat16")], element_densities=(0.01, 0.05),
                        adam=[(8192, 8192, "float32")], mlp_batch=128, rep_ms=50, copy_bytes=1 << 30)
        return Grid(linear=[(t, f, d) for d in ("bfloat16", "float16", "float32") for t, f in ((8192, 4096),
                                                                                               (8192, 8192))],
                    element_linear=[(t, 4096, d) for d in ("bfloat16", "float32") for t in (512, 8192)],
                    adam=[(8192, 8192, d) for d in ("float32", "bfloat16")], mlp_batch=128, rep_ms=100,
                    copy_bytes=1 << 30)
    if mode == "quick":
        # No density 1.0 here: its dense-equivalent sparse runs and torch's BSR matmul (~1 s a call
        # on 2 cores) would double the run; the full grid has it.
        return Grid(linear=[(512, 4096, "float32")], blocks=(32,), densities=(0.05, 0.1, 0.25, 0.5),
                    element_linear=[(512, 4096, "float32")], element_densities=(0.05,),
                    adam=[(4096, 4096, "float32")], repeats=5, copy_bytes=256 << 20)
    # the scale case: epsilon = 13 at width 20,000 (1.5 million live weights; dense: 816 million)
    return Grid(mlp_scale=[(20000, 0.00185)],
                linear=[(512, 1024, "float32"), (512, 1024, "float64"), (512, 2048, "float32"),
                        (512, 4096, "float32")],
                element_linear=[(t, f, "float32") for t in (40, 512) for f in (1024, 4096)],
                adam=[(2048, 2048, "float32"), (4096, 4096, "float32")], repeats=7, copy_bytes=256 << 20)


def canonical_ops(names) -> tuple:
    """Validated op names (aliases such as ``masked_adam`` accepted), in :data:`OPS` order."""
    out = set()
    for name in names:
        name = OP_ALIASES.get(name, name)
        if name not in OPS:
            raise ValueError(f"ops: expected names from {OPS}, got {name!r}")
        out.add(name)
    return tuple(op for op in OPS if op in out)


def with_overrides(grid: Grid, *, features=None, tokens=None, blocks=None, densities=None, dtypes=None,
                   repeats=None) -> Grid:
    """``grid`` with command-line overrides applied (None leaves a field alone)."""
    kw = {}
    if features is not None or tokens is not None or dtypes is not None:
        t0, f0, _ = grid.linear[0]
        sizes = [(t, f) for t, f, _ in grid.linear] if features is None and tokens is None else \
            [(tokens or t0, features or f0)]
        sizes = list(dict.fromkeys(sizes))
        names = list(dtypes) if dtypes else list(dict.fromkeys(d for _, _, d in grid.linear))
        for d in names:
            if d not in DTYPES:
                raise ValueError(f"dtypes: expected names from {tuple(DTYPES)}, got {d!r}")
        kw["linear"] = [(t, f, d) for d in names for t, f in sizes]
        if features is not None:
            kw["adam"] = [(features, features, d) for d in dict.fromkeys(d for _, _, d in grid.adam)]
        if dtypes:
            kw["adam"] = [(r, c, d) for d in names for r, c in dict.fromkeys((r, c) for r, c, _ in kw.get(
                "adam", grid.adam))]
    if "linear" in kw:
        kw["element_linear"] = list(kw["linear"]) if grid.element_linear else []
    if blocks:
        # the block sizes asked for (1 included) replace the separate element cases
        kw["blocks"] = tuple(int(b) for b in blocks)
        kw["element_linear"] = []
    if densities:
        kw["densities"] = tuple(float(d) for d in densities)
        kw["adam_densities"] = kw["densities"]
        kw["element_densities"] = kw["densities"]
    if repeats is not None:
        if repeats < 1:
            raise ValueError(f"repeats: expected >= 1, got {repeats}")
        kw["repeats"] = int(repeats)
    return grid.replace(**kw)
