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
    part = plans.current(opt._amp, opt.param_groups, lambda p: p.grad is not None).parts[0]
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
