// Multi-tensor launcher of the amp_fused CUDA kernels: one launch processes chunks of many tensors.
//
// Design
// * Chunks. An optimizer step touches tens to thousands of tensors of 1 to 10^8 elements. A launch per
//   tensor would cost several microseconds each and leave the GPU idle on small tensors; a block per
//   tensor would leave large ones on one SM. Every tensor is cut into chunks of kChunkSize elements (a
//   chunk never spans two tensors) and one CUDA block processes one chunk, so a single launch covers
//   many tensors with blocks of bounded, similar work.
// * Metadata. The (tensor, chunk) table of a launch is a kernel argument passed by value: no device
//   buffer, no host-to-device copy, no host sync. Kernel arguments are portably limited to 4 KB, so a
//   table holds at most kMaxBlocks blocks and TensorListMetadata<Depth>::kMaxTensors tensors (fewer for
//   more pointers per tensor: 111, 79, 62, 50 for depths 1-4). A new launch starts only when the table
//   is full; a tensor whose chunks straddle two launches carries over, in slot 0 of the next table.
// * Determinism, no float atomics. The launcher enumerates (tensor, chunk) pairs in a fixed order and
//   numbers them op-wide (`first_block_id` + blockIdx.x). A reducing pass writes each block's sum to
//   that slot of a partials buffer, and later kernels combine the slots in a fixed order. Inside a block,
//   thread t always owns the kILP<T>-element groups t, t + kBlockSize, ... of its chunk, whether they are
//   read with vector or scalar loads, and the block reduction is a fixed tree. Results therefore depend
//   only on the tensors' sizes and values: bitwise identical across runs, streams and alignments.
// * Vector access. A group is kVectorBytes (16) wide for every dtype: 8 fp16/bf16, 4 fp32 or 2 fp64
//   elements (config.h). When every pointer of a tensor is 16-byte aligned, full groups move as one
//   128-bit load/store; otherwise (unaligned views) and for a chunk's ragged end, element by element.
// * Sizes and element offsets are int64; chunk indices are int32 (2^31 chunks of 2^16 elements).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "config.h"

// Host-device and always inlined: the kernels pass their by-value arguments (the metadata table, the
// functor) by reference into these, which must not force a copy of the 4 KB table into local memory.
#define AMP_FUSED_HD __host__ __device__ __forceinline__

// Full unrolling of the kILP<T> loops keeps the per-thread arrays in registers; the host compiler, which also
// compiles the host-device functions, does not know the pragma.
#if defined(__CUDA_ARCH__)
#define AMP_FUSED_UNROLL _Pragma("unroll")
#else
#define AMP_FUSED_UNROLL
#endif

namespace amp_fused::cuda {

// ---- kILP<T>-element groups: one 16-byte vector access when aligned, scalar otherwise ------------------

template <typename T>
struct alignas(kVectorBytes) Pack {
  T v[kILP<T>];
};
static_assert(sizeof(Pack<float>) == kVectorBytes && alignof(Pack<double>) == kVectorBytes, "16-byte packs");

template <typename T>
AMP_FUSED_HD bool pack_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Pack<T>) == 0;
}

// Loads elements [i, i + kILP<T>) of an n-element chunk; positions at or past n read as zero. The vector
// path copies through memcpy with the alignment asserted: well-defined C++ (no type punning), and nvcc emits
// the same single 128-bit load as for a reinterpret_cast.
template <typename T>
AMP_FUSED_HD void load_group(T (&dst)[kILP<T>], const T* src, int i, int n, bool vector_ok) {
  constexpr int ilp = kILP<T>;
  if (vector_ok && i + ilp <= n) {
    Pack<T> pack;
    std::memcpy(&pack, __builtin_assume_aligned(static_cast<const void*>(src + i), alignof(Pack<T>)), sizeof(pack));
    AMP_FUSED_UNROLL
    for (int j = 0; j < ilp; ++j) {
      dst[j] = pack.v[j];
    }
  } else {
    AMP_FUSED_UNROLL
    for (int j = 0; j < ilp; ++j) {
      dst[j] = i + j < n ? src[i + j] : T(0);
    }
  }
}

// Stores elements [i, i + kILP<T>) of an n-element chunk; nothing at or past n is written.
template <typename T>
AMP_FUSED_HD void store_group(T* dst, const T (&src)[kILP<T>], int i, int n, bool vector_ok) {
  constexpr int ilp = kILP<T>;
  if (vector_ok && i + ilp <= n) {
    Pack<T> pack;
    AMP_FUSED_UNROLL
    for (int j = 0; j < ilp; ++j) {
      pack.v[j] = src[j];
    }
    std::memcpy(__builtin_assume_aligned(static_cast<void*>(dst + i), alignof(Pack<T>)), &pack, sizeof(pack));
  } else {
    AMP_FUSED_UNROLL
    for (int j = 0; j < ilp; ++j) {
      if (i + j < n) {
        dst[i + j] = src[j];
      }
    }
  }
}

