// Building blocks of the CPU co-attention kernels (coattention_cpu.cpp): a row-major matrix
// product of tiles, a vectorisable exp, and the element-wise passes over one tile of
// (query rows x keys) of the forward and the backward.
//
// Vectorisation: the element-wise passes are plain loops marked `omp simd`, compiled for each
// x86-64 ISA level (AVX-512, AVX2, baseline) by `target_clones` and chosen when the library is
// loaded, so the extension needs no -march flag and still runs on any CPU. (at::vec cannot do
// that here: it picks its ISA with preprocessor macros, so ATen builds each kernel file once per
// ISA and dispatches with DispatchStub.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <ATen/native/CPUBlas.h>

#include "philox.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define SMCA_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SMCA_CPU_CLONES
#endif

// Fortran BLAS of the library torch is linked against (MKL, OpenBLAS, ...), for float64.
extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const double* alpha, const double* a, const int* lda,
                       const double* b, const int* ldb, const double* beta, double* c,
                       const int* ldc);

namespace smca::cpu {

// Row-major C (M x N, leading dimension ldc) = A (M x K, lda) B (K x N, ldb), plus the old C
// when `accumulate`. Callers transpose operands themselves (see transpose), so that float32 can
// use oneDNN's JIT brgemm ukernel (through at::native::cpublas, which falls back to BLAS where
// there is none): on AVX-512 it runs these small tiles about twice as fast as MKL's sgemm.
inline void matmul(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                   int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // a head dim of 0: the product is empty
    if (!accumulate) {
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    }
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C);
}

// float64 (the checking dtype) through BLAS. Column-major BLAS sees each row-major matrix as its
// transpose, so C^T = B^T A^T is the same call with the operands swapped.
inline void matmul(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                   const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  const char no_trans = 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  // BLAS rejects a leading dimension of 0, which a head dim of 0 gives.
  const int ld_b = static_cast<int>(std::max<int64_t>(ldb, 1));
  const int ld_a = static_cast<int>(std::max<int64_t>(lda, 1));
  const int ld_c = static_cast<int>(ldc);
  const double one = 1.0, beta = accumulate ? 1.0 : 0.0;
  dgemm_(&no_trans, &no_trans, &m, &n, &k, &one, B, &ld_b, A, &ld_a, &beta, C, &ld_c);
}

// dst (cols x rows, leading dimension ld_dst) = src^T, src (rows x cols, leading dimension
// ld_src). In 16 x 16 blocks, so that both the reads and the writes of a block stay in a few
// cache lines (row by row, a 512 x 32 tile takes seven times as long).
template <typename T>
SMCA_CPU_CLONES void transpose(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst,
                               int64_t ld_dst) {
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

// exp(x) for float in branch-free arithmetic that vectorises (Cephes expf: x = n ln2 + r,
// |r| <= ln2 / 2, degree-7 polynomial for exp(r), 2^n built in the exponent bits); relative
// error below 1e-7. Returns exactly 0 below the smallest normal result, -inf included, which is
// how masked keys drop out.
inline float exp_approx(float x) {
  constexpr float kMin = -87.33654f, kMax = 88.37626f;
  // Clamped with the comparisons that maxps / minps implement: one instruction each.
  float xc = x > kMin ? x : kMin;
  xc = xc < kMax ? xc : kMax;
  // Round to nearest by adding and removing 1.5 * 2^23.
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;  // ln2 in two parts, exact product with the first
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < kMin ? 0.0f : p * two_n;
}

// float64 is the checking dtype: exact libm exp, not vectorised.
inline double exp_approx(double x) { return std::exp(x); }

// Dropout factors of one tile: keep[r, j] = 1 / (1 - p) if philox_uniform(seed, offset) >= p,
// else 0, with offset = first_offset + r * row_offset_stride + j (philox.h).
template <typename T>
SMCA_CPU_CLONES void dropout_factors(
    T* keep,  // (rows, cols)
    int64_t rows, int64_t cols, uint64_t seed, uint64_t first_offset,
    uint64_t row_offset_stride, float p, T keep_scale) {
  for (int64_t r = 0; r < rows; ++r) {
    T* keep_row = keep + r * cols;
    const uint64_t offset = first_offset + static_cast<uint64_t>(r) * row_offset_stride;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      keep_row[j] = philox_uniform(seed, offset + static_cast<uint64_t>(j)) >= p ? keep_scale
                                                                                : T(0);
    }
  }
}

