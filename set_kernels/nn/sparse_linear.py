"""``SparseLinear``: a linear layer whose weight is block-sparse and stored as live blocks only."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backends, ops
from .._checks import check_block_size, check_choice, check_fraction, check_int
from ..layout import BlockSparseLayout


class SparseLinear(torch.nn.Module):
    """``y = x @ W.T + bias`` with W ``(out_features, in_features)`` block-sparse.

    Attributes:
        values: ``nn.Parameter (nnz_blocks, b, b)``, the live blocks in the layout's CSR order.
        bias: ``nn.Parameter (out_features,)`` or None.
        layout: :class:`BlockSparseLayout` of shape ``(out_features, in_features)``.
        backend: backend name passed to :func:`set_kernels.ops.block_sparse_linear` (None: a
            :func:`set_kernels.backends.use` block, else ``$SET_KERNELS_BACKEND``, else auto).

    Input ``(..., in_features)``, output ``(..., out_features)``. The layout's block CSR is kept
    in the buffers ``row_ptr`` and ``col_idx``, so ``state_dict`` round-trips it exactly.
    Parts of edge blocks beyond the feature sizes hold zeros and get zero gradients.
    ``layout`` may be given instead of ``density`` to fix the topology.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, density: float = 0.1,
                 block_size: int = 32, device=None, dtype=None, generator=None, backend=None, layout=None):
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.out_features = check_int("out_features", out_features, minimum=1)
        self.block_size = check_block_size(block_size)
        density = check_fraction("density", density)
        dtype = dtype or torch.get_default_dtype()
        if layout is None:
            layout = BlockSparseLayout.random(out_features, in_features, block_size, density,
                                              generator=generator, device=device)
        elif not isinstance(layout, BlockSparseLayout):
            raise TypeError(f"layout: expected a BlockSparseLayout or None, got {type(layout).__name__}")
        elif layout.shape != (out_features, in_features) or layout.block_size != block_size:
            raise ValueError(f"layout: expected shape {(out_features, in_features)} and block size {block_size}, "
                             f"got {layout.shape} and {layout.block_size}")
        else:
            layout = layout.to(device if device is not None else layout.device)
        b = block_size
        self.values = torch.nn.Parameter(torch.empty(layout.nnz_blocks, b, b, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        if backend is not None:
            check_choice("backend", backend, backends.BACKENDS + ("auto",))
        self.backend = backend
        self._set_layout_buffers(layout)
        self.reset_parameters(generator=generator)
        self.register_load_state_dict_post_hook(SparseLinear._drop_layout_cache)

    def _set_layout_buffers(self, layout: BlockSparseLayout) -> None:
        self.register_buffer("row_ptr", layout.row_ptr.clone())
        self.register_buffer("col_idx", layout.col_idx.clone())
        self._layout = layout
        self._layout_key = self._buffer_key()

    def _buffer_key(self):
        # Identity and in-place version of the layout buffers: a copy_ into them (DDP's buffer
        # broadcast, a checkpoint loader) changes the version, so the cached layout is rebuilt.
        return (self.row_ptr, self.col_idx, self.row_ptr._version, self.col_idx._version)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint of another topology size (density, block size) cannot be copied into this
        # layer's storage: say which layer and why, instead of a low-level size error.
        theirs = state_dict.get(prefix + "values")
        if isinstance(theirs, torch.Tensor) and tuple(theirs.shape) != tuple(self.values.shape):
            b = self.block_size
            shape = tuple(theirs.shape)
            error_msgs.append(
                f"{prefix.rstrip('.') or 'SparseLinear'}: the checkpoint's values have shape {shape} "
                f"({shape[0] if shape else '?'} live blocks), this layer's {tuple(self.values.shape)} "
                f"({self.values.shape[0]} live blocks of {b} x {b}); a SparseLinear loads only a topology with "
                "the same number of live blocks and the same block size (was it saved at another density or "
                "block size?). Build the layer with the checkpoint's layout: SparseLinear(..., layout="
                "BlockSparseLayout.from_csr(row_ptr, col_idx, block_size, shape)).")
            self._load_failed = True
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @staticmethod
    def _drop_layout_cache(module, incompatible_keys=None) -> None:
        # load_state_dict copies into the same buffers; the cached layout must be rebuilt. It is
        # rebuilt here, eagerly, so that a torch.compile'd forward only ever reads the cache.
        if module.__dict__.pop("_load_failed", False):
            return  # nothing was loaded: the buffers and the cached layout are unchanged
        module._layout = None
        module.layout

    def _apply(self, fn, *args, **kwargs):
        # module.to() / .cuda() / .half() replace the buffers: rebuild the cached layout now
        # (outside any compiled region) rather than lazily in forward.
        out = super()._apply(fn, *args, **kwargs)
        self.layout
        return out

    @property
    def layout(self) -> BlockSparseLayout:
        # Rebuilt when the buffers were replaced (module.to) or reloaded (load_state_dict).
        cached = self._layout
        if cached is not None:
            if torch.compiler.is_compiling():
                # Traced code reads the cache (an in-place version is data to the compiler); it is
                # refreshed eagerly by load_state_dict and .to(), and by the next eager forward.
                return cached
            # every forward comes here: the buffers read from the dict (nn.Module.__getattr__
            # costs about a microsecond each)
            key, buffers = self._layout_key, self._buffers
            row_ptr, col_idx = buffers.get("row_ptr"), buffers.get("col_idx")
            if (key[0] is row_ptr and key[1] is col_idx and key[2] == row_ptr._version
                    and key[3] == col_idx._version):
                return cached
        # the buffers were replaced or written since the layout was built (or none was built)
        shape = (self.out_features, self.in_features)
        if cached is not None and self._same_as_cached_layout():
            # DDP's buffer broadcast copies the same topology in every step: keep the layout
            # (an O(nnz) comparison instead of a check and a rebuild of its index)
            self._layout_key = self._buffer_key()
            return cached
        if self.row_ptr.device.type == "meta":  # no values: nothing to read or check
            self._layout = BlockSparseLayout(self.row_ptr, self.col_idx, shape, self.block_size)
        else:
            # The buffers may come from anywhere (a checkpoint, a broadcast, a user's copy_):
            # checked before the index builder reads them, which would otherwise write out of
            # bounds on a corrupt one.
            try:
                self._layout = BlockSparseLayout.from_csr(self.row_ptr, self.col_idx, self.block_size, shape)
            except ValueError as exc:
                raise ValueError(f"SparseLinear: the row_ptr / col_idx buffers are not a valid layout of a "
                                 f"{shape[0]} x {shape[1]} weight in {self.block_size} x {self.block_size} "
                                 f"blocks (a corrupt or foreign checkpoint?): {exc}") from None
        self._layout_key = self._buffer_key()
        return self._layout

    def _same_as_cached_layout(self) -> bool:
        """Whether the ``row_ptr`` / ``col_idx`` buffers hold exactly the cached layout's CSR."""
        cached = self._layout
        rp, ci = self.row_ptr, self.col_idx
        if rp.device != cached.device or rp.device.type == "meta" or ci.device != rp.device:
            return False
        if rp.shape != cached.row_ptr.shape or ci.shape != cached.col_idx.shape:
            return False
        return bool(torch.equal(rp.to(torch.int64), cached.row_ptr.to(torch.int64))
                    and torch.equal(ci.to(torch.int64), cached.col_idx.to(torch.int64)))

    def set_layout(self, layout: BlockSparseLayout, values: torch.Tensor) -> None:
        """Install a new layout with the same ``nnz_blocks`` and its ``values (nnz, b, b)`` in place."""
        if layout.shape != (self.out_features, self.in_features) or layout.block_size != self.block_size:
            raise ValueError(f"layout: expected shape {(self.out_features, self.in_features)} and block size "
                             f"{self.block_size}, got {layout.shape} and {layout.block_size}")
        if layout.nnz_blocks != self.values.shape[0]:
            raise ValueError(f"layout: expected {self.values.shape[0]} live blocks, got {layout.nnz_blocks}")
        with torch.no_grad():
            self.row_ptr.copy_(layout.row_ptr)
            self.col_idx.copy_(layout.col_idx)
            self.values.copy_(values)
        self._layout = layout.to(self.row_ptr.device)
        self._layout_key = self._buffer_key()

    @torch.no_grad()
    def reset_parameters(self, generator=None) -> None:
        """``nn.Linear``'s default init on live entries: U(-1/sqrt(in), 1/sqrt(in)); edges zero."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.values.uniform_(-bound, bound, generator=generator)
        if self.block_size > 1:
            self.values.masked_fill_(~self.layout.entry_mask(), 0)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.block_sparse_linear(x, self.values, self.layout, self.bias, backend=self.backend)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense ``(out_features, in_features)`` tensor (differentiable)."""
        return ops.to_dense(self.values, self.layout)

    @classmethod
    def from_dense(cls, linear: torch.nn.Linear, *, density: float, block_size: int = 32, backend=None):
        """A ``SparseLinear`` keeping the ``round(density * n_blocks)`` blocks of largest Frobenius norm."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        density = check_fraction("density", density)
        block_size = check_block_size(block_size)
        weight = linear.weight.detach()
        rows, cols = weight.shape
        b = block_size
        n_rows, n_cols = -(-rows // b), -(-cols // b)
        padded = F.pad(weight.float(), (0, n_cols * b - cols, 0, n_rows * b - rows))
        norms = padded.reshape(n_rows, b, n_cols, b).square().sum(dim=(1, 3)).reshape(-1)
        keep = torch.topk(norms, round(density * norms.numel()), sorted=False).indices
        block_mask = torch.zeros_like(norms, dtype=torch.bool)
        block_mask[keep] = True
        layout = BlockSparseLayout.from_block_mask(block_mask.reshape(n_rows, n_cols), b, shape=(rows, cols))
        out = cls(cols, rows, linear.bias is not None, block_size=b, device=weight.device, dtype=weight.dtype,
                  backend=backend, layout=layout)
        with torch.no_grad():
            out.values.copy_(ops.from_dense(weight, layout))
            if linear.bias is not None:
                out.bias.copy_(linear.bias.detach())
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, density={self.layout.density:.4f}, backend={self.backend}")
