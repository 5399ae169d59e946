#!/usr/bin/env python3
"""Stress cases for the GPU backends (``cuda``, ``triton``) against the ``foreach`` backend on the same inputs.

Each case runs the op sequence of one AMP step and a bit more on one set of tensor lists, through the
public op layer (``amp_fused.functional``), and checks every op right after it ran:

1. ``perturb_`` first ascent, per-tensor norm (backups poisoned with NaN before: a chunk the kernel skips shows)
2. ``perturb_`` later ascent, global norm (not in the ``huge`` case: one tensor)
3. ``perturb_`` later ascent, per-tensor norm
4. ``restore_`` (params poisoned first)
5. ``restore_sgd_`` first step: momentum 0.9, nesterov, weight decay (params and momentum buffers poisoned)
6. ``restore_sgd_`` later step: momentum 0.9, dampening 0.1, weight decay, maximize (params poisoned)
7. ``norms`` of the gradients (read only)
8. ``restore_orthogonal_`` per-tensor: backups ← θ, params ← θ + Δ with Δ = 0.005·g + 0.01·m (correlated with
   g, so c·Δ is not small against g) and Δ = 0 in every fourth tensor; orthogonals (the momentum buffers'
   memory) poisoned with NaN
9. ``add_orthogonal_`` per-tensor, α 0.7: fresh g and v, v = 0 in every fourth tensor and a NaN in one
   element of every eighth (the gradient must stay bit for bit there)
10. ``restore_orthogonal_`` global and 11. ``add_orthogonal_`` global (the same without the zero or NaN
   tensors; not in the ``huge`` case: one tensor)

Before each op the inputs are copied to the reference dtype (float64; float32 for the ``huge`` case, whose
data is bf16) and the foreach backend runs the same op on the copies; then the backend under test runs on
the originals (the gradient-reuse ops write no state but their outputs, so the reference copies are
enough). Checks: ‖out − ref‖/‖ref‖ and max|out − ref|/max|ref| of every written tensor against a bound
for its dtype (fp32 1e-5, fp16 2e-3, bf16 1.6e-2), NaN failing; for fp32 tensors also the perturbation
(out − θ against ref − θ, 1e-4), which θ would otherwise hide; the returned norms (relative 1e-4); backups
bit-identical to θ after every ascent, params bit-identical to the backups after ``restore_``; read-only
tensors and, for views, the buffer elements around them unchanged. For the gradient-reuse ops: ``norms`` as
the returned norms above; ``orthogonals`` against |g| + |c·Δ| (for a 1-element tensor g − c·Δ is rounding
noise), for fp32 tensors also the removed part g − orthogonals against c·Δ (1e-4 of |c·Δ| + 0.01·|g|: the
rounding of g is all that is left where c·Δ is tiny), params == backups bit for
bit after ``restore_orthogonal_``, orthogonals == g bit for bit where Δ = 0; ``add_orthogonal_``'s grads
against |g| + |coef·v|, for fp32 tensors the added part against coef·v (the same way), grads bit for bit
unchanged where v = 0 or holds a NaN, orthogonals unchanged. Inputs are random normal (params 0.01,
gradients and momentum 1: Δ is not small against θ), never zeros but for those Δ = 0 and v = 0 tensors.

Cases (GPU sizes; ``--dry-run`` runs the same code at small sizes on CPU tensors with the ``cpu`` backend, or
where that is unavailable, its kernels that exist with ``foreach`` for the other ops: gpu_check_util.dry_backend):

``overlap``     two tensors of ``params`` share memory (also: params/grads, params/backups): every op must raise
                ValueError and leave every buffer bit-identical; for ``cuda`` also through ``torch.ops.amp_fused``.
                ``restore_orthogonal_`` (writes params and orthogonals) the same three and orthogonals/orthogonals,
                orthogonals/grads, orthogonals/params; ``add_orthogonal_`` (writes grads) grads/grads and
                grads/orthogonals; ``norms`` (reads only) on overlapping tensors must not raise and must match
                foreach
``unaligned``   views that start 0-4 elements into their buffers (each list at a different offset), sizes
                around the 16-byte vector groups (4 fp32, 8 fp16/bf16 elements) and the chunk, fp32 and a
                bf16/fp16 list
``many``        2,000 tensors of mixed sizes around the 65536-element chunk, small ones, empty ones, 3 large
                ones, mostly fp32 with bf16 and fp16 mixed in: more tensors and chunks than one CUDA launch's
                metadata holds, so tensors straddle launches (the reductions of ``norms``, ``restore_orthogonal_``
                and ``add_orthogonal_`` carry partial sums across them)
``huge``        one bf16 tensor of 2^31 + 4097 elements (4.3 GB per list; needs int64 offsets), checked in
                slices, the last 4097 elements (past 2^31) and the last 64 on their own; the gradient-reuse ops
                per-tensor only (the orthogonals in the momentum buffers' memory: no more memory than before)

Writes a JSON of per-check pass/fail (``--json``) and prints one line per check; the last line is
``RESULT: ...``. Exit 0 when every check passed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = Path(__file__).resolve().parent
for _path in (REPO, TOOLS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from amp_fused import functional as F  # noqa: E402

REFERENCE = "foreach"
# ‖out − ref‖/‖ref‖ allowed per written tensor: a few units of the storage dtype's roundoff.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The perturbation itself, for tensors whose rounding leaves it measurable next to θ.
DELTA_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
NORM_RTOL = 1e-4
SENTINEL = -3.25  # the buffer elements around a view (exact in every dtype)
ASCENT = dict(epsilon=1.0, inner_lr=0.01)
SGD_FIRST = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False,
                 first_step=True)
SGD_LATER = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=True,
                 first_step=False)
ADD_ALPHA = 0.7  # add_orthogonal_'s α: coef·v is as large as g, so its errors show
# The removed part g − orthogonals (c·Δ) and the added part coef·v of fp32 tensors: against their own size plus
# this much of |g| (where the part itself is tiny against g, the rounding of g is all that is left of it).
PART_FLOOR = 1e-2
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


# Elements per CUDA block (csrc/cuda/config.h kChunkSize) where amp_fused._C_cuda cannot be loaded to say.
DEFAULT_CHUNK = 1 << 16


def cuda_chunk_size() -> tuple[int, str | None]:
    """(elements per CUDA block, None) as amp_fused._C_cuda publishes it, loading the extension: amp_fused
    loads its extensions on first use, which reading ``_extension.cuda_error`` is. Where it does not load:
    (DEFAULT_CHUNK, why)."""
    from amp_fused import _extension

    error = _extension.cuda_error
    module = sys.modules.get("amp_fused._C_cuda")
    if error is None and module is not None:
        return int(module.CHUNK_SIZE), None
    return DEFAULT_CHUNK, f"amp_fused._C_cuda did not load ({error}); case sizes use chunk {DEFAULT_CHUNK}"


@dataclass
class Sizes:
    chunk: int
    many_count: int
    many_large: tuple
    huge_numel: int
    huge_slice: int
    unaligned: tuple
    huge_min_free_bytes: int


def gpu_sizes(chunk: int) -> Sizes:
    return Sizes(chunk=chunk, many_count=2000, many_large=(4 * 2**20 + 1, 8 * 2**20 + 3, 16 * 2**20 + 5),
                 huge_numel=2**31 + 4097, huge_slice=2**27,
                 unaligned=(1, 2, 3, 4, 5, 7, 8, 9, 15, 17, 4097, chunk - 1, chunk, chunk + 1, chunk + 3,
                            2 * chunk + 5, 300_001),
                 # per element: 4 bf16 lists and 2 clones (12 B), 4 fp32 reference lists and 2 temporaries
                 # (24 B), and a margin (the gradient-reuse ops: their orthogonals are the momentum buffers, and
                 # restore_orthogonal_ frees 2 reference lists before its checks' 2 temporaries)
                 huge_min_free_bytes=40 * (2**31 + 4097))


def dry_sizes(chunk: int) -> Sizes:
    return Sizes(chunk=chunk, many_count=60, many_large=(2**20 + 3,), huge_numel=2**22 + 4097, huge_slice=2**20,
                 unaligned=(1, 2, 3, 4, 5, 7, 9, 4097, chunk - 1, chunk + 1, chunk + 3), huge_min_free_bytes=0)


# -- tensors ---------------------------------------------------------------------------------------------------
def fill_normal_(tensors, scale: float, gen: torch.Generator, piece: int = 2**27) -> None:
    """Random normal values, in pieces of at most ``piece`` elements (for tensors past 2^31 elements)."""
    for t in tensors:
        flat = t.view(-1) if t.is_contiguous() else t
        if flat.dim() == 1 and flat.numel() > piece:
            for s in flat.split(piece):
                s.normal_(0.0, scale, generator=gen)
        elif t.numel():
            t.normal_(0.0, scale, generator=gen)


def poison_(tensors) -> None:
    for t in tensors:
        t.fill_(float("nan"))


@dataclass
class TensorLists:
    """The lists one case's ops run on; ``buffers``: (buffer, view start, view numel) of views, whose other
    elements hold SENTINEL; ``pieces``: how each tensor is cut for comparison (None: whole)."""
    params: list
    grads: list
    backups: list
    momentum: list
    buffers: list = field(default_factory=list)
    piece: int | None = None

    def lists(self):
        return {"params": self.params, "grads": self.grads, "backups": self.backups, "momentum": self.momentum}


def make_lists(shapes, dtypes, device, gen, piece=None) -> TensorLists:
    def new():
        return [torch.empty(s, dtype=d, device=device) for s, d in zip(shapes, dtypes)]
    lists = TensorLists(new(), new(), new(), new(), piece=piece)
    fill_normal_(lists.params, 0.01, gen)
    fill_normal_(lists.grads, 1.0, gen)
    fill_normal_(lists.momentum, 1.0, gen)
    fill_normal_(lists.backups, 1.0, gen)  # poisoned before the first ascent anyway
    return lists


def make_view_lists(sizes, dtypes, device, gen) -> TensorLists:
    """Each tensor a view starting `offset` elements into its own buffer, offsets differing by list."""
    lists = TensorLists([], [], [], [])
    for k, name in enumerate(("params", "grads", "backups", "momentum")):
        for i, (n, dtype) in enumerate(zip(sizes, dtypes)):
            offset = (i + k) % 5  # 0 (aligned) to 4 elements in: 4 is 8 bytes for fp16/bf16, half a vector
            buffer = torch.full((offset + n + 5,), SENTINEL, dtype=dtype, device=device)
            view = buffer[offset:offset + n]
            lists.lists()[name].append(view)
            lists.buffers.append((name, buffer, offset, n))
    fill_normal_(lists.params, 0.01, gen)
    fill_normal_(lists.grads, 1.0, gen)
    fill_normal_(lists.momentum, 1.0, gen)
    return lists


def pieces(tensors, piece):
    """The tensors cut into 1-d pieces of at most ``piece`` elements (None: the tensors themselves)."""
    if piece is None:
        return list(tensors)
    out = []
    for t in tensors:
        flat = t.reshape(-1)
        cuts = list(range(0, flat.numel(), piece))
        out += [flat[a:min(a + piece, flat.numel())] for a in cuts]
    return out


def as_dtype(tensors, dtype):
    return [t.to(dtype) for t in tensors]


def clones(tensors):
    return [t.clone() for t in tensors]


# -- checks ----------------------------------------------------------------------------------------------------
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rel_errors(outs, refs, elementwise=False, sizes=None):
    """Per tensor ‖out − ref‖₂/‖ref‖₂ (a float64 CPU tensor) and the same over the whole list (NaN stays NaN).
    ``elementwise``: also per tensor max|out − ref| / max|ref|, which a few wrong elements in a large tensor
    cannot hide in. ``sizes``: tensors to measure the errors against in place of ``refs``."""
    diffs, norms, peaks, scales = [], [], [], []
    for k, (o, r) in enumerate(zip(outs, refs)):
        d = (o.to(r.dtype) - r).to(torch.float64)
        size = r if sizes is None else sizes[k]
        diffs.append(torch.linalg.vector_norm(d))
        norms.append(torch.linalg.vector_norm(size.to(torch.float64)))
        if elementwise:
            zero = torch.zeros((), dtype=torch.float64, device=d.device)
            peaks.append(d.abs().amax() if d.numel() else zero)  # amax propagates NaN
            scales.append(size.abs().amax().to(torch.float64) if size.numel() else zero)
    if not diffs:
        empty = torch.zeros(0, dtype=torch.float64)
        return (empty, 0.0, empty) if elementwise else (empty, 0.0)
    d, n = torch.stack(diffs).cpu(), torch.stack(norms).cpu()
    per = torch.where(n > 0, d / n, d)
    total = float(d.norm() / n.norm()) if float(n.norm()) > 0 else float(d.norm())
    if not elementwise:
        return per, total
    pk, sc = torch.stack(peaks).cpu(), torch.stack(scales).cpu()
    return per, total, torch.where(sc > 0, pk / sc, pk)


def check_close(what, outs, refs, dtypes, tol_table=TOL, sizes=None) -> dict:
    """Every tensor within its dtype's bound, normwise and elementwise (against the tensor's largest value).
    ``sizes``: what the errors are measured against in place of ``refs`` (the magnitudes an op combined, where
    its result may cancel to rounding noise)."""
    per, total, elem = rel_errors(outs, refs, elementwise=True, sizes=sizes)
    tol = torch.tensor([tol_table[d] for d in dtypes], dtype=torch.float64)
    ok_each = (per <= tol) & (elem <= tol)  # NaN compares False
    ratio = torch.nan_to_num(torch.maximum(per, elem) / tol, nan=math.inf)
    worst = int(torch.argmax(ratio)) if len(per) else -1
    ok = bool(ok_each.all()) and (math.isfinite(total) or not len(per))
    return {"check": what, "ok": ok, "list_rel": total, "max_rel": float(per.max()) if len(per) else 0.0,
            "max_elementwise_rel": float(elem.max()) if len(elem) else 0.0,
            "worst_index": worst, "worst_rel": float(per[worst]) if worst >= 0 else 0.0,
            "worst_elementwise_rel": float(elem[worst]) if worst >= 0 else 0.0,
            "worst_tol": float(tol[worst]) if worst >= 0 else 0.0, "bad_tensors": int((~ok_each).sum())}


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()]) if t.dtype.is_floating_point else t


def check_equal(what, actual, expected) -> dict:
    """Bit for bit (NaN payloads and signed zeros included)."""
    bad = [i for i, (a, e) in enumerate(zip(actual, expected)) if not torch.equal(bits(a), bits(e))]
    return {"check": what, "ok": not bad, "bad_tensors": len(bad), "first_bad": bad[0] if bad else None}


def check_norms(norms, expected) -> dict:
    n = norms.detach().double().cpu()
    e = expected.detach().double().cpu()
    if n.shape != e.shape:
        return {"check": "norms", "ok": False, "error": f"shape {tuple(n.shape)}, expected {tuple(e.shape)}"}
    rel = torch.where(e > 0, (n - e).abs() / e, (n - e).abs())
    worst = float(rel.max()) if rel.numel() else 0.0
    return {"check": "norms", "ok": bool((rel <= NORM_RTOL).all()), "max_rel": worst, "count": int(n.numel())}


def check_sentinels(lists: TensorLists) -> dict:
    bad = 0
    for _, buffer, offset, n in lists.buffers:
        if not (bool((buffer[:offset] == SENTINEL).all()) and bool((buffer[offset + n:] == SENTINEL).all())):
            bad += 1
    return {"check": "elements around views untouched", "ok": bad == 0, "bad_buffers": bad}


def check_tails(outs, last_ref_piece, tail_sizes, dtype) -> list[dict]:
    """For the huge tensor: its last elements on their own (the reference's last piece holds them)."""
    out = outs[0].reshape(-1)
    results = []
    for k in tail_sizes:
        if k > last_ref_piece.numel():
            results.append({"check": f"last {k} elements", "ok": False, "error": "the last piece is shorter"})
            continue
        per, _ = rel_errors([out[-k:]], [last_ref_piece[-k:]])
        results.append({"check": f"last {k} elements", "ok": bool(per[0] <= TOL[dtype]), "rel": float(per[0])})
    return results


# -- one case --------------------------------------------------------------------------------------------------
class Case:
    """One op sequence on one set of lists with one backend; every op's checks appended to ``results``."""

    def __init__(self, name, backend, lists: TensorLists, ref_dtype, gen, device, huge_tail=False):
        self.name, self.backend, self.lists, self.ref_dtype = name, backend, lists, ref_dtype
        self.gen, self.device, self.huge_tail = gen, device, huge_tail
        self.dtypes = [t.dtype for t in pieces(lists.params, lists.piece)]
        self.results: list[dict] = []

    # the reference's view of a list: cut into pieces, in the reference dtype
    def ref(self, tensors):
        return as_dtype(pieces(tensors, self.lists.piece), self.ref_dtype)

    def cut(self, tensors):
        return pieces(tensors, self.lists.piece)

    def expected_norms(self, ref_norms, per_tensor):
        if self.lists.piece is None:
            return ref_norms
        # one tensor cut into pieces: its norm is the reference's total over the pieces
        total = ref_norms[-1:]
        return torch.cat([total] * (len(self.lists.params) + 1))

    def record(self, op, checks, seconds):
        ok = all(c["ok"] for c in checks)
        self.results.append({"case": self.name, "backend": self.backend, "op": op, "ok": ok, "seconds": seconds,
                             "checks": checks})
        return ok

    def run(self, op, fn):
        t0 = time.perf_counter()
        try:
            checks = fn()
        except Exception as exc:  # noqa: BLE001 - a failing op is a result
            checks = [{"check": "ran", "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                       "traceback": traceback.format_exc()[-3000:]}]
        return self.record(op, checks, time.perf_counter() - t0)

    def perturb(self, first: bool, per_tensor: bool):
        L = self.lists
        fill_normal_(L.grads, 1.0, self.gen)
        if first:
            poison_(L.backups)
        theta = clones(L.params if first else L.backups)
        read_only = clones(L.grads)
        rp, rg, rb = self.ref(L.params), self.ref(L.grads), self.ref(L.backups)
        ref_norms = F.perturb_(rp, rg, rb, ASCENT["epsilon"], ASCENT["inner_lr"],
                               per_tensor and L.piece is None, first, backend=REFERENCE)
        norms = F.perturb_(L.params, L.grads, L.backups, ASCENT["epsilon"], ASCENT["inner_lr"], per_tensor, first,
                           backend=self.backend)
        sync(self.device)
        checks = [check_equal("backups == θ (bitwise)", L.backups, theta),
                  check_equal("grads unchanged", L.grads, read_only),
                  check_close("params", self.cut(L.params), rp, self.dtypes),
                  check_norms(norms, self.expected_norms(ref_norms, per_tensor))]
        exact = [i for i, d in enumerate(self.dtypes) if d in DELTA_TOL]
        if exact:
            rtheta = self.ref(theta)
            out_delta = [self.cut(L.params)[i].to(self.ref_dtype) - rtheta[i] for i in exact]
            ref_delta = [rp[i] - rtheta[i] for i in exact]
            checks.append(check_close("Δ = params − θ (fp32/fp64 tensors)", out_delta, ref_delta,
                                      [self.dtypes[i] for i in exact], DELTA_TOL))
        if self.huge_tail:
            checks += check_tails(L.params, rp[-1], (4097, 64), self.dtypes[-1])
        return checks

    def restore(self):
        L = self.lists
        theta = clones(L.backups)
        poison_(L.params)
        F.restore_(L.params, L.backups, backend=self.backend)
        sync(self.device)
        return [check_equal("params == backups (bitwise)", L.params, theta),
                check_equal("backups unchanged", L.backups, theta)]

    def restore_sgd(self, flags):
        L = self.lists
        fill_normal_(L.grads, 1.0, self.gen)
        poison_(L.params)
        if flags["first_step"]:
            poison_(L.momentum)
        theta, read_only = clones(L.backups), clones(L.grads)
        rp, rb, rg, rm = self.ref(L.params), self.ref(L.backups), self.ref(L.grads), self.ref(L.momentum)
        F.restore_sgd_(rp, rb, rg, rm, backend=REFERENCE, **flags)
        F.restore_sgd_(L.params, L.backups, L.grads, L.momentum, backend=self.backend, **flags)
        sync(self.device)
        checks = [check_equal("backups unchanged", L.backups, theta),
                  check_equal("grads unchanged", L.grads, read_only),
                  check_close("params", self.cut(L.params), rp, self.dtypes),
                  check_close("momentum buffers", self.cut(L.momentum), rm, self.dtypes)]
        if self.huge_tail:
            checks += check_tails(L.params, rp[-1], (4097, 64), self.dtypes[-1])
        return checks

    # -- the gradient-reuse ops; their orthogonals live in the momentum buffers' memory (no more memory) ------
    def fp32_indices(self):
        return [i for i, d in enumerate(self.dtypes) if d in DELTA_TOL]

    def grad_norms(self):
        L = self.lists
        fill_normal_(L.grads, 1.0, self.gen)
        read_only = clones(L.grads)
        ref_norms = F.norms(self.ref(L.grads), backend=REFERENCE)
        norms = F.norms(L.grads, backend=self.backend)
        sync(self.device)
        return [check_equal("grads unchanged", L.grads, read_only),
                check_norms(norms, self.expected_norms(ref_norms, True))]

    def restore_orthogonal(self, per_tensor: bool):
        L = self.lists
        orthogonals = L.momentum
        fill_normal_(L.grads, 1.0, self.gen)
        fill_normal_(orthogonals, 1.0, self.gen)  # m of Δ = 0.005·g + 0.01·m, then poisoned
        zero = [i for i in range(len(L.params)) if per_tensor and i % 4 == 1]  # Δ = 0: c = 0, orthogonals = g
        for i, (p, b, g, m) in enumerate(zip(L.params, L.backups, L.grads, orthogonals)):
            b.copy_(p)
            if i not in zero:
                p.add_(g, alpha=0.005).add_(m, alpha=0.01)
        poison_(orthogonals)
        theta, read_only = clones(L.backups), clones(L.grads)
        rp, rb, rg, ro = self.ref(L.params), self.ref(L.backups), self.ref(L.grads), self.ref(orthogonals)
        # a tensor cut into pieces: its per-tensor sums are the pieces' totals
        F.restore_orthogonal_(rp, rb, rg, ro, per_tensor and L.piece is None, backend=REFERENCE)
        F.restore_orthogonal_(L.params, L.backups, L.grads, orthogonals, per_tensor, backend=self.backend)
        sync(self.device)
        del rp, rb  # the huge case's memory: params are checked against θ bit for bit
        out = self.cut(orthogonals)
        removed = [g - o for g, o in zip(rg, ro)]  # c·Δ
        checks = [check_equal("params == backups (bitwise)", L.params, theta),
                  check_equal("backups unchanged", L.backups, theta),
                  check_equal("grads unchanged", L.grads, read_only),
                  check_close("orthogonals (against |g| + |c·Δ|)", out, ro, self.dtypes,
                              sizes=[g.abs() + r.abs() for g, r in zip(rg, removed)])]
        exact = self.fp32_indices()
        if exact:
            checks.append(check_close("removed part g − orthogonals against c·Δ (fp32 tensors)",
                                      [rg[i] - out[i].to(self.ref_dtype) for i in exact], [removed[i] for i in exact],
                                      [self.dtypes[i] for i in exact], DELTA_TOL,
                                      sizes=[removed[i].abs() + PART_FLOOR * rg[i].abs() for i in exact]))
        if zero:
            checks.append(check_equal("orthogonals == g where Δ = 0 (bitwise)", [orthogonals[i] for i in zero],
                                      [read_only[i] for i in zero]))
        if self.huge_tail:
            checks += check_tails(orthogonals, ro[-1], (4097, 64), self.dtypes[-1])
        return checks

    def add_orthogonal(self, per_tensor: bool):
        L = self.lists
        orthogonals = L.momentum
        fill_normal_(L.grads, 1.0, self.gen)
        fill_normal_(orthogonals, 1.0, self.gen)
        # per-tensor: v = 0 (coefficient not finite) and a NaN in v (norm not finite) leave g bit for bit
        kept = []
        for i, v in enumerate(orthogonals):
            if per_tensor and i % 4 == 2:
                v.zero_()
                kept.append(i)
            elif per_tensor and i % 8 == 7 and v.numel():
                v.view(-1)[0] = float("nan")
                kept.append(i)
        before, v_before = clones(L.grads), clones(orthogonals)
        rg, ro = self.ref(L.grads), self.ref(orthogonals)
        F.add_orthogonal_(rg, ro, ADD_ALPHA, per_tensor and L.piece is None, backend=REFERENCE)
        F.add_orthogonal_(L.grads, orthogonals, ADD_ALPHA, per_tensor, backend=self.backend)
        sync(self.device)
        del ro
        rg0 = self.ref(before)
        added = [a - b for a, b in zip(rg, rg0)]  # coef·v
        out = self.cut(L.grads)
        checks = [check_equal("orthogonals unchanged", orthogonals, v_before),
                  check_close("grads (against |g| + |coef·v|)", out, rg, self.dtypes,
                              sizes=[b.abs() + a.abs() for a, b in zip(added, rg0)])]
        exact = self.fp32_indices()
        if exact:
            checks.append(check_close("added part against coef·v (fp32 tensors)",
                                      [out[i].to(self.ref_dtype) - rg0[i] for i in exact], [added[i] for i in exact],
                                      [self.dtypes[i] for i in exact], DELTA_TOL,
                                      sizes=[added[i].abs() + PART_FLOOR * rg0[i].abs() for i in exact]))
        if kept:
            checks.append(check_equal("grads unchanged where v = 0 or holds a NaN (bitwise)",
                                      [L.grads[i] for i in kept], [before[i] for i in kept]))
        if self.huge_tail:
            checks += check_tails(L.grads, rg[-1], (4097, 64), self.dtypes[-1])
        return checks

    def sequence(self, with_global=True) -> bool:
        steps = [("perturb_ first, per-tensor", lambda: self.perturb(True, True))]
        if with_global:
            steps.append(("perturb_ later, global", lambda: self.perturb(False, False)))
        steps += [("perturb_ later, per-tensor", lambda: self.perturb(False, True)),
                  ("restore_", self.restore),
                  ("restore_sgd_ first step, nesterov, wd", lambda: self.restore_sgd(SGD_FIRST)),
                  ("restore_sgd_ momentum, dampening, wd, maximize", lambda: self.restore_sgd(SGD_LATER)),
                  ("norms", self.grad_norms),
                  ("restore_orthogonal_ per-tensor, Δ = 0 in some", lambda: self.restore_orthogonal(True)),
                  ("add_orthogonal_ per-tensor, v = 0 / NaN in some", lambda: self.add_orthogonal(True))]
        if with_global:
            steps += [("restore_orthogonal_ global", lambda: self.restore_orthogonal(False)),
                      ("add_orthogonal_ global", lambda: self.add_orthogonal(False))]
        ok = True
        for op, fn in steps:
            ok &= self.run(op, fn)
            if self.lists.buffers:
                self.results[-1]["checks"].append(check_sentinels(self.lists))
                self.results[-1]["ok"] = all(c["ok"] for c in self.results[-1]["checks"])
                ok &= self.results[-1]["ok"]
        return ok


# -- the cases -------------------------------------------------------------------------------------------------
def many_shapes(sizes: Sizes, gen: torch.Generator):
    """Mixed sizes: around the chunk, small, medium, empty, a few 2-d, then the large ones; and dtypes."""
    c = sizes.chunk
    shapes = []
    r = torch.randint(0, 1 << 30, (sizes.many_count, 2), generator=gen).tolist()
    for i, (a, b) in enumerate(r):
        kind = i % 5
        if kind in (0, 1):
            shapes.append((c * (1 + b % 2) + (a % 7) - 3,))  # chunk ± 3, 2·chunk ± 3
        elif kind == 2:
            shapes.append((1 + a % 5000,))
        elif kind == 3:
            shapes.append((c // 2 + a % (5 * c // 2),))
        else:
            shapes.append((1 + a % 300, 1 + b % 300))
    shapes[7], shapes[500 % len(shapes)], shapes[-1] = (0,), (), (2, 0, 3)
    shapes += [(n,) for n in sizes.many_large]
    dtypes = [torch.bfloat16 if i % 7 == 3 else torch.float16 if i % 11 == 5 else torch.float32
              for i in range(len(shapes))]
    return shapes, dtypes


OVERLAPS = {  # (list, index) pairs that share memory: a view of buf[0:1000] and one of the range given
    "params/params": (("params", 1, slice(0, 1000)), ("params", 2, slice(500, 1500))),
    "params/grads": (("params", 1, slice(0, 1000)), ("grads", 1, slice(999, 1999))),
    "params/backups": (("params", 1, slice(0, 1000)), ("backups", 2, slice(500, 1500))),
}


# The gradient-reuse ops: the lists each writes (restore_orthogonal_: params, orthogonals; add_orthogonal_:
# grads), each against itself and the others.
REUSE_OVERLAPS = {
    "restore_orthogonal_": dict(OVERLAPS, **{
        "orthogonals/orthogonals": (("orthogonals", 1, slice(0, 1000)), ("orthogonals", 2, slice(500, 1500))),
        "orthogonals/grads": (("orthogonals", 1, slice(0, 1000)), ("grads", 1, slice(999, 1999))),
        "orthogonals/params": (("params", 1, slice(0, 1000)), ("orthogonals", 2, slice(500, 1500)))}),
    "add_orthogonal_": {
        "grads/grads": (("grads", 1, slice(0, 1000)), ("grads", 2, slice(500, 1500))),
        "grads/orthogonals": (("grads", 1, slice(0, 1000)), ("orthogonals", 2, slice(999, 1999)))},
}


def overlap_lists(device, gen, pairs):
    buf = torch.randn(3000, device=device, generator=gen)
    lists = {name: [torch.randn(n, device=device, generator=gen) for n in (1000, 1000, 1000, 33)]
             for name in ("params", "grads", "backups", "momentum", "orthogonals")}
    for name, index, where in pairs:
        lists[name][index] = buf[where]
    return buf, lists


def overlap_result(backend, label, call, everything, device, t0) -> dict:
    before = clones(everything)
    raised = None
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - what it raised is the result
        raised = exc
    sync(device)
    unchanged = check_equal("every buffer unchanged", everything, before)
    ok_raise = isinstance(raised, ValueError) and "share memory" in str(raised)
    text = "nothing" if raised is None else f"{type(raised).__name__}: {raised}"
    checks = [{"check": "raises the overlap's ValueError", "ok": ok_raise, "raised": text[:300]}, unchanged]
    return {"case": "overlap", "backend": backend, "op": label, "ok": ok_raise and unchanged["ok"],
            "seconds": time.perf_counter() - t0, "checks": checks}


def case_overlap_reuse(backend, device, gen) -> list[dict]:
    """restore_orthogonal_ and add_orthogonal_ as the other ops; ``norms`` reads only, so overlapping tensors
    (the same one twice included) are fine for it: it must not raise and must match foreach."""
    results = []
    for op, variants in REUSE_OVERLAPS.items():
        for variant, pairs in variants.items():
            for direct in ((False, True) if backend == "cuda" else (False,)):
                t0 = time.perf_counter()
                buf, lists = overlap_lists(device, gen, pairs)
                p, g, bk, o = lists["params"], lists["grads"], lists["backups"], lists["orthogonals"]
                if direct:
                    call = {"restore_orthogonal_": lambda: torch.ops.amp_fused.restore_orthogonal_(p, bk, g, o, True),
                            "add_orthogonal_": lambda: torch.ops.amp_fused.add_orthogonal_(g, o, 0.5, True)}[op]
                else:
                    call = {"restore_orthogonal_": lambda: F.restore_orthogonal_(p, bk, g, o, True, backend=backend),
                            "add_orthogonal_": lambda: F.add_orthogonal_(g, o, 0.5, True, backend=backend)}[op]
                everything = [buf] + [t for ts in lists.values() for t in ts]
                label = f"{op} {variant} overlap" + (" (torch.ops direct)" if direct else "")
                results.append(overlap_result(backend, label, call, everything, device, t0))
    for direct in ((False, True) if backend == "cuda" else (False,)):
        t0 = time.perf_counter()
        buf = torch.randn(3000, device=device, generator=gen)
        tensors = [buf[0:1000], buf[500:1500], torch.randn(33, device=device, generator=gen), buf[0:1000]]
        before = clones([buf] + tensors)
        checks = []
        try:
            norms = torch.ops.amp_fused.norms(tensors) if direct else F.norms(tensors, backend=backend)
            sync(device)
            checks.append(check_norms(norms, F.norms([t.double() for t in tensors], backend=REFERENCE)))
        except Exception as exc:  # noqa: BLE001
            checks.append({"check": "ran", "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        checks.append(check_equal("every buffer unchanged", [buf] + tensors, before))
        results.append({"case": "overlap", "backend": backend,
                        "op": "norms of overlapping tensors (reads only: no error)" + (
                            " (torch.ops direct)" if direct else ""),
                        "ok": all(c["ok"] for c in checks), "seconds": time.perf_counter() - t0, "checks": checks})
    return results


def case_overlap(backend, device, gen) -> list[dict]:
    """Overlapping tensors in a call: ValueError (the overlap's) before anything is written, from every op
    (``norms``, which writes nothing, must accept them)."""
    results = []
    for variant, pairs in OVERLAPS.items():
        for op in ("perturb_", "restore_", "restore_sgd_"):
            if op == "restore_" and "grads" in variant:
                continue  # restore_ takes no grads
            for direct in ((False, True) if backend == "cuda" else (False,)):
                t0 = time.perf_counter()
                buf = torch.randn(3000, device=device, generator=gen)
                lists = {name: [torch.randn(n, device=device, generator=gen) for n in (1000, 1000, 1000, 33)]
                         for name in ("params", "grads", "backups", "momentum")}
                for name, index, where in pairs:
                    lists[name][index] = buf[where]
                everything = [buf] + [t for ts in lists.values() for t in ts]
                before = clones(everything)
                p, g, bk, m = lists["params"], lists["grads"], lists["backups"], lists["momentum"]
                if direct:
                    call = {"perturb_": lambda: torch.ops.amp_fused.perturb_(p, g, bk, 1.0, 0.01, True, True),
                            "restore_": lambda: torch.ops.amp_fused.restore_(p, bk),
                            "restore_sgd_": lambda: torch.ops.amp_fused.restore_sgd_(
                                p, bk, g, m, 0.05, 0.9, 0.0, 0.0, False, False, False)}[op]
                else:
                    call = {"perturb_": lambda: F.perturb_(p, g, bk, 1.0, 0.01, True, True, backend=backend),
                            "restore_": lambda: F.restore_(p, bk, backend=backend),
                            "restore_sgd_": lambda: F.restore_sgd_(p, bk, g, m, 0.05, 0.9, backend=backend)}[op]
                raised = None
                try:
                    call()
                except Exception as exc:  # noqa: BLE001 - what it raised is the result
                    raised = exc
                sync(device)
                unchanged = check_equal("every buffer unchanged", everything, before)
                ok_raise = isinstance(raised, ValueError) and "share memory" in str(raised)
                text = "nothing" if raised is None else f"{type(raised).__name__}: {raised}"
                checks = [{"check": "raises the overlap's ValueError", "ok": ok_raise, "raised": text[:300]},
                          unchanged]
                label = f"{op} {variant} overlap" + (" (torch.ops direct)" if direct else "")
                results.append({"case": "overlap", "backend": backend, "op": label,
                                "ok": ok_raise and unchanged["ok"], "seconds": time.perf_counter() - t0,
                                "checks": checks})
    return results + case_overlap_reuse(backend, device, gen)


def case_unaligned(backend, device, gen, sizes: Sizes) -> list[dict]:
    out = []
    for label, dtypes in (("fp32", [torch.float32] * len(sizes.unaligned)),
                          ("bf16/fp16", [torch.bfloat16 if i % 2 else torch.float16
                                         for i in range(len(sizes.unaligned))])):
        lists = make_view_lists(sizes.unaligned, dtypes, device, gen)
        case = Case(f"unaligned {label}", backend, lists, torch.float64, gen, device)
        case.sequence()
        out += case.results
    return out


def case_many(backend, device, gen, sizes: Sizes) -> list[dict]:
    shapes, dtypes = many_shapes(sizes, torch.Generator().manual_seed(7))
    lists = make_lists(shapes, dtypes, device, gen)
    chunks = sum(-(-math.prod(s) // sizes.chunk) for s in shapes)
    case = Case(f"many ({len(shapes)} tensors, {chunks} chunks)", backend, lists, torch.float64, gen, device)
    case.sequence()
    return case.results


def case_huge(backend, device, gen, sizes: Sizes) -> list[dict]:
    n = sizes.huge_numel
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        if free < sizes.huge_min_free_bytes:
            return [{"case": f"huge (bf16, {n} elements)", "backend": backend, "op": "all", "ok": False,
                     "seconds": 0.0, "checks": [{"check": "memory", "ok": False,
                                                  "error": f"needs {sizes.huge_min_free_bytes / 1e9:.0f} GB free, "
                                                           f"{free / 1e9:.0f} GB are"}]}]
    # pieces cut at multiples of huge_slice, so 2^31 is a cut and the last piece is the 4097 past it
    lists = make_lists([(n,)], [torch.bfloat16], device, gen, piece=sizes.huge_slice)
    case = Case(f"huge (bf16, {n} elements)", backend, lists, torch.float32, gen, device, huge_tail=True)
    case.sequence(with_global=False)
    del lists
    return case.results


CASES = ("overlap", "unaligned", "many", "huge")


def describe(sizes: Sizes) -> list[str]:
    shapes, _ = many_shapes(sizes, torch.Generator().manual_seed(7))
    numel = sum(math.prod(s) for s in shapes)
    chunks = sum(-(-math.prod(s) // sizes.chunk) for s in shapes)
    return [
        "overlap: 3 overlap variants x 3 ops must raise ValueError, nothing written (cuda: also torch.ops direct); "
        "restore_orthogonal_ 6 variants, add_orthogonal_ 2; norms must accept overlapping tensors",
        f"unaligned: {len(sizes.unaligned)} views per list at offsets 0-4, sizes {sizes.unaligned[:6]}... up to "
        f"{max(sizes.unaligned)}, fp32 and bf16/fp16, 6 ops + norms, restore_orthogonal_, add_orthogonal_ (5 calls)",
        f"many: {len(shapes)} tensors, {numel / 1e6:.1f}M elements, {chunks} chunks of {sizes.chunk} (fp32 + bf16 + "
        "fp16), 6 ops + norms, restore_orthogonal_, add_orthogonal_ (5 calls)",
        f"huge: one bf16 tensor of {sizes.huge_numel} elements ({sizes.huge_numel * 2 / 1e9:.2f} GB per list), "
        f"compared in {sizes.huge_slice}-element slices and the last 4097 / 64 elements, 5 ops + norms, "
        "restore_orthogonal_, add_orthogonal_ per-tensor",
    ]


def summary_line(results, not_run) -> str:
    failed = [r for r in results if not r["ok"]]
    by_backend = {}
    for r in results:
        passed, total = by_backend.get(r["backend"], (0, 0))
        by_backend[r["backend"]] = (passed + r["ok"], total + 1)
    parts = ", ".join(f"{b} {p}/{t}" for b, (p, t) in by_backend.items())
    line = f"{len(results) - len(failed)}/{len(results)} checks passed ({parts})"
    if failed:
        line += "; FAILED: " + "; ".join(f"{r['backend']} {r['case']}: {r['op']}" for r in failed[:4])
        if len(failed) > 4:
            line += f" and {len(failed) - 4} more"
    if not_run:
        line += f"; not run (time budget): {', '.join(not_run)}"
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPU stress cases of the cuda and triton backends")
    parser.add_argument("--dry-run", action="store_true",
                        help="small sizes, CPU tensors, the cpu backend (or a stand-in where it is unavailable)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--backends", help="comma list (default: cuda,triton; --dry-run: cpu)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--budget-s", type=float, default=0, help="start no case after this many seconds")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    stand_in_note = None
    if args.backends:
        backends = args.backends.split(",")
    elif args.dry_run:
        from gpu_check_util import dry_backend

        stand_in, stand_in_note = dry_backend()
        backends = [stand_in]
    else:
        backends = ["cuda", "triton"]
    cases = [c for c in args.cases.split(",") if c]
    chunk, chunk_note = cuda_chunk_size()
    if chunk_note and not args.dry_run:
        print(f"note: {chunk_note}")
    sizes = dry_sizes(chunk) if args.dry_run else gpu_sizes(chunk)
    report = {"mode": "dry-run" if args.dry_run else "gpu", "device": device, "backends": backends,
              "reference": REFERENCE, "tolerances": {SHORT[d]: t for d, t in TOL.items()}, "norm_rtol": NORM_RTOL,
              "sizes": sizes.__dict__, "chunk_note": chunk_note, "results": [], "not_run": []}
    if stand_in_note:
        report["stand_in_note"] = stand_in_note
        print(f"note: {stand_in_note}")
    if args.dry_run:
        torch.set_num_threads(1)  # small tensors on a possibly shared machine: threads only add contention
        report["would_run_on_gpu"] = describe(gpu_sizes(chunk))
        print("dry run: CPU tensors, small sizes, backends " + ",".join(map(str, backends))
              + "; on a GPU it would run, for cuda and triton:")
        for line in report["would_run_on_gpu"]:
            print("  " + line)
    if device == "cuda" and not torch.cuda.is_available():
        print("RESULT: torch sees no CUDA device (--dry-run runs the cases on CPU tensors)")
        return 1
    gen = torch.Generator(device=device).manual_seed(1234)

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)

    for case in cases:
        for backend in backends:
            if args.budget_s and time.perf_counter() - start > args.budget_s:
                report["not_run"].append(f"{backend} {case}")
                continue
            t0 = time.perf_counter()
            try:
                if case == "overlap":
                    results = case_overlap(backend, device, gen)
                else:
                    results = {"unaligned": case_unaligned, "many": case_many, "huge": case_huge}[case](
                        backend, device, gen, sizes)
            except Exception as exc:  # noqa: BLE001 - building the case failed
                results = [{"case": case, "backend": backend, "op": "setup", "ok": False, "seconds": 0.0,
                            "checks": [{"check": "setup", "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                                        "traceback": traceback.format_exc()[-3000:]}]}]
            for r in results:
                bad = [c for c in r["checks"] if not c["ok"]]
                detail = "" if not bad else "  <- " + "; ".join(
                    f"{c['check']}: " + ", ".join(f"{k}={v}" for k, v in c.items()
                                                  if k not in ("check", "ok", "traceback")) for c in bad)[:600]
                print(f"{'PASS' if r['ok'] else 'FAIL'} {r['backend']:<7} {r['case']}: {r['op']}{detail}")
            report["results"] += results
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"  ({backend} {case}: {time.perf_counter() - t0:.1f} s)")
            save()
    results = report["results"]
    report["passed"] = sum(r["ok"] for r in results)
    report["failed"] = sum(not r["ok"] for r in results)
    report["seconds"] = time.perf_counter() - start
    line = summary_line(results, report["not_run"])
    if args.dry_run:
        line = f"dry run ({','.join(map(str, backends))} on CPU): {line}"
    report["summary"] = line
    save()
    print("RESULT: " + line)
    return 0 if results and report["failed"] == 0 and not report["not_run"] else 1


if __name__ == "__main__":
    sys.exit(main())
