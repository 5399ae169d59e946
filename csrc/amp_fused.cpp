// Entry point of the amp_fused._C extension (the C++ CPU kernels).
// Op registrations live beside their kernels; this file only creates the Python module so that
// importing amp_fused._C loads the library and runs those registrations.
#include <torch/extension.h>

#include <ATen/Parallel.h>

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "amp_fused C++ CPU kernels";
  m.def("build_info", &build_info, "How this extension was built (compiler, torch, threading).");
}
