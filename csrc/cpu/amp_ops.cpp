// CPU kernels of the amp_fused ops (schemas: csrc/ops.cpp; semantics: amp_fused/backends/__init__.py).
//
// Each op makes one or two passes over the chunk plan of its tensor lists (cpu/multi_tensor.h); a chunk is
// processed in blocks of two SIMD registers of the compute type, with the per-element math of amp_math.h.
// The last, partial block of a chunk goes through the same vector code on zero-padded registers, so every
// element of a tensor is computed by the same instructions. Reductions (the norms) are summed in the compute
// type within a chunk (float for fp32/fp16/bf16, double for fp64), then per tensor and over all tensors in
// double, always in chunk order: bitwise reproducible for any thread count. A chunk whose float sum comes out
// non-finite is summed again with every Δ squared in double, so finite fp32/fp16/bf16 inputs never overflow
// the norm (see chunk_sum_squares_wide).
//
// perturb_'s modes: `surface` changes only the per-tensor scale (amp_math.h projection_scale). `eta` (ASAM)
// makes the ascent variable u = ζ·T·g with T = |θ| + η: both passes then read θ (= params, a first ascent)
// and form T from it, in kernels instantiated apart (Weighted = true), so the unweighted loops are unchanged.
//
// norms, restore_orthogonal_ and add_orthogonal_ (LookSAM's gradient reuse) use the same scheme for their sums
// (chunk_sums: K sums per chunk in the compute type, a chunk with any non-finite sum redone in double, per tensor
// and over all tensors in double in chunk order), then a pass that applies the per-tensor coefficient, computed
// in double on the host with amp_math.h; a zero coefficient copies (orthogonals ← g) or skips (grads stay) the
// tensor's chunks bit for bit. restore_orthogonal_ forms Δ = params − θ in the compute type in both passes and
// copies θ back into params (bytes) once Δ is read.
//
// Every op first checks the argument contract (csrc/checks.h, the same as amp_fused/checks.py), then that the
// tensors are on the CPU, before anything is written.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "amp_math.h"
#include "checks.h"
#include "cpu/multi_tensor.h"

namespace amp_fused::cpu {
namespace {

using at::vec::Vectorized;

// Marks a block that is known to be whole, so load/store compile without the partial-block branch.
struct FullBlock {};

// Loads and stores `scalar_t` data as two registers of its compute type (kBlock elements).
template <typename scalar_t>
struct BlockIO {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  static constexpr int64_t kBlock = 2 * Vec::size();

  template <typename Count>
  static void load(const scalar_t* src, Count count, Vec& lo, Vec& hi) {
    if constexpr (std::is_same_v<Count, FullBlock>) {
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        lo = Vec::loadu(src);
        hi = Vec::loadu(src + Vec::size());
      } else {
        std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(src));
      }
    } else {
      // Lanes past `count` read as zero.
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        const int64_t n_lo = std::min<int64_t>(count, Vec::size());
        lo = Vec::loadu(src, n_lo);
        hi = count > Vec::size() ? Vec::loadu(src + Vec::size(), count - Vec::size()) : Vec(opmath_t(0));
      } else {
        std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(src, count));
      }
    }
  }

  // Copies the block's bytes as they are (no round trip through the compute type, which may not keep a
  // NaN's payload).
  template <typename Count>
  static void copy(scalar_t* dst, const scalar_t* src, Count count) {
    if constexpr (std::is_same_v<Count, FullBlock>) {
      std::memcpy(dst, src, kBlock * sizeof(scalar_t));
    } else {
      std::memcpy(dst, src, count * sizeof(scalar_t));
    }
  }

  template <typename Count>
  static void store(scalar_t* dst, Count count, const Vec& lo, const Vec& hi) {
    if constexpr (std::is_same_v<Count, FullBlock>) {
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        lo.store(dst);
        hi.store(dst + Vec::size());
      } else {
        at::vec::convert_from_float<scalar_t>(lo, hi).store(dst);
      }
    } else {
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        lo.store(dst, static_cast<int>(std::min<int64_t>(count, Vec::size())));
        if (count > Vec::size()) {
          hi.store(dst + Vec::size(), static_cast<int>(count - Vec::size()));
        }
      } else {
        at::vec::convert_from_float<scalar_t>(lo, hi).store(dst, static_cast<int>(count));
      }
    }
  }
};

// Calls block(offset, count) over [begin, end): whole blocks with count = FullBlock{}, then the rest (if
// any) with its int64_t element count.
template <int64_t kBlock, typename Block>
inline void for_each_block(int64_t begin, int64_t end, const Block& block) {
  int64_t offset = begin;
  for (; offset + kBlock <= end; offset += kBlock) {
    block(offset, FullBlock{});
  }
  if (offset < end) {
    block(offset, end - offset);
  }
}

