"""What is specific to the CUDA kernels (backend "cuda", csrc/cuda): the built extension imports, registers its
kernels and publishes its launch limits on a machine without a GPU; on a GPU, the launch geometry (16-byte vector
groups: 8 fp16/bf16, 4 fp32 or 2 fp64 elements, and their tails; chunks, tensors of many blocks, lists whose
tensors and chunks carry over between launches, read from the launcher's published limits), a bf16 tensor past
2^31 elements, results bitwise independent of (partial) alignment, overlapping tensors rejected before anything
is written, no host syncs (also under CUDA graph capture), the current stream, the tensors' device (cuda:1: a
skip that says why where there is one GPU), the kernels' own check of nesterov, and the AMP optimizer end to end.
The gradient-reuse ops (norms, restore_orthogonal_, add_orthogonal_: two fp64 sums per chunk and per tensor, a
coefficient per tensor) against the float64 definition on the same geometry, over many launches, bitwise
deterministic, with NaN/Inf/zero sums leaving their outputs bit for bit, and without host syncs.

What every backend promises is tested once for all of them, CUDA tensors included (marked ``cuda``), in
tests/test_backend_contract.py; the argument contract, natively on the CUDA kernels too, in tests/test_checks.py.
The tests marked ``cuda`` need a GPU and are skipped without one.
"""
from __future__ import annotations

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
import op_definition
from amp_fused import _build, _extension, backends, functional
from amp_fused.backends import cuda as fused
from amp_fused.backends import foreach
from op_definition import (DTYPES, ULPS, UNIT, ascent_bounds, assert_bitwise_equal, assert_within, bits, bound_norm,
                           clones, dtype_id, empty_like, epsilon_for, moved, norm_bounds, perturb, sgd_bounds)

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device; none is visible")
DEVICE = torch.device("cuda")
OPS = ("perturb_", "restore_", "restore_sgd_", "norms", "restore_orthogonal_", "add_orthogonal_")
WRITING_OPS = tuple(op for op in OPS if op != "norms")  # norms reads only: no overlap can fail it


def cuda_extension():
    """amp_fused._C_cuda, or None when it is missing (reading ``cuda_error`` loads it: amp_fused loads the
    extensions on first use)."""
    return sys.modules.get("amp_fused._C_cuda") if _extension.cuda_error is None else None


# Elements per CUDA block (csrc/cuda/config.h), published by the extension; the fallback only places test
# sizes when the extension is missing, in which case the GPU tests fail on the backend check anyway.
CHUNK = getattr(cuda_extension(), "CHUNK_SIZE", 1 << 16)
# Sizes around the vector groups (8 elements for fp16/bf16, 4 fp32, 2 fp64) and chunk boundaries, 0-d and
# empty tensors, and one of a couple of millions.
EDGE_SHAPES = [(1,), (3,), (4,), (5,), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2 * CHUNK + 3,), (), (0,), (2, 0, 3),
               (1_048_577, 2), (7,), (8,), (9,), (15,), (17,), (CHUNK - 7,), (CHUNK + 9,)]


@pytest.fixture
def launch_limits(cuda_backend):
    """The launcher's table limits as the extension publishes them (csrc/cuda/config.h)."""
    ext = cuda_extension()
    return dict(chunk=ext.CHUNK_SIZE, vector_bytes=ext.VECTOR_BYTES, max_blocks=ext.MAX_BLOCKS_PER_LAUNCH,
                max_tensors=dict(ext.MAX_TENSORS_PER_LAUNCH), sum_tensors=ext.SUM_PARTIALS_TENSORS_PER_LAUNCH)


@pytest.fixture
def cuda_backend():
    reason = fused.unavailable_reason()
    assert reason is None, f"the cuda backend is unavailable on a machine with a GPU: {reason}"
    return fused


# -- helpers ---------------------------------------------------------------------------------------------------
def make_lists(shapes, dtypes, seed, param_scale=0.01, device=None):
    """op_definition.make_lists on the GPU (or ``device``)."""
    return op_definition.make_lists(shapes, dtypes, seed, DEVICE if device is None else device, param_scale)


def check_ascent(params, grads, backups, theta, epsilon, inner_lr, per_tensor, first, surface=False, eta=None):
    """One perturb_ on the cuda backend against the definition; returns the error bounds it was held to."""
    dtypes = [p.dtype for p in params]
    before = clones(params)
    norms = functional.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, surface, eta,
                                backend="cuda")
    expected = perturb(before, grads, theta, epsilon, inner_lr, per_tensor, first, surface, eta)
    assert norms.dtype == torch.float32 and norms.device == params[0].device
    bounds = ascent_bounds(expected, dtypes, per_tensor)
    assert_within(params, expected.params, bounds, "param")
    assert_within([norms], [expected.norms.float()], [norm_bounds(expected, dtypes)], "norms")
    return bounds


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
    # Binaries built for another torch (another venv's in-place build of this checkout) are never loaded.
    other = {p.name: _build.read_torch_tag(p) for p in sorted(package.glob("_C*.so"))
             if _build.read_torch_tag(p) != _build.torch_tag()}
    if other:
        pytest.skip(f"the extensions in {package} were built for another torch ({other}; None: no build tag), not "
                    f"this torch {torch.__version__}")
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
        from amp_fused import _extension, backends
        print(json.dumps(dict(gpu=torch.cuda.is_available(), before=before, after=after, file=ext.__file__,
                              chunk=ext.CHUNK_SIZE, vector_bytes=ext.VECTOR_BYTES,
                              max_blocks=ext.MAX_BLOCKS_PER_LAUNCH,
                              max_tensors={{str(k): v for k, v in ext.MAX_TENSORS_PER_LAUNCH.items()}},
                              sum_tensors=ext.SUM_PARTIALS_TENSORS_PER_LAUNCH, cuda_error=_extension.cuda_error,
                              reason=backends.unavailable_reason("cuda"))))
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
    assert info["chunk"] > 0 and info["chunk"] % 8 == 0  # whole 8-element groups of fp16/bf16
    assert info["vector_bytes"] == 16
    # fewer tensors per table with more pointers per tensor; a table fits the 4 KB of kernel arguments
    tensors = [info["max_tensors"][str(depth)] for depth in (1, 2, 3, 4)]
    assert tensors == sorted(tensors, reverse=True) and tensors[-1] >= 1, tensors
    assert all(8 + 5 * info["max_blocks"] + (8 * d + 12) * n <= 4096 for d, n in zip((1, 2, 3, 4), tensors)), tensors
    assert info["sum_tensors"] >= 1
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
    norms = fused.norms([])
    assert norms.dtype == torch.float32 and norms.tolist() == [0.0]
    fused.restore_orthogonal_([], [], [], [], True)
    fused.add_orthogonal_([], [], 0.5, False)


