// CUDA kernels of the amp_fused ops (torch.ops.amp_fused.perturb_, restore_, restore_sgd_, norms,
// restore_orthogonal_, add_orthogonal_; schemas in csrc/ops.cpp, semantics in amp_fused/backends/__init__.py),
// registered for the CUDA dispatch key.
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
//
// The reducing ops share steps 1-3 (chunk partials, per-tensor sums in order, one finalize block), carrying
// K fp64 sums per chunk and per tensor (multi_tensor_apply.cuh: Sums<K>); every result is deterministic:
//   norms: perturb_'s first-ascent norm pass with ζ = 1 (K = 1; each t² in fp64), finalized into the n + 1
//     fp32 norms without scales;
//   restore_orthogonal_: K = 2, {⟨Δ,g⟩, ‖Δ‖²} (Δ = params − backups in opmath) from {params, backups, grads};
//     the finalize writes c = amp_fused::orthogonal_coefficient per tensor, or once from the two totals (fp64);
//     the apply pass writes orthogonals ← g − c·Δ (g's bits where c = 0) and params ← backups bit for bit;
//   add_orthogonal_: K = 2, {‖g‖², ‖v‖²} from {grads, orthogonals}; coef = amp_fused::direction_coefficient per
//     tensor or from the totals; grads ← g + coef·v, and tensors whose coef is 0 are not written at all.
// The coefficients reach the apply passes in fp64 and are converted to opmath there (0 where they exceed it).
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

// Block k: the K sums of the tensor at list_index[k], each of its chunk partials added in a fixed order:
// sums[list_index[k] * K + j] from partials[(first[k] + c) * K + j], c = 0 .. count[k).
template <int K>
__global__ void __launch_bounds__(kSumThreads)
    sum_partials_kernel(PartialRanges ranges, const double* partials, double* sums) {
  const int k = blockIdx.x;
  Sums<K> acc = {};
  for (int c = threadIdx.x; c < ranges.count[k]; c += kSumThreads) {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      acc.v[j] += partials[(ranges.first[k] + c) * K + j];
    }
  }
  acc = block_sum<kSumThreads>(acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      sums[static_cast<int64_t>(ranges.list_index[k]) * K + j] = acc.v[j];
    }
  }
}

// In every thread of the one block of a finalize kernel: the K totals over the n tensors' sums (sums[t * K +
// j]), added in a fixed order.
template <int K>
__device__ Sums<K> block_totals(const double* sums, int64_t n) {
  __shared__ Sums<K> totals;
  Sums<K> acc = {};
  for (int64_t t = threadIdx.x; t < n; t += kFinalizeThreads) {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      acc.v[j] += sums[t * K + j];
    }
  }
  acc = block_sum<kFinalizeThreads>(acc);
  if (threadIdx.x == 0) {
    totals = acc;
  }
  __syncthreads();
  return totals;
}

// One block: from the n per-tensor sums of squares, the fp32 norms (n per tensor, then the global one) and,
// when `scales` is given (perturb_), every tensor's projection scale.
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_norms_kernel(const double* sums, int64_t n, double epsilon, bool per_tensor, bool surface,
                          float* norms, double* scales) {
  const double total_norm = ::sqrt(block_totals<1>(sums, n).v[0]);
  if (threadIdx.x == 0) {
    norms[n] = static_cast<float>(total_norm);
  }
  for (int64_t t = threadIdx.x; t < n; t += kFinalizeThreads) {
    const double norm = ::sqrt(sums[t]);
    norms[t] = static_cast<float>(norm);
    if (scales != nullptr) {
      scales[t] = projection_scale(per_tensor ? norm : total_norm, epsilon, surface);
    }
  }
}

