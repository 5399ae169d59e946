#!/usr/bin/env python3
"""How fast the optimizer-side ops run on a GPU, against the GPU's copy bandwidth.

Ceiling: ``dst.copy_(src)`` of a 2 GB buffer (4 GB moved: bytes read + bytes written), the median of 30
CUDA-event-timed copies after 5 warm-ups.

Then for each backend (``cuda``, ``triton``, ``foreach``, and ``sgd_fused``: ``torch.optim.SGD(fused=True)``'s
step alone, the floor-like reference) × dtype (fp32, bf16) × parameter set:

``one_256M``      one tensor of 2^28 elements
``vit_b_16``      torchvision vit_b_16's 152 parameter shapes (86.6M elements; from torchvision on the meta
                  device, or the list written out below when torchvision does not import)
``small_300``     300 tensors of 2,000-6,000 elements (bench's many_small set)
``50M_1000``      one 50M-element tensor and 1,000 small ones

it measures ``perturb_`` (first ascent, per-tensor norm, ε 0.05, ζ 1) and ``restore_sgd_`` (lr 0.01, momentum
0.9, nesterov, weight decay 5e-4: bench's STEP_ARGS), each on its own. Then, after all of those (so the time
budget cuts these first), the gradient-reuse ops on ``one_256M`` and ``vit_b_16`` (REUSE_SETS), both dtypes,
every backend but ``sgd_fused``: ``norms`` of the grads, ``restore_orthogonal_`` per-tensor (params ← θ + Δ
from a stored Δ list before each call, outside the timed span: after a call params are θ exactly, so every call
sees the same Δ ≠ 0) and ``add_orthogonal_`` per-tensor with α 1e-6 (each call grows g by at most 1 + α, so
repeated calls stay stationary):

* GPU ms per op: the median of per-call CUDA event pairs, recorded back to back behind a ``torch.cuda._sleep``
  so the host runs ahead and the GPU never waits for it; calls rotate over several input sets when one set
  would fit in 4x the L2 cache (at most 8), so the data comes from HBM.
* host µs per call: the median wall time of the Python call, without synchronising inside it (the queue is
  drained before each call, so the call never waits for the GPU).
* launches per op: CUDA kernel events of one call under ``torch.profiler`` (CUPTI), memcpy and memset counted
  apart (a Triton pointer table rebuilt would show as a host-to-device copy).
* bytes moved per op (BYTES below) and GB/s = bytes / GPU time, and that as a fraction of the copy ceiling.

Targets printed beside the results: ``cuda`` ≥ 80 % and ``triton`` ≥ 70 % of the ceiling on ``one_256M``, and
host time per call below GPU time per op on ``vit_b_16`` (the GPU, not Python, is then the bottleneck), for every
op measured there (the gradient-reuse ops' rows get the same targets).
Missing a target is reported, not an error: the exit status is 1 only when a measurement failed.

``--dry-run``: CPU tensors at tiny sizes, the ``cpu`` and ``foreach`` backends (and sgd_fused; without ``cpu``
where it is unavailable), timed with time.perf_counter, launches counted as dispatched aten ops: exercises this
script without a GPU.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = Path(__file__).resolve().parent
for _path in (REPO, TOOLS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from amp_fused import functional as F  # noqa: E402
from bench.optimizer_step import STEP_ARGS, many_small_shapes  # noqa: E402

# Element accesses per element of the list, (reads, writes), for each op timed here: bytes moved per op is
# (reads + writes) * itemsize * elements.
#   copy          reads src, writes dst
#   perturb_      first ascent: reads g for the norms, then g and θ again to apply; writes θ + Δ and the backup
#   restore_sgd_  reads the backup, the grad and the momentum buffer; writes the param and the momentum buffer
#   sgd_step      torch.optim.SGD(fused=True) with momentum: reads param, grad, momentum; writes param, momentum
#   norms         reads the tensors once, writes nothing (fp32: 4 B per element)
#   restore_orthogonal_  reads p, θ, g for the sums ⟨Δ,g⟩, ‖Δ‖², then p, θ, g again to apply; writes the
#                 orthogonals and p (fp32: 12 + 20 = 32 B per element)
#   add_orthogonal_  reads g, v for the norms, then g, v again to apply; writes g (fp32: 20 B per element)
BYTES = {"copy": (1, 1), "perturb_": (3, 2), "restore_sgd_": (3, 2), "sgd_step": (3, 2),
         "norms": (1, 0), "restore_orthogonal_": (6, 2), "add_orthogonal_": (4, 1)}
STEP_OPS = ("perturb_", "restore_sgd_")
REUSE_OPS = ("norms", "restore_orthogonal_", "add_orthogonal_")  # the gradient-reuse ops
REUSE_SETS = ("one_256M", "vit_b_16")  # where they are measured (where the targets are)
REUSE_ALPHA = 1e-6  # add_orthogonal_'s α: g grows by at most 1 + α per call
TARGETS = {"cuda": 0.80, "triton": 0.70}  # fraction of the copy ceiling on one_256M
SGD_FUSED = "sgd_fused"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SLEEP_CLOCK_HZ = 2.0e9  # torch.cuda._sleep counts cycles; ~H200 boost clock (a lower clock just sleeps longer)


def bytes_moved(op: str, elements: int, itemsize: int) -> int:
    reads, writes = BYTES[op]
    return (reads + writes) * itemsize * elements


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def fraction(rate_gbps: float, ceiling_gbps: float) -> float:
    return rate_gbps / ceiling_gbps


# -- parameter sets --------------------------------------------------------------------------------------------
def _vit_b_16_written_out() -> list[tuple]:
    """vit_b_16's parameters in torchvision's order: class token, patch embedding, position embedding, 12
    encoder blocks, final LayerNorm, head (1000 classes)."""
    d, mlp = 768, 3072
    block = [(d,), (d,),                      # ln_1
             (3 * d, d), (3 * d,),            # self_attention.in_proj
             (d, d), (d,),                    # self_attention.out_proj
             (d,), (d,),                      # ln_2
             (mlp, d), (mlp,),                # mlp.0
             (d, mlp), (d,)]                  # mlp.3
    return ([(1, 1, d), (d, 3, 16, 16), (d,), (1, 197, d)] + block * 12
            + [(d,), (d,), (1000, d), (1000,)])


VIT_B_16_SHAPES = _vit_b_16_written_out()


def vit_b_16_shapes() -> tuple[list[tuple], str]:
    try:
        import torchvision

        with torch.device("meta"):
            model = torchvision.models.vit_b_16()
        return [tuple(p.shape) for p in model.parameters()], "torchvision (meta device)"
    except Exception as exc:  # noqa: BLE001 - fall back to the list written out here
        return list(VIT_B_16_SHAPES), f"written out in gpu_bandwidth.py (torchvision: {type(exc).__name__})"


def param_sets(dry: bool) -> dict[str, tuple[list[tuple], str]]:
    vit, vit_source = vit_b_16_shapes()
    small = [tuple(s) for s in many_small_shapes(300)]
    thousand = [tuple(s) for s in many_small_shapes(1000, seed=1)]
    if not dry:
        return {"one_256M": ([(2**28,)], "one tensor of 2^28 elements"),
                "vit_b_16": (vit, vit_source),
                "small_300": (small, "bench many_small_shapes(300)"),
                "50M_1000": ([(50_000_000,)] + thousand, "50M + many_small_shapes(1000, seed=1)")}
    cap = 2048  # tiny: every tensor at most this many elements
    return {"one_256M": ([(2**18,)], "dry run: one tensor of 2^18 elements"),
            "vit_b_16": ([(min(math.prod(s), cap),) for s in vit], f"dry run: {len(vit)} shapes capped at {cap}"),
            "small_300": ([(n[0] // 100,) for n in small[:30]], "dry run: 30 tensors of 20-60 elements"),
            "50M_1000": ([(2**17,)] + [(n[0] // 100,) for n in thousand[:100]], "dry run: 2^17 + 100 tiny")}


# -- timing ----------------------------------------------------------------------------------------------------
class Clock:
    """GPU: CUDA events behind a sleep; CPU (dry run): perf_counter."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def gpu_times(self, fn, reps: int, host_s: float) -> list[float]:
        """Seconds per call, ``reps`` calls (``fn.prepare(i)``, where there is one, runs before call i, outside
        its timed span)."""
        prepare = getattr(fn, "prepare", None)
        if not self.cuda:
            out = []
            for i in range(reps):
                if prepare:
                    prepare(i)
                t0 = time.perf_counter()
                fn(i)
                out.append(time.perf_counter() - t0)
            return out
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        self.sync()
        try:  # keep the GPU busy while the host queues every call, so no call waits for the host
            torch.cuda._sleep(int(min(0.2, (3.0 if prepare else 1.5) * host_s * reps + 1e-3) * SLEEP_CLOCK_HZ))
        except Exception:  # noqa: BLE001 - without it the events still time the calls, host gaps included
            pass
        for i in range(reps):
            if prepare:
                prepare(i)
            starts[i].record()
            fn(i)
            ends[i].record()
        self.sync()
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]

    def host_times(self, fn, reps: int) -> list[float]:
        prepare = getattr(fn, "prepare", None)
        out = []
        for i in range(reps):
            if prepare:
                prepare(i)
            self.sync()  # an empty queue: the call never blocks on the GPU
            t0 = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - t0)
        self.sync()
        return out


