"""Interleaved timing with ``torch.utils.benchmark.Timer``, shared by the benchmark sections."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.benchmark import Measurement, Timer


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one statement, over the per-block times of every round."""
    median: float
    q1: float
    q3: float
    samples: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, measurement: Measurement) -> "Timing":
        # The same quantiles (linear interpolation) Measurement uses for its median and iqr.
        times = torch.tensor(measurement.times, dtype=torch.float64)
        q1, median, q3 = (times.quantile(q).item() for q in (0.25, 0.5, 0.75))
        return cls(median=median, q1=q1, q3=q3, samples=len(times))


def force_trigger(optimizer, full) -> None:
    """An adaptive AMP optimizer's decision forced by ``full(optimizer)`` (its trigger still measures ‖g‖², updates
    its statistics and syncs first): the instrument that times both kinds of step of an adaptive schedule."""
    measure = optimizer._trigger

    def trigger(scaler):
        measure(scaler)
        return "amp" if full(optimizer) else optimizer.between

    optimizer._trigger = trigger


def time_interleaved(statements: dict[str, Callable[[], object]], rounds: int, min_run_time: float,
                     label: str) -> dict[str, Timing]:
    """Time every statement with ``Timer.blocked_autorange`` once per round, in turn, and pool the rounds.

    Taking turns (and starting each round one statement further on) makes a change in the load of a shared
    machine reach every statement alike instead of whichever was timed while it lasted. Each statement is
    called once first, as warm-up (first touch of its buffers, lazily created optimizer state, caches);
    blocked_autorange's block-size estimate warms it again before every measurement.
    """
    names = list(statements)
    for fn in statements.values():
        fn()
    measurements: dict[str, list[Measurement]] = {name: [] for name in names}
    for r in range(rounds):
        start = r % len(names)
        for name in names[start:] + names[:start]:
            # Timer runs on 1 thread unless told otherwise: time with the threads the code would use.
            timer = Timer(stmt="fn()", globals={"fn": statements[name]}, label=label, description=name,
                          num_threads=torch.get_num_threads())
            measurements[name].append(timer.blocked_autorange(min_run_time=min_run_time))
    return {name: Timing.of(Measurement.merge(ms)[0]) for name, ms in measurements.items()}
