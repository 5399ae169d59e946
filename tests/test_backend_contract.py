"""The backend contract: every op of the table, on every backend, against its float64 definition.

One suite for all backends, the way torch's optimizer tests run one suite over ``optim_db``: each test takes
``device`` and ``backend`` and calls the ops through ``amp_fused.functional`` with ``backend=...``; what it
expects comes from :mod:`op_definition` (never from another backend), within the error bound op_definition
derives for the dtype, and each test shows that the effect it checks is far larger than that bound.

Which backends: :data:`BACKEND_CASES`, read by :func:`pytest_generate_tests` from the module that collects the
test. Here: every backend available for CPU tensors except ``triton`` (its interpreter must be switched on
before triton is imported: ``tests/triton/test_triton_contract.py`` runs these same tests with
``backend="triton"`` in a process of its own), and every backend available for CUDA tensors, marked ``cuda``
(skipped without a GPU).

Backend-specific promises (launch counts, thread-count determinism, chunk plans, the C++ build) are in the
per-backend files.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import amp_fused
from amp_fused import functional
from amp_fused.triton.metadata import CHUNK as TRITON_CHUNK
from op_definition import (DTYPES, NORM_RTOL, ULPS, UNIT, add_orthogonal, add_orthogonal_bounds, ascent_bounds,
                           assert_bitwise_equal, assert_within, bits, bound_norm, clones, direction_coefficients,
                           dtype_id, empty_like, epsilon_for, make_lists, moved, norm_bounds, norms, orthogonal_bounds,
                           perturb, perturbation, random_bits, restore_bounds, restore_orthogonal, restore_sgd,
                           sgd_bounds)

CPU_CHUNK = 1 << 16  # elements per chunk of the C++ CPU kernels (and per block of the CUDA ones)
# An effect a test checks must exceed the error it allows by this factor (its norm over the L2 norm of the
# error envelope; the envelopes are worst cases, about twice the largest error the backends show).
SIGNIFICANT = 10


def contract_cases(cpu_backends, cuda_backends):
    """(device, backend) parameters; the CUDA ones marked ``cuda``."""
    return ([pytest.param("cpu", b, id=f"cpu-{b}") for b in cpu_backends]
            + [pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.cuda) for b in cuda_backends])


BACKEND_CASES = contract_cases([b for b in amp_fused.available_backends("cpu") if b != "triton"],
                               amp_fused.available_backends("cuda"))
# Tensor counts of test_many_tensors_of_mixed_dtypes.
TENSOR_COUNTS = (1, 2, 37, 300)


def pytest_generate_tests(metafunc):
    # metafunc.module: the module collecting the test (the Triton module imports these tests and sets its own)
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize(("device", "backend"), metafunc.module.BACKEND_CASES)
    if "count" in metafunc.fixturenames:
        metafunc.parametrize("count", metafunc.module.TENSOR_COUNTS)


def subtracts_back(backend) -> bool:
    """The reference backend restores θ by subtracting Δ back, as the original code does: θ only up to
    rounding. Every other backend restores it bit for bit."""
    return backend == "reference"


# Sizes: one element, 0-d, empty, a 4-d kernel, around and across Triton's 4096-element chunks.
EDGE_SHAPES = [(1,), (), (0,), (2, 0, 3), (7,), (3, 5), (4, 1, 3, 3), (TRITON_CHUNK - 1,), (TRITON_CHUNK,),
               (TRITON_CHUNK + 1,), (2 * TRITON_CHUNK + 17,)]
# Around and across the C++ kernels' 65536-element chunks.
CPU_CHUNK_SHAPES = [(CPU_CHUNK - 1,), (CPU_CHUNK,), (CPU_CHUNK + 1,), (5,)]
# One list of every dtype, interleaved, at chunk boundaries.
MIXED_DTYPE_CASE = [(torch.float32, (CPU_CHUNK + 1,)), (torch.bfloat16, (7,)), (torch.float16, (2 * TRITON_CHUNK + 3,)),
                    (torch.float64, (5,)), (torch.float32, (3, 5)), (torch.bfloat16, (TRITON_CHUNK,)),
                    (torch.float16, ()), (torch.float64, (TRITON_CHUNK + 1,))]
# torch.optim.SGD's option combinations (nesterov needs momentum and no dampening).
SGD_FLAGS = [dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
             for m, d, n, wd, mx in itertools.product((0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 1e-2),
                                                      (False, True))
             if not (n and (m == 0.0 or d != 0.0))]


def sgd_id(flags):
    words = [f"momentum{flags['momentum']:g}", f"dampening{flags['dampening']:g}", f"wd{flags['weight_decay']:g}"]
    return "-".join(words + [k for k in ("nesterov", "maximize") if flags[k]])


def per_tensor_id(per_tensor):
    return "per_tensor" if per_tensor else "global"


def check_ascent(backend, params, grads, backups, theta, epsilon, inner_lr, per_tensor, first, surface=False,
                 eta=None):
    """One ``perturb_`` through the op layer, checked against the definition; returns (definition, bounds)."""
    dtypes = [p.dtype for p in params]
    before = clones(params)
    norms = functional.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, surface, eta,
                                backend=backend)
    expected = perturb(before, grads, theta, epsilon, inner_lr, per_tensor, first, surface, eta)
    assert norms.dtype == torch.float32 and norms.shape == (len(params) + 1,)
    if params:
        assert norms.device == params[0].device
    bounds = ascent_bounds(expected, dtypes, per_tensor, subtracts_back(backend))
    assert_within(params, expected.params, bounds, "param")
    assert_within([norms], [expected.norms.to(torch.float32)],
                  [norm_bounds(expected, dtypes, subtracts_back(backend))], "norms")
    for p, b in zip(params, before):  # dtype, shape and layout kept
        assert p.dtype == b.dtype and p.shape == b.shape and p.stride() == b.stride()
    return expected, bounds


def assert_mixes_projected_and_free(expected, per_tensor, params):
    scales = [s for s, p in zip(expected.scales, params) if p.numel()]
    if per_tensor:
        assert min(scales) < 0.9 and max(scales) == 1.0, f"the case must mix projected and free tensors: {scales}"
    else:
        assert max(scales) < 0.9, f"the global projection must be active: {scales}"


# -- perturb_ ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_perturb_first_and_later_ascent(device, backend, dtype, per_tensor):
    inner_lr = 0.5
    params, grads = make_lists(EDGE_SHAPES, dtype, seed=1, device=device)
    grads2 = make_lists(EDGE_SHAPES, dtype, seed=2, device=device)[1]
    epsilon = epsilon_for(grads, inner_lr, per_tensor)
    theta = clones(params)
    backups = empty_like(params)
    expected, bounds = check_ascent(backend, params, grads, backups, theta, epsilon, inner_lr, per_tensor, True)
    assert_mixes_projected_and_free(expected, per_tensor, params)
    assert moved(params, theta) > SIGNIFICANT * bound_norm(bounds)
    if per_tensor:  # a projected tensor lands on the sphere
        i = max(range(len(params)), key=lambda k: expected.norms[k])
        torch.testing.assert_close(moved(params[i:i + 1], theta[i:i + 1]), epsilon, rtol=2e-2, atol=0)

    # A later ascent: Δ = (params − θ) + ζ·g, projected around θ.
    first = clones(params)
    expected, bounds = check_ascent(backend, params, grads2, backups, theta, epsilon, inner_lr, per_tensor, False)
    assert_mixes_projected_and_free(expected, per_tensor, params)
    assert moved(params, first) > SIGNIFICANT * bound_norm(bounds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
def test_perturb_across_cpu_chunk_boundaries(device, backend, per_tensor, dtype):
    inner_lr = 0.5
    params, grads = make_lists(CPU_CHUNK_SHAPES, dtype, seed=3, device=device)
    grads2 = make_lists(CPU_CHUNK_SHAPES, dtype, seed=4, device=device)[1]
    # per tensor: ‖ζg‖ ≈ 128 for the large tensors (projected), ≈ 1 for the small one (free)
    epsilon = 100.0 if per_tensor else epsilon_for(grads, inner_lr, per_tensor)
    theta, backups = clones(params), empty_like(params)
    for first, g in ((True, grads), (False, grads2)):
        before = clones(params)
        expected, bounds = check_ascent(backend, params, g, backups, theta, epsilon, inner_lr, per_tensor, first)
        assert_mixes_projected_and_free(expected, per_tensor, params)
        assert moved(params, before) > SIGNIFICANT * bound_norm(bounds)


@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
def test_mixed_dtypes_in_one_list(device, backend, per_tensor):
    """Norms and the global scale span every dtype of the list; each tensor keeps its dtype."""
    dtypes = [d for d, _ in MIXED_DTYPE_CASE]
    params, grads = make_lists([s for _, s in MIXED_DTYPE_CASE], dtypes, seed=5, device=device)
    grads2 = make_lists([s for _, s in MIXED_DTYPE_CASE], dtypes, seed=6, device=device)[1]
    epsilon = epsilon_for(grads, 0.5, per_tensor)
    theta, backups = clones(params), empty_like(params)
    states = []  # the parameters after each ascent
    for first, g in ((True, grads), (False, grads2)):
        before = clones(params)
        expected, bounds = check_ascent(backend, params, g, backups, theta, epsilon, 0.5, per_tensor, first)
        states.append(clones(params))
        assert [p.dtype for p in params] == dtypes
        assert_mixes_projected_and_free(expected, per_tensor, params)
        assert moved(params, before) > SIGNIFICANT * bound_norm(bounds)
    # restore_sgd_ over the same list, then restore_ after another ascent
    buffers = [torch.randn(p.shape, dtype=torch.float64).to(device, p.dtype) for p in params]
    old_buffers = clones(buffers)
    functional.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 1e-2, True, False, False, backend=backend)
    step = restore_sgd(theta, grads, old_buffers, 0.1, 0.9, 0.0, 1e-2, True, False, False)
    restore_error = restore_bounds(theta, *states) if subtracts_back(backend) else None
    param_bounds, buffer_bounds = sgd_bounds(theta, grads, old_buffers, step, 0.1, 0.9, 1e-2, False, restore_error)
    assert_within(params, step.params, param_bounds, "param")
    assert_within(buffers, step.momentum_buffers, buffer_bounds, "buffer")
    assert moved(params, theta) > SIGNIFICANT * bound_norm(param_bounds)
    theta = clones(params)
    functional.perturb_(params, grads, backups, epsilon, 0.5, per_tensor, True, backend=backend)
    perturbed = clones(params)
    functional.restore_(params, backups, backend=backend)
    if subtracts_back(backend):
        assert_within(params, theta, restore_bounds(theta, perturbed))
    else:
        assert_bitwise_equal(params, theta)


def test_many_tensors_of_mixed_dtypes(device, backend, count):
    gen = torch.Generator().manual_seed(count)
    shapes = [(int(n),) for n in torch.randint(0, 3000, (count,), generator=gen)]
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(count)]
    params, grads = make_lists(shapes, dtypes, seed=count, device=device)
    grads2 = make_lists(shapes, dtypes, seed=count + 1, device=device)[1]
    for per_tensor in (True, False):
        epsilon = 0.5 * (3.0 if per_tensor else 3.0 * math.sqrt(count))
        p, backups = clones(params), empty_like(params)
        for first, g in ((True, grads), (False, grads2)):
            before = clones(p)
            _, bounds = check_ascent(backend, p, g, backups, params, epsilon, 0.5, per_tensor, first)
            assert moved(p, before) > SIGNIFICANT * bound_norm(bounds)


@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
# (value in the second C++ chunk, value in the first element or None)
@pytest.mark.parametrize("bad", [(math.nan, None), (math.inf, None), (-math.inf, None), (math.nan, math.inf)],
                         ids=["nan", "inf", "-inf", "nan_and_inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_non_finite_gradient_drops_delta(device, backend, dtype, bad, first, per_tensor):
    """A NaN or Inf in the ascent gradient never reaches θ: that tensor's Δ is dropped (global: every
    tensor's), the other tensors still ascend, and the norms report it."""
    # The poisoned tensor spans two C++ chunks and 17 Triton chunks: a bad value in the last of each (and one
    # in the first).
    shapes = [(5,), (CPU_CHUNK + 5,), (40,), ()]
    poisoned = 1
    params, grads = make_lists(shapes, dtype, seed=7, device=device)
    grads2 = make_lists(shapes, dtype, seed=8, device=device)[1]
    theta, backups = clones(params), empty_like(params)
    if not first:  # a finite first ascent, then the bad gradient
        functional.perturb_(params, grads, backups, 20.0, 0.5, per_tensor, True, backend=backend)
    bad_grads = clones(grads if first else grads2)
    bad_grads[poisoned][CPU_CHUNK + 2] = bad[0]
    if bad[1] is not None:
        bad_grads[poisoned][1] = bad[1]
    before = clones(params)
    norms = functional.perturb_(params, bad_grads, backups, 20.0, 0.5, per_tensor, first, backend=backend)
    expected = perturb(before, bad_grads, theta, 20.0, 0.5, per_tensor, first)
    dropped = [poisoned] if per_tensor else list(range(len(params)))
    assert [i for i, s in enumerate(expected.scales) if s == 0.0] == dropped  # (the definition agrees)
    assert math.isnan(norms[poisoned]) if math.isnan(bad[0]) else math.isinf(norms[poisoned])
    assert not math.isfinite(norms[-1])
    finite = [i for i in range(len(params)) if i != poisoned]
    assert_within([norms[finite]], [expected.norms[finite].float()],
                  [norm_bounds(expected, dtype, subtracts_back(backend))[finite]], "finite norms")
    bounds = ascent_bounds(expected, dtype, per_tensor, subtracts_back(backend))
    for i, (p, t) in enumerate(zip(params, theta)):
        assert torch.isfinite(p).all(), i
        if i not in dropped:
            assert_within([p], expected.params[i:i + 1], bounds[i:i + 1])
        elif first or not subtracts_back(backend):
            assert torch.equal(p, t), f"tensor {i} is not θ"  # exactly θ (values: θ + 0 may give +0.0)
        else:
            assert_within([p], [t], bounds[i:i + 1])  # θ + Δ_old − Δ_old
    if per_tensor:  # the healthy tensors still ascend
        healthy = [i for i in range(len(params)) if i not in dropped]
        assert (moved([params[i] for i in healthy], [before[i] for i in healthy])
                > SIGNIFICANT * bound_norm([bounds[i] for i in healthy]))
    # and θ is still what restore_ puts back
    perturbed = clones(params)
    functional.restore_(params, backups, backend=backend)
    if subtracts_back(backend):
        assert_within(params, theta, restore_bounds(theta, before, perturbed))
    else:
        assert_bitwise_equal(params, theta)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_zero_gradient_and_zero_epsilon_keep_theta_exactly(device, backend, dtype):
    shapes = [(TRITON_CHUNK + 1,), (), (0,), (17, 3)]
    params, grads = make_lists(shapes, dtype, seed=9, device=device)
    zeros = [torch.zeros_like(g) for g in grads]
    for per_tensor in (True, False):
        p, backups = clones(params), empty_like(params)
        for first in (True, False):
            norms = functional.perturb_(p, zeros, backups, 0.1, 1.0, per_tensor, first, backend=backend)
            assert torch.equal(norms.cpu(), torch.zeros(len(shapes) + 1)), norms  # ‖Δ‖ = 0: no 0/0 anywhere
            assert_bitwise_equal(p, params)
        for first in (True, False):  # ε = 0: nothing moves, the norms are still reported
            norms = functional.perturb_(p, grads, backups, 0.0, 1.0, per_tensor, first, backend=backend)
            assert_bitwise_equal(p, params)
            expected = perturb(params, grads, params, 0.0, 1.0, per_tensor, True)
            assert_within([norms], [expected.norms.float()], [norm_bounds(expected, dtype)], "norms")
            assert (norms[:-1] > 0).sum() == 3 and norms[-1] > 1.0  # every non-empty tensor has a gradient
    # one zero gradient among others: that tensor stays where it was, the others ascend
    p, backups = clones(params), empty_like(params)
    some = clones(grads)
    some[3].zero_()
    norms = functional.perturb_(p, some, backups, 5.0, 1.0, True, True, backend=backend)
    assert norms[3].item() == 0.0 and norms[0].item() > 5.0
    assert torch.equal(p[3], params[3])
    assert moved(p[:1], params[:1]) > 1.0


