#include "cpu/multi_tensor.h"

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

}  // namespace amp_fused::cpu
