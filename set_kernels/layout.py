"""Block-sparse layout: block CSR plus a transposed (CSC) index, built on the layout's device.

A layout describes which ``b x b`` blocks of a ``(rows, cols)`` matrix W are live. The grid has
``R = ceil(rows / b)`` block rows and ``C = ceil(cols / b)`` block columns; when ``rows`` or
``cols`` is not a multiple of ``b`` the last blocks are partial and their out-of-range part is
ignored by every op.

Index tensors (all int32, contiguous, on the layout's device):

* ``row_ptr``   ``(R + 1,)``  CSR offsets: block row ``r`` owns blocks ``row_ptr[r]:row_ptr[r+1]``.
* ``col_idx``   ``(nnz,)``    block column of each block, ascending within a block row.
* ``block_row`` ``(nnz,)``    block row of each block (CSR order).
* ``col_ptr``   ``(C + 1,)``  CSC offsets of the transposed index.
* ``row_idx``   ``(nnz,)``    block row of each block in CSC order (ascending within a column).
* ``perm``      ``(nnz,)``    ``perm[q]`` is the index into ``values`` of the q-th CSC block.

``values`` of shape ``(nnz, b, b)`` follow the CSR order: ``values[k, i, j] =
W[block_row[k] * b + i, col_idx[k] * b + j]``.

The six index tensors are stored packed in one tensor (:attr:`index`) so that ops take a single
argument; the named attributes are views into it.
"""
from __future__ import annotations

import torch

from ._checks import check_block_size, check_fraction, check_int, check_tensor


_INT32_LIMIT = 2**31 - 1
# Set to False to build every index with torch ops (the tests compare both paths).
USE_NUMBA_INDEX = True


