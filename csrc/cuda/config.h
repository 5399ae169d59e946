// Launch geometry of the amp_fused CUDA kernels. A plain header (no device code) so that module.cpp, which
// the host compiler builds, can publish these constants to Python for the tests.
#pragma once

#include <cstdint>

namespace amp_fused::cuda {

// Elements one CUDA block processes: a chunk never spans two tensors. 2^16 matches torch's own
// multi-tensor kernels: large enough to amortise a block's setup, small enough to spread a big tensor
// over many SMs.
constexpr int64_t kChunkSize = 65536;

// Threads per block of the chunk kernels.
constexpr int kBlockSize = 512;

// Bytes of one vector access: 128 bits, the widest global load/store a thread can issue.
constexpr int kVectorBytes = 16;

// Consecutive elements one thread handles per step, one kVectorBytes access when aligned: 8 for fp16/bf16,
// 4 for fp32, 2 for fp64. Per dtype, so every dtype moves 16 bytes per access.
template <typename T>
constexpr int kILP = kVectorBytes / static_cast<int>(sizeof(T));

// The most elements of one group (2-byte types). Chunk starts then keep the vector alignment of a tensor's
// first element for every dtype.
constexpr int kMaxILP = kVectorBytes / 2;
static_assert(kChunkSize % kMaxILP == 0, "a chunk must hold whole groups of every dtype");

// ---- launch tables (multi_tensor_apply.cuh) ------------------------------------------------------------

// Blocks per launch. Small tensors take one block each, so this also bounds the launches of a list of
// many small tensors together with the tensor limit.
constexpr int kMaxBlocks = 320;

// Bytes of a metadata table, leaving room in the 4 KB of kernel arguments for the functor's fields.
constexpr int kMetadataBytes = 3840;
constexpr int kKernelArgBytes = 4096;

// Tensors one table holds with `depth` pointers per tensor (111, 79, 62, 50 for depths 1-4):
// first_block_id + per block (int32 chunk, uint8 slot) + per tensor (depth pointers, numel, list index).
constexpr int max_tensors_per_launch(int depth) {
  return (kMetadataBytes - 8 - kMaxBlocks * 5) / (8 * depth + 8 + 4);
}

// Tensors one launch of the per-tensor norm sum (amp_ops.cu, sum_partials_kernel) covers.
constexpr int kSumPartialsTensors = 240;

}  // namespace amp_fused::cuda
