"""The op table for DTensor-sharded parameters (FSDP2's ``fully_shard``, or ``distribute_tensor``).

Algorithm 1 projects with the norms of the full tensors, but each rank holds only its shards of them. So
the ascent runs as ``torch._foreach_*`` ops on the local shards, and the squared norms of the local pieces
are all-reduced (summed) over the mesh dimensions each tensor is sharded on before the shared scale rule
(:func:`amp_fused.backends.foreach.projection`) is applied: one all-reduce of an n-vector for a 1-D mesh,
whatever the norm. Every rank then computes the same scales, the ones the unsharded tensors give (a NaN or
Inf on one rank makes the summed norm non-finite on all of them, so they all drop that Δ alike). No host
synchronisation. Restore and the SGD step are elementwise, so they run on the local shards as they are.
Whatever ``backend`` is chosen, sharded parameters take this path; ``backups`` hold θ as in the foreach
backend.

Lists may mix DTensors with plain tensors (which every rank holds whole, so they are not reduced). A
DTensor's grad, backup and momentum buffer must be DTensors with the same mesh and placements.
"""
from __future__ import annotations

import sys

import torch

from .. import checks
from . import foreach

NAME = "sharded"
DEVICE_TYPES = ("cpu", "cuda")
# Checks every call itself: first that the lists are sharded alike, then the contract (amp_fused.checks) on
# the local shards, which are what the ops write.
NATIVE_CHECKS = True


def unavailable_reason():
    return None


def _dtensor_type():
    # A DTensor cannot exist before its module is imported, so there is no need to pay for importing it
    # (about a second) just to find out that no tensor is one.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(tensors) -> bool:
    """Whether any tensor in ``tensors`` is a DTensor (so the ops must take this module's path)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def local_tensors(tensors) -> list:
    """The local shard of every DTensor in ``tensors`` (the other tensors as they are)."""
    dtensor = _dtensor_type()
    return [t.to_local() if dtensor is not None and isinstance(t, dtensor) else t for t in tensors]


def _reduction_groups(t, index: int) -> tuple:
    """The process groups over which ``t``'s local sum of squares must be summed: one per mesh dimension
    that shards it. Replicated dimensions hold the same values on every rank, so they are not summed."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(t, dtensor):
        return ()
    groups = []
    for mesh_dim, placement in enumerate(t.placements):
        if placement.is_shard():
            groups.append(t.device_mesh.get_group(mesh_dim))
        elif placement.is_partial():
            raise ValueError(f"perturb_: params[{index}] is a DTensor with a Partial placement {t.placements}; AMP "
                             "needs parameters that are sharded (Shard) or replicated (Replicate) on each mesh "
                             "dimension")
    return tuple(groups)


def _locals(op: str, params, **others) -> tuple:
    """The local shards of ``params`` and of each list in ``others``, checking that the lists are sharded alike."""
    dtensor = _dtensor_type()
    result = [[p.to_local() if isinstance(p, dtensor) else p for p in params]]
    for name, tensors in others.items():
        local = []
        for i, (ref, t) in enumerate(zip(params, tensors)):
            ref_spec = (ref.device_mesh, ref.placements) if isinstance(ref, dtensor) else None
            spec = (t.device_mesh, t.placements) if isinstance(t, dtensor) else None
            if spec != ref_spec:
                raise ValueError(f"{op}: {name}[{i}] is {_describe(t, spec)} but params[{i}] is "
                                 f"{_describe(ref, ref_spec)}; they must be sharded alike")
            local.append(t.to_local() if spec is not None else t)
        result.append(local)
    return tuple(result)


def _describe(t, spec) -> str:
    if spec is None:
        return f"a plain {type(t).__name__}"
    return f"a DTensor with placements {spec[1]} on {spec[0]}"


def _full_norms(local_tensors, groups) -> torch.Tensor:
    """‖t‖₂ of each full tensor from its local shard: local sums of squares, summed over each shard group."""
    # Sums of squares in fp64 (as the foreach backend), so that squaring cannot overflow where the norm itself
    # would not; the norms come back in the tensors' accumulation type.
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in local_tensors) else torch.float32
    squares = torch.stack(torch._foreach_norm(local_tensors, 2, dtype=torch.float64)).square()
    return _summed_over_shards(squares, groups).sqrt().to(dtype)


def _full_dots(local_a, local_b, groups) -> torch.Tensor:
    """⟨a, b⟩ of each pair of full tensors from their local shards (float64)."""
    return _summed_over_shards(foreach._dots(local_a, local_b), groups)


