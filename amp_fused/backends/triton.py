"""The op table in Triton kernels (see :mod:`amp_fused.triton`): one launch per pass over every tensor.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` when this
module is imported; for testing only). Importing this module does not import triton.
"""
from __future__ import annotations

import torch

from amp_fused.triton import ops

NAME = "triton"
DEVICE_TYPES = ("cuda", "cpu") if ops.INTERPRET else ("cuda",)
NATIVE_CHECKS = False


def unavailable_reason():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install is a reason, not a crash
        return f"triton cannot be imported ({exc!r})"
    if ops.INTERPRET or torch.cuda.is_available():
        return None
    return "no CUDA device is visible and Triton's interpreter is off (TRITON_INTERPRET=1 runs it on CPU tensors)"


perturb_ = ops.perturb_
hold = ops.hold  # the optimizer's plan: layouts and tables checked once per plan (amp_fused.plan.hold)
restore_ = ops.restore_
restore_sgd_ = ops.restore_sgd_
norms = ops.norms
restore_orthogonal_ = ops.restore_orthogonal_
add_orthogonal_ = ops.add_orthogonal_


def perturbation(params, backups):
    return list(torch._foreach_sub(params, backups)) if params else []  # backups hold θ
