"""The AMP optimizer as a torch.optim.Optimizer: arguments, closures, the two-call API, param groups,
schedulers, state dicts and never leaving the parameters perturbed."""
import pytest
import torch

from amp_fused import AMP, available_backends

BACKENDS = available_backends("cpu")
EXACT = [b for b in BACKENDS if b != "reference"]


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def make_batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)


def closure_for(model, batch, calls=None):
    x, y = batch

    def closure():
        if calls is not None:
            calls.append([p.detach().clone() for p in model.parameters()])
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        return out, loss

    return closure


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# -- arguments -----------------------------------------------------------------------------------------
BAD_ARGS = [
    (dict(epsilon=-0.1), ValueError, "epsilon must be a finite number >= 0"),
    (dict(epsilon=float("nan")), ValueError, "epsilon must be a finite number >= 0"),
    (dict(epsilon="0.1"), ValueError, "epsilon must be a finite number >= 0"),
    (dict(inner_lr=-1.0), ValueError, "inner_lr must be a finite number >= 0"),
    (dict(inner_iter=-1), ValueError, "inner_iter must be an int >= 0"),
    (dict(inner_iter=1.5), ValueError, "inner_iter must be an int >= 0"),
    (dict(inner_iter=True), ValueError, "inner_iter must be an int >= 0"),
    (dict(norm="layer"), ValueError, "norm must be one of 'per_tensor', 'global'"),
    (dict(backend="numpy"), ValueError, "backend must be one of 'auto', 'reference', 'foreach'"),
    (dict(backend="cuda"), ValueError, "backend 'cuda' is not available on this machine"),
    (dict(base_optimizer="SGD"), TypeError, "base_optimizer must be a torch.optim.Optimizer subclass"),
    (dict(base_optimizer=torch.nn.Linear), TypeError, "base_optimizer must be a torch.optim.Optimizer subclass"),
]


@pytest.mark.parametrize("kwargs,exc,message", BAD_ARGS, ids=[str(a[0]) for a in BAD_ARGS])
def test_bad_arguments_name_the_argument_and_allowed_values(kwargs, exc, message):
    if kwargs.get("backend") == "cuda" and torch.cuda.is_available():
        pytest.skip("the CUDA backend may be available on a GPU machine")
    args = dict(lr=0.1, epsilon=0.1)
    args.update(kwargs)
    with pytest.raises(exc, match=message):
        AMP(make_model().parameters(), **args)


def test_base_optimizer_rejects_its_own_bad_kwargs():
    with pytest.raises(TypeError):
        AMP(make_model().parameters(), lr=0.1, epsilon=0.1, betas=(0.9, 0.99))  # SGD has no betas


def test_bad_group_epsilon_is_rejected():
    model = make_model()
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0 in a param group"):
        AMP([{"params": model.parameters(), "epsilon": -1.0}], lr=0.1, epsilon=0.1)


@pytest.mark.parametrize("closure,exc,message", [
    (None, ValueError, "AMP.step needs a closure"),
    ("loss", TypeError, "closure must be callable"),
    (lambda: None, TypeError, "closure must return the loss tensor or an \\(outputs, loss\\) pair"),
    (lambda: (1, 2, 3), TypeError, "closure must return the loss tensor or an \\(outputs, loss\\) pair"),
    (lambda: (torch.zeros(1), 0.5), TypeError, "closure must return the loss tensor or an \\(outputs, loss\\) pair"),
])
def test_bad_closures(closure, exc, message):
    model = make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.1)
    before = flat(model)
    with pytest.raises(exc, match=message):
        opt.step(closure)
    assert torch.equal(flat(model), before)


def test_global_norm_needs_one_epsilon():
    model = make_model()
    opt = AMP([{"params": model[0].parameters(), "epsilon": 0.2}, {"params": model[2].parameters()}],
              lr=0.1, epsilon=0.1, norm="global")
    with pytest.raises(ValueError, match="every param group must use the same epsilon and inner_lr"):
        opt.step(closure_for(model, make_batch()))