def _cpu_index_kernels(*tensors):
    """The numba index builders when they can be used on ``tensors`` (plain CPU tensors, not
    traced; see ``backends/numba/index.py``), else None."""
    if not USE_NUMBA_INDEX or torch.compiler.is_compiling():
        return None
    if not all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors):
        return None
    from .backends import numba as numba_backend

    return numba_backend.index_kernels()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class BlockSparseLayout:
    """Which blocks of a ``(rows, cols)`` matrix are live; see the module docstring.

    Build one with :meth:`random`, :meth:`from_block_mask` or :meth:`from_csr`.
    """

    def __init__(self, row_ptr: torch.Tensor, col_idx: torch.Tensor, shape, block_size: int):
        # Private constructor: inputs are trusted (use from_csr for hand-made CSR).
        self.block_size = int(block_size)
        self.shape = (int(shape[0]), int(shape[1]))
        n_rows, n_cols = self.grid
        device = row_ptr.device
        row_ptr = row_ptr.to(device=device, dtype=torch.int64)
        col_idx = col_idx.to(device=device, dtype=torch.int64)
        nnz = col_idx.numel()
        if max(nnz, n_rows, n_cols) >= _INT32_LIMIT:
            # The packed index is int32 (offsets into values are formed in int64 by the kernels).
            raise ValueError(f"shape: a {n_rows} x {n_cols} block grid with {nnz} live blocks does not fit "
                             f"the int32 layout index (each must be < 2**31 - 1)")
        self._nnz = nnz
        kernels = _cpu_index_kernels(row_ptr, col_idx)
        if kernels is not None:  # the same index in one O(nnz + R + C) pass, no sort
            self.index = torch.empty(n_rows + n_cols + 2 + 4 * nnz, dtype=torch.int32)
            kernels.pack_index(row_ptr.contiguous().numpy(), col_idx.contiguous().numpy(), n_cols,
                               self.index.numpy(), torch.get_num_threads())
            return
        counts = row_ptr[1:] - row_ptr[:-1]
        block_row = torch.repeat_interleave(torch.arange(n_rows, device=device), counts, output_size=nnz)
        # CSC order: sort by (column, row); a stable sort on the column keeps rows ascending.
        sorted_cols, perm = torch.sort(col_idx, stable=True)
        # searchsorted (not bincount) so that no step reads a size back to the host: layouts are
        # rebuilt on the device at every SET topology update.
        col_ptr = torch.searchsorted(sorted_cols, torch.arange(n_cols + 1, device=device))
        parts = (row_ptr, col_idx, block_row, col_ptr, block_row[perm], perm)
        self.index = torch.cat(parts).to(torch.int32)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def random(cls, rows: int, cols: int, block_size: int, density: float, *, generator=None, device=None):
        """A layout with exactly ``round(density * n_blocks)`` live blocks chosen uniformly."""
        rows, cols = _check_shape((rows, cols))
        block_size = check_block_size(block_size)
        density = check_fraction("density", density)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        n_rows, n_cols = _ceil_div(rows, block_size), _ceil_div(cols, block_size)
        n_blocks = n_rows * n_cols
        nnz = round(density * n_blocks)
        gen_device = generator.device if generator is not None else device
        if gen_device.type == "meta":
            # Shapes only (a meta layout holds no indices); the count is exact all the same.
            chosen = torch.empty(nnz, dtype=torch.int64, device=device)
        elif block_size == 1 or n_blocks > DENSE_DRAW_LIMIT:
            # O(nnz): never a tensor of the grid's size (an element grid may have 10**11 cells).
            chosen = sample_positions(n_blocks, nnz, generator=generator, device=gen_device).to(device)
        else:
            chosen = torch.randperm(n_blocks, generator=generator, device=gen_device)[:nnz].to(device)
            chosen = torch.sort(chosen).values
        return cls._from_flat(chosen, (rows, cols), block_size)

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, block_size: int, *, shape=None):
        """A layout whose live blocks are the True entries of ``block_mask`` ``(R, C)``, bool.

        ``shape`` defaults to ``(R * block_size, C * block_size)``; a smaller shape makes the
        last block row / column partial, but it must still need exactly R x C blocks.
        """
        check_tensor("block_mask", block_mask)
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask: expected a bool tensor, got dtype {block_mask.dtype}")
        if block_mask.dim() != 2:
            raise ValueError(f"block_mask: expected a 2-D tensor, got shape {tuple(block_mask.shape)}")
        block_size = check_block_size(block_size)
        n_rows, n_cols = block_mask.shape
        if n_rows == 0 or n_cols == 0:
            raise ValueError(f"block_mask: expected a non-empty grid, got shape {tuple(block_mask.shape)}")
        if shape is None:
            shape = (n_rows * block_size, n_cols * block_size)
        rows, cols = _check_shape(shape)
        if (_ceil_div(rows, block_size), _ceil_div(cols, block_size)) != (n_rows, n_cols):
            raise ValueError(
                f"shape: {(rows, cols)} with block_size {block_size} needs a "
                f"{(_ceil_div(rows, block_size), _ceil_div(cols, block_size))} block grid, "
                f"but block_mask has shape {(n_rows, n_cols)}"
            )
        flat = torch.nonzero(block_mask.reshape(-1)).reshape(-1)  # row-major == CSR order
        return cls._from_flat(flat, (rows, cols), block_size)

    @classmethod
    def from_csr(cls, row_ptr: torch.Tensor, col_idx: torch.Tensor, block_size: int, shape):
        """A layout from a hand-made block CSR; every index is checked.

        ``row_ptr``: integer ``(R + 1,)``, starts at 0, non-decreasing, ends at ``nnz``.
        ``col_idx``: integer ``(nnz,)``, in ``[0, C)``, strictly ascending within each block row.
        """
        check_tensor("row_ptr", row_ptr)
        check_tensor("col_idx", col_idx)
        block_size = check_block_size(block_size)
        rows, cols = _check_shape(shape)
        for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name}: expected an int32 or int64 tensor, got dtype {t.dtype}")
            if t.dim() != 1:
                raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
        if row_ptr.device != col_idx.device:
            raise ValueError(f"col_idx: expected a tensor on {row_ptr.device} (the device of row_ptr), got {col_idx.device}")
        if row_ptr.device.type == "meta":
            raise ValueError("row_ptr: a meta tensor has no values to check; build the layout on a real device "
                             "and move it with layout.to('meta')")
        n_rows, n_cols = _ceil_div(rows, block_size), _ceil_div(cols, block_size)
        _check_csr(row_ptr.long(), col_idx.long(), n_rows, n_cols)
        return cls(row_ptr, col_idx, (rows, cols), block_size)

    @classmethod
    def _from_flat(cls, flat: torch.Tensor, shape, block_size: int):
        """From sorted, distinct flat block indices ``r * C + c`` in ``[0, R * C)`` (trusted: the
        packed index is recorded as checked, see ``ops._library.trust_index``)."""
        from .ops import _library

        n_rows, n_cols = _ceil_div(shape[0], block_size), _ceil_div(shape[1], block_size)
        flat = flat.to(torch.int64)
        kernels = _cpu_index_kernels(flat)
        if kernels is not None:  # one pass instead of a remainder and a searchsorted
            row_ptr = torch.empty(n_rows + 1, dtype=torch.int64)
            col_idx = torch.empty(flat.numel(), dtype=torch.int64)
            kernels.csr_from_flat(flat.contiguous().numpy(), n_cols, row_ptr.numpy(), col_idx.numpy())
        else:
            col_idx = torch.remainder(flat, n_cols)
            # Device-side (no host sync): row r starts at the first flat index >= r * C.
            row_ptr = torch.searchsorted(flat, torch.arange(n_rows + 1, device=flat.device) * n_cols)
        out = cls(row_ptr, col_idx, shape, block_size)
        _library.trust_index(out.index, out.shape[0], out.shape[1], block_size)
        return out

    # ----------------------------------------------------------------- properties
    @property
    def grid(self) -> tuple[int, int]:
        """``(R, C)``: the number of block rows and block columns."""
        return _ceil_div(self.shape[0], self.block_size), _ceil_div(self.shape[1], self.block_size)

    @property
    def n_blocks(self) -> int:
        n_rows, n_cols = self.grid
        return n_rows * n_cols

    @property
    def nnz_blocks(self) -> int:
        return self._nnz

    @property
    def density(self) -> float:
        return self._nnz / self.n_blocks

    @property
    def device(self) -> torch.device:
        return self.index.device

    def _part(self, i: int) -> torch.Tensor:
        n_rows, n_cols = self.grid
        sizes = (n_rows + 1, self._nnz, self._nnz, n_cols + 1, self._nnz, self._nnz)
        start = sum(sizes[:i])
        return self.index[start:start + sizes[i]]

    row_ptr = property(lambda self: self._part(0), doc="int32 (R + 1,) CSR offsets")
    col_idx = property(lambda self: self._part(1), doc="int32 (nnz,) block column, CSR order")
    block_row = property(lambda self: self._part(2), doc="int32 (nnz,) block row, CSR order")
    col_ptr = property(lambda self: self._part(3), doc="int32 (C + 1,) CSC offsets")
    row_idx = property(lambda self: self._part(4), doc="int32 (nnz,) block row, CSC order")
    perm = property(lambda self: self._part(5), doc="int32 (nnz,) CSC position -> values index")

    # ----------------------------------------------------------------- methods
    def block_mask(self) -> torch.Tensor:
        """Bool tensor ``(R, C)``, True at live blocks (dense: nothing in the package calls it on a hot path)."""
        n_rows, n_cols = self.grid
        mask = torch.zeros(n_rows * n_cols, dtype=torch.bool, device=self.device)
        mask[self.block_row.long() * n_cols + self.col_idx.long()] = True
        return mask.reshape(n_rows, n_cols)

    def entry_mask(self) -> torch.Tensor:
        """Bool tensor ``(nnz_blocks, b, b)``: True where a block entry lies inside the matrix.

        False only in the parts of edge blocks beyond ``rows`` / ``cols``; O(nnz * b * b), never a
        ``(rows, cols)`` tensor (all True at ``block_size=1``).
        """
        b = self.block_size
        offs = torch.arange(b, device=self.device)
        rows_ok = (self.block_row.long().view(-1, 1) * b + offs) < self.shape[0]
        cols_ok = (self.col_idx.long().view(-1, 1) * b + offs) < self.shape[1]
        return rows_ok.view(-1, b, 1) & cols_ok.view(-1, 1, b)

    def element_mask(self) -> torch.Tensor:
        """Bool tensor ``(rows, cols)``, True inside live blocks (dense: call it explicitly only)."""
        b = self.block_size
        mask = self.block_mask().repeat_interleave(b, 0).repeat_interleave(b, 1)
        return mask[: self.shape[0], : self.shape[1]].contiguous()

    def to(self, device) -> "BlockSparseLayout":
        """The same layout on ``device`` (self if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        out = object.__new__(BlockSparseLayout)
        out.__dict__.update(self.__dict__)
        out.index = self.index.to(device)
        return out

    def __eq__(self, other) -> bool:
        if not isinstance(other, BlockSparseLayout):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.block_size == other.block_size
            and self._nnz == other._nnz
            and self.device == other.device
            and (self.device.type == "meta" or torch.equal(self.index, other.index))
        )

    __hash__ = None

    def __repr__(self) -> str:
        return (
            f"BlockSparseLayout(shape={self.shape}, block_size={self.block_size}, "
            f"nnz_blocks={self._nnz}/{self.n_blocks}, density={self.density:.4f}, device={self.device})"
        )


# Grids up to this many blocks may be drawn with a dense permutation; element layouts never are.
DENSE_DRAW_LIMIT = 1 << 20


def sample_positions(n: int, k: int, *, generator=None, device=None, exclude=None) -> torch.Tensor:
    """``k`` distinct positions drawn uniformly from ``[0, n)`` minus ``exclude``; sorted int64 ``(k,)``.

    O(k + len(exclude)) memory and O((k + len(exclude)) log) time, whatever ``n`` is: positions
    are drawn with replacement in rounds, deduplicated, and those in ``exclude`` (a sorted int64
    tensor) dropped with ``searchsorted``, until at least ``k`` remain; then a uniformly random
    ``k``-subset of them is kept. Every ``k``-subset of the allowed positions is equally likely
    (the draws are exchangeable). Deterministic for a given ``generator`` state. Reads counts back
    to the host (one sync per round on a GPU). Raises ValueError when fewer than ``k`` positions
    are allowed.
    """
    device = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    n_excluded = 0 if exclude is None else exclude.numel()
    if k > n - n_excluded:
        raise ValueError(f"k: cannot draw {k} distinct positions from {n - n_excluded} allowed ones")
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    if exclude is not None:
        exclude = exclude.to(device=device, dtype=torch.int64)
    if n <= 4 * (k + n_excluded) + 1024:
        # A small or crowded range: a permutation of it is O(k + len(exclude)) too.
        perm = torch.randperm(n, generator=generator, device=device)
        if n_excluded:
            allowed = torch.ones(n, dtype=torch.bool, device=device)
            allowed[exclude] = False
            perm = perm[allowed[perm]]
        return torch.sort(perm[:k]).values
    free = n - n_excluded
    have = torch.zeros(0, dtype=torch.int64, device=device)
    # On the CPU, numba merges replace the sorts (the same draws, the same result).
    kernels = _cpu_index_kernels(have, *([] if exclude is None else [exclude]))
    if kernels is not None:
        ex = (have if exclude is None else exclude).contiguous().numpy()  # sorted (empty: nothing excluded)
    while have.numel() < k:
        need = k - have.numel()
        # Enough draws that one round almost always suffices, even when most positions are taken.
        p_new = max((free - have.numel()) / n, 1e-9)
        draws = int(min(need / p_new * 1.1 + 64, 4 * (k + n_excluded) + 1024))
        cand = torch.randint(0, n, (draws,), generator=generator, device=device, dtype=torch.int64)
        if kernels is not None:
            have = torch.from_numpy(kernels.merge_draws(have.numpy(), cand.numpy(), ex))
            continue
        cand = torch.unique(torch.cat([have, cand]))  # sorted, distinct
        if exclude is not None and exclude.numel():
            pos = torch.searchsorted(exclude, cand).clamp_(max=exclude.numel() - 1)
            cand = cand[exclude[pos] != cand]
        have = cand
    if have.numel() > k:
        keep = torch.randperm(have.numel(), generator=generator, device=device)[:k]
        if kernels is not None:
            return torch.from_numpy(kernels.select_sorted(have.numpy(), keep.numpy()))
        have = torch.sort(have[keep]).values
    return have


def _check_shape(shape) -> tuple[int, int]:
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"shape: expected (rows, cols), got {shape!r}")
    return check_int("rows", shape[0], minimum=1), check_int("cols", shape[1], minimum=1)


def _check_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, n_rows: int, n_cols: int) -> None:
    """Raise ValueError unless (row_ptr, col_idx) is a valid sorted block CSR on an R x C grid."""
    nnz = col_idx.numel()
    if row_ptr.numel() != n_rows + 1:
        raise ValueError(f"row_ptr: expected length {n_rows + 1} (block rows + 1), got {row_ptr.numel()}")
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz:
        raise ValueError(f"row_ptr: expected to start at 0 and end at nnz={nnz}, got {int(row_ptr[0])} and {int(row_ptr[-1])}")
    counts = row_ptr[1:] - row_ptr[:-1]
    if bool((counts < 0).any()):
        raise ValueError("row_ptr: expected non-decreasing offsets")
    if nnz == 0:
        return
    if bool(((col_idx < 0) | (col_idx >= n_cols)).any()):
        raise ValueError(f"col_idx: expected block columns in [0, {n_cols}), got values in "
                         f"[{int(col_idx.min())}, {int(col_idx.max())}]")
    block_row = torch.repeat_interleave(torch.arange(n_rows, device=row_ptr.device), counts)
    key = block_row * n_cols + col_idx
    if nnz > 1 and bool((key[1:] <= key[:-1]).any()):
        raise ValueError("col_idx: expected strictly ascending block columns within each block row "
                         "(unsorted or duplicate blocks)")