def count_launches(fn, device: str) -> dict:
    """GPU: kernel, memcpy and memset events of one call under torch.profiler (CUPTI). CPU: dispatched aten ops."""
    prepare = getattr(fn, "prepare", None)
    if prepare:
        prepare(0)
    if device != "cuda":
        from amp_fused.profiling import DispatchCounter

        with DispatchCounter() as counter:
            fn(0)
        return {"launches": counter.ops, "memcpy": 0, "memset": 0, "counted_as": "dispatched aten ops"}
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(0)
        torch.cuda.synchronize()
    # device-side events: kernels, memcpy, memset, and (some Kineto versions) synchronisation records
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    memcpy = sum(n.startswith("Memcpy") for n in names)
    memset = sum(n.startswith("Memset") for n in names)
    kernels = [n for n in names if not n.startswith(("Memcpy", "Memset")) and "Sync" not in n]
    counts = collections.Counter(n[:80] for n in kernels)
    return {"launches": len(kernels), "memcpy": memcpy, "memset": memset,
            "kernels": dict(counts.most_common(8)), "counted_as": "CUDA kernel events in torch.profiler"}


def ceiling(device: str, clock: Clock, dry: bool) -> dict:
    numel = 2**23 if dry else 2**29  # fp32: 32 MB / 2 GB per buffer
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    for _ in range(5):
        dst.copy_(src)
    clock.sync()
    times = clock.gpu_times(lambda i: dst.copy_(src), 5 if dry else 30, 20e-6)
    seconds = statistics.median(times)
    nbytes = bytes_moved("copy", numel, 4)
    del src, dst
    return {"bytes": nbytes, "median_ms": seconds * 1e3, "gbps": gbps(nbytes, seconds), "runs": len(times),
            "what": f"dst.copy_(src), {numel * 4 / 1e9:.2f} GB buffers"}


