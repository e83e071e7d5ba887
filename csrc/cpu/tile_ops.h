// Building blocks of the CPU co-attention kernels (cpu/kernels.h): a transpose, dropout factors,
// and the element-wise passes over one tile of (query rows x keys) of the forward and the
// backward, written with the vectors of cpu/vec.h.
//
// Non-finite inputs are not hidden: a NaN score makes its row's weights NaN (and so its output),
// as in the reference, while a padded key drops out whatever its score (a select, not -inf
// added, which would keep a NaN).
// Part of cpu/kernels.h: included after the target pragma, outside headers already included.
#pragma once

namespace smca::cpu::SMCA_ISA {

// dst (cols x rows, leading dimension ld_dst) = src^T, src (rows x cols, leading dimension
// ld_src). In 16 x 16 blocks, so that both the reads and the writes of a block stay in a few
// cache lines (row by row, a 512 x 32 tile takes seven times as long).
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t i1 = std::min(i0 + kBlock, rows);
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
      const int64_t j1 = std::min(j0 + kBlock, cols);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * ld_dst + i] = src[i * ld_src + j];
      }
    }
  }
}

// Dropout factors of one tile: keep[r, j] = 1 / (1 - p) if philox_uniform(seed, offset) >= p,
// else 0, with offset = first_offset + r * row_offset_stride + j (philox.h).
template <typename T>
void dropout_factors(
    T* keep, int64_t ld,  // (rows, cols), leading dimension ld
    int64_t rows, int64_t cols, uint64_t seed, uint64_t first_offset,
    uint64_t row_offset_stride, float p, T keep_scale) {
  for (int64_t r = 0; r < rows; ++r) {
    T* keep_row = keep + r * ld;
    const uint64_t offset = first_offset + static_cast<uint64_t>(r) * row_offset_stride;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      keep_row[j] = philox_uniform(seed, offset + static_cast<uint64_t>(j)) >= p ? keep_scale
                                                                                : T(0);
    }
  }
}

// The tile passes below go over a row in whole vectors of V. The last vector may reach past
// `cols` (up to the leading dimension `ld` of the tile buffers, and into the padding of the key
// arrays, KeyLayout): its extra lanes are treated as padded keys, so they drop out.
// kMasked: the call has a key padding mask (key_bias may hold -inf); kDropout: dropout factors
// are applied. Both are template arguments rather than tests in the loops: without them the
// loops skip their selects, and a masked-off vector load from a null `keep` still costs a
// fault-suppression assist per vector on some CPUs (ten times slower here).
//
// The passes need only per-row constants: each runs on one row block of the tile, right after
// the product that made its input (matmul's epilogue), while the block is still in L1; a pass
// over the whole tile would read it back from L2.

// The lanes of keys [j, j + W) that take part: unpadded (with kMasked) and before `cols` (in
// the last vector, kTail).
template <class V, bool kMasked, bool kTail, typename T>
typename V::Mask live_lanes(const T* key_bias, int64_t j, int64_t cols) {
  if constexpr (kMasked && kTail) {
    return V::both(V::eq(V::load(key_bias + j), V::zero()), V::first(cols - j));
  } else if constexpr (kMasked) {
    return V::eq(V::load(key_bias + j), V::zero());
  } else {
    return V::first(cols - j);
  }
}

// Calls body(j, kTail) for the vectors of [0, cols): std::false_type for the whole ones,
// std::true_type for a last one that reaches past cols.
template <int W, class Body>
inline void for_each_vector(int64_t cols, Body&& body) {
  int64_t j = 0;
  for (; j + W <= cols; j += W) body(j, std::false_type{});
  if (j < cols) body(j, std::true_type{});
}

// exp(S - m) is computed as exp2((S - m) log2(e)), the cheaper function. log2(e) multiplies the
// difference, not S and m apart: with a centre far outside the map both are ~ -1e3, and
// rounding each after the product would err by ~1e-4 in every weight.
constexpr double kLog2e = 1.4426950408889634;

// Per-row constants of a tile: row r's centre (cx, cy) and precision (px, py) at
// centers[r * coord_stride] and precision[r * coord_stride].
template <typename T>
struct RowCoords {
  const T* centers;
  const T* precision;
  int64_t coord_stride;
};

