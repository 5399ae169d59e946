"""The Triton backend's ``norms``, ``restore_orthogonal_`` and ``add_orthogonal_`` (issue 15), under Triton's
interpreter on CPU tensors, against the float64 definition (tests/op_definition.py).

Each comparison allows an error derived from the dtypes (:func:`orthogonal_bounds`, :func:`direction_bounds`,
:data:`NORM_RTOL`) and shows that the effect it checks is far larger than that allowance. Where a coefficient is 0
the ops must leave the written list bit for bit (no arithmetic on a NaN/Inf), and ``params`` come back as θ's own
bits. Every kernel specialisation launched here is compiled for sm_90 as well.
"""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from amp_fused import functional
from amp_fused.backends import triton as triton_backend
from amp_fused.triton import metadata, ops
from amp_fused.triton.metadata import CHUNK, SCALE_T_BLOCK, MetadataCache
from op_definition import (ULPS, UNIT, add_orthogonal, assert_bitwise_equal, assert_within, bound_norm,
                           direction_coefficients, moved, random_bits, restore_orthogonal)
from op_definition import norms as norms_definition
from triton_cases import DTYPES, MIXED_DTYPE_CASE, SIZES, clone, recorded_launches

ALPHA = 0.7
# The fp64 sums (per program, per tensor, over all tensors) are fixed trees of a few dozen additions: their error
# relative to the sum of the magnitudes they add, with room to spare (a few dozen roundings of 2^-53).
ACC_RTOL = 2.0**-44
# The returned norms are fp32: one rounding of the fp64 norm (2^-24), plus the fp64 sums.
NORM_RTOL = 2.0**-23


def compute_unit(dtype) -> float:
    """Unit roundoff of the type the kernels compute in: fp64 for fp64 tensors, fp32 for the others."""
    return UNIT[torch.float64] if dtype == torch.float64 else UNIT[torch.float32]


def _dtypes(dtype, n):
    return [dtype] * n if isinstance(dtype, torch.dtype) else list(dtype)


def make_restore_inputs(sizes, dtypes, seed=0):
    """(params, θ, grads): θ and g of unit scale, params = θ + Δ with Δ partly along g (so c is well away from 0)
    and partly not (so g − c·Δ is well away from 0), each rounded to its dtype."""
    dtypes = _dtypes(dtypes, len(sizes))
    gen = torch.Generator().manual_seed(seed)
    theta, params, grads = [], [], []
    for size, dtype in zip(sizes, dtypes):
        t = torch.randn(size, generator=gen, dtype=torch.float64)
        g = torch.randn(size, generator=gen, dtype=torch.float64)
        delta = 0.05 * (torch.randn(size, generator=gen, dtype=torch.float64) + 0.5 * g)
        theta.append(t.to(dtype))
        grads.append(g.to(dtype))
        params.append((t + delta).to(dtype))
    return params, theta, grads


def make_direction_inputs(sizes, dtypes, seed=0):
    """(grads, orthogonals): g of unit scale, v smaller and of another direction."""
    dtypes = _dtypes(dtypes, len(sizes))
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(d) for s, d in zip(sizes, dtypes)]
    orthogonals = [(0.3 * torch.randn(s, generator=gen, dtype=torch.float64)).to(d) for s, d in zip(sizes, dtypes)]
    return grads, orthogonals


def orthogonal_bounds(grads, expected, per_tensor):
    """|orthogonals − definition| allowed, elementwise. The kernels form Δ in the compute type (one rounding, u_c),
    so ⟨Δ,g⟩ is off by u_c·Σ|Δ·g| and ‖Δ‖² by 2u_c·‖Δ‖² (plus the fp64 sums, ACC_RTOL), each tensor with its own
    u_c (global: summed over the list); c = ⟨Δ,g⟩/‖Δ‖² is off by (dot error + |c|·‖Δ‖² error) / ‖Δ‖², which c·Δ
    carries. Then ULPS roundings (Δ, c in the compute type, the product, the difference, the storage type) of the
    terms |g| and |c·Δ|."""
    wide = [g.double() for g in grads]
    rel = [ULPS * compute_unit(g.dtype) + ACC_RTOL for g in grads]
    squares = [float(d.square().sum()) for d in expected.deltas]
    dot_errors = [r * float((d * w).abs().sum()) for r, d, w in zip(rel, expected.deltas, wide)]
    square_errors = [r * sq for r, sq in zip(rel, squares)]
    if not per_tensor:
        n = len(grads)
        squares, dot_errors, square_errors = ([math.fsum(x)] * n for x in (squares, dot_errors, square_errors))
    bounds = []
    for g, w, d, c, square, dot_error, square_error in zip(grads, wide, expected.deltas, expected.coefficients,
                                                            squares, dot_errors, square_errors):
        if c == 0.0:
            bounds.append(torch.zeros_like(w))  # exactly g (checked bitwise as well)
            continue
        c_error = (dot_error + abs(c) * square_error) / square
        bounds.append(ULPS * UNIT[g.dtype] * (w.abs() + abs(c) * d.abs()) + c_error * d.abs())
    return bounds


