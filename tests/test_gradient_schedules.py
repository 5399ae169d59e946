"""The schedules toward ERM cost: between="gradient" (LookSAM's gradient reuse) and perturb_every="adaptive"
(AE-SAM's trigger), checked against float64 computations written here from the papers' formulas."""
import copy
import math

import pytest
import torch
from torch.func import functional_call

from amp_fused import AMP, SAM, available_backends

BACKENDS = available_backends("cpu")


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def batch(seed, size=24):
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randn(size, 5, generator=gen), torch.randint(0, 3, (size,), generator=gen)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def loss_of(model, data):
    x, y = data
    return torch.nn.functional.cross_entropy(model(x), y)


def recording_closure(model, data, log):
    """Logs (parameters, gradient) of every call."""
    def closure():
        loss = loss_of(model, data)
        loss.backward()
        log.append((params_of(model), [p.grad.detach().clone() for p in model.parameters()]))
        return loss
    return closure


def gradient_at(model, params, data):
    """∇L at ``params`` in float64, computed apart from the optimizer."""
    names = [name for name, _ in model.named_parameters()]
    wide = {n: p.detach().double().requires_grad_() for n, p in zip(names, params)}
    x, y = data
    loss = torch.nn.functional.cross_entropy(functional_call(model.double(), wide, (x.double(),)), y)
    model.float()
    return list(torch.autograd.grad(loss, list(wide.values())))


def assert_close_as_vectors(actual, expected, rtol):
    """‖actual − expected‖ ≤ rtol·‖expected‖ over the whole list, in float64."""
    error = math.sqrt(sum(float((a.double() - e).square().sum()) for a, e in zip(actual, expected)))
    size = math.sqrt(sum(float(e.square().sum()) for e in expected))
    assert error <= rtol * size, (error, size)


def groups_of(tensors, norm):
    return [[i] for i in range(len(tensors))] if norm == "per_tensor" else [list(range(len(tensors)))]


def looksam_orthogonal(delta, g_s, norm):
    """g_v = g_s − (⟨Δ, g_s⟩/‖Δ‖²)·Δ, per tensor or over all tensors."""
    out = [None] * len(delta)
    for members in groups_of(delta, norm):
        dot = sum(float((delta[i] * g_s[i]).sum()) for i in members)
        square = sum(float(delta[i].square().sum()) for i in members)
        for i in members:
            out[i] = g_s[i] - (dot / square) * delta[i]
    return out


def looksam_gradient(g, g_v, alpha, norm):
    """g + α·(‖g‖/‖g_v‖)·g_v, per tensor or over all tensors."""
    out = [None] * len(g)
    for members in groups_of(g, norm):
        g_norm = math.sqrt(sum(float(g[i].square().sum()) for i in members))
        v_norm = math.sqrt(sum(float(g_v[i].square().sum()) for i in members))
        for i in members:
            out[i] = g[i] + alpha * g_norm / v_norm * g_v[i]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_gradient_steps_follow_looksam(backend, norm):
    """perturb_every=3, between="gradient": a full AMP step, then two steps of one pass at θ each, stepping with
    g + α·(‖g‖/‖g_v‖)·g_v, g_v the part of the full step's gradient at θ + Δ orthogonal to Δ."""
    model, alpha, lr = make_model(), 0.7, 0.1
    opt = AMP(model.parameters(), lr=lr, epsilon=0.05, norm=norm, perturb_every=3, between="gradient",
              reuse_alpha=alpha, backend=backend)
    kinds, g_v = [], None
    for t in range(6):
        log, theta = [], params_of(model)
        opt.step(recording_closure(model, batch(t), log))
        kinds.append(opt.last_step_kind)
        if opt.last_step_kind == "amp":
            assert len(log) == 2 and all(torch.equal(a, b) for a, b in zip(log[0][0], theta))
            delta = [b.double() - a.double() for a, b in zip(theta, log[1][0])]
            g_s = gradient_at(model, log[1][0], batch(t))
            g_v = looksam_orthogonal(delta, g_s, norm)
            stepped = g_s
        else:
            assert len(log) == 1 and all(torch.equal(a, b) for a, b in zip(log[0][0], theta))  # one pass, at θ
            g = gradient_at(model, theta, batch(t))
            stepped = looksam_gradient(g, g_v, alpha, norm)
            added = math.sqrt(sum(float((s - a).square().sum()) for s, a in zip(stepped, g)))
            assert added > 0.3 * math.sqrt(sum(float(a.square().sum()) for a in g))  # the reuse is a real change
            # .grad is what the base optimizer stepped with (fp32 against float64: relative to the whole vector)
            # (g_v is a small difference of two nearly parallel fp32 vectors: its rounding is amplified by ‖g‖/‖g_v‖)
            assert_close_as_vectors([p.grad for p in model.parameters()], stepped, 2e-4)
        # plain SGD (no momentum) with that gradient
        assert_close_as_vectors(params_of(model), [t0.double() - lr * s for t0, s in zip(theta, stepped)], 1e-6)
    assert kinds == ["amp", "gradient", "gradient"] * 2


