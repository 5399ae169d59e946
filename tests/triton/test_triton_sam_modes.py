"""perturb_'s two modes on the Triton backend, under Triton's interpreter: ``surface`` (SAM: Δ on the ε-sphere)
and ``eta`` (ASAM: element weights T = |θ| + η), against a float64 computation written here from the op's
text (amp_fused/backends/__init__.py):

* ``surface``: scale = ε / (‖u‖ + NORM_EPS) instead of min(1, ·); a governing norm that is not finite, or a
  scale that overflows, gives scale 0.
* ``eta`` (first ascents only): T = |θ| + η, u = ζ·T·g; the norms (per tensor, then the total) and the
  projection are those of u; params ← θ + scale·T·u; backups ← θ.
* scale 0: params = θ bit for bit.

The cross-backend cases are in tests/test_backend_contract.py (run on this backend by test_triton_contract.py).
"""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from amp_fused import functional
from amp_fused.backends import NORM_EPS
from amp_fused.backends import triton as triton_backend
from amp_fused.triton.metadata import CHUNK
from triton_cases import MIXED_DTYPE_CASE, assert_lists_bitwise_equal, clone, recorded_launches

DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
# One element, a 0-d tensor, part of a vector step, a ragged chunk, a full chunk, a tensor of two programs.
SIZES = [(1,), (), (7,), (3, 5), (CHUNK - 1,), (CHUNK,), (CHUNK + 9,)]
ETA = 0.01


# -- the op's definition in float64 ------------------------------------------------------------------------------
def _scale(norm: float, epsilon: float, surface: bool) -> float:
    if not math.isfinite(norm):
        return 0.0
    ratio = epsilon / (norm + NORM_EPS)
    if surface:
        return ratio if math.isfinite(ratio) else 0.0
    return min(1.0, ratio)


def expected_ascent(params, grads, theta, epsilon, inner_lr, per_tensor, first, surface, eta):
    """(norms, params, scales) in float64 of perturb_ on ``params`` (the values before the call); ``theta``: what
    the first ascent saved (later ascents)."""
    p = [x.double() for x in params]
    th = p if first else [x.double() for x in theta]
    g = [x.double() for x in grads]
    if eta is None:
        weights = None
        u = [inner_lr * gi if first else (pi - ti) + inner_lr * gi for pi, ti, gi in zip(p, th, g)]
    else:
        assert first
        weights = [ti.abs() + eta for ti in th]
        u = [inner_lr * (wi * gi) for wi, gi in zip(weights, g)]
    norms = [float(torch.linalg.vector_norm(ui)) for ui in u]
    total = math.sqrt(math.fsum(n * n for n in norms)) if all(math.isfinite(n) for n in norms) else math.nan
    if any(math.isinf(n) for n in norms) and not any(math.isnan(n) for n in norms):
        total = math.inf
    scales = [_scale(n, epsilon, surface) for n in norms] if per_tensor else [_scale(total, epsilon, surface)] * len(u)
    deltas = u if weights is None else [wi * ui for wi, ui in zip(weights, u)]
    new = [ti + s * di if s != 0.0 else ti for ti, di, s in zip(th, deltas, scales)]
    return torch.tensor(norms + [total], dtype=torch.float64), new, scales


def _bound(expected, theta, delta_term, dtype):
    """Per element: half an ulp of the storage type (the one rounding to storage) and a few ulps of the compute
    type (fp32; fp64 for fp64) of the operands θ and scale·T·u."""
    storage = torch.finfo(dtype).eps
    compute = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return (0.5 * storage * expected.abs() + 16 * compute * (theta.abs() + delta_term.abs())
            + torch.finfo(dtype).tiny)