def direction_bounds(grads, orthogonals, coefficients):
    """|grads − definition| allowed, elementwise: the coefficient's fp64 error (sums of squares, roots, one
    division: ACC_RTOL), then ULPS roundings (coef in the compute type, the product, the sum, the storage type) of
    |g| and |coef·v|."""
    bounds = []
    for g, v, c in zip(grads, orthogonals, coefficients):
        g64, v64 = g.double(), v.double()
        if c == 0.0:
            bounds.append(torch.zeros_like(g64))  # unchanged (checked bitwise as well)
            continue
        bounds.append(ULPS * UNIT[g.dtype] * (g64.abs() + abs(c) * v64.abs()) + ACC_RTOL * abs(c) * v64.abs())
    return bounds


def run_restore_orthogonal(params, theta, grads, per_tensor, **kwargs):
    """Runs the op on copies; returns (params after, orthogonals)."""
    params = clone(params)
    orthogonals = [torch.full_like(g, 123.0) for g in grads]  # every element must be written
    triton_backend.restore_orthogonal_(params, clone(theta), clone(grads), orthogonals, per_tensor, **kwargs)
    return params, orthogonals


def check_restore_orthogonal(params, theta, grads, per_tensor):
    expected = restore_orthogonal(params, theta, grads, per_tensor)
    restored, orthogonals = run_restore_orthogonal(params, theta, grads, per_tensor)
    assert_bitwise_equal(restored, theta, "params")
    for i, c in enumerate(expected.coefficients):
        if c == 0.0:
            assert_bitwise_equal([orthogonals[i]], [grads[i]], f"orthogonals[{i}] (c = 0)")
    bounds = orthogonal_bounds(grads, expected, per_tensor)
    moving = [i for i, c in enumerate(expected.coefficients) if c != 0.0]  # (c ≠ 0: Δ and g are finite)
    assert_within(*([x[i] for i in moving] for x in (orthogonals, expected.orthogonals, bounds)), "orthogonals")
    return expected, orthogonals, bounds


def check_add_orthogonal(grads, orthogonals, per_tensor, alpha=ALPHA):
    expected = add_orthogonal(grads, orthogonals, alpha, per_tensor)
    coefficients = direction_coefficients(grads, orthogonals, alpha, per_tensor)
    result = clone(grads)
    triton_backend.add_orthogonal_(result, clone(orthogonals), alpha, per_tensor)
    for i, c in enumerate(coefficients):
        if c == 0.0:
            assert_bitwise_equal([result[i]], [grads[i]], f"grads[{i}] (coef = 0)")
    bounds = direction_bounds(grads, orthogonals, coefficients)
    moving = [i for i, c in enumerate(coefficients) if c != 0.0]  # (coef ≠ 0: g and v are finite)
    assert_within(*([x[i] for i in moving] for x in (result, expected, bounds)), "grads")
    return result, bounds


def check_norms(tensors):
    result = triton_backend.norms(tensors)
    expected = norms_definition(tensors)
    assert result.dtype == torch.float32 and result.shape == (len(tensors) + 1,)
    assert_within([result], [expected], [NORM_RTOL * expected.abs()], "norms")
    return result


