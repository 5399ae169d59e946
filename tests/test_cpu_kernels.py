"""What is specific to the C++ CPU kernels (backend "cpu", csrc/cpu): the build and how a broken one is
reported, the chunk plan (64K-element chunks on torch's threads: millions of values, results bitwise identical
for any thread count), every tail length of the vector loops, the kernels' own argument checks, one dispatched
op per call, tracing under torch.compile, and the optimizer on this backend.

What every backend promises (the op definitions, dtypes, chunk-boundary sizes, non-finite gradients, layouts,
torch.optim.SGD, bit-exact restore) is tested once for all of them in tests/test_backend_contract.py, and the
argument contract in tests/test_checks.py.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import amp_fused
from amp_fused import _extension, backends, functional
from amp_fused.backends import cpu
from op_definition import (DTYPES, ascent_bounds, assert_bitwise_equal, assert_within, bound_norm, clones, dtype_id,
                           empty_like, make_lists, moved, norm_bounds, perturb, restore_sgd, sgd_bounds)

CHUNK = 1 << 16  # csrc/cpu/multi_tensor.h kChunkSize


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def check_ascent(params, grads, backups, theta, epsilon, inner_lr, per_tensor, first):
    """One perturb_ on the cpu backend against the definition; returns the error bounds it was held to."""
    dtypes = [p.dtype for p in params]
    before = clones(params)
    norms = functional.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, backend="cpu")
    expected = perturb(before, grads, theta, epsilon, inner_lr, per_tensor, first)
    bounds = ascent_bounds(expected, dtypes, per_tensor)
    assert_within(params, expected.params, bounds, "param")
    assert_within([norms], [expected.norms.float()], [norm_bounds(expected, dtypes)], "norms")
    return bounds


def test_extension_is_built_and_picked():
    assert _extension.cpu_error is None, _extension.cpu_error
    assert _extension.fake_error is None, _extension.fake_error
    assert backends.unavailable_reason("cpu") is None
    assert "cpu" in amp_fused.available_backends("cpu")
    assert backends.resolve("auto", "cpu").NAME == "cpu"
    # "cpu" never claims CUDA tensors, and without the CUDA build the reason names the missing extension.
    assert "cuda" not in cpu.DEVICE_TYPES
    if _extension.cuda_error is not None:
        assert "amp_fused._C_cuda" in _extension.cuda_error


def test_a_broken_extension_is_recorded_not_raised(tmp_path):
    # A fresh interpreter in which loading amp_fused._C fails as a stale or mismatched binary would (and in which
    # amp_fused does not build one instead: tests/test_build.py tests that).
    script = """if True:
        import importlib
        real_import = importlib.import_module
        def import_module(name, *args, **kwargs):
            if name == "amp_fused._C":
                raise ImportError("undefined symbol: _ZN3c104impl")
            return real_import(name, *args, **kwargs)
        importlib.import_module = import_module
        from amp_fused import _build, _extension, backends
        _build.read_torch_tag = lambda path: _build.torch_tag()  # as if built for this torch: the import is tried
        print(_extension.cpu_error)
        print(_extension.fake_error)
        print(backends.unavailable_reason("cpu"))
    """
    env = dict(os.environ, AMP_FUSED_BUILD="0", AMP_FUSED_BUILD_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    cpu_error, fake_error, reason = result.stdout.strip().splitlines()[-3:]
    assert "amp_fused._C failed to import" in cpu_error and "undefined symbol" in cpu_error
    assert "the ops are not defined" in fake_error
    assert reason == cpu_error


def test_setup_rejects_an_unknown_cpu_arch():
    env = dict(os.environ, AMP_FUSED_CPU_ARCH="avx512", AMP_FUSED_CUDA="0")
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=Path(__file__).resolve().parents[1],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "AMP_FUSED_CPU_ARCH must be one of 'avx2', 'default' or unset, got 'avx512'" in result.stderr


# -- the chunk plan and the vector loops ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_perturb_couple_of_million_values(dtype):
    """31 chunks of one tensor on torch's threads, and a tensor of 5 after it."""
    shapes = [(1_000_003, 2), (5,)]
    params, grads = make_lists(shapes, dtype, seed=19)
    for per_tensor, epsilon in ((True, 300.0), (False, 3.0)):  # ‖ζg‖ ≈ 707 for the big tensor
        p, b = clones(params), empty_like(params)
        bounds = check_ascent(p, grads, b, params, epsilon, 0.5, per_tensor, True)
        assert moved(p, params) > 10 * bound_norm(bounds)
        functional.restore_(p, b, backend="cpu")
        assert_bitwise_equal(p, params)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_every_vector_tail_length(dtype):
    """The AVX2 loops run 8 (fp32), 4 (fp64) or 16 (fp16, bf16: loaded as two fp32 vectors) elements at a
    time and finish with a scalar tail: every tail length 0 to 31, alone and behind whole chunks (one short of
    a chunk, a chunk, a few past one)."""
    shapes = [(n,) for n in range(1, 33)] + [(CHUNK + n,) for n in (-1, 0, 1, 15)]
    params, grads = make_lists(shapes, dtype, seed=30)
    grads2 = make_lists(shapes, dtype, seed=31)[1]
    for per_tensor in (True, False):
        p, b = clones(params), empty_like(params)
        for first, g in ((True, grads), (False, grads2)):
            before = clones(p)
            bounds = check_ascent(p, g, b, params, 4.0, 0.5, per_tensor, first)
            assert moved(p, before) > 10 * bound_norm(bounds)
        # restore_sgd_: dampened momentum, maximize; then nesterov from θ again
        for dampening, nesterov, maximize in ((0.1, False, True), (0.0, True, False)):
            buffers = make_lists(shapes, dtype, seed=32)[1]
            old_buffers = clones(buffers)
            functional.restore_sgd_(p, b, grads, buffers, 0.5, 0.9, dampening, 1e-2, nesterov, maximize, False,
                                    backend="cpu")
            step = restore_sgd(params, grads, old_buffers, 0.5, 0.9, dampening, 1e-2, nesterov, maximize, False)
            param_bounds, buffer_bounds = sgd_bounds(params, grads, old_buffers, step, 0.5, 0.9, 1e-2, False)
            assert_within(p, step.params, param_bounds, "param")
            assert_within(buffers, step.momentum_buffers, buffer_bounds, "buffer")
            assert moved(p, params) > 10 * bound_norm(param_bounds)
            for x, t in zip(p, params):  # θ, perturbed once more
                x.copy_(t)
            functional.perturb_(p, grads, b, 4.0, 0.5, per_tensor, True, backend="cpu")


