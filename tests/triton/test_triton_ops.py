"""The Triton backend's three ops against their definition (float64 torch math) and the other backends."""
import math

import pytest
import torch

from amp_fused import functional
from amp_fused.backends import foreach, reference
from amp_fused.backends import triton as triton_backend
from amp_fused.triton import ops
from amp_fused.triton.metadata import CHUNK
from triton_cases import (BACKEND_TOL, DEFINITION_TOL, DEVICES, DTYPES, MIXED_DTYPE_CASE, NORM_TOL, ONE_ULP_TOL,
                          SIZES, assert_lists_bitwise_equal, assert_lists_close, clone, cpp_cpu_backend_or_skip,
                          largest_move, make_lists, projected)

# The SIZES tensors' gradient norms run from 1 to ~90 (about √numel): with ε = 30 some tensors are projected
# and some are not, and the global projection (total norm ~150) still moves every element by ~0.2.
EPSILON, INNER_LR = 30.0, 1.0
OTHER_BACKENDS = {"foreach": foreach, "reference": reference}


def _check_projection_is_active(expected_norms, per_tensor):
    if per_tensor:
        projected_tensors = [n > EPSILON for n in expected_norms[:-1].tolist()]
        assert any(projected_tensors) and not all(projected_tensors), "the case must mix projected and free tensors"
    else:
        assert expected_norms[-1].item() > 2 * EPSILON, "the global projection must be active"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_first_and_later_ascent(device, dtype, per_tensor):
    params, grads, backups = make_lists(SIZES, dtype, device)
    grads2 = make_lists(SIZES, dtype, device, seed=1)[1]
    theta = clone(params)
    others = {name: (clone(params), [torch.empty_like(p) for p in params]) for name in OTHER_BACKENDS}

    norms = triton_backend.perturb_(params, grads, backups, EPSILON, INNER_LR, per_tensor, True)
    expected, expected_norms = projected(theta, [INNER_LR * g.double() for g in grads], EPSILON, per_tensor)
    _check_projection_is_active(expected_norms, per_tensor)
    assert norms.dtype == torch.float32 and norms.shape == (len(params) + 1,) and norms.device == params[0].device
    torch.testing.assert_close(norms.double().cpu(), expected_norms, **NORM_TOL)
    assert_lists_close(params, expected, **DEFINITION_TOL[dtype])
    assert_lists_bitwise_equal(backups, theta)
    assert largest_move(params, theta) > 20 * BACKEND_TOL[dtype]["atol"]
    for name, (other_params, other_backups) in others.items():
        other_norms = OTHER_BACKENDS[name].perturb_(other_params, grads, other_backups, EPSILON, INNER_LR, per_tensor,
                                                    True)
        torch.testing.assert_close(norms.cpu(), other_norms.cpu(), **NORM_TOL)
        assert_lists_close(params, other_params, **BACKEND_TOL[dtype])

    first_params = clone(params)
    norms2 = triton_backend.perturb_(params, grads2, backups, EPSILON, INNER_LR, per_tensor, False)
    delta = [p.double() - t.double() + INNER_LR * g.double() for p, t, g in zip(first_params, theta, grads2)]
    expected2, expected_norms2 = projected(theta, delta, EPSILON, per_tensor)
    torch.testing.assert_close(norms2.double().cpu(), expected_norms2, **NORM_TOL)
    assert_lists_close(params, expected2, **DEFINITION_TOL[dtype])
    assert_lists_bitwise_equal(backups, theta)  # a later ascent leaves θ alone
    assert largest_move(params, first_params) > 20 * BACKEND_TOL[dtype]["atol"]
    for name, (other_params, other_backups) in others.items():
        other_norms = OTHER_BACKENDS[name].perturb_(other_params, grads2, other_backups, EPSILON, INNER_LR,
                                                    per_tensor, False)
        # Δ is read back from params rounded to the storage type: an ulp of θ per element, absolute
        torch.testing.assert_close(norms2.cpu(), other_norms.cpu(), **BACKEND_TOL[dtype])
        assert_lists_close(params, other_params, **BACKEND_TOL[dtype])


