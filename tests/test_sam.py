"""amp_fused.SAM and ASAM against an independent float64 implementation written from the papers, on every CPU
backend, with momentum SGD and AdamW as base optimizers; the API SAM users know; and what it shares with AMP
(schedules, resume, GradScaler, BatchNorm statistics, exception safety, bad input).

SAM (Foret et al., 2021): e = ρ·g/‖g‖ over all parameters, g' = ∇L(θ + e), base step from θ with g'.
ASAM (Kwon et al., 2021): T = |θ| + η, e = ρ·T²g/‖T·g‖.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import amp_fused
from amp_fused import SAM, available_backends

BACKENDS = [b for b in available_backends("cpu") if b != "triton"]  # triton: tests/triton (its interpreter)
RHO, LR, MOMENTUM, WD, ETA = 0.2, 0.1, 0.9, 1e-3, 0.01
STEPS = 4
# fp32 training against the float64 definition after STEPS steps; SAM differs from ERM (and ASAM from SAM) by
# more than FAR, a thousand times this.
TOL = dict(rtol=1e-5, atol=1e-6)
FAR = 1e-3


# -- the float64 definition -----------------------------------------------------------------------------------
def mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def batches(n=STEPS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def sam_perturbation(params, grads, rho, adaptive, eta):
    """e = ρ·T²g/‖T·g‖ over all tensors, T = |θ| + η (ASAM) or 1 (SAM); float64."""
    weights = [p.abs() + eta if adaptive else torch.ones_like(p) for p in params]
    norm = math.sqrt(sum(float(((w * g) ** 2).sum()) for w, g in zip(weights, grads)))
    return [rho * w * w * g / (norm + 1e-12) for w, g in zip(weights, grads)]


class SGDMomentum64:
    """torch.optim.SGD's documented update (momentum, weight decay), in float64."""

    def __init__(self, lr, momentum, weight_decay):
        self.lr, self.momentum, self.wd, self.buffers = lr, momentum, weight_decay, None

    def __call__(self, params, grads):
        d_p = [g + self.wd * p for p, g in zip(params, grads)]
        self.buffers = d_p if self.buffers is None else [self.momentum * b + d for b, d in zip(self.buffers, d_p)]
        return [p - self.lr * b for p, b in zip(params, self.buffers)]


class AdamW64:
    """AdamW (Loshchilov & Hutter): decoupled weight decay, bias-corrected moments; in float64."""

    def __init__(self, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.wd, self.betas, self.eps, self.t, self.m, self.v = lr, weight_decay, betas, eps, 0, None, None

    def __call__(self, params, grads):
        b1, b2 = self.betas
        self.t += 1
        if self.m is None:
            self.m, self.v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        self.m = [b1 * m + (1 - b1) * g for m, g in zip(self.m, grads)]
        self.v = [b2 * v + (1 - b2) * g * g for v, g in zip(self.v, grads)]
        out = []
        for p, m, v in zip(params, self.m, self.v):
            p = p * (1 - self.lr * self.wd)
            m_hat, v_hat = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
            out.append(p - self.lr * m_hat / (v_hat.sqrt() + self.eps))
        return out


def reference_training(model, data, base_update, rho=RHO, adaptive=False, eta=0.0, sam=True):
    """SAM/ASAM (or, ``sam=False``, ERM) in float64 on a copy of ``model``; returns the final parameters."""
    model64 = copy.deepcopy(model).double()
    names = [n for n, _ in model64.named_parameters()]
    params = [p.detach().clone() for p in model64.parameters()]

    def grads_at(values, x, y):
        values = [v.requires_grad_(True) for v in values]
        loss = loss_of(lambda inp: functional_call(model64, dict(zip(names, values)), (inp,)), x.double(), y)
        return [g.detach() for g in torch.autograd.grad(loss, values)]

    for x, y in data:
        g = grads_at([p.clone() for p in params], x, y)
        if sam:
            e = sam_perturbation(params, g, rho, adaptive, eta)
            g = grads_at([p + d for p, d in zip(params, e)], x, y)
        params = base_update(params, g)
    return params


def closure_for(model, x, y):
    def closure():
        loss = loss_of(model, x, y)
        loss.backward()
        return loss
    return closure


def max_difference(a, b):
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def assert_close_all(actual, expected, **tol):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.detach().double(), e, **(tol or TOL))


BASES = {
    "sgd_momentum": (lambda: (torch.optim.SGD, dict(lr=LR, momentum=MOMENTUM, weight_decay=WD)),
                     lambda: SGDMomentum64(LR, MOMENTUM, WD)),
    "adamw": (lambda: (torch.optim.AdamW, dict(lr=1e-2, weight_decay=WD)), lambda: AdamW64(1e-2, WD)),
}


