"""A whole training step (forward, backward, optimizer) of ERM against AMP, on small models.

ERM is ``torch.optim.SGD(fused=True)``, the fastest plain step (the ``sgd_fused`` anchor of the optimizer_step
section), so the AMP/ERM ratio does not flatter AMP. AMP runs as users call it, with the same SGD options passed
through: its full steps restore θ and take the SGD step in one fused op; the steps between full ones of the
amortised schedules take torch.optim.SGD's default step. Exact AMP (``perturb_every=1``) runs two forward/backward
passes per step, so about 2x ERM is its floor. The amortised schedules (``perturb_every=4``, ``between="erm"`` or
``"reuse"``) take one pass on the 3 steps between full ones (at θ, or at θ + the last Δ): 1.25x the passes of ERM.
``between="gradient"`` (LookSAM's reuse) adds the fused add_orthogonal_ to those steps and stores g_v in its full
steps' restore (restore_orthogonal_, then torch.optim.SGD's step). ``perturb_every="adaptive"`` decides each step from
‖g‖² at θ (one norms op and one host sync per step); here its decision is forced to one full step in 4 (its real share
depends on the data: the quality study measures it), so its cycle compares with the fixed schedules' at the same
share. Every mode is timed over a whole period of 4 consecutive steps (4 different batches) and reported per step, so
the amortised ones are their mean over the period ("cycle"); each kind of step of a schedule is also timed alone,
one step per call ("full" and "between": the medians a cycle is made of). The batches are random inputs and labels,
the same for every mode.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

import amp_fused

from .optimizer_step import SGD_FUSED
from .timing import Timing, force_trigger, time_interleaved

PERIOD = 4  # steps per timed call: one period of the amortised schedules
LR, EPSILON, INNER_LR = 0.01, 0.05, 1.0
SGD_OPTIONS = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)
ERM_BACKEND = SGD_FUSED  # what the ERM row reports as its backend: torch.optim.SGD(fused=True)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample (C, H, W)
    classes: int
    batch: int
    about: str


def _resnet18_32() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


def _digits_cnn() -> nn.Module:
    from .demo import digits_cnn

    return digits_cnn()


MODELS = {
    "resnet18_32": ModelSpec(_resnet18_32, (3, 32, 32), 10, 16, "torchvision resnet18, 10 classes, 32x32 RGB"),
    "digits_cnn": ModelSpec(_digits_cnn, (1, 8, 8), 10, 64, "bench.demo.digits_cnn, 8x8 grey"),
}


ADAPTIVE = "adaptive"
# (perturb_every, between) of the amortised schedules timed
SCHEDULES = ((PERIOD, "erm"), (PERIOD, "reuse"), (PERIOD, "gradient"), (ADAPTIVE, "erm"), (ADAPTIVE, "gradient"))
STEPS = ("cycle", "full", "between")  # what one mode's row times: a whole period, or one kind of step alone


@dataclass(frozen=True)
class Mode:
    name: str  # erm, amp, amp-k4-erm, amp-k4-reuse, amp-k4-gradient, amp-adaptive-erm, amp-adaptive-gradient
    backend: str
    perturb_every: int | str | None = None  # None: ERM
    between: str = "erm"
    step: str = "cycle"  # one of STEPS

    @property
    def key(self) -> str:
        return f"{self.name} ({self.backend}, {self.step})"

    @property
    def steps_per_call(self) -> int:
        return PERIOD if self.step == "cycle" else 1


def modes(backend_names, fastest: str) -> list[Mode]:
    """ERM, exact AMP with ``reference`` (when asked for) and ``fastest``, and each amortised schedule with
    ``fastest``: its cycle, its full step and its step between."""
    exact = (["reference"] if "reference" in backend_names else []) + ([fastest] if fastest != "reference" else [])
    out = [Mode("erm", ERM_BACKEND)]
    out += [Mode("amp", b, perturb_every=1) for b in exact]
    for every, between in SCHEDULES:
        name = f"amp-{ADAPTIVE if every == ADAPTIVE else f'k{every}'}-{between}"
        out += [Mode(name, fastest, perturb_every=every, between=between, step=step) for step in STEPS]
    return out


class Trainer:
    """One model copy, its optimizer and a fixed set of ``PERIOD`` batches; a call trains one period."""

    def __init__(self, model: nn.Module, mode: Mode, batches):
        self.model, self.mode, self.batches = model, mode, batches
        params = list(model.parameters())
        if mode.perturb_every is None:
            self.optimizer = torch.optim.SGD(params, lr=LR, fused=True, **SGD_OPTIONS)
        else:
            self.optimizer = amp_fused.AMP(params, lr=LR, epsilon=EPSILON, inner_lr=INNER_LR, backend=mode.backend,
                                           perturb_every=mode.perturb_every, between=mode.between, **SGD_OPTIONS)
            if mode.perturb_every == ADAPTIVE:
                force_trigger(self.optimizer, self._full_next)
        self.calls = 0

    def _full_next(self, optimizer) -> bool:
        """Whether the step being taken is a full one: the first of each cycle, or every step of a "full" row."""
        if self.mode.step == "cycle":
            return (optimizer.steps % PERIOD) == 0
        return self.mode.step == "full"

    def __call__(self) -> None:
        mode = self.mode
        if mode.step == "cycle":
            batches = self.batches
        else:
            batches = [self.batches[self.calls % len(self.batches)]]
            if mode.perturb_every not in (None, 1, ADAPTIVE):
                # the schedule's step count picks the kind: a multiple of the period is a full step
                self.optimizer.steps = 0 if mode.step == "full" else 1
        self.calls += 1
        for inputs, targets in batches:
            if self.mode.perturb_every is None:
                self.optimizer.zero_grad()
                F.cross_entropy(self.model(inputs), targets).backward()
                self.optimizer.step()
            else:
                def closure(inputs=inputs, targets=targets):
                    loss = F.cross_entropy(self.model(inputs), targets)
                    loss.backward()
                    return loss

                self.optimizer.step(closure)

    @torch.no_grad()
    def check_finite(self) -> None:
        """A diverged run would time NaN arithmetic, not training: refuse to report it."""
        inputs, targets = self.batches[0]
        loss = F.cross_entropy(self.model(inputs), targets).item()
        if not math.isfinite(loss):
            raise RuntimeError(f"train_step: {self.mode.key} diverged (loss {loss}); its timing is not reported")


@dataclass
class Row:
    model: str
    batch: int
    mode: Mode
    timing: Timing  # seconds per step


def measure(model_names, backend_names, fastest: str, device="cpu", rounds: int = 3, min_run_time: float = 1.0,
            progress=None) -> list[Row]:
    rows = []
    for model_name in model_names:
        if progress:
            progress(f"train_step: {model_name}")
        spec = MODELS[model_name]
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randn((spec.batch, *spec.input_shape), generator=gen).to(device),
                    torch.randint(spec.classes, (spec.batch,), generator=gen).to(device)) for _ in range(PERIOD)]
        torch.manual_seed(0)
        initial = spec.build().to(device).train()
        trainers = {m.key: Trainer(copy.deepcopy(initial), m, batches) for m in modes(backend_names, fastest)}
        timings = time_interleaved(trainers, rounds, min_run_time, label=f"train_step {model_name}")
        for key, trainer in trainers.items():
            trainer.check_finite()
            t, n = timings[key], trainer.mode.steps_per_call
            per_step = Timing(t.median / n, t.q1 / n, t.q3 / n, t.samples)
            rows.append(Row(model_name, spec.batch, trainer.mode, per_step))
    return rows


def to_json(rows: list[Row]) -> list[dict]:
    erm = {r.model: r.timing.median for r in rows if r.mode.perturb_every is None}
    return [{
        "model": r.model, "batch": r.batch, "mode": r.mode.name, "backend": r.mode.backend, "step": r.mode.step,
        "ms": r.timing.median * 1e3, "ratio_vs_erm": r.timing.median / erm[r.model],
        "iqr_ms": r.timing.iqr * 1e3, "q1_ms": r.timing.q1 * 1e3, "q3_ms": r.timing.q3 * 1e3,
        "samples": r.timing.samples, "input": list(MODELS[r.model].input_shape),
        "steps_per_sample": r.mode.steps_per_call,
    } for r in rows]