// Sum of the n values of `acc` as a fixed pairwise tree (deterministic; n a power of two).
template <int N>
AMP_FUSED_HD double pairwise_sum(const double (&acc)[N]) {
  static_assert(N >= 1 && (N & (N - 1)) == 0, "a power of two");
  double level[N];
  AMP_FUSED_UNROLL
  for (int j = 0; j < N; ++j) {
    level[j] = acc[j];
  }
  AMP_FUSED_UNROLL
  for (int width = N / 2; width > 0; width /= 2) {
    AMP_FUSED_UNROLL
    for (int j = 0; j < width; ++j) {
      level[j] = level[2 * j] + level[2 * j + 1];
    }
  }
  return level[0];
}

// ---- launch metadata (limits: config.h) ---------------------------------------------------------------

// The table of one launch. Block b processes chunk block_to_chunk[b] of the tensor in slot
// block_to_tensor[b]; its op-wide number is first_block_id + b.
template <int Depth>
struct TensorListMetadata {
  static constexpr int kMaxTensors = max_tensors_per_launch(Depth);
  static_assert(kMaxTensors >= 1 && kMaxTensors <= 255, "slots are stored as uint8");

  int64_t first_block_id;
  void* addresses[Depth][kMaxTensors];
  int64_t numels[kMaxTensors];
  int32_t list_index[kMaxTensors];  // position of the tensor in the op's argument lists
  int32_t block_to_chunk[kMaxBlocks];
  uint8_t block_to_tensor[kMaxBlocks];
};

// The chunk a block works on: the tensor's slot, the chunk's first element and its length.
struct ChunkRef {
  int slot;
  int64_t start;
  int size;
};

template <int Depth>
AMP_FUSED_HD ChunkRef locate_chunk(const TensorListMetadata<Depth>& meta, int block) {
  ChunkRef c;
  c.slot = meta.block_to_tensor[block];
  c.start = static_cast<int64_t>(meta.block_to_chunk[block]) * kChunkSize;
  const int64_t left = meta.numels[c.slot] - c.start;
  c.size = static_cast<int>(left < kChunkSize ? left : kChunkSize);
  return c;
}

// Pointer to the chunk's first element in list `list` (0 <= list < Depth).
template <typename T, int Depth>
AMP_FUSED_HD T* chunk_data(const TensorListMetadata<Depth>& meta, int list, const ChunkRef& c) {
  return static_cast<T*>(meta.addresses[list][c.slot]) + c.start;
}

// ---- host side: tables and launches ------------------------------------------------------------------

// One tensor as the launcher sees it: its Depth data pointers (same numel and element order), its
// element count and its position in the op's argument lists.
template <int Depth>
struct TensorSlot {
  void* ptrs[Depth];
  int64_t numel;
  int32_t list_index;
};

inline int64_t chunk_count(int64_t numel) {
  const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
  TORCH_CHECK(chunks <= INT32_MAX, "amp_fused: a tensor of ", numel, " elements has more than 2^31 chunks");
  return chunks;
}

// Enumerates the chunks of `tensors` in order (empty tensors have none) into tables and calls
// launch(table, number_of_blocks) for each table, only when it is full and once at the end. Blocks are
// numbered from first_block_id; if first_blocks is given, (*first_blocks)[k] receives the number of the
// first chunk of tensors[k] (its chunks are numbered consecutively from there). Returns the number of
// blocks enumerated.
template <int Depth, typename Launch>
int64_t for_each_launch(const std::vector<TensorSlot<Depth>>& tensors, int64_t first_block_id, Launch&& launch,
                        std::vector<int64_t>* first_blocks = nullptr) {
  using Meta = TensorListMetadata<Depth>;
  Meta meta;
  meta.first_block_id = first_block_id;
  int ntensors = 0;
  int nblocks = 0;
  auto flush = [&] {
    launch(static_cast<const Meta&>(meta), nblocks);
    meta.first_block_id += nblocks;
    nblocks = 0;
  };
  if (first_blocks != nullptr) {
    first_blocks->assign(tensors.size(), 0);
  }
  for (size_t k = 0; k < tensors.size(); ++k) {
    const TensorSlot<Depth>& t = tensors[k];
    if (first_blocks != nullptr) {
      (*first_blocks)[k] = meta.first_block_id + nblocks;
    }
    const int64_t chunks = chunk_count(t.numel);
    if (chunks == 0) {
      continue;
    }
    if (ntensors == Meta::kMaxTensors) {
      flush();
      ntensors = 0;
    }
    int slot = ntensors++;
    auto fill_slot = [&](int s) {
      for (int d = 0; d < Depth; ++d) {
        meta.addresses[d][s] = t.ptrs[d];
      }
      meta.numels[s] = t.numel;
      meta.list_index[s] = t.list_index;
    };
    fill_slot(slot);
    for (int64_t c = 0; c < chunks; ++c) {
      if (nblocks == kMaxBlocks) {
        flush();
        // Only this tensor still has chunks to come: it alone carries over, in slot 0.
        slot = 0;
        fill_slot(slot);
        ntensors = 1;
      }
      meta.block_to_tensor[nblocks] = static_cast<uint8_t>(slot);
      meta.block_to_chunk[nblocks] = static_cast<int32_t>(c);
      ++nblocks;
    }
  }
  if (nblocks > 0) {
    flush();
  }
  return meta.first_block_id - first_block_id;
}