def assert_matches(params, theta, expected, scales, what="", scale_rtol=0.0):
    """params within the bound of the float64 expectation; exactly θ (its bits) where the scale is 0.
    ``scale_rtol``: the scale's own relative error where tensors of a coarser compute type govern it (a global
    norm over fp32 and fp64 tensors)."""
    for i, (a, e, t, s) in enumerate(zip(params, expected, theta, scales)):
        if s == 0.0:
            assert_lists_bitwise_equal([a], [t])
            continue
        bound = _bound(e, t.double(), e - t.double(), a.dtype) + scale_rtol * (e - t.double()).abs()
        err = (a.double() - e).abs()
        assert torch.isfinite(a.double()).all(), f"{what} tensor {i} is not finite"
        assert (err <= bound).all(), f"{what} tensor {i} ({a.dtype}) off by {(err - bound).max().item():.3g}"


def assert_norms(norms, expected):
    assert norms.dtype == torch.float32 and norms.shape == expected.shape
    torch.testing.assert_close(norms.double(), expected.float().double(), rtol=2e-6, atol=0, equal_nan=True)


def make_lists(sizes, dtypes, seed=0, grad_scale=1.0):
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(sizes)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(d) for s, d in zip(sizes, dtypes)]
    grads = [(grad_scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(d) for s, d in zip(sizes, dtypes)]
    return params, grads, [torch.empty_like(p) for p in params]


def _moved(params, theta):
    return math.sqrt(sum(float(((p.double() - t.double()) ** 2).sum()) for p, t in zip(params, theta)))


# -- surface ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_surface_puts_delta_on_the_sphere(dtype, per_tensor):
    """First and later ascents with surface=True. Small gradients (‖u‖ well under ε, so the default mode would
    leave Δ = u) and ones of ‖u‖ over ε in one list: every tensor's Δ reaches the sphere."""
    sizes = SIZES
    params, grads, backups = make_lists(sizes, dtype)
    for i in range(0, len(grads), 2 if per_tensor else 1):
        grads[i] = (grads[i].double() * 1e-3).to(dtype)  # ‖u‖ from ~1e-3 to ~0.1: scale > 1 at ε = 2
    theta = clone(params)
    epsilon = 2.0
    norms_exp, new, scales = expected_ascent(params, grads, None, epsilon, 1.0, per_tensor, True, True, None)
    assert any(s > 1 for s in scales) and (not per_tensor or any(s < 1 for s in scales))
    norms = triton_backend.perturb_(params, grads, backups, epsilon, 1.0, per_tensor, True, True)
    assert_norms(norms, norms_exp)
    assert_lists_bitwise_equal(backups, theta)
    assert_matches(params, theta, new, scales, "first")
    if per_tensor:  # each tensor's Δ has norm ε (up to the storage type's rounding)
        for p, t in zip(params, theta):
            assert abs(_moved([p], [t]) - epsilon) < 0.02 * epsilon
    else:
        assert abs(_moved(params, theta) - epsilon) < 0.02 * epsilon

    # a later ascent from there, with other gradients: u = (params − θ) + ζg
    grads2 = make_lists(sizes, dtype, seed=1, grad_scale=1e-2)[1]
    before = clone(params)
    norms_exp, new, scales = expected_ascent(before, grads2, theta, 5.0, 0.5, per_tensor, False, True, None)
    norms = triton_backend.perturb_(params, grads2, backups, 5.0, 0.5, per_tensor, False, True)
    assert_norms(norms, norms_exp)
    assert_lists_bitwise_equal(backups, theta)
    assert_matches(params, theta, new, scales, "later")
    assert _moved(params, before) > 0.5


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_surface_scale_that_overflows_drops_delta(dtype, per_tensor):
    """ε / (‖u‖ + NORM_EPS) beyond fp64 (ε = 1e300, ‖u‖ ~ 1e-20 ≪ NORM_EPS: ~1e312): scale 0, θ exactly. A scale
    finite in fp64 that fp32, the compute type of fp32/bf16 tensors, cannot hold (ε = 1e28: ~1e40) also drops
    their Δ; fp64 tensors move."""
    params, grads, backups = make_lists(SIZES[:4], dtype, grad_scale=1e-20)
    theta = clone(params)
    norms = triton_backend.perturb_(params, grads, backups, 1e300, 1.0, per_tensor, True, True)
    assert (norms > 0).all()
    assert_lists_bitwise_equal(params, theta)
    assert_lists_bitwise_equal(backups, theta)

    params, grads, backups = make_lists(SIZES[:4], dtype, grad_scale=1e-20)
    theta = clone(params)
    _, new, scales = expected_ascent(params, grads, None, 1e28, 1.0, per_tensor, True, True, None)
    assert all(3.5e38 < s < 1e300 for s in scales)
    triton_backend.perturb_(params, grads, backups, 1e28, 1.0, per_tensor, True, True)
    assert_lists_bitwise_equal(backups, theta)
    if dtype == torch.float64:
        assert_matches(params, theta, new, scales)
        assert _moved(params, theta) > 1e19
    else:
        assert_lists_bitwise_equal(params, theta)


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
def test_scale_pass_surface_scales(per_tensor):
    """The scale pass alone, on partial sums given directly (one program per tensor): SURFACE gives
    ε / (‖u‖ + NORM_EPS) also above 1, and 0 for a norm that is not finite or a ratio that overflows fp64."""
    from amp_fused.triton import ops

    n = 5
    sumsq = [4.0, 1e-4, 0.0, 1e-40, math.nan]  # ‖u‖ = 2, 0.01, 0, 1e-20, NaN
    partials = torch.tensor(sumsq, dtype=torch.float64)
    first_prog, n_chunks = torch.arange(n, dtype=torch.int64), torch.ones(n, dtype=torch.int64)
    block_chunks = torch.ones(1, dtype=torch.int64)

    def scale_pass(epsilon, count):
        norms = torch.empty(count + 1, dtype=torch.float32)
        scales = torch.full((count,), -1.0, dtype=torch.float64)
        ops.kernels().perturb_scale_kernel[(1,)](
            partials, first_prog, n_chunks, block_chunks, norms, scales, count, epsilon, PER_TENSOR=per_tensor,
            ACC=ops._acc_type(), T_BLOCK=ops.SCALE_T_BLOCK, C_BLOCK=ops.SCALE_C_BLOCK, SURFACE=True,
            num_warps=ops.SCALE_NUM_WARPS)
        return norms, scales.tolist()

    norms, scales = scale_pass(1.0, n)
    assert norms[:4].tolist() == [2.0, pytest.approx(0.01), 0.0, pytest.approx(1e-20)] and math.isnan(norms[4])
    if per_tensor:
        assert scales == [1.0 / (math.sqrt(x) + NORM_EPS) for x in sumsq[:4]] + [0.0]
    else:
        assert scales == [0.0] * n  # the total is NaN
    _, scales = scale_pass(1e300, 4)  # ε / (‖u‖ + NORM_EPS) ~ 1e312 for the zero and the 1e-20 norm
    if per_tensor:
        assert scales == [1e300 / (2.0 + NORM_EPS), 1e300 / (math.sqrt(1e-4) + NORM_EPS), 0.0, 0.0]
    else:
        total = math.sqrt(math.fsum(sumsq[:4]))
        assert scales == [pytest.approx(1e300 / (total + NORM_EPS), rel=1e-15)] * 4


# -- weighted (ASAM) ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("surface", [False, True], ids=["ball", "surface"])
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weighted_ascent(dtype, per_tensor, surface):
    """u = ζ·(|θ| + η)·g is normed and projected, params ← θ + scale·T·u, backups ← θ."""
    params, grads, backups = make_lists(SIZES, dtype)
    params[2] = (params[2].double() * 1e-3).to(dtype)  # |θ| ≪ η for some elements: T ≈ η
    theta = clone(params)
    epsilon, inner_lr = 3.0, 0.5
    norms_exp, new, scales = expected_ascent(params, grads, None, epsilon, inner_lr, per_tensor, True, surface, ETA)
    assert all(0 < s for s in scales) and (surface or any(s < 1 for s in scales))
    norms = triton_backend.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, True, surface, ETA)
    assert_norms(norms, norms_exp)
    assert_lists_bitwise_equal(backups, theta)
    assert_matches(params, theta, new, scales)
    # the weighting matters: the unweighted ascent's result is far outside the bound
    _, plain, _ = expected_ascent(theta, grads, None, epsilon, inner_lr, per_tensor, True, surface, None)
    assert _moved(new, plain) > 0.5
    assert _moved(params, theta) > 1.0


