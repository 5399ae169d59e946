// Entry point of the amp_fused CUDA extension (amp_fused._C_cuda). The kernels register themselves with
// the dispatcher (TORCH_LIBRARY_IMPL in amp_ops.cu) when the library is loaded; this file only makes it an
// importable Python module, which amp_fused imports after amp_fused._C (that one defines the op schemas).
// Importing needs no GPU. TORCH_EXTENSION_NAME is set by torch.utils.cpp_extension (setup.py or JIT).
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>
#include <torch/version.h>

#include "config.h"

namespace {
// The build tag (see csrc/amp_fused.cpp): read by amp_fused/_build.py from the file before loading it.
#if defined(__GNUC__)
__attribute__((used))
#endif
const char kBuildTag[] = "amp_fused-build-tag:torch=" TORCH_VERSION ";";
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "amp_fused CUDA kernels for torch.ops.amp_fused.perturb_, restore_, restore_sgd_, norms, "
          "restore_orthogonal_ and add_orthogonal_";
  // Elements per CUDA block: tests place tensor sizes at chunk boundaries with it.
  m.attr("CHUNK_SIZE") = amp_fused::cuda::kChunkSize;
  // Bytes per vector access (every dtype), and the launch tables' limits: tests size lists that fill several
  // launches with these.
  m.attr("VECTOR_BYTES") = amp_fused::cuda::kVectorBytes;
  m.attr("MAX_BLOCKS_PER_LAUNCH") = amp_fused::cuda::kMaxBlocks;
  pybind11::dict tensors_per_launch;  // pointers per tensor (the op's number of lists) -> tensors per table
  for (int depth = 1; depth <= 4; ++depth) {
    tensors_per_launch[pybind11::int_(depth)] = amp_fused::cuda::max_tensors_per_launch(depth);
  }
  m.attr("MAX_TENSORS_PER_LAUNCH") = tensors_per_launch;
  m.attr("SUM_PARTIALS_TENSORS_PER_LAUNCH") = amp_fused::cuda::kSumPartialsTensors;
  m.attr("CUDART_VERSION") = CUDART_VERSION;
  m.attr("BUILD_TAG") = kBuildTag;
}
