"""An independent implementation of one AMP step (Algorithm 1 of Zheng, Zhang & Mao, CVPR 2021).

It is written only with ``torch.func.functional_call`` and ``torch.autograd.grad`` on dicts of tensors,
imports nothing from torch.optim and nothing from amp_fused but the constant NORM_EPS (through
:mod:`op_definition`, whose projection scale it uses: the op table's definition, written independently of
the backends), and keeps Δ explicitly, so the optimizer's tests compare against a computation that shares
none of its code paths.

One step, for parameters θ, a batch and N = ``inner_iter``::

    g = ∇L(θ);  Δ = 0
    N times:  Δ ← Δ + ζ·g
              scale = min(1, ε / (‖Δ‖₂ + NORM_EPS))   per tensor ("per_tensor") or over all tensors ("global")
              Δ ← scale·Δ                               (a norm that is not finite gives scale 0)
              g = ∇L(θ + Δ)
    θ ← base update of θ with the last g

The perturbation always ascends L, also when the base update maximizes. Parameters whose gradient at θ
is ``None`` (not reached by the loss) are not perturbed, and, as in torch.optim, the base update skips
every parameter whose last gradient is ``None``. The module runs in whatever mode it is in; in train
mode its buffers (BatchNorm running statistics) are updated by every one of the 1 + N forward passes, as
they are on a model driven by the optimizer with its default ``bn_stats="all"``.

The base updates are torch.optim.SGD (torch/optim/sgd.py) and torch.optim.AdamW (torch/optim/adam.py
with decoupled weight decay, amsgrad off) written out; their state uses torch's key names so it can be
compared with ``optimizer.state[p]`` directly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, NamedTuple

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_map

from op_definition import projection_scale

NORMS = ("per_tensor", "global")

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class SGDRule:
    """torch.optim.SGD's update for one tensor; state key ``momentum_buffer``."""

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    def update(self, theta: torch.Tensor, grad: torch.Tensor, lr: float, state: dict):
        d_p = -grad if self.maximize else grad
        if self.weight_decay != 0:
            d_p = d_p + self.weight_decay * theta
        state = dict(state)
        if self.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d_p.clone()  # the first step initialises the buffer to d_p, without dampening
            else:
                buf = self.momentum * buf + (1 - self.dampening) * d_p
            state["momentum_buffer"] = buf
            d_p = d_p + self.momentum * buf if self.nesterov else buf
        return theta - lr * d_p, state


