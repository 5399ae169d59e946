"""The compiled kernels behind ``torch.ops.amp_fused.*``: the C++ CPU kernels (``csrc/cpu``, extension
``amp_fused._C``) and the CUDA kernels (``csrc/cuda``, extension ``amp_fused._C_cuda``), one adapter for both.

CPU: each op is one dispatched call over the whole tensor list, split into fixed-size chunks that run on
torch's intra-op threads with AVX2 vector code (when built for it); results are bitwise identical for any
thread count. CUDA: a few multi-tensor launches per op on the current stream; norms are reduced without
float atomics, so results are deterministic. Neither synchronises with the host. Both check the argument
contract (csrc/checks.h, the same as :mod:`amp_fused.checks`) on every call, before writing anything, and take
dense tensors of dtype float32, float64, float16 or bfloat16.
"""
from __future__ import annotations

import torch

from .. import _extension


class NativeBackend:
    """The torch.ops adapter for one device type; ``error()`` says why its kernels are not usable."""

    NATIVE_CHECKS = True

    def __init__(self, name: str, device_type: str, error):
        self.NAME = name
        self.DEVICE_TYPES = (device_type,)
        self._error = error

    def __repr__(self):
        return f"<amp_fused backend {self.NAME!r}>"

    def unavailable_reason(self):
        return self._error()

    # Empty lists are answered here: an op call without any tensor has no device to dispatch on.
    @staticmethod
    def perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, surface=False, eta=None):
        if not (params or grads or backups):
            return torch.zeros(1)
        return torch.ops.amp_fused.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, surface,
                                            eta)

    @staticmethod
    def restore_(params, backups):
        if params or backups:
            torch.ops.amp_fused.restore_(params, backups)

    @staticmethod
    def restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                     nesterov, maximize, first_step):
        if params or backups or grads or momentum_buffers:
            torch.ops.amp_fused.restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening,
                                             weight_decay, nesterov, maximize, first_step)

    @staticmethod
    def norms(tensors):
        if not tensors:
            return torch.zeros(1)
        return torch.ops.amp_fused.norms(tensors)

    @staticmethod
    def restore_orthogonal_(params, backups, grads, orthogonals, per_tensor):
        if params or backups or grads or orthogonals:
            torch.ops.amp_fused.restore_orthogonal_(params, backups, grads, orthogonals, per_tensor)

    @staticmethod
    def add_orthogonal_(grads, orthogonals, alpha, per_tensor):
        if grads or orthogonals:
            torch.ops.amp_fused.add_orthogonal_(grads, orthogonals, alpha, per_tensor)

    @staticmethod
    def perturbation(params, backups):
        return list(torch._foreach_sub(params, backups)) if params else []  # backups hold θ


def _cuda_error():
    if _extension.cpu_error is not None:
        return f"the op schemas are not registered (amp_fused._C failed to load: {_extension.cpu_error})"
    if _extension.cuda_error is not None:
        return f"the CUDA extension amp_fused._C_cuda is not loaded: {_extension.cuda_error}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


cpu = NativeBackend("cpu", "cpu", lambda: _extension.cpu_error)
cuda = NativeBackend("cuda", "cuda", _cuda_error)
