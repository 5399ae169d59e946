"""AMP under torch.distributed on gloo with 2 CPU processes: DistributedDataParallel (ascents synchronised or
per worker) and DTensor-sharded parameters (FSDP2's fully_shard, and distribute_tensor with the functional ops).

Starting the processes costs far more than the scenarios, so one pair of workers runs all of them and saves
what it measured; the tests compare that with single-process computations: the AMP optimizer on the
concatenated batch, and an independent plain-torch implementation of Algorithm 1 (``reference_training``).
Everything is float64, so rounding (the split batch, the all-reduce order) stays far below the tolerance.
"""
from __future__ import annotations

import datetime
import os
import socket
import time

import no_triton_shadow  # noqa: F401 - the spawned workers import this module, not conftest.py
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call

from amp_fused import AMP, SAM, available_backends, functional
from op_definition import projection_scale

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="this torch build has no torch.distributed with the gloo backend")]

WORLD = 2
PG_TIMEOUT = 60  # seconds any collective may wait before the process group gives up
JOIN_TIMEOUT = 300  # seconds the workers get in all (spawning, importing torch, the scenarios)
# The reference backend decides the projection with fp32 norms on the host; these runs compare in fp64.
BACKENDS = [b for b in available_backends("cpu") if b != "reference"]
NORMS = ("per_tensor", "global")

# Hyperparameters of every training run: ε is small enough that each ascent is projected (the norms matter).
STEPS, LR, MOMENTUM, EPSILON, INNER_LR, INNER_ITER = 3, 0.2, 0.9, 0.05, 0.5, 2
TOL = dict(rtol=1e-10, atol=1e-12)
FAR = 1e-4  # a difference that is not rounding: 10⁶ times the tolerance for values of order 1


# -- the model, the data and the plain-torch Algorithm 1 --------------------------------------------------
def mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        # Hidden units 0-7 (rank 0's half of layer 0 when sharded on dim 0) get 30x the gradient of units
        # 8-15, so the local norms of the two shards are far apart.
        model[2].weight[:, :8] *= 30
    return model


def batches():
    """Per step, per rank, (x, y); the ranks draw from different distributions, so local gradients differ."""
    gen = torch.Generator().manual_seed(1)
    return [[(torch.randn(8, 6, generator=gen, dtype=torch.float64) + 2.0 * rank,
              torch.randint(0, 3, (8,), generator=gen) if rank == 0 else torch.full((8,), 2))
             for rank in range(WORLD)] for _ in range(STEPS)]


def concatenated(shards):
    return torch.cat([x for x, _ in shards]), torch.cat([y for _, y in shards])


def loss_closure(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def project(deltas, norm, shards=1):
    """Δ projected onto the ε-ball. With ``shards`` > 1 each rank's ``torch.chunk`` piece is projected with its
    own norm (per tensor, or over all its pieces for ``global``): what the ranks would do without all-reducing
    the norms, which the sharded tests must tell apart from the right answer."""
    pieces = [d.chunk(shards) for d in deltas]

    def scale(norm_):
        return projection_scale(EPSILON, norm_)

    if norm == "per_tensor":
        return [torch.cat([p * scale(p.norm()) for p in ps]) for ps in pieces]
    rank_norms = [torch.stack([ps[r].norm() for ps in pieces if r < len(ps)]).norm() for r in range(shards)]
    return [torch.cat([p * scale(rank_norms[r]) for r, p in enumerate(ps)]) for ps in pieces]


def reference_training(norm, local_ascent=False, shards=1):
    """Final parameters of STEPS steps of AMP + SGD with momentum, in plain torch. ``local_ascent``: each rank
    ascends with its own batch's gradient and the final gradients are averaged (DDP with sync_ascent=False)."""
    model = mlp()
    names = [name for name, _ in model.named_parameters()]
    theta = [p.detach().clone() for p in model.parameters()]

    def gradient(point, x, y):
        point = [t.detach().requires_grad_() for t in point]
        loss = nn.functional.cross_entropy(functional_call(model, dict(zip(names, point)), (x,)), y)
        return torch.autograd.grad(loss, point)

    def ascent(x, y):
        grads, delta = gradient(theta, x, y), [torch.zeros_like(t) for t in theta]
        for _ in range(INNER_ITER):
            delta = project([d + INNER_LR * g for d, g in zip(delta, grads)], norm, shards)
            grads = gradient([t + d for t, d in zip(theta, delta)], x, y)
        return grads

    buffers = None
    for shards_of_step in batches():
        if local_ascent:
            per_rank = [ascent(x, y) for x, y in shards_of_step]
            grads = [torch.stack(gs).mean(0) for gs in zip(*per_rank)]
        else:
            grads = ascent(*concatenated(shards_of_step))
        buffers = list(grads) if buffers is None else [MOMENTUM * b + g for b, g in zip(buffers, grads)]
        theta = [t - LR * b for t, b in zip(theta, buffers)]
    return theta


def single_process_amp(norm, backend):
    """The AMP optimizer in this process on the concatenated batches; returns parameters and last norms."""
    model = mlp()
    opt = AMP(model.parameters(), lr=LR, epsilon=EPSILON, inner_lr=INNER_LR, inner_iter=INNER_ITER,
              momentum=MOMENTUM, norm=norm, backend=backend)
    for shards_of_step in batches():
        opt.step(loss_closure(model, *concatenated(shards_of_step)))
    return [p.detach().clone() for p in model.parameters()], opt.last_norms


SAM_RHO, SAM_ETA = 0.1, 0.01


def make_sam(params, adaptive, **kwargs):
    return SAM(params, torch.optim.SGD, rho=SAM_RHO, adaptive=adaptive, eta=SAM_ETA, lr=LR, momentum=MOMENTUM,
               **kwargs)


def single_process_sam(adaptive, rho=SAM_RHO):
    """SAM/ASAM in this process on the concatenated batches (``rho=0``: plain SGD)."""
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, eta=SAM_ETA, lr=LR, momentum=MOMENTUM)
    for shards_of_step in batches():
        opt.step(loss_closure(model, *concatenated(shards_of_step)))
    return [p.detach().clone() for p in model.parameters()]


