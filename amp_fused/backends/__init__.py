"""The op table and the dispatcher that picks a backend for it.

Every backend is a module that implements the same three in-place ops on lists of tensors
(the optimizer never touches parameters any other way):

``perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first) -> norms``
    One ascent step of Algorithm 1. ``first``: save θ into ``backups`` and take Δ = ζ·g; later
    ascents: Δ = (params − backups) + ζ·g. Then scale = min(1, ε / (‖Δ‖₂ + 1e-12)) for each
    tensor (``per_tensor``) or once over all of them, and params ← backups + scale·Δ. A norm that
    is not finite gives scale 0 (``per_tensor``: that tensor; global: every tensor), so a NaN or
    Inf gradient never reaches the parameters. Returns the fp32 norms ‖Δ‖ before projection:
    one per tensor, then the norm over all tensors.
``restore_(params, backups)``
    params ← θ.
``restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
nesterov, maximize, first_step)``
    params ← θ, then one ``torch.optim.SGD`` step with ``grads`` (SGD's exact semantics; with
    ``first_step`` the momentum buffers are initialised to the first d_p).

A backend module also defines ``NAME``, ``DEVICE_TYPES`` (the device types it runs on) and
``unavailable_reason()`` (``None`` when it can run on this machine, else why not).
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

# name -> module path.
_REGISTRY = {
    "reference": "amp_fused.backends.reference",
    "foreach": "amp_fused.backends.foreach",
    "cpu": "amp_fused.backends.cpu",
    "cuda": "amp_fused.backends.cuda",
    "triton": "amp_fused.backends.triton",
}

# What "auto" tries, fastest first, for each device type. Triton on CPU tensors (its interpreter) is
# for testing only, so "auto" never picks it there.
_AUTO_ORDER = {
    "cpu": ("cpu", "foreach"),
    "cuda": ("cuda", "triton", "foreach"),
}
_AUTO_FALLBACK = ("foreach",)

BACKEND_NAMES = tuple(_REGISTRY)
CHOICES = ("auto",) + BACKEND_NAMES


def _choices_text() -> str:
    return ", ".join(repr(c) for c in CHOICES)


@functools.lru_cache(maxsize=None)
def _module(name: str) -> ModuleType:
    return importlib.import_module(_REGISTRY[name])


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or ``None`` when it can."""
    check_name(name)
    if name == "auto":
        return None
    try:
        module = _module(name)
    except Exception as exc:  # noqa: BLE001 - an import failure is a reason, not a crash
        return f"its module failed to import: {exc!r}"
    return module.unavailable_reason()


def check_name(name) -> None:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"backend must be one of {_choices_text()}, got {name!r}")


def available_backends(device_type: str | None = None) -> list[str]:
    """Names of the backends that run on this machine (optionally: for ``device_type`` tensors)."""
    names = []
    for name in BACKEND_NAMES:
        if unavailable_reason(name) is not None:
            continue
        if device_type is not None and device_type not in _module(name).DEVICE_TYPES:
            continue
        names.append(name)
    return names


@functools.lru_cache(maxsize=None)
def resolve(name: str, device_type: str) -> ModuleType:
    """The backend module that runs op ``name`` ("auto" or a backend name) on ``device_type``."""
    check_name(name)
    if name == "auto":
        passed_over = []
        for candidate in _AUTO_ORDER.get(device_type, _AUTO_FALLBACK):
            reason = unavailable_reason(candidate)
            if reason is None and device_type in _module(candidate).DEVICE_TYPES:
                if passed_over:  # once per device type (this function is cached): say what is slower and why
                    warnings.warn(f"amp_fused: backend='auto' uses {candidate!r} for {device_type} tensors because "
                                  + "; ".join(f"{n!r} is unavailable: {r}" for n, r in passed_over),
                                  RuntimeWarning, stacklevel=2)
                return _module(candidate)
            passed_over.append((candidate, reason or f"it does not run on {device_type} tensors"))
        raise ValueError(f"no backend runs on {device_type!r} tensors; available here: {available_backends()}")
    reason = unavailable_reason(name)
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available on this machine ({reason}); "
                         f"available: {available_backends()}")
    module = _module(name)
    if device_type not in module.DEVICE_TYPES:
        raise ValueError(f"backend {name!r} runs on {list(module.DEVICE_TYPES)} tensors, not {device_type!r}; "
                         f"backends for {device_type!r}: {available_backends(device_type)}")
    return module
