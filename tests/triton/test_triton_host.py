"""The host side of the Triton backend (issue 12): the tables a plan holds, the scale pass's per-block trip
counts, and per-tensor alignment, under Triton's interpreter on CPU tensors."""
import copy
import math
import pickle

import pytest
import torch
import triton.language as tl

import amp_fused
from amp_fused import plan as plans
from amp_fused.backends import foreach
from amp_fused.backends import triton as triton_backend
from amp_fused.triton import metadata, ops
from amp_fused.triton.metadata import CHUNK, SCALE_T_BLOCK, MetadataCache, build_layout
from op_definition import ascent_bounds, assert_within, bound_norm, moved, norm_bounds, perturb
from triton_cases import (BACKEND_TOL, DTYPES, assert_lists_bitwise_equal, assert_lists_close, clone, make_lists)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")
SPARSE_MESSAGE = r"sparse gradients \(e\.g\. nn\.Embedding\(sparse=True\)\) are not supported"


@pytest.fixture
def fresh_cache(monkeypatch):
    cache = MetadataCache()
    monkeypatch.setattr(ops, "CACHE", cache)
    return cache


# -- 1. tables held by the plan ------------------------------------------------------------------------------------
def test_held_lists_rebuild_only_the_tables_whose_addresses_changed(fresh_cache):
    sizes = [(CHUNK + 5,), (7,), (3, 5)]
    params, grads, backups = make_lists(sizes)
    held = triton_backend.hold(params, backups)
    assert (fresh_cache.layout_builds, fresh_cache.pointer_table_builds) == (1, 2)  # params and backups, once
    reference_params, reference_backups = clone(params), clone(backups)
    for step in range(3):
        # New gradients each step, the old ones still alive (so their addresses must differ): as after
        # zero_grad(set_to_none=True), the kernels must read the new ones.
        grads = [torch.randn_like(p) * (step + 1) for p in params]
        builds = fresh_cache.pointer_table_builds
        norms = triton_backend.perturb_(held, grads, backups, 0.5, 1.0, True, step == 0)
        expected = foreach.perturb_(reference_params, grads, reference_backups, 0.5, 1.0, True, step == 0)
        torch.testing.assert_close(norms, expected, rtol=2e-5, atol=1e-6)
        assert_lists_close(list(held), reference_params, **BACKEND_TOL[torch.float32])
        assert fresh_cache.pointer_table_builds == builds + 1  # the gradients' table only
        triton_backend.perturb_(held, grads, backups, 0.5, 1.0, True, False)  # same addresses: no build
        foreach.perturb_(reference_params, grads, reference_backups, 0.5, 1.0, True, False)
        assert fresh_cache.pointer_table_builds == builds + 1
    assert fresh_cache.layout_builds == 1


def test_held_lists_are_plain_tuples_when_copied():
    params, _, backups = make_lists([(5,)])
    held = triton_backend.hold(params, backups)
    assert isinstance(held, tuple) and hasattr(held, "held")
    for copied in (copy.deepcopy(held), pickle.loads(pickle.dumps(held)), copy.copy(held)):
        assert type(copied) is tuple and not hasattr(copied, "held")


def _optimizer(backend, **kwargs):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (CHUNK + 3, 17, 5)]
    return params, amp_fused.AMP(params, lr=0.1, epsilon=0.5, momentum=0.9, backend=backend, **kwargs)


def _closure(params, scale=1.0):
    def closure():
        loss = sum((p * p).sum() * (i + 1) * scale for i, p in enumerate(params))
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_the_optimizer_builds_one_layout_per_plan_and_matches_foreach(fresh_cache, norm):
    params, opt = _optimizer("triton", norm=norm)
    reference, reference_opt = _optimizer("foreach", norm=norm)
    for step in range(3):
        opt.step(_closure(params, step + 1))
        reference_opt.step(_closure(reference, step + 1))
    assert_lists_close(params, reference, **BACKEND_TOL[torch.float32])
    if norm == "per_tensor":
        assert fresh_cache.layout_builds == 1  # the plan's, built once; a step checks addresses only
        assert type(opt._amp.plan.parts[0].views) is metadata.HeldTensors


