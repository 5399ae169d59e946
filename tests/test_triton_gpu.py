"""The compiled Triton kernels on CUDA tensors (issue 12): the op cases against the float64 definition
(tests/op_definition.py), the ``cuda`` backend and ``foreach``; determinism; no host sync after warm-up and after
a forced table rebuild; CUDA graph capture; unaligned views; mixed dtypes; launches per op; the tables' pinned
uploads and streams.

Never under Triton's interpreter (tests/triton covers that, on host copies): this file needs a CUDA device and
the compiled kernels, and skips, saying why, without them. Uses nothing newer than torch 2.11 and Triton 3.6.
"""
import contextlib
import math
import os

import pytest
import torch

from op_definition import (DTYPES, ascent_bounds, assert_bitwise_equal, assert_within, clones, dtype_id, empty_like,
                           epsilon_for, make_lists, norm_bounds, perturb, restore_sgd, sgd_bounds)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="compiled Triton only: TRITON_INTERPRET=1 runs the interpreter (tests/triton covers it)"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible"),
]

DEVICE = "cuda"
KERNEL_NAMES = ("perturb_sumsq_kernel", "perturb_scale_kernel", "perturb_apply_kernel", "restore_sgd_kernel",
                "copy_kernel", "pair_sums_kernel", "pair_scale_kernel", "restore_orthogonal_kernel",
                "add_orthogonal_kernel")
SGD_FLAGS = [dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False),
             dict(momentum=0.5, dampening=0.1, weight_decay=0.0, nesterov=False, maximize=True),
             dict(momentum=0.0, dampening=0.0, weight_decay=1e-2, nesterov=False, maximize=False)]


@pytest.fixture(scope="module")
def chunk():
    from amp_fused.triton.metadata import CHUNK

    return CHUNK


@pytest.fixture(scope="module")
def triton_ops():
    """The triton backend, compiled (skips, saying why, where it cannot run)."""
    import amp_fused

    reason = amp_fused.backends.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"the triton backend is unavailable here: {reason}")
    from amp_fused.triton import ops

    if ops.INTERPRET:
        pytest.skip("amp_fused's triton backend was loaded with the interpreter on")
    return amp_fused.backends.resolve("triton", "cuda")


def other_backends():
    """The backends the Triton results are compared with: foreach, and cuda where it is built."""
    import amp_fused

    return ["foreach"] + (["cuda"] if "cuda" in amp_fused.available_backends("cuda") else [])


def edge_shapes(chunk):
    # one element, 0-d, part of a vector step, around one chunk, several chunks with a ragged end, 2-d and 4-d
    return [(1,), (), (7,), (3, 5), (chunk - 1,), (chunk,), (chunk + 1,), (2 * chunk + 17,), (16, 16), (64, 3, 3, 3)]


def run_perturb(backend, params, grads, backups, epsilon, inner_lr, per_tensor, first):
    from amp_fused import functional

    return functional.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, backend=backend)


def plus(a, b):
    return [x + y for x, y in zip(a, b)]


# -- the op cases ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_perturb_against_the_definition_cuda_and_foreach(triton_ops, chunk, dtype, per_tensor):
    shapes = edge_shapes(chunk)
    theta, grads = make_lists(shapes, dtype, seed=1, device=DEVICE)
    grads2 = make_lists(shapes, dtype, seed=2, device=DEVICE)[1]
    epsilon = epsilon_for(grads, 0.5, per_tensor)
    results = {}
    for backend in ["triton"] + other_backends():
        params, backups = clones(theta), empty_like(theta)
        norms = [run_perturb(backend, params, grads, backups, epsilon, 0.5, per_tensor, True)]
        first = clones(params)
        norms.append(run_perturb(backend, params, grads2, backups, epsilon, 0.5, per_tensor, False))
        results[backend] = (first, clones(params), norms)
    expected_first = perturb(theta, grads, None, epsilon, 0.5, per_tensor, True)
    triton_first, triton_second, triton_norms = results["triton"]
    expected_second = perturb(triton_first, grads2, theta, epsilon, 0.5, per_tensor, False)
    first_bounds = ascent_bounds(expected_first, dtype, per_tensor)
    second_bounds = ascent_bounds(expected_second, dtype, per_tensor)
    assert_within(triton_first, expected_first.params, first_bounds, "first ascent")
    assert_within(triton_second, expected_second.params, second_bounds, "later ascent")
    assert_within([triton_norms[0]], [expected_first.norms.float()], [norm_bounds(expected_first, dtype)], "norms")
    for backend in other_backends():
        first, _, norms = results[backend]
        # each within the definition's bounds of the same step, so within twice them of each other
        assert_within(triton_first, first, plus(first_bounds, first_bounds), f"first ascent vs {backend}")
        assert_within([triton_norms[0]], [norms[0]], [2 * norm_bounds(expected_first, dtype)], f"norms vs {backend}")


