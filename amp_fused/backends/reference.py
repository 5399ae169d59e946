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


def _clip_coef(epsilon, norm):
    return epsilon / (norm + NORM_EPS)


def perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first):
    old_devs = [torch.zeros_like(d) if first else d.clone() for d in backups]
    devs = [old + inner_lr * g for old, g in zip(old_devs, grads)]
    # each tensor's norm in float64, so that squaring a finite Δ never overflows
    norms = [torch.linalg.vector_norm(dev, dtype=torch.float64) for dev in devs]
    total = torch.stack(norms).norm() if norms else torch.zeros((), dtype=torch.float64)
    if per_tensor:
        for i, dev in enumerate(devs):
            norm = norms[i].item()  # host sync, as in the original
            if not math.isfinite(norm):
                devs[i] = torch.zeros_like(dev)
            else:
                clip_coef = _clip_coef(epsilon, norm)
                if clip_coef < 1:
                    devs[i] = clip_coef * dev
    else:
        norm = total.item()
        if not math.isfinite(norm):
            devs = [torch.zeros_like(dev) for dev in devs]
        else:
            clip_coef = _clip_coef(epsilon, norm)
            if clip_coef < 1:
                devs = [clip_coef * dev for dev in devs]
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
