// The CPU co-attention kernels, compiled once per ISA level: kernels_<level>.cpp defines
// SMCA_ISA (the namespace) and SMCA_ISA_LEVEL, then includes this file, which includes every
// outside header first and only then sets the target (cpu/isa.h says why). Schemas in
// csrc/smca.cpp, math in docs/operators.md, design in docs/kernels.md; float32 and float64.
//
// Flash-attention style, as ATen's CPU flash attention
// (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): tiles of kQueryTile queries x kKeyTile
// keys, the scores of a tile by one matrix product, online softmax, weights x V by a second, so
// that no buffer grows past a tile or a head (D x L). On top of plain attention each tile gets
// the Gaussian log-prior computed from dx = x_j - cx, dy = y_j - cy (not the rank-4 expansion,
// which cancels large terms), the key padding mask, and dropout. Levels are separate softmaxes:
// a tile never straddles two levels, and a level's result is mixed into the output with alpha
// once its softmax is finished.
//
// The products (cpu/gemm.h) take B untransposed (A either way), so the kernels transpose K per
// head in the forward, and the K and V tiles in the backward, into scratch: O(L D) copies per
// head against O(Nq L D) flops.
//
// Forward: parallel over (batch, head, query tile); each item walks the keys of every level.
// Backward: parallel over (batch, head), so that one thread owns the dq, dk, dv rows of its
// head and sums into them in a fixed order: no atomics, results independent of the thread
// count. Within a head: key tiles outside, query tiles inside (the K/V tile and its dK/dV
// accumulators stay in cache), P recomputed from the saved lse.
//
// Non-finite inputs give what the reference gives (tile_ops.h), fully padded levels included:
// their output is sum_j 0 * v_j, NaN where a v_j is not finite, else 0.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include "cpu/kernel_args.h"
#include "philox.h"

#if SMCA_ISA_LEVEL == 2
#pragma GCC target("arch=x86-64-v4")
#elif SMCA_ISA_LEVEL == 1
#pragma GCC target("arch=x86-64-v3")
#endif

#include "cpu/vec.h"
#include "cpu/gemm.h"
#include "cpu/tile_ops.h"

