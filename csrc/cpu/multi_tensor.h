// Multi-tensor plumbing of the CPU kernels: the chunk plan over a list of tensors and the parallel loop over
// chunks. (The argument checks are in csrc/checks.h, shared with the CUDA kernels.)
//
// Every list is cut into chunks of at most kChunkSize elements (a chunk never spans two tensors) and the
// chunks run on at::parallel_for threads. The plan depends only on the tensor sizes, never on the thread
// count, and each chunk is computed the same way whichever thread runs it, so per-chunk partial sums, and
// every result built from them in chunk order, are bitwise identical for any torch.set_num_threads().
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace amp_fused::cpu {

// 64K elements: 256 KiB of fp32 per list, so a chunk's few lists stay in L2 while a thread works on it, and
// a ResNet-18 (11.7M values in 62 tensors) still gives ~230 chunks to balance over the threads.
constexpr int64_t kChunkSize = int64_t{1} << 16;

// Elements [begin, begin + size) of tensor `tensor` of a list.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t size;
};

// The chunks of `tensors` in (tensor, offset) order; empty tensors have none.
std::vector<Chunk> plan_chunks(at::TensorList tensors);

// Runs fn(chunk_index) once for every chunk. Each thread takes one contiguous run of chunks holding about
// the same number of bytes (chunks differ in size and dtype); small jobs run on the calling thread, where
// starting the thread team would cost more than the work.
template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, at::TensorList tensors, const Fn& fn);

// ---------------------------------------------------------------------------------------------------------

template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, at::TensorList tensors, const Fn& fn) {
  const auto num_chunks = static_cast<int64_t>(chunks.size());
  if (num_chunks == 0) {
    return;
  }
  // bytes_before[k]: bytes of one list in chunks [0, k); the split points balance bytes, not chunk counts.
  std::vector<int64_t> bytes_before(num_chunks + 1, 0);
  for (int64_t k = 0; k < num_chunks; ++k) {
    const Chunk& c = chunks[k];
    bytes_before[k + 1] = bytes_before[k] + c.size * static_cast<int64_t>(tensors[c.tensor].element_size());
  }
  const int64_t total_bytes = bytes_before[num_chunks];
  // Below one chunk of fp32 per thread the fork/join costs more than it saves.
  constexpr int64_t kMinParallelBytes = kChunkSize * 4;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>({threads, num_chunks, total_bytes / kMinParallelBytes}));
  if (parts == 1) {
    for (int64_t k = 0; k < num_chunks; ++k) {
      fn(k);
    }
    return;
  }
  // Part p starts at the first chunk that begins at or after p/parts of the bytes.
  std::vector<int64_t> first_chunk(parts + 1, num_chunks);
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t target = total_bytes / parts * p;
    first_chunk[p] = std::lower_bound(bytes_before.begin(), bytes_before.end() - 1, target) - bytes_before.begin();
  }
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t p = part_begin; p < part_end; ++p) {
      for (int64_t k = first_chunk[p]; k < first_chunk[p + 1]; ++k) {
        fn(k);
      }
    }
  });
}

}  // namespace amp_fused::cpu
