"""How users really hold an optimizer: the failures of 0.1.0 that lost weights or gave wrong results, each a
regression test (every one of them failed on 0.1.0), on every CPU backend where the case applies."""
import copy
import io
import pickle

import numpy as np
import pytest
import torch

from amp_fused import AMP, available_backends, functional
from op_definition import projection_scale

BACKENDS = available_backends("cpu")
EXACT = [b for b in BACKENDS if b != "reference"]  # reference subtracts Δ back, as the original does
SPARSE_MESSAGE = r"sparse gradients \(e\.g\. nn\.Embedding\(sparse=True\)\) are not supported"


def snapshot(params):
    return [p.detach().clone() for p in params]


def assert_bit_identical(params, saved):
    for p, s in zip(params, saved):
        assert torch.equal(p.detach(), s), "a parameter changed"


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def conv_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Tanh(), torch.nn.Conv2d(8, 4, 3),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))


def closure_for(model, x, y):
    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def batch(shape=(16, 6), seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype), torch.randint(0, 3, (shape[0],), generator=gen)


# -- 1. weights never destroyed; the user sees the original error ----------------------------------------------
def sparse_model():
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(1000, 64, sparse=True), torch.nn.Linear(64, 1)
    x = torch.randint(0, 1000, (8,))

    def closure():
        loss = lin(emb(x)).pow(2).mean()
        loss.backward()
        return loss
    return emb, lin, closure


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_sparse_gradient_is_rejected_before_anything_is_written(backend):
    emb, lin, closure = sparse_model()
    params = [*emb.parameters(), *lin.parameters()]
    opt = AMP(params, lr=0.1, epsilon=0.05, backend=backend)
    saved = snapshot(params)
    with pytest.raises(TypeError, match=SPARSE_MESSAGE):
        opt.step(closure)
    assert_bit_identical(params, saved)
    assert not opt.is_perturbed
    closure()  # the two-call API: the same error, and restore() after it changes nothing
    with pytest.raises(TypeError, match=SPARSE_MESSAGE):
        with opt.restore_on_error():
            opt.first_step()
    opt.restore()
    assert_bit_identical(params, saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_ascent_failing_in_a_later_group_restores_the_earlier_groups(backend):
    emb, lin, closure = sparse_model()
    # the dense group comes first, so its perturb_ call has run when the sparse group's fails
    opt = AMP([{"params": list(lin.parameters())}, {"params": list(emb.parameters())}], lr=0.1, epsilon=0.05,
              backend=backend)
    saved = snapshot([*lin.parameters(), *emb.parameters()])
    with pytest.raises(TypeError, match=SPARSE_MESSAGE):
        opt.step(closure)
    assert_bit_identical([*lin.parameters(), *emb.parameters()], saved)


@pytest.mark.parametrize("backend", EXACT)
def test_a_failure_in_a_later_ascent_restores_theta_bit_for_bit(backend, monkeypatch):
    model = mlp()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, inner_iter=3, backend=backend)
    saved = snapshot(model.parameters())
    real, calls = functional.perturb_, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("kernel failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "perturb_", failing)
    with pytest.raises(RuntimeError, match="kernel failed"):
        opt.step(closure_for(model, *batch()))
    assert len(calls) == 2
    assert_bit_identical(model.parameters(), saved)
    assert not opt.is_perturbed


@pytest.mark.parametrize("backend", EXACT)
def test_the_original_error_is_raised_when_restoring_fails_too(backend, monkeypatch):
    model = mlp()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, backend=backend)
    saved = snapshot(model.parameters())
    x, y = batch()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("user bug")
        return closure_for(model, x, y)()

    real_restore = functional.restore_
    monkeypatch.setattr(functional, "restore_", lambda *a, **k: (_ for _ in ()).throw(OSError("device lost")))
    with pytest.raises(KeyError, match="user bug") as info:
        opt.step(closure)
    assert any("putting θ back after this error failed as well" in note and "device lost" in note
               for note in getattr(info.value, "__notes__", []))
    assert opt.is_perturbed  # the state says what is true: still perturbed, and restore() can still put θ back
    monkeypatch.setattr(functional, "restore_", real_restore)
    opt.restore()
    assert_bit_identical(model.parameters(), saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_in_another_layout_than_its_parameter_is_used_as_is(backend):
    def run(channels_last_grad):
        model = conv_net()
        opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9, backend=backend)
        x, y = batch((4, 3, 8, 8))

        def closure():
            loss = closure_for(model, x, y)()
            if channels_last_grad:
                w = model[0].weight
                w.grad = w.grad.contiguous(memory_format=torch.channels_last)
                assert w.grad.stride() != w.stride()
            return loss
        for _ in range(2):
            opt.step(closure)
        return snapshot(model.parameters())

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- 2. duplicate parameters ---------------------------------------------------------------------------
def test_duplicate_parameters_are_rejected_at_construction_and_in_add_param_group():
    w = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="the same tensor is listed twice"):
        AMP([w, w], lr=0.0, epsilon=0.05)
    v = torch.nn.Parameter(torch.zeros(3))
    opt = AMP([v], lr=0.0, epsilon=0.05)
    with pytest.raises(ValueError, match="the same tensor is listed twice"):
        opt.add_param_group({"params": [w, w]})
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [v]})


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_sharing_memory_are_rejected_before_any_write(backend):
    storage = torch.zeros(8)
    a, b = torch.nn.Parameter(storage[:6]), torch.nn.Parameter(storage[2:])  # overlapping views, distinct tensors
    a.grad, b.grad = torch.ones(6), torch.ones(6)
    opt = AMP([a, b], lr=0.0, epsilon=0.05, backend=backend)
    with pytest.raises(ValueError, match=r"share memory"):
        opt.first_step()
    assert torch.equal(storage, torch.zeros(8))


