// The argument contract of the amp_fused ops, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// The same contract, in the same order and with the same messages and exception types, as the Python one in
// amp_fused/checks.py, which the op layer runs for every backend: a call that reaches a kernel without the
// Python checks (validate=False, or torch.ops.amp_fused.* directly) fails exactly as a validated call does.
// Everything is checked before anything is written. In order, the first failure raising:
//   1. every list has as many tensors as params (ValueError);
//   2. the scalars (epsilon, inner_lr, eta when given, lr, momentum, weight_decay finite and >= 0; dampening
//      finite; eta only with first) (ValueError);
//   3. index by index, list by list (params first), each tensor: defined (TypeError), strided (TypeError), a
//      supported dtype (params only; TypeError), on params[0]'s device (ValueError), params[i]'s shape and
//      dtype (the other lists; ValueError), dense and, for the other lists, laid out like params[i]
//      (ValueError; tensors without elements skip both);
//   4. no tensor of a written list shares memory with any other tensor of the call, at any index (ValueError).
// Messages start with "amp_fused.<op>: ". After the contract each kernel checks what only it needs (the
// device type it runs on).
//
// Non-contiguous tensors: the kernels run over each tensor's memory as one flat array, which is right for any
// tensor whose elements fill a dense block (contiguous, channels_last, any permutation of dims), as long as all
// tensors at one index lay out their elements in the same order. Tensors that skip memory (slices with a step,
// expanded views) are rejected rather than copied, since an in-place op on a copy would silently update
// nothing.
//
// Header-only (inline) host code: included by the CPU sources and by the .cu file of the CUDA extension.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Layout.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace amp_fused::checks {

struct NamedList {
  const char* name;
  at::TensorList tensors;
  bool written;  // the op writes this list's tensors
};

// As Python prints a torch.dtype: "torch.float32".
inline std::string dtype_name(at::ScalarType type) {
  return "torch." + std::string(c10::getDtypeNames(type).first);
}

// As Python prints a torch.layout: "torch.sparse_coo".
inline std::string layout_name(at::Layout layout) {
  switch (layout) {
    case at::kStrided:
      return "torch.strided";
    case at::kSparse:
      return "torch.sparse_coo";
    case at::kSparseCsr:
      return "torch.sparse_csr";
    case at::kSparseCsc:
      return "torch.sparse_csc";
    case at::kSparseBsr:
      return "torch.sparse_bsr";
    case at::kSparseBsc:
      return "torch.sparse_bsc";
    case at::kMkldnn:
      return "torch._mkldnn";
    case at::kJagged:
      return "torch.jagged";
    default: {
      std::ostringstream out;
      out << layout;
      return out.str();
    }
  }
}

// Default ostream formatting of a double, as Python's f"{value:g}" prints it ("0.1", "-1", "1e+20", "inf"),
// except that a NaN is "nan" whatever its sign bit (glibc would print "-nan", Python never does).
inline std::string number_text(double value) {
  if (std::isnan(value)) {
    return "nan";
  }
  std::ostringstream out;
  out << value;
  return out.str();
}

inline bool supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// Whether a and b (same shape) put every element at the same offset from their first element. Strides of
// size-1 dims never move anything, so they may differ (e.g. a (C, 1, k, k) weight in two memory formats).
inline bool same_element_order(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) {
      return false;
    }
  }
  return true;
}

// Step 1.
inline void check_lengths(const char* op, std::initializer_list<NamedList> lists) {
  const NamedList& lead = *lists.begin();
  const size_t n = lead.tensors.size();
  for (const NamedList& list : lists) {
    TORCH_CHECK_VALUE(list.tensors.size() == n, "amp_fused.", op, ": ", list.name, " has ", list.tensors.size(),
                      " tensors but ", lead.name, " has ", n, "; the lists must have the same length");
  }
}

// Step 2, one scalar.
inline void check_scalar(const char* op, const char* name, double value, bool nonnegative = true) {
  TORCH_CHECK_VALUE(std::isfinite(value) && (value >= 0.0 || !nonnegative), "amp_fused.", op, ": ", name,
                    " must be a finite number", nonnegative ? " >= 0" : "", ", got ", number_text(value));
}

