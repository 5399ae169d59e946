// Per-element math of the AMP ops, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels so the two
// compute the same thing. `T` is the compute ("opmath") type: float for fp32/fp16/bf16 tensors, double for
// fp64. Each kernel loads its storage type, converts to T, calls these, and converts back.
// The element functions also take a value type `V` apart from the scalar type `T` of the per-tensor
// coefficients: V = T for one element (CUDA), V = at::vec::Vectorized<T> for a SIMD register of them (CPU).
// So they use only +, -, * and unary - on V and V(T) broadcasts, and decide every branch on scalars.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

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

// min(1, ε / (‖Δ‖ + 1e-12)); 0 when ‖Δ‖ is not finite, which drops the tensor's Δ (see perturbed_value).
template <typename T>
C10_HOST_DEVICE inline T projection_scale(T norm, T epsilon) {
  if (!is_finite(norm)) {
    return T(0);
  }
  const T scale = epsilon / (norm + static_cast<T>(kNormEps));
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
