"""The optimizer's own argument checks: AMP's settings and hyperparameters, checked once where they enter
(construction, ``add_param_group``, ``load_state_dict``). The op arguments are :mod:`amp_fused.checks`' part.

Each check raises before anything is written, with the argument's name and the allowed values.
"""
from __future__ import annotations

import inspect
import math
import numbers

import torch

NORMS = ("per_tensor", "global")
BETWEEN = ("erm", "reuse", "gradient")
ADAPTIVE = "adaptive"  # perturb_every: full steps when the gradient norm at θ is high (AE-SAM's trigger)
# The schedule's settings and their defaults (AMP and SAM take them as keywords): LookSAM's α = 0.7; the
# trigger's EMA decay δ = 0.9 and threshold c (full step when ‖g‖² ≥ mean + c·std).
SCHEDULE_DEFAULTS = dict(perturb_every=1, between="erm", reuse_alpha=0.7, adaptive_threshold=0.5, adaptive_decay=0.9)
BN_STATS = ("all", "unperturbed")


def _choices(values) -> str:
    return ", ".join(map(repr, values))


def hyper(name: str, value, where: str = "") -> float:
    """A finite real number >= 0 (Python, NumPy or 0-d tensor scalars), as a float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0{where}, got {value!r}")
    return float(value)


def flag(name: str, value, where: str = "") -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False{where}, got {value!r}")
    return value


def count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def choice(name: str, value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {_choices(allowed)}, got {value!r}")
    return value


def period(value):
    """perturb_every: an int >= 1 or "adaptive"."""
    if value == ADAPTIVE and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"perturb_every must be an int >= 1 or {ADAPTIVE!r}, got {value!r}")
    return int(value)


def real(name: str, value) -> float:
    """A finite real number (of either sign), as a float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def decay(name: str, value) -> float:
    """A number in [0, 1), as a float."""
    value = hyper(name, value)
    if value >= 1:
        raise ValueError(f"{name} must be a finite number >= 0 and < 1, got {value!r}")
    return value


def schedule(perturb_every, between, reuse_alpha, adaptive_threshold, adaptive_decay) -> dict:
    """The schedule's settings, checked alone and together."""
    checked = dict(perturb_every=period(perturb_every), between=choice("between", between, BETWEEN),
                   reuse_alpha=hyper("reuse_alpha", reuse_alpha),
                   adaptive_threshold=real("adaptive_threshold", adaptive_threshold),
                   adaptive_decay=decay("adaptive_decay", adaptive_decay))
    schedule_pair(checked["perturb_every"], checked["between"])
    return checked


def schedule_pair(perturb_every, between) -> None:
    if perturb_every == ADAPTIVE and between == "reuse":
        raise ValueError("perturb_every='adaptive' decides each step from the gradient at θ, which a 'reuse' step "
                         "never computes (its one pass is at θ + the last Δ); use between='erm' or 'gradient'")


def settings(inner_iter, norm, **schedule_settings) -> dict:
    """The settings a checkpoint carries, checked (construction and ``load_state_dict`` share this); the
    schedule's settings missing from ``schedule_settings`` take their defaults."""
    return dict(inner_iter=count("inner_iter", inner_iter, 0), norm=choice("norm", norm, NORMS),
                **schedule(**dict(SCHEDULE_DEFAULTS, **schedule_settings)))


def backend(name) -> None:
    from . import backends

    backends.check_name(name)
    reason = backends.unavailable_reason(name)
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available on this machine ({reason}); "
                         f"available: {backends.available_backends()}")


def base_optimizer(cls) -> None:
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass, got {cls!r}")
    try:
        closure = inspect.signature(cls.step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read: let it run
        return
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(f"base_optimizer {cls.__name__} needs a closure in step() (it re-evaluates the loss, as "
                        "LBFGS does), but AMP's base step uses the gradient at θ + Δ without one; use an optimizer "
                        "whose step(closure=None) works, e.g. torch.optim.SGD or torch.optim.AdamW")


def model_options(model, bn_stats, sync_ascent) -> None:
    choice("bn_stats", bn_stats, BN_STATS)
    flag("sync_ascent", sync_ascent)
    if (bn_stats != "all" or not sync_ascent) and not isinstance(model, torch.nn.Module):
        raise ValueError("bn_stats='unperturbed' and sync_ascent=False need the model: pass model=<nn.Module>, "
                         f"got model={model!r}")
    if not sync_ascent and not hasattr(model, "no_sync"):
        raise ValueError("sync_ascent=False needs a DistributedDataParallel model (one with no_sync()), got "
                         f"{type(model).__name__}")


def group(param_group: dict, check_settings, where: str = " in a param group") -> None:
    """A param group's ascent settings (``check_settings(group, where)`` returns them checked; stored in place)
    and its parameters (no duplicates: a tensor listed twice would be perturbed twice and restored once)."""
    param_group.update(check_settings(param_group, where))
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
        param_group["params"] = [params]
    elif not isinstance(params, set):  # torch.optim rejects sets itself
        param_group["params"] = list(params)
    seen = set()
    for i, p in enumerate(param_group["params"]):
        p = p[1] if isinstance(p, tuple) else p  # (name, tensor) pairs
        if isinstance(p, torch.Tensor):
            if id(p) in seen:
                raise ValueError(f"params: the same tensor is listed twice{where} (at position {i}); AMP would "
                                 "perturb it twice and restore it once, so every parameter must appear once")
            seen.add(id(p))
