"""The op table in ``torch._foreach_*`` ops: no host synchronisation on a device, and a number of
dispatched ops that does not depend on how many tensors there are. Runs on any device.

On CPU tensors, where reading a result is free, two choices are made on the host instead (see
:func:`host_reads_are_free`): the norms accumulate in fp32 with a float64 redo of any that overflowed, and the
pass that zeroes non-finite tensors is skipped when every tensor is kept.
"""
from __future__ import annotations

import torch

from . import NORM_EPS

NAME = "foreach"
DEVICE_TYPES = ("cpu", "cuda")
NATIVE_CHECKS = False


def unavailable_reason():
    return None


def projection(norms: torch.Tensor, epsilon: float, per_tensor: bool, surface: bool = False):
    """Per-tensor scale min(1, ε/(‖Δ‖+NORM_EPS)) (``surface``: without the min), 0 where the governing norm
    (or, on the surface, the scale) is not finite.

    Returns ``(scale, keep, all_norms)``: vectors of length n (keep is 1.0 where the tensor may move,
    0.0 where its norm, or for global the total norm, is not finite) and the fp32 n norms followed by
    the total norm.
    """
    total = torch.linalg.vector_norm(norms)
    governing = norms if per_tensor else total.expand_as(norms)
    scale = epsilon / (governing + NORM_EPS)
    keep = torch.isfinite(governing)
    if surface:
        keep = keep & torch.isfinite(scale)
    else:
        scale = scale.clamp(max=1.0)
    scale = torch.where(keep, scale, 0.0)
    return scale, keep.to(norms.dtype), torch.cat([norms, total.reshape(1)]).float()


