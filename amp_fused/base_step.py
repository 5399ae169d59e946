"""The base optimizer's step fused into the restore: when the base optimizer is plain ``torch.optim.SGD``,
``restore_sgd_`` puts θ back and takes SGD's step in one pass, with SGD's own ``momentum_buffer`` state
(so state dicts stay interchangeable with plain SGD).

The momentum buffers follow their parameter's dtype and layout: one loaded from a contiguous checkpoint
into a channels_last model, or kept across ``model.double()``, is converted once (values kept) before the
fused step uses it, as plain SGD's arithmetic would use it.
"""
from __future__ import annotations

import torch

from . import functional, plan as plans

_SGD_OPTIONS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


def applies(base, plan) -> bool:
    """Whether the fused step can stand in for ``base.step()`` after perturbing ``plan``."""
    if type(base) is not torch.optim.SGD or base._optimizer_step_pre_hooks or base._optimizer_step_post_hooks:
        return False
    with_grad = sum(p.grad is not None for g in base.param_groups for p in g["params"])
    if len(plan) != with_grad:
        return False  # some tensor gained or lost its gradient since the ascent: take the general path
    for part in plan.parts:
        group = part.group
        if (isinstance(group["lr"], torch.Tensor) or group.get("differentiable") or group.get("fused")
                or any(p.grad is None or p.grad.layout != torch.strided for p in part.params)):
            return False
    return True


def _momentum_buffers(base, part):
    """SGD's buffers of ``part`` as the ops take them, and which are new (SGD initialises those to d_p)."""
    buffers, fresh = [], []
    for p, view in zip(part.params, part.views):
        state = base.state[p]
        buffer = state.get("momentum_buffer")
        fresh.append(buffer is None)
        if buffer is None:
            buffer = state["momentum_buffer"] = torch.empty_like(p)
        elif not plans.fits(buffer, p):
            buffer = state["momentum_buffer"] = plans.like(buffer, p)
        buffers.append(torch.view_as_real(buffer) if buffer.is_complex() else buffer)
    return buffers, fresh


def step(base, plan) -> None:
    """θ back and one SGD step for every part of ``plan`` (call only where :func:`applies`)."""
    for part in plan.parts:
        group = part.group
        args = [group[name] for name in _SGD_OPTIONS]
        grads = plans.gradients(part)
        if group["momentum"] == 0:
            functional.restore_sgd_(part.views, part.backups, grads, [], *args, False, backend=part.backend,
                                    validate=False)
            continue
        buffers, fresh = _momentum_buffers(base, part)
        for first_step in (True, False) if any(fresh) else (False,):
            idx = [i for i, is_fresh in enumerate(fresh) if is_fresh == first_step]
            if not idx:
                continue
            if len(idx) == len(fresh):
                lists = (part.views, part.backups, grads, buffers)
            else:
                lists = tuple([lst[i] for i in idx] for lst in (part.views, part.backups, grads, buffers))
            functional.restore_sgd_(*lists, *args, first_step, backend=part.backend, validate=False)