# -- determinism ----------------------------------------------------------------------------------------------
def test_bitwise_identical_across_runs_and_thread_counts(restore_threads):
    shapes = [(5 * CHUNK + 123,), (1_500_000,), (3, CHUNK + 7), (11,), ()]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
    params, grads = make_lists(shapes, dtypes, seed=12)
    grads2 = make_lists(shapes, dtypes, seed=13)[1]
    buffers0 = make_lists(shapes, dtypes, seed=14)[1]

    def one_step(per_tensor):
        p, b, m = clones(params), empty_like(params), clones(buffers0)
        n1 = functional.perturb_(p, grads, b, 100.0, 1.0, per_tensor, True, backend="cpu")
        n2 = functional.perturb_(p, grads2, b, 100.0, 1.0, per_tensor, False, backend="cpu")
        perturbed = clones(p)
        functional.restore_sgd_(p, b, grads2, m, 0.1, 0.9, 0.0, 5e-4, True, False, False, backend="cpu")
        return [n1, n2] + perturbed + p + m

    for per_tensor in (True, False):
        runs = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            runs.append(one_step(per_tensor))
        for run in runs[1:]:
            assert_bitwise_equal(run, runs[0])
        # ... and they are the right norms, not some trivially reproducible value.
        naive = math.sqrt(sum(float((0.0 + g.float() ** 2).sum()) for g in grads))
        assert runs[0][0][-1].item() == pytest.approx(naive, rel=1e-5)


# -- argument checking ----------------------------------------------------------------------------------------
def _valid_lists(n=3):
    params, grads = make_lists([(CHUNK + 2,)] * n, torch.float32, seed=15)
    return {"params": params, "grads": grads, "backups": [torch.empty_like(p) for p in params],
            "momentum_buffers": clones(grads)}