# -- the definition, every dtype, sizes across the chunk boundary -----------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_match_the_definition(dtype):
    tensors = make_direction_inputs(SIZES, dtype)[0]
    check_norms(tensors)


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_orthogonal_matches_the_definition(dtype, per_tensor):
    params, theta, grads = make_restore_inputs(SIZES, dtype)
    expected, orthogonals, bounds = check_restore_orthogonal(params, theta, grads, per_tensor)
    moving = [i for i, c in enumerate(expected.coefficients) if c != 0.0]
    assert len(moving) >= len(SIZES) - 2  # (a 1-element tensor's own Δ may leave nothing orthogonal)
    assert moved(orthogonals, grads) > 10 * bound_norm(bounds)


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_orthogonal_matches_the_definition(dtype, per_tensor):
    grads, orthogonals = make_direction_inputs(SIZES, dtype)
    result, bounds = check_add_orthogonal(grads, orthogonals, per_tensor)
    assert moved(result, grads) > 10 * bound_norm(bounds)


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
def test_mixed_dtype_lists(per_tensor):
    dtypes = [d for d, _ in MIXED_DTYPE_CASE]
    sizes = [s for _, s in MIXED_DTYPE_CASE]
    params, theta, grads = make_restore_inputs(sizes, dtypes, seed=1)
    _, orthogonals, bounds = check_restore_orthogonal(params, theta, grads, per_tensor)
    assert moved(orthogonals, grads) > 10 * bound_norm(bounds)
    grads, orthogonals = make_direction_inputs(sizes, dtypes, seed=2)
    result, bounds = check_add_orthogonal(grads, orthogonals, per_tensor)
    assert moved(result, grads) > 10 * bound_norm(bounds)
    check_norms(grads)


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
def test_many_tensors_and_a_tensor_of_more_chunks_than_a_block(per_tensor):
    """The scale passes reduce SCALE_T_BLOCK tensors × SCALE_C_BLOCK partials at a time: more tensors than one
    block, with a tensor of more chunks than one block in the second block."""
    sizes = [(3 + i % 5,) for i in range(SCALE_T_BLOCK + 3)] + [((ops.SCALE_C_BLOCK + 1) * CHUNK + 1,), (9,)]
    params, theta, grads = make_restore_inputs(sizes, torch.float32, seed=3)
    check_restore_orthogonal(params, theta, grads, per_tensor)
    grads, orthogonals = make_direction_inputs(sizes, torch.float32, seed=4)
    check_add_orthogonal(grads, orthogonals, per_tensor)
    if per_tensor:
        check_norms(grads)


def test_empty_lists_and_tensors_without_elements():
    assert triton_backend.norms([]).tolist() == [0.0]
    triton_backend.restore_orthogonal_([], [], [], [], True)
    triton_backend.add_orthogonal_([], [], ALPHA, True)
    tensors = [torch.zeros(0), torch.tensor([3.0, 4.0])]
    assert triton_backend.norms(tensors).tolist() == [0.0, 5.0, 5.0]
    params, theta, grads = make_restore_inputs([(0,), (CHUNK + 1,)], torch.float32)
    check_restore_orthogonal(params, theta, grads, False)
    grads, orthogonals = make_direction_inputs([(0,), (CHUNK + 1,)], torch.float32)
    check_add_orthogonal(grads, orthogonals, False)


