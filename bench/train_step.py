"""A whole training step (forward, backward, optimizer) of ERM against AMP, on small models.

ERM is ``torch.optim.SGD(fused=True)``, the fastest plain step (the ``sgd_fused`` anchor of the optimizer_step
section), so the AMP/ERM ratio does not flatter AMP. AMP runs as users call it, with the same SGD options passed
through: its full steps restore θ and take the SGD step in one fused op; the steps between full ones of the
amortised schedules take torch.optim.SGD's default step. Exact AMP (``perturb_every=1``) runs two forward/backward
passes per step, so about 2x ERM is its floor. The amortised schedules (``perturb_every=4``, ``between="erm"`` or
``"reuse"``) take one pass on the 3 steps between full ones (at θ, or at θ + the last Δ): 1.25x the passes of ERM.
Every mode is timed over a whole period of 4 consecutive steps (4 different batches) and reported per step, so the
amortised ones are their mean over the period. The batches are random inputs and labels, the same for every mode.
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
from .timing import Timing, time_interleaved

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


@dataclass(frozen=True)
class Mode:
    name: str  # erm, amp, amp-k4-erm, amp-k4-reuse
    backend: str
    perturb_every: int | None = None  # None: ERM
    between: str = "erm"

    @property
    def key(self) -> str:
        return f"{self.name} ({self.backend})"


def modes(backend_names, fastest: str) -> list[Mode]:
    """ERM, exact AMP with ``reference`` (when asked for) and ``fastest``, the amortised schedules with ``fastest``."""
    exact = (["reference"] if "reference" in backend_names else []) + ([fastest] if fastest != "reference" else [])
    out = [Mode("erm", ERM_BACKEND)]
    out += [Mode("amp", b, perturb_every=1) for b in exact]
    out += [Mode(f"amp-k{PERIOD}-{between}", fastest, perturb_every=PERIOD, between=between)
            for between in ("erm", "reuse")]
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

    def __call__(self) -> None:
        for inputs, targets in self.batches:
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
            t = timings[key]
            per_step = Timing(t.median / PERIOD, t.q1 / PERIOD, t.q3 / PERIOD, t.samples)
            rows.append(Row(model_name, spec.batch, trainer.mode, per_step))
    return rows


def to_json(rows: list[Row]) -> list[dict]:
    erm = {r.model: r.timing.median for r in rows if r.mode.perturb_every is None}
    return [{
        "model": r.model, "batch": r.batch, "mode": r.mode.name, "backend": r.mode.backend,
        "ms": r.timing.median * 1e3, "ratio_vs_erm": r.timing.median / erm[r.model],
        "iqr_ms": r.timing.iqr * 1e3, "q1_ms": r.timing.q1 * 1e3, "q3_ms": r.timing.q3 * 1e3,
        "samples": r.timing.samples, "input": list(MODELS[r.model].input_shape), "steps_per_sample": PERIOD,
    } for r in rows]