def _call(op, lists):
    if op == "perturb_":
        cpu.perturb_(lists["params"], lists["grads"], lists["backups"], 0.5, 1.0, True, True)
    elif op == "restore_":
        cpu.restore_(lists["params"], lists["backups"])
    else:
        cpu.restore_sgd_(lists["params"], lists["backups"], lists["grads"], lists["momentum_buffers"], 0.1, 0.9,
                         0.0, 0.0, False, False, False)


def _replace_last(names, make):
    """Replaces the last tensor of each list in ``names`` with make(that tensor, the lists)."""
    def apply(lists):
        for name in names:
            lists[name][-1] = make(lists[name][-1], lists)
    return apply


_ALL_LISTS = ("params", "grads", "backups", "momentum_buffers")
# (what, how, the error it must raise: type and message). Each breaks only the last index, after valid ones, so
# a kernel that checked as it went would already have written something. (tests/test_checks.py holds the whole
# table of the argument contract, against every backend.)
_BREAKAGES = [
    ("length", lambda lists: lists["backups"].pop(), ValueError, r"backups has 2 tensors but params has 3"),
    ("shape", _replace_last(["backups"], lambda t, _: torch.empty(CHUNK + 1)), ValueError,
     r"backups\[2\] has shape"),
    ("dtype", _replace_last(["backups"], lambda t, _: t.double()), ValueError,
     r"backups\[2\] has dtype torch.float64"),
    ("unsupported_dtype", _replace_last(_ALL_LISTS, lambda t, _: t.long()), TypeError,
     r"params\[2\] has dtype torch.int64; supported dtypes are torch.float32, torch.float64, torch.float16 and "
     r"torch.bfloat16"),
    ("strided_view", _replace_last(_ALL_LISTS, lambda t, _: torch.empty(2 * t.numel())[::2]), ValueError,
     r"params\[2\] .* does not fill a dense block of memory"),
    ("aliasing", _replace_last(["backups"], lambda t, lists: lists["params"][-1]), ValueError,
     r"params\[2\] and backups\[2\] share memory"),
]


@pytest.mark.parametrize("op", ["perturb_", "restore_", "restore_sgd_"])
@pytest.mark.parametrize("breakage", _BREAKAGES, ids=lambda b: b[0])
def test_bad_input_raises_before_writing(op, breakage):
    _, break_lists, error, message = breakage
    lists = _valid_lists()
    break_lists(lists)
    snapshot = {name: clones(tensors) for name, tensors in lists.items()}
    with pytest.raises(error, match=message):
        _call(op, lists)
    for name in lists:
        assert_bitwise_equal(lists[name], snapshot[name])


def test_layout_mismatch_between_lists_raises():
    params = [torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)]
    grads = [torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)]
    snapshot = clones(params)
    with pytest.raises(ValueError, match=r"grads\[1\] .* does not lay out its elements like params\[1\]"):
        cpu.perturb_(params, grads, [torch.empty_like(p) for p in params], 0.5, 1.0, True, True)
    assert_bitwise_equal(params, snapshot)


def test_momentum_buffers_required_with_momentum():
    lists = _valid_lists()
    lists["momentum_buffers"] = []
    snapshot = clones(lists["params"])
    with pytest.raises(ValueError, match=r"momentum_buffers has 0 tensors but params has 3"):
        _call("restore_sgd_", lists)
    assert_bitwise_equal(lists["params"], snapshot)


@pytest.mark.parametrize("epsilon", [-1.0, math.nan])
def test_bad_epsilon_raises(epsilon):
    lists = _valid_lists()
    snapshot = clones(lists["params"])
    with pytest.raises(ValueError, match=r"epsilon must be a finite number >= 0"):
        cpu.perturb_(lists["params"], lists["grads"], lists["backups"], epsilon, 1.0, True, True)
    assert_bitwise_equal(lists["params"], snapshot)


