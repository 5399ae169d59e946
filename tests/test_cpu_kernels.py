"""What is specific to the C++ CPU kernels (backend "cpu", csrc/cpu): the build and how a broken one is
reported, the chunk plan (64K-element chunks on torch's threads: millions of values, results bitwise identical
for any thread count), every tail length of the vector loops, perturb_'s modes (SAM's sphere, ASAM's element
weights) on those loops and threads against a float64 computation written here, norms, restore_orthogonal_ and
add_orthogonal_ there too (against op_definition, with the double redo of overflowing float sums and non-finite
inputs that zero a coefficient), the kernels' own argument checks, one dispatched op per call, tracing under
torch.compile, and the optimizer on this backend.

What every backend promises (the op definitions, dtypes, chunk-boundary sizes, non-finite gradients, layouts,
torch.optim.SGD, bit-exact restore) is tested once for all of them in tests/test_backend_contract.py, and the
argument contract in tests/test_checks.py.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import amp_fused
from amp_fused import _extension, backends, checks, functional
from amp_fused.backends import cpu
import op_definition
from op_definition import (DTYPES, NORM_RTOL, UNIT, ascent_bounds, assert_bitwise_equal, assert_within, bound_norm,
                           clones, dtype_id, empty_like, make_lists, moved, norm_bounds, perturb, restore_sgd,
                           sgd_bounds)

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


# -- perturb_'s modes: surface (SAM) and eta (ASAM) --------------------------------------------------------------
# What the op table says, in float64, written here from its text: T = |θ| + η (no eta: no weights), u = ζ·T·g
# (first ascents only), norms ‖u‖ per tensor and over all, scale = ε / (‖u‖ + NORM_EPS), min(1, ·) unless
# surface, 0 where the governing norm (or, on the surface, the scale) is not finite; params ← θ + scale·T·u,
# exactly θ where the scale is 0; backups ← θ.
MODES = [  # (id, surface, eta)
    ("sam", True, None),
    ("asam", True, 0.01),
    ("asam_eta0", True, 0.0),
    ("weighted_ball", False, 0.5),
]
# Unit roundoff of the kernels' compute type (float for fp32/fp16/bf16, double for fp64).
COMPUTE_UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-24}


class ModeAscent:
    """The float64 effect of ``perturb_(..., first=True, surface, eta)`` on ``params`` (before the call)."""

    def __init__(self, params, grads, epsilon, inner_lr, per_tensor, surface, eta):
        self.theta = [p.detach().to(torch.float64, copy=True) for p in params]
        self.weights = [t.abs() + eta if eta is not None else torch.ones_like(t) for t in self.theta]
        self.u = [inner_lr * (w * g.to(torch.float64)) for w, g in zip(self.weights, grads)]
        self.norms = [float(torch.linalg.vector_norm(u)) for u in self.u]
        self.total = math.sqrt(math.fsum(n * n for n in self.norms))

        def scale(norm):
            if not math.isfinite(norm):
                return 0.0
            value = epsilon / (norm + backends.NORM_EPS)
            if surface:
                return value if math.isfinite(value) else 0.0
            return min(1.0, value)

        self.governing = self.norms if per_tensor else [self.total] * len(self.norms)
        self.scales = [scale(n) for n in self.governing]
        self.moves = [s * w * u if s != 0.0 else torch.zeros_like(u)
                      for s, w, u in zip(self.scales, self.weights, self.u)]
        self.params = [t + m for t, m in zip(self.theta, self.moves)]

    def bounds(self, dtypes):
        """|kernel − definition| allowed per element: the store's rounding to the dtype (twice its unit, for
        results near a power of two), eight roundings in the compute type (T, T·g, ζ·, T·u, scale·, θ +, the
        scale itself) of |θ| + |move|, and the norm's relative error, which the scale and so the move inherit."""
        out = []
        for t, m, dtype in zip(self.theta, self.moves, dtypes):
            norm_rtol = NORM_RTOL[dtype] + 8 * COMPUTE_UNIT[dtype]
            terms = t.abs() + m.abs()
            out.append(2 * UNIT[dtype] * terms + 8 * COMPUTE_UNIT[dtype] * terms + norm_rtol * m.abs())
        return out

    def norm_bounds(self, dtypes):
        rtols = [NORM_RTOL[d] + 8 * COMPUTE_UNIT[d] + 2.0**-23 for d in dtypes]
        per = [r * n for r, n in zip(rtols, self.norms)]
        return torch.tensor(per + [max(rtols, default=0.0) * self.total], dtype=torch.float64)

    def expected_norms(self):
        return torch.tensor(self.norms + [self.total], dtype=torch.float64)


