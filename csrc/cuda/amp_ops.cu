// CUDA kernels of the amp_fused ops (torch.ops.amp_fused.perturb_, restore_, restore_sgd_; schemas in
// csrc/ops.cpp, semantics in amp_fused/backends/__init__.py), registered for the CUDA dispatch key.
//
// Tensors: float32, float64, float16 and bfloat16. At each index the param, grad, backup and momentum buffer
// share dtype, shape, device and memory layout; different indices may differ (each dtype group gets its own
// launches). All tensors are on one CUDA device. Non-contiguous tensors are accepted when they are dense
// (no gaps, no overlap, e.g. channels_last) and laid out alike at their index, since the kernels walk memory
// linearly; other layouts (strided slices, expanded tensors) are rejected with an error: call .contiguous().
// Every check (the argument contract of csrc/checks.h, the same as amp_fused/checks.py, then the CUDA device)
// runs before anything is written.
//
// perturb_ takes four steps on the current stream, with no host sync:
//   1. chunk pass: one partial ‖Δ‖² per chunk into an fp64 buffer (Δ formed in opmath, each Δ² and every
//      sum in fp64, so finite fp32/fp16/bf16 inputs never overflow the norm);
//   2. one block per tensor adds its chunk partials in order (fp64);
//   3. one block adds the per-tensor sums in order for the global norm, writes the fp32 norms and each
//      tensor's scale from amp_fused::projection_scale (ball or, `surface`, sphere);
//   4. apply pass: params ← θ + scale·Δ (first ascent: also backups ← θ).
// With `eta` (ASAM, first ascents only) the ascent variable is u = ζ·T·g, T = |θ| + η: step 1 sums u² from
// {params, grads}, step 4 writes θ + scale·(T·u); separate functor instantiations, so the other paths keep
// their code.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <vector>

#include "amp_functors.cuh"
#include "amp_math.h"
#include "checks.h"
#include "multi_tensor_apply.cuh"

namespace amp_fused::cuda {
namespace {

// ---- norm reduction kernels (steps 2 and 3) ----------------------------------------------------------

// Where each tensor's chunk partials are: partials[first[k] .. first[k] + count[k]) belong to the tensor
// at list index list_index[k]. Passed by value, like the chunk tables.
struct PartialRanges {
  static constexpr int kMaxTensors = kSumPartialsTensors;
  int64_t first[kMaxTensors];
  int32_t count[kMaxTensors];
  int32_t list_index[kMaxTensors];
};
static_assert(sizeof(PartialRanges) + 2 * sizeof(double*) <= kKernelArgBytes, "kernel arguments exceed 4 KB");

constexpr int kSumThreads = 128;
constexpr int kFinalizeThreads = 512;

// Block k: sums[list_index[k]] = the tensor's chunk partials added in a fixed order.
__global__ void __launch_bounds__(kSumThreads)
    sum_partials_kernel(PartialRanges ranges, const double* partials, double* sums) {
  const int k = blockIdx.x;
  double acc = 0.0;
  for (int c = threadIdx.x; c < ranges.count[k]; c += kSumThreads) {
    acc += partials[ranges.first[k] + c];
  }
  acc = block_sum<kSumThreads>(acc);
  if (threadIdx.x == 0) {
    sums[ranges.list_index[k]] = acc;
  }
}

// One block: the global sum of squares from the n per-tensor sums (fixed order), the fp32 norms (n per
// tensor, then the global one) and every tensor's projection scale.
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_norms_kernel(const double* sums, int64_t n, double epsilon, bool per_tensor, bool surface,
                          float* norms, double* scales) {
  __shared__ double total_norm;
  double acc = 0.0;
  for (int64_t t = threadIdx.x; t < n; t += kFinalizeThreads) {
    acc += sums[t];
  }
  acc = block_sum<kFinalizeThreads>(acc);
  if (threadIdx.x == 0) {
    total_norm = ::sqrt(acc);
    norms[n] = static_cast<float>(total_norm);
  }
  __syncthreads();
  for (int64_t t = threadIdx.x; t < n; t += kFinalizeThreads) {
    const double norm = ::sqrt(sums[t]);
    norms[t] = static_cast<float>(norm);
    scales[t] = projection_scale(per_tensor ? norm : total_norm, epsilon, surface);
  }
}

// ---- argument checks ---------------------------------------------------------------------------------
// The contract itself is csrc/checks.h (shared with the CPU kernels); then what only these kernels need.

// After the contract, which puts every tensor on params[0]'s device: these kernels need a CUDA device.
void check_on_cuda(const char* op, at::TensorList params) {
  TORCH_CHECK_VALUE(params.empty() || params[0].device().is_cuda(), "amp_fused.", op, ": params[0] is on ",
                    params[0].device(), ", but these are the CUDA kernels: every tensor must be on one CUDA device");
}

// ---- launch plumbing ---------------------------------------------------------------------------------

struct DtypeGroup {
  at::ScalarType dtype;
  std::vector<int64_t> indices;
};

// List indices grouped by dtype, groups in order of first appearance (usually one group).
std::vector<DtypeGroup> group_by_dtype(at::TensorList tensors) {
  std::vector<DtypeGroup> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::ScalarType dtype = tensors[i].scalar_type();
    DtypeGroup* group = nullptr;
    for (DtypeGroup& g : groups) {
      if (g.dtype == dtype) {
        group = &g;
      }
    }
    if (group == nullptr) {
      groups.push_back({dtype, {}});
      group = &groups.back();
    }
    group->indices.push_back(static_cast<int64_t>(i));
  }
  return groups;
}

// The launcher's view of tensors `indices` in `lists` (all of one shape at each index). Lists the kernel
// writes take the mutable pointer, which also materialises copy-on-write storage.
template <int Depth>
std::vector<TensorSlot<Depth>> make_slots(const std::vector<int64_t>& indices,
                                          const std::array<at::TensorList, Depth>& lists,
                                          const std::array<bool, Depth>& written) {
  std::vector<TensorSlot<Depth>> slots;
  slots.reserve(indices.size());
  for (const int64_t i : indices) {
    TensorSlot<Depth> slot;
    for (int d = 0; d < Depth; ++d) {
      const at::Tensor& t = lists[d][i];
      slot.ptrs[d] = written[d] ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr());
    }
    slot.numel = lists[0][i].numel();
    slot.list_index = static_cast<int32_t>(i);
    slots.push_back(slot);
  }
  return slots;
}