# -- closure API -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner_iter", [0, 1, 3])
def test_closure_calls_and_return_value(backend, inner_iter):
    model, batch = make_model(), make_batch()
    calls = []
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, inner_iter=inner_iter, backend=backend)
    theta = flat(model)
    out, loss = opt.step(closure_for(model, batch, calls))
    assert len(calls) == 1 + inner_iter
    # the first call ran at θ, every later one at a perturbed point
    assert torch.equal(torch.cat([c.flatten() for c in calls[0]]), theta)
    for c in calls[1:]:
        assert not torch.equal(torch.cat([t.flatten() for t in c]), theta)
    # step returns the first call's outputs and loss, detached
    assert not out.requires_grad and not loss.requires_grad
    ref_model = make_model()
    torch.testing.assert_close(out, ref_model(batch[0]), rtol=0, atol=0)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(ref_model(batch[0]), batch[1]), rtol=0, atol=0)


def test_closure_returning_only_the_loss():
    model, (x, y) = make_model(), make_batch()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05)

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and not loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_call_api_equals_closure_api(backend):
    batch = make_batch()
    results = []
    for mode in ("closure", "two_call"):
        model = make_model()
        opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, inner_iter=2, momentum=0.9, backend=backend)
        for _ in range(3):
            if mode == "closure":
                opt.step(closure_for(model, batch))
            else:
                opt.zero_grad()
                closure_for(model, batch)()
                opt.first_step(zero_grad=True)
                closure_for(model, batch)()
                opt.first_step(zero_grad=True)
                closure_for(model, batch)()
                opt.second_step(zero_grad=True)
        results.append(flat(model))
    assert torch.equal(results[0], results[1])
    assert (results[0] - flat(make_model())).abs().max() > 1e-2


def test_second_step_without_first_step_raises_and_changes_nothing():
    model = make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05)
    closure_for(model, make_batch())()
    before = flat(model)
    with pytest.raises(RuntimeError, match="second_step\\(\\) needs a preceding first_step\\(\\)"):
        opt.second_step()
    assert torch.equal(flat(model), before)


# -- never left perturbed -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fail_on_call", [1, 2, 3])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_params_restored_when_closure_raises(backend, fail_on_call, error):
    model, batch = make_model(), make_batch()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, inner_iter=2, momentum=0.9, backend=backend)
    opt.step(closure_for(model, batch))  # a normal step first, so momentum state exists
    theta = flat(model)
    calls = []
    inner = closure_for(model, batch)

    def failing():
        calls.append(1)
        if len(calls) == fail_on_call:
            raise error("boom")
        return inner()

    with pytest.raises(error, match="boom"):
        opt.step(failing)
    restored = flat(model)
    if backend == "reference":
        torch.testing.assert_close(restored, theta, rtol=0, atol=1e-6)  # subtract-back restore
    else:
        assert torch.equal(restored, theta)
    # usable afterwards, and the next step moves the parameters
    opt.step(closure_for(model, batch))
    assert not torch.equal(flat(model), theta)


# -- param groups, schedulers, zero_grad --------------------------------------------------------------------
def test_param_groups_are_shared_with_the_base_optimizer():
    model = make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    group = opt.param_groups[0]
    assert group["epsilon"] == 0.05 and group["inner_lr"] == 1.0 and group["momentum"] == 0.9
    extra = torch.nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.param_groups[1]["epsilon"] == 0.05 and opt.param_groups[1]["momentum"] == 0.9
    extra.grad = torch.ones(3)
    before = extra.detach().clone()
    closure = closure_for(model, make_batch())

    def with_extra():
        extra.grad = torch.ones(3)
        return closure()

    opt.step(with_extra)
    torch.testing.assert_close(extra.detach(), before - 0.5, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", EXACT)
def test_lr_scheduler_drives_the_base_step(backend):
    model, batch = make_model(), make_batch()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    before = flat(model)
    opt.step(closure_for(model, batch))
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    after_one = flat(model)
    assert not torch.equal(after_one, before)
    opt.step(closure_for(model, batch))
    assert torch.equal(flat(model), after_one)  # lr 0: θ restored bit-exactly and not moved


def test_zero_grad_sets_none():
    model = make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05)
    closure_for(model, make_batch())()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_params_without_grad_are_left_alone():
    model = make_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9)
    before = frozen.detach().clone()
    calls = []
    opt.step(closure_for(model, make_batch(), calls))
    assert torch.equal(calls[1][0], before) and torch.equal(frozen, before)


