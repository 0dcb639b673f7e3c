"""``SET``: sparse evolutionary training (prune the weakest units, regrow as many elsewhere).

Units: a block of a :class:`~set_kernels.nn.SparseLinear`, an element of a
:class:`~set_kernels.nn.MaskedLinear`. Every update runs on the layer's device with torch ops, with
no Python loop over units (one Python iteration per layer) and, for ``SparseLinear``, no read back
to the host: the number of units to move, ``k = round(zeta_t * live)``, is a host integer known in
advance (``live`` is the layer's constant live count).

Rules (``SET.step`` docstring has the order of operations):

* ``prune="magnitude"``: the ``k`` live units of smallest ``|w|`` (element) or smallest Frobenius
  norm (block) are dropped.
* ``prune="set"``: SET's sign split. The signed score of a unit is ``w`` (element) or the sum of the
  block's entries (block). ``k // 2`` of the largest negative scores (closest to 0 from below) and
  ``k - k // 2`` of the smallest non-negative scores are dropped. When one sign has too few live
  units, all of them go and the shortfall is taken from the other sign, so exactly ``k`` units
  are always dropped. A score of exactly 0 counts as the smallest positive.
* ``regrow="random"``: ``k`` positions drawn uniformly among those empty before the update. For
  element layers (``SparseLinear`` with ``block_size=1``) and grids of more than
  :data:`~set_kernels.layout.DENSE_DRAW_LIMIT` blocks they are drawn in O(nnz) memory by
  :func:`~set_kernels.layout.sample_positions` (draw, deduplicate, drop live positions with
  ``searchsorted``, repeat); smaller block grids draw one uniform number per block, with no host sync.
* ``regrow="gradient"`` (RigL): the ``k`` empty positions with the largest dense-gradient magnitude
  (element) or the largest Frobenius norm of the dense gradient over the block (block). The dense
  gradient is not the parameter's ``.grad`` (``MaskedLinear`` multiplies it by the mask, and
  ``SparseLinear`` has no dense weight): forward hooks, armed only during the step just before an
  update, register a hook on each layer's output. For a ``MaskedLinear`` they accumulate
  ``grad_output^T @ input`` (float32, ``(out, in)``), which is exactly ``dL/dW`` of the dense
  weight. For a ``SparseLinear`` they keep the layer's inputs and output gradients (float32,
  ``(tokens, in)`` and ``(tokens, out)``), and the update forms ``dL/dW`` in chunks of rows, at
  most :data:`GRAD_CHUNK_ELEMS` entries at a time, keeping only the running top ``k`` empty
  positions: memory ``O(tokens * (in + out) + GRAD_CHUNK_ELEMS + k)``, never ``(out, in)`` at once
  (the time is that of the dense product, ``O(tokens * out * in)``). Nothing is computed or kept
  on the other steps. Gradient accumulation over several backward passes is summed.
* A unit pruned in an update is never regrown in the same update (pruned positions were live, and
  only positions empty before the update are candidates), so with ``k > 0`` the topology changes.
  ``k`` is clamped to the number of empty positions (a nearly dense layer moves fewer units).

After an update: regrown units hold exactly 0, and so does every optimizer state tensor of the
parameter's shape at those units (Adam moments, SGD momentum). ``SparseLinear.values`` keeps its
shape and storage: it and its state tensors are permuted in place into the new CSR order, so the
optimizer's references stay valid.

Optimizers: with any optimizer other than :class:`~set_kernels.optim.MaskedAdam` (which masks by
itself), a step post-hook re-zeroes the masked entries of every ``MaskedLinear`` weight and of its
state tensors of the weight's shape after each ``optimizer.step()``.

DDP: every rank must pick the same units. Random draws use a generator seeded from
``(seed, step, layer index)``: every rank draws the same numbers with no communication, and the
stream needs no saved state, so resuming is exact. Every score that ranks units (weights and dense
gradients) is all-reduced (sum) over the default process group when one is initialised with more
than one rank. Summing the gradients is needed anyway: each rank only sees its own batch. Summing
the weights too costs one collective per layer per update, and makes the choice identical even if
the replicas' weights had drifted by rounding (all-reduce returns bit-identical results on every
rank). A rank-0 broadcast of the chosen positions would also work but needs the gradient all-reduce
as well, and a second round trip.
"""
from __future__ import annotations

