#include "cpu/multi_tensor.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace amp_fused::cpu {

std::vector<Chunk> plan_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  int64_t count = 0;
  for (const auto& t : tensors) {
    count += (t.numel() + kChunkSize - 1) / kChunkSize;
  }
  chunks.reserve(count);
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const int64_t numel = tensors[i].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunkSize) {
      chunks.push_back({i, begin, std::min(kChunkSize, numel - begin)});
    }
  }
  return chunks;
}

namespace {

bool supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// Whether a and b (same shape) put every element at the same offset from their first element. Strides of
// size-1 dims never move anything, so they may differ (e.g. a (C, 1, k, k) weight in two memory formats).
bool same_element_order(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) {
      return false;
    }
  }
  return true;
}

}  // namespace

void check_lists(const char* op, std::initializer_list<NamedList> lists) {
  TORCH_CHECK(lists.size() > 0, "amp_fused::", op, ": no tensor lists to check");
  const NamedList& lead = *lists.begin();
  const size_t n = lead.tensors.size();
  for (const NamedList& list : lists) {
    TORCH_CHECK(list.tensors.size() == n, "amp_fused::", op, ": ", list.name, " has ", list.tensors.size(),
                " tensors but ", lead.name, " has ", n, "; the lists must have the same length");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = lead.tensors[i];
    TORCH_CHECK(ref.defined(), "amp_fused::", op, ": ", lead.name, "[", i, "] is an undefined tensor");
    TORCH_CHECK(ref.layout() == at::kStrided, "amp_fused::", op, ": ", lead.name, "[", i, "] has layout ",
                ref.layout(), "; only strided (dense) tensors are supported");
    TORCH_CHECK(ref.device().is_cpu(), "amp_fused::", op, ": ", lead.name, "[", i, "] is on ", ref.device(),
                ", but these are the CPU kernels: every tensor must be on the CPU");
    TORCH_CHECK(supported_dtype(ref.scalar_type()), "amp_fused::", op, ": ", lead.name, "[", i, "] has dtype ",
                ref.scalar_type(), "; supported dtypes are float32, float64, float16 and bfloat16");
    TORCH_CHECK(ref.is_non_overlapping_and_dense(), "amp_fused::", op, ": ", lead.name, "[", i,
                "] (shape ", ref.sizes(), ", strides ", ref.strides(),
                ") does not fill a dense block of memory; these kernels take dense tensors only (contiguous or "
                "a permuted dense layout such as channels_last), not views that skip or repeat elements");
    for (auto list = lists.begin() + 1; list != lists.end(); ++list) {
      const at::Tensor& t = list->tensors[i];
      TORCH_CHECK(t.defined(), "amp_fused::", op, ": ", list->name, "[", i, "] is an undefined tensor");
      TORCH_CHECK(t.device() == ref.device(), "amp_fused::", op, ": ", list->name, "[", i, "] is on ",
                  t.device(), " but ", lead.name, "[", i, "] is on ", ref.device(),
                  "; tensors at one index must be on the same device (the CPU)");
      TORCH_CHECK(t.sizes() == ref.sizes(), "amp_fused::", op, ": ", list->name, "[", i, "] has shape ",
                  t.sizes(), " but ", lead.name, "[", i, "] has shape ", ref.sizes(),
                  "; tensors at one index must have the same shape");
      TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "amp_fused::", op, ": ", list->name, "[", i,
                  "] has dtype ", t.scalar_type(), " but ", lead.name, "[", i, "] has dtype ", ref.scalar_type(),
                  "; tensors at one index must have the same dtype");
      TORCH_CHECK(t.layout() == at::kStrided && t.is_non_overlapping_and_dense() && same_element_order(t, ref),
                  "amp_fused::", op, ": ", list->name, "[", i, "] (strides ", t.strides(),
                  ") does not lay out its elements like ", lead.name, "[", i, "] (strides ", ref.strides(),
                  "); tensors at one index must be dense with the same memory format");
    }
    for (auto a = lists.begin(); a != lists.end(); ++a) {
      for (auto b = a + 1; b != lists.end(); ++b) {
        if (!a->written && !b->written) {
          continue;
        }
        TORCH_CHECK(at::get_overlap_status(a->tensors[i], b->tensors[i]) == at::MemOverlapStatus::No,
                    "amp_fused::", op, ": ", a->name, "[", i, "] and ", b->name, "[", i,
                    "] share memory; each tensor the op writes must have memory of its own");
      }
    }
  }
}

}  // namespace amp_fused::cpu