# -- bitwise: params, determinism, NaN/Inf -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_params_come_back_as_thetas_bits_whatever_they_hold(dtype):
    """θ and params of random bits (NaN payloads, infinities, -0.0, subnormals): params ← θ bit for bit; where the
    sums are not finite c is 0 and the orthogonals are g's own bits."""
    gen = torch.Generator().manual_seed(5)
    sizes = [(CHUNK + 3,), (17,)]
    theta = [random_bits(s, dtype, gen) for s in sizes]
    params = [random_bits(s, dtype, gen) for s in sizes]
    grads = [random_bits(s, dtype, gen) for s in sizes]
    for per_tensor in (True, False):
        coefficients = restore_orthogonal(params, theta, grads, per_tensor).coefficients
        assert coefficients[0] == 0.0  # (thousands of random patterns: NaNs among them)
        restored, orthogonals = run_restore_orthogonal(params, theta, grads, per_tensor)
        assert_bitwise_equal(restored, theta, "params")
        for i, c in enumerate(coefficients):
            if c == 0.0:
                assert_bitwise_equal(orthogonals[i:i + 1], grads[i:i + 1], f"orthogonals[{i}]")


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
def test_results_are_bitwise_reproducible(per_tensor):
    dtypes = [d for d, _ in MIXED_DTYPE_CASE] + [torch.float32]
    sizes = [s for _, s in MIXED_DTYPE_CASE] + [(5 * CHUNK + 11,)]
    params, theta, grads = make_restore_inputs(sizes, dtypes, seed=6)
    first = run_restore_orthogonal(params, theta, grads, per_tensor)
    ops.CACHE.clear()  # new tables, the same results
    second = run_restore_orthogonal(params, theta, grads, per_tensor)
    assert_bitwise_equal(first[1], second[1], "orthogonals")
    results = []
    for _ in range(2):
        result = clone(grads)
        triton_backend.add_orthogonal_(result, first[1], ALPHA, per_tensor)
        results.append(result)
    assert_bitwise_equal(results[0], results[1], "grads")
    assert_bitwise_equal([triton_backend.norms(grads)], [triton_backend.norms(clone(grads))], "norms")


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
def test_restore_orthogonal_with_a_non_finite_gradient(per_tensor, bad):
    """A NaN/Inf in g makes ⟨Δ,g⟩ (and so c) non-finite: c = 0 and orthogonals == g bit for bit for that tensor
    (global: for every tensor); the others as the definition has them."""
    sizes = [(CHUNK + 1,), (7,), (2 * CHUNK + 3,)]
    params, theta, grads = make_restore_inputs(sizes, torch.float32, seed=7)
    grads[1][3] = bad
    expected, orthogonals, _ = check_restore_orthogonal(params, theta, grads, per_tensor)
    assert expected.coefficients[1] == 0.0
    if per_tensor:
        assert expected.coefficients[0] != 0.0 and expected.coefficients[2] != 0.0
        assert not torch.equal(orthogonals[0], grads[0]) and not torch.equal(orthogonals[2], grads[2])
    else:
        assert_bitwise_equal(orthogonals, grads, "orthogonals")


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
def test_restore_orthogonal_without_a_perturbation_or_with_a_nan_one(per_tensor):
    """Δ = 0 (params == θ) or a NaN in params: ‖Δ‖² is not > 0, so c = 0 and orthogonals == g; params ← θ."""
    sizes = [(CHUNK + 1,), (7,), (33,)]
    params, theta, grads = make_restore_inputs(sizes, torch.bfloat16, seed=8)
    params[1] = theta[1].clone()
    params[2][5] = math.nan
    expected, orthogonals, _ = check_restore_orthogonal(params, theta, grads, per_tensor)
    assert expected.coefficients[1] == expected.coefficients[2] == 0.0
    assert_bitwise_equal(orthogonals[1:], grads[1:], "orthogonals")
    if per_tensor:
        assert not torch.equal(orthogonals[0], grads[0])
    else:  # the NaN reaches the global sums
        assert_bitwise_equal(orthogonals, grads, "orthogonals")


@pytest.mark.parametrize("case", ["nan_v", "inf_v", "zero_v", "nan_g"])
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
def test_add_orthogonal_leaves_grads_where_the_coefficient_is_not_finite(per_tensor, case):
    """A NaN/Inf in v (‖v‖ not finite), v = 0 (α‖g‖/0) or a NaN in g: coef = 0, and grads keep their bits there
    (global: every tensor); a non-finite v never reaches them."""
    sizes = [(CHUNK + 1,), (7,), (2 * CHUNK + 3,)]
    grads, orthogonals = make_direction_inputs(sizes, torch.float16, seed=9)
    if case == "nan_v":
        orthogonals[1][2] = math.nan
    elif case == "inf_v":
        orthogonals[1][2] = math.inf
    elif case == "zero_v":
        orthogonals[1].zero_()
    else:
        grads[1][4] = math.nan
    result, _ = check_add_orthogonal(grads, orthogonals, per_tensor)
    assert_bitwise_equal(result[1:2], grads[1:2], "grads")
    if per_tensor or case == "zero_v":  # v = 0 in one tensor leaves the global ‖v‖ finite and not 0
        assert not torch.equal(result[0], grads[0]) and not torch.equal(result[2], grads[2])
    else:
        assert_bitwise_equal(result, grads, "grads")


def test_add_orthogonal_with_alpha_zero_writes_nothing():
    grads, orthogonals = make_direction_inputs(SIZES, torch.float32)
    orthogonals[0][0] = math.nan
    for per_tensor in (True, False):
        result = clone(grads)
        triton_backend.add_orthogonal_(result, orthogonals, 0.0, per_tensor)
        assert_bitwise_equal(result, grads, "grads")