template <typename scalar_t>
scalar_t* data_of(const at::Tensor& t) {
  return static_cast<scalar_t*>(t.data_ptr());
}

#define AMP_FUSED_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// Σ Δ² over one chunk, Δ = ascent_delta (first: ζ·g, else (p − θ) + ζ·g), in the compute type.
// Weighted (ASAM, first ascents only): Σ u² with u = ζ·T·g, T = |p| + η (p = θ).
template <typename scalar_t, bool Weighted>
at::opmath_type<scalar_t> chunk_sum_squares(const at::Tensor& param, const at::Tensor& grad,
                                            const at::Tensor& backup, const Chunk& c, double inner_lr,
                                            bool first, double eta) {
  using IO = BlockIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using Vec = typename IO::Vec;
  const opmath_t lr = static_cast<opmath_t>(inner_lr);
  const opmath_t e = static_cast<opmath_t>(eta);
  const scalar_t* g = data_of<scalar_t>(grad) + c.begin;
  const scalar_t* p = data_of<scalar_t>(param) + c.begin;
  const scalar_t* b = data_of<scalar_t>(backup) + c.begin;
  // Two levels: each lane sums a segment of kSegmentBlocks blocks, then the segment sums are added up. A
  // single running sum per lane would add up to kChunkSize / 16 terms and, on data of one sign and size,
  // lose ~4096 roundings' worth of precision; two levels of 64 keep fp32 sums within ~1e-5 of exact.
  constexpr int64_t kSegmentBlocks = 64;
  Vec acc_lo(opmath_t(0)), acc_hi(opmath_t(0));
  for (int64_t begin = 0; begin < c.size; begin += kSegmentBlocks * IO::kBlock) {
    Vec seg_lo(opmath_t(0)), seg_hi(opmath_t(0));
    const int64_t end = std::min(c.size, begin + kSegmentBlocks * IO::kBlock);
    for_each_block<IO::kBlock>(begin, end, [&](int64_t i, auto count) {
      Vec g_lo, g_hi, p_lo(opmath_t(0)), p_hi(opmath_t(0)), b_lo(opmath_t(0)), b_hi(opmath_t(0));
      IO::load(g + i, count, g_lo, g_hi);
      Vec d_lo, d_hi;
      if constexpr (Weighted) {  // lanes past the chunk: T = η, g = 0, so u = 0
        IO::load(p + i, count, p_lo, p_hi);
        d_lo = weighted_ascent(element_weight(p_lo, e), g_lo, lr);
        d_hi = weighted_ascent(element_weight(p_hi, e), g_hi, lr);
      } else {
        if (!first) {  // the first ascent's Δ needs only the gradient
          IO::load(p + i, count, p_lo, p_hi);
          IO::load(b + i, count, b_lo, b_hi);
        }
        d_lo = ascent_delta(p_lo, b_lo, g_lo, lr, first);
        d_hi = ascent_delta(p_hi, b_hi, g_hi, lr, first);
      }
      seg_lo = seg_lo + d_lo * d_lo;
      seg_hi = seg_hi + d_hi * d_hi;
    });
    acc_lo = acc_lo + seg_lo;
    acc_hi = acc_hi + seg_hi;
  }
  // Lanes in a fixed order: the same sum on every run.
  alignas(64) opmath_t lanes[Vec::size()];
  (acc_lo + acc_hi).store(lanes);
  opmath_t sum = 0;
  for (int64_t k = 0; k < Vec::size(); ++k) {
    sum += lanes[k];
  }
  return sum;
}

// Σ Δ² over one chunk, each Δ² and the sum in double: what perturb_ uses for a chunk whose compute-type sum
// (chunk_sum_squares) is not finite. Δ is formed in the compute type exactly as the apply pass forms it; a
// finite fp32 Δ squares to at most ~1.2e77, so finite fp32/fp16/bf16 inputs never overflow the norm here.
// (A Δ that is itself beyond fp32's range, |ζ·g| > 3.4e38, stays infinite, so that tensor's Δ is dropped
// rather than applied as Inf; if the sum stays non-finite otherwise, the input held a NaN or Inf.)
// Only reached on overflow or NaN/Inf, so a plain scalar loop.
template <typename scalar_t, bool Weighted>
double chunk_sum_squares_wide(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& backup,
                              const Chunk& c, double inner_lr, bool first, double eta) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t lr = static_cast<opmath_t>(inner_lr);
  const opmath_t e = static_cast<opmath_t>(eta);
  const scalar_t* g = data_of<scalar_t>(grad) + c.begin;
  const scalar_t* p = data_of<scalar_t>(param) + c.begin;
  const scalar_t* b = data_of<scalar_t>(backup) + c.begin;
  double sum = 0.0;
  for (int64_t i = 0; i < c.size; ++i) {
    const opmath_t g_i = static_cast<opmath_t>(g[i]);
    opmath_t delta;
    if constexpr (Weighted) {
      delta = weighted_ascent(element_weight(static_cast<opmath_t>(p[i]), e), g_i, lr);
    } else {
      delta = first ? ascent_delta(opmath_t(0), opmath_t(0), g_i, lr, true)
                    : ascent_delta(static_cast<opmath_t>(p[i]), static_cast<opmath_t>(b[i]), g_i, lr, false);
    }
    const double d = static_cast<double>(delta);
    sum += d * d;
  }
  return sum;
}

