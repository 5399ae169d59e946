"""Optimizer-side cost of one AMP step on the CPU, per backend, against this machine's memory bandwidth.

One step = ``perturb_`` (first ascent, per-tensor norm) + ``restore_sgd_`` (momentum 0.9, nesterov,
weight decay 5e-4, momentum buffers already initialised), on random gradients, with no forward or
backward pass: the work AMP adds on top of plain SGD, plus the SGD step itself.

The floor is what a fused implementation cannot avoid moving through memory, per fp32 parameter:
perturb_ reads g for the norms (4 B), then reads θ and g and writes the backup and θ+Δ (16 B);
restore_sgd_ reads the backup, g and the momentum buffer and writes θ and the buffer (20 B): 40 B, timed
against the bandwidth of a triad (a = b + s·c, counted as 3·4 B per element) measured in the same run.
Neither count includes write-allocate reads: the triad's write-only stream makes it move 16 B per 12
counted, the step's two write-only streams (the backup; θ in restore_sgd_) 48 B per 40, so a step that
streams at the triad's DRAM throughput comes in near 0.9x the floor.

Run: ``python bench/optimizer_step.py [--sets resnet18 many_small] [--backends reference foreach cpu]``.
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.benchmark import Timer

from amp_fused import backends

BACKENDS = ("reference", "foreach", "cpu")
BYTES_PER_PARAM = 40  # see the module docstring
STEP_ARGS = dict(epsilon=0.05, inner_lr=1.0, lr=0.01, momentum=0.9, dampening=0.0, weight_decay=5e-4,
                 nesterov=True, maximize=False)


# -- parameter sets --------------------------------------------------------------------------------------------
def resnet18_shapes() -> list[torch.Size]:
    """Parameter shapes of torchvision's ResNet-18 (62 tensors, 11.7M values with the 1000-class head)."""
    import torchvision

    return [p.shape for p in torchvision.models.resnet18(weights=None).parameters()]


def many_small_shapes(count: int = 300, low: int = 2000, high: int = 6000, seed: int = 0) -> list[torch.Size]:
    """``count`` 1-d tensors of a few thousand values each: where per-tensor overheads dominate."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.Size([int(n)]) for n in torch.randint(low, high, (count,), generator=gen)]


PARAM_SETS = {"resnet18": resnet18_shapes, "many_small": many_small_shapes}


@dataclass
class StepTensors:
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    backups: list[torch.Tensor]
    momentum_buffers: list[torch.Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def make_tensors(shapes, dtype=torch.float32, seed: int = 0) -> StepTensors:
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, scale):
        return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(scale).to(dtype)

    params = [rand(s, 0.1) for s in shapes]
    return StepTensors(params=params, grads=[rand(s, 0.01) for s in shapes],
                       backups=[torch.empty_like(p) for p in params],
                       momentum_buffers=[rand(s, 0.01) for s in shapes])


def amp_step(ops, t: StepTensors) -> None:
    """The optimizer-side part of one AMP step with the backend module ``ops``."""
    a = STEP_ARGS
    ops.perturb_(t.params, t.grads, t.backups, a["epsilon"], a["inner_lr"], True, True)
    ops.restore_sgd_(t.params, t.backups, t.grads, t.momentum_buffers, a["lr"], a["momentum"], a["dampening"],
                     a["weight_decay"], a["nesterov"], a["maximize"], False)


# -- counting and timing ---------------------------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    """Counts the ops that reach the dispatcher from Python-visible calls, and the host syncs among them."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> tuple[int, int]:
    """(dispatched ops, host syncs) of one call of ``fn``."""
    with OpCounter() as counter:
        fn()
    return counter.ops, counter.syncs


def median_seconds(fn, min_run_time: float) -> float:
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


class Triad:
    """a = b + s·c on fp32 buffers far larger than the caches; its bandwidth counts 3·4 B per element."""

    def __init__(self, numel: int = 1 << 25):
        self.numel = numel
        self.a, self.b, self.c = (torch.rand(numel) for _ in range(3))

    def bandwidth(self, min_run_time: float) -> float:
        seconds = median_seconds(lambda: torch.add(self.b, self.c, alpha=0.5, out=self.a), min_run_time)
        return 3 * 4 * self.numel / seconds


@dataclass
class Row:
    param_set: str
    tensors: int
    numel: int
    backend: str
    seconds: float
    ops: int
    syncs: int


def measure(param_sets=("resnet18", "many_small"), backend_names=BACKENDS, rounds: int = 3,
            min_run_time: float = 0.3) -> tuple[list[Row], list[float]]:
    """Median step time per (set, backend), and the triad bandwidth of every round: each round times the
    triad and every backend once in turn, so drifts in machine load hit all alike."""
    triad = Triad()
    bandwidths = []
    rows = []
    for set_name in param_sets:
        shapes = PARAM_SETS[set_name]()
        modules = {name: backends.resolve(name, "cpu") for name in backend_names}
        state = {name: make_tensors(shapes) for name in backend_names}
        steps = {name: (lambda m=modules[name], t=state[name]: amp_step(m, t)) for name in backend_names}
        for step in steps.values():
            step()  # warm-up: first touch of the backups, allocator caches
        times = {name: [] for name in backend_names}
        for _ in range(rounds):
            bandwidths.append(triad.bandwidth(min_run_time))
            for name in backend_names:
                times[name].append(median_seconds(steps[name], min_run_time))
        for name in backend_names:
            ops, syncs = count_ops(steps[name])
            rows.append(Row(set_name, len(shapes), state[name].numel, name, statistics.median(times[name]), ops,
                            syncs))
    return rows, bandwidths


def format_table(rows: list[Row], bandwidth: float) -> str:
    header = (f"{'set':<11} {'tensors':>7} {'params':>10} {'backend':<10} {'ms':>8} {'GB/s':>6} {'x floor':>7} "
              f"{'ops/step':>8} {'syncs':>5} {'vs ref':>6}")
    lines = [header, "-" * len(header)]
    reference = {r.param_set: r.seconds for r in rows if r.backend == "reference"}
    for r in rows:
        floor = BYTES_PER_PARAM * r.numel / bandwidth
        speedup = f"{reference[r.param_set] / r.seconds:6.2f}" if r.param_set in reference else f"{'-':>6}"
        lines.append(f"{r.param_set:<11} {r.tensors:>7} {r.numel:>10} {r.backend:<10} {r.seconds * 1e3:8.2f} "
                     f"{BYTES_PER_PARAM * r.numel / r.seconds / 1e9:6.1f} {r.seconds / floor:7.2f} "
                     f"{r.ops:>8} {r.syncs:>5} {speedup}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=tuple(PARAM_SETS), default=list(PARAM_SETS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per blocked_autorange")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows, bandwidths = measure(args.sets, args.backends, args.rounds, args.min_run_time)
    bandwidth = statistics.median(bandwidths)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"triad bandwidth {bandwidth / 1e9:.1f} GB/s (median of {len(bandwidths)} rounds, range "
          f"{min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f}); floor = {BYTES_PER_PARAM} B per fp32 "
          "parameter at the median")
    print(format_table(rows, bandwidth))


if __name__ == "__main__":
    main()