// Forward, rows [i0, i0 + rows) of a tile of `cols` keys: S = scale q k^T + logG (-inf at a
// padded key), then the online softmax update of each row (flash attention): the running max and
// sum, and the running output `acc` rescaled to the new max. On return `scores` holds the
// unnormalised weights exp(S - max) to multiply with V (times the dropout factors with
// kDropout); the row sum is of the undropped weights. A NaN score makes its row's sum NaN, and so
// the row's output.
template <typename T, bool kMasked, bool kDropout>
void softmax_rows(
    T* scores, int64_t ld,             // (rows, cols). in: (scale q) k^T; out: weights
    const T* keep,                     // (rows, cols), leading dimension ld: dropout factors
    int64_t i0, int64_t rows, int64_t cols,
    const T* key_x, const T* key_y,    // (cols) grid cell of each key, in the level's units
    const T* key_bias,                 // (cols) 0, or -inf for a padded key (which drops out)
    RowCoords<T> coords,
    T* row_max, T* row_sum,            // (rows) running max and sum of exp(S - max)
    T* acc, int64_t head_dim) {        // (rows, head_dim) running sum of weights * v
  using V = VecOf<T>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const V neg_inf = V::broadcast(kNegInf), log2e = V::broadcast(T(kLog2e));
  for (int64_t r = i0; r < i0 + rows; ++r) {
    T* s = scores + r * ld;
    const T* c = coords.centers + r * coords.coord_stride;
    const T* pr = coords.precision + r * coords.coord_stride;
    const V cx = V::broadcast(c[0]), cy = V::broadcast(c[1]);
    const V px = V::broadcast(pr[0]), py = V::broadcast(pr[1]);
    V vmax = neg_inf;
    for_each_vector<V::kWidth>(cols, [&](int64_t j, auto tail) {
      const V ex = px * (V::load(key_x + j) - cx), ey = py * (V::load(key_y + j) - cy);
      V score = V::fnma(ex, ex, V::fnma(ey, ey, V::load(s + j)));
      if constexpr (kMasked || decltype(tail)::value) {
        score = V::select(live_lanes<V, kMasked, decltype(tail)::value>(key_bias, j, cols),
                          score, neg_inf);
      }
      score.store(s + j);
      vmax = V::max(vmax, score);
    });
    T new_max = std::max(row_max[r], V::reduce_max(vmax));
    if (new_max == kNegInf) {
      // Every key so far is padded (or has a score of -inf): nothing to add yet, unless a NaN,
      // which the max skips, is among them.
      if (std::none_of(s, s + cols, [](T x) { return x != x; })) {
        std::fill(s, s + cols, T(0));
        continue;
      }
      new_max = std::numeric_limits<T>::quiet_NaN();
    }
    const V vnew_max = V::broadcast(new_max);
    V vsum = V::zero();
    for_each_vector<V::kWidth>(cols, [&](int64_t j, auto) {
      // 0 at -inf, in the lanes past cols too.
      const V p = V::exp2((V::load(s + j) - vnew_max) * log2e);
      vsum = vsum + p;
      if constexpr (kDropout) {
        (p * V::load(keep + r * ld + j)).store(s + j);
      } else {
        p.store(s + j);
      }
    });
    const T rescale = std::exp(row_max[r] - new_max);  // 0 on the first unmasked tile
    row_sum[r] = row_sum[r] * rescale + V::reduce_add(vsum);
    row_max[r] = new_max;
    if (rescale != T(1)) {
      T* acc_row = acc + r * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) acc_row[d] *= rescale;
    }
  }
}

// Per-row sums over a level's keys, accumulated tile by tile by backward_rows, from which
// centre_precision_grads makes the centre and precision gradients (dx = x_j - cx, dy = y_j - cy).
enum Moment : int {
  kDsDx, kDsDx2, kDsDy, kDsDy2,  // sum_j dS_j w_j for w = dx, dx^2, dy, dy^2
  kDs,                           // sum_j dS_j, zero but for rounding (see centre_precision_grads)
  kPDx, kPDx2, kPDy, kPDy2,      // sum_j P_j w_j
  kNumMoments
};

