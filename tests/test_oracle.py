"""AMP, step after step, against the independent implementation of Algorithm 1 in tests/oracle.py.

Every test runs several consecutive steps (a new batch each, so momentum and Adam state matter) and
compares every parameter, every buffer (BatchNorm running statistics, updated by all 1 + N forward
passes) and the base optimizer's state with the oracle's.

Tolerances. The optimizer and the oracle run the same forward and backward ops, so their gradients at θ
agree bit for bit; they differ only in how θ + Δ is rounded (each backend forms Δ in fp32 its own way, the
oracle keeps Δ explicitly with fp64 norms, the reference backend restores θ by subtracting Δ back). That
is a few fp32 ulps per step, amplified by how strongly the gradient at θ + Δ reacts to its argument. For
the MLP and the small CNN rtol 1e-5 / atol 1e-6 leaves more than an order of magnitude of headroom over
the deviations of every backend. ResNet-18 at initialisation is much sharper and amplifies the same ulps
about ten times more over the steps: it gets rtol 1e-4 / atol 1e-5. Every test also asserts that its
result is FAR_FACTOR tolerances away from what a broken optimizer would produce (a plain ERM step, the
other N, the other norm, the default group settings), so the comparison can fail.

What keeps the comparison well-posed:
* Smooth activations and average pooling. With ReLU or max-pooling the gradient is discontinuous: a
  one-ulp difference in θ + Δ flips some activations or pooling winners and moves the gradient by
  O(1/positions), so two correct backends disagree far beyond any fp32 tolerance.
* ResNet-18 on 4×3×48×48 rather than 2×3×32×32: with 2 images of 32×32 the last stage's BatchNorm
  normalises over 2 values per channel, and a relative change of θ at rounding level moves the gradient by
  percents. 48×48 keeps every stage's statistics over at least 16 values.
* AdamW with eps = 1e-3. Its update m̂/(√v̂ + eps) has slope up to lr/(4·eps) in a gradient entry of
  size ≈ eps; with the default 1e-8 the rounding noise of entries that are pure cancellation becomes a
  parameter change far above fp32 tolerance. A larger eps bounds that amplification and still normalises
  every entry larger than it.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amp_fused import AMP, available_backends
from oracle import AdamWRule, SGDRule, amp_step

BACKENDS = available_backends("cpu")
STEPS = 3
FAR_FACTOR = 50.0  # "far": at least this many tolerances apart
NORMS = ("per_tensor", "global")


pytestmark = pytest.mark.usefixtures("one_thread")


# -- models ------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """A smooth MLP with a frozen parameter the loss uses and a trainable layer the loss never reaches."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 5)
        self.unused = nn.Linear(3, 3)  # has no gradient: must be neither perturbed nor stepped
        self.temperature = nn.Parameter(torch.tensor(0.7), requires_grad=False)

    def forward(self, x):
        return self.fc3(F.silu(self.fc2(torch.tanh(self.fc1(x))))) / self.temperature


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.silu(self.bn1(self.conv1(x)))
        x = F.silu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def smooth_resnet18():
    """torchvision's ResNet-18 with SiLU for ReLU and average for max pooling (see the module docstring)."""
    # Only the tests on ResNet-18 need torchvision (absent beside some torch builds): they skip, naming it.
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    for module in model.modules():
        if isinstance(getattr(module, "relu", None), nn.ReLU):
            module.relu = nn.SiLU()
    model.maxpool = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
    return model


@dataclasses.dataclass(frozen=True)
class Problem:
    build: Callable[[], nn.Module]
    input_shape: tuple
    classes: int
    epsilon: float
    inner_lr: float
    lr_scale: float  # multiplies the base optimizer's lr
    rtol: float
    atol: float

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().train()

    def batches(self):
        gen = torch.Generator().manual_seed(1)
        n = self.input_shape[0]
        return [(torch.randn(self.input_shape, generator=gen), torch.randint(0, self.classes, (n,), generator=gen))
                for _ in range(STEPS)]


PROBLEMS = {
    "mlp": Problem(MLP, (16, 10), 5, epsilon=0.2, inner_lr=1.0, lr_scale=1.0, rtol=1e-5, atol=1e-6),
    "cnn": Problem(SmallCNN, (8, 3, 12, 12), 10, epsilon=0.2, inner_lr=1.0, lr_scale=1.0, rtol=1e-5, atol=1e-6),
    # A smaller step keeps ResNet-18 out of the edge-of-stability regime, where trajectories that start one
    # ulp apart separate exponentially.
    "resnet18": Problem(smooth_resnet18, (4, 3, 48, 48), 10, epsilon=0.2, inner_lr=1.0, lr_scale=0.03,
                        rtol=1e-4, atol=1e-5),
}


