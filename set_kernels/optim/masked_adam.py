"""``MaskedAdam``: Adam/AdamW through the fused ``masked_adam_`` op, keeping masked weights at 0."""
from __future__ import annotations

import torch

from .. import backends
from .._checks import check_choice, check_tensor
from ..nn import masked_linear as _masked_linear
from ..ops import _adam, _library

# Keyword arguments of torch.optim.Adam that select an implementation. MaskedAdam always runs one
# fused multi-tensor update, so these two are accepted, kept in the param groups and ignored.
_IGNORED = ("foreach", "fused")
# Options of torch.optim.Adam that the fused kernel does not implement: only their default is accepted.
_UNSUPPORTED = {
    "amsgrad": "amsgrad=True is not supported (the fused kernel keeps no max_exp_avg_sq); use amsgrad=False",
    "capturable": ("capturable=True is not supported: MaskedAdam.step() passes the step count to the kernel as a "
                   "host integer, so a CUDA-graph capture of it would replay the captured step count; capture "
                   "set_kernels.ops.masked_adam_ yourself, with the step count you want, instead"),
    "differentiable": ("differentiable=True is not supported: the fused update runs in place outside autograd, "
                       "so no gradient flows through it; use torch.optim.Adam(differentiable=True)"),
}
_ONE = torch.tensor(1.0)  # the step increment, as a CPU tensor: torch._foreach_add_'s fast path


def _scalar(name: str, value):
    """A hyper-parameter as a Python float: floats and ints as they are, 1-element tensors read
    with ``float()`` (a device sync for an accelerator tensor: keep them on the CPU)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a float or a 1-element tensor, got a tensor of shape "
                             f"{tuple(value.shape)}")
        return float(value)
    return value


def _group_hyper(group: dict) -> tuple:
    """(lr, beta1, beta2, eps, weight_decay) of a param group as floats, checked (a few comparisons)."""
    for key, why in _UNSUPPORTED.items():
        if group.get(key):
            raise ValueError(why)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    hyper = (_scalar("lr", group["lr"]), _scalar("betas[0]", betas[0]), _scalar("betas[1]", betas[1]),
             _scalar("eps", group["eps"]), _scalar("weight_decay", group["weight_decay"]))
    _adam._check_hyper(1, *hyper)
    return tuple(float(h) for h in hyper)


class _Prepared:
    """The checked argument lists of one param group's fused call, valid while ``key`` matches."""

    __slots__ = ("group", "key", "device")

    def __init__(self, group, key, device):
        self.group, self.key, self.device = group, key, device


