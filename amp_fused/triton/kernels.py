"""Triton kernels of the AMP ops. Each launch covers every tensor of one dtype group through pointer tables
(see :mod:`amp_fused.triton.metadata`): program ``pid`` handles ``CHUNK`` elements of one tensor.

Compiled, they run on CUDA tensors; under Triton's interpreter (``TRITON_INTERPRET=1`` before triton is
imported) they run on CPU tensors.

Storage dtypes are fp32, fp16, bf16 and fp64; arithmetic runs in ``COMPUTE`` (fp32, fp64 for fp64).
Norms are reduced in ``ACC``, which the host passes as fp64 for every dtype (``ops.ACC_DTYPE``): each Δ is
squared in fp64 and the partial sums are fp64, so finite fp32/fp16/bf16 inputs never overflow the norm. The
reduction runs in a fixed order and without atomics, so the norms are bitwise reproducible.

``perturb_``'s two modes are constexpr flags, so the default kernels (both False) are the code they were
without them: ``SURFACE`` (SAM: scale = ε / (‖u‖ + NORM_EPS) without the min; a scale that overflows, in the
scale pass's fp64 or in the tensor's compute type, is 0: with a global norm over fp32 and fp64 tensors a scale
above fp32's range drops only the fp32/fp16/bf16 tensors' Δ) and ``WEIGHTED`` (ASAM, first ascents only: element
weights T = |θ| + η in the compute type, η a runtime argument; the ascent variable u = ζ·(T·g) is what the
norms measure and the scale projects, and params ← θ + T·(scale·u): scale·u lies in the ε-ball, so this
order does not overflow where forming T·u first could). Without WEIGHTED, u is the plain Δ.

``norms`` runs perturb_'s first-ascent sums of squares (ζ = 1) and its scale pass without the scales (``SCALES``).
The gradient-reuse ops take three passes as perturb_ does, sharing its pieces: two partial sums per program
(``pair_sums_kernel``: Σ Δ·g and Σ Δ² for ``restore_orthogonal_``, Σ g² and Σ v² for ``add_orthogonal_``), one
program that sums them per tensor in the scale pass's fixed order and forms each tensor's fp64 coefficient
(``pair_scale_kernel``), and the apply pass. A coefficient that is 0 (or not finite in the compute type) leaves
the written tensor's own bits: the orthogonals get g's raw bits, the gradients are not written at all.

A program whose chunk lies wholly inside its tensor runs without masks (only a tensor's last chunk
is ragged). Alignment is decided per program, so per tensor: when every address the program uses is a
multiple of 16 bytes (checked in the kernel, one integer test), its unmasked accesses take the path whose
pointers the compiler knows to be 16-byte aligned (vector loads and stores); otherwise the plain path.
One unaligned view thus costs only its own tensor the vector accesses.
"""
import triton
import triton.language as tl

from amp_fused.backends import NORM_EPS

_INF = tl.constexpr(float("inf"))
_NORM_EPS = tl.constexpr(NORM_EPS)


# -- helpers -----------------------------------------------------------------------------------------

@triton.jit
def _as(value, T: tl.constexpr):
    """A float kernel argument as a ``T`` scalar. Compiled, float arguments arrive as fp64 (their
    annotation) and are rounded once; interpreted, they are Python floats and adopt ``T``."""
    return (tl.zeros([], T) + value).to(T)


@triton.jit
def _program(prog_tensor, prog_offset, numels, prog_base, CHUNK: tl.constexpr):
    """(global program id, tensor index, first element, numel) of this program."""
    pid = prog_base + tl.program_id(0)
    t = tl.load(prog_tensor + pid)
    start = tl.multiple_of(tl.load(prog_offset + pid), CHUNK)
    return pid, t, start, tl.load(numels + t)


