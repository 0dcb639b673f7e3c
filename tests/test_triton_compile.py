"""Compile the triton kernels for real GPUs, without a GPU.

The interpreter (how CI runs tests/test_triton.py) executes kernels as Python and accepts code
the compiler would reject. So here a fresh process (no TRITON_INTERPRET) compiles each kernel
ahead of time with ``triton.compile`` for sm_90 and sm_80, with the ptxas bundled with triton,
and checks a few facts of the result: tensor-core instructions for bf16, a multi-buffered
(pipelined) K loop, vector accesses in masked Adam; for the element-sparse (b = 1) kernels:
vector gathers over the transposed activations, no atomics, no layout conversion in the loops.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

SCRIPT = r'''
import importlib, json, sys
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

common = importlib.import_module("set_kernels.backends.triton._common")
assert not common.INTERPRET
forward = importlib.import_module("set_kernels.backends.triton.linear_forward")
grad_input = importlib.import_module("set_kernels.backends.triton.linear_grad_input")
grad_weight = importlib.import_module("set_kernels.backends.triton.linear_grad_weight")
adam = importlib.import_module("set_kernels.backends.triton.masked_adam")
spmm = importlib.import_module("set_kernels.backends.triton.spmm")
DIV = [["tt.divisibility", 16]]  # what triton's launcher specialises for multiples of 16


def compile_(fn, sig, const, arch, num_warps, num_stages=3, div=(), ttgir=False):
    full = {k: ("constexpr" if k in const else v) for k, v in sig.items()}
    names = list(sig)
    attrs = {(names.index(n),): DIV for n in div}
    k = triton.compile(ASTSource(fn, full, const, attrs), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    res = {"ptx": k.asm["ptx"], "smem": k.metadata.shared}
    if ttgir:
        res["ttgir"] = k.asm["ttgir"]
    return res


out = {}
for arch in (90, 80):
    for dt, b, prec in (("bf16", 64, "tf32"), ("fp32", 32, "ieee"), ("fp16", 128, "tf32")):
        p = "*" + dt
        sig = dict(x_ptr=p, v_ptr=p, row_ptr="*i32", col_idx="*i32", bias_ptr=p, y_ptr=p, M="i32", rows="i32",
                   cols="i32", n_out_blocks="i32", M_BUCKET="i32", B=0, HAS_BIAS=0, INTERPRETED=0, PRECISION=0,
                   BLOCK_M=0, GROUP_M=0)
        div = ["x_ptr", "v_ptr", "y_ptr", "bias_ptr", "M", "rows", "cols"]
        for stages in (2, 3):
            r = compile_(forward._forward_kernel.fn, sig, dict(B=b, HAS_BIAS=True, INTERPRETED=False, PRECISION=prec,
                         BLOCK_M=64, GROUP_M=8), arch, 4, stages, div)
            out[f"forward-{arch}-{dt}-{stages}"] = r
        sig = dict(dy_ptr=p, v_ptr=p, col_ptr="*i32", row_idx="*i32", perm="*i32", dx_ptr=p, M="i32", rows="i32",
                   cols="i32", n_in_blocks="i32", M_BUCKET="i32", B=0, INTERPRETED=0, PRECISION=0, BLOCK_M=0,
                   GROUP_M=0)
        for stages in (2, 3):
            out[f"grad_input-{arch}-{dt}-{stages}"] = compile_(
                grad_input._grad_input_kernel.fn, sig, dict(B=b, INTERPRETED=False, PRECISION=prec, BLOCK_M=64, GROUP_M=8), arch, 4,
                stages, ["dy_ptr", "v_ptr", "dx_ptr", "M", "rows", "cols"])
        for partial in (False, True):
            sig = dict(dy_ptr=p, x_ptr=p, block_row="*i32", col_idx="*i32", out_ptr="*fp32" if partial else p,
                       M="i32", rows="i32", cols="i32", nnz="i32", TOKENS_PER_SPLIT="i32", M_BUCKET="i32", B=0,
                       PARTIAL=0, INTERPRETED=0, PRECISION=0, BLOCK_K=0)
            out[f"grad_weight-{arch}-{dt}-{partial}"] = compile_(
                grad_weight._grad_weight_kernel.fn, sig, dict(B=b, PARTIAL=partial, INTERPRETED=False, PRECISION=prec, BLOCK_K=32),
                arch, 8 if b >= 128 else 4)
        out[f"sum-{arch}-{dt}"] = compile_(grad_weight._sum_splits_kernel, dict(ws_ptr="*fp32", out_ptr=p, nnz="i32",
                                           n_splits="i32", B=0, INTERPRETED=0), dict(B=b, INTERPRETED=False), arch, 4)
    TL = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
    for pdt, sdt, flags in (("bf16", "fp32", (True, True, True, False)), ("fp32", "fp32", (False, False, False, True)),
                            ("fp16", "fp16", (True, False, True, True))):
        has_mask, has_scale, has_inf, coupled = flags
        sig = dict(addrs="*i64", numels="*i64", chunk_start="*i64", n_tensors="i32", scale_ptr="*fp32",
                   inf_ptr="*fp32", omb1="fp32", beta2="fp32", omb2="fp32", step_size="fp32", bc2_sqrt="fp32",
                   eps="fp32", p_factor="fp32", g_wd="fp32", P_DT=0, S_DT=0, HAS_MASK=0, HAS_SCALE=0, HAS_INF=0,
                   COUPLED_WD=0, LOG_N=0, BLOCK=0, ITERS=0, ALIGNED=0, INTERPRETED=0)
        out[f"adam-{arch}-{pdt}-{sdt}"] = compile_(adam._masked_adam_kernel, sig, dict(
            P_DT=TL[pdt], S_DT=TL[sdt], HAS_MASK=has_mask, HAS_SCALE=has_scale, HAS_INF=has_inf, COUPLED_WD=coupled,
            LOG_N=3, BLOCK=adam.BLOCK, ITERS=adam.ITERS, ALIGNED=True, INTERPRETED=False), arch, adam.NUM_WARPS)
# Element sparsity (b = 1): SpMM (forward with bias, dX through perm) and SDDMM, with and without
# the divisibility triton gives M (and the pointers) when M is a multiple of 16.
def spmm_sig(p):
    return dict(inT_ptr=p, v_ptr=p, ptr_ptr="*i32", idx_ptr="*i32", perm_ptr="*i32", bias_ptr=p, out_ptr=p, M="i32",
                n_out="i32", n_in="i32", M_BUCKET="i32", NNZ_BUCKET="i32", HAS_PERM=0, HAS_BIAS=0, INTERPRETED=0,
                LOG_K=0, BLOCK_M=0, BLOCK_R=0)


def sddmm_sig(p):
    return dict(dyT_ptr=p, xT_ptr=p, row_ptr="*i32", col_ptr="*i32", out_ptr=p, M="i32", nnz="i32", rows="i32",
                cols="i32", M_BUCKET="i32", NNZ_BUCKET="i32", INTERPRETED=0, LOG_T=0, BLOCK_E=0)


SPMM_DIV = ["inT_ptr", "v_ptr", "bias_ptr", "out_ptr", "M"]
SDDMM_DIV = ["dyT_ptr", "xT_ptr", "out_ptr", "M"]
for arch in (90, 80):
    for dt in ("bf16", "fp32") + (("fp16",) if arch == 90 else ()):
        p = "*" + dt
        for perm in (False, True):
            for aligned in (True, False):
                cfg = spmm.SPMM_CONFIGS[3]
                out[f"spmm-{arch}-{dt}-{'grad_input' if perm else 'forward'}-{aligned}"] = compile_(
                    spmm._spmm_kernel.fn, spmm_sig(p), dict(HAS_PERM=perm, HAS_BIAS=not perm, INTERPRETED=False,
                    LOG_K=spmm.LOG_KC, **cfg.kwargs), arch, cfg.num_warps, cfg.num_stages, SPMM_DIV if aligned else (),
                    ttgir=True)
        for aligned in (True, False):
            cfg = spmm.SDDMM_CONFIGS[1]
            out[f"sddmm-{arch}-{dt}-{aligned}"] = compile_(
                spmm._sddmm_kernel.fn, sddmm_sig(p), dict(INTERPRETED=False, LOG_T=spmm.LOG_TOK, **cfg.kwargs), arch,
                cfg.num_warps, cfg.num_stages, SDDMM_DIV if aligned else (), ttgir=True)
# every autotune config of the b = 1 kernels (sm_90, bf16)
for i, cfg in enumerate(spmm.SPMM_CONFIGS):
    out[f"spmmcfg-{i}"] = compile_(spmm._spmm_kernel.fn, spmm_sig("*bf16"), dict(HAS_PERM=True, HAS_BIAS=False,
                                   INTERPRETED=False, LOG_K=spmm.LOG_KC, **cfg.kwargs), 90, cfg.num_warps,
                                   cfg.num_stages, SPMM_DIV)
for i, cfg in enumerate(spmm.SDDMM_CONFIGS):
    out[f"sddmmcfg-{i}"] = compile_(spmm._sddmm_kernel.fn, sddmm_sig("*bf16"), dict(INTERPRETED=False,
                                    LOG_T=spmm.LOG_TOK, **cfg.kwargs), 90, cfg.num_warps, cfg.num_stages, SDDMM_DIV)
out["n_spmm_configs"] = [len(spmm.SPMM_CONFIGS), len(spmm.SDDMM_CONFIGS)]
# fp32 in each precision the fp32 setting can choose (set_kernels.backends._precision).
for prec in ("tf32", "tf32x3"):
    sig = dict(x_ptr="*fp32", v_ptr="*fp32", row_ptr="*i32", col_idx="*i32", bias_ptr="*fp32", y_ptr="*fp32",
               M="i32", rows="i32", cols="i32", n_out_blocks="i32", M_BUCKET="i32", B=0, HAS_BIAS=0, INTERPRETED=0,
               PRECISION=0, BLOCK_M=0, GROUP_M=0)
    out[f"fp32prec-80-{prec}"] = compile_(forward._forward_kernel.fn, sig, dict(
        B=32, HAS_BIAS=True, INTERPRETED=False, PRECISION=prec, BLOCK_M=64, GROUP_M=8), 80, 4, 3,
        ["x_ptr", "v_ptr", "y_ptr", "bias_ptr", "M", "rows", "cols"])
json.dump(out, open(sys.argv[1], "w"))
'''


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    spec = importlib.util.find_spec("triton")
    ptxas = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("triton's bundled ptxas is missing (needed to compile for a GPU target)")
    tmp = tmp_path_factory.mktemp("triton_aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp / "out.json"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90_and_sm80(compiled):
    for arch in (90, 80):
        for op in ("forward", "grad_input", "grad_weight", "sum", "adam", "spmm", "sddmm"):
            assert any(k.startswith(f"{op}-{arch}-") for k in compiled), (op, arch)
    n_spmm, n_sddmm = compiled["n_spmm_configs"]
    assert all(f"spmmcfg-{i}" in compiled for i in range(n_spmm))
    assert all(f"sddmmcfg-{i}" in compiled for i in range(n_sddmm))


def test_bf16_matmuls_use_tensor_cores(compiled):
    for op in ("forward", "grad_input"):
        assert "wgmma.mma_async" in compiled[f"{op}-90-bf16-3"]["ptx"], op
        assert "mma.sync" in compiled[f"{op}-80-bf16-3"]["ptx"], op
    assert "wgmma.mma_async" in compiled["grad_weight-90-bf16-False"]["ptx"]


def test_exact_fp32_does_not_use_tf32(compiled):
    ptx = compiled["forward-80-fp32-3"]["ptx"]
    assert "mma.sync" not in ptx and "fma.rn.f32" in ptx


def test_fp32_tf32_modes_use_tensor_cores(compiled):
    """"tf32" is one TF32 mma a K step, "tf32x3" (3xTF32) three: both on the tensor cores."""
    one, three = (compiled[f"fp32prec-80-{p}"]["ptx"] for p in ("tf32", "tf32x3"))
    assert ".tf32" in one and ".tf32" in three
    assert three.count("mma.sync") > one.count("mma.sync") > 0


def test_forward_and_dx_loops_are_multi_buffered(compiled):
    """More pipeline stages => more shared memory: the K loop is software-pipelined (the block
    indices are loaded one iteration ahead; loading them in the same iteration stopped this)."""
    for op in ("forward", "grad_input"):
        for arch in (90, 80):
            two, three = compiled[f"{op}-{arch}-bf16-2"]["smem"], compiled[f"{op}-{arch}-bf16-3"]["smem"]
            tile_set = (64 * 64 + 64 * 64) * 2  # x/dy tile and block, bf16, BLOCK_M = b = 64
            assert three >= two + tile_set, (op, arch, two, three)


def test_masked_adam_full_chunks_vectorise(compiled):
    for key in ("adam-90-fp32-fp32", "adam-90-bf16-fp32"):
        assert "ld.global.v4" in compiled[key]["ptx"] and "st.global.v4" in compiled[key]["ptx"], key


# an atomic PTX opcode, optionally predicated ("@%p1 atom.global..."; not the "red." of "st.shared.")
ATOMIC = re.compile(r"^\s*(@!?%\w+\s+)?(atom|red)\.", re.M)


def _b1_keys(compiled):
    return [k for k in compiled if k.split("-")[0] in ("spmm", "sddmm", "spmmcfg", "sddmmcfg")]


def test_b1_gathers_are_vector_loads_over_transposed_activations(compiled):
    """At b = 1 the gathered operand is transposed to (features, M), so the BLOCK_M tokens of one
    connection are contiguous: with M a multiple of 16 each thread loads 16 bytes at once."""
    for arch in (90, 80):
        for dt in ("bf16", "fp32"):
            for key in (f"spmm-{arch}-{dt}-forward-True", f"spmm-{arch}-{dt}-grad_input-True", f"sddmm-{arch}-{dt}-True"):
                assert "ld.global.v4" in compiled[key]["ptx"], key


def test_b1_kernels_use_no_atomics_and_no_tensor_cores(compiled):
    """One writer per output element (deterministic); fp32 FMAs, no MMA instructions."""
    keys = _b1_keys(compiled)
    assert len(keys) >= 20
    for key in keys:
        ptx = compiled[key]["ptx"]
        assert not ATOMIC.search(ptx), key
        assert "mma" not in ptx and "fma.rn.f32" in ptx, key


def _loop_bodies(ttgir):
    """The text of each scf.for loop of a TTGIR module."""
    bodies, lines = [], ttgir.splitlines()
    for i, line in enumerate(lines):
        if "scf.for" in line:
            depth, body = 0, []
            for inner in lines[i:]:
                body.append(inner)
                depth += inner.count("{") - inner.count("}")
                if depth <= 0:
                    break
            bodies.append("\n".join(body))
    return bodies


def test_b1_loops_keep_one_layout(compiled):
    """Inside the entry loop (SpMM) and the token loop (SDDMM) the gathered tile and the index /
    value tiles share one layout: no convert_layout (a shared-memory round trip) per iteration."""
    keys = [k for k in compiled if k.split("-")[0] in ("spmm", "sddmm")]
    assert len(keys) == (3 + 2) * (4 + 2)  # dtypes (3 on sm_90, 2 on sm_80) x (4 spmm + 2 sddmm variants)
    for key in keys:
        bodies = _loop_bodies(compiled[key]["ttgir"])
        assert len(bodies) == 1, key
        assert "convert_layout" not in bodies[0] and "local_alloc" not in bodies[0], key