// Step 2 for all n tensors: as few launches as PartialRanges tables allow.
void launch_sum_partials(at::TensorList params, const std::vector<int64_t>& first_chunk, const double* partials,
                         double* sums, cudaStream_t stream) {
  PartialRanges ranges;
  int count = 0;
  const int64_t n = static_cast<int64_t>(params.size());
  for (int64_t i = 0; i < n; ++i) {
    ranges.first[count] = first_chunk[i];
    ranges.count[count] = static_cast<int32_t>(chunk_count(params[i].numel()));
    ranges.list_index[count] = static_cast<int32_t>(i);
    ++count;
    if (count == PartialRanges::kMaxTensors || i == n - 1) {
      sum_partials_kernel<<<count, kSumThreads, 0, stream>>>(ranges, partials, sums);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      count = 0;
    }
  }
}

// ---- the ops -----------------------------------------------------------------------------------------

at::Tensor perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups, double epsilon,
                        double inner_lr, bool per_tensor, bool first, bool surface, c10::optional<double> eta) {
  constexpr const char* op = "amp_fused::perturb_";
  checks::check_perturb(params, grads, backups, epsilon, inner_lr, first, eta);
  check_on_cuda("perturb_", params);
  const bool weighted = eta.has_value();  // (then first: checked)
  const double eta_value = eta.value_or(0.0);
  TORCH_CHECK_VALUE(params.size() < static_cast<size_t>(INT32_MAX), "amp_fused.perturb_: too many tensors (",
                    params.size(), ")");
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) {
    return at::zeros({1}, at::kFloat);  // as the foreach backend; unreachable through the CUDA dispatch key
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::vector<DtypeGroup> groups = group_by_dtype(params);

  int64_t total_chunks = 0;
  for (const at::Tensor& p : params) {
    total_chunks += chunk_count(p.numel());
  }
  // One fp64 workspace: chunk partials, then the per-tensor sums of squares, then the per-tensor scales.
  at::Tensor workspace = at::empty({total_chunks + 2 * n}, params[0].options().dtype(at::kDouble));
  at::Tensor norms = at::empty({n + 1}, params[0].options().dtype(at::kFloat));
  double* partials = workspace.mutable_data_ptr<double>();
  double* sums = partials + total_chunks;
  double* scales = sums + n;

  // 1. One partial per chunk; first_chunk[i] = slot of tensor i's first chunk partial.
  std::vector<int64_t> first_chunk(n, 0);
  int64_t next_chunk = 0;
  for (const DtypeGroup& group : groups) {
    std::vector<int64_t> group_first;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, "amp_fused::perturb_", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto lr = static_cast<opmath_t>(inner_lr);
      const auto e = static_cast<opmath_t>(eta_value);
      if (weighted) {
        const auto slots = make_slots<2>(group.indices, {params, grads}, {false, false});
        next_chunk += multi_tensor_reduce<2>(slots, SumSquaresFunctor<scalar_t, true, true>{lr, e}, partials,
                                             next_chunk, stream, &group_first);
      } else if (first) {
        next_chunk += multi_tensor_reduce<1>(make_slots<1>(group.indices, {grads}, {false}),
                                             SumSquaresFunctor<scalar_t, true>{lr, e}, partials, next_chunk, stream,
                                             &group_first);
      } else {
        const auto slots = make_slots<3>(group.indices, {params, backups, grads}, {false, false, false});
        next_chunk += multi_tensor_reduce<3>(slots, SumSquaresFunctor<scalar_t, false>{lr, e}, partials,
                                             next_chunk, stream, &group_first);
      }
    });
    for (size_t k = 0; k < group.indices.size(); ++k) {
      first_chunk[group.indices[k]] = group_first[k];
    }
  }
  TORCH_INTERNAL_ASSERT(next_chunk == total_chunks, op, ": enumerated ", next_chunk, " chunks, expected ",
                        total_chunks);

  // 2. and 3. Per-tensor sums, global sum, norms and scales.
  launch_sum_partials(params, first_chunk, partials, sums, stream);
  finalize_norms_kernel<<<1, kFinalizeThreads, 0, stream>>>(sums, n, epsilon, per_tensor, surface,
                                                            norms.mutable_data_ptr<float>(), scales);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 4. Apply.
  for (const DtypeGroup& group : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, "amp_fused::perturb_", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto lr = static_cast<opmath_t>(inner_lr);
      const auto e = static_cast<opmath_t>(eta_value);
      const auto slots = make_slots<3>(group.indices, {params, backups, grads}, {true, first, false});
      if (weighted) {
        multi_tensor_apply<3>(slots, PerturbApplyFunctor<scalar_t, true, true>{scales, lr, e}, stream);
      } else if (first) {
        multi_tensor_apply<3>(slots, PerturbApplyFunctor<scalar_t, true>{scales, lr, e}, stream);
      } else {
        multi_tensor_apply<3>(slots, PerturbApplyFunctor<scalar_t, false>{scales, lr, e}, stream);
      }
    });
  }
  return norms;
}

