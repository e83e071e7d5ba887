// C++ CPU kernels of smca::_coattention_forward / _coattention_backward (schemas in
// csrc/smca.cpp, math in SPEC section 1), float32 and float64.
//
// Flash-attention style, as ATen's CPU flash attention
// (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): tiles of kQueryTile queries x kKeyTile
// keys, the scores of a tile by one matrix product, online softmax, weights x V by a second, so
// that no buffer grows past a tile or a head (D x L). On top of plain attention each tile gets
// the Gaussian log-prior computed from dx = x_j - cx, dy = y_j - cy (not the rank-4 expansion,
// which cancels large terms), the key padding bias, and dropout. Levels are separate softmaxes:
// a tile never straddles two levels, and a level's result is mixed into the output with alpha
// once its softmax is finished.
//
// The products take untransposed operands (cpu::matmul, oneDNN's brgemm for float32), so the
// kernels transpose into scratch what a product needs transposed: K per head in the forward;
// the K, V tiles, q and g per head, and the dK^T, dV^T tiles back, in the backward. That is
// O(L D) copies per head against O(Nq L D) flops.
//
// Forward: parallel over (batch, head, query tile); each item walks the keys of every level.
// Backward: parallel over (batch, head), so that one thread owns the dq, dk, dv rows of its
// head and sums into them in a fixed order: no atomics, results independent of the thread
// count. Within a head: key tiles outside, query tiles inside (the K/V tile and its dK/dV
// accumulators stay in cache), P recomputed from the saved lse.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "cpu/tile_ops.h"
#include "smca.h"

namespace smca {
namespace {

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 512;

// The key range of each level and the per-key constants every tile needs, built once per call.
template <typename T>
struct KeyLayout {
  std::vector<int64_t> level_start;  // (S + 1) level s: keys [level_start[s], level_start[s + 1])
  std::vector<T> key_x, key_y;       // (L) grid cell of each key in its level's own units
  std::vector<T> key_bias;           // (B, L) with a mask, else (1, L): 0, or -inf if padded
  int64_t bias_batch_stride = 0;     // L with a mask, 0 without
  std::vector<char> level_live;      // (B, S) 1 if level s of batch b has an unpadded key

  KeyLayout(c10::IntArrayRef spatial_shapes, const std::optional<at::Tensor>& key_padding_mask,
            int64_t B) {
    const int64_t S = static_cast<int64_t>(spatial_shapes.size()) / 2;
    level_start.assign(S + 1, 0);
    for (int64_t s = 0; s < S; ++s) {
      level_start[s + 1] = level_start[s] + spatial_shapes[2 * s] * spatial_shapes[2 * s + 1];
    }
    const int64_t L = level_start[S];
    key_x.resize(L);
    key_y.resize(L);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t width = spatial_shapes[2 * s + 1];
      for (int64_t j = level_start[s]; j < level_start[s + 1]; ++j) {
        key_x[j] = static_cast<T>((j - level_start[s]) % width);
        key_y[j] = static_cast<T>((j - level_start[s]) / width);
      }
    }
    level_live.assign(B * S, 1);
    if (!key_padding_mask.has_value()) {
      key_bias.assign(L, T(0));
      return;
    }
    const at::Tensor mask = key_padding_mask->contiguous();
    const bool* padded = mask.data_ptr<bool>();  // (B, L)
    bias_batch_stride = L;
    key_bias.resize(B * L);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t s = 0; s < S; ++s) {
        bool live = false;
        for (int64_t j = level_start[s]; j < level_start[s + 1]; ++j) {
          key_bias[b * L + j] = padded[b * L + j] ? -std::numeric_limits<T>::infinity() : T(0);
          live = live || !padded[b * L + j];
        }
        level_live[b * S + s] = live;
      }
    }
  }
};

void check_cpu_dtype(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              " (CPU): q has dtype ", q.scalar_type(),
              "; the CPU kernel supports float32 and float64 only (use the Triton or CUDA backend "
              "for float16 and bfloat16)");
}