@dataclasses.dataclass(frozen=True)
class Base:
    optimizer: type
    kwargs: dict
    rule: object
    lr: float


def _sgd(lr=0.1, **kwargs):
    return Base(torch.optim.SGD, kwargs, SGDRule(**kwargs), lr)


BASES = {
    "sgd_momentum": _sgd(momentum=0.9),
    "sgd_nesterov_wd": _sgd(momentum=0.9, nesterov=True, weight_decay=5e-2),
    "sgd_dampening_wd": _sgd(momentum=0.9, dampening=0.3, weight_decay=5e-2),
    "sgd_maximize": _sgd(momentum=0.9, weight_decay=1e-2, maximize=True),
    "adamw": Base(torch.optim.AdamW, dict(betas=(0.9, 0.99), eps=1e-3, weight_decay=1e-2),
                  AdamWRule(betas=(0.9, 0.99), eps=1e-3, weight_decay=1e-2), 1e-2),
}


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs, targets)


# -- running the optimizer and the oracle ------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    tensors: dict  # parameters and buffers by name
    state: dict  # "name/key" -> base-optimizer state tensor
    returned: list = dataclasses.field(default_factory=list)  # what step returned, per step
    calls: list = dataclasses.field(default_factory=list)  # per step: the loss of every closure call
    unperturbed: list = dataclasses.field(default_factory=list)  # per step: forward of a copy at θ
    last_norms: torch.Tensor | None = None


def _tensors(model):
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _flat_state(per_param: dict) -> dict:
    flat = {}
    for name, state in per_param.items():
        for key, value in state.items():
            flat[f"{name}/{key}"] = torch.as_tensor(value, dtype=torch.float64).clone()
    return flat


def run_amp(problem_name, base_name, *, backend, norm, inner_iter, api="closure", groups=None, epsilon=None,
            record_unperturbed=False) -> Run:
    """``STEPS`` optimizer steps; ``api``: closure | closure_zero_grad | closure_loss_only | two_call.

    ``groups``: list of (parameter names, group options) to build param groups from; default one group.
    ``epsilon`` defaults to the problem's.
    """
    problem, base = PROBLEMS[problem_name], BASES[base_name]
    if api == "two_call" and inner_iter == 0:
        raise ValueError("the two-call API takes at least one ascent (first_step) per step")
    model = problem.model()
    named = dict(model.named_parameters())
    params = model.parameters() if groups is None else [
        {"params": [named[n] for n in names], **options} for names, options in groups]
    opt = AMP(params, lr=base.lr * problem.lr_scale, epsilon=problem.epsilon if epsilon is None else epsilon,
              inner_lr=problem.inner_lr,
              inner_iter=inner_iter, base_optimizer=base.optimizer, norm=norm, backend=backend, **base.kwargs)
    run = Run({}, {})
    for x, y in problem.batches():
        calls = []

        def closure():
            if api == "closure_zero_grad":
                opt.zero_grad()
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            calls.append(loss.detach().clone())
            return loss if api == "closure_loss_only" else (out, loss)

        if record_unperturbed:
            at_theta = copy.deepcopy(model)  # a copy, so its forward leaves the model's BN statistics alone
            with torch.no_grad():
                out = at_theta(x)
            run.unperturbed.append((out, loss_fn(out, y)))
        if api == "two_call":
            opt.zero_grad()
            closure()
            for _ in range(inner_iter):
                opt.first_step(zero_grad=True)
                closure()
            opt.second_step(zero_grad=True)
        else:
            run.returned.append(opt.step(closure))
        run.calls.append(calls)
    run.tensors = _tensors(model)
    run.state = _flat_state({n: opt.base_optimizer.state[p] for n, p in model.named_parameters()
                             if opt.base_optimizer.state[p]})
    run.last_norms = opt.last_norms
    return run


@dataclasses.dataclass
class OracleRun:
    tensors: dict  # parameters and buffers by name
    state: dict
    steps: list  # the oracle's AMPStep per step
    param_names: list  # the optimised parameters among ``tensors``


