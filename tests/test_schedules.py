"""Amortised schedules: perturb_every=k with between="erm" or "reuse"."""
import copy

import pytest
import torch

from amp_fused import AMP, available_backends

BACKENDS = available_backends("cpu")


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def batch(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randn(24, 5, generator=gen), torch.randint(0, 3, (24,), generator=gen)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def recording_closure(model, data, log):
    x, y = data

    def closure():
        log.append(params_of(model))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def run(model, opt, steps, first_seed=0):
    calls = []
    for t in range(first_seed, first_seed + steps):
        log = []
        theta = params_of(model)
        kind = opt.next_step_kind()
        opt.step(recording_closure(model, batch(t), log))
        calls.append((kind, theta, log))
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("between", ["erm", "reuse"])
def test_k1_is_exact_amp(backend, between):
    results = []
    for kwargs in ({}, dict(perturb_every=1, between=between)):
        model = make_model()
        opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9, backend=backend, **kwargs)
        calls = run(model, opt, 4)
        assert all(kind == "amp" and len(log) == 2 for kind, _, log in calls)
        results.append(params_of(model))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("between", ["erm", "reuse"])
def test_k3_schedule_is_as_documented(backend, between):
    model = make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9, perturb_every=3, between=between,
              backend=backend)
    calls = run(model, opt, 7)
    kinds = [kind for kind, _, _ in calls]
    assert kinds == ["amp", between, between, "amp", between, between, "amp"]
    last_delta = None
    for kind, theta, log in calls:
        if kind == "amp":
            assert len(log) == 2
            assert all(torch.equal(a, b) for a, b in zip(log[0], theta))  # first call at θ
            last_delta = [b - a for a, b in zip(theta, log[1])]
            assert max(d.abs().max().item() for d in last_delta) > 1e-3
        elif kind == "erm":
            assert len(log) == 1 and all(torch.equal(a, b) for a, b in zip(log[0], theta))
        else:  # reuse: one call, at θ + the last full step's Δ
            assert len(log) == 1
            for a, b, d in zip(theta, log[0], last_delta):
                torch.testing.assert_close(b - a, d, rtol=1e-4, atol=1e-6)
    assert opt.steps == 7


@pytest.mark.parametrize("backend", BACKENDS)
def test_erm_steps_are_plain_sgd_steps(backend):
    model, twin = make_model(), make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9, perturb_every=2, backend=backend)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    opt.step(recording_closure(model, batch(0), []))  # full step
    twin.load_state_dict(model.state_dict())
    sgd.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() shares the buffers
    assert opt.next_step_kind() == "erm"
    opt.step(recording_closure(model, batch(1), []))
    sgd.zero_grad()
    recording_closure(twin, batch(1), [])()
    sgd.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reuse_projects_onto_the_current_ball(backend):
    model = make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, inner_lr=10.0, perturb_every=2, between="reuse",
              backend=backend)
    run(model, opt, 1)
    opt.param_groups[0]["epsilon"] = 0.01
    (kind, theta, log), = run(model, opt, 1, first_seed=1)
    assert kind == "reuse"
    norms = [(b - a).norm().item() for a, b in zip(theta, log[0])]
    assert max(norms) <= 0.01 * (1 + 1e-4) and min(norms) > 0.009


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_schedule_state_round_trips(backend, norm, tmp_path):
    def build():
        model = make_model()
        opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, momentum=0.9, norm=norm, perturb_every=3,
                  between="reuse", backend=backend)
        return model, opt

    model, opt = build()
    run(model, opt, 8)
    uninterrupted = params_of(model)

    model, opt = build()
    run(model, opt, 4)  # stop after a reuse step, mid-cycle
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    model, opt = build()
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert opt.steps == 4 and opt.next_step_kind() == "reuse"
    run(model, opt, 4, first_seed=4)
    for a, b in zip(params_of(model), uninterrupted):
        assert torch.equal(a, b)


def test_reuse_without_a_stored_delta_takes_a_full_step():
    model = make_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, perturb_every=2, between="reuse")
    opt.steps = 1  # as after loading a checkpoint that carries no Δ
    assert opt.next_step_kind() == "amp"


@pytest.mark.parametrize("kwargs,message", [
    (dict(perturb_every=0), "perturb_every must be an int >= 1"),
    (dict(perturb_every=2.0), "perturb_every must be an int >= 1"),
    (dict(perturb_every=True), "perturb_every must be an int >= 1"),
    (dict(between="sam"), "between must be one of 'erm', 'reuse'"),
])
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AMP(make_model().parameters(), lr=0.1, epsilon=0.1, **kwargs)