# -- launch geometry -------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_vector_groups_chunks_and_a_couple_of_million_values(cuda_backend, dtype, per_tensor):
    """Every remainder of the vector groups (8 elements for fp16/bf16, 4 fp32, 2 fp64), chunk edges and a tensor
    of 32 blocks, first and later ascent."""
    params, grads = make_lists(EDGE_SHAPES, dtype, seed=1)
    grads2 = make_lists(EDGE_SHAPES, dtype, seed=2)[1]
    epsilon = epsilon_for(grads, 0.5, per_tensor)
    theta, backups = clones(params), empty_like(params)
    for first, g in ((True, grads), (False, grads2)):
        before = clones(params)
        bounds = check_ascent(params, g, backups, theta, epsilon, 0.5, per_tensor, first)
        assert moved(params, before) > 10 * bound_norm(bounds)
    functional.restore_(params, backups, backend="cuda")
    assert_bitwise_equal(params, theta)


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
    theta, backups = clones(params), empty_like(params)
    for first, grads in ((True, grads1), (False, grads2)):
        before = clones(params)
        bounds = check_ascent(params, grads, backups, theta, epsilon, 1.0, per_tensor, first)
        assert moved(params, before) > 100 * bound_norm(bounds)


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


# -- perturb_'s modes: surface (SAM) and eta (ASAM) -----------------------------------------------------------
MODES = [("sam", True, None), ("asam", True, 0.01), ("asam_eta0", True, 0.0), ("weighted_ball", False, 0.5)]


def mode_epsilon(params, grads, inner_lr, per_tensor, surface, eta):
    """An ε that makes the mode matter: per tensor, half the largest ‖u‖ (the largest tensor projected with
    scale 1/2, the others' scales above 1: the ball cuts them to 1, the sphere does not); global, 2.5·‖u‖ on
    the surface (a scale the ball would cut to 1), else 0.5·‖u‖."""
    norms = perturb(params, grads, None, 1.0, inner_lr, per_tensor, True, surface, eta).norms.tolist()
    if per_tensor:
        return 0.5 * max(norms[:-1])
    return (2.5 if surface else 0.5) * norms[-1]


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_modes_on_vector_groups_and_chunks(cuda_backend, dtype, mode, per_tensor):
    """SAM's sphere and ASAM's weights (the weighted norm pass reads {params, grads}: its own depth-2 tables) on
    every remainder of the vector groups, chunk edges, empty tensors and a tensor of 32 blocks; θ of order 1, so
    that the weights |θ| + η differ between elements; backups are θ bit for bit."""
    _, surface, eta = mode
    params, grads = make_lists(EDGE_SHAPES, dtype, seed=50, param_scale=1.0)
    epsilon = mode_epsilon(params, grads, 0.5, per_tensor, surface, eta)
    theta, backups = clones(params), [torch.full_like(p, math.nan) for p in params]
    bounds = check_ascent(params, grads, backups, theta, epsilon, 0.5, per_tensor, True, surface, eta)
    assert moved(params, theta) > 10 * bound_norm(bounds)
    assert_bitwise_equal(backups, theta, "backup")
    functional.restore_(params, backups, backend="cuda")
    assert_bitwise_equal(params, theta)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_modes_over_many_launches(cuda_backend, launch_limits, mode):
    """More tensors than a table holds at any depth (the weighted norm pass: depth 2), mixed dtypes, and a tensor
    whose chunks straddle two launches."""
    _, surface, eta = mode
    chunk, max_blocks = launch_limits["chunk"], launch_limits["max_blocks"]
    count = max(launch_limits["max_tensors"].values()) + 40
    gen = torch.Generator().manual_seed(51)
    shapes = [(int(torch.randint(1, 5000, (1,), generator=gen)),) for _ in range(count)]
    shapes[count // 3] = ((max_blocks + 3) * chunk + 5,)
    dtypes = [{3: torch.bfloat16, 4: torch.float16, 5: torch.float64}.get(i % 6, torch.float32) for i in range(count)]
    params, grads = make_lists(shapes, dtypes, seed=52, param_scale=1.0)
    for per_tensor in (True, False):
        p, backups = clones(params), empty_like(params)
        epsilon = mode_epsilon(params, grads, 0.5, per_tensor, surface, eta)
        bounds = check_ascent(p, grads, backups, params, epsilon, 0.5, per_tensor, True, surface, eta)
        assert moved(p, params) > 10 * bound_norm(bounds)
        assert_bitwise_equal(backups, params, "backup")


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_modes_bitwise_deterministic_and_alignment_independent(cuda_backend, dtype):
    """The weighted, surface ascent: repeated, and on storage one element off alignment (scalar instead of
    vector accesses), bitwise the same."""
    shapes = [(5 * CHUNK + 7,), (CHUNK,), (123,), (2_000_003,)]
    params, grads = make_lists(shapes, dtype, seed=53, param_scale=1.0)
    for per_tensor in (True, False):
        runs = []
        for layout in (clones, clones, lambda ts: [unaligned_copy(t) for t in ts]):
            p, g, b = layout(params), layout(grads), layout([torch.empty_like(t) for t in params])
            norms = cuda_backend.perturb_(p, g, b, 3.0, 0.5, per_tensor, True, True, 0.01)
            runs.append([norms] + p + b)
        for other in runs[1:]:
            assert_bitwise_equal(other, runs[0])


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("eta", [None, 0.01], ids=["sam", "asam"])
def test_modes_drop_non_finite_tensors_and_overflowing_scales(cuda_backend, eta):
    """A NaN in g (weighted: also in θ) leaves that tensor (per tensor) or every tensor (global) at θ bit for bit;
    on the sphere a scale that overflows (ε = 1e300, u = 0) is 0, not Inf."""
    shapes = [(CHUNK + 5,), (37,), (3, 4)]
    for where in ("grad", "param"):
        if where == "param" and eta is None:
            continue
        params, grads = make_lists(shapes, torch.float32, seed=54, param_scale=1.0)
        (grads if where == "grad" else params)[0].view(-1)[CHUNK + 2] = math.nan
        for per_tensor in (True, False):
            p, b = clones(params), empty_like(params)
            norms = cuda_backend.perturb_(p, grads, b, 0.3, 0.5, per_tensor, True, True, eta).cpu()
            assert_bitwise_equal(b, params, "backup")
            assert math.isnan(norms[0].item()) and math.isnan(norms[-1].item())
            assert_bitwise_equal(p if not per_tensor else p[:1], params if not per_tensor else params[:1])
            if per_tensor:
                assert moved(p[1:], params[1:]) > 0.1
    params, _ = make_lists(shapes, torch.float32, seed=55, param_scale=1.0)
    grads = [torch.zeros_like(t) for t in params]
    for per_tensor in (True, False):
        p, b = clones(params), empty_like(params)
        norms = cuda_backend.perturb_(p, grads, b, 1e300, 1.0, per_tensor, True, True, eta)
        assert norms.tolist() == [0.0] * 4
        assert_bitwise_equal(p, params)


@needs_gpu
@pytest.mark.cuda
def test_eta_needs_the_first_ascent_on_the_cuda_kernels(cuda_backend):
    params, grads = make_lists([(CHUNK + 1,), (12,)], torch.float32, seed=56)
    backups = [torch.full_like(p, 7.0) for p in params]
    saved = clones(params + backups)
    with pytest.raises(ValueError) as error:
        torch.ops.amp_fused.perturb_(params, grads, backups, 0.5, 1.0, True, False, True, 0.01)
    assert str(error.value) == ("amp_fused.perturb_: eta (ASAM's element weights) needs first=True; the weighted "
                                "ascent is one step from θ")
    with pytest.raises(ValueError, match=r"^amp_fused\.perturb_: eta must be a finite number >= 0, got nan$"):
        torch.ops.amp_fused.perturb_(params, grads, backups, 0.5, 1.0, True, True, False, math.nan)
    torch.cuda.synchronize()
    assert_bitwise_equal(params + backups, saved)


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


# -- launch tables, > 2^31 elements, partial alignment, overlap: the cases a CPU run cannot reach --------------
SGD_FIRST = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False,
                 first_step=True)
