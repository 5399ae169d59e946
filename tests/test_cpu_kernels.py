"""The C++ CPU kernels (backend "cpu") against float64 torch math, the reference and foreach backends,
and torch.optim.SGD: every dtype, chunk-boundary sizes, 1 to 300 tensors, non-finite and zero gradients,
bitwise determinism across thread counts, and argument checking."""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import amp_fused
from amp_fused import _extension, backends
from amp_fused.backends import cpu, foreach, reference

CHUNK = 1 << 16  # csrc/cpu/multi_tensor.h kChunkSize
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Unit roundoff of each storage dtype: a correctly rounded result is within one of these (relative).
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Relative error allowed on a norm: sums of squares in fp32 over up to a chunk per lane, fp64 for fp64.
NORM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# Sizes around the chunk boundary, 0-d and empty, and a tensor of several chunks.
EDGE_SHAPES = [(1,), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (), (0,), (2, 0, 3), (3, CHUNK + 11)]


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def make_lists(shapes, dtypes, seed=0, param_scale=0.01):
    """Small parameters (as trained weights are) and unit gradients, so Δ dominates θ + Δ."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    gen = torch.Generator().manual_seed(seed)
    params = [(param_scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(d) for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(d) for s, d in zip(shapes, dtypes)]
    return params, grads


def clones(tensors):
    return [t.clone() for t in tensors]


def bits(t):
    """The tensor's raw bits, so that comparisons are bitwise (NaN payloads, -0.0 included)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bitwise_equal(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        assert torch.equal(bits(a), bits(e)), f"tensor {i} differs"


class Ascent(NamedTuple):
    params: list  # θ + scale·Δ, rounded once to each dtype
    backups: list  # θ
    norms: torch.Tensor  # float64: per tensor, then over all
    bounds: list  # allowed error of each new parameter, for the ``ulps`` given


def direct_ascent(params, grads, backups, epsilon, inner_lr, per_tensor, first, ulps=2, norm_rtol=None):
    """One ascent from the definition, in float64 from the stored values.

    The error bound of an element: ``ulps`` roundings of each term that enters it (θ, scale·Δ_old,
    scale·ζg), plus the relative error of the norm that sets its scale, which scale·Δ inherits: sums in
    fp32 (fp64 for fp64 tensors) unless ``norm_rtol`` says otherwise; the global norm mixes all dtypes."""
    theta = [(p if first else b).double() for p, b in zip(params, backups)]
    old = [torch.zeros_like(t) if first else p.double() - b.double() for t, p, b in zip(theta, params, backups)]
    step = [inner_lr * g.double() for g in grads]
    delta = [o + z for o, z in zip(old, step)]
    sums = [float((d * d).sum()) for d in delta]
    total = math.sqrt(sum(sums))
    norms = [math.sqrt(s) for s in sums]
    if norm_rtol is None:
        rtols = [NORM_RTOL[p.dtype] for p in params]
        norm_rtols = rtols if per_tensor else [max(rtols, default=0.0)] * len(params)
    else:
        norm_rtols = [norm_rtol] * len(params)
    new, bounds = [], []
    for t, o, z, d, n, p, rtol in zip(theta, old, step, delta, norms, params, norm_rtols):
        governing = n if per_tensor else total
        scale = min(1.0, epsilon / (governing + 1e-12)) if math.isfinite(governing) else 0.0
        new.append((t + scale * d).to(p.dtype) if scale else t.to(p.dtype))
        terms = t.abs() + scale * (o.abs() + z.abs()) if scale else t.abs()
        bounds.append(ulps * UNIT[p.dtype] * terms + rtol * scale * d.abs())
    return Ascent(new, [t.to(p.dtype) for t, p in zip(theta, params)],
                  torch.tensor(norms + [total], dtype=torch.float64), bounds)


def direct_ascents(params, grad_lists, epsilon, inner_lr, per_tensor, ulps, norm_rtol=None):
    """direct_ascent repeated, one ascent per gradient list. The bounds add up over the ascents: an error in
    the parameters after one ascent enters the next one's Δ, scaled by at most 1."""
    backups = params
    result = None
    for k, grads in enumerate(grad_lists):
        ascent = direct_ascent(params if k == 0 else result.params, grads, backups, epsilon, inner_lr, per_tensor,
                               k == 0, ulps, norm_rtol)
        bounds = ascent.bounds if result is None else [a + b for a, b in zip(result.bounds, ascent.bounds)]
        result = ascent._replace(bounds=bounds)
    return result


