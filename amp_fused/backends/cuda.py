"""The op table as fused CUDA kernels (``torch.ops.amp_fused.*`` from the ``amp_fused._C_cuda`` extension).

Each op is a few multi-tensor launches over all tensors, with no host synchronisation; ``perturb_`` reduces
its norms without float atomics, so it is deterministic. Kernels: ``csrc/cuda``. Tensors must be on one CUDA
device, dense (contiguous or e.g. channels_last) and laid out alike at each index; see ``csrc/cuda/amp_ops.cu``.
"""
from __future__ import annotations

import torch

NAME = "cuda"
DEVICE_TYPES = ("cuda",)


def unavailable_reason():
    try:
        from amp_fused import _extension  # loads amp_fused._C, then amp_fused._C_cuda
    except ImportError as exc:
        return f"amp_fused._extension cannot be imported: {exc}"
    if _extension.cpu_error is not None:
        return f"the op schemas are not registered (amp_fused._C failed to load: {_extension.cpu_error})"
    if _extension.cuda_error is not None:
        return f"the CUDA extension amp_fused._C_cuda is not loaded: {_extension.cuda_error}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def _ops():
    from amp_fused import _extension  # noqa: F401 - registers the kernels on first use

    return torch.ops.amp_fused


def perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first):
    if not params:
        return torch.zeros(1)
    return _ops().perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first)


def restore_(params, backups):
    if params:
        _ops().restore_(params, backups)


def restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                 nesterov, maximize, first_step):
    if params:
        _ops().restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                            nesterov, maximize, first_step)
