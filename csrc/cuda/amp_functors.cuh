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

// Pass 1 of perturb_ (and of norms: First with ζ = 1, so that Δ = t): this thread's share of ‖Δ‖² over the
// chunk (the kernel sums the block and stores one partial per chunk). Lists: first ascent {grads}; later
// ascents {params, backups, grads}; weighted (ASAM, first ascents only) {params, grads}, with ‖u‖², u = ζ·T·g,
// T = |θ| + η (θ = params). Δ is formed in opmath, as the apply pass forms it; each Δ² and the sums are double,
// so a finite fp32 Δ (Δ² ≤ ~1.2e77) never overflows the norm (an fp32 sum overflows once |Δ| reaches ~1.8e19).
// fp64 tensors: a ‖Δ‖ above ~1.3e154 still overflows.
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

// ---- LookSAM's gradient reuse: restore_orthogonal_, add_orthogonal_ ---------------------------------------

// A per-tensor coefficient of the finalize pass (fp64) in the compute type. 0 where it does not fit (only fp32
// opmath, for |c| beyond ~3.4e38, i.e. a ‖Δ‖ or ‖v‖ some 38 orders of magnitude below the gradient's): the
// coefficient rules of amp_math.h make every coefficient that is not finite 0, and an Inf here would turn a
// finite result into Inf/NaN.
template <typename opmath_t>
AMP_FUSED_HD opmath_t compute_coefficient(double c) {
  const opmath_t value = static_cast<opmath_t>(c);
  return is_finite(value) ? value : opmath_t(0);
}

// Pass 1 of restore_orthogonal_ (Restore) and add_orthogonal_: this thread's share of the two sums of the
// chunk, each product and every sum in fp64 (the kernel sums the block and stores two partials per chunk).
// Restore: lists {params, backups, grads}, sums {⟨Δ,g⟩, ‖Δ‖²} with Δ = params − backups formed in opmath, as
// the apply pass forms it. Otherwise: lists {grads, orthogonals}, sums {‖g‖², ‖v‖²}.
template <typename scalar_t, bool Restore>
struct OrthogonalSumsFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int kDepth = Restore ? 3 : 2;
  static constexpr int kWidth = kILP<scalar_t>;  // elements per 16-byte group

  AMP_FUSED_HD Sums<2> operator()(const TensorListMetadata<kDepth>& meta, int block, int thread) const {
    const ChunkRef c = locate_chunk(meta, block);
    const scalar_t* first = chunk_data<scalar_t>(meta, 0, c);  // params, or grads
    const scalar_t* second = chunk_data<scalar_t>(meta, 1, c);  // backups, or orthogonals
    const scalar_t* grad = chunk_data<scalar_t>(meta, kDepth - 1, c);
    const bool vector_ok = pack_aligned(first) && pack_aligned(second) && pack_aligned(grad);
    // kChains independent add chains of each sum (group position j adds to chain j % kChains), combined in a
    // fixed order. At most 4: two sums of 8 chains (fp16/bf16) would cost 16 more registers per thread.
    constexpr int kChains = kWidth < 4 ? kWidth : 4;
    double acc0[kChains] = {};
    double acc1[kChains] = {};
    for (int i = thread * kWidth; i < c.size; i += kBlockSize * kWidth) {
      scalar_t a[kWidth];
      scalar_t b[kWidth];
      load_group(a, first, i, c.size, vector_ok);
      load_group(b, second, i, c.size, vector_ok);
      if constexpr (Restore) {
        scalar_t g[kWidth];
        load_group(g, grad, i, c.size, vector_ok);
        AMP_FUSED_UNROLL
        for (int j = 0; j < kWidth; ++j) {
          const double delta = static_cast<double>(static_cast<opmath_t>(a[j]) - static_cast<opmath_t>(b[j]));
          acc0[j % kChains] += delta * static_cast<double>(g[j]);  // zero past the chunk's end: Δ = 0 there
          acc1[j % kChains] += delta * delta;
        }
      } else {
        AMP_FUSED_UNROLL
        for (int j = 0; j < kWidth; ++j) {
          const double g = static_cast<double>(a[j]);
          const double v = static_cast<double>(b[j]);
          acc0[j % kChains] += g * g;
          acc1[j % kChains] += v * v;
        }
      }
    }
    return Sums<2>{{pairwise_sum(acc0), pairwise_sum(acc1)}};
  }
};