// The coefficient rules of the gradient-reuse ops, from a tensor's two sums (or the two totals).
struct OrthogonalRule {  // restore_orthogonal_: sums {⟨Δ,g⟩, ‖Δ‖²}
  __device__ double operator()(double dot, double squared_norm) const {
    return orthogonal_coefficient(dot, squared_norm);
  }
};
struct DirectionRule {  // add_orthogonal_: sums {‖g‖², ‖v‖²}
  double alpha;
  __device__ double operator()(double grad_squares, double orthogonal_squares) const {
    return direction_coefficient(alpha, ::sqrt(grad_squares), ::sqrt(orthogonal_squares));
  }
};

// One block: every tensor's coefficient from its own two sums (per_tensor) or from the two totals over all
// tensors (fixed order), as fp64.
template <typename Rule>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_coefficients_kernel(const double* sums, int64_t n, bool per_tensor, Rule rule, double* coefficients) {
  const Sums<2> total = block_totals<2>(sums, n);
  for (int64_t t = threadIdx.x; t < n; t += kFinalizeThreads) {
    coefficients[t] = per_tensor ? rule(sums[2 * t], sums[2 * t + 1]) : rule(total.v[0], total.v[1]);
  }
}

// ---- argument checks ---------------------------------------------------------------------------------
// The contract itself is csrc/checks.h (shared with the CPU kernels); then what only these kernels need.

// After the contract, which puts every tensor on params[0]'s device: these kernels need a CUDA device.
// `name`: the lead list's name in the op's schema.
void check_on_cuda(const char* op, at::TensorList lead, const char* name = "params") {
  TORCH_CHECK_VALUE(lead.empty() || lead[0].device().is_cuda(), "amp_fused.", op, ": ", name, "[0] is on ",
                    lead[0].device(), ", but these are the CUDA kernels: every tensor must be on one CUDA device");
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

int64_t count_chunks(at::TensorList tensors) {
  int64_t chunks = 0;
  for (const at::Tensor& t : tensors) {
    chunks += chunk_count(t.numel());
  }
  return chunks;
}

// Step 2 for all n tensors: as few launches as PartialRanges tables allow.
template <int K>
void launch_sum_partials(at::TensorList lead, const std::vector<int64_t>& first_chunk, const double* partials,
                         double* sums, cudaStream_t stream) {
  PartialRanges ranges;
  int count = 0;
  const int64_t n = static_cast<int64_t>(lead.size());
  for (int64_t i = 0; i < n; ++i) {
    ranges.first[count] = first_chunk[i];
    ranges.count[count] = static_cast<int32_t>(chunk_count(lead[i].numel()));
    ranges.list_index[count] = static_cast<int32_t>(i);
    ++count;
    if (count == PartialRanges::kMaxTensors || i == n - 1) {
      sum_partials_kernel<K><<<count, kSumThreads, 0, stream>>>(ranges, partials, sums);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      count = 0;
    }
  }
}

// Steps 1 and 2 of a reducing op, K sums per chunk and per tensor: the chunk pass of every dtype group, then
// each tensor's K sums in order (sums[i * K + j] for list index i). pass(group, first_block_id, &group_first)
// launches the group's chunk pass (multi_tensor_reduce into `partials`, its chunks numbered from
// first_block_id) and returns how many chunks it enumerated. `lead`: the list that gives the tensors' sizes.
template <int K, typename GroupPass>
void per_tensor_sums(const char* op, at::TensorList lead, const std::vector<DtypeGroup>& groups,
                     int64_t total_chunks, const double* partials, double* sums, cudaStream_t stream,
                     GroupPass&& pass) {
  std::vector<int64_t> first_chunk(lead.size(), 0);  // first_chunk[i]: number of tensor i's first chunk
  int64_t next_chunk = 0;
  for (const DtypeGroup& group : groups) {
    std::vector<int64_t> group_first;
    next_chunk += pass(group, next_chunk, &group_first);
    for (size_t k = 0; k < group.indices.size(); ++k) {
      first_chunk[group.indices[k]] = group_first[k];
    }
  }
  TORCH_INTERNAL_ASSERT(next_chunk == total_chunks, op, ": enumerated ", next_chunk, " chunks, expected ",
                        total_chunks);
  launch_sum_partials<K>(lead, first_chunk, partials, sums, stream);
}

void check_list_count(const char* op, at::TensorList lead) {
  TORCH_CHECK_VALUE(lead.size() < static_cast<size_t>(INT32_MAX), "amp_fused.", op, ": too many tensors (",
                    lead.size(), ")");
}

// ---- the ops -----------------------------------------------------------------------------------------

at::Tensor perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups, double epsilon,
                        double inner_lr, bool per_tensor, bool first, bool surface, c10::optional<double> eta) {
  constexpr const char* op = "amp_fused::perturb_";
  checks::check_perturb(params, grads, backups, epsilon, inner_lr, first, eta);
  check_on_cuda("perturb_", params);
  const bool weighted = eta.has_value();  // (then first: checked)
  const double eta_value = eta.value_or(0.0);
  check_list_count("perturb_", params);
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) {
    return at::zeros({1}, at::kFloat);  // as the foreach backend; unreachable through the CUDA dispatch key
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::vector<DtypeGroup> groups = group_by_dtype(params);

  const int64_t total_chunks = count_chunks(params);
  // One fp64 workspace: chunk partials, then the per-tensor sums of squares, then the per-tensor scales.
  at::Tensor workspace = at::empty({total_chunks + 2 * n}, params[0].options().dtype(at::kDouble));
  at::Tensor norms = at::empty({n + 1}, params[0].options().dtype(at::kFloat));
  double* partials = workspace.mutable_data_ptr<double>();
  double* sums = partials + total_chunks;
  double* scales = sums + n;

  // 1. and 2. One partial per chunk, then the per-tensor sums of squares.
  auto chunk_pass = [&](const DtypeGroup& group, int64_t next_chunk, std::vector<int64_t>* group_first) {
    int64_t chunks = 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, "amp_fused::perturb_", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto lr = static_cast<opmath_t>(inner_lr);
      const auto e = static_cast<opmath_t>(eta_value);
      if (weighted) {
        const auto slots = make_slots<2>(group.indices, {params, grads}, {false, false});
        chunks = multi_tensor_reduce<2>(slots, SumSquaresFunctor<scalar_t, true, true>{lr, e}, partials, next_chunk,
                                        stream, group_first);
      } else if (first) {
        chunks = multi_tensor_reduce<1>(make_slots<1>(group.indices, {grads}, {false}),
                                        SumSquaresFunctor<scalar_t, true>{lr, e}, partials, next_chunk, stream,
                                        group_first);
      } else {
        const auto slots = make_slots<3>(group.indices, {params, backups, grads}, {false, false, false});
        chunks = multi_tensor_reduce<3>(slots, SumSquaresFunctor<scalar_t, false>{lr, e}, partials, next_chunk,
                                        stream, group_first);
      }
    });
    return chunks;
  };
  per_tensor_sums<1>(op, params, groups, total_chunks, partials, sums, stream, chunk_pass);

  // 3. Global sum, norms and scales.
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