@pytest.mark.parametrize("flags", SGD_FLAGS, ids=lambda f: f"m{f['momentum']}-nesterov{f['nesterov']}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_sgd_against_the_definition_cuda_and_foreach(triton_ops, chunk, dtype, flags):
    from amp_fused import functional

    shapes = edge_shapes(chunk)
    theta, _ = make_lists(shapes, dtype, seed=13, device=DEVICE, param_scale=0.1)
    ascent_grads, grads = make_lists(shapes, dtype, seed=14, device=DEVICE)
    old_buffers = make_lists(shapes, dtype, seed=15, device=DEVICE)[1]
    results = {}
    for backend in ["triton"] + other_backends():
        params, backups, buffers = clones(theta), empty_like(theta), clones(old_buffers)
        functional.perturb_(params, ascent_grads, backups, 0.5, 1.0, True, True, backend=backend)
        functional.restore_sgd_(params, backups, grads, buffers, 0.5, first_step=False, backend=backend, **flags)
        results[backend] = (params, buffers)
    expected = restore_sgd(theta, grads, old_buffers, 0.5, first_step=False, **flags)
    param_bounds, buffer_bounds = sgd_bounds(theta, grads, old_buffers, expected, 0.5, flags["momentum"],
                                             flags["weight_decay"], False)
    params, buffers = results["triton"]
    assert_within(params, expected.params, param_bounds, "param")
    if flags["momentum"]:
        assert_within(buffers, expected.momentum_buffers, buffer_bounds, "buffer")
    else:
        assert_bitwise_equal(buffers, old_buffers, "untouched buffer")
    for backend in other_backends():
        other_params, other_buffers = results[backend]
        assert_within(params, other_params, plus(param_bounds, param_bounds), f"param vs {backend}")
        if flags["momentum"]:
            assert_within(buffers, other_buffers, plus(buffer_bounds, buffer_bounds), f"buffer vs {backend}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_puts_theta_back_bit_for_bit(triton_ops, chunk, dtype):
    theta, grads = make_lists(edge_shapes(chunk), dtype, seed=3, device=DEVICE)
    params, backups = clones(theta), empty_like(theta)
    triton_ops.perturb_(params, grads, backups, 1.0, 1.0, True, True)
    triton_ops.perturb_(params, grads, backups, 1.0, 1.0, False, False)
    triton_ops.restore_(params, backups)
    assert_bitwise_equal(params, theta, "restored")


def test_mixed_dtypes_in_one_list(triton_ops, chunk):
    shapes = [(chunk + 1,), (7,), (2 * chunk + 3,), (5,), (3, 5), (chunk,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16]
    theta, grads = make_lists(shapes, dtypes, seed=4, device=DEVICE)
    for per_tensor in (True, False):
        epsilon = epsilon_for(grads, 1.0, per_tensor)
        expected = perturb(theta, grads, None, epsilon, 1.0, per_tensor, True)
        bounds = ascent_bounds(expected, dtypes, per_tensor)
        for backend in ["triton"] + other_backends():
            params, backups = clones(theta), empty_like(theta)
            norms = run_perturb(backend, params, grads, backups, epsilon, 1.0, per_tensor, True)
            assert_within(params, expected.params, bounds, f"{backend} params")
            assert_within([norms], [expected.norms.float()], [norm_bounds(expected, dtypes)], f"{backend} norms")


def _unaligned(t):
    view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    assert view.data_ptr() % 16
    return view.copy_(t)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_unaligned_views_give_the_aligned_results(triton_ops, chunk, dtype):
    """Views that start one element into their buffers, mixed with aligned tensors in one list (the aligned ones
    take the vector path, the others not): the ascent within the definition's bounds, θ restored bit for bit,
    and the SGD step (elementwise, no reduction) bitwise that of the same values in aligned tensors. (The sums
    of squares may be reduced in another order on the two paths, so the ascent is not compared bitwise.)"""
    shapes = [(2 * chunk + 5,), (chunk + 3,), (2 * chunk,), (chunk,), (7,)]
    theta, grads = make_lists(shapes, dtype, seed=5, device=DEVICE)
    buffers = make_lists(shapes, dtype, seed=6, device=DEVICE)[1]
    expected = perturb(theta, grads, None, 0.05, 1.0, True, True)
    bounds = ascent_bounds(expected, dtype, True)
    results = {}
    for name, unaligned_at in (("aligned", ()), ("mixed", (1, 3))):
        p, g, b, m = clones(theta), clones(grads), empty_like(theta), clones(buffers)
        for i in unaligned_at:
            p[i], g[i], b[i], m[i] = (_unaligned(x[i]) for x in (p, g, b, m))
        norms = triton_ops.perturb_(p, g, b, 0.05, 1.0, True, True)
        assert_within(p, expected.params, bounds, f"{name} ascent")
        assert_within([norms], [expected.norms.float()], [norm_bounds(expected, dtype)], f"{name} norms")
        triton_ops.restore_(p, b)
        assert_bitwise_equal(p, theta, f"{name} restored")
        triton_ops.restore_sgd_(p, b, g, m, 0.1, 0.9, 0.0, 1e-2, True, False, False)
        results[name] = (p, m)
    for got, want in zip(results["mixed"], results["aligned"]):
        assert_bitwise_equal(got, want, "SGD step with mixed alignment")


def test_bitwise_deterministic(triton_ops, chunk):
    shapes = [(3 * chunk + 1,)] * 3 + [(100 + i,) for i in range(200)] + [(1_000_000,)]
    theta, grads = make_lists(shapes, torch.float32, seed=7, device=DEVICE)
    runs = []
    for _ in range(2):
        params, backups = clones(theta), empty_like(theta)
        norms = [triton_ops.perturb_(params, grads, backups, 0.5, 1.0, True, True),
                 triton_ops.perturb_(params, grads, backups, 0.5, 1.0, False, False)]
        runs.append((params, norms))
    assert_bitwise_equal(runs[0][0], runs[1][0], "params")
    assert_bitwise_equal(runs[0][1], runs[1][1], "norms")


# -- host syncs, graphs, launches, tables ------------------------------------------------------------------------
@contextlib.contextmanager
def sync_debug_error():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _one_step(ops, params, grads, backups, buffers):
    norms = ops.perturb_(params, grads, backups, 0.05, 1.0, True, True)
    ops.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 1e-2, True, False, False)
    return norms


def test_no_host_sync_after_warm_up_and_after_a_table_rebuild(triton_ops, chunk):
    from amp_fused.triton import ops

    shapes = [(chunk + 1,), (7,), (3, 5), (2 * chunk,)]
    theta, grads = make_lists(shapes, torch.float32, seed=8, device=DEVICE)
    params, backups, buffers = clones(theta), empty_like(theta), clones(grads)
    held = ops.hold(params, backups)
    orthogonals, reused = empty_like(theta), clones(grads)

    def reuse_ops():
        triton_ops.norms(grads)
        triton_ops.perturb_(params, grads, backups, 0.5, 1.0, True, True)
        triton_ops.restore_orthogonal_(params, backups, grads, orthogonals, False)
        triton_ops.add_orthogonal_(reused, orthogonals, 1e-6, True)

    _one_step(triton_ops, params, grads, backups, buffers)  # warm-up: compiles the kernels
    _one_step(triton_ops, held, grads, backups, buffers)
    reuse_ops()
    torch.cuda.synchronize()
    with sync_debug_error():
        _one_step(triton_ops, params, grads, backups, buffers)  # cached tables
        _one_step(triton_ops, held, grads, backups, buffers)  # plan-held tables
        ops.CACHE.clear()  # forced rebuilds: every table of the cache, new gradients, a new held layout
        new_grads = [torch.randn_like(g) for g in grads]
        _one_step(triton_ops, params, new_grads, backups, buffers)
        _one_step(triton_ops, held, new_grads, backups, buffers)
        _one_step(triton_ops, ops.hold(params, backups), grads, backups, buffers)
        triton_ops.restore_(params, backups)
        reuse_ops()  # the gradient-reuse ops (warmed up before the guard): no sync either
    torch.cuda.synchronize()


def test_a_captured_step_replays_like_the_eager_step(triton_ops, chunk):
    from amp_fused.triton import ops

    shapes = [(2 * chunk + 3,), (chunk,), (5,), (64, 3, 3, 3)]
    theta, grads = make_lists(shapes, torch.float32, seed=9, device=DEVICE)
    buffers0 = make_lists(shapes, torch.float32, seed=10, device=DEVICE)[1]
    eager = clones(theta), empty_like(theta), clones(buffers0)
    eager_norms = _one_step(triton_ops, eager[0], grads, eager[1], eager[2])

    params, backups, buffers = clones(theta), empty_like(theta), clones(buffers0)
    held = ops.hold(params, backups)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream: kernels compiled, tables built there
        for _ in range(2):
            _one_step(triton_ops, held, grads, backups, buffers)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        graph_norms = _one_step(triton_ops, held, grads, backups, buffers)
    for target, source in zip(params + buffers, theta + buffers0):
        target.copy_(source)
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise_equal(list(held), eager[0], "params")
    assert_bitwise_equal(buffers, eager[2], "momentum buffers")
    assert_bitwise_equal([graph_norms], [eager_norms], "norms")


@contextlib.contextmanager
def counted_launches():
    """Kernel names, one per launch, by wrapping each kernel's ``run`` (what ``kernel[grid](...)`` calls)."""
    from amp_fused.triton import ops

    module = ops.kernels()
    launches, originals = [], {}
    for name in KERNEL_NAMES:
        kernel = getattr(module, name)

        def run(*args, _name=name, _original=kernel.run, **kwargs):
            launches.append(_name)
            return _original(*args, **kwargs)

        originals[name] = (kernel, kernel.__dict__.get("run"))
        kernel.run = run
    try:
        yield launches
    finally:
        for kernel, own in originals.values():
            if own is None:
                del kernel.run
            else:
                kernel.run = own


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16, torch.float16)],
                         ids=["one_dtype", "three_dtypes"])
