"""Host side of the Triton backend: checks, metadata, and the kernel launches of each op.

Semantics of the ops: :mod:`amp_fused.backends`. Launches per call, with G dtype groups in the list:
``perturb_`` 2G + 1 (sums of squares, scales, apply), ``restore_`` G, ``restore_sgd_`` G, ``norms`` G + 1 (perturb_'s
sums of squares and its scale pass without the scales), ``restore_orthogonal_`` 2G + 1 and ``add_orthogonal_``
2G + 1 (two sums per element, coefficients, apply). None of them syncs with the host.

A list from :func:`hold` (what the optimizer's plan passes) carries its layout and tables, so a call costs one
``data_ptr()`` per tensor of the lists it did not hold, and one version bump per tensor written: one C++ pass per
call each where ``amp_fused._C`` is loaded (:func:`metadata.same_addresses`, :func:`metadata.bump_versions`), the
same in Python where not. Any other list goes through the metadata cache.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Sequence

import torch

from . import metadata
from .metadata import CACHE, CHUNK, SCALE_T_BLOCK, current_stream

# Read once, like Triton's own switch: whether CPU tensors may run (under Triton's interpreter).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class PassConfig:
    block: int  # elements per vector step; CHUNK / block steps per program
    num_warps: int


# The sum-of-squares and copy passes keep one value per element live, so they take the whole chunk in
# one step (16 elements per thread); apply and SGD keep three to four streams plus conversions live per
# element, so they take half-chunk steps to keep register pressure down.
SUMSQ = PassConfig(block=4096, num_warps=8)
APPLY = PassConfig(block=2048, num_warps=8)
SGD = PassConfig(block=2048, num_warps=8)
COPY = PassConfig(block=4096, num_warps=8)
# The gradient-reuse ops' sums keep two fp64 accumulators per element (and up to three input streams) live: half-chunk
# steps, as apply. Their apply passes (restore_orthogonal_kernel, add_orthogonal_kernel) take APPLY's.
PAIR_SUMS = PassConfig(block=2048, num_warps=8)
# The scale pass is one program: tensors SCALE_T_BLOCK at a time (metadata: the layout holds each block's
# trip count), their partial sums SCALE_C_BLOCK at a time.
SCALE_C_BLOCK, SCALE_NUM_WARPS = 64, 4

for _config in (SUMSQ, APPLY, SGD, COPY, PAIR_SUMS):
    assert CHUNK % _config.block == 0, "a program's chunk must be whole vector steps"


@functools.lru_cache(maxsize=None)
def kernels() -> ModuleType:
    """The kernels module, after checking Triton runs it in the mode ``INTERPRET`` says.

    Triton decides at import whether ``triton.jit`` compiles or interprets, for its own library
    (``tl.zeros``, ``tl.sum``, ...) as for our kernels, so the switch must be set before triton is
    imported and stay as it was.
    """
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    from . import kernels as module

    interpreted = {not isinstance(fn, JITFunction) for fn in (tl.zeros, module.copy_kernel)}
    if interpreted != {INTERPRET}:
        raise RuntimeError(
            "triton backend: Triton's interpreter must be on (TRITON_INTERPRET=1) or off before triton is "
            f"imported and stay so; amp_fused's backend was loaded with it {'on' if INTERPRET else 'off'}, but "
            f"triton.language runs {'interpreted' if not isinstance(tl.zeros, JITFunction) else 'compiled'} and "
            f"the kernels {'interpreted' if not isinstance(module.copy_kernel, JITFunction) else 'compiled'}")
    return module


def _kernels_for(device: torch.device) -> ModuleType:
    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return kernels()
    raise ValueError(f"triton backend: tensors must be on a CUDA device (or on the CPU when TRITON_INTERPRET=1 "
                     f"is set before amp_fused loads this backend), got {device}")


def _host_copies_under_interpreter(*written: str):
    """Under the interpreter, run the op on host copies of CUDA tensors and copy the ``written`` lists back.

    The interpreter runs every kernel on host copies of its tensor arguments; the tensors our kernels
    reach through pointer tables are not arguments, so for CUDA tensors the op makes those copies itself.
    (Compiled, the kernels work on the CUDA tensors directly.)
    """
    def wrap(op):
        signature = inspect.signature(op)
        lead = next(iter(signature.parameters))  # the list whose layout the op launches over

        @functools.wraps(op)
        def run(*args, **kwargs):
            params = args[0] if args else kwargs[lead]
            if not (INTERPRET and len(params) and params[0].device.type == "cuda"):
                return op(*args, **kwargs)
            arguments = signature.bind(*args, **kwargs).arguments
            host = {name: [t.cpu() for t in value] if isinstance(value, (list, tuple)) else value
                    for name, value in arguments.items()}
            result = op(**host)
            for name in written:
                if len(arguments[name]):
                    torch._foreach_copy_(arguments[name], host[name])
            return result.to(params[0].device) if isinstance(result, torch.Tensor) else result
        return run
    return wrap


@functools.lru_cache(maxsize=None)
def _triton_types(dtype: torch.dtype):
    """(storage, compute, word) Triton dtypes of a supported torch dtype."""
    import triton.language as tl

    storage = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
               torch.float64: tl.float64}[dtype]
    compute = tl.float64 if dtype == torch.float64 else tl.float32
    word = {2: tl.int16, 4: tl.int32, 8: tl.int64}[dtype.itemsize]
    return storage, compute, word


# The norm reduction's type, whatever the tensors' dtypes: per-element squares, the per-program partial sums,
# the per-tensor and global sums and the scales are fp64, so a finite fp32 Δ (|Δ|² ≤ ~1.2e77) never overflows
# the norm. (Δ itself is formed in the compute type, fp32 for fp32/fp16/bf16 tensors.)
ACC_DTYPE = torch.float64


@functools.lru_cache(maxsize=None)
def _acc_type():
    import triton.language as tl

    return tl.float64


def hold(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor]):
    """``params`` as a tuple that holds its layout and its and ``backups``' pointer tables (for the optimizer's
    plan, which keeps both lists unchanged; see :class:`metadata.Held`). Checks the layout once, here."""
    return metadata.hold(params, backups, CACHE)


def _prepare(**lists: Sequence[torch.Tensor]):
    """The layout of the first list (``params``; ``norms``: ``tensors``, ``add_orthogonal_``: ``grads``) and a
    pointer table per list. The lists were checked against each other by the op layer (:mod:`amp_fused.checks`)
    or by the plan that holds them, so the layout of the first list addresses every list. A first list from
    :func:`hold` brings its layout and its own table (the held ``params`` table, whatever the op calls it)."""
    lead_name, params = next(iter(lists.items()))
    device = params[0].device
    held = getattr(params, "held", None)
    if held is None:
        layout = CACHE.layout_of(params, device)
        tables = [CACHE.table_of(tensors, device, name) for name, tensors in lists.items()]
    else:
        layout = held.layout
        tables = [held.pointer_table(tensors, device, "params" if name == lead_name else name)
                  for name, tensors in lists.items()]
    stream = current_stream(device)
    if stream is not None:
        layout.upload.use(stream)
        for table in tables:
            table.upload.use(stream)
    return layout, [t.table for t in tables]


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device and stream.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@_host_copies_under_interpreter("params", "backups")
def perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, surface=False, eta=None):
    if not params:
        return torch.zeros(1)
    device = params[0].device
    k = _kernels_for(device)
    # The modes (SAM: surface; ASAM: eta) are constexpr flags of the kernels; a default call launches the
    # kernels with both off (the code they compile to without the modes) and eta unused.
    surface = bool(surface)
    weighted = eta is not None
    if weighted and not first:  # the op layer checks it first (amp_fused.checks); a direct call is refused here
        from ..checks import ETA_NEEDS_FIRST
        raise ValueError(ETA_NEEDS_FIRST)
    eta = float(eta) if weighted else 0.0
    layout, (param_table, grad_table, backup_table) = _prepare(params=params, grads=grads, backups=backups)
    acc = _acc_type()
    partials = torch.empty(layout.num_programs, dtype=ACC_DTYPE, device=device)
    scales = torch.empty(layout.num_tensors, dtype=ACC_DTYPE, device=device)
    norms = torch.empty(layout.num_tensors + 1, dtype=torch.float32, device=device)
    tensor_args = (param_table, grad_table, backup_table, layout.numels, layout.prog_tensor, layout.prog_offset)
    with _device_guard(device):
        for group in layout.groups:
            if group.num_programs:
                storage, compute, _ = _triton_types(group.dtype)
                k.perturb_sumsq_kernel[(group.num_programs,)](
                    *tensor_args, partials, group.prog_base, float(inner_lr), FIRST=bool(first), DTYPE=storage,
                    COMPUTE=compute, ACC=acc, CHUNK=CHUNK, BLOCK=SUMSQ.block, eta=eta, WEIGHTED=weighted,
                    num_warps=SUMSQ.num_warps)
        k.perturb_scale_kernel[(1,)](
            partials, layout.first_prog, layout.n_chunks, layout.block_chunks, norms, scales, layout.num_tensors,
            float(epsilon), PER_TENSOR=bool(per_tensor), ACC=acc, T_BLOCK=SCALE_T_BLOCK, C_BLOCK=SCALE_C_BLOCK,
            SURFACE=surface, SCALES=True, num_warps=SCALE_NUM_WARPS)
        for group in layout.groups:
            if group.num_programs:
                storage, compute, _ = _triton_types(group.dtype)
                k.perturb_apply_kernel[(group.num_programs,)](
                    *tensor_args, scales, group.prog_base, float(inner_lr), FIRST=bool(first), DTYPE=storage,
                    COMPUTE=compute, CHUNK=CHUNK, BLOCK=APPLY.block, eta=eta, SURFACE=surface, WEIGHTED=weighted,
                    num_warps=APPLY.num_warps)
    # The kernels write through raw pointers: tell autograd the tensors changed in place.
    if first:
        metadata.bump_versions(params, backups)
    else:
        metadata.bump_versions(params)
    return norms


@_host_copies_under_interpreter("params")
def restore_(params, backups):
    if not params:
        return
    device = params[0].device
    k = _kernels_for(device)
    layout, (param_table, backup_table) = _prepare(params=params, backups=backups)
    with _device_guard(device):
        for group in layout.groups:
            if group.num_programs:
                _, _, word = _triton_types(group.dtype)
                k.copy_kernel[(group.num_programs,)](
                    param_table, backup_table, layout.numels, layout.prog_tensor, layout.prog_offset,
                    group.prog_base, WORD=word, CHUNK=CHUNK, BLOCK=COPY.block,
                    num_warps=COPY.num_warps)
    metadata.bump_versions(params)


@_host_copies_under_interpreter("params", "momentum_buffers")
def restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                 maximize, first_step):
    if not params:
        return
    device = params[0].device
    k = _kernels_for(device)
    uses_buffers = momentum != 0
    if uses_buffers:
        layout, (param_table, backup_table, grad_table, buf_table) = _prepare(
            params=params, backups=backups, grads=grads, momentum_buffers=momentum_buffers)
    else:
        layout, (param_table, backup_table, grad_table) = _prepare(params=params, backups=backups, grads=grads)
        buf_table = param_table  # never read without momentum
    with _device_guard(device):
        for group in layout.groups:
            if group.num_programs:
                storage, compute, _ = _triton_types(group.dtype)
                k.restore_sgd_kernel[(group.num_programs,)](
                    param_table, backup_table, grad_table, buf_table, layout.numels, layout.prog_tensor,
                    layout.prog_offset, group.prog_base, float(lr), float(momentum), 1.0 - float(dampening),
                    float(weight_decay), MOMENTUM=uses_buffers, FIRST_STEP=bool(first_step),
                    NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), WEIGHT_DECAY=weight_decay != 0,
                    DTYPE=storage, COMPUTE=compute, CHUNK=CHUNK, BLOCK=SGD.block,
                    num_warps=SGD.num_warps)
    if uses_buffers:
        metadata.bump_versions(params, momentum_buffers)
    else:
        metadata.bump_versions(params)


@_host_copies_under_interpreter()
def norms(tensors):
    if not tensors:
        return torch.zeros(1)
    device = tensors[0].device
    k = _kernels_for(device)
    # perturb_'s passes: its first ascent's sums of squares with ζ = 1 (ζ·t is t exactly), its scale pass
    # without the scales. The pointer tables perturb_sumsq_kernel does not read there (params, backups)
    # get the tensors' own.
    layout, (table,) = _prepare(tensors=tensors)
    acc = _acc_type()
    partials = torch.empty(layout.num_programs, dtype=ACC_DTYPE, device=device)
    result = torch.empty(layout.num_tensors + 1, dtype=torch.float32, device=device)
    with _device_guard(device):
        for group in layout.groups:
            if group.num_programs:
                storage, compute, _ = _triton_types(group.dtype)
                k.perturb_sumsq_kernel[(group.num_programs,)](
                    table, table, table, layout.numels, layout.prog_tensor, layout.prog_offset, partials,
                    group.prog_base, 1.0, FIRST=True, DTYPE=storage, COMPUTE=compute, ACC=acc, CHUNK=CHUNK,
                    BLOCK=SUMSQ.block, eta=0.0, WEIGHTED=False, num_warps=SUMSQ.num_warps)
        k.perturb_scale_kernel[(1,)](
            partials, layout.first_prog, layout.n_chunks, layout.block_chunks, result, result, layout.num_tensors,
            0.0, PER_TENSOR=True, ACC=acc, T_BLOCK=SCALE_T_BLOCK, C_BLOCK=SCALE_C_BLOCK, SURFACE=False,
            SCALES=False, num_warps=SCALE_NUM_WARPS)
    return result


def _pair_coefficients(k, layout, tables, alpha, per_tensor, orthogonal):
    """Passes 1 and 2 of the gradient-reuse ops: the fp64 coefficient of every tensor, on the device. ``tables``:
    (params, backups, grads) for ``restore_orthogonal_`` (``orthogonal``), (grads, orthogonals, grads) for
    ``add_orthogonal_``."""
    device = layout.device
    acc = _acc_type()
    # Both partial sums in one allocation, the second from a 16-byte boundary.
    stride = layout.num_programs + layout.num_programs % 2
    partials = torch.empty(2 * stride, dtype=ACC_DTYPE, device=device)
    partials_x, partials_y = partials[:stride], partials[stride:]
    coefs = torch.empty(layout.num_tensors, dtype=ACC_DTYPE, device=device)
    for group in layout.groups:
        if group.num_programs:
            storage, compute, _ = _triton_types(group.dtype)
            k.pair_sums_kernel[(group.num_programs,)](
                *tables, layout.numels, layout.prog_tensor, layout.prog_offset, partials_x, partials_y,
                group.prog_base, ORTHOGONAL=orthogonal, DTYPE=storage, COMPUTE=compute, ACC=acc, CHUNK=CHUNK,
                BLOCK=PAIR_SUMS.block, num_warps=PAIR_SUMS.num_warps)
    k.pair_scale_kernel[(1,)](
        partials_x, partials_y, layout.first_prog, layout.n_chunks, layout.block_chunks, coefs, layout.num_tensors,
        float(alpha), PER_TENSOR=bool(per_tensor), ORTHOGONAL=orthogonal, ACC=acc, T_BLOCK=SCALE_T_BLOCK,
        C_BLOCK=SCALE_C_BLOCK, num_warps=SCALE_NUM_WARPS)
    return coefs


@_host_copies_under_interpreter("params", "orthogonals")
def restore_orthogonal_(params, backups, grads, orthogonals, per_tensor):
    if not params:
        return
    device = params[0].device
    k = _kernels_for(device)
    layout, (param_table, backup_table, grad_table, orthogonal_table) = _prepare(
        params=params, backups=backups, grads=grads, orthogonals=orthogonals)
    with _device_guard(device):
        coefs = _pair_coefficients(k, layout, (param_table, backup_table, grad_table), 0.0, per_tensor, True)
        for group in layout.groups:
            if group.num_programs:
                storage, compute, _ = _triton_types(group.dtype)
                k.restore_orthogonal_kernel[(group.num_programs,)](
                    param_table, backup_table, grad_table, orthogonal_table, layout.numels, layout.prog_tensor,
                    layout.prog_offset, coefs, group.prog_base, DTYPE=storage, COMPUTE=compute, CHUNK=CHUNK,
                    BLOCK=APPLY.block, num_warps=APPLY.num_warps)
    metadata.bump_versions(params, orthogonals)


@_host_copies_under_interpreter("grads")
def add_orthogonal_(grads, orthogonals, alpha, per_tensor):
    if not grads:
        return
    device = grads[0].device
    k = _kernels_for(device)
    layout, (grad_table, orthogonal_table) = _prepare(grads=grads, orthogonals=orthogonals)
    with _device_guard(device):
        coefs = _pair_coefficients(k, layout, (grad_table, orthogonal_table, grad_table), alpha, per_tensor, False)
        for group in layout.groups:
            if group.num_programs:
                storage, compute, _ = _triton_types(group.dtype)
                k.add_orthogonal_kernel[(group.num_programs,)](
                    grad_table, orthogonal_table, layout.numels, layout.prog_tensor, layout.prog_offset, coefs,
                    group.prog_base, DTYPE=storage, COMPUTE=compute, CHUNK=CHUNK, BLOCK=APPLY.block,
                    num_warps=APPLY.num_warps)
    metadata.bump_versions(grads)