def test_device_mismatch_raises():
    # Without a GPU, "meta" is the other device. A call mixing it with CPU tensors dispatches to the fake
    # implementation, which checks devices too; the CPU kernel's own check is reached by redispatching to it.
    lists = _valid_lists()
    params, grads, backups = lists["params"], lists["grads"], lists["backups"]
    meta_grads = grads[:2] + [torch.empty_like(grads[2], device="meta")]
    snapshot = clones(params)
    with pytest.raises(ValueError, match=r"grads\[2\] is on meta but params\[0\] is on cpu"):
        torch.ops.amp_fused.perturb_(params, meta_grads, backups, 0.5, 1.0, True, True)
    cpu_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(ValueError, match=r"grads\[2\] is on meta but params\[0\] is on cpu"):
        torch.ops.amp_fused.perturb_.default.redispatch(cpu_key, params, meta_grads, backups, 0.5, 1.0, True, True)
    with pytest.raises(ValueError, match=r"params\[0\] is on meta, but these are the CPU kernels"):
        meta = [torch.empty(3, device="meta")]
        torch.ops.amp_fused.restore_.default.redispatch(cpu_key, meta, meta)
    assert_bitwise_equal(params, snapshot)


# -- dispatch, tracing, and the optimizer ---------------------------------------------------------------------
class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def test_one_dispatched_op_per_call_and_no_host_sync():
    shapes = [(int(n),) for n in torch.randint(1000, 5000, (300,), generator=torch.Generator().manual_seed(0))]
    params, grads = make_lists(shapes, torch.float32, seed=0)
    backups, buffers = [torch.empty_like(p) for p in params], clones(grads)
    with _Ops() as mode:
        cpu.perturb_(params, grads, backups, 0.5, 1.0, True, True)
        cpu.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 5e-4, True, False, False)
    assert mode.calls == [torch.ops.amp_fused.perturb_.default, torch.ops.amp_fused.restore_sgd_.default]


def test_torch_compile_traces_the_ops():
    shapes = [(CHUNK + 1,), (3, 4), ()]
    params, grads = make_lists(shapes, torch.float32, seed=16)

    def ascent_then_restore(ps, gs, bs):
        norms = torch.ops.amp_fused.perturb_(ps, gs, bs, 2.0, 1.0, True, True)
        perturbed = [p.clone() for p in ps]
        torch.ops.amp_fused.restore_(ps, bs)
        return norms * 2, perturbed

    eager_p, compiled_p = clones(params), clones(params)
    eager = ascent_then_restore(eager_p, grads, [torch.empty_like(p) for p in params])
    compiled_fn = torch.compile(ascent_then_restore, backend="aot_eager", fullgraph=True)
    compiled = compiled_fn(compiled_p, grads, [torch.empty_like(p) for p in params])
    assert torch.equal(eager[0], compiled[0])
    assert_bitwise_equal(compiled[1], eager[1])
    assert_bitwise_equal(compiled_p, params)
    assert moved(compiled[1], params) > 1.0


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))


@pytest.mark.parametrize("inner_iter", [1, 2])
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_optimizer_cpu_backend_matches_foreach(norm, inner_iter):
    gen = torch.Generator().manual_seed(17)
    batches = [(torch.randn(16, 3, 6, 6, generator=gen), torch.randint(0, 10, (16,), generator=gen))
               for _ in range(4)]
    results = {}
    for backend in ("cpu", "foreach"):
        model = _model(18)
        initial = [p.detach().clone() for p in model.parameters()]
        opt = amp_fused.AMP(model.parameters(), lr=0.1, epsilon=0.5, inner_lr=1.0, inner_iter=inner_iter,
                            norm=norm, backend=backend, momentum=0.9, weight_decay=5e-4, nesterov=True)
        with _Ops() as mode:
            for x, y in batches:
                def closure():
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
        results[backend] = ([p.detach().clone() for p in model.parameters()],
                            [opt.base_optimizer.state[p]["momentum_buffer"] for p in model.parameters()], mode.calls)
    p_cpu, m_cpu, calls = results["cpu"]
    p_fe, m_fe, _ = results["foreach"]
    assert calls.count(torch.ops.amp_fused.perturb_.default) == 4 * inner_iter
    assert calls.count(torch.ops.amp_fused.restore_sgd_.default) == 4
    torch.testing.assert_close(p_cpu, p_fe, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m_cpu, m_fe, rtol=1e-4, atol=1e-6)
    assert moved(p_cpu, initial) > 0.1