// ---- the gradient-reuse ops: norms, restore_orthogonal_, add_orthogonal_ --------------------------------

at::Tensor norms_cuda(at::TensorList tensors) {
  constexpr const char* op = "amp_fused::norms";
  checks::check_norms(tensors);
  check_on_cuda("norms", tensors, "tensors");
  check_list_count("norms", tensors);
  const int64_t n = static_cast<int64_t>(tensors.size());
  if (n == 0) {
    return at::zeros({1}, at::kFloat);  // as the foreach backend; unreachable through the CUDA dispatch key
  }
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t total_chunks = count_chunks(tensors);
  // fp64 workspace: chunk partials, then the per-tensor sums of squares.
  at::Tensor workspace = at::empty({total_chunks + n}, tensors[0].options().dtype(at::kDouble));
  at::Tensor norms = at::empty({n + 1}, tensors[0].options().dtype(at::kFloat));
  double* partials = workspace.mutable_data_ptr<double>();
  double* sums = partials + total_chunks;
  // perturb_'s first-ascent norm pass with ζ = 1: Δ = 1·t is t exactly, each t² and the sums in fp64.
  per_tensor_sums<1>(op, tensors, group_by_dtype(tensors), total_chunks, partials, sums, stream,
                     [&](const DtypeGroup& group, int64_t next_chunk, std::vector<int64_t>* group_first) {
                       int64_t chunks = 0;
                       AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, op, [&] {
                         using opmath_t = at::opmath_type<scalar_t>;
                         chunks = multi_tensor_reduce<1>(make_slots<1>(group.indices, {tensors}, {false}),
                                                         SumSquaresFunctor<scalar_t, true>{opmath_t(1), opmath_t(0)},
                                                         partials, next_chunk, stream, group_first);
                       });
                       return chunks;
                     });
  finalize_norms_kernel<<<1, kFinalizeThreads, 0, stream>>>(sums, n, 0.0, false, false,
                                                            norms.mutable_data_ptr<float>(), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return norms;
}

