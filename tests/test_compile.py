"""torch.compile: the ops traced into one graph (their fake implementations), a compiled model trained under AMP,
and what compiling the optimizer's own methods does.

Inductor compiles C++ on CPU, so the models are tiny and every compiled function has one shape; the FX graph
cache makes the second compile of the same graph cheap.
"""
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from amp_fused import AMP, SAM, _extension, available_backends, functional

pytestmark = pytest.mark.slow  # inductor compiles C++

FUSED = [b for b in ("cpu", "foreach") if b in available_backends("cpu")]
NORMS = ("per_tensor", "global")
EPSILON, INNER_LR, LR, MOMENTUM = 0.05, 0.5, 0.1, 0.9
needs_cpu_ops = pytest.mark.skipif(_extension.cpu_error is not None or _extension.fake_error is not None,
                                   reason=f"the cpu backend cannot run or be traced here: "
                                          f"{_extension.cpu_error or _extension.fake_error}")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # so each test counts its own compiles
    yield
    torch._dynamo.reset()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def train(model, backend, norm, step=None, steps=3):
    """``steps`` AMP steps; returns the parameters seen by every closure call, the losses and the final parameters."""
    x, y = data()
    opt = AMP(model.parameters(), lr=LR, epsilon=EPSILON, inner_lr=INNER_LR, inner_iter=2, momentum=MOMENTUM,
              norm=norm, backend=backend)
    seen = []

    def closure():
        seen.append(snapshot(model))  # outside the compiled forward: what the model is evaluated at
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    step = step(opt) if step is not None else opt.step
    losses = [step(closure) for _ in range(steps)]
    return seen, torch.stack(losses), snapshot(model)


# -- the ops in a compiled graph ----------------------------------------------------------------------------
def ascent_then_sgd(params, grads1, grads2, backups, buffers, per_tensor: bool):
    norms1 = functional.perturb_(params, grads1, backups, EPSILON, INNER_LR, per_tensor, True, backend="cpu")
    norms2 = functional.perturb_(params, grads2, backups, EPSILON, INNER_LR, per_tensor, False, backend="cpu")
    functional.restore_sgd_(params, backups, grads2, buffers, LR, MOMENTUM, 0.0, 0.01, True, False, True,
                            backend="cpu")
    return norms1, norms2


def op_inputs():
    gen = torch.Generator().manual_seed(2)
    shapes = [(16, 8), (16,), (4, 16), (4,), (3, 5, 7)]
    theta = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * (0.01 if i == 3 else 1.0)  # tensor 3 stays inside the ball
              for i, s in enumerate(shapes)] for _ in range(2)]
    return theta, grads


@needs_cpu_ops
@pytest.mark.parametrize("norm", NORMS)
def test_functional_ops_compile_into_one_graph_and_match_eager(norm):
    theta, (grads1, grads2) = op_inputs()

    def run(fn):
        params = [t.clone() for t in theta]
        backups, buffers = [torch.empty_like(t) for t in theta], [torch.empty_like(t) for t in theta]
        norms1, norms2 = fn(params, grads1, grads2, backups, buffers, norm == "per_tensor")
        return params, backups, buffers, norms1, norms2

    counter = CompileCounterWithBackend("inductor")
    compiled = run(torch.compile(ascent_then_sgd, backend=counter, fullgraph=True))
    eager = run(ascent_then_sgd)

    assert counter.frame_count == 1
    targets = [node.target for node in counter.graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.amp_fused.perturb_) == 2  # in the graph, not run while tracing
    assert targets.count(torch.ops.amp_fused.restore_sgd_) == 1
    for compiled_list, eager_list in zip(compiled[:3], eager[:3]):
        for c, e in zip(compiled_list, eager_list):
            assert torch.equal(c, e)  # the same kernel on the same inputs
    for c, e in zip(compiled[3:], eager[3:]):
        assert torch.equal(c, e)
    assert all((p - t).abs().max() > 1e-3 for p, t in zip(compiled[0], theta))  # the ops really ran


# -- a compiled model under AMP -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("norm", NORMS)
def test_compiled_model_trains_under_amp_like_the_eager_model(backend, norm):
    eager_seen, eager_losses, eager_final = train(mlp(), backend, norm)
    counter = CompileCounterWithBackend("inductor")
    model = mlp()
    compiled_seen, compiled_losses, compiled_final = train(torch.compile(model, backend=counter), backend, norm)

    assert counter.frame_count == 1  # AMP moving the parameters in place causes no recompilation
    assert len(compiled_seen) == len(eager_seen) == 3 * 3  # per step: θ, then two ascents
    for compiled_params, eager_params in zip(compiled_seen, eager_seen):
        for c, e in zip(compiled_params, eager_params):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)  # inductor's kernels round differently
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for c, e in zip(compiled_final, eager_final):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    # The compiled forward really ran at θ + Δ: the ascents moved the model by ε (projection active).
    displacement = [torch.stack([(a - b).norm() for a, b in zip(compiled_seen[i], compiled_seen[0])])
                    for i in (1, 2)]
    for moved in displacement:
        if norm == "global":
            torch.testing.assert_close(moved.norm(), torch.tensor(EPSILON), rtol=1e-4, atol=0)
        else:
            assert (moved <= EPSILON * (1 + 1e-4)).all() and moved.max() > EPSILON * (1 - 1e-4)