# -- 3. no silent continuation while perturbed ---------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_and_state_dict_while_a_first_step_is_pending_raise_and_change_nothing(backend):
    model = mlp()
    x, y = batch()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, backend=backend)
    closure_for(model, x, y)()
    opt.first_step(zero_grad=True)
    perturbed = snapshot(model.parameters())
    for call in (lambda: opt.step(closure_for(model, x, y)), opt.state_dict, lambda: copy.deepcopy(opt),
                 lambda: opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})):
        with pytest.raises(RuntimeError, match="while the parameters are perturbed"):
            call()
        assert_bit_identical(model.parameters(), perturbed)
        assert opt.is_perturbed
    opt.restore()


# -- 4. one place for the state: deepcopy, pickle, Lightning-style wrappers --------------------------------
def train(opt, model, steps, seed=1):
    for i in range(steps):
        opt.step(closure_for(model, *batch(seed=seed + i)))


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_continues_exactly_like_the_original(backend, how):
    model = mlp()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9, backend=backend, perturb_every=2,
              between="reuse")
    train(opt, model, 3)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)  # pickles both, sharing the parameters
        buffer.seek(0)
        model2, opt2 = torch.load(buffer, weights_only=False)
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    assert opt2.base_optimizer.param_groups is opt2.param_groups and opt2.base_optimizer.state is opt2.state
    train(opt, model, 3, seed=10)
    train(opt2, model2, 3, seed=10)
    assert_bit_identical(model2.parameters(), snapshot(model.parameters()))
    assert opt2.steps == opt.steps == 6


class LightningStyleWrapper:
    """What Lightning's LightningOptimizer does: a dynamic subclass of the wrapped optimizer's class whose
    instance holds a few attributes of its own and forwards every other read to the optimizer, so the
    optimizer's methods run with ``self`` = the wrapper."""

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self.__class__ = type("Lightning" + optimizer.__class__.__name__, (self.__class__, optimizer.__class__), {})

    def __getattr__(self, item):
        return getattr(self._optimizer, item)


@pytest.mark.parametrize("backend", EXACT)
def test_a_wrapper_that_runs_the_methods_sees_and_updates_the_one_state(backend):
    def run(wrapped, resume):
        model = mlp()
        opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9, backend=backend)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        handle = LightningStyleWrapper(opt) if wrapped else opt
        for i in range(4):
            if resume and i == 2:  # a checkpoint resume into a fresh optimizer, as Lightning does it
                state, sched_state = opt.state_dict(), sched.state_dict()
                opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9, backend=backend)
                sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
                handle = LightningStyleWrapper(opt) if wrapped else opt
                opt.load_state_dict(state)  # on the real optimizer, after the wrapper exists
                sched.load_state_dict(sched_state)
            closure = closure_for(model, *batch(seed=i))
            closure()
            handle.first_step(zero_grad=True)
            assert opt.is_perturbed  # the ascent's state is the real optimizer's
            closure()
            handle.second_step(zero_grad=True)
            sched.step()
        return snapshot(model.parameters()), handle.param_groups[0]["lr"]

    plain, plain_lr = run(wrapped=False, resume=True)
    wrapped, wrapped_lr = run(wrapped=True, resume=True)
    assert wrapped_lr == plain_lr == 0.1 * 0.5 ** 4
    assert_bit_identical(wrapped, plain)


@pytest.mark.parametrize("backend", EXACT)
def test_restore_on_the_real_optimizer_undoes_a_wrapper_first_step(backend):
    model = mlp()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, backend=backend)
    saved = snapshot(model.parameters())
    closure_for(model, *batch())()
    LightningStyleWrapper(opt).first_step()
    assert not torch.equal(model[0].weight, saved[0])
    opt.restore()
    assert_bit_identical(model.parameters(), saved)


