// The small matrix products of the CPU kernels: C (M x N) = A (M x K) B (K x N) [+ C], row-major.
//
// float32 runs on a register-blocked micro-kernel of our own (the BLIS scheme): a micro-tile of
// kGemmRows rows x kGemmVecs vectors of C stays in registers over the whole K loop, and each step
// broadcasts one element of A per row and loads kGemmVecs vectors of B. The kernels' products
// are small (at head dim 32: 60 x 512 = (60 x 32)(32 x 512), 60 x 32 = (60 x 512)(512 x 32),
// 512 x 32 = (512 x 60)(60 x 32)), too small for packing to pay. On one core of the AMD EPYC of
// this project's machines, for those shapes, it ran at 235-268 GFLOP/s with AVX-512 and 120-135
// with AVX2, as fast as oneDNN's JIT brgemm (what torch's cpublas::brgemm calls: 237-276 and
// 117-139) and faster than MKL's sgemm (105 on both): a library would add a dependency on how it
// is built and on the CPU's vendor, for nothing. Column edges go through a zero-padded copy of
// B's last columns and of C's; row edges use a micro-kernel of fewer rows.
//
// float64, the checking dtype, goes to the BLAS torch is linked against.
// Part of cpu/kernels.h: included after the target pragma, outside headers already included.
#pragma once

// Fortran BLAS of the library torch is linked against (MKL, OpenBLAS, ...).
extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const double* alpha, const double* a, const int* lda,
                       const double* b, const int* ldb, const double* beta, double* c,
                       const int* ldc);

namespace smca::cpu::SMCA_ISA {

// C[0:kRows, 0:kVecs * Vec::kWidth] (+)= A[0:kRows, 0:K] B[0:K, 0:kVecs * Vec::kWidth], where
// A[i, k] is at a[i * lda + k], or at a[k * lda + i] with kTransA (A stored transposed: the
// broadcasts of one step then read consecutive floats).
template <int kRows, int kVecs, bool kTransA>
void micro_kernel(int64_t K, const float* a, int64_t lda, const float* B, int64_t ldb, float* C,
                  int64_t ldc, bool accumulate) {
  constexpr int W = Vec::kWidth;
  Vec acc[kRows][kVecs];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      acc[i][v] = accumulate ? Vec::load(C + i * ldc + v * W) : Vec::zero();
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec b[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) b[v] = Vec::load(B + k * ldb + v * W);
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const Vec ai = Vec::broadcast(kTransA ? a[k * lda + i] : a[i * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[i][v] = Vec::fma(ai, b[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[i][v].store(C + i * ldc + v * W);
  }
}

using MicroKernel = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*,
                             int64_t, bool);

// micro_kernel<r + 1, kGemmVecs, kTransA> for r = 0 .. kGemmRows - 1: every row count a tile
// edge leaves.
template <bool kTransA, int... kRowsMinusOne>
constexpr std::array<MicroKernel, sizeof...(kRowsMinusOne)> micro_kernels(
    std::integer_sequence<int, kRowsMinusOne...>) {
  return {&micro_kernel<kRowsMinusOne + 1, kGemmVecs, kTransA>...};
}
template <bool kTransA>
inline constexpr auto kMicroKernels =
    micro_kernels<kTransA>(std::make_integer_sequence<int, kGemmRows>());

// The default epilogue of matmul: none.
struct NoEpilogue {
  void operator()(int64_t, int64_t) const {}
};

// C (M x N, ldc) = A B [+ C] with B (K x N, ldb) row-major and A (M x K) row-major with leading
// dimension lda, or, with kTransA, stored transposed: A^T (K x M, lda) row-major.
//
// Without an epilogue the loops go column strip by column strip, each strip of B reused, from L1,
// by every row block. With one, they go row block by row block, and epilogue(i0, rows) gets each
// block of C rows [i0, i0 + rows) once written, still in L1.
template <bool kTransA = false, class Epilogue = NoEpilogue>
void matmul(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
            int64_t ldb, float* C, int64_t ldc, bool accumulate, Epilogue&& epilogue = {}) {
  constexpr int64_t kCols = kGemmVecs * Vec::kWidth;
  if (M == 0) return;
  const int64_t full_cols = N - N % kCols, edge = N - full_cols;
  // The last columns: B's copied into a zero-padded buffer of kCols columns, C's through another.
  thread_local std::vector<float> edge_b, edge_c;
  if (edge > 0) {
    edge_b.assign(K * kCols, 0.0f);
    edge_c.assign(kGemmRows * kCols, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      std::copy(B + k * ldb + full_cols, B + k * ldb + N, edge_b.data() + k * kCols);
    }
  }
  // Micro-tile of rows [i0, i0 + rows) and columns [j0, j0 + kCols), or the edge columns.
  const auto tile = [&](int64_t i0, int64_t rows, int64_t j0) {
    const float* a = kTransA ? A + i0 : A + i0 * lda;
    if (j0 < full_cols) {
      kMicroKernels<kTransA>[rows - 1](K, a, lda, B + j0, ldb, C + i0 * ldc + j0, ldc,
                                       accumulate);
      return;
    }
    float* c = C + i0 * ldc + full_cols;
    if (accumulate) {
      for (int64_t i = 0; i < rows; ++i) {
        std::copy(c + i * ldc, c + i * ldc + edge, edge_c.data() + i * kCols);
      }
    }
    kMicroKernels<kTransA>[rows - 1](K, a, lda, edge_b.data(), kCols, edge_c.data(), kCols,
                                     accumulate);
    for (int64_t i = 0; i < rows; ++i) {
      std::copy(edge_c.data() + i * kCols, edge_c.data() + i * kCols + edge, c + i * ldc);
    }
  };
  if constexpr (!std::is_same_v<std::decay_t<Epilogue>, NoEpilogue>) {
    for (int64_t i0 = 0; i0 < M; i0 += kGemmRows) {
      const int64_t rows = std::min<int64_t>(kGemmRows, M - i0);
      for (int64_t j0 = 0; j0 < N; j0 += kCols) tile(i0, rows, j0);
      epilogue(i0, rows);
    }
  } else {
    for (int64_t j0 = 0; j0 < N; j0 += kCols) {
      for (int64_t i0 = 0; i0 < M; i0 += kGemmRows) {
        tile(i0, std::min<int64_t>(kGemmRows, M - i0), j0);
      }
    }
  }
}

// float64 through BLAS. Column-major BLAS sees each row-major matrix as its transpose, so
// C^T = B^T A^T is the same call with the operands swapped.
// The epilogue runs once, on all of C.
template <bool kTransA = false, class Epilogue = NoEpilogue>
void matmul(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
            int64_t ldb, double* C, int64_t ldc, bool accumulate, Epilogue&& epilogue = {}) {
  if (M == 0 || N == 0) return;
  const char no_trans = 'N', trans_a = kTransA ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  // BLAS rejects a leading dimension of 0, which a head dim of 0 gives.
  const int ld_b = static_cast<int>(std::max<int64_t>(ldb, 1));
  const int ld_a = static_cast<int>(std::max<int64_t>(lda, 1));
  const int ld_c = static_cast<int>(ldc);
  const double one = 1.0, beta = accumulate ? 1.0 : 0.0;
  dgemm_(&no_trans, &trans_a, &m, &n, &k, &one, B, &ld_b, A, &ld_a, &beta, C, &ld_c);
  epilogue(0, M);
}

}  // namespace smca::cpu::SMCA_ISA
