"""Plain-torch reference backend: readable, runs on any device, and is the test oracle.

Shapes follow the ops layer: ``x (M, cols)``, ``dy (M, rows)``, ``values (nnz, b, b)``, index
tensors int32 as described in :mod:`set_kernels.layout`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NAME = "torch"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def availability() -> tuple[bool, str]:
    return True, ""


def _grid(rows: int, cols: int, b: int) -> tuple[int, int]:
    return -(-rows // b), -(-cols // b)


def to_dense(values, block_row, col_idx, rows: int, cols: int, block_size: int) -> torch.Tensor:
    """``(rows, cols)`` matrix with the blocks of ``values`` placed, zeros elsewhere."""
    b = block_size
    n_rows, n_cols = _grid(rows, cols, b)
    grid = values.new_zeros(n_rows, n_cols, b, b)
    grid[block_row.long(), col_idx.long()] = values
    return grid.permute(0, 2, 1, 3).reshape(n_rows * b, n_cols * b)[:rows, :cols].contiguous()


def from_dense(weight, block_row, col_idx, rows: int, cols: int, block_size: int) -> torch.Tensor:
    """``(nnz, b, b)`` blocks of ``weight (rows, cols)`` at the live positions, zero-padded at edges."""
    b = block_size
    n_rows, n_cols = _grid(rows, cols, b)
    padded = F.pad(weight, (0, n_cols * b - cols, 0, n_rows * b - rows))
    grid = padded.reshape(n_rows, b, n_cols, b).permute(0, 2, 1, 3)
    return grid[block_row.long(), col_idx.long()].contiguous()


def _blocks_of(t, block_ids, size: int, b: int) -> torch.Tensor:
    """``(M, nnz, b)``: for each block, the b-wide column slice of ``t (M, size)`` (zero-padded)."""
    n = -(-size // b)
    padded = F.pad(t, (0, n * b - size))
    return padded.reshape(t.shape[0], n, b)[:, block_ids.long()]


def linear_forward(x, values, row_ptr, col_idx, bias, rows, cols, block_size):
    """Forward ``y (M, rows) = x (M, cols) @ W.T + bias``."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    block_row = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)
    weight = to_dense(values, block_row, col_idx, rows, cols, block_size)
    return F.linear(x, weight, bias)


def linear_grad_input(dy, values, col_ptr, row_idx, perm, rows, cols, block_size):
    """Input gradient ``dx (M, cols) = dy (M, rows) @ W``, from the transposed index."""
    counts = (col_ptr[1:] - col_ptr[:-1]).long()
    col_of = torch.repeat_interleave(torch.arange(counts.numel(), device=dy.device), counts)
    # Blocks in CSC order, transposed: a (cols, rows) matrix equal to W.T.
    weight_t = to_dense(values[perm.long()].transpose(1, 2), col_of, row_idx, cols, rows, block_size)
    return F.linear(dy, weight_t)  # dy @ (W.T).T


def linear_grad_weight(dy, x, block_row, col_idx, rows, cols, block_size):
    """Weight gradient on live blocks only: ``dv[k] = dy[:, rows of k].T @ x[:, cols of k]``."""
    dy_blocks = _blocks_of(dy, block_row, rows, block_size)
    x_blocks = _blocks_of(x, col_idx, cols, block_size)
    return torch.einsum("mki,mkj->kij", dy_blocks, x_blocks).contiguous()


def masked_adam_(params, grads, exp_avgs, exp_avg_sqs, masks, *, step, lr, beta1, beta2, eps,
                 weight_decay, decoupled_weight_decay, grad_scale=None, found_inf=None):
    """Adam/AdamW on each tensor, in fp32 math; masked entries of p, m and v set to exactly 0."""
    if found_inf is not None and bool(found_inf.item()):
        return
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    step_size = lr / bias_correction1
    for p, g, m, v, mask in zip(params, grads, exp_avgs, exp_avg_sqs, masks):
        acc = torch.promote_types(p.dtype, torch.float32)  # fp32 math, fp64 for fp64 params
        p32, g32 = p.to(acc), g.to(acc)
        if grad_scale is not None:
            g32 = g32 / grad_scale.to(acc)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p32 = p32 * (1 - lr * weight_decay)
            else:
                g32 = g32 + weight_decay * p32
        m32 = m.to(acc).lerp(g32, 1 - beta1)
        v32 = v.to(acc) * beta2 + (1 - beta2) * g32 * g32
        denom = v32.sqrt() / bias_correction2_sqrt + eps
        p32 = p32 - step_size * m32 / denom
        if mask is not None:
            p32, m32, v32 = (t.masked_fill(~mask, 0) for t in (p32, m32, v32))
        p.copy_(p32)
        m.copy_(m32)
        v.copy_(v32)