def test_norms_of_non_finite_and_of_large_finite_tensors():
    """NaN/Inf give NaN/Inf norms (that tensor's and the total); finite values whose squares overflow fp32 do not
    overflow the norm (fp64 sums)."""
    big = [torch.full((3,), 1e38, dtype=torch.bfloat16), torch.full((CHUNK + 1,), 6e4, dtype=torch.float16),
           torch.full((2,), 1e38)]
    check_norms(big)
    result = triton_backend.norms([torch.tensor([1.0, math.nan]), torch.tensor([2.0]), torch.tensor([math.inf])])
    assert math.isnan(result[0]) and result[1] == 2.0 and result[2] == math.inf and math.isnan(result[3])


# -- the host side: held lists, the op layer, both host paths, launches -----------------------------------------
def test_held_lists_give_the_same_bits():
    sizes = [(CHUNK + 5,), (7,), (3, 5)]
    params, theta, grads = make_restore_inputs(sizes, torch.float32, seed=10)
    plain = run_restore_orthogonal(params, theta, grads, True)
    held_params, held_theta = clone(params), clone(theta)
    held = triton_backend.hold(held_params, held_theta)
    orthogonals = [torch.empty_like(g) for g in grads]
    triton_backend.restore_orthogonal_(held, held_theta, grads, orthogonals, True)
    assert_bitwise_equal(list(held), theta, "params")
    assert_bitwise_equal(orthogonals, plain[1], "orthogonals")
    # a list held as the layout's list of add_orthogonal_ (its own table, whatever the op calls it)
    grads_copy = clone(grads)
    held_grads = triton_backend.hold(grads_copy, orthogonals)
    triton_backend.add_orthogonal_(held_grads, orthogonals, ALPHA, False)
    expected = clone(grads)
    triton_backend.add_orthogonal_(expected, orthogonals, ALPHA, False)
    assert_bitwise_equal(grads_copy, expected, "grads")
    assert_bitwise_equal([triton_backend.norms(held)], [triton_backend.norms(theta)], "norms")


def test_the_op_layer_checks_the_contract_before_writing():
    params, theta, grads = make_restore_inputs([(5,), (3,)], torch.float32)
    orthogonals = [torch.zeros(5), torch.zeros(4)]
    snapshot = clone(params), clone(orthogonals)
    with pytest.raises(ValueError, match=r"amp_fused\.restore_orthogonal_: orthogonals\[1\]"):
        functional.restore_orthogonal_(params, theta, grads, orthogonals, backend="triton")
    assert_bitwise_equal(params, snapshot[0], "params")
    assert_bitwise_equal(orthogonals, snapshot[1], "orthogonals")
    with pytest.raises(ValueError, match=r"amp_fused\.add_orthogonal_: alpha must be a finite number >= 0"):
        functional.add_orthogonal_(grads, grads, -1.0, backend="triton")
    with pytest.raises(ValueError, match=r"amp_fused\.restore_orthogonal_: .*share"):
        functional.restore_orthogonal_(params, theta, grads, [params[0].view(5), torch.zeros(3)], backend="triton")
    # and through the op layer the results are the backend's
    orthogonals = [torch.empty(5), torch.empty(3)]
    restored = clone(params)
    functional.restore_orthogonal_(restored, theta, grads, orthogonals, False, backend="triton")
    assert_bitwise_equal(orthogonals, run_restore_orthogonal(params, theta, grads, False)[1], "orthogonals")
    assert_bitwise_equal([functional.norms(grads, backend="triton")], [triton_backend.norms(grads)], "norms")


