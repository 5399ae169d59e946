"""Host cost of one op call, per backend: what dispatching ``perturb_``, ``restore_`` and ``restore_sgd_`` costs
the CPU at 62, 161, 300 and 1,000 tensors, called as the optimizer calls them (a plan's lists, ``validate=False``).

Two numbers per op: ``call`` is what a step pays for the op (the plan gathers and checks the gradients, then the
op runs), ``op`` the op alone on gradients gathered beforehand. On a GPU both are host time only (the kernels run
asynchronously). On CPU tensors the ``reference``, ``foreach`` and ``cpu`` backends compute inside the call, so
their numbers include the work; the Triton backend runs on CPU tensors only under its interpreter, so there it is
timed with the launches stubbed out: everything up to the kernel launch (checks, tables, allocations) and nothing
after. Its rows carry the target of issue 12: at most ``TARGET_US + TARGET_US_PER_TENSOR * tensors`` per ``op``, and
say whether its per-call passes (the address check of the lists passed anew, the version bumps of the written ones)
ran in C++ (``amp_fused._C`` loaded) or in Python (``host_passes``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from amp_fused import backends, functional
from amp_fused import plan as plans

from .optimizer_step import PARAM_SETS, STEP_ARGS, many_small_shapes, random_tensors
from .timing import Timing, time_interleaved

TARGET_US = 30.0  # issue 12: Triton's host cost per op call, fixed part
TARGET_US_PER_TENSOR = 0.2  # and per tensor
OPS = ("perturb_", "restore_", "restore_sgd_")
HOST_SETS = {
    "resnet18": PARAM_SETS["resnet18"],  # 62 tensors
    "resnet50": PARAM_SETS["resnet50"],  # 161
    "many_small": PARAM_SETS["many_small"],  # 300
    "small_1000": lambda: many_small_shapes(1000),  # 1,000 tensors of 2,000-6,000 values
}
QUICK_HOST_SETS = ("resnet18", "small_1000")


def target_us(tensors: int) -> float:
    return TARGET_US + TARGET_US_PER_TENSOR * tensors


class _NoLaunch:
    """Stands in for the Triton kernels module: ``kernel[grid](...)`` returns at once, so a call is timed up to
    its launches (the interpreter would otherwise be all that is measured)."""

    def __getattr__(self, name):
        return self

    def __getitem__(self, grid):
        return _no_launch


def _no_launch(*args, **kwargs):
    return None


@contextlib.contextmanager
def triton_launches_stubbed():
    from amp_fused.triton import ops

    real = ops._kernels_for
    ops._kernels_for = lambda device: _NoLaunch()
    try:
        yield
    finally:
        ops._kernels_for = real


def triton_host_passes() -> str:
    """Where the Triton backend's per-call passes run in this process: "C++" (amp_fused._C) or "Python"."""
    from amp_fused.triton import metadata

    return "C++" if metadata.native() is not None else "Python"


def stubbed(name: str, device: str) -> bool:
    """Whether ``name`` is timed without its launches: Triton on CPU tensors."""
    return name == "triton" and torch.device(device).type == "cpu"


def host_backends(device: str) -> list[str]:
    """Every backend that runs here for ``device`` tensors, and Triton (stubbed) on CPU where it imports."""
    names = backends.available_backends(device)
    if torch.device(device).type == "cpu" and "triton" not in names:
        try:
            backends.get("triton")
            import triton  # noqa: F401
            names.append("triton")
        except Exception:  # noqa: BLE001 - not importable: nothing to time
            pass
    return names


