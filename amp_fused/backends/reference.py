"""The original AMP code's algorithm, kept as the readable spec and the benchmark baseline.

It runs exactly as the original ``AMP.step`` does: a Python loop over parameter tensors, the
projection decided on the host (``if clip < 1``, one device sync per tensor), and θ restored by
subtracting Δ back (off by rounding, badly so in bf16). ``backups`` therefore holds Δ here, not θ.
The one deviation: a non-finite ‖Δ‖ gives Δ = 0 for that tensor (global: all tensors), as in every
other backend. Not for production use: pick ``foreach`` or a fused backend.
"""
from __future__ import annotations

import math

import torch

from . import NORM_EPS

NAME = "reference"
DEVICE_TYPES = ("cpu", "cuda")
NATIVE_CHECKS = False


def unavailable_reason():
    return None


def _clip_coef(epsilon, norm, surface):
    """The factor Δ is scaled by (``None``: keep Δ as it is); 0.0 drops it."""
    if not math.isfinite(norm):
        return 0.0
    coef = epsilon / (norm + NORM_EPS)
    if surface:
        return coef if math.isfinite(coef) else 0.0
    return coef if coef < 1 else None  # the original decides on the host whether to project


def _scaled(dev, coef):
    if coef is None:
        return dev
    return torch.zeros_like(dev) if coef == 0.0 else coef * dev


def perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, surface=False, eta=None):
    old_devs = [torch.zeros_like(d) if first else d.clone() for d in backups]
    # ASAM (eta): the ascent runs in the coordinates θ/T, T = |θ| + η: u = ζ·T·g there, Δ = T·u back here.
    weights = [p.abs() + eta for p in params] if eta is not None else None
    steps = grads if weights is None else [w * g for w, g in zip(weights, grads)]
    devs = [old + inner_lr * g for old, g in zip(old_devs, steps)]
    # each tensor's norm in float64, so that squaring a finite Δ never overflows
    norms = [torch.linalg.vector_norm(dev, dtype=torch.float64) for dev in devs]
    total = torch.stack(norms).norm() if norms else torch.zeros((), dtype=torch.float64)
    if per_tensor:
        # host sync per tensor, as in the original
        devs = [_scaled(dev, _clip_coef(epsilon, norm.item(), surface)) for dev, norm in zip(devs, norms)]
    else:
        coef = _clip_coef(epsilon, total.item(), surface)
        devs = [_scaled(dev, coef) for dev in devs]
    if weights is not None:
        devs = [w * dev for w, dev in zip(weights, devs)]
    for p, old, dev, buf in zip(params, old_devs, devs, backups):
        p.sub_(old).add_(dev)  # θ + Δ_old → θ + Δ, as the original updates it
        buf.copy_(dev)
    device = params[0].device if params else None
    return torch.stack(norms + [total]).to(device=device, dtype=torch.float32)


def restore_(params, backups):
    for p, dev in zip(params, backups):
        p.sub_(dev)


def restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                 nesterov, maximize, first_step):
    restore_(params, backups)
    for i, (p, g) in enumerate(zip(params, grads)):
        d_p = -g if maximize else g
        if weight_decay != 0:
            d_p = d_p.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_step:
                buf.copy_(d_p)
            else:
                buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
            d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
        p.add_(d_p, alpha=-lr)


def perturbation(params, backups):
    return [dev.clone() for dev in backups]  # backups hold Δ here


def norms(tensors):
    values = [torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]
    total = torch.stack(values).norm() if values else torch.zeros((), dtype=torch.float64)
    device = tensors[0].device if tensors else None
    return torch.stack(values + [total]).to(device=device, dtype=torch.float32)


def _orthogonal_coef(dot, squared_norm):
    if not squared_norm > 0.0:
        return 0.0
    c = dot / squared_norm
    return c if math.isfinite(c) else 0.0


def restore_orthogonal_(params, backups, grads, orthogonals, per_tensor):
    # backups hold Δ here. Each dot and squared norm in float64, decided on the host (a sync per tensor).
    dots = [torch.sum(d.double() * g.double()).item() for d, g in zip(backups, grads)]
    squares = [torch.sum(d.double().square()).item() for d in backups]
    if per_tensor:
        coefs = [_orthogonal_coef(dot, sq) for dot, sq in zip(dots, squares)]
    else:
        coefs = [_orthogonal_coef(math.fsum(dots), math.fsum(squares))] * len(backups)
    for o, g, d, c in zip(orthogonals, grads, backups, coefs):
        o.copy_(g if c == 0.0 else torch.sub(g, d, alpha=c))
    restore_(params, backups)


def _direction_coef(alpha, grad_norm, orthogonal_norm):
    coef = float(torch.tensor(alpha * grad_norm, dtype=torch.float64) / orthogonal_norm)  # IEEE: x/0 is Inf
    return coef if math.isfinite(coef) else 0.0


def add_orthogonal_(grads, orthogonals, alpha, per_tensor):
    g_norms = [torch.linalg.vector_norm(g, dtype=torch.float64).item() for g in grads]
    v_norms = [torch.linalg.vector_norm(v, dtype=torch.float64).item() for v in orthogonals]
    if not per_tensor:
        g_norms = [math.sqrt(math.fsum(n * n for n in g_norms))] * len(grads)
        v_norms = [math.sqrt(math.fsum(n * n for n in v_norms))] * len(grads)
    for g, v, a, b in zip(grads, orthogonals, g_norms, v_norms):
        coef = _direction_coef(alpha, a, b)
        if coef != 0.0:
            g.add_(v, alpha=coef)
