"""The foreach backend's promises: no host synchronisation and a dispatched-op count that does not grow
with the number of parameter tensors (the reference backend, the original loop, is the contrast)."""
import pytest
import torch

from amp_fused import AMP, functional
from amp_fused.backends import foreach
from amp_fused.profiling import DispatchCounter


def lists(n, size=33):
    gen = torch.Generator().manual_seed(n)
    params = [torch.randn(size, generator=gen) for _ in range(n)]
    grads = [torch.randn(size, generator=gen) for _ in range(n)]
    return params, grads, [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]


def count(fn, backend, n):
    params, grads, backups, bufs = lists(n)
    functional.perturb_(params, grads, backups, 0.1, 1.0, True, True, backend=backend)  # warm caches
    with DispatchCounter() as counter:
        fn(params, grads, backups, bufs, backend)
    return counter


OPS = {
    "perturb_first_per_tensor": lambda p, g, b, m, be: functional.perturb_(p, g, b, 0.1, 1.0, True, True, backend=be),
    "perturb_later_global": lambda p, g, b, m, be: functional.perturb_(p, g, b, 0.1, 1.0, False, False, backend=be),
    "restore": lambda p, g, b, m, be: functional.restore_(p, b, backend=be),
    "restore_sgd": lambda p, g, b, m, be: functional.restore_sgd_(p, b, g, m, 0.1, 0.9, 0.0, 1e-4, True, False, False,
                                                                  backend=be),
}


@pytest.mark.parametrize("op", OPS)
def test_foreach_device_path_is_sync_free_and_constant(op, monkeypatch):
    # what runs on a GPU: the same code with host reads treated as synchronisations
    monkeypatch.setattr(foreach, "host_reads_are_free", lambda t: False)
    small, large = count(OPS[op], "foreach", 10), count(OPS[op], "foreach", 300)
    assert small.syncs == 0 and large.syncs == 0, large.by_name
    assert small.ops == large.ops, (small.by_name, large.by_name)


@pytest.mark.parametrize("op", OPS)
def test_foreach_cpu_path_reads_at_most_once_and_is_constant(op):
    small, large = count(OPS[op], "foreach", 10), count(OPS[op], "foreach", 300)
    assert small.syncs <= 1 and large.syncs <= 1, large.by_name
    assert small.ops == large.ops, (small.by_name, large.by_name)


@pytest.mark.parametrize("first", [True, False])
def test_foreach_cpu_shortcuts_match_the_device_path(first, monkeypatch):
    # fp32 norms with a float64 redo, and the skipped zeroing pass, against the device path on the same inputs:
    # one tensor overflows fp32's sum of squares, one is non-finite, the rest are ordinary
    def run():
        params, grads, backups, _ = lists(6)
        grads[1][0] = 3e20
        grads[2][3] = float("nan")
        if not first:
            functional.perturb_(params, grads, backups, 0.5, 1.0, True, True, backend="foreach")
        norms = functional.perturb_(params, grads, backups, 0.5, 1.0, True, first, backend="foreach")
        return params, norms

    cpu_params, cpu_norms = run()
    monkeypatch.setattr(foreach, "host_reads_are_free", lambda t: False)
    device_params, device_norms = run()
    assert torch.isfinite(cpu_norms[1]) and torch.isnan(cpu_norms[2])
    torch.testing.assert_close(cpu_norms, device_norms, equal_nan=True, rtol=1e-6, atol=0)
    for a, b in zip(cpu_params, device_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_reference_grows_with_tensor_count():
    # the contrast that makes the constant-count test meaningful: the original loop syncs once per tensor
    small, large = count(OPS["perturb_first_per_tensor"], "reference", 10), count(OPS["perturb_first_per_tensor"],
                                                                                  "reference", 300)
    assert small.syncs == 10 and large.syncs == 300
    assert large.ops > 20 * small.ops / 2


def optimizer_step_counts(n, backend):
    model = torch.nn.ModuleList(torch.nn.Linear(4, 4, bias=False) for _ in range(n))
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
              backend=backend)

    def fill_grads():
        for p in model.parameters():
            p.grad = torch.ones_like(p)

    for _ in range(2):  # the first step allocates backups and momentum buffers
        fill_grads()
        opt.first_step()
        fill_grads()
        opt.second_step()
    fill_grads()
    with DispatchCounter() as counter:
        opt.first_step()
    fill_grads()
    with DispatchCounter() as counter2:
        opt.second_step()
    return counter.ops + counter2.ops, counter.syncs + counter2.syncs


def test_optimizer_step_on_foreach_is_sync_free_and_constant(monkeypatch):
    monkeypatch.setattr(foreach, "host_reads_are_free", lambda t: False)  # the device path, as above
    ops_small, syncs_small = optimizer_step_counts(10, "foreach")
    ops_large, syncs_large = optimizer_step_counts(200, "foreach")
    assert syncs_small == syncs_large == 0
    assert ops_small == ops_large