// The fp64 workspace of the two ops below: two partials per chunk, two sums per tensor, one coefficient per
// tensor (the apply pass reads coefficients[list index]).
struct TwoSumsWorkspace {
  at::Tensor storage;
  double* partials;
  double* sums;
  double* coefficients;
};

TwoSumsWorkspace two_sums_workspace(at::TensorList lead, int64_t total_chunks) {
  const int64_t n = static_cast<int64_t>(lead.size());
  TwoSumsWorkspace w;
  w.storage = at::empty({2 * total_chunks + 3 * n}, lead[0].options().dtype(at::kDouble));
  w.partials = w.storage.mutable_data_ptr<double>();
  w.sums = w.partials + 2 * total_chunks;
  w.coefficients = w.sums + 2 * n;
  return w;
}

void restore_orthogonal_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads,
                             at::TensorList orthogonals, bool per_tensor) {
  constexpr const char* op = "amp_fused::restore_orthogonal_";
  checks::check_restore_orthogonal(params, backups, grads, orthogonals);
  check_on_cuda("restore_orthogonal_", params);
  check_list_count("restore_orthogonal_", params);
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::vector<DtypeGroup> groups = group_by_dtype(params);
  const int64_t total_chunks = count_chunks(params);
  const TwoSumsWorkspace w = two_sums_workspace(params, total_chunks);

  // 1. and 2. {⟨Δ,g⟩, ‖Δ‖²} per chunk, then per tensor.
  per_tensor_sums<2>(op, params, groups, total_chunks, w.partials, w.sums, stream,
                     [&](const DtypeGroup& group, int64_t next_chunk, std::vector<int64_t>* group_first) {
                       int64_t chunks = 0;
                       AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, op, [&] {
                         const auto slots =
                             make_slots<3>(group.indices, {params, backups, grads}, {false, false, false});
                         chunks = multi_tensor_reduce<3>(slots, OrthogonalSumsFunctor<scalar_t, true>{}, w.partials,
                                                         next_chunk, stream, group_first);
                       });
                       return chunks;
                     });
  // 3. c per tensor, or once from the totals.
  finalize_coefficients_kernel<<<1, kFinalizeThreads, 0, stream>>>(w.sums, n, per_tensor, OrthogonalRule{},
                                                                   w.coefficients);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // 4. orthogonals ← g − c·Δ, params ← θ.
  for (const DtypeGroup& group : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, op, [&] {
      const auto slots =
          make_slots<4>(group.indices, {params, backups, grads, orthogonals}, {true, false, false, true});
      multi_tensor_apply<4>(slots, RestoreOrthogonalFunctor<scalar_t>{w.coefficients}, stream);
    });
  }
}