// params ← θ + scale·Δ over one chunk; the first ascent also saves θ into backups, reading params once.
// Weighted (ASAM, first ascents only): params ← θ + scale·(T·u), u = ζ·T·g, T = |θ| + η.
template <typename scalar_t, bool Weighted>
void chunk_perturb(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& backup, const Chunk& c,
                   double inner_lr, double scale, bool first, double eta) {
  using IO = BlockIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using Vec = typename IO::Vec;
  const opmath_t lr = static_cast<opmath_t>(inner_lr);
  const opmath_t s = static_cast<opmath_t>(scale);
  const opmath_t e = static_cast<opmath_t>(eta);
  scalar_t* p = data_of<scalar_t>(param) + c.begin;
  const scalar_t* g = data_of<scalar_t>(grad) + c.begin;
  scalar_t* b = data_of<scalar_t>(backup) + c.begin;
  if (scale == 0) {  // Δ dropped (ε = 0 or a non-finite norm): params are θ, bit for bit
    if (first) {
      std::memcpy(b, p, c.size * sizeof(scalar_t));
    } else {
      std::memcpy(p, b, c.size * sizeof(scalar_t));
    }
    return;
  }
  for_each_block<IO::kBlock>(0, c.size, [&](int64_t i, auto count) {
    Vec p_lo, p_hi, g_lo, g_hi, b_lo, b_hi;
    IO::load(p + i, count, p_lo, p_hi);
    IO::load(g + i, count, g_lo, g_hi);
    if (first) {
      IO::copy(b + i, p + i, count);  // θ, bit for bit
      b_lo = p_lo;
      b_hi = p_hi;
    } else {
      IO::load(b + i, count, b_lo, b_hi);
    }
    Vec out_lo, out_hi;
    if constexpr (Weighted) {
      const Vec w_lo = element_weight(b_lo, e);
      const Vec w_hi = element_weight(b_hi, e);
      out_lo = weighted_perturbed_value(b_lo, w_lo, weighted_ascent(w_lo, g_lo, lr), s);
      out_hi = weighted_perturbed_value(b_hi, w_hi, weighted_ascent(w_hi, g_hi, lr), s);
    } else {
      out_lo = perturbed_value(b_lo, ascent_delta(p_lo, b_lo, g_lo, lr, first), s);
      out_hi = perturbed_value(b_hi, ascent_delta(p_hi, b_hi, g_hi, lr, first), s);
    }
    IO::store(p + i, count, out_lo, out_hi);
  });
}