class Lists:
    """One param group's plan part for ``backend``, as the optimizer holds it, with gradients and SGD buffers."""

    def __init__(self, backend: str, shapes, device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(t) for t in random_tensors(shapes, 0.1, gen, device)]
        for p, g in zip(params, random_tensors(shapes, 0.01, gen, device)):
            p.grad = g
        group = {"params": params, "epsilon": STEP_ARGS["epsilon"], "inner_lr": STEP_ARGS["inner_lr"]}
        # Built by hand, not by plans.build: the Triton backend is not "available" for CPU tensors here.
        views = functional.real_views(params)
        self.part = plans.Part(group, params, views, [torch.empty_like(v) for v in views], backends.get(backend))
        if hasattr(plans, "hold"):
            plans.hold(self.part)
        self.buffers = random_tensors(shapes, 0.01, gen, device)
        self.grads = plans.gradients(self.part)

    def statements(self) -> dict:
        part, a, buffers = self.part, STEP_ARGS, self.buffers
        sgd = (a["lr"], a["momentum"], a["dampening"], a["weight_decay"], a["nesterov"], a["maximize"], False)

        def perturb(grads):
            functional.perturb_(part.views, grads, part.backups, a["epsilon"], a["inner_lr"], True, True,
                                backend=part.backend, validate=False)

        def restore_sgd(grads):
            functional.restore_sgd_(part.views, part.backups, grads, buffers, *sgd, backend=part.backend,
                                    validate=False)

        return {
            ("perturb_", "call"): lambda: perturb(plans.gradients(part)),
            ("perturb_", "op"): lambda: perturb(self.grads),
            ("restore_", "call"): lambda: functional.restore_(part.views, part.backups, backend=part.backend,
                                                              validate=False),
            ("restore_sgd_", "call"): lambda: restore_sgd(plans.gradients(part)),
            ("restore_sgd_", "op"): lambda: restore_sgd(self.grads),
        }


@dataclass
class Row:
    param_set: str
    tensors: int
    backend: str
    op: str
    call: Timing
    op_only: Timing
    stubbed: bool


def measure(set_names, backend_names, device="cpu", rounds: int = 3, min_run_time: float = 0.1,
            progress=None) -> list[Row]:
    rows = []
    for set_name in set_names:
        shapes = HOST_SETS[set_name]()
        for name in backend_names:
            if progress:
                progress(f"host: {set_name}, {name}")
            lists = Lists(name, shapes, device)
            # The optimizer's steps run under no_grad (its parameters are leaves that require grad).
            with torch.no_grad(), triton_launches_stubbed() if stubbed(name, device) else contextlib.nullcontext():
                statements = lists.statements()
                timings = time_interleaved({f"{op} {kind}": fn for (op, kind), fn in statements.items()}, rounds,
                                           min_run_time, label=f"host {set_name} {name}")
            for op in OPS:
                call = timings[f"{op} call"]
                rows.append(Row(set_name, len(shapes), name, op, call, timings.get(f"{op} op", call),
                                stubbed(name, device)))
            del lists
    return rows


def to_json(rows: list[Row]) -> list[dict]:
    out = []
    for r in rows:
        row = {"params": r.param_set, "tensors": r.tensors, "backend": r.backend, "op": r.op,
               "call_us": r.call.median * 1e6, "op_us": r.op_only.median * 1e6,
               "call_iqr_us": r.call.iqr * 1e6, "op_iqr_us": r.op_only.iqr * 1e6,
               "op_us_per_tensor": r.op_only.median * 1e6 / r.tensors, "samples": r.call.samples,
               "launches_stubbed": r.stubbed, "target_us": None, "meets_target": None, "host_passes": None}
        if r.backend == "triton":
            row["target_us"] = target_us(r.tensors)
            row["meets_target"] = row["op_us"] <= row["target_us"]
            row["host_passes"] = triton_host_passes()
        out.append(row)
    return out


def host_text(rows: list[dict]) -> str:
    from .report import format_table

    head = "\n".join([
        "host: host time per op call, as the optimizer calls it (a plan's lists, validate=False); call = gathering "
        "and checking the gradients + the op, op = the op alone",
        "(on CPU tensors reference/foreach/cpu compute inside the call; triton on CPU: launches stubbed, the host "
        f"side up to the launch; its target: {TARGET_US:g} us + {TARGET_US_PER_TENSOR:g} us/tensor per op)",
    ] + [f"(triton's per-call address checks and version bumps: in {passes})"
         for passes in dict.fromkeys(r.get("host_passes") for r in rows if r.get("host_passes"))])
    columns = [("set", "<"), ("tensors", ">"), ("backend", "<"), ("op", "<"), ("call us", ">"), ("op us", ">"),
               ("op us/tensor", ">"), ("target us", ">"), ("meets", "<")]
    cells = [[r["params"], str(r["tensors"]), r["backend"] + (" (no launch)" if r["launches_stubbed"] else ""),
              r["op"], f"{r['call_us']:.1f}", f"{r['op_us']:.1f}", f"{r['op_us_per_tensor']:.3f}",
              "-" if r["target_us"] is None else f"{r['target_us']:.1f}",
              "-" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO")] for r in rows]
    return head + "\n" + format_table(columns, cells)
