"""The C++ CPU kernels (csrc/cpu) behind ``torch.ops.amp_fused.*``.

Each op is one dispatched call over the whole tensor list, split into fixed-size chunks that run on
torch's intra-op threads with AVX2 vector code (when built for it): perturb_ reads the gradients once for
the norms and makes one more pass to write params (and backups), restore_sgd_ restores θ and takes the SGD
step in a single pass. Results are bitwise identical for any thread count. No host synchronisation.
Takes dense CPU tensors of dtype float32, float64, float16 or bfloat16.
"""
from __future__ import annotations

import torch

from .. import _extension

NAME = "cpu"
DEVICE_TYPES = ("cpu",)


def unavailable_reason():
    return _extension.cpu_error


# Empty lists are answered here: an op call without any tensor has no device to dispatch on.
def perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first):
    if not params and not grads and not backups:
        return torch.zeros(1)
    return torch.ops.amp_fused.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first)


def restore_(params, backups):
    if params or backups:
        torch.ops.amp_fused.restore_(params, backups)


def restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                 nesterov, maximize, first_step):
    if not (params or backups or grads or momentum_buffers):
        return
    torch.ops.amp_fused.restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening,
                                     weight_decay, nesterov, maximize, first_step)