# -- 5. layout and dtype changes mid-training ----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("between", ["erm", "reuse"])
def test_channels_last_mid_training_continues_like_contiguous(backend, between):
    def run(switch):
        model = conv_net()
        opt = AMP(model.parameters(), lr=0.05, epsilon=0.05, momentum=0.9, backend=backend, perturb_every=2,
                  between=between)
        x, y = batch((4, 3, 8, 8))
        for i in range(5):
            if switch and i == 2:
                model.to(memory_format=torch.channels_last)
                assert model[0].weight.stride() != (27, 9, 3, 1)
            opt.step(closure_for(model, x.contiguous(memory_format=torch.channels_last) if switch and i >= 2 else x, y))
        return snapshot(model.parameters())

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_a_contiguous_checkpoint_into_a_channels_last_model(backend):
    model = conv_net()
    opt = AMP(model.parameters(), lr=0.05, epsilon=0.05, momentum=0.9, backend=backend)
    x, y = batch((4, 3, 8, 8))
    train_steps = 2
    for _ in range(train_steps):
        opt.step(closure_for(model, x, y))
    checkpoint = copy.deepcopy((model.state_dict(), opt.state_dict()))
    control = copy.deepcopy(model)
    control_opt = AMP(control.parameters(), lr=0.05, epsilon=0.05, momentum=0.9, backend=backend)
    control_opt.load_state_dict(copy.deepcopy(checkpoint[1]))  # loading shares tensors with the dict loaded

    model = conv_net(seed=5).to(memory_format=torch.channels_last)
    model.load_state_dict(checkpoint[0])
    opt = AMP(model.parameters(), lr=0.05, epsilon=0.05, momentum=0.9, backend=backend)
    opt.load_state_dict(checkpoint[1])
    assert opt.state[model[0].weight]["momentum_buffer"].is_contiguous()  # as loaded
    for _ in range(2):
        opt.step(closure_for(model, x, y))
        control_opt.step(closure_for(control, x, y))
    for a, b in zip(model.parameters(), control.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.state[model[0].weight]["momentum_buffer"].stride() == model[0].weight.stride()


@pytest.mark.parametrize("between", ["erm", "reuse"])
def test_model_double_mid_training_continues_on_every_backend(between):
    finals = {}
    for backend in BACKENDS:
        model = mlp()
        opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9, backend=backend, perturb_every=2,
                  between=between)
        x, y = batch()
        for i in range(5):
            if i == 2:
                model.double()
            opt.step(closure_for(model, x.double() if i >= 2 else x, y))
        assert all(p.dtype == torch.float64 for p in model.parameters())
        assert all(s["momentum_buffer"].dtype == torch.float64 for s in opt.state.values())
        finals[backend] = snapshot(model.parameters())
    for backend in BACKENDS:  # every backend continued, and they agree
        for a, b in zip(finals[backend], finals["foreach"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- 6. complex parameters --------------------------------------------------------------------------------------
def complex_problem(dtype=torch.complex64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, generator=gen, dtype=torch.complex128).to(dtype)
    x = torch.randn(7, 5, generator=gen, dtype=torch.complex128).to(dtype)
    y = torch.randn(7, 3, generator=gen, dtype=torch.complex128).to(dtype)
    return w, x, y


def complex_loss(w, x, y):
    return (x @ w - y).abs().pow(2).mean()


def expected_complex_step(w, x, y, lr, epsilon, inner_lr, momentum_steps=1):
    """One AMP step on a complex tensor, from the definition in float64: the real view's norm is
    sqrt(Σ|g|²), torch.optim's convention for complex gradients is ∂L/∂Re + i·∂L/∂Im."""
    w = w.to(torch.complex128).clone().requires_grad_()
    x, y = x.to(torch.complex128), y.to(torch.complex128)
    g = torch.autograd.grad(complex_loss(w, x, y), w)[0]
    delta = inner_lr * g
    norm = torch.sqrt((delta.real ** 2 + delta.imag ** 2).sum()).item()
    delta = delta * projection_scale(epsilon, norm)
    g_adv = torch.autograd.grad(complex_loss(w + delta, x, y), w)[0]
    return (w - lr * g_adv).detach(), norm, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epsilon", [0.05, 100.0])  # projected, and not
def test_complex_parameters_match_the_float64_definition(backend, epsilon):
    w0, x, y = complex_problem()
    w = torch.nn.Parameter(w0.clone())
    opt = AMP([w], lr=0.1, epsilon=epsilon, inner_lr=0.5, backend=backend)

    def closure():
        loss = complex_loss(w, x, y)
        loss.backward()
        return loss

    opt.step(closure)
    expected, norm, g = expected_complex_step(w0, x, y, lr=0.1, epsilon=epsilon, inner_lr=0.5)
    torch.testing.assert_close(opt.last_norms[0].item(), norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(w.detach().to(torch.complex128), expected, rtol=1e-5, atol=1e-6)
    # the imaginary part matters: a step that ignores it (the real part's norm only) is far off
    real_only = (0.5 * g.real).norm().item()
    assert abs(real_only - norm) > 1e3 * 1e-5 * norm


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_parameters_with_momentum_sgd_match_the_real_view(backend):
    w0, x, y = complex_problem()
    results = []
    for as_complex in (True, False):
        w = torch.nn.Parameter(w0.clone() if as_complex else torch.view_as_real(w0.clone()).clone())
        opt = AMP([w], lr=0.1, epsilon=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True, backend=backend)

        def closure():
            loss = complex_loss(w if as_complex else torch.view_as_complex(w), x, y)
            loss.backward()
            return loss
        for _ in range(3):
            opt.step(closure)
        results.append(torch.view_as_real(w.detach()) if as_complex else w.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0], torch.view_as_real(w0))


# -- 7. overflow ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_huge_inner_lr_with_finite_gradients_moves_to_the_ball_surface(backend):
    model = mlp()
    opt = AMP(model.parameters(), lr=0.0, epsilon=0.05, inner_lr=1e20, backend=backend)
    closure = closure_for(model, *batch())
    closure()
    grads = [p.grad.detach().double().clone() for p in model.parameters()]
    saved = snapshot(model.parameters())
    opt.first_step()
    assert not opt.last_ascent_nonfinite
    for p, s, g in zip(model.parameters(), saved, grads):  # Δ = ε·g/‖g‖ for each tensor
        torch.testing.assert_close((p.detach().double() - s.double()), 0.05 * g / g.norm(), rtol=1e-4, atol=1e-7)
    opt.restore()


# -- 9. torch.optim conventions ---------------------------------------------------------------------------------
def test_state_dict_hooks_fire():
    model = mlp()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9)
    train(opt, model, 1)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append(("pre", o)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(("load_pre", sd.pop("tag"))))
    opt.register_load_state_dict_post_hook(lambda o: seen.append(("load_post", o)))
    state = opt.state_dict()
    assert state["tag"] == 1 and seen == [("pre", opt)]
    opt.load_state_dict(state)
    assert seen[1:] == [("load_pre", 1), ("load_post", opt)]


def test_opt_state_is_the_base_optimizers_state():
    model = mlp()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9)
    train(opt, model, 2)
    buffer = opt.state[model[0].weight]["momentum_buffer"]
    assert buffer is opt.base_optimizer.state[model[0].weight]["momentum_buffer"]
    assert set(opt.state[model[0].weight]) == {"momentum_buffer"}  # AMP's own buffers are not SGD's state
    assert torch.count_nonzero(buffer) > 0