@triton.jit
def _pointer(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """An address from a pointer table as a pointer to the storage type (bf16 as its uint16 bits).

    ALIGNED: the caller found the address a multiple of 16 bytes. The pointer is then rebuilt from
    ``address // 16`` before the hint, so that the hint marks an op of this path only (``tl.multiple_of``
    marks the op defining its operand, which the unaligned path shares when it is ``address`` itself), and
    so that a wrong choice reads the wrong memory even under the interpreter, where hints do nothing."""
    if ALIGNED:
        address = address // 16 * 16
    if DTYPE == tl.bfloat16:
        ptr = address.to(tl.pointer_type(tl.uint16))
    else:
        ptr = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _all_aligned(a, b, c, d):
    """Whether the four addresses are multiples of 16 bytes."""
    return ((a | b | c | d) & 15) == 0


@triton.jit
def _to_compute(raw, DTYPE: tl.constexpr, COMPUTE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        # bf16 is the upper half of an fp32: widening the bits is exact.
        value = (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        value = raw.to(COMPUTE)
    return value


@triton.jit
def _to_storage(value, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        # Round to nearest even on the bits, as torch does (Triton's interpreter truncates fp32 -> bf16
        # casts, so the cast is spelled out to make both modes agree). A NaN stays a quiet NaN.
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        raw = tl.where(value != value, (bits >> 16) | 0x40, rounded).to(tl.uint16)
    else:
        raw = value.to(DTYPE)
    return raw


@triton.jit
def _load_raw(ptr, offs, mask):
    """Storage values; 0 in masked-off lanes. ``mask`` is None for a full chunk."""
    if mask is None:
        raw = tl.load(ptr + offs)
    else:
        raw = tl.load(ptr + offs, mask=mask, other=0)
    return raw


@triton.jit
def _load(ptr, offs, mask, DTYPE: tl.constexpr, COMPUTE: tl.constexpr):
    """Values in the compute type; 0 in masked-off lanes. ``mask`` is None for a full chunk."""
    # _load_raw and _to_compute inlined: the interpreter pays for every jit-function call.
    if mask is None:
        raw = tl.load(ptr + offs)
    else:
        raw = tl.load(ptr + offs, mask=mask, other=0)
    if DTYPE == tl.bfloat16:
        value = (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        value = raw.to(COMPUTE)
    return value


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    if ACC == tl.float64:
        root = tl.sqrt(x)  # fp64 sqrt is correctly rounded on every target
    else:
        root = tl.sqrt_rn(x)
    return root


@triton.jit
def _div(x, y, ACC: tl.constexpr):
    """x / y, correctly rounded."""
    if ACC == tl.float64:
        ratio = x / y
    else:
        ratio = tl.div_rn(x, y)
    return ratio


@triton.jit
def _projection_scale(norm, epsilon, ACC: tl.constexpr, SURFACE: tl.constexpr):
    """min(1, ε / (‖Δ‖ + NORM_EPS)), and 0 when ‖Δ‖ is not finite (NaN or Inf). SURFACE: ε / (‖Δ‖ + NORM_EPS)
    (Δ onto the sphere), 0 as well when that ratio overflows."""
    ratio = _div(epsilon, norm + _NORM_EPS, ACC)
    if SURFACE:
        scale = tl.where((norm < _INF) & (ratio < _INF), ratio, 0.0)
    else:
        scale = tl.where(norm < _INF, tl.minimum(ratio, 1.0), 0.0)
    return scale


@triton.jit
def _weighted_ascent(grad, theta, zeta, eta):
    """(u, T) of a weighted first ascent, in the compute type: T = |θ| + η, u = ζ·(T·g). The one spelling of u
    for the sum-of-squares and apply passes, which must agree bit for bit."""
    weight = tl.abs(theta) + eta
    return zeta * (weight * grad), weight


# -- perturb_: three passes --------------------------------------------------------------------------

@triton.jit
def _sumsq_chunk(param, grad, backup, start, numel, zeta, eta, MASKED: tl.constexpr, FIRST: tl.constexpr,
                 WEIGHTED: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, ACC: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], ACC)
    for block in tl.static_range(0, CHUNK, BLOCK):
        offs = start + block + tl.arange(0, BLOCK)
        mask = (offs < numel) if MASKED else None
        if WEIGHTED:  # first ascents only (the op layer's contract): θ is params
            delta, _ = _weighted_ascent(_load(grad, offs, mask, DTYPE, COMPUTE),
                                        _load(param, offs, mask, DTYPE, COMPUTE), zeta, eta)
        else:
            delta = zeta * _load(grad, offs, mask, DTYPE, COMPUTE)
        if not FIRST:
            delta = (_load(param, offs, mask, DTYPE, COMPUTE) - _load(backup, offs, mask, DTYPE, COMPUTE)) + delta
        delta = delta.to(ACC)
        acc += delta * delta  # masked-off lanes loaded 0: they add 0
    return tl.sum(acc)


@triton.jit
def perturb_sumsq_kernel(param_ptrs, grad_ptrs, backup_ptrs, numels, prog_tensor, prog_offset, partials, prog_base,
                         inner_lr: tl.float64, FIRST: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                         ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, eta: tl.float64 = 0.0,
                         WEIGHTED: tl.constexpr = False):
    """Pass 1: partials[pid] = Σ u² over this program's chunk, u = ζg (FIRST) or (params − backups) + ζg;
    WEIGHTED (with FIRST): u = ζ·(T·g), T = |params| + eta."""
    tl.static_assert(FIRST or not WEIGHTED, "the weighted ascent is a first ascent")
    pid, t, start, numel = _program(prog_tensor, prog_offset, numels, prog_base, CHUNK)
    zeta = _as(inner_lr, COMPUTE)
    if WEIGHTED:
        eta_c = _as(eta, COMPUTE)
    else:
        eta_c = None
    param = tl.load(param_ptrs + t)
    grad = tl.load(grad_ptrs + t)
    backup = tl.load(backup_ptrs + t)
    if start + CHUNK <= numel:
        if _all_aligned(param, grad, backup, param):
            sumsq = _sumsq_chunk(_pointer(param, DTYPE, True), _pointer(grad, DTYPE, True),
                                 _pointer(backup, DTYPE, True), start, numel, zeta, eta_c, False, FIRST, WEIGHTED,
                                 DTYPE, COMPUTE, ACC, CHUNK, BLOCK)
        else:
            sumsq = _sumsq_chunk(_pointer(param, DTYPE, False), _pointer(grad, DTYPE, False),
                                 _pointer(backup, DTYPE, False), start, numel, zeta, eta_c, False, FIRST, WEIGHTED,
                                 DTYPE, COMPUTE, ACC, CHUNK, BLOCK)
    else:
        sumsq = _sumsq_chunk(_pointer(param, DTYPE, False), _pointer(grad, DTYPE, False),
                             _pointer(backup, DTYPE, False), start, numel, zeta, eta_c, True, FIRST, WEIGHTED, DTYPE,
                             COMPUTE, ACC, CHUNK, BLOCK)
    tl.store(partials + pid, sumsq)


@triton.jit
def _tensor_block(first_prog, n_chunks, block_chunks, t0, n, T_BLOCK: tl.constexpr):
    """The scale pass's block of T_BLOCK tensors from tensor t0: (indices, mask, first program, chunk count, and the
    block's trip count over chunks)."""
    ts = t0 + tl.arange(0, T_BLOCK)
    t_mask = ts < n
    first = tl.load(first_prog + ts, mask=t_mask, other=0)
    count = tl.load(n_chunks + ts, mask=t_mask, other=0)  # 0 beyond n: nothing loaded
    return ts, t_mask, first, count, tl.load(block_chunks + t0 // T_BLOCK)


@triton.jit
def _tensor_sums(partials, first, count, trips, ACC: tl.constexpr, T_BLOCK: tl.constexpr, C_BLOCK: tl.constexpr):
    """Each tensor's sum of its per-program partials, C_BLOCK at a time in a fixed order (the one order every
    reduction of a tensor list takes, so its results are bitwise reproducible)."""
    acc = tl.zeros([T_BLOCK, C_BLOCK], ACC)
    for c0 in range(0, trips, C_BLOCK):
        cs = c0 + tl.arange(0, C_BLOCK)
        acc += tl.load(partials + first[:, None] + cs[None, :], mask=cs[None, :] < count[:, None], other=0.0)
    return tl.sum(acc, axis=1)


@triton.jit
def perturb_scale_kernel(partials, first_prog, n_chunks, block_chunks, norms, scales, n, epsilon: tl.float64,
                         PER_TENSOR: tl.constexpr, ACC: tl.constexpr, T_BLOCK: tl.constexpr,
                         C_BLOCK: tl.constexpr, SURFACE: tl.constexpr = False, SCALES: tl.constexpr = True):
    """Pass 2, one program: per-tensor sums of the partials in a fixed order, the norms (n per-tensor,
    then the global one from the per-tensor sums) and the scale of every tensor. Each block of T_BLOCK
    tensors loops to its own largest chunk count (``block_chunks``), not the list's: a huge tensor costs
    only its own block the long loop. Without SCALES (``norms``) only the norms: ``scales`` and ``epsilon``
    are not used."""
    eps = _as(epsilon, ACC)
    total = tl.zeros([T_BLOCK], ACC)
    for t0 in range(0, n, T_BLOCK):
        ts, t_mask, first, count, trips = _tensor_block(first_prog, n_chunks, block_chunks, t0, n, T_BLOCK)
        sumsq = _tensor_sums(partials, first, count, trips, ACC, T_BLOCK, C_BLOCK)
        norm = _sqrt(sumsq, ACC)
        tl.store(norms + ts, norm.to(tl.float32), mask=t_mask)
        total += sumsq
        if SCALES and PER_TENSOR:
            tl.store(scales + ts, _projection_scale(norm, eps, ACC, SURFACE), mask=t_mask)
    total_norm = _sqrt(tl.sum(total), ACC)
    tl.store(norms + n, total_norm.to(tl.float32))
    if SCALES and not PER_TENSOR:
        scale = tl.zeros([T_BLOCK], ACC) + _projection_scale(total_norm, eps, ACC, SURFACE)
        for t0 in range(0, n, T_BLOCK):
            ts = t0 + tl.arange(0, T_BLOCK)
            tl.store(scales + ts, scale, mask=ts < n)


@triton.jit
def _apply_chunk(param, grad, backup, start, numel, zeta, eta, scale, moves, MASKED: tl.constexpr,
                 FIRST: tl.constexpr, WEIGHTED: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    for block in tl.static_range(0, CHUNK, BLOCK):
        offs = start + block + tl.arange(0, BLOCK)
        mask = (offs < numel) if MASKED else None
        if FIRST:
            theta_raw = _load_raw(param, offs, mask)
            tl.store(backup + offs, theta_raw, mask=mask)
        else:
            theta_raw = _load_raw(backup, offs, mask)
        if moves:
            theta = _to_compute(theta_raw, DTYPE, COMPUTE)
            if WEIGHTED:  # with FIRST
                u, weight = _weighted_ascent(_load(grad, offs, mask, DTYPE, COMPUTE), theta, zeta, eta)
                tl.store(param + offs, _to_storage(theta + weight * (scale * u), DTYPE), mask=mask)
            else:
                delta = zeta * _load(grad, offs, mask, DTYPE, COMPUTE)
                if not FIRST:
                    delta = (_load(param, offs, mask, DTYPE, COMPUTE) - theta) + delta
                tl.store(param + offs, _to_storage(theta + scale * delta, DTYPE), mask=mask)
        else:
            # A dropped Δ may hold NaN/Inf: write θ's own bits, no arithmetic on them.
            tl.store(param + offs, theta_raw, mask=mask)


@triton.jit
def perturb_apply_kernel(param_ptrs, grad_ptrs, backup_ptrs, numels, prog_tensor, prog_offset, scales, prog_base,
                         inner_lr: tl.float64, FIRST: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr, eta: tl.float64 = 0.0,
                         SURFACE: tl.constexpr = False, WEIGHTED: tl.constexpr = False):
    """Pass 3: params ← θ + scale·Δ (WEIGHTED: θ + T·(scale·u)), or exactly θ where scale is 0 (FIRST: also
    backups ← θ). SURFACE: a scale that overflows the compute type (fp32 for fp32/fp16/bf16) counts as 0."""
    tl.static_assert(FIRST or not WEIGHTED, "the weighted ascent is a first ascent")
    _, t, start, numel = _program(prog_tensor, prog_offset, numels, prog_base, CHUNK)
    zeta = _as(inner_lr, COMPUTE)
    if WEIGHTED:
        eta_c = _as(eta, COMPUTE)
    else:
        eta_c = None
    param = tl.load(param_ptrs + t)
    grad = tl.load(grad_ptrs + t)
    backup = tl.load(backup_ptrs + t)
    scale_acc = tl.load(scales + t)
    moves = scale_acc != 0
    scale = scale_acc.to(COMPUTE)
    if SURFACE:  # without the min a finite fp64 scale may round to Inf in fp32 (a tiny ‖u‖, or a zero u)
        moves = moves & (scale < _INF)
    if start + CHUNK <= numel:
        if _all_aligned(param, grad, backup, param):
            _apply_chunk(_pointer(param, DTYPE, True), _pointer(grad, DTYPE, True), _pointer(backup, DTYPE, True),
                         start, numel, zeta, eta_c, scale, moves, False, FIRST, WEIGHTED, DTYPE, COMPUTE, CHUNK,
                         BLOCK)
        else:
            _apply_chunk(_pointer(param, DTYPE, False), _pointer(grad, DTYPE, False),
                         _pointer(backup, DTYPE, False), start, numel, zeta, eta_c, scale, moves, False, FIRST,
                         WEIGHTED, DTYPE, COMPUTE, CHUNK, BLOCK)
    else:
        _apply_chunk(_pointer(param, DTYPE, False), _pointer(grad, DTYPE, False), _pointer(backup, DTYPE, False),
                     start, numel, zeta, eta_c, scale, moves, True, FIRST, WEIGHTED, DTYPE, COMPUTE, CHUNK, BLOCK)


# -- restore_orthogonal_ and add_orthogonal_: two sums per element, coefficients, apply ------------------------

@triton.jit
def _pair_sums_chunk(a, b, c, start, numel, MASKED: tl.constexpr, ORTHOGONAL: tl.constexpr, DTYPE: tl.constexpr,
                     COMPUTE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    acc_x = tl.zeros([BLOCK], ACC)
    acc_y = tl.zeros([BLOCK], ACC)
    for block in tl.static_range(0, CHUNK, BLOCK):
        offs = start + block + tl.arange(0, BLOCK)
        mask = (offs < numel) if MASKED else None
        if ORTHOGONAL:  # a, b, c: params, backups, grads. Δ in the compute type, as the apply pass forms it
            delta = (_load(a, offs, mask, DTYPE, COMPUTE) - _load(b, offs, mask, DTYPE, COMPUTE)).to(ACC)
            acc_x += delta * _load(c, offs, mask, DTYPE, COMPUTE).to(ACC)
            acc_y += delta * delta
        else:  # a, b: grads, orthogonals
            grad = _load(a, offs, mask, DTYPE, COMPUTE).to(ACC)
            orthogonal = _load(b, offs, mask, DTYPE, COMPUTE).to(ACC)
            acc_x += grad * grad
            acc_y += orthogonal * orthogonal
    return tl.sum(acc_x), tl.sum(acc_y)


@triton.jit
def pair_sums_kernel(a_ptrs, b_ptrs, c_ptrs, numels, prog_tensor, prog_offset, partials_x, partials_y, prog_base,
                     ORTHOGONAL: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, ACC: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 of the gradient-reuse ops: two partial sums of this program's chunk. ORTHOGONAL
    (``restore_orthogonal_``; a, b, c: params, backups, grads): partials_x[pid] = Σ Δ·g and partials_y[pid] = Σ Δ²,
    Δ = params − backups; else (``add_orthogonal_``; a, b: grads, orthogonals, c unused): Σ g² and Σ v²."""
    pid, t, start, numel = _program(prog_tensor, prog_offset, numels, prog_base, CHUNK)
    a = tl.load(a_ptrs + t)
    b = tl.load(b_ptrs + t)
    if ORTHOGONAL:
        c = tl.load(c_ptrs + t)
    else:
        c = a
    if start + CHUNK <= numel:
        if _all_aligned(a, b, c, a):
            x, y = _pair_sums_chunk(_pointer(a, DTYPE, True), _pointer(b, DTYPE, True), _pointer(c, DTYPE, True),
                                    start, numel, False, ORTHOGONAL, DTYPE, COMPUTE, ACC, CHUNK, BLOCK)
        else:
            x, y = _pair_sums_chunk(_pointer(a, DTYPE, False), _pointer(b, DTYPE, False), _pointer(c, DTYPE, False),
                                    start, numel, False, ORTHOGONAL, DTYPE, COMPUTE, ACC, CHUNK, BLOCK)
    else:
        x, y = _pair_sums_chunk(_pointer(a, DTYPE, False), _pointer(b, DTYPE, False), _pointer(c, DTYPE, False),
                                start, numel, True, ORTHOGONAL, DTYPE, COMPUTE, ACC, CHUNK, BLOCK)
    tl.store(partials_x + pid, x)
    tl.store(partials_y + pid, y)


@triton.jit
def _pair_coefficient(x, y, alpha, ACC: tl.constexpr, ORTHOGONAL: tl.constexpr):
    """ORTHOGONAL: c = ⟨Δ,g⟩ / ‖Δ‖² from x = ⟨Δ,g⟩, y = ‖Δ‖², 0 where ‖Δ‖² is not > 0 (csrc/amp_math.h
    orthogonal_coefficient); else α·‖g‖ / ‖v‖ from x = ‖g‖², y = ‖v‖² (direction_coefficient). Either is 0
    where it is not finite."""
    if ORTHOGONAL:
        coef = tl.where(y > 0, _div(x, y, ACC), 0.0)
    else:
        coef = _div(alpha * _sqrt(x, ACC), _sqrt(y, ACC), ACC)
    return tl.where(tl.abs(coef) < _INF, coef, 0.0)


@triton.jit
def pair_scale_kernel(partials_x, partials_y, first_prog, n_chunks, block_chunks, coefs, n, alpha: tl.float64,
                      PER_TENSOR: tl.constexpr, ORTHOGONAL: tl.constexpr, ACC: tl.constexpr, T_BLOCK: tl.constexpr,
                      C_BLOCK: tl.constexpr):
    """Pass 2, one program: the per-tensor sums of both partials in the scale pass's fixed order, and each tensor's
    coefficient (:func:`_pair_coefficient`) from its own sums (PER_TENSOR) or from the sums over all tensors."""
    alpha_acc = _as(alpha, ACC)
    total_x = tl.zeros([T_BLOCK], ACC)
    total_y = tl.zeros([T_BLOCK], ACC)
    for t0 in range(0, n, T_BLOCK):
        ts, t_mask, first, count, trips = _tensor_block(first_prog, n_chunks, block_chunks, t0, n, T_BLOCK)
        x = _tensor_sums(partials_x, first, count, trips, ACC, T_BLOCK, C_BLOCK)
        y = _tensor_sums(partials_y, first, count, trips, ACC, T_BLOCK, C_BLOCK)
        if PER_TENSOR:
            tl.store(coefs + ts, _pair_coefficient(x, y, alpha_acc, ACC, ORTHOGONAL), mask=t_mask)
        else:
            total_x += x
            total_y += y
    if not PER_TENSOR:
        coef = tl.zeros([T_BLOCK], ACC) + _pair_coefficient(tl.sum(total_x), tl.sum(total_y), alpha_acc, ACC,
                                                            ORTHOGONAL)
        for t0 in range(0, n, T_BLOCK):
            ts = t0 + tl.arange(0, T_BLOCK)
            tl.store(coefs + ts, coef, mask=ts < n)


@triton.jit
def _coefficient(coefs, t, COMPUTE: tl.constexpr):
    """Tensor t's coefficient in the compute type, and whether it moves anything: it is not 0 and finite there (a
    finite fp64 coefficient beyond fp32's range counts as 0 for fp32/fp16/bf16 tensors, which it would fill with
    Inf and NaN)."""
    coef = tl.load(coefs + t).to(COMPUTE)
    return coef, (coef != 0) & (tl.abs(coef) < _INF)


@triton.jit
def _restore_orthogonal_chunk(param, backup, grad, orthogonal, start, numel, coef, moves, MASKED: tl.constexpr,
                              DTYPE: tl.constexpr, COMPUTE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    for block in tl.static_range(0, CHUNK, BLOCK):
        offs = start + block + tl.arange(0, BLOCK)
        mask = (offs < numel) if MASKED else None
        theta_raw = _load_raw(backup, offs, mask)
        if moves:
            delta = _load(param, offs, mask, DTYPE, COMPUTE) - _to_compute(theta_raw, DTYPE, COMPUTE)
            value = _load(grad, offs, mask, DTYPE, COMPUTE) - coef * delta
            tl.store(orthogonal + offs, _to_storage(value, DTYPE), mask=mask)
        else:
            # c = 0: g's own bits, no arithmetic on Δ (which may hold NaN/Inf).
            tl.store(orthogonal + offs, _load_raw(grad, offs, mask), mask=mask)
        tl.store(param + offs, theta_raw, mask=mask)


@triton.jit
def restore_orthogonal_kernel(param_ptrs, backup_ptrs, grad_ptrs, orthogonal_ptrs, numels, prog_tensor, prog_offset,
                              coefs, prog_base, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, CHUNK: tl.constexpr,
                              BLOCK: tl.constexpr):
    """Pass 3 of ``restore_orthogonal_``: orthogonals ← g − c·Δ (exactly g where c is 0), params ← θ's bits."""
    _, t, start, numel = _program(prog_tensor, prog_offset, numels, prog_base, CHUNK)
    param = tl.load(param_ptrs + t)
    backup = tl.load(backup_ptrs + t)
    grad = tl.load(grad_ptrs + t)
    orthogonal = tl.load(orthogonal_ptrs + t)
    coef, moves = _coefficient(coefs, t, COMPUTE)
    if start + CHUNK <= numel:
        if _all_aligned(param, backup, grad, orthogonal):
            _restore_orthogonal_chunk(_pointer(param, DTYPE, True), _pointer(backup, DTYPE, True),
                                      _pointer(grad, DTYPE, True), _pointer(orthogonal, DTYPE, True), start, numel,
                                      coef, moves, False, DTYPE, COMPUTE, CHUNK, BLOCK)
        else:
            _restore_orthogonal_chunk(_pointer(param, DTYPE, False), _pointer(backup, DTYPE, False),
                                      _pointer(grad, DTYPE, False), _pointer(orthogonal, DTYPE, False), start, numel,
                                      coef, moves, False, DTYPE, COMPUTE, CHUNK, BLOCK)
    else:
        _restore_orthogonal_chunk(_pointer(param, DTYPE, False), _pointer(backup, DTYPE, False),
                                  _pointer(grad, DTYPE, False), _pointer(orthogonal, DTYPE, False), start, numel, coef,
                                  moves, True, DTYPE, COMPUTE, CHUNK, BLOCK)


@triton.jit
def _add_orthogonal_chunk(grad, orthogonal, start, numel, coef, MASKED: tl.constexpr, DTYPE: tl.constexpr,
                          COMPUTE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    for block in tl.static_range(0, CHUNK, BLOCK):
        offs = start + block + tl.arange(0, BLOCK)
        mask = (offs < numel) if MASKED else None
        value = _load(grad, offs, mask, DTYPE, COMPUTE) + coef * _load(orthogonal, offs, mask, DTYPE, COMPUTE)
        tl.store(grad + offs, _to_storage(value, DTYPE), mask=mask)


@triton.jit
def add_orthogonal_kernel(grad_ptrs, orthogonal_ptrs, numels, prog_tensor, prog_offset, coefs, prog_base,
                          DTYPE: tl.constexpr, COMPUTE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 3 of ``add_orthogonal_``: grads ← g + coef·v; where coef is 0 the program writes nothing (g keeps its
    bits, and a NaN/Inf v never reaches it)."""
    _, t, start, numel = _program(prog_tensor, prog_offset, numels, prog_base, CHUNK)
    coef, moves = _coefficient(coefs, t, COMPUTE)
    if moves:
        grad = tl.load(grad_ptrs + t)
        orthogonal = tl.load(orthogonal_ptrs + t)
        if start + CHUNK <= numel:
            if _all_aligned(grad, orthogonal, grad, orthogonal):
                _add_orthogonal_chunk(_pointer(grad, DTYPE, True), _pointer(orthogonal, DTYPE, True), start, numel,
                                      coef, False, DTYPE, COMPUTE, CHUNK, BLOCK)
            else:
                _add_orthogonal_chunk(_pointer(grad, DTYPE, False), _pointer(orthogonal, DTYPE, False), start, numel,
                                      coef, False, DTYPE, COMPUTE, CHUNK, BLOCK)
        else:
            _add_orthogonal_chunk(_pointer(grad, DTYPE, False), _pointer(orthogonal, DTYPE, False), start, numel,
                                  coef, True, DTYPE, COMPUTE, CHUNK, BLOCK)


# -- restore_sgd_ and restore_: one pass each --------------------------------------------------------

@triton.jit
def _sgd_chunk(param, backup, grad, buf, start, numel, lr, momentum, one_minus_dampening, weight_decay,
               MASKED: tl.constexpr, MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    for block in tl.static_range(0, CHUNK, BLOCK):
        offs = start + block + tl.arange(0, BLOCK)
        mask = (offs < numel) if MASKED else None
        theta = _load(backup, offs, mask, DTYPE, COMPUTE)
        d_p = _load(grad, offs, mask, DTYPE, COMPUTE)
        if MAXIMIZE:
            d_p = -d_p
        if WEIGHT_DECAY:
            d_p = d_p + weight_decay * theta
        if MOMENTUM:
            if FIRST_STEP:
                new_buf = d_p
            else:
                new_buf = momentum * _load(buf, offs, mask, DTYPE, COMPUTE) + one_minus_dampening * d_p
            tl.store(buf + offs, _to_storage(new_buf, DTYPE), mask=mask)
            if NESTEROV:
                d_p = d_p + momentum * new_buf
            else:
                d_p = new_buf
        tl.store(param + offs, _to_storage(theta - lr * d_p, DTYPE), mask=mask)


@triton.jit
def restore_sgd_kernel(param_ptrs, backup_ptrs, grad_ptrs, buf_ptrs, numels, prog_tensor, prog_offset, prog_base,
                       lr: tl.float64, momentum: tl.float64, one_minus_dampening: tl.float64,
                       weight_decay: tl.float64, MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr,
                       NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                       DTYPE: tl.constexpr, COMPUTE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """params ← θ, then one torch.optim.SGD step on it with grads (buffers only touched when MOMENTUM)."""
    _, t, start, numel = _program(prog_tensor, prog_offset, numels, prog_base, CHUNK)
    lr_c = _as(lr, COMPUTE)
    momentum_c = _as(momentum, COMPUTE)
    one_minus_dampening_c = _as(one_minus_dampening, COMPUTE)
    weight_decay_c = _as(weight_decay, COMPUTE)
    param = tl.load(param_ptrs + t)
    backup = tl.load(backup_ptrs + t)
    grad = tl.load(grad_ptrs + t)
    buf = tl.load(buf_ptrs + t)  # without MOMENTUM the params' table stands in, unused
    if start + CHUNK <= numel:
        if _all_aligned(param, backup, grad, buf):
            _sgd_chunk(_pointer(param, DTYPE, True), _pointer(backup, DTYPE, True), _pointer(grad, DTYPE, True),
                       _pointer(buf, DTYPE, True), start, numel, lr_c, momentum_c, one_minus_dampening_c,
                       weight_decay_c, False, MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE, WEIGHT_DECAY, DTYPE, COMPUTE,
                       CHUNK, BLOCK)
        else:
            _sgd_chunk(_pointer(param, DTYPE, False), _pointer(backup, DTYPE, False), _pointer(grad, DTYPE, False),
                       _pointer(buf, DTYPE, False), start, numel, lr_c, momentum_c, one_minus_dampening_c,
                       weight_decay_c, False, MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE, WEIGHT_DECAY, DTYPE, COMPUTE,
                       CHUNK, BLOCK)
    else:
        _sgd_chunk(_pointer(param, DTYPE, False), _pointer(backup, DTYPE, False), _pointer(grad, DTYPE, False),
                   _pointer(buf, DTYPE, False), start, numel, lr_c, momentum_c, one_minus_dampening_c, weight_decay_c,
                   True, MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE, WEIGHT_DECAY, DTYPE, COMPUTE, CHUNK, BLOCK)


@triton.jit
def _copy_chunk(dst, src, start, numel, MASKED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    for block in tl.static_range(0, CHUNK, BLOCK):
        offs = start + block + tl.arange(0, BLOCK)
        mask = (offs < numel) if MASKED else None
        tl.store(dst + offs, _load_raw(src, offs, mask), mask=mask)


@triton.jit
def copy_kernel(dst_ptrs, src_ptrs, numels, prog_tensor, prog_offset, prog_base, WORD: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """dst ← src, moved as integer words of the element size: a bit-exact copy, NaN payloads included."""
    _, t, start, numel = _program(prog_tensor, prog_offset, numels, prog_base, CHUNK)
    dst = tl.load(dst_ptrs + t)
    src = tl.load(src_ptrs + t)
    if start + CHUNK <= numel:
        if _all_aligned(dst, src, dst, src):
            _copy_chunk(_pointer(dst, WORD, True), _pointer(src, WORD, True), start, numel, False, CHUNK, BLOCK)
        else:
            _copy_chunk(_pointer(dst, WORD, False), _pointer(src, WORD, False), start, numel, False, CHUNK, BLOCK)
    else:
        _copy_chunk(_pointer(dst, WORD, False), _pointer(src, WORD, False), start, numel, True, CHUNK, BLOCK)