// ---- device side -------------------------------------------------------------------------------------

// K fp64 sums carried together through a reduction (the gradient-reuse ops reduce two per chunk: a dot
// product and a squared norm, or two squared norms). A reducing functor returns a double (K = 1) or a Sums<K>.
template <int K>
struct Sums {
  static_assert(K >= 1, "at least one sum");
  double v[K];
};

template <typename T>
struct SumCount {
  static constexpr int value = 1;  // a plain double
};
template <int K>
struct SumCount<Sums<K>> {
  static constexpr int value = K;
};

AMP_FUSED_HD Sums<1> as_sums(double value) { return Sums<1>{{value}}; }
template <int K>
AMP_FUSED_HD Sums<K> as_sums(const Sums<K>& value) {
  return value;
}

// Sum over a block of Threads threads of each of the K values, every one with the same fixed reduction tree
// (deterministic). The result is valid in thread 0. Call at most once per kernel (it owns one shared array)
// from every thread of the block.
template <int Threads, int K>
__device__ __forceinline__ Sums<K> block_sum(Sums<K> value) {
  static_assert(Threads % 32 == 0 && Threads <= 1024, "whole warps, at most 1024 threads");
  constexpr int kWarps = Threads / 32;
  __shared__ double warp_sums[K][kWarps];
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      value.v[k] += __shfl_down_sync(0xffffffffu, value.v[k], offset);
    }
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      warp_sums[k][warp] = value.v[k];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      value.v[k] = lane < kWarps ? warp_sums[k][lane] : 0.0;
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        value.v[k] += __shfl_down_sync(0xffffffffu, value.v[k], offset);
      }
    }
  }
  return value;
}

// One value: the same tree.
template <int Threads>
__device__ __forceinline__ double block_sum(double value) {
  return block_sum<Threads>(Sums<1>{{value}}).v[0];
}

// Functor interface: `f(meta, block, thread)` does thread `thread`'s share of block `block`'s chunk. The
// coordinates are explicit (not threadIdx/blockIdx) so the per-thread work is ordinary host-device code.
template <int Depth, typename Functor>
__global__ void __launch_bounds__(kBlockSize) apply_kernel(TensorListMetadata<Depth> meta, Functor f) {
  f(meta, static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x));
}

// A reducing functor returns its thread's partial sums (a double or a Sums<K>); the block's totals go to its
// op-wide slot: partials[(first_block_id + blockIdx.x) * K + k].
template <int Depth, typename Functor>
__global__ void __launch_bounds__(kBlockSize)
    reduce_kernel(TensorListMetadata<Depth> meta, Functor f, double* partials) {
  auto partial = as_sums(f(meta, static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x)));
  constexpr int K = SumCount<decltype(partial)>::value;
  const Sums<K> total = block_sum<kBlockSize>(partial);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      partials[(meta.first_block_id + blockIdx.x) * K + k] = total.v[k];
    }
  }
}

template <int Depth, typename Functor>
constexpr void check_kernel_args() {
  static_assert(sizeof(TensorListMetadata<Depth>) <= kMetadataBytes, "metadata table exceeds its budget");
  static_assert(sizeof(TensorListMetadata<Depth>) + sizeof(Functor) + sizeof(double*) <= kKernelArgBytes,
                "kernel arguments exceed 4 KB");
}

// Runs f over every chunk of `tensors` on `stream`.
template <int Depth, typename Functor>
void multi_tensor_apply(const std::vector<TensorSlot<Depth>>& tensors, const Functor& f, cudaStream_t stream) {
  check_kernel_args<Depth, Functor>();
  for_each_launch<Depth>(tensors, 0, [&](const TensorListMetadata<Depth>& meta, int nblocks) {
    apply_kernel<Depth, Functor><<<nblocks, kBlockSize, 0, stream>>>(meta, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Runs the reducing functor f over every chunk of `tensors` on `stream`, writing the K partials of chunk k
// (k enumerates the chunks in order, from first_block_id) to partials[k * K .. k * K + K) (K = 1 for a
// functor that returns a double); see for_each_launch for first_blocks.
// Returns the number of chunks.
template <int Depth, typename Functor>
int64_t multi_tensor_reduce(const std::vector<TensorSlot<Depth>>& tensors, const Functor& f, double* partials,
                            int64_t first_block_id, cudaStream_t stream, std::vector<int64_t>* first_blocks) {
  check_kernel_args<Depth, Functor>();
  return for_each_launch<Depth>(
      tensors, first_block_id,
      [&](const TensorListMetadata<Depth>& meta, int nblocks) {
        reduce_kernel<Depth, Functor><<<nblocks, kBlockSize, 0, stream>>>(meta, f, partials);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      first_blocks);
}

}  // namespace amp_fused::cuda
