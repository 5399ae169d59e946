"""What a step perturbs: the tensors of each param group on each device, their θ buffers, and the backend
that runs them, built and checked once and reused while nothing about the parameters changes.

Checked at build time (:mod:`amp_fused.checks`): the parameters' dtypes and layouts and that no two of them
share memory. Complex parameters are held as their real views, which the ops take. The θ buffers follow their
parameter's dtype, layout and device, so ``model.double()`` or ``model.to(memory_format=...)`` between steps
only rebuilds the plan. Per step the gradients are gathered (:func:`gradients`): each in its parameter's
layout, checked against it unless the backend checks every call itself. A backend with a ``hold`` hook (Triton)
derives what it needs from the plan's lists once (:func:`hold`), so its calls check only addresses.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from . import checks, functional, options
from .backends import sharded


@dataclass(eq=False, repr=False)
class Part:
    """One param group on one device."""

    group: dict
    params: list  # the parameters, as the user holds them
    views: list  # what the ops take: the parameters, complex ones as real views
    backups: list  # θ buffers, one per view
    backend: object  # resolved for this device
    # The gradients' expected (dtypes, numels, device indices) when every view is a real contiguous tensor (the
    # common case, checked per step in a few C-level passes); None otherwise
    plain: tuple | None = field(default=None, repr=False)

    def __len__(self):
        return len(self.params)

    def __repr__(self):
        return f"<Part: {len(self)} tensors on {self.params[0].device if self.params else '-'}, {self.backend.NAME}>"


@dataclass(eq=False)
class Plan:
    parts: list = field(default_factory=list)
    key: tuple = field(default=(), repr=False)

    def __len__(self):
        return sum(len(part) for part in self.parts)


def key_of(selection) -> tuple:
    """Everything a plan is built from: a plan with this key is valid for ``selection``."""
    return tuple((id(p), p.dtype, p.shape, p.stride(), p.device, p.data_ptr()) for params in selection for p in params)


def fits(tensor: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether ``tensor`` has ``reference``'s dtype, device, shape and layout."""
    return (tensor.dtype == reference.dtype and tensor.device == reference.device
            and tensor.shape == reference.shape and tensor.stride() == reference.stride())


def like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor`` with ``reference``'s dtype, device and layout: itself when it has them, else a copy."""
    return tensor if fits(tensor, reference) else torch.empty_like(reference).copy_(tensor)


def buffer_for(buffers: dict, p, view: torch.Tensor) -> torch.Tensor:
    """``buffers[p]`` when it still fits ``view`` (dtype, device, shape, layout), else a new one put there."""
    buffer = buffers.get(p)
    if buffer is None or not fits(buffer, view):
        buffer = buffers[p] = torch.empty_like(view)
    return buffer


def build(groups, selection, backend_name: str, buffers: dict) -> Plan:
    """The plan for ``selection[i]`` (the parameters of ``groups[i]`` to perturb). ``buffers`` maps a parameter
    to its θ buffer from earlier plans, reused when it still fits and replaced in place when not."""
    plan = Plan(key=key_of(selection))
    by_device = defaultdict(list)
    for group, selected in zip(groups, selection):
        params_by_device = defaultdict(list)
        for p in selected:
            params_by_device[p.device].append(p)
        for device, params in params_by_device.items():
            views = functional.real_views(params)
            backups = [buffer_for(buffers, p, view) for p, view in zip(params, views)]
            part = Part(group, params, views, backups, functional.resolve(backend_name, views))
            plan.parts.append(part)
            by_device[device].append(part)
    for parts in by_device.values():  # one check over all groups: no parameter may share memory with another
        views, backups = ([t for part in parts for t in getattr(part, name)] for name in ("views", "backups"))
        checks.check_lists("perturb_", [("params", sharded.local_tensors(views), True),
                                        ("backups", sharded.local_tensors(backups), True)])
    for part in plan.parts:
        hold(part)
    return plan


def hold(part: Part) -> None:
    """After the checks: what the per-step paths may take as given for ``part``. The backend's ``hold`` hook
    (Triton: the layout and the params' and backups' pointer tables) gets the part's lists once; and where
    every view is a real contiguous tensor, :func:`gradients` compares dtypes, sizes and devices directly."""
    views = part.views
    if views and not sharded.is_sharded(views) and all(
            not p.is_complex() and v.is_contiguous() for p, v in zip(part.params, views)):
        part.plain = (list(map(_DTYPE, views)), list(map(torch.Tensor.numel, views)),
                      list(map(torch.Tensor.get_device, views)))
    backend_hold = getattr(part.backend, "hold", None)
    if backend_hold is not None and views:
        part.views = backend_hold(views, part.backups)


def current(state, groups, selected, check_group, ascent_args, group_keys) -> Plan:
    """The plan for the tensors of ``groups`` a step perturbs (``selected(p)``), from ``state`` (the optimizer's
    AmpState, which caches it): rebuilt only when they change. Checks each group's ascent settings
    (``check_group``); for ``norm="global"``, that every group projects the same ball (``ascent_args(group)``
    alike, ``group_keys`` naming them)."""
    selection = []
    for group in groups:
        check_group(group)
        selection.append([p for p in group["params"] if selected(p)])
    if state.plan is None or state.plan.key != key_of(selection):
        state.plan = build(groups, selection, state.backend, state.backups)
    if state.norm == "global":
        check_one_ball(state.plan, ascent_args, group_keys)
    return state.plan


