"""What is specific to the Triton backend's ops: the scale pass over more tensors and chunks than one block of
it reduces, the same per-element math as the C++ CPU kernels (within one ulp), what its program tables refuse,
the interpreter switch, and the op layer's dispatch of CPU tensors to it under the interpreter.

What every backend promises is tests/triton/test_triton_contract.py (the contract suite, run on this backend).
"""
import pytest
import torch

from amp_fused import backends, functional
from amp_fused.backends import triton as triton_backend
from amp_fused.triton import ops
from amp_fused.triton.metadata import CHUNK
from op_definition import ascent_bounds, assert_within, bound_norm, moved, norm_bounds, perturb
from triton_cases import (DTYPES, NORM_TOL, ONE_ULP_TOL, SIZES, assert_lists_bitwise_equal, assert_lists_close, clone,
                          cpp_cpu_backend_or_skip, make_lists)

EPSILON, INNER_LR = 30.0, 1.0
# torch.optim.SGD options for the comparison with the C++ kernels
SGD_ARGS = dict(momentum=0.5, dampening=0.2, weight_decay=0.1, nesterov=False, maximize=True)


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
def test_scale_pass_over_many_tensors_and_chunks(per_tensor):
    """The scale pass reduces SCALE_T_BLOCK tensors × SCALE_C_BLOCK partial sums at a time: more tensors than
    one block, and a tensor with more chunks than one block (a few hundred thousand values)."""
    sizes = [((ops.SCALE_C_BLOCK + 1) * CHUNK + 1,)] + [(3 + i % 5,) for i in range(ops.SCALE_T_BLOCK + 8)]
    params, grads, backups = make_lists(sizes, torch.float32)
    theta = clone(params)
    epsilon = 3.0
    norms = triton_backend.perturb_(params, grads, backups, epsilon, INNER_LR, per_tensor, True)
    expected = perturb(theta, grads, None, epsilon, INNER_LR, per_tensor, True)
    assert_within([norms], [expected.norms.float()], [norm_bounds(expected, torch.float32)], "norms")
    bounds = ascent_bounds(expected, torch.float32, per_tensor)
    assert_within(params, expected.params, bounds)
    assert moved(params, theta) > 10 * bound_norm(bounds)


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
    buffers, cpp_buffers = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
    for first_step in (True, False):
        triton_backend.restore_sgd_(params, backups, grads, buffers, 0.5, first_step=first_step, **SGD_ARGS)
        cpu_backend.restore_sgd_(cpp_params, cpp_backups, grads, cpp_buffers, 0.5, first_step=first_step, **SGD_ARGS)
        assert_lists_close(params, cpp_params, **ONE_ULP_TOL[dtype])
        assert_lists_close(buffers, cpp_buffers, **ONE_ULP_TOL[dtype])


def test_tables_refuse_what_the_kernels_cannot_address():
    """Called directly (past the op layer's argument contract, tests/triton/test_triton_checks.py), building the
    program map still refuses dtypes the kernels have no specialisation for and tensors that are not one dense
    block, with the argument named."""
    good = [torch.randn(5), torch.randn(3)]
    with pytest.raises(ValueError, match=r"params\[1\] has dtype torch.int32; supported dtypes: torch.float32"):
        triton_backend.restore_([good[0], torch.zeros(3, dtype=torch.int32)], [good[0], torch.zeros(3)])
    with pytest.raises(ValueError, match=r"params\[0\] .* has gaps or overlapping elements"):
        triton_backend.restore_([torch.randn(8, 8)[:, :4]], [torch.randn(8, 4)])


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(ops, "INTERPRET", False)
    with pytest.raises(ValueError, match=r"tensors must be on a CUDA device .* got cpu"):
        triton_backend.restore_([torch.randn(3)], [torch.randn(3)])


def test_op_layer_resolves_triton_for_cpu_tensors_under_the_interpreter():
    assert "triton" in backends.available_backends("cpu")
    assert backends.resolve("triton", "cpu").NAME == "triton"
    assert backends.resolve("auto", "cpu").NAME != "triton"  # "auto" never picks the interpreter
    params, grads, backups = make_lists(SIZES[:4])
    theta = clone(params)
    functional.perturb_(params, grads, backups, EPSILON, INNER_LR, True, True, backend="triton")
    functional.restore_(params, backups, backend="triton")
    assert_lists_bitwise_equal(params, theta)
