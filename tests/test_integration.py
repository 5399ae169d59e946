"""Training integration: low-precision parameters, autocast, GradScaler, BatchNorm statistics and gradient
accumulation."""
import copy

import pytest
import torch
from torch import nn

from amp_fused import AMP, available_backends

BACKENDS = available_backends("cpu")
EXACT = [b for b in BACKENDS if b != "reference"]


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def data(n=32, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen).to(dtype), torch.randint(0, 4, (n,), generator=gen)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def loss_closure(model, x, y, scaler=None, log=None):
    def closure():
        if log is not None:
            log.append(snapshot(model))
        out = model(x)
        loss = nn.functional.cross_entropy(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss

    return closure


# -- 1. low-precision parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_lr_zero_leaves_every_parameter_bit_identical(backend, dtype, norm):
    model = mlp(dtype)
    x, y = data(dtype=dtype)
    opt = AMP(model.parameters(), lr=0.0, epsilon=0.1, inner_iter=2, momentum=0.9, norm=norm, backend=backend)
    before = snapshot(model)
    log = []
    for _ in range(3):
        opt.step(loss_closure(model, x, y, log=log))
    assert any(not torch.equal(a, b) for a, b in zip(log[1], before))  # the perturbed passes really moved
    for a, b in zip(snapshot(model), before):
        assert torch.equal(a, b)


def test_reference_subtract_back_drifts_in_bf16():
    # the contrast: the original's θ + Δ − Δ restore is off by rounding, visibly so in bf16
    model = mlp(torch.bfloat16)
    x, y = data(dtype=torch.bfloat16)
    opt = AMP(model.parameters(), lr=0.0, epsilon=0.1, backend="reference")
    before = snapshot(model)
    for _ in range(3):
        opt.step(loss_closure(model, x, y))
    assert any(not torch.equal(a, b) for a, b in zip(snapshot(model), before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_inside_the_closure(backend):
    model = mlp()
    x, y = data()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9, backend=backend)
    log = []

    def closure():
        log.append(snapshot(model))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        return out, loss

    before = snapshot(model)
    out, loss = opt.step(closure)
    assert out.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert len(log) == 2 and all(torch.equal(a, b) for a, b in zip(log[0], before))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(snapshot(model), before))


# -- 2. GradScaler ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
@pytest.mark.parametrize("epsilon", [0.05, 10.0])  # projection active / inactive (there ζ·g itself must be unscaled)
def test_grad_scaler_steps_like_unscaled_training(backend, norm, epsilon):
    x, y = data()
    plain, scaled = mlp(), mlp()
    opt_plain = AMP(plain.parameters(), lr=0.1, epsilon=epsilon, momentum=0.9, norm=norm, backend=backend)
    opt_scaled = AMP(scaled.parameters(), lr=0.1, epsilon=epsilon, momentum=0.9, norm=norm, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1000)
    for _ in range(3):
        opt_plain.step(loss_closure(plain, x, y))
        opt_scaled.step(loss_closure(scaled, x, y, scaler), scaler=scaler)
        scaler.update()
    # scaling by a power of two is exact, so the ascent with ζ/scale and the unscaled descent match exactly
    for a, b in zip(snapshot(plain), snapshot(scaled)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert scaler.get_scale() == 2.0 ** 12
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(snapshot(plain), snapshot(mlp())))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_pass", [0, 1])
def test_grad_scaler_skips_the_step_on_overflow_in_either_pass(backend, bad_pass):
    model = mlp()
    x, y = data()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, backoff_factor=0.5)
    calls = []
    inner = loss_closure(model, x, y, scaler)

    def closure():
        result = inner()
        if len(calls) == bad_pass:
            model[0].weight.grad[0, 0] = float("inf")
        calls.append(1)
        return result

    before = snapshot(model)
    opt.step(closure, scaler=scaler)
    scaler.update()
    assert len(calls) == 2
    for a, b in zip(snapshot(model), before):
        assert torch.equal(a, b) or backend == "reference"
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # skipped step; θ restored
    assert scaler.get_scale() == 2.0 ** 9  # backed off exactly once
    # and the next, finite step goes through
    opt.step(loss_closure(model, x, y, scaler), scaler=scaler)
    scaler.update()
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(snapshot(model), before))


