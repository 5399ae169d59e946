"""The program map, the metadata cache, and the number of kernel launches per optimizer step."""
import pytest
import torch

import amp_fused
from amp_fused.backends import foreach
from amp_fused.backends import triton as triton_backend
from amp_fused.triton import metadata, ops
from amp_fused.triton.metadata import CHUNK, MetadataCache, build_layout, spec_of
from triton_cases import (BACKEND_TOL, MIXED_DTYPE_CASE, assert_lists_close, clone, make_lists, recorded_launches)


def test_program_map_covers_every_element_once():
    tensors = [torch.empty(size, dtype=dtype) for dtype, size in MIXED_DTYPE_CASE] + [torch.empty(0)]
    layout = build_layout(spec_of(tensors), torch.device("cpu"))
    prog_tensor, prog_offset = layout.prog_tensor.tolist(), layout.prog_offset.tolist()
    numels = [t.numel() for t in tensors]
    assert layout.numels.tolist() == numels
    assert layout.num_programs == len(prog_tensor) == sum(-(-n // CHUNK) for n in numels)
    assert layout.max_chunks == max(-(-n // CHUNK) for n in numels)

    # Every tensor's chunks, each exactly once, on consecutive programs starting at first_prog.
    for t, numel in enumerate(numels):
        mine = [pid for pid, owner in enumerate(prog_tensor) if owner == t]
        assert [prog_offset[pid] for pid in mine] == list(range(0, numel, CHUNK))
        assert layout.n_chunks[t].item() == len(mine)
        if mine:
            assert mine == list(range(mine[0], mine[0] + len(mine)))
            assert layout.first_prog[t].item() == mine[0]

    # Dtype groups: in order of first appearance, contiguous, each holding only its dtype's tensors.
    expected_order = list(dict.fromkeys(t.dtype for t in tensors))
    assert [g.dtype for g in layout.groups] == expected_order
    base = 0
    for group in layout.groups:
        assert group.prog_base == base
        owners = prog_tensor[base:base + group.num_programs]
        assert all(tensors[t].dtype == group.dtype for t in owners)
        assert owners == sorted(owners)  # a group keeps the list's order
        base += group.num_programs
    assert base == layout.num_programs


@pytest.mark.parametrize("shape, stride, dense", [
    ((4, 5), (5, 1), True),
    ((4, 5), (1, 4), True),  # transposed
    ((2, 3, 4), (12, 1, 3), True),  # channels-last-like permutation
    ((4, 1, 5), (5, 99, 1), True),  # a size-1 dim's stride is irrelevant
    ((4, 5), (10, 1), False),  # every other row
    ((4, 5), (5, 2), False),
    ((4, 5), (0, 1), False),  # expanded: overlapping
    ((0, 5), (5, 1), True),
    ((), (), True),
])
def test_dense_check(shape, stride, dense):
    assert metadata._is_dense(torch.Size(shape), stride) is dense


@pytest.fixture
def fresh_cache(monkeypatch):
    cache = MetadataCache()
    monkeypatch.setattr(ops, "CACHE", cache)
    return cache


def test_metadata_built_once_and_rebuilt_only_on_change(fresh_cache):
    sizes = [(CHUNK + 5,), (7,), (3, 5)]
    params, grads, backups = make_lists(sizes)
    buffers = [torch.empty_like(p) for p in params]
    for first in (True, False, False):
        triton_backend.perturb_(params, grads, backups, 1.0, 1.0, True, first)
    triton_backend.restore_sgd_(params, backups, grads, buffers, 0.1, 0.9, 0.0, 0.0, False, False, True)
    triton_backend.restore_(params, backups)
    assert fresh_cache.layout_builds == 1
    assert fresh_cache.pointer_table_builds == 4  # params, grads, backups, momentum buffers

    # A gradient replaced by a new tensor (as after zero_grad(set_to_none=True)): only its table is rebuilt,
    # and the kernels read the new tensor.
    grads[1] = torch.randn(7) * 100
    foreach_params, foreach_backups = clone(params), clone(backups)
    triton_backend.perturb_(params, grads, backups, 1.0, 1.0, True, False)
    foreach.perturb_(foreach_params, grads, foreach_backups, 1.0, 1.0, True, False)
    assert_lists_close(params, foreach_params, **BACKEND_TOL[torch.float32])
    assert (fresh_cache.layout_builds, fresh_cache.pointer_table_builds) == (1, 5)

    # A new shape or dtype: a new layout (and new tables, the tensors being new).
    for replacement in (torch.randn(9), torch.randn(7, dtype=torch.float64)):
        params[1], grads[1], backups[1] = replacement, torch.randn_like(replacement), torch.empty_like(replacement)
        builds = fresh_cache.layout_builds
        triton_backend.perturb_(params, grads, backups, 1.0, 1.0, True, True)
        triton_backend.perturb_(params, grads, backups, 1.0, 1.0, True, False)
        assert fresh_cache.layout_builds == builds + 1


def test_metadata_cache_is_bounded():
    cache = MetadataCache(max_layouts=2, max_pointer_tables=2)
    lists = [[torch.empty(n)] for n in (3, 4, 5)]
    device = torch.device("cpu")
    for tensors in lists + lists[:1]:  # the first layout was evicted by the third, so it is built again
        cache.layout(spec_of(tensors), device)
        cache.pointer_table(tensors, device, "params")
    assert (cache.layout_builds, cache.pointer_table_builds) == (4, 4)
    assert len(cache._layouts) == 2 and len(cache._tables) == 2


def _amp_step_launches(num_tensors, dtypes=(torch.float32,)):
    gen = torch.Generator().manual_seed(num_tensors)
    params = [torch.nn.Parameter(torch.randn(8, generator=gen).to(dtypes[i % len(dtypes)])) for i in range(num_tensors)]
    targets = [torch.randn(8, generator=gen).to(p.dtype) for p in params]
    before = [p.detach().clone() for p in params]
    optimizer = amp_fused.AMP(params, lr=0.1, epsilon=0.5, momentum=0.9, backend="triton")

    def closure():
        loss = sum(((p - t) ** 2).sum().float() for p, t in zip(params, targets))
        loss.backward()
        return loss

    with recorded_launches() as launches:
        optimizer.step(closure)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before)), "every tensor must have been stepped"
    return launches


def test_launches_per_optimizer_step_do_not_depend_on_the_tensor_count():
    counts = {}
    for n in (10, 100):
        launches = _amp_step_launches(n)
        counts[n] = len(launches)
        # every per-tensor pass is one launch over all n tensors (one 8-element chunk, one program each)
        assert all(grid == (n,) for name, _, _, grid in launches if name != "perturb_scale_kernel")
    assert counts[10] == counts[100] <= 4
    assert [name for name, *_ in _amp_step_launches(3)] == [
        "perturb_sumsq_kernel", "perturb_scale_kernel", "perturb_apply_kernel", "restore_sgd_kernel"]


def test_launches_with_mixed_dtypes_are_per_dtype_group():
    launches = _amp_step_launches(12, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    names = [name for name, *_ in launches]
    # 3 groups: sums of squares and apply once per group, one scale pass, the SGD step once per group
    assert names == ["perturb_sumsq_kernel"] * 3 + ["perturb_scale_kernel"] + ["perturb_apply_kernel"] * 3 + [
        "restore_sgd_kernel"] * 3
