// Entry point of the amp_fused._C extension (the C++ CPU kernels).
// Op registrations live beside their kernels; this file creates the Python module so that importing
// amp_fused._C loads the library and runs those registrations, and defines the Triton backend's per-call host
// helpers (same_addresses, layout_signature, same_layout, bump_versions: amp_fused/triton/metadata.py), which
// that backend uses where this module is loaded and replaces with its pure-Python path where not.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// The build tag: the torch this library was compiled against. amp_fused/_build.py reads it from the file without
// loading the library, since a library built for another torch must not be loaded (its op registrations could
// not be undone, so no fresh build could be loaded after it).
#if defined(__GNUC__)
__attribute__((used))
#endif
const char kBuildTag[] = "amp_fused-build-tag:torch=" TORCH_VERSION ";";

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
  info["build_tag"] = kBuildTag;
  info["parallel"] = at::get_parallel_info();
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  return info;
}

// A list or tuple (subclasses included: a plan's HeldTensors is a tuple), whose items can be read in place.
bool is_list_or_tuple(PyObject* obj) {
  return PyList_Check(obj) || PyTuple_Check(obj);
}

// Each pass below reads, per tensor, its Python object, its TensorImpl and one object behind that (the storage,
// or the version counter): three dependent loads, each a cache miss when the tensors are spread over memory (a
// model's parameters and gradients are, between their data). So every pass prefetches them some items ahead,
// the Python object 3*kAhead items ahead, its TensorImpl 2*kAhead and the object behind kAhead, and the misses
// of several tensors overlap instead of adding up. (A prefetch is a hint: it never faults and changes nothing.)
constexpr Py_ssize_t kAhead = 8;
constexpr size_t kLine = 64;

// Every cache line of [p, p + bytes).
inline void prefetch_bytes(const void* p, size_t bytes) {
  if (p == nullptr) {
    return;
  }
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~static_cast<uintptr_t>(kLine - 1);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(p) + bytes - 1) & ~static_cast<uintptr_t>(kLine - 1);
  for (uintptr_t line = first; line <= last; line += kLine) {
    __builtin_prefetch(reinterpret_cast<const void*>(line));
  }
}

inline c10::TensorImpl* impl_of(PyObject* obj) {
  return THPVariable_Unpack(obj).unsafeGetTensorImpl();
}

// What bump_version increments: the counter a VariableVersion points to (its one member, an intrusive_ptr, whose
// one member is that pointer).
static_assert(sizeof(c10::VariableVersion) == sizeof(void*), "VariableVersion is one intrusive_ptr");
inline const void* version_counter_of(const c10::TensorImpl* impl) {
  return *reinterpret_cast<const void* const*>(&impl->version_counter());
}

inline const void* storage_of(const c10::TensorImpl* impl) {
  return impl->unsafe_storage().unsafeGetStorageImpl();
}

inline const void* nothing_behind(const c10::TensorImpl*) {
  return nullptr;
}

// Before visiting items[i]: the prefetches for the items kAhead, 2*kAhead and 3*kAhead further on. Only items
// that are exactly tensors are looked into (their type was read when their Python object was prefetched).
// (Write: the object behind is written, as a version counter is: prefetched for writing.)
template <bool Write = false, typename Behind>
inline void prefetch_ahead(PyObject** items, Py_ssize_t n, Py_ssize_t i, Behind behind) {
  if (i + 3 * kAhead < n) {
    prefetch_bytes(items[i + 3 * kAhead], sizeof(THPVariable));
  }
  if (i + 2 * kAhead < n && THPVariable_CheckExact(items[i + 2 * kAhead])) {
    prefetch_bytes(impl_of(items[i + 2 * kAhead]), sizeof(c10::TensorImpl));
  }
  if (i + kAhead < n && THPVariable_CheckExact(items[i + kAhead])) {
    const void* p = behind(impl_of(items[i + kAhead]));
    if (p != nullptr) {
      if (Write) {
        __builtin_prefetch(p, 1);
      } else {
        prefetch_bytes(p, 2 * kLine);
      }
    }
  }
}