def test_the_plans_gradient_check_keeps_the_contract_errors():
    """The plan's per-step check compares dtypes, sizes and devices directly for real contiguous parameters;
    a gradient that does not fit still gets the contract's error, before anything is written."""
    params, opt = _optimizer("triton")
    opt.step(_closure(params))
    before = clone([p.detach() for p in params])
    part = opt._amp.plan.parts[0]
    assert part.plain is not None
    if not hasattr(params[1], "grad_dtype"):
        pytest.skip("this torch has no Tensor.grad_dtype: a .grad of another dtype cannot be assigned")
    _closure(params)()
    params[1].grad_dtype = None  # lets a gradient of another dtype be assigned
    params[1].grad = params[1].grad.double()
    with pytest.raises(ValueError, match=r"grads\[1\] has dtype torch.float64 but params\[1\] has dtype "
                                         r"torch.float32"):
        opt.first_step()
    assert_lists_bitwise_equal([p.detach() for p in params], before)
    params[1].grad = None
    params[1].grad_dtype = torch.float32
    params[1].grad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (17,))
    with pytest.raises(TypeError, match=SPARSE_MESSAGE):
        opt.first_step()
    assert_lists_bitwise_equal([p.detach() for p in params], before)


def test_the_plans_gradient_check_takes_what_the_contract_check_takes():
    params, opt = _optimizer("triton")
    _closure(params)()
    part = opt._plan(lambda p: p.grad is not None).parts[0]
    grads = plans.gradients(part)
    assert all(g is p.grad for g, p in zip(grads, params))  # the fast path: the gradients as they are
    params[2].grad = None
    grads = plans.gradients(part)  # the general path: a missing gradient is zeros
    assert grads[2].shape == params[2].shape and not grads[2].any()


# -- 3. the scale pass's trip count per block of tensors ----------------------------------------------------------
def _spec(numels):
    return tuple((torch.float32, torch.Size([n]), (1,)) for n in numels)


HUGE = 50_000_000  # an embedding's worth: 12,208 chunks


