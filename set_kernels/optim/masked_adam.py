"""``MaskedAdam``: Adam/AdamW through the fused ``masked_adam_`` op, keeping masked weights at 0."""
from __future__ import annotations

import torch

from .. import backends, ops
from .._checks import check_choice, check_tensor
from ..nn.masked_linear import mask_of


def _on(t, device):
    return None if t is None else t.to(device, non_blocking=True)


class MaskedAdam(torch.optim.Optimizer):
    """Adam (or AdamW with ``decoupled_weight_decay=True``) with per-parameter boolean masks.

    Masks of :class:`set_kernels.nn.MaskedLinear` weights are found automatically (and followed
    when the layer's mask changes); ``masks={param: bool tensor of param's shape}`` adds others.
    Where a mask is False, the parameter and both moments are set to exactly 0 at every step.
    Unmasked parameters are updated like ``torch.optim.Adam`` / ``AdamW``.

    State per parameter: ``step`` (float32 scalar tensor, as in torch), ``exp_avg`` and
    ``exp_avg_sq`` (float32 for fp16/bf16 parameters, else the parameter's dtype).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 decoupled_weight_decay=False, masks=None, backend=None):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        # Reuse the op's checks for the hyper-parameters, so errors read the same everywhere.
        ops._adam._check_hyper(1, lr, betas[0], betas[1], eps, weight_decay)
        if backend is not None:
            check_choice("backend", backend, backends.BACKENDS + ("auto",))
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=bool(decoupled_weight_decay))
        super().__init__(params, defaults)
        self.backend = backend
        self._masks: dict[int, torch.Tensor] = {}
        all_params = {id(p): p for group in self.param_groups for p in group["params"]}
        for p, mask in (masks or {}).items():
            if id(p) not in all_params:
                raise ValueError("masks: a key is not one of the optimizer's parameters")
            check_tensor("masks[...]", mask)
            if mask.dtype != torch.bool or mask.shape != p.shape:
                raise ValueError(f"masks: expected a bool tensor of shape {tuple(p.shape)}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            self._masks[id(p)] = mask

    def mask_for(self, p: torch.Tensor):
        """The mask applied to ``p``: one given in ``masks=``, a MaskedLinear mask, or None."""
        return self._masks.get(id(p), mask_of(p))

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            moment_dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
        return state

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype on load; fp16/bf16 parameters keep
        # fp32 moments here, so restore the saved dtype (a lossless copy of the saved tensor).
        params = [p for group in self.param_groups for p in group["params"]]
        for idx, saved in state_dict["state"].items():
            p = params[idx]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved and self.state[p][key].dtype != saved[key].dtype:
                    self.state[p][key] = saved[key].to(device=p.device, copy=True)

    # torch.amp.GradScaler: call step() directly, with the scale and the inf flag as tensors.
    _step_supports_amp_scaling = True

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
        if found_inf is not None:
            check_tensor("found_inf", found_inf)
            if found_inf.device.type == "cpu":
                if bool(found_inf.item()):  # a CPU read: no device sync
                    return loss
                found_inf = None
        stepped = []
        for group in self.param_groups:
            # One fused call per (device, step count); normally every parameter shares both.
            buckets: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MaskedAdam does not support sparse gradients")
                state = self._init_state(p)
                state["step"] += 1  # a CPU tensor: reading it back is no device sync
                stepped.append(p)
                buckets.setdefault((p.device, int(state["step"].item())), []).append(p)
            beta1, beta2 = group["betas"]
            for (_, step), params in buckets.items():
                states = [self.state[p] for p in params]
                ops.masked_adam_(
                    params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [self.mask_for(p) for p in params],
                    step=step, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
                    grad_scale=_on(grad_scale, params[0].device), found_inf=_on(found_inf, params[0].device),
                    backend=self.backend,
                )
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

    def state_dict(self):
        self._settle_skipped_steps()
        return super().state_dict()
