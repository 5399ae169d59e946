"""What is specific to the CUDA kernels (backend "cuda", csrc/cuda): the built extension imports and registers
its kernels on a machine without a GPU; on a GPU, the launch geometry (4-wide vector groups, chunks, tensors of
many blocks, lists that fill several launch tables), results independent of alignment, no host syncs (also
under CUDA graph capture), the current stream, the tensors' device, the kernels' own check of nesterov, and
the AMP optimizer end to end.

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
from op_definition import (DTYPES, ascent_bounds, assert_bitwise_equal, assert_within, bits, bound_norm, clones,
                           dtype_id, empty_like, epsilon_for, moved, norm_bounds, perturb)

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device; none is visible")
DEVICE = torch.device("cuda")
OPS = ("perturb_", "restore_", "restore_sgd_")

# Elements per CUDA block (csrc/cuda/config.h), published by the extension; the fallback only places test
# sizes when the extension is missing, in which case the GPU tests fail on the backend check anyway.
CHUNK = getattr(sys.modules.get("amp_fused._C_cuda") if _extension.cuda_error is None else None, "CHUNK_SIZE",
                1 << 16)  # (reading cuda_error loads the extension: amp_fused loads it on first use)
# Sizes around 4-element groups and chunk boundaries, 0-d and empty tensors, and one of a couple of millions.
EDGE_SHAPES = [(1,), (3,), (4,), (5,), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2 * CHUNK + 3,), (), (0,), (2, 0, 3),
               (1_048_577, 2)]


@pytest.fixture
def cuda_backend():
    reason = fused.unavailable_reason()
    assert reason is None, f"the cuda backend is unavailable on a machine with a GPU: {reason}"
    return fused


# -- helpers ---------------------------------------------------------------------------------------------------
def make_lists(shapes, dtypes, seed, param_scale=0.01, device=None):
    """op_definition.make_lists on the GPU (or ``device``)."""
    return op_definition.make_lists(shapes, dtypes, seed, DEVICE if device is None else device, param_scale)


def check_ascent(params, grads, backups, theta, epsilon, inner_lr, per_tensor, first):
    """One perturb_ on the cuda backend against the definition; returns the error bounds it was held to."""
    dtypes = [p.dtype for p in params]
    before = clones(params)
    norms = functional.perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, backend="cuda")
    expected = perturb(before, grads, theta, epsilon, inner_lr, per_tensor, first)
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
                              chunk=ext.CHUNK_SIZE, cuda_error=_extension.cuda_error,
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


# -- launch geometry -------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_vector_groups_chunks_and_a_couple_of_million_values(cuda_backend, dtype, per_tensor):
    """Every remainder of the 4-wide vector groups, chunk edges and a tensor of 32 blocks, first and later ascent."""
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
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_tensors_device_not_the_current_one(cuda_backend):
    device = torch.device("cuda", 1)
    params, grads = make_lists([(CHUNK + 5,), (9,)], torch.float32, seed=18, device=device)
    backups = [torch.empty_like(p) for p in params]
    expected = perturb(params, grads, None, 5.0, 1.0, False, True)
    with torch.cuda.device(0):
        norms = cuda_backend.perturb_(params, grads, backups, 5.0, 1.0, False, True)
    assert norms.device == device
    assert_within(params, expected.params, ascent_bounds(expected, torch.float32, False))


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