def assert_within(actual, expected, bounds):
    """|actual − expected| ≤ bound, elementwise, compared in float64."""
    for i, (a, e, b) in enumerate(zip(actual, expected, bounds, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        if a.numel() == 0:
            continue
        excess = ((a.double() - e.double()).abs() - b - torch.finfo(a.dtype).tiny).max().item()
        assert excess <= 0, f"tensor {i} ({a.dtype}, shape {tuple(a.shape)}) is off by {excess} beyond its bound"


def bound_norm(bounds):
    """The L2 norm of an error envelope, to show that a movement is far larger than what a test allows."""
    return math.sqrt(sum(float((b**2).sum()) for b in bounds))


def moved(after, before):
    return math.sqrt(sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(after, before)))


def run_ascents(ops, params, grad_lists, epsilon, inner_lr, per_tensor):
    """params, backups and the norms of each ascent after len(grad_lists) ascents with backend ``ops``."""
    params = clones(params)
    backups = [torch.empty_like(p) for p in params]
    norms = [ops.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, k == 0)
             for k, grads in enumerate(grad_lists)]
    return params, backups, norms


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_extension_is_built_and_picked():
    assert _extension.cpu_error is None, _extension.cpu_error
    assert _extension.fake_error is None, _extension.fake_error
    assert cpu.unavailable_reason() is None
    assert "cpu" in amp_fused.available_backends("cpu")
    assert backends.resolve("auto", "cpu") is cpu
    # "cpu" never claims CUDA tensors, and without the CUDA build the reason names the missing extension.
    assert "cuda" not in cpu.DEVICE_TYPES
    if _extension.cuda_error is not None:
        assert "amp_fused._C_cuda" in _extension.cuda_error


def test_a_broken_extension_is_recorded_not_raised():
    # A fresh interpreter in which loading amp_fused._C fails as a stale or mismatched binary would.
    script = """if True:
        import importlib
        real_import = importlib.import_module
        def import_module(name, *args, **kwargs):
            if name == "amp_fused._C":
                raise ImportError("undefined symbol: _ZN3c104impl")
            return real_import(name, *args, **kwargs)
        importlib.import_module = import_module
        from amp_fused import _extension, backends
        print(_extension.cpu_error)
        print(_extension.fake_error)
        print(backends.unavailable_reason("cpu"))
    """
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    cpu_error, fake_error, reason = result.stdout.strip().splitlines()[-3:]
    assert "amp_fused._C failed to import" in cpu_error and "undefined symbol" in cpu_error
    assert "the ops are not defined" in fake_error
    assert reason == cpu_error


def test_setup_rejects_an_unknown_cpu_arch():
    env = dict(os.environ, AMP_FUSED_CPU_ARCH="avx512", AMP_FUSED_CUDA="0")
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=Path(__file__).resolve().parents[1],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "AMP_FUSED_CPU_ARCH must be one of 'avx2', 'default' or unset, got 'avx512'" in result.stderr


