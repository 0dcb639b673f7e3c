"""The ``cuda`` backend: hand-written CUDA kernels in the compiled module ``set_kernels._C``.

``_C`` is plain pybind11 (no libtorch): tensors are passed as data pointers, element counts, a
dtype code and the current CUDA stream. Importing this module never fails; when ``_C`` was not
built or there is no usable GPU, :func:`availability` says why and the ops raise RuntimeError.

For now the backend only offers the fused masked Adam/AdamW (``SUPPORTED_OPS``); the
block-sparse matmuls are served by other backends.
"""
from __future__ import annotations

import importlib

import torch

NAME = "cuda"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_OPS = ("masked_adam_",)

_C_MODULE = "set_kernels._C"
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # _C.DTYPE_*

_ext = None
_ext_error: str | None = None


def _load_ext():
    """The compiled module, or None (the import error is kept in ``_ext_error``)."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            _ext = importlib.import_module(_C_MODULE)
        except Exception as exc:  # ImportError, or OSError from a broken binary
            _ext_error = f"{type(exc).__name__}: {exc}"
    return _ext


def _arch_number(arch: str) -> int | None:
    """``"sm_90a"`` -> 90, ``"compute_80"`` -> 80."""
    digits = "".join(ch for ch in arch.split("_")[-1] if ch.isdigit())
    return int(digits) if digits else None


def availability() -> tuple[bool, str]:
    """``(True, "")`` when the cuda backend can run here, else ``(False, reason)``. Never raises."""
    try:
        ext = _load_ext()
        if ext is None:
            return False, f"{_C_MODULE} was not built ({_ext_error}); reinstall with nvcc on PATH"
        if not torch.cuda.is_available():
            return False, "no CUDA device (torch.cuda.is_available() is False)"
        if ext.cuda_device_count() == 0:
            return False, (f"no CUDA device visible to {_C_MODULE} ({ext.cuda_device_error()}; "
                           f"it uses CUDA runtime {_version(ext.cuda_runtime_version())}, "
                           f"driver supports {_version(ext.cuda_driver_version())})")
        major, minor = torch.cuda.get_device_capability()
        device_arch = 10 * major + minor
        archs = [a for a in (_arch_number(x) for x in ext.compiled_archs()) if a is not None]
        if archs and device_arch < min(archs):
            return False, (f"the GPU is sm_{device_arch}, older than every architecture {_C_MODULE} "
                           f"was built for ({', '.join(ext.compiled_archs())}); rebuild with "
                           f"SET_KERNELS_CUDA_ARCHS={device_arch}")
        return True, ""
    except Exception as exc:  # never raise from an availability probe
        return False, f"cuda backend check failed: {type(exc).__name__}: {exc}"


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


def compiled_archs() -> list[str]:
    """GPU architectures ``_C`` was built for, e.g. ``["sm_80", "sm_90"]``; ``[]`` if not built."""
    ext = _load_ext()
    if ext is None:
        return []
    try:
        return list(ext.compiled_archs())
    except Exception:
        return []


def _require():
    ok, why = availability()
    if not ok:
        raise RuntimeError(f"set_kernels cuda backend unavailable: {why}")
    return _ext


def _scalar_ptr(name: str, t: torch.Tensor | None, device: torch.device, keep: list) -> int:
    """Data pointer of an fp32 device copy of a 1-element tensor (0 for None); no host sync."""
    if t is None:
        return 0
    if t.numel() != 1 or t.device != device:
        raise ValueError(f"{name}: expected a 1-element tensor on {device}, got shape "
                         f"{tuple(t.shape)} on {t.device}")
    t = t.detach().reshape(1).to(dtype=torch.float32).contiguous()
    keep.append(t)
    return t.data_ptr()


def masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, *, step, lr, beta1, beta2, eps,
                 weight_decay, decoupled_weight_decay, grad_scale=None, found_inf=None) -> None:
    """Fused masked Adam/AdamW step, in place, with the ``_C.masked_adam`` CUDA kernel.

    The tensors were validated by ``set_kernels.ops.masked_adam_`` (same CUDA device, matching
    shapes, contiguous params and moments, grads of the param dtype). Params/grads may be
    fp32/fp16/bf16; the kernel keeps the moments in fp32 (moments stored in the param dtype are
    updated through fp32 copies). Launches on the current stream; no host synchronisation.
    """
    ext = _require()
    n = len(params)
    if masks is None:
        masks = [None] * n
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(masks) == n):
        raise ValueError("masked_adam_: params, grads, exp_avgs, exp_avg_sqs and masks must have the same length")
    if n == 0:
        return
    device = params[0].device
    if device.type != "cuda":
        raise ValueError(f"masked_adam_: the cuda backend needs CUDA tensors, got {device}")

    with torch.cuda.device(device):
        keep: list[torch.Tensor] = []  # temporaries that must outlive the launches
        scale_ptr = _scalar_ptr("grad_scale", grad_scale, device, keep)
        inf_ptr = _scalar_ptr("found_inf", found_inf, device, keep)
        stream = torch.cuda.current_stream(device).cuda_stream
        copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []

        groups: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            if p.dtype not in _DTYPE_CODES:
                raise TypeError(f"params[{i}]: the cuda backend supports float32, float16 and bfloat16, got {p.dtype}")
            groups.setdefault(p.dtype, []).append(i)

        for dtype, idx in groups.items():
            ptrs: dict[str, list[int]] = {k: [] for k in ("p", "g", "m", "v", "mask")}
            numels: list[int] = []
            for i in idx:
                p, g, m, v, mask = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], masks[i]
                if not p.is_contiguous():
                    raise ValueError(f"params[{i}]: expected a contiguous tensor")
                for name, t in (("params", p), ("grads", g), ("exp_avgs", m), ("exp_avg_sqs", v), ("masks", mask)):
                    if t is not None and t.device != device:
                        raise ValueError(f"{name}[{i}]: expected a tensor on {device}, got {t.device}")
                if g.dtype != p.dtype:
                    raise TypeError(f"grads[{i}]: expected dtype {p.dtype} (params[{i}]), got {g.dtype}")
                if g.numel() != p.numel():
                    raise ValueError(f"grads[{i}]: expected {p.numel()} elements, got {g.numel()}")
                g = g.contiguous()
                state = []
                for name, s in (("exp_avgs", m), ("exp_avg_sqs", v)):
                    if s.numel() != p.numel():
                        raise ValueError(f"{name}[{i}]: expected {p.numel()} elements")
                    if s.dtype != torch.float32 or not s.is_contiguous():
                        # a fresh contiguous fp32 copy (Tensor.to may return a strided self)
                        tmp = torch.empty(s.shape, dtype=torch.float32, device=s.device).copy_(s.detach())
                        copy_back.append((s, tmp))
                        s = tmp
                    state.append(s)
                if mask is not None:
                    if mask.dtype != torch.bool:
                        raise TypeError(f"masks[{i}]: expected a bool tensor, got dtype {mask.dtype}")
                    if mask.numel() != p.numel():
                        raise ValueError(f"masks[{i}]: expected {p.numel()} elements, got {mask.numel()}")
                    mask = mask.contiguous()
                keep += [g] + state + ([mask] if mask is not None else [])
                ptrs["p"].append(p.data_ptr())
                ptrs["g"].append(g.data_ptr())
                ptrs["m"].append(state[0].data_ptr())
                ptrs["v"].append(state[1].data_ptr())
                ptrs["mask"].append(mask.data_ptr() if mask is not None else 0)
                numels.append(p.numel())
            ext.masked_adam(
                ptrs["p"], ptrs["g"], ptrs["m"], ptrs["v"], ptrs["mask"], numels,
                _DTYPE_CODES[dtype], int(step), float(lr), float(beta1), float(beta2), float(eps),
                float(weight_decay), bool(decoupled_weight_decay), scale_ptr, inf_ptr, stream,
            )
        for dst, tmp in copy_back:
            dst.copy_(tmp)
