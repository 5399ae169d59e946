"""The op table on every CPU backend, against the op's definition written out in float64 torch math."""
import math

import pytest
import torch

from amp_fused import available_backends, backends, functional

BACKENDS = available_backends("cpu")
EXACT_RESTORE = [b for b in BACKENDS if b != "reference"]  # reference subtracts Δ back, as the original does


def make_lists(sizes, dtype=torch.float32, seed=0, grad_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in sizes]
    grads = [(grad_scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype) for s in sizes]
    backups = [torch.empty_like(p) for p in params]
    return params, grads, backups


def expected_perturbation(theta, delta, epsilon, per_tensor):
    """θ + projected Δ and the norms, from the definition, in float64."""
    norms = torch.stack([d.double().norm() for d in delta])
    total = norms.norm()
    out = []
    for t, d, n in zip(theta, delta, norms):
        governing = n if per_tensor else total
        if not math.isfinite(governing):
            out.append(t.double())
            continue
        scale = min(1.0, epsilon / (governing.item() + 1e-12))
        out.append(t.double() + scale * d.double())
    return out, torch.cat([norms, total.reshape(1)])


def assert_close_list(actual, expected, rtol, atol):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol)


SIZES = [(7,), (3, 5), (1,), (64, 33), (4, 1, 3, 3), ()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_tensor", [True, False])
def test_first_ascent_matches_definition(backend, per_tensor):
    params, grads, backups = make_lists(SIZES)
    theta = [p.clone() for p in params]
    epsilon, inner_lr = 0.7, 0.3  # some tensors project, some don't
    norms = functional.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, True, backend=backend)
    delta = [inner_lr * g.double() for g in grads]
    expected, expected_norms = expected_perturbation(theta, delta, epsilon, per_tensor)
    assert_close_list(params, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norms.double(), expected_norms, rtol=1e-5, atol=1e-7)
    assert norms.dtype == torch.float32 and norms.shape == (len(params) + 1,)
    # the perturbation really moved the parameters, far beyond the tolerance
    assert max((p.double() - t.double()).abs().max().item() for p, t in zip(params, theta) if p.numel()) > 1e-2
    if per_tensor:
        projected = [n.item() > epsilon for n in expected_norms[:-1]]
        assert any(projected) and not all(projected), "the case must mix projected and unprojected tensors"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_tensor", [True, False])
def test_later_ascent_accumulates_delta(backend, per_tensor):
    params, grads, backups = make_lists(SIZES, seed=1)
    theta = [p.clone() for p in params]
    epsilon, inner_lr = 0.9, 0.2
    functional.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, True, backend=backend)
    first = [p.double() - t.double() for p, t in zip(params, theta)]
    grads2 = make_lists(SIZES, seed=2)[1]
    functional.perturb_(params, grads2, backups, epsilon, inner_lr, per_tensor, False, backend=backend)
    delta = [d + inner_lr * g.double() for d, g in zip(first, grads2)]
    expected, _ = expected_perturbation(theta, delta, epsilon, per_tensor)
    assert_close_list(params, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", EXACT_RESTORE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_restore_is_bit_exact(backend, dtype):
    params, grads, backups = make_lists(SIZES, dtype=dtype)
    theta = [p.clone() for p in params]
    functional.perturb_(params, grads, backups, 0.5, 1.0, True, True, backend=backend)
    functional.perturb_(params, grads, backups, 0.5, 1.0, True, False, backend=backend)
    assert any(not torch.equal(p, t) for p, t in zip(params, theta))
    functional.restore_(params, backups, backend=backend)
    for p, t in zip(params, theta):
        assert torch.equal(p, t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("per_tensor", [True, False])
def test_non_finite_gradient_never_reaches_params(backend, bad, per_tensor):
    params, grads, backups = make_lists(SIZES)
    theta = [p.clone() for p in params]
    grads[1].view(-1)[3] = bad
    norms = functional.perturb_(params, grads, backups, 0.5, 1.0, per_tensor, True, backend=backend)
    assert all(torch.isfinite(p).all() for p in params)
    assert not math.isfinite(norms[1].item()) and not math.isfinite(norms[-1].item())
    for i, (p, t) in enumerate(zip(params, theta)):
        dropped = (i == 1) or not per_tensor
        if backend != "reference" or dropped:
            # dropped tensors stay exactly θ; the others moved
            assert torch.equal(p, t) == dropped or p.numel() == 0, i
        if not dropped and p.numel():
            assert not torch.equal(p, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_leaves_params(backend):
    params, _, backups = make_lists(SIZES)
    theta = [p.clone() for p in params]
    zeros = [torch.zeros_like(p) for p in params]
    norms = functional.perturb_(params, zeros, backups, 0.5, 1.0, True, True, backend=backend)
    assert torch.equal(norms, torch.zeros_like(norms))
    for p, t in zip(params, theta):
        assert torch.equal(p, t)


SGD_FLAGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=True),
    dict(momentum=0.5, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags", SGD_FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_restore_sgd_matches_torch_sgd(backend, flags):
    params, _, backups = make_lists(SIZES, seed=3)
    ref = [p.clone().requires_grad_() for p in params]
    sgd = torch.optim.SGD(ref, lr=0.05, **flags)
    bufs = [torch.empty_like(p) for p in params]
    for step in range(4):
        grads = make_lists(SIZES, seed=10 + step)[1]
        functional.perturb_(params, grads, backups, 0.3, 1.0, True, True, backend=backend)
        functional.restore_sgd_(params, backups, grads, bufs if flags["momentum"] else [], 0.05, **flags,
                                first_step=step == 0, backend=backend)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        sgd.step()
        assert_close_list(params, [r.detach() for r in ref], rtol=1e-5, atol=1e-6)
        if flags["momentum"]:
            assert_close_list(bufs, [sgd.state[r]["momentum_buffer"] for r in ref], rtol=1e-5, atol=1e-6)
    moved = max((p - make_lists(SIZES, seed=3)[0][i]).abs().max().item() for i, p in enumerate(params) if p.numel())
    assert moved > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_lists_raise_before_writing(backend):
    params, grads, backups = make_lists(SIZES)
    theta = [p.clone() for p in params]
    with pytest.raises(ValueError, match="same length"):
        functional.perturb_(params, grads[:-1], backups, 0.5, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        functional.perturb_(params, [torch.zeros(2)] + grads[1:], backups, 0.5, 1.0, backend=backend)
    with pytest.raises(ValueError, match="epsilon must be a non-negative number"):
        functional.perturb_(params, grads, backups, -1.0, 1.0, backend=backend)
    with pytest.raises(ValueError, match="inner_lr must be a non-negative number"):
        functional.perturb_(params, grads, backups, 1.0, float("nan"), backend=backend)
    with pytest.raises(ValueError, match="same length"):
        functional.restore_(params, backups[:1], backend=backend)
    for p, t in zip(params, theta):
        assert torch.equal(p, t)


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'reference', 'foreach'"):
        functional.restore_([], [], backend="numpy")


def test_auto_resolves_to_an_available_backend_for_cpu():
    chosen = backends.resolve("auto", "cpu")
    assert chosen.NAME in BACKENDS and chosen.NAME != "reference"


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_bump_autograd_version_counters(backend):
    # a tensor saved for backward and then overwritten by an op must make backward fail, as built-in ops do
    w = torch.randn(4, requires_grad=True)
    y = (w * w).sum()
    grads, backups = [torch.randn(4)], [torch.empty(4)]
    before = w._version
    with torch.no_grad():
        functional.perturb_([w], grads, backups, 0.1, 1.0, backend=backend)
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