@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_gradient_never_reaches_params(device, dtype, per_tensor, first):
    sizes = [(5,), (CHUNK + 3,), (7,)]  # the poisoned tensor spans two programs: NaN in one, Inf in the other
    params, grads, backups = make_lists(sizes, dtype, device)
    theta = clone(params)
    if not first:
        triton_backend.perturb_(params, grads, backups, EPSILON, INNER_LR, per_tensor, True)
    before = clone(params)
    poisoned = make_lists(sizes, dtype, device, seed=3)[1]
    poisoned[1][0] = float("nan")
    poisoned[1][CHUNK + 1] = float("inf")
    expected_delta = [p.double() - t.double() + INNER_LR * g.double() for p, t, g in zip(before, theta, poisoned)]

    norms = triton_backend.perturb_(params, poisoned, backups, EPSILON, INNER_LR, per_tensor, first)
    expected, expected_norms = projected(theta, expected_delta, EPSILON, per_tensor)

    assert not math.isfinite(norms[1].item()) and not math.isfinite(norms[-1].item())
    torch.testing.assert_close(norms[[0, 2]].double().cpu(), expected_norms[[0, 2]], **NORM_TOL)
    assert_lists_bitwise_equal(backups, theta)
    assert all(torch.isfinite(p).all() for p in params)
    if per_tensor:
        assert_lists_bitwise_equal(params[1:2], theta[1:2])  # exactly θ, not θ + 0·Δ
        assert_lists_close([params[0], params[2]], [expected[0], expected[2]], **DEFINITION_TOL[dtype])
        assert largest_move([params[0], params[2]], [theta[0], theta[2]]) > 20 * BACKEND_TOL[dtype]["atol"]
    else:
        assert_lists_bitwise_equal(params, theta)  # global: one non-finite tensor drops every Δ
    other_params, other_backups = clone(before), clone(backups)
    foreach.perturb_(other_params, poisoned, other_backups, EPSILON, INNER_LR, per_tensor, first)
    assert_lists_close(params, other_params, **BACKEND_TOL[dtype])


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_zero_gradient_and_zero_epsilon(device, dtype, per_tensor):
    params, grads, backups = make_lists(SIZES, dtype, device)
    theta = clone(params)
    grads[3].zero_()
    norms = triton_backend.perturb_(params, grads, backups, EPSILON, INNER_LR, per_tensor, True)
    assert norms[3].item() == 0.0 and norms[-1].item() > 0
    assert torch.equal(params[3], theta[3])  # a zero gradient leaves its tensor where it was
    assert largest_move(params, theta) > 20 * BACKEND_TOL[dtype]["atol"]

    params, grads, backups = make_lists(SIZES, dtype, device)
    zeros = [torch.zeros_like(g) for g in grads]
    norms = triton_backend.perturb_(params, zeros, backups, EPSILON, INNER_LR, per_tensor, True)
    assert torch.count_nonzero(norms).item() == 0
    assert_lists_bitwise_equal(params, backups)

    params, grads, backups = make_lists(SIZES, dtype, device)
    theta = clone(params)
    norms = triton_backend.perturb_(params, grads, backups, 0.0, INNER_LR, per_tensor, True)
    assert (norms > 0).all()  # the gradients are there, but ε = 0 projects Δ to nothing
    assert_lists_bitwise_equal(params, theta)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_restore_is_a_bit_exact_copy(device, dtype):
    # Random bit patterns: NaNs with payloads, infinities, negative zeros and subnormals all occur.
    gen = torch.Generator().manual_seed(4)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    info = torch.iinfo(bits)
    backups = [torch.randint(info.min, info.max, s, generator=gen, dtype=bits).view(dtype).to(device) for s in SIZES]
    params = [torch.randn(s, dtype=torch.float64).to(dtype).to(device) for s in SIZES]
    saved = clone(backups)
    assert any(torch.isnan(b).any() for b in backups), "the case must hold NaNs"
    triton_backend.restore_(params, backups)
    assert_lists_bitwise_equal(params, saved)
    assert_lists_bitwise_equal(backups, saved)