# -- one parameter set -----------------------------------------------------------------------------------------
def make_inputs(shapes, dtype, device, gen, reuse: bool = False):
    """The lists of the step ops; ``reuse``: those of the gradient-reuse ops (backups θ = params, orthogonals,
    and the Δ that ``restore_orthogonal_``'s prepare adds to θ)."""
    def randn(scale):
        return [(torch.randn(s, device=device, generator=gen, dtype=torch.float32) * scale).to(dtype)
                for s in shapes]
    if reuse:
        params = randn(0.1)
        return {"params": params, "grads": randn(0.01), "backups": [p.clone() for p in params],
                "orthogonals": randn(0.01), "deltas": randn(0.001)}
    return {"params": randn(0.1), "grads": randn(0.01), "backups": [torch.empty(s, dtype=dtype, device=device)
                                                                     for s in shapes],
            "momentum": randn(0.01)}


def rotations(set_bytes: int, l2_bytes: int | None) -> int:
    """Input sets to rotate over: enough that one round does not fit in 4x the L2 cache, at most 8."""
    if not l2_bytes:
        return 1
    return max(1, min(8, math.ceil(4 * l2_bytes / max(set_bytes, 1))))


def reuse_fns(backend: str, sets: list[dict]):
    """norms, restore_orthogonal_ (with its prepare: params ← θ + Δ) and add_orthogonal_ on ``sets``."""
    def norms(i):
        F.norms(sets[i % len(sets)]["grads"], backend=backend)

    def restore_orthogonal(i):
        s = sets[i % len(sets)]
        F.restore_orthogonal_(s["params"], s["backups"], s["grads"], s["orthogonals"], True, backend=backend)

    def perturb_again(i):  # after a call params are θ bit for bit: θ + Δ, the same every time
        torch._foreach_add_(sets[i % len(sets)]["params"], sets[i % len(sets)]["deltas"])

    restore_orthogonal.prepare = perturb_again

    def add_orthogonal(i):
        s = sets[i % len(sets)]
        F.add_orthogonal_(s["grads"], s["orthogonals"], REUSE_ALPHA, True, backend=backend)
    return {"norms": norms, "restore_orthogonal_": restore_orthogonal, "add_orthogonal_": add_orthogonal}