def test_launches_per_op(triton_ops, chunk, dtypes):
    """ops.py: perturb_ 2G + 1, restore_ G, restore_sgd_ G, norms G + 1, restore_orthogonal_ and add_orthogonal_
    2G + 1 launches for G dtype groups, whatever the count."""
    groups = len(dtypes)
    for count in (10, 300):
        shapes = [(chunk + 7 * i,) for i in range(count)]
        theta, grads = make_lists(shapes, [dtypes[i % groups] for i in range(count)], seed=11, device=DEVICE)
        params, backups, buffers = clones(theta), empty_like(theta), clones(grads)
        for op, call, expected in (
                ("perturb_", lambda: triton_ops.perturb_(params, grads, backups, 0.5, 1.0, True, True), 2 * groups + 1),
                ("restore_sgd_", lambda: triton_ops.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 0.0,
                                                                 False, False, False), groups),
                ("restore_", lambda: triton_ops.restore_(params, backups), groups),
                ("norms", lambda: triton_ops.norms(grads), groups + 1),
                ("restore_orthogonal_", lambda: triton_ops.restore_orthogonal_(params, backups, grads, buffers, True),
                 2 * groups + 1),
                ("add_orthogonal_", lambda: triton_ops.add_orthogonal_(buffers, grads, 1e-6, False), 2 * groups + 1)):
            call()  # warm-up
            with counted_launches() as launches:
                call()
            assert len(launches) == expected, (op, count, launches)


def test_tables_are_pinned_uploads_recorded_on_the_streams_that_use_them(triton_ops, chunk):
    from amp_fused.triton import ops

    theta, grads = make_lists([(chunk + 1,), (9,)], torch.float32, seed=12, device=DEVICE)
    params, backups = clones(theta), empty_like(theta)
    held = ops.hold(params, backups)
    main = torch.cuda.current_stream()
    triton_ops.perturb_(held, grads, backups, 0.5, 1.0, True, True)
    tables = [held.held.layout.upload] + [t.upload for t in held.held.tables.values()]
    assert all(u.host.is_pinned() and u.device_tensor.is_cuda for u in tables)
    assert all(u.streams == {main} for u in tables)
    side = torch.cuda.Stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        triton_ops.perturb_(held, grads, backups, 0.5, 1.0, True, False)
    main.wait_stream(side)
    assert all(u.streams == {main, side} for u in tables)
    torch.cuda.synchronize()
    assert math.isfinite(float(params[0].sum()))