# -- perturb_ -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_perturb_matches_direct_math(dtype, per_tensor):
    params, grads = make_lists(EDGE_SHAPES, dtype, seed=1)
    grads2 = make_lists(EDGE_SHAPES, dtype, seed=2)[1]
    epsilon, inner_lr = 40.0, 0.5  # ‖ζg‖ is ~0.5 for size 1, ~128 near a chunk, ~222 for 3 chunks
    theta = clones(params)
    backups = [torch.empty_like(p) for p in params]

    norms = cpu.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, True)
    expected, _, expected_norms, bounds = direct_ascent(theta, grads, theta, epsilon, inner_lr, per_tensor, True)
    assert norms.dtype == torch.float32 and norms.device.type == "cpu" and norms.shape == (len(params) + 1,)
    assert_within(params, expected, bounds)
    assert_bitwise_equal(backups, theta)  # θ saved as is
    torch.testing.assert_close(norms.double(), expected_norms, rtol=1e-5, atol=0)
    assert moved(params, theta) > 10 * bound_norm(bounds)
    if per_tensor:  # the case mixes projected and unprojected tensors
        assert expected_norms[0] < epsilon < expected_norms[-2]
        torch.testing.assert_close(moved(params[-1:], theta[-1:]), epsilon, rtol=1e-2, atol=0)

    # A later ascent: Δ = (params − backups) + ζ·g, projected around the saved θ.
    first = clones(params)
    norms = cpu.perturb_(params, grads2, backups, epsilon, inner_lr, per_tensor, False)
    expected, _, expected_norms, bounds = direct_ascent(first, grads2, theta, epsilon, inner_lr, per_tensor, False)
    assert_within(params, expected, bounds)
    assert_bitwise_equal(backups, theta)
    torch.testing.assert_close(norms.double(), expected_norms, rtol=1e-5, atol=0)
    assert moved(params, first) > 10 * bound_norm(bounds)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_perturb_couple_of_million_values(dtype):
    shapes = [(1_000_003, 2), (5,)]
    params, grads = make_lists(shapes, dtype, seed=19)
    for per_tensor, epsilon in ((True, 300.0), (False, 3.0)):  # ‖ζg‖ ≈ 707 for the big tensor
        p, b = clones(params), [torch.empty_like(x) for x in params]
        norms = cpu.perturb_(p, grads, b, epsilon, 0.5, per_tensor, True)
        expected, _, expected_norms, bounds = direct_ascent(params, grads, params, epsilon, 0.5, per_tensor, True)
        assert_within(p, expected, bounds)
        assert_bitwise_equal(b, params)
        torch.testing.assert_close(norms.double(), expected_norms, rtol=1e-5, atol=0)
        assert moved(p, params) > 10 * bound_norm(bounds)


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_perturb_matches_reference_and_foreach(dtype, per_tensor):
    params, grads = make_lists(EDGE_SHAPES, dtype, seed=3)
    grad_lists = [grads, make_lists(EDGE_SHAPES, dtype, seed=4)[1]]
    epsilon, inner_lr = 30.0, 0.5
    state = {ops.NAME: (ops, clones(params), [torch.empty_like(p) for p in params])
             for ops in (cpu, foreach, reference)}
    for ascent in range(len(grad_lists)):
        norms = {name: ops.perturb_(p, grad_lists[ascent], b, epsilon, inner_lr, per_tensor, ascent == 0)
                 for name, (ops, p, b) in state.items()}
        _, p_cpu, b_cpu = state["cpu"]
        # The other backends round Δ, ζg and scale·Δ to the storage dtype in separate ops (and the reference
        # subtracts Δ_old back): a few roundings of each term apart, plus both sides' norm errors (theirs are
        # fp32 sums for every dtype).
        bounds = [2 * b for b in direct_ascents(params, grad_lists[:ascent + 1], epsilon, inner_lr, per_tensor, 4,
                                                1e-5).bounds]
        for name in ("foreach", "reference"):
            assert_within(p_cpu, state[name][1], bounds)
            # fp32 sums in different orders, Δ rounded to the dtype or not
            torch.testing.assert_close(norms["cpu"], norms[name], rtol=max(8 * UNIT[dtype], 1e-5), atol=0)
        assert_bitwise_equal(b_cpu, state["foreach"][2])  # both hold θ (reference keeps Δ there)
        assert moved(p_cpu, params) > 10 * bound_norm(bounds)