_GRAD, _DTYPE = operator.attrgetter("grad"), operator.attrgetter("dtype")


def gradients(part: Part) -> list:
    """The gradients of ``part`` as the ops take them: real views for complex parameters, each in its
    parameter's layout (a copy when autograd or the user left it in another one), zeros where missing."""
    if part.plain is not None:
        # Real contiguous parameters whose gradients are all there, contiguous, of their dtype, size and device
        # (what autograd leaves): the ops take them as they are. Sizes as numels, not shapes (a third of the
        # cost): torch itself refuses a .grad of another shape, and an equal numel is what the kernels'
        # flat addressing needs; any other mismatch takes the checked path below.
        grads = list(map(_GRAD, part.params))
        dtypes, numels, devices = part.plain
        try:
            if (list(map(_DTYPE, grads)) == dtypes and list(map(torch.Tensor.numel, grads)) == numels
                    and list(map(torch.Tensor.get_device, grads)) == devices
                    and all(map(torch.Tensor.is_contiguous, grads))):
                return grads
        except Exception:  # noqa: BLE001 - a missing (None) or unusual gradient: the general path says what
            pass
    grads = []
    for p, view in zip(part.params, part.views):
        g = p.grad
        if g is None:
            g = torch.zeros_like(view)
        elif g.layout == torch.strided:  # anything else is rejected by the contract check
            if g.is_complex():
                g = torch.view_as_real(g)
            if g.stride() != view.stride() and g.shape == view.shape:
                g = like(g, view)
        grads.append(g)
    if not part.backend.NATIVE_CHECKS:
        checks.check_lists("perturb_", [("params", part.views, True), ("grads", grads, False)], overlap=False)
    return grads


def writable_gradients(part: Part) -> list:
    """The gradients of ``part`` for an op that writes them (every parameter of the part has one): each
    ``.grad`` itself (complex ones as real views); one in another layout than its parameter is first replaced by
    a copy in the parameter's layout, so that what the op writes is what the base optimizer reads."""
    grads = gradients(part)
    for p, g in zip(part.params, grads):
        own = torch.view_as_real(p.grad) if p.is_complex() else p.grad
        if g is not own and (g.data_ptr() != own.data_ptr() or g.stride() != own.stride()):
            p.grad = torch.view_as_complex(g) if p.is_complex() else g  # g: a copy in the parameter's layout
    return grads


def check_one_ball(plan: Plan, ascent_args, group_keys) -> None:
    """``norm="global"`` projects one Δ: every part must project the same ball (the same ``ascent_args`` of its
    group: the settings ``group_keys`` name) and sit on one device."""
    settings = {ascent_args(part.group) for part in plan.parts}
    devices = {part.params[0].device for part in plan.parts}
    if len(settings) > 1:
        words = " and ".join([", ".join(group_keys[:-1]), group_keys[-1]] if len(group_keys) > 1 else group_keys)
        values = sorted({tuple(part.group[k] for k in group_keys) for part in plan.parts}, key=repr)
        raise ValueError(f"norm='global' projects one Δ over all parameters, so every param group must use "
                         f"the same {words}; got ({', '.join(group_keys)}) = {values}")
    if len(devices) > 1:
        raise ValueError(f"norm='global' needs all parameters on one device, got {sorted(map(str, devices))}")


def perturb_calls(plan: Plan, norm: str, steps_of, ascent_args) -> list:
    """The perturb_ calls of one ascent over ``plan``: one per part, or (``norm="global"``) one over all.
    ``steps_of(part)`` gives the part's ascent steps (gradients, or a stored Δ), ``ascent_args(group)`` its
    (ε, ζ, surface, eta). Each call: (parts, params, steps, backups, (ε, ζ, surface, eta), per_tensor)."""
    calls = [([part], part.views, steps_of(part), part.backups, ascent_args(part.group), True) for part in plan.parts]
    if norm == "global" and calls:
        parts, params, steps, backups = ([x for call in calls for x in call[k]] for k in range(4))
        calls = [(parts, params, steps, backups, calls[0][4], False)]
    return calls


def op_calls(plan: Plan, norm: str, lists_of) -> list:
    """The calls of an op over ``plan``: one per part, or (``norm="global"``) one over all of them.
    ``lists_of(part)`` gives the part's lists. Each call: (parts, lists, per_tensor)."""
    calls = [([part], lists_of(part), True) for part in plan.parts]
    if norm == "global" and calls:
        lists = tuple([t for call in calls for t in call[1][k]] for k in range(len(calls[0][1])))
        calls = [([part for call in calls for part in call[0]], lists, False)]
    return calls


def combined_norms(results: list):
    """One norms vector from the perturb_ calls' results: every tensor's norm, then the norm over all."""
    if len(results) <= 1:
        return results[0] if results else None
    per_tensor = torch.cat([r[:-1].to(results[0].device) for r in results])
    return torch.cat([per_tensor, torch.linalg.vector_norm(per_tensor).reshape(1)])