@pytest.mark.parametrize("huge_at", [0, SCALE_T_BLOCK + 3])
def test_layout_holds_each_blocks_own_largest_chunk_count(huge_at):
    numels = [1 + (i * 977) % (3 * CHUNK) for i in range(3 * SCALE_T_BLOCK + 5)]
    numels[huge_at] = HUGE
    layout = build_layout(_spec(numels), torch.device("cpu"))
    chunks = [-(-n // CHUNK) for n in numels]
    expected = [max(chunks[b:b + SCALE_T_BLOCK]) for b in range(0, len(numels), SCALE_T_BLOCK)]
    assert layout.block_chunks.tolist() == expected
    assert layout.max_chunks == max(expected) == -(-HUGE // CHUNK)
    assert sorted(expected)[-2] <= 3  # every other block loops a few times, not 12,208


def _scale_pass(layout, partials, block_chunks, per_tensor=True):
    norms = torch.empty(layout.num_tensors + 1, dtype=torch.float32)
    scales = torch.empty(layout.num_tensors, dtype=torch.float64)
    ops.kernels().perturb_scale_kernel[(1,)](
        partials, layout.first_prog, layout.n_chunks, block_chunks, norms, scales, layout.num_tensors, 1.0,
        PER_TENSOR=per_tensor, ACC=tl.float64, T_BLOCK=SCALE_T_BLOCK, C_BLOCK=ops.SCALE_C_BLOCK,
        num_warps=ops.SCALE_NUM_WARPS)
    return norms


def test_scale_pass_loops_each_block_to_its_own_bound():
    """Partial sums of 1 per program make tensor t's norm sqrt(chunks of t). With the layout's bounds every
    norm is right; with block 1's bound set to 0 its tensors alone sum nothing: the pass reads its trip
    count per block from the layout."""
    numels = [HUGE] + [1 + (i * 977) % (3 * CHUNK) for i in range(2 * SCALE_T_BLOCK)]
    layout = build_layout(_spec(numels), torch.device("cpu"))
    chunks = torch.tensor([-(-n // CHUNK) for n in numels], dtype=torch.float64)
    partials = torch.ones(layout.num_programs, dtype=torch.float64)
    norms = _scale_pass(layout, partials, layout.block_chunks)
    torch.testing.assert_close(norms[:-1], chunks.sqrt().float(), rtol=0, atol=0)
    assert norms[-1].item() == pytest.approx(math.sqrt(chunks.sum().item()), rel=1e-6)

    poisoned = layout.block_chunks.clone()
    poisoned[1] = 0
    norms = _scale_pass(layout, partials, poisoned)
    in_block_1 = slice(SCALE_T_BLOCK, 2 * SCALE_T_BLOCK)
    assert (norms[in_block_1] == 0).all()
    torch.testing.assert_close(norms[:SCALE_T_BLOCK], chunks[:SCALE_T_BLOCK].sqrt().float(), rtol=0, atol=0)
    torch.testing.assert_close(norms[2 * SCALE_T_BLOCK:-1], chunks[2 * SCALE_T_BLOCK:].sqrt().float(), rtol=0,
                               atol=0)


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "global"])
def test_norms_with_a_large_tensor_in_a_later_block(per_tensor):
    """Real data through all three passes: a tensor of more chunks than one C_BLOCK in the second block of
    tensors, small ones around it."""
    sizes = [(3 + i % 5,) for i in range(SCALE_T_BLOCK + 4)] + [((ops.SCALE_C_BLOCK + 2) * CHUNK + 7,)] + [(9,)] * 3
    params, grads, backups = make_lists(sizes, torch.float32)
    theta = clone(params)
    norms = triton_backend.perturb_(params, grads, backups, 3.0, 1.0, per_tensor, True)
    expected = perturb(theta, grads, None, 3.0, 1.0, per_tensor, True)
    assert_within([norms], [expected.norms.float()], [norm_bounds(expected, torch.float32)], "norms")
    bounds = ascent_bounds(expected, torch.float32, per_tensor)
    assert_within(params, expected.params, bounds)
    assert moved(params, theta) > 10 * bound_norm(bounds)


# -- 4. alignment per tensor ----------------------------------------------------------------------------------------
def _unaligned(t):
    """A copy of ``t`` that starts one element into its buffer (so not at a multiple of 16 bytes)."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    assert view.data_ptr() % 16
    return view.copy_(t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_list_mixing_aligned_and_unaligned_views_gives_the_aligned_lists_results(dtype):
    """Full chunks of aligned tensors take the vector path, of unaligned ones the plain path, in one launch;
    the results are bitwise those of the same values in aligned tensors. (Under the interpreter a tensor sent
    down the aligned path when it is not reads from the wrong address: see kernels._pointer.)"""
    sizes = [(2 * CHUNK + 5,), (CHUNK + 3,), (2 * CHUNK,), (CHUNK,), (7,), (CHUNK + 1,)]
    params, grads, backups = make_lists(sizes, dtype)
    buffers = [torch.randn_like(p) for p in params]
    # tensor 1: every list unaligned; tensor 3: only its gradient; tensor 5: only its parameter
    mixed = [clone(x) for x in (params, grads, backups, buffers)]
    for lst in mixed:
        lst[1] = _unaligned(lst[1])
    mixed[1][3] = _unaligned(mixed[1][3])
    mixed[0][5] = _unaligned(mixed[0][5])
    aligned = [clone(x) for x in (params, grads, backups, buffers)]
    assert all(t.data_ptr() % 16 == 0 for lst in aligned for t in lst)

    for p, g, b, m in (mixed, aligned):
        for first in (True, False):
            triton_backend.perturb_(p, g, b, 30.0, 1.0, True, first)
        triton_backend.restore_sgd_(p, b, g, m, 0.1, 0.9, 0.1, 0.01, True, False, False)
        triton_backend.perturb_(p, g, b, 30.0, 1.0, True, True)
        triton_backend.restore_(p, b)
    for got, want in zip(mixed, aligned):
        assert_lists_bitwise_equal(got, want)


# -- 5. the per-call passes: C++ (amp_fused._C) and the Python fallback alike -------------------------------------
@pytest.fixture(params=["native", "python"])
def host_path(request, monkeypatch):
    """Runs a test once with the C++ passes of amp_fused._C (where it is loaded) and once with the pure-Python path
    the backend takes without the extension."""
    if request.param == "native":
        module = metadata.native()
        if module is None:
            pytest.skip(f"amp_fused._C is not loaded or lacks the host helpers {metadata.NATIVE_HELPERS}")
        monkeypatch.setattr(metadata, "_native", module)
    else:
        monkeypatch.setattr(metadata, "_native", None)
    return request.param


class _Traced(torch.Tensor):
    """A tensor subclass with its own __torch_function__: Tensor.data_ptr() goes through it."""

    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def _table(tensors):
    return metadata.build_pointer_table(tensors, torch.device("cpu"), "grads")


def test_same_addresses_answers_alike_on_both_paths(host_path):
    tensors = [torch.randn(5), torch.randn(3, 4), torch.randn(())]
    table = _table(tensors)
    assert metadata.same_addresses(tensors, table) is True
    assert metadata.same_addresses(tuple(tensors), table) is True
    assert metadata.same_addresses(triton_backend.hold(tensors, clone(tensors)), table) is True  # a HeldTensors
    assert metadata.same_addresses([tensors[0], torch.randn(3, 4), tensors[2]], table) is False
    assert metadata.same_addresses(tensors[:2], table) is False
    assert metadata.same_addresses(tensors + [torch.randn(1)], table) is False
    assert metadata.same_addresses([], _table([])) is True
    assert metadata.same_addresses(tensors, _table([])) is False
    assert metadata.same_addresses([tensors[0][1:], tensors[1], tensors[2]], table) is False  # a view inside
    # Parameters are plain tensors to the C++ pass; subclasses and an iterable that is no list or tuple are the
    # Python path's (which goes through __torch_function__)
    params = [torch.nn.Parameter(t) for t in tensors]
    assert metadata.same_addresses(params, table) is True
    _Traced.calls = 0
    traced = [t.as_subclass(_Traced) for t in tensors]
    assert metadata.same_addresses(traced, table) is True
    assert _Traced.calls >= len(tensors)
    assert metadata.same_addresses(iter(tensors), table) is True


def test_same_addresses_in_cpp_leaves_to_python_what_python_must_answer():
    module = metadata.native()
    if module is None:
        pytest.skip("amp_fused._C is not loaded or lacks the host helpers")
    tensors = [torch.randn(5), torch.randn(7)]
    table = _table(tensors)
    assert module.same_addresses(tensors, table.host) is True
    assert module.same_addresses(tensors[::-1], table.host) is False
    assert module.same_addresses([tensors[0]], table.host) is False
    assert module.same_addresses([tensors[0], tensors[1].as_subclass(_Traced)], table.host) is None
    assert module.same_addresses(iter(tensors), table.host) is None
    assert module.same_addresses([tensors[0], 3], table.host) is None
    sparse = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (7,))
    assert module.same_addresses([tensors[0], sparse], table.host) is None  # data_ptr() raises: Python raises it
    with pytest.raises(RuntimeError, match="doesn't have storage"):
        metadata.same_addresses([tensors[0], sparse], table)

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert module.same_addresses(tensors, table.host) is None
    with pytest.raises(RuntimeError, match="int64 CPU tensor"):
        module.same_addresses(tensors, table.host.int())


def test_bump_versions_bumps_alike_on_both_paths(host_path):
    a, b = [torch.randn(3), torch.randn(2, 2)], (torch.randn(4),)
    params = [torch.nn.Parameter(torch.randn(3))]
    traced = [torch.randn(2).as_subclass(_Traced)]
    with torch.inference_mode():
        inference = [torch.randn(3)]
    everything = a + list(b) + params + traced + inference
    before = [t._version for t in everything[:-1]]
    metadata.bump_versions(a, b, params, traced, inference)  # inference tensors: no counter, no error
    metadata.bump_versions(a)
    metadata.bump_versions()
    assert [t._version for t in everything[:-1]] == [v + 1 + (i < len(a)) for i, v in enumerate(before)]


def test_bump_versions_of_a_list_with_a_non_tensor_raises_torchs_error_on_both_paths(host_path):
    a = [torch.randn(3)]
    b = [torch.randn(3), None]
    before = b[0]._version, a[0]._version
    with pytest.raises(RuntimeError, match="increment_version expects each element of the iterable to be a tensor"):
        metadata.bump_versions(a, b)
    # as torch's own call per list does: the lists before, and the tensors before the bad one, were bumped
    assert (b[0]._version, a[0]._version) == (before[0] + 1, before[1] + 1)


def _versions(*lists):
    return [[t._version for t in tensors] for tensors in lists]


def test_the_ops_bump_each_written_tensor_once_and_agree_bitwise_on_both_paths(fresh_cache, host_path):
    sizes = [(CHUNK + 5,), (7,), (3, 5)]
    results = {}
    for path in ("this", "python"):
        if path == "python":
            metadata._native = None  # the fixture's monkeypatch puts it back
        params, grads, backups = make_lists(sizes, seed=3)
        buffers = [torch.randn_like(p) for p in params]
        held = triton_backend.hold(params, backups)
        steps = []
        for first in (True, False):
            before = _versions(params, backups, grads)
            triton_backend.perturb_(held, grads, backups, 0.5, 1.0, True, first)
            steps.append([[a - b for a, b in zip(x, y)] for x, y in zip(_versions(params, backups, grads), before)])
        before = _versions(params, backups, grads, buffers)
        triton_backend.restore_sgd_(held, backups, grads, buffers, 0.1, 0.9, 0.0, 0.0, False, False, True)
        triton_backend.restore_sgd_(held, backups, grads, [], 0.1, 0.0, 0.0, 0.0, False, False, False)
        steps.append([[a - b for a, b in zip(x, y)] for x, y in zip(_versions(params, backups, grads, buffers), before)])
        triton_backend.perturb_(held, [g * 2 for g in grads], backups, 0.5, 1.0, True, True)  # new gradients
        before = _versions(params, backups)
        triton_backend.restore_(held, backups)
        steps.append([[a - b for a, b in zip(x, y)] for x, y in zip(_versions(params, backups), before)])
        results[path] = steps, clone(params), clone(buffers)
    n = len(sizes)
    assert results["this"][0] == [
        [[1] * n, [1] * n, [0] * n],  # perturb_(first): params and backups
        [[1] * n, [0] * n, [0] * n],  # perturb_: params
        [[2] * n, [0] * n, [0] * n, [1] * n],  # restore_sgd_ twice: params; with momentum, the buffers
        [[1] * n, [0] * n],  # restore_: params
    ]
    assert results["this"][0] == results["python"][0]
    assert_lists_bitwise_equal(results["this"][1], results["python"][1])
    assert_lists_bitwise_equal(results["this"][2], results["python"][2])


def test_a_tensor_saved_for_backward_and_overwritten_fails_backward_on_both_paths(host_path):
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(4)
    y = (w * x).sum()  # autograd saved x for w's gradient
    with torch.no_grad():
        held = triton_backend.hold([x], [torch.empty(4)])
        triton_backend.perturb_(held, [torch.randn(4)], held.held.backups, 0.1, 1.0, True, True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_held_tables_follow_new_addresses_on_both_paths(fresh_cache, host_path):
    """A gradient list at new addresses rebuilds its table, the same addresses do not, and the kernels read the
    new tensors, with the C++ comparison as with Python's."""
    sizes = [(CHUNK + 5,), (7,)]
    params, grads, backups = make_lists(sizes, seed=4)
    reference_params, reference_backups = clone(params), clone(backups)
    held = triton_backend.hold(params, backups)
    for step, new in enumerate([False, True, False, True]):
        if new:
            grads = [grads[0], torch.randn(7) * (step + 1)]
        builds = fresh_cache.pointer_table_builds
        norms = triton_backend.perturb_(held, grads, backups, 0.5, 1.0, True, step == 0)
        expected = foreach.perturb_(reference_params, grads, reference_backups, 0.5, 1.0, True, step == 0)
        torch.testing.assert_close(norms, expected, rtol=2e-5, atol=1e-6)
        assert_lists_close(list(held), reference_params, **BACKEND_TOL[torch.float32])
        assert fresh_cache.pointer_table_builds == builds + (new or step == 0)


def test_without_the_host_helpers_the_backend_takes_the_python_path(monkeypatch):
    """An amp_fused._C without the host helpers (an older build) is not used for them."""
    import sys
    import types

    from amp_fused import _extension

    _extension.cpu_error  # noqa: B018 - the real extension is looked at (and loaded) before it is hidden
    monkeypatch.setattr(metadata, "_native", metadata._UNSET)
    monkeypatch.setitem(sys.modules, "amp_fused._C", types.ModuleType("amp_fused._C"))
    assert metadata.native() is None
    params, grads, backups = make_lists([(5,)])
    before = params[0]._version
    triton_backend.perturb_(triton_backend.hold(params, backups), grads, backups, 0.5, 1.0, True, True)
    assert params[0]._version == before + 1


def _recent(tensors):
    return metadata.RecentLayout(None, metadata.spec_of(tensors), metadata.layout_signature(tensors))


def test_same_layout_answers_alike_on_both_paths(host_path):
    tensors = [torch.randn(5), torch.randn(3, 4), torch.randn(()), torch.randn(2, 3).t(), torch.empty(0, 2)]
    recent = _recent(tensors)
    assert (recent.signature is not None) == (host_path == "native")
    assert metadata.same_layout(tensors, recent) is True
    assert metadata.same_layout([t.clone() if t.is_contiguous() else t for t in tensors], recent) is True
    assert metadata.same_layout(tuple(tensors), recent) is True
    changed = [
        [torch.randn(5).double()] + tensors[1:],  # a dtype
        [torch.randn(6)] + tensors[1:],  # a size
        [torch.randn(5, 1)] + tensors[1:],  # a dim
        tensors[:3] + [torch.randn(2, 3).t().contiguous()] + tensors[4:],  # a stride
        tensors[:2] + [torch.randn(1)] + tensors[3:],  # a 0-d tensor for a 1-d one
        tensors[:-1],  # fewer
        tensors + [torch.randn(1)],  # more
        [],
    ]
    for other in changed:
        assert metadata.same_layout(other, recent) is False
    traced = [t.as_subclass(_Traced) for t in tensors]
    assert metadata.same_layout(traced, recent) is True  # the Python path's answer
    assert metadata.same_layout([], _recent([])) is True


def test_same_layout_in_cpp_leaves_to_python_what_python_must_answer():
    module = metadata.native()
    if module is None:
        pytest.skip("amp_fused._C is not loaded or lacks the host helpers")
    tensors = [torch.randn(5), torch.randn(3, 4)]
    signature = module.layout_signature(tensors)
    assert isinstance(signature, bytes) and module.same_layout(tensors, signature) is True
    assert module.same_layout(tensors[::-1], signature) is False
    assert module.same_layout(tensors, signature[:-8]) is False  # a cut signature never matches
    assert module.same_layout(tensors, signature + signature[-8:]) is False
    for other in ([tensors[0], tensors[1].as_subclass(_Traced)], iter(tensors), [tensors[0], 3]):
        assert module.layout_signature(other) is None
        assert module.same_layout(other, signature) is None
    with pytest.raises(RuntimeError, match="bytes"):
        module.same_layout(tensors, "not bytes")


@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_later_steps_build_no_layout_on_both_paths(fresh_cache, host_path, norm):
    """A plan's lists hold their layout; norm="global" passes one list of all parts' tensors, built anew each step,
    which the cache answers with the layout it returned last."""
    params, opt = _optimizer("triton", norm=norm)
    reference, reference_opt = _optimizer("foreach", norm=norm)
    opt.step(_closure(params))
    reference_opt.step(_closure(reference))
    builds = fresh_cache.layout_builds
    assert builds == (1 if norm == "per_tensor" else 2)
    for step in range(2):
        opt.step(_closure(params, step + 2))
        reference_opt.step(_closure(reference, step + 2))
    assert fresh_cache.layout_builds == builds
    assert_lists_close(params, reference, **BACKEND_TOL[torch.float32])


def test_calls_without_a_plan_reuse_the_last_layout_and_tables_on_both_paths(fresh_cache, host_path):
    sizes = [(CHUNK + 5,), (7,), (3, 5)]
    params, grads, backups = make_lists(sizes, seed=5)
    reference_params, reference_backups = clone(params), clone(backups)
    for step in range(3):
        # a new list of the same tensors each call, as a norm="global" step passes
        triton_backend.perturb_(list(params), list(grads), list(backups), 0.5, 1.0, False, step == 0)
        foreach.perturb_(reference_params, grads, reference_backups, 0.5, 1.0, False, step == 0)
        assert (fresh_cache.layout_builds, fresh_cache.pointer_table_builds) == (1, 3)
    assert_lists_close(params, reference_params, **BACKEND_TOL[torch.float32])
    grads[2] = torch.randn(3, 5)  # new addresses: that table only
    triton_backend.perturb_(params, grads, backups, 0.5, 1.0, False, False)
    assert (fresh_cache.layout_builds, fresh_cache.pointer_table_builds) == (1, 4)
    # another layout, then the first again: the keyed cache still holds it
    other = make_lists([(9,)], seed=6)
    triton_backend.perturb_(*other, 0.5, 1.0, False, True)
    triton_backend.perturb_(params, grads, backups, 0.5, 1.0, False, False)
    assert fresh_cache.layout_builds == 2
    fresh_cache.clear()
    triton_backend.perturb_(params, grads, backups, 0.5, 1.0, False, False)
    assert fresh_cache.layout_builds == 3
