// The op table as torch ops (torch.ops.amp_fused.*). Kernels register per device with TORCH_LIBRARY_IMPL
// (csrc/cpu for CPU, csrc/cuda for CUDA); fake implementations for tracing are in amp_fused/_C_ops.py.
// Semantics: amp_fused/backends/__init__.py.
#include <torch/library.h>

TORCH_LIBRARY(amp_fused, m) {
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, float epsilon, float inner_lr, "
      "bool per_tensor, bool first) -> Tensor");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  m.def(
      "restore_sgd_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_step) -> ()");
}
