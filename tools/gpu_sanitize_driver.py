#!/usr/bin/env python3
"""A small program for ``compute-sanitizer`` (memcheck, racecheck, initcheck): a few calls of every op on
the ``cuda`` and ``triton`` backends with small odd-sized lists.

Sizes (1, 3, 5, 7, 4097, 65537, 2·65536 + 3) cut ragged vector groups and chunk ends; fp32, fp64, fp16
and bf16 in one list; some tensors are views starting 1-3 elements into a buffer whose other elements are
never written (initcheck reports a kernel that reads them; memcheck one that writes past an allocation when
``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` gives each tensor its own). Inputs are copied from the host, so
all their bytes are initialised; pure outputs (backups, first-step momentum buffers) are ``torch.empty``,
so a kernel that reads them before writing shows under initcheck. The same holds for the ``orthogonals`` of
``restore_orthogonal_`` (each call with both ``per_tensor`` values gets a new ``torch.empty`` list), which runs
once with Δ ≠ 0 and once with Δ = 0 (c = 0: its copy path); ``add_orthogonal_`` runs with both ``per_tensor``
values on those orthogonals and once with v = 0 (coefficient 0: nothing written); ``norms`` on the grads and
on the params.

Prints ``DRIVER OK`` and the number of op calls at the end; exit 1 on any error. ``--dry-run`` runs the same
calls on CPU tensors with the ``cpu`` backend (to test the driver where there is no GPU; ``foreach`` in its
place where the cpu backend is unavailable).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = Path(__file__).resolve().parent
for _path in (REPO, TOOLS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from amp_fused import functional as F  # noqa: E402

SIZES = (1, 3, 5, 7, 4097, 65537, 2 * 65536 + 3)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def host_values(n, dtype, gen, scale):
    return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)


def on_device(values: torch.Tensor, device, offset: int) -> torch.Tensor:
    """``values`` on ``device``; with an offset, as a view that many elements into a buffer whose other
    elements are never written."""
    if offset == 0:
        return values.to(device)
    buffer = torch.empty(values.numel() + offset + 3, dtype=values.dtype, device=device)
    view = buffer[offset:offset + values.numel()]
    view.copy_(values)
    return view


def make_lists(device, gen):
    shapes = [(n,) for n in SIZES]
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(len(shapes))]
    offsets = [0 if i % 3 == 0 else i % 4 for i in range(len(shapes))]
    params = [on_device(host_values(s[0], d, gen, 0.01), device, o) for s, d, o in zip(shapes, dtypes, offsets)]
    grads = [on_device(host_values(s[0], d, gen, 1.0), device, (o + 1) % 4)
             for s, d, o in zip(shapes, dtypes, offsets)]
    backups = [torch.empty(s, dtype=d, device=device) for s, d in zip(shapes, dtypes)]  # pure output
    momentum = [torch.empty(s, dtype=d, device=device) for s, d in zip(shapes, dtypes)]  # written by first_step
    return params, grads, backups, momentum


def empty_like_list(tensors):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


def calls(backend, device, gen) -> int:
    p, g, b, m = make_lists(device, gen)
    n = 0

    def done():
        nonlocal n
        n += 1
        if device != "cpu":
            torch.cuda.synchronize()

    F.perturb_(p, g, b, 1.0, 0.01, True, True, backend=backend); done()
    F.perturb_(p, g, b, 1.0, 0.01, False, False, backend=backend); done()
    F.perturb_(p, g, b, 1.0, 0.01, True, False, backend=backend); done()
    F.restore_(p, b, backend=backend); done()
    F.perturb_(p, g, b, 1.0, 0.01, False, True, backend=backend); done()
    F.restore_sgd_(p, b, g, m, 0.05, 0.9, 0.0, 1e-2, True, False, True, backend=backend); done()
    F.restore_sgd_(p, b, g, m, 0.05, 0.9, 0.1, 1e-2, False, True, False, backend=backend); done()
    F.restore_sgd_(p, b, g, [], 0.05, 0.0, 0.0, 0.0, False, False, False, backend=backend); done()
    # the gradient-reuse ops: orthogonals are pure outputs (torch.empty), one new list per call that writes them
    norms = F.norms(g, backend=backend); done()
    if not torch.isfinite(norms).all():
        raise RuntimeError(f"{backend}: non-finite norms of the gradients")
    F.norms(p, backend=backend); done()
    orthogonals = []
    for per_tensor in (True, False):
        F.perturb_(p, g, b, 1.0, 0.01, True, True, backend=backend); done()  # Δ ≠ 0
        o = empty_like_list(p)
        F.restore_orthogonal_(p, b, g, o, per_tensor, backend=backend); done()
        orthogonals.append(o)
    o = empty_like_list(p)
    F.restore_orthogonal_(p, b, g, o, True, backend=backend); done()  # Δ = 0 (params are θ): the c = 0 path
    for per_tensor, o in zip((True, False), orthogonals):
        F.add_orthogonal_(g, o, 0.5, per_tensor, backend=backend); done()
    F.add_orthogonal_(g, [torch.zeros_like(t) for t in g], 0.5, True, backend=backend); done()  # v = 0: no write
    for t in g + [t for o in orthogonals for t in o]:
        if not torch.isfinite(t).all():
            raise RuntimeError(f"{backend}: non-finite gradients or orthogonals after the calls")
    for t in p:
        if not torch.isfinite(t).all():
            raise RuntimeError(f"{backend}: non-finite parameters after the calls")
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--backends", help="comma list (default cuda,triton; --dry-run: cpu)")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if args.backends:
        backends = args.backends.split(",")
    elif args.dry_run:
        from gpu_check_util import dry_backend

        stand_in, note = dry_backend()
        backends = [stand_in]
        if note:
            print(f"note: {note}")
    else:
        backends = ["cuda", "triton"]
    gen = torch.Generator().manual_seed(0)
    total = 0
    for backend in backends:
        t0 = time.perf_counter()
        n = calls(backend, device, gen)
        total += n
        print(f"{backend}: {n} op calls in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"DRIVER OK {total} op calls on {','.join(map(str, backends))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