def _summed_over_shards(sums, groups) -> torch.Tensor:
    """``sums`` (one local sum per tensor) summed over each tensor's shard groups."""
    by_groups = {}
    for i, tensor_groups in enumerate(groups):
        if tensor_groups:
            by_groups.setdefault(tensor_groups, []).append(i)
    if len(by_groups) == 1 and len(next(iter(by_groups.values()))) == len(sums):
        for group in next(iter(by_groups)):  # the usual case (FSDP over a 1-D mesh): one all-reduce
            torch.distributed.all_reduce(sums, group=group)
    elif by_groups:
        sums = list(sums.unbind())
        for tensor_groups, indices in by_groups.items():
            part = torch.stack([sums[i] for i in indices])
            for group in tensor_groups:
                torch.distributed.all_reduce(part, group=group)
            for j, i in enumerate(indices):
                sums[i] = part[j]
        sums = torch.stack(sums)
    return sums


def perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, surface=False, eta=None):
    if not params:
        return torch.zeros(1)
    groups = [_reduction_groups(p, i) for i, p in enumerate(params)]
    local_params, local_grads, local_backups = _locals("perturb_", params, grads=grads, backups=backups)
    checks.check_perturb(local_params, local_grads, local_backups, epsilon, inner_lr, first=first, eta=eta)
    return foreach.perturb_(local_params, local_grads, local_backups, epsilon, inner_lr, per_tensor, first,
                            surface, eta, norms_of=lambda tensors: _full_norms(tensors, groups))


def restore_(params, backups):
    local_params, local_backups = _locals("restore_", params, backups=backups)
    checks.check_restore(local_params, local_backups)
    foreach.restore_(local_params, local_backups)


def restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                 nesterov, maximize, first_step):
    if momentum != 0:
        local_params, local_backups, local_grads, local_buffers = _locals(
            "restore_sgd_", params, backups=backups, grads=grads, momentum_buffers=momentum_buffers)
    else:
        local_params, local_backups, local_grads = _locals("restore_sgd_", params, backups=backups, grads=grads)
        local_buffers = []
    checks.check_restore_sgd(local_params, local_backups, local_grads, local_buffers, lr, momentum, dampening,
                             weight_decay)
    foreach.restore_sgd_(local_params, local_backups, local_grads, local_buffers, lr, momentum, dampening,
                         weight_decay, nesterov, maximize, first_step)


def norms(tensors):
    if not tensors:
        return torch.zeros(1)
    groups = [_reduction_groups(t, i) for i, t in enumerate(tensors)]
    (local,) = _locals("norms", tensors)
    checks.check_norms(local)
    return foreach.norms(local, norms_of=lambda ts: _full_norms(ts, groups))


def restore_orthogonal_(params, backups, grads, orthogonals, per_tensor):
    if not params:
        return
    groups = [_reduction_groups(p, i) for i, p in enumerate(params)]
    local_params, local_backups, local_grads, local_orthogonals = _locals(
        "restore_orthogonal_", params, backups=backups, grads=grads, orthogonals=orthogonals)
    checks.check_restore_orthogonal(local_params, local_backups, local_grads, local_orthogonals)
    foreach.restore_orthogonal_(local_params, local_backups, local_grads, local_orthogonals, per_tensor,
                                norms_of=lambda ts: _full_norms(ts, groups),
                                dots_of=lambda a, b: _full_dots(a, b, groups))


def add_orthogonal_(grads, orthogonals, alpha, per_tensor):
    if not grads:
        return
    groups = [_reduction_groups(g, i) for i, g in enumerate(grads)]
    local_grads, local_orthogonals = _locals("add_orthogonal_", grads, orthogonals=orthogonals)
    checks.check_add_orthogonal(local_grads, local_orthogonals, alpha)
    foreach.add_orthogonal_(local_grads, local_orthogonals, alpha, per_tensor,
                            norms_of=lambda ts: _full_norms(ts, groups))


def perturbation(params, backups):
    """Δ = params − θ, as tensors sharded like ``params``."""
    dtensor = _dtensor_type()
    local_params, local_backups = _locals("perturbation", params, backups=backups)
    checks.check_perturbation(local_params, local_backups)
    deltas = torch._foreach_sub(local_params, local_backups) if params else []
    return [dtensor.from_local(d, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
            if isinstance(p, dtensor) else d for p, d in zip(params, deltas)]
