"""Optimizer-side cost of one AMP step, per backend, against this machine's memory bandwidth.

One step = ``perturb_`` (first ascent, per-tensor norm) + ``restore_sgd_`` (momentum 0.9, nesterov,
weight decay 5e-4, momentum buffers already initialised), on random fp32 gradients, with no forward or
backward pass: the work AMP adds on top of plain SGD, plus the SGD step itself. ``sgd_fused`` is
``torch.optim.SGD(fused=True)`` alone with the same options: what a plain step costs.

The floor is what a fused implementation cannot avoid moving through memory, per fp32 parameter:
perturb_ reads g for the norms (4 B), then reads θ and g and writes the backup and θ+Δ (16 B);
restore_sgd_ reads the backup, g and the momentum buffer and writes θ and the buffer (20 B): 40 B.
The SGD step alone reads θ, g and the buffer and writes θ and the buffer: 20 B. Both are timed against the
bandwidth of a triad (a = b + s·c, counted as 3·4 B per element) measured in the same run.
Neither count includes write-allocate reads: the triad's write-only stream makes it move 16 B per 12
counted, the AMP step's two write-only streams (the backup; θ in restore_sgd_) 48 B per 40, so an AMP step
that streams at the triad's DRAM throughput comes in near 0.9x the floor.

The steps the toward-ERM schedules add (:data:`SCHEDULE_STEPS`) are timed in the same rounds, each against its own
floor: a full step of ``between="gradient"`` (perturb_, then restore_orthogonal_: it reads θ+Δ, θ and g for ⟨Δ, g⟩
and ‖Δ‖², then again to write g_v and θ: 20 + 32 B), a step between (add_orthogonal_: g and g_v for the norms, then
again to write g: 20 B), and the adaptive trigger's norms of g (4 B). Their base-optimizer step is torch.optim.SGD's
own (the SGD row's 20 B), not part of these rows.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from amp_fused import backends
from amp_fused.profiling import DispatchCounter

from .timing import Timing, time_interleaved

SGD_FUSED = "sgd_fused"  # the row of torch.optim.SGD(fused=True) alone
AMP_BYTES_PER_PARAM = 40  # see the module docstring
SGD_BYTES_PER_PARAM = 20
TRIAD_BYTES_PER_ELEMENT = 12
# What the hardware moves when a write-only stream first reads each line it writes (write-allocate).
AMP_BYTES_MOVED_PER_PARAM = 48
TRIAD_BYTES_MOVED = 16
# step -> bytes per fp32 parameter it cannot avoid moving (see the module docstring)
SCHEDULE_STEPS = {"gradient_full": 52, "gradient_between": 20, "trigger_norms": 4}
# α of the timed add_orthogonal_: each call adds α‖g‖ to g in place, so a small α keeps the repeated calls' data
# (and so their cost) the same; any α != 0 runs the same arithmetic.
STATIONARY_ALPHA = 1e-6
STEP_ARGS = dict(epsilon=0.05, inner_lr=1.0, lr=0.01, momentum=0.9, dampening=0.0, weight_decay=5e-4,
                 nesterov=True, maximize=False)


# -- parameter sets --------------------------------------------------------------------------------------------
def torchvision_shapes(name: str) -> list[torch.Size]:
    """Parameter shapes of a torchvision model, built without weights (the default 1000-class head)."""
    import torchvision

    return [p.shape for p in torchvision.models.get_model(name, weights=None).parameters()]


def many_small_shapes(count: int = 300, low: int = 2000, high: int = 6000, seed: int = 0) -> list[torch.Size]:
    """``count`` 1-d tensors of a few thousand values each: where per-tensor overheads dominate."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.Size([int(n)]) for n in torch.randint(low, high, (count,), generator=gen)]


PARAM_SETS: dict[str, Callable[[], list[torch.Size]]] = {
    "resnet18": lambda: torchvision_shapes("resnet18"),  # 62 tensors, 11.7M values
    "resnet50": lambda: torchvision_shapes("resnet50"),  # 161 tensors, 25.6M values
    "vit_b_16": lambda: torchvision_shapes("vit_b_16"),  # 152 tensors, 86.6M values
    "many_small": many_small_shapes,  # 300 tensors, 1.2M values
}
QUICK_SETS = ("resnet18", "many_small")