# The toward-ERM schedules: the adaptive trigger deciding from ‖g‖² at θ (every rank must decide alike) and the
# "gradient" steps' g_v, whose dots and norms must be those of the full tensors under FSDP2.
SCHEDULE = dict(perturb_every="adaptive", between="gradient", adaptive_threshold=-0.5, adaptive_decay=0.5)
SCHEDULE_STEPS = 8


def schedule_batches(step):
    return batches()[step % STEPS]


def single_process_schedule(norm, **schedule):
    """The adaptive/gradient schedule in this process on the concatenated batches: parameters and step kinds."""
    model = mlp()
    opt = AMP(model.parameters(), lr=LR, epsilon=EPSILON, inner_lr=INNER_LR, momentum=MOMENTUM, norm=norm,
              **dict(SCHEDULE, **schedule))
    kinds = []
    for step in range(SCHEDULE_STEPS):
        opt.step(loss_closure(model, *concatenated(schedule_batches(step))))
        kinds.append(opt.last_step_kind)
    return [p.detach().clone() for p in model.parameters()], kinds


def max_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOL)


# -- the workers (module level, so that spawn can pickle them) --------------------------------------------
def _init_process_group(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=PG_TIMEOUT))
    torch.set_num_threads(1)  # two workers share two cores


def _train_ddp(rank, backend, norm, sync_ascent):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(mlp())
    opt = AMP(model.parameters(), lr=LR, epsilon=EPSILON, inner_lr=INNER_LR, inner_iter=INNER_ITER,
              momentum=MOMENTUM, norm=norm, backend=backend, model=model, sync_ascent=sync_ascent)
    for shards_of_step in batches():
        opt.step(loss_closure(model, *shards_of_step[rank]))
    return [p.detach().clone() for p in model.module.parameters()]


def _train_sam_ddp(rank, adaptive):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(mlp())
    opt = make_sam(model.parameters(), adaptive, model=model)
    for shards_of_step in batches():
        opt.step(loss_closure(model, *shards_of_step[rank]))
    return [p.detach().clone() for p in model.module.parameters()]


def _train_sam_fsdp(rank, mesh, adaptive):
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for module in (model[0], model[2], model):
        fully_shard(module, mesh=mesh)
    opt = make_sam(model.parameters(), adaptive)
    for shards_of_step in batches():
        opt.step(loss_closure(model, *shards_of_step[rank]))
    return [p.full_tensor() for p in model.parameters()]


