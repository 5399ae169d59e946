// Per-chunk work of the amp_fused ops for multi_tensor_apply.cuh (what the ops compute:
// amp_fused/backends/__init__.py). Element math comes from amp_math.h, shared with the CPU kernels. Each
// functor loads the storage type, computes in opmath (fp32; fp64 for fp64 tensors) and rounds once on
// store. Thread `thread` handles the groups of kWidth = kILP<scalar_t> elements (16 bytes: config.h)
// starting at thread·kWidth, stepping by kBlockSize·kWidth; group positions at or past the chunk's end load
// as zero and are never stored.
#pragma once

#include <ATen/OpMathType.h>

#include "amp_math.h"
#include "multi_tensor_apply.cuh"

namespace amp_fused::cuda {

// Pass 1 of perturb_: this thread's share of ‖Δ‖² over the chunk (the kernel sums the block and stores one
// partial per chunk). Lists: first ascent {grads}; later ascents {params, backups, grads}; weighted (ASAM,
// first ascents only) {params, grads}, with ‖u‖², u = ζ·T·g, T = |θ| + η (θ = params). Δ is formed in
// opmath, as the apply pass forms it; each Δ² and the sums are double, so a finite fp32 Δ (Δ² ≤ ~1.2e77)
// never overflows the norm (an fp32 sum overflows once |Δ| reaches ~1.8e19). fp64 tensors: a ‖Δ‖ above
// ~1.3e154 still overflows.
template <typename scalar_t, bool First, bool Weighted = false>
struct SumSquaresFunctor {
  static_assert(First || !Weighted, "the weighted ascent is a first ascent");
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int kDepth = Weighted ? 2 : (First ? 1 : 3);
  static constexpr int kWidth = kILP<scalar_t>;  // elements per 16-byte group

  opmath_t inner_lr;
  opmath_t eta;  // read when Weighted

  AMP_FUSED_HD double operator()(const TensorListMetadata<kDepth>& meta, int block, int thread) const {
    const ChunkRef c = locate_chunk(meta, block);
    const scalar_t* grad = chunk_data<scalar_t>(meta, kDepth - 1, c);
    const scalar_t* param = nullptr;
    const scalar_t* backup = nullptr;
    bool vector_ok = pack_aligned(grad);
    if constexpr (Weighted) {
      param = chunk_data<scalar_t>(meta, 0, c);
      vector_ok = vector_ok && pack_aligned(param);
    } else if constexpr (!First) {
      param = chunk_data<scalar_t>(meta, 0, c);
      backup = chunk_data<scalar_t>(meta, 1, c);
      vector_ok = vector_ok && pack_aligned(param) && pack_aligned(backup);
    }
    // One accumulator per group position: kWidth independent add chains, combined in a fixed order.
    double acc[kWidth] = {};
    for (int i = thread * kWidth; i < c.size; i += kBlockSize * kWidth) {
      scalar_t g[kWidth];
      load_group(g, grad, i, c.size, vector_ok);
      if constexpr (Weighted) {
        scalar_t p[kWidth];
        load_group(p, param, i, c.size, vector_ok);
        AMP_FUSED_UNROLL
        for (int j = 0; j < kWidth; ++j) {
          const opmath_t weight = element_weight(static_cast<opmath_t>(p[j]), eta);
          const double u = static_cast<double>(weighted_ascent(weight, static_cast<opmath_t>(g[j]), inner_lr));
          acc[j] += u * u;  // zero past the chunk's end: g = 0 there
        }
      } else if constexpr (First) {
        AMP_FUSED_UNROLL
        for (int j = 0; j < kWidth; ++j) {
          const double delta = static_cast<double>(
              ascent_delta(opmath_t(0), opmath_t(0), static_cast<opmath_t>(g[j]), inner_lr, true));
          acc[j] += delta * delta;  // zero past the chunk's end: Δ of zeros is zero
        }
      } else {
        scalar_t p[kWidth];
        scalar_t b[kWidth];
        load_group(p, param, i, c.size, vector_ok);
        load_group(b, backup, i, c.size, vector_ok);
        AMP_FUSED_UNROLL
        for (int j = 0; j < kWidth; ++j) {
          const double delta = static_cast<double>(ascent_delta(
              static_cast<opmath_t>(p[j]), static_cast<opmath_t>(b[j]), static_cast<opmath_t>(g[j]), inner_lr, false));
          acc[j] += delta * delta;
        }
      }
    }
    return pairwise_sum(acc);
  }
};

// Pass 2 of perturb_: params ← θ + scale·Δ with the tensor's scale from the norm pass (0 when its norm, or
// the global one, is not finite: params become exactly θ). First ascent: θ is params, and it is also
// copied to backups in this pass. Weighted (ASAM, first ascents only): params ← θ + scale·(T·u), u = ζ·T·g,
// T = |θ| + η. Lists: {params, backups, grads}.
template <typename scalar_t, bool First, bool Weighted = false>
struct PerturbApplyFunctor {
  static_assert(First || !Weighted, "the weighted ascent is a first ascent");
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int kDepth = 3;
  static constexpr int kWidth = kILP<scalar_t>;  // elements per 16-byte group

  const double* scales;  // indexed by list index
  opmath_t inner_lr;
  opmath_t eta;  // read when Weighted