namespace smca::cpu::SMCA_ISA {

// 60 query rows: whole micro-tiles of 12 (AVX-512), 6 (AVX2) and 4 (SSE2) rows, and DETR's 300
// queries in 5 tiles.
constexpr int64_t kQueryTile = 60;
constexpr int64_t kKeyTile = 512;  // a multiple of every vector width: padded_cols <= kKeyTile

// Leading dimension of a tile buffer of `cols` keys: whole vectors (tile_ops.h).
template <typename T>
int64_t padded_cols(int64_t cols) {
  constexpr int64_t W = VecOf<T>::kWidth;
  return (cols + W - 1) / W * W;
}

template <typename T, bool kMasked, bool kDropout>
void forward_tiles(const Problem<T>& problem, const ForwardOutputs<T>& outputs) {
  const T *q = problem.q, *k = problem.k, *v = problem.v;
  const T *centers = problem.centers, *precision = problem.precision, *alpha = problem.alpha;
  const KeyLayout<T>& keys = *problem.keys;
  const int64_t B = problem.B, H = problem.H, Nq = problem.Nq, D = problem.D;
  const T scale = problem.scale;
  const double dropout_p = problem.dropout_p;
  const uint64_t seed = problem.seed;
  T *out = outputs.out, *out_levels = outputs.out_levels, *lse = outputs.lse;
  const int64_t S = static_cast<int64_t>(keys.level_start.size()) - 1;
  const int64_t L = keys.level_start[S];
  const int64_t query_tiles = (Nq + kQueryTile - 1) / kQueryTile;
  const T keep_scale = static_cast<T>(1.0 / (1.0 - dropout_p));

  at::parallel_for(0, B * H * query_tiles, 1, [&](int64_t begin, int64_t end) {
    // Scratch of this thread.
    std::vector<T> scores(kQueryTile * kKeyTile);        // weights of the current tile
    std::vector<T> keep(kDropout ? kQueryTile * kKeyTile : 0);  // dropout factors of the tile
    std::vector<T> row_max(kQueryTile), row_sum(kQueryTile);
    std::vector<T> acc(kQueryTile * D);                  // unnormalised output of the level
    std::vector<T> mixed(alpha != nullptr ? kQueryTile * D : 0);  // sum_s alpha_s out_s
    std::vector<T> query(kQueryTile * D);                // the tile's q times scale
    // K of head `key_t_head` transposed. A thread's items are consecutive, so it rebuilds this
    // about once per head, not once per query tile.
    std::vector<T> key_t(D * L);  // (D, L)
    int64_t key_t_head = -1;

    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / query_tiles, b = bh / H;
      const int64_t row0 = (item % query_tiles) * kQueryTile;
      const int64_t rows = std::min(kQueryTile, Nq - row0);
      const int64_t first_row = bh * Nq + row0;  // index of the tile's first (b, h, i) row
      const T* q_tile = q + first_row * D;
      for (int64_t i = 0; i < rows * D; ++i) query[i] = q_tile[i] * scale;
      if (bh != key_t_head) {
        transpose(k + bh * L * D, L, D, D, key_t.data(), L);
        key_t_head = bh;
      }
      const T* v_head = v + bh * L * D;
      const T* bias = keys.key_bias.data() + b * keys.bias_batch_stride;
      std::fill(mixed.begin(), mixed.end(), T(0));

      for (int64_t s = 0; s < S; ++s) {
        T* lse_rows = lse + first_row * S + s;  // row r at lse_rows[r * S]
        // Where the level's output goes; with alpha it is also mixed below.
        T* level_out =
            alpha != nullptr ? out_levels + (first_row * S + s) * D : out + first_row * D;
        const int64_t level_out_stride = alpha != nullptr ? S * D : D;
        if (!keys.level_live[b * S + s]) {
          // Every key of the level is padded: out_s = sum_j 0 * v_j, as the reference's product
          // with zero weights gives it (0, or NaN where a v_j is not finite).
          T* zero_out = acc.data();  // (D)
          std::fill(zero_out, zero_out + D, T(0));
          for (int64_t j = keys.level_start[s]; j < keys.level_start[s + 1]; ++j) {
            for (int64_t d = 0; d < D; ++d) zero_out[d] += T(0) * v_head[j * D + d];
          }
          for (int64_t r = 0; r < rows; ++r) {
            lse_rows[r * S] = std::numeric_limits<T>::infinity();
            std::copy(zero_out, zero_out + D, level_out + r * level_out_stride);
            if (alpha != nullptr) {
              const T a = alpha[(first_row + r) * S + s];
              for (int64_t d = 0; d < D; ++d) mixed[r * D + d] += a * zero_out[d];
            }
          }
          continue;
        }
        std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<T>::infinity());
        std::fill(row_sum.begin(), row_sum.end(), T(0));
        std::fill(acc.begin(), acc.end(), T(0));
        const RowCoords<T> coords{centers + (first_row * S + s) * 2,
                                  precision + (first_row * S + s) * 2, 2 * S};

        for (int64_t key0 = keys.level_start[s]; key0 < keys.level_start[s + 1];
             key0 += kKeyTile) {
          const int64_t cols = std::min(kKeyTile, keys.level_start[s + 1] - key0);
          const int64_t ld = padded_cols<T>(cols);
          if constexpr (kDropout) {
            dropout_factors<T>(keep.data(), ld, rows, cols, seed,
                               static_cast<uint64_t>(first_row * L + key0),
                               static_cast<uint64_t>(L), static_cast<float>(dropout_p),
                               keep_scale);
          }
          // scores = (scale q_tile) k_tile^T, then the softmax update row block by row block
          matmul(rows, cols, D, query.data(), D, key_t.data() + key0, L, scores.data(), ld, false,
                 [&](int64_t i0, int64_t block_rows) {
                   softmax_rows<T, kMasked, kDropout>(
                       scores.data(), ld, keep.data(), i0, block_rows, cols,
                       keys.key_x.data() + key0, keys.key_y.data() + key0, bias + key0, coords,
                       row_max.data(), row_sum.data(), acc.data(), D);
                 });
          // acc += weights v_tile
          matmul(rows, D, cols, scores.data(), ld, v_head + key0 * D, D, acc.data(), D, true);
        }

        for (int64_t r = 0; r < rows; ++r) {
          lse_rows[r * S] = row_max[r] + std::log(row_sum[r]);
          const T inv_sum = T(1) / row_sum[r];
          T* dst = level_out + r * level_out_stride;
          for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * D + d] * inv_sum;
          if (alpha != nullptr) {
            const T a = alpha[(first_row + r) * S + s];
            for (int64_t d = 0; d < D; ++d) mixed[r * D + d] += a * dst[d];
          }
        }
      }
      if (alpha != nullptr) std::copy(mixed.begin(), mixed.begin() + rows * D, out + first_row * D);
    }
  });
}

