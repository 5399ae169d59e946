"""The CUDA kernels (backend "cuda", csrc/cuda) against float64 math of the op definitions, the foreach and
reference backends on the same CUDA tensors, and torch.optim.SGD: every dtype, chunk-boundary sizes, 1 to 300
tensors, non-finite and zero gradients, layouts, bitwise determinism, no host syncs (also under CUDA graph
capture), streams, argument checking, and the AMP optimizer end to end.

The tests marked ``cuda`` need a GPU and are skipped without one. The others run anywhere: the built
extension must import and register its kernels on a machine without a GPU.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import amp_fused
from amp_fused import _extension, backends
from amp_fused.backends import cuda as fused
from amp_fused.backends import foreach, reference

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device; none is visible")
DEVICE = torch.device("cuda")
OPS = ("perturb_", "restore_", "restore_sgd_")

# Elements per CUDA block (csrc/cuda/config.h), published by the extension; the fallback only places test
# sizes when the extension is missing, in which case the GPU tests fail on the backend check anyway.
CHUNK = getattr(sys.modules.get("amp_fused._C_cuda"), "CHUNK_SIZE", 1 << 16)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Unit roundoff of each storage dtype: a correctly rounded result is within one of these (relative).
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Relative error of a norm: fp32 sums of squares per chunk (fp64 for fp64), then fp64, returned in fp32.
NORM_RTOL = {torch.float64: 2.0**-23, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# foreach and reference take every norm in fp32 (torch._foreach_norm / .float().norm()), summing up to
# millions of squares in torch's order: their norms are off by up to a few 1e-5.
FOREACH_NORM_RTOL = 1e-4
# Unit roundoff of the compute type (fp32; fp64 for fp64), in which Δ is formed before its norm is taken.
OPMATH_UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-24}
# Sizes around 4-element groups and chunk boundaries, 0-d and empty tensors, and one of a couple of millions.
EDGE_SHAPES = [(1,), (3,), (4,), (5,), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2 * CHUNK + 3,), (), (0,), (2, 0, 3),
               (1_048_577, 2)]
# torch.optim.SGD flag combinations it accepts (nesterov needs momentum and no dampening).
SGD_FLAGS = [dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
             for m, d, n, wd, mx in itertools.product((0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 1e-2),
                                                      (False, True))
             if not (n and (m == 0.0 or d != 0.0))]


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def flags_id(flags):
    words = [f"momentum{flags['momentum']:g}", f"dampening{flags['dampening']:g}", f"wd{flags['weight_decay']:g}"]
    return "-".join(words + [k for k in ("nesterov", "maximize") if flags[k]])


@pytest.fixture
def cuda_backend():
    reason = fused.unavailable_reason()
    assert reason is None, f"the cuda backend is unavailable on a machine with a GPU: {reason}"
    return fused


# -- helpers ---------------------------------------------------------------------------------------------------
def make_lists(shapes, dtypes, seed, param_scale=0.01, device=None):
    """Small parameters (as trained weights are) and unit gradients, so that Δ dominates θ + Δ."""
    device = DEVICE if device is None else device
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    gen = torch.Generator().manual_seed(seed)
    params = [(param_scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(device, d)
              for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(device, d) for s, d in zip(shapes, dtypes)]
    return params, grads


def clones(tensors):
    return [t.clone() for t in tensors]


def bits(t):
    """The raw bits, so that comparisons are bitwise (NaN payloads and -0.0 included)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bitwise_equal(actual, expected, what="tensor"):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what} {i}"
        assert torch.equal(bits(a), bits(e)), f"{what} {i} differs bitwise"


def assert_within(actual, expected, bounds, what="tensor"):
    """|actual − expected| ≤ bound elementwise, in float64."""
    for i, (a, e, b) in enumerate(zip(actual, expected, bounds, strict=True)):
        assert a.shape == e.shape, f"{what} {i}"
        if a.numel() == 0:
            continue
        excess = ((a.double() - e.double()).abs() - b - torch.finfo(a.dtype).tiny).max().item()
        assert excess <= 0, f"{what} {i} ({a.dtype}, shape {tuple(a.shape)}) is off by {excess} beyond its bound"


def total_abs(tensors):
    return sum(float(t.double().abs().sum()) for t in tensors)


def diffs(after, before):
    return [a.double() - b.double() for a, b in zip(after, before)]