def run_oracle(problem_name, base_name, *, norm, inner_iter, lr=None, epsilon=None, inner_lr=None) -> OracleRun:
    """``STEPS`` oracle steps; ``lr``/``epsilon``/``inner_lr`` default to the problem's (numbers or per-name)."""
    problem, base = PROBLEMS[problem_name], BASES[base_name]
    module = problem.model()
    params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    constants = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    constants.update({n: b.detach().clone() for n, b in module.named_buffers()})
    state, steps = {}, []
    for batch in problem.batches():
        result = amp_step(module, params, constants, loss_fn, batch, state, rule=base.rule,
                          lr=base.lr * problem.lr_scale if lr is None else lr,
                          epsilon=problem.epsilon if epsilon is None else epsilon,
                          inner_lr=problem.inner_lr if inner_lr is None else inner_lr,
                          inner_iter=inner_iter, norm=norm)
        params, constants, state = result.params, result.constants, result.state
        steps.append(result)
    return OracleRun({**params, **constants}, _flat_state(state), steps, list(params))


def oracle(problem_name, base_name, norm, inner_iter) -> OracleRun:
    """Oracle runs are shared by the tests of every backend and API: each is computed once."""
    return _cached_oracle(problem_name, base_name, NORMS[0] if inner_iter == 0 else norm, inner_iter)


@functools.lru_cache(maxsize=None)
def _cached_oracle(problem_name, base_name, norm, inner_iter) -> OracleRun:
    return run_oracle(problem_name, base_name, norm=norm, inner_iter=inner_iter)


# -- comparisons ---------------------------------------------------------------------------------------------
def deviation(actual: dict, expected: dict, rtol: float, atol: float, names=None, *,
              scale_atol: bool = False) -> tuple[float, str]:
    """max |actual − expected| / (atol + rtol·|expected|) over the tensors ``names`` (default: all of
    ``expected``), and the tensor where it is largest. Non-floating tensors must be equal. ``scale_atol``
    adds rtol·max|expected| of each tensor to its atol."""
    worst, where = 0.0, ""
    for name in names if names is not None else expected:
        want, got = expected[name].double(), actual[name]
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        if not expected[name].is_floating_point():
            assert torch.equal(got, expected[name]), f"{name}: {got} != {expected[name]}"
            continue
        if not want.numel():
            continue
        floor = atol + (rtol * want.abs().max().item() if scale_atol else 0.0)
        err = (got.double() - want).abs() / (floor + rtol * want.abs())
        value = torch.nan_to_num(err, nan=float("inf")).max().item()
        if value >= worst:
            worst, where = value, name
    return worst, where


def assert_matches(run: Run, want: OracleRun, problem: Problem):
    assert set(run.tensors) == set(want.tensors)
    dev, where = deviation(run.tensors, want.tensors, problem.rtol, problem.atol)
    assert dev <= 1.0, f"{where} is {dev:.3g} tolerances from the oracle"
    assert set(run.state) == set(want.state), "the base optimizer's state covers other tensors than the oracle's"
    # Momentum buffers and Adam moments are gradient-like: their small entries are cancellation results with
    # the gradient's absolute error, which θ's magnitude hides in the parameters. Each is compared relative
    # to its own scale.
    dev, where = deviation(run.state, want.state, problem.rtol, problem.atol, scale_atol=True)
    assert dev <= 1.0, f"optimizer state {where} is {dev:.3g} tolerances from the oracle"


def assert_far(run: Run, other: OracleRun, problem: Problem, what: str):
    # Parameters only: extra forward passes alone change BatchNorm statistics, so an optimizer whose
    # perturbation did nothing would still differ from ERM in its buffers.
    dev, _ = deviation(run.tensors, other.tensors, problem.rtol, problem.atol, other.param_names)
    assert dev >= FAR_FACTOR, f"the result is only {dev:.3g} tolerances from {what}: the test could not tell them apart"


def _other_inner_iter(n):
    return n - 1 if n > 1 else n + 1