@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
def test_zero_inner_lr(device, backend, per_tensor):
    """ζ = 0: a first ascent leaves θ (Δ = 0); a later one re-projects the Δ it finds, onto a smaller ball too."""
    params, grads = make_lists(EDGE_SHAPES, torch.float32, seed=10, device=device)
    epsilon = epsilon_for(grads, 1.0, per_tensor)
    theta, backups = clones(params), empty_like(params)
    norms = functional.perturb_(params, grads, backups, epsilon, 0.0, per_tensor, True, backend=backend)
    assert torch.equal(norms.cpu(), torch.zeros(len(params) + 1))
    assert_bitwise_equal(params, theta)
    check_ascent(backend, params, grads, backups, theta, epsilon, 1.0, per_tensor, False)
    on_ball = clones(params)
    # the same ε: Δ is already inside the ball, so it stays
    expected, bounds = check_ascent(backend, params, grads, backups, theta, epsilon, 0.0, per_tensor, False)
    assert min(expected.scales) > 1 - 1e-6
    assert moved(on_ball, theta) > SIGNIFICANT * bound_norm(bounds)
    # half the ε: Δ shrinks onto the smaller ball
    expected, bounds = check_ascent(backend, params, grads, backups, theta, epsilon / 2, 0.0, per_tensor, False)
    assert moved(params, on_ball) > SIGNIFICANT * bound_norm(bounds)
    largest = [int(expected.norms[:-1].argmax())] if per_tensor else range(len(params))
    torch.testing.assert_close(moved([params[i] for i in largest], [theta[i] for i in largest]), epsilon / 2,
                               rtol=1e-4, atol=0)