@pytest.mark.parametrize("count", [1, 2, 37, 300])
def test_many_tensors_of_mixed_dtypes(count):
    gen = torch.Generator().manual_seed(count)
    shapes = [(int(n),) for n in torch.randint(0, 5000, (count,), generator=gen)]
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(count)]
    params, grads = make_lists(shapes, dtypes, seed=count)
    grads2 = make_lists(shapes, dtypes, seed=count + 1)[1]
    for per_tensor in (True, False):
        epsilon = 3.0 if per_tensor else 3.0 * math.sqrt(count)
        p_cpu, b_cpu, n_cpu = run_ascents(cpu, params, [grads, grads2], epsilon, 0.5, per_tensor)
        p_fe, b_fe, n_fe = run_ascents(foreach, params, [grads, grads2], epsilon, 0.5, per_tensor)
        # Direct math for the second ascent, from the first one's result.
        p_first, _, _ = run_ascents(cpu, params, [grads], epsilon, 0.5, per_tensor)
        expected, _, expected_norms, bounds = direct_ascent(p_first, grads2, params, epsilon, 0.5, per_tensor, False)
        assert_within(p_cpu, expected, bounds)
        torch.testing.assert_close(n_cpu[1].double(), expected_norms, rtol=1e-5, atol=0)
        foreach_bounds = [2 * b for b in direct_ascents(params, [grads, grads2], epsilon, 0.5, per_tensor, 4, 1e-5)
                          .bounds]
        assert_within(p_cpu, p_fe, foreach_bounds)
        assert_bitwise_equal(b_cpu, b_fe)
        assert_bitwise_equal(b_cpu, params)
        assert moved(p_cpu, params) > 10 * bound_norm(foreach_bounds)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_non_finite_gradient_never_reaches_params(dtype, bad, first):
    shapes = [(CHUNK + 5,), (2 * CHUNK + 17,), (40,)]
    params, grads = make_lists(shapes, dtype, seed=5)
    grads2 = make_lists(shapes, dtype, seed=6)[1]
    theta = clones(params)
    broken = 1
    for per_tensor in (True, False):
        p = clones(params)
        b = [torch.empty_like(x) for x in p]
        if not first:  # a finite first ascent, then the broken gradient
            cpu.perturb_(p, grads, b, 20.0, 0.5, per_tensor, True)
        bad_grads = clones(grads if first else grads2)
        bad_grads[broken][2 * CHUNK + 3] = bad  # inside the third chunk of the tensor
        before = clones(p)
        norms = cpu.perturb_(p, bad_grads, b, 20.0, 0.5, per_tensor, first)
        assert all(torch.isfinite(x).all() for x in p)
        assert_bitwise_equal(b, theta)
        assert not math.isfinite(norms[broken]) and not math.isfinite(norms[-1])
        if per_tensor:
            assert torch.equal(bits(p[broken]), bits(theta[broken]))  # exactly θ, for this tensor only
            for i in (0, 2):
                assert math.isfinite(norms[i])
                assert moved([p[i]], [before[i]]) > 1e-2  # the healthy tensors still ascend
        else:
            assert_bitwise_equal(p, theta)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_zero_gradients_and_zero_epsilon_keep_theta_exactly(dtype):
    shapes = [(CHUNK + 1,), (), (0,), (17, 3)]
    params, grads = make_lists(shapes, dtype, seed=6)
    zeros = [torch.zeros_like(g) for g in grads]
    for per_tensor, first in itertools.product((True, False), (True, False)):
        p, b = clones(params), clones(params)
        norms = cpu.perturb_(p, zeros, b, 0.1, 1.0, per_tensor, first)  # ‖Δ‖ = 0: no 0/0 anywhere
        assert_bitwise_equal(p, params)
        assert torch.equal(norms, torch.zeros(len(shapes) + 1))
        norms = cpu.perturb_(p, grads, b, 0.0, 1.0, per_tensor, first)  # ε = 0
        assert_bitwise_equal(p, params)
        assert (norms[:-1] > 0).sum() == 3 and norms[-1] > 0  # every non-empty tensor has a gradient


def test_norms_accumulate_in_float32_and_float64():
    # fp16: 1000² overflows fp16 but not fp32. fp64: 1e-25² underflows fp32 but not fp64.
    n = 3 * CHUNK + 1
    for dtype, value in ((torch.float16, 1000.0), (torch.float64, 1e-25)):
        g = torch.full((n,), value, dtype=dtype)
        p = torch.zeros(n, dtype=dtype)
        norms = cpu.perturb_([p], [g], [torch.empty_like(p)], 1e30, 1.0, True, True)
        expected = float(g[0]) * math.sqrt(n)
        assert norms[0].item() == pytest.approx(expected, rel=1e-5), dtype


def test_empty_lists():
    assert torch.equal(cpu.perturb_([], [], [], 0.1, 1.0, True, True), torch.zeros(1))
    cpu.restore_([], [])
    cpu.restore_sgd_([], [], [], [], 0.1, 0.9, 0.0, 0.0, False, False, True)