def op_fns(backend: str, sets: list[dict], reuse: bool = False):
    a = STEP_ARGS
    if reuse:
        return {} if backend == SGD_FUSED else reuse_fns(backend, sets)
    if backend == SGD_FUSED:
        optimizers = []
        for s in sets:
            for p, g in zip(s["params"], s["grads"]):
                p.grad = g
            optimizers.append(torch.optim.SGD(s["params"], lr=a["lr"], momentum=a["momentum"],
                                              dampening=a["dampening"], weight_decay=a["weight_decay"],
                                              nesterov=a["nesterov"], maximize=a["maximize"], fused=True))
        return {"sgd_step": lambda i: optimizers[i % len(optimizers)].step()}

    def perturb(i):
        s = sets[i % len(sets)]
        F.perturb_(s["params"], s["grads"], s["backups"], a["epsilon"], a["inner_lr"], True, True, backend=backend)

    def restore_sgd(i):
        s = sets[i % len(sets)]
        F.restore_sgd_(s["params"], s["backups"], s["grads"], s["momentum"], a["lr"], a["momentum"],
                       a["dampening"], a["weight_decay"], a["nesterov"], a["maximize"], False, backend=backend)
    return {"perturb_": perturb, "restore_sgd_": restore_sgd}


def measure(fn, clock: Clock, device: str, dry: bool, n_sets: int) -> dict:
    prepare = getattr(fn, "prepare", None)
    for i in range(1 if dry else max(3, n_sets)):  # warm-up: compiles, lazily created state, first touch
        if prepare:
            prepare(i)
        fn(i)
    clock.sync()
    once = statistics.median(clock.gpu_times(fn, max(2, n_sets), 20e-6)) if not dry else 0.0
    host = clock.host_times(fn, 3 if dry else 20)
    host_s = statistics.median(host)
    reps = 3 if dry else max(5, min(50, int(0.15 / max(once, 1e-6))))
    times = clock.gpu_times(fn, reps, host_s)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    row = {"gpu_ms": float(q[1]) * 1e3, "gpu_ms_q1": float(q[0]) * 1e3, "gpu_ms_q3": float(q[2]) * 1e3,
           "reps": reps, "host_us": host_s * 1e6}
    try:
        row.update(count_launches(fn, device))
    except Exception as exc:  # noqa: BLE001
        row.update(launches=None, launch_error=repr(exc))
    return row


