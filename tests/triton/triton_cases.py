"""Inputs, tolerances and instruments shared by the Triton backend's tests. (The ops' definition, and the error
each dtype allows against it, are tests/op_definition.py.)"""
from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

import amp_fused
from amp_fused.triton import ops
from amp_fused.triton.metadata import CHUNK

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
KERNEL_NAMES = ("perturb_sumsq_kernel", "perturb_scale_kernel", "perturb_apply_kernel", "restore_sgd_kernel",
                "copy_kernel", "pair_sums_kernel", "pair_scale_kernel", "restore_orthogonal_kernel",
                "add_orthogonal_kernel")

# Sizes at the edges of the program map and of the vector steps inside a program: one element, a 0-d
# tensor, part of a step, one past a step, one short of / exactly / one past a chunk, and a tensor
# spanning three programs with a ragged end.
SIZES = [(1,), (), (7,), (3, 5), (ops.APPLY.block + 1,), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,),
         (2 * CHUNK + 17,), (16, 16)]

# Between two kernels that each round once from fp32 (or fp64): one ulp, of the operands (|θ|, |Δ| up to
# ~4) where θ + scale·Δ cancels.
ONE_ULP_TOL = {
    torch.float32: dict(rtol=3e-7, atol=5e-7),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float16: dict(rtol=1e-3, atol=1e-6),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-6),
}
# Against another backend, which may round several intermediates to the storage type (foreach, reference):
# a couple of ulps of the largest magnitudes involved (|θ| up to ~4 for randn inputs). fp64: reference
# computes its projection scale from fp32 norms.
BACKEND_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=3.2e-2),
}
NORM_TOL = dict(rtol=2e-5, atol=1e-6)  # the returned norms are fp32 in every case

# One list mixing every dtype, in an order that interleaves them, at chunk boundaries.
MIXED_DTYPE_CASE = [(torch.float32, (CHUNK + 1,)), (torch.bfloat16, (7,)), (torch.float16, (2 * CHUNK + 3,)),
                    (torch.float64, (5,)), (torch.float32, (3, 5)), (torch.bfloat16, (CHUNK,)), (torch.float16, ())]


def make_lists(sizes, dtype=torch.float32, device="cpu", seed=0, grad_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in sizes]
    grads = [(grad_scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype).to(device) for s in sizes]
    backups = [torch.empty_like(p) for p in params]
    return params, grads, backups


def clone(tensors):
    return [t.clone() for t in tensors]


def assert_lists_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.double().cpu(), e.double().cpu(), **tol, msg=lambda m, i=i: f"tensor {i}: {m}")


def assert_lists_bitwise_equal(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        assert torch.equal(a.cpu().view(bits), e.cpu().view(bits)), f"tensor {i} differs in its bits"


def largest_move(after, before):
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(after, before) if a.numel())


def cpp_cpu_backend_or_skip():
    """The C++ CPU backend's module, or skip (it is built separately and may be absent)."""
    if "cpu" not in amp_fused.available_backends():
        reason = amp_fused.backends.unavailable_reason("cpu")
        pytest.skip(f"the C++ CPU backend is not available here ({reason}); this comparison needs it")
    return amp_fused.backends.resolve("cpu", "cpu")


@contextlib.contextmanager
def recorded_launches():
    """Records every Triton kernel launch as (kernel name, bound arguments, launch options, grid), by
    wrapping each kernel's ``run``, the method its ``kernel[grid](...)`` call goes through."""
    module = ops.kernels()
    launches = []
    originals = {}
    for name in KERNEL_NAMES:
        kernel = getattr(module, name)
        parameters = list(inspect.signature(kernel.fn).parameters)

        def run(*args, grid, warmup, _name=name, _original=kernel.run, _parameters=parameters, **kwargs):
            bound = dict(zip(_parameters, args))
            bound.update({k: v for k, v in kwargs.items() if k in _parameters})
            options = {k: v for k, v in kwargs.items() if k not in _parameters}
            launches.append((_name, bound, options, grid))
            return _original(*args, grid=grid, warmup=warmup, **kwargs)

        originals[name] = (kernel, kernel.__dict__.get("run"))
        kernel.run = run
    try:
        yield launches
    finally:
        for kernel, own_run in originals.values():
            if own_run is None:
                del kernel.run  # back to the class's method
            else:
                kernel.run = own_run