def check_mode_ascent(params, grads, epsilon, inner_lr, per_tensor, surface, eta, backend="cpu"):
    """One first-ascent perturb_ in a mode on ``backend`` against ModeAscent: params, backups (θ, bit for
    bit) and norms; returns (definition, bounds)."""
    dtypes = [p.dtype for p in params]
    theta = clones(params)
    expected = ModeAscent(params, grads, epsilon, inner_lr, per_tensor, surface, eta)
    backups = [torch.full_like(p, math.nan) for p in params]
    norms = functional.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, True, surface, eta,
                                backend=backend)
    bounds = expected.bounds(dtypes)
    assert_bitwise_equal(backups, theta, "backup")
    assert_within(params, expected.params, bounds, "param")
    assert norms.dtype == torch.float32 and norms.shape == (len(params) + 1,)
    assert_within([norms], [expected.expected_norms()], [expected.norm_bounds(dtypes)], "norms")
    return expected, bounds


def mode_epsilon(grads, params, inner_lr, per_tensor, surface, eta):
    """An ε that makes the mode matter: per tensor, half the largest ‖u‖ (the largest tensor projected with
    scale 1/2, the others' scales above 1: the ball cuts them to 1, the sphere does not), so that every tensor,
    the largest ones too, moves far more than its rounding; global, 2.5·‖u‖ on the surface (a scale the ball
    would cut to 1), else 0.5·‖u‖."""
    definition = ModeAscent(params, grads, 1.0, inner_lr, per_tensor, surface, eta)
    if per_tensor:
        return 0.5 * max(definition.norms)
    return (2.5 if surface else 0.5) * definition.total


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_modes_on_every_tail_and_chunk_boundary(dtype, mode, per_tensor):
    """SAM's sphere and ASAM's weights through the vector loops: every tail length 1 to 33 (the weighted
    passes read θ there too: its zero-padded lanes must add nothing), chunk edges, and a tensor of a few
    chunks; θ of order 1, so that the weights |θ| + η differ from one element to the next."""
    _, surface, eta = mode
    shapes = [(n,) for n in range(1, 34)] + [(CHUNK + n,) for n in (-1, 0, 1, 15)] + [(3 * CHUNK + 17,), ()]
    params, grads = make_lists(shapes, dtype, seed=40, param_scale=1.0)
    epsilon = mode_epsilon(grads, params, 0.5, per_tensor, surface, eta)
    theta = clones(params)
    expected, bounds = check_mode_ascent(params, grads, epsilon, 0.5, per_tensor, surface, eta)
    assert moved(params, theta) > 10 * bound_norm(bounds)
    scales = expected.scales
    if surface:  # the sphere: scales the ball would have cut to 1
        assert max(scales) > 1.5
    if per_tensor:
        assert min(scales) < 1 and max(scales) > (1.5 if surface else 0.999)
    else:
        assert len(set(scales)) == 1 and scales[0] != 1.0


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_modes_couple_of_million_values_bitwise_across_thread_counts(mode, restore_threads):
    """Tensors of many chunks on torch's threads (mixed dtypes), in each mode: right, and bitwise the same for
    1 and 2 threads and across runs."""
    _, surface, eta = mode
    shapes = [(5 * CHUNK + 123,), (1_500_000,), (3, CHUNK + 7), (11,), ()]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
    params, grads = make_lists(shapes, dtypes, seed=41, param_scale=1.0)
    for per_tensor in (True, False):
        epsilon = mode_epsilon(grads, params, 0.25, per_tensor, surface, eta)
        runs = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            p, b = clones(params), empty_like(params)
            norms = cpu.perturb_(p, grads, b, epsilon, 0.25, per_tensor, True, surface, eta)
            runs.append([norms] + p + b)
        for run in runs[1:]:
            assert_bitwise_equal(run, runs[0])
        p = clones(params)
        _, bounds = check_mode_ascent(p, grads, epsilon, 0.25, per_tensor, surface, eta)
        assert_bitwise_equal(p, runs[0][1:1 + len(params)])
        assert moved(p, params) > 10 * bound_norm(bounds)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("eta", [None, 0.01], ids=["sam", "asam"])