def test_dense_non_contiguous_layouts():
    # channels_last and a permuted layout are dense: handled like contiguous tensors, element for element.
    shapes = [(8, 3, 5, 5), (4, 1, 3, 3), (6, 7)]
    params, grads = make_lists(shapes, torch.float32, seed=7)
    params[0] = params[0].to(memory_format=torch.channels_last)
    grads[0] = grads[0].to(memory_format=torch.channels_last)
    params[1] = params[1].to(memory_format=torch.channels_last)  # size-1 dim: strides differ, order does not
    params[2], grads[2] = params[2].t().contiguous().t(), grads[2].t().contiguous().t()
    assert not params[0].is_contiguous() and not params[2].is_contiguous()
    p_cpu, b_cpu, _ = run_ascents(cpu, params, [grads], 2.0, 0.5, True)
    expected, _, _, bounds = direct_ascent(params, grads, params, 2.0, 0.5, True, True)
    assert_within(p_cpu, expected, bounds)
    assert_bitwise_equal(b_cpu, params)
    assert p_cpu[0].is_contiguous(memory_format=torch.channels_last)
    assert p_cpu[2].stride() == params[2].stride()
    assert moved(p_cpu, params) > 10 * bound_norm(bounds)


# -- restore_ and restore_sgd_ --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_is_bit_exact(dtype):
    params, grads = make_lists(EDGE_SHAPES, dtype, seed=8)
    theta = clones(params)
    # A NaN with a payload and a -0.0 in θ: saved and restored as bits, not as values.
    payload_nan = {torch.float64: 0x7FF8_0000_0000_1234, torch.float32: 0x7FC0_1234, torch.float16: 0x7E12,
                   torch.bfloat16: 0x7FD2}[dtype]
    bits(theta[3])[7] = payload_nan
    theta[3][9] = -0.0
    p = clones(theta)
    backups = [torch.empty_like(x) for x in p]
    cpu.perturb_(p, grads, backups, 5.0, 1.0, True, True)
    assert_bitwise_equal(backups, theta)
    assert moved(p[:3], theta[:3]) > 1.0
    cpu.restore_(p, backups)
    assert_bitwise_equal(p, theta)


SGD_FLAGS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product((0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 1e-2), (False, True))
    if not (n and (m == 0 or d != 0))  # torch.optim.SGD: nesterov needs momentum and no dampening
]


def sgd_id(flags):
    return (f"mom{flags['momentum']}-damp{flags['dampening']}-wd{flags['weight_decay']}"
            + "-nesterov" * flags["nesterov"] + "-maximize" * flags["maximize"])


def sgd_step_bounds(theta, grads, old_buffers, new_buffers, lr, flags, first_step, ulps):
    """Allowed error of one SGD step on parameters and buffers: torch rounds every intermediate (d_p,
    buf·m, the sums) to the storage dtype, so ``ulps`` unit roundoffs of the sum of their magnitudes."""
    m, wd = flags["momentum"], flags["weight_decay"]
    param_bounds, buffer_bounds = [], []
    for i, (t, g) in enumerate(zip(theta, grads)):
        t, g = t.double().abs(), g.double().abs()
        d_p = g + wd * t
        if m:
            new = new_buffers[i].double().abs()
            old = 0 if first_step else m * old_buffers[i].double().abs()
            buffer_terms = old + 2 * d_p + new
            update_terms = buffer_terms + d_p + m * new
        else:
            buffer_terms, update_terms = 0 * t, 2 * d_p
        param_bounds.append(ulps * UNIT[theta[i].dtype] * (t + lr * update_terms))
        buffer_bounds.append(ulps * UNIT[theta[i].dtype] * buffer_terms)
    return param_bounds, buffer_bounds