// Before a pass's loop (after all_plain_tensors or the like has read the first items' Python objects): the
// TensorImpls of the items prefetch_ahead reaches too late for.
inline void prefetch_first(PyObject** items, Py_ssize_t n) {
  for (Py_ssize_t i = 0; i < n && i < 2 * kAhead; ++i) {
    if (THPVariable_CheckExact(items[i])) {
      prefetch_bytes(impl_of(items[i]), sizeof(c10::TensorImpl));
    }
  }
}

// Whether every item of a list or tuple is exactly a torch.Tensor or an nn.Parameter (the tensors the C++ passes
// read directly).
bool only_plain_tensors(PyObject* seq) {
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i + 3 * kAhead < n) {
      prefetch_bytes(items[i + 3 * kAhead], sizeof(THPVariable));
    }
    if (!THPVariable_CheckExact(items[i])) {
      return false;
    }
  }
  return true;
}

// only_plain_tensors, with no TorchFunctionMode on: else the Python path answers.
bool all_plain_tensors(PyObject* seq) {
  return !at::impl::torch_function_mode_enabled() && only_plain_tensors(seq);
}

// Whether `tensors` (a list or tuple) lie at the addresses `expected` holds (a 1-d int64 CPU tensor), one
// Tensor.data_ptr() per tensor: True or False. None where the Python path must answer, so that it behaves
// exactly as that path does: `tensors` is no list or tuple; an item is not exactly a torch.Tensor or an
// nn.Parameter (a subclass may answer data_ptr() through __torch_function__), or a TorchFunctionMode is on;
// a data_ptr() raises (Python raises it, with its own message). Runs no Python code.
py::object same_addresses(py::handle tensors, py::handle expected) {
  PyObject* seq = tensors.ptr();
  if (!is_list_or_tuple(seq) || !all_plain_tensors(seq)) {
    return py::none();
  }
  TORCH_CHECK(THPVariable_Check(expected.ptr()), "same_addresses: expected must be a tensor");
  const at::Tensor& table = THPVariable_Unpack(expected.ptr());
  TORCH_CHECK(table.scalar_type() == at::kLong && table.device().is_cpu() && table.dim() == 1 &&
                  table.is_contiguous(),
              "same_addresses: expected must be a 1-d contiguous int64 CPU tensor");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  if (table.numel() != n) {
    return py::bool_(false);
  }
  const int64_t* want = table.const_data_ptr<int64_t>();
  prefetch_first(items, n);
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      prefetch_ahead(items, n, i, storage_of);
      // Tensor.data_ptr() is data_ptr() (copy-on-write storage is materialised, as there), read as an integer
      if (static_cast<int64_t>(reinterpret_cast<intptr_t>(THPVariable_Unpack(items[i]).data_ptr())) != want[i]) {
        return py::bool_(false);  // the Python path reads every address again to build the new table
      }
    }
  } catch (const c10::Error&) {
    return py::none();
  }
  return py::bool_(true);
}

// The layout signature of `tensors` (a list or tuple), what same_layout compares: bytes of int64s, the count,
// then per tensor its dtype (ScalarType), dim, sizes and strides (the Python path's spec_of: (dtype, shape,
// stride) per tensor). None where the Python path must answer (as same_addresses), or where sizes or strides
// raise (a sparse tensor: Python raises it).
py::object layout_signature(py::handle tensors) {
  PyObject* seq = tensors.ptr();
  if (!is_list_or_tuple(seq) || !all_plain_tensors(seq)) {
    return py::none();
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  std::vector<int64_t> out;
  out.reserve(1 + 6 * static_cast<size_t>(n));
  out.push_back(n);
  prefetch_first(items, n);
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      prefetch_ahead(items, n, i, nothing_behind);
      const at::Tensor& t = THPVariable_Unpack(items[i]);
      const auto sizes = t.sizes();
      const auto strides = t.strides();
      out.push_back(static_cast<int64_t>(t.scalar_type()));
      out.push_back(static_cast<int64_t>(sizes.size()));
      out.insert(out.end(), sizes.begin(), sizes.end());
      out.insert(out.end(), strides.begin(), strides.end());
    }
  } catch (const c10::Error&) {
    return py::none();
  }
  return py::bytes(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(int64_t));
}

