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

Two holders. An optimizer's plan holds a :class:`Held` per parameter list (through :func:`hold`): the
layout, checked once per plan, and the pointer tables of the plan's own lists (params, backups), which do
not change while the plan lives; the tables of the lists passed anew each step (gradients, momentum
buffers) are rebuilt only when an address changes, so a step costs one ``data_ptr()`` per tensor. Calls
without a plan go through :data:`CACHE`, keyed by everything an entry is computed from (the layout by each
tensor's (dtype, shape, stride), a pointer table by the addresses), so a hit is always correct; in front of
it, the cache keeps the layout and each list's table it returned last, which a call whose tensors have the
same layout and addresses again gets after a comparison (``norm="global"`` passes one list of all its parts'
tensors, built anew each step).

Per call, where ``amp_fused._C`` is loaded (:func:`native`), one C++ pass per list compares a held table's
addresses with the tensors' (:func:`same_addresses`; layouts: :func:`same_layout`) and one bumps the written
lists' autograd version counters (:func:`bump_versions`); without it (or for what the C++ pass leaves to Python:
tensor subclasses, an active TorchFunctionMode) the same is done in Python, with the same results and errors.

Uploads: every table is built on the host and copied to the device in one copy; where CUDA is, from pinned
memory with ``non_blocking=True`` (no host sync, capturable in a CUDA graph), and the pinned source is held
with the entry, so it outlives the copy. Streams: an entry's device tensors are allocated on the stream
current when it is built; used on another stream, they are ``record_stream``-ed on it once (so freeing an
evicted entry waits for that stream's work), rather than cached per stream.
"""
from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .. import _compat

# Elements per program. Tests derive their boundary sizes (CHUNK ± 1, several chunks) from it.
CHUNK = 4096
# Tensors the scale pass reduces at a time: the layout holds each such block's own largest chunk count.
SCALE_T_BLOCK = 32

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


class Upload:
    """An int64 table on its device, the host tensor it was copied from (pinned where CUDA is: held as long
    as the table, so it outlives the non-blocking copy) and the streams it has been used on."""

    __slots__ = ("device_tensor", "host", "streams")

    def __init__(self, host: torch.Tensor, device: torch.device):
        if device.type == "cuda":
            pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
            pinned.copy_(host)
            self.host = pinned
            self.device_tensor = pinned.to(device, non_blocking=True)
            self.streams = {torch.cuda.current_stream(device)}
        else:
            self.host, self.device_tensor, self.streams = host, host.to(device), None

    def use(self, stream) -> None:
        """Before a launch on ``stream`` (None off CUDA): the caching allocator must not hand this memory to
        the stream it was allocated on while ``stream`` may still read it."""
        if stream is not None and stream not in self.streams:
            self.device_tensor.record_stream(stream)
            self.streams.add(stream)


def current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _int64(values: Sequence[int]) -> torch.Tensor:
    # Through an array: half the cost of torch.tensor(list) for a list of Python ints.
    return torch.frombuffer(array("q", values), dtype=torch.int64) if len(values) else torch.empty(0, dtype=torch.int64)


@dataclass(frozen=True)
class Layout:
    device: torch.device
    num_tensors: int
    num_programs: int
    max_chunks: int  # chunks of the largest tensor
    groups: tuple  # of DtypeGroup, in order of first appearance in the list
    upload: Upload  # the one buffer the tables below are views of (a build costs one host-to-device copy)
    # int64 device tensors
    numels: torch.Tensor  # [num_tensors]
    first_prog: torch.Tensor  # [num_tensors]
    n_chunks: torch.Tensor  # [num_tensors]
    # [ceil(num_tensors / SCALE_T_BLOCK)]: the largest chunk count in each block of SCALE_T_BLOCK tensors (list
    # order), the scale pass's trip count for that block
    block_chunks: torch.Tensor
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
    num_blocks = -(-n // SCALE_T_BLOCK)
    block_chunks = torch.zeros(num_blocks * SCALE_T_BLOCK, dtype=torch.int64)
    block_chunks[:n] = n_chunks
    block_chunks = block_chunks.view(num_blocks, SCALE_T_BLOCK).amax(1) if n else block_chunks

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

    upload = Upload(torch.cat([numels, first_prog, n_chunks, block_chunks, prog_tensor, prog_offset]), device)
    numels_d, first_prog_d, n_chunks_d, block_chunks_d, prog_tensor_d, prog_offset_d = torch.split(
        upload.device_tensor, [n, n, n, len(block_chunks), num_programs, num_programs])
    return Layout(
        device=device, num_tensors=n, num_programs=num_programs,
        max_chunks=int(n_chunks.max()) if n else 0, groups=tuple(groups), upload=upload,
        numels=numels_d, first_prog=first_prog_d, n_chunks=n_chunks_d, block_chunks=block_chunks_d,
        prog_tensor=prog_tensor_d, prog_offset=prog_offset_d)


class PointerTable(NamedTuple):
    table: torch.Tensor  # int64 data_ptr() of every tensor, on the tensors' device
    upload: Upload
    addresses: list  # what it holds, as Python ints
    host: torch.Tensor  # and as an int64 CPU tensor (what same_addresses compares in C++)


def build_pointer_table(tensors: Sequence[torch.Tensor], device: torch.device, list_name: str,
                        addresses: list | None = None) -> PointerTable:
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"triton backend: {list_name}[{i}] is on {t.device} but params[0] is on {device}; "
                             "one launch covers the whole list, so every tensor must be on one device")
    if addresses is None:
        addresses = list(map(torch.Tensor.data_ptr, tensors))
    host = _int64(addresses)
    upload = Upload(host, device)
    return PointerTable(upload.device_tensor, upload, addresses, host)


# -- the per-call passes: in C++ where amp_fused._C is loaded ------------------------------------------------------
NATIVE_HELPERS = ("same_addresses", "layout_signature", "same_layout", "bump_versions")
_UNSET = object()
_native = _UNSET  # what native() found: amp_fused._C, or None


def native():
    """``amp_fused._C`` where it is loaded and has the host helpers (:data:`NATIVE_HELPERS`, in
    csrc/amp_fused.cpp), else None (an older build without them, or none: then every pass is Python's). Looked up
    once, on first use, through :mod:`amp_fused._extension` (which loads the extension, building it where needed,
    as the other backends' availability checks do, and never raises)."""
    global _native
    if _native is _UNSET:
        module = None
        try:
            import sys

            from .. import _extension

            _extension.cpu_error  # noqa: B018 - loads amp_fused._C
            module = sys.modules.get("amp_fused._C")
        except Exception:  # noqa: BLE001 - no extension: the Python path
            module = None
        if module is not None and not all(callable(getattr(module, name, None)) for name in NATIVE_HELPERS):
            module = None
        _native = module
    return _native


def same_addresses(tensors: Sequence[torch.Tensor], table: PointerTable) -> bool:
    """Whether ``tensors`` lie at the addresses ``table`` holds, one ``data_ptr()`` each: one C++ pass
    (:func:`native`) or, for what it leaves to Python (None), the Python comparison."""
    helpers = _native if _native is not _UNSET else native()
    if helpers is not None:
        same = helpers.same_addresses(tensors, table.host)
        if same is not None:
            return same
    return list(map(torch.Tensor.data_ptr, tensors)) == table.addresses


class RecentLayout(NamedTuple):
    """The layout a :class:`MetadataCache` returned last, with what it compares a call's tensors against."""

    layout: Layout
    spec: Spec
    signature: bytes | None  # the C++ pass's form of spec (layout_signature), where it made one


def layout_signature(tensors: Sequence[torch.Tensor]) -> bytes | None:
    """What :func:`same_layout` compares in C++, or None (no extension, or tensors it leaves to Python)."""
    helpers = _native if _native is not _UNSET else native()
    return None if helpers is None else helpers.layout_signature(tensors)


def same_layout(tensors: Sequence[torch.Tensor], recent: RecentLayout) -> bool:
    """Whether ``tensors`` have the dtypes, shapes and strides ``recent`` was built for: one C++ pass
    (:func:`native`) or, for what it leaves to Python, ``spec_of(tensors) == recent.spec``."""
    helpers = _native if _native is not _UNSET else native()
    if helpers is not None and recent.signature is not None:
        same = helpers.same_layout(tensors, recent.signature)
        if same is not None:
            return same
    return spec_of(tensors) == recent.spec


def bump_versions(*lists: Sequence[torch.Tensor]) -> None:
    """``torch.autograd.graph.increment_version`` on each of ``lists`` (inference tensors have no version counter
    and are left alone): what kernels that write through raw pointers owe autograd. One C++ pass over all lists
    (:func:`native`); where it leaves them to Python (it then bumped nothing), torch's own call per list."""
    helpers = _native if _native is not _UNSET else native()
    if helpers is not None and helpers.bump_versions(*lists):
        return
    for tensors in lists:
        _compat.increment_version(tensors)


class MetadataCache:
    """Least-recently-used caches of layouts and pointer tables, with build counters (which the plan-held
    tables of :class:`Held` count in as well); :meth:`layout_of` and :meth:`table_of` (what a call without a plan
    takes) first compare the tensors with the layout and the list's table they returned last."""

    def __init__(self, max_layouts: int = 32, max_pointer_tables: int = 128):
        self.max_layouts = max_layouts
        self.max_pointer_tables = max_pointer_tables
        self._layouts: OrderedDict = OrderedDict()
        self._tables: OrderedDict = OrderedDict()
        self._recent_layout: RecentLayout | None = None
        self._recent_tables: dict = {}  # list name -> (device, PointerTable)
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
        addresses = list(map(torch.Tensor.data_ptr, tensors))
        table, built = self._get(self._tables, (device, tuple(addresses)), self.max_pointer_tables,
                                 lambda: build_pointer_table(tensors, device, list_name, addresses))
        self.pointer_table_builds += built
        return table

    def layout_of(self, tensors: Sequence[torch.Tensor], device: torch.device) -> Layout:
        """The layout of ``tensors`` on ``device``: the one returned last when their dtypes, shapes and strides
        are the same again (:func:`same_layout`), else :meth:`layout`'s."""
        recent = self._recent_layout
        if recent is not None and recent.layout.device == device and same_layout(tensors, recent):
            return recent.layout
        spec = spec_of(tensors)
        layout = self.layout(spec, device)
        self._recent_layout = RecentLayout(layout, spec, layout_signature(tensors))
        return layout

    def table_of(self, tensors: Sequence[torch.Tensor], device: torch.device, list_name: str) -> PointerTable:
        """The pointer table of ``tensors``: the one returned last for ``list_name`` when they are at its
        addresses again (:func:`same_addresses`), else :meth:`pointer_table`'s."""
        recent = self._recent_tables.get(list_name)
        if recent is not None and recent[0] == device and same_addresses(tensors, recent[1]):
            return recent[1]
        table = self.pointer_table(tensors, device, list_name)
        self._recent_tables[list_name] = (device, table)
        return table

    def clear(self) -> None:
        self._layouts.clear()
        self._tables.clear()
        self._recent_layout = None
        self._recent_tables.clear()


CACHE = MetadataCache()


class Held:
    """What a plan holds for one list of parameters: their layout (built, and so checked, once) and the pointer
    tables of the plan's own lists, ``params`` and ``backups``, whose tensors do not change while the plan
    lives. Other lists (gradients, momentum buffers) keep one table per list name, rebuilt when an address
    changes: their dtypes, shapes and layouts are the plan's business (it checks the gradients each step and
    converts momentum buffers to their parameter's layout), their addresses are checked here on every call."""

    def __init__(self, params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor], cache: MetadataCache):
        device = params[0].device
        self.cache = cache  # its build counters count these builds too
        self.layout = build_layout(spec_of(params), device)
        self.backups = backups  # the plan's list object: passed again as is, it needs no check
        self.tables = {"params": build_pointer_table(params, device, "params"),
                       "backups": build_pointer_table(backups, device, "backups")}
        cache.layout_builds += 1
        cache.pointer_table_builds += 2
        self._fixed = {"params": self.tables["params"], "backups": self.tables["backups"]}

    def pointer_table(self, tensors: Sequence[torch.Tensor], device: torch.device, list_name: str) -> PointerTable:
        if list_name == "params" or (list_name == "backups" and tensors is self.backups):
            return self._fixed[list_name]
        table = self.tables.get(list_name)
        if table is not None and same_addresses(tensors, table):
            return table
        addresses = list(map(torch.Tensor.data_ptr, tensors))
        if table is None or table.addresses != addresses:
            table = self.tables[list_name] = build_pointer_table(tensors, device, list_name, addresses)
            self.cache.pointer_table_builds += 1
        return table


class HeldTensors(tuple):
    """A plan's parameter list (a tuple: it cannot change) carrying its :class:`Held` tables as ``held``. Copied
    or pickled, it is a plain tuple: the tables hold addresses of these very tensors."""

    held: Held

    def __reduce__(self):
        return tuple, (tuple(self),)


def hold(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor], cache: MetadataCache) -> HeldTensors:
    held = HeldTensors(params)
    held.held = Held(held, backups, cache)
    return held