# -- against the oracle: norm modes, N, bases, models, backends ---------------------------------------------
CASES = [
    *[("mlp", base, norm, n) for base in BASES for norm in NORMS for n in (1, 2, 3)],
    *[("cnn", base, norm, n) for base in ("sgd_momentum", "sgd_nesterov_wd", "sgd_dampening_wd", "adamw")
      for norm in NORMS for n in (1, 2, 3)],
    # ResNet-18 is slow on CPU: two cases whose "other N" and "other norm" runs are each other's.
    ("resnet18", "sgd_nesterov_wd", "per_tensor", 1),
    ("resnet18", "sgd_nesterov_wd", "global", 2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem_name,base_name,norm,inner_iter", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_steps_match_oracle(problem_name, base_name, norm, inner_iter, backend):
    problem = PROBLEMS[problem_name]
    want = oracle(problem_name, base_name, norm, inner_iter)
    tensor_norms, total_norm = want.steps[0].ascent_norms[0]
    # The projection must bite (else norm could not matter); per tensor it must also leave some tensor alone,
    # so both sides of min(1, ε/‖Δ‖) are exercised.
    if norm == "global":
        assert total_norm > problem.epsilon
    else:
        assert max(tensor_norms.values()) > problem.epsilon > min(tensor_norms.values())

    run = run_amp(problem_name, base_name, backend=backend, norm=norm, inner_iter=inner_iter)
    assert_matches(run, want, problem)

    # ‖Δ‖ per tensor and overall at the last ascent, as the optimizer reports them. Δ is gradient-sized, so it
    # carries the gradient's larger relative deviation: a looser rtol than the parameters'.
    last_tensor_norms, last_total = want.steps[-1].ascent_norms[-1]
    torch.testing.assert_close(run.last_norms.double(), torch.tensor([*last_tensor_norms.values(), last_total],
                                                                     dtype=torch.float64), rtol=1e-4, atol=1e-6)

    assert_far(run, oracle(problem_name, base_name, norm, 0), problem, "a plain base-optimizer (ERM) step")
    other_n = _other_inner_iter(inner_iter)
    assert_far(run, oracle(problem_name, base_name, norm, other_n), problem, f"inner_iter={other_n}")
    other_norm = "global" if norm == "per_tensor" else "per_tensor"
    assert_far(run, oracle(problem_name, base_name, other_norm, inner_iter), problem, f"norm={other_norm!r}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner_iter", [1, 3])
def test_norm_does_not_matter_when_the_ball_is_never_reached(inner_iter, backend):
    problem = PROBLEMS["mlp"]
    huge_epsilon = 1e3
    want = run_oracle("mlp", "sgd_nesterov_wd", norm="per_tensor", inner_iter=inner_iter, epsilon=huge_epsilon)
    assert max(total for step in want.steps for _, total in step.ascent_norms) < huge_epsilon
    runs = [run_amp("mlp", "sgd_nesterov_wd", backend=backend, norm=norm, inner_iter=inner_iter, epsilon=huge_epsilon)
            for norm in NORMS]
    for run in runs:
        assert_matches(run, want, problem)
    assert_far(runs[0], oracle("mlp", "sgd_nesterov_wd", "per_tensor", 0), problem, "a plain ERM step")
    # Unprojected, Δ after N ascents is ζ·Σg: N still matters.
    other = run_oracle("mlp", "sgd_nesterov_wd", norm="per_tensor", inner_iter=_other_inner_iter(inner_iter),
                       epsilon=huge_epsilon)
    assert_far(runs[0], other, problem, f"inner_iter={_other_inner_iter(inner_iter)}")


# -- the closure API, the two-call API and what step returns -------------------------------------------------
APIS = ("closure", "closure_zero_grad", "closure_loss_only", "two_call")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem_name", ["mlp", "cnn"])
def test_apis_agree_with_each_other_and_the_oracle(problem_name, backend):
    problem = PROBLEMS[problem_name]
    base_name, norm, inner_iter = "sgd_nesterov_wd", "per_tensor", 2
    want = oracle(problem_name, base_name, norm, inner_iter)
    runs = {api: run_amp(problem_name, base_name, backend=backend, norm=norm, inner_iter=inner_iter, api=api,
                         record_unperturbed=api != "two_call") for api in APIS}
    for api, run in runs.items():
        assert_matches(run, want, problem)
        # Same ops in the same order whichever way the optimizer is driven: bit-identical results.
        for name, tensor in run.tensors.items():
            assert torch.equal(tensor, runs["closure"].tensors[name]), f"{api}: {name} differs from the closure API"
        assert all(len(calls) == 1 + inner_iter for calls in run.calls)
    assert_far(runs["closure"], oracle(problem_name, base_name, norm, 0), problem, "a plain ERM step")

    # step returns the first closure call's (outputs, loss), detached: the forward at θ, not at θ + Δ.
    for api in ("closure", "closure_zero_grad", "closure_loss_only"):
        run = runs[api]
        for returned, (out_at_theta, loss_at_theta), calls, oracle_step in zip(
                run.returned, run.unperturbed, run.calls, want.steps):
            if api == "closure_loss_only":
                loss = returned
            else:
                outputs, loss = returned
                assert not outputs.requires_grad
                assert torch.equal(outputs, out_at_theta)
                torch.testing.assert_close(outputs, oracle_step.outputs, rtol=problem.rtol, atol=problem.atol)
            assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and not loss.requires_grad
            assert torch.equal(loss, loss_at_theta) and torch.equal(loss, calls[0])
            torch.testing.assert_close(loss, oracle_step.loss, rtol=problem.rtol, atol=problem.atol)
            # ... and not the last call's loss at θ + Δ, which is far from it.
            assert (calls[-1] - loss).abs() > FAR_FACTOR * (problem.atol + problem.rtol * loss.abs())


# -- param groups ---------------------------------------------------------------------------------------------
MLP_LAYERS = {layer: [f"{layer}.weight", f"{layer}.bias"] for layer in ("fc1", "fc2", "fc3", "unused")}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_param_groups_match_the_oracle_per_group(norm, backend):
    problem, base_name = PROBLEMS["mlp"], "sgd_nesterov_wd"
    default = dict(lr=BASES[base_name].lr, epsilon=problem.epsilon, inner_lr=problem.inner_lr)
    if norm == "per_tensor":
        options = [dict(lr=0.2, epsilon=0.03, inner_lr=0.5), dict(lr=0.05, epsilon=0.3, inner_lr=2.0), {}]
        varied = ("lr", "epsilon", "inner_lr")
    else:  # one ball over all tensors: the groups may differ only in their base-optimizer options
        options = [dict(lr=0.2), dict(lr=0.03), {}]
        varied = ("lr",)
    layer_groups = [MLP_LAYERS["fc1"], MLP_LAYERS["fc2"], MLP_LAYERS["fc3"] + MLP_LAYERS["unused"]]
    groups = list(zip(layer_groups, options))
    per_name = {key: {n: opts.get(key, default[key]) for names, opts in groups for n in names} for key in default}

    run = run_amp("mlp", base_name, backend=backend, norm=norm, inner_iter=2, groups=groups)
    want = run_oracle("mlp", base_name, norm=norm, inner_iter=2, lr=per_name["lr"],
                      epsilon=per_name["epsilon"] if norm == "per_tensor" else problem.epsilon,
                      inner_lr=per_name["inner_lr"])
    assert_matches(run, want, problem)
    # Each group setting is honoured: dropping any one of them (using the default everywhere) is far off.
    for key in varied:
        settings = {k: per_name[k] for k in ("lr", "inner_lr")}
        settings["epsilon"] = per_name["epsilon"] if norm == "per_tensor" else problem.epsilon
        settings[key] = default[key]
        assert_far(run, run_oracle("mlp", base_name, norm=norm, inner_iter=2, **settings), problem,
                   f"the run with the default {key} in every group")


# -- inner_iter = 0 is the base optimizer ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base_name", ["sgd_nesterov_wd", "adamw"])
@pytest.mark.parametrize("problem_name", ["mlp", "cnn"])
def test_zero_inner_iterations_is_the_base_optimizer_bit_for_bit(problem_name, base_name, backend):
    problem, base = PROBLEMS[problem_name], BASES[base_name]
    model = problem.model()
    plain = base.optimizer(model.parameters(), lr=base.lr * problem.lr_scale, **base.kwargs)
    for x, y in problem.batches():
        plain.zero_grad()
        loss_fn(model(x), y).backward()
        plain.step()
    plain_state = _flat_state({n: plain.state[p] for n, p in model.named_parameters() if plain.state[p]})

    run = run_amp(problem_name, base_name, backend=backend, norm="per_tensor", inner_iter=0)
    assert run.tensors.keys() == _tensors(model).keys()
    for name, tensor in _tensors(model).items():
        assert torch.equal(run.tensors[name], tensor), f"{name} differs from plain {base.optimizer.__name__}"
    assert run.state.keys() == plain_state.keys()
    for key, value in plain_state.items():
        assert torch.equal(run.state[key], value), f"state {key} differs"
    perturbed = run_amp(problem_name, base_name, backend=backend, norm="per_tensor", inner_iter=1)
    plain_run = OracleRun(_tensors(model), plain_state, [], [n for n, p in model.named_parameters() if p.requires_grad])
    assert_far(perturbed, plain_run, problem, f"plain {base.optimizer.__name__}")