# -- state dicts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_resume_from_state_dict_is_exact(backend, norm, tmp_path):
    batches = [make_batch(seed) for seed in range(6)]

    def build():
        model = make_model()
        opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, norm=norm, momentum=0.9, nesterov=True,
                  weight_decay=1e-3, backend=backend)
        return model, opt

    model, opt = build()
    for b in batches:
        opt.step(closure_for(model, b))
    uninterrupted = flat(model)

    model, opt = build()
    for b in batches[:3]:
        opt.step(closure_for(model, b))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    model, opt = build()
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert opt.param_groups is opt.base_optimizer.param_groups
    for b in batches[3:]:
        opt.step(closure_for(model, b))
    assert torch.equal(flat(model), uninterrupted)


def test_state_dict_is_interchangeable_with_plain_sgd():
    model, batch = make_model(), make_batch()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9)
    opt.step(closure_for(model, batch))
    state = opt.state_dict()
    assert state["amp"] == {"inner_iter": 1, "norm": "per_tensor", "perturb_every": 1, "between": "erm", "steps": 1,
                            "reuse_alpha": 0.7, "adaptive_threshold": 0.5, "adaptive_decay": 0.9,
                            "trigger_mean": None, "trigger_var": 0.0, "reuse_delta": {}, "orthogonals": {}}
    assert set(state["state"]) == set(range(4)) and all("momentum_buffer" in s for s in state["state"].values())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd.load_state_dict(state)
    for p in model.parameters():
        assert torch.equal(sgd.state[p]["momentum_buffer"], opt.base_optimizer.state[p]["momentum_buffer"])
    # and back: a plain SGD state dict loads into AMP, which fills in its own defaults
    fresh = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9)
    fresh.load_state_dict(sgd.state_dict())
    assert fresh.param_groups[0]["epsilon"] == 0.05 and fresh.param_groups[0]["inner_lr"] == 1.0
    fresh.step(closure_for(model, batch))


def test_load_state_dict_while_perturbed_raises():
    model = make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05)
    closure_for(model, make_batch())()
    opt.first_step()
    with pytest.raises(RuntimeError, match="while the parameters are perturbed"):
        opt.load_state_dict(opt.state_dict())
    opt.restore()


def test_last_norms_reports_delta_norms():
    model = make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=1e6, inner_lr=0.5)
    closure_for(model, make_batch())()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.first_step()
    expected = torch.stack([0.5 * g.norm() for g in grads])
    torch.testing.assert_close(opt.last_norms[:-1], expected)
    torch.testing.assert_close(opt.last_norms[-1], expected.norm())
    opt.restore()


@pytest.mark.parametrize("backend", EXACT)
def test_restore_on_error_context_manager(backend):
    model, batch = make_model(), make_batch()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, backend=backend)
    theta = flat(model)
    with pytest.raises(ValueError, match="user error"):
        with opt.restore_on_error():
            closure_for(model, batch)()
            opt.first_step(zero_grad=True)
            assert not torch.equal(flat(model), theta)
            raise ValueError("user error")
    assert torch.equal(flat(model), theta)
    with opt.restore_on_error():  # and the happy path steps normally
        closure_for(model, batch)()
        opt.first_step(zero_grad=True)
        closure_for(model, batch)()
        opt.second_step(zero_grad=True)
    assert not torch.equal(flat(model), theta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_non_finite_ascent_gradient_is_reported_and_kept_out(backend, norm):
    model, batch = make_model(), make_batch()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, norm=norm, backend=backend)
    assert opt.last_ascent_nonfinite is None
    calls = []
    inner = closure_for(model, batch, calls)

    def closure():
        result = inner()
        if len(calls) == 1:
            model[0].weight.grad[0, 0] = float("nan")  # only the ascent gradient is poisoned
        return result

    theta = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert bool(opt.last_ascent_nonfinite)
    perturbed_at = calls[1]
    for i, (at, t) in enumerate(zip(perturbed_at, theta)):
        assert torch.isfinite(at).all()
        if i == 0 or norm == "global":
            assert torch.equal(at, t)  # Δ dropped for this tensor
        else:
            assert not torch.equal(at, t)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.step(closure_for(model, batch))
    assert not bool(opt.last_ascent_nonfinite)