def _train_schedule(rank, norm, mesh=None):
    """The schedule under DDP (``mesh`` None; ascents unsynced, which the trigger's pass at θ overrides) or FSDP2."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if mesh is None:
        model = DistributedDataParallel(mlp())
        extra = dict(model=model, sync_ascent=False)
    else:
        model = mlp()
        for module in (model[0], model[2], model):
            fully_shard(module, mesh=mesh)
        extra = {}
    opt = AMP(model.parameters(), lr=LR, epsilon=EPSILON, inner_lr=INNER_LR, momentum=MOMENTUM, norm=norm,
              **SCHEDULE, **extra)
    kinds = []
    for step in range(SCHEDULE_STEPS):
        opt.step(loss_closure(model, *schedule_batches(step)[rank]))
        kinds.append(opt.last_step_kind)
    params = model.module.parameters() if mesh is None else (p.full_tensor() for p in model.parameters())
    return {"params": [p.detach().clone() for p in params], "kinds": kinds}


def _train_fsdp(rank, mesh, norm):
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    layout = [(type(p).__name__, tuple(p.shape), tuple(p.to_local().shape)) for p in model.parameters()]
    opt = AMP(model.parameters(), lr=LR, epsilon=EPSILON, inner_lr=INNER_LR, inner_iter=INNER_ITER,
              momentum=MOMENTUM, norm=norm)
    for shards_of_step in batches():
        opt.step(loss_closure(model, *shards_of_step[rank]))
    return {"params": [p.full_tensor() for p in model.parameters()], "last_norms": opt.last_norms.clone(),
            "layout": layout}


def dtensor_case():
    """Full tensors for the functional DTensor scenario: θ, two gradients and their placements ("plain": a
    torch.Tensor every rank holds whole)."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(6, 5), (4, 7), (5,), (3, 3), (2,)]
    placements = ["shard0", "shard1", "shard0", "replicate", "plain"]
    theta = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(2)]
    for g in grads:
        g[0][:3] *= 40  # rank 0's rows of tensor 0 dominate its norm
    return theta, grads, placements


def _dtensor_ops(mesh):
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    theta, grads, placements = dtensor_case()
    kinds = {"shard0": [Shard(0)], "shard1": [Shard(1)], "replicate": [Replicate()]}

    # distribute_tensor and full_tensor may alias their argument for Replicate: clone both ways.
    def distribute(tensors):
        return [t.clone() if kind == "plain" else distribute_tensor(t.clone(), mesh, kinds[kind])
                for t, kind in zip(tensors, placements)]

    def full(tensors):
        return [(t.full_tensor() if isinstance(t, DTensor) else t).clone() for t in tensors]

    out = {}
    for norm in NORMS:
        per_tensor = norm == "per_tensor"
        params, steps = distribute(theta), [distribute(g) for g in grads]
        backups = [torch.empty_like(p) for p in params]
        norms = [functional.perturb_(params, steps[0], backups, EPSILON, INNER_LR, per_tensor, True).clone()]
        after_first = full(params)
        norms.append(functional.perturb_(params, steps[1], backups, EPSILON, INNER_LR, per_tensor, False).clone())
        delta = full(functional.perturbation(params, backups))
        buffers = [torch.empty_like(p) for p in params]
        functional.restore_sgd_(params, backups, steps[1], buffers, LR, MOMENTUM, 0.0, 0.01, False, False, True)
        out[norm] = {"norms": norms, "after_first": after_first, "delta": delta, "after_sgd": full(params),
                     "buffers": full(buffers)}

    errors = {}
    params = distribute(theta)
    mismatched = [distribute_tensor(g, mesh, [Replicate()]) for g in grads[0]]
    partial = [DTensor.from_local(theta[0].clone(), mesh, [Partial()])]
    for name, call in (
            ("grads_replicated", lambda: functional.perturb_(params, mismatched, [torch.empty_like(p) for p in params],
                                                             EPSILON, INNER_LR)),
            ("params_partial", lambda: functional.perturb_(partial, [torch.zeros_like(partial[0])],
                                                           [torch.empty_like(partial[0])], EPSILON, INNER_LR))):
        try:
            call()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    out["errors"] = errors
    return out


