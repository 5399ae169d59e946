"""The op table, the backends that implement it, and the one resolver that picks a backend for a call.

Every backend implements the same ops (:data:`OPS`) on lists of tensors; the optimizer never touches
parameters any other way:

``perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, surface=False, eta=None) -> norms``
    One ascent step of Algorithm 1. ``first``: save θ into ``backups`` and take Δ = ζ·g; later
    ascents: Δ = (params − θ) + ζ·g. Then scale = min(1, ε / (‖Δ‖₂ + NORM_EPS)) for each tensor
    (``per_tensor``) or once over all of them, and params ← θ + scale·Δ. A norm that is not finite
    gives scale 0 (``per_tensor``: that tensor; global: every tensor), so a NaN or Inf gradient never
    reaches the parameters; finite inputs never overflow the norm. Returns the fp32 norms ‖Δ‖ before
    projection: one per tensor, then the norm over all tensors.
    ``surface`` (SAM): scale = ε / (‖Δ‖₂ + NORM_EPS) without the min, Δ on the sphere; a scale that
    overflows is 0 as well. ``eta`` (ASAM; a float >= 0, first ascents only): element weights
    T = |θ| + η; the ascent variable is u = ζ·T·g, the norms and the projection are those of u, and
    params ← θ + scale·T·u. Scale 0 always leaves params at θ exactly.
``restore_(params, backups)``
    params ← θ.
``restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
nesterov, maximize, first_step)``
    params ← θ, then one ``torch.optim.SGD`` step with ``grads`` (SGD's exact semantics; with
    ``first_step`` the momentum buffers are initialised to the first d_p; with ``momentum == 0``
    ``momentum_buffers`` is ignored and may be empty).
``perturbation(params, backups) -> list``
    Δ = params − θ of perturbed ``params``, as new tensors.
``norms(tensors) -> norms``
    The fp32 norms ‖t‖₂ of each tensor, then the norm over all of them (as ``perturb_`` returns its norms;
    finite inputs never overflow them). Reads only. The adaptive schedule's ‖g‖² at θ.
``restore_orthogonal_(params, backups, grads, orthogonals, per_tensor)``
    LookSAM's gradient reuse, formed in the restore pass: with Δ = params − θ and g = ``grads`` (the gradient
    at θ + Δ), ``orthogonals`` ← g − c·Δ, c = ⟨Δ, g⟩ / ‖Δ‖² for each tensor (``per_tensor``) or once over all
    of them (sums over all tensors): the part of g orthogonal to Δ. c is 0 where ‖Δ‖² is 0 or c is not
    finite, and then ``orthogonals`` ← g exactly. Then params ← θ (bit for bit, as ``restore_``).
``add_orthogonal_(grads, orthogonals, alpha, per_tensor)``
    grads ← g + α·(‖g‖ / ‖v‖)·v with v = ``orthogonals``, the norms per tensor (``per_tensor``) or over all
    tensors. Where that coefficient is 0 or not finite (v = 0, a NaN or Inf norm) the gradient is left as it
    is, so a non-finite v never reaches it (and a non-finite g stays for GradScaler to see).

What ``backups`` holds between the ops is the backend's business (θ everywhere except ``reference``,
which keeps Δ as the original code does); only the ops read it. An op either completes or raises before
writing anything: the argument contract (:mod:`amp_fused.checks`) is checked first.

A backend is a module (or an object) with ``NAME``, ``DEVICE_TYPES`` (the device types it runs on),
``NATIVE_CHECKS`` (whether its kernels check the argument contract themselves on every call, as the C++
ones do), ``unavailable_reason()`` (``None`` when it can run on this machine, else why not) and every op
of :data:`OPS`; a backend that lacks one is reported unavailable when it loads. DTensor lists (FSDP2)
resolve to the ``sharded`` backend whatever name was asked for.
"""
from __future__ import annotations

import functools
import importlib
import warnings

# Added to ‖Δ‖ before dividing, as the original AMP code does (C++: kNormEps in csrc/amp_math.h).
NORM_EPS = 1e-12

OPS = ("perturb_", "restore_", "restore_sgd_", "perturbation", "norms", "restore_orthogonal_", "add_orthogonal_")