def test_norms_do_not_overflow_or_underflow(device, backend):
    # fp16: 1000² overflows fp16 (not fp32); fp64: (1e-25)² underflows fp32 (not fp64). Over several chunks.
    n = CPU_CHUNK + TRITON_CHUNK + 1
    for dtype, value in ((torch.float16, 1000.0), (torch.float64, 1e-25)):
        g = torch.full((n,), value, dtype=dtype, device=device)
        p = torch.zeros(n, dtype=dtype, device=device)
        norms = functional.perturb_([p], [g], [torch.empty_like(p)], 1e30, 1.0, True, True, backend=backend)
        # (fp32 sums of 70K squares, in some backends in one sweep: a few 1e-5 off)
        assert norms[0].item() == pytest.approx(value * math.sqrt(n), rel=1e-4), dtype
        assert norms[1].item() == pytest.approx(value * math.sqrt(n), rel=1e-4), dtype
        assert torch.equal(p, g)  # unprojected: θ + Δ = 0 + g


# -- perturb_'s SAM and ASAM modes --------------------------------------------------------------------------------
def middle_epsilon(params, grads, inner_lr, per_tensor, eta):
    """An ε between the two middle norms of the ascent variable (``per_tensor``), or half the global one."""
    norms = perturb(params, grads, None, 1.0, inner_lr, per_tensor, True, eta=eta).norms
    if not per_tensor:
        return 0.5 * float(norms[-1])
    finite = sorted(float(n) for n, p in zip(norms[:-1], params) if p.numel())
    return 0.5 * (finite[len(finite) // 2 - 1] + finite[len(finite) // 2])


@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_perturb_surface_puts_delta_on_the_sphere(device, backend, dtype, per_tensor):
    """SAM's projection: every Δ (per tensor, or the one over all tensors) has norm ε, also where ζ·g lies
    inside the ball, which the default projection would leave as it is."""
    params, grads = make_lists(EDGE_SHAPES, dtype, seed=31, device=device)
    # per tensor: some Δ inside their balls, some outside; global: the one Δ well inside
    epsilon = middle_epsilon(params, grads, 0.5, per_tensor, None) * (1 if per_tensor else 4)
    theta, backups = clones(params), empty_like(params)
    expected, bounds = check_ascent(backend, params, grads, backups, theta, epsilon, 0.5, per_tensor, True,
                                    surface=True)
    assert max(expected.scales) > 1.1, expected.scales  # some Δ grew onto the sphere
    ball = perturb(theta, grads, None, epsilon, 0.5, per_tensor, True)
    assert moved(params, ball.params) > SIGNIFICANT * bound_norm(bounds)  # not the default projection
    sized = [i for i, p in enumerate(params) if p.numel()]
    if per_tensor:
        for i in sized:
            torch.testing.assert_close(moved(params[i:i + 1], theta[i:i + 1]), epsilon, rtol=2e-2, atol=0)
    else:
        torch.testing.assert_close(moved(params, theta), epsilon, rtol=2e-2, atol=0)
    functional.restore_(params, backups, backend=backend)
    if not subtracts_back(backend):
        assert_bitwise_equal(params, theta)


@pytest.mark.parametrize("eta", [0.0, 0.01], ids=["eta0", "eta0.01"])
@pytest.mark.parametrize("surface", [False, True], ids=["ball", "surface"])
@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_perturb_asam_element_weights(device, backend, dtype, per_tensor, surface, eta):
    """ASAM: u = ζ·T·g with T = |θ| + η is normed and projected, and params ← θ + scale·T·u; far from the
    unweighted ascent at the same ε."""
    # Δ of the size of θ (grad_scale), so that the effect stands far above the roundings of θ in bf16
    params, grads = make_lists(EDGE_SHAPES, dtype, seed=32, device=device, param_scale=1.0, grad_scale=10.0)
    epsilon = middle_epsilon(params, grads, 0.5, per_tensor, eta)
    theta, backups = clones(params), empty_like(params)
    expected, bounds = check_ascent(backend, params, grads, backups, theta, epsilon, 0.5, per_tensor, True,
                                    surface=surface, eta=eta)
    if not surface:
        assert_mixes_projected_and_free(expected, per_tensor, params)
    unweighted = perturb(theta, grads, None, epsilon, 0.5, per_tensor, True, surface)
    assert moved(params, unweighted.params) > SIGNIFICANT * bound_norm(bounds)
    assert moved(params, theta) > SIGNIFICANT * bound_norm(bounds)
    if surface and not per_tensor:  # on the sphere in the coordinates θ/T
        scaled = [(p.double() - t.double()) / w for p, t, w in zip(params, theta, expected.weights)]
        torch.testing.assert_close(moved(scaled, [torch.zeros_like(x) for x in scaled]), epsilon, rtol=2e-2, atol=0)
    functional.restore_(params, backups, backend=backend)
    if not subtracts_back(backend):
        assert_bitwise_equal(params, theta)


@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
def test_asam_in_mixed_dtype_lists(device, backend, per_tensor):
    params, grads = make_lists([s for _, s in MIXED_DTYPE_CASE], [d for d, _ in MIXED_DTYPE_CASE], seed=33,
                               device=device, param_scale=0.5)
    epsilon = middle_epsilon(params, grads, 1.0, per_tensor, 0.01)
    theta, backups = clones(params), empty_like(params)
    _, bounds = check_ascent(backend, params, grads, backups, theta, epsilon, 1.0, per_tensor, True, surface=True,
                             eta=0.01)
    assert moved(params, theta) > SIGNIFICANT * bound_norm(bounds)


@pytest.mark.parametrize("eta", [None, 0.01], ids=["sam", "asam"])
@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_surface_modes_drop_non_finite_and_keep_theta_on_zero_gradients(device, backend, dtype, per_tensor, eta):
    """A NaN gradient drops Δ (that tensor's, or for the global norm every tensor's) to θ exactly; a zero
    gradient, whose ε/‖Δ‖ is huge on the surface, leaves θ exactly and reports ‖Δ‖ = 0."""
    shapes = [(5,), (CPU_CHUNK + 5,), (40,), ()]
    params, grads = make_lists(shapes, dtype, seed=34, device=device, param_scale=1.0)
    theta, backups = clones(params), empty_like(params)
    bad = clones(grads)
    bad[1][CPU_CHUNK + 2] = math.nan
    norms = functional.perturb_(params, bad, backups, 0.05, 1.0, per_tensor, True, True, eta, backend=backend)
    assert math.isnan(norms[1]) and math.isnan(norms[-1])
    dropped = [1] if per_tensor else list(range(len(params)))
    for i in range(len(params)):
        assert torch.isfinite(params[i]).all(), i
        if i in dropped:
            assert torch.equal(params[i], theta[i]), f"tensor {i} is not θ"
    healthy = [i for i in range(len(params)) if i not in dropped]
    if healthy:  # the others still ascend (per tensor: onto their own spheres)
        assert moved([params[i] for i in healthy], [theta[i] for i in healthy]) > 1e-2
    functional.restore_(params, backups, backend=backend)
    start = clones(params)
    zeros = [torch.zeros_like(g) for g in grads]
    norms = functional.perturb_(params, zeros, backups, 0.05, 1.0, per_tensor, True, True, eta, backend=backend)
    assert torch.equal(norms.cpu(), torch.zeros(len(shapes) + 1)), norms
    assert all(torch.equal(p, s) for p, s in zip(params, start))
    # a tiny gradient: ε/‖Δ‖ beyond fp16's range, Δ still on the ε-sphere (around θ = 0, where nothing rounds it)
    origin, tiny = [torch.zeros_like(p) for p in params], [torch.full_like(g, 1e-7) for g in grads]
    functional.perturb_(origin, tiny, backups, 0.05, 1.0, per_tensor, True, True, eta, backend=backend)
    assert all(torch.isfinite(p).all() for p in origin)
    if eta is None:  # (ASAM around θ = 0 has T = η: the same sphere in θ/T, a smaller one here)
        torch.testing.assert_close(moved(origin, [torch.zeros_like(p) for p in origin]),
                                   0.05 * math.sqrt(len(shapes) if per_tensor else 1), rtol=2e-2, atol=0)


def test_eta_with_a_later_ascent_is_refused_before_writing(device, backend):
    params, grads = make_lists([(7,), (3, 5)], torch.float32, seed=35, device=device)
    backups = empty_like(params)
    functional.perturb_(params, grads, backups, 0.1, 1.0, True, True, backend=backend)
    before, saved = clones(params), clones(backups)
    with pytest.raises(ValueError, match=r"eta \(ASAM's element weights\) needs first=True"):
        functional.perturb_(params, grads, backups, 0.1, 1.0, True, False, True, 0.01, backend=backend)
    assert_bitwise_equal(params, before)
    assert_bitwise_equal(backups, saved)


# -- restore_ ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_after_ascents(device, backend, dtype):
    """Bit for bit, whatever θ holds (NaN payloads, ±Inf, -0.0, subnormals), after a first and a later
    ascent; the reference backend (θ + Δ − Δ) up to rounding, on finite θ."""
    shapes = [(TRITON_CHUNK + 1,), (7,), (), (0,), (3, 5), (2 * TRITON_CHUNK + 9,)]
    params, grads = make_lists(shapes, dtype, seed=11, device=device, param_scale=1.0)
    if not subtracts_back(backend):
        gen = torch.Generator().manual_seed(12)
        params[-1] = random_bits(shapes[-1], dtype, gen, device)
        finfo = torch.finfo(dtype)
        specials = torch.tensor([math.nan, -0.0, math.inf, -math.inf, finfo.tiny / 2, finfo.max, -finfo.max],
                                dtype=dtype)
        params[0][-len(specials):] = specials.to(device)
        bits(params[0])[1] = {8: 0x7FF8_0000_0000_1234, 4: 0x7FC0_1234, 2: 0x7E12}[dtype.itemsize]  # NaN payload
        assert torch.isnan(params[-1]).any() and torch.isinf(params[0]).any(), "the case must hold NaNs and Infs"
    theta, backups = clones(params), empty_like(params)
    functional.perturb_(params, grads, backups, 5.0, 1.0, True, True, backend=backend)
    after_first = clones(params)
    functional.perturb_(params, grads, backups, 5.0, 1.0, True, False, backend=backend)
    perturbed = clones(params)
    assert moved(perturbed[1:5], theta[1:5]) > 1.0
    functional.restore_(params, backups, backend=backend)
    if subtracts_back(backend):
        assert_within(params, theta, restore_bounds(theta, after_first, perturbed))
    else:
        assert_bitwise_equal(params, theta)


# -- restore_sgd_ ------------------------------------------------------------------------------------------------
SGD_SHAPES = [(517,), (), (0,), (5, 7), (TRITON_CHUNK + 1,)]


@pytest.mark.parametrize("flags", SGD_FLAGS, ids=sgd_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_sgd_matches_torch_sgd(device, backend, dtype, flags):
    """Each step: an ascent from θ, then restore_sgd_, against the definition and against torch.optim.SGD's own
    step from the same θ and buffers (the first step initialises the buffers: they are NaN before it)."""
    lr, momentum = 0.5, flags["momentum"]
    theta, _ = make_lists(SGD_SHAPES, dtype, seed=13, device=device, param_scale=0.1)
    reference_params = [t.clone().requires_grad_() for t in theta]
    sgd = torch.optim.SGD(reference_params, lr=lr, **flags)
    buffers = [torch.full_like(t, math.nan) for t in theta]  # never read on the first step; untouched without momentum
    sentinel = clones(buffers)
    params, backups = clones(theta), empty_like(theta)
    for step in range(3):
        first_step = step == 0
        ascent_grads, grads = make_lists(SGD_SHAPES, dtype, seed=20 + step, device=device)
        functional.perturb_(params, ascent_grads, backups, 0.5, 1.0, True, True, backend=backend)
        perturbed, old_buffers = clones(params), clones(buffers)
        functional.restore_sgd_(params, backups, grads, buffers, lr, first_step=first_step, backend=backend, **flags)
        expected = restore_sgd(theta, grads, old_buffers, lr, first_step=first_step, **flags)
        restore_error = restore_bounds(theta, perturbed) if subtracts_back(backend) else None
        param_bounds, buffer_bounds = sgd_bounds(theta, grads, old_buffers, expected, lr, momentum,
                                                 flags["weight_decay"], first_step, restore_error)
        assert_within(params, expected.params, param_bounds, "param")
        assert moved(params, theta) > SIGNIFICANT * bound_norm(param_bounds)
        if momentum:
            assert_within(buffers, expected.momentum_buffers, buffer_bounds, "buffer")
        else:
            assert_bitwise_equal(buffers, sentinel, "untouched buffer")
        # torch.optim.SGD from the same θ and buffers: the definition is its step, and so is the op's
        with torch.no_grad():
            for r, t, g in zip(reference_params, theta, grads):
                r.copy_(t)
                r.grad = g.clone()
            if momentum and not first_step:
                for r, b in zip(reference_params, old_buffers):
                    sgd.state[r]["momentum_buffer"].copy_(b)
        sgd.step()
        torch_params = [r.detach() for r in reference_params]
        sgd_only_bounds, sgd_buffer_bounds = sgd_bounds(theta, grads, old_buffers, expected, lr, momentum,
                                                        flags["weight_decay"], first_step)
        assert_within(torch_params, expected.params, sgd_only_bounds, "torch.optim.SGD param")
        assert_within(params, torch_params, [a + b for a, b in zip(param_bounds, sgd_only_bounds)],
                      "param vs torch.optim.SGD")
        if momentum:
            torch_buffers = [sgd.state[r]["momentum_buffer"] for r in reference_params]
            assert_within(torch_buffers, expected.momentum_buffers, sgd_buffer_bounds, "torch.optim.SGD buffer")
            assert_within(buffers, torch_buffers, [a + b for a, b in zip(buffer_bounds, sgd_buffer_bounds)],
                          "buffer vs torch.optim.SGD")
        theta = clones(params)


def test_restore_sgd_without_momentum_ignores_buffers(device, backend):
    params, grads = make_lists([(TRITON_CHUNK + 1,), (9,)], torch.float32, seed=14, device=device)
    ascent_grads = make_lists([(TRITON_CHUNK + 1,), (9,)], torch.float32, seed=15, device=device)[1]
    theta = clones(params)
    outputs = []
    for buffers in ([], [torch.full_like(p, 7.0) for p in params]):
        p, backups = clones(theta), empty_like(theta)
        functional.perturb_(p, ascent_grads, backups, 1.0, 1.0, True, True, backend=backend)
        perturbed = clones(p)
        functional.restore_sgd_(p, backups, grads, buffers, 0.1, 0.0, 0.0, 0.0, False, False, False, backend=backend)
        assert all(torch.equal(b, torch.full_like(b, 7.0)) for b in buffers)
        outputs.append(p)
    assert_bitwise_equal(outputs[0], outputs[1])
    expected = restore_sgd(theta, grads, [], 0.1)
    bounds = sgd_bounds(theta, grads, [], expected, 0.1, 0.0, 0.0, False,
                        restore_bounds(theta, perturbed) if subtracts_back(backend) else None)[0]
    assert_within(outputs[0], expected.params, bounds)
    assert moved(outputs[0], theta) > SIGNIFICANT * bound_norm(bounds)


# -- perturbation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_perturbation_is_delta(device, backend, dtype):
    shapes = [(TRITON_CHUNK + 1,), (7,), (), (0,), (3, 5)]
    params, grads = make_lists(shapes, dtype, seed=16, device=device)
    theta, backups = clones(params), empty_like(params)
    functional.perturb_(params, grads, backups, 5.0, 0.5, True, True, backend=backend)
    functional.perturb_(params, grads, backups, 5.0, 0.5, False, False, backend=backend)
    saved_params, saved_backups = clones(params), clones(backups)
    delta = functional.perturbation(params, backups, backend=backend)
    expected = perturbation(params, theta)
    bounds = [ULPS * UNIT[dtype] * (e.abs() + (t.double().abs() if subtracts_back(backend) else 0))
              for e, t in zip(expected, theta)]
    assert len(delta) == len(params)
    for d, p in zip(delta, params):
        assert d.dtype == p.dtype and d.shape == p.shape and d.device == p.device
    assert_within(delta, expected, bounds, "Δ")
    assert bound_norm(bounds) * SIGNIFICANT < math.sqrt(sum(float((e ** 2).sum()) for e in expected))
    assert_bitwise_equal(params, saved_params)  # only read
    assert_bitwise_equal(backups, saved_backups)
    for d in delta:  # new tensors: writing them changes nothing
        d.fill_(3.0)
    assert_bitwise_equal(params, saved_params)
    assert_bitwise_equal(backups, saved_backups)


# -- lists and layouts -------------------------------------------------------------------------------------------
# -- norms, restore_orthogonal_, add_orthogonal_ (the "gradient" schedule) --------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_norms_match_the_definition(device, backend, dtype):
    tensors = make_lists(EDGE_SHAPES + CPU_CHUNK_SHAPES, dtype, seed=40, device=device)[1]
    result = functional.norms(tensors, backend=backend)
    expected = norms(tensors)
    assert result.dtype == torch.float32 and result.shape == (len(tensors) + 1,) and result.device == tensors[0].device
    rtol = max(NORM_RTOL[dtype], 2.0**-23)
    torch.testing.assert_close(result.double().cpu(), expected, rtol=2 * rtol, atol=0)
    assert expected[-1] > 100  # real norms


def test_norms_do_not_overflow_and_report_non_finite(device, backend):
    big = [torch.full((CPU_CHUNK + 3,), 1e30, device=device), torch.full((9,), 6e4, device=device, dtype=torch.float16),
           torch.full((4,), 1e-25, device=device, dtype=torch.float64)]  # (1e-25)² underflows fp32, not fp64
    result = functional.norms(big, backend=backend).double().cpu()
    torch.testing.assert_close(result, norms(big), rtol=1e-5, atol=0)
    assert torch.isfinite(result).all() and result[0] > 1e32  # Σ t² overflows fp32, the norm does not
    bad = clones(big)
    bad[1][3] = math.nan
    result = functional.norms(bad, backend=backend)
    assert math.isnan(result[1]) and math.isnan(result[-1]) and math.isfinite(result[0])


def adversarial_state(backend, shapes, dtypes, seed, device, per_tensor, epsilon=None):
    """θ, the parameters at θ + Δ after a first ascent (with ``backups``), and a gradient there: half along the
    ascent's gradient (so c is well away from 0), half another draw."""
    params, grads = make_lists(shapes, dtypes, seed=seed, device=device)
    other = make_lists(shapes, dtypes, seed=seed + 1, device=device)[1]
    theta, backups = clones(params), empty_like(params)
    if epsilon is None:
        epsilon = epsilon_for(grads, 1.0, per_tensor)
    functional.perturb_(params, grads, backups, epsilon, 1.0, per_tensor, True, backend=backend)
    at_delta = [(0.5 * g.double() + o.double()).to(g.dtype) for g, o in zip(grads, other)]
    return theta, params, backups, at_delta


def storage_delta(backend) -> bool:
    """Whether the backend forms Δ = params − θ (and g − c·Δ) in the tensors' own dtype, as foreach's ops do (the
    reference keeps Δ itself); the fused kernels form it in fp32 (fp64 for fp64)."""
    return backend in ("reference", "foreach")


def significance(backend, dtype) -> float:
    """How many times its bound a restore_orthogonal_ effect must exceed: SIGNIFICANT, but 2 where Δ is formed in
    fp16/bf16 (its bound then holds the rounding of Δ in that dtype, which c·Δ is only some 10x larger than)."""
    return 2 if storage_delta(backend) and UNIT[dtype] > 2.0**-20 else SIGNIFICANT


def check_restore_orthogonal(backend, theta, params, backups, grads, per_tensor):
    """One ``restore_orthogonal_`` checked against the definition; returns (definition, orthogonals, bounds)."""
    perturbed = clones(params)
    orthogonals = [torch.full_like(p, 7.0) for p in params]  # whatever the buffers held before
    functional.restore_orthogonal_(params, backups, grads, orthogonals, per_tensor, backend=backend)
    expected = restore_orthogonal(perturbed, theta, grads, per_tensor)
    bounds = orthogonal_bounds(expected, grads, theta, per_tensor, subtracts_back(backend), storage_delta(backend))
    assert_within(orthogonals, expected.orthogonals, bounds, "orthogonal")
    if subtracts_back(backend):
        assert_within(params, theta, restore_bounds(theta, perturbed))
    else:
        assert_bitwise_equal(params, theta, "restored param")
    for o, p in zip(orthogonals, params):
        assert o.dtype == p.dtype and o.shape == p.shape and o.stride() == p.stride()
    return expected, orthogonals, bounds


def orthogonality(orthogonals, deltas, grads, members) -> tuple[float, float]:
    """(|⟨v, Δ⟩|, |⟨g, Δ⟩|) over the tensors ``members``, in float64."""
    dot_v = sum(float((orthogonals[i].double() * deltas[i]).sum()) for i in members)
    dot_g = sum(float((grads[i].double() * deltas[i]).sum()) for i in members)
    return abs(dot_v), abs(dot_g)


@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_orthogonal_keeps_the_part_orthogonal_to_delta(device, backend, dtype, per_tensor):
    theta, params, backups, grads = adversarial_state(backend, EDGE_SHAPES, dtype, 41, device, per_tensor)
    expected, orthogonals, bounds = check_restore_orthogonal(backend, theta, params, backups, grads, per_tensor)
    assert moved(orthogonals, grads) > significance(backend, dtype) * bound_norm(bounds)  # c·Δ is removed
    groups = [[i] for i, g in enumerate(grads) if g.numel() > 1] if per_tensor else [list(range(len(grads)))]
    for members in groups:  # independent of the definition: what is left is orthogonal to Δ
        dot_v, dot_g = orthogonality(orthogonals, expected.deltas, grads, members)
        assert dot_v <= 0.05 * dot_g, (members, dot_v, dot_g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
def test_restore_orthogonal_across_cpu_chunk_boundaries(device, backend, per_tensor, dtype):
    theta, params, backups, grads = adversarial_state(backend, CPU_CHUNK_SHAPES, dtype, 43, device, per_tensor)
    _, orthogonals, bounds = check_restore_orthogonal(backend, theta, params, backups, grads, per_tensor)
    assert moved(orthogonals, grads) > significance(backend, dtype) * bound_norm(bounds)


@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
def test_gradient_reuse_ops_on_mixed_dtypes(device, backend, per_tensor):
    dtypes, shapes = [d for d, _ in MIXED_DTYPE_CASE], [s for _, s in MIXED_DTYPE_CASE]
    theta, params, backups, grads = adversarial_state(backend, shapes, dtypes, 45, device, per_tensor)
    _, orthogonals, bounds = check_restore_orthogonal(backend, theta, params, backups, grads, per_tensor)
    assert moved(orthogonals, grads) > significance(backend, torch.bfloat16) * bound_norm(bounds)  # (bf16 in it)
    new_grads = make_lists(shapes, dtypes, seed=47, device=device)[1]
    check_add_orthogonal(backend, new_grads, orthogonals, 0.7, per_tensor)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_orthogonal_of_a_non_finite_gradient_is_that_gradient(device, backend, dtype, per_tensor, bad):
    """c is 0 where ⟨Δ, g⟩ is not finite: g_v is g, bit for bit (its NaN or Inf included, for add_orthogonal_ to
    drop); per tensor only that tensor, globally every tensor; θ comes back exactly all the same."""
    shapes, poisoned = [(5,), (CPU_CHUNK + 5,), (40,), ()], 1
    theta, params, backups, grads = adversarial_state(backend, shapes, dtype, 49, device, per_tensor)
    grads[poisoned][CPU_CHUNK + 2] = bad
    perturbed = clones(params)
    orthogonals = empty_like(params)
    functional.restore_orthogonal_(params, backups, grads, orthogonals, per_tensor, backend=backend)
    expected = restore_orthogonal(perturbed, theta, grads, per_tensor)
    kept = [i for i, c in enumerate(expected.coefficients) if c == 0.0]
    assert kept == ([poisoned] if per_tensor else list(range(len(grads))))  # (the definition agrees)
    assert_bitwise_equal([orthogonals[i] for i in kept], [grads[i] for i in kept], "g_v = g")
    others = [i for i in range(len(grads)) if i not in kept]
    bounds = orthogonal_bounds(expected, grads, theta, per_tensor, subtracts_back(backend), storage_delta(backend))
    assert_within([orthogonals[i] for i in others], [expected.orthogonals[i] for i in others],
                  [bounds[i] for i in others])
    if others:
        assert moved([orthogonals[i] for i in others], [grads[i] for i in others]) > 0
    if not subtracts_back(backend):
        assert_bitwise_equal(params, theta, "restored param")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_orthogonal_of_a_zero_delta_is_the_gradient(device, backend, dtype):
    """ε = 0 leaves Δ = 0: c is 0 (not 0/0) and g_v = g exactly; per tensor, a tensor whose ascent gradient was 0."""
    theta, params, backups, grads = adversarial_state(backend, EDGE_SHAPES, dtype, 51, device, False, epsilon=0.0)
    orthogonals = empty_like(params)
    functional.restore_orthogonal_(params, backups, grads, orthogonals, False, backend=backend)
    assert_bitwise_equal(orthogonals, grads, "g_v = g")
    assert_bitwise_equal(params, theta, "restored param")
    shapes = [(7,), (3, 5), (TRITON_CHUNK + 1,)]
    params, ascent = make_lists(shapes, dtype, seed=53, device=device)
    ascent[0].zero_()
    theta, backups = clones(params), empty_like(params)
    functional.perturb_(params, ascent, backups, 100.0, 1.0, True, True, backend=backend)
    grads = make_lists(shapes, dtype, seed=54, device=device)[1]
    orthogonals = empty_like(params)
    functional.restore_orthogonal_(params, backups, grads, orthogonals, True, backend=backend)
    assert_bitwise_equal(orthogonals[:1], grads[:1], "g_v = g where Δ = 0")
    assert moved(orthogonals[1:], grads[1:]) > 1e-3 * moved(grads[1:], [torch.zeros_like(g) for g in grads[1:]])


def check_add_orthogonal(backend, grads, orthogonals, alpha, per_tensor):
    """One ``add_orthogonal_`` checked against the definition; returns (before, bounds)."""
    before = clones(grads)
    functional.add_orthogonal_(grads, orthogonals, alpha, per_tensor, backend=backend)
    expected = add_orthogonal(before, orthogonals, alpha, per_tensor)
    bounds = add_orthogonal_bounds(before, orthogonals, alpha, per_tensor)
    assert_within(grads, expected, bounds, "grad")
    for g, b in zip(grads, before):
        assert g.dtype == b.dtype and g.shape == b.shape and g.stride() == b.stride()
    return before, bounds


@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_add_orthogonal_adds_alpha_times_the_gradient_norm(device, backend, dtype, per_tensor):
    shapes = EDGE_SHAPES + CPU_CHUNK_SHAPES[:2]
    grads, orthogonals = make_lists(shapes, dtype, seed=55, device=device, param_scale=3.0)
    before, bounds = check_add_orthogonal(backend, grads, orthogonals, 0.7, per_tensor)
    assert moved(grads, before) > SIGNIFICANT * bound_norm(bounds)
    # independent of the definition: the added part has norm α‖g‖ (per tensor, or over all tensors)
    groups = [[i] for i, g in enumerate(grads) if g.numel()] if per_tensor else [list(range(len(grads)))]
    for members in groups:
        added = moved([grads[i] for i in members], [before[i] for i in members])
        g_norm = moved([before[i] for i in members], [torch.zeros_like(before[i]) for i in members])
        torch.testing.assert_close(added, 0.7 * g_norm, rtol=max(8 * UNIT[dtype], 1e-5), atol=0)


@pytest.mark.parametrize("per_tensor", [True, False], ids=per_tensor_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_add_orthogonal_leaves_the_gradient_where_the_coefficient_is_not_finite(device, backend, dtype, per_tensor):
    """A NaN or Inf in g_v, a zero g_v, or a non-finite gradient: that gradient stays as it is, bit for bit (per
    tensor: only those; globally: all of them, as the norms over all tensors are not finite); α = 0 leaves all."""
    shapes = [(5,), (CPU_CHUNK + 5,), (40,), (3, 4), (9,)]
    grads, orthogonals = make_lists(shapes, dtype, seed=57, device=device, param_scale=2.0)
    orthogonals[1][CPU_CHUNK + 1] = math.nan
    orthogonals[2][7] = math.inf
    orthogonals[3].zero_()
    grads[4][2] = math.nan
    before = clones(grads)
    functional.add_orthogonal_(grads, orthogonals, 0.7, per_tensor, backend=backend)
    coefficients = direction_coefficients(before, orthogonals, 0.7, per_tensor)
    left = [i for i, c in enumerate(coefficients) if c == 0.0]
    assert left == ([1, 2, 3, 4] if per_tensor else list(range(len(grads))))  # (the definition agrees)
    assert_bitwise_equal([grads[i] for i in left], [before[i] for i in left], "untouched grad")
    if per_tensor:
        assert_within(grads[:1], add_orthogonal(before[:1], orthogonals[:1], 0.7, True),
                      add_orthogonal_bounds(before[:1], orthogonals[:1], 0.7, True))
        assert moved(grads[:1], before[:1]) > 0.1 * moved(before[:1], [torch.zeros_like(before[0])])
    grads = clones(before)
    functional.add_orthogonal_(grads, [torch.ones_like(g) for g in grads], 0.0, per_tensor, backend=backend)
    assert_bitwise_equal(grads, before, "grad with alpha 0")


def test_gradient_reuse_ops_on_empty_lists_and_tensors(device, backend):
    if device == "cpu":
        assert torch.equal(functional.norms([], backend=backend), torch.zeros(1))
        functional.restore_orthogonal_([], [], [], [], True, backend=backend)
        functional.add_orthogonal_([], [], 0.7, False, backend=backend)
    nothing = [torch.empty(0, device=device), torch.empty(2, 0, device=device)]
    assert functional.norms(nothing, backend=backend).tolist() == [0.0, 0.0, 0.0]
    functional.restore_orthogonal_(nothing, empty_like(nothing), clones(nothing), empty_like(nothing), False,
                                   backend=backend)
    functional.add_orthogonal_(nothing, clones(nothing), 0.7, True, backend=backend)
    # empty tensors among others change nothing about the others
    shapes = [(0,), (5,), (0, 3), (TRITON_CHUNK + 2,)]
    theta, params, backups, grads = adversarial_state(backend, shapes, torch.float32, 59, device, False)
    _, orthogonals, bounds = check_restore_orthogonal(backend, theta, params, backups, grads, False)
    assert moved(orthogonals, grads) > SIGNIFICANT * bound_norm(bounds)
    check_add_orthogonal(backend, clones(grads), orthogonals, 0.7, False)


def channels_last(t):
    return t.to(memory_format=torch.channels_last)


def transposed(t):
    """The same values, column-major: dense, not contiguous."""
    return t.t().contiguous().t()


def test_empty_lists_and_empty_tensors(device, backend):
    if device == "cpu":  # an empty list has no device: the op layer takes it for a CPU one
        norms = functional.perturb_([], [], [], 1.0, 1.0, True, True, backend=backend)
        assert norms.dtype == torch.float32 and torch.equal(norms, torch.zeros(1))
        functional.restore_([], [], backend=backend)
        functional.restore_sgd_([], [], [], [], 0.1, 0.9, 0.0, 0.0, False, False, True, backend=backend)
        assert functional.perturbation([], [], backend=backend) == []
    nothing = [torch.empty(0, device=device), torch.empty(2, 0, device=device)]
    norms = functional.perturb_(nothing, clones(nothing), empty_like(nothing), 1.0, 1.0, False, True, backend=backend)
    assert norms.tolist() == [0.0, 0.0, 0.0]
    functional.restore_sgd_(nothing, empty_like(nothing), clones(nothing), empty_like(nothing), 0.1, 0.9, 0.0, 0.0,
                            False, False, True, backend=backend)
    # empty tensors among others: norm 0, and the others are unaffected
    shapes = [(0,), (5,), (0, 3), (TRITON_CHUNK + 2,)]
    params, grads = make_lists(shapes, torch.float32, seed=17, device=device)
    theta, backups = clones(params), empty_like(params)
    expected, bounds = check_ascent(backend, params, grads, backups, theta, 2.0, 1.0, False, True)
    assert expected.norms[0] == 0 and expected.norms[2] == 0
    assert moved(params, theta) > SIGNIFICANT * bound_norm(bounds)
    functional.restore_(params, backups, backend=backend)
    if not subtracts_back(backend):
        assert_bitwise_equal(params, theta)


def test_dense_non_contiguous_layouts(device, backend):
    """channels_last, channels_last with a size-1 dim, transposed: dense layouts, written element for element,
    the layout kept."""
    shapes = [(8, 3, 5, 5), (4, 1, 3, 3), (65, 33), (3, TRITON_CHUNK + 9)]
    layouts = [channels_last, channels_last, transposed, transposed]
    params, grads = make_lists(shapes, torch.float32, seed=18, device=device)
    grads2 = make_lists(shapes, torch.float32, seed=19, device=device)[1]
    params, grads, grads2 = ([f(t) for f, t in zip(layouts, ts)] for ts in (params, grads, grads2))
    strides = [p.stride() for p in params]
    assert not params[0].is_contiguous() and not params[2].is_contiguous() and not params[3].is_contiguous()
    theta, backups = clones(params), empty_like(params)  # preserve_format: the same layouts
    assert [b.stride() for b in backups] == strides
    states = []
    for first, g in ((True, grads), (False, grads2)):
        before = clones(params)
        _, bounds = check_ascent(backend, params, g, backups, theta, 2.0, 0.5, True, first)
        states.append(clones(params))
        assert moved(params, before) > SIGNIFICANT * bound_norm(bounds)
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    assert [p.stride() for p in params] == strides
    buffers = [torch.zeros_like(p) for p in params]
    functional.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 0.0, False, False, True, backend=backend)
    expected = restore_sgd(theta, grads, buffers, 0.1, 0.9, first_step=True)
    restore_error = restore_bounds(theta, *states) if subtracts_back(backend) else None
    param_bounds, buffer_bounds = sgd_bounds(theta, grads, buffers, expected, 0.1, 0.9, 0.0, True, restore_error)
    assert_within(params, expected.params, param_bounds)
    assert_within(buffers, expected.momentum_buffers, buffer_bounds)
    assert [p.stride() for p in params] == strides and [b.stride() for b in buffers] == strides
    theta = clones(params)
    functional.perturb_(params, grads, backups, 2.0, 0.5, True, True, backend=backend)
    functional.restore_(params, backups, backend=backend)
    if not subtracts_back(backend):
        assert_bitwise_equal(params, theta)


def test_size_one_dims_may_differ_in_stride(device, backend):
    """A size-1 dim never moves an element, so its stride may differ between the lists (channels_last
    params of a 1-channel conv with contiguous gradients): the same layout in the contract's terms."""
    shapes = [(4, 1, 3, 3), (6, 1)]
    params, grads = make_lists(shapes, torch.float32, seed=27, device=device)
    params = [params[0].to(memory_format=torch.channels_last), params[1].t().contiguous().t()]
    assert [p.stride() for p in params] != [g.stride() for g in grads]
    theta, backups = clones(params), empty_like(params)
    _, bounds = check_ascent(backend, params, grads, backups, theta, 1.0, 0.5, True, True)
    assert moved(params, theta) > SIGNIFICANT * bound_norm(bounds)
    functional.restore_(params, backups, backend=backend)
    if not subtracts_back(backend):
        assert_bitwise_equal(params, theta)


def test_views_into_one_flat_buffer(device, backend):
    """Parameters that are views of one flat buffer at 4-byte offsets (no 16-byte alignment): each op writes
    its views and nothing else."""
    sizes = [TRITON_CHUNK + 1, 7, 2 * TRITON_CHUNK]
    flats = [torch.randn(sum(sizes) + 3, generator=torch.Generator().manual_seed(19 + k)).to(device)
             for k in range(4)]
    end = 1 + sum(sizes)
    params, grads, backups, buffers = ([f[1 + sum(sizes[:i]):1 + sum(sizes[:i + 1])] for i in range(3)]
                                       for f in flats)
    assert any(t.data_ptr() % 16 for t in params)
    outside = [torch.cat([f[:1], f[end:]]) for f in flats]
    theta = clones(params)
    states = []
    for first in (True, False):
        check_ascent(backend, params, grads, backups, theta, 30.0, 1.0, False, first)
        states.append(clones(params))
    old_buffers = clones(buffers)
    functional.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 0.0, False, False, False, backend=backend)
    expected = restore_sgd(theta, grads, old_buffers, 0.1, 0.9)
    restore_error = restore_bounds(theta, *states) if subtracts_back(backend) else None
    param_bounds, buffer_bounds = sgd_bounds(theta, grads, old_buffers, expected, 0.1, 0.9, 0.0, False, restore_error)
    assert_within(params, expected.params, param_bounds)
    assert_within(buffers, expected.momentum_buffers, buffer_bounds)
    theta = clones(params)
    functional.perturb_(params, grads, backups, 30.0, 1.0, True, True, backend=backend)
    functional.restore_(params, backups, backend=backend)
    if not subtracts_back(backend):
        assert_bitwise_equal(params, theta)
    for f, o in zip(flats, outside):  # nothing else written
        assert torch.equal(torch.cat([f[:1], f[end:]]), o)


# -- autograd, determinism, bad arguments ------------------------------------------------------------------------
def test_writes_bump_autograd_version_counters(device, backend):
    """Every tensor an op writes gets a new version, so autograd sees the in-place change, as with built-in
    in-place ops: a tensor saved for backward and then overwritten makes backward fail."""
    params, grads = make_lists([(TRITON_CHUNK + 1,), (3, 4)], torch.float32, seed=23, device=device)
    backups, buffers = empty_like(params), clones(grads)

    def versions(tensors):
        return [t._version for t in tensors]

    before = versions(params), versions(backups)
    functional.perturb_(params, grads, backups, 1.0, 1.0, True, True, backend=backend)
    assert all(a > b for a, b in zip(versions(params), before[0])), "perturb_ must bump params"
    assert all(a > b for a, b in zip(versions(backups), before[1])), "perturb_(first) must bump backups"
    before = versions(params)
    functional.perturb_(params, grads, backups, 1.0, 1.0, True, False, backend=backend)
    assert all(a > b for a, b in zip(versions(params), before))
    before = versions(params)
    functional.restore_(params, backups, backend=backend)
    assert all(a > b for a, b in zip(versions(params), before)), "restore_ must bump params"
    functional.perturb_(params, grads, backups, 1.0, 1.0, True, True, backend=backend)
    before = versions(params), versions(buffers)
    functional.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 0.0, False, False, False,
                            backend=backend)
    assert all(a > b for a, b in zip(versions(params), before[0])), "restore_sgd_ must bump params"
    assert all(a > b for a, b in zip(versions(buffers), before[1])), "restore_sgd_ must bump momentum buffers"

    functional.perturb_(params, grads, backups, 1.0, 1.0, True, True, backend=backend)
    orthogonals = empty_like(params)
    before = versions(params), versions(orthogonals)
    functional.restore_orthogonal_(params, backups, grads, orthogonals, True, backend=backend)
    assert all(a > b for a, b in zip(versions(params), before[0])), "restore_orthogonal_ must bump params"
    assert all(a > b for a, b in zip(versions(orthogonals), before[1])), "restore_orthogonal_ must bump orthogonals"
    before = versions(grads)
    functional.add_orthogonal_(grads, orthogonals, 0.7, False, backend=backend)
    assert all(a > b for a, b in zip(versions(grads), before)), "add_orthogonal_ must bump grads"

    w = torch.randn(4, requires_grad=True, device=device)
    x = torch.randn(4, device=device)
    y = (w * x).sum()  # autograd saved x for w's gradient
    with torch.no_grad():
        functional.perturb_([x], [torch.randn(4, device=device)], [torch.empty(4, device=device)], 0.1, 1.0,
                            backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_bitwise_deterministic(device, backend):
    """Two identical calls give identical bits: norms, parameters, backups' effect, buffers."""
    shapes = [(3 * TRITON_CHUNK + 7,), (123,), (), (5, 7), (CPU_CHUNK + 3,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]

    def run():
        params, grads = make_lists(shapes, dtypes, seed=24, device=device)
        grads2 = make_lists(shapes, dtypes, seed=25, device=device)[1]
        backups, buffers = empty_like(params), [torch.zeros_like(p) for p in params]
        out = [functional.perturb_(params, grads, backups, 30.0, 0.5, True, True, backend=backend)]
        out.append(functional.perturb_(params, grads2, backups, 30.0, 0.5, False, False, backend=backend))
        out += clones(params)
        functional.restore_sgd_(params, backups, grads2, buffers, 0.1, 0.9, 0.0, 1e-2, True, False, True,
                                backend=backend)
        out += clones(params) + buffers + [functional.norms(grads2, backend=backend)]
        functional.perturb_(params, grads, backups, 30.0, 0.5, False, True, backend=backend)
        orthogonals = empty_like(params)
        functional.restore_orthogonal_(params, backups, grads2, orthogonals, False, backend=backend)
        functional.add_orthogonal_(grads, orthogonals, 0.7, True, backend=backend)
        return out + params + orthogonals + grads

    first, second = run(), run()
    assert_bitwise_equal(first, second)
    assert first[0][-1].item() > 30.0  # real norms, not some trivially reproducible value


def test_bad_arguments_raise_before_writing(device, backend):
    """The op layer checks the argument contract before any backend runs: the same exception for every
    backend, and nothing written."""
    params, grads = make_lists([(TRITON_CHUNK + 1,), (5,), (3,)], torch.float32, seed=26, device=device)
    backups = empty_like(params)
    theta, saved_backups = clones(params), clones(backups)
    with pytest.raises(ValueError, match="same length"):
        functional.perturb_(params, grads[:-1], backups, 0.5, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[2\] has shape"):
        functional.perturb_(params, grads[:2] + [torch.zeros(2, device=device)], backups, 0.5, 1.0, backend=backend)
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        functional.perturb_(params, grads, backups, -1.0, 1.0, backend=backend)
    with pytest.raises(ValueError, match="inner_lr must be a finite number >= 0"):
        functional.perturb_(params, grads, backups, 1.0, math.nan, backend=backend)
    with pytest.raises(ValueError, match="share memory"):
        functional.perturb_(params, grads, backups[:2] + [params[2]], 0.5, 1.0, backend=backend)
    with pytest.raises(TypeError, match="supported dtypes"):
        functional.restore_(params[:2] + [params[2].long()], backups[:2] + [backups[2].long()], backend=backend)
    with pytest.raises(ValueError, match="same length"):
        functional.restore_(params, backups[:1], backend=backend)
    with pytest.raises(ValueError, match="momentum_buffers has 0 tensors"):
        functional.restore_sgd_(params, backups, grads, [], 0.1, 0.9, backend=backend)
    orthogonals, saved_grads = empty_like(params), clones(grads)
    with pytest.raises(ValueError, match=r"orthogonals\[1\] has shape"):
        functional.restore_orthogonal_(params, backups, grads, [orthogonals[0], torch.empty(4, device=device),
                                                                orthogonals[2]], True, backend=backend)
    with pytest.raises(ValueError, match="share memory"):
        functional.restore_orthogonal_(params, backups, grads, orthogonals[:2] + [grads[2]], True, backend=backend)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        functional.add_orthogonal_(grads, orthogonals, -0.5, True, backend=backend)
    with pytest.raises(ValueError, match="same length"):
        functional.add_orthogonal_(grads, orthogonals[:2], 0.5, True, backend=backend)
    assert_bitwise_equal(params, theta)
    assert_bitwise_equal(backups, saved_backups)
    assert_bitwise_equal(grads, saved_grads)