def test_numpy_and_tensor_scalars_are_accepted():
    model = mlp()
    opt = AMP(model.parameters(), lr=0.1, epsilon=np.float32(0.1), inner_lr=np.float64(0.5))
    assert opt.param_groups[0]["epsilon"] == pytest.approx(0.1) and type(opt.param_groups[0]["epsilon"]) is float
    train(opt, model, 1)
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        AMP(model.parameters(), lr=0.1, epsilon=np.float32(-1))


def test_a_base_optimizer_that_needs_a_closure_is_rejected_up_front():
    with pytest.raises(TypeError, match="base_optimizer LBFGS needs a closure"):
        AMP(mlp().parameters(), lr=0.1, epsilon=0.05, base_optimizer=torch.optim.LBFGS)


def test_load_state_dict_takes_the_checkpoints_settings():
    model = mlp()
    saved = AMP(model.parameters(), lr=0.1, epsilon=0.05, inner_iter=2, norm="global", perturb_every=3,
                between="reuse")
    train(saved, model, 1)
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05)
    opt.load_state_dict(saved.state_dict())
    assert (opt.inner_iter, opt.norm, opt.perturb_every, opt.between, opt.steps) == (2, "global", 3, "reuse", 1)
    bad = saved.state_dict()
    bad["amp"]["norm"] = "layer"
    fresh = AMP(model.parameters(), lr=0.2, epsilon=0.05)
    with pytest.raises(ValueError, match="norm must be one of"):
        fresh.load_state_dict(bad)
    assert fresh.param_groups[0]["lr"] == 0.2 and fresh.norm == "per_tensor"  # nothing was loaded