# name -> "module:attribute" (the attribute is the backend; no attribute: the module itself).
_REGISTRY = {
    "reference": "amp_fused.backends.reference",
    "foreach": "amp_fused.backends.foreach",
    "cpu": "amp_fused.backends.native:cpu",
    "cuda": "amp_fused.backends.native:cuda",
    "triton": "amp_fused.backends.triton",
}
# Not a choice: what DTensor parameters always run on.
_SHARDED = "amp_fused.backends.sharded"

# What "auto" tries, fastest first, for each device type. Triton on CPU tensors (its interpreter) is
# for testing only, so "auto" never picks it there.
_AUTO_ORDER = {
    "cpu": ("cpu", "foreach"),
    "cuda": ("cuda", "triton", "foreach"),
}
_AUTO_FALLBACK = ("foreach",)

BACKEND_NAMES = tuple(_REGISTRY)
# Every backend resolve() has returned, by NAME (a plain dict, so that traced code can look one up).
RESOLVED = {}
CHOICES = ("auto",) + BACKEND_NAMES


def _choices_text() -> str:
    return ", ".join(repr(c) for c in CHOICES)


def _import(path: str):
    module_name, _, attribute = path.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


@functools.lru_cache(maxsize=None)
def _load(name: str):
    """(backend, None) or (None, why it cannot be loaded)."""
    try:
        backend = _import(_REGISTRY[name])
    except Exception as exc:  # noqa: BLE001 - an import failure is a reason, not a crash
        return None, f"its module failed to import: {exc!r}"
    missing = [op for op in OPS if not callable(getattr(backend, op, None))]
    if missing:
        return None, f"it does not implement the op table: {', '.join(missing)} missing"
    return backend, None


def get(name: str):
    """The backend called ``name`` (loaded, not necessarily available: see :func:`unavailable_reason`)."""
    check_name(name)
    backend, reason = _load(name)
    if backend is None:
        raise ValueError(f"backend {name!r} cannot be loaded: {reason}")
    return backend


def __getattr__(name):  # `from amp_fused.backends import cpu` gives the backend itself
    if name in _REGISTRY:
        return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or ``None`` when it can."""
    check_name(name)
    if name == "auto":
        return None
    backend, reason = _load(name)
    return reason if backend is None else backend.unavailable_reason()


def check_name(name) -> None:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"backend must be one of {_choices_text()}, got {name!r}")


def available_backends(device_type: str | None = None) -> list[str]:
    """Names of the backends that run on this machine (optionally: for ``device_type`` tensors)."""
    return [name for name in BACKEND_NAMES
            if unavailable_reason(name) is None and (device_type is None or device_type in get(name).DEVICE_TYPES)]


@functools.lru_cache(maxsize=None)
def resolve(name: str, device_type: str, sharded: bool = False):
    """The backend that runs ops for ``name`` ("auto" or a backend name) on ``device_type`` tensors;
    ``sharded``: the tensors include DTensors."""
    backend = _resolve(name, device_type, sharded)
    RESOLVED[backend.NAME] = backend
    return backend


def _resolve(name: str, device_type: str, sharded: bool):
    check_name(name)
    if sharded:
        return _import(_SHARDED)
    if name == "auto":
        passed_over = []
        for candidate in _AUTO_ORDER.get(device_type, _AUTO_FALLBACK):
            reason = unavailable_reason(candidate)
            if reason is None and device_type in get(candidate).DEVICE_TYPES:
                if passed_over:  # once per device type (this function is cached): say what is slower and why
                    warnings.warn(f"amp_fused: backend='auto' uses {candidate!r} for {device_type} tensors because "
                                  + "; ".join(f"{n!r} is unavailable: {r}" for n, r in passed_over),
                                  RuntimeWarning, stacklevel=2)
                return get(candidate)
            passed_over.append((candidate, reason or f"it does not run on {device_type} tensors"))
        raise ValueError(f"no backend runs on {device_type!r} tensors; available here: {available_backends()}")
    reason = unavailable_reason(name)
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available on this machine ({reason}); "
                         f"available: {available_backends()}")
    backend = get(name)
    if device_type not in backend.DEVICE_TYPES:
        raise ValueError(f"backend {name!r} runs on {list(backend.DEVICE_TYPES)} tensors, not {device_type!r}; "
                         f"backends for {device_type!r}: {available_backends(device_type)}")
    return backend