def mesh_2d_case():
    """Full tensors for a 2-D mesh (2 x 1): each sharded over a different set of mesh dimensions."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 4), (4, 6), (6, 5)]
    theta = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    for g in grads:
        g[:3] *= 40
    return theta, grads


def _dtensor_ops_2d():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD, 1))
    # summed over mesh dim 0 only, over dim 1 only (a group of one), over both
    placements = [[Shard(0), Replicate()], [Replicate(), Shard(0)], [Shard(0), Shard(1)]]
    theta, grads = mesh_2d_case()
    out = {}
    for norm in NORMS:
        params = [distribute_tensor(t.clone(), mesh, pl) for t, pl in zip(theta, placements)]
        steps = [distribute_tensor(g.clone(), mesh, pl) for g, pl in zip(grads, placements)]
        backups = [torch.empty_like(p) for p in params]
        norms = functional.perturb_(params, steps, backups, EPSILON, INNER_LR, norm == "per_tensor", True)
        out[norm] = {"norms": norms.clone(), "params": [p.full_tensor().clone() for p in params]}
    return out


def _run_all_scenarios(rank, port, out_dir, backends):
    _init_process_group(rank, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        results = {}
        for backend in backends:
            for norm in NORMS:
                for sync_ascent in (True, False):
                    results["ddp", backend, norm, sync_ascent] = _train_ddp(rank, backend, norm, sync_ascent)
        mesh = init_device_mesh("cpu", (WORLD,))
        for norm in NORMS:
            results["fsdp", norm] = _train_fsdp(rank, mesh, norm)
        for adaptive in (False, True):
            results["sam-ddp", adaptive] = _train_sam_ddp(rank, adaptive)
            results["sam-fsdp", adaptive] = _train_sam_fsdp(rank, mesh, adaptive)
        for norm in NORMS:
            results["schedule-ddp", norm] = _train_schedule(rank, norm)
            results["schedule-fsdp", norm] = _train_schedule(rank, norm, mesh)
        results["dtensor"] = _dtensor_ops(mesh)
        results["dtensor_2d"] = _dtensor_ops_2d()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _die_in_a_collective(rank, port):
    _init_process_group(rank, port)
    if rank == 1:
        os._exit(3)  # no clean-up: as a crashed worker
    dist.barrier()  # rank 0 would wait here for PG_TIMEOUT seconds


# -- the harness ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(fn, *args, timeout=JOIN_TIMEOUT):
    """Run ``fn(rank, port, *args)`` in WORLD spawned processes. Raises as soon as one of them fails (and
    kills the others); fails the test if they are not done within ``timeout`` seconds."""
    context = mp.start_processes(fn, args=(free_port(), *args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=5):
            if time.monotonic() >= deadline:
                pytest.fail(f"the {WORLD} workers did not finish within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    run_workers(_run_all_scenarios, str(out_dir), BACKENDS)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


# -- the tests --------------------------------------------------------------------------------------------
def test_a_dying_worker_fails_the_run_fast():
    start = time.monotonic()
    with pytest.raises(mp.ProcessExitedException, match="exit code 3"):
        run_workers(_die_in_a_collective, timeout=PG_TIMEOUT)
    assert time.monotonic() - start < PG_TIMEOUT  # the harness noticed, not gloo's timeout


@pytest.mark.parametrize("norm", NORMS)
def test_the_plain_torch_algorithm_is_the_optimizer_on_one_process(norm):
    # The reference_training used as expectation below computes what AMP computes on one process.
    assert_all_close(single_process_amp(norm, "foreach")[0], reference_training(norm))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_ddp_equals_single_process_amp_on_the_concatenated_batch(worker_results, backend, norm):
    expected = single_process_amp(norm, backend)[0]
    for rank in range(WORLD):
        assert_all_close(worker_results[rank]["ddp", backend, norm, True], expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_ddp_unsynced_ascent_is_each_worker_perturbing_with_its_local_gradient(worker_results, backend, norm):
    expected = reference_training(norm, local_ascent=True)
    for rank in range(WORLD):
        assert_all_close(worker_results[rank]["ddp", backend, norm, False], expected)
    synced = worker_results[0]["ddp", backend, norm, True]
    assert max_difference(worker_results[0]["ddp", backend, norm, False], synced) > FAR


@pytest.mark.parametrize("norm", NORMS)
def test_fully_shard_equals_unsharded_amp(worker_results, norm):
    expected, expected_norms = single_process_amp(norm, "foreach")
    for rank in range(WORLD):
        result = worker_results[rank]["fsdp", norm]
        for kind, full_shape, local_shape in result["layout"]:  # really sharded: each rank holds part of each
            assert kind == "DTensor" and local_shape[0] < full_shape[0]
        assert_all_close(result["params"], expected)
        torch.testing.assert_close(result["last_norms"], expected_norms, rtol=1e-6, atol=0)  # fp32 norms
    # Norms of the local shards instead of the full tensors would have trained visibly differently.
    assert max_difference(reference_training(norm, shards=WORLD), expected) > FAR


@pytest.mark.parametrize("norm", NORMS)
def test_dtensor_ops_equal_the_ops_on_the_full_tensors(worker_results, norm):
    theta, (g1, g2), _ = dtensor_case()
    delta1 = project([INNER_LR * g for g in g1], norm)
    delta2_raw = [d + INNER_LR * g for d, g in zip(delta1, g2)]
    delta2 = project(delta2_raw, norm)

    def norms_of(deltas):
        norms = torch.stack([d.norm() for d in deltas])
        return torch.cat([norms, norms.norm().reshape(1)]).float()

    d_p = [g + 0.01 * t for g, t in zip(g2, theta)]  # weight decay 0.01; first momentum step: buffer = d_p
    for rank in range(WORLD):
        result = worker_results[rank]["dtensor"][norm]
        assert_all_close(result["after_first"], [t + d for t, d in zip(theta, delta1)])
        assert_all_close(result["delta"], delta2)
        assert_all_close(result["after_sgd"], [t - LR * d for t, d in zip(theta, d_p)])
        assert_all_close(result["buffers"], d_p)
        torch.testing.assert_close(result["norms"][0], norms_of([INNER_LR * g for g in g1]), rtol=1e-6, atol=0)
        torch.testing.assert_close(result["norms"][1], norms_of(delta2_raw), rtol=1e-6, atol=0)
    # The test can tell: the norms of the local shards would have projected tensor 0 differently.
    local = project([INNER_LR * g for g in g1], norm, shards=WORLD)
    assert (local[0] - delta1[0]).abs().max() > FAR


@pytest.mark.parametrize("norm", NORMS)
def test_dtensor_ops_on_a_2d_mesh_reduce_over_the_sharding_dimensions_only(worker_results, norm):
    theta, grads = mesh_2d_case()
    deltas = [INNER_LR * g for g in grads]
    norms = torch.stack([d.norm() for d in deltas])
    for rank in range(WORLD):
        result = worker_results[rank]["dtensor_2d"][norm]
        assert_all_close(result["params"], [t + d for t, d in zip(theta, project(deltas, norm))])
        torch.testing.assert_close(result["norms"], torch.cat([norms, norms.norm().reshape(1)]).float(),
                                   rtol=1e-6, atol=0)


def test_dtensor_ops_reject_mismatched_and_partial_tensors(worker_results):
    errors = worker_results[0]["dtensor"]["errors"]
    assert errors["grads_replicated"] is not None and "grads[0]" in errors["grads_replicated"]
    assert "Shard(dim=0)" in errors["grads_replicated"] and "Replicate()" in errors["grads_replicated"]
    assert errors["params_partial"] is not None and "params[0]" in errors["params_partial"]
    assert "Partial" in errors["params_partial"]


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_under_ddp_and_fully_shard_equals_single_process_sam(worker_results, adaptive):
    """SAM's one ball over all parameters: under DDP from the all-reduced gradient, under FSDP2 from the norms of
    the full tensors (the sharded backend), so both equal SAM on the concatenated batch in one process."""
    expected = single_process_sam(adaptive)
    for rank in range(WORLD):
        assert_all_close(worker_results[rank]["sam-ddp", adaptive], expected)
        assert_all_close(worker_results[rank]["sam-fsdp", adaptive], expected)
    assert max_difference(expected, single_process_sam(adaptive, rho=0.0)) > FAR  # the ascent mattered
    assert max_difference(expected, single_process_sam(not adaptive)) > FAR


@pytest.mark.parametrize("norm", NORMS)
def test_adaptive_gradient_schedule_under_ddp_and_fully_shard_equals_one_process(worker_results, norm):
    """Every rank takes the same decisions as one process on the concatenated batch (the trigger reads the synced
    gradient at θ, even with sync_ascent=False), and under FSDP2 g_v's dots and norms are the full tensors'."""
    expected, kinds = single_process_schedule(norm)
    assert "amp" in kinds and "gradient" in kinds
    for rank in range(WORLD):
        for scenario in ("schedule-ddp", "schedule-fsdp"):
            result = worker_results[rank][scenario, norm]
            assert result["kinds"] == kinds, scenario
            assert_all_close(result["params"], expected)
    # the reused direction mattered: the same decisions stepping with the plain gradient end elsewhere
    assert max_difference(expected, single_process_schedule(norm, reuse_alpha=0.0)[0]) > FAR
