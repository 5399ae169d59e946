// Launch geometry of the amp_fused CUDA kernels. A plain header (no device code) so that module.cpp, which
// the host compiler builds, can publish the chunk size to Python for the tests.
#pragma once

#include <cstdint>

namespace amp_fused::cuda {

// Elements one CUDA block processes: a chunk never spans two tensors. 2^16 matches torch's own
// multi-tensor kernels: large enough to amortise a block's setup, small enough to spread a big tensor
// over many SMs.
constexpr int64_t kChunkSize = 65536;

// Threads per block of the chunk kernels.
constexpr int kBlockSize = 512;

// Consecutive elements one thread handles per step (one 4-wide vector access when aligned).
constexpr int kILP = 4;

// Chunk starts then keep the vector alignment of a tensor's first element.
static_assert(kChunkSize % kILP == 0, "a chunk must hold whole kILP-element groups");

}  // namespace amp_fused::cuda
