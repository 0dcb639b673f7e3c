"""The precision of fp32 matmuls on the GPU backends (triton and cuda): one setting for both.

fp16 and bf16 matmuls are unaffected (their products are exact on the tensor cores; every
backend accumulates in fp32), and so are the CPU backends and element sparsity (``block_size ==
1``, plain fp32 FMAs). For fp32 operands the block-sparse kernels can multiply in one of three
precisions:

``"ieee"``
    exact fp32 products. Triton: ``tl.dot(..., input_precision="ieee")`` (CUDA-core FMAs). The
    cuda backend has no such path: its exact mode is ``"3xtf32"`` (see below), which it runs instead.
``"tf32"``
    one TF32 tensor-core pass: inputs rounded to a 10-bit mantissa, ~1e-3 relative error, fastest.
``"3xtf32"``
    three TF32 passes (``a*b ~ a_hi*b_hi + a_hi*b_lo + a_lo*b_hi``), products accurate to
    ~2^-21 relative, close to fp32, at 3x the tensor-core work. Triton: ``input_precision="tf32x3"``.

Which one is used, first match wins (read at every call; a dict lookup and an env read):

1. :func:`set_fp32_precision` (an explicit Python override; ``None`` removes it);
2. ``$SET_KERNELS_FP32_PRECISION`` = ``ieee`` / ``tf32`` / ``3xtf32`` (empty or ``auto``: not set);
3. torch's own fp32 matmul setting, mapped as torch maps it for its own matmuls:
   ``torch.get_float32_matmul_precision()`` ``"highest"`` -> ``"ieee"``; ``"high"`` and
   ``"medium"`` -> ``"tf32"`` (torch's cuBLAS matmuls use one TF32 pass for both).
   ``torch.backends.cuda.matmul.allow_tf32 = True`` is ``"high"`` to torch, hence ``"tf32"`` here,
   and ``False`` is ``"highest"``; the newer ``torch.backends.cuda.matmul.fp32_precision``
   (``"ieee"`` / ``"tf32"``) is honoured too. torch's default is ``"highest"``, so by default
   fp32 matmuls are exact (triton) or 3xTF32 (cuda).

:func:`fp32_precision` gives the requested precision, :func:`backend_precision` what each
backend then runs (triton's ``input_precision`` string, or the cuda backend's mode).
"""
from __future__ import annotations

import os
import warnings

import torch

PRECISIONS = ("ieee", "tf32", "3xtf32")
ENV_VAR = "SET_KERNELS_FP32_PRECISION"
# What each GPU backend runs for each requested precision (the cuda kernels' exact mode is 3xTF32).
BACKEND_PRECISION = {
    "triton": {"ieee": "ieee", "tf32": "tf32", "3xtf32": "tf32x3"},  # tl.dot input_precision
    "cuda": {"ieee": "3xtf32", "tf32": "tf32", "3xtf32": "3xtf32"},
}
_NOT_FP32 = {"triton": "tf32", "cuda": "3xtf32"}
# The per-backend switches this replaced (they are ignored now; a set one warns once).
_OLD_ENV_VARS = ("SET_KERNELS_TRITON_TF32",)

_override: str | None = None


def set_fp32_precision(precision: str | None) -> None:
    """Make fp32 matmuls of the triton and cuda backends run in ``precision`` (``"ieee"``,
    ``"tf32"`` or ``"3xtf32"``), whatever ``$SET_KERNELS_FP32_PRECISION`` and torch say;
    ``None`` goes back to them. Process-wide."""
    global _override
    _override = None if precision is None else _check(precision, "set_fp32_precision")


def fp32_precision() -> str:
    """The requested fp32 matmul precision now: the override, else the env var, else torch's."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env and env != "auto":
        return _check(env, f"${ENV_VAR}")
    return from_torch()


def backend_precision(backend: str, dtype: torch.dtype = torch.float32) -> str:
    """What ``backend`` ("triton" or "cuda") runs an fp32 matmul in now (see the module docstring).

    For other dtypes the setting does not matter: triton gets ``"tf32"`` (``tl.dot`` ignores it
    for fp16/bf16), the cuda backend ``"3xtf32"`` (its flag only affects fp32).
    """
    if dtype != torch.float32:
        return _NOT_FP32[backend]
    return BACKEND_PRECISION[backend][fp32_precision()]


def from_torch() -> str:
    """torch's fp32 matmul precision as ``"ieee"`` or ``"tf32"`` (see the module docstring)."""
    try:
        setting = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch >= 2.9 refuses when the new fp32_precision API set tf32
        setting = "high" if getattr(torch.backends.cuda.matmul, "fp32_precision", "") == "tf32" else "highest"
    return "ieee" if setting == "highest" else "tf32"


def _check(value: str, source: str) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"{source}: expected one of {', '.join(map(repr, PRECISIONS))}, got {value!r}")
    return value


for _name in _OLD_ENV_VARS:
    if os.environ.get(_name):
        warnings.warn(f"${_name} is no longer read; set ${ENV_VAR}=tf32 (or ieee / 3xtf32) for both GPU "
                      "backends, or torch.set_float32_matmul_precision('high')", FutureWarning, stacklevel=2)