SGD_CONFIGS = [
    dict(momentum=0.0),
    dict(weight_decay=0.05),
    dict(momentum=0.9, dampening=0.1),
    dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(momentum=0.5, dampening=0.2, weight_decay=0.1, maximize=True),
]


def _sgd_args(config):
    full = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    full.update(config)
    return full


def _sgd_definition(theta, grads, buffers, lr, first_step, momentum, dampening, weight_decay, nesterov, maximize):
    """torch.optim.SGD's update (torch/optim/sgd.py) in float64: the new params and momentum buffers."""
    params, new_buffers = [], []
    for t, g, buf in zip(theta, grads, buffers):
        t, d_p, buf = t.double(), g.double(), buf.double()
        d_p = -d_p if maximize else d_p
        if weight_decay != 0:
            d_p = d_p + weight_decay * t
        if momentum != 0:
            buf = d_p if first_step else momentum * buf + (1 - dampening) * d_p
            d_p = d_p + momentum * buf if nesterov else buf
        params.append(t - lr * d_p)
        new_buffers.append(buf)
    return params, new_buffers


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_restore_sgd_matches_torch_sgd_over_steps(device, dtype, config):
    lr = 0.5
    args = _sgd_args(config)
    theta = make_lists(SIZES, dtype, device)[0]
    sgd_params = clone(theta)
    sgd = torch.optim.SGD(sgd_params, lr=lr, **config)
    params = clone(theta)
    foreach_params = clone(theta)
    sentinel = 7.0  # without momentum the buffers must not be touched
    buffers = [torch.full_like(p, sentinel) for p in params]
    foreach_buffers = [torch.empty_like(p) for p in params]
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype).to(device) for p in params]
        backups = clone(params)  # θ of this step; params hold θ + Δ, which the op must overwrite
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype).to(device))
        foreach_backups = clone(foreach_params)
        before = clone(backups)
        expected, expected_buffers = _sgd_definition(before, grads, buffers, lr, step == 0, **args)

        triton_backend.restore_sgd_(params, backups, grads, buffers, lr, first_step=step == 0, **args)
        for p, g in zip(sgd_params, grads):
            p.grad = g.clone()
        sgd.step()
        foreach.restore_sgd_(foreach_params, foreach_backups, grads, foreach_buffers, lr, first_step=step == 0, **args)

        assert_lists_close(params, expected, **DEFINITION_TOL[dtype])
        assert_lists_close(params, sgd_params, **BACKEND_TOL[dtype])
        assert_lists_close(params, foreach_params, **BACKEND_TOL[dtype])
        assert_lists_bitwise_equal(backups, before)
        assert largest_move(params, before) > 10 * BACKEND_TOL[dtype]["atol"]
        if args["momentum"]:
            assert_lists_close(buffers, expected_buffers, **DEFINITION_TOL[dtype])
            assert_lists_close(buffers, [sgd.state[p]["momentum_buffer"] for p in sgd_params],
                               **BACKEND_TOL[dtype])
        else:
            assert all(torch.all(b == sentinel) for b in buffers)


