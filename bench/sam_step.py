"""Optimizer-side cost of one SAM (and ASAM) step: ``amp_fused.SAM`` per backend against a per-parameter loop.

One step = ``first_step()`` (e = ρ·T²g/‖T·g‖ over all parameters, T = 1 for SAM, |θ| + η for ASAM; the
parameters move to θ + e) + ``second_step()`` (θ back, then the base step: SGD with momentum 0.9 and weight
decay 5e-4), on fixed random fp32 gradients, no forward or backward pass: the work SAM adds to plain SGD, plus
the SGD step.

``loop`` is a SAM written the way the widely used SAM implementations are (written here for this benchmark):
a Python loop over the parameters for the norm of each gradient, a stacked norm, a loop that saves θ and adds
e, a loop that puts θ back, then the base optimizer's own ``step()`` (torch.optim.SGD with its defaults).
Each row counts dispatched aten ops and host syncs of one step (amp_fused.profiling.DispatchCounter).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import amp_fused

from .optimizer_step import PARAM_SETS, count_dispatches, random_tensors
from .report import fmt_ms, format_table
from .timing import Timing, time_interleaved

LOOP = "loop"  # the per-parameter reference row
RHO, ETA = 0.05, 0.01
SGD_ARGS = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


class LoopSAM:
    """SAM/ASAM as a per-parameter Python loop over a base optimizer (the common implementation pattern)."""

    def __init__(self, params, rho: float, adaptive: bool, eta: float):
        self.params, self.rho, self.adaptive, self.eta = params, rho, adaptive, eta
        self.base = torch.optim.SGD(params, **SGD_ARGS)
        self.saved = {}

    @torch.no_grad()
    def first_step(self):
        weights = [(p.abs() + self.eta) if self.adaptive else None for p in self.params]
        norm = torch.norm(torch.stack([(p.grad if w is None else w * p.grad).norm(p=2)
                                       for p, w in zip(self.params, weights)]), p=2)
        scale = self.rho / (norm + 1e-12)
        for p, w in zip(self.params, weights):
            self.saved[p] = p.clone()
            e = p.grad * scale if w is None else w * w * p.grad * scale
            p.add_(e)

    @torch.no_grad()
    def second_step(self):
        for p in self.params:
            p.copy_(self.saved[p])
        self.base.step()


class SAMStep:
    """first_step() + second_step() of one optimizer on its own parameters, with the shared gradients."""

    def __init__(self, kind: str, shapes, grads, adaptive: bool, device, seed: int = 1):
        params = random_tensors(shapes, 0.1, torch.Generator().manual_seed(seed), device)
        for p, g in zip(params, grads):
            p.grad = g
        if kind == LOOP:
            self.optimizer = LoopSAM(params, RHO, adaptive, ETA)
        else:
            self.optimizer = amp_fused.SAM(params, torch.optim.SGD, rho=RHO, adaptive=adaptive, eta=ETA,
                                           backend=kind, **SGD_ARGS)

    def __call__(self) -> None:
        self.optimizer.first_step()
        self.optimizer.second_step()


@dataclass
class Row:
    param_set: str
    tensors: int
    numel: int
    kind: str  # "loop" or a backend name
    adaptive: bool
    timing: Timing
    ops: int
    syncs: int


def measure(param_sets, backend_names, device="cpu", rounds: int = 3, min_run_time: float = 0.3,
            progress=None) -> list[Row]:
    """Per parameter set and mode (SAM, ASAM): the loop and every backend, timed in turn."""
    rows = []
    kinds = [LOOP] + [b for b in backend_names if b != "reference"]
    for set_name in param_sets:
        shapes = PARAM_SETS[set_name]()
        numel = sum(s.numel() for s in shapes)
        grads = random_tensors(shapes, 0.01, torch.Generator().manual_seed(0), device)  # only read: shared
        for adaptive in (False, True):
            if progress:
                progress(f"sam_step: {set_name}, {'ASAM' if adaptive else 'SAM'}")
            steps = {kind: SAMStep(kind, shapes, grads, adaptive, device) for kind in kinds}
            timings = time_interleaved(steps, rounds, min_run_time,
                                       label=f"sam_step {set_name} {'asam' if adaptive else 'sam'}")
            for kind, step in steps.items():
                ops, syncs = count_dispatches(step)
                rows.append(Row(set_name, len(shapes), numel, kind, adaptive, timings[kind], ops, syncs))
            del steps
        del grads
    return rows


def to_json(rows: list[Row]) -> list[dict]:
    loop = {(r.param_set, r.adaptive): r.timing.median for r in rows if r.kind == LOOP}
    return [{"params": r.param_set, "tensors": r.tensors, "numel": r.numel, "kind": r.kind,
             "mode": "asam" if r.adaptive else "sam", "ms": r.timing.median * 1e3, "iqr_ms": r.timing.iqr * 1e3,
             "samples": r.timing.samples, "ops_per_step": r.ops, "syncs_per_step": r.syncs,
             "speedup_vs_loop": loop[(r.param_set, r.adaptive)] / r.timing.median} for r in rows]


def sam_step_text(rows: list[dict]) -> str:
    columns = [("params", "<"), ("mode", "<"), ("step", "<"), ("ms", ">"), ("IQR ms", ">"), ("x loop", ">"),
               ("ops/step", ">"), ("syncs/step", ">")]
    body = [[r["params"], r["mode"], r["kind"], fmt_ms(r["ms"]), fmt_ms(r["iqr_ms"]), f"{r['speedup_vs_loop']:.2f}",
             str(r["ops_per_step"]), str(r["syncs_per_step"])] for r in rows]
    return ("sam_step: optimizer-side SAM/ASAM step (first_step + second_step, SGD momentum base), fixed gradients, "
            "no forward/backward; 'loop' is the per-parameter implementation\n" + format_table(columns, body))