# -- against the definition -----------------------------------------------------------------------------------
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_trains_as_the_float64_definition(backend, adaptive, base):
    model, data = mlp(), batches()
    start = copy.deepcopy(model)
    make_base, make_update = BASES[base]
    base_cls, kwargs = make_base()
    eta = ETA if adaptive else 0.0
    opt = SAM(model.parameters(), base_cls, rho=RHO, adaptive=adaptive, eta=eta, backend=backend, **kwargs)
    for x, y in data:
        opt.step(closure_for(model, x, y))
    expected = reference_training(start, data, make_update(), adaptive=adaptive, eta=eta)
    assert_close_all(list(model.parameters()), expected)
    # The ascent matters: ERM, and the other SAM variant, end far away.
    assert max_difference(expected, reference_training(start, data, make_update(), sam=False)) > FAR
    other = reference_training(start, data, make_update(), adaptive=not adaptive, eta=ETA)
    assert max_difference(expected, other) > FAR


@pytest.mark.parametrize("backend", BACKENDS)
def test_asam_with_eta_zero_is_davda54s_adaptive_sam(backend):
    """davda54/sam's adaptive=True takes T = |θ| (η = 0): e = ρ·θ²g/‖θ·g‖, which is also the default here."""
    model, data = mlp(), batches(2)
    start = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, adaptive=True, backend=backend, lr=LR)
    assert opt.param_groups[0]["eta"] == 0.0
    for x, y in data:
        opt.step(closure_for(model, x, y))
    expected = reference_training(start, data, SGDMomentum64(LR, 0.0, 0.0), adaptive=True, eta=0.0)
    assert_close_all(list(model.parameters()), expected)
    assert max_difference(expected, reference_training(start, data, SGDMomentum64(LR, 0.0, 0.0), adaptive=True,
                                                       eta=1.0)) > FAR


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_two_call_loop_is_davda54s_and_equals_step(backend):
    """davda54/sam's loop: backward at θ, first_step(zero_grad=True), backward at θ + e, second_step(zero_grad=True)
    gives what step(closure) gives, bit for bit; after first_step the parameters are θ + e."""
    model_a, model_b, data = mlp(), mlp(), batches()
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=RHO, backend=backend, lr=LR, momentum=MOMENTUM)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, rho=RHO, backend=backend, lr=LR, momentum=MOMENTUM)
    for x, y in data:
        opt_a.step(closure_for(model_a, x, y))
        loss_of(model_b, x, y).backward()
        theta = [p.detach().clone() for p in model_b.parameters()]
        grads = [p.grad.double() for p in model_b.parameters()]
        opt_b.first_step(zero_grad=True)
        assert all(p.grad is None for p in model_b.parameters())
        e = sam_perturbation([t.double() for t in theta], grads, RHO, False, 0.0)
        assert_close_all([p.detach() - t for p, t in zip(model_b.parameters(), theta)], e, rtol=1e-5, atol=1e-8)
        assert opt_b.is_perturbed
        loss_of(model_b, x, y).backward()
        opt_b.second_step(zero_grad=True)
        assert not opt_b.is_perturbed
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_torchvision_resnet18_step_against_the_definition():
    torchvision = pytest.importorskip("torchvision", reason="torchvision does not import beside this torch",
                                      exc_type=ImportError)
    backend = "cpu" if "cpu" in BACKENDS else "foreach"
    torch.manual_seed(0)
    # float64, so that the comparison sees the optimizer, not fp32 rounding of the forward and backward passes
    model = torchvision.models.resnet18(num_classes=5).double()
    start = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64), torch.randint(0, 5, (4,), generator=gen))]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, adaptive=True, eta=ETA, backend=backend, lr=LR,
              momentum=MOMENTUM)
    for x, y in data:
        opt.step(closure_for(model, x, y))
    # BatchNorm in training mode: both the module and the float64 copy normalise with batch statistics.
    expected = reference_training(start, data, SGDMomentum64(LR, MOMENTUM, 0.0), adaptive=True, eta=ETA)
    assert_close_all(list(model.parameters()), expected, rtol=1e-9, atol=1e-12)
    erm = reference_training(start, data, SGDMomentum64(LR, MOMENTUM, 0.0), sam=False)
    assert max_difference(expected, erm) > FAR


# -- the API ----------------------------------------------------------------------------------------------------
def test_param_groups_carry_rho_adaptive_and_eta_and_a_scheduler_can_change_rho():
    model, data = mlp(), batches(2)
    start = copy.deepcopy(model)
    opt = SAM([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}], torch.optim.SGD,
              rho=0.5, lr=LR)
    for group in opt.param_groups:
        assert (group["rho"], group["adaptive"], group["eta"]) == (0.5, False, 0.0)
    assert opt.base_optimizer.param_groups is opt.param_groups
    for group in opt.param_groups:  # as a rho schedule would
        group["rho"] = RHO
    for x, y in data:
        opt.step(closure_for(model, x, y))
    assert_close_all(list(model.parameters()), reference_training(start, data, SGDMomentum64(LR, 0.0, 0.0)))