// Step 4: byte ranges [data, data + numel * element_size) sorted by (start, list, index) and swept keeping the
// range that reaches furthest so far. Every overlap of a new range with an earlier one is also one with that
// range; the first one that involves a written list is reported, the pair in (list, index) order. The same
// algorithm as amp_fused/checks.py, so both report the same pair.
inline void check_overlap(const char* op, std::initializer_list<NamedList> lists) {
  std::vector<const NamedList*> by_position;
  bool any_written = false;
  size_t count = 0;
  for (const NamedList& list : lists) {
    by_position.push_back(&list);
    any_written = any_written || list.written;
    count += list.tensors.size();
  }
  if (!any_written) {
    return;
  }
  struct Range {
    uintptr_t start;
    size_t list;
    size_t index;
    uintptr_t end;
  };
  std::vector<Range> ranges;
  ranges.reserve(count);
  for (size_t position = 0; position < by_position.size(); ++position) {
    const at::TensorList tensors = by_position[position]->tensors;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      const int64_t numel = t.numel();
      if (numel == 0) {
        continue;
      }
      // The address only: const_data_ptr neither writes nor materialises anything.
      const auto start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      ranges.push_back({start, position, i, start + static_cast<uintptr_t>(numel) * t.element_size()});
    }
  }
  if (ranges.empty()) {
    return;
  }
  // (start, list, index) is unique, so the order is total.
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return std::tie(a.start, a.list, a.index) < std::tie(b.start, b.list, b.index);
  });
  const Range* kept = &ranges[0];
  for (size_t k = 1; k < ranges.size(); ++k) {
    const Range& entry = ranges[k];
    if (entry.start < kept->end && (by_position[entry.list]->written || by_position[kept->list]->written)) {
      const bool kept_first = std::tie(kept->list, kept->index) < std::tie(entry.list, entry.index);
      const Range& a = kept_first ? *kept : entry;
      const Range& b = kept_first ? entry : *kept;
      TORCH_CHECK_VALUE(false, "amp_fused.", op, ": ", by_position[a.list]->name, "[", a.index, "] and ",
                        by_position[b.list]->name, "[", b.index,
                        "] share memory; each tensor the op writes must have memory of its own");
    }
    if (entry.end > kept->end) {
      kept = &entry;
    }
  }
}

// Steps 3 and 4 (the lengths already checked equal).
inline void check_tensors(const char* op, std::initializer_list<NamedList> lists) {
  const NamedList& lead = *lists.begin();
  const size_t n = lead.tensors.size();
  if (n == 0) {
    return;
  }
  TORCH_CHECK_TYPE(lead.tensors[0].defined(), "amp_fused.", op, ": ", lead.name, "[0] is an undefined tensor");
  const at::Device device = lead.tensors[0].device();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = lead.tensors[i];
    TORCH_CHECK_TYPE(p.defined(), "amp_fused.", op, ": ", lead.name, "[", i, "] is an undefined tensor");
    TORCH_CHECK_TYPE(p.layout() == at::kStrided, "amp_fused.", op, ": ", lead.name, "[", i, "] has layout ",
                     layout_name(p.layout()),
                     "; AMP supports dense (strided) tensors only, so sparse gradients (e.g. "
                     "nn.Embedding(sparse=True)) are not supported");
    TORCH_CHECK_TYPE(supported_dtype(p.scalar_type()), "amp_fused.", op, ": ", lead.name, "[", i, "] has dtype ",
                     dtype_name(p.scalar_type()),
                     "; supported dtypes are torch.float32, torch.float64, torch.float16 and torch.bfloat16 "
                     "(complex tensors through torch.view_as_real)");
    TORCH_CHECK_VALUE(p.device() == device, "amp_fused.", op, ": ", lead.name, "[", i, "] is on ", p.device(),
                      " but ", lead.name, "[0] is on ", device, "; all tensors must be on one device");
    const bool has_elements = p.numel() > 0;
    TORCH_CHECK_VALUE(!has_elements || p.is_non_overlapping_and_dense(), "amp_fused.", op, ": ", lead.name, "[",
                      i, "] (shape ", p.sizes(), ", strides ", p.strides(),
                      ") does not fill a dense block of memory; the ops take dense tensors only (contiguous or a "
                      "permuted dense layout such as channels_last), not views that skip or repeat elements");
    for (auto list = lists.begin() + 1; list != lists.end(); ++list) {
      const at::Tensor& t = list->tensors[i];
      TORCH_CHECK_TYPE(t.defined(), "amp_fused.", op, ": ", list->name, "[", i, "] is an undefined tensor");
      TORCH_CHECK_TYPE(t.layout() == at::kStrided, "amp_fused.", op, ": ", list->name, "[", i, "] has layout ",
                       layout_name(t.layout()),
                       "; AMP supports dense (strided) tensors only, so sparse gradients (e.g. "
                       "nn.Embedding(sparse=True)) are not supported");
      TORCH_CHECK_VALUE(t.device() == device, "amp_fused.", op, ": ", list->name, "[", i, "] is on ", t.device(),
                        " but ", lead.name, "[0] is on ", device, "; all tensors must be on one device");
      TORCH_CHECK_VALUE(t.sizes() == p.sizes(), "amp_fused.", op, ": ", list->name, "[", i, "] has shape ",
                        t.sizes(), " but ", lead.name, "[", i, "] has shape ", p.sizes(),
                        "; tensors at one index must have the same shape");
      TORCH_CHECK_VALUE(t.scalar_type() == p.scalar_type(), "amp_fused.", op, ": ", list->name, "[", i,
                        "] has dtype ", dtype_name(t.scalar_type()), " but ", lead.name, "[", i, "] has dtype ",
                        dtype_name(p.scalar_type()), "; tensors at one index must have the same dtype");
      if (has_elements) {
        TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), "amp_fused.", op, ": ", list->name, "[", i,
                          "] (shape ", t.sizes(), ", strides ", t.strides(),
                          ") does not fill a dense block of memory; the ops take dense tensors only (contiguous "
                          "or a permuted dense layout such as channels_last), not views that skip or repeat "
                          "elements");
        TORCH_CHECK_VALUE(same_element_order(t, p), "amp_fused.", op, ": ", list->name, "[", i, "] (strides ",
                          t.strides(), ") does not lay out its elements like ", lead.name, "[", i, "] (strides ",
                          p.strides(), "); tensors at one index must have the same memory layout");
      }
    }
  }
  // Meta tensors have no memory (their data pointers are all null).
  if (!device.is_meta()) {
    check_overlap(op, lists);
  }
}