# -- both modes, any dtype mix ------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [None, ETA], ids=["sam", "asam"])
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
def test_mixed_dtypes_in_one_list(per_tensor, eta):
    """One list of fp32/bf16/fp16/fp64 tensors (a launch per dtype group; the global norm over all of them)."""
    dtypes = [d for d, _ in MIXED_DTYPE_CASE]
    sizes = [s for _, s in MIXED_DTYPE_CASE]
    params, grads, backups = make_lists(sizes, dtypes, seed=3, grad_scale=1e-2)
    theta = clone(params)
    norms_exp, new, scales = expected_ascent(params, grads, None, 4.0, 1.0, per_tensor, True, True, eta)
    norms = triton_backend.perturb_(params, grads, backups, 4.0, 1.0, per_tensor, True, True, eta)
    assert_norms(norms, norms_exp)
    assert_lists_bitwise_equal(backups, theta)
    # global: fp32's rounding of the other tensors' u reaches the fp64 tensor through the scale
    assert_matches(params, theta, new, scales, scale_rtol=0.0 if per_tensor else 16 * torch.finfo(torch.float32).eps)
    assert _moved(params, theta) > 3.0


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("eta", [None, ETA], ids=["sam", "asam"])
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_nonfinite_gradient_drops_delta(dtype, per_tensor, eta, bad):
    """A NaN/Inf in one tensor's gradient: that tensor (global: every tensor) keeps θ bit for bit; per tensor,
    the others move as defined."""
    params, grads, backups = make_lists(SIZES, dtype, grad_scale=1e-2)
    grads[5].view(-1)[100] = bad
    theta = clone(params)
    norms_exp, new, scales = expected_ascent(params, grads, None, 2.0, 1.0, per_tensor, True, True, eta)
    assert scales[5] == 0.0 and (all(s == 0 for s in scales) != per_tensor)
    norms = triton_backend.perturb_(params, grads, backups, 2.0, 1.0, per_tensor, True, True, eta)
    assert not math.isfinite(norms[5].item()) and not math.isfinite(norms[-1].item())
    assert_lists_bitwise_equal(backups, theta)
    assert_matches(params, theta, new, scales)
    if per_tensor:
        assert _moved(params, theta) > 1.0