def triton_builds():
    try:
        from amp_fused.triton.metadata import CACHE

        return CACHE.pointer_table_builds + CACHE.layout_builds
    except Exception:  # noqa: BLE001
        return None


# -- report ----------------------------------------------------------------------------------------------------
def fmt_rate(g: float | None) -> str:
    if g is None:
        return "-"
    return f"{g / 1e3:.2f}TB/s" if g >= 1000 else f"{g:.1f}GB/s"


def tables(report) -> list[str]:
    rows = [r for r in report["rows"] if "gpu_ms" in r]
    ceiling_gbps = report["ceiling"]["gbps"]
    backends = report["backends"]
    keys = []
    for r in report["rows"]:
        key = (r["set"], r["dtype"], "restore_sgd_" if r["op"] == "sgd_step" else r["op"])
        if key not in keys:
            keys.append(key)
    by = {(r["set"], r["dtype"], "restore_sgd_" if r["op"] == "sgd_step" else r["op"], r["backend"]): r
          for r in report["rows"]}
    width = 24
    head = f"{'set':<10} {'dtype':<5} {'op':<19}" + "".join(f" | {b:<{width}}" for b in backends)
    out = [f"copy ceiling: {fmt_rate(ceiling_gbps)} ({report['ceiling']['what']}, median of "
           f"{report['ceiling']['runs']}); sgd_fused sits in the restore_sgd_ rows (its step alone)",
           "GPU ms per op, GB/s, fraction of the copy ceiling:", head, "-" * len(head)]
    for key in keys:
        cells = []
        for b in backends:
            r = by.get(key + (b,))
            if r is None:
                cells.append("")
            elif "gpu_ms" not in r:
                cells.append("ERROR")
            else:
                cells.append(f"{r['gpu_ms']:.3f}ms {fmt_rate(r['gbps'])} {100 * r['fraction']:.0f}%")
        out.append(f"{key[0]:<10} {key[1]:<5} {key[2]:<19}" + "".join(f" | {c:<{width}}" for c in cells))
    out += ["host µs per call / launches per op (memcpy+memset):", head, "-" * len(head)]
    for key in keys:
        cells = []
        for b in backends:
            r = by.get(key + (b,))
            if r is None or "gpu_ms" not in r:
                cells.append("" if r is None else "ERROR")
            else:
                extra = f"+{r['memcpy'] + r['memset']}" if r.get("memcpy") or r.get("memset") else ""
                cells.append(f"{r['host_us']:.0f}us / {r.get('launches')}{extra}")
        out.append(f"{key[0]:<10} {key[1]:<5} {key[2]:<19}" + "".join(f" | {c:<{width}}" for c in cells))
    del rows
    return out


def evaluate_targets(report) -> list[dict]:
    targets = []
    for r in report["rows"]:
        if "gpu_ms" not in r:
            continue
        if r["set"] == "one_256M" and r["backend"] in TARGETS:
            need = TARGETS[r["backend"]]
            targets.append({"target": f"{r['backend']} {r['dtype']} {r['op']} on one_256M ≥ {need:.0%} of copy",
                            "value": f"{r['fraction']:.0%}", "ok": r["fraction"] >= need})
        if r["set"] == "vit_b_16" and r["backend"] in TARGETS:
            targets.append({"target": f"{r['backend']} {r['dtype']} {r['op']} on vit_b_16: host < GPU",
                            "value": f"host {r['host_us']:.0f} µs, GPU {r['gpu_ms'] * 1e3:.0f} µs",
                            "ok": r["host_us"] < r["gpu_ms"] * 1e3})
    return targets


