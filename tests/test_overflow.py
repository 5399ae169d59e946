"""Finite inputs never overflow the norm: with inner_lr = 1e20 and gradients of size ~1, Δ = ζ·g is ~1e20 (well
inside fp32's range) but Δ² is ~1e40 (beyond it). Every backend must still report the finite norms ζ·‖g‖ and move
the parameters by the projection ε·Δ/‖Δ‖, not drop Δ as if the gradient had been non-finite.

tests/triton/test_triton_overflow.py runs the same cases on the Triton backend under Triton's interpreter."""
import pytest
import torch

from amp_fused import available_backends, functional

INNER_LR = 1e20
EPSILON = 50.0  # large enough that the move of every element stands well above fp16/bf16 rounding
# One tensor spans two of the CPU kernels' 64K-element chunks (and many of the CUDA and Triton programs).
SIZES = [(70_000,), (3, 5), (1,), (257,)]

# params against the float64 definition: the fused backends round once from fp32; reference and foreach round
# Δ, the scaled Δ and the sum to the storage dtype (bf16: 2^-9 relative each), which where θ + move cancels
# leaves a couple of ulps of the operands (|θ|, |move| up to ~16 here). A dropped Δ would miss by the whole
# move (~1 and more), and the move norms below are checked much tighter. Norms are returned in fp32.
PARAM_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=3e-2),
    torch.bfloat16: dict(rtol=1.6e-2, atol=0.125),
}
NORM_RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 4e-3}
MOVE_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# What a backend cannot do by construction, not a norm overflow: reference keeps Δ itself in the tensors' dtype
# (as the original code does), and foreach forms the later ascents' Δ in it; fp16 cannot hold ζ·g ~ 1e20 (its
# largest value is 65504). The fused backends form Δ in fp32.
FP16_DELTA_IN_STORAGE = {"reference": (True, False), "foreach": (False,)}  # backend -> the ascents (first?) hit


def _lists(dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)

    def make():
        return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in SIZES]

    return make(), make(), make()  # params, first gradients, second gradients


def _expected(theta, delta, per_tensor):
    """θ + ε·Δ/‖Δ‖ (the projection is active: ‖Δ‖ ~ 1e20 ≫ ε) and the norms (n, then the total), in float64."""
    norms = torch.stack([d.norm() for d in delta])
    total = norms.norm()
    params = [t.double() + (EPSILON / (n if per_tensor else total)).item() * d for t, d, n in zip(theta, delta, norms)]
    return params, torch.cat([norms, total.reshape(1)])


def _assert_ascent(params, theta, norms, delta, dtype, per_tensor):
    expected, expected_norms = _expected(theta, delta, per_tensor)
    assert torch.isfinite(norms).all(), f"finite inputs gave non-finite norms {norms.tolist()}"
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms.cpu().double(), expected_norms, rtol=NORM_RTOL[dtype], atol=0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.cpu().double(), e, **PARAM_TOL[dtype])
    # Not dropped: the parameters moved onto the ε-sphere (per tensor, or over all tensors for global).
    moves = torch.stack([(p.cpu().double() - t.cpu().double()).norm() for p, t in zip(params, theta)])
    if per_tensor:
        torch.testing.assert_close(moves, torch.full_like(moves, EPSILON), rtol=MOVE_RTOL[dtype], atol=0)
    else:
        torch.testing.assert_close(moves.norm(), torch.tensor(EPSILON, dtype=torch.float64), rtol=MOVE_RTOL[dtype],
                                   atol=0)


def check_huge_inner_lr(backend, dtype, per_tensor, device="cpu"):
    """First ascent, then a second one, with ζ = 1e20: norms, parameters and the moves, against float64."""
    skipped = FP16_DELTA_IN_STORAGE.get(backend, ()) if dtype == torch.float16 else ()
    if True in skipped:
        pytest.skip(f"{backend} keeps Δ = ζ·g in fp16, which cannot hold 1e20 (not a norm overflow)")
    params, grads, grads2 = _lists(dtype, device, seed=0)
    theta = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]

    norms = functional.perturb_(params, grads, backups, EPSILON, INNER_LR, per_tensor, True, backend=backend)
    _assert_ascent(params, theta, norms, [INNER_LR * g.cpu().double() for g in grads], dtype, per_tensor)

    if False in skipped:
        return  # the second ascent forms Δ in fp16 on this backend
    perturbed = [p.clone() for p in params]
    norms = functional.perturb_(params, grads2, backups, EPSILON, INNER_LR, per_tensor, False, backend=backend)
    delta = [(q.cpu().double() - t.cpu().double()) + INNER_LR * g.cpu().double()
             for q, t, g in zip(perturbed, theta, grads2)]
    _assert_ascent(params, theta, norms, delta, dtype, per_tensor)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_huge_inner_lr_keeps_finite_norms(backend, dtype, per_tensor):
    check_huge_inner_lr(backend, dtype, per_tensor)


@pytest.mark.cuda
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", available_backends("cuda") if torch.cuda.is_available() else ["cuda", "triton"])
def test_huge_inner_lr_keeps_finite_norms_cuda(backend, dtype, per_tensor):
    check_huge_inner_lr(backend, dtype, per_tensor, device="cuda")


def test_a_real_nan_is_still_dropped():
    """The overflow fallback must not hide a real NaN: that tensor's Δ is still dropped on every backend."""
    for backend in available_backends("cpu"):
        params, grads, _ = _lists(torch.float32, "cpu", seed=1)
        grads[0][123] = float("nan")
        theta = [p.clone() for p in params]
        backups = [torch.empty_like(p) for p in params]
        norms = functional.perturb_(params, grads, backups, EPSILON, INNER_LR, True, True, backend=backend)
        assert not torch.isfinite(norms[0]) and torch.isfinite(norms[1:-1]).all(), backend
        assert torch.equal(params[0], theta[0]), backend
        assert not torch.equal(params[1], theta[1]), backend