// params ← θ, then one SGD step, over one chunk. `buffer` is undefined when momentum == 0.
template <typename scalar_t>
void chunk_restore_sgd(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad,
                       const at::Tensor* buffer, const Chunk& c, const SgdArgs<double>& args) {
  using IO = BlockIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using Vec = typename IO::Vec;
  const SgdArgs<opmath_t> a{static_cast<opmath_t>(args.lr),        static_cast<opmath_t>(args.momentum),
                            static_cast<opmath_t>(args.dampening), static_cast<opmath_t>(args.weight_decay),
                            args.nesterov,                         args.maximize,
                            args.first_step};
  scalar_t* p = data_of<scalar_t>(param) + c.begin;
  const scalar_t* b = data_of<scalar_t>(backup) + c.begin;
  const scalar_t* g = data_of<scalar_t>(grad) + c.begin;
  scalar_t* m = buffer != nullptr ? data_of<scalar_t>(*buffer) + c.begin : nullptr;
  const bool read_buffer = m != nullptr && !args.first_step;  // the first step only writes the buffer
  for_each_block<IO::kBlock>(0, c.size, [&](int64_t i, auto count) {
    Vec t_lo, t_hi, g_lo, g_hi, m_lo(opmath_t(0)), m_hi(opmath_t(0));
    IO::load(b + i, count, t_lo, t_hi);
    IO::load(g + i, count, g_lo, g_hi);
    if (read_buffer) {
      IO::load(m + i, count, m_lo, m_hi);
    }
    const Vec out_lo = sgd_update(t_lo, g_lo, &m_lo, a);
    const Vec out_hi = sgd_update(t_hi, g_hi, &m_hi, a);
    IO::store(p + i, count, out_lo, out_hi);
    if (m != nullptr) {
      IO::store(m + i, count, m_lo, m_hi);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Reductions of norms, restore_orthogonal_ and add_orthogonal_: K sums of products over one chunk.

// Per-chunk sums of K block terms, in the compute type, in perturb_'s two levels (chunk_sum_squares): each
// lane sums a segment of 64 blocks, then the segment sums are added up, then the lanes in a fixed order.
// terms(i, count, lo, hi) sets lo[k], hi[k] to the k-th product of the block at i (zero on padded lanes).
template <typename scalar_t, size_t K, typename Terms>
std::array<double, K> chunk_sums(const Chunk& c, const Terms& terms) {
  using IO = BlockIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kSegmentBlocks = 64;
  std::array<Vec, K> acc_lo, acc_hi;
  acc_lo.fill(Vec(opmath_t(0)));
  acc_hi.fill(Vec(opmath_t(0)));
  for (int64_t begin = 0; begin < c.size; begin += kSegmentBlocks * IO::kBlock) {
    std::array<Vec, K> seg_lo, seg_hi;
    seg_lo.fill(Vec(opmath_t(0)));
    seg_hi.fill(Vec(opmath_t(0)));
    const int64_t end = std::min(c.size, begin + kSegmentBlocks * IO::kBlock);
    for_each_block<IO::kBlock>(begin, end, [&](int64_t i, auto count) {
      std::array<Vec, K> lo, hi;
      terms(i, count, lo, hi);
      for (size_t k = 0; k < K; ++k) {
        seg_lo[k] = seg_lo[k] + lo[k];
        seg_hi[k] = seg_hi[k] + hi[k];
      }
    });
    for (size_t k = 0; k < K; ++k) {
      acc_lo[k] = acc_lo[k] + seg_lo[k];
      acc_hi[k] = acc_hi[k] + seg_hi[k];
    }
  }
  std::array<double, K> out;
  for (size_t k = 0; k < K; ++k) {
    alignas(64) opmath_t lanes[Vec::size()];
    (acc_lo[k] + acc_hi[k]).store(lanes);
    opmath_t sum = 0;
    for (int64_t j = 0; j < Vec::size(); ++j) {
      sum += lanes[j];
    }
    out[k] = static_cast<double>(sum);
  }
  return out;
}

// The same K sums with every product and sum in double (chunk_sum_squares_wide's redo, for a chunk where one
// of the compute-type sums came out non-finite). terms(i, out) sets out[k] to the k-th product of element i,
// its factors formed in the compute type exactly as the vector code forms them. A plain scalar loop: only
// reached on overflow or NaN/Inf.
template <size_t K, typename Terms>
std::array<double, K> chunk_sums_wide(const Chunk& c, const Terms& terms) {
  std::array<double, K> out{};
  for (int64_t i = 0; i < c.size; ++i) {
    std::array<double, K> t;
    terms(i, t);
    for (size_t k = 0; k < K; ++k) {
      out[k] += t[k];
    }
  }
  return out;
}

// chunk_sums, redone wide where a sum is not finite (fp64 is summed in double from the start).
template <typename scalar_t, size_t K, typename Terms, typename WideTerms>
std::array<double, K> chunk_sums_redone(const Chunk& c, const Terms& terms, const WideTerms& wide_terms) {
  std::array<double, K> sums = chunk_sums<scalar_t, K>(c, terms);
  if constexpr (!std::is_same_v<at::opmath_type<scalar_t>, double>) {
    if (!std::all_of(sums.begin(), sums.end(), [](double s) { return std::isfinite(s); })) {
      sums = chunk_sums_wide<K>(c, wide_terms);
    }
  }
  return sums;
}

// Σ t² over one chunk (norms).
template <typename scalar_t>
std::array<double, 1> chunk_norm_sums(const at::Tensor& tensor, const Chunk& c) {
  using IO = BlockIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using Vec = typename IO::Vec;
  const scalar_t* t = data_of<scalar_t>(tensor) + c.begin;
  return chunk_sums_redone<scalar_t, 1>(
      c,
      [&](int64_t i, auto count, std::array<Vec, 1>& lo, std::array<Vec, 1>& hi) {
        Vec t_lo, t_hi;
        IO::load(t + i, count, t_lo, t_hi);
        lo[0] = t_lo * t_lo;
        hi[0] = t_hi * t_hi;
      },
      [&](int64_t i, std::array<double, 1>& out) {
        const auto x = static_cast<double>(static_cast<opmath_t>(t[i]));
        out[0] = x * x;
      });
}

// (Σ Δ·g, Σ Δ²) over one chunk, Δ = p − θ in the compute type (restore_orthogonal_).
template <typename scalar_t>
std::array<double, 2> chunk_orthogonal_sums(const at::Tensor& param, const at::Tensor& backup,
                                            const at::Tensor& grad, const Chunk& c) {
  using IO = BlockIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using Vec = typename IO::Vec;
  const scalar_t* p = data_of<scalar_t>(param) + c.begin;
  const scalar_t* b = data_of<scalar_t>(backup) + c.begin;
  const scalar_t* g = data_of<scalar_t>(grad) + c.begin;
  return chunk_sums_redone<scalar_t, 2>(
      c,
      [&](int64_t i, auto count, std::array<Vec, 2>& lo, std::array<Vec, 2>& hi) {
        Vec p_lo, p_hi, b_lo, b_hi, g_lo, g_hi;
        IO::load(p + i, count, p_lo, p_hi);
        IO::load(b + i, count, b_lo, b_hi);
        IO::load(g + i, count, g_lo, g_hi);
        const Vec d_lo = p_lo - b_lo;
        const Vec d_hi = p_hi - b_hi;
        lo[0] = d_lo * g_lo;
        hi[0] = d_hi * g_hi;
        lo[1] = d_lo * d_lo;
        hi[1] = d_hi * d_hi;
      },
      [&](int64_t i, std::array<double, 2>& out) {
        const auto d = static_cast<double>(static_cast<opmath_t>(p[i]) - static_cast<opmath_t>(b[i]));
        out[0] = d * static_cast<double>(static_cast<opmath_t>(g[i]));
        out[1] = d * d;
      });
}

// (Σ g², Σ v²) over one chunk (add_orthogonal_).
template <typename scalar_t>
std::array<double, 2> chunk_direction_sums(const at::Tensor& grad, const at::Tensor& orthogonal, const Chunk& c) {
  using IO = BlockIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using Vec = typename IO::Vec;
  const scalar_t* g = data_of<scalar_t>(grad) + c.begin;
  const scalar_t* v = data_of<scalar_t>(orthogonal) + c.begin;
  return chunk_sums_redone<scalar_t, 2>(
      c,
      [&](int64_t i, auto count, std::array<Vec, 2>& lo, std::array<Vec, 2>& hi) {
        Vec g_lo, g_hi, v_lo, v_hi;
        IO::load(g + i, count, g_lo, g_hi);
        IO::load(v + i, count, v_lo, v_hi);
        lo[0] = g_lo * g_lo;
        hi[0] = g_hi * g_hi;
        lo[1] = v_lo * v_lo;
        hi[1] = v_hi * v_hi;
      },
      [&](int64_t i, std::array<double, 2>& out) {
        const auto x = static_cast<double>(static_cast<opmath_t>(g[i]));
        const auto y = static_cast<double>(static_cast<opmath_t>(v[i]));
        out[0] = x * x;
        out[1] = y * y;
      });
}

// orthogonals ← g − c·Δ (Δ = p − θ) and params ← θ over one chunk; c = 0: orthogonals ← g, bit for bit.
template <typename scalar_t>
void chunk_restore_orthogonal(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad,
                              const at::Tensor& orthogonal, const Chunk& c, double coefficient) {
  using IO = BlockIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using Vec = typename IO::Vec;
  scalar_t* p = data_of<scalar_t>(param) + c.begin;
  const scalar_t* b = data_of<scalar_t>(backup) + c.begin;
  const scalar_t* g = data_of<scalar_t>(grad) + c.begin;
  scalar_t* o = data_of<scalar_t>(orthogonal) + c.begin;
  const auto coef = static_cast<opmath_t>(coefficient);
  if (coef == opmath_t(0)) {  // (also a c that underflows the compute type: g − c·Δ = g)
    std::memcpy(o, g, c.size * sizeof(scalar_t));
    std::memcpy(p, b, c.size * sizeof(scalar_t));
    return;
  }
  if (!std::isfinite(coef)) {  // a finite double c beyond fp32's range: each element in double (rare)
    for (int64_t i = 0; i < c.size; ++i) {
      const auto delta = static_cast<double>(static_cast<opmath_t>(p[i]) - static_cast<opmath_t>(b[i]));
      o[i] = static_cast<scalar_t>(orthogonal_value(static_cast<double>(static_cast<opmath_t>(g[i])), delta,
                                                    coefficient));
      p[i] = b[i];
    }
    return;
  }
  for_each_block<IO::kBlock>(0, c.size, [&](int64_t i, auto count) {
    Vec p_lo, p_hi, b_lo, b_hi, g_lo, g_hi;
    IO::load(p + i, count, p_lo, p_hi);
    IO::load(b + i, count, b_lo, b_hi);
    IO::load(g + i, count, g_lo, g_hi);
    IO::copy(p + i, b + i, count);  // θ, bit for bit (Δ is read)
    IO::store(o + i, count, orthogonal_value(g_lo, p_lo - b_lo, coef), orthogonal_value(g_hi, p_hi - b_hi, coef));
  });
}

// grads ← g + coef·v over one chunk (the caller skips the chunks of tensors whose coef is 0).
template <typename scalar_t>
void chunk_add_orthogonal(const at::Tensor& grad, const at::Tensor& orthogonal, const Chunk& c,
                          double coefficient) {
  using IO = BlockIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using Vec = typename IO::Vec;
  scalar_t* g = data_of<scalar_t>(grad) + c.begin;
  const scalar_t* v = data_of<scalar_t>(orthogonal) + c.begin;
  const auto coef = static_cast<opmath_t>(coefficient);
  if (!std::isfinite(coef)) {  // a finite double coef beyond fp32's range: each element in double (rare)
    for (int64_t i = 0; i < c.size; ++i) {
      g[i] = static_cast<scalar_t>(directed_value(static_cast<double>(static_cast<opmath_t>(g[i])),
                                                  static_cast<double>(static_cast<opmath_t>(v[i])), coefficient));
    }
    return;
  }
  for_each_block<IO::kBlock>(0, c.size, [&](int64_t i, auto count) {
    Vec g_lo, g_hi, v_lo, v_hi;
    IO::load(g + i, count, g_lo, g_hi);
    IO::load(v + i, count, v_lo, v_hi);
    IO::store(g + i, count, directed_value(g_lo, v_lo, coef), directed_value(g_hi, v_hi, coef));
  });
}

// ---------------------------------------------------------------------------------------------------------
// The ops.

// After the contract, which puts every tensor on params[0]'s device: these kernels need that to be the CPU.
void check_on_cpu(const char* op, at::TensorList params, const char* name = "params") {
  TORCH_CHECK_VALUE(params.empty() || params[0].device().is_cpu(), "amp_fused.", op, ": ", name, "[0] is on ",
                    params[0].device(), ", but these are the CPU kernels: every tensor must be on the CPU");
}

at::Tensor perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups, double epsilon,
                       double inner_lr, bool per_tensor, bool first, bool surface, c10::optional<double> eta) {
  checks::check_perturb(params, grads, backups, epsilon, inner_lr, first, eta);
  check_on_cpu("perturb_", params);
  const bool weighted = eta.has_value();  // (then first: checked)
  const double eta_value = eta.value_or(0.0);
  const auto n = static_cast<int64_t>(params.size());
  const std::vector<Chunk> chunks = plan_chunks(params);

  // Pass 1: Σ Δ² (weighted: Σ u²) per chunk; a float sum that overflowed (or met a NaN/Inf) is summed again
  // in double. fp64 tensors are summed in double from the start; their ‖Δ‖ can still overflow above ~1.3e154.
  std::vector<double> chunk_sums(chunks.size());
  auto sum_chunk = [&](auto weighted_tag, int64_t k) {
    constexpr bool kWeighted = decltype(weighted_tag)::value;
    const Chunk& c = chunks[k];
    AMP_FUSED_DISPATCH(params[c.tensor].scalar_type(), "amp_fused::perturb_", [&] {
      const at::Tensor& p = params[c.tensor];
      const at::Tensor& g = grads[c.tensor];
      const at::Tensor& b = backups[c.tensor];
      double sum =
          static_cast<double>(chunk_sum_squares<scalar_t, kWeighted>(p, g, b, c, inner_lr, first, eta_value));
      if constexpr (!std::is_same_v<at::opmath_type<scalar_t>, double>) {
        if (!std::isfinite(sum)) {
          sum = chunk_sum_squares_wide<scalar_t, kWeighted>(p, g, b, c, inner_lr, first, eta_value);
        }
      }
      chunk_sums[k] = sum;
    });
  };
  if (weighted) {
    for_each_chunk(chunks, params, [&](int64_t k) { sum_chunk(std::true_type{}, k); });
  } else {
    for_each_chunk(chunks, params, [&](int64_t k) { sum_chunk(std::false_type{}, k); });
  }

  // Per tensor, then over all tensors, in a fixed order.
  std::vector<double> tensor_sums(n, 0.0);
  for (size_t k = 0; k < chunks.size(); ++k) {
    tensor_sums[chunks[k].tensor] += chunk_sums[k];
  }
  double total_sum = 0.0;
  for (const double s : tensor_sums) {
    total_sum += s;
  }
  const double total_norm = std::sqrt(total_sum);
  std::vector<double> scales(n);
  for (int64_t i = 0; i < n; ++i) {
    scales[i] = projection_scale(per_tensor ? std::sqrt(tensor_sums[i]) : total_norm, epsilon, surface);
  }

  // Pass 2: params ← θ + scale·Δ (weighted: θ + scale·T·u; first: backups ← θ as well).
  auto apply_chunk = [&](auto weighted_tag, int64_t k) {
    constexpr bool kWeighted = decltype(weighted_tag)::value;
    const Chunk& c = chunks[k];
    AMP_FUSED_DISPATCH(params[c.tensor].scalar_type(), "amp_fused::perturb_", [&] {
      chunk_perturb<scalar_t, kWeighted>(params[c.tensor], grads[c.tensor], backups[c.tensor], c, inner_lr,
                                         scales[c.tensor], first, eta_value);
    });
  };
  if (weighted) {
    for_each_chunk(chunks, params, [&](int64_t k) { apply_chunk(std::true_type{}, k); });
  } else {
    for_each_chunk(chunks, params, [&](int64_t k) { apply_chunk(std::false_type{}, k); });
  }

  at::Tensor norms = at::empty({n + 1}, params.empty() ? at::TensorOptions().dtype(at::kFloat)
                                                       : params[0].options().dtype(at::kFloat));
  float* out = norms.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<float>(std::sqrt(tensor_sums[i]));
  }
  out[n] = static_cast<float>(total_norm);
  return norms;
}

void restore_cpu(at::TensorList params, at::TensorList backups) {
  checks::check_restore(params, backups);
  check_on_cpu("restore_", params);
  const std::vector<Chunk> chunks = plan_chunks(params);
  // A byte copy: bit-exact for every dtype, NaN payloads included.
  for_each_chunk(chunks, params, [&](int64_t k) {
    const Chunk& c = chunks[k];
    const int64_t item = params[c.tensor].element_size();
    std::memcpy(static_cast<char*>(params[c.tensor].data_ptr()) + c.begin * item,
                static_cast<const char*>(backups[c.tensor].data_ptr()) + c.begin * item, c.size * item);
  });
}

void restore_sgd_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads,
                     at::TensorList momentum_buffers, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool maximize, bool first_step) {
  // With momentum == 0, SGD keeps no buffers: momentum_buffers is not used (it may be empty).
  const bool use_buffers = momentum != 0;
  checks::check_restore_sgd(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay);
  check_on_cpu("restore_sgd_", params);
  const SgdArgs<double> args{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step};
  const std::vector<Chunk> chunks = plan_chunks(params);
  for_each_chunk(chunks, params, [&](int64_t k) {
    const Chunk& c = chunks[k];
    const at::Tensor* buffer = use_buffers ? &momentum_buffers[c.tensor] : nullptr;
    AMP_FUSED_DISPATCH(params[c.tensor].scalar_type(), "amp_fused::restore_sgd_", [&] {
      chunk_restore_sgd<scalar_t>(params[c.tensor], backups[c.tensor], grads[c.tensor], buffer, c, args);
    });
  });
}

// Per tensor (per_tensor) or, for every tensor, over all of them: the K sums of each tensor from its chunks'
// sums, in chunk order, then over the tensors in order.
template <size_t K>
std::vector<std::array<double, K>> governing_sums(const std::vector<Chunk>& chunks,
                                                  const std::vector<std::array<double, K>>& chunk_values, int64_t n,
                                                  bool per_tensor) {
  std::vector<std::array<double, K>> sums(n, std::array<double, K>{});
  for (size_t k = 0; k < chunks.size(); ++k) {
    for (size_t j = 0; j < K; ++j) {
      sums[chunks[k].tensor][j] += chunk_values[k][j];
    }
  }
  if (!per_tensor) {
    std::array<double, K> total{};
    for (const auto& s : sums) {
      for (size_t j = 0; j < K; ++j) {
        total[j] += s[j];
      }
    }
    std::fill(sums.begin(), sums.end(), total);
  }
  return sums;
}

at::Tensor norms_cpu(at::TensorList tensors) {
  checks::check_norms(tensors);
  check_on_cpu("norms", tensors, "tensors");
  const auto n = static_cast<int64_t>(tensors.size());
  const std::vector<Chunk> chunks = plan_chunks(tensors);
  std::vector<std::array<double, 1>> chunk_values(chunks.size());
  for_each_chunk(chunks, tensors, [&](int64_t k) {
    const Chunk& c = chunks[k];
    AMP_FUSED_DISPATCH(tensors[c.tensor].scalar_type(), "amp_fused::norms",
                       [&] { chunk_values[k] = chunk_norm_sums<scalar_t>(tensors[c.tensor], c); });
  });
  const auto sums = governing_sums<1>(chunks, chunk_values, n, /*per_tensor=*/true);
  at::Tensor norms = at::empty({n + 1}, tensors.empty() ? at::TensorOptions().dtype(at::kFloat)
                                                        : tensors[0].options().dtype(at::kFloat));
  float* out = norms.data_ptr<float>();
  double total_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<float>(std::sqrt(sums[i][0]));
    total_sum += sums[i][0];
  }
  out[n] = static_cast<float>(std::sqrt(total_sum));
  return norms;
}