class Ascent:
    """One ascent from the definition, in float64 from the stored inputs.

    ``bounds``: the error allowed to a kernel that computes in opmath and rounds once: ``ulps`` roundings of
    the largest term entering an element (θ, scale·Δ_old, scale·ζg), plus the norm's relative error, which
    scale·Δ inherits (global: the largest of the list's). ``moves``: |scale·Δ|. ``term_norms``: the norms
    of |Δ_old| + |ζg| (per tensor, then over all), the scale of rounding errors in Δ when the two cancel.
    """

    def __init__(self, params, grads, backups, epsilon, inner_lr, per_tensor, first, ulps=4):
        theta = [(p if first else b).to(torch.float64, copy=True) for p, b in zip(params, backups)]
        old = [torch.zeros_like(t) if first else p.double() - b.double()
               for t, p, b in zip(theta, params, backups)]
        step = [inner_lr * g.double() for g in grads]
        delta = [o + z for o, z in zip(old, step)]
        sums = [float((d * d).sum()) for d in delta]
        total = math.sqrt(sum(sums))
        self.norms = torch.tensor([math.sqrt(s) for s in sums] + [total], dtype=torch.float64)
        term_sums = [float(((o.abs() + z.abs()) ** 2).sum()) for o, z in zip(old, step)]
        self.term_norms = torch.tensor([math.sqrt(s) for s in term_sums] + [math.sqrt(sum(term_sums))],
                                       dtype=torch.float64)
        self.scales, self.params, self.bounds, self.moves = [], [], [], []
        list_rtol = max(NORM_RTOL[p.dtype] for p in params)
        for i, (t, o, z, d, p) in enumerate(zip(theta, old, step, delta, params)):
            governing = float(self.norms[i]) if per_tensor else total
            scale = min(1.0, epsilon / (governing + 1e-12)) if math.isfinite(governing) else 0.0
            self.scales.append(scale)
            self.params.append((t + scale * d).to(p.dtype) if scale else t.to(p.dtype))
            self.moves.append(scale * d.abs() if scale else torch.zeros_like(t))
            terms = t.abs() + scale * (o.abs() + z.abs()) if scale else torch.zeros_like(t)
            norm_rtol = NORM_RTOL[p.dtype] if per_tensor else list_rtol
            self.bounds.append(ulps * UNIT[p.dtype] * terms + norm_rtol * self.moves[-1])
        self.theta = [t.to(p.dtype) for t, p in zip(theta, params)]


def check_ascent(ops, params, grads, backups, epsilon, inner_lr, per_tensor, first):
    """Runs one ascent of ``ops`` and checks it against the definition; returns (definition, norms)."""
    params_in, backups_in = clones(params), clones(backups)
    norms = ops.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first)
    expected = Ascent(params_in, grads, backups_in, epsilon, inner_lr, per_tensor, first)
    assert norms.dtype == torch.float32 and norms.shape == (len(params) + 1,)
    assert norms.device == params[0].device
    assert_within(params, expected.params, expected.bounds, "param")
    assert_bitwise_equal(backups, params_in if first else backups_in, "backup")  # θ stored as is, then kept
    rtol = torch.tensor([NORM_RTOL[p.dtype] for p in params] + [max(NORM_RTOL[p.dtype] for p in params)],
                        dtype=torch.float64)
    opmath_unit = max(OPMATH_UNIT[p.dtype] for p in params)
    assert_norms_within(norms, expected.norms, rtol * expected.norms + 4 * opmath_unit * expected.term_norms)
    return expected, norms


def assert_norms_within(actual, expected, bound):
    """Same finiteness, and |actual − expected| ≤ bound where finite (float64, on the CPU)."""
    actual = actual.cpu().double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), (actual, expected)
    excess = (actual - expected).abs()[finite] - bound[finite]
    assert (excess <= 0).all(), f"norms off by {excess.max().item()} beyond their bound: {actual} vs {expected}"


def backend_norm_bound(expected, params, slack=None):
    """Allowed norm difference to foreach or reference: their fp32 sums and (later ascents) Δ rounded to the
    storage dtype, relative to the terms of Δ, plus how far apart ``slack`` says their Δ_old may be."""
    rtol = [FOREACH_NORM_RTOL + 4 * UNIT[p.dtype] for p in params]
    bound = torch.tensor(rtol + [max(rtol)], dtype=torch.float64) * expected.term_norms
    if slack is not None:
        sums = [float((s**2).sum()) for s in slack]
        bound += torch.tensor([math.sqrt(v) for v in sums] + [math.sqrt(sum(sums))], dtype=torch.float64)
    return bound


def foreach_slack(expected, ulps_factor=5):
    """Allowed difference to a backend that rounds intermediate results to the storage dtype and takes its
    norms in fp32 (foreach, reference): a few of the definition's bounds plus its own norm error."""
    return [ulps_factor * b + FOREACH_NORM_RTOL * m for b, m in zip(expected.bounds, expected.moves)]