def ema_decisions(norms_squared, decay, threshold):
    """AE-SAM's trigger on a sequence of ‖g‖²: the first step full, then mean/var EMAs and x ≥ mean + c·√var."""
    mean, var, out = None, 0.0, []
    for x in norms_squared:
        if mean is None:
            mean, full = x, True
        else:
            mean = decay * mean + (1 - decay) * x
            var = decay * var + (1 - decay) * (x - mean) ** 2
            full = x >= mean + threshold * math.sqrt(var)
        out.append(full)
    return out, mean, var


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("between", ["erm", "gradient"])
def test_adaptive_trigger_follows_the_moving_statistics(backend, between):
    model = make_model()
    opt = AMP(model.parameters(), lr=0.2, epsilon=0.05, momentum=0.9, perturb_every="adaptive", between=between,
              adaptive_threshold=0.3, adaptive_decay=0.8, backend=backend)
    squares, kinds = [], []
    for t in range(24):
        log = []
        assert opt.next_step_kind() == ("amp" if t == 0 else "adaptive")
        opt.step(recording_closure(model, batch(t, size=8), log))  # small batches: a noisy ‖g‖²
        squares.append(sum(float(g.double().square().sum()) for g in log[0][1]))  # at θ: the first call
        kinds.append(opt.last_step_kind)
        assert len(log) == (2 if kinds[-1] == "amp" else 1)
    expected, mean, var = ema_decisions(squares, 0.8, 0.3)
    assert kinds == ["amp" if full else between for full in expected]
    assert 3 <= kinds.count("amp") <= 21  # both kinds happen
    state = opt.state_dict()["amp"]
    assert state["trigger_mean"] == pytest.approx(mean, rel=1e-6) and state["trigger_var"] == pytest.approx(var, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", [dict(perturb_every=3, between="gradient"),
                                      dict(perturb_every="adaptive", between="gradient"),
                                      dict(perturb_every="adaptive", between="erm")], ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_state_round_trips_bitwise_mid_cycle(backend, schedule, norm, tmp_path):
    def build():
        model = make_model()
        opt = AMP(model.parameters(), lr=0.05, epsilon=0.05, momentum=0.9, norm=norm, backend=backend,
                  adaptive_threshold=0.0, adaptive_decay=0.5, **schedule)
        return model, opt

    def train(model, opt, steps, first=0):
        kinds = []
        for t in range(first, first + steps):
            opt.step(recording_closure(model, batch(t, size=8), []))
            kinds.append(opt.last_step_kind)
        return kinds

    model, opt = build()
    uninterrupted_kinds = train(model, opt, 10)
    uninterrupted = params_of(model)
    assert "amp" in uninterrupted_kinds[5:] and schedule["between"] in uninterrupted_kinds[5:]

    model, opt = build()
    train(model, opt, 5)
    if schedule["perturb_every"] == 3:
        assert opt.last_step_kind == "gradient"  # stopped between two full steps, with g_v to carry
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    model, opt = build()
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert train(model, opt, 5, first=5) == uninterrupted_kinds[5:]
    for a, b in zip(params_of(model), uninterrupted):
        assert torch.equal(a, b)


