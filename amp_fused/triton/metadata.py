"""What the Triton kernels need to address a whole tensor list in one launch, built once and cached.

A launch covers many tensors through device tables instead of per-tensor arguments:

* a **pointer table** per tensor list: int64 ``data_ptr()`` of every tensor, cast to a typed pointer
  inside the kernel;
* a **layout** per list of (dtype, shape, stride): each tensor's numel, and the program map. Every
  tensor is cut into chunks of ``CHUNK`` elements and every chunk is one program, so program ``pid``
  works on tensor ``prog_tensor[pid]`` from element ``prog_offset[pid]``. Programs are numbered dtype
  group by dtype group (one launch per group and pass: a kernel is specialised on its storage dtype),
  a tensor's chunks consecutively, so tensor ``t``'s per-program partial sums are
  ``partials[first_prog[t] : first_prog[t] + n_chunks[t]]``.

The two are cached apart because they change apart: a layout only when a shape or dtype changes, a
pointer table whenever a tensor is replaced (gradients set to ``None`` and re-allocated by the next
backward, for instance). Either is rebuilt only when its key changes: the key holds everything the
entry is computed from, so a hit is always correct, even for a tensor re-allocated at the same address.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

# Elements per program. Tests derive their boundary sizes (CHUNK ± 1, several chunks) from it.
CHUNK = 4096

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# A tensor list's layout key: (dtype, shape, stride) per tensor.
Spec = tuple


def spec_of(tensors: Sequence[torch.Tensor]) -> Spec:
    return tuple((t.dtype, t.shape, t.stride()) for t in tensors)


def _is_dense(shape, stride) -> bool:
    """True when the elements fill one block of memory without gaps or overlaps (any dim order)."""
    if 0 in shape:
        return True
    expected = 1
    for size, step in sorted(((size, step) for size, step in zip(shape, stride) if size != 1),
                             key=lambda dim: dim[1]):
        if step != expected:
            return False
        expected *= size
    return True


@dataclass(frozen=True)
class DtypeGroup:
    """The programs of one storage dtype: global program ids ``prog_base ... prog_base+num_programs-1``."""

    dtype: torch.dtype
    prog_base: int
    num_programs: int


@dataclass(frozen=True)
class Layout:
    device: torch.device
    num_tensors: int
    num_programs: int
    max_chunks: int  # chunks of the largest tensor: the trip count of the per-tensor reduction
    groups: tuple  # of DtypeGroup, in order of first appearance in the list
    # int64 device tensors (views of one buffer, so a build costs one host-to-device copy)
    numels: torch.Tensor  # [num_tensors]
    first_prog: torch.Tensor  # [num_tensors]
    n_chunks: torch.Tensor  # [num_tensors]
    prog_tensor: torch.Tensor  # [num_programs]
    prog_offset: torch.Tensor  # [num_programs]


def build_layout(spec: Spec, device: torch.device, list_name: str = "params") -> Layout:
    """The layout of a tensor list with ``spec``; checks every tensor can be addressed as a flat block."""
    for i, (dtype, shape, stride) in enumerate(spec):
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"triton backend: {list_name}[{i}] has dtype {dtype}; supported dtypes: "
                             f"{', '.join(map(str, SUPPORTED_DTYPES))}")
        if not _is_dense(shape, stride):
            raise ValueError(f"triton backend: {list_name}[{i}] (shape {tuple(shape)}, stride {stride}) has gaps "
                             "or overlapping elements; its kernels address each tensor as one dense block, so "
                             "pass contiguous tensors (e.g. .contiguous())")
    n = len(spec)
    numels = torch.tensor([shape.numel() for _, shape, _ in spec], dtype=torch.int64)
    n_chunks = (numels + (CHUNK - 1)) // CHUNK

    group_dtypes = list(dict.fromkeys(dtype for dtype, _, _ in spec))
    group_of = torch.tensor([group_dtypes.index(dtype) for dtype, _, _ in spec], dtype=torch.int64)
    # Tensors in program order: by group, then by position in the list (a stable sort keeps the latter).
    order = torch.sort(group_of, stable=True).indices
    ordered_chunks = n_chunks[order]
    first_in_order = torch.cumsum(ordered_chunks, 0) - ordered_chunks
    first_prog = torch.empty(n, dtype=torch.int64)
    first_prog[order] = first_in_order
    num_programs = int(n_chunks.sum())

    prog_tensor = torch.repeat_interleave(order, ordered_chunks)
    chunk_index = torch.arange(num_programs, dtype=torch.int64) - torch.repeat_interleave(first_in_order,
                                                                                         ordered_chunks)
    prog_offset = chunk_index * CHUNK

    groups = []
    chunks_per_group = torch.zeros(len(group_dtypes), dtype=torch.int64).index_add_(0, group_of, n_chunks)
    base = 0
    for dtype, count in zip(group_dtypes, chunks_per_group.tolist()):
        groups.append(DtypeGroup(dtype, base, count))
        base += count

    packed = torch.cat([numels, first_prog, n_chunks, prog_tensor, prog_offset]).to(device)
    numels_d, first_prog_d, n_chunks_d, prog_tensor_d, prog_offset_d = torch.split(
        packed, [n, n, n, num_programs, num_programs])
    return Layout(
        device=device, num_tensors=n, num_programs=num_programs,
        max_chunks=int(n_chunks.max()) if n else 0, groups=tuple(groups),
        numels=numels_d, first_prog=first_prog_d, n_chunks=n_chunks_d,
        prog_tensor=prog_tensor_d, prog_offset=prog_offset_d)


class PointerTable(NamedTuple):
    table: torch.Tensor  # int64 data_ptr() of every tensor, on the tensors' device
    aligned: bool  # every address is a multiple of 16 bytes (the kernels may then use vector accesses)


def build_pointer_table(tensors: Sequence[torch.Tensor], device: torch.device, list_name: str) -> PointerTable:
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"triton backend: {list_name}[{i}] is on {t.device} but params[0] is on {device}; "
                             "one launch covers the whole list, so every tensor must be on one device")
    addresses = [t.data_ptr() for t in tensors]
    return PointerTable(torch.tensor(addresses, dtype=torch.int64).to(device), all(a % 16 == 0 for a in addresses))


class MetadataCache:
    """Least-recently-used caches of layouts and pointer tables, with build counters."""

    def __init__(self, max_layouts: int = 32, max_pointer_tables: int = 128):
        self.max_layouts = max_layouts
        self.max_pointer_tables = max_pointer_tables
        self._layouts: OrderedDict = OrderedDict()
        self._tables: OrderedDict = OrderedDict()
        self.layout_builds = 0
        self.pointer_table_builds = 0

    @staticmethod
    def _get(entries: OrderedDict, key, limit: int, build):
        entry = entries.get(key)
        if entry is not None:
            entries.move_to_end(key)
            return entry, False
        entry = build()
        entries[key] = entry
        if len(entries) > limit:
            entries.popitem(last=False)
        return entry, True

    def layout(self, spec: Spec, device: torch.device) -> Layout:
        layout, built = self._get(self._layouts, (device, spec), self.max_layouts,
                                  lambda: build_layout(spec, device))
        self.layout_builds += built
        return layout

    def pointer_table(self, tensors: Sequence[torch.Tensor], device: torch.device, list_name: str) -> PointerTable:
        # The addresses are the whole content of a table; dtypes and shapes are checked against the
        # layout's spec by the caller on every call.
        key = (device, tuple(t.data_ptr() for t in tensors))
        table, built = self._get(self._tables, key, self.max_pointer_tables,
                                 lambda: build_pointer_table(tensors, device, list_name))
        self.pointer_table_builds += built
        return table

    def clear(self) -> None:
        self._layouts.clear()
        self._tables.clear()


CACHE = MetadataCache()
