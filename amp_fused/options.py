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
BETWEEN = ("erm", "reuse")
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


def settings(inner_iter, norm, perturb_every, between) -> dict:
    """The settings a checkpoint carries, checked (construction and ``load_state_dict`` share this)."""
    return dict(inner_iter=count("inner_iter", inner_iter, 0), norm=choice("norm", norm, NORMS),
                perturb_every=count("perturb_every", perturb_every, 1), between=choice("between", between, BETWEEN))


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