template <typename T>
void forward_kernel(
    const T* q, const T* k, const T* v,  // (B, H, Nq, D), (B, H, L, D), (B, H, L, D)
    const T* centers, const T* precision,  // (B, H, Nq, S, 2)
    const T* alpha,                      // (B, H, Nq, S), nullptr when S == 1 without alpha
    const KeyLayout<T>& keys, int64_t B, int64_t H, int64_t Nq, int64_t D, T scale,
    double dropout_p, uint64_t seed,
    T* out,         // (B, H, Nq, D)
    T* out_levels,  // (B, H, Nq, S, D), nullptr without alpha
    T* lse) {       // (B, H, Nq, S)
  const int64_t S = static_cast<int64_t>(keys.level_start.size()) - 1;
  const int64_t L = keys.level_start[S];
  const int64_t query_tiles = (Nq + kQueryTile - 1) / kQueryTile;
  const bool dropout = dropout_p > 0.0;
  const T keep_scale = static_cast<T>(1.0 / (1.0 - dropout_p));

  at::parallel_for(0, B * H * query_tiles, 1, [&](int64_t begin, int64_t end) {
    // Scratch of this thread.
    std::vector<T> scores(kQueryTile * kKeyTile);        // weights of the current tile
    std::vector<T> keep(dropout ? kQueryTile * kKeyTile : 0);  // dropout factors of the tile
    std::vector<T> row_max(kQueryTile), row_sum(kQueryTile);
    std::vector<T> acc(kQueryTile * D);                  // unnormalised output of the level
    std::vector<T> mixed(alpha != nullptr ? kQueryTile * D : 0);  // sum_s alpha_s out_s
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
      if (bh != key_t_head) {
        cpu::transpose(k + bh * L * D, L, D, D, key_t.data(), L);
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
        if (!keys.level_live[b * S + s]) {  // every key of the level is padded: out_s = 0
          for (int64_t r = 0; r < rows; ++r) {
            lse_rows[r * S] = std::numeric_limits<T>::infinity();
            std::fill(level_out + r * level_out_stride, level_out + r * level_out_stride + D, T(0));
          }
          continue;
        }
        std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<T>::infinity());
        std::fill(row_sum.begin(), row_sum.end(), T(0));
        std::fill(acc.begin(), acc.end(), T(0));
        const T* level_centers = centers + (first_row * S + s) * 2;
        const T* level_precision = precision + (first_row * S + s) * 2;

        for (int64_t key0 = keys.level_start[s]; key0 < keys.level_start[s + 1];
             key0 += kKeyTile) {
          const int64_t cols = std::min(kKeyTile, keys.level_start[s + 1] - key0);
          // scores = q_tile k_tile^T
          cpu::matmul(rows, cols, D, q_tile, D, key_t.data() + key0, L, scores.data(), cols,
                      false);
          if (dropout) {
            cpu::dropout_factors<T>(keep.data(), rows, cols, seed,
                                    static_cast<uint64_t>(first_row * L + key0),
                                    static_cast<uint64_t>(L), static_cast<float>(dropout_p),
                                    keep_scale);
          }
          (dropout ? cpu::softmax_tile_update<T, true> : cpu::softmax_tile_update<T, false>)(
              scores.data(), keep.data(), rows, cols, scale, keys.key_x.data() + key0,
              keys.key_y.data() + key0, bias + key0, level_centers, level_precision, 2 * S,
              row_max.data(), row_sum.data(), acc.data(), D);
          // acc += weights v_tile
          cpu::matmul(rows, D, cols, scores.data(), cols, v_head + key0 * D, D, acc.data(), D,
                      true);
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

template <typename T>
void backward_kernel(
    const T* grad_out,                   // (B, H, Nq, D)
    const T* q, const T* k, const T* v,  // (B, H, Nq, D), (B, H, L, D), (B, H, L, D)
    const T* centers, const T* precision,  // (B, H, Nq, S, 2)
    const T* alpha,                      // (B, H, Nq, S), nullptr when S == 1 without alpha
    const T* out_levels,                 // (B, H, Nq, S, D)
    const T* lse,                        // (B, H, Nq, S)
    const KeyLayout<T>& keys, int64_t B, int64_t H, int64_t Nq, int64_t D, T scale,
    double dropout_p, uint64_t seed,
    T* grad_q, T* grad_k, T* grad_v,     // like q, k, v
    T* grad_centers, T* grad_precision,  // (B, H, Nq, S, 2)
    T* grad_alpha) {                     // (B, H, Nq, S), nullptr without alpha
  const int64_t S = static_cast<int64_t>(keys.level_start.size()) - 1;
  const int64_t L = keys.level_start[S];
  const bool dropout = dropout_p > 0.0;
  const T keep_scale = static_cast<T>(1.0 / (1.0 - dropout_p));

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // Scratch of this thread.
    std::vector<T> scores(kQueryTile * kKeyTile);       // P, then dropout(P), of the tile
    std::vector<T> grad_scores(kQueryTile * kKeyTile);  // dP, then scale * dS, of the tile
    std::vector<T> keep(dropout ? kQueryTile * kKeyTile : 0);  // dropout factors of the tile
    std::vector<T> key_t(D * kKeyTile), value_t(D * kKeyTile);  // (D, cols) K, V tiles transposed
    std::vector<T> grad_key_t(D * kKeyTile), grad_value_t(D * kKeyTile);  // (D, cols) dK^T, dV^T
    std::vector<T> query_t(D * Nq);                     // (D, Nq) the head's q transposed
    std::vector<T> level_grad(alpha != nullptr ? Nq * D : 0);  // (Nq, D) g_s = alpha_s grad_out
    std::vector<T> level_grad_t(D * Nq);                // (D, Nq) g_s transposed
    std::vector<T> delta(Nq * S);        // (Nq, S) Delta_is = <g_s,i, out_is>
    std::vector<T> moments(Nq * S * cpu::kNumMoments);  // (Nq, S, kNumMoments) cpu::Moment

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
      // dq sums over tiles, and the dk, dv rows of a fully padded level get nothing: zeroed here
      // rather than by at::zeros, which would add three parallel regions to wait for.
      std::fill(grad_q_head, grad_q_head + Nq * D, T(0));
      std::fill(grad_k_head, grad_k_head + L * D, T(0));
      std::fill(grad_v_head, grad_v_head + L * D, T(0));
      cpu::transpose(q_head, Nq, D, D, query_t.data(), Nq);

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
        if (!keys.level_live[b * S + s] || Nq == 0) continue;
        const T* g = grad_out_head;  // (Nq, D) g_s
        if (alpha != nullptr) {
          for (int64_t i = 0; i < Nq; ++i) {
            const T a = alpha[(bh * Nq + i) * S + s];
            for (int64_t d = 0; d < D; ++d) level_grad[i * D + d] = a * g[i * D + d];
          }
          g = level_grad.data();
        }
        cpu::transpose(g, Nq, D, D, level_grad_t.data(), Nq);

        for (int64_t key0 = keys.level_start[s]; key0 < keys.level_start[s + 1];
             key0 += kKeyTile) {
          const int64_t cols = std::min(kKeyTile, keys.level_start[s + 1] - key0);
          cpu::transpose(k_head + key0 * D, cols, D, D, key_t.data(), cols);
          cpu::transpose(v_head + key0 * D, cols, D, D, value_t.data(), cols);
          for (int64_t row0 = 0; row0 < Nq; row0 += kQueryTile) {
            const int64_t rows = std::min(kQueryTile, Nq - row0);
            const int64_t first_row = bh * Nq + row0;
            // scores = q_tile k_tile^T;  grad_scores = g_tile v_tile^T
            cpu::matmul(rows, cols, D, q_head + row0 * D, D, key_t.data(), cols, scores.data(),
                        cols, false);
            cpu::matmul(rows, cols, D, g + row0 * D, D, value_t.data(), cols,
                        grad_scores.data(), cols, false);
            if (dropout) {
              cpu::dropout_factors<T>(keep.data(), rows, cols, seed,
                                      static_cast<uint64_t>(first_row * L + key0),
                                      static_cast<uint64_t>(L), static_cast<float>(dropout_p),
                                      keep_scale);
            }
            (dropout ? cpu::backward_tile<T, true> : cpu::backward_tile<T, false>)(
                scores.data(), grad_scores.data(), keep.data(), rows, cols, scale,
                keys.key_x.data() + key0, keys.key_y.data() + key0, bias + key0,
                centers + (first_row * S + s) * 2, precision + (first_row * S + s) * 2, 2 * S,
                lse + first_row * S + s, delta.data() + row0 * S + s, S,
                moments.data() + (row0 * S + s) * cpu::kNumMoments, S * cpu::kNumMoments);
            // dV^T += g_tile^T dropout(P);  dq_tile += (scale dS) k_tile;
            // dK^T += q_tile^T (scale dS).  The first query tile starts dK^T and dV^T.
            cpu::matmul(D, cols, rows, level_grad_t.data() + row0, Nq, scores.data(), cols,
                        grad_value_t.data(), cols, row0 > 0);
            cpu::matmul(rows, D, cols, grad_scores.data(), cols, k_head + key0 * D, D,
                        grad_q_head + row0 * D, D, true);
            cpu::matmul(D, cols, rows, query_t.data() + row0, Nq, grad_scores.data(), cols,
                        grad_key_t.data(), cols, row0 > 0);
          }
          // Every key is in one tile of one level: its dk, dv rows are written once, here.
          cpu::transpose(grad_key_t.data(), D, cols, cols, grad_k_head + key0 * D, D);
          cpu::transpose(grad_value_t.data(), D, cols, cols, grad_v_head + key0 * D, D);
        }
      }

      for (int64_t i = 0; i < Nq * S; ++i) {
        const int64_t at = bh * Nq * S + i;  // (b, h, row, level)
        cpu::centre_precision_grads<T>(moments.data() + i * cpu::kNumMoments, precision[at * 2],
                                       precision[at * 2 + 1], grad_centers + at * 2,
                                       grad_precision + at * 2);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coattention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& centers,
    const at::Tensor& precision, const std::optional<at::Tensor>& alpha,
    c10::IntArrayRef spatial_shapes, const std::optional<at::Tensor>& key_padding_mask,
    double scale, double dropout_p, int64_t seed) {
  const int64_t S = check_coattention_args(q, k, v, centers, precision, alpha, spatial_shapes,
                                           key_padding_mask, dropout_p);
  check_cpu_dtype(q, "_coattention_forward");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const at::Tensor q_c = q.contiguous(), k_c = k.contiguous(), v_c = v.contiguous();
  const at::Tensor centers_c = centers.contiguous(), precision_c = precision.contiguous();
  const at::Tensor alpha_c = alpha.has_value() ? alpha->contiguous() : at::Tensor();

  at::Tensor out = at::empty({B, H, Nq, D}, q.options());
  at::Tensor out_levels =
      alpha.has_value() ? at::empty({B, H, Nq, S, D}, q.options()) : at::empty({0}, q.options());
  at::Tensor lse = at::empty({B, H, Nq, S}, q.options());

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_coattention_forward_cpu", [&] {
    const KeyLayout<scalar_t> keys(spatial_shapes, key_padding_mask, B);
    forward_kernel<scalar_t>(
        q_c.data_ptr<scalar_t>(), k_c.data_ptr<scalar_t>(), v_c.data_ptr<scalar_t>(),
        centers_c.data_ptr<scalar_t>(), precision_c.data_ptr<scalar_t>(),
        alpha.has_value() ? alpha_c.data_ptr<scalar_t>() : nullptr, keys, B, H, Nq, D,
        static_cast<scalar_t>(scale), dropout_p, static_cast<uint64_t>(seed),
        out.data_ptr<scalar_t>(),
        alpha.has_value() ? out_levels.data_ptr<scalar_t>() : nullptr, lse.data_ptr<scalar_t>());
  });
  return {out, out_levels, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
coattention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& centers, const at::Tensor& precision,
    const std::optional<at::Tensor>& alpha, const at::Tensor& out_levels, const at::Tensor& lse,
    c10::IntArrayRef spatial_shapes, const std::optional<at::Tensor>& key_padding_mask,
    double scale, double dropout_p, int64_t seed) {
  const int64_t S = check_coattention_args(q, k, v, centers, precision, alpha, spatial_shapes,
                                           key_padding_mask, dropout_p);
  check_cpu_dtype(q, "_coattention_backward");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  check_coattention_backward_args(grad_out, q, out_levels, lse, S);
  const at::Tensor grad_out_c = grad_out.contiguous();
  const at::Tensor q_c = q.contiguous(), k_c = k.contiguous(), v_c = v.contiguous();
  const at::Tensor centers_c = centers.contiguous(), precision_c = precision.contiguous();
  const at::Tensor alpha_c = alpha.has_value() ? alpha->contiguous() : at::Tensor();
  const at::Tensor out_levels_c = out_levels.contiguous(), lse_c = lse.contiguous();

  // The kernel writes every element.
  at::Tensor grad_q = at::empty_like(q_c), grad_k = at::empty_like(k_c),
             grad_v = at::empty_like(v_c);
  at::Tensor grad_centers = at::empty_like(centers_c),
             grad_precision = at::empty_like(precision_c);
  at::Tensor grad_alpha =
      alpha.has_value() ? at::empty_like(alpha_c) : at::empty({0}, centers.options());

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_coattention_backward_cpu", [&] {
    const KeyLayout<scalar_t> keys(spatial_shapes, key_padding_mask, B);
    backward_kernel<scalar_t>(
        grad_out_c.data_ptr<scalar_t>(), q_c.data_ptr<scalar_t>(), k_c.data_ptr<scalar_t>(),
        v_c.data_ptr<scalar_t>(), centers_c.data_ptr<scalar_t>(),
        precision_c.data_ptr<scalar_t>(),
        alpha.has_value() ? alpha_c.data_ptr<scalar_t>() : nullptr,
        out_levels_c.data_ptr<scalar_t>(), lse_c.data_ptr<scalar_t>(), keys, B, H, Nq, D,
        static_cast<scalar_t>(scale), dropout_p, static_cast<uint64_t>(seed),
        grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(),
        grad_centers.data_ptr<scalar_t>(), grad_precision.data_ptr<scalar_t>(),
        alpha.has_value() ? grad_alpha.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_q, grad_k, grad_v, grad_centers, grad_precision, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(smca, CPU, m) {
  m.impl("_coattention_forward", &coattention_forward_cpu);
  m.impl("_coattention_backward", &coattention_backward_cpu);
}

}  // namespace smca
