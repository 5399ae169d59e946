"""The op layer: complex tensors as their real views, the argument contract, the backend, the call.

The optimizer calls only these (see :mod:`amp_fused.backends` for what each op computes). ``backend`` is
"auto", a backend name, or a backend already resolved (the optimizer's plan holds one). Lists with
DTensor-sharded parameters (FSDP2) resolve to :mod:`amp_fused.backends.sharded`, whose norms are those of
the full tensors.

``validate=True`` (the default) takes complex tensors through ``torch.view_as_real`` (the ops are
elementwise or norms, so that is exact, as torch.optim does it) and checks the whole argument contract of
:mod:`amp_fused.checks` before any backend runs, so every backend rejects bad input with the same exception
and writes nothing (DTensor lists: the sharded backend checks it on the local shards, on every call). ``validate=False`` is for callers that built real-typed, checked lists themselves (the
optimizer's plan): the backends with native checks (cpu, cuda) still check every call; the others trust it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import backends, checks
from .backends import sharded

Tensors = Sequence[torch.Tensor]


def resolve(backend, params: Tensors):
    """The backend that runs ops on ``params``."""
    if not isinstance(backend, str):
        return backend  # resolved already
    device_type = params[0].device.type if len(params) else "cpu"
    return backends.RESOLVED[_resolved_name(backend, device_type, sharded.is_sharded(params))]


def _resolved_name(backend: str, device_type: str, is_sharded: bool) -> str:
    return backends.resolve(backend, device_type, is_sharded).NAME


# Resolving may import the backend's module, which Dynamo cannot trace: under torch.compile this runs at trace
# time and its result is a constant of the graph (its arguments are guarded constants there). This is what
# torch.compiler.assume_constant_result does; setting the mark directly keeps `import amp_fused` from importing
# Dynamo (and with it Triton), seconds of start-up for users who never compile.
_resolved_name._dynamo_marked_constant = True


def _checking(validate: bool, params: Tensors) -> bool:
    # Traced code (torch.compile) has no addresses to compare: the ops' fake implementations check it there.
    # DTensor lists: the sharded backend checks their placements, then this contract on the local shards.
    return validate and not torch.compiler.is_compiling() and not sharded.is_sharded(params)


def real_views(tensors: Tensors) -> list:
    """``tensors`` with every complex tensor replaced by its real view (a view: writes reach the tensor)."""
    return [torch.view_as_real(t) if isinstance(t, torch.Tensor) and t.is_complex() else t for t in tensors]


def perturb_(params: Tensors, grads: Tensors, backups: Tensors, epsilon: float, inner_lr: float,
             per_tensor: bool = True, first: bool = True, surface: bool = False, eta: float | None = None, *,
             backend="auto", validate: bool = True) -> torch.Tensor:
    """One ascent of Algorithm 1 in place on ``params``; returns the fp32 norms of Δ (``surface``: Δ on the
    ε-sphere, SAM; ``eta``: ASAM's element weights |θ| + η)."""
    if validate:
        params, grads, backups = real_views(params), real_views(grads), real_views(backups)
        if _checking(validate, params):
            checks.check_perturb(params, grads, backups, epsilon, inner_lr, first=bool(first), eta=eta)
    return resolve(backend, params).perturb_(params, grads, backups, float(epsilon), float(inner_lr),
                                             bool(per_tensor), bool(first), bool(surface),
                                             None if eta is None else float(eta))


def restore_(params: Tensors, backups: Tensors, *, backend="auto", validate: bool = True) -> None:
    """Put θ back into ``params``."""
    if validate:
        params, backups = real_views(params), real_views(backups)
        if _checking(validate, params):
            checks.check_restore(params, backups)
    resolve(backend, params).restore_(params, backups)


def restore_sgd_(params: Tensors, backups: Tensors, grads: Tensors, momentum_buffers: Tensors, lr: float,
                 momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False, first_step: bool = False, *, backend="auto",
                 validate: bool = True) -> None:
    """Put θ back and take one ``torch.optim.SGD`` step with ``grads`` in the same pass."""
    if validate:
        params, backups, grads = real_views(params), real_views(backups), real_views(grads)
        momentum_buffers = real_views(momentum_buffers)
        if _checking(validate, params):
            checks.check_restore_sgd(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay)
    resolve(backend, params).restore_sgd_(
        params, backups, grads, momentum_buffers, float(lr), float(momentum), float(dampening),
        float(weight_decay), bool(nesterov), bool(maximize), bool(first_step))


def perturbation(params: Tensors, backups: Tensors, *, backend="auto", validate: bool = True) -> list:
    """The current Δ of perturbed ``params`` as new tensors (what "reuse" steps apply again); for complex
    ``params`` with ``validate=True``, Δ as their real views."""
    if validate:
        params, backups = real_views(params), real_views(backups)
        if _checking(validate, params):
            checks.check_perturbation(params, backups)
    return resolve(backend, params).perturbation(params, backups)


def norms(tensors: Tensors, *, backend="auto", validate: bool = True) -> torch.Tensor:
    """The fp32 norms ‖t‖₂ of each tensor, then the norm over all of them."""
    if validate:
        tensors = real_views(tensors)
        if _checking(validate, tensors):
            checks.check_norms(tensors)
    return resolve(backend, tensors).norms(tensors)


def restore_orthogonal_(params: Tensors, backups: Tensors, grads: Tensors, orthogonals: Tensors,
                        per_tensor: bool = True, *, backend="auto", validate: bool = True) -> None:
    """Put θ back, and store in ``orthogonals`` the part of ``grads`` (taken at θ + Δ) orthogonal to Δ."""
    if validate:
        params, backups, grads, orthogonals = (real_views(x) for x in (params, backups, grads, orthogonals))
        if _checking(validate, params):
            checks.check_restore_orthogonal(params, backups, grads, orthogonals)
    resolve(backend, params).restore_orthogonal_(params, backups, grads, orthogonals, bool(per_tensor))


def add_orthogonal_(grads: Tensors, orthogonals: Tensors, alpha: float, per_tensor: bool = True, *,
                    backend="auto", validate: bool = True) -> None:
    """``grads`` ← g + α·(‖g‖/‖v‖)·v with the stored ``orthogonals`` v (per tensor or over all tensors)."""
    if validate:
        grads, orthogonals = real_views(grads), real_views(orthogonals)
        if _checking(validate, grads):
            checks.check_add_orthogonal(grads, orthogonals, alpha)
    resolve(backend, grads).add_orthogonal_(grads, orthogonals, float(alpha), bool(per_tensor))