template <typename T, bool kMasked, bool kDropout>
void backward_tiles(const Problem<T>& problem, const BackwardTensors<T>& tensors) {
  const T *q = problem.q, *k = problem.k, *v = problem.v;
  const T *centers = problem.centers, *precision = problem.precision, *alpha = problem.alpha;
  const KeyLayout<T>& keys = *problem.keys;
  const int64_t B = problem.B, H = problem.H, Nq = problem.Nq, D = problem.D;
  const T scale = problem.scale;
  const double dropout_p = problem.dropout_p;
  const uint64_t seed = problem.seed;
  const T *grad_out = tensors.grad_out, *out_levels = tensors.out_levels, *lse = tensors.lse;
  T *grad_q = tensors.grad_q, *grad_k = tensors.grad_k, *grad_v = tensors.grad_v;
  T *grad_centers = tensors.grad_centers, *grad_precision = tensors.grad_precision;
  T* grad_alpha = tensors.grad_alpha;
  const int64_t S = static_cast<int64_t>(keys.level_start.size()) - 1;
  const int64_t L = keys.level_start[S];
  const T keep_scale = static_cast<T>(1.0 / (1.0 - dropout_p));

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // Scratch of this thread.
    std::vector<T> scores(kQueryTile * kKeyTile);       // P, then dropout(P), of the tile
    std::vector<T> grad_scores(kQueryTile * kKeyTile);  // dP, then dS, of the tile
    std::vector<T> query(Nq * D);                       // the head's q times scale
    std::vector<T> keep(kDropout ? kQueryTile * kKeyTile : 0);  // dropout factors of the tile
    std::vector<T> key_t(D * kKeyTile), value_t(D * kKeyTile);  // (D, cols) K, V tiles transposed
    std::vector<T> level_grad(alpha != nullptr ? Nq * D : 0);  // (Nq, D) g_s = alpha_s grad_out
    std::vector<T> delta(Nq * S);        // (Nq, S) Delta_is = <g_s,i, out_is>
    std::vector<T> moments(Nq * S * kNumMoments);  // (Nq, S, kNumMoments) Moment

    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      const T* grad_out_head = grad_out + bh * Nq * D;
      const T* q_head = q + bh * Nq * D;
      const T* k_head = k + bh * L * D;
      const T* v_head = v + bh * L * D;
      T* grad_q_head = grad_q + bh * Nq * D;
      T* grad_k_head = grad_k + bh * L * D;
      T* grad_v_head = grad_v + bh * L * D;
      const T* bias = keys.key_bias.data() + b * keys.bias_batch_stride;
      // dq sums over tiles: zeroed here rather than by at::zeros, which would add a parallel
      // region to wait for.
      std::fill(grad_q_head, grad_q_head + Nq * D, T(0));
      for (int64_t i = 0; i < Nq * D; ++i) query[i] = q_head[i] * scale;

      // dalpha_is = <grad_out_i, out_is>, Delta_is = alpha_is dalpha_is.
      for (int64_t i = 0; i < Nq; ++i) {
        for (int64_t s = 0; s < S; ++s) {
          const T* o = out_levels + ((bh * Nq + i) * S + s) * D;
          T dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += grad_out_head[i * D + d] * o[d];
          if (alpha != nullptr) {
            grad_alpha[(bh * Nq + i) * S + s] = dot;
            dot *= alpha[(bh * Nq + i) * S + s];
          }
          delta[i * S + s] = dot;
        }
      }
      std::fill(moments.begin(), moments.end(), T(0));

      for (int64_t s = 0; s < S; ++s) {
        // No gradient from a fully padded level (out_s = 0), nor without queries.
        if (!keys.level_live[b * S + s] || Nq == 0) {
          const int64_t first = keys.level_start[s] * D, last = keys.level_start[s + 1] * D;
          std::fill(grad_k_head + first, grad_k_head + last, T(0));
          std::fill(grad_v_head + first, grad_v_head + last, T(0));
          continue;
        }
        const T* g = grad_out_head;  // (Nq, D) g_s
        if (alpha != nullptr) {
          for (int64_t i = 0; i < Nq; ++i) {
            const T a = alpha[(bh * Nq + i) * S + s];
            for (int64_t d = 0; d < D; ++d) level_grad[i * D + d] = a * g[i * D + d];
          }
          g = level_grad.data();
        }

        for (int64_t key0 = keys.level_start[s]; key0 < keys.level_start[s + 1];
             key0 += kKeyTile) {
          const int64_t cols = std::min(kKeyTile, keys.level_start[s + 1] - key0);
          const int64_t ld = padded_cols<T>(cols);
          transpose(k_head + key0 * D, cols, D, D, key_t.data(), cols);
          transpose(v_head + key0 * D, cols, D, D, value_t.data(), cols);
          for (int64_t row0 = 0; row0 < Nq; row0 += kQueryTile) {
            const int64_t rows = std::min(kQueryTile, Nq - row0);
            const int64_t first_row = bh * Nq + row0;
            const RowCoords<T> coords{centers + (first_row * S + s) * 2,
                                      precision + (first_row * S + s) * 2, 2 * S};
            if constexpr (kDropout) {
              dropout_factors<T>(keep.data(), ld, rows, cols, seed,
                                 static_cast<uint64_t>(first_row * L + key0),
                                 static_cast<uint64_t>(L), static_cast<float>(dropout_p),
                                 keep_scale);
            }
            // grad_scores = g_tile v_tile^T; scores = (scale q_tile) k_tile^T, then P, dS and
            // the moments row block by row block
            matmul(rows, cols, D, g + row0 * D, D, value_t.data(), cols, grad_scores.data(), ld,
                   false);
            matmul(rows, cols, D, query.data() + row0 * D, D, key_t.data(), cols, scores.data(),
                   ld, false, [&](int64_t i0, int64_t block_rows) {
                     backward_rows<T, kMasked, kDropout>(
                         scores.data(), grad_scores.data(), ld, keep.data(), i0, block_rows,
                         cols, keys.key_x.data() + key0, keys.key_y.data() + key0, bias + key0,
                         coords, lse + first_row * S + s, delta.data() + row0 * S + s, S,
                         moments.data() + (row0 * S + s) * kNumMoments, S * kNumMoments);
                   });
            // dv_tile += dropout(P)^T g_tile;  dq_tile += dS k_tile;  dk_tile += dS^T q_tile
            // (both times scale, below). The first query tile starts dk_tile and dv_tile:
            // every key is in one tile of one level.
            matmul<true>(cols, D, rows, scores.data(), ld, g + row0 * D, D,
                         grad_v_head + key0 * D, D, row0 > 0);
            matmul(rows, D, cols, grad_scores.data(), ld, k_head + key0 * D, D,
                   grad_q_head + row0 * D, D, true);
            matmul<true>(cols, D, rows, grad_scores.data(), ld, q_head + row0 * D, D,
                         grad_k_head + key0 * D, D, row0 > 0);
          }
          for (int64_t i = key0 * D; i < (key0 + cols) * D; ++i) grad_k_head[i] *= scale;
        }
      }
      for (int64_t i = 0; i < Nq * D; ++i) grad_q_head[i] *= scale;

      for (int64_t i = 0; i < Nq * S; ++i) {
        const int64_t at = bh * Nq * S + i;  // (b, h, row, level)
        centre_precision_grads<T>(moments.data() + i * kNumMoments, precision[at * 2],
                                  precision[at * 2 + 1], grad_centers + at * 2,
                                  grad_precision + at * 2);
      }
    }
  });
}