void restore_cuda(at::TensorList params, at::TensorList backups) {
  checks::check_restore(params, backups);
  check_on_cuda("restore_", params);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const DtypeGroup& group : group_by_dtype(params)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, "amp_fused::restore_", [&] {
      multi_tensor_apply<2>(make_slots<2>(group.indices, {params, backups}, {true, false}), CopyFunctor<scalar_t>{},
                            stream);
    });
  }
}

// momentum_buffers is not used when momentum == 0 (it may then be empty).
void restore_sgd_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads,
                      at::TensorList momentum_buffers, double lr, double momentum, double dampening,
                      double weight_decay, bool nesterov, bool maximize, bool first_step) {
  checks::check_restore_sgd(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay);
  check_on_cuda("restore_sgd_", params);
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0.0 && dampening == 0.0),
                    "amp_fused.restore_sgd_: nesterov needs momentum > 0 and dampening == 0 (as torch.optim.SGD), "
                    "got momentum=", checks::number_text(momentum), ", dampening=", checks::number_text(dampening));
  const bool use_momentum = momentum != 0.0;
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const DtypeGroup& group : group_by_dtype(params)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, "amp_fused::restore_sgd_", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const SgdArgs<opmath_t> args{static_cast<opmath_t>(lr),           static_cast<opmath_t>(momentum),
                                   static_cast<opmath_t>(dampening),    static_cast<opmath_t>(weight_decay),
                                   nesterov,
                                   maximize,
                                   first_step};
      if (use_momentum) {
        multi_tensor_apply<4>(
            make_slots<4>(group.indices, {params, backups, grads, momentum_buffers}, {true, false, false, true}),
            RestoreSgdFunctor<scalar_t, true>{args}, stream);
      } else {
        multi_tensor_apply<3>(make_slots<3>(group.indices, {params, backups, grads}, {true, false, false}),
                              RestoreSgdFunctor<scalar_t, false>{args}, stream);
      }
    });
  }
}

}  // namespace
}  // namespace amp_fused::cuda

TORCH_LIBRARY_IMPL(amp_fused, CUDA, m) {
  m.impl("perturb_", TORCH_FN(amp_fused::cuda::perturb_cuda));
  m.impl("restore_", TORCH_FN(amp_fused::cuda::restore_cuda));
  m.impl("restore_sgd_", TORCH_FN(amp_fused::cuda::restore_sgd_cuda));
}

// A sparse CUDA tensor anywhere in a call dispatches it to a sparse key: the same kernels run there so that the
// call fails with the contract's TypeError (checked before anything is read or written), as on the CPU.
TORCH_LIBRARY_IMPL(amp_fused, SparseCUDA, m) {
  m.impl("perturb_", TORCH_FN(amp_fused::cuda::perturb_cuda));
  m.impl("restore_", TORCH_FN(amp_fused::cuda::restore_cuda));
  m.impl("restore_sgd_", TORCH_FN(amp_fused::cuda::restore_sgd_cuda));
}

TORCH_LIBRARY_IMPL(amp_fused, SparseCsrCUDA, m) {
  m.impl("perturb_", TORCH_FN(amp_fused::cuda::perturb_cuda));
  m.impl("restore_", TORCH_FN(amp_fused::cuda::restore_cuda));
  m.impl("restore_sgd_", TORCH_FN(amp_fused::cuda::restore_sgd_cuda));
}