def epsilon_for(grads, inner_lr, per_tensor):
    """An ε that projects some tensors and not others (per_tensor), or the global Δ to half its norm."""
    norms = sorted(inner_lr * float(g.double().norm()) for g in grads if g.numel())
    if per_tensor:
        return 0.5 * (norms[len(norms) // 2 - 1] + norms[len(norms) // 2])
    return 0.5 * math.sqrt(sum(n * n for n in norms))


def unaligned_copy(t):
    """The same values in storage that starts one element past an aligned allocation (the scalar path)."""
    if t.numel() == 0:
        return t.clone()
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    flat.copy_(t.reshape(-1))
    return flat.view(t.shape)


# -- the extension without a GPU (runs everywhere) ----------------------------------------------------------
def test_built_extension_imports_without_a_gpu_and_registers_cuda_kernels():
    package = Path(amp_fused.__file__).resolve().parent
    built = sorted(package.glob("_C_cuda*.so")) + sorted(package.glob("_C_cuda*.pyd"))
    if not built:
        pytest.skip(f"amp_fused._C_cuda is not built (no _C_cuda*.so in {package}); setup.py builds it when "
                    "torch is a CUDA build and nvcc is found")
    # A fresh interpreter with every GPU hidden, on the same package. Before _C_cuda is loaded, the CUDA
    # key has no kernels (so the check after the import is meaningful).
    script = textwrap.dedent(f"""
        import json, sys, torch
        ops = {OPS!r}
        def registered():
            return [torch._C._dispatch_has_kernel_for_dispatch_key("amp_fused::" + op, "CUDA") for op in ops]
        import amp_fused._C
        before = None if "amp_fused._C_cuda" in sys.modules else registered()
        import amp_fused._C_cuda as ext
        after = registered()
        from amp_fused import _extension
        from amp_fused.backends import cuda
        print(json.dumps(dict(gpu=torch.cuda.is_available(), before=before, after=after, file=ext.__file__,
                              chunk=ext.CHUNK_SIZE, cuda_error=_extension.cuda_error,
                              reason=cuda.unavailable_reason())))
    """)
    path = [str(package.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"importing the CUDA extension without a GPU failed:\n{result.stderr}"
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["gpu"] is False
    assert Path(info["file"]).resolve() in [p.resolve() for p in built]
    assert info["before"] in (None, [False] * len(OPS))
    assert info["after"] == [True] * len(OPS), dict(zip(OPS, info["after"]))
    assert info["chunk"] > 0 and info["chunk"] % 4 == 0
    assert info["cuda_error"] is None
    assert info["reason"] == "no CUDA device is visible"


def test_unavailable_reason_and_device_types():
    assert fused.NAME == "cuda" and fused.DEVICE_TYPES == ("cuda",)
    reason = fused.unavailable_reason()
    if _extension.cpu_error is not None:
        assert _extension.cpu_error in reason
    elif _extension.cuda_error is not None:
        assert _extension.cuda_error in reason
    elif not HAS_GPU:
        assert reason == "no CUDA device is visible"
    else:
        assert reason is None
        assert backends.resolve("auto", "cuda") is fused


def test_empty_lists_need_no_extension():
    norms = fused.perturb_([], [], [], 1.0, 1.0, True, True)
    assert norms.dtype == torch.float32 and norms.tolist() == [0.0]
    fused.restore_([], [])
    fused.restore_sgd_([], [], [], [], 0.1, 0.9, 0.0, 0.0, False, False, True)


# -- perturb_ ----------------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_perturb_matches_definition_and_backends(cuda_backend, dtype, per_tensor):
    inner_lr = 0.5
    params, grads1 = make_lists(EDGE_SHAPES, dtype, seed=1)
    grads2 = make_lists(EDGE_SHAPES, dtype, seed=2)[1]
    epsilon = epsilon_for(grads1, inner_lr, per_tensor)
    state = {ops: (clones(params), [torch.empty_like(p) for p in params]) for ops in (foreach, reference)}
    theta = clones(params)
    backups = [torch.empty_like(p) for p in params]
    slack = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for k, grads in enumerate((grads1, grads2)):
        first = k == 0
        before = clones(params)
        expected, norms = check_ascent(cuda_backend, params, grads, backups, epsilon, inner_lr, per_tensor, first)
        # Far more movement than the tolerance (bf16's is 1.6% of the terms), and the case mixes projected and
        # unprojected tensors.
        assert total_abs(diffs(params, before)) > 20 * total_abs(expected.bounds)
        if per_tensor:
            assert 0 < min(expected.scales) < 1 and max(expected.scales) == 1
        else:
            assert 0 < expected.scales[0] < 1
        assert_bitwise_equal(backups, theta, "backup")
        # The other backends round intermediate results to the storage dtype (reference: θ + Δ − Δ_old as
        # well); their outputs differ by a few of the definition's bounds per ascent.
        norm_bound = backend_norm_bound(expected, params, slack)
        slack = [s + b for s, b in zip(slack, foreach_slack(expected))]
        for ops, (p_other, b_other) in state.items():
            n_other = ops.perturb_(p_other, grads, b_other, epsilon, inner_lr, per_tensor, first)
            assert_within(params, p_other, slack, f"param vs {ops.NAME}")
            assert_norms_within(norms, n_other.cpu().double(), norm_bound)
        assert_bitwise_equal(backups, state[foreach][1], "backup vs foreach")  # both hold θ


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("count", [1, 7, 61, 62, 63, 300])
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
def test_perturb_many_tensors(cuda_backend, count, per_tensor):
    """1…300 tensors: several launches per pass once a table (62 tensors at depth 3) is full."""
    gen = torch.Generator().manual_seed(count)
    shapes = [(int(torch.randint(1, 3000, (1,), generator=gen)),) for _ in range(count)]
    shapes[count // 2] = (3 * CHUNK + 5,)
    params, grads1 = make_lists(shapes, torch.float32, seed=count)
    grads2 = make_lists(shapes, torch.float32, seed=count + 1000)[1]
    epsilon = epsilon_for(grads1, 1.0, per_tensor)
    backups = [torch.empty_like(p) for p in params]
    for first, grads in ((True, grads1), (False, grads2)):
        p_foreach, b_foreach = clones(params), clones(backups)
        before = clones(params)
        expected, norms = check_ascent(cuda_backend, params, grads, backups, epsilon, 1.0, per_tensor, first)
        n_foreach = foreach.perturb_(p_foreach, grads, b_foreach, epsilon, 1.0, per_tensor, first)
        assert_within(params, p_foreach, foreach_slack(expected), "param vs foreach")
        assert_norms_within(norms, n_foreach.cpu().double(), backend_norm_bound(expected, params))
        assert total_abs(diffs(params, before)) > 100 * total_abs(expected.bounds)


@needs_gpu
@pytest.mark.cuda
def test_perturb_mixed_dtypes_in_one_list(cuda_backend):
    """Each dtype gets its own launches; norms and scales still span the whole list."""
    dtypes = [DTYPES[i % 4] for i in range(10)]
    shapes = [(CHUNK + 3,), (17,), (5, 7), (1,), (2 * CHUNK,), (), (0,), (4,), (999,), (3, CHUNK // 3)]
    params, grads = make_lists(shapes, dtypes, seed=5)
    backups = [torch.empty_like(p) for p in params]
    for per_tensor, first in ((False, True), (True, False)):
        epsilon = epsilon_for(grads, 0.5, per_tensor)
        p_foreach, b_foreach = clones(params), clones(backups)
        expected, norms = check_ascent(cuda_backend, params, grads, backups, epsilon, 0.5, per_tensor, first)
        n_foreach = foreach.perturb_(p_foreach, grads, b_foreach, epsilon, 0.5, per_tensor, first)
        assert_within(params, p_foreach, foreach_slack(expected), "param vs foreach")
        assert_norms_within(norms, n_foreach.cpu().double(), backend_norm_bound(expected, params))
    # restore_sgd_ and restore_ over the same list.
    theta = clones(backups)
    buffers = [torch.randn_like(p) for p in params]
    buffers_before = clones(buffers)
    cuda_backend.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 1e-2, True, False, False)
    expected = [sgd_definition(t, g, b, 0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2,
                               maximize=False, first_step=False) for t, g, b in zip(theta, grads, buffers_before)]
    assert_within(params, [e[0] for e in expected], [e[2] for e in expected], "param")
    assert_within(buffers, [e[1] for e in expected], [e[3] for e in expected], "buffer")
    assert total_abs(diffs(params, theta)) > 3 * total_abs([e[2] for e in expected])
    cuda_backend.restore_(params, backups)
    assert_bitwise_equal(params, theta)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_non_finite_gradient_keeps_theta(cuda_backend, dtype, per_tensor, bad):
    shapes = [(CHUNK + 7,), (3 * CHUNK + 1,), (33,), ()]
    params, grads1 = make_lists(shapes, dtype, seed=6)
    grads2 = make_lists(shapes, dtype, seed=60)[1]
    clean = clones(grads1)
    bad_index = 1
    for grads in (grads1, grads2):
        grads[bad_index].view(-1)[-1] = bad  # in the last, ragged chunk
    theta = clones(params)
    backups = [torch.empty_like(p) for p in params]
    epsilon = 10.0
    dropped = [bad_index] if per_tensor else list(range(len(params)))
    for first, grads in ((True, grads1), (False, grads2)):
        if not first:  # from θ, a clean perturbation, then a bad gradient in a later ascent
            cuda_backend.restore_(params, backups)
            cuda_backend.perturb_(params, clean, backups, epsilon, 0.5, per_tensor, True)
        before = clones(params)
        expected, norms = check_ascent(cuda_backend, params, grads, backups, epsilon, 0.5, per_tensor, first)
        assert_bitwise_equal(backups, theta, "backup")
        assert math.isnan(norms[bad_index]) if bad != bad else math.isinf(norms[bad_index])
        assert not math.isfinite(norms[-1])
        for i, (p, t, b) in enumerate(zip(params, theta, before)):
            if i in dropped:
                assert torch.equal(bits(p), bits(t)), f"tensor {i} is not exactly θ"
            else:
                assert torch.isfinite(p).all() and total_abs(diffs([p], [b])) > 0, f"tensor {i} did not move"
        # foreach drops the same tensors (θ + 0 there: -0.0 becomes +0.0, so values, not bits)
        p_foreach, b_foreach = clones(before), clones(backups)
        foreach.perturb_(p_foreach, grads, b_foreach, epsilon, 0.5, per_tensor, first)
        for i in dropped:
            assert torch.equal(params[i], p_foreach[i])


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_zero_gradients_and_zero_epsilon(cuda_backend, dtype):
    shapes = [(CHUNK + 1,), (5,), (), (0,)]
    params, grads = make_lists(shapes, dtype, seed=7)
    theta = clones(params)
    backups = [torch.empty_like(p) for p in params]
    zeros = [torch.zeros_like(g) for g in grads]
    for per_tensor in (True, False):
        norms = cuda_backend.perturb_(params, zeros, backups, 1.0, 0.5, per_tensor, True)
        assert norms.tolist() == [0.0] * (len(params) + 1)  # no division by zero anywhere
        for p, t in zip(params, theta):
            assert torch.equal(p, t)  # θ + 1·0 (values: +0.0 == -0.0)
    # ε = 0: nothing moves, bit for bit, whatever the gradient; the norms are still reported.
    norms = cuda_backend.perturb_(params, grads, backups, 0.0, 0.5, True, True)
    assert_bitwise_equal(params, theta)
    expected = Ascent(theta, grads, theta, 0.0, 0.5, True, True)
    torch.testing.assert_close(norms.cpu().double(), expected.norms, rtol=NORM_RTOL[dtype], atol=0)
    assert float(norms[-1]) > 1.0


@needs_gpu
@pytest.mark.cuda
def test_dense_non_contiguous_layouts(cuda_backend):
    """channels_last and transposed tensors are dense: supported when every list shares the layout."""
    shapes = [(64, 3, 3, 3), (32, 16, 5, 5), (300, 200), (CHUNK + 9, 2)]
    params, grads = make_lists(shapes, torch.float32, seed=8)
    layouts = [lambda t: t.to(memory_format=torch.channels_last)] * 2 + [lambda t: t.t().contiguous().t()] * 2
    params = [f(p) for f, p in zip(layouts, params)]
    grads = [f(g) for f, g in zip(layouts, grads)]
    assert not any(p.is_contiguous() for p in params)
    backups = [torch.empty_like(p) for p in params]  # preserve_format keeps the layout
    p_foreach, b_foreach = clones(params), clones(backups)
    expected, norms = check_ascent(cuda_backend, params, grads, backups, 20.0, 1.0, True, True)
    n_foreach = foreach.perturb_(p_foreach, grads, b_foreach, 20.0, 1.0, True, True)
    assert_within(params, p_foreach, foreach_slack(expected), "param vs foreach")
    assert_norms_within(norms, n_foreach.cpu().double(), backend_norm_bound(expected, params))
    assert [p.stride() for p in params] == [b.stride() for b in backups]


# -- restore_ ----------------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_is_bitwise(cuda_backend, dtype):
    params, backups = make_lists(EDGE_SHAPES, dtype, seed=9)
    special = torch.tensor([math.nan, -0.0, math.inf, -math.inf, torch.finfo(dtype).tiny / 2], dtype=dtype)
    backups[7].view(-1)[-5:] = special.to(DEVICE)
    backups[3].view(-1)[1] = -0.0
    payload = bits(backups[6].view(-1)[:1])  # a NaN with a non-default payload
    payload.fill_({8: 0x7FF8DEAD0000BEEF, 4: 0x7FC0BEEF, 2: 0x7E0F}[backups[6].element_size()])
    backups += [unaligned_copy(backups[7])]  # the scalar path
    params += [unaligned_copy(params[7])]
    cuda_backend.restore_(params, backups)
    assert_bitwise_equal(params, backups)
    p_foreach = [torch.zeros_like(b) for b in backups]
    foreach.restore_(p_foreach, backups)
    assert_bitwise_equal(params, p_foreach)


@needs_gpu
@pytest.mark.cuda
def test_restore_undoes_perturb_where_reference_rounds(cuda_backend):
    """With θ saved (not Δ), restoring is exact even in bf16, where the reference's θ + Δ − Δ is not."""
    params, grads = make_lists(EDGE_SHAPES, torch.bfloat16, seed=10, param_scale=1.0)
    theta = clones(params)
    p_ref, b_ref = clones(params), [torch.empty_like(p) for p in params]
    backups = [torch.empty_like(p) for p in params]
    cuda_backend.perturb_(params, grads, backups, 50.0, 1.0, True, True)
    reference.perturb_(p_ref, grads, b_ref, 50.0, 1.0, True, True)
    cuda_backend.restore_(params, backups)
    reference.restore_(p_ref, b_ref)
    assert_bitwise_equal(params, theta)
    assert any(not torch.equal(p, t) for p, t in zip(p_ref, theta))  # the reference's restore is lossy here


# -- restore_sgd_ ------------------------------------------------------------------------------------------------
def sgd_definition(theta, grad, buf, lr, momentum, dampening, nesterov, weight_decay, maximize, first_step):
    """torch.optim.SGD's update of one tensor in float64; returns (θ', buf', bound θ', bound buf')."""
    t, g = theta.double(), grad.double()
    d_p = -g if maximize else g
    if weight_decay:
        d_p = d_p + weight_decay * t
    b_old = buf.double() if momentum and not first_step else torch.zeros_like(t)
    b_new = b_old
    if momentum:
        b_new = d_p if first_step else momentum * b_old + (1 - dampening) * d_p
        d_p = d_p + momentum * b_new if nesterov else b_new
    new = t - lr * d_p
    # A few roundings of the largest terms: θ, the step and the buffers.
    bound_p = 4 * UNIT[theta.dtype] * (t.abs() + new.abs() + lr * (g.abs() + weight_decay * t.abs() + b_old.abs()
                                                                   + b_new.abs()))
    bound_b = 4 * UNIT[theta.dtype] * (b_old.abs() + b_new.abs() + g.abs() + weight_decay * t.abs())
    return new, b_new, bound_p, bound_b


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("flags", SGD_FLAGS, ids=flags_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_sgd_matches_torch_sgd(cuda_backend, dtype, flags):
    lr, steps = 0.1, 4
    shapes = [(CHUNK + 1,), (7,), (), (33, 5), (0,)]
    theta, _ = make_lists(shapes, dtype, seed=11)
    momentum = flags["momentum"]
    # torch.optim.SGD from its own state all along (free running), and one re-synced to our state every step
    # (so low-precision rounding differences do not accumulate into the comparison).
    free = clones(theta)
    free_opt = torch.optim.SGD(free, lr=lr, **flags)
    synced = clones(theta)
    synced_opt = torch.optim.SGD(synced, lr=lr, **flags)
    buffers = [torch.full_like(p, math.nan) for p in theta]  # never read on the first step
    sentinel = clones(buffers)
    params = [torch.empty_like(p) for p in theta]
    start = clones(theta)
    for step in range(steps):
        grads = make_lists(shapes, dtype, seed=100 + step)[1]
        # θ + Δ in params (to be discarded), θ in backups.
        backups = clones(theta)
        for p, t, g in zip(params, theta, grads):
            p.copy_(t + 0.5 * g)
        buffers_before = clones(buffers)
        # The buffers go in even without momentum: they must then stay untouched.
        cuda_backend.restore_sgd_(params, backups, grads, buffers, lr, momentum,
                                  flags["dampening"], flags["weight_decay"], flags["nesterov"], flags["maximize"],
                                  step == 0)
        assert_bitwise_equal(backups, theta, "backup")
        expected = [sgd_definition(t, g, b, lr, first_step=step == 0, **flags)
                    for t, g, b in zip(theta, grads, buffers_before)]
        assert_within(params, [e[0] for e in expected], [e[2] for e in expected], "param")
        # A real step: several times the tolerance (bf16's is 4 units of |θ|, the step a few percent of it).
        assert total_abs(diffs(params, theta)) > 3 * total_abs([e[2] for e in expected])
        if momentum:
            assert_within(buffers, [e[1] for e in expected], [e[3] for e in expected], "buffer")
        else:
            assert_bitwise_equal(buffers, sentinel, "untouched buffer")
        # torch.optim.SGD from the same θ and buffer.
        for s, t, g, b in zip(synced, theta, grads, buffers_before):
            s.copy_(t)
            s.grad = g.clone()
            if momentum and step:
                synced_opt.state[s]["momentum_buffer"] = b.clone()
        synced_opt.step()
        slack = [2 * e[2] for e in expected]
        assert_within(params, synced, slack, "param vs torch.optim.SGD")
        if momentum:
            assert_within(buffers, [synced_opt.state[s]["momentum_buffer"] for s in synced],
                          [2 * e[3] for e in expected], "buffer vs torch.optim.SGD")
        for f, g in zip(free, grads):
            f.grad = g.clone()
        free_opt.step()
        theta = clones(params)
    if dtype in (torch.float32, torch.float64):  # free running: only roundings in the same precision
        torch.testing.assert_close(params, free, rtol=64 * UNIT[dtype], atol=64 * UNIT[dtype])
        tolerance = 64 * UNIT[dtype] * (total_abs(free) + sum(f.numel() for f in free))
        assert total_abs(diffs(params, start)) > 1000 * tolerance


# -- determinism, syncs, streams, graphs -----------------------------------------------------------------------
@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_bitwise_deterministic_and_alignment_independent(cuda_backend, dtype):
    shapes = [(5 * CHUNK + 7,), (CHUNK,), (123,), (2_000_003,)]
    params, grads = make_lists(shapes, dtype, seed=12)
    grads2 = make_lists(shapes, dtype, seed=13)[1]
    for per_tensor in (True, False):
        runs = []
        for layout in (clones, clones, lambda ts: [unaligned_copy(t) for t in ts]):
            p, g, g2 = layout(params), layout(grads), layout(grads2)
            b = layout([torch.empty_like(t) for t in params])
            n1 = cuda_backend.perturb_(p, g, b, 30.0, 0.5, per_tensor, True)
            n2 = cuda_backend.perturb_(p, g2, b, 30.0, 0.5, per_tensor, False)
            bufs = layout([torch.zeros_like(t) for t in params])
            cuda_backend.restore_sgd_(p, b, g2, bufs, 0.1, 0.9, 0.0, 1e-2, True, False, True)
            runs.append((n1, n2, p, bufs))
        for other in runs[1:]:  # repeated, and with the scalar instead of the vector path
            for a, b in zip(runs[0], other):
                assert_bitwise_equal(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b])


class OpLog(TorchDispatchMode):
    """The ops that reach the Python dispatch key while active (not those an op runs inside its kernel)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def one_step(ops, params, grads, backups, buffers, first_step):
    ops.perturb_(params, grads, backups, 1.0, 0.5, True, True)
    ops.perturb_(params, grads, backups, 1.0, 0.5, False, False)
    ops.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 5e-4, True, False, first_step)
    ops.perturb_(params, grads, backups, 1.0, 0.5, True, True)
    ops.restore_(params, backups)


@needs_gpu
@pytest.mark.cuda
def test_no_host_sync_and_op_count_independent_of_tensor_count(cuda_backend):
    counts = {}
    for count in (1, 20, 300):
        params, grads = make_lists([(1000 + i,) for i in range(count)], torch.float32, seed=count)
        backups = [torch.empty_like(p) for p in params]
        buffers = [torch.empty_like(p) for p in params]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
        try:
            with OpLog() as log:
                one_step(cuda_backend, params, grads, backups, buffers, True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert not any("_local_scalar_dense" in op for op in log.ops), log.ops
        counts[count] = log.ops
    assert counts[1] == counts[20] == counts[300], counts
    assert len(counts[300]) == 5  # one dispatched op per call


@needs_gpu
@pytest.mark.cuda
def test_capturable_in_a_cuda_graph(cuda_backend):
    """No host sync and only current-stream work: the ops replay from a CUDA graph."""
    shapes = [(CHUNK + 3,), (77,), (3, 5)]
    params, grads = make_lists(shapes, torch.float32, seed=14)
    backups = [torch.empty_like(p) for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch.cuda.graphs recommends
        one_step(cuda_backend, clones(params), grads, clones(backups), clones(buffers), True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norms = cuda_backend.perturb_(params, grads, backups, 1.0, 0.5, True, True)
        cuda_backend.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 0.0, False, False, True)
    new_params, new_grads = make_lists(shapes, torch.float32, seed=15)
    for dst, src in zip(params + grads, new_params + new_grads):
        dst.copy_(src)
    graph.replay()
    eager_params, eager_backups, eager_buffers = clones(new_params), clones(backups), clones(buffers)
    eager_norms = cuda_backend.perturb_(eager_params, new_grads, eager_backups, 1.0, 0.5, True, True)
    cuda_backend.restore_sgd_(eager_params, eager_backups, new_grads, eager_buffers, 0.1, 0.9, 0.0, 0.0, False,
                              False, True)
    torch.cuda.synchronize()
    assert_bitwise_equal([norms] + params + buffers, [eager_norms] + eager_params + eager_buffers)
    assert not torch.equal(params[0], new_params[0])


@needs_gpu
@pytest.mark.cuda
def test_runs_on_the_current_stream(cuda_backend):
    """Work queued on a side stream (a long sleep, then the gradient's values) precedes the op there."""
    shapes = [(4 * CHUNK,), (1000,)]
    params, grads = make_lists(shapes, torch.float32, seed=16)
    values = make_lists(shapes, torch.float32, seed=17)[1]
    backups = [torch.empty_like(p) for p in params]
    expected = Ascent(params, values, params, 5.0, 1.0, True, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the new gradient lands
        for g, v in zip(grads, values):
            g.copy_(v)
        norms = cuda_backend.perturb_(params, grads, backups, 5.0, 1.0, True, True)
    torch.cuda.synchronize()
    assert_within(params, expected.params, expected.bounds)
    torch.testing.assert_close(norms.double().cpu(), expected.norms, rtol=1e-5, atol=0)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_tensors_device_not_the_current_one(cuda_backend):
    device = torch.device("cuda", 1)
    params, grads = make_lists([(CHUNK + 5,), (9,)], torch.float32, seed=18, device=device)
    backups = [torch.empty_like(p) for p in params]
    expected = Ascent(params, grads, params, 5.0, 1.0, False, True)
    with torch.cuda.device(0):
        norms = cuda_backend.perturb_(params, grads, backups, 5.0, 1.0, False, True)
    assert norms.device == device
    assert_within(params, expected.params, expected.bounds)


# -- argument checks ----------------------------------------------------------------------------------------------
def _bad_inputs():
    """(name, op, build(params, grads, backups, buffers) -> call arguments, message)."""
    def perturb(p, g, b, m, epsilon=1.0, inner_lr=1.0):
        return ("perturb_", (p, g, b, epsilon, inner_lr, True, True))

    def sgd(p, g, b, m, momentum=0.9, dampening=0.0, nesterov=False):
        return ("restore_sgd_", (p, b, g, m, 0.1, momentum, dampening, 0.0, nesterov, False, False))

    def replace(lst, index, t):
        lst = list(lst)
        lst[index] = t
        return lst

    return [
        ("length", lambda p, g, b, m: perturb(p, g[:-1], b, m), r"grads has 2 tensors but params has 3"),
        ("shape", lambda p, g, b, m: perturb(p, g, replace(b, 2, b[2][:-1]), m),
         r"backups\[2\] has shape \[4\] but params\[2\] has shape \[5\]"),
        ("dtype", lambda p, g, b, m: perturb(p, replace(g, 2, g[2].half()), b, m),
         r"grads\[2\] has dtype torch.float16 but params\[2\] has torch.float32"),
        ("device", lambda p, g, b, m: perturb(p, replace(g, 2, g[2].cpu()), b, m), r"grads\[2\] is on cpu"),
        ("unsupported dtype", lambda p, g, b, m: ("restore_", (replace(p, 2, p[2].long()), replace(b, 2, b[2].long()))),
         r"params\[2\] has dtype torch.int64; supported dtypes are"),
        ("not dense", lambda p, g, b, m: ("restore_", (replace(p, 2, torch.zeros(5, 2, device=p[2].device)[:, 0]),
                                                      b)),
         r"params\[2\] with sizes \[5\] and strides \[2\] is not dense"),
        ("strides differ", lambda p, g, b, m: perturb(replace(p, 1, p[1].view(3, 4).t().contiguous().t()),
                                                      replace(g, 1, g[1].view(3, 4)), replace(b, 1, b[1].view(3, 4)),
                                                      m),
         r"grads\[1\] has strides \[4, 1\] but params\[1\] has strides \[1, 3\]"),
        ("epsilon", lambda p, g, b, m: perturb(p, g, b, m, epsilon=-1.0), r"epsilon must be a finite number >= 0"),
        ("inner_lr", lambda p, g, b, m: perturb(p, g, b, m, inner_lr=math.nan), r"inner_lr must be a finite number"),
        ("buffers", lambda p, g, b, m: sgd(p, g, b, m[:0]), r"momentum_buffers has 0 tensors but params has 3"),
        ("nesterov", lambda p, g, b, m: sgd(p, g, b, m, dampening=0.1, nesterov=True),
         r"nesterov needs momentum > 0 and dampening == 0"),
    ]


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
def test_bad_input_raises_before_writing(cuda_backend, case):
    _, build, message = case
    params, grads = make_lists([(CHUNK + 1,), (12,), (5,)], torch.float32, seed=19)
    backups = [torch.full_like(p, 7.0) for p in params]
    buffers = [torch.full_like(p, 3.0) for p in params]
    saved = clones(params), clones(backups), clones(buffers)
    op, args = build(params, grads, backups, buffers)
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.amp_fused, op)(*args)
    torch.cuda.synchronize()
    for now, then in zip((params, backups, buffers), saved):
        assert_bitwise_equal(now, then)


# -- the optimizer ---------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("inner_iter", [1, 2])
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_amp_optimizer_with_cuda_backend_matches_foreach(cuda_backend, norm, inner_iter):
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(64, 10, generator=gen).to(DEVICE)
    y = torch.randint(0, 4, (64,), generator=gen).to(DEVICE)

    def train(backend):
        torch.manual_seed(21)
        model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                                    torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(DEVICE)
        kwargs = dict(lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3)
        if backend is None:
            opt = torch.optim.SGD(model.parameters(), **kwargs)
        else:
            opt = amp_fused.AMP(model.parameters(), epsilon=0.05, inner_lr=1.0, inner_iter=inner_iter, norm=norm,
                                backend=backend, **kwargs)

        def closure():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        norms = []
        for _ in range(4):
            if backend is None:
                opt.zero_grad()
                closure()
                opt.step()
            else:
                opt.step(closure)
                norms.append(opt.last_norms.clone())
        return [p.detach().clone() for p in model.parameters()], norms

    params, norms = train(cuda_backend.NAME)
    params_foreach, norms_foreach = train("foreach")
    params_sgd, _ = train(None)
    torch.testing.assert_close(params, params_foreach, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(norms, norms_foreach, rtol=1e-4, atol=1e-7)
    assert max((a - b).abs().max().item() for a, b in zip(params, params_sgd)) > 1e-3  # AMP did something