@pytest.mark.parametrize("epsilon", [1.0, 1e30], ids=["eps1", "eps1e30"])
@pytest.mark.parametrize("eta", [None, ETA], ids=["sam", "asam"])
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_gradient_keeps_theta_exactly(dtype, per_tensor, eta, epsilon):
    """u = 0: norms 0, and params = θ bit for bit, also where surface's scale ε / NORM_EPS is beyond fp32
    (ε = 1e30: 1e42; Inf·0 must not reach θ)."""
    params, _, backups = make_lists(SIZES, dtype)
    grads = [torch.zeros_like(p) for p in params]
    theta = clone(params)
    norms = triton_backend.perturb_(params, grads, backups, epsilon, 1.0, per_tensor, True, True, eta)
    assert (norms == 0).all()
    assert_lists_bitwise_equal(params, theta)
    assert_lists_bitwise_equal(backups, theta)


# -- plumbing -----------------------------------------------------------------------------------------------------
def test_op_layer_passes_the_modes():
    """amp_fused.functional.perturb_ hands surface and eta to the Triton backend."""
    params, grads, backups = make_lists(SIZES[:4], torch.float32, grad_scale=1e-3)
    theta = clone(params)
    _, new, scales = expected_ascent(params, grads, None, 1.5, 1.0, True, True, True, ETA)
    functional.perturb_(params, grads, backups, 1.5, 1.0, True, True, True, ETA, backend="triton")
    assert_matches(params, theta, new, scales)
    assert all(s > 1 for s in scales)


