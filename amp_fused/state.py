"""Everything about AMP that changes while it trains, in one object.

The optimizer holds one :class:`AmpState` and only ever mutates it, never rebinds its own attributes while
training. So every view of the optimizer sees the same state: ``copy.deepcopy`` and pickle (which copy it
whole), and wrappers that run its methods with another ``self`` while forwarding attribute reads to it (as
Lightning's ``LightningOptimizer`` does).
"""
from __future__ import annotations

from . import options


def setting(name: str, check=None, doc: str = ""):
    """A property of the optimizer that reads and (checked) writes one field of its AmpState."""
    def get(self):
        return getattr(self._amp, name)

    def put(self, value):
        setattr(self._amp, name, check(value) if check else value)

    return property(get, put, doc=doc)


class AmpState:
    """Settings (a checkpoint's settings win on load), progress and the plan of one AMP optimizer."""

    def __init__(self, *, inner_iter, norm, perturb_every, between, reuse_alpha, adaptive_threshold, adaptive_decay,
                 backend, model, bn_stats, sync_ascent):
        # settings
        self.inner_iter, self.norm, self.perturb_every, self.between = inner_iter, norm, perturb_every, between
        self.reuse_alpha, self.adaptive_threshold, self.adaptive_decay = reuse_alpha, adaptive_threshold, adaptive_decay
        self.backend, self.model, self.bn_stats, self.sync_ascent = backend, model, bn_stats, sync_ascent
        # progress
        self.steps = 0  # step(closure) calls completed; the schedule counts these
        self.ascents = 0  # ascents since θ was saved; > 0 means the parameters are perturbed
        self.active = None  # the plan being perturbed while ascents > 0
        self.keep_delta = False  # whether the restore stores Δ for the "reuse" steps that follow
        self.keep_orthogonal = False  # whether the restore stores g_v for the "gradient" steps that follow
        self.step_norms = []  # the norms of every ascent of the current step
        self.last_norms = None  # fp32 norms of Δ from the last ascent, for logging
        self.reuse_delta = {}  # parameter -> Δ of the last full step (the "reuse" schedule)
        self.orthogonals = {}  # parameter -> g_v of the last full step (the "gradient" schedule)
        self.trigger_mean = None  # the adaptive trigger's EMA of ‖g‖² at θ (None: no step measured yet)
        self.trigger_var = 0.0  # and its EMA of the squared deviation
        self.last_kind = None  # what the last step(closure) did: "amp", "erm", "reuse" or "gradient"
        self.opt_called = False  # an optimizer step happened (torch's LRScheduler reads it as _opt_called)
        # scratch, rebuilt when needed
        self.plan = None  # the last plan built
        self.backups = {}  # parameter -> θ buffer, reused from plan to plan

    @property
    def perturbed(self) -> bool:
        return self.ascents > 0

    def refuse_while_perturbed(self, what: str) -> None:
        if self.perturbed:
            raise RuntimeError(f"{what} while the parameters are perturbed (a first_step() is pending); call "
                               "second_step() or restore() first")

    def end_perturbation(self) -> None:
        self.ascents, self.active, self.step_norms = 0, None, []

    def forget_plan(self) -> None:
        self.plan = None

    SETTINGS = ("inner_iter", "norm", "perturb_every", "between", "reuse_alpha", "adaptive_threshold",
                "adaptive_decay")

    def to_dict(self, params) -> dict:
        """The state dict entry: settings, progress (the step count, the trigger's statistics) and the stored Δ
        and g_v (by parameter index, as torch.optim does)."""
        entry = {name: getattr(self, name) for name in self.SETTINGS}
        entry.update(steps=self.steps, trigger_mean=self.trigger_mean, trigger_var=self.trigger_var)
        for name in ("reuse_delta", "orthogonals"):
            stored = getattr(self, name)
            entry[name] = {i: stored[p].clone() for i, p in enumerate(params) if p in stored}
        return entry

    @staticmethod
    def checked_dict(entry):
        """A loaded entry with its settings checked (``None``: a plain base-optimizer state dict)."""
        if entry is None:
            return None
        checked = options.settings(entry["inner_iter"], entry["norm"],
                                   **{k: entry[k] for k in AmpState.SETTINGS[2:] if k in entry})
        checked["steps"] = options.count("steps", entry.get("steps", 0), 0)
        mean = entry.get("trigger_mean")
        checked["trigger_mean"] = None if mean is None else options.hyper("trigger_mean", mean)
        checked["trigger_var"] = options.hyper("trigger_var", entry.get("trigger_var", 0.0))
        checked["reuse_delta"] = dict(entry.get("reuse_delta", {}))
        checked["orthogonals"] = dict(entry.get("orthogonals", {}))
        return checked

    def load_dict(self, entry, params) -> None:
        """Take a checked entry: as in torch.optim, the checkpoint's settings win."""
        self.forget_plan()
        self.reuse_delta.clear()
        self.orthogonals.clear()
        self.trigger_mean, self.trigger_var = None, 0.0
        if entry is None:
            return
        for name in self.SETTINGS + ("steps", "trigger_mean", "trigger_var"):
            setattr(self, name, entry[name])
        for name in ("reuse_delta", "orthogonals"):
            stored = getattr(self, name)
            for i, tensor in entry[name].items():
                stored[params[i]] = tensor.to(device=params[i].device)

    def __getstate__(self):
        self.refuse_while_perturbed("copying or pickling AMP")
        state = dict(self.__dict__)
        state.update(plan=None, backups={})  # scratch: rebuilt on the next step
        return state