// Backward, rows [i0, i0 + rows) of a tile of `cols` keys: recomputes P = exp(S - lse),
// S = scale q k^T + logG (P = 0 at a padded key), and dS = P (dP - Delta) with
// dP = (g v^T) * dropout factors, adds the tile's keys to each row's moments (Moment), and leaves
// in `scores` the weights that multiplied V, dropout(P), and in `grad_scores` dS (dq = scale dS k
// and dk = scale dS^T q: the kernel applies the scale to dq and dk). A padded key (and a lane
// past cols) has S = -inf, so P = 0 (NaN in a row whose lse is not finite, as the reference's
// softmax gives it), and, as the reference's masked_fill passes back, dS = 0, even where its v
// (and so dP) is not finite.
template <typename T, bool kMasked, bool kDropout>
void backward_rows(
    T* scores, T* grad_scores, int64_t ld,  // (rows, cols). in: (scale q) k^T, g v^T;
                                            // out: dropout(P), dS
    const T* keep,                     // (rows, cols), leading dimension ld: dropout factors
    int64_t i0, int64_t rows, int64_t cols,
    const T* key_x, const T* key_y,    // (cols) grid cell of each key, in the level's units
    const T* key_bias,                 // (cols) 0, or -inf for a padded key (which drops out)
    RowCoords<T> coords,
    const T* lse, const T* delta,      // row r: lse[r * stat_stride], delta[r * stat_stride]
    int64_t stat_stride,
    T* moments, int64_t moment_stride) {  // row r: kNumMoments sums at moments[r * moment_stride]
  using V = VecOf<T>;
  const V zero = V::zero(), log2e = V::broadcast(T(kLog2e));
  const V neg_inf = V::broadcast(-std::numeric_limits<T>::infinity());
  for (int64_t r = i0; r < i0 + rows; ++r) {
    T* s = scores + r * ld;
    T* ds = grad_scores + r * ld;
    const T* c = coords.centers + r * coords.coord_stride;
    const T* pr = coords.precision + r * coords.coord_stride;
    const V cx = V::broadcast(c[0]), cy = V::broadcast(c[1]);
    const V px = V::broadcast(pr[0]), py = V::broadcast(pr[1]);
    const V row_lse = V::broadcast(lse[r * stat_stride]);
    const V row_delta = V::broadcast(delta[r * stat_stride]);
    // Two passes over the row, so that neither needs more registers than AVX2 has (16): P and
    // dS first, then their moments (and dropout applied to P).
    for_each_vector<V::kWidth>(cols, [&](int64_t j, auto tail) {
      constexpr bool kSelect = kMasked || decltype(tail)::value;
      const V ex = px * (V::load(key_x + j) - cx), ey = py * (V::load(key_y + j) - cy);
      V score = V::fnma(ex, ex, V::fnma(ey, ey, V::load(s + j)));
      typename V::Mask live{};
      if constexpr (kSelect) {
        live = live_lanes<V, kMasked, decltype(tail)::value>(key_bias, j, cols);
        score = V::select(live, score, neg_inf);
      }
      const V p = V::exp2((score - row_lse) * log2e);
      V grad_p = V::load(ds + j);
      if constexpr (kDropout) grad_p = grad_p * V::load(keep + r * ld + j);
      V grad = p * (grad_p - row_delta);
      if constexpr (kSelect) grad = V::select(live, grad, zero);
      p.store(s + j);
      grad.store(ds + j);
    });
    V ds_dx = zero, ds_dx2 = zero, ds_dy = zero, ds_dy2 = zero, ds_sum = zero;
    V p_dx = zero, p_dx2 = zero, p_dy = zero, p_dy2 = zero;
    // P and dS are 0 in the lanes past cols, but in a row whose lse is not finite.
    for_each_vector<V::kWidth>(cols, [&](int64_t j, auto) {
      const V dx = V::load(key_x + j) - cx, dy = V::load(key_y + j) - cy;
      const V p = V::load(s + j), grad = V::load(ds + j);
      const V grad_dx = grad * dx, grad_dy = grad * dy, p_dx_j = p * dx, p_dy_j = p * dy;
      ds_dx = ds_dx + grad_dx;
      ds_dx2 = V::fma(grad_dx, dx, ds_dx2);
      ds_dy = ds_dy + grad_dy;
      ds_dy2 = V::fma(grad_dy, dy, ds_dy2);
      ds_sum = ds_sum + grad;
      p_dx = p_dx + p_dx_j;
      p_dx2 = V::fma(p_dx_j, dx, p_dx2);
      p_dy = p_dy + p_dy_j;
      p_dy2 = V::fma(p_dy_j, dy, p_dy2);
      if constexpr (kDropout) (p * V::load(keep + r * ld + j)).store(s + j);
    });
    T* m = moments + r * moment_stride;
    m[kDsDx] += V::reduce_add(ds_dx);
    m[kDsDx2] += V::reduce_add(ds_dx2);
    m[kDsDy] += V::reduce_add(ds_dy);
    m[kDsDy2] += V::reduce_add(ds_dy2);
    m[kDs] += V::reduce_add(ds_sum);
    m[kPDx] += V::reduce_add(p_dx);
    m[kPDx2] += V::reduce_add(p_dx2);
    m[kPDy] += V::reduce_add(p_dy);
    m[kPDy2] += V::reduce_add(p_dy2);
  }
}

// Centre and precision gradients of one row and level from its moments:
//   dcx = 2 px^2 sum dS dx,  dpx = -2 px sum dS dx^2  (and the same for y).
// A row of dS sums to zero (sum_j P_j = 1 and Delta = sum_j P_j dP_j), but Delta = <g, out>
// comes from the rounded output, so the computed dS rows sum to e = sum dS instead: they carry
// an extra e * P_j. The factors dx^2 (up to the map size squared, or more for a centre outside
// the map) would amplify that into the precision gradient, so it is taken out:
//   sum dS w  ->  sum dS w - e * sum P w   (sum P = 1 up to rounding).
template <typename T>
inline void centre_precision_grads(
    const T* m,                        // (kNumMoments) the row's moments
    T px, T py,
    T* grad_center, T* grad_precision) {  // (2) each: (x, y)
  const T e = m[kDs];
  grad_center[0] = 2 * px * px * (m[kDsDx] - e * m[kPDx]);
  grad_center[1] = 2 * py * py * (m[kDsDy] - e * m[kPDy]);
  grad_precision[0] = -2 * px * (m[kDsDx2] - e * m[kPDx2]);
  grad_precision[1] = -2 * py * (m[kDsDy2] - e * m[kPDy2]);
}

}  // namespace smca::cpu::SMCA_ISA