@dataclasses.dataclass(frozen=True)
class AdamWRule:
    """torch.optim.AdamW's update for one tensor; state keys ``step``, ``exp_avg``, ``exp_avg_sq``."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    maximize: bool = False

    def update(self, theta: torch.Tensor, grad: torch.Tensor, lr: float, state: dict):
        beta1, beta2 = self.betas
        g = -grad if self.maximize else grad
        step = state.get("step", 0) + 1
        exp_avg = state.get("exp_avg", torch.zeros_like(theta))
        exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(theta))
        theta = theta * (1 - lr * self.weight_decay)  # decoupled: decays θ, not the gradient
        exp_avg = exp_avg + (1 - beta1) * (g - exp_avg)
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        denom = exp_avg_sq.sqrt() / math.sqrt(bias_correction2) + self.eps
        theta = theta - (lr / bias_correction1) * (exp_avg / denom)
        return theta, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class AMPStep(NamedTuple):
    params: Tensors  # θ after the step
    constants: Tensors  # buffers (and frozen parameters) after the 1 + N forward passes
    state: dict[str, dict]  # base-optimizer state per parameter name
    outputs: object  # module outputs at θ (the first forward), detached
    loss: torch.Tensor  # loss at θ, detached
    last_loss: torch.Tensor  # loss of the last forward (at θ + Δ when N > 0), detached
    ascent_norms: list[tuple[dict[str, float], float]]  # per ascent: ‖Δ‖ per tensor and overall, before projection


def _per_name(what: str, value, names) -> dict[str, float]:
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"{what} has no value for parameters {missing}")
        return {n: float(value[n]) for n in names}
    return {n: float(value) for n in names}


def evaluate(module: torch.nn.Module, params: Tensors, constants: Tensors, inputs, targets,
             loss_fn: Callable) -> tuple[object, torch.Tensor, dict[str, torch.Tensor | None]]:
    """One forward and backward: (outputs, loss, ∇L per parameter name, None where L does not reach it).

    ``constants`` are passed to the module as they are, so a train-mode BatchNorm updates them in place.
    """
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        outputs = functional_call(module, {**constants, **leaves}, (inputs,))
        loss = loss_fn(outputs, targets)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    detached = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, outputs)
    return detached, loss.detach(), dict(zip(leaves, grads))


def amp_step(module: torch.nn.Module, params: Mapping[str, torch.Tensor], constants: Mapping[str, torch.Tensor],
             loss_fn: Callable, batch, state: Mapping[str, dict] | None = None, *, rule, lr, epsilon,
             inner_lr=1.0, inner_iter: int = 1, norm: str = "per_tensor") -> AMPStep:
    """One AMP step of ``module`` on ``batch = (inputs, targets)`` with loss ``loss_fn(outputs, targets)``.

    ``params``: the optimised parameters by name (θ); ``constants``: every other tensor the module needs
    (buffers, frozen parameters). ``lr``, ``epsilon`` and ``inner_lr`` are numbers or mappings from
    parameter name to number (per-parameter settings, as param groups give); with ``norm="global"`` one
    ε governs all tensors, so ``epsilon`` must then be one number. ``rule``: :class:`SGDRule` or
    :class:`AdamWRule`. ``inner_iter=0`` is one plain base-optimizer (ERM) step. Nothing passed in is
    modified.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if isinstance(inner_iter, bool) or not isinstance(inner_iter, int) or inner_iter < 0:
        raise ValueError(f"inner_iter must be an int >= 0, got {inner_iter!r}")
    if norm == "global" and isinstance(epsilon, Mapping):
        raise ValueError("norm='global' projects Δ over all tensors onto one ball: epsilon must be a number")
    names = list(params)
    lrs = _per_name("lr", lr, names)
    epsilons = _per_name("epsilon", epsilon, names)
    inner_lrs = _per_name("inner_lr", inner_lr, names)
    state = {n: dict(s) for n, s in (state or {}).items()}

    theta = {n: p.detach() for n, p in params.items()}
    constants = {n: t.detach().clone() for n, t in constants.items()}  # the forwards update these in place
    inputs, targets = batch

    outputs, loss, grads = evaluate(module, theta, constants, inputs, targets, loss_fn)
    first_outputs, first_loss = outputs, loss
    perturbed_names = [n for n in names if grads[n] is not None]
    delta = {n: torch.zeros_like(theta[n]) for n in perturbed_names}
    ascent_norms = []
    for _ in range(inner_iter):
        delta = {n: delta[n] + inner_lrs[n] * _or_zero(grads[n], theta[n]) for n in perturbed_names}
        # fp64 norms: the oracle does not inherit the kernels' fp32 accumulation.
        tensor_norms = {n: torch.linalg.vector_norm(delta[n].double()).item() for n in perturbed_names}
        total_norm = math.sqrt(sum(v * v for v in tensor_norms.values()))
        ascent_norms.append((tensor_norms, total_norm))
        if norm == "per_tensor":
            scales = {n: projection_scale(epsilons[n], tensor_norms[n]) for n in perturbed_names}
        else:
            shared = projection_scale(float(epsilon), total_norm)
            scales = {n: shared for n in perturbed_names}
        # A zero scale drops Δ outright: 0·NaN would still be NaN.
        delta = {n: scales[n] * delta[n] if scales[n] != 0 else torch.zeros_like(delta[n]) for n in perturbed_names}
        perturbed = {n: theta[n] + delta[n] if n in delta else theta[n] for n in names}
        _outputs, loss, grads = evaluate(module, perturbed, constants, inputs, targets, loss_fn)

    new_params = {n: t.clone() for n, t in theta.items()}  # no aliasing of the caller's tensors
    for n in names:
        if grads[n] is not None:
            new_params[n], state[n] = rule.update(theta[n], grads[n], lrs[n], state.get(n, {}))
    return AMPStep(new_params, constants, state, first_outputs, first_loss, loss, ascent_norms)


def _or_zero(grad, like):
    return torch.zeros_like(like) if grad is None else grad