  AMP_FUSED_HD void operator()(const TensorListMetadata<kDepth>& meta, int block, int thread) const {
    const ChunkRef c = locate_chunk(meta, block);
    scalar_t* param = chunk_data<scalar_t>(meta, 0, c);
    scalar_t* backup = chunk_data<scalar_t>(meta, 1, c);
    const scalar_t* grad = chunk_data<scalar_t>(meta, 2, c);
    const bool vector_ok = pack_aligned(param) && pack_aligned(backup) && pack_aligned(grad);
    const opmath_t scale = static_cast<opmath_t>(scales[meta.list_index[c.slot]]);
    for (int i = thread * kWidth; i < c.size; i += kBlockSize * kWidth) {
      scalar_t p[kWidth];
      scalar_t b[kWidth];
      scalar_t g[kWidth];
      load_group(p, param, i, c.size, vector_ok);
      if constexpr (!First) {
        load_group(b, backup, i, c.size, vector_ok);
      }
      load_group(g, grad, i, c.size, vector_ok);
      scalar_t out[kWidth];
      AMP_FUSED_UNROLL
      for (int j = 0; j < kWidth; ++j) {
        const opmath_t current = static_cast<opmath_t>(p[j]);
        opmath_t theta = current;
        if constexpr (!First) {
          theta = static_cast<opmath_t>(b[j]);
        }
        if constexpr (Weighted) {
          const opmath_t weight = element_weight(theta, eta);
          const opmath_t u = weighted_ascent(weight, static_cast<opmath_t>(g[j]), inner_lr);
          out[j] = static_cast<scalar_t>(weighted_perturbed_value(theta, weight, u, scale));
        } else {
          const opmath_t delta = ascent_delta(current, theta, static_cast<opmath_t>(g[j]), inner_lr, First);
          out[j] = static_cast<scalar_t>(perturbed_value(theta, delta, scale));
        }
      }
      if constexpr (First) {
        store_group(backup, p, i, c.size, vector_ok);  // the stored bits of θ, not a round trip
      }
      store_group(param, out, i, c.size, vector_ok);
    }
  }
};

// restore_: params ← backups, bit for bit (no conversion). Lists: {params, backups}.
template <typename scalar_t>
struct CopyFunctor {
  static constexpr int kDepth = 2;
  static constexpr int kWidth = kILP<scalar_t>;  // elements per 16-byte group

  AMP_FUSED_HD void operator()(const TensorListMetadata<kDepth>& meta, int block, int thread) const {
    const ChunkRef c = locate_chunk(meta, block);
    scalar_t* dst = chunk_data<scalar_t>(meta, 0, c);
    const scalar_t* src = chunk_data<scalar_t>(meta, 1, c);
    const bool vector_ok = pack_aligned(dst) && pack_aligned(src);
    for (int i = thread * kWidth; i < c.size; i += kBlockSize * kWidth) {
      scalar_t v[kWidth];
      load_group(v, src, i, c.size, vector_ok);
      store_group(dst, v, i, c.size, vector_ok);
    }
  }
};

// restore_sgd_: params ← θ (from backups) stepped once by torch.optim.SGD with grads. Lists: {params,
// backups, grads} plus momentum_buffers when Momentum (momentum != 0). params are written, never read; the
// buffers are not read on the first step (they are set to d_p).
template <typename scalar_t, bool Momentum>
struct RestoreSgdFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int kDepth = Momentum ? 4 : 3;
  static constexpr int kWidth = kILP<scalar_t>;  // elements per 16-byte group

  SgdArgs<opmath_t> args;

  AMP_FUSED_HD void operator()(const TensorListMetadata<kDepth>& meta, int block, int thread) const {
    const ChunkRef c = locate_chunk(meta, block);
    scalar_t* param = chunk_data<scalar_t>(meta, 0, c);
    const scalar_t* backup = chunk_data<scalar_t>(meta, 1, c);
    const scalar_t* grad = chunk_data<scalar_t>(meta, 2, c);
    scalar_t* momentum_buffer = nullptr;
    bool vector_ok = pack_aligned(param) && pack_aligned(backup) && pack_aligned(grad);
    if constexpr (Momentum) {
      momentum_buffer = chunk_data<scalar_t>(meta, 3, c);
      vector_ok = vector_ok && pack_aligned(momentum_buffer);
    }
    const bool read_buffer = Momentum && !args.first_step;
    for (int i = thread * kWidth; i < c.size; i += kBlockSize * kWidth) {
      scalar_t b[kWidth];
      scalar_t g[kWidth];
      scalar_t m[kWidth];
      load_group(b, backup, i, c.size, vector_ok);
      load_group(g, grad, i, c.size, vector_ok);
      if (read_buffer) {
        load_group(m, momentum_buffer, i, c.size, vector_ok);
      }
      scalar_t out[kWidth];
      AMP_FUSED_UNROLL
      for (int j = 0; j < kWidth; ++j) {
        opmath_t buf = read_buffer ? static_cast<opmath_t>(m[j]) : opmath_t(0);
        out[j] = static_cast<scalar_t>(
            sgd_update(static_cast<opmath_t>(b[j]), static_cast<opmath_t>(g[j]), &buf, args));
        m[j] = static_cast<scalar_t>(buf);
      }
      store_group(param, out, i, c.size, vector_ok);
      if constexpr (Momentum) {
        store_group(momentum_buffer, m, i, c.size, vector_ok);
      }
    }
  }
};

}  // namespace amp_fused::cuda
