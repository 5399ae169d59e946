"""Functional form of the AMP ops: check the arguments, pick the backend, call it.

The optimizer calls only these; see :mod:`amp_fused.backends` for what each op computes. Lists with
DTensor-sharded parameters (FSDP2) go to :mod:`amp_fused.sharded`, whose norms are those of the full tensors.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import backends, sharded

Tensors = Sequence[torch.Tensor]


def _device_type(params: Tensors) -> str:
    return params[0].device.type if params else "cpu"


def _backend_name(backend: str, device_type: str) -> str:
    return backends.resolve(backend, device_type).NAME


# Resolving may import the backend's module, which Dynamo cannot trace: under torch.compile this runs at trace
# time and its result is a constant of the graph (its arguments are guarded constants there). This is what
# torch.compiler.assume_constant_result does; setting the mark directly keeps `import amp_fused` from importing
# Dynamo (and with it Triton), seconds of start-up for users who never compile.
_backend_name._dynamo_marked_constant = True


def _ops(backend: str, params: Tensors):
    """The module that runs the ops on ``params``: :mod:`amp_fused.sharded` for DTensors, else the backend."""
    if sharded.is_sharded(params):
        backends.check_name(backend)
        return sharded
    return getattr(backends, _backend_name(backend, _device_type(params)))  # resolving imported the submodule


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
             per_tensor: bool = True, first: bool = True, *, backend: str = "auto",
             validate: bool = True) -> torch.Tensor:
    """One ascent of Algorithm 1 in place on ``params``; returns the fp32 norms of Δ.

    ``validate=False`` skips the Python-side argument checks (for callers that built the lists themselves,
    like the optimizer: the checks cost tens of microseconds a step)."""
    if validate:
        _check_lists("perturb_", params=params, grads=grads, backups=backups)
        _check_nonnegative("perturb_", epsilon=epsilon, inner_lr=inner_lr)
    ops = _ops(backend, params)
    return ops.perturb_(params, grads, backups, float(epsilon), float(inner_lr), bool(per_tensor), bool(first))


def restore_(params: Tensors, backups: Tensors, *, backend: str = "auto", validate: bool = True) -> None:
    """Put θ back into ``params``."""
    if validate:
        _check_lists("restore_", params=params, backups=backups)
    _ops(backend, params).restore_(params, backups)


def restore_sgd_(params: Tensors, backups: Tensors, grads: Tensors, momentum_buffers: Tensors, lr: float,
                 momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False, first_step: bool = False, *, backend: str = "auto",
                 validate: bool = True) -> None:
    """Put θ back and take one ``torch.optim.SGD`` step with ``grads`` in the same pass."""
    if validate:
        if momentum != 0:
            _check_lists("restore_sgd_", params=params, backups=backups, grads=grads,
                         momentum_buffers=momentum_buffers)
        else:
            _check_lists("restore_sgd_", params=params, backups=backups, grads=grads)
        _check_nonnegative("restore_sgd_", lr=lr, momentum=momentum, weight_decay=weight_decay)
    _ops(backend, params).restore_sgd_(
        params, backups, grads, momentum_buffers, float(lr), float(momentum), float(dampening),
        float(weight_decay), bool(nesterov), bool(maximize), bool(first_step))


def perturbation(params: Tensors, backups: Tensors, *, backend: str = "auto", validate: bool = True) -> list:
    """The current Δ of perturbed ``params`` as new tensors (what "reuse" steps apply again)."""
    if validate:
        _check_lists("perturbation", params=params, backups=backups)
    ops = _ops(backend, params)
    if hasattr(ops, "perturbation"):
        return ops.perturbation(params, backups)
    return list(torch._foreach_sub(params, backups)) if params else []  # backups hold θ
