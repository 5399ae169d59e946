"""The op table's definition in float64 torch math: what every backend is compared with.

Written from the op table's text (README "Backends", ``amp_fused/backends/__init__.py``), not by calling
any backend: each function takes what the op reads and returns, in float64, what the op must produce.

``perturb_(params, grads, backups, epsilon, inner_lr, per_tensor, first, surface, eta) -> norms``
    first ascent Δ = ζ·g (θ = params), later ascents Δ = (params − θ) + ζ·g with θ the parameters the first
    ascent saved; scale = min(1, ε / (‖Δ‖ + NORM_EPS)) per tensor or once over all tensors; a governing
    norm that is not finite drops Δ (that tensor's, or for the global norm every tensor's); params ← θ +
    scale·Δ; returns ‖Δ‖ before projection, per tensor, then over all tensors. ``surface`` (SAM): scale =
    ε / (‖Δ‖ + NORM_EPS), no min. ``eta`` (ASAM, first ascents): T = |θ| + η, u = ζ·T·g is what is normed
    and projected, params ← θ + scale·T·u.
``restore_(params, backups)``: params ← θ.
``restore_sgd_(...)``: params ← θ, then one ``torch.optim.SGD`` step (maximize, weight_decay, momentum
    with ``first_step`` initialising the buffer to d_p, dampening, nesterov).
``perturbation(params, backups)``: Δ = params − θ.
``norms(tensors)``: ‖t‖₂ per tensor, then over all tensors.
``restore_orthogonal_(params, backups, grads, orthogonals, per_tensor)``: Δ = params − θ, c = ⟨Δ,g⟩/‖Δ‖² per
    tensor or over all (0 where ‖Δ‖² is 0 or c is not finite), orthogonals ← g − c·Δ (g where c = 0), params ← θ.
``add_orthogonal_(grads, orthogonals, alpha, per_tensor)``: coef = α·‖g‖/‖v‖ per tensor or over all (0 where
    not finite), grads ← g + coef·v (g where coef = 0).

Besides the definition: building tensor lists, and the error each dtype allows a backend (``*_bounds``).
Backends round, the definition does not; every test compares against a bound derived here, and shows
that the effect it checks is far larger than that bound (:func:`moved`, :func:`bound_norm`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from amp_fused.backends import NORM_EPS

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
Tensors = Sequence[torch.Tensor]


# -- the definition -------------------------------------------------------------------------------------------
def projection_scale(epsilon: float, norm: float, surface: bool = False) -> float:
    """The factor Δ is scaled by: min(1, ε / (‖Δ‖ + NORM_EPS)) (``surface``: ε / (‖Δ‖ + NORM_EPS), Δ on the
    sphere), and 0 (Δ dropped) for a norm that is not finite."""
    norm = float(norm)
    if not math.isfinite(norm):
        return 0.0
    if surface:
        return epsilon / (norm + NORM_EPS)
    return min(1.0, epsilon / (norm + NORM_EPS))


def l2(tensor: torch.Tensor) -> float:
    """‖t‖₂ in float64 (NaN or Inf when an element is)."""
    return float(torch.linalg.vector_norm(tensor.to(torch.float64)))


def total_norm(norms: Sequence[float]) -> float:
    """The norm over all tensors from the per-tensor norms (NaN or Inf when one of them is)."""
    return math.sqrt(math.fsum(n * n for n in norms))


def projection_scales(norms: Sequence[float], epsilon: float, per_tensor: bool, surface: bool = False) -> list[float]:
    """The scale of each tensor: from its own norm (``per_tensor``) or from the norm over all of them."""
    if per_tensor:
        return [projection_scale(epsilon, n, surface) for n in norms]
    return [projection_scale(epsilon, total_norm(norms), surface)] * len(norms)


class Ascent(NamedTuple):
    """What one ``perturb_`` call must produce, and the terms it is made of (all float64)."""

    params: list  # θ + scale·T·Δ; exactly θ where Δ is dropped
    theta: list  # θ
    old: list  # Δ before this ascent: params − θ (zeros on the first ascent)
    step: list  # ζ·g (ASAM: ζ·T·g)
    delta: list  # Δ = old + step, before projection (ASAM: u, in the coordinates θ/T)
    norms: torch.Tensor  # ‖Δ‖ per tensor, then over all tensors (n + 1)
    scales: list  # per tensor; 0.0 where Δ is dropped
    weights: list | None = None  # ASAM's T = |θ| + η per tensor; None without element weights


def perturb(params: Tensors, grads: Tensors, theta: Tensors | None, epsilon: float, inner_lr: float,
            per_tensor: bool, first: bool, surface: bool = False, eta: float | None = None) -> Ascent:
    """The effect of ``perturb_`` on ``params`` (the values before the call). ``theta``: the parameters the
    first ascent saved (read only when ``first`` is false). ``surface``: SAM's scale; ``eta``: ASAM's element
    weights T = |θ| + η (first ascents only): u = ζ·T·g is projected and params ← θ + scale·T·u."""
    assert eta is None or first, "the op refuses eta on later ascents"
    theta = [(p if first else t).to(torch.float64, copy=True) for p, t in zip(params, theta or params)]
    weights = None if eta is None else [t.abs() + eta for t in theta]
    old = [torch.zeros_like(t) if first else p.to(torch.float64) - t for p, t in zip(params, theta)]
    step = [inner_lr * g.to(torch.float64) for g in grads]
    if weights is not None:
        step = [w * s for w, s in zip(weights, step)]
    delta = [o + s for o, s in zip(old, step)]
    norms = [l2(d) for d in delta]
    scales = projection_scales(norms, epsilon, per_tensor, surface)
    moves = delta if weights is None else [w * d for w, d in zip(weights, delta)]
    new = [t + s * d if s != 0.0 else t.clone() for t, d, s in zip(theta, moves, scales)]
    return Ascent(new, theta, old, step, delta, torch.tensor(norms + [total_norm(norms)], dtype=torch.float64),
                  scales, weights)


def restore(theta: Tensors) -> list:
    """The effect of ``restore_``: θ."""
    return [t.to(torch.float64, copy=True) for t in theta]


class SGDStep(NamedTuple):
    params: list  # float64
    momentum_buffers: list  # float64; empty without momentum (the op leaves the buffers alone then)


def restore_sgd(theta: Tensors, grads: Tensors, momentum_buffers: Tensors, lr: float, momentum: float = 0.0,
                dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
                first_step: bool = False) -> SGDStep:
    """The effect of ``restore_sgd_``: one ``torch.optim.SGD`` step from θ with ``grads``, as its
    documentation writes it (``momentum_buffers`` are read unless ``first_step`` or without momentum)."""
    params, buffers = [], []
    for i, (t, g) in enumerate(zip(theta, grads)):
        t, d_p = t.to(torch.float64), g.to(torch.float64)
        if maximize:
            d_p = -d_p
        if weight_decay != 0:
            d_p = d_p + weight_decay * t
        if momentum != 0:
            buf = d_p.clone() if first_step else momentum * momentum_buffers[i].to(torch.float64) + (1 - dampening) * d_p
            buffers.append(buf)
            d_p = d_p + momentum * buf if nesterov else buf
        params.append(t - lr * d_p)
    return SGDStep(params, buffers)


def perturbation(params: Tensors, theta: Tensors) -> list:
    """The effect of ``perturbation``: Δ = params − θ."""
    return [p.to(torch.float64) - t.to(torch.float64) for p, t in zip(params, theta)]


def norms(tensors: Tensors) -> torch.Tensor:
    """The effect of ``norms``: ‖t‖₂ per tensor, then the norm over all of them (float64)."""
    values = [l2(t) for t in tensors]
    return torch.tensor(values + [total_norm(values)], dtype=torch.float64)


def orthogonal_coefficient(dot: float, squared_norm: float) -> float:
    """c of g − c·Δ: ⟨Δ,g⟩/‖Δ‖², 0 where ‖Δ‖² is not > 0 or c is not finite."""
    if not squared_norm > 0.0:
        return 0.0
    c = dot / squared_norm
    return c if math.isfinite(c) else 0.0


class Orthogonal(NamedTuple):
    orthogonals: list  # float64 g − c·Δ
    coefficients: list  # c of each tensor
    deltas: list  # float64 Δ = params − θ


def restore_orthogonal(params: Tensors, theta: Tensors, grads: Tensors, per_tensor: bool) -> Orthogonal:
    """The effect of ``restore_orthogonal_`` on ``orthogonals`` (params become θ, as ``restore``)."""
    deltas = perturbation(params, theta)
    wide = [g.to(torch.float64) for g in grads]
    dots = [float((d * g).sum()) for d, g in zip(deltas, wide)]
    squares = [float(d.square().sum()) for d in deltas]
    if per_tensor:
        coefficients = [orthogonal_coefficient(dot, sq) for dot, sq in zip(dots, squares)]
    else:
        coefficients = [orthogonal_coefficient(math.fsum(dots), math.fsum(squares))] * len(deltas)
    orthogonals = [g - c * d if c != 0.0 else g.clone() for g, d, c in zip(wide, deltas, coefficients)]
    return Orthogonal(orthogonals, coefficients, deltas)


def direction_coefficients(grads: Tensors, orthogonals: Tensors, alpha: float, per_tensor: bool) -> list:
    """coef of ``add_orthogonal_``: α·‖g‖/‖v‖ per tensor or over all, 0 where not finite."""
    g_norms, v_norms = [l2(g) for g in grads], [l2(v) for v in orthogonals]
    if not per_tensor:
        g_norms = [total_norm(g_norms)] * len(g_norms)
        v_norms = [total_norm(v_norms)] * len(v_norms)
    coefficients = []
    for a, b in zip(g_norms, v_norms):
        with_errors_as_nan = alpha * a / b if b != 0.0 else (math.nan if a == 0.0 or alpha == 0.0 else math.inf)
        coefficients.append(with_errors_as_nan if math.isfinite(with_errors_as_nan) else 0.0)
    return coefficients


def add_orthogonal(grads: Tensors, orthogonals: Tensors, alpha: float, per_tensor: bool) -> list:
    """The effect of ``add_orthogonal_`` on ``grads`` (float64)."""
    coefficients = direction_coefficients(grads, orthogonals, alpha, per_tensor)
    return [g.to(torch.float64) + c * v.to(torch.float64) if c != 0.0 else g.to(torch.float64, copy=True)
            for g, v, c in zip(grads, orthogonals, coefficients)]


# -- tensor lists -----------------------------------------------------------------------------------------------
def make_lists(shapes, dtypes, seed: int, device="cpu", param_scale: float = 0.01, grad_scale: float = 1.0):
    """(params, grads): small parameters (as trained weights are) and gradients of ``grad_scale``, drawn in
    float64 and rounded to each dtype. ``dtypes``: one dtype or one per shape."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    gen = torch.Generator().manual_seed(seed)
    params = [(param_scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(device, d)
              for s, d in zip(shapes, dtypes)]
    grads = [(grad_scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(device, d)
             for s, d in zip(shapes, dtypes)]
    return params, grads


def epsilon_for(grads: Tensors, inner_lr: float, per_tensor: bool) -> float:
    """An ε that projects some tensors and leaves the others (``per_tensor``: between the two middle norms of
    ζ·g), or that halves the global Δ."""
    norms = sorted(inner_lr * l2(g) for g in grads if g.numel())
    if per_tensor:
        return 0.5 * (norms[len(norms) // 2 - 1] + norms[len(norms) // 2])
    return 0.5 * math.sqrt(sum(n * n for n in norms))


def clones(tensors: Tensors) -> list:
    return [t.clone() for t in tensors]  # preserve_format: layouts are kept


def empty_like(tensors: Tensors) -> list:
    return [torch.empty_like(t) for t in tensors]


def dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that comparisons are bitwise (NaN payloads and -0.0 included)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def random_bits(shape, dtype, gen, device="cpu") -> torch.Tensor:
    """Every bit pattern of ``dtype`` equally likely: NaNs with payloads, infinities, -0.0, subnormals."""
    integer = {8: torch.int64, 4: torch.int32, 2: torch.int16}[dtype.itemsize]
    info = torch.iinfo(integer)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=integer).view(dtype).to(device)


def assert_bitwise_equal(actual: Tensors, expected: Tensors, what: str = "tensor") -> None:
    assert len(actual) == len(expected), (len(actual), len(expected))
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what} {i}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
        assert torch.equal(bits(a).cpu(), bits(e).cpu()), f"{what} {i} differs bitwise"


def assert_within(actual: Tensors, expected: Tensors, bounds: Tensors, what: str = "tensor") -> None:
    """|actual − expected| ≤ bound elementwise, compared in float64 (with the smallest normal of the dtype
    as slack for results that round to subnormals); every actual value finite."""
    assert len(actual) == len(expected) == len(bounds), (len(actual), len(expected), len(bounds))
    for i, (a, e, b) in enumerate(zip(actual, expected, bounds)):
        assert a.shape == e.shape, f"{what} {i}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        if a.numel() == 0:
            continue
        a64, e64, b64 = a.detach().cpu().double(), e.detach().cpu().double(), b.cpu().double()
        assert torch.isfinite(a64).all(), f"{what} {i} ({a.dtype}, shape {tuple(a.shape)}) is not finite"
        excess = ((a64 - e64).abs() - b64 - torch.finfo(a.dtype).tiny).max().item()
        assert excess <= 0, f"{what} {i} ({a.dtype}, shape {tuple(a.shape)}) is off by {excess:.3g} beyond its bound"


def moved(after: Tensors, before: Tensors) -> float:
    """‖after − before‖₂ over the whole list, in float64."""
    return math.sqrt(sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(after, before)))


def bound_norm(bounds: Tensors) -> float:
    """The L2 norm of an error envelope, to show that a movement is far larger than what a test allows."""
    return math.sqrt(sum(float((b.double() ** 2).sum()) for b in bounds))


# -- tolerances -----------------------------------------------------------------------------------------------
# Unit roundoff of each storage dtype: a correctly rounded result is within one of these (relative).
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Roundings a backend may spend on each term of a result: the fused kernels round once from fp32 (fp64 for
# fp64), foreach and reference round Δ, ζ·g and scale·Δ to the storage dtype in separate ops.
ULPS = 4
# ASAM's element weights: T = |θ| + η and the two products with T are rounded as well.
WEIGHT_ULPS = 3
# torch.optim.SGD rounds each of its few steps once: fewer roundings per term than an ascent.
SGD_ULPS = 2
# Relative error of a norm beyond the rounding of Δ itself: sums of squares in fp32 (fp64 for fp64 tensors;
# fp32 for every dtype in some backends, so fp64 lists get fp32-accurate scales there too).
NORM_RTOL = {torch.float64: 2e-7, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def norm_bounds(ascent: Ascent, dtypes, subtracts_back: bool = False) -> torch.Tensor:
    """|returned norm − ‖Δ‖| allowed (n + 1 values): the norm's own accumulation error, the fp32 result,
    and ULPS roundings of the terms Δ is summed from (the norm is only as exact as Δ's parts were large).
    ``subtracts_back``: the backend keeps Δ, not θ, so its Δ_old is off by the rounding of params too."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(ascent.delta)
    term_sums = []
    for d, o, s, t, dtype in zip(ascent.delta, ascent.old, ascent.step, ascent.theta, dtypes):
        terms = o.abs() + s.abs() + (t.abs() if subtracts_back else 0)
        term_sums.append(float(((ULPS * UNIT[dtype] * terms) ** 2).sum()))
    rtols = [max(NORM_RTOL[d], 2.0**-23) for d in dtypes]
    per_tensor = [r * abs(float(n)) + math.sqrt(s) for r, n, s in zip(rtols, ascent.norms[:-1], term_sums)]
    total = max(rtols, default=0.0) * abs(float(ascent.norms[-1])) + math.sqrt(sum(term_sums))
    return torch.tensor(per_tensor + [total], dtype=torch.float64)


def ascent_bounds(ascent: Ascent, dtypes, per_tensor: bool, subtracts_back: bool = False) -> list:
    """|new param − definition| allowed, elementwise: ULPS roundings of θ and of the scaled terms of Δ, plus
    the relative error of the governing norm, which scale·Δ inherits.
    ``subtracts_back`` (the reference backend): θ + Δ_old − Δ_old, off by roundings of θ and Δ_old."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(ascent.delta)
    norm_error = norm_bounds(ascent, dtypes, subtracts_back)
    norms = ascent.norms.tolist()
    bounds = []
    for i, (t, o, s, d, scale, dtype) in enumerate(zip(ascent.theta, ascent.old, ascent.step, ascent.delta,
                                                       ascent.scales, dtypes)):
        governing, error = (norms[i], norm_error[i]) if per_tensor else (norms[-1], norm_error[-1])
        # (also where scale is 1: a norm just below ε may come out just above it)
        relative = float(error) / governing if 0 < governing < math.inf else 0.0
        bound = ULPS * UNIT[dtype] * t.abs()
        if scale != 0.0:  # (Δ may hold NaN where it is dropped)
            if ascent.weights is None:
                bound = bound + ULPS * UNIT[dtype] * scale * (o.abs() + s.abs()) + relative * scale * d.abs()
            else:  # θ + scale·T·u: T and T·u are rounded too (WEIGHT_ULPS more roundings of the moved term)
                moved_term = scale * ascent.weights[i] * d.abs()
                bound = bound + (ULPS + WEIGHT_ULPS) * UNIT[dtype] * moved_term + relative * moved_term
        if subtracts_back:
            bound = bound + ULPS * UNIT[dtype] * (t.abs() + o.abs())
        bounds.append(bound)
    return bounds


def compute_unit(dtype) -> float:
    """Unit roundoff of the type a fused kernel computes ``dtype`` values in (fp32, fp64 for fp64)."""
    return UNIT[torch.float64] if dtype == torch.float64 else UNIT[torch.float32]


def orthogonal_bounds(result: Orthogonal, grads: Tensors, theta: Tensors, per_tensor: bool,
                      subtracts_back: bool = False, storage_delta: bool = False) -> list:
    """|orthogonals − definition| allowed, elementwise: ULPS roundings of g and c·Δ; the error of Δ as the backend
    forms it (p − θ in the compute type; ``storage_delta``: in the tensors' own dtype, as foreach does;
    ``subtracts_back``: the Δ it kept, off by the rounding of θ + Δ); and the error of c that the sums' accumulation
    (NORM_RTOL of Σ|Δ·g| ≤ ‖Δ‖‖g‖) and Δ's error give (first order)."""
    dtypes = [g.dtype for g in grads]
    wide = [g.to(torch.float64) for g in grads]
    delta_errors = []
    for d, t, dtype in zip(result.deltas, theta, dtypes):
        if subtracts_back:
            delta_errors.append(ULPS * UNIT[dtype] * (t.double().abs() + d.abs()))
        elif storage_delta:
            delta_errors.append(ULPS * UNIT[dtype] * d.abs())
        else:
            delta_errors.append(compute_unit(dtype) * d.abs())
    groups = [[i] for i in range(len(wide))] if per_tensor else [list(range(len(wide)))]
    bounds = [None] * len(wide)
    for members in groups:
        g_norm = math.sqrt(sum(float(wide[i].square().sum()) for i in members))
        d_norm = math.sqrt(sum(float(result.deltas[i].square().sum()) for i in members))
        e_norm = math.sqrt(sum(float(delta_errors[i].square().sum()) for i in members))
        rho = max([NORM_RTOL[dtypes[i]] for i in members], default=0.0)
        c = abs(result.coefficients[members[0]]) if members else 0.0
        dc = 0.0
        if d_norm > 0 and c != 0.0:
            dc = (rho * (g_norm * d_norm + c * d_norm ** 2) + g_norm * e_norm + 2 * c * d_norm * e_norm) / d_norm ** 2
        for i in members:
            u = UNIT[dtypes[i]]
            d = result.deltas[i].abs()
            bounds[i] = ULPS * u * (wide[i].abs() + c * d) + dc * d + c * delta_errors[i]
    return bounds


def add_orthogonal_bounds(grads: Tensors, orthogonals: Tensors, alpha: float, per_tensor: bool) -> list:
    """|grads after − definition| allowed, elementwise: ULPS roundings of g and coef·v, and the relative error of
    coef = α‖g‖/‖v‖ (two norms, NORM_RTOL each)."""
    coefficients = direction_coefficients(grads, orthogonals, alpha, per_tensor)
    bounds = []
    for g, v, c in zip(grads, orthogonals, coefficients):
        u, rho = UNIT[g.dtype], max(NORM_RTOL[g.dtype], 2.0**-23)
        moved_term = c * v.double().abs()
        bounds.append(ULPS * u * (g.double().abs() + moved_term) + 2 * rho * moved_term)
    return bounds


def restore_bounds(theta: Tensors, *perturbed: Tensors) -> list:
    """|restored − θ| allowed to a backend that subtracts Δ back (reference): roundings of θ and of each Δ
    it added and subtracted since θ (``perturbed``: the parameters after each ascent)."""
    bounds = [t.double().abs() for t in theta]
    for state in perturbed:
        bounds = [b + (p.double() - t.double()).abs() for b, p, t in zip(bounds, state, theta)]
    return [ULPS * UNIT[t.dtype] * b for b, t in zip(bounds, theta)]


def sgd_bounds(theta: Tensors, grads: Tensors, old_buffers: Tensors, step: SGDStep, lr: float, momentum: float,
               weight_decay: float, first_step: bool, restore_error: Tensors | None = None, ulps: float = SGD_ULPS):
    """(param bounds, buffer bounds) of one ``restore_sgd_``: torch rounds every intermediate (d_p,
    buf·m, the sums) to the storage dtype, so ``ulps`` roundings of the sum of their magnitudes.
    ``restore_error``: how far the restored θ may be off (a backend that subtracts Δ back)."""
    param_bounds, buffer_bounds = [], []
    for i, (t, g) in enumerate(zip(theta, grads)):
        unit = ulps * UNIT[t.dtype]
        t, g = t.double().abs(), g.double().abs()
        d_p = g + weight_decay * t
        if momentum:
            new = step.momentum_buffers[i].abs()
            old = 0 if first_step else momentum * old_buffers[i].double().abs()
            buffer_terms = old + 2 * d_p + new
            update_terms = buffer_terms + d_p + momentum * new
        else:
            buffer_terms, update_terms = torch.zeros_like(t), 2 * d_p
        param_bound = unit * (t + step.params[i].abs() + lr * update_terms)
        buffer_bound = unit * buffer_terms
        if restore_error is not None:  # θ off by e: d_p off by wd·e, the buffer by (1 − dampening)·wd·e ≤ wd·e
            e = restore_error[i].double()
            param_bound = param_bound + e * (1 + lr * weight_decay * (1 + 2 * momentum))
            buffer_bound = buffer_bound + weight_decay * e
        param_bounds.append(param_bound)
        buffer_bounds.append(buffer_bound)
    return param_bounds, buffer_bounds
