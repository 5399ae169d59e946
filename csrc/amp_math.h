// Per-element math of the AMP ops, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels so the two
// compute the same thing. `T` is the compute ("opmath") type: float for fp32/fp16/bf16 tensors, double for
// fp64. Each kernel loads its storage type, converts to T, calls these, and converts back.
// The element functions also take a value type `V` apart from the scalar type `T` of the per-tensor
// coefficients: V = T for one element (CUDA), V = at::vec::Vectorized<T> for a SIMD register of them (CPU).
// So they use only +, -, * and unary - on V, V(T) broadcasts and magnitude() (|x|, the one function with a
// scalar and a SIMD form), and decide every branch on scalars.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <type_traits>

namespace amp_fused {

// Added to ‖Δ‖ before dividing, as the original code does.
constexpr double kNormEps = 1e-12;

// Host compilers declare isfinite in std:: only (<cmath> removes the C macro); CUDA's device headers
// declare it globally.
template <typename T>
C10_HOST_DEVICE inline bool is_finite(T x) {
#if defined(__CUDACC__) || defined(__HIPCC__)
  return ::isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// |x| of a scalar or, elementwise, of a SIMD register (fabs: a NaN stays NaN, -0 becomes +0).
template <typename V>
C10_HOST_DEVICE inline V magnitude(V x) {
  if constexpr (std::is_floating_point_v<V>) {
#if defined(__CUDACC__) || defined(__HIPCC__)
    if constexpr (std::is_same_v<V, float>) {
      return ::fabsf(x);
    } else {
      return ::fabs(x);
    }
#else
    return std::fabs(x);
#endif
  } else {
    return x.abs();  // at::vec::Vectorized
  }
}

// The projection scale of a tensor (or of all of them) from the governing norm ‖u‖:
//   ball (surface = false, AMP): min(1, ε / (‖u‖ + 1e-12));
//   sphere (surface = true, SAM): ε / (‖u‖ + 1e-12), which may exceed 1; 0 when that overflows.
// 0 when ‖u‖ is not finite, which drops the tensor's Δ (see perturbed_value).
template <typename T>
C10_HOST_DEVICE inline T projection_scale(T norm, T epsilon, bool surface) {
  if (!is_finite(norm)) {
    return T(0);
  }
  const T scale = epsilon / (norm + static_cast<T>(kNormEps));
  if (surface) {
    return is_finite(scale) ? scale : T(0);
  }
  return scale < T(1) ? scale : T(1);
}

// Δ before projection: ζ·g on the first ascent, (θ+Δ_old − θ) + ζ·g on later ones.
template <typename V, typename T>
C10_HOST_DEVICE inline V ascent_delta(V param, V backup, V grad, T inner_lr, bool first) {
  return first ? V(inner_lr) * grad : (param - backup) + V(inner_lr) * grad;
}

// θ + scale·Δ. A zero scale returns θ itself, so a NaN/Inf in Δ (whose norm then was not finite) never
// reaches the parameter, and ε = 0 leaves it bit-exact.
template <typename V, typename T>
C10_HOST_DEVICE inline V perturbed_value(V backup, V delta, T scale) {
  return scale == T(0) ? backup : backup + V(scale) * delta;
}

// ---- ASAM's weighted ascent (eta given; first ascents only) -----------------------------------------------
// The element weight T = |θ| + η, in the compute type.
template <typename V, typename T>
C10_HOST_DEVICE inline V element_weight(V theta, T eta) {
  return magnitude(theta) + V(eta);
}

// The ascent variable u = ζ·(T·g), whose norm the projection uses and the op returns.
template <typename V, typename T>
C10_HOST_DEVICE inline V weighted_ascent(V weight, V grad, T inner_lr) {
  return V(inner_lr) * (weight * grad);
}

// θ + scale·(T·u); a zero scale returns θ itself, as perturbed_value does.
template <typename V, typename T>
C10_HOST_DEVICE inline V weighted_perturbed_value(V theta, V weight, V u, T scale) {
  return scale == T(0) ? theta : theta + V(scale) * (weight * u);
}

// ---- LookSAM's gradient reuse (restore_orthogonal_, add_orthogonal_) -------------------------------------
// The coefficient c of g_v = g − c·Δ, the part of the gradient g at θ+Δ orthogonal to Δ: c = ⟨Δ,g⟩ / ‖Δ‖²
// from the sums over a tensor (or over all of them). 0 where ‖Δ‖² is not > 0 (Δ = 0, NaN) or c is not finite,
// so that g_v is g itself there.
template <typename T>
C10_HOST_DEVICE inline T orthogonal_coefficient(T dot, T squared_norm) {
  if (!(squared_norm > T(0))) {
    return T(0);
  }
  const T c = dot / squared_norm;
  return is_finite(c) ? c : T(0);
}

// g − c·Δ; a zero c returns g itself.
template <typename V, typename T>
C10_HOST_DEVICE inline V orthogonal_value(V grad, V delta, T c) {
  return c == T(0) ? grad : grad - V(c) * delta;
}

// The coefficient α·‖g‖ / ‖g_v‖ of the stored direction in g + α·(‖g‖/‖g_v‖)·g_v; 0 where it is not finite
// (g_v = 0, or a norm that is NaN or Inf), which leaves the gradient as it is.
template <typename T>
C10_HOST_DEVICE inline T direction_coefficient(T alpha, T grad_norm, T orthogonal_norm) {
  const T coef = alpha * grad_norm / orthogonal_norm;
  return is_finite(coef) ? coef : T(0);
}

// g + coef·g_v; a zero coef returns g itself, so a NaN/Inf in g_v (whose norm then was not finite) never
// reaches the gradient.
template <typename V, typename T>
C10_HOST_DEVICE inline V directed_value(V grad, V orthogonal, T coef) {
  return coef == T(0) ? grad : grad + V(coef) * orthogonal;
}

// One torch.optim.SGD update of a single element, applied to θ (the restored parameter).
// Matches torch/optim/sgd.py: d_p = ±g (+ wd·θ); buf = d_p on the first step, else
// momentum·buf + (1 − dampening)·d_p; d_p = d_p + momentum·buf (nesterov) or buf; θ − lr·d_p.
// Returns the new parameter and writes the new momentum buffer through `buf` (untouched when
// momentum == 0).
template <typename T>
struct SgdArgs {
  T lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
};

template <typename V, typename T>
C10_HOST_DEVICE inline V sgd_update(V theta, V grad, V* buf, const SgdArgs<T>& a) {
  V d_p = a.maximize ? -grad : grad;
  if (a.weight_decay != T(0)) {
    d_p = d_p + V(a.weight_decay) * theta;
  }
  if (a.momentum != T(0)) {
    const V b = a.first_step ? d_p : V(a.momentum) * (*buf) + V(T(1) - a.dampening) * d_p;
    *buf = b;
    d_p = a.nesterov ? d_p + V(a.momentum) * b : b;
  }
  return theta - V(a.lr) * d_p;
}

}  // namespace amp_fused