@needs_cpu_ops
def test_sam_modes_of_perturb_trace_into_a_graph_and_match_eager():
    """The surface mode and ASAM's element weights through the op's fake implementation: one graph, and the
    compiled call is the eager kernel's result bit for bit."""
    theta, (grads, _) = op_inputs()

    def asam_ascent(params, grads, backups):
        return functional.perturb_(params, grads, backups, EPSILON, 1.0, False, True, True, 0.01, backend="cpu")

    eager_params, eager_backups = [t.clone() for t in theta], [torch.empty_like(t) for t in theta]
    eager_norms = asam_ascent(eager_params, grads, eager_backups)
    counter = CompileCounterWithBackend("inductor")
    params, backups = [t.clone() for t in theta], [torch.empty_like(t) for t in theta]
    norms = torch.compile(asam_ascent, backend=counter, fullgraph=True)(params, grads, backups)
    assert counter.frame_count == 1
    assert torch.equal(norms, eager_norms)
    for p, e in zip(params, eager_params):
        assert torch.equal(p, e)
    assert max((p - t).abs().max().item() for p, t in zip(params, theta)) > 1e-3


@needs_cpu_ops
def test_gradient_reuse_ops_trace_into_a_graph_and_match_eager():
    """norms, restore_orthogonal_ and add_orthogonal_ through their fake implementations: one graph holding all
    three, and the compiled calls are the eager kernels' results bit for bit."""
    theta, (grads1, grads2) = op_inputs()

    def reuse(params, backups, orthogonals, grads):
        functional.perturb_(params, grads1, backups, EPSILON, INNER_LR, True, True, backend="cpu")
        functional.restore_orthogonal_(params, backups, grads2, orthogonals, False, backend="cpu")
        functional.add_orthogonal_(grads, orthogonals, 0.7, True, backend="cpu")
        return functional.norms(grads, backend="cpu")

    def run(fn):
        params, grads = [t.clone() for t in theta], [g.clone() for g in grads1]
        backups, orthogonals = [torch.empty_like(t) for t in theta], [torch.empty_like(t) for t in theta]
        norms = fn(params, backups, orthogonals, grads)
        return params + orthogonals + grads + [norms]

    counter = CompileCounterWithBackend("inductor")
    compiled = run(torch.compile(reuse, backend=counter, fullgraph=True))
    eager = run(reuse)
    assert counter.frame_count == 1
    targets = [node.target for node in counter.graphs[0].graph.nodes if node.op == "call_function"]
    for op in (torch.ops.amp_fused.restore_orthogonal_, torch.ops.amp_fused.add_orthogonal_, torch.ops.amp_fused.norms):
        assert targets.count(op) == 1, op
    for c, e in zip(compiled, eager):
        assert torch.equal(c, e)
    assert max((g - g1).abs().max().item() for g, g1 in zip(compiled[10:15], grads1)) > 1e-2  # the ops ran


@pytest.mark.parametrize("backend", FUSED)
def test_compiled_model_trains_under_asam_like_the_eager_model(backend):
    def run(model):
        x, y = data()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=EPSILON, adaptive=True, eta=0.01, lr=LR,
                  momentum=MOMENTUM, backend=backend)
        seen = []

        def closure():
            seen.append(snapshot(model))
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return seen, torch.stack([opt.step(closure) for _ in range(3)]), snapshot(model)

    eager_seen, eager_losses, eager_final = run(mlp())
    counter = CompileCounterWithBackend("inductor")
    compiled_seen, compiled_losses, compiled_final = run(torch.compile(mlp(), backend=counter))
    assert counter.frame_count == 1
    assert len(compiled_seen) == 2 * 3  # per step: θ, then θ + e
    for compiled_params, eager_params in zip(compiled_seen, eager_seen):
        for c, e in zip(compiled_params, eager_params):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for c, e in zip(compiled_final, eager_final):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    # the compiled forward ran at θ + e, e on the ρ-sphere in the coordinates θ/(|θ| + η)
    theta, perturbed = compiled_seen[0], compiled_seen[1]
    scaled = torch.cat([((p - t) / (t.abs() + 0.01)).flatten() for p, t in zip(perturbed, theta)])
    torch.testing.assert_close(scaled.norm(), torch.tensor(EPSILON), rtol=1e-3, atol=0)


# -- compiling the optimizer's methods ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED)
def test_compiling_step_runs_amp_eagerly_and_exactly(backend):
    # Dynamo would drop the optimizer's attribute assignments (the restore would be skipped: wrong parameters),
    # so step() runs eagerly under torch.compile: bitwise the eager result, and nothing of it is compiled.
    eager = train(mlp(), backend, "global")
    counter = CompileCounterWithBackend("eager")
    compiled = train(mlp(), backend, "global", step=lambda opt: torch.compile(opt.step, backend=counter))
    (compiled_seen, compiled_losses, compiled_final), (eager_seen, eager_losses, eager_final) = compiled, eager
    assert len(compiled_seen) == len(eager_seen)
    for compiled_params, eager_params in zip(compiled_seen, eager_seen):
        assert all(torch.equal(c, e) for c, e in zip(compiled_params, eager_params))
    assert torch.equal(compiled_losses, eager_losses)
    assert all(torch.equal(c, e) for c, e in zip(compiled_final, eager_final))
    assert counter.frame_count == 0


@pytest.mark.parametrize("method", ["step", "first_step", "second_step", "restore"])
def test_fullgraph_compile_of_the_optimizer_methods_explains_itself(method):
    model = mlp()
    opt = AMP(model.parameters(), lr=LR, epsilon=EPSILON, backend="foreach")
    args = (lambda: torch.zeros(()),) if method == "step" else ()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="per-step state in optimizer attributes"):
        torch.compile(getattr(opt, method), backend="eager", fullgraph=True)(*args)