void add_orthogonal_cuda(at::TensorList grads, at::TensorList orthogonals, double alpha, bool per_tensor) {
  constexpr const char* op = "amp_fused::add_orthogonal_";
  checks::check_add_orthogonal(grads, orthogonals, alpha);
  check_on_cuda("add_orthogonal_", grads, "grads");
  check_list_count("add_orthogonal_", grads);
  const int64_t n = static_cast<int64_t>(grads.size());
  if (n == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(grads[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::vector<DtypeGroup> groups = group_by_dtype(grads);
  const int64_t total_chunks = count_chunks(grads);
  const TwoSumsWorkspace w = two_sums_workspace(grads, total_chunks);

  // 1. and 2. {‖g‖², ‖v‖²} per chunk, then per tensor.
  per_tensor_sums<2>(op, grads, groups, total_chunks, w.partials, w.sums, stream,
                     [&](const DtypeGroup& group, int64_t next_chunk, std::vector<int64_t>* group_first) {
                       int64_t chunks = 0;
                       AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, op, [&] {
                         const auto slots = make_slots<2>(group.indices, {grads, orthogonals}, {false, false});
                         chunks = multi_tensor_reduce<2>(slots, OrthogonalSumsFunctor<scalar_t, false>{},
                                                         w.partials, next_chunk, stream, group_first);
                       });
                       return chunks;
                     });
  // 3. coef = α·‖g‖/‖v‖ per tensor, or once from the totals.
  finalize_coefficients_kernel<<<1, kFinalizeThreads, 0, stream>>>(w.sums, n, per_tensor, DirectionRule{alpha},
                                                                   w.coefficients);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // 4. grads ← g + coef·v (tensors with coef 0 are not written).
  for (const DtypeGroup& group : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, op, [&] {
      multi_tensor_apply<2>(make_slots<2>(group.indices, {grads, orthogonals}, {true, false}),
                            AddOrthogonalFunctor<scalar_t>{w.coefficients}, stream);
    });
  }
}

}  // namespace
}  // namespace amp_fused::cuda

TORCH_LIBRARY_IMPL(amp_fused, CUDA, m) {
  m.impl("perturb_", TORCH_FN(amp_fused::cuda::perturb_cuda));
  m.impl("restore_", TORCH_FN(amp_fused::cuda::restore_cuda));
  m.impl("restore_sgd_", TORCH_FN(amp_fused::cuda::restore_sgd_cuda));
  m.impl("norms", TORCH_FN(amp_fused::cuda::norms_cuda));
  m.impl("restore_orthogonal_", TORCH_FN(amp_fused::cuda::restore_orthogonal_cuda));
  m.impl("add_orthogonal_", TORCH_FN(amp_fused::cuda::add_orthogonal_cuda));
}

// A sparse CUDA tensor anywhere in a call dispatches it to a sparse key: the same kernels run there so that the
// call fails with the contract's TypeError (checked before anything is read or written), as on the CPU.
TORCH_LIBRARY_IMPL(amp_fused, SparseCUDA, m) {
  m.impl("perturb_", TORCH_FN(amp_fused::cuda::perturb_cuda));
  m.impl("restore_", TORCH_FN(amp_fused::cuda::restore_cuda));
  m.impl("restore_sgd_", TORCH_FN(amp_fused::cuda::restore_sgd_cuda));
  m.impl("norms", TORCH_FN(amp_fused::cuda::norms_cuda));
  m.impl("restore_orthogonal_", TORCH_FN(amp_fused::cuda::restore_orthogonal_cuda));
  m.impl("add_orthogonal_", TORCH_FN(amp_fused::cuda::add_orthogonal_cuda));
}

TORCH_LIBRARY_IMPL(amp_fused, SparseCsrCUDA, m) {
  m.impl("perturb_", TORCH_FN(amp_fused::cuda::perturb_cuda));
  m.impl("restore_", TORCH_FN(amp_fused::cuda::restore_cuda));
  m.impl("restore_sgd_", TORCH_FN(amp_fused::cuda::restore_sgd_cuda));
  m.impl("norms", TORCH_FN(amp_fused::cuda::norms_cuda));
  m.impl("restore_orthogonal_", TORCH_FN(amp_fused::cuda::restore_orthogonal_cuda));
  m.impl("add_orthogonal_", TORCH_FN(amp_fused::cuda::add_orthogonal_cuda));
}