def host_reads_are_free(t: torch.Tensor) -> bool:
    """True for eager CPU tensors: reading a value back is no synchronisation there."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _norms(tensors):
    """‖t‖₂ per tensor, finite whenever t is: squaring a finite Δ must never overflow to Inf."""
    if not host_reads_are_free(tensors[0]):
        # a device accumulates in float64 at the price of registers; asking the host would be a sync
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))
    # On CPU float64 accumulation costs 4.7x fp32 (12.8 vs 2.7 ms on ResNet-18 here), and reading the result
    # is free: accumulate in fp32 (fp64 when a tensor is fp64: _foreach_norm refuses to narrow) and redo in
    # float64 only the tensors whose fp32 sum of squares overflowed.
    wide = any(t.dtype == torch.float64 for t in tensors)
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64 if wide else torch.float32)).double()
    for i in torch.isinf(norms).nonzero().flatten().tolist():
        norms[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64)
    return norms


def _finite_where_kept(tensors, keep):
    # foreach has no select, and 0·NaN is NaN. IEEE pow gives pow(x, 1) == x and pow(x, 0) == 1 for every
    # x, NaN and Inf included: pow(z, keep) is z for kept tensors and all ones (finite) for dropped ones,
    # whose coefficient is then 0. No host sync, at the price of one pass of pow.
    if host_reads_are_free(keep):
        # On the host reading keep is free: skip the pass when every tensor is kept (the usual step), and give
        # pow Python exponents, whose fast path is 11x the tensor-exponent one (3.7 vs 42 ms on ResNet-18 here).
        return tensors if bool(keep.all()) else torch._foreach_pow(tensors, keep.tolist())
    return torch._foreach_pow(tensors, list(keep.unbind()))


def perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, surface=False, eta=None, *,
             norms_of=_norms):
    """``norms_of(tensors)``: the vector of ‖t‖₂; :mod:`amp_fused.backends.sharded` passes one that completes the norms
    of local shards across ranks."""
    if not params:
        return torch.zeros(1)
    if first:
        torch._foreach_copy_(backups, params)
        if eta is None:
            # Δ = ζ·g, kept implicit: ‖Δ‖ = ζ‖g‖ and params ← θ + (scale·ζ)·g.
            norms = norms_of(grads) * inner_lr
            step = grads
        else:
            # ASAM: u = ζ·T·g with T = |θ| + η; ‖u‖ = ζ‖T·g‖ and params ← θ + (scale·ζ)·T²·g.
            weights = torch._foreach_abs(params)
            torch._foreach_add_(weights, eta)
            step = torch._foreach_mul(grads, weights)
            norms = norms_of(step) * inner_lr
            torch._foreach_mul_(step, weights)
        scale, keep, all_norms = projection(norms, epsilon, per_tensor, surface)
        _add_scaled_(params, _finite_where_kept(step, keep), scale * inner_lr, surface)
        return all_norms
    delta = torch._foreach_sub(params, backups)
    torch._foreach_add_(delta, grads, alpha=inner_lr)
    norms = norms_of(delta)
    scale, keep, all_norms = projection(norms, epsilon, per_tensor, surface)
    torch._foreach_copy_(params, backups)
    _add_scaled_(params, _finite_where_kept(delta, keep), scale, surface)
    return all_norms


def _add_scaled_(params, steps, coefficients, wide):
    """params += coefficient·step per tensor. The coefficients reach the kernel in the tensors' dtype, and some
    exceed fp16's range (65504: ε/‖Δ‖ of a small Δ on SAM's surface, the coefficients of the gradient-reuse ops):
    with ``wide``, fp16 tensors form their move in fp32."""
    coefficients = list(coefficients.unbind())
    half = [i for i, p in enumerate(params) if p.dtype == torch.float16] if wide else []
    if not half:
        torch._foreach_addcmul_(params, steps, coefficients)
        return
    rest = [i for i in range(len(params)) if params[i].dtype != torch.float16]
    if rest:
        torch._foreach_addcmul_([params[i] for i in rest], [steps[i] for i in rest], [coefficients[i] for i in rest])
    for i in half:
        params[i].copy_(params[i].float().add_(steps[i].float() * coefficients[i].float()))


def restore_(params, backups):
    if params:
        torch._foreach_copy_(params, backups)


def restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                 nesterov, maximize, first_step):
    if not params:
        return
    torch._foreach_copy_(params, backups)
    d_p = torch._foreach_neg(grads) if maximize else grads
    if weight_decay != 0:
        d_p = torch._foreach_add(d_p, params, alpha=weight_decay)
    if momentum != 0:
        if first_step:
            torch._foreach_copy_(momentum_buffers, d_p)
        else:
            torch._foreach_mul_(momentum_buffers, momentum)
            torch._foreach_add_(momentum_buffers, d_p, alpha=1 - dampening)
        d_p = torch._foreach_add(d_p, momentum_buffers, alpha=momentum) if nesterov else momentum_buffers
    torch._foreach_add_(params, d_p, alpha=-lr)


def perturbation(params, backups):
    return list(torch._foreach_sub(params, backups)) if params else []  # backups hold θ


def _dots(a, b):
    """⟨a_i, b_i⟩ per tensor in float64, in a fixed number of foreach ops (there is no foreach sum): the sum is
    the sum of the positive products less that of the negative ones, each an L1 norm (NaN stays NaN)."""
    products = torch._foreach_mul(a, b)
    positive = torch._foreach_clamp_min(products, 0.0)
    total = torch.stack(torch._foreach_norm(products, 1, dtype=torch.float64))
    return 2 * torch.stack(torch._foreach_norm(positive, 1, dtype=torch.float64)) - total


def _combine(sums, per_tensor):
    """Per-tensor sums, or their total for every tensor."""
    return sums if per_tensor else sums.sum().expand_as(sums)


def norms(tensors, *, norms_of=_norms):
    if not tensors:
        return torch.zeros(1)
    values = norms_of(tensors)
    return torch.cat([values, torch.linalg.vector_norm(values).reshape(1)]).float()


def _keep(coefficients):
    """Where the coefficients are finite and not 0, and the coefficients with 0 elsewhere."""
    keep = torch.isfinite(coefficients) & (coefficients != 0)
    return keep, torch.where(keep, coefficients, 0.0)


def _add_kept_(targets, steps, coefficients):
    """targets += coefficient·step for the tensors whose coefficient is finite and not 0; the others stay as they
    are (a non-finite step never reaches them)."""
    keep, coefficients = _keep(coefficients)
    if host_reads_are_free(keep):
        idx = keep.nonzero().flatten().tolist()
        if len(idx) < len(targets):
            targets, steps, coefficients = [targets[i] for i in idx], [steps[i] for i in idx], coefficients[idx]
        if targets:
            _add_scaled_(targets, steps, coefficients, True)
        return
    _add_scaled_(targets, _finite_where_kept(steps, keep.to(coefficients.dtype)), coefficients, True)


def restore_orthogonal_(params, backups, grads, orthogonals, per_tensor, *, norms_of=_norms, dots_of=_dots):
    """``norms_of`` / ``dots_of``: ‖t‖₂ and ⟨a, b⟩ per tensor (:mod:`amp_fused.backends.sharded` completes those of
    local shards across ranks)."""
    if not params:
        return
    delta = torch._foreach_sub(params, backups)
    squares = _combine(norms_of(delta).square(), per_tensor)
    dots = _combine(dots_of(delta, grads), per_tensor)
    coefficients = torch.where(squares > 0, dots / squares, 0.0)
    torch._foreach_copy_(orthogonals, grads)
    _add_kept_(orthogonals, delta, -coefficients)
    torch._foreach_copy_(params, backups)


def add_orthogonal_(grads, orthogonals, alpha, per_tensor, *, norms_of=_norms):
    if not grads:
        return
    g_norms, v_norms = norms_of(grads), norms_of(orthogonals)
    if not per_tensor:
        g_norms = torch.linalg.vector_norm(g_norms).expand_as(g_norms)
        v_norms = torch.linalg.vector_norm(v_norms).expand_as(v_norms)
    _add_kept_(grads, orthogonals, alpha * g_norms / v_norms)