// Pass 2 of restore_orthogonal_: orthogonals ← g − c·Δ with the tensor's c from the finalize pass (Δ =
// params − backups in opmath, rounded once on store), then params ← backups bit for bit. c == 0 (‖Δ‖² = 0, a
// NaN or Inf sum): orthogonals ← g bit for bit (its stored bits, not a round trip through opmath, which would
// not keep fp16/bf16 NaN payloads). Lists: {params, backups, grads, orthogonals}.
template <typename scalar_t>
struct RestoreOrthogonalFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int kDepth = 4;
  static constexpr int kWidth = kILP<scalar_t>;  // elements per 16-byte group

  const double* coefficients;  // indexed by list index

  AMP_FUSED_HD void operator()(const TensorListMetadata<kDepth>& meta, int block, int thread) const {
    const ChunkRef c = locate_chunk(meta, block);
    scalar_t* param = chunk_data<scalar_t>(meta, 0, c);
    const scalar_t* backup = chunk_data<scalar_t>(meta, 1, c);
    const scalar_t* grad = chunk_data<scalar_t>(meta, 2, c);
    scalar_t* orthogonal = chunk_data<scalar_t>(meta, 3, c);
    const bool vector_ok = pack_aligned(param) && pack_aligned(backup) && pack_aligned(grad) &&
                           pack_aligned(orthogonal);
    const opmath_t coef = compute_coefficient<opmath_t>(coefficients[meta.list_index[c.slot]]);
    for (int i = thread * kWidth; i < c.size; i += kBlockSize * kWidth) {
      scalar_t b[kWidth];
      scalar_t g[kWidth];
      load_group(b, backup, i, c.size, vector_ok);
      load_group(g, grad, i, c.size, vector_ok);
      if (coef == opmath_t(0)) {
        store_group(orthogonal, g, i, c.size, vector_ok);
      } else {
        scalar_t p[kWidth];
        load_group(p, param, i, c.size, vector_ok);
        scalar_t out[kWidth];
        AMP_FUSED_UNROLL
        for (int j = 0; j < kWidth; ++j) {
          const opmath_t delta = static_cast<opmath_t>(p[j]) - static_cast<opmath_t>(b[j]);
          out[j] = static_cast<scalar_t>(orthogonal_value(static_cast<opmath_t>(g[j]), delta, coef));
        }
        store_group(orthogonal, out, i, c.size, vector_ok);
      }
      store_group(param, b, i, c.size, vector_ok);  // θ's stored bits (after params were read)
    }
  }
};

// Pass 2 of add_orthogonal_: grads ← g + coef·v with the tensor's coef from the finalize pass. coef == 0 (v = 0,
// a NaN or Inf norm): the block writes nothing, so grads stay bit for bit. Lists: {grads, orthogonals}.
template <typename scalar_t>
struct AddOrthogonalFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int kDepth = 2;
  static constexpr int kWidth = kILP<scalar_t>;  // elements per 16-byte group

  const double* coefficients;  // indexed by list index

  AMP_FUSED_HD void operator()(const TensorListMetadata<kDepth>& meta, int block, int thread) const {
    const ChunkRef c = locate_chunk(meta, block);
    const opmath_t coef = compute_coefficient<opmath_t>(coefficients[meta.list_index[c.slot]]);
    if (coef == opmath_t(0)) {
      return;
    }
    scalar_t* grad = chunk_data<scalar_t>(meta, 0, c);
    const scalar_t* orthogonal = chunk_data<scalar_t>(meta, 1, c);
    const bool vector_ok = pack_aligned(grad) && pack_aligned(orthogonal);
    for (int i = thread * kWidth; i < c.size; i += kBlockSize * kWidth) {
      scalar_t g[kWidth];
      scalar_t v[kWidth];
      load_group(g, grad, i, c.size, vector_ok);
      load_group(v, orthogonal, i, c.size, vector_ok);
      scalar_t out[kWidth];
      AMP_FUSED_UNROLL
      for (int j = 0; j < kWidth; ++j) {
        out[j] = static_cast<scalar_t>(
            directed_value(static_cast<opmath_t>(g[j]), static_cast<opmath_t>(v[j]), coef));
      }
      store_group(grad, out, i, c.size, vector_ok);
    }
  }
};

}  // namespace amp_fused::cuda