// Whether `tensors` (a list or tuple) have the layout signature `signature` (layout_signature's bytes): the
// same count, and per tensor the same dtype, sizes and strides. True or False; None where the Python path must
// answer (as layout_signature).
py::object same_layout(py::handle tensors, py::handle signature) {
  PyObject* seq = tensors.ptr();
  if (!is_list_or_tuple(seq) || !all_plain_tensors(seq)) {
    return py::none();
  }
  TORCH_CHECK(PyBytes_Check(signature.ptr()), "same_layout: signature must be bytes from layout_signature");
  const char* data = PyBytes_AS_STRING(signature.ptr());
  const size_t count = static_cast<size_t>(PyBytes_GET_SIZE(signature.ptr())) / sizeof(int64_t);
  auto word = [data](size_t i) {  // bytes need not be 8-byte aligned
    int64_t value;
    std::memcpy(&value, data + i * sizeof(int64_t), sizeof(int64_t));
    return value;
  };
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  if (count < 1 || word(0) != n) {
    return py::bool_(false);
  }
  size_t pos = 1;
  prefetch_first(items, n);
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      prefetch_ahead(items, n, i, nothing_behind);
      const at::Tensor& t = THPVariable_Unpack(items[i]);
      const auto sizes = t.sizes();
      const auto strides = t.strides();
      const size_t dim = sizes.size();
      if (pos + 2 + 2 * dim > count || word(pos) != static_cast<int64_t>(t.scalar_type()) ||
          word(pos + 1) != static_cast<int64_t>(dim)) {
        return py::bool_(false);
      }
      pos += 2;
      for (size_t d = 0; d < dim; ++d) {
        if (word(pos + d) != sizes[d] || word(pos + dim + d) != strides[d]) {
          return py::bool_(false);
        }
      }
      pos += 2 * dim;
    }
  } catch (const c10::Error&) {
    return py::none();
  }
  return py::bool_(pos == count);
}

// Bumps the autograd version counter of every tensor in each of `lists` (lists or tuples), skipping inference
// tensors (they have none), as torch.autograd.graph.increment_version does with each list: what the Triton
// kernels, which write through raw pointers, owe autograd. True when done; False, having bumped nothing, where
// an argument is no list or tuple or an item is not exactly a torch.Tensor or an nn.Parameter (the Python path
// then does it, or raises its own error). Runs no Python code.
bool bump_versions(py::args lists) {
  for (py::handle list : lists) {
    if (!is_list_or_tuple(list.ptr()) || !only_plain_tensors(list.ptr())) {
      return false;
    }
  }
  for (py::handle list : lists) {
    PyObject* seq = list.ptr();
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    prefetch_first(items, n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      prefetch_ahead<true>(items, n, i, version_counter_of);
      const at::Tensor& t = THPVariable_Unpack(items[i]);
      if (!t.is_inference()) {
        torch::autograd::impl::bump_version(t);
      }
    }
  }
  return true;
}

}  // namespace

// TORCH_EXTENSION_NAME: _C when setup.py builds amp_fused._C, amp_fused_C when amp_fused builds it at run time.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "amp_fused C++ CPU kernels";
  m.def("build_info", &build_info, "How this extension was built (compiler, torch, threading).");
  m.def("same_addresses", &same_addresses, py::arg("tensors"), py::arg("expected"),
        "Triton backend: whether the tensors' data_ptr()s are those in the int64 tensor expected (True/False); "
        "None where the Python path must answer.");
  m.def("layout_signature", &layout_signature, py::arg("tensors"),
        "Triton backend: the tensors' dtypes, sizes and strides as bytes (what same_layout compares); None where "
        "the Python path must answer.");
  m.def("same_layout", &same_layout, py::arg("tensors"), py::arg("signature"),
        "Triton backend: whether the tensors have the layout signature (True/False); None where the Python path "
        "must answer.");
  m.def("bump_versions", &bump_versions,
        "Triton backend: bumps the autograd version counters of the tensors in each list (inference tensors "
        "skipped); False, having bumped nothing, where the Python path must do it.");
}
