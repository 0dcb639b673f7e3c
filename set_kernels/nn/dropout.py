"""``Dropout``: ``nn.Dropout`` with the mask drawn by a parallel counter-based hash on the CPU.

torch's CPU ``bernoulli_`` draws from one Mersenne Twister, serially: on a 40 x 1000 activation it
takes about 0.3 ms, which was a third of a truly sparse SET-MLP step. This module keeps
``nn.Dropout``'s semantics (zero with probability ``p``, scale the rest by ``1 / (1 - p)``,
identity in eval mode) and draws the mask with :mod:`set_kernels.backends.numba.dropout`, seeded by
one draw from torch's default generator, so ``torch.manual_seed`` still fixes every mask. Only the
seed is kept for the backward pass, which recomputes the mask (no mask tensor is stored). Other
devices, dtypes, traced code, or a machine without numba fall back to ``F.dropout``.

``ReLUDropout`` is ``ReLU`` then ``Dropout`` in one kernel: the same masks and the same values,
bit for bit, as the two modules in a row (for finite inputs; a NaN input may come out as 0).
Its backward pass needs no hash: it keeps the output ``y`` (which the next layer keeps as its
input anyway) and passes ``grad * scale`` where ``y > 0``, which is exactly where the element was
kept and its input was positive. One autograd node and one kernel per pass instead of two.

``FusedSequential`` is ``nn.Sequential`` that runs each run of consecutive element-level
``SparseLinear`` + ``ReLUDropout`` pairs as one op in training, when the numba backend serves them
(CPU, fp32/fp64, plain eager tensors, no hooks on the modules): the element forward applies the
ReLU and the mask as it writes its output (the same draws from torch's generator, in the same
order, the same masks and values, bit for bit), and its backward takes the epilogue's gradient in
the transpose of ``dy`` it makes anyway, summing the bias gradient there too. That removes one
kernel and one pass over the activation per layer and pass (a width-1,000 SET-MLP step had
~350 us of its ~2.4 ms in the three ReLU + dropout modules), and the whole run is one autograd
node (the per-node work and the op's checks cost about 60 us per layer and pass). A plain
``nn.Linear`` of at most 16 outputs right after such a run (the SET-MLP's readout) joins it: its
kernels read the last layer's token-major output and write the gradient of that layer's epilogue
token-major, with its own weight gradient, in one pass (at width 4,000 the readout's three GEMMs
and the transpose of its input gradient were ~400 us of a ~4 ms step). Its sums run in their own
order, so the outputs and gradients are then close to the modules', not the same bits. Anything
else runs module by module, as ``nn.Sequential`` does.

None of these is part of the public API: ``set-kernels train`` uses them for every model it
builds (dense ones too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from torch.nn.modules import module as _module

from .. import backends
from .._checks import check_fraction
from ..ops import _library
from .sparse_linear import SparseLinear


def _draw_key(p: float) -> tuple:
    """``(k0, k1, threshold, scale)`` of one dropout call: one 62-bit draw from torch's default
    generator (so ``torch.manual_seed`` fixes every mask)."""
    return _key(int(torch.randint(0, 2**62, ())), p)


def _draw_keys(ps) -> list:
    """:func:`_draw_key` for each ``p`` of ``ps`` in turn, from one call of the generator (its
    draws of a vector are its scalar draws one after the other; the fused run's tests check the
    masks against the modules')."""
    if len(ps) == 1:
        return [_draw_key(ps[0])]
    return [_key(seed, p) for seed, p in zip(torch.randint(0, 2**62, (len(ps),)).tolist(), ps)]


def _key(seed: int, p: float) -> tuple:
    return seed & 0xFFFFFFFF, seed >> 32, int(p * 2**32), 1.0 / (1.0 - p)


class _NumbaDropout(torch.autograd.Function):
    # Plain dropout saves only the seed: the backward pass recomputes the mask (the hash is cheaper
    # than storing and reading a mask), ``grad * mult`` by the same kernel. With ``relu`` the
    # output is saved instead and the backward pass is ``grad * scale`` where it is positive.
    @staticmethod
    def forward(ctx, x, p, relu):
        kernel = backends.get("numba")._load()[4]
        out = torch.empty(x.shape, dtype=x.dtype)  # returned as is: a view would cost autograd's view tracking
        key = _draw_key(p)
        kernel.dropout(x.detach().contiguous().view(-1).numpy(), *key, out.view(-1).numpy(), relu)
        ctx.key, ctx.relu = key, relu
        if relu:
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        kernel = backends.get("numba")._load()[4]
        scale = ctx.key[3]
        if ctx.relu:
            (y,) = ctx.saved_tensors
            if grad.requires_grad:  # create_graph: differentiable in grad
                return grad * ((y > 0).to(grad.dtype) * scale), None, None
            out = torch.empty(grad.shape, dtype=grad.dtype)
            kernel.relu_dropout_grad(grad.contiguous().view(-1).numpy(), y.detach().view(-1).numpy(), scale,
                                     out.view(-1).numpy())
            return out, None, None
        if grad.requires_grad:  # create_graph: a differentiable grad * mult
            mult = torch.empty(grad.numel(), dtype=grad.dtype)
            kernel.dropout(torch.ones_like(mult).numpy(), *ctx.key, mult.numpy(), False)
            return grad * mult.view(grad.shape), None, None
        out = torch.empty(grad.shape, dtype=grad.dtype)
        kernel.dropout(grad.contiguous().view(-1).numpy(), *ctx.key, out.view(-1).numpy(), False)
        return out, None, None


def _numba_ok(x: torch.Tensor, p: float) -> bool:
    return (p < 1.0 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and type(x) is torch.Tensor
            and backends.availability("numba")[0])


class Dropout(torch.nn.Module):
    """``nn.Dropout(p)``; input and output of any shape."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = check_fraction("p", p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if _numba_ok(x, self.p):
            return _NumbaDropout.apply(x, self.p, False)
        return F.dropout(x, self.p, True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ReLUDropout(Dropout):
    """``nn.ReLU()`` then :class:`Dropout` ``(p)`` in one kernel; input and output of any shape.

    The masks and values are those of the two modules in a row (the same draw from torch's
    generator per call), bit for bit; so are the gradients.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return F.relu(x)
        if _numba_ok(x, self.p):
            return _NumbaDropout.apply(x, self.p, True)
        return F.dropout(F.relu(x), self.p, True)


class _SparseReLUDropoutChain(torch.autograd.Function):
    """``k >= 1`` consecutive layers ``h = ReLUDropout(p_i)(SparseLinear(block_size=1)_i(h))``
    through the numba element kernels, optionally followed by a small dense readout
    ``nn.Linear``, as one autograd node.

    ``forward(x, layers, readout, *params)``: ``x (M, cols_0)``; ``layers`` a tuple of ``(index,
    rows, cols, key)`` per layer (``key`` from :func:`_draw_key`, drawn in layer order, as the
    modules draw them); ``readout`` whether ``params`` ends with a readout's ``(weight (n_out,
    rows_k), bias (n_out,) or None)``; ``params`` ``(values_0, bias_0, values_1, bias_1, ...)``
    with ``values_i (nnz_i, 1, 1)`` and ``bias_i (rows_i,)`` or None. Returns the last layer's
    output ``(M, rows_k)``, or the readout's ``(M, n_out)``.
    One node for the run instead of one per layer: a width-1,000 SET-MLP step spent about
    60 us per layer and pass in autograd's per-node work and the op's own checks.

    For the usual case (1 to 255 tokens, every layer with live entries) the activations between
    the layers stay token-major (:func:`set_kernels.backends.numba.relu_dropout_chain_forward`):
    each layer's input is transposed once, for the forward, the backward and the next layer,
    and each layer's ``dx`` is written token-major for the epilogue gradient and the kernels of
    the layer below, so that a run of ``k`` layers makes two transposes per step instead of
    ``4k``; a readout then reads the last layer's token-major output and writes its input
    gradient token-major too (:func:`set_kernels.backends.numba.spmm.readout_forward_t`, which
    sums in its own order, not ``F.linear``'s: the outputs and every gradient are then close to
    the modules', not the same bits). Otherwise the layers run one after the other through
    :func:`set_kernels.backends.numba.linear_forward` and
    :func:`set_kernels.backends.numba.linear_backward_relu_dropout`, and a readout through
    ``F.linear``; the outputs, ``dx`` and ``dW`` are then the same bits as the modules'. A double
    backward (``create_graph``) replays the forward as single-layer nodes (the same keys, so the
    same masks and values) and ``F.linear``, and differentiates that with the differentiable
    ops, so that every layer's input stays connected to the graph.
    """

    @staticmethod
    def forward(ctx, x, layers, readout, *params):
        numba_backend = backends.get("numba")
        k = len(layers)
        values = params[0:2 * k:2]
        head = tuple(params[2 * k:]) if readout else None
        if numba_backend.relu_dropout_chain_ok(x.shape[0], values):  # activations kept token-major
            parts = [_library.checked_numpy(index, rows, cols, 1) for index, rows, cols, _ in layers]
            y, ctx.inputs_t = numba_backend.relu_dropout_chain_forward(
                x, [(v, b, p[0], p[1], rows, cols, key) for (_, rows, cols, key), v, b, p in
                    zip(layers, values, params[1:2 * k:2], parts)], head)
            outs = (y,)
        else:  # no tokens, a layer without live entries, or many tokens: layer by layer
            parts = [_library.check_index(index, rows, cols, 1) for index, rows, cols, _ in layers]
            h, outs, ctx.inputs_t = x, [], None
            for (_, rows, cols, key), v, b, p in zip(layers, values, params[1:2 * k:2], parts):
                h = numba_backend.linear_forward(h, v, p[0], p[1], b, rows, cols, 1, relu_dropout=key)
                outs.append(h)
            if readout:
                outs.append(F.linear(h, *head))
        ctx.save_for_backward(x, *params, *(layer[0] for layer in layers), *outs)
        ctx.meta = tuple((rows, cols, key) for _, rows, cols, key in layers), k, readout
        return outs[-1]

    @staticmethod
    def backward(ctx, dy):
        meta, k, readout = ctx.meta
        saved = ctx.saved_tensors
        n_params = 2 * k + (2 if readout else 0)
        x, params = saved[0], saved[1:1 + n_params]
        indices, outs = saved[1 + n_params:1 + n_params + k], saved[1 + n_params + k:]
        needs = ctx.needs_input_grad
        need_p = needs[3:]  # per entry of params
        dy = dy.contiguous()
        if torch.is_grad_enabled():  # create_graph: differentiable in everything
            dx, *grads = _chain_double_backward(x, params, indices, outs[-1], meta, readout, dy, needs[0], need_p)
            return (dx, None, None, *grads)
        numba_backend = backends.get("numba")
        need_dv = [need_p[2 * i] for i in range(k)]
        need_db = [need_p[2 * i + 1] and params[2 * i + 1] is not None for i in range(k)]
        head = []  # the readout's (dweight, dbias)
        if readout:
            w, rb = params[2 * k:]
            need_rw, need_rb = need_p[2 * k], need_p[2 * k + 1] and rb is not None
            head = [None, dy.sum(0) if need_rb else None]
        if ctx.inputs_t is not None:
            parts = [_library.checked_numpy(index, rows, cols, 1) for index, (rows, cols, _) in zip(indices, meta)]
            dx, dvs, dbs, dw = numba_backend.relu_dropout_chain_backward(
                dy, outs[-1], ctx.inputs_t,
                [(params[2 * i], p[3], p[4], p[5], p[2], p[1], rows, cols, key[3])
                 for i, (p, (rows, cols, key)) in enumerate(zip(parts, meta))], needs[0], need_dv, need_db,
                (w, need_rw) if readout else None)
            if readout:
                head[0] = dw
            return (dx, None, None, *(g for pair in zip(dvs, dbs) for g in pair), *head)
        if readout:  # the readout's gradients as nn.Linear's backward takes them
            h = outs[-2]
            head[0] = h.t().mm(dy).t() if need_rw else None
            dy = dy.mm(w)
        parts = [_library.check_index(index, rows, cols, 1) for index, (rows, cols, _) in zip(indices, meta)]
        grads = [None] * (2 * k)
        for i in reversed(range(k)):
            (rows, cols, key), p = meta[i], parts[i]
            need_dx = i > 0 or needs[0]
            if not (need_dx or need_dv[i] or need_db[i]):
                break  # nothing needed from here down
            dy, grads[2 * i], db = numba_backend.linear_backward_relu_dropout(
                dy, outs[i], key[3], x if i == 0 else outs[i - 1], params[2 * i], p[3], p[4], p[5], p[2], p[1],
                rows, cols, need_dx, need_dv[i])
            grads[2 * i + 1] = db if need_db[i] else None
        return (dy if needs[0] else None, None, None, *grads, *head)


def _chain_double_backward(x, params, indices, y, meta, readout, dy, need_x, need_p) -> tuple:
    """The gradients of :class:`_SparseReLUDropoutChain` as differentiable functions of ``dy``,
    ``x`` and the parameters: ``(dx, dparams...)`` (None where not needed); ``y`` the node's
    output."""
    k = len(meta)
    if k == 1 and not readout:  # the epilogue's gradient, then the differentiable ops
        (rows, cols, key), (values, bias) = meta[0], params
        g = dy * ((y > 0).to(dy.dtype) * key[3])
        with backends.use("numba"):
            dx = _library.linear_grad_input(g, values, indices[0], rows, cols, 1) if need_x else None
            dv = _library.linear_grad_weight(g, x, indices[0], rows, cols, 1) if need_p[0] else None
        return dx, dv, (g.sum(0) if need_p[1] and bias is not None else None)
    with torch.enable_grad():  # one node per layer: each layer's input is then in the graph
        h = x
        for i in range(k):
            rows, cols, key = meta[i]
            h = _SparseReLUDropoutChain.apply(h, ((indices[i], rows, cols, key),), False, params[2 * i],
                                              params[2 * i + 1])
        if readout:
            h = F.linear(h, *params[2 * k:])
    wanted = [need and t is not None for t, need in zip((x,) + tuple(params), (need_x,) + tuple(need_p))]
    inputs = [t for t, w in zip((x,) + tuple(params), wanted) if w]
    got = iter(torch.autograd.grad(h, inputs, dy, create_graph=True, allow_unused=True))
    return tuple(next(got) if w else None for w in wanted)


_FUSABLE_DTYPES = (torch.float32, torch.float64)
_CPU = torch.device("cpu")
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _fusable_input(x) -> bool:
    """Whether ``x`` may enter a fused run: a plain eager 2-D fp32/fp64 CPU tensor, no autocast."""
    return (type(x) is torch.Tensor and x.dim() == 2 and x.dtype in _FUSABLE_DTYPES and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu") and _library.plain_eager(x))


def _fusable(linear, act, dtype, width: int, backends_seen: dict):
    """``linear``'s layout when ``act(linear(h))`` may run in :class:`_SparseReLUDropoutChain`
    for an input ``h`` that passed :func:`_fusable_input`, of ``dtype`` and ``width`` features;
    else None (module by module: the modules' own calls raise what there is to raise).
    ``backends_seen``: ``{linear.backend: fusable}`` of the layers already asked in this forward
    (the backend resolution is the same for all of them: one lookup per forward)."""
    if not (type(act) is ReLUDropout and act.training and 0.0 < act.p < 1.0 and isinstance(linear, SparseLinear)
            and linear.block_size == 1 and width == linear.in_features):
        return None
    params = linear._parameters  # (nn.Module.__getattr__ costs about a microsecond a name)
    values, bias = params.get("values"), params.get("bias")
    if values is None:
        return None
    if (values.dtype != dtype or values.device.type != "cpu"
            or (bias is not None and (bias.dtype != dtype or bias.shape != (linear.out_features,)))):
        return None
    if _hooked(linear, act):
        return None  # hooks see each module's call
    if type(values) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
        return None  # (no tracing or dispatch mode: checked once for the input, _fusable_input)
    backend = linear.backend
    if not (backend is None or type(backend) is str):
        return None  # (the module's own call says what is wrong with it)
    numba_runs = backends_seen.get(backend)
    if numba_runs is None:
        try:
            numba_runs = _library.resolve(backend, "linear_forward", _CPU, dtype, 1) == "numba"
        except (RuntimeError, ValueError):
            numba_runs = False
        backends_seen[backend] = numba_runs
    if not numba_runs:
        return None
    layout = linear.layout
    return layout if values.shape[0] == layout.nnz_blocks else None


def _hooked(*modules) -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def _fusable_readout(linear, dtype, width: int) -> bool:
    """Whether ``linear`` may end a :class:`_SparseReLUDropoutChain` whose last layer gives
    ``width`` features of ``dtype``: a plain ``nn.Linear`` with at most
    ``spmm.READOUT_MAX`` outputs, of that dtype on the CPU, contiguous, without hooks."""
    if type(linear) is not torch.nn.Linear or linear.in_features != width or linear.out_features > _READOUT_MAX:
        return False
    params = linear._parameters
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None or type(weight) not in _PLAIN or weight.dtype != dtype or weight.device.type != "cpu":
        return False
    if weight.shape != (linear.out_features, width) or not weight.is_contiguous():
        return False
    if bias is not None and (type(bias) not in _PLAIN or bias.dtype != dtype or bias.shape != (linear.out_features,)
                             or bias.device.type != "cpu"):
        return False
    return not _hooked(linear)


# spmm.READOUT_MAX, without loading the kernels (checked against it by the tests)
_READOUT_MAX = 16


class FusedSequential(torch.nn.Sequential):
    """``nn.Sequential`` that fuses ``SparseLinear(block_size=1)`` + ``ReLUDropout`` pairs, and a
    small ``nn.Linear`` readout right after them, in training (see the module docstring);
    otherwise the same modules, state and outputs."""

    def forward(self, x):
        mods = list(self._modules.values())
        i, n = 0, len(mods)
        while i < n:
            layers, params = [], []
            if self.training and i + 1 < n and _fusable_input(x):
                width, seen = x.shape[1], {}
                while i + 1 < n:  # the longest run of fusable pairs from here
                    m = mods[i]
                    layout = _fusable(m, mods[i + 1], x.dtype, width, seen)
                    if layout is None:
                        break
                    layers.append((layout.index, m.out_features, m.in_features, mods[i + 1].p))
                    params += [m.values, m.bias]
                    width = m.out_features
                    i += 2
            if layers:  # the masks' keys, drawn in layer order, as the modules draw them
                layers = [(*layer[:3], key) for layer, key in zip(layers, _draw_keys([layer[3] for layer in layers]))]
                readout = i < n and _fusable_readout(mods[i], x.dtype, width)
                if readout:
                    head = mods[i]._parameters
                    params += [head["weight"], head.get("bias")]
                    i += 1
                x = _SparseReLUDropoutChain.apply(x.contiguous(), tuple(layers), readout, *params)
            else:
                x = mods[i](x)
                i += 1
        return x
