"""The argument contract of the AMP ops, written once in Python (its C++ twin is ``csrc/checks.h``).

Who checks what:

* The op layer (:mod:`amp_fused.functional`, ``validate=True``) runs this contract before dispatching, for
  every backend, so ``reference``, ``foreach`` and ``triton`` reject exactly what the compiled kernels reject.
* The C++ kernels (the ``cpu`` and ``cuda`` backends) run the same contract natively on every call
  (``csrc/checks.h``), so calls with ``validate=False``, and ``torch.ops.amp_fused.*`` called directly, raise
  the same exception type with the same message there. After it they check what only they need (the CPU
  kernels: tensors on the CPU; the CUDA kernels: on a CUDA device).
* The fake implementations (:mod:`amp_fused._extension`, for FakeTensor / meta tracing) run it with
  ``overlap=False``: traced tensors have no memory to compare.
* The optimizer checks its own arguments where they enter (:mod:`amp_fused.options`), and runs this contract
  on the parameters and their θ buffers once per plan (:mod:`amp_fused.plan`), then calls the ops with
  ``validate=False``; each step the plan checks the gradients against the parameters (``overlap=False``: they
  are only read) for the backends that do not check every call natively.

The contract, in the order it is checked (the first failure raises; every message starts with
``amp_fused.<op>: ``):

1. every list has as many tensors as ``params`` (``ValueError``);
2. the scalars: ``epsilon``, ``inner_lr``, ``eta`` (when given), ``lr``, ``momentum``, ``weight_decay``, ``alpha`` finite
   and >= 0, ``dampening`` finite (``ValueError``; a value that is not a number at all: ``TypeError``); ``eta``
   only with ``first=True`` (``ValueError``);
3. index by index, list by list (``params`` first), each tensor: is a tensor (``TypeError``), is strided,
   not sparse (``TypeError``), has a supported dtype (``params`` only; ``TypeError``), is on ``params[0]``'s
   device (``ValueError``), has ``params[i]``'s shape and dtype (the other lists; ``ValueError``), fills a
   dense block of memory and, for the other lists, lays out its elements like ``params[i]`` (``ValueError``;
   tensors without elements skip both);
4. no tensor of a written list shares memory with any other tensor of the call, at any index
   (``ValueError``; tensors without elements, and tensors on the meta device, have no memory to share).

Op lists, (W) written, (R) read: ``perturb_``: params (W), grads (R), backups (W); ``restore_``: params (W),
backups (R); ``restore_sgd_``: params (W), backups (R), grads (R), momentum_buffers (W; only when
``momentum != 0``, otherwise ignored and may be empty); ``perturbation``: params (R), backups (R); ``norms``:
tensors (R); ``restore_orthogonal_``: params (W), backups (R), grads (R), orthogonals (W); ``add_orthogonal_``:
grads (W), orthogonals (R), with ``alpha`` finite and >= 0.

The checks read tensor attributes only: no device sync, no tensor allocation.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

__all__ = ["SUPPORTED_DTYPES", "check_lists", "check_perturb", "check_restore", "check_restore_sgd",
           "check_perturbation", "check_norms", "check_restore_orthogonal", "check_add_orthogonal"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SUPPORTED = frozenset(SUPPORTED_DTYPES)
_SUPPORTED_TEXT = "torch.float32, torch.float64, torch.float16 and torch.bfloat16"

# eta with a later ascent (C++: the same text in csrc/checks.h).
ETA_NEEDS_FIRST = ("amp_fused.perturb_: eta (ASAM's element weights) needs first=True; the weighted ascent is one "
                   "step from θ")

# (name, tensors, written)
NamedList = Tuple[str, Sequence[torch.Tensor], bool]


def _check_lengths(op: str, lists: Sequence[NamedList]) -> None:
    lead_name, lead, _ = lists[0]
    n = len(lead)
    for name, tensors, _ in lists[1:]:
        if len(tensors) != n:
            raise ValueError(f"amp_fused.{op}: {name} has {len(tensors)} tensors but {lead_name} has {n}; "
                             "the lists must have the same length")


def _check_scalar(op: str, name: str, value, nonnegative: bool = True) -> None:
    if type(value) is not float:
        if isinstance(value, (torch.SymFloat, torch.SymInt)):
            return  # a traced symbolic value: the kernel checks it when it runs
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            number = math.inf if value > 0 else -math.inf
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"amp_fused.{op}: {name} must be a finite number{' >= 0' if nonnegative else ''}, "
                            f"got {value!r}") from None
        value = number
    if not (math.isfinite(value) and (value >= 0.0 or not nonnegative)):
        raise ValueError(f"amp_fused.{op}: {name} must be a finite number{' >= 0' if nonnegative else ''}, "
                         f"got {value:g}")


def _dense_strides(shape, strides) -> bool:
    """Whether a tensor with elements fills one block of memory (no gaps, no element twice), in any dim
    order: the dims of size > 1, sorted by stride, must step by the product of the sizes before them.
    (What ``at::Tensor::is_non_overlapping_and_dense`` computes for a tensor with elements.)"""
    expected = 1
    for size, stride in sorted(((size, stride) for size, stride in zip(shape, strides) if size > 1),
                               key=lambda dim: dim[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_order(shape, strides, ref_strides) -> bool:
    """Whether two tensors of ``shape`` put every element at the same offset (size-1 dims never move)."""
    return all(size <= 1 or a == b for size, a, b in zip(shape, strides, ref_strides))


def _not_a_tensor(op: str, name: str, i: int, t) -> TypeError:
    return TypeError(f"amp_fused.{op}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")


def _sparse(op: str, name: str, i: int, t) -> TypeError:
    return TypeError(f"amp_fused.{op}: {name}[{i}] has layout {t.layout}; AMP supports dense (strided) tensors "
                     "only, so sparse gradients (e.g. nn.Embedding(sparse=True)) are not supported")


def _not_dense(op: str, name: str, i: int, t) -> ValueError:
    return ValueError(f"amp_fused.{op}: {name}[{i}] (shape {list(t.shape)}, strides {list(t.stride())}) does not "
                      "fill a dense block of memory; the ops take dense tensors only (contiguous or a permuted "
                      "dense layout such as channels_last), not views that skip or repeat elements")


def _check_tensors(op: str, lists: Sequence[NamedList], overlap: bool) -> None:
    """Steps 3 and 4 of the contract (the lengths are already equal)."""
    lead_name, params, _ = lists[0]
    n = len(params)
    if n == 0:
        return
    # TensorBase: what every tensor is, without torch.Tensor's Python-level isinstance hook (half the cost)
    Tensor, strided = torch._C.TensorBase, torch.strided
    first = params[0]
    if not isinstance(first, Tensor):
        raise _not_a_tensor(op, lead_name, 0, first)
    device = first.device
    others = lists[1:]
    for i in range(n):
        p = params[i]
        if not isinstance(p, Tensor):
            raise _not_a_tensor(op, lead_name, i, p)
        if p.layout is not strided:
            raise _sparse(op, lead_name, i, p)
        dtype = p.dtype
        if dtype not in _SUPPORTED:
            raise TypeError(f"amp_fused.{op}: {lead_name}[{i}] has dtype {dtype}; supported dtypes are "
                            f"{_SUPPORTED_TEXT} (complex tensors through torch.view_as_real)")
        if p.device != device:
            raise ValueError(f"amp_fused.{op}: {lead_name}[{i}] is on {p.device} but {lead_name}[0] is on {device}; "
                             "all tensors must be on one device")
        has_elements = p.numel() > 0
        if has_elements and not p.is_contiguous() and not _dense_strides(p.shape, p.stride()):
            raise _not_dense(op, lead_name, i, p)
        shape = p.shape
        strides = None  # p.stride(), read when a tensor's strides differ from a contiguous layout's
        for name, tensors, _ in others:
            t = tensors[i]
            if not isinstance(t, Tensor):
                raise _not_a_tensor(op, name, i, t)
            if t.layout is not strided:
                raise _sparse(op, name, i, t)
            if t.device != device:
                raise ValueError(f"amp_fused.{op}: {name}[{i}] is on {t.device} but {lead_name}[0] is on {device}; "
                                 "all tensors must be on one device")
            if t.shape != shape:
                raise ValueError(f"amp_fused.{op}: {name}[{i}] has shape {list(t.shape)} but {lead_name}[{i}] has "
                                 f"shape {list(shape)}; tensors at one index must have the same shape")
            if t.dtype != dtype:
                raise ValueError(f"amp_fused.{op}: {name}[{i}] has dtype {t.dtype} but {lead_name}[{i}] has dtype "
                                 f"{dtype}; tensors at one index must have the same dtype")
            if has_elements:
                t_strides = t.stride()
                if strides is None:
                    strides = p.stride()
                if t_strides != strides:
                    if not (t.is_contiguous() or _dense_strides(shape, t_strides)):
                        raise _not_dense(op, name, i, t)
                    if not _same_order(shape, t_strides, strides):
                        raise ValueError(f"amp_fused.{op}: {name}[{i}] (strides {list(t_strides)}) does not lay "
                                         f"out its elements like {lead_name}[{i}] (strides {list(strides)}); "
                                         "tensors at one index must have the same memory layout")
    if overlap and device.type != "meta":
        _check_overlap(op, lists)


def _check_overlap(op: str, lists: Sequence[NamedList]) -> None:
    """Step 4: byte ranges [data_ptr, data_ptr + numel * element_size), sorted by (start, list, index) and
    swept keeping the range that reaches furthest so far. Every overlap of a new range with an earlier one
    is also one with that range; the first one that involves a written list is reported, the pair in
    (list, index) order. The same algorithm as csrc/checks.h, so both report the same pair."""
    written = [w for _, _, w in lists]
    if not any(written):
        return
    ranges = []
    for position, (_, tensors, _) in enumerate(lists):
        for i, t in enumerate(tensors):
            size = t.nbytes  # numel * element_size: the tensor is dense (step 3)
            if size:
                start = t.data_ptr()
                ranges.append((start, position, i, start + size))
    ranges.sort()  # (start, list, index) is unique, so the ends are never compared
    if not ranges:
        return
    kept = ranges[0]
    for entry in ranges[1:]:
        if entry[0] < kept[3] and (written[entry[1]] or written[kept[1]]):
            a, b = (kept, entry) if kept[1:3] < entry[1:3] else (entry, kept)
            raise ValueError(f"amp_fused.{op}: {lists[a[1]][0]}[{a[2]}] and {lists[b[1]][0]}[{b[2]}] share memory; "
                             "each tensor the op writes must have memory of its own")
        if entry[3] > kept[3]:
            kept = entry


def check_lists(op: str, lists: Sequence[NamedList], *, overlap: bool = True) -> None:
    """Steps 1, 3 and 4 of the contract for ``lists``, a sequence of ``(name, tensors, written)`` with the
    params-like list first (every other list is compared to it). ``op`` names the op in the messages.
    ``overlap=False`` skips the memory-overlap check (FakeTensor / meta tracing: no data pointers)."""
    lists = tuple(lists)
    if not lists:
        return
    _check_lengths(op, lists)
    _check_tensors(op, lists, overlap)


def check_perturb(params, grads, backups, epsilon, inner_lr, *, first: bool = True, eta=None,
                  overlap: bool = True) -> None:
    """The contract of ``perturb_`` (``eta``: ASAM's element weights, ``None`` for none; only with ``first``)."""
    lists = (("params", params, True), ("grads", grads, False), ("backups", backups, True))
    _check_lengths("perturb_", lists)
    _check_scalar("perturb_", "epsilon", epsilon)
    _check_scalar("perturb_", "inner_lr", inner_lr)
    if eta is not None:
        _check_scalar("perturb_", "eta", eta)
        if not first:
            raise ValueError(ETA_NEEDS_FIRST)
    _check_tensors("perturb_", lists, overlap)


def check_restore(params, backups, *, overlap: bool = True) -> None:
    """The contract of ``restore_``."""
    lists = (("params", params, True), ("backups", backups, False))
    _check_lengths("restore_", lists)
    _check_tensors("restore_", lists, overlap)


def check_restore_sgd(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay, *,
                      overlap: bool = True) -> None:
    """The contract of ``restore_sgd_``; ``momentum_buffers`` is checked only when ``momentum != 0``."""
    lists = (("params", params, True), ("backups", backups, False), ("grads", grads, False))
    if momentum != 0:
        lists += (("momentum_buffers", momentum_buffers, True),)
    _check_lengths("restore_sgd_", lists)
    _check_scalar("restore_sgd_", "lr", lr)
    _check_scalar("restore_sgd_", "momentum", momentum)
    _check_scalar("restore_sgd_", "dampening", dampening, nonnegative=False)
    _check_scalar("restore_sgd_", "weight_decay", weight_decay)
    _check_tensors("restore_sgd_", lists, overlap)


def check_perturbation(params, backups, *, overlap: bool = True) -> None:
    """The contract of ``perturbation`` (it writes nothing, so no overlap can fail it)."""
    lists = (("params", params, False), ("backups", backups, False))
    _check_lengths("perturbation", lists)
    _check_tensors("perturbation", lists, overlap)


def check_norms(tensors, *, overlap: bool = True) -> None:
    """The contract of ``norms`` (it writes nothing)."""
    check_lists("norms", (("tensors", tensors, False),), overlap=overlap)


def check_restore_orthogonal(params, backups, grads, orthogonals, *, overlap: bool = True) -> None:
    """The contract of ``restore_orthogonal_``."""
    check_lists("restore_orthogonal_", (("params", params, True), ("backups", backups, False),
                                        ("grads", grads, False), ("orthogonals", orthogonals, True)), overlap=overlap)


def check_add_orthogonal(grads, orthogonals, alpha, *, overlap: bool = True) -> None:
    """The contract of ``add_orthogonal_``."""
    lists = (("grads", grads, True), ("orthogonals", orthogonals, False))
    _check_lengths("add_orthogonal_", lists)
    _check_scalar("add_orthogonal_", "alpha", alpha)
    _check_tensors("add_orthogonal_", lists, overlap)