def test_groups_with_different_balls_are_refused_before_anything_moves():
    model, (x, y) = mlp(), batches(1)[0]
    opt = SAM([{"params": list(model[0].parameters()), "rho": 0.1}, {"params": list(model[2].parameters())}],
              torch.optim.SGD, rho=RHO, lr=LR)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"every param group must use the same rho, adaptive and eta; got "
                                         r"\(rho, adaptive, eta\) = \[\(0\.1, False, 0\.0\), \(0\.2, False, 0\.0\)\]"):
        opt.step(closure_for(model, x, y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.is_perturbed


@pytest.mark.parametrize("kwargs, message", [
    (dict(rho=-0.1), r"^rho must be a finite number >= 0, got -0.1$"),
    (dict(rho=math.nan), r"^rho must be a finite number >= 0, got nan$"),
    (dict(adaptive=1), r"^adaptive must be True or False, got 1$"),
    (dict(adaptive=True, eta=-1.0), r"^eta must be a finite number >= 0, got -1.0$"),
    (dict(between="sometimes"), r"^between must be one of 'erm', 'reuse', 'gradient', got 'sometimes'$"),
    (dict(backend="nope"), r"^backend must be one of "),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAM(mlp().parameters(), torch.optim.SGD, lr=LR, **kwargs)
    with pytest.raises(TypeError, match=r"base_optimizer must be a torch.optim.Optimizer subclass"):
        SAM(mlp().parameters(), torch.optim.SGD(mlp().parameters(), lr=LR))


def test_bad_group_settings_are_refused_where_they_enter():
    model = mlp()
    opt = SAM(list(model[0].parameters()), torch.optim.SGD, lr=LR)
    with pytest.raises(ValueError, match=r"^rho must be a finite number >= 0 in a param group, got -1.0$"):
        opt.add_param_group({"params": list(model[2].parameters()), "rho": -1.0})
    opt.add_param_group({"params": list(model[2].parameters()), "adaptive": True})
    assert opt.param_groups[1]["rho"] == opt.defaults["rho"] and opt.param_groups[1]["eta"] == 0.0
    opt.param_groups[1]["rho"] = math.inf
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match=r"^rho must be a finite number >= 0 in a param group, got inf$"):
        opt.step(closure_for(model, x, y))


def test_one_ascent_over_one_ball_is_fixed():
    opt = SAM(mlp().parameters(), torch.optim.SGD, lr=LR)
    assert (opt.inner_iter, opt.norm) == (1, "global")
    for name, value in (("inner_iter", 2), ("norm", "per_tensor")):
        with pytest.raises(AttributeError, match=rf"SAM's {name} is fixed"):
            setattr(opt, name, value)
    assert "SAM(rho=0.05, adaptive=False, eta=0" in repr(opt)  # the default ρ
    assert isinstance(opt, amp_fused.AMP) and isinstance(opt, torch.optim.Optimizer)


# -- what SAM shares with AMP -------------------------------------------------------------------------------------
@pytest.mark.parametrize("between", ["erm", "reuse"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_schedules_and_exact_resume_mid_cycle(adaptive, between):
    """perturb_every=3: a full SAM step, then two cheaper ones; a state dict saved mid-cycle resumes bitwise."""
    data = batches(6)

    def make(model):
        return SAM(model.parameters(), torch.optim.SGD, rho=RHO, adaptive=adaptive, eta=ETA, perturb_every=3,
                   between=between, lr=LR, momentum=MOMENTUM)

    model = mlp()
    opt = make(model)
    kinds = []
    for i, (x, y) in enumerate(data):
        kinds.append(opt.next_step_kind())
        opt.step(closure_for(model, x, y))
        if i == 1:
            saved, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    assert kinds == ["amp", between, between] * 2
    resumed = mlp()
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    for x, y in data[2:]:
        opt2.step(closure_for(resumed, x, y))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_reuse_steps_put_back_the_stored_perturbation_unprojected(adaptive):
    """A "reuse" step evaluates the gradient at θ + e with the e of the last full step, as it was (ASAM's e is
    not on the ρ-sphere in θ, so it must not be projected again)."""
    model, data = mlp(), batches(2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, adaptive=adaptive, eta=ETA, perturb_every=2,
              between="reuse", lr=LR)
    seen = {}

    def closure_recording(x, y, key):
        def closure():
            if opt.is_perturbed:
                seen[key] = [p.detach().clone() for p in model.parameters()]
            return closure_for(model, x, y)()
        return closure

    opt.step(closure_recording(*data[0], "full"))
    theta_1 = [p.detach().clone() for p in model.parameters()]
    stored = [opt._amp.reuse_delta[p].clone() for p in model.parameters()]
    opt.step(closure_recording(*data[1], "reuse"))
    # (θ + e) − θ in fp32: off by the rounding of θ + e, a few 1e-8 for |θ| < 1
    assert_close_all([s - t for s, t in zip(seen["reuse"], theta_1)], [d.double() for d in stored], rtol=1e-6,
                     atol=2e-7)
    if adaptive:  # not on the ρ-sphere: a projection onto it would have moved it
        assert abs(math.sqrt(sum(float((d.double() ** 2).sum()) for d in stored)) - RHO) > 1e-3


def test_grad_scaler_gives_the_unscaled_step_and_skips_on_overflow():
    model_a, model_b, data = mlp(), mlp(), batches(3)
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=RHO, adaptive=True, eta=ETA, lr=LR, momentum=MOMENTUM)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, rho=RHO, adaptive=True, eta=ETA, lr=LR, momentum=MOMENTUM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)

    def scaled_closure(x, y):
        def closure():
            loss = loss_of(model_b, x, y)
            scaler.scale(loss).backward()
            return loss
        return closure

    for x, y in data:
        opt_a.step(closure_for(model_a, x, y))
        opt_b.step(scaled_closure(x, y), scaler=scaler)
        scaler.update()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert max_difference(list(model_b.parameters()), list(mlp().parameters())) > FAR
    # an Inf in the pass at θ + e: the step is skipped, θ is kept exactly, the scale backs off
    before = [p.detach().clone() for p in model_b.parameters()]
    calls = []

    def poisoned():
        calls.append(opt_b.is_perturbed)
        loss = loss_of(model_b, *data[0]) * (math.inf if opt_b.is_perturbed else 1.0)
        scaler.scale(loss).backward()
        return loss

    scale = scaler.get_scale()
    opt_b.step(poisoned, scaler=scaler)
    scaler.update()
    assert calls == [False, True]
    assert all(torch.equal(p, b) for p, b in zip(model_b.parameters(), before))
    assert scaler.get_scale() < scale


def test_bn_stats_unperturbed_keeps_the_statistics_of_the_pass_at_theta():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    twin, twin_start = copy.deepcopy(model), copy.deepcopy(model)
    x, y = batches(1)[0]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=1.0, lr=LR, model=model, bn_stats="unperturbed")
    opt.step(closure_for(model, x, y))
    twin(x)  # one forward at θ: the statistics SAM must keep
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)
    assert int(model[1].num_batches_tracked) == 1
    # with the default (bn_stats="all") the pass at θ + e updates them too: visibly different
    model_all = copy.deepcopy(twin_start)
    SAM(model_all.parameters(), torch.optim.SGD, rho=1.0, lr=LR).step(closure_for(model_all, x, y))
    assert int(model_all[1].num_batches_tracked) == 2
    assert (model_all[1].running_mean - model[1].running_mean).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_error_in_the_perturbed_pass_leaves_theta_exactly(backend):
    model, (x, y) = mlp(), batches(1)[0]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, adaptive=True, backend=backend, lr=LR)
    theta = [p.detach().clone() for p in model.parameters()]

    def closure():
        if opt.is_perturbed:
            raise RuntimeError("out of memory (simulated)")
        return closure_for(model, x, y)()

    with pytest.raises(RuntimeError, match="simulated"):
        opt.step(closure)
    assert not opt.is_perturbed
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))


def test_bf16_parameters():
    model = mlp().to(torch.bfloat16)
    start = copy.deepcopy(model).float()
    data = batches(2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, adaptive=True, eta=ETA, lr=LR)
    for x, y in data:
        opt.step(closure_for(model, x.to(torch.bfloat16), y))
    expected = reference_training(start, data, SGDMomentum64(LR, 0.0, 0.0), adaptive=True, eta=ETA)
    assert_close_all(list(model.parameters()), expected, rtol=3e-2, atol=3e-2)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_load_state_dict_refuses_an_amp_state_dict_with_other_ascents():
    model = mlp()
    amp = amp_fused.AMP(model.parameters(), lr=LR, epsilon=0.1, inner_iter=2)
    opt = SAM(mlp().parameters(), torch.optim.SGD, lr=LR)
    with pytest.raises(ValueError, match=r"SAM.load_state_dict: the state dict is an AMP optimizer's with "
                                         r"inner_iter=2, norm='per_tensor'"):
        opt.load_state_dict(amp.state_dict())
    plain = torch.optim.SGD(mlp().parameters(), lr=0.3)  # a plain base-optimizer state dict loads
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["rho"] == 0.05  # the defaults fill in