void restore_orthogonal_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads,
                            at::TensorList orthogonals, bool per_tensor) {
  checks::check_restore_orthogonal(params, backups, grads, orthogonals);
  check_on_cpu("restore_orthogonal_", params);
  const auto n = static_cast<int64_t>(params.size());
  const std::vector<Chunk> chunks = plan_chunks(params);

  // Pass 1: (Σ Δ·g, Σ Δ²) per chunk, redone in double where either is not finite.
  std::vector<std::array<double, 2>> chunk_values(chunks.size());
  for_each_chunk(chunks, params, [&](int64_t k) {
    const Chunk& c = chunks[k];
    AMP_FUSED_DISPATCH(params[c.tensor].scalar_type(), "amp_fused::restore_orthogonal_", [&] {
      chunk_values[k] = chunk_orthogonal_sums<scalar_t>(params[c.tensor], backups[c.tensor], grads[c.tensor], c);
    });
  });
  const auto sums = governing_sums<2>(chunks, chunk_values, n, per_tensor);
  std::vector<double> coefficients(n);
  for (int64_t i = 0; i < n; ++i) {
    coefficients[i] = orthogonal_coefficient(sums[i][0], sums[i][1]);
  }

  // Pass 2: orthogonals ← g − c·Δ, params ← θ.
  for_each_chunk(chunks, params, [&](int64_t k) {
    const Chunk& c = chunks[k];
    AMP_FUSED_DISPATCH(params[c.tensor].scalar_type(), "amp_fused::restore_orthogonal_", [&] {
      chunk_restore_orthogonal<scalar_t>(params[c.tensor], backups[c.tensor], grads[c.tensor], orthogonals[c.tensor],
                                         c, coefficients[c.tensor]);
    });
  });
}

