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

    def __init__(self, *, inner_iter, norm, perturb_every, between, backend, model, bn_stats, sync_ascent):
        # settings
        self.inner_iter, self.norm, self.perturb_every, self.between = inner_iter, norm, perturb_every, between
        self.backend, self.model, self.bn_stats, self.sync_ascent = backend, model, bn_stats, sync_ascent
        # progress
        self.steps = 0  # step(closure) calls completed; the schedule counts these
        self.ascents = 0  # ascents since θ was saved; > 0 means the parameters are perturbed
        self.active = None  # the plan being perturbed while ascents > 0
        self.keep_delta = False  # whether the restore stores Δ for the "reuse" steps that follow
        self.step_norms = []  # the norms of every ascent of the current step
        self.last_norms = None  # fp32 norms of Δ from the last ascent, for logging
        self.reuse_delta = {}  # parameter -> Δ of the last full step (the "reuse" schedule)
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

    def to_dict(self, params) -> dict:
        """The state dict entry: settings, step count and stored Δ (by parameter index, as torch.optim does)."""
        return {"inner_iter": self.inner_iter, "norm": self.norm, "perturb_every": self.perturb_every,
                "between": self.between, "steps": self.steps,
                "reuse_delta": {i: self.reuse_delta[p].clone() for i, p in enumerate(params) if p in self.reuse_delta}}

    @staticmethod
    def checked_dict(entry):
        """A loaded entry with its settings checked (``None``: a plain base-optimizer state dict)."""
        if entry is None:
            return None
        checked = options.settings(entry["inner_iter"], entry["norm"], entry.get("perturb_every", 1),
                                   entry.get("between", "erm"))
        checked["steps"] = options.count("steps", entry.get("steps", 0), 0)
        checked["reuse_delta"] = dict(entry.get("reuse_delta", {}))
        return checked

    def load_dict(self, entry, params) -> None:
        """Take a checked entry: as in torch.optim, the checkpoint's settings win."""
        self.forget_plan()
        self.reuse_delta.clear()
        if entry is None:
            return
        for name in ("inner_iter", "norm", "perturb_every", "between", "steps"):
            setattr(self, name, entry[name])
        for i, delta in entry["reuse_delta"].items():
            self.reuse_delta[params[i]] = delta.to(device=params[i].device)

    def __getstate__(self):
        self.refuse_while_perturbed("copying or pickling AMP")
        state = dict(self.__dict__)
        state.update(plan=None, backups={})  # scratch: rebuilt on the next step
        return state