def test_modes_drop_a_non_finite_tensor(dtype, eta):
    """On the sphere too a NaN/Inf in g (or, weighted, in θ: T is NaN there) drops that tensor's move (per
    tensor) or every tensor's (global): params are θ bit for bit, backups θ, the norms report it."""
    shapes = [(CHUNK + 5,), (37,), (3, 4)]
    for bad, where in ((math.nan, "grad"), (math.inf, "grad"), (math.nan, "param")):
        if where == "param" and eta is None:
            continue  # without weights a NaN θ is moved like any other value
        params, grads = make_lists(shapes, dtype, seed=42, param_scale=1.0)
        (grads if where == "grad" else params)[0].view(-1)[CHUNK + 2] = bad
        for per_tensor in (True, False):
            p = clones(params)
            b = empty_like(params)
            norms = cpu.perturb_(p, grads, b, 0.3, 0.5, per_tensor, True, True, eta)
            assert_bitwise_equal(b, params, "backup")
            assert not math.isfinite(norms[0].item()) and not math.isfinite(norms[-1].item())
            assert math.isfinite(norms[1].item()) and math.isfinite(norms[2].item())
            assert_bitwise_equal(p[:1], params[:1])
            if per_tensor:  # the others move onto their spheres
                expected = ModeAscent(params[1:], grads[1:], 0.3, 0.5, True, True, eta)
                assert_within(p[1:], expected.params, expected.bounds([dtype] * 2), "param")
                assert moved(p[1:], params[1:]) > 0.1
            else:
                assert_bitwise_equal(p, params)