import math
import warnings
import weakref

import torch

from .._checks import check_choice, check_fraction, check_int
from ..layout import DENSE_DRAW_LIMIT, BlockSparseLayout, _cpu_index_kernels, sample_positions
from ..nn.masked_linear import MaskedLinear
from ..nn.sparse_linear import SparseLinear

REGROW = ("random", "gradient")
PRUNE = ("magnitude", "set")
SCHEDULES = ("constant", "cosine")
_STATE_VERSION = 1
_MASK64 = (1 << 64) - 1
# Integer dtypes that carry a float tensor's raw bits, by element size (for permutations).
_RAW_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Entries of the dense gradient formed at once by a SparseLinear gradient-regrow update (64 MiB fp32).
GRAD_CHUNK_ELEMS = 1 << 24


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over the sequence)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _agree(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (no-op without a multi-rank process group)."""
    if _distributed():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def _rank(key: torch.Tensor) -> torch.Tensor:
    """int64 rank of each entry of a 1-D ``key`` in ascending order (ties broken by position)."""
    order = torch.argsort(key, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(key.numel(), device=key.device))
    return rank


def _set_prune(signed: torch.Tensor, live: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(k,)`` chosen by SET's sign split over the ``live`` entries of 1-D ``signed``."""
    inf = signed.new_full((), math.inf)  # no host-to-device copy on the update path
    pos = live & (signed >= 0)
    neg = live & (signed < 0)
    k_neg = k // 2
    k_pos = k - k_neg
    n_pos = pos.sum()
    n_neg = neg.sum()
    # Device-side counts: a shortfall on one side moves to the other (no host sync).
    take_pos = torch.clamp(k_pos + torch.clamp(k_neg - n_neg, min=0), max=n_pos)
    take_neg = k - take_pos
    chosen = (pos & (_rank(torch.where(pos, signed, inf)) < take_pos)) | \
             (neg & (_rank(torch.where(neg, -signed, inf)) < take_neg))
    return torch.topk(chosen.to(torch.float32), k, sorted=False).indices


def _pool_blocks(dense: torch.Tensor, grid: tuple[int, int], b: int) -> torch.Tensor:
    """``(R * C,)`` squared Frobenius norms of the ``b x b`` blocks of ``dense (rows, cols)``."""
    n_rows, n_cols = grid
    padded = torch.nn.functional.pad(dense, (0, n_cols * b - dense.shape[1], 0, n_rows * b - dense.shape[0]))
    return padded.reshape(n_rows, b, n_cols, b).square().sum(dim=(1, 3)).reshape(-1)


class SET:
    """Sparse evolutionary training over every sparse layer of ``model``.

    Args:
        model: a ``torch.nn.Module`` (a DDP wrapper is fine) holding at least one
            :class:`~set_kernels.nn.SparseLinear` or :class:`~set_kernels.nn.MaskedLinear`.
        optimizer: the ``torch.optim.Optimizer`` training the model; its state tensors shaped like
            a sparse parameter follow each topology update.
        zeta: fraction in [0, 1] of each layer's live units moved per update.
        interval: an update every ``interval`` calls of :meth:`step` (int >= 1).
        regrow: ``"random"`` (SET) or ``"gradient"`` (RigL).
        prune: ``"magnitude"`` or ``"set"`` (sign split); see the module docstring.
        schedule: ``"constant"`` or ``"cosine"``; cosine needs ``end_step`` and decays zeta to 0 there.
        end_step: last step (int >= 1) at which an update may happen; None means never stop.
        seed: int keying the random stream together with the step and the layer index.

    Call :meth:`step` once after every ``optimizer.step()``.
    """

    def __init__(self, model, optimizer, *, zeta=0.3, interval=100, regrow="random", prune="magnitude",
                 schedule="constant", end_step=None, seed=0):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._configure(zeta=zeta, interval=interval, regrow=regrow, prune=prune, schedule=schedule,
                        end_step=end_step, seed=seed)
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (SparseLinear, MaskedLinear))]
        if not self.layers:
            raise ValueError("model: expected at least one sparse layer (SparseLinear or MaskedLinear), found none; "
                             "use set_kernels.sparsify(model, ...) first")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        units = [(name, m.values if isinstance(m, SparseLinear) else m.weight) for name, m in self.layers]
        missing = [name for name, p in units if id(p) not in held]
        if len(missing) == len(units):
            raise ValueError("optimizer: it holds none of the sparse layers' parameters "
                             f"({', '.join(name or '<model>' for name, _ in units)}), so SET could not keep its state "
                             "in step with the topology; pass the optimizer that trains this model")
        if missing:
            warnings.warn(f"SET: the optimizer does not hold the parameters of the sparse layer(s) {missing}; their "
                          "topology evolves, but no optimizer state follows it", stacklevel=2)
        self.model = model
        self.optimizer = optimizer
        self._step = 0
        self._live = self._count_live()
        self._grads: dict[int, torch.Tensor] = {}
        self._dead: dict[int, tuple] = {}
        self._armed = False
        self._handles = []
        ref = weakref.ref(self)
        if self.regrow == "gradient":
            for i, (_, layer) in enumerate(self.layers):
                self._handles.append(layer.register_forward_hook(_make_capture_hook(ref, i)))
        from ..optim.masked_adam import MaskedAdam

        if not isinstance(optimizer, MaskedAdam) and any(isinstance(m, MaskedLinear) for _, m in self.layers):
            self._handles.append(optimizer.register_step_post_hook(_make_rezero_hook(ref)))
        self._arm()

    # ------------------------------------------------------------------ configuration
    def _configure(self, *, zeta, interval, regrow, prune, schedule, end_step, seed) -> None:
        zeta = check_fraction("zeta", zeta)
        interval = check_int("interval", interval, minimum=1)
        check_choice("regrow", regrow, REGROW)
        check_choice("prune", prune, PRUNE)
        check_choice("schedule", schedule, SCHEDULES)
        if end_step is not None:
            end_step = check_int("end_step", end_step, minimum=1)
        if schedule == "cosine" and end_step is None:
            raise ValueError("end_step: schedule='cosine' needs an end_step (an int >= 1), got None")
        seed = check_int("seed", seed)
        self.zeta, self.interval, self.regrow, self.prune = zeta, interval, regrow, prune
        self.schedule, self.end_step, self.seed = schedule, end_step, seed

    def _count_live(self) -> dict[int, int]:
        # One host read per MaskedLinear, at construction and on load only: the count is invariant.
        return {i: int(m.mask.sum()) for i, (_, m) in enumerate(self.layers) if isinstance(m, MaskedLinear)}

    @property
    def step_count(self) -> int:
        """Number of :meth:`step` calls so far (optimizer steps)."""
        return self._step

    def zeta_at(self, step: int) -> float:
        """The fraction of live units an update at ``step`` moves (0 after ``end_step``).

        constant: ``zeta``; cosine: ``zeta / 2 * (1 + cos(pi * step / end_step))``.
        """
        step = check_int("step", step, minimum=0)
        if self.end_step is not None and step > self.end_step:
            return 0.0
        if self.schedule == "cosine":
            return self.zeta / 2.0 * (1.0 + math.cos(math.pi * step / self.end_step))
        return self.zeta

    def is_update_step(self, step: int) -> bool:
        """Whether the ``step``-th call of :meth:`step` updates the topology."""
        return step > 0 and step % self.interval == 0 and self.zeta_at(step) > 0.0

    def _arm(self) -> None:
        # The dense-gradient hooks run only during the optimizer step that precedes an update.
        self._armed = self.regrow == "gradient" and self.is_update_step(self._step + 1)
        self._grads = {}

    # ------------------------------------------------------------------ stepping
    def step(self) -> bool:
        """Advance one optimizer step; on update steps prune and regrow every layer.

        Per layer: k = round(zeta_t * live), clamped to the empty positions; prune k live units;
        regrow k units at positions empty before the update; regrown weights and their optimizer
        state are 0. Returns True when the topology changed.
        """
        self._step += 1
        changed = False
        if self.is_update_step(self._step):
            zeta = self.zeta_at(self._step)
            if self.regrow == "gradient":
                missing = [name for i, (name, _) in enumerate(self.layers) if i not in self._grads]
                if missing:
                    raise RuntimeError(
                        f"SET(regrow='gradient'): no dense gradient was captured for layer(s) {missing} before "
                        f"update step {self._step}; run a forward and backward pass through the model between "
                        "two SET.step() calls")
            for i, (_, layer) in enumerate(self.layers):
                gen = self._generator(i, layer)
                if isinstance(layer, SparseLinear):
                    changed |= self._update_blocks(i, layer, zeta, gen)
                else:
                    changed |= self._update_elements(i, layer, zeta, gen)
        self._arm()
        return changed

    def _generator(self, i: int, layer) -> torch.Generator | None:
        if self.regrow != "random":
            return None
        device = layer.values.device if isinstance(layer, SparseLinear) else layer.weight.device
        gen = torch.Generator(device=device)
        gen.manual_seed(_mix(self.seed, self._step, i))
        return gen

    def _state_tensors(self, param: torch.Tensor) -> list[torch.Tensor]:
        state = self.optimizer.state.get(param, {})
        return [t for t in state.values() if isinstance(t, torch.Tensor) and t.shape == param.shape]

    @torch.no_grad()
    def _update_blocks(self, i: int, layer: SparseLinear, zeta: float, gen) -> bool:
        layout = layer.layout
        values = layer.values
        nnz = layout.nnz_blocks
        n_rows, n_cols = layout.grid
        n_blocks = n_rows * n_cols
        k = min(round(zeta * nnz), n_blocks - nnz)
        if k <= 0:
            return False
        device = values.device
        kernels = _cpu_index_kernels(values.detach(), layout.index)
        if kernels is not None:
            flat = torch.empty(nnz, dtype=torch.int64)
            kernels.flat_positions(layout.block_row.numpy(), layout.col_idx.numpy(), n_cols, flat.numpy())
        else:
            flat = layout.block_row.long() * n_cols + layout.col_idx.long()
        v = values.detach().float()
        # 1. prune
        if self.prune == "magnitude":
            score = _agree(v.square().sum(dim=(1, 2)))
            prune_idx = None
            if kernels is not None and score.dtype == torch.float32 and score.is_contiguous():
                # CPU: a radix select where the k smallest are one set (no tie across the k-th
                # score; else topk, which breaks such ties its own way): topk's set, in O(nnz)
                chosen = torch.empty(k, dtype=torch.int64)
                if kernels.smallest_k(score.view(torch.int32).numpy(), k, chosen.numpy()):
                    prune_idx = chosen
            if prune_idx is None:
                prune_idx = torch.topk(score, k, largest=False, sorted=False).indices
        else:
            signed = _agree(v.sum(dim=(1, 2)))
            prune_idx = _set_prune(signed, torch.ones(nnz, dtype=torch.bool, device=device), k)
        # 2. regrow among positions empty before this update
        if self.regrow == "gradient":
            grow_flat = self._grow_by_gradient(self._grads[i], layout, flat, k)
        elif layout.block_size == 1 or n_blocks > DENSE_DRAW_LIMIT:
            grow_flat = sample_positions(n_blocks, k, generator=gen, device=device, exclude=flat)
        else:
            grow = torch.rand(n_blocks, generator=gen, device=device)
            grow[flat] = -math.inf
            grow_flat = torch.topk(grow, k, sorted=False).indices
        # 3. new CSR order: replace the pruned slots, sort, and permute values + state in place.
        if kernels is not None:  # CPU: a merge of the sorted kept and regrown positions, no full sort
            sorted_flat = torch.empty(nnz, dtype=torch.int64)
            order = torch.empty(nnz, dtype=torch.int64)
            fresh = torch.empty(nnz, dtype=torch.bool)
            kernels.merge_update(flat.numpy(), prune_idx.to(torch.int64).numpy(), grow_flat.to(torch.int64).numpy(),
                                 sorted_flat.numpy(), order.numpy(), fresh.numpy())
            fresh = fresh.view(nnz, 1, 1)
        else:
            new_flat = flat.clone()
            new_flat[prune_idx] = grow_flat
            sorted_flat, order = torch.sort(new_flat)
            fresh = torch.zeros(nnz, dtype=torch.bool, device=device)
            fresh[prune_idx] = True
            fresh = fresh[order].view(nnz, 1, 1)
        new_layout = BlockSparseLayout._from_flat(sorted_flat, layout.shape, layout.block_size)

        def permuted(t):  # t in the new order, regrown entries 0
            if kernels is None or t.device.type != "cpu" or not t.is_contiguous():
                return t.index_select(0, order).masked_fill_(fresh, 0)
            out = torch.empty_like(t)
            bits = _RAW_BITS[t.element_size()]  # the permutation moves bits: any dtype
            kernels.gather_or_zero(t.view(bits).view(nnz, -1).numpy(), order.numpy(), fresh.view(-1).numpy(),
                                   out.view(bits).view(nnz, -1).numpy())
            return out

        layer.set_layout(new_layout, permuted(values.detach()))
        for t in self._state_tensors(values):
            t.copy_(permuted(t))
        if values.grad is not None and values.grad.shape == values.shape:
            values.grad.copy_(permuted(values.grad))
        return True

    @staticmethod
    def _grow_by_gradient(captured, layout: BlockSparseLayout, flat: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` empty positions (flat ``r * C + c``) of largest dense-gradient block norm.

        ``captured``: ``[(dy (M, rows), x (M, cols)), ...]`` float32. The dense gradient is formed
        a chunk of block rows at a time (at most :data:`GRAD_CHUNK_ELEMS` entries), and a running
        top-``k`` is merged across chunks. ``flat``: the live positions, sorted.
        """
        dy = torch.cat([g for g, _ in captured])
        x = torch.cat([a for _, a in captured])
        rows, cols = layout.shape
        n_rows, n_cols = layout.grid
        b = layout.block_size
        step = max(1, GRAD_CHUNK_ELEMS // (b * b * n_cols))  # block rows per chunk
        best_val = dy.new_empty(0)
        best_idx = flat.new_empty(0)
        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            dense = dy[:, r0 * b:min(rows, r1 * b)].T @ x
            score = _agree(_pool_blocks(dense, (r1 - r0, n_cols), b))
            base = r0 * n_cols
            if r0 == 0 and r1 == n_rows:
                live = flat  # one chunk: no bounds to find (and no host sync)
            else:
                lo, hi = torch.searchsorted(flat, flat.new_tensor([base, r1 * n_cols])).tolist()
                live = flat[lo:hi] - base
            score[live] = -math.inf
            top = torch.topk(score, min(k, score.numel()), sorted=False)
            best_val = torch.cat([best_val, top.values])
            best_idx = torch.cat([best_idx, top.indices + base])
            if best_val.numel() > k:
                keep = torch.topk(best_val, k, sorted=False).indices
                best_val, best_idx = best_val[keep], best_idx[keep]
        return best_idx

    @torch.no_grad()
    def _update_elements(self, i: int, layer: MaskedLinear, zeta: float, gen) -> bool:
        weight = layer.weight
        live = layer.mask.view(-1)
        n = live.numel()
        n_live = self._live[i]
        k = min(round(zeta * n_live), n - n_live)
        if k <= 0:
            return False
        w = weight.detach().view(-1)
        # 1. prune
        if self.prune == "magnitude":
            score = _agree(torch.where(live, w.abs().float(), math.inf))
            prune_idx = torch.topk(score, k, largest=False, sorted=False).indices
        else:
            signed = _agree(torch.where(live, w.float(), 0.0))
            prune_idx = _set_prune(signed, live, k)
        # 2. regrow among positions empty before this update
        if self.regrow == "random":
            grow = torch.rand(n, generator=gen, device=live.device)
        else:
            grow = _agree(self._grads[i].reshape(-1).abs())
        grow.masked_fill_(live, -math.inf)
        grow_idx = torch.topk(grow, k, sorted=False).indices
        # 3. move the mask; pruned and regrown entries (weight, state, grad) are 0
        live[prune_idx] = False
        live[grow_idx] = True
        moved = torch.cat([prune_idx, grow_idx])
        w.index_fill_(0, moved, 0)
        for t in self._state_tensors(weight):
            t.view(-1).index_fill_(0, moved, 0)
        if weight.grad is not None and weight.grad.shape == weight.shape:
            weight.grad.view(-1).index_fill_(0, moved, 0)
        return True

    # ------------------------------------------------------------------ hooks
    def _capture(self, i: int, layer, inputs, output) -> None:
        if not self._armed or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        x = inputs[0].detach()

        def on_grad(g: torch.Tensor) -> None:
            g2 = g.detach().reshape(-1, g.shape[-1]).float()
            x2 = x.reshape(-1, x.shape[-1]).float()
            if isinstance(layer, SparseLinear):
                # Kept as factors: the update forms the dense gradient in row chunks.
                self._grads.setdefault(i, []).append((g2, x2))
                return
            dw = g2.T @ x2
            if i in self._grads:
                self._grads[i] += dw
            else:
                self._grads[i] = dw

        output.register_hook(on_grad)

    @torch.no_grad()
    def _rezero(self) -> None:
        for i, (_, layer) in enumerate(self.layers):
            if isinstance(layer, MaskedLinear):
                # ~mask is cached until the mask buffer is replaced or modified in place.
                key = (id(layer.mask), layer.mask._version)
                cached = self._dead.get(i)
                if cached is None or cached[0] != key:
                    cached = self._dead[i] = (key, layer.mask.logical_not())
                dead = cached[1]
                layer.weight.masked_fill_(dead, 0)
                for t in self._state_tensors(layer.weight):
                    t.masked_fill_(dead, 0)

    def remove_hooks(self) -> None:
        """Detach the forward hooks and the optimizer post-hook (this object stops working)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain Python dict: the step count and the configuration (the random stream is keyed by them)."""
        return {"version": _STATE_VERSION, "step": self._step, "zeta": self.zeta, "interval": self.interval,
                "regrow": self.regrow, "prune": self.prune, "schedule": self.schedule,
                "end_step": self.end_step, "seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s step and configuration; load the model's state first."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
        keys = ("step", "zeta", "interval", "regrow", "prune", "schedule", "end_step", "seed")
        missing = [key for key in keys if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict: missing keys {missing}")
        self._configure(**{key: state_dict[key] for key in keys if key != "step"})
        self._step = check_int("state_dict['step']", state_dict["step"], minimum=0)
        self._live = self._count_live()
        self._arm()

    def __repr__(self) -> str:
        return (f"SET(zeta={self.zeta}, interval={self.interval}, regrow={self.regrow!r}, prune={self.prune!r}, "
                f"schedule={self.schedule!r}, end_step={self.end_step}, seed={self.seed}, step={self._step}, "
                f"layers={len(self.layers)})")


def _make_capture_hook(ref, i):
    # Plain closures over a weak reference: deepcopy/pickle of the model does not drag SET along.
    def hook(module, inputs, output):
        evo = ref()
        if evo is not None:
            evo._capture(i, module, inputs, output)
    return hook


def _make_rezero_hook(ref):
    def hook(optimizer, args, kwargs):
        evo = ref()
        if evo is not None:
            evo._rezero()
    return hook