SGD_LATER = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=True,
                 first_step=False)


def float64_copies(tensors):
    return [t.detach().to(torch.float64, copy=True) for t in tensors]


def check_restore_sgd(params, backups, grads, buffers, sgd):
    """One restore_sgd_ on the cuda backend against the foreach backend run in float64 on the same values, held
    to the definition's SGD bounds."""
    theta, old = clones(backups), clones(buffers)
    p64, m64 = float64_copies(params), float64_copies(buffers)
    foreach.restore_sgd_(p64, float64_copies(backups), float64_copies(grads), m64, *sgd.values())
    functional.restore_sgd_(params, backups, grads, buffers, *sgd.values(), backend="cuda")
    step = op_definition.restore_sgd(theta, grads, old, *sgd.values())
    param_bounds, buffer_bounds = sgd_bounds(theta, grads, old, step, sgd["lr"], sgd["momentum"],
                                             sgd["weight_decay"], sgd["first_step"])
    assert_within(params, p64, param_bounds, "param after restore_sgd_")
    assert_within(buffers, m64, buffer_bounds, "momentum buffer after restore_sgd_")


def check_ascent_against_foreach(params, grads, backups, theta, epsilon, inner_lr, per_tensor, first):
    """check_ascent, with the expected values from the foreach backend run in float64 on the same inputs."""
    dtypes = [p.dtype for p in params]
    p64, b64 = float64_copies(params), float64_copies(backups)
    n64 = foreach.perturb_(p64, float64_copies(grads), b64, epsilon, inner_lr, per_tensor, first)
    expected = perturb(clones(params), grads, theta, epsilon, inner_lr, per_tensor, first)
    norms = functional.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, backend="cuda")
    bounds = ascent_bounds(expected, dtypes, per_tensor)
    assert_within(params, p64, bounds, "param")
    assert_within([norms], [n64.double()], [norm_bounds(expected, dtypes)], "norms")
    return norms


def step_sequence(params, grads, grads2, backups, buffers, epsilon):
    """The ops of an AMP step and a bit more on the cuda backend, each checked against foreach in float64 right
    after it ran; returns what every op wrote, for bitwise comparisons between runs."""
    theta, written = clones(params), []
    for t in backups + buffers:
        t.fill_(math.nan)  # a chunk the kernels skip would show
    for first, per_tensor, g in ((True, True, grads), (False, False, grads2), (False, True, grads)):
        before = clones(params)
        norms = check_ascent_against_foreach(params, g, backups, theta, epsilon, 0.5, per_tensor, first)
        assert_bitwise_equal(backups, theta, "backup")
        assert moved(params, before) > 0
        written.append(clones([norms] + params))
    check_restore_sgd(params, backups, grads2, buffers, SGD_FIRST)
    check_restore_sgd(params, backups, grads, buffers, SGD_LATER)
    written.append(clones(params + buffers))
    for t in params:
        t.fill_(math.nan)
    functional.restore_(params, backups, backend="cuda")
    assert_bitwise_equal(params, backups, "param after restore_")
    return written


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_half_types_on_the_8_wide_groups_and_their_tails(cuda_backend, launch_limits, dtype):
    """fp16/bf16 move 8 elements per 16-byte access: every size n ≡ 0..7 (mod 8) below and across a chunk,
    against foreach in float64."""
    width = launch_limits["vector_bytes"] // torch.empty((), dtype=dtype).element_size()
    assert width == 8
    chunk = launch_limits["chunk"]
    shapes = [(base + r,) for base in (0, 8, 2 * width * 512, chunk - width, chunk, 3 * chunk) for r in range(width)
              if base + r > 0]
    params, grads = make_lists(shapes, dtype, seed=31)
    grads2 = make_lists(shapes, dtype, seed=32)[1]
    backups, buffers = empty_like(params), empty_like(params)
    step_sequence(params, grads, grads2, backups, buffers, epsilon_for(grads, 0.5, True))


