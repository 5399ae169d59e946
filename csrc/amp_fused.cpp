// Entry point of the amp_fused._C extension (the C++ CPU kernels).
// Op registrations live beside their kernels; this file only creates the Python module so that
// importing amp_fused._C loads the library and runs those registrations.
#include <torch/extension.h>

#include <ATen/Parallel.h>

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

}  // namespace

// TORCH_EXTENSION_NAME: _C when setup.py builds amp_fused._C, amp_fused_C when amp_fused builds it at run time.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "amp_fused C++ CPU kernels";
  m.def("build_info", &build_info, "How this extension was built (compiler, torch, threading).");
}
