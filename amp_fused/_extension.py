"""Loads amp_fused's compiled extensions, once, and registers the ops' fake implementations.

``amp_fused._C`` defines the ops (``torch.ops.amp_fused.*``, csrc/ops.cpp) and their CPU kernels (csrc/cpu);
``amp_fused._C_cuda``, when built, adds the CUDA kernels. Importing this module never raises: what went
wrong is recorded for the backends to report.

``cpu_error``: ``None`` when ``amp_fused._C`` is loaded and has CPU kernels for all three ops, else why not.
``cuda_error``: ``None`` when ``amp_fused._C_cuda`` is loaded and has CUDA kernels for all three ops, else why not.
``fake_error``: ``None`` when the fake implementations are registered (torch.compile can trace the ops),
else why not.
"""
from __future__ import annotations

import importlib

import torch

OPS = ("perturb_", "restore_", "restore_sgd_")
_BUILD_HINTS = {
    "amp_fused._C": "build it with `python setup.py build_ext --inplace` or reinstall amp_fused",
    "amp_fused._C_cuda": "setup.py builds it when torch is a CUDA build and nvcc is found; AMP_FUSED_CUDA=1 makes "
                         "a failure to build it an error",
}


def _op_exists(name: str) -> bool:
    return hasattr(torch.ops.amp_fused, name)


def _missing_kernels(dispatch_key: str) -> list[str]:
    return [name for name in OPS
            if not (_op_exists(name)
                    and torch._C._dispatch_has_kernel_for_dispatch_key(f"amp_fused::{name}", dispatch_key))]


def _load(module: str, dispatch_key: str) -> str | None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return f"the extension {module} is not built ({_BUILD_HINTS[module]})"
        return f"{module} failed to import: {exc!r}"
    except Exception as exc:  # noqa: BLE001 - a broken binary is recorded, not raised
        return f"{module} failed to import: {exc!r}"
    try:
        missing = _missing_kernels(dispatch_key)
    except Exception as exc:  # noqa: BLE001
        return f"{module} is loaded but its {dispatch_key} kernels could not be looked up: {exc!r}"
    if missing:
        return (f"{module} is loaded but has no {dispatch_key} kernel for "
                f"{', '.join('amp_fused::' + name for name in missing)} ({_BUILD_HINTS[module]})")
    return None


# -- fake implementations: shapes, dtypes and devices only, for FakeTensor / meta tracing ---------------------
def _check_lists(op: str, **lists) -> None:
    """The kernels' structural checks, so a traced call fails where an eager one would."""
    names = list(lists)
    lead = lists[names[0]]
    for name in names[1:]:
        if len(lists[name]) != len(lead):
            raise RuntimeError(f"amp_fused::{op}: {name} has {len(lists[name])} tensors but {names[0]} has "
                               f"{len(lead)}; the lists must have the same length")
    for i, ref in enumerate(lead):
        for name in names[1:]:
            t = lists[name][i]
            for what, a, b in (("device", t.device, ref.device), ("shape", tuple(t.shape), tuple(ref.shape)),
                               ("dtype", t.dtype, ref.dtype)):
                if a != b:
                    raise RuntimeError(f"amp_fused::{op}: {name}[{i}] has {what} {a} but {names[0]}[{i}] has "
                                       f"{what} {b}; tensors at one index must have the same {what}")


def _fake_perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first):
    _check_lists("perturb_", params=params, grads=grads, backups=backups)
    device = params[0].device if params else torch.device("cpu")
    return torch.empty(len(params) + 1, dtype=torch.float32, device=device)


def _fake_restore_(params, backups):
    _check_lists("restore_", params=params, backups=backups)


def _fake_restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                       maximize, first_step):
    if momentum != 0:
        _check_lists("restore_sgd_", params=params, backups=backups, grads=grads, momentum_buffers=momentum_buffers)
    else:
        _check_lists("restore_sgd_", params=params, backups=backups, grads=grads)


def _register_fakes() -> str | None:
    if not all(_op_exists(name) for name in OPS):
        return "the ops are not defined (amp_fused._C is not loaded)"
    try:
        for name, fake in (("perturb_", _fake_perturb_), ("restore_", _fake_restore_),
                           ("restore_sgd_", _fake_restore_sgd_)):
            torch.library.register_fake(f"amp_fused::{name}", fake)
    except Exception as exc:  # noqa: BLE001
        return f"registering the fake implementations failed: {exc!r}"
    return None


cpu_error: str | None = _load("amp_fused._C", "CPU")
cuda_error: str | None = _load("amp_fused._C_cuda", "CUDA")
fake_error: str | None = _register_fakes()