def check_restore_sgd_against_torch_sgd(flags, dtype, shapes):
    theta, _ = make_lists(shapes, dtype, seed=9, param_scale=1.0)
    lr = 1.0  # an update as large as θ, far above the rounding of either
    reference_params = [t.clone().requires_grad_() for t in theta]
    sgd = torch.optim.SGD(reference_params, lr=lr, **flags)
    buffers = [torch.full_like(t, math.nan) for t in theta]  # the first step must not read them
    for step in range(3):
        # Both sides start each step from the same θ and buffers (the kernel's), so each step is checked
        # on its own, the first one (buffers initialised to d_p) included.
        with torch.no_grad():
            for ref, t in zip(reference_params, theta):
                ref.copy_(t)
            for ref, buf in zip(reference_params, buffers if step and flags["momentum"] else []):
                sgd.state[ref]["momentum_buffer"].copy_(buf)
        old_buffers = clones(buffers)
        grads = make_lists(shapes, dtype, seed=10 + step)[1]
        perturbed = [t + 0.5 for t in theta]  # restore_sgd_ overwrites the perturbed parameters
        cpu.restore_sgd_(perturbed, theta, grads, buffers if flags["momentum"] else [], lr, flags["momentum"],
                         flags["dampening"], flags["weight_decay"], flags["nesterov"], flags["maximize"], step == 0)
        for p, g in zip(reference_params, grads):
            p.grad = g.clone()
        sgd.step()
        expected = [p.detach() for p in reference_params]
        expected_buffers = [sgd.state[p]["momentum_buffer"] for p in reference_params] if flags["momentum"] else []
        param_bounds, buffer_bounds = sgd_step_bounds(theta, grads, old_buffers, expected_buffers, lr, flags,
                                                      step == 0, ulps=3)
        assert_within(perturbed, expected, param_bounds)
        assert moved(perturbed, theta) > 10 * bound_norm(param_bounds)
        if flags["momentum"]:
            assert_within(buffers, expected_buffers, buffer_bounds)
            assert moved(buffers, old_buffers if step else [0 * b for b in buffers]) > 10 * bound_norm(buffer_bounds)
        else:
            assert all(torch.isnan(b).all() for b in buffers)
        theta = perturbed


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("flags", SGD_FLAGS, ids=sgd_id)
def test_restore_sgd_matches_torch_sgd(flags, dtype):
    check_restore_sgd_against_torch_sgd(flags, dtype, [(517,), (), (0,), (5, 7)])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_sgd_matches_torch_sgd_over_chunks(dtype):
    flags = dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-2, maximize=False)
    check_restore_sgd_against_torch_sgd(flags, dtype, [(CHUNK - 1,), (2 * CHUNK + 3,), (7,)])
    flags = dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=True)
    check_restore_sgd_against_torch_sgd(flags, dtype, [(CHUNK + 1,), (3,)])


def test_restore_sgd_without_momentum_ignores_buffers():
    params, grads = make_lists([(CHUNK + 1,), (9,)], torch.float32, seed=11)
    backups = clones(params)
    buffers = [torch.full_like(p, 7.0) for p in params]
    out_a, out_b = clones(params), clones(params)
    cpu.restore_sgd_(out_a, backups, grads, [], 0.1, 0.0, 0.0, 0.0, False, False, False)
    cpu.restore_sgd_(out_b, backups, grads, buffers, 0.1, 0.0, 0.0, 0.0, False, False, False)
    assert_bitwise_equal(out_a, out_b)
    assert all(torch.equal(b, torch.full_like(b, 7.0)) for b in buffers)
    expected = [b - 0.1 * g for b, g in zip(backups, grads)]
    torch.testing.assert_close(out_a, expected, rtol=1e-6, atol=1e-7)


# -- determinism ----------------------------------------------------------------------------------------------
def test_bitwise_identical_across_runs_and_thread_counts(restore_threads):
    shapes = [(5 * CHUNK + 123,), (1_500_000,), (3, CHUNK + 7), (11,), ()]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
    params, grads = make_lists(shapes, dtypes, seed=12)
    grads2 = make_lists(shapes, dtypes, seed=13)[1]
    buffers0 = make_lists(shapes, dtypes, seed=14)[1]

    def one_step(per_tensor):
        p, b, m = clones(params), [torch.empty_like(x) for x in params], clones(buffers0)
        n1 = cpu.perturb_(p, grads, b, 100.0, 1.0, per_tensor, True)
        n2 = cpu.perturb_(p, grads2, b, 100.0, 1.0, per_tensor, False)
        perturbed = clones(p)
        cpu.restore_sgd_(p, b, grads2, m, 0.1, 0.9, 0.0, 5e-4, True, False, False)
        return [n1, n2] + perturbed + p + m

    for per_tensor in (True, False):
        runs = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            runs.append(one_step(per_tensor))
        for run in runs[1:]:
            assert_bitwise_equal(run, runs[0])
        # ... and they are the right norms, not some trivially reproducible value.
        naive = math.sqrt(sum(float((0.0 + g.float() ** 2).sum()) for g in grads))
        assert runs[0][0][-1].item() == pytest.approx(naive, rel=1e-5)


