// The op table as torch ops (torch.ops.amp_fused.*). Kernels register per device with TORCH_LIBRARY_IMPL
// (csrc/cpu for CPU, csrc/cuda for CUDA); fake implementations for tracing are in amp_fused/_extension.py.
// Semantics: amp_fused/backends/__init__.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

TORCH_LIBRARY(amp_fused, m) {
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, float epsilon, float inner_lr, "
      "bool per_tensor, bool first, bool surface=False, float? eta=None) -> Tensor");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  m.def(
      "restore_sgd_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_step) -> ()");
  m.def("norms(Tensor[] tensors) -> Tensor");
  m.def(
      "restore_orthogonal_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] orthogonals, "
      "bool per_tensor) -> ()");
  m.def("add_orthogonal_(Tensor(a!)[] grads, Tensor[] orthogonals, float alpha, bool per_tensor) -> ()");
}

namespace {

// The kernels write in place through raw pointers: bump the version counters of every tensor in a written
// (`!`) argument, as built-in in-place ops do, so autograd notices a tensor saved for backward being
// overwritten. Then run the kernel below this key.
void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) {
      continue;
    }
    const c10::IValue& value = (*stack)[first + i];
    if (!value.isTensorList()) {
      continue;
    }
    for (const at::Tensor& t : value.toTensorList().vec()) {
      if (t.defined() && !t.is_inference()) {
        torch::autograd::impl::bump_version(t);
      }
    }
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(amp_fused, ADInplaceOrView, m) {
  m.impl("perturb_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("restore_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("restore_sgd_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("restore_orthogonal_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("add_orthogonal_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
}
