"""Adversarial Model Perturbation (Zheng, Zhang & Mao, CVPR 2021) as a torch.optim optimizer.

Algorithm 1, per batch: g = ∇L(θ); Δ = 0; N times: Δ ← Δ + ζ·g, project Δ onto the ε-ball, move
the model to θ + Δ and recompute g there. Then put θ back and let the base optimizer step with the
last g. The tensor work happens in the op layer (:mod:`amp_fused.functional`) on the tensors the plan
(:mod:`amp_fused.plan`) holds; all mutable state is one :class:`amp_fused.state.AmpState`; this file only
decides what to call when.
"""
from __future__ import annotations

import contextlib
import math

import torch

from . import base_step, functional, options, plan as plans, training
from .state import AmpState, setting


class AMP(torch.optim.Optimizer):
    """Adversarial Model Perturbation around any base optimizer (drop-in for the original ``AMP``).

    ``AMP(params, lr, epsilon, inner_lr=1, inner_iter=1, base_optimizer=torch.optim.SGD, *, norm, backend,
    perturb_every, between, model, bn_stats, sync_ascent, **base_kwargs)``: ``lr`` is the base optimizer's η,
    ``epsilon`` the radius ε of the ball Δ is projected onto, ``inner_lr`` the ascent step ζ, ``inner_iter`` the
    ascent steps N (0 is ERM); ``norm`` "per_tensor" (one ball per tensor, as the original code) or "global"
    (the paper's one ball); ``backend`` "auto" or a name from :func:`amp_fused.available_backends` (DTensor
    parameters always take the sharded backend); ``perturb_every``/``between`` the amortised schedule
    ("erm" or "reuse" steps between full ones); ``model`` with ``bn_stats="unperturbed"`` (BatchNorm statistics
    from the pass at θ only) or ``sync_ascent=False`` (DDP: ascent passes under ``no_sync()``);
    ``reuse_alpha`` is α of the ``between="gradient"`` steps (LookSAM: the gradient at θ plus α·‖g‖ times the
    unit part of the last full step's adversarial gradient orthogonal to Δ); ``perturb_every="adaptive"`` takes a
    full step when ‖g‖² at θ is at least its moving mean + ``adaptive_threshold`` moving standard deviations
    (decay ``adaptive_decay``; AE-SAM's trigger, one host sync per step), else a ``between`` step;
    ``base_kwargs`` go to the base optimizer, whose ``step`` must work without a closure. Param groups may set
    their own ``lr``, ``epsilon``, ``inner_lr`` and base options; each tensor may appear once. The README
    documents every argument.

    ``step(closure)``: the closure runs forward and backward and returns ``loss`` or ``(outputs, loss)``;
    ``step`` zero-grads before each call and returns what the first call returned, detached. Without a closure
    use ``first_step()`` / ``second_step()``. ``opt.state`` and ``opt.param_groups`` are the base optimizer's.
    """

    inner_iter = setting("inner_iter", lambda v: options.count("inner_iter", v, 0), "ascent steps N per batch")
    norm = setting("norm", lambda v: options.choice("norm", v, options.NORMS), "per-tensor or global ball")
    perturb_every = setting("perturb_every", lambda v: options.period(v), "schedule period, or 'adaptive'")
    between = setting("between", lambda v: options.choice("between", v, options.BETWEEN), "in-between step kind")
    reuse_alpha = setting("reuse_alpha", lambda v: options.hyper("reuse_alpha", v), "α of the 'gradient' steps")
    adaptive_threshold = setting("adaptive_threshold", lambda v: options.real("adaptive_threshold", v),
                                 "c of the adaptive trigger: a full step when ‖g‖² ≥ mean + c·std")
    adaptive_decay = setting("adaptive_decay", lambda v: options.decay("adaptive_decay", v),
                             "δ of the adaptive trigger's moving mean and variance")
    last_step_kind = property(lambda self: self._amp.last_kind,
                              doc="what the last step(closure) did: 'amp', 'erm', 'reuse' or 'gradient'")
    steps = setting("steps", lambda v: options.count("steps", v, 0), "step(closure) calls completed")
    backend = property(lambda self: self._amp.backend, doc="the backend asked for")
    model = property(lambda self: self._amp.model)
    bn_stats = property(lambda self: self._amp.bn_stats)
    sync_ascent = property(lambda self: self._amp.sync_ascent)
    last_norms = property(lambda self: self._amp.last_norms,
                          doc="fp32 norms ‖Δ‖ of the last ascent (one per tensor, then the total)")
    is_perturbed = property(lambda self: self._amp.perturbed,
                            doc="whether the parameters are at θ + Δ (between first_step and second_step)")
    # torch's LRScheduler warns when it steps before the optimizer did, reading this flag, which its wrapper of
    # ``step`` sets. second_step() sets it too (the two-call API is an optimizer step); kept in the AmpState so
    # that a wrapper running second_step (LightningOptimizer) sets it for the real optimizer the scheduler holds.
    _opt_called = setting("opt_called")

    def __init__(self, params, lr, epsilon, inner_lr=1.0, inner_iter=1, base_optimizer=torch.optim.SGD, *,
                 norm="per_tensor", backend="auto", perturb_every=1, between="erm", reuse_alpha=0.7,
                 adaptive_threshold=0.5, adaptive_decay=0.9, model=None, bn_stats="all", sync_ascent=True,
                 **base_kwargs):
        ascent = self._check_group(dict(epsilon=epsilon, inner_lr=inner_lr), "")
        schedule = options.settings(inner_iter, norm, perturb_every=perturb_every, between=between,
                                    reuse_alpha=reuse_alpha, adaptive_threshold=adaptive_threshold,
                                    adaptive_decay=adaptive_decay)
        self._setup(params, ascent, base_optimizer, dict(lr=lr, **base_kwargs), schedule, backend, model, bn_stats,
                    sync_ascent)

    def _setup(self, params, ascent, base_optimizer, base_kwargs, settings, backend, model, bn_stats, sync_ascent):
        """The remaining checks, the state, the param groups and the base optimizer (AMP and SAM share this)."""
        options.model_options(model, bn_stats, sync_ascent)
        options.backend(backend)
        options.base_optimizer(base_optimizer)
        self._amp = AmpState(**settings, backend=backend, model=model, bn_stats=bn_stats, sync_ascent=sync_ascent)
        torch.optim.Optimizer.__init__(self, params, dict(ascent, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._share_with_base()

    def _share_with_base(self):
        """AMP and its base optimizer hold the same param-group list and state dict (updated in place, so that
        every holder of either object sees the base optimizer's current groups and state)."""
        base = self.base_optimizer
        if base.param_groups is not self.param_groups:
            self.param_groups[:] = base.param_groups
            base.param_groups = self.param_groups
        if base.state is not self.state:
            self.state.clear()
            self.state.update(base.state)
            base.state = self.state

    # -- what a param group sets for the ascent (SAM overrides these four) ------------------------------------
    _GROUP_KEYS = ("epsilon", "inner_lr")  # this optimizer's own keys of a param group, defaulted from defaults

    @staticmethod
    def _check_group(group: dict, where: str = " in a param group") -> dict:
        """The group's ascent settings present, checked (where they enter, and on every plan: a scheduler may set
        them); returns them as stored (floats)."""
        return {key: options.hyper(key, group[key], where) for key in ("epsilon", "inner_lr") if key in group}

    @staticmethod
    def _ascent_args(group: dict) -> tuple:
        """(ε, ζ, surface, eta) of perturb_ for this group's ascent: the ε-ball, ascent step ζ."""
        return group["epsilon"], group["inner_lr"], False, None

    @staticmethod
    def _reuse_args(group: dict) -> tuple:
        """(ε, ζ, surface, eta) of perturb_ that puts a stored Δ back (its step is Δ itself: ζ = 1)."""
        return group["epsilon"], 1.0, False, None

    def add_param_group(self, param_group):
        options.group(param_group, self._check_group)
        base = getattr(self, "base_optimizer", None)
        if base is None:  # called by torch.optim.Optimizer.__init__
            return super().add_param_group(param_group)
        self._amp.refuse_while_perturbed("add_param_group()")
        for key in self._GROUP_KEYS:
            param_group.setdefault(key, self.defaults[key])
        base.add_param_group(param_group)
        self._amp.forget_plan()

    # -- Algorithm 1 ---------------------------------------------------------------------------------
    @training.eager_under_compile
    @torch.no_grad()
    def step(self, closure=None, scaler=None):
        """One AMP step: ``inner_iter`` ascents, each followed by a closure call, then the base step.

        With a ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` the closure calls, pass it as ``scaler``
        (and call ``scaler.update()`` afterwards): the ascent uses the unscaled gradient, and a non-finite
        gradient in any pass skips the base step so that the scaler backs off.

        ``step()`` without a closure after ``first_step()`` is ``second_step(scaler=scaler)``: frameworks that
        call ``optimizer.step()`` after their backward pass (Accelerate, transformers.Trainer) finish the
        two-call API that way, and count it as their optimizer step.
        """
        if closure is None and self._amp.perturbed:
            return self.second_step(scaler=scaler)
        training.check_closure(closure)
        self._amp.refuse_while_perturbed("step(closure)")
        s, closure = self._amp, torch.enable_grad()(closure)
        options.schedule_pair(s.perturb_every, s.between)  # the two may have been set one after the other
        kind = self.next_step_kind()
        try:
            self.zero_grad()
            if kind == "reuse":
                self._ascend(self._plan(lambda p: p in s.reuse_delta), first=True, reuse=True)  # θ + Δ_last
                result = training.detached(training.forward_backward(closure, s, perturbed=True, ascent=False))
                self._second_step(scaler)
            else:
                # ∇L(θ); the adaptive trigger reads it (so every DDP rank syncs it: they must decide alike)
                adaptive = s.perturb_every == options.ADAPTIVE
                result = training.detached(training.forward_backward(
                    closure, s, perturbed=False, ascent=kind == "amp" and s.inner_iter > 0 and not adaptive))
                if adaptive:
                    decided = self._trigger(scaler)
                    kind = decided if kind == "adaptive" else kind
                s.keep_delta = kind == "amp" and s.between == "reuse" and s.perturb_every != 1
                s.keep_orthogonal = kind == "amp" and s.between == "gradient" and s.perturb_every != 1
                if kind == "gradient":
                    self._add_orthogonal()  # g + α·‖g‖·g_v/‖g_v‖
                ascents = s.inner_iter if kind == "amp" else 0
                for i in range(ascents):
                    self._first_step(scaler)  # θ + Δ
                    self.zero_grad()
                    training.forward_backward(closure, s, perturbed=True, ascent=i < ascents - 1)  # ∇L(θ + Δ)
                if s.perturbed:
                    self._second_step(scaler)  # θ (keeping g_v for "gradient" steps), the base step with the last g
                elif scaler is not None:
                    scaler.step(self.base_optimizer)
                else:
                    self.base_optimizer.step()
        except BaseException as error:
            self._recover(error)  # never leave the parameters perturbed
            raise
        finally:
            s.keep_delta = s.keep_orthogonal = False
        s.steps += 1
        s.last_kind = kind
        return result

    def next_step_kind(self) -> str:
        """What the next ``step(closure)`` does: ``"amp"`` (full), ``"erm"``, ``"reuse"`` or ``"gradient"``, or
        ``"adaptive"``: decided from the gradient at θ (then :attr:`last_step_kind` says what it did)."""
        s = self._amp
        if ((s.between == "reuse" and not s.reuse_delta) or (s.between == "gradient" and not s.orthogonals)
                or s.perturb_every == 1):
            return "amp"  # a full step, or nothing to reuse yet (e.g. resumed from a plain base-optimizer state)
        if s.perturb_every == options.ADAPTIVE:
            return "amp" if s.trigger_mean is None else "adaptive"
        return "amp" if s.steps % s.perturb_every == 0 else s.between

    def _trigger(self, scaler) -> str:
        """AE-SAM's trigger from x = ‖g‖² at θ (unscaled): mean ← δ·mean + (1−δ)·x, var ← δ·var + (1−δ)·(x −
        mean)², a full step when x ≥ mean + c·√var. One host sync (reading x). A non-finite x leaves the statistics
        as they are and takes the cheaper step (a GradScaler then skips it)."""
        s = self._amp
        plan = self._plan(lambda p: p.grad is not None)
        norms = plans.combined_norms([functional.norms(plans.gradients(part), backend=part.backend, validate=False)
                                      for part in plan.parts])
        norm = float(norms[-1]) * training.inverse_scale(scaler) if norms is not None else 0.0
        x = norm * norm
        if not math.isfinite(x):
            return s.between
        if s.trigger_mean is None:  # the first measurement: a full step
            s.trigger_mean, s.trigger_var = x, 0.0
            return "amp"
        decay = s.adaptive_decay
        s.trigger_mean = decay * s.trigger_mean + (1 - decay) * x
        s.trigger_var = decay * s.trigger_var + (1 - decay) * (x - s.trigger_mean) ** 2
        return "amp" if x >= s.trigger_mean + s.adaptive_threshold * math.sqrt(s.trigger_var) else s.between

    @training.eager_under_compile
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
        first = not self._amp.perturbed
        plan = self._plan(lambda p: p.grad is not None) if first else self._amp.active
        self._ascend(plan, first=first, inv_scale=training.inverse_scale(scaler))

    @training.eager_under_compile
    @torch.no_grad()
    def second_step(self, zero_grad=False, scaler=None):
        """Put θ back and let the base optimizer step with the gradient taken at θ + Δ (through ``scaler.step``
        when a GradScaler is passed; call ``scaler.update()`` afterwards as usual)."""
        if not self._amp.perturbed:
            raise RuntimeError("second_step() needs a preceding first_step(): the parameters are not perturbed")
        self._second_step(scaler)
        self._amp.opt_called = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def unscale_(self, scaler) -> None:
        """``scaler.unscale_`` for the gradient the base optimizer will step with, for frameworks that clip it
        before the step (call it after the last backward pass of the step; ``step``/``second_step`` with the same
        scaler then do not unscale again). An overflow of this step's ascent passes is reported to the scaler
        first, so that the step is still skipped."""
        training.report_ascent_overflow(self._amp.step_norms, self.param_groups)
        scaler.unscale_(self.base_optimizer)  # the scaler keeps per-optimizer state: the one that steps

    def _second_step(self, scaler):
        s, base = self._amp, self.base_optimizer
        if s.keep_delta:
            for part in s.active.parts:
                deltas = functional.perturbation(part.views, part.backups, backend=part.backend, validate=False)
                s.reuse_delta.update(zip(part.params, deltas))
        put_back = self._restore_keeping_orthogonal if s.keep_orthogonal else self._restore
        if scaler is not None:
            training.report_ascent_overflow(s.step_norms, self.param_groups)
            put_back()
            scaler.step(base)
        elif not s.keep_orthogonal and base_step.applies(base, s.active):
            base_step.step(base, s.active)
            s.end_perturbation()
        else:
            put_back()
            base.step()

    def _restore_keeping_orthogonal(self):
        """θ back, and g_v (the part of the gradient at θ + Δ orthogonal to Δ) stored for the "gradient" steps,
        in the same pass; norms per tensor or over all tensors, as the ascent's. g_v of parameters this step did
        not perturb are dropped (they would be stale)."""
        s = self._amp
        active = {p for part in s.active.parts for p in part.params}
        for p in [p for p in s.orthogonals if p not in active]:
            del s.orthogonals[p]
        calls = plans.op_calls(s.active, s.norm, lambda part: (  # g_v buffers kept from step to step
            part.views, part.backups, plans.gradients(part),
            [plans.buffer_for(s.orthogonals, p, v) for p, v in zip(part.params, part.views)]))
        try:
            for parts, (views, backups, grads, orthogonals), per_tensor in calls:
                functional.restore_orthogonal_(views, backups, grads, orthogonals, per_tensor,
                                               backend=parts[0].backend, validate=False)
        except BaseException:
            s.orthogonals.clear()  # partly written: the next step is a full one (the caller puts θ back)
            raise
        s.end_perturbation()

    def _add_orthogonal(self):
        """A "gradient" step's gradient: g ← g + α·(‖g‖/‖g_v‖)·g_v, in place in ``.grad`` (what the base optimizer
        steps with), norms per tensor or over all tensors as the ascent's."""
        s = self._amp
        plan = self._plan(lambda p: p.grad is not None and p in s.orthogonals)
        calls = plans.op_calls(plan, s.norm, lambda part: (
            plans.writable_gradients(part), [plans.like(s.orthogonals[p], v) for p, v in zip(part.params, part.views)]))
        for parts, (grads, orthogonals), per_tensor in calls:
            functional.add_orthogonal_(grads, orthogonals, s.reuse_alpha, per_tensor, backend=parts[0].backend,
                                       validate=False)

    @training.eager_under_compile
    @torch.no_grad()
    def restore(self):
        """Put θ back without stepping (a no-op when the parameters are not perturbed)."""
        self._restore()

    def _restore(self, parts=None):
        s = self._amp
        for part in parts if parts is not None else (s.active.parts if s.active is not None else ()):
            functional.restore_(part.views, part.backups, backend=part.backend, validate=False)
        if parts is None:
            s.end_perturbation()

    def _recover(self, error):
        """After ``error`` inside a step: θ back, and the error stays the one the user sees."""
        if not self._amp.perturbed:
            return
        try:
            with torch.no_grad():
                self._restore()
        except Exception as restore_error:  # noqa: BLE001 - reported on the original error
            if hasattr(error, "add_note"):
                error.add_note(f"amp_fused: putting θ back after this error failed as well ({restore_error!r}); the "
                               "parameters are still perturbed: call restore() once the cause is fixed")

    @contextlib.contextmanager
    def restore_on_error(self):
        """For the two-call API: ``with opt.restore_on_error(): ...`` puts θ back if the block raises."""
        try:
            yield self
        except BaseException as error:
            self._recover(error)
            raise

    @property
    def last_ascent_nonfinite(self) -> torch.Tensor | None:
        """0-d bool tensor: whether the last ascent met a non-finite ‖Δ‖ (so some or, for ``global``, all of
        its Δ were zeroed). Stays on the device; reading it as a Python bool syncs."""
        norms = self._amp.last_norms
        return None if norms is None else torch.logical_not(torch.isfinite(norms).all())

    # -- plumbing --------------------------------------------------------------------------------------
    def _plan(self, selected):
        """The plan for the tensors ``selected(p)`` of every group (see :func:`amp_fused.plan.current`)."""
        return plans.current(self._amp, self.param_groups, selected, self._check_group, self._ascent_args,
                             self._GROUP_KEYS)

    def _ascend(self, plan, first, inv_scale=1.0, reuse=False):
        """One ascent over ``plan``: with the current gradients (times ``inv_scale``, for GradScaler), or
        (``reuse``) with the stored Δ as the step. Every argument is gathered (and checked) before any write;
        a first ascent that fails part-way puts back what it perturbed."""
        s = self._amp
        if reuse:
            calls = plans.perturb_calls(plan, s.norm, lambda part: [
                plans.like(s.reuse_delta[p], v) for p, v in zip(part.params, part.views)], self._reuse_args)
        else:
            def ascent_args(group):
                epsilon, inner_lr, surface, eta = self._ascent_args(group)
                return epsilon, inner_lr * inv_scale, surface, eta
            calls = plans.perturb_calls(plan, s.norm, plans.gradients, ascent_args)
        results, done = [], []
        try:
            for parts, views, steps, backups, (epsilon, inner_lr, surface, eta), per_tensor in calls:
                results.append(functional.perturb_(views, steps, backups, epsilon, inner_lr, per_tensor, first,
                                                   surface, eta, backend=parts[0].backend, validate=False))
                done += parts
        except BaseException:
            if first:
                self._restore(done)
            raise
        s.active, s.ascents = plan, s.ascents + 1
        s.last_norms = plans.combined_norms(results)
        if s.last_norms is not None:
            s.step_norms.append(s.last_norms)

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self):
        """The base optimizer's state dict (so SGD's momentum buffers stay interchangeable with plain SGD), plus
        an ``"amp"`` entry: the settings, the schedule's step count and stored Δ. Hooks run as in torch.optim."""
        self._amp.refuse_while_perturbed("state_dict()")
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = self.base_optimizer.state_dict()
        state["amp"] = self._amp.to_dict([p for group in self.param_groups for p in group["params"]])
        for hook in self._optimizer_state_dict_post_hooks.values():
            state = hook(self, state) or state
        return state

    def load_state_dict(self, state_dict):
        """Load a state dict of this optimizer or of the plain base optimizer. As in torch.optim, the
        checkpoint's settings win: ``inner_iter``, ``norm`` and the schedule's settings become those saved."""
        self._amp.refuse_while_perturbed("load_state_dict()")
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        amp_state = self._amp.checked_dict(state_dict.pop("amp", None))  # before anything is loaded
        self.base_optimizer.load_state_dict(state_dict)
        self._share_with_base()
        for group in self.param_groups:  # a plain base-optimizer state dict lacks our keys
            for key in self._GROUP_KEYS:
                group.setdefault(key, self.defaults[key])
        self._amp.load_dict(amp_state, [p for group in self.param_groups for p in group["params"]])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        # What torch.optim keeps, plus this optimizer's own objects; hooks are dropped as torch.optim drops them.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    def __repr__(self):
        s = self._amp
        schedule = f", perturb_every={s.perturb_every!r}, between={s.between!r}" if s.perturb_every != 1 else ""
        return (f"AMP(norm={s.norm!r}, inner_iter={s.inner_iter}, backend={s.backend!r}{schedule}, "
                f"base_optimizer={self.base_optimizer!r})")
