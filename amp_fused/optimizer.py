"""Adversarial Model Perturbation (Zheng, Zhang & Mao, CVPR 2021) as a torch.optim optimizer.

Algorithm 1, per batch: g = ∇L(θ); Δ = 0; N times: Δ ← Δ + ζ·g, project Δ onto the ε-ball, move
the model to θ + Δ and recompute g there. Then put θ back and let the base optimizer step with the
last g. The tensor work happens in the op layer (:mod:`amp_fused.functional`); this file only
decides what to call when.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections import defaultdict

import torch
from torch.utils._pytree import tree_map

from . import backends, functional

NORMS = ("per_tensor", "global")
BETWEEN = ("erm", "reuse")
BN_STATS = ("all", "unperturbed")


def _check_hyper(name: str, value, where: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0{where}, got {value!r}")


def _detached(result):
    """Validate what a closure returned and detach it: a loss tensor or an (outputs, loss) pair."""
    if isinstance(result, torch.Tensor):
        return result.detach()
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], torch.Tensor):
        outputs, loss = result
        return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, outputs), loss.detach()
    raise TypeError("closure must return the loss tensor or an (outputs, loss) pair with a loss tensor, "
                    f"got {type(result).__name__}")


def _eager_under_compile(fn):
    """Run ``fn`` eagerly under torch.compile.

    Dynamo (torch 2.14) silently drops attribute assignments on the torch.optim.Optimizer objects it traces, and
    this optimizer keeps its progress (ascent count, plan, step count) in attributes: a traced step would skip the
    restore. So the stepping methods run eagerly; compile the model instead (a compiled model still runs compiled
    inside them), the ops themselves are fused already. ``torch.compiler.disable`` is applied at the first call,
    as torch.optim does, so that importing amp_fused does not import Dynamo.
    """
    disabled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(
                fn, reason="AMP keeps its per-step state in optimizer attributes, whose assignments Dynamo drops")
        return disabled(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _frozen_bn_statistics(model):
    """BatchNorm layers run with momentum 0 (running statistics unchanged) and their batch counters kept."""
    saved = []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            saved.append((module, module.momentum, module.num_batches_tracked.clone()))
            module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum, count in saved:
            module.momentum = momentum
            module.num_batches_tracked.copy_(count)


class AMP(torch.optim.Optimizer):
    """Adversarial Model Perturbation around any base optimizer (drop-in for the original ``AMP``).

    Args:
        params: parameters or param groups (groups may set their own ``lr``, ``epsilon``, ``inner_lr``
            and base-optimizer options).
        lr: learning rate of the base optimizer (η).
        epsilon: radius ε of the L2 ball the perturbation Δ is projected onto.
        inner_lr: inner learning rate ζ of the ascent (default 1).
        inner_iter: number N of ascent steps per batch (default 1; 0 is plain ERM).
        base_optimizer: the optimizer class that takes the outer step (default ``torch.optim.SGD``).
        norm: ``"per_tensor"`` projects each parameter tensor on its own ε-ball (what the original code
            does; the default), ``"global"`` projects Δ over all parameters (the paper's Algorithm 1).
        backend: ``"auto"`` (fastest available for the parameters' device) or a name from
            :func:`amp_fused.available_backends`. DTensor parameters (FSDP2's ``fully_shard``) always take
            :mod:`amp_fused.sharded`: foreach ops on the local shards, with the norms of the full tensors.
        perturb_every: amortised schedule of ``step(closure)``: steps 0, k, 2k, ... are full AMP steps, the
            others are cheaper steps of the kind ``between`` names (default 1: every step is exact AMP).
        between: ``"erm"``: a plain base-optimizer step (one closure call); ``"reuse"``: the Δ of the last full
            step, projected onto the current ε-ball, is applied at the current θ, then one closure call at θ + Δ,
            restore and the base step (one closure call; keeps one more parameter-sized buffer).
        model: the module being trained; needed only by ``bn_stats`` and ``sync_ascent``.
        bn_stats: ``"all"`` (default, as the original): every forward pass updates BatchNorm running statistics;
            ``"unperturbed"``: passes at θ + Δ run with BN momentum 0, so only the pass at θ updates them
            (a ``reuse`` step then updates none).
        sync_ascent: with a ``DistributedDataParallel`` model, ``False`` runs the ascent backward passes under
            ``no_sync()``: each worker perturbs with its local gradient (one all-reduce saved per step; SAM's
            "m-sharpness"). The final backward, whose gradient the base optimizer uses, is always synchronised.
        **base_kwargs: passed to ``base_optimizer`` (momentum, weight_decay, ...).

    ``step(closure)``: the closure runs forward and backward and returns ``loss`` or ``(outputs, loss)``;
    ``step`` zero-grads before each call (so the closure may or may not) and returns what the first call
    returned, detached. Without a closure use ``first_step()`` / ``second_step()``.
    """

    def __init__(self, params, lr, epsilon, inner_lr=1.0, inner_iter=1, base_optimizer=torch.optim.SGD, *,
                 norm="per_tensor", backend="auto", perturb_every=1, between="erm", model=None, bn_stats="all",
                 sync_ascent=True, **base_kwargs):
        _check_hyper("epsilon", epsilon)
        _check_hyper("inner_lr", inner_lr)
        if isinstance(inner_iter, bool) or not isinstance(inner_iter, int) or inner_iter < 0:
            raise ValueError(f"inner_iter must be an int >= 0, got {inner_iter!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
        if isinstance(perturb_every, bool) or not isinstance(perturb_every, int) or perturb_every < 1:
            raise ValueError(f"perturb_every must be an int >= 1, got {perturb_every!r}")
        if between not in BETWEEN:
            raise ValueError(f"between must be one of {', '.join(map(repr, BETWEEN))}, got {between!r}")
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {', '.join(map(repr, BN_STATS))}, got {bn_stats!r}")
        if (bn_stats != "all" or not sync_ascent) and not isinstance(model, torch.nn.Module):
            raise ValueError("bn_stats='unperturbed' and sync_ascent=False need the model: pass model=<nn.Module>, "
                             f"got model={model!r}")
        if not sync_ascent and not hasattr(model, "no_sync"):
            raise ValueError("sync_ascent=False needs a DistributedDataParallel model (one with no_sync()), got "
                             f"{type(model).__name__}")
        backends.check_name(backend)
        if backend != "auto":
            reason = backends.unavailable_reason(backend)
            if reason is not None:
                raise ValueError(f"backend {backend!r} is not available on this machine ({reason}); "
                                 f"available: {backends.available_backends()}")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass, got {base_optimizer!r}")

        self.inner_iter = inner_iter
        self.norm = norm
        self.backend = backend
        self.perturb_every = perturb_every
        self.between = between
        self.steps = 0  # step(closure) calls completed; the schedule counts these
        self.model = model
        self.bn_stats = bn_stats
        self.sync_ascent = sync_ascent
        defaults = dict(lr=lr, epsilon=epsilon, inner_lr=inner_lr, **base_kwargs)
        super().__init__(params, defaults)
        # The base optimizer shares our param-group dicts, so schedulers and per-group options reach both.
        self.base_optimizer = base_optimizer(self._own_param_groups, lr=lr, **base_kwargs)
        self._ascents = 0  # ascent steps taken since θ was saved; > 0 means the parameters are perturbed
        self._plan = []  # (group, params, backups) per group and device while perturbed
        self._plan_key, self._plan_cache = None, []  # the last plan built, and what it was built for
        self._keep_delta = False  # whether second_step stores Δ for the "reuse" steps that follow
        self._step_norms = []  # the norms of every ascent of the current step
        self.last_norms = None  # fp32 norms of Δ from the last ascent, for logging

    # -- param groups live in the base optimizer -------------------------------------------------------
    @property
    def param_groups(self):
        base = self.__dict__.get("base_optimizer")
        return base.param_groups if base is not None else self._own_param_groups

    @param_groups.setter
    def param_groups(self, groups):
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.param_groups = groups
        else:
            self._own_param_groups = groups

    def add_param_group(self, param_group):
        for key in ("epsilon", "inner_lr"):
            if key in param_group:
                _check_hyper(key, param_group[key], " in a param group")
        base = self.__dict__.get("base_optimizer")
        if base is None:
            return super().add_param_group(param_group)
        for key in ("epsilon", "inner_lr"):
            param_group.setdefault(key, self.defaults[key])
        base.add_param_group(param_group)

    # -- Algorithm 1 ---------------------------------------------------------------------------------
    @_eager_under_compile
    @torch.no_grad()
    def step(self, closure=None, scaler=None):
        """One AMP step: ``inner_iter`` ascents, each followed by a closure call, then the base step.

        With a ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` the closure calls, pass it as ``scaler``
        (and call ``scaler.update()`` afterwards, as usual): the ascent uses the unscaled gradient, and a
        non-finite gradient in any pass skips the base step so that the scaler backs off.
        """
        if closure is None:
            raise ValueError("AMP.step needs a closure (it runs forward and backward twice); without one, "
                             "call first_step() and second_step() around your own backward passes")
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        closure = torch.enable_grad()(closure)
        kind = self.next_step_kind()
        self._keep_delta = kind == "amp" and self.between == "reuse" and self.perturb_every > 1
        ascents = self.inner_iter if kind == "amp" else 0
        try:
            self.zero_grad()
            if kind == "reuse":
                self._perturb(self._reused_delta_plan(), first=True, reuse=True)  # θ + Δ_last
                result = _detached(self._forward_backward(closure, perturbed=True, ascent=False))  # ∇L(θ + Δ)
                self._second_step(scaler)
            else:
                result = _detached(self._forward_backward(closure, perturbed=False, ascent=ascents > 0))  # ∇L(θ)
                for i in range(ascents):
                    self._first_step(scaler)  # θ + Δ
                    self.zero_grad()
                    self._forward_backward(closure, perturbed=True, ascent=i < ascents - 1)  # ∇L(θ + Δ)
                if self._ascents:
                    self._second_step(scaler)  # θ, then the base step with the last g
                elif scaler is not None:
                    scaler.step(self.base_optimizer)
                else:
                    self.base_optimizer.step()
        except BaseException:
            self._restore()  # never leave the parameters perturbed
            raise
        finally:
            self._keep_delta = False
        self.steps += 1
        return result

    def _forward_backward(self, closure, perturbed, ascent):
        """One closure call, with BN statistics frozen at θ + Δ and DDP's all-reduce skipped for ascents when
        the options ask for it."""
        with contextlib.ExitStack() as stack:
            if perturbed and self.bn_stats == "unperturbed":
                stack.enter_context(_frozen_bn_statistics(self.model))
            if ascent and not self.sync_ascent:
                stack.enter_context(self.model.no_sync())
            return closure()

    def next_step_kind(self) -> str:
        """What the next ``step(closure)`` does: ``"amp"`` (full), ``"erm"`` or ``"reuse"``."""
        if self.steps % self.perturb_every == 0:
            return "amp"
        if self.between == "reuse" and not any("reuse_delta" in s for s in self.state.values()):
            return "amp"  # nothing to reuse yet (e.g. resumed from a plain base-optimizer state dict)
        return self.between

    @_eager_under_compile
    @torch.no_grad()
    def first_step(self, zero_grad=False, scaler=None):
        """Ascent: Δ ← Δ + ζ·∇L, projected onto the ε-ball; the parameters become θ + Δ.

        Call after a backward pass; call again after another backward for one more inner iteration. With a
        GradScaler-scaled backward, pass the ``scaler``: the ascent then uses ζ/scale (one host sync to read it).
        """
        self._first_step(scaler)
        if zero_grad:
            self.zero_grad()

    def _first_step(self, scaler):
        first = self._ascents == 0
        inv_scale = 1.0 / scaler.get_scale() if scaler is not None else 1.0
        self._perturb(self._make_plan(lambda p: p.grad is not None) if first else self._plan, first,
                      inv_scale=inv_scale)

    @_eager_under_compile
    @torch.no_grad()
    def second_step(self, zero_grad=False, scaler=None):
        """Put θ back and let the base optimizer step with the gradient taken at θ + Δ (through ``scaler.step``
        when a GradScaler is passed; call ``scaler.update()`` afterwards as usual)."""
        if not self._ascents:
            raise RuntimeError("second_step() needs a preceding first_step(): the parameters are not perturbed")
        self._second_step(scaler)
        if zero_grad:
            self.zero_grad()

    def _second_step(self, scaler):
        if self._keep_delta:
            for _group, params, backups in self._plan:
                deltas = functional.perturbation(params, backups, backend=self.backend, validate=False)
                for p, delta in zip(params, deltas):
                    self.state[p]["reuse_delta"] = delta
        if scaler is not None:
            self._report_ascent_overflow()
            self._restore()
            scaler.step(self.base_optimizer)
        elif not self._fused_sgd_step():
            self._restore()
            self.base_optimizer.step()
        self._end_perturbation()

    @_eager_under_compile
    @torch.no_grad()
    def restore(self):
        """Put θ back without stepping (a no-op when the parameters are not perturbed)."""
        self._restore()

    def _restore(self):
        for _group, params, backups in self._plan:
            functional.restore_(params, backups, backend=self.backend, validate=False)
        self._end_perturbation()

    @contextlib.contextmanager
    def restore_on_error(self):
        """For the two-call API: ``with opt.restore_on_error(): ...`` puts θ back if the block raises."""
        try:
            yield self
        except BaseException:
            self.restore()
            raise

    @property
    def last_ascent_nonfinite(self) -> torch.Tensor | None:
        """0-d bool tensor: whether the last ascent met a non-finite ‖Δ‖ (so some or, for ``global``, all of
        its Δ were zeroed). Stays on the device; reading it as a Python bool syncs."""
        if self.last_norms is None:
            return None
        return torch.logical_not(torch.isfinite(self.last_norms).all())

    def _end_perturbation(self):
        self._ascents = 0
        self._plan = []
        self._step_norms = []

    def _report_ascent_overflow(self):
        """Make the scaler see an overflow of the ascent passes: their gradients are gone, but the step must be
        skipped all the same. Adding +Inf (or exactly 0) to one gradient element does it without a host sync."""
        if not self._step_norms:
            return
        norms = torch.cat([n.to(self._step_norms[0].device) for n in self._step_norms])
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.numel():
                    flag = torch.logical_not(torch.isfinite(norms).all()).to(p.grad.device)
                    p.grad.view(-1)[:1].add_(torch.where(flag, float("inf"), 0.0).to(p.grad.dtype))
                    return

    # -- plumbing --------------------------------------------------------------------------------------
    def _perturb(self, plan, first, reuse=False, inv_scale=1.0):
        """One ascent over ``plan``: with the current gradients (times ``inv_scale``, for GradScaler), or
        (``reuse``) with the stored Δ as the step."""
        self._plan = plan
        results = []
        for per_tensor, params, steps, backups, epsilon, inner_lr in self._perturb_calls(reuse):
            results.append(functional.perturb_(params, steps, backups, epsilon, inner_lr * inv_scale, per_tensor,
                                               first, backend=self.backend, validate=False))
        if len(results) > 1:
            per_tensor_norms = torch.cat([r[:-1].to(results[0].device) for r in results])
            results = [torch.cat([per_tensor_norms, torch.linalg.vector_norm(per_tensor_norms).reshape(1)])]
        self.last_norms = results[0] if results else None
        if self.last_norms is not None:
            self._step_norms.append(self.last_norms)
        self._ascents += 1

    def _make_plan(self, selected):
        """The tensors this step perturbs (``selected(p)``), per group and device, with their θ buffers.

        Cached: rebuilt only when the selection, or a selected tensor's shape or dtype, changes."""
        selection = []
        for group in self.param_groups:
            _check_hyper("epsilon", group["epsilon"], " in a param group")
            _check_hyper("inner_lr", group["inner_lr"], " in a param group")
            selection.append([p for p in group["params"] if selected(p)])
        key = tuple((id(p), p.shape, p.dtype, p.device) for params in selection for p in params)
        if key != self._plan_key:
            self._plan_key, self._plan_cache = key, self._build_plan(selection)
        plan = self._plan_cache
        if self.norm == "global" and plan:
            settings = {(g["epsilon"], g["inner_lr"]) for g, _, _ in plan}
            devices = {params[0].device for _, params, _ in plan}
            if len(settings) > 1:
                raise ValueError("norm='global' projects one Δ over all parameters, so every param group must use "
                                 f"the same epsilon and inner_lr; got (epsilon, inner_lr) = {sorted(settings)}")
            if len(devices) > 1:
                raise ValueError(f"norm='global' needs all parameters on one device, got {sorted(map(str, devices))}")
        return plan

    def _build_plan(self, selection):
        plan = []
        for group, selected in zip(self.param_groups, selection):
            by_device = defaultdict(list)
            for p in selected:
                by_device[p.device].append(p)
            for params in by_device.values():
                backups = []
                for p in params:
                    state = self.state[p]
                    if "backup" not in state or state["backup"].shape != p.shape or state["backup"].dtype != p.dtype:
                        state["backup"] = torch.empty_like(p)  # one parameter-sized buffer, reused every step
                    backups.append(state["backup"])
                plan.append((group, params, backups))
        return plan

    def _reused_delta_plan(self):
        return self._make_plan(lambda p: "reuse_delta" in self.state.get(p, ()))

    def _perturb_calls(self, reuse=False):
        """Arguments of the perturb_ calls: one per group and device, or one over everything (global).

        The ascent step is ζ·grad; for a reuse step it is the stored Δ itself (inner_lr 1)."""
        calls = []
        for group, params, backups in self._plan:
            if reuse:
                steps, inner_lr = [self.state[p]["reuse_delta"] for p in params], 1.0
            else:
                steps = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                inner_lr = group["inner_lr"]
            calls.append((True, params, steps, backups, group["epsilon"], inner_lr))
        if self.norm == "global" and calls:
            epsilon, inner_lr = calls[0][4], calls[0][5]
            merged = [sum((c[k] for c in calls), []) for k in (1, 2, 3)]
            calls = [(False, *merged, epsilon, inner_lr)]
        return calls

    def _fused_sgd_step(self) -> bool:
        """Restore θ and take the SGD step in one op when the base optimizer is plain torch.optim.SGD."""
        base = self.base_optimizer
        if type(base) is not torch.optim.SGD or base._optimizer_step_pre_hooks or base._optimizer_step_post_hooks:
            return False
        perturbed = sum(len(params) for _, params, _ in self._plan)
        with_grad = sum(p.grad is not None for g in self.param_groups for p in g["params"])
        if perturbed != with_grad:
            return False  # some tensor gained or lost its gradient since the ascent: take the general path
        for group, params, _ in self._plan:
            if (isinstance(group["lr"], torch.Tensor) or group.get("differentiable") or group.get("fused")
                    or any(p.grad is None or p.grad.is_sparse for p in params)):
                return False
        for group, params, backups in self._plan:
            momentum = group["momentum"]
            grads = [p.grad for p in params]
            args = (group["lr"], momentum, group["dampening"], group["weight_decay"], group["nesterov"],
                    group["maximize"])
            if momentum == 0:
                functional.restore_sgd_(params, backups, grads, [], *args, False, backend=self.backend,
                                        validate=False)
                continue
            # SGD keeps its buffers as state[p]["momentum_buffer"]; a missing one is initialised to d_p.
            states = [base.state[p] for p in params]
            fresh = [state.get("momentum_buffer") is None for state in states]
            if any(fresh):
                for p, state, is_fresh in zip(params, states, fresh):
                    if is_fresh:
                        state["momentum_buffer"] = torch.empty_like(p)
            buffers = [state["momentum_buffer"] for state in states]
            for first_step in (True, False) if any(fresh) else (False,):
                idx = [i for i, is_fresh in enumerate(fresh) if is_fresh == first_step]
                if len(idx) == len(params):
                    functional.restore_sgd_(params, backups, grads, buffers, *args, first_step, backend=self.backend,
                                            validate=False)
                elif idx:
                    functional.restore_sgd_([params[i] for i in idx], [backups[i] for i in idx],
                                            [grads[i] for i in idx], [buffers[i] for i in idx],
                                            *args, first_step, backend=self.backend, validate=False)
        return True

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self):
        """The base optimizer's state dict (so SGD's momentum buffers stay interchangeable with plain SGD),
        plus an ``"amp"`` entry with this optimizer's settings. θ backups are per-step scratch, not state."""
        state = self.base_optimizer.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        reuse = {i: self.state[p]["reuse_delta"].clone() for i, p in enumerate(params)
                 if "reuse_delta" in self.state.get(p, ())}
        state["amp"] = {"inner_iter": self.inner_iter, "norm": self.norm, "perturb_every": self.perturb_every,
                        "between": self.between, "steps": self.steps, "reuse_delta": reuse}
        return state

    def load_state_dict(self, state_dict):
        if self._ascents:
            raise RuntimeError("load_state_dict() while the parameters are perturbed; call second_step() or "
                               "restore() first")
        state_dict = dict(state_dict)
        amp_state = state_dict.pop("amp", None)
        self._plan_key, self._plan_cache = None, []  # the groups are new objects
        self.base_optimizer.load_state_dict(state_dict)
        for group in self.param_groups:  # a plain base-optimizer state dict lacks our keys
            group.setdefault("epsilon", self.defaults["epsilon"])
            group.setdefault("inner_lr", self.defaults["inner_lr"])
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            self.state.get(p, {}).pop("reuse_delta", None)
        if amp_state is not None:
            self.inner_iter = amp_state["inner_iter"]
            self.norm = amp_state["norm"]
            self.perturb_every = amp_state.get("perturb_every", 1)
            self.between = amp_state.get("between", "erm")
            self.steps = amp_state.get("steps", 0)
            for i, delta in amp_state.get("reuse_delta", {}).items():
                self.state[params[i]]["reuse_delta"] = delta.to(device=params[i].device, dtype=params[i].dtype)

    def __repr__(self):
        schedule = f", perturb_every={self.perturb_every}, between={self.between!r}" if self.perturb_every > 1 else ""
        return (f"AMP(norm={self.norm!r}, inner_iter={self.inner_iter}, backend={self.backend!r}{schedule}, "
                f"base_optimizer={self.base_optimizer!r})")