def combined_rates(report, ops) -> list[str]:
    """"backend rate fraction" of each backend whose one_256M fp32 rows of all ``ops`` were measured: their
    bytes over their summed GPU time."""
    parts = []
    for b in [b for b in report["backends"] if b != SGD_FUSED]:
        rs = [r for r in report["rows"] if r["set"] == "one_256M" and r["dtype"] == "fp32" and r["backend"] == b
              and r["op"] in ops and "gpu_ms" in r]
        if len(rs) == len(ops):
            rate = gbps(sum(r["bytes"] for r in rs), sum(r["gpu_ms"] for r in rs) / 1e3)
            parts.append(f"{b} {fmt_rate(rate)} {100 * rate / report['ceiling']['gbps']:.0f}%")
    return parts


def headline(report) -> str:
    parts = combined_rates(report, STEP_OPS)
    met = [t for t in report["targets"] if t["ok"]]
    line = (f"one_256M fp32 perturb_+restore_sgd_: {', '.join(parts) or 'not measured'} of copy "
            f"{fmt_rate(report['ceiling']['gbps'])}; targets met {len(met)}/{len(report['targets'])}")
    missed = [t for t in report["targets"] if not t["ok"]]
    if missed:
        line += " (missed: " + "; ".join(f"{t['target']}: {t['value']}" for t in missed[:3]) + (
            f" and {len(missed) - 3} more" if len(missed) > 3 else "") + ")"
    errors = [r for r in report["rows"] if "gpu_ms" not in r]
    if errors:
        line += f"; {len(errors)} measurements FAILED"
    if report["not_measured"]:
        line += f"; {len(report['not_measured'])} not measured (time budget)"
    reuse = combined_rates(report, REUSE_OPS)
    if reuse:
        line += f"; one_256M fp32 norms+restore_orthogonal_+add_orthogonal_: {', '.join(reuse)}"
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPU bandwidth of the AMP ops against a device copy")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--json", help="write the results here (after every measurement)")
    parser.add_argument("--backends", help="comma list (default cuda,triton,foreach,sgd_fused; dry: cpu,foreach,"
                                           "sgd_fused)")
    parser.add_argument("--sets", help="comma list of one_256M,vit_b_16,small_300,50M_1000")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--budget-s", type=float, default=0, help="start no measurement after this many seconds")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    stand_in_note = None
    if args.backends:
        backends = args.backends.split(",")
    elif dry:
        from gpu_check_util import dry_backend

        first, stand_in_note = dry_backend(exact=False)  # timing only: foreach in place of an unavailable cpu
        backends = list(dict.fromkeys([first, "foreach", SGD_FUSED]))
    else:
        backends = ["cuda", "triton", "foreach", SGD_FUSED]
    sets = param_sets(dry)
    wanted = args.sets.split(",") if args.sets else list(sets)
    dtypes = args.dtypes.split(",")
    if not dry and not torch.cuda.is_available():
        print("RESULT: torch sees no CUDA device (--dry-run exercises this script on CPU tensors)")
        return 1
    clock = Clock(device)
    if dry:
        torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
    l2 = None if dry else getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 60 * 2**20)
    report = {"mode": "dry-run" if dry else "gpu", "device": torch.cuda.get_device_name() if not dry else "cpu",
              "backends": backends,
              "bytes_per_element": {op: {"reads": r, "writes": w} for op, (r, w) in BYTES.items()},
              "step_args": STEP_ARGS, "l2_bytes": l2, "sets": {k: {"tensors": len(v[0]), "source": v[1],
                                                                   "elements": sum(math.prod(s) for s in v[0])}
                                                               for k, v in sets.items()},
              "launches_counted_as": "dispatched aten ops (CPU dry run)" if dry else
              "CUDA kernel events of one call in torch.profiler (CUPTI); memcpy/memset apart",
              "rows": [], "not_measured": [], "targets": [], "reuse_ops": list(REUSE_OPS),
              "reuse_sets": list(REUSE_SETS), "reuse_alpha": REUSE_ALPHA}
    if stand_in_note:
        report["stand_in_note"] = stand_in_note
        print(f"note: {stand_in_note}")
    if dry:
        print("dry run: CPU tensors at tiny sizes, perf_counter timing. On a GPU it measures a 4 GB device copy, "
              "then cuda, triton, foreach, sgd_fused x fp32, bf16 x one_256M (2^28), vit_b_16 (152 tensors, 86.6M), "
              "small_300, 50M_1000: perturb_ and restore_sgd_ GPU ms (CUDA events), host µs per call, launches "
              "(torch.profiler), GB/s and the fraction of the copy; then norms, restore_orthogonal_, add_orthogonal_ "
              "on one_256M and vit_b_16; targets cuda ≥ 80%, triton ≥ 70% on one_256M, host < GPU on vit_b_16")

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)

    report["ceiling"] = ceiling(device, clock, dry)
    print(f"copy ceiling: {fmt_rate(report['ceiling']['gbps'])} ({report['ceiling']['median_ms']:.3f} ms)", flush=True)
    save()
    order = [(s, d) for d in dtypes[:1] for s in wanted[:2]] + [(s, d) for d in dtypes[1:] for s in wanted[:2]] + \
            [(s, d) for d in dtypes for s in wanted[2:]]
    order = [(s, d, False) for s, d in order] + [(s, d, True) for d in dtypes for s in wanted if s in REUSE_SETS]
    gen = torch.Generator(device=device).manual_seed(0)
    for set_name, dtype_name, reuse in order:
        shapes = sets[set_name][0]
        dtype = DTYPES[dtype_name]
        elements = sum(math.prod(s) for s in shapes)
        set_bytes = (5 if reuse else 4) * elements * dtype.itemsize
        n_sets = rotations(set_bytes, l2)
        try:
            inputs = [make_inputs(shapes, dtype, device, gen, reuse) for _ in range(n_sets)]
        except Exception as exc:  # noqa: BLE001
            report["rows"].append({"set": set_name, "dtype": dtype_name, "backend": "all", "op": "setup",
                                   "error": repr(exc)})
            continue
        for backend in backends:
            try:
                fns = op_fns(backend, inputs, reuse)
            except Exception as exc:  # noqa: BLE001
                report["rows"].append({"set": set_name, "dtype": dtype_name, "backend": backend, "op": "setup",
                                       "error": repr(exc)[:500]})
                continue
            for op, fn in fns.items():
                row = {"set": set_name, "tensors": len(shapes), "elements": elements, "dtype": dtype_name,
                       "backend": backend, "op": op, "rotations": n_sets,
                       "bytes": bytes_moved(op, elements, dtype.itemsize)}
                if args.budget_s and time.perf_counter() - start > args.budget_s:
                    report["not_measured"].append(f"{set_name} {dtype_name} {backend} {op}")
                    continue
                builds = triton_builds() if backend == "triton" else None
                try:
                    row.update(measure(fn, clock, device, dry, n_sets))
                    row["gbps"] = gbps(row["bytes"], row["gpu_ms"] / 1e3)
                    row["fraction"] = fraction(row["gbps"], report["ceiling"]["gbps"])
                    if builds is not None:
                        row["triton_table_builds_while_timed"] = triton_builds() - builds - 0
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
                    row["traceback"] = traceback.format_exc()[-2000:]
                    print(f"ERROR {set_name} {dtype_name} {backend} {op}: {row['error']}", flush=True)
                report["rows"].append(row)
                save()
        for s in inputs:
            for p in s["params"]:
                p.grad = None
        del inputs, fns
        if not dry:
            torch.cuda.empty_cache()
        print(f"  measured {set_name} {dtype_name}{' gradient-reuse ops' if reuse else ''} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    report["targets"] = evaluate_targets(report)
    report["headline"] = headline(report)
    report["seconds"] = time.perf_counter() - start
    save()
    for line in tables(report):
        print(line)
    for t in report["targets"]:
        print(f"target {'met   ' if t['ok'] else 'MISSED'} {t['target']}: {t['value']}")
    print("RESULT: " + ("dry run (CPU, tiny sizes, not GPU figures): " if dry else "") + report["headline"])
    return 1 if any("gpu_ms" not in r for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