class MaskedAdam(torch.optim.Optimizer):
    """Adam (or AdamW with ``decoupled_weight_decay=True``) with per-parameter boolean masks.

    Masks of :class:`set_kernels.nn.MaskedLinear` weights are found automatically (and followed
    when the layer's mask changes); ``masks={param: bool tensor of param's shape}`` adds others
    (an explicit mask wins over a layer's). Where a mask is False, the parameter and both moments
    are set to exactly 0 at every step. Unmasked parameters are updated like
    ``torch.optim.Adam`` / ``AdamW``.

    Args (as ``torch.optim.Adam``, plus the last three):
        params: parameters (any shape; contiguous; fp32/fp64, fp16/bf16 where the backend has
            them) or param-group dicts.
        lr: float or 1-element tensor (read with ``float()`` at each step; schedulers may set it).
        betas: ``(beta1, beta2)``, floats or 1-element tensors; eps, weight_decay: floats.
        amsgrad: must be False (ValueError otherwise).
        foreach, fused: accepted and ignored: the update is always one fused multi-tensor call.
        maximize: ascend instead of descend (the gradients are negated before the update, so weight
            decay still pulls towards 0, as in ``torch.optim.Adam(maximize=True)``).
        capturable, differentiable: must be False (ValueError otherwise; see ``_UNSUPPORTED``).
        decoupled_weight_decay: AdamW's decay ``p *= 1 - lr * weight_decay`` instead of L2.
        masks: ``{param: bool tensor of param's shape}``; saved in ``state_dict()``.
        backend: a backend name to force for the update, or None/"auto".

    State per parameter: ``step`` (float32 CPU scalar tensor, as in torch), ``exp_avg`` and
    ``exp_avg_sq`` (float32 for fp16/bf16 parameters, else the parameter's dtype, shaped like it).

    A MaskedLinear weight's owner module is resolved once, when its param group is added; every
    step checks that the module's weight is still that parameter and raises RuntimeError if it was
    replaced or parametrized since. The argument lists of the fused call are checked once per
    param-group structure (which parameters have gradients, their state, masks, data pointers),
    not at every step.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, masks=None, backend=None):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        if backend is not None:
            check_choice("backend", backend, backends.BACKENDS + ("auto",))
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=bool(maximize), foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=bool(decoupled_weight_decay))
        # Same checks (and messages) as the op's, and the unsupported options.
        _group_hyper(defaults)
        self.backend = backend
        self._masks: dict = {}  # param -> explicit mask
        self._owners: dict = {}  # param -> the MaskedLinear whose weight it was when its group was added
        self._prepared: dict = {}
        self._constructing = True
        super().__init__(params, defaults)
        self._constructing = False
        all_params = {id(p): p for group in self.param_groups for p in group["params"]}
        for p, mask in (masks or {}).items():
            if id(p) not in all_params:
                raise ValueError("masks: a key is not one of the optimizer's parameters")
            self._masks[p] = self._checked_mask("masks", p, mask)
        self._resolve_owners([p for p in all_params.values() if p not in self._masks])

    # ------------------------------------------------------------------ param groups and masks
    @staticmethod
    def _checked_mask(name, p, mask):
        check_tensor(name, mask)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != p.shape:
            raise ValueError(f"{name}: expected a bool tensor of shape {tuple(p.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        return mask

    def _resolve_owners(self, params) -> None:
        self._owners.update(_masked_linear.mask_owners(params))
        self._prepared.clear()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _group_hyper(self.param_groups[-1])
        if not self.__dict__.get("_constructing", False):  # __init__ resolves all groups at once
            self._resolve_owners(self.param_groups[-1]["params"])

    def mask_for(self, p: torch.Tensor):
        """The mask applied to ``p``: one given in ``masks=``, its MaskedLinear's current mask, or None."""
        mask = self._masks.get(p)
        if mask is not None:
            return mask
        owner = self._owners.get(p)
        if owner is None:
            return None
        self._check_owner(p, owner)
        return owner.mask

    @staticmethod
    def _check_owner(p, owner) -> None:
        if _masked_linear.current_weight(owner) is p:
            return
        if any(t is p for t in _masked_linear.parametrized_originals(owner)):
            what = "was parametrized (torch.nn.utils.parametrize)"
        else:
            what = "was replaced by another tensor (a new Parameter assigned to it, or a conversion that overwrote it)"
        raise RuntimeError(
            f"MaskedLinear weight {what} after the MaskedAdam optimizer was built, so the optimizer no longer "
            "updates the tensor that the layer uses and cannot apply the layer's mask to it; rebuild the "
            "optimizer over the layer's current parameters (or pass masks={param: mask} for a parametrized "
            "weight's original)")

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            moment_dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
        return state

    # ----------------------------------------------------------------------- state_dict, pickle
    def state_dict(self):
        """torch's state dict, plus ``"masks": {param index: bool tensor}`` for the masks given
        with ``masks=`` (only when there are any; MaskedLinear masks live in the module's state)."""
        self._settle_skipped_steps()
        state = super().state_dict()
        if self._masks:
            index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            state["masks"] = {index[id(p)]: mask for p, mask in self._masks.items()}
        return state

    def load_state_dict(self, state_dict) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        saved_masks = state_dict.get("masks")
        masks = {}
        if saved_masks is not None:
            for idx, mask in saved_masks.items():
                if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(params):
                    raise ValueError(f"state_dict['masks']: {idx!r} is not a parameter index of this optimizer "
                                     f"(0 to {len(params) - 1})")
                p = params[idx]
                masks[p] = self._checked_mask(f"state_dict['masks'][{idx}]", p, mask).to(p.device, copy=True)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "masks"})
        # torch casts floating state to the parameter's dtype on load; fp16/bf16 parameters keep
        # fp32 moments here, so restore the saved dtype (a lossless copy of the saved tensor).
        for idx, saved in state_dict["state"].items():
            p = params[idx]
            state = self.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved and state[key].dtype != saved[key].dtype:
                    state[key] = saved[key].to(device=p.device, copy=True)
            # The step count is a float32 CPU scalar here (torch moves it to the parameter's
            # device when the saved group says fused or capturable).
            step = state.get("step")
            if step is not None and not (isinstance(step, torch.Tensor) and step.device.type == "cpu"
                                         and step.dtype == torch.float32 and step.dim() == 0):
                state["step"] = torch.tensor(float(step), dtype=torch.float32)
        if saved_masks is not None:
            self._masks = masks
        self._prepared.clear()

    def __getstate__(self):
        state = super().__getstate__()
        state.update(backend=self.backend, _masks=self._masks, _owners=self._owners)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # optimizers pickled before these keys existed
            for key, value in dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                                   differentiable=False, fused=None, decoupled_weight_decay=False).items():
                group.setdefault(key, value)
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("_masks", {})
        self.__dict__.setdefault("_owners", {})
        self._prepared = {}
        self._constructing = False

    # ------------------------------------------------------------------------------- stepping
    # torch.amp.GradScaler: call step() directly, with the scale and the inf flag as tensors.
    _step_supports_amp_scaling = True

    def _prepare(self, group, params, grads, exp_avgs, exp_avg_sqs, masks, key) -> _Prepared:
        """Check the lists of one group's fused call (the public op's checks) and that a backend
        can run them; done again only when ``key`` changes."""
        _adam._check_adam_lists(params, grads, exp_avgs, exp_avg_sqs, masks)
        devices = {p.device for p in params}
        for device in devices:
            for dtype in {p.dtype for p in params if p.device == device}:
                _library.resolve(self.backend, "masked_adam_", device, dtype)
        prep = _Prepared(group, key, next(iter(devices)) if len(devices) == 1 else None)
        self._prepared[id(group)] = prep
        return prep

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        """One update of every parameter that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
            grad_scale: optional 1-element float tensor on the parameters' device; gradients are
                divided by it inside the fused update (AMP). Defaults to the ``grad_scale``
                attribute that ``torch.amp.GradScaler.step`` sets.
            found_inf: optional 1-element float tensor; when non-zero the step is skipped:
                parameters, moments and step counts do not change. Defaults to the
                ``found_inf`` attribute set by ``GradScaler``.

        On CPU, ``found_inf`` is read directly. On an accelerator it is never read back while
        stepping: the fused kernel skips the update on the device, and the step counts of a
        skipped step are taken back at the next ``step()`` or ``state_dict()`` (from a
        non-blocking copy), so ``state["step"]`` can run one ahead until then.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        self._settle_skipped_steps()
        for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if t is not None:
                check_tensor(name, t, floating=True)
                if t.numel() != 1:
                    raise ValueError(f"{name}: expected a 1-element tensor, got shape {tuple(t.shape)}")
        if found_inf is not None and found_inf.device.type == "cpu":
            if bool(found_inf.item()):  # a CPU read: no device sync
                return loss
            found_inf = None
        for p, owner in self._owners.items():  # one identity test per MaskedLinear weight
            if p not in self._masks:
                self._check_owner(p, owner)
        stepped = []
        for group in self.param_groups:
            lr, beta1, beta2, eps, weight_decay = _group_hyper(group)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("MaskedAdam does not support sparse gradients")
            states = [self.state[p] for p in params]
            if not all(states):
                states = [self._init_state(p) for p in params]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            steps = [s["step"] for s in states]
            masks = [self._masks.get(p) for p in params] if self._masks else [None] * len(params)
            if self._owners:
                for i, p in enumerate(params):
                    owner = self._owners.get(p)
                    if owner is not None and masks[i] is None:
                        masks[i] = owner.mask
            # What the checks depend on: the tensors (held by the lists, so ids are not reused)
            # and the parameters' storage (a .data swap, e.g. Module.to(), changes it).
            key = (tuple(map(id, params)), tuple(p.data_ptr() for p in params), tuple(map(id, exp_avgs)),
                   tuple(map(id, exp_avg_sqs)), tuple(map(id, masks)))
            prep = self._prepared.get(id(group))
            if prep is None or prep.group is not group or prep.key != key:
                prep = self._prepare(group, params, grads, exp_avgs, exp_avg_sqs, masks, key)
            # Cheap per step: gradients are new tensors (autograd and the .grad setter keep their
            # shape, dtype and device equal to the parameter's); masks may be views.
            grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
            masks = [m if m is None or m.is_contiguous() else m.contiguous() for m in masks]
            if group["maximize"]:
                grads = torch._foreach_neg(grads)
            torch._foreach_add_(steps, _ONE)  # CPU scalars: no device sync
            counts = [int(s.item()) for s in steps]
            stepped.extend(params)
            lists = (params, grads, exp_avgs, exp_avg_sqs, masks)
            if prep.device is not None and counts.count(counts[0]) == len(counts):
                calls = [(prep.device, counts[0], lists)]
            else:  # one fused call per (device, step count)
                buckets: dict = {}
                for i, p in enumerate(params):
                    buckets.setdefault((p.device, counts[i]), []).append(i)
                calls = [(dev, step, tuple([seq[i] for i in idx] for seq in lists))
                         for (dev, step), idx in buckets.items()]
            decoupled = bool(group["decoupled_weight_decay"])
            for device, step, (ps, gs, ms, vs, ks) in calls:
                args = (ps, gs, ms, vs, ks, _on(grad_scale, device), _on(found_inf, device), step, lr, beta1, beta2,
                        eps, weight_decay, decoupled)
                if self.backend is not None and self.backend != "auto":
                    with backends.use(self.backend):  # the op's kernel picks the backend when it runs
                        _library.masked_adam_(*args)
                else:
                    _library.masked_adam_(*args)
        if found_inf is not None and stepped:
            # Device-side skip: copy the flag back without waiting; settled at the next step().
            # The copy is queued on the current stream of found_inf's own device, so the event
            # that says it is done must be recorded there (not on the current device's stream,
            # which is another GPU's when found_inf lives on, say, cuda:1 while cuda:0 is current).
            flag = found_inf.detach().reshape(()).to("cpu", torch.float32, non_blocking=True)
            event = None
            if found_inf.is_cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(found_inf.device))
            self._pending_skips.append((flag, event, stepped))
        return loss

    @property
    def _pending_skips(self) -> list:
        pending = self.__dict__.get("_pending_skip_list")
        if pending is None:
            pending = self.__dict__["_pending_skip_list"] = []
        return pending

    def _settle_skipped_steps(self) -> None:
        """Take back the step counts of earlier steps that the device skipped (found_inf != 0)."""
        pending = self._pending_skips
        while pending:
            flag, event, stepped = pending.pop(0)
            if event is not None:
                event.synchronize()  # long done by now: recorded one whole step ago
            if bool(flag):
                for p in stepped:
                    self.state[p]["step"] -= 1


def _on(t, device):
    return t if t is None or t.device == device else t.to(device, non_blocking=True)
