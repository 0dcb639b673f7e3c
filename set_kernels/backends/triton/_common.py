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

**TF32.** fp32 matmuls use exact fp32 products (``input_precision="ieee"``) unless TF32 is
switched on, with ``SET_KERNELS_TRITON_TF32=1`` in the environment (read at every call) or
:func:`set_allow_tf32` (which wins over the environment variable until reset with ``None``).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Whether the kernels of this package are interpreted (decided once, before they are defined).
INTERPRET = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else (
    os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"))

TF32_ENV_VAR = "SET_KERNELS_TRITON_TF32"
_tf32_override: bool | None = None


def set_allow_tf32(allow: bool | None) -> None:
    """Let fp32 block-sparse matmuls use TF32 tensor cores (True), forbid it (False), or go back
    to ``$SET_KERNELS_TRITON_TF32`` (None). Default: exact fp32 products."""
    global _tf32_override
    if allow is not None and not isinstance(allow, bool):
        raise TypeError(f"allow: expected a bool or None, got {type(allow).__name__}")
    _tf32_override = allow


def allow_tf32() -> bool:
    """Whether fp32 matmuls may use TF32 (see :func:`set_allow_tf32`)."""
    if _tf32_override is not None:
        return _tf32_override
    return os.environ.get(TF32_ENV_VAR, "0").strip().lower() in ("1", "true", "on", "yes")


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on operands of ``dtype`` (only fp32 reads it)."""
    if dtype == torch.float32 and not allow_tf32():
        return "ieee"
    return "tf32"


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def autotune(configs, interpreter_config, key, prune=None):
    """``triton.autotune`` over ``configs`` (GPU) or the single ``interpreter_config``."""
    if INTERPRET:
        return triton.autotune(configs=[interpreter_config], key=key)
    kwargs = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None else {}
    return triton.autotune(configs=configs, key=key, **kwargs)


def smem_bytes(tiles_elems: int, itemsize: int, stages: int) -> int:
    """Shared memory of a loop pipelined over ``stages`` stages (``stages - 1`` tile buffers in
    flight) whose operand tiles hold ``tiles_elems`` elements: the estimate config pruning uses."""
    return tiles_elems * itemsize * max(1, stages - 1)


# A conservative shared-memory budget for config pruning (every sm_80+ part has more).
SMEM_BUDGET = 160 * 1024

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


def check_index(t: torch.Tensor, name: str) -> None:
    """The kernels index raw memory: catch what would otherwise read out of bounds."""
    if t.dtype != torch.int32 or not t.is_contiguous():
        raise TypeError(f"{name}: expected a contiguous int32 tensor, got {t.dtype}")


def check_operand(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if t.dtype not in TL_DTYPES:
        raise TypeError(f"{name}: the triton backend supports float32, float16 and bfloat16, got {t.dtype}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")


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


def check_sdd_operands(dy, x, block_row, col_idx) -> None:
    """The weight-gradient kernels' operands: ``dy`` and ``x`` on the GPU (or interpreted), one
    dtype, contiguous; ``block_row`` and ``col_idx`` int32 indices."""
    check_device(dy, "dy")
    check_operand(dy, "dy", dy.dtype)
    check_operand(x, "x", dy.dtype)
    check_index(block_row, "block_row")
    check_index(col_idx, "col_idx")