# -- the steps -------------------------------------------------------------------------------------------------
def random_tensors(shapes, scale: float, gen: torch.Generator, device) -> list[torch.Tensor]:
    return [torch.randn(s, generator=gen).mul_(scale).to(device) for s in shapes]


@dataclass
class StepTensors:
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    backups: list[torch.Tensor]
    momentum_buffers: list[torch.Tensor]


class AMPStep:
    """The optimizer-side part of one AMP step with one backend, on its own parameters and buffers."""

    def __init__(self, backend: str, shapes, grads: list[torch.Tensor], device, seed: int = 1):
        self.ops = backends.resolve(backend, torch.device(device).type)
        gen = torch.Generator().manual_seed(seed)
        params = random_tensors(shapes, 0.1, gen, device)
        self.t = StepTensors(params=params, grads=grads, backups=[torch.empty_like(p) for p in params],
                             momentum_buffers=random_tensors(shapes, 0.01, gen, device))

    def __call__(self) -> None:
        a, t = STEP_ARGS, self.t
        self.ops.perturb_(t.params, t.grads, t.backups, a["epsilon"], a["inner_lr"], True, True)
        self.ops.restore_sgd_(t.params, t.backups, t.grads, t.momentum_buffers, a["lr"], a["momentum"],
                              a["dampening"], a["weight_decay"], a["nesterov"], a["maximize"], False)


class FusedSGDStep:
    """``torch.optim.SGD(fused=True).step()`` with the AMP step's SGD options, on its own parameters."""

    def __init__(self, shapes, grads: list[torch.Tensor], device, seed: int = 1):
        params = random_tensors(shapes, 0.1, torch.Generator().manual_seed(seed), device)
        for p, g in zip(params, grads):
            p.grad = g
        a = STEP_ARGS
        self.optimizer = torch.optim.SGD(params, lr=a["lr"], momentum=a["momentum"], dampening=a["dampening"],
                                         weight_decay=a["weight_decay"], nesterov=a["nesterov"],
                                         maximize=a["maximize"], fused=True)

    def __call__(self) -> None:
        self.optimizer.step()  # the first call (the warm-up) creates the momentum buffers


class ScheduleStep:
    """One of :data:`SCHEDULE_STEPS` with one backend, on its own parameters and buffers."""

    def __init__(self, step: str, backend: str, shapes, grads: list[torch.Tensor], device, seed: int = 1):
        self.step, self.ops = step, backends.resolve(backend, torch.device(device).type)
        gen = torch.Generator().manual_seed(seed)
        self.params = random_tensors(shapes, 0.1, gen, device)
        self.backups = [torch.empty_like(p) for p in self.params]
        self.orthogonals = random_tensors(shapes, 0.01, gen, device)
        self.grads = [g.clone() for g in grads] if step == "gradient_between" else grads  # written there

    def __call__(self) -> None:
        a = STEP_ARGS
        if self.step == "gradient_full":
            self.ops.perturb_(self.params, self.grads, self.backups, a["epsilon"], a["inner_lr"], True, True)
            self.ops.restore_orthogonal_(self.params, self.backups, self.grads, self.orthogonals, True)
        elif self.step == "gradient_between":
            self.ops.add_orthogonal_(self.grads, self.orthogonals, STATIONARY_ALPHA, True)
        else:
            self.ops.norms(self.grads)


def bytes_per_step(backend: str, numel: int, step: str = "amp") -> int:
    if step != "amp":
        return SCHEDULE_STEPS[step] * numel
    return (SGD_BYTES_PER_PARAM if backend == SGD_FUSED else AMP_BYTES_PER_PARAM) * numel


# -- measurement -----------------------------------------------------------------------------------------------
class Triad:
    """a = b + s·c on fp32 buffers far larger than the caches; its bandwidth counts 3·4 B per element."""

    def __init__(self, device, numel: int = 1 << 25):
        self.numel = numel
        self.a, self.b, self.c = (torch.rand(numel, device=device) for _ in range(3))

    def __call__(self) -> None:
        torch.add(self.b, self.c, alpha=0.5, out=self.a)

    def bandwidth(self, seconds: float) -> float:
        return TRIAD_BYTES_PER_ELEMENT * self.numel / seconds


