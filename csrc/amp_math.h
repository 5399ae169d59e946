// Per-element math of the AMP ops, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels so the two
// compute the same thing. `T` is the compute ("opmath") type: float for fp32/fp16/bf16 tensors, double for
// fp64. Each kernel loads its storage type, converts to T, calls these, and converts back.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace amp_fused {

// Added to ‖Δ‖ before dividing, as the original code does.
constexpr double kNormEps = 1e-12;

// min(1, ε / (‖Δ‖ + 1e-12)); 0 when ‖Δ‖ is not finite, which drops the tensor's Δ (see perturbed_value).
template <typename T>
C10_HOST_DEVICE inline T projection_scale(T norm, T epsilon) {
  if (!::isfinite(norm)) {
    return T(0);
  }
  const T scale = epsilon / (norm + static_cast<T>(kNormEps));
  return scale < T(1) ? scale : T(1);
}

// Δ before projection: ζ·g on the first ascent, (θ+Δ_old − θ) + ζ·g on later ones.
template <typename T>
C10_HOST_DEVICE inline T ascent_delta(T param, T backup, T grad, T inner_lr, bool first) {
  return first ? inner_lr * grad : (param - backup) + inner_lr * grad;
}

// θ + scale·Δ. A zero scale returns θ itself, so a NaN/Inf in Δ (whose norm then was not finite) never
// reaches the parameter, and ε = 0 leaves it bit-exact.
template <typename T>
C10_HOST_DEVICE inline T perturbed_value(T backup, T delta, T scale) {
  return scale == T(0) ? backup : backup + scale * delta;
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

template <typename T>
C10_HOST_DEVICE inline T sgd_update(T theta, T grad, T* buf, const SgdArgs<T>& a) {
  T d_p = a.maximize ? -grad : grad;
  if (a.weight_decay != T(0)) {
    d_p = d_p + a.weight_decay * theta;
  }
  if (a.momentum != T(0)) {
    const T b = a.first_step ? d_p : a.momentum * (*buf) + (T(1) - a.dampening) * d_p;
    *buf = b;
    d_p = a.nesterov ? d_p + a.momentum * b : b;
  }
  return theta - a.lr * d_p;
}

}  // namespace amp_fused