@pytest.mark.parametrize("eta", [None, 0.0], ids=["sam", "asam"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_surface_scale_that_overflows_is_zero(dtype, eta):
    """ε / (‖u‖ + 1e-12) overflows (‖u‖ = 0, ε = 1e300): the sphere's scale is 0, not Inf, so params are θ
    bit for bit (an Inf scale times a zero u would write NaN), and the norms are 0."""
    shapes = [(CHUNK + 3,), (9,)]
    params, _ = make_lists(shapes, dtype, seed=43, param_scale=1.0)
    grads = [torch.zeros_like(p) for p in params]
    if eta is not None:  # u = 0 through T = |θ| + 0 = 0 as well: θ = 0 with a non-zero gradient
        params[1].zero_()
        grads[1].fill_(3.0)
    for per_tensor in (True, False):
        p, b = clones(params), empty_like(params)
        norms = cpu.perturb_(p, grads, b, 1e300, 1.0, per_tensor, True, True, eta)
        assert norms.tolist() == [0.0, 0.0, 0.0]
        assert_bitwise_equal(p, params)
        assert_bitwise_equal(b, params, "backup")
    # a finite scale far above 1: ε / NORM_EPS = 1e12·ε, applied to u = 0
    p = clones(params)
    cpu.perturb_(p, grads, empty_like(params), 1.0, 1.0, True, True, True, eta)
    assert_within(p, [t.double() for t in params], [torch.zeros(t.shape, dtype=torch.float64) for t in params])


def test_modes_through_torch_ops_default_arguments_and_keywords():
    """The schema's defaults: the 7 positional arguments of before mean surface=False, eta=None (bitwise the
    same result as passing them); keywords reach the kernel."""
    shapes = [(CHUNK + 1,), (10,)]
    params, grads = make_lists(shapes, torch.float32, seed=44, param_scale=1.0)
    runs = []
    for extra, kwargs in (((), {}), ((False, None), {}), ((), {"surface": False, "eta": None})):
        p, b = clones(params), empty_like(params)
        runs.append([torch.ops.amp_fused.perturb_(p, grads, b, 0.5, 1.0, True, True, *extra, **kwargs)] + p + b)
    for run in runs[1:]:
        assert_bitwise_equal(run, runs[0])
    p, b = clones(params), empty_like(params)
    epsilon = 3.0 * ModeAscent(params, grads, 1.0, 1.0, False, True, 0.1).total
    norms = torch.ops.amp_fused.perturb_(p, grads, b, epsilon, 1.0, False, True, eta=0.1, surface=True)
    expected = ModeAscent(params, grads, epsilon, 1.0, False, True, 0.1)
    assert expected.scales[0] > 2.9
    assert_within(p, expected.params, expected.bounds([torch.float32] * 2), "param")
    assert_within([norms], [expected.expected_norms()], [expected.norm_bounds([torch.float32] * 2)], "norms")


def test_modes_trace_under_torch_compile():
    """The fake implementation takes the new arguments: a traced weighted, surface ascent is the eager one."""
    shapes = [(CHUNK + 1,), (3, 4), ()]
    params, grads = make_lists(shapes, torch.float32, seed=45, param_scale=1.0)

    def ascent(ps, gs, bs):
        norms = torch.ops.amp_fused.perturb_(ps, gs, bs, 2.0, 1.0, True, True, True, 0.05)
        return norms * 2

    eager_p, compiled_p = clones(params), clones(params)
    eager = ascent(eager_p, grads, empty_like(params))
    compiled = torch.compile(ascent, backend="aot_eager", fullgraph=True)(compiled_p, grads, empty_like(params))
    assert torch.equal(eager, compiled)
    assert_bitwise_equal(compiled_p, eager_p)
    assert moved(compiled_p, params) > 1.0


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


@pytest.mark.parametrize("eta", [-0.5, math.nan, math.inf, -math.inf])
def test_bad_eta_raises(eta):
    """The kernel's own check (csrc/checks.h), straight through torch.ops, before anything is written."""
    lists = _valid_lists()
    snapshot = {name: clones(lists[name]) for name in ("params", "backups")}
    message = rf"^amp_fused\.perturb_: eta must be a finite number >= 0, got {re.escape(f'{eta:g}')}$"
    with pytest.raises(ValueError, match=message):
        torch.ops.amp_fused.perturb_(lists["params"], lists["grads"], lists["backups"], 0.5, 1.0, True, True, True,
                                     eta)
    for name, tensors in snapshot.items():
        assert_bitwise_equal(lists[name], tensors)


ETA_NEEDS_FIRST = ("amp_fused.perturb_: eta (ASAM's element weights) needs first=True; the weighted ascent is one "
                   "step from θ")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_eta_needs_the_first_ascent(device):
    """eta with first=False: the kernel (cpu) and the fake implementation (meta, which runs amp_fused.checks)
    raise the same ValueError, after the scalars' own checks and before the tensors' (the lists here hold a bad
    dtype, which would raise a TypeError) and before anything is written."""
    lists = _valid_lists()
    params = [t.to(device) for t in lists["params"]]
    grads = [t.to(device) for t in lists["grads"]]
    backups = [t.to(device) for t in lists["backups"]]
    snapshot = clones(params + backups)
    for surface in (False, True):
        with pytest.raises(ValueError) as error:
            torch.ops.amp_fused.perturb_(params, grads, backups, 0.5, 1.0, True, False, surface, 0.01)
        assert str(error.value) == ETA_NEEDS_FIRST
    with pytest.raises(ValueError, match=r"^amp_fused\.perturb_: inner_lr must be a finite number >= 0, got -1$"):
        torch.ops.amp_fused.perturb_(params, grads, backups, 0.5, -1.0, True, False, False, 0.01)
    with pytest.raises(ValueError, match=r"^amp_fused\.perturb_: eta must be a finite number >= 0, got -1$"):
        torch.ops.amp_fused.perturb_(params, grads, backups, 0.5, 1.0, True, False, False, -1.0)
    bad_dtype = params[:2] + [params[2].long()]
    with pytest.raises(ValueError) as error:
        torch.ops.amp_fused.perturb_(bad_dtype, grads, backups, 0.5, 1.0, True, False, False, 0.01)
    assert str(error.value) == ETA_NEEDS_FIRST
    if device == "cpu":
        assert_bitwise_equal(params + backups, snapshot)
        # the same contract as the Python twin, message for message
        with pytest.raises(ValueError) as python_error:
            checks.check_perturb(params, grads, backups, 0.5, 1.0, first=False, eta=0.01)
        assert str(python_error.value) == ETA_NEEDS_FIRST


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


# -- norms, restore_orthogonal_, add_orthogonal_ -------------------------------------------------------------------
# The kernels against the float64 definitions (op_definition.norms, restore_orthogonal, add_orthogonal). The sums
# are per chunk in the compute type (float for fp32/fp16/bf16, double for fp64), then in double; a chunk whose
# compute-type sum is not finite is summed again in double (the wide redo).
@pytest.fixture
def cpu_kernels():
    """The extension loaded (it loads on first use of amp_fused._extension; cpu.* calls torch.ops directly)."""
    assert _extension.cpu_error is None, _extension.cpu_error


def new_ops_norm_bounds(tensors, expected):
    """|returned norm − ‖t‖| allowed: the sums' relative error and the fp32 result's rounding."""
    rtols = [NORM_RTOL[t.dtype] + 8 * COMPUTE_UNIT[t.dtype] + 2.0**-23 for t in tensors]
    per = [r * float(n) for r, n in zip(rtols, expected[:-1])]
    return torch.tensor(per + [max(rtols, default=0.0) * float(expected[-1])], dtype=torch.float64)


def orthogonal_bounds(expected, grads, per_tensor):
    """|orthogonals − (g − c·Δ)| allowed per element: the store's rounding to the dtype (twice its unit), four
    roundings in the compute type (Δ, c·Δ, g −, c itself) of |g| + |c·Δ|, and c's error times |Δ|: c = dot / ‖Δ‖²
    from two sums, each off by its relative error R of the sum of its terms' magnitudes (Σ|Δ·g|, Σ Δ²). Zero where
    c = 0 (orthogonals are g bit for bit there)."""
    abs_dots = [float((d * g.double()).abs().sum()) for d, g in zip(expected.deltas, grads)]
    squares = [float(d.square().sum()) for d in expected.deltas]
    if not per_tensor:
        abs_dots, squares = [math.fsum(abs_dots)] * len(grads), [math.fsum(squares)] * len(grads)
    bounds = []
    for g, d, c, abs_dot, square in zip(grads, expected.deltas, expected.coefficients, abs_dots, squares):
        if c == 0.0:
            bounds.append(torch.zeros(g.shape, dtype=torch.float64))
            continue
        rtol = NORM_RTOL[g.dtype] + 8 * COMPUTE_UNIT[g.dtype]
        c_error = rtol * (abs_dot / square + abs(c))
        terms = g.double().abs() + abs(c) * d.abs()
        bounds.append((2 * UNIT[g.dtype] + 4 * COMPUTE_UNIT[g.dtype]) * terms + c_error * d.abs())
    return bounds


def direction_bounds(grads, orthogonals, coefficients):
    """|grads − (g + coef·v)| allowed per element: the store's rounding (twice the dtype's unit), four roundings in
    the compute type of |g| + |coef·v|, and coef's error (two norms, each off by its relative error) times
    |coef·v|. Zero where coef = 0 (grads are left as they are)."""
    bounds = []
    for g, v, c in zip(grads, orthogonals, coefficients):
        if c == 0.0:
            bounds.append(torch.zeros(g.shape, dtype=torch.float64))
            continue
        moved_term = abs(c) * v.double().abs()
        terms = g.double().abs() + moved_term
        rtol = 2 * (NORM_RTOL[g.dtype] + 8 * COMPUTE_UNIT[g.dtype])
        bounds.append((2 * UNIT[g.dtype] + 4 * COMPUTE_UNIT[g.dtype]) * terms + rtol * moved_term)
    return bounds


def lookahead_lists(shapes, dtypes, seed, scale=1.0):
    """(θ, params = θ + Δ, grads) drawn in float64, then scaled by ``scale`` and rounded to each dtype; each g is
    r + k·(‖r‖/‖Δ‖)·Δ with k = 3, −2, 0.5 in turn, a part along Δ larger or smaller than the rest, so that
    g − c·Δ moves g far beyond rounding and c differs from tensor to tensor."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    gen = torch.Generator().manual_seed(seed)
    theta, params, grads = [], [], []
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        d = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        r = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = r + (3.0, -2.0, 0.5)[i % 3] * (float(r.norm()) / max(float(d.norm()), 1e-300)) * d
        theta.append((scale * t).to(dtype))
        params.append((scale * (t + d)).to(dtype))
        grads.append((scale * g).to(dtype))
    return theta, params, grads


def check_norms(tensors):
    """One norms call on the cpu backend against the definition; returns the norms."""
    got = cpu.norms(tensors)
    expected = op_definition.norms(tensors)
    assert got.dtype == torch.float32 and got.shape == (len(tensors) + 1,)
    assert_within([got], [expected], [new_ops_norm_bounds(tensors, expected)], "norms")
    return got


def check_restore_orthogonal(theta, params, grads, per_tensor):
    """One restore_orthogonal_ on the cpu backend against the definition (params end as θ, bit for bit;
    orthogonals g bit for bit where c = 0); returns (orthogonals, the definition, the bounds)."""
    expected = op_definition.restore_orthogonal(params, theta, grads, per_tensor)
    p = clones(params)
    orthogonals = [torch.full_like(t, math.nan) for t in theta]
    cpu.restore_orthogonal_(p, theta, grads, orthogonals, per_tensor)
    assert_bitwise_equal(p, theta, "param")
    bounds = orthogonal_bounds(expected, grads, per_tensor)
    for o, g, e, b, c in zip(orthogonals, grads, expected.orthogonals, bounds, expected.coefficients):
        if c == 0.0:
            assert_bitwise_equal([o], [g], "orthogonal (c = 0)")
        else:
            assert_within([o], [e], [b], "orthogonal")
    return orthogonals, expected, bounds


def check_add_orthogonal(grads, orthogonals, alpha, per_tensor):
    """One add_orthogonal_ on the cpu backend against the definition (grads bitwise unchanged where coef = 0);
    returns (the new grads, the coefficients, the bounds)."""
    coefficients = op_definition.direction_coefficients(grads, orthogonals, alpha, per_tensor)
    expected = op_definition.add_orthogonal(grads, orthogonals, alpha, per_tensor)
    g = clones(grads)
    cpu.add_orthogonal_(g, orthogonals, alpha, per_tensor)
    bounds = direction_bounds(grads, orthogonals, coefficients)
    for new, old, e, b, c in zip(g, grads, expected, bounds, coefficients):
        if c == 0.0:
            assert_bitwise_equal([new], [old], "grad (coef = 0)")
        else:
            assert_within([new], [e], [b], "grad")
    return g, coefficients, bounds


NEW_OPS_SHAPES = ([(n,) for n in range(1, 41)] + [(CHUNK + n,) for n in (-1, 0, 1)] + [(3 * CHUNK + 17,), (), (0,),
                                                                                          (7, 5, 3)])


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_new_ops_every_tail_and_chunk_boundary(dtype, per_tensor):
    """norms, restore_orthogonal_ and add_orthogonal_ (its v the orthogonals just formed) through the vector loops:
    every tail length 1 to 40, chunk edges, a tensor of a few chunks, a 0-d and an empty tensor."""
    theta, params, grads = lookahead_lists(NEW_OPS_SHAPES, dtype, seed=50)
    check_norms(grads)
    check_norms(params)
    orthogonals, expected, bounds = check_restore_orthogonal(theta, params, grads, per_tensor)
    assert moved(orthogonals, grads) > 10 * bound_norm(bounds)
    nonzero = [c for c in expected.coefficients if c != 0.0]
    assert len(nonzero) >= len(NEW_OPS_SHAPES) - 1  # (the empty tensor's Δ is 0)
    if per_tensor:
        assert len(set(nonzero)) > 3
    else:
        assert len(set(nonzero)) == 1
    new_grads, coefficients, direction = check_add_orthogonal(grads, orthogonals, 0.7, per_tensor)
    assert moved(new_grads, grads) > 10 * bound_norm(direction)
    # (a 1-element g is parallel to its Δ: its orthogonal is a rounding residue, or 0 and then coef = 0)
    assert sum(c != 0.0 for c in coefficients) >= len(NEW_OPS_SHAPES) - 6


@pytest.mark.usefixtures("cpu_kernels")
def test_new_ops_bitwise_identical_across_runs_and_thread_counts(restore_threads):
    """Tensors of many chunks on torch's threads (mixed dtypes): bitwise the same for 1 and 2 threads and across
    runs, and right."""
    shapes = [(5 * CHUNK + 123,), (1_500_000,), (3, CHUNK + 7), (11,), ()]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
    theta, params, grads = lookahead_lists(shapes, dtypes, seed=51)
    for per_tensor in (True, False):
        runs = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            norms = cpu.norms(grads)
            p, o = clones(params), empty_like(params)
            cpu.restore_orthogonal_(p, theta, grads, o, per_tensor)
            g = clones(grads)
            cpu.add_orthogonal_(g, o, 0.5, per_tensor)
            runs.append([norms] + p + o + g)
        for run in runs[1:]:
            assert_bitwise_equal(run, runs[0])
        assert_bitwise_equal(runs[0][1:1 + len(shapes)], theta, "param")
        orthogonals, _, bounds = check_restore_orthogonal(theta, params, grads, per_tensor)
        assert_bitwise_equal(orthogonals, runs[0][1 + len(shapes):1 + 2 * len(shapes)])
        assert moved(orthogonals, grads) > 10 * bound_norm(bounds)
        new_grads, _, direction = check_add_orthogonal(grads, orthogonals, 0.5, per_tensor)
        assert_bitwise_equal(new_grads, runs[0][1 + 2 * len(shapes):])
        assert moved(new_grads, grads) > 10 * bound_norm(direction)
    check_norms(grads)


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_new_ops_sums_that_overflow_the_compute_type(dtype):
    """Values ~1e30 (fp32, bf16: their squares and products overflow the float sums, their norms do not): the chunks
    are summed again in double, so norms, c and coef come out finite and right. The tensors' other chunks, and the
    small tensors, are of order 1, so the redo is per chunk."""
    shapes = [(2 * CHUNK + 5,), (37,), (3, 4)]
    theta, params, grads = lookahead_lists(shapes, dtype, seed=52)
    theta_big, params_big, grads_big = lookahead_lists(shapes, dtype, seed=53, scale=1e30)
    for small, big in ((theta, theta_big), (params, params_big), (grads, grads_big)):
        small[0][CHUNK:] = big[0][CHUNK:]  # chunks 1 and 2 of tensor 0
        small[1].copy_(big[1])
    assert not math.isfinite(float((grads[0].float() ** 2).sum()))
    got = check_norms(grads)
    assert got[0].item() > 1e32 and torch.isfinite(got).all()
    for per_tensor in (True, False):
        orthogonals, expected, bounds = check_restore_orthogonal(theta, params, grads, per_tensor)
        assert all(c != 0.0 for c in expected.coefficients)
        assert moved(orthogonals, grads) > 10 * bound_norm(bounds)
        assert torch.isfinite(torch.cat([o.float().flatten() for o in orthogonals])).all()
        v = [0.01 * o for o in orthogonals]
        new_grads, coefficients, direction = check_add_orthogonal(grads, v, 0.5, per_tensor)
        assert all(c != 0.0 for c in coefficients)
        assert moved(new_grads, grads) > 10 * bound_norm(direction)


# Signalling NaNs with a payload: a round trip through the compute type would quiet them (change their bits).
SIGNALLING_NAN = {torch.float32: 0x7F812345, torch.float64: 0x7FF0000012345678, torch.float16: 0x7C15,
                  torch.bfloat16: 0x7F85}


def put_bad(t, index, bad):
    """t.flatten()[index] = bad: math.inf, or "nan" (a signalling NaN with a payload)."""
    if bad == "nan":
        op_definition.bits(t).view(-1)[index] = SIGNALLING_NAN[t.dtype]
    else:
        t.view(-1)[index] = bad


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_orthogonal_non_finite_or_zero_delta(dtype):
    """A NaN or Inf in g, or a NaN in params (Δ NaN), of tensor 0 makes its c 0 (per tensor) or every c 0 (global):
    orthogonals are g bit for bit there, the NaN's bits kept; a tensor with Δ = 0 has c = 0 per tensor. params end
    as θ bit for bit in every case."""
    shapes = [(CHUNK + 5,), (37,), (3, 4)]
    for bad, where in (("nan", "grad"), (math.inf, "grad"), ("nan", "param"), (None, "zero_delta")):
        theta, params, grads = lookahead_lists(shapes, dtype, seed=54)
        if where == "grad":
            put_bad(grads[0], CHUNK + 2, bad)
        elif where == "param":
            put_bad(params[0], 3, bad)
        else:
            params[0].copy_(theta[0])
        for per_tensor in (True, False):
            orthogonals, expected, bounds = check_restore_orthogonal(theta, params, grads, per_tensor)
            if per_tensor or where != "zero_delta":  # (global, Δ = 0: g − c·0, within bounds of g)
                assert expected.coefficients[0] == 0.0
                assert_bitwise_equal(orthogonals[:1], grads[:1], "orthogonal")
            if per_tensor or where == "zero_delta":  # the others are formed
                assert all(c != 0.0 for c in expected.coefficients[1:])
                assert moved(orthogonals[1:], grads[1:]) > 10 * bound_norm(bounds[1:])
            else:
                assert expected.coefficients == [0.0] * len(shapes)
                assert_bitwise_equal(orthogonals, grads, "orthogonal")


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_add_orthogonal_non_finite_or_zero_direction(dtype):
    """A NaN or Inf in v (or in g) of tensor 0 makes its coef 0 (per tensor) or every coef 0 (global): those grads
    are left bit for bit (a NaN in g kept for GradScaler, its bits too); v = 0 for tensor 0 gives coef 0 per tensor."""
    shapes = [(CHUNK + 5,), (37,), (3, 4)]
    for bad, where in (("nan", "v"), (math.inf, "v"), (-math.inf, "v"), ("nan", "grad"), (None, "zero_v")):
        _, grads, v = lookahead_lists(shapes, dtype, seed=55)
        if where == "v":
            put_bad(v[0], CHUNK + 2, bad)
        elif where == "grad":
            put_bad(grads[0], 7, bad)
        else:
            v[0].zero_()
        for per_tensor in (True, False):
            new_grads, coefficients, bounds = check_add_orthogonal(grads, v, 0.7, per_tensor)
            assert coefficients[0] == 0.0 or (where == "zero_v" and not per_tensor)
            if per_tensor or where == "zero_v":
                assert all(c != 0.0 for c in coefficients[1:])
                assert moved(new_grads[1:], grads[1:]) > 10 * bound_norm(bounds[1:])
            else:
                assert coefficients == [0.0] * len(shapes)
                assert_bitwise_equal(new_grads, grads, "grad")
    # alpha = 0: every coef 0, grads as they are
    _, grads, v = lookahead_lists(shapes, dtype, seed=56)
    check_add_orthogonal(grads, v, 0.0, True)


@pytest.mark.usefixtures("cpu_kernels")
def test_new_ops_one_dispatched_op_per_call():
    shapes = [(int(n),) for n in torch.randint(1000, 5000, (300,), generator=torch.Generator().manual_seed(0))]
    theta, params, grads = lookahead_lists(shapes, torch.float32, seed=57)
    orthogonals = empty_like(params)
    with _Ops() as mode:
        cpu.norms(grads)
        cpu.restore_orthogonal_(params, theta, grads, orthogonals, True)
        cpu.add_orthogonal_(grads, orthogonals, 0.5, False)
    assert mode.calls == [torch.ops.amp_fused.norms.default, torch.ops.amp_fused.restore_orthogonal_.default,
                          torch.ops.amp_fused.add_orthogonal_.default]


@pytest.mark.usefixtures("cpu_kernels")
def test_new_ops_bad_input_raises_before_writing():
    """The kernels' own checks (csrc/checks.h, straight through torch.ops), then the CPU check, before anything is
    written."""
    theta, params, grads = lookahead_lists([(CHUNK + 2,)] * 3, torch.float32, seed=58)
    orthogonals = empty_like(params)
    snapshot = clones(params + orthogonals + grads)
    ops = torch.ops.amp_fused
    with pytest.raises(ValueError, match=r"^amp_fused\.restore_orthogonal_: orthogonals\[2\] has shape"):
        ops.restore_orthogonal_(params, theta, grads, orthogonals[:2] + [torch.empty(3)], True)
    with pytest.raises(ValueError, match=r"restore_orthogonal_: grads\[1\] and orthogonals\[1\] share memory"):
        ops.restore_orthogonal_(params, theta, grads, [orthogonals[0], grads[1], orthogonals[2]], True)
    with pytest.raises(ValueError, match=r"^amp_fused\.add_orthogonal_: alpha must be a finite number >= 0, got nan"):
        ops.add_orthogonal_(grads, orthogonals, math.nan, True)
    with pytest.raises(ValueError, match=r"^amp_fused\.add_orthogonal_: orthogonals has 2 tensors but grads has 3"):
        ops.add_orthogonal_(grads, orthogonals[:2], 0.5, True)
    with pytest.raises(TypeError, match=r"^amp_fused\.norms: tensors\[1\] has dtype torch.int64"):
        ops.norms([grads[0], grads[1].long()])
    assert_bitwise_equal(params + orthogonals + grads, snapshot)
    cpu_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    meta = [torch.empty(3, device="meta")]
    with pytest.raises(ValueError, match=r"^amp_fused\.norms: tensors\[0\] is on meta, but these are the CPU kernels"):
        ops.norms.default.redispatch(cpu_key, meta)
    with pytest.raises(ValueError, match=r"restore_orthogonal_: params\[0\] is on meta, but these are the CPU"):
        ops.restore_orthogonal_.default.redispatch(cpu_key, meta, [torch.empty(3, device="meta")],
                                                   [torch.empty(3, device="meta")], [torch.empty(3, device="meta")],
                                                   True)
    with pytest.raises(ValueError, match=r"add_orthogonal_: grads\[0\] is on meta, but these are the CPU kernels"):
        ops.add_orthogonal_.default.redispatch(cpu_key, meta, [torch.empty(3, device="meta")], 0.5, True)