// Forward, one tile of one level: S = scale * q k^T + logG + key padding bias, then the online
// softmax update of each row (flash attention): the running max and sum, and the running output
// `acc` rescaled to the new max. On return `scores` holds the unnormalised weights exp(S - max)
// to multiply with V (times the dropout factors with kDropout); the row sum is of the undropped
// weights.
// kDropout is a template argument, not a test of `keep` in the loop: a masked-off vector load
// from a null `keep` still costs a fault-suppression assist per vector on some CPUs (ten times
// slower here).
template <typename T, bool kDropout>
SMCA_CPU_CLONES void softmax_tile_update(
    T* scores,                         // (rows, cols) in: q k^T; out: weights
    const T* keep,                     // (rows, cols) dropout factors when kDropout
    int64_t rows, int64_t cols, T scale,
    const T* key_x, const T* key_y,    // (cols) grid cell of each key, in the level's units
    const T* key_bias,                 // (cols) 0, or -inf for a padded key
    const T* centers,                  // row r: (cx, cy) at centers[r * coord_stride]
    const T* precision,                // row r: (px, py) at precision[r * coord_stride]
    int64_t coord_stride,
    T* row_max, T* row_sum,            // (rows) running max and sum of exp(S - max)
    T* acc, int64_t head_dim) {        // (rows, head_dim) running sum of weights * v
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    T* s = scores + r * cols;
    const T cx = centers[r * coord_stride], cy = centers[r * coord_stride + 1];
    const T px = precision[r * coord_stride], py = precision[r * coord_stride + 1];
    T tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
    for (int64_t j = 0; j < cols; ++j) {
      const T ex = px * (key_x[j] - cx), ey = py * (key_y[j] - cy);
      const T score = s[j] * scale - (ex * ex + ey * ey) + key_bias[j];
      s[j] = score;
      tile_max = score > tile_max ? score : tile_max;
    }
    const T new_max = std::max(row_max[r], tile_max);
    if (new_max == kNegInf) {  // every key so far is padded: nothing to add yet
      std::fill(s, s + cols, T(0));
      continue;
    }
    T tile_sum = 0;
#pragma omp simd reduction(+ : tile_sum)
    for (int64_t j = 0; j < cols; ++j) {
      const T p = exp_approx(s[j] - new_max);
      tile_sum += p;
      if constexpr (kDropout) {
        s[j] = p * keep[r * cols + j];
      } else {
        s[j] = p;
      }
    }
    const T rescale = std::exp(row_max[r] - new_max);  // 0 on the first unmasked tile
    row_sum[r] = row_sum[r] * rescale + tile_sum;
    row_max[r] = new_max;
    if (rescale != T(1)) {
      T* acc_row = acc + r * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) acc_row[d] *= rescale;
    }
  }
}

// Per-row sums over a level's keys, accumulated tile by tile by backward_tile, from which
// centre_precision_grads makes the centre and precision gradients (dx = x_j - cx, dy = y_j - cy).
enum Moment : int {
  kDsDx, kDsDx2, kDsDy, kDsDy2,  // sum_j dS_j w_j for w = dx, dx^2, dy, dy^2
  kDs,                           // sum_j dS_j, zero but for rounding (see centre_precision_grads)
  kPDx, kPDx2, kPDy, kPDy2,      // sum_j P_j w_j
  kNumMoments
};

// Backward, one tile of one level: recomputes P = exp(S - lse), S = scale q k^T + logG + bias,
// then dS = P * (dP - Delta), dP = (g v^T) * dropout factors; leaves in `scores` the weights that
// multiplied V (dropout(P)) and in `grad_scores` scale * dS (the factor of both dq = scale dS k
// and dk = scale dS^T q), and adds the tile's keys to each row's moments (Moment).
// kDropout: as in softmax_tile_update.
template <typename T, bool kDropout>
SMCA_CPU_CLONES void backward_tile(
    T* scores,                         // (rows, cols) in: q k^T; out: dropout(P)
    T* grad_scores,                    // (rows, cols) in: g v^T; out: scale * dS
    const T* keep,                     // (rows, cols) dropout factors when kDropout
    int64_t rows, int64_t cols, T scale,
    const T* key_x, const T* key_y,    // (cols) grid cell of each key, in the level's units
    const T* key_bias,                 // (cols) 0, or -inf for a padded key
    const T* centers,                  // row r: (cx, cy) at centers[r * coord_stride]
    const T* precision,                // row r: (px, py) at precision[r * coord_stride]
    int64_t coord_stride,
    const T* lse, const T* delta,      // row r: lse[r * stat_stride], delta[r * stat_stride]
    int64_t stat_stride,
    T* moments, int64_t moment_stride) {  // row r: kNumMoments sums at moments[r * moment_stride]
  for (int64_t r = 0; r < rows; ++r) {
    T* s = scores + r * cols;
    T* ds = grad_scores + r * cols;
    const T cx = centers[r * coord_stride], cy = centers[r * coord_stride + 1];
    const T px = precision[r * coord_stride], py = precision[r * coord_stride + 1];
    const T row_lse = lse[r * stat_stride], row_delta = delta[r * stat_stride];
    T ds_dx = 0, ds_dx2 = 0, ds_dy = 0, ds_dy2 = 0, ds_sum = 0;
    T p_dx = 0, p_dx2 = 0, p_dy = 0, p_dy2 = 0;
#pragma omp simd reduction(+ : ds_dx, ds_dx2, ds_dy, ds_dy2, ds_sum, p_dx, p_dx2, p_dy, p_dy2)
    for (int64_t j = 0; j < cols; ++j) {
      const T dx = key_x[j] - cx, dy = key_y[j] - cy;
      const T ex = px * dx, ey = py * dy;
      const T p = exp_approx(s[j] * scale - (ex * ex + ey * ey) + key_bias[j] - row_lse);
      T grad;
      if constexpr (kDropout) {
        grad = p * (ds[j] * keep[r * cols + j] - row_delta);
        s[j] = p * keep[r * cols + j];
      } else {
        grad = p * (ds[j] - row_delta);
        s[j] = p;
      }
      ds[j] = grad * scale;
      ds_dx += grad * dx;
      ds_dx2 += grad * dx * dx;
      ds_dy += grad * dy;
      ds_dy2 += grad * dy * dy;
      ds_sum += grad;
      p_dx += p * dx;
      p_dx2 += p * dx * dx;
      p_dy += p * dy;
      p_dy2 += p * dy * dy;
    }
    T* m = moments + r * moment_stride;
    m[kDsDx] += ds_dx;
    m[kDsDx2] += ds_dx2;
    m[kDsDy] += ds_dy;
    m[kDsDy2] += ds_dy2;
    m[kDs] += ds_sum;
    m[kPDx] += p_dx;
    m[kPDx2] += p_dx2;
    m[kPDy] += p_dy;
    m[kPDy2] += p_dy2;
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

}  // namespace smca::cpu