def test_grad_scaler_updates_once_per_step():
    model = mlp()
    x, y = data()
    opt = AMP(model.parameters(), lr=0.01, epsilon=0.05, inner_iter=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=2, growth_factor=2.0)
    for _ in range(4):
        opt.step(loss_closure(model, x, y, scaler), scaler=scaler)
        scaler.update()
    assert scaler.get_scale() == 16.0  # grown once every 2 steps: 4 steps, 3 closure calls each


def test_grad_scaler_with_the_two_call_api():
    x, y = data()
    plain, scaled = mlp(), mlp()
    opt_plain = AMP(plain.parameters(), lr=0.1, epsilon=10.0)  # unprojected: Δ = ζ·g must use the unscaled g
    opt_scaled = AMP(scaled.parameters(), lr=0.1, epsilon=10.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt_plain.step(loss_closure(plain, x, y))
    loss_closure(scaled, x, y, scaler)()
    opt_scaled.first_step(zero_grad=True, scaler=scaler)
    loss_closure(scaled, x, y, scaler)()
    opt_scaled.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    for a, b in zip(snapshot(plain), snapshot(scaled)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- 3. BatchNorm statistics ------------------------------------------------------------------------------------
def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def bn_buffers(model):
    bn = model[1]
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_stats_from_the_unperturbed_pass_only(backend, momentum):
    x, y = data()
    model = bn_net()
    model[1].momentum = momentum
    erm = copy.deepcopy(model)
    erm(x)  # one ERM forward
    expected = bn_buffers(erm)

    opt = AMP(model.parameters(), lr=0.1, epsilon=0.5, inner_iter=2, model=model, bn_stats="unperturbed",
              backend=backend)
    opt.step(loss_closure(model, x, y))
    for a, b in zip(bn_buffers(model), expected):
        assert torch.equal(a, b)
    assert model[1].momentum == momentum  # restored

    default = bn_net()
    default[1].momentum = momentum
    AMP(default.parameters(), lr=0.1, epsilon=0.5, inner_iter=2, backend=backend).step(loss_closure(default, x, y))
    mean, _, count = bn_buffers(default)
    assert count.item() == 3 and (mean - expected[0]).abs().max() > 1e-4  # default: every pass updates


def test_bn_stats_needs_the_model():
    with pytest.raises(ValueError, match="pass model=<nn.Module>"):
        AMP(bn_net().parameters(), lr=0.1, epsilon=0.1, bn_stats="unperturbed")
    with pytest.raises(ValueError, match="bn_stats must be one of 'all', 'unperturbed'"):
        AMP(bn_net().parameters(), lr=0.1, epsilon=0.1, bn_stats="first")
    with pytest.raises(ValueError, match="sync_ascent=False needs a DistributedDataParallel model"):
        model = bn_net()
        AMP(model.parameters(), lr=0.1, epsilon=0.1, model=model, sync_ascent=False)


# -- 6. gradient accumulation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_gradient_accumulation_equals_the_large_batch_step(backend, norm):
    x, y = data(n=32, dtype=torch.float64)
    big, small = mlp(torch.float64), mlp(torch.float64)
    kwargs = dict(lr=0.1, epsilon=0.05, momentum=0.9, norm=norm, backend=backend)
    opt_big, opt_small = AMP(big.parameters(), **kwargs), AMP(small.parameters(), **kwargs)
    for _ in range(2):
        opt_big.step(loss_closure(big, x, y))

        def accumulate():
            for xb, yb in zip(x.chunk(4), y.chunk(4)):
                (nn.functional.cross_entropy(small(xb), yb) / 4).backward()

        opt_small.zero_grad()
        accumulate()
        opt_small.first_step(zero_grad=True)
        accumulate()
        opt_small.second_step(zero_grad=True)
    for a, b in zip(snapshot(big), snapshot(small)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(snapshot(big), snapshot(mlp(torch.float64))))