// Steps 1, 3 and 4 for `lists`, the params-like list first.
inline void check_lists(const char* op, std::initializer_list<NamedList> lists) {
  if (lists.size() == 0) {
    return;
  }
  check_lengths(op, lists);
  check_tensors(op, lists);
}

// ---- the contract of each op ----------------------------------------------------------------------------

// eta with a later ascent (Python: amp_fused.checks.ETA_NEEDS_FIRST, the same text).
constexpr const char* kEtaNeedsFirst =
    "amp_fused.perturb_: eta (ASAM's element weights) needs first=True; the weighted ascent is one step from θ";

// eta: ASAM's element weights (nullopt: none), allowed with the first ascent only.
inline void check_perturb(at::TensorList params, at::TensorList grads, at::TensorList backups, double epsilon,
                          double inner_lr, bool first = true, c10::optional<double> eta = c10::nullopt) {
  constexpr const char* op = "perturb_";
  const std::initializer_list<NamedList> lists = {
      {"params", params, true}, {"grads", grads, false}, {"backups", backups, true}};
  check_lengths(op, lists);
  check_scalar(op, "epsilon", epsilon);
  check_scalar(op, "inner_lr", inner_lr);
  if (eta.has_value()) {
    check_scalar(op, "eta", *eta);
    TORCH_CHECK_VALUE(first, kEtaNeedsFirst);
  }
  check_tensors(op, lists);
}

inline void check_restore(at::TensorList params, at::TensorList backups) {
  check_lists("restore_", {{"params", params, true}, {"backups", backups, false}});
}

// momentum_buffers is part of the call only when momentum != 0 (otherwise unused; it may then be empty).
inline void check_restore_sgd(at::TensorList params, at::TensorList backups, at::TensorList grads,
                              at::TensorList momentum_buffers, double lr, double momentum, double dampening,
                              double weight_decay) {
  constexpr const char* op = "restore_sgd_";
  auto scalars = [&] {
    check_scalar(op, "lr", lr);
    check_scalar(op, "momentum", momentum);
    check_scalar(op, "dampening", dampening, /*nonnegative=*/false);
    check_scalar(op, "weight_decay", weight_decay);
  };
  if (momentum != 0) {
    const std::initializer_list<NamedList> lists = {{"params", params, true},
                                                    {"backups", backups, false},
                                                    {"grads", grads, false},
                                                    {"momentum_buffers", momentum_buffers, true}};
    check_lengths(op, lists);
    scalars();
    check_tensors(op, lists);
  } else {
    const std::initializer_list<NamedList> lists = {
        {"params", params, true}, {"backups", backups, false}, {"grads", grads, false}};
    check_lengths(op, lists);
    scalars();
    check_tensors(op, lists);
  }
}

// norms reads only, so no overlap can fail it.
inline void check_norms(at::TensorList tensors) {
  check_lists("norms", {{"tensors", tensors, false}});
}

inline void check_restore_orthogonal(at::TensorList params, at::TensorList backups, at::TensorList grads,
                                     at::TensorList orthogonals) {
  check_lists("restore_orthogonal_", {{"params", params, true},
                                      {"backups", backups, false},
                                      {"grads", grads, false},
                                      {"orthogonals", orthogonals, true}});
}

inline void check_add_orthogonal(at::TensorList grads, at::TensorList orthogonals, double alpha) {
  constexpr const char* op = "add_orthogonal_";
  const std::initializer_list<NamedList> lists = {{"grads", grads, true}, {"orthogonals", orthogonals, false}};
  check_lengths(op, lists);
  check_scalar(op, "alpha", alpha);
  check_tensors(op, lists);
}

}  // namespace amp_fused::checks
