"""Property-based tests of every op on every CPU backend against the op's definition computed in float64
(tests/op_definition.py).

Random tensor counts (1-200), shapes (0-d, one element, empty, chunk boundaries), dtypes (mixed within a
list too), per-tensor or global norm, first or later ascent, non-finite gradients and non-contiguous
layouts; the gradient-reuse ops (norms, restore_orthogonal_, add_orthogonal_) on such lists. 500 examples per op in CI (the "ci" profile, the default here); `HYPOTHESIS_PROFILE=dev` for a
quick run.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from amp_fused import available_backends, functional
from op_definition import (add_orthogonal, add_orthogonal_bounds, assert_within, direction_coefficients, norms,
                           orthogonal_bounds, perturb, restore_orthogonal, restore_sgd)

settings.register_profile("ci", max_examples=500, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("debug", max_examples=50, deadline=None, phases=[Phase.generate], report_multiple_bugs=False,
                          derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = [b for b in available_backends("cpu")]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# relative tolerance per storage dtype: the kernels round once, the float64 definition not at all
RTOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# sizes around the chunk/block boundaries of the fused backends (CPU: 64K elements; Triton: 4096)
BOUNDARY_SIZES = [4095, 4096, 4097, 65535, 65536, 65537]
MAX_TOTAL = 200_000


@st.composite
def tensor_specs(draw):
    count = draw(st.one_of(st.integers(1, 12), st.integers(1, 200)))
    specs, total = [], 0
    for _ in range(count):
        kind = draw(st.sampled_from(["small"] * 6 + ["scalar", "empty", "one", "boundary", "matrix", "matrix"]))
        if kind == "scalar":
            shape = ()
        elif kind == "empty":
            shape = (0,)
        elif kind == "one":
            shape = (1,)
        elif kind == "boundary" and total + 65537 <= MAX_TOTAL:
            shape = (draw(st.sampled_from(BOUNDARY_SIZES)),)
        elif kind == "matrix":
            shape = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
        else:
            shape = (draw(st.integers(1, 300)),)
        total += math.prod(shape)
        specs.append(shape)
    mixed = draw(st.booleans())
    dtypes = [draw(st.sampled_from(DTYPES)) for _ in specs] if mixed else [draw(st.sampled_from(DTYPES))] * len(specs)
    layout = draw(st.sampled_from(["contiguous", "contiguous", "transposed"]))
    return specs, dtypes, layout


def build(specs, dtypes, layout, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in zip(specs, dtypes):
        t = (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
        if layout == "transposed" and t.dim() == 2:
            t = t.t().contiguous().t()  # same values, column-major strides: dense but not contiguous
        out.append(t)
    return out


def poisoned(tensors, poison, index=0):
    """``tensors`` with a NaN or Inf (``poison``) in the first element of tensors[index]."""
    if poison and tensors[index].numel():
        tensors[index][(0,) * tensors[index].dim()] = float(poison)
    return tensors


def ascent_lists(spec, poison):
    """(params, grads, backups, θ in float64) of a first ascent; ``poison``: a NaN or Inf in the first gradient."""
    specs, dtypes, layout = spec
    params, grads = build(specs, dtypes, layout, 1), poisoned(build(specs, dtypes, layout, 2), poison)
    backups = [torch.empty_like(p) for p in params]
    theta = [p.to(torch.float64, copy=True) for p in params]  # .double() would alias fp64 tensors
    return params, grads, backups, theta


def run_or_reject(call, params):
    """Run an op; a backend may refuse a layout, but then with a clear error and before writing anything."""
    before = [p.clone() for p in params]
    try:
        return True, call()
    except (RuntimeError, ValueError) as exc:
        assert "contiguous" in str(exc) or "dense" in str(exc), exc
        assert all(torch.equal(a, b) for a, b in zip(params, before))
        return False, None


def close(actual, expected, dtype, magnitude, what=""):
    """|actual − expected| within the dtype's rounding of the operands (``magnitude``, elementwise): a result
    that cancels (θ + sΔ ≈ 0) is only as exact as its inputs were large."""
    error = (actual.double() - expected).abs()
    subnormal_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # absolute resolution near 0
    bound = RTOL[dtype] * (magnitude + expected.abs()) + 2 * subnormal_step
    assert torch.isfinite(actual).all() and bool((error <= bound).all()), (what, (error - bound).max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@given(spec=tensor_specs(), per_tensor=st.booleans(), first=st.booleans(), poison=st.sampled_from([None, "nan", "inf"]),
       epsilon=st.sampled_from([0.0, 1e-3, 0.5, 10.0]), inner_lr=st.sampled_from([0.0, 0.1, 1.0]))
def test_perturb_matches_definition(backend, spec, per_tensor, first, poison, epsilon, inner_lr):
    specs, dtypes, layout = spec
    params, grads, backups, theta = ascent_lists(spec, poison)
    previous = [torch.zeros_like(t) for t in theta]
    if not first:  # start from a perturbed state: θ + Δ_old in params
        offsets = build(specs, dtypes, layout, 3, scale=0.01)
        shifted = [(p.double() + o.double()).to(p.dtype) for p, o in zip(params, offsets)]
        previous = [s.double() - p.double() for s, p in zip(shifted, params)]
        # the backups hold θ; the reference backend's hold Δ_old (it restores by subtraction, as the original)
        backups = ([(s.double() - p.double()).to(p.dtype) for s, p in zip(shifted, params)] if backend == "reference"
                   else [p.clone() for p in params])
        params = shifted
    definition = perturb(params, grads, theta, epsilon, inner_lr, per_tensor, first)  # before params change
    ok, norms = run_or_reject(
        lambda: functional.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, backend=backend),
        params)
    if not ok:
        return
    delta, delta_norms = definition.delta, definition.norms
    for i, (d, prev, g, dtype) in enumerate(zip(delta, previous, grads, dtypes)):
        # Δ is formed in the storage dtype by some backends: the norm is as exact as Δ's parts were large
        magnitude = (prev.abs() + inner_lr * g.double().abs()).norm()
        if math.isfinite(delta_norms[i]):
            reported = torch.float32 if dtype == torch.float64 else dtype  # norms are returned in fp32
            close(norms[i], delta_norms[i], reported, 4 * magnitude, f"norms[{i}]")
        else:
            assert not math.isfinite(norms[i]), i
    for i, (p, t, d, dtype) in enumerate(zip(params, theta, delta, dtypes)):
        governing = delta_norms[i] if per_tensor else delta_norms[-1]
        assert torch.isfinite(p).all()
        if not math.isfinite(governing):  # dropped: θ, exactly (the reference subtracts Δ_old back: up to rounding)
            if backend == "reference" and not first:
                close(p, t, dtype, t.abs() + previous[i].abs())
            else:
                assert torch.equal(p.double(), t), i
            continue
        scale = definition.scales[i]
        # the scale is as exact as the norm it comes from: the fused backends form Δ in fp32 (fp64 for fp64) and
        # accumulate in fp32 unless every tensor it covers is fp64; reference and foreach form Δ in each
        # tensor's own dtype
        covered = [dtype] if per_tensor else dtypes
        if backend in ("reference", "foreach"):
            scale_rtol = max(RTOL[dt] for dt in covered)
        else:
            scale_rtol = max(RTOL[torch.float64 if dt == torch.float64 else torch.float32] for dt in covered)
        step = (scale * d).abs()
        close(p, t + scale * d, dtype, t.abs() + previous[i].abs() + step + 4 * scale_rtol / RTOL[dtype] * step,
              f"params[{i}] {dtype} {tuple(p.shape)}")
    if first:
        for b, t in zip(backups, theta):
            assert torch.equal(b.double(), t) or backend == "reference"


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=min(100, settings().max_examples))  # first ascents only: fewer cases than the 500 above
@given(spec=tensor_specs(), per_tensor=st.booleans(), eta=st.sampled_from([None, 0.0, 0.01]),
       poison=st.sampled_from([None, "nan", "inf"]), epsilon=st.sampled_from([0.0, 1e-3, 0.5, 10.0]),
       inner_lr=st.sampled_from([0.1, 1.0]))
def test_perturb_sam_modes_match_definition(backend, spec, per_tensor, eta, poison, epsilon, inner_lr):
    """The surface projection (SAM) and the element weights (ASAM) on a first ascent."""
    _, dtypes, _ = spec
    params, grads, backups, theta = ascent_lists(spec, poison)
    definition = perturb(params, grads, None, epsilon, inner_lr, per_tensor, True, True, eta)
    ok, norms = run_or_reject(lambda: functional.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor,
                                                          True, True, eta, backend=backend), params)
    if not ok:
        return
    weights = definition.weights or [torch.ones_like(t) for t in theta]
    for i, (p, t, u, w, dtype) in enumerate(zip(params, theta, definition.delta, weights, dtypes)):
        if math.isfinite(definition.norms[i]):
            reported = torch.float32 if dtype == torch.float64 else dtype
            close(norms[i], definition.norms[i], reported, 4 * u.abs().norm(), f"norms[{i}]")
        else:
            assert not math.isfinite(norms[i]), i
        assert torch.isfinite(p).all()
        scale = definition.scales[i]
        if scale == 0.0:  # dropped (a non-finite norm, or ε = 0): θ exactly
            assert torch.equal(p.double(), t), i
            continue
        covered = [dtype] if per_tensor else dtypes  # the scale is as exact as the norm (see above)
        scale_rtol = max(RTOL[dt] for dt in covered)
        step = (scale * w * u).abs()
        close(p, definition.params[i], dtype, t.abs() + 4 * step + 4 * scale_rtol / RTOL[dtype] * step,
              f"params[{i}] {dtype} {tuple(p.shape)}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@given(spec=tensor_specs())
def test_restore_is_bit_exact(backend, spec):
    specs, dtypes, layout = spec
    params, backups = build(specs, dtypes, layout, 1), build(specs, dtypes, layout, 2)
    ok, _ = run_or_reject(lambda: functional.restore_(params, backups, backend=backend), params)
    if ok:
        assert all(torch.equal(p, b) for p, b in zip(params, backups))


@pytest.mark.parametrize("backend", BACKENDS)
@given(spec=tensor_specs(), momentum=st.sampled_from([0.0, 0.9]), nesterov=st.booleans(), maximize=st.booleans(),
       weight_decay=st.sampled_from([0.0, 1e-2]), dampening=st.sampled_from([0.0, 0.1]), first_step=st.booleans())
def test_restore_sgd_matches_definition(backend, spec, momentum, nesterov, maximize, weight_decay, dampening,
                                        first_step):
    specs, dtypes, layout = spec
    nesterov = nesterov and momentum > 0 and dampening == 0
    thetas, grads = build(specs, dtypes, layout, 1), build(specs, dtypes, layout, 2)
    bufs = build(specs, dtypes, layout, 3)
    offsets = build(specs, dtypes, layout, 4, scale=0.01)
    params = [(t.double() + o.double()).to(t.dtype) for t, o in zip(thetas, offsets)]  # perturbed: θ + Δ
    # the backups hold θ; the reference backend's hold Δ (it restores by subtraction, as the original)
    backups = ([(p.double() - t.double()).to(t.dtype) for p, t in zip(params, thetas)] if backend == "reference"
               else thetas)
    old_bufs = [b.to(torch.float64, copy=True) for b in bufs]
    lr = 0.05
    expected = restore_sgd(thetas, grads, old_bufs, lr, momentum, dampening, weight_decay, nesterov, maximize,
                           first_step)
    ok, _ = run_or_reject(lambda: functional.restore_sgd_(
        params, backups, grads, bufs if momentum else [], lr, momentum, dampening, weight_decay, nesterov, maximize,
        first_step, backend=backend), params)
    if not ok:
        return
    for i, (p, t, g, buf, old, dtype) in enumerate(zip(params, thetas, grads, bufs, old_bufs, dtypes)):
        theta = t.double()
        # magnitudes of the terms each result is summed from: rounding is relative to them, not to a
        # result that cancels
        size = g.double().abs() + weight_decay * theta.abs()
        if momentum:
            buf_size = size if first_step else momentum * old.abs() + size
            close(buf, expected.momentum_buffers[i], dtype, buf_size)
            size = size + momentum * buf_size if nesterov else buf_size
        restored = theta.abs() + (0.01 * 8 if backend == "reference" else 0)  # subtract-back rounding of Δ
        close(p, expected.params[i], dtype, restored + lr * size)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=min(100, settings().max_examples))
@given(spec=tensor_specs(), per_tensor=st.booleans(), poison=st.sampled_from([None, "nan", "inf"]),
       epsilon=st.sampled_from([0.0, 1e-3, 0.5]))
def test_restore_orthogonal_matches_definition(backend, spec, per_tensor, poison, epsilon):
    """After a first ascent: g_v of a gradient at θ + Δ against the definition (exactly g where c = 0: ε = 0, a
    NaN or Inf), θ back bit for bit (reference: up to its subtract-back rounding)."""
    specs, dtypes, layout = spec
    params, grads, backups, theta = ascent_lists(spec, None)
    ok, _ = run_or_reject(lambda: functional.perturb_(params, grads, backups, epsilon, 1.0, per_tensor, True,
                                                      backend=backend), params)
    if not ok:
        return
    perturbed = [p.clone() for p in params]
    # the reference backend keeps Δ itself (it restores by subtraction): the definition is applied to that Δ
    held = ([p.double() - d.double() for p, d in zip(perturbed, backups)] if backend == "reference" else theta)
    at_delta = poisoned(build(specs, dtypes, layout, 4), poison)
    orthogonals = [torch.empty_like(p) for p in params]
    functional.restore_orthogonal_(params, backups, at_delta, orthogonals, per_tensor, backend=backend)
    expected = restore_orthogonal(perturbed, held, at_delta, per_tensor)
    # reference and foreach form Δ and g − c·Δ in the tensors' own dtype
    bounds = orthogonal_bounds(expected, at_delta, held, per_tensor, storage_delta=backend in ("reference", "foreach"))
    for i, (o, g, c) in enumerate(zip(orthogonals, at_delta, expected.coefficients)):
        if c == 0.0:
            assert torch.equal(o.view(torch.uint8) if o.dtype.itemsize == 1 else o, g) or (
                torch.isnan(g).any() and torch.equal(torch.isnan(o), torch.isnan(g))
                and torch.equal(torch.nan_to_num(o), torch.nan_to_num(g))), i
        else:
            assert_within([o], [expected.orthogonals[i]], [bounds[i]], f"orthogonals[{i}]")
    if backend != "reference":
        assert all(torch.equal(p.double(), t) for p, t in zip(params, theta))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=min(100, settings().max_examples))
@given(spec=tensor_specs(), per_tensor=st.booleans(), poison=st.sampled_from([None, "nan", "inf", "zero"]),
       alpha=st.sampled_from([0.0, 0.7, 3.0]))
def test_add_orthogonal_and_norms_match_definition(backend, spec, per_tensor, poison, alpha):
    specs, dtypes, layout = spec
    grads, orthogonals = build(specs, dtypes, layout, 5), build(specs, dtypes, layout, 6)
    if poison == "zero":
        orthogonals[0].zero_()
    else:
        poisoned(orthogonals, poison)
    ok, result = run_or_reject(lambda: functional.norms(orthogonals, backend=backend), [])
    if not ok:
        return
    expected_norms = norms(orthogonals)
    finite = torch.isfinite(expected_norms)
    assert torch.equal(torch.isfinite(result), finite)
    torch.testing.assert_close(result.double()[finite], expected_norms[finite], rtol=2e-5, atol=0)
    before = [g.clone() for g in grads]
    functional.add_orthogonal_(grads, orthogonals, alpha, per_tensor, backend=backend)
    coefficients = direction_coefficients(before, orthogonals, alpha, per_tensor)
    expected = add_orthogonal(before, orthogonals, alpha, per_tensor)
    bounds = add_orthogonal_bounds(before, orthogonals, alpha, per_tensor)
    for i, (g, b, c) in enumerate(zip(grads, before, coefficients)):
        if c == 0.0:
            assert torch.equal(g, b), i  # left as it was
        else:
            assert_within([g], [expected[i]], [bounds[i]], f"grads[{i}]")
