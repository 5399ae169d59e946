"""The whole AMP optimizer on the Triton backend against the same optimizer on the foreach backend."""
import pytest
import torch

import amp_fused
from triton_cases import largest_move

TOL = dict(rtol=1e-5, atol=1e-6)


def _train(backend, steps=3, epsilon=0.5, base_optimizer=torch.optim.SGD, watch=None, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    inputs, labels = torch.randn(64, 10), torch.randint(0, 3, (64,))
    optimizer = amp_fused.AMP(model.parameters(), lr=0.1, epsilon=epsilon, inner_lr=1.0, base_optimizer=base_optimizer,
                              backend=backend, **options)

    def closure():
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        if watch is not None:
            watch.append([p.detach().clone() for p in model.parameters()])
        return loss

    losses = [optimizer.step(closure).item() for _ in range(steps)]
    return [p.detach().clone() for p in model.parameters()], losses, optimizer


@pytest.mark.parametrize("norm", ["per_tensor", "global"])
@pytest.mark.parametrize("inner_iter", [1, 2])
def test_amp_sgd_on_triton_matches_foreach(norm, inner_iter):
    options = dict(norm=norm, inner_iter=inner_iter, momentum=0.9, weight_decay=1e-4, nesterov=True)
    seen = []
    triton_params, triton_losses, optimizer = _train("triton", watch=seen, **options)
    foreach_params, foreach_losses, _ = _train("foreach", **options)
    for a, b in zip(triton_params, foreach_params):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(triton_losses, foreach_losses, **TOL)
    assert optimizer.last_norms is not None and optimizer.last_norms.shape == (len(triton_params) + 1,)

    # The perturbation did something: the closure saw the parameters moved away from θ by far more than
    # the tolerance, and training with ε = 0 (plain SGD) ends far from AMP.
    theta, perturbed = seen[0], seen[1]
    assert largest_move(perturbed, theta) > 1e4 * TOL["atol"]
    erm_params, _, _ = _train("triton", epsilon=0.0, **options)
    assert largest_move(triton_params, erm_params) > 1e3 * TOL["atol"]


def test_amp_with_another_base_optimizer_restores_through_the_copy_kernel():
    """A base optimizer other than SGD makes AMP restore θ with restore_ and then call the base step."""
    triton_params, triton_losses, _ = _train("triton", base_optimizer=torch.optim.Adam)
    foreach_params, foreach_losses, _ = _train("foreach", base_optimizer=torch.optim.Adam)
    for a, b in zip(triton_params, foreach_params):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(triton_losses, foreach_losses, **TOL)