template <typename T>
void coattention_forward(const Problem<T>& problem, const ForwardOutputs<T>& outputs) {
  const bool masked = problem.keys->bias_batch_stride != 0, dropout = problem.dropout_p > 0.0;
  (masked ? (dropout ? forward_tiles<T, true, true> : forward_tiles<T, true, false>)
          : (dropout ? forward_tiles<T, false, true> : forward_tiles<T, false, false>))(problem,
                                                                                       outputs);
}

template <typename T>
void coattention_backward(const Problem<T>& problem, const BackwardTensors<T>& tensors) {
  const bool masked = problem.keys->bias_batch_stride != 0, dropout = problem.dropout_p > 0.0;
  (masked ? (dropout ? backward_tiles<T, true, true> : backward_tiles<T, true, false>)
          : (dropout ? backward_tiles<T, false, true> : backward_tiles<T, false, false>))(problem,
                                                                                         tensors);
}

double fma_peak_gflops(int64_t iterations) {
  // Independent chains, more than FMA latency x FMA units on the CPUs we know (4 x 2), each
  // thread on its own: what the matrix products could reach at best, in GFLOP/s (2 per lane).
  constexpr int kChains = 12;
  const int threads = at::get_num_threads();
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      Vec acc[kChains];
      for (int c = 0; c < kChains; ++c) acc[c] = Vec::broadcast(static_cast<float>(c));
      const Vec a = Vec::broadcast(0.999f), b = Vec::broadcast(1e-3f);
      for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 12
        for (int c = 0; c < kChains; ++c) acc[c] = Vec::fma(acc[c], a, b);
      }
      float sink[Vec::kWidth];
      for (int c = 1; c < kChains; ++c) acc[0] = acc[0] + acc[c];
      acc[0].store(sink);
      // Keeps the loop: the compiler cannot know the sum is never negative.
      if (sink[0] < 0.0f) std::abort();
    }
  });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return 2.0 * Vec::kWidth * kChains * static_cast<double>(iterations) * threads / seconds * 1e-9;
}

template void coattention_forward<float>(const Problem<float>&, const ForwardOutputs<float>&);
template void coattention_forward<double>(const Problem<double>&, const ForwardOutputs<double>&);
template void coattention_backward<float>(const Problem<float>&, const BackwardTensors<float>&);
template void coattention_backward<double>(const Problem<double>&,
                                           const BackwardTensors<double>&);

}  // namespace smca::cpu::SMCA_ISA
