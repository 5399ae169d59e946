"""Theorem 2 of the AMP paper, checked on the optimizer itself with double backprop.

With N = 1 and plain SGD (lr η, no momentum) an AMP step is θ' = θ − η·g(θ + Δ), so the gradient AMP
follows is read off the step: g(θ + Δ) = (θ − θ')/η. It is compared, as a function of ζ (or ε), with the
gradient of a regularised loss computed by differentiating ∇L (``create_graph=True``):

* Unprojected (ε never reached), Δ = ζ∇L and a first-order Taylor expansion gives
  g(θ + ζg) = g + ζHg + O(ζ²) = ∇(L + (ζ/2)‖∇L‖²) + O(ζ²).
  The paper writes Ω = ζ‖∇L‖²; its proof differentiates the composite loss L(θ + ζ∇L(θ)), whose gradient
  (I + ζH)·g(θ + ζg) = ∇(L + ζ‖∇L‖²) + O(ζ²). So the half-weight regulariser is what AMP's update
  follows (error O(ζ²)); the paper's weight is off by O(ζ) against it; and the paper's formula does
  describe the composite loss (error O(ζ²)).
* Projected (ζ‖∇L‖ > ε), Δ = ε∇L/‖∇L‖ and g(θ + Δ) = ∇(L + ε‖∇L‖) + O(ε²); projected per tensor,
  Δ_t = ε∇_tL/‖∇_tL‖ and g(θ + Δ) = ∇(L + ε Σ_t ‖∇_tL‖) + O(ε²).

An O(hᵏ) error shrinks by 2ᵏ when h halves: the tests assert the measured ratios over several halvings.
The model is a tanh MLP in float64, so the asymptotic regime is reached long before rounding matters;
every backend that runs on CPU tensors is checked (they all support float64).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from amp_fused import AMP, available_backends

BACKENDS = available_backends("cpu")
HALVINGS = 4
ZETAS = [0.05 / 2 ** k for k in range(HALVINGS + 1)]
EPSILONS = [0.05 / 2 ** k for k in range(HALVINGS + 1)]
HUGE_EPSILON = 1e6  # the ε-ball is never reached
PROJECTING_ZETA = 1.0  # ζ‖∇_tL‖ exceeds every ε above for every tensor (asserted)
LR = 1.0  # θ' = θ − g(θ + Δ): the gradient is recovered with θ's rounding error only
# halving h shrinks an O(h²) error 4x and an O(h) error 2x
SECOND_ORDER = (3.5, 4.5)
FIRST_ORDER = (1.75, 2.25)


class Problem:
    """A smooth regression problem; θ and the batch are fixed."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                   nn.Linear(16, 1)).double()
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(32, 4, generator=gen, dtype=torch.float64)
        self.y = torch.randn(32, 1, generator=gen, dtype=torch.float64)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.theta = [p.detach().clone() for p in self.model.parameters()]

    def loss(self, params):
        outputs = functional_call(self.model, dict(zip(self.names, params)), (self.x,))
        return ((outputs - self.y) ** 2).mean()

    def gradient(self, objective) -> torch.Tensor:
        """∇objective(θ), flattened; ``objective`` maps the list of parameter tensors to a scalar."""
        params = [t.clone().requires_grad_(True) for t in self.theta]
        return _flat(torch.autograd.grad(objective(params), params))

    def regularised(self, penalty):
        """θ ↦ L(θ) + penalty(∇L(θ) per tensor), differentiable through ∇L."""
        def objective(params):
            loss = self.loss(params)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            return loss + penalty(grads)
        return objective

    def composite(self, zeta):
        """θ ↦ L(θ + ζ∇L(θ)), differentiable through the perturbation."""
        def objective(params):
            grads = torch.autograd.grad(self.loss(params), params, create_graph=True)
            return self.loss([p + zeta * g for p, g in zip(params, grads)])
        return objective

    def amp_gradient(self, backend, norm, zeta, epsilon):
        """The gradient one AMP step (N = 1, SGD) takes, read off the step; and ‖Δ‖ before projection."""
        with torch.no_grad():
            for p, t in zip(self.model.parameters(), self.theta):
                p.copy_(t)
        opt = AMP(self.model.parameters(), lr=LR, epsilon=epsilon, inner_lr=zeta, inner_iter=1, norm=norm,
                  backend=backend)

        def closure():
            loss = ((self.model(self.x) - self.y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        stepped = _flat([p.detach() for p in self.model.parameters()])
        return (_flat(self.theta) - stepped) / LR, opt.last_norms


def _flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def squared_norm(grads):
    return sum((g ** 2).sum() for g in grads)


def global_norm(grads):
    return torch.sqrt(squared_norm(grads))


def sum_of_tensor_norms(grads):
    return sum(torch.linalg.vector_norm(g) for g in grads)


def assert_halving_ratios(errors, bounds, what):
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    low, high = bounds
    assert all(low <= r <= high for r in ratios), (
        f"{what}: halving the step size changed the error by {[f'{r:.3f}' for r in ratios]}, expected "
        f"[{low}, {high}] (errors {[f'{e:.3e}' for e in errors]})")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    return Problem()


def _unprojected_amp_gradients(problem, backend):
    gradients = []
    for zeta in ZETAS:
        gradient, norms = problem.amp_gradient(backend, "per_tensor", zeta, HUGE_EPSILON)
        assert norms.max() < HUGE_EPSILON  # no projection: Δ = ζ∇L exactly
        gradients.append(gradient)
    return gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_amp_follows_the_half_weight_regulariser(problem, backend):
    """(a) g(θ + ζ∇L) = ∇(L + (ζ/2)‖∇L‖²) + O(ζ²)."""
    amp = _unprojected_amp_gradients(problem, backend)
    half = [problem.gradient(problem.regularised(lambda gr, z=zeta: z / 2 * squared_norm(gr))) for zeta in ZETAS]
    errors = [(g - r).norm().item() for g, r in zip(amp, half)]
    assert_halving_ratios(errors, SECOND_ORDER, "AMP gradient vs ∇(L + (ζ/2)‖∇L‖²)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_weight_is_first_order_off_the_amp_gradient(problem, backend):
    """(b) ∇(L + ζ‖∇L‖²), the paper's literal Ω, misses the AMP gradient by O(ζ): not what AMP follows."""
    amp = _unprojected_amp_gradients(problem, backend)
    paper = [problem.gradient(problem.regularised(lambda gr, z=zeta: z * squared_norm(gr))) for zeta in ZETAS]
    half = [problem.gradient(problem.regularised(lambda gr, z=zeta: z / 2 * squared_norm(gr))) for zeta in ZETAS]
    paper_errors = [(g - r).norm().item() for g, r in zip(amp, paper)]
    half_errors = [(g - r).norm().item() for g, r in zip(amp, half)]
    assert_halving_ratios(paper_errors, FIRST_ORDER, "AMP gradient vs ∇(L + ζ‖∇L‖²)")
    # At the smallest ζ the first-order miss dwarfs the second-order one.
    assert paper_errors[-1] > 10 * half_errors[-1]


def test_paper_weight_is_the_gradient_of_the_composite_loss(problem):
    """(c) ∇_θ L(θ + ζ∇L(θ)) = ∇(L + ζ‖∇L‖²) + O(ζ²): the paper's Ω describes the composite loss."""
    composite = [problem.gradient(problem.composite(zeta)) for zeta in ZETAS]
    paper = [problem.gradient(problem.regularised(lambda gr, z=zeta: z * squared_norm(gr))) for zeta in ZETAS]
    half = [problem.gradient(problem.regularised(lambda gr, z=zeta: z / 2 * squared_norm(gr))) for zeta in ZETAS]
    assert_halving_ratios([(c - p).norm().item() for c, p in zip(composite, paper)], SECOND_ORDER,
                          "∇L(θ + ζ∇L) vs ∇(L + ζ‖∇L‖²)")
    # ... and it is not the half-weight gradient: that misses it by O(ζ).
    assert_halving_ratios([(c - h).norm().item() for c, h in zip(composite, half)], FIRST_ORDER,
                          "∇L(θ + ζ∇L) vs ∇(L + (ζ/2)‖∇L‖²)")


PROJECTED = {
    # norm -> (its regulariser, the other norm's regulariser)
    "global": (global_norm, sum_of_tensor_norms),
    "per_tensor": (sum_of_tensor_norms, global_norm),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", list(PROJECTED))
def test_projected_amp_follows_the_norm_regulariser(problem, norm, backend):
    """g(θ + εĝ) = ∇(L + ε‖∇L‖) + O(ε²) (global); per tensor: ∇(L + ε Σ_t ‖∇_tL‖) + O(ε²)."""
    own, other = PROJECTED[norm]
    own_errors, other_errors = [], []
    for epsilon in EPSILONS:
        amp, norms = problem.amp_gradient(backend, norm, PROJECTING_ZETA, epsilon)
        tensor_norms, total_norm = norms[:-1], norms[-1]
        # The projection is active: on every tensor (per_tensor) or on the whole Δ (global).
        assert (tensor_norms.min() if norm == "per_tensor" else total_norm) > epsilon
        own_errors.append((amp - problem.gradient(problem.regularised(lambda gr: epsilon * own(gr)))).norm().item())
        other_errors.append((amp - problem.gradient(problem.regularised(lambda gr: epsilon * other(gr)))).norm().item())
    assert_halving_ratios(own_errors, SECOND_ORDER, f"projected ({norm}) AMP gradient vs its regulariser")
    # The two norms' regularisers are told apart: the other one misses by O(ε).
    assert_halving_ratios(other_errors, FIRST_ORDER,
                          f"projected ({norm}) AMP gradient vs the other norm's regulariser")