def test_eta_on_a_later_ascent_is_refused_before_writing():
    params, grads, backups = make_lists(SIZES[:3], torch.float32)
    triton_backend.perturb_(params, grads, backups, 1.0, 1.0, True, True)
    snapshot = clone(params), clone(backups)
    with pytest.raises(ValueError, match="eta"):
        triton_backend.perturb_(params, grads, backups, 1.0, 1.0, True, False, False, ETA)
    assert_lists_bitwise_equal(params, snapshot[0])
    assert_lists_bitwise_equal(backups, snapshot[1])


def test_default_calls_launch_the_kernels_with_the_modes_off():
    """Without the modes every launch passes SURFACE=False, WEIGHTED=False: the specialisations the kernels had
    before the modes (the constexpr branches fold away); with them, the flags reach every pass."""
    params, grads, backups = make_lists(SIZES[:3], torch.float32)
    with recorded_launches() as launches:
        triton_backend.perturb_(params, grads, backups, 1.0, 1.0, True, True)
        triton_backend.perturb_(params, grads, backups, 1.0, 1.0, True, False)
    flags = [(name, bound.get("SURFACE"), bound.get("WEIGHTED")) for name, bound, _, _ in launches]
    assert flags == [("perturb_sumsq_kernel", None, False), ("perturb_scale_kernel", False, None),
                     ("perturb_apply_kernel", False, False)] * 2
    with recorded_launches() as launches:
        triton_backend.perturb_(params, grads, backups, 1.0, 1.0, True, True, True, ETA)
    flags = [(name, bound.get("SURFACE"), bound.get("WEIGHTED"), bound.get("eta")) for name, bound, _, _ in launches]
    assert flags == [("perturb_sumsq_kernel", None, True, ETA), ("perturb_scale_kernel", True, None, None),
                     ("perturb_apply_kernel", True, True, ETA)]


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="this triton install has no NVIDIA backend to compile for")
def test_mode_specialisations_compile_for_sm90(tmp_path):
    """Every kernel specialisation a mode launches (tests/triton/test_triton_compile.py compiles the default
    ones) builds for sm_90, without local memory, and with vector loads in the per-tensor kernels."""
    from test_triton_compile import _specification, assert_compiles_for_sm90

    with recorded_launches() as launches:
        for dtype in DTYPES:
            params, grads, backups = make_lists([(CHUNK + 3,), (5,)], dtype)
            for per_tensor in (True, False):
                triton_backend.perturb_(params, grads, backups, 1.0, 1.0, per_tensor, True, True)
                triton_backend.perturb_(params, grads, backups, 1.0, 1.0, per_tensor, False, True)
                triton_backend.perturb_(params, grads, backups, 1.0, 1.0, per_tensor, True, False, ETA)
                triton_backend.perturb_(params, grads, backups, 1.0, 1.0, per_tensor, True, True, ETA)
    specs = {json.dumps(_specification(name, bound, options), sort_keys=True) for name, bound, options, _ in launches
             if bound.get("SURFACE") or bound.get("WEIGHTED")}
    specs = [json.loads(s) for s in sorted(specs)]
    assert len(specs) == 4 + 2 + 4 * 4  # sumsq WEIGHTED per dtype; scale SURFACE per norm; apply per mode and dtype
    assert_compiles_for_sm90(specs, tmp_path)