@dataclass
class Row:
    param_set: str
    tensors: int
    numel: int
    backend: str
    timing: Timing
    ops: int
    syncs: int
    step: str = "amp"  # or one of SCHEDULE_STEPS

    @property
    def bytes(self) -> int:
        return bytes_per_step(self.backend, self.numel, self.step)


def count_dispatches(fn) -> tuple[int, int]:
    """(dispatched ops, host syncs) of one call of ``fn``."""
    with DispatchCounter() as counter:
        fn()
    return counter.ops, counter.syncs


def measure(param_sets, backend_names, device="cpu", rounds: int = 3, min_run_time: float = 0.3,
            progress=None) -> tuple[list[Row], list[float]]:
    """Step time per (set, backend) and ``sgd_fused``, and the triad bandwidth (bytes/s) of every round.

    The triad takes its turn among the steps, so it sees the same machine load they do."""
    triad = Triad(device)
    rows, bandwidths = [], []
    for set_name in param_sets:
        if progress:
            progress(f"optimizer_step: {set_name}")
        shapes = PARAM_SETS[set_name]()
        numel = sum(s.numel() for s in shapes)
        grads = random_tensors(shapes, 0.01, torch.Generator().manual_seed(0), device)  # only read: shared
        steps: dict[str, Callable[[], None]] = {name: AMPStep(name, shapes, grads, device) for name in backend_names}
        steps[SGD_FUSED] = FusedSGDStep(shapes, grads, device)
        schedule_steps = {(kind, name): ScheduleStep(kind, name, shapes, grads, device)
                          for kind in SCHEDULE_STEPS for name in backend_names}
        timings = time_interleaved({"triad": triad, **steps, **{f"{k} {n}": v for (k, n), v in schedule_steps.items()}},
                                   rounds, min_run_time, label=f"optimizer_step {set_name}")
        bandwidths.append(triad.bandwidth(timings.pop("triad").median))
        for name, step in steps.items():
            ops, syncs = count_dispatches(step)
            rows.append(Row(set_name, len(shapes), numel, name, timings[name], ops, syncs))
        for (kind, name), step in schedule_steps.items():
            ops, syncs = count_dispatches(step)
            rows.append(Row(set_name, len(shapes), numel, name, timings[f"{kind} {name}"], ops, syncs, kind))
        del steps, grads
    return rows, bandwidths


# -- report ----------------------------------------------------------------------------------------------------
def to_json(rows: list[Row], bandwidth: float, step: str = "amp") -> list[dict]:
    """The section's JSON rows of ``step`` ("amp": the AMP step and sgd_fused; or one of SCHEDULE_STEPS);
    ``bandwidth`` (bytes/s) sets each row's floor."""
    rows = [r for r in rows if r.step == step]
    reference = {r.param_set: r.timing.median for r in rows if r.backend == "reference"}
    out = []
    for r in rows:
        seconds = r.timing.median
        floor = r.bytes / bandwidth
        out.append({
            "params": r.param_set, "tensors": r.tensors, "numel": r.numel, "backend": r.backend,
            "ms": seconds * 1e3, "gbps": r.bytes / seconds / 1e9, "floor_ms": floor * 1e3,
            "ops_per_step": r.ops, "syncs_per_step": r.syncs,
            "iqr_ms": r.timing.iqr * 1e3, "q1_ms": r.timing.q1 * 1e3, "q3_ms": r.timing.q3 * 1e3,
            "samples": r.timing.samples, "bytes_per_step": r.bytes, "triad_fraction": floor / seconds,
            "speedup_vs_reference": reference[r.param_set] / seconds if r.param_set in reference else None,
        })
        if step != "amp":
            out[-1]["step"] = step
    return out


def schedule_json(rows: list[Row], bandwidth: float) -> list[dict]:
    """The rows of the schedules' steps, each against its own floor."""
    return [row for step in SCHEDULE_STEPS for row in to_json(rows, bandwidth, step)]


def bandwidth_summary(bandwidths: list[float]) -> dict:
    return {"gbps": statistics.median(bandwidths) / 1e9, "min_gbps": min(bandwidths) / 1e9,
            "max_gbps": max(bandwidths) / 1e9, "measurements": len(bandwidths),
            "bytes_per_element": TRIAD_BYTES_PER_ELEMENT}