void add_orthogonal_cpu(at::TensorList grads, at::TensorList orthogonals, double alpha, bool per_tensor) {
  checks::check_add_orthogonal(grads, orthogonals, alpha);
  check_on_cpu("add_orthogonal_", grads, "grads");
  const auto n = static_cast<int64_t>(grads.size());
  const std::vector<Chunk> chunks = plan_chunks(grads);

  // Pass 1: (Σ g², Σ v²) per chunk, redone in double where either is not finite.
  std::vector<std::array<double, 2>> chunk_values(chunks.size());
  for_each_chunk(chunks, grads, [&](int64_t k) {
    const Chunk& c = chunks[k];
    AMP_FUSED_DISPATCH(grads[c.tensor].scalar_type(), "amp_fused::add_orthogonal_", [&] {
      chunk_values[k] = chunk_direction_sums<scalar_t>(grads[c.tensor], orthogonals[c.tensor], c);
    });
  });
  const auto sums = governing_sums<2>(chunks, chunk_values, n, per_tensor);
  std::vector<double> coefficients(n);
  for (int64_t i = 0; i < n; ++i) {
    coefficients[i] = direction_coefficient(alpha, std::sqrt(sums[i][0]), std::sqrt(sums[i][1]));
  }

  // Pass 2: grads ← g + coef·v, over the chunks of tensors whose coef (in the compute type) is not 0: the others
  // are neither read nor written.
  std::vector<Chunk> moved;
  moved.reserve(chunks.size());
  for (const Chunk& c : chunks) {
    const bool zero = grads[c.tensor].scalar_type() == at::kDouble ? coefficients[c.tensor] == 0.0
                                                                  : static_cast<float>(coefficients[c.tensor]) == 0.0f;
    if (!zero) {
      moved.push_back(c);
    }
  }
  for_each_chunk(moved, grads, [&](int64_t k) {
    const Chunk& c = moved[k];
    AMP_FUSED_DISPATCH(grads[c.tensor].scalar_type(), "amp_fused::add_orthogonal_", [&] {
      chunk_add_orthogonal<scalar_t>(grads[c.tensor], orthogonals[c.tensor], c, coefficients[c.tensor]);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(amp_fused, CPU, m) {
  m.impl("perturb_", &perturb_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("restore_sgd_", &restore_sgd_cpu);
  m.impl("norms", &norms_cpu);
  m.impl("restore_orthogonal_", &restore_orthogonal_cpu);
  m.impl("add_orthogonal_", &add_orthogonal_cpu);
}

// A sparse tensor anywhere in a call dispatches it to a sparse key. The same kernels run there so that the
// call fails with the contract's TypeError (checked before anything is read or written) rather than with the
// dispatcher's "could not run with arguments from the 'SparseCPU' backend".
TORCH_LIBRARY_IMPL(amp_fused, SparseCPU, m) {
  m.impl("perturb_", &perturb_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("restore_sgd_", &restore_sgd_cpu);
  m.impl("norms", &norms_cpu);
  m.impl("restore_orthogonal_", &restore_orthogonal_cpu);
  m.impl("add_orthogonal_", &add_orthogonal_cpu);
}

TORCH_LIBRARY_IMPL(amp_fused, SparseCsrCPU, m) {
  m.impl("perturb_", &perturb_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("restore_sgd_", &restore_sgd_cpu);
  m.impl("norms", &norms_cpu);
  m.impl("restore_orthogonal_", &restore_orthogonal_cpu);
  m.impl("add_orthogonal_", &add_orthogonal_cpu);
}

}  // namespace amp_fused::cpu