# -- argument checking ----------------------------------------------------------------------------------------
def _valid_lists(n=3):
    params, grads = make_lists([(CHUNK + 2,)] * n, torch.float32, seed=15)
    return {"params": params, "grads": grads, "backups": [torch.empty_like(p) for p in params],
            "momentum_buffers": clones(grads)}


def _call(op, lists):
    if op == "perturb_":
        cpu.perturb_(lists["params"], lists["grads"], lists["backups"], 0.5, 1.0, True, True)
    elif op == "restore_":
        cpu.restore_(lists["params"], lists["backups"])
    else:
        cpu.restore_sgd_(lists["params"], lists["backups"], lists["grads"], lists["momentum_buffers"], 0.1, 0.9,
                         0.0, 0.0, False, False, False)


def _replace_last(names, make):
    """Replaces the last tensor of each list in ``names`` with make(that tensor, the lists)."""
    def apply(lists):
        for name in names:
            lists[name][-1] = make(lists[name][-1], lists)
    return apply


_ALL_LISTS = ("params", "grads", "backups", "momentum_buffers")
# (what, how, the error it must raise). Each breaks only the last index, after valid ones, so a kernel that
# checked as it went would already have written something.
_BREAKAGES = [
    ("length", lambda lists: lists["backups"].pop(), r"backups has 2 tensors but params has 3"),
    ("shape", _replace_last(["backups"], lambda t, _: torch.empty(CHUNK + 1)), r"backups\[2\] has shape"),
    ("dtype", _replace_last(["backups"], lambda t, _: t.double()), r"backups\[2\] has dtype Double"),
    ("unsupported_dtype", _replace_last(_ALL_LISTS, lambda t, _: t.long()),
     r"params\[2\] has dtype Long; supported dtypes are float32, float64, float16 and bfloat16"),
    ("strided_view", _replace_last(_ALL_LISTS, lambda t, _: torch.empty(2 * t.numel())[::2]),
     r"params\[2\] .* does not fill a dense block of memory"),
    ("aliasing", _replace_last(["backups"], lambda t, lists: lists["params"][-1]),
     r"params\[2\] and backups\[2\] share memory"),
]


@pytest.mark.parametrize("op", ["perturb_", "restore_", "restore_sgd_"])
@pytest.mark.parametrize("breakage", _BREAKAGES, ids=lambda b: b[0])
def test_bad_input_raises_before_writing(op, breakage):
    _, break_lists, message = breakage
    lists = _valid_lists()
    break_lists(lists)
    snapshot = {name: clones(tensors) for name, tensors in lists.items()}
    with pytest.raises(RuntimeError, match=message):
        _call(op, lists)
    for name in lists:
        assert_bitwise_equal(lists[name], snapshot[name])


def test_layout_mismatch_between_lists_raises():
    params = [torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)]
    grads = [torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)]
    snapshot = clones(params)
    with pytest.raises(RuntimeError, match=r"grads\[1\] .* does not lay out its elements like params\[1\]"):
        cpu.perturb_(params, grads, [torch.empty_like(p) for p in params], 0.5, 1.0, True, True)
    assert_bitwise_equal(params, snapshot)


def test_momentum_buffers_required_with_momentum():
    lists = _valid_lists()
    lists["momentum_buffers"] = []
    snapshot = clones(lists["params"])
    with pytest.raises(RuntimeError, match=r"momentum_buffers has 0 tensors but params has 3"):
        _call("restore_sgd_", lists)
    assert_bitwise_equal(lists["params"], snapshot)


@pytest.mark.parametrize("epsilon", [-1.0, math.nan])
def test_bad_epsilon_raises(epsilon):
    lists = _valid_lists()
    snapshot = clones(lists["params"])
    with pytest.raises(RuntimeError, match=r"epsilon must be a number >= 0"):
        cpu.perturb_(lists["params"], lists["grads"], lists["backups"], epsilon, 1.0, True, True)
    assert_bitwise_equal(lists["params"], snapshot)