@pytest.mark.parametrize("host_path", ["native", "python"])
def test_both_host_paths_bump_each_written_tensor_once_and_agree(monkeypatch, host_path):
    """The C++ host passes of amp_fused._C (metadata.native()) and the Python ones give the same bits and bump each
    written tensor's version once per call."""
    if host_path == "native":
        module = metadata.native()
        if module is None:
            pytest.skip("amp_fused._C is not loaded or lacks the host helpers")
        monkeypatch.setattr(metadata, "_native", module)
    else:
        monkeypatch.setattr(metadata, "_native", None)
    monkeypatch.setattr(ops, "CACHE", MetadataCache())
    sizes = [(CHUNK + 5,), (7,), (3, 5)]
    params, theta, grads = make_restore_inputs(sizes, torch.float32, seed=11)
    orthogonals = [torch.empty_like(g) for g in grads]
    versions = lambda *lists: [[t._version for t in ts] for ts in lists]  # noqa: E731
    before = versions(params, theta, grads, orthogonals)
    triton_backend.restore_orthogonal_(params, theta, grads, orthogonals, True)
    after = versions(params, theta, grads, orthogonals)
    assert [[a - b for a, b in zip(x, y)] for x, y in zip(after, before)] == [[1] * 3, [0] * 3, [0] * 3, [1] * 3]
    before = versions(grads, orthogonals)
    triton_backend.add_orthogonal_(grads, orthogonals, ALPHA, True)
    after = versions(grads, orthogonals)
    assert [[a - b for a, b in zip(x, y)] for x, y in zip(after, before)] == [[1] * 3, [0] * 3]
    before = versions(grads)
    triton_backend.norms(grads)
    assert versions(grads) == before
    expected_params, expected_theta, expected_grads = make_restore_inputs(sizes, torch.float32, seed=11)
    _, expected_orthogonals = run_restore_orthogonal(expected_params, expected_theta, expected_grads, True)
    assert_bitwise_equal(orthogonals, expected_orthogonals, "orthogonals")
    assert_bitwise_equal(params, theta, "params")


def test_launches_per_call():
    """norms G + 1, restore_orthogonal_ and add_orthogonal_ 2G + 1 launches for G dtype groups (ops.py)."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    sizes = [(CHUNK + 1,), (7,), (5,), (3,)]
    params, theta, grads = make_restore_inputs(sizes, dtypes)
    with recorded_launches() as launches:
        triton_backend.norms(grads)
        names = [name for name, *_ in launches]
        assert names == ["perturb_sumsq_kernel"] * 3 + ["perturb_scale_kernel"]
        assert [b.get("SCALES") for name, b, _, _ in launches if name == "perturb_scale_kernel"] == [False]
        del launches[:]
        triton_backend.restore_orthogonal_(clone(params), theta, grads, [torch.empty_like(g) for g in grads], True)
        assert [name for name, *_ in launches] == (["pair_sums_kernel"] * 3 + ["pair_scale_kernel"]
                                                   + ["restore_orthogonal_kernel"] * 3)
        del launches[:]
        triton_backend.add_orthogonal_(clone(grads), grads, ALPHA, False)
        assert [name for name, *_ in launches] == (["pair_sums_kernel"] * 3 + ["pair_scale_kernel"]
                                                   + ["add_orthogonal_kernel"] * 3)


# -- sm_90 ------------------------------------------------------------------------------------------------------
def _launched_specifications():
    from test_triton_compile import _specification

    with recorded_launches() as launches:
        for dtype in DTYPES:
            for per_tensor in (True, False):
                params, theta, grads = make_restore_inputs([(CHUNK + 3,), (5,)], dtype)
                run_restore_orthogonal(params, theta, grads, per_tensor)
                grads, orthogonals = make_direction_inputs([(CHUNK + 3,), (5,)], dtype)
                triton_backend.add_orthogonal_(grads, orthogonals, ALPHA, per_tensor)
            triton_backend.norms(grads)
    specs = {json.dumps(_specification(name, bound, options), sort_keys=True) for name, bound, options, _ in launches}
    return [json.loads(s) for s in sorted(specs)]


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="this triton install has no NVIDIA backend to compile for")
def test_every_specialisation_launched_here_compiles_for_sm90(tmp_path):
    from test_triton_compile import assert_compiles_for_sm90

    specs = _launched_specifications()
    count = {}
    for s in specs:
        count[s["kernel"]] = count.get(s["kernel"], 0) + 1
    # pair sums: 2 modes × 4 dtypes; pair scale: 2 modes × per_tensor/global; applies: 4 dtypes each; norms:
    # perturb_'s first-ascent sums of squares (4 dtypes) and its scale pass without the scales
    assert count == {"pair_sums_kernel": 8, "pair_scale_kernel": 4, "restore_orthogonal_kernel": 4,
                     "add_orthogonal_kernel": 4, "perturb_sumsq_kernel": 4, "perturb_scale_kernel": 1}
    assert_compiles_for_sm90(specs, tmp_path)
