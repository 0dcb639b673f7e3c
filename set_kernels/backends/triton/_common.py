"""Shared pieces of the Triton backend: interpreter detection, flags, autotune wrapper, helpers.

Importing this module imports triton (the package ``__init__`` does it inside a try, so a
missing triton only makes the backend unavailable).

**Interpreter.** With ``TRITON_INTERPRET=1`` in the environment *before triton is imported*,
``@triton.jit`` kernels run in triton's numpy interpreter on CPU tensors instead of being
compiled for a GPU. That is how CI tests this backend on machines without a GPU. Whether a
kernel is interpreted is decided when it is decorated, i.e. when the op modules of this package
are imported, so :data:`INTERPRET` is read once, here, right before they are. The interpreter
has two known gaps this backend works around:

* its bf16 ``tl.dot`` returns wrong numbers, so when interpreting every dot operand is cast to
  fp32 first (exact: fp16/bf16 values are fp32 values, and the accumulation is fp32 anyway);
* autotuning over several configs does not work, so each kernel gets one config there.

**fp32 precision.** The ``PRECISION`` constexpr of the block kernels (``tl.dot``'s
``input_precision``) comes from :func:`dot_precision`, read at every call: ``"ieee"`` (exact fp32
products), ``"tf32"`` or ``"tf32x3"``, following torch's fp32 matmul precision unless
``$SET_KERNELS_FP32_PRECISION`` or :func:`set_kernels.backends.set_fp32_precision` says otherwise
(see :mod:`set_kernels.backends._precision`).

**Checks.** The public ops validated dtypes, shapes, devices and the layout index; the wrappers
here only check what the kernels themselves rely on (:func:`check_operands`).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .. import _precision

# Whether the kernels of this package are interpreted (decided once, before they are defined).
INTERPRET = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else (
    os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"))


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on operands of ``dtype`` (only fp32 reads it)."""
    return _precision.backend_precision("triton", dtype)


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# A conservative shared-memory budget for config pruning (every sm_80+ part has more).
SMEM_BUDGET = 160 * 1024

# Configs of the forward and input-gradient kernels (one BLOCK_M x b output tile a program):
# (BLOCK_M, num_warps, num_stages), pruned per block size by :func:`prune_token_tiles`.
TOKEN_TILE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, w, s in [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 2), (128, 8, 3), (128, 8, 4),
                      (256, 8, 3)]
]
TOKEN_TILE_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)


def prune_token_tiles(operand: str):
    """Config pruning of a token-tile kernel whose dense operand argument is ``operand``: drop
    tiles whose fp32 accumulator exceeds 128 registers a thread at 4 warps, or whose pipelined
    tiles exceed :data:`SMEM_BUDGET`; keep the smallest when none fits (the autotuner needs one)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}  # the autotuner passes positional args and keyword args apart
        b = args["B"]
        item = args[operand].element_size()
        kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_M"] * b <= 128 * 128
                and smem_bytes(cfg.kwargs["BLOCK_M"] * b + b * b, item, cfg.num_stages) <= SMEM_BUDGET]
        return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.num_stages))]
    return prune


@triton.jit
def grouped_tile(pid, M, n_blocks, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """``(token tile, output block)`` of program ``pid`` of a 1-D grid swizzled in groups of
    ``GROUP_M`` token tiles: consecutive programs walk ``GROUP_M`` token tiles for one output
    block, then the next block, so resident programs share a few operand tiles in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_M * n_blocks
    first_m = (pid // width) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_m, (pid % width) // group_m


def autotune(configs, interpreter_config, key, prune=None):
    """``triton.autotune`` over ``configs`` (GPU) or the single ``interpreter_config``."""
    if INTERPRET:
        return triton.autotune(configs=[interpreter_config], key=key)
    kwargs = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None else {}
    return triton.autotune(configs=list(configs), key=key, **kwargs)


def smem_bytes(tiles_elems: int, itemsize: int, stages: int) -> int:
    """Shared memory of a loop pipelined over ``stages`` stages (``stages - 1`` tile buffers in
    flight) whose operand tiles hold ``tiles_elems`` elements: the estimate config pruning uses."""
    return tiles_elems * itemsize * max(1, stages - 1)


_sm_count: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 for CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def bucket(n: int) -> int:
    """Autotune key for a token count: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(max(1, int(n))))


def check_device(t: torch.Tensor, name: str) -> None:
    """Interpreted kernels run CPU tensors only; compiled kernels CUDA tensors only."""
    want = "cpu" if INTERPRET else "cuda"
    if t.device.type != want:
        how = ("triton is interpreting (TRITON_INTERPRET=1), which runs CPU tensors only" if INTERPRET
               else "compiled triton kernels run CUDA tensors only")
        raise ValueError(f"{name}: expected a {want} tensor, got {t.device} ({how})")


def on_device(device: torch.device):
    """Context in which triton launches on ``device`` (it launches on torch's current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_operands(**tensors) -> None:
    """What every kernel of this package relies on: tensors on the device type it runs (CUDA, or
    CPU when interpreted; the first one is checked) and contiguous (raw row-major indexing)."""
    first = True
    for name, t in tensors.items():
        if t is None:
            continue
        if first:
            check_device(t, name)
            first = False
        if not t.is_contiguous():
            raise ValueError(f"{name}: the triton kernels need a contiguous tensor")


@triton.jit
def cast_out(x, DT: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 ``x`` to ``DT``, rounding to nearest even.

    Compiled, that is what ``.to`` does. The interpreter's fp32 -> bf16 cast truncates instead, so
    there the value is first rounded to a bf16-representable fp32 with integer arithmetic (the
    carry of a round-up runs into the exponent, as it should), which the cast keeps exactly.
    """
    if INTERPRETED and DT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) << 16
        x = u.to(tl.float32, bitcast=True)
    return x.to(DT)