def test_device_mismatch_raises():
    # Without a GPU, "meta" is the other device. A call mixing it with CPU tensors dispatches to the fake
    # implementation, which checks devices too; the CPU kernel's own check is reached by redispatching to it.
    lists = _valid_lists()
    params, grads, backups = lists["params"], lists["grads"], lists["backups"]
    meta_grads = grads[:2] + [torch.empty_like(grads[2], device="meta")]
    snapshot = clones(params)
    with pytest.raises(RuntimeError, match=r"grads\[2\] has device meta but params\[2\] has device cpu"):
        torch.ops.amp_fused.perturb_(params, meta_grads, backups, 0.5, 1.0, True, True)
    cpu_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"grads\[2\] is on meta but params\[2\] is on cpu"):
        torch.ops.amp_fused.perturb_.default.redispatch(cpu_key, params, meta_grads, backups, 0.5, 1.0, True, True)
    with pytest.raises(RuntimeError, match=r"params\[0\] is on meta, but these are the CPU kernels"):
        meta = [torch.empty(3, device="meta")]
        torch.ops.amp_fused.restore_.default.redispatch(cpu_key, meta, meta)
    assert_bitwise_equal(params, snapshot)


# -- dispatch, tracing, and the optimizer ---------------------------------------------------------------------
class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def test_one_dispatched_op_per_call_and_no_host_sync():
    shapes = [(int(n),) for n in torch.randint(1000, 5000, (300,), generator=torch.Generator().manual_seed(0))]
    params, grads = make_lists(shapes, torch.float32)
    backups, buffers = [torch.empty_like(p) for p in params], clones(grads)
    with _Ops() as mode:
        cpu.perturb_(params, grads, backups, 0.5, 1.0, True, True)
        cpu.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 5e-4, True, False, False)
    assert mode.calls == [torch.ops.amp_fused.perturb_.default, torch.ops.amp_fused.restore_sgd_.default]


def test_torch_compile_traces_the_ops():
    shapes = [(CHUNK + 1,), (3, 4), ()]
    params, grads = make_lists(shapes, torch.float32, seed=16)

    def ascent_then_restore(ps, gs, bs):
        norms = torch.ops.amp_fused.perturb_(ps, gs, bs, 2.0, 1.0, True, True)
        perturbed = [p.clone() for p in ps]
        torch.ops.amp_fused.restore_(ps, bs)
        return norms * 2, perturbed

    eager_p, compiled_p = clones(params), clones(params)
    eager = ascent_then_restore(eager_p, grads, [torch.empty_like(p) for p in params])
    compiled_fn = torch.compile(ascent_then_restore, backend="aot_eager", fullgraph=True)
    compiled = compiled_fn(compiled_p, grads, [torch.empty_like(p) for p in params])
    assert torch.equal(eager[0], compiled[0])
    assert_bitwise_equal(compiled[1], eager[1])
    assert_bitwise_equal(compiled_p, params)
    assert moved(compiled[1], params) > 1.0


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))


@pytest.mark.parametrize("inner_iter", [1, 2])
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_optimizer_cpu_backend_matches_foreach(norm, inner_iter):
    gen = torch.Generator().manual_seed(17)
    batches = [(torch.randn(16, 3, 6, 6, generator=gen), torch.randint(0, 10, (16,), generator=gen))
               for _ in range(4)]
    results = {}
    for backend in ("cpu", "foreach"):
        model = _model(18)
        initial = [p.detach().clone() for p in model.parameters()]
        opt = amp_fused.AMP(model.parameters(), lr=0.1, epsilon=0.5, inner_lr=1.0, inner_iter=inner_iter,
                            norm=norm, backend=backend, momentum=0.9, weight_decay=5e-4, nesterov=True)
        with _Ops() as mode:
            for x, y in batches:
                def closure():
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
        results[backend] = ([p.detach().clone() for p in model.parameters()],
                            [opt.base_optimizer.state[p]["momentum_buffer"] for p in model.parameters()], mode.calls)
    p_cpu, m_cpu, calls = results["cpu"]
    p_fe, m_fe, _ = results["foreach"]
    assert calls.count(torch.ops.amp_fused.perturb_.default) == 4 * inner_iter
    assert calls.count(torch.ops.amp_fused.restore_sgd_.default) == 4
    torch.testing.assert_close(p_cpu, p_fe, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m_cpu, m_fe, rtol=1e-4, atol=1e-6)
    assert moved(p_cpu, initial) > 0.1
