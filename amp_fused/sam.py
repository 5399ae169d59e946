"""Sharpness-Aware Minimization (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021) on AMP's ops.

SAM is AMP with one ascent, one ball over all parameters, and Δ always on its surface: Δ = ρ·g/‖g‖. ASAM
(``adaptive=True``) takes that step in the coordinates θ/T, T = |θ| + η: Δ = ρ·T²g/‖T·g‖. Each is one call of
the fused perturb op (its surface mode, and its element weights for ASAM); restoring θ and the base step are
AMP's. So everything AMP does, SAM does: GradScaler, bf16/fp16, ``bn_stats``, DDP (``sync_ascent``), FSDP2
(full-tensor norms), torch.compile, the schedules (``perturb_every``/``between``), exact resume and exception
safety. Only what a param group sets for the ascent differs, in the four hooks below.
"""
from __future__ import annotations

from . import options
from .optimizer import AMP

# The ball a stored Δ is put back with ("reuse" steps): far larger than any Δ's norm, finite for every
# backend's checks and in fp32, so the stored Δ is put back as it is (ASAM's Δ is not on the ρ-sphere in θ).
NO_PROJECTION = 1e30


def _fixed(name: str, value: str):
    def refuse(self, _):
        raise AttributeError(f"SAM's {name} is fixed at {value}: SAM takes one ascent step over one ball; use "
                             "amp_fused.AMP for more ascent steps or per-tensor balls")
    return property(lambda self: getattr(self._amp, name), refuse, doc=f"{value} (SAM)")


class SAM(AMP):
    """Sharpness-Aware Minimization around any base optimizer, a fused drop-in for davda54/sam's ``SAM``.

    ``SAM(params, base_optimizer, rho=0.05, adaptive=False, *, eta=0.0, backend, perturb_every, between, model,
    bn_stats, sync_ascent, **kwargs)`` (the schedule's keywords as well): ``base_optimizer`` is the class (``torch.optim.SGD``, ``AdamW``, ...),
    built here with ``kwargs``; ``rho`` the radius ρ of the sphere Δ is put on; ``adaptive`` ASAM's
    scale-invariant Δ with T = |θ| + ``eta`` (η = 0 as davda54/sam, the ASAM paper uses 0.01); the other
    keywords as in :class:`amp_fused.AMP`. ``rho``, ``adaptive`` and ``eta`` live in each param group (a
    scheduler may change them); as there is one ball, every group must hold the same values.

    ``first_step(zero_grad=False)`` / ``second_step(zero_grad=False)`` are davda54/sam's two calls (θ → θ + Δ,
    then θ back and the base step with the gradient at θ + Δ). ``step(closure)`` follows torch's convention, as
    ``AMP.step`` does: it zero-grads and calls the closure at θ itself, then at θ + Δ (davda54/sam's ``step``
    expects the first backward done before it is called). ``opt.state``, ``opt.param_groups`` and
    ``base_optimizer`` are shared with the base optimizer.
    """

    _GROUP_KEYS = ("rho", "adaptive", "eta")
    inner_iter = _fixed("inner_iter", "1")
    norm = _fixed("norm", "'global'")

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, *, eta=0.0, backend="auto",
                 perturb_every=1, between="erm", reuse_alpha=0.7, adaptive_threshold=0.5, adaptive_decay=0.9,
                 model=None, bn_stats="all", sync_ascent=True, **kwargs):
        ascent = self._check_group(dict(rho=rho, adaptive=adaptive, eta=eta), "")
        schedule = options.settings(1, "global", perturb_every=perturb_every, between=between, reuse_alpha=reuse_alpha,
                                    adaptive_threshold=adaptive_threshold, adaptive_decay=adaptive_decay)
        self._setup(params, ascent, base_optimizer, kwargs, schedule, backend, model, bn_stats, sync_ascent)

    @staticmethod
    def _check_group(group: dict, where: str = " in a param group") -> dict:
        checked = {key: options.hyper(key, group[key], where) for key in ("rho", "eta") if key in group}
        if "adaptive" in group:
            checked["adaptive"] = options.flag("adaptive", group["adaptive"], where)
        return checked

    @staticmethod
    def _ascent_args(group: dict) -> tuple:
        """Δ = ρ·u/‖u‖ with u = g (SAM) or T·g (ASAM, then Δ = T·(ρ·u/‖u‖))."""
        return group["rho"], 1.0, True, group["eta"] if group["adaptive"] else None

    @staticmethod
    def _reuse_args(group: dict) -> tuple:
        return NO_PROJECTION, 1.0, False, None

    def load_state_dict(self, state_dict):
        """Load a state dict of this optimizer or of the plain base optimizer; an AMP state dict with other
        ascent settings than SAM's (one step, one ball) is refused before anything is loaded."""
        entry = state_dict.get("amp")
        if entry is not None and (entry.get("inner_iter") != 1 or entry.get("norm") != "global"):
            raise ValueError("SAM.load_state_dict: the state dict is an AMP optimizer's with inner_iter="
                             f"{entry.get('inner_iter')!r}, norm={entry.get('norm')!r}; SAM takes one ascent over one "
                             "ball (inner_iter=1, norm='global'): load it into amp_fused.AMP")
        super().load_state_dict(state_dict)

    def __repr__(self):
        s = self._amp
        group = self.param_groups[0] if self.param_groups else self.defaults
        schedule = f", perturb_every={s.perturb_every!r}, between={s.between!r}" if s.perturb_every != 1 else ""
        return (f"SAM(rho={group['rho']:g}, adaptive={group['adaptive']}, eta={group['eta']:g}, "
                f"backend={s.backend!r}{schedule}, base_optimizer={self.base_optimizer!r})")
