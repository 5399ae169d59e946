"""Functional form of the AMP ops: check the arguments, pick the backend, call it.

The optimizer calls only these; see :mod:`amp_fused.backends` for what each op computes.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import backends

Tensors = Sequence[torch.Tensor]


def _device_type(params: Tensors) -> str:
    return params[0].device.type if params else "cpu"


def _check_lists(op: str, **lists: Tensors) -> None:
    names = list(lists)
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{op}: the tensor lists must have the same length, got {lengths}")
    first = lists[names[0]]
    for name in names[1:]:
        for i, (a, b) in enumerate(zip(first, lists[name])):
            if a.shape != b.shape or a.device != b.device:
                raise ValueError(f"{op}: {name}[{i}] has shape {tuple(b.shape)} on {b.device}, but "
                                 f"{names[0]}[{i}] has shape {tuple(a.shape)} on {a.device}; they must match")


def _check_nonnegative(op: str, **values: float) -> None:
    for name, value in values.items():
        if not value >= 0.0:
            raise ValueError(f"{op}: {name} must be a non-negative number, got {value!r}")


def perturb_(params: Tensors, grads: Tensors, backups: Tensors, epsilon: float, inner_lr: float,
             per_tensor: bool = True, first: bool = True, *, backend: str = "auto") -> torch.Tensor:
    """One ascent of Algorithm 1 in place on ``params``; returns the fp32 norms of Δ."""
    _check_lists("perturb_", params=params, grads=grads, backups=backups)
    _check_nonnegative("perturb_", epsilon=epsilon, inner_lr=inner_lr)
    ops = backends.resolve(backend, _device_type(params))
    return ops.perturb_(params, grads, backups, float(epsilon), float(inner_lr), bool(per_tensor), bool(first))


def restore_(params: Tensors, backups: Tensors, *, backend: str = "auto") -> None:
    """Put θ back into ``params``."""
    _check_lists("restore_", params=params, backups=backups)
    backends.resolve(backend, _device_type(params)).restore_(params, backups)


def restore_sgd_(params: Tensors, backups: Tensors, grads: Tensors, momentum_buffers: Tensors, lr: float,
                 momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False, first_step: bool = False, *, backend: str = "auto") -> None:
    """Put θ back and take one ``torch.optim.SGD`` step with ``grads`` in the same pass."""
    if momentum != 0:
        _check_lists("restore_sgd_", params=params, backups=backups, grads=grads,
                     momentum_buffers=momentum_buffers)
    else:
        _check_lists("restore_sgd_", params=params, backups=backups, grads=grads)
    _check_nonnegative("restore_sgd_", lr=lr, momentum=momentum, weight_decay=weight_decay)
    backends.resolve(backend, _device_type(params)).restore_sgd_(
        params, backups, grads, momentum_buffers, float(lr), float(momentum), float(dampening),
        float(weight_decay), bool(nesterov), bool(maximize), bool(first_step))


def perturbation(params: Tensors, backups: Tensors, *, backend: str = "auto") -> list:
    """The current Δ of perturbed ``params`` as new tensors (what "reuse" steps apply again)."""
    _check_lists("perturbation", params=params, backups=backups)
    ops = backends.resolve(backend, _device_type(params))
    if hasattr(ops, "perturbation"):
        return ops.perturbation(params, backups)
    return list(torch._foreach_sub(params, backups)) if params else []  # backups hold θ