@needs_gpu
@pytest.mark.cuda
def test_chunks_and_tensors_carry_over_between_launches(cuda_backend, launch_limits):
    """A list that overflows the launch tables of every pass: more tensors than a table holds at any depth and
    than one launch of the per-tensor sums covers, and a tensor whose chunks straddle two launches (it starts
    part-way into a table and has more chunks than a table has blocks), mixed dtypes (one group per dtype)."""
    chunk, max_blocks = launch_limits["chunk"], launch_limits["max_blocks"]
    most_tensors = max(launch_limits["max_tensors"].values())
    count = max(2 * most_tensors, launch_limits["sum_tensors"]) + 7
    gen = torch.Generator().manual_seed(33)
    shapes = [(int(torch.randint(1, 3 * chunk // 2, (1,), generator=gen)),) for _ in range(count)]
    straddling = count // 3
    shapes[straddling] = ((max_blocks + 3) * chunk + 5,)
    dtypes = [{5: torch.bfloat16, 6: torch.float16}.get(i % 7, torch.float32) for i in range(count)]
    dtypes[straddling] = torch.float32
    # what the list is for: the fp32 group overflows a table in tensors, the straddling tensor starts part-way
    # into a table and alone has more chunks than a table has blocks
    fp32 = [i for i, d in enumerate(dtypes) if d == torch.float32]
    assert len(fp32) > most_tensors and count > launch_limits["sum_tensors"]
    assert 0 < sum(-(-shapes[i][0] // chunk) for i in fp32 if i < straddling) % max_blocks
    assert -(-shapes[straddling][0] // chunk) > max_blocks
    params, grads = make_lists(shapes, dtypes, seed=34)
    grads2 = make_lists(shapes, dtypes, seed=35)[1]
    backups, buffers = empty_like(params), empty_like(params)
    step_sequence(params, grads, grads2, backups, buffers, epsilon_for(grads, 0.5, True))


def view_at(t, offset, sentinel=-3.25):
    """The values of ``t`` in a buffer, ``offset`` elements past its 16-byte-aligned start (the rest SENTINEL);
    returns (view, buffer)."""
    buffer = torch.full((t.numel() + offset + 16,), sentinel, dtype=t.dtype, device=t.device)
    view = buffer[offset:offset + t.numel()].view(t.shape)
    view.copy_(t)
    return view, buffer


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_partial_alignment_is_bitwise_equal_to_an_aligned_run(cuda_backend, launch_limits, dtype):
    """A list mixing 16-byte-aligned tensors with views 1 element, half a vector and a whole vector into their
    buffers (at each index a different list misaligned, so a tensor takes the vector path only when all its
    pointers are aligned): every op's result is bitwise that of an all-aligned run of the same values, which
    itself matches foreach in float64; nothing around the views is written."""
    chunk = launch_limits["chunk"]
    width = launch_limits["vector_bytes"] // torch.empty((), dtype=dtype).element_size()
    offsets = sorted({0, 1, width // 2, width, width + 1})  # elements into the buffer (0, width: 16-byte aligned)
    shapes = [(n,) for n in (1, width - 1, width, width + 1, 4097, chunk - 1, chunk + width + 1, 2 * chunk + 3)]
    shapes += [(3, 5, 7), (CHUNK + 1,)]
    params, grads = make_lists(shapes, dtype, seed=36)
    grads2 = make_lists(shapes, dtype, seed=37)[1]
    epsilon = epsilon_for(grads, 0.5, True)
    aligned = step_sequence(clones(params), clones(grads), clones(grads2), empty_like(params), empty_like(params),
                            epsilon)

    names = ("params", "grads", "grads2", "backups", "buffers")
    lists = {name: [] for name in names}
    buffers_of = []
    for i in range(len(shapes)):
        for k, (name, source) in enumerate(zip(names, (params, grads, grads2, params, params))):
            offset = offsets[(i + k) % len(offsets)] if (i + k) % 3 else 0  # a third of them aligned
            view, buffer = view_at(source[i], offset)
            lists[name].append(view)
            buffers_of.append((buffer, offset, view.numel()))
    assert any(o % width == 0 for _, o, _ in buffers_of) and any(o % width for _, o, _ in buffers_of)
    mixed = step_sequence(*(lists[name] for name in names), epsilon)
    for a, m in zip(aligned, mixed):
        assert_bitwise_equal(m, a, "mixed-alignment result")
    for buffer, offset, numel in buffers_of:
        around = torch.cat([buffer[:offset], buffer[offset + numel:]])
        assert torch.equal(around, torch.full_like(around, -3.25)), "an element around a view was written"


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("op", WRITING_OPS)
def test_overlapping_tensors_in_one_list_are_rejected_before_anything_is_written(cuda_backend, launch_limits, op):
    """Two tensors of the op's first list (params; grads for add_orthogonal_) sharing memory, late in a list long
    enough for several launches: the contract's ValueError (csrc/checks.h), raised before any kernel writes,
    through torch.ops and the op layer."""
    count = max(launch_limits["max_tensors"].values()) + 5
    params, grads = make_lists([(1000 + i,) for i in range(count)], torch.float32, seed=38)
    shared = torch.randn(4000, device=DEVICE)
    params[-2], params[-1] = shared[:1000 + count - 2], shared[500:500 + 1000 + count - 1]
    backups, buffers = empty_like(params), [torch.ones_like(p) for p in params]
    args = {"perturb_": (params, grads, backups, 1.0, 0.5, True, True),
            "restore_": (params, backups),
            "restore_sgd_": (params, backups, grads, buffers, 0.1, 0.9, 0.0, 0.0, False, False, False),
            "restore_orthogonal_": (params, backups, grads, buffers, True),
            "add_orthogonal_": (params, buffers, 0.5, True)}[op]
    lead = "grads" if op == "add_orthogonal_" else "params"
    written = params + backups + buffers + [shared]
    torch.cuda.synchronize()
    before = [bits(t).clone() for t in written]
    message = (rf"^amp_fused\.{op}: {lead}\[{count - 2}\] and {lead}\[{count - 1}\] share memory; each tensor "
               r"the op writes must have memory of its own$")
    with pytest.raises(ValueError, match=message):
        getattr(torch.ops.amp_fused, op)(*args)
    with pytest.raises(ValueError, match=message.replace(r"^amp_fused\." + op + ": ", "")):
        getattr(functional, op)(*args, backend="cuda")
    torch.cuda.synchronize()
    for i, (now, then) in enumerate(zip(written, before)):
        assert torch.equal(bits(now), then), f"tensor {i} was written by a rejected {op}"


# 2^31 + 4097 bf16 elements: element offsets past int32 in every list, and a last chunk of 4097.
INT32_EDGE = 2**31
HUGE_NUMEL = INT32_EDGE + 4097
PIECE = 2**27  # float64 work in pieces of this many elements (1 GiB)


def huge_fill_(t, scale, gen):
    for piece in t.split(PIECE):
        piece.copy_(torch.randn(piece.numel(), generator=gen, device=t.device, dtype=torch.float32) * scale)


@needs_gpu
@pytest.mark.cuda
def test_bf16_tensor_past_2_31_elements(cuda_backend):
    """One bf16 tensor of 2^31 + 4097 elements through perturb_ (first and later ascent), restore_sgd_ and
    restore_: the whole norm in float64, and slices (the start, across element 2^31, the last 4097 and the last
    64) against a float64 computation of those slices."""
    lists = 5  # params, grads, backups, momentum buffers, a second gradient
    need = lists * 2 * HUGE_NUMEL + 3 * PIECE * 8 + 2**30
    free, total = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory for {lists} bf16 lists of {HUGE_NUMEL} "
                    f"elements; {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB are free")
    gen = torch.Generator(device=DEVICE).manual_seed(39)
    params, grads, grads2 = (torch.empty(HUGE_NUMEL, dtype=torch.bfloat16, device=DEVICE) for _ in range(3))
    huge_fill_(params, 0.01, gen)
    huge_fill_(grads, 1.0, gen)
    huge_fill_(grads2, 1.0, gen)
    backups = torch.full_like(params, math.nan)
    buffers = torch.full_like(params, math.nan)
    edge = INT32_EDGE
    slices = [(0, 4096), (edge - 3000, edge + 3000), (HUGE_NUMEL - 4097, HUGE_NUMEL), (HUGE_NUMEL - 64, HUGE_NUMEL)]
    inner_lr = 0.01

    def sum_of_squares(delta_of):
        return sum(float((delta_of(start) ** 2).sum()) for start in range(0, HUGE_NUMEL, PIECE))

    def piece(t, start):
        return t[start:start + PIECE].double()

    def check_slices(actual, expected_of, what):
        for a, b in slices:
            expected = expected_of(a, b)
            bound = (2.0**-8) * expected.abs() + 2.0**-20 * expected.abs().max()  # one bf16 rounding from fp32
            assert_within([actual[a:b]], [expected], [bound], f"{what} [{a}:{b}]")

    # first ascent: Δ = ζ·g, θ saved in backups
    norm = math.sqrt(sum_of_squares(lambda s: inner_lr * piece(grads, s)))
    epsilon = 0.5 * inner_lr * norm  # projects: scale ≈ 0.5
    theta = {(a, b): params[a:b].clone() for a, b in slices}
    norms = functional.perturb_([params], [grads], [backups], epsilon, inner_lr, True, True, backend="cuda")
    torch.testing.assert_close(norms.double().cpu(), torch.tensor([norm, norm], dtype=torch.float64), rtol=2e-7, atol=0)
    scale = min(1.0, epsilon / (norm + 1e-12))
    check_slices(params, lambda a, b: theta[a, b].double() + scale * inner_lr * grads[a:b].double(), "params")
    for a, b in slices:
        assert torch.equal(bits(backups[a:b]), bits(theta[a, b])), f"backups [{a}:{b}] are not θ"
    assert not backups.isnan().any()

    # later ascent: Δ = (params − θ) + ζ·g2
    current = {(a, b): params[a:b].clone() for a, b in slices}
    norm = math.sqrt(sum_of_squares(lambda s: piece(params, s) - piece(backups, s) + inner_lr * piece(grads2, s)))
    norms = functional.perturb_([params], [grads2], [backups], epsilon, inner_lr, True, False, backend="cuda")
    torch.testing.assert_close(norms.double().cpu(), torch.tensor([norm, norm], dtype=torch.float64), rtol=1e-6, atol=0)
    scale = min(1.0, epsilon / (norm + 1e-12))
    check_slices(params, lambda a, b: theta[a, b].double() + scale * (
        current[a, b].double() - theta[a, b].double() + inner_lr * grads2[a:b].double()), "params (later ascent)")

    # restore_sgd_, first step (the buffers are NaN: not read)
    functional.restore_sgd_([params], [backups], [grads], [buffers], *SGD_FIRST.values(), backend="cuda")
    step = {(a, b): op_definition.restore_sgd([theta[a, b]], [grads[a:b]], [], *SGD_FIRST.values())
            for a, b in slices}
    check_slices(params, lambda a, b: step[a, b].params[0], "params after restore_sgd_")
    check_slices(buffers, lambda a, b: step[a, b].momentum_buffers[0], "momentum buffers after restore_sgd_")

    params.fill_(math.nan)
    functional.restore_([params], [backups], backend="cuda")
    for start in range(0, HUGE_NUMEL, PIECE):
        assert torch.equal(bits(params[start:start + PIECE]), bits(backups[start:start + PIECE])), start


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
    expected = perturb(params, values, None, 5.0, 1.0, True, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the new gradient lands
        for g, v in zip(grads, values):
            g.copy_(v)
        norms = cuda_backend.perturb_(params, grads, backups, 5.0, 1.0, True, True)
    torch.cuda.synchronize()
    assert_within(params, expected.params, ascent_bounds(expected, torch.float32, True))
    torch.testing.assert_close(norms.double().cpu(), expected.norms, rtol=1e-5, atol=0)


@needs_gpu
@pytest.mark.cuda
def test_runs_on_the_tensors_device_not_the_current_one(cuda_backend):
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (a device guard). Needs two GPUs; the
    skip says how many there are, so a log shows why it did not run."""
    count = torch.cuda.device_count()
    if count < 2:
        names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count))
        pytest.skip(f"needs two CUDA devices to put tensors on cuda:1; this machine has {count} ({names})")
    device = torch.device("cuda", 1)
    params, grads = make_lists([(CHUNK + 5,), (9,)], torch.float32, seed=18, device=device)
    backups = [torch.empty_like(p) for p in params]
    expected = perturb(params, grads, None, 5.0, 1.0, False, True)
    with torch.cuda.device(0):
        norms = cuda_backend.perturb_(params, grads, backups, 5.0, 1.0, False, True)
    assert norms.device == device
    assert_within(params, expected.params, ascent_bounds(expected, torch.float32, False))


# -- the gradient-reuse ops: norms, restore_orthogonal_, add_orthogonal_ ---------------------------------------
# Their norm passes keep each product and every sum in fp64 and the coefficients in fp64 until the apply pass, so
# what a result may be off by is the apply pass's rounding: ULPS roundings of its terms (op_definition.ULPS), plus
# the error the coefficient inherits from Δ = params − θ formed in opmath (restore_orthogonal_).
NORMS_RTOL = 2.0**-22  # the fp32 result of an fp64 sum of exact squares
# Relative error of an fp64 sum of up to ~1e9 terms as the kernels add them (chains of at most a few hundred adds
# and fixed trees), against Σ|term|: what the coefficients of fp64 tensors inherit beyond Δ's rounding.
SUM_RTOL = 2.0**-40


def norms_bound(expected):
    return NORMS_RTOL * expected.abs()


def check_norms(tensors):
    """One norms on the cuda backend against the definition."""
    norms = functional.norms(tensors, backend="cuda")
    expected = op_definition.norms(tensors)
    assert norms.dtype == torch.float32 and norms.shape == (len(tensors) + 1,)
    assert norms.device == tensors[0].device
    assert_within([norms], [expected], [norms_bound(expected)], "norms")
    return norms


def coefficient_error(terms, dots, dtypes, per_tensor):
    """Relative error each tensor's c = ⟨Δ,g⟩/‖Δ‖² may have: Δ is formed in opmath from the stored values (ULPS
    roundings of each |Δ|), which moves the dot by up to that much of Σ|Δ·g| and ‖Δ‖² by twice that much; the fp64
    sums add SUM_RTOL of the same."""
    units = [ULPS * UNIT[d] + SUM_RTOL for d in dtypes]
    if per_tensor:
        return [u * (t / abs(d) + 2) if d else 0.0 for u, t, d in zip(units, terms, dots)]
    total, dot = math.fsum(terms), math.fsum(dots)
    return [max(units) * (total / abs(dot) + 2) if dot else 0.0] * len(terms)


def check_restore_orthogonal(params, backups, grads, per_tensor, orthogonals=None):
    """One restore_orthogonal_ on the cuda backend against the definition: orthogonals within the bounds, params
    θ bit for bit; returns (orthogonals, bounds, expected)."""
    dtypes = [p.dtype for p in params]
    before = clones(params)
    if orthogonals is None:
        orthogonals = [torch.full_like(g, math.nan) for g in grads]  # a chunk the kernel skips would show
    functional.restore_orthogonal_(params, backups, grads, orthogonals, per_tensor, backend="cuda")
    expected = op_definition.restore_orthogonal(before, backups, grads, per_tensor)
    assert_bitwise_equal(params, backups, "param after restore_orthogonal_")
    wide = [g.double() for g in grads]
    terms = [float((d * g).abs().sum()) for d, g in zip(expected.deltas, wide)]
    dots = [float((d * g).sum()) for d, g in zip(expected.deltas, wide)]
    errors = coefficient_error(terms, dots, dtypes, per_tensor)
    bounds = []
    for g, d, c, e, dtype in zip(wide, expected.deltas, expected.coefficients, errors, dtypes):
        moved_term = abs(c) * d.abs()
        bounds.append(ULPS * UNIT[dtype] * (g.abs() + moved_term) + e * moved_term)
    assert_within(orthogonals, expected.orthogonals, bounds, "orthogonal")
    return orthogonals, bounds, expected


def check_add_orthogonal(grads, orthogonals, alpha, per_tensor):
    """One add_orthogonal_ on the cuda backend against the definition; returns (bounds, grads before)."""
    before = clones(grads)
    functional.add_orthogonal_(grads, orthogonals, alpha, per_tensor, backend="cuda")
    expected = op_definition.add_orthogonal(before, orthogonals, alpha, per_tensor)
    coefficients = op_definition.direction_coefficients(before, orthogonals, alpha, per_tensor)
    # (the coefficient: fp64 norms, off by SUM_RTOL at most; then rounded to opmath with the move)
    bounds = [(ULPS * UNIT[g.dtype] + SUM_RTOL) * abs(c) * v.double().abs() + ULPS * UNIT[g.dtype] * g.double().abs()
              for g, v, c in zip(before, orthogonals, coefficients)]
    assert_within(grads, expected, bounds, "grad after add_orthogonal_")
    return bounds, before


def reuse_lists(shapes, dtypes, seed):
    """(params, backups, grads) of a LookSAM reuse step: θ of order 1, Δ = params − θ of order 0.3 and a gradient
    with a component 3·Δ along it (c ≈ 3), all rounded to each dtype."""
    theta, noise = make_lists(shapes, dtypes, seed, param_scale=1.0)
    step = make_lists(shapes, dtypes, seed + 1, param_scale=0.3)[0]
    params = [(t.double() + s.double()).to(t.dtype) for t, s in zip(theta, step)]
    grads = [(n.double() + 3.0 * (p.double() - t.double())).to(t.dtype) for n, p, t in zip(noise, params, theta)]
    return params, theta, grads


def nan_with_payload(dtype):
    """A NaN whose bits a conversion to fp32 and back would not keep (a payload; fp16/bf16: signalling)."""
    integer = {8: torch.int64, 4: torch.int32, 2: torch.int16}[dtype.itemsize]
    pattern = {torch.float64: 0x7FF8DEAD0000BEEF, torch.float32: 0x7FC0BEEF, torch.float16: 0x7C0F,
               torch.bfloat16: 0x7F8F}[dtype]
    value = torch.tensor([pattern], dtype=integer).view(dtype)
    assert value.isnan().all()
    return value.to(DEVICE)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_norms_on_vector_groups_and_chunks(cuda_backend, dtype):
    """Every remainder of the vector groups, chunk edges, 0-d and empty tensors and a tensor of 32 blocks; values
    whose squares overflow fp32 (fp32 and bf16 only: each square is taken in fp64) stay finite."""
    tensors = make_lists(EDGE_SHAPES, dtype, seed=60)[1]
    check_norms(tensors)
    if dtype in (torch.float32, torch.bfloat16):
        big = [(t.double() * 1e30).to(dtype) for t in tensors]
        norms = check_norms(big)
        assert norms[-1].item() > 1e30 and math.isfinite(norms[-1].item())


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_orthogonal_on_vector_groups_and_chunks(cuda_backend, dtype, per_tensor):
    """orthogonals ← g − c·Δ on every remainder of the vector groups, chunk edges, 0-d and empty tensors and a
    tensor of 32 blocks (the apply pass: four lists), params ← θ bit for bit; the removed part c·Δ is far larger
    than the error allowed, and what is left is orthogonal to Δ."""
    params, theta, grads = reuse_lists(EDGE_SHAPES, dtype, seed=61)
    orthogonals, bounds, expected = check_restore_orthogonal(params, clones(theta), grads, per_tensor)
    assert moved(orthogonals, grads) > 10 * bound_norm(bounds)
    if per_tensor:
        assert all(c != 0.0 for c, g in zip(expected.coefficients, grads) if g.numel() > 8)
    else:
        dot = math.fsum(float((d * o.double()).sum()) for d, o in zip(expected.deltas, orthogonals))
        scale = math.fsum(float((d * g.double()).abs().sum()) for d, g in zip(expected.deltas, grads))
        assert abs(dot) < 1e-2 * scale


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_add_orthogonal_on_vector_groups_and_chunks(cuda_backend, dtype, per_tensor):
    """grads ← g + α·(‖g‖/‖v‖)·v on every remainder of the vector groups, chunk edges, 0-d and empty tensors (0
    elements: coef 0/0, not finite, so nothing is added) and a tensor of 32 blocks."""
    orthogonals, grads = make_lists(EDGE_SHAPES, dtype, seed=62, param_scale=0.3)
    bounds, before = check_add_orthogonal(grads, orthogonals, 0.7, per_tensor)
    assert moved(grads, before) > 10 * bound_norm(bounds)


@needs_gpu
@pytest.mark.cuda
def test_gradient_reuse_over_many_launches(cuda_backend, launch_limits):
    """More tensors than a table holds at any depth (the apply pass of restore_orthogonal_: depth 4) and than one
    launch of the per-tensor sums covers, mixed dtypes (one group per dtype), and a tensor whose chunks straddle
    two launches; per tensor and global."""
    chunk, max_blocks = launch_limits["chunk"], launch_limits["max_blocks"]
    count = max(max(launch_limits["max_tensors"].values()) + 40, launch_limits["sum_tensors"] + 7)
    gen = torch.Generator().manual_seed(63)
    shapes = [(int(torch.randint(1, 3 * chunk // 2, (1,), generator=gen)),) for _ in range(count)]
    shapes[count // 3] = ((max_blocks + 3) * chunk + 5,)
    dtypes = [{3: torch.bfloat16, 4: torch.float16, 5: torch.float64}.get(i % 6, torch.float32) for i in range(count)]
    assert count > launch_limits["sum_tensors"] and -(-shapes[count // 3][0] // chunk) > max_blocks
    params, theta, grads = reuse_lists(shapes, dtypes, seed=64)
    check_norms(grads)
    for per_tensor in (True, False):
        p = clones(params)
        orthogonals, bounds, _ = check_restore_orthogonal(p, clones(theta), grads, per_tensor)
        assert moved(orthogonals, grads) > 10 * bound_norm(bounds)
        g = clones(grads)
        bounds, before = check_add_orthogonal(g, orthogonals, 0.5, per_tensor)
        assert moved(g, before) > 10 * bound_norm(bounds)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_gradient_reuse_bitwise_deterministic_and_alignment_independent(cuda_backend, dtype):
    """norms, restore_orthogonal_ and add_orthogonal_ repeated, and on storage one element off alignment (scalar
    instead of vector accesses): bitwise the same results."""
    shapes = [(5 * CHUNK + 7,), (CHUNK,), (123,), (2_000_003,)]
    params, theta, grads = reuse_lists(shapes, dtype, seed=65)
    for per_tensor in (True, False):
        runs = []
        for layout in (clones, clones, lambda ts: [unaligned_copy(t) for t in ts]):
            p, b, g = layout(params), layout(theta), layout(grads)
            o = layout([torch.empty_like(t) for t in grads])
            norms = cuda_backend.norms(g)
            cuda_backend.restore_orthogonal_(p, b, g, o, per_tensor)
            cuda_backend.add_orthogonal_(g, o, 0.5, per_tensor)
            runs.append([norms] + p + o + g)
        for other in runs[1:]:
            assert_bitwise_equal(other, runs[0])


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_orthogonal_leaves_g_bitwise_where_c_is_zero(cuda_backend, dtype):
    """c = 0, and orthogonals are g bit for bit (a NaN payload included): a NaN in g (that tensor per tensor, every
    tensor global), an Inf in Δ (‖Δ‖² Inf: c not finite), Δ = 0; params are θ bit for bit every time."""
    shapes = [(CHUNK + 5,), (37,), (3, 4)]
    params, theta, grads = reuse_lists(shapes, dtype, seed=66)
    grads[0].view(-1)[CHUNK + 2:CHUNK + 3] = nan_with_payload(dtype)
    for per_tensor in (True, False):
        p, o = clones(params), [torch.zeros_like(g) for g in grads]
        cuda_backend.restore_orthogonal_(p, theta, grads, o, per_tensor)
        assert_bitwise_equal(p, theta, "param")
        kept = 1 if per_tensor else len(grads)
        assert_bitwise_equal(o[:kept], grads[:kept], "orthogonal")
        if per_tensor:
            assert moved(o[1:], grads[1:]) > 0.1
    params, theta, grads = reuse_lists(shapes, dtype, seed=67)
    params[1].view(-1)[5] = math.inf
    p, o = clones(params), [torch.zeros_like(g) for g in grads]
    cuda_backend.restore_orthogonal_(p, theta, grads, o, True)
    assert_bitwise_equal(p, theta, "param")
    assert_bitwise_equal(o[1:2], grads[1:2], "orthogonal")
    assert moved(o[:1], grads[:1]) > 0.1
    for per_tensor in (True, False):  # Δ = 0 everywhere
        p, o = clones(theta), [torch.zeros_like(g) for g in grads]
        cuda_backend.restore_orthogonal_(p, theta, grads, o, per_tensor)
        assert_bitwise_equal(p + o, theta + grads)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_add_orthogonal_leaves_grads_bitwise_where_coef_is_zero(cuda_backend, dtype):
    """coef = 0 or not finite, and grads stay bit for bit: a NaN or an Inf in v (that tensor per tensor, every
    tensor global), v = 0, α = 0, and a NaN in g (kept for GradScaler to see)."""
    shapes = [(CHUNK + 5,), (37,), (3, 4)]
    orthogonals, grads = make_lists(shapes, dtype, seed=68, param_scale=0.3)
    for bad in (math.nan, math.inf, -math.inf):
        v = clones(orthogonals)
        v[0].view(-1)[CHUNK + 1] = bad
        for per_tensor in (True, False):
            g = clones(grads)
            cuda_backend.add_orthogonal_(g, v, 0.5, per_tensor)
            kept = 1 if per_tensor else len(grads)
            assert_bitwise_equal(g[:kept], grads[:kept], "grad")
            if per_tensor:
                assert moved(g[1:], grads[1:]) > 0.1
    zeros = [torch.zeros_like(v) for v in orthogonals]
    for v, alpha in ((zeros, 0.5), (orthogonals, 0.0)):
        for per_tensor in (True, False):
            g = clones(grads)
            cuda_backend.add_orthogonal_(g, v, alpha, per_tensor)
            assert_bitwise_equal(g, grads, "grad")
    g = clones(grads)
    g[2].view(-1)[3:4] = nan_with_payload(dtype)
    saved = clones(g)
    cuda_backend.add_orthogonal_(g, orthogonals, 0.5, True)
    assert_bitwise_equal(g[2:], saved[2:], "grad")
    assert moved(g[:2], saved[:2]) > 0.1
    saved = clones(g)
    cuda_backend.add_orthogonal_(g, orthogonals, 0.5, False)  # ‖g‖ over all tensors is NaN
    assert_bitwise_equal(g, saved, "grad")


@needs_gpu
@pytest.mark.cuda
def test_gradient_reuse_without_host_sync_and_op_count_independent_of_tensor_count(cuda_backend):
    counts = {}
    for count in (1, 20, 300):
        params, theta, grads = reuse_lists([(1000 + i,) for i in range(count)], torch.float32, seed=count)
        orthogonals = [torch.empty_like(g) for g in grads]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
        try:
            with OpLog() as log:
                cuda_backend.norms(grads)
                cuda_backend.restore_orthogonal_(params, theta, grads, orthogonals, True)
                cuda_backend.restore_orthogonal_(params, theta, grads, orthogonals, False)
                cuda_backend.add_orthogonal_(grads, orthogonals, 0.5, True)
                cuda_backend.add_orthogonal_(grads, orthogonals, 0.5, False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert not any("_local_scalar_dense" in op for op in log.ops), log.ops
        counts[count] = log.ops
    assert counts[1] == counts[20] == counts[300], counts
    assert len(counts[300]) == 5  # one dispatched op per call


@needs_gpu
@pytest.mark.cuda
def test_gradient_reuse_capturable_in_a_cuda_graph(cuda_backend):
    """The three ops replay from a CUDA graph: bitwise what eager calls give on the new values."""
    shapes = [(CHUNK + 3,), (77,), (3, 5)]
    params, theta, grads = reuse_lists(shapes, torch.float32, seed=69)
    orthogonals = [torch.empty_like(g) for g in grads]

    def reuse(p, b, g, o):
        norms = cuda_backend.norms(g)
        cuda_backend.restore_orthogonal_(p, b, g, o, True)
        cuda_backend.add_orthogonal_(g, o, 0.5, False)
        return norms

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        reuse(clones(params), theta, clones(grads), clones(orthogonals))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norms = reuse(params, theta, grads, orthogonals)
    new_params, new_theta, new_grads = reuse_lists(shapes, torch.float32, seed=70)
    for dst, src in zip(params + theta + grads, new_params + new_theta + new_grads):
        dst.copy_(src)
    graph.replay()
    eager = [clones(new_params), clones(new_theta), clones(new_grads), [torch.empty_like(g) for g in grads]]
    eager_norms = reuse(*eager)
    torch.cuda.synchronize()
    assert_bitwise_equal([norms] + params + grads + orthogonals, [eager_norms] + eager[0] + eager[2] + eager[3])
    assert_bitwise_equal(params, new_theta)


# -- the kernels' own checks -------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.cuda
def test_nesterov_needs_momentum_and_no_dampening(cuda_backend):
    """torch.optim.SGD's rule, checked by the kernel itself (the op layer leaves it to the base optimizer)."""
    params, grads = make_lists([(CHUNK + 1,), (12,)], torch.float32, seed=19)
    backups, buffers = [torch.full_like(p, 7.0) for p in params], [torch.full_like(p, 3.0) for p in params]
    saved = clones(params), clones(backups), clones(buffers)
    for momentum, dampening in ((0.9, 0.1), (0.0, 0.0)):
        with pytest.raises(ValueError, match=r"nesterov needs momentum > 0 and dampening == 0"):
            torch.ops.amp_fused.restore_sgd_(params, backups, grads, buffers, 0.1, momentum, dampening, 0.0, True,
                                             False, False)
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