@pytest.mark.parametrize("device", DEVICES)
def test_restore_sgd_against_reference_backend(device):
    """reference keeps Δ in its backups and subtracts it back, so its θ is off by rounding: compared in fp32."""
    dtype = torch.float32
    theta, grads, _ = make_lists(SIZES, dtype, device)
    delta = make_lists(SIZES, dtype, device, seed=6)[1]
    args = _sgd_args(SGD_CONFIGS[3])
    params, buffers = [t + d for t, d in zip(theta, delta)], [torch.empty_like(t) for t in theta]
    ref_params, ref_buffers = clone(params), [torch.empty_like(t) for t in theta]
    for first_step in (True, False):
        triton_backend.restore_sgd_(params, clone(theta), grads, buffers, 0.5, first_step=first_step, **args)
        reference.restore_sgd_(ref_params, clone(delta), grads, ref_buffers, 0.5, first_step=first_step, **args)
        assert_lists_close(params, ref_params, **BACKEND_TOL[dtype])
        assert_lists_close(buffers, ref_buffers, **BACKEND_TOL[dtype])
        theta = clone(params)
        params = [t + d for t, d in zip(theta, delta)]
        ref_params = clone(params)


@pytest.mark.parametrize("device", DEVICES)
def test_restore_sgd_without_momentum_takes_no_buffers(device):
    params, grads, _ = make_lists(SIZES, torch.float32, device)
    backups = make_lists(SIZES, torch.float32, device, seed=7)[0]
    expected = [b - 0.5 * g for b, g in zip(backups, grads)]
    triton_backend.restore_sgd_(params, backups, grads, [], 0.5, 0.0, 0.0, 0.0, False, False, False)
    assert_lists_close(params, expected, **DEFINITION_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic(device, dtype):
    def run():
        params, grads, backups = make_lists(SIZES, dtype, device)
        grads2 = make_lists(SIZES, dtype, device, seed=1)[1]
        buffers = [torch.empty_like(p) for p in params]
        norms = [triton_backend.perturb_(params, grads, backups, EPSILON, INNER_LR, True, True),
                 triton_backend.perturb_(params, grads2, backups, EPSILON, INNER_LR, False, False)]
        perturbed = clone(params)
        triton_backend.restore_sgd_(params, backups, grads2, buffers, 0.1, 0.9, 0.0, 1e-4, True, False, True)
        return norms + perturbed + params + backups + buffers

    first, second = run(), run()
    assert_lists_bitwise_equal(first, second)


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_one_list(device, per_tensor):
    lists = [make_lists([size], dtype, device, seed=i) for i, (dtype, size) in enumerate(MIXED_DTYPE_CASE)]
    params, grads, backups = ([entry[k][0] for entry in lists] for k in range(3))
    theta = clone(params)
    norms = triton_backend.perturb_(params, grads, backups, EPSILON, INNER_LR, per_tensor, True)
    expected, expected_norms = projected(theta, [INNER_LR * g.double() for g in grads], EPSILON, per_tensor)
    torch.testing.assert_close(norms.double().cpu(), expected_norms, **NORM_TOL)
    for p, e, (dtype, _) in zip(params, expected, MIXED_DTYPE_CASE):
        assert p.dtype == dtype
        torch.testing.assert_close(p.double().cpu(), e.cpu(), **DEFINITION_TOL[dtype])
    assert_lists_bitwise_equal(backups, theta)
    foreach_params, foreach_backups = clone(theta), [torch.empty_like(p) for p in theta]
    foreach.perturb_(foreach_params, grads, foreach_backups, EPSILON, INNER_LR, per_tensor, True)
    for p, q, (dtype, _) in zip(params, foreach_params, MIXED_DTYPE_CASE):
        torch.testing.assert_close(p.double().cpu(), q.double().cpu(), **BACKEND_TOL[dtype])
    triton_backend.restore_(params, backups)
    assert_lists_bitwise_equal(params, theta)


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
def test_scale_pass_over_many_tensors_and_chunks(per_tensor):
    """The scale pass reduces SCALE_T_BLOCK tensors × SCALE_C_BLOCK partial sums at a time: more tensors than
    one block, and a tensor with more chunks than one block (a few hundred thousand values)."""
    sizes = [((ops.SCALE_C_BLOCK + 1) * CHUNK + 1,)] + [(3 + i % 5,) for i in range(ops.SCALE_T_BLOCK + 8)]
    params, grads, backups = make_lists(sizes, torch.float32)
    theta = clone(params)
    epsilon = 3.0
    norms = triton_backend.perturb_(params, grads, backups, epsilon, INNER_LR, per_tensor, True)
    expected, expected_norms = projected(theta, grads, epsilon, per_tensor)
    torch.testing.assert_close(norms.double(), expected_norms, **NORM_TOL)
    assert_lists_close(params, expected, **DEFINITION_TOL[torch.float32])


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_cpp_cpu_backend(dtype, per_tensor):
    """The C++ CPU kernels share the per-element math (csrc/amp_math.h): same fp32 arithmetic, one rounding."""
    cpu_backend = cpp_cpu_backend_or_skip()
    params, grads, backups = make_lists(SIZES, dtype)
    grads2 = make_lists(SIZES, dtype, seed=1)[1]
    cpp_params, cpp_backups = clone(params), [torch.empty_like(p) for p in params]
    for first, g in ((True, grads), (False, grads2)):
        norms = triton_backend.perturb_(params, g, backups, EPSILON, INNER_LR, per_tensor, first)
        cpp_norms = cpu_backend.perturb_(cpp_params, g, cpp_backups, EPSILON, INNER_LR, per_tensor, first)
        torch.testing.assert_close(norms, cpp_norms, **NORM_TOL)
        assert_lists_close(params, cpp_params, **ONE_ULP_TOL[dtype])
        assert_lists_bitwise_equal(backups, cpp_backups)
    args = _sgd_args(SGD_CONFIGS[4])
    buffers, cpp_buffers = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
    for first_step in (True, False):
        triton_backend.restore_sgd_(params, backups, grads, buffers, 0.5, first_step=first_step, **args)
        cpu_backend.restore_sgd_(cpp_params, cpp_backups, grads, cpp_buffers, 0.5, first_step=first_step, **args)
        assert_lists_close(params, cpp_params, **ONE_ULP_TOL[dtype])
        assert_lists_close(buffers, cpp_buffers, **ONE_ULP_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_list_and_empty_tensors(device):
    assert torch.equal(triton_backend.perturb_([], [], [], 1.0, 1.0, True, True), torch.zeros(1))
    triton_backend.restore_([], [])
    triton_backend.restore_sgd_([], [], [], [], 0.1, 0.9, 0.0, 0.0, False, False, True)
    nothing = [torch.empty(0, device=device)]
    norms = triton_backend.perturb_(nothing, clone(nothing), clone(nothing), 1.0, 1.0, False, True)
    assert norms.tolist() == [0.0, 0.0]  # no programs at all: only the scale pass runs

    sizes = [(0,), (5,), (0, 3), (CHUNK + 2,)]
    params, grads, backups = make_lists(sizes, torch.float32, device)
    theta = clone(params)
    norms = triton_backend.perturb_(params, grads, backups, 2.0, INNER_LR, False, True)
    expected, expected_norms = projected(theta, grads, 2.0, False)
    torch.testing.assert_close(norms.double().cpu(), expected_norms, **NORM_TOL)
    assert norms[0].item() == 0 and norms[2].item() == 0
    assert_lists_close(params, expected, **DEFINITION_TOL[torch.float32])
    triton_backend.restore_(params, backups)
    assert_lists_bitwise_equal(params, theta)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_non_contiguous_tensors(device):
    """A transposed tensor is one dense block in another order; params, grads and backups share its strides."""
    params = [torch.randn(64, 33).t().to(device), torch.randn(3, 5).to(device)]
    grads = [torch.randn(64, 33).t().to(device), torch.randn(3, 5).to(device)]
    backups = [torch.empty_like(p) for p in params]
    assert not params[0].is_contiguous() and backups[0].stride() == params[0].stride()
    theta = clone(params)
    triton_backend.perturb_(params, grads, backups, 2.0, INNER_LR, True, True)
    expected, _ = projected(theta, grads, 2.0, True)
    assert_lists_close(params, expected, **DEFINITION_TOL[torch.float32])
    assert_lists_bitwise_equal(backups, theta)


@pytest.mark.parametrize("device", DEVICES)
def test_views_into_one_buffer_at_unaligned_offsets(device):
    """Parameters that are views of one flat buffer (4-byte offsets: no 16-byte alignment)."""
    sizes = [CHUNK + 1, 7, 2 * CHUNK]
    flat = [torch.randn(sum(sizes) + 3, device=device) for _ in range(3)]
    params, grads, backups = ([f[1 + sum(sizes[:i]):1 + sum(sizes[:i + 1])] for i in range(3)] for f in flat)
    assert any(t.data_ptr() % 16 for t in params)
    end = 1 + sum(sizes)
    outside = [torch.cat([f[:1], f[end:]]) for f in flat]
    theta = clone(params)
    triton_backend.perturb_(params, grads, backups, EPSILON, INNER_LR, False, True)
    expected, _ = projected(theta, grads, EPSILON, False)
    assert_lists_close(params, expected, **DEFINITION_TOL[torch.float32])
    assert_lists_bitwise_equal(backups, theta)
    assert all(torch.equal(torch.cat([f[:1], f[end:]]), o) for f, o in zip(flat, outside))  # nothing else written
    triton_backend.restore_(params, backups)
    assert_lists_bitwise_equal(params, theta)


def test_bad_inputs_are_refused_with_the_argument_named():
    good = [torch.randn(5), torch.randn(3)]
    with pytest.raises(ValueError, match=r"params\[1\] has dtype torch.int32; supported dtypes: torch.float32"):
        triton_backend.restore_([good[0], torch.zeros(3, dtype=torch.int32)], [good[0], torch.zeros(3)])
    with pytest.raises(ValueError, match=r"params\[0\] .* has gaps or overlapping elements"):
        triton_backend.restore_([torch.randn(8, 8)[:, :4]], [torch.randn(8, 4)])
    with pytest.raises(ValueError, match=r"grads\[0\] has dtype torch.float16, .* but params\[0\] has dtype "
                                         r"torch.float32"):
        triton_backend.perturb_(good, [good[0].half(), good[1]], clone(good), 1.0, 1.0, True, True)
    with pytest.raises(ValueError, match=r"backups\[1\] has dtype torch.float32, shape \(4,\)"):
        triton_backend.perturb_(good, clone(good), [good[0], torch.randn(4)], 1.0, 1.0, True, True)
    with pytest.raises(ValueError, match=r"momentum_buffers has 1 tensors, params has 2"):
        triton_backend.restore_sgd_(good, clone(good), clone(good), good[:1], 0.1, 0.9, 0.0, 0.0, False, False, True)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(ops, "INTERPRET", False)
    with pytest.raises(ValueError, match=r"tensors must be on a CUDA device .* got cpu"):
        triton_backend.restore_([torch.randn(3)], [torch.randn(3)])


def test_dispatch_and_autograd_version_counters():
    """The op layer resolves "triton" for CPU tensors under the interpreter, and writes through raw
    pointers still bump autograd's version counters (an in-place change autograd must see)."""
    params, grads, backups = make_lists(SIZES[:4])
    versions = [p._version for p in params]
    backup_versions = [b._version for b in backups]
    functional.perturb_(params, grads, backups, EPSILON, INNER_LR, True, True, backend="triton")
    assert all(p._version > v for p, v in zip(params, versions))
    assert all(b._version > v for b, v in zip(backups, backup_versions))
    x = torch.randn(5, requires_grad=True)
    w = torch.randn(5)
    y = (x * w).sum()  # autograd saved w for x's gradient
    triton_backend.restore_([w], [torch.randn(5)])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