def test_gradient_schedule_state_dict_holds_the_orthogonals():
    model = make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, perturb_every=2, between="gradient", reuse_alpha=0.5)
    opt.step(recording_closure(model, batch(0), []))
    entry = opt.state_dict()["amp"]
    assert entry["between"] == "gradient" and entry["reuse_alpha"] == 0.5 and entry["perturb_every"] == 2
    assert sorted(entry["orthogonals"]) == [0, 1, 2, 3]
    assert all(v.shape == p.shape for v, p in zip(entry["orthogonals"].values(), model.parameters()))
    fresh = AMP(make_model().parameters(), lr=0.1, epsilon=0.05)  # the checkpoint's settings win
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert (fresh.between, fresh.perturb_every, fresh.reuse_alpha) == ("gradient", 2, 0.5)
    assert fresh.next_step_kind() == "gradient"
    plain = torch.optim.SGD(make_model().parameters(), lr=0.1).state_dict()  # no g_v: a full step first
    fresh.load_state_dict(plain)
    assert fresh.next_step_kind() == "amp"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_and_adaptive_with_grad_scaler_equal_the_unscaled_run(backend):
    """With a GradScaler (a power-of-two scale, no overflow) every decision and every step is the unscaled run's:
    the trigger reads ‖g‖²/scale², and g + α‖g‖·g_v/‖g_v‖ is scale-free in g_v."""
    results = []
    for scaled in (False, True):
        model = make_model()
        opt = AMP(model.parameters(), lr=0.2, epsilon=0.05, perturb_every="adaptive", between="gradient",
                  adaptive_threshold=0.0, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000) if scaled else None
        kinds = []
        for t in range(10):
            x, y = batch(t, size=8)

            def closure():
                loss = loss_of(model, (x, y))
                (scaler.scale(loss) if scaled else loss).backward()
                return loss

            opt.step(closure, scaler=scaler)
            if scaled:
                scaler.update()
            kinds.append(opt.last_step_kind)
        results.append((kinds, params_of(model)))
    assert results[0][0] == results[1][0] and {"amp", "gradient"} <= set(results[0][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_complex_and_other_layout_gradients_take_the_reused_direction():
    """The in-between step writes .grad in place: a complex parameter's (through its real view) and a gradient left
    in another layout than its parameter (replaced by one in the parameter's layout) both reach the base step."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))
    k = torch.nn.Parameter(torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last))
    opt = AMP([w, k], lr=0.1, epsilon=0.05, perturb_every=2, between="gradient", backend="foreach")

    def closure():
        loss = (w.abs() ** 2).sum() + (k ** 3).sum()
        loss.backward()
        k.grad = k.grad.contiguous()  # another layout than k's
        return loss

    opt.step(closure)
    stored = {p: v.clone() for p, v in opt._amp.orthogonals.items()}
    before = [w.detach().clone(), k.detach().clone()]
    opt.zero_grad()
    closure()
    g = [torch.view_as_real(w.grad).double().clone(), k.grad.double().clone()]
    opt.zero_grad()
    opt.step(closure)
    assert opt.last_step_kind == "gradient"
    expected = looksam_gradient(g, [stored[w].double(), stored[k].double()], 0.7, "per_tensor")
    torch.testing.assert_close(torch.view_as_real(w.grad).double(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.grad.double(), expected[1], rtol=1e-5, atol=1e-6)
    assert k.grad.stride() == k.stride()
    torch.testing.assert_close(torch.view_as_real(w.detach()).double(),
                               torch.view_as_real(before[0]).double() - 0.1 * expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.detach().double(), before[1].double() - 0.1 * expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", [dict(perturb_every=2, between="gradient"),
                                      dict(perturb_every="adaptive", between="gradient")], ids=["k2", "adaptive"])
def test_sam_takes_the_schedules(schedule):
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, adaptive_threshold=-1e3, **schedule)
    kinds = []
    for t in range(4):
        log = []
        opt.step(recording_closure(model, batch(t), log))
        kinds.append(opt.last_step_kind)
        assert len(log) == (2 if kinds[-1] == "amp" else 1)
    assert kinds == ["amp", "gradient", "amp", "gradient"] if schedule["perturb_every"] == 2 else kinds == ["amp"] * 4
    assert all("perturb_every" in repr(opt) for _ in [0])


def test_an_error_in_a_gradient_step_leaves_theta_and_the_next_step_full():
    model = make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, perturb_every=3, between="gradient")
    opt.step(recording_closure(model, batch(0), []))
    theta = params_of(model)

    def failing():
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        opt.step(failing)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), theta)) and not opt.is_perturbed
    assert opt.next_step_kind() == "gradient"  # the stored g_v is intact: the failed call was not a step


@pytest.mark.parametrize("kwargs,message", [
    (dict(perturb_every="adaptive", between="reuse"), "perturb_every='adaptive' decides each step from the gradient"),
    (dict(perturb_every="adaptve"), "perturb_every must be an int >= 1 or 'adaptive', got 'adaptve'"),
    (dict(between="lookahead"), "between must be one of 'erm', 'reuse', 'gradient'"),
    (dict(reuse_alpha=-0.1), "reuse_alpha must be a finite number >= 0"),
    (dict(reuse_alpha=math.inf), "reuse_alpha must be a finite number >= 0"),
    (dict(adaptive_threshold=math.nan), "adaptive_threshold must be a finite number"),
    (dict(adaptive_decay=1.0), "adaptive_decay must be a finite number >= 0 and < 1"),
    (dict(adaptive_decay=-0.5), "adaptive_decay must be a finite number >= 0"),
])
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AMP(make_model().parameters(), lr=0.1, epsilon=0.1, **kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SAM(make_model().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_a_refused_pair_set_one_setting_at_a_time_raises_before_the_step():
    model = make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.1, perturb_every="adaptive")
    opt.between = "reuse"  # each setting is valid alone
    theta = params_of(model)
    with pytest.raises(ValueError, match="perturb_every='adaptive' decides each step"):
        opt.step(recording_closure(model, batch(0), []))
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), theta)) and opt.steps == 0
    with pytest.raises(ValueError, match="reuse_alpha must be a finite number >= 0"):
        opt.reuse_alpha = -1
    state = opt.state_dict()
    state["amp"]["adaptive_decay"] = 2.0
    with pytest.raises(ValueError, match="adaptive_decay must be"):
        opt.load_state_dict(state)
