// CUDA kernels of _coattention_forward / _coattention_backward (schemas in csrc/smca.cpp; math
// in docs/operators.md, design in docs/kernels.md).
//
// Tested without a GPU: tests/cuda_emulation.py rewrites this file as text and builds it for the
// CPU with tests/cuda_emulation.h, so keep the forms it rewrites (docs/kernels.md, Testing):
// launches in triple-chevron syntax, the kernel a name with at most one flat template argument
// list; 1-D blocks (threadIdx.x); shared memory only through the one dynamic `smem` declaration;
// __syncthreads and __shfl_xor_sync (every lane calling) as the only synchronisation, no
// atomics; the CUDA includes, host calls and device guard line it replaces, verbatim; the CUDA
// registration block last; inline PTX only inside the wrappers under `#ifndef
// SMCA_CUDA_EMULATION` (the emulation defines the macro and brings its own mma and tf32
// rounding). A rewrite that finds nothing fails the tests. (This comment avoids the rewritten
// texts themselves.)
//
// Flash-style, fp32 accumulation, fp32 coordinates; q/k/v in float32, float16 or bfloat16.
// Every matrix product of a tile kernel is a warp product (warp_product below): a warp owns 16
// rows of the tile and computes them in the C fragment layout of mma.sync m16n8 (PTX ISA,
// "Matrix fragments for mma.m16n8k16"): lane l holds rows l/4 and l/4 + 8 and, in each group of
// 8 columns, columns 2 (l%4) and 2 (l%4) + 1. Both operands come from shared memory, held in
// the input dtype; the product runs
//   - for float16 / bfloat16 on tensor cores, mma.m16n8k16 with fp32 accumulation;
//   - for float32 when torch allows TF32 for CUDA matmuls (fp32_precision "tf32", e.g.
//     torch.set_float32_matmul_precision("high"); read on the host at every call) on tensor
//     cores, mma.m16n8k8.tf32, operands rounded with cvt.rna.tf32.f32;
//   - for float32 otherwise ("ieee") as exact fp32 FFMA loops that give the same fragments.
// P and dS, the left operands of the second products, go through shared memory in the input
// dtype, so for 16-bit inputs they are rounded to it (as flash attention does); softmax
// statistics, dS, the moments and every accumulator stay fp32.
//
// Forward:  forward_kernel        a block per (b*h, query tile, key split); for every level, an
//                                 online softmax over the split's key tiles of that level; writes
//                                 the split's partial (max m, sum l, sum p*v) per row and level.
//           forward_combine       merges the splits: out_s, lse_s, out = sum_s alpha_s out_s.
// Backward: backward_preprocess   Delta_s = <g_s, out_s> and dalpha_s = <grad_out, out_s>.
//           backward_dq_kernel    a block per (b*h, query tile, key split): dq and the per-row
//                                 sums that give dcenters and dprecision, per split.
//           backward_dq_reduce    sums the splits, forms grad_q, grad_centers, grad_precision.
//           backward_dkdv_kernel  a block per (b*h, key tile); loops over every query tile.
// The key axis is split (grid.y) only when B*H*ceil(Nq/BM) blocks would leave SMs idle (see
// key_splits). Splits are summed in a fixed order and no kernel uses atomics, so results are
// deterministic.
//
// Keys are cut into tiles level by level (a tile never straddles two levels), and the tiles of
// all levels are numbered one after the other ("flattened tiles"); a key split is a contiguous
// range of flattened tiles, so it may cover the end of one level and the start of the next.
//
// A tile kernel runs one warp per 16 tile rows (query rows in forward and dQ, key rows in
// dK/dV): 4 warps for 64 rows, 2 for 32. Row reductions (max, sum, the moments) are over the 4
// lanes of a quad: two xor-shuffles. Shared-memory rows are padded by 16 bytes, so that the
// fragment loads of a warp hit distinct banks. The tile kernels declare at least one block per
// SM in __launch_bounds__: with the thread count alone, ptxas (CUDA 13) caps the registers for
// occupancy (128 or 168) and spills.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "philox.h"
#include "smca.h"

namespace smca {
namespace {

constexpr int kWarpRows = 16;              // tile rows owned by a warp (the mma's M)
constexpr int kElementwiseThreads = 256;   // threads of the combine / reduce / preprocess kernels
constexpr int kMaxLevels = 32;             // levels carried by value in the kernel arguments
constexpr int kMaxSplits = 16;
// Per-row, per-level sums of the dQ pass, in the order of csrc/cpu/tile_ops.h's Moment:
// sum_j dS_j w_j (w = dx, dx^2, dy, dy^2), sum_j dS_j, sum_j P_j w_j (see backward_dq_reduce).
constexpr int kMoments = 9;

// Threads of a tile kernel whose tile has `rows` rows: a warp per 16.
constexpr int tile_threads(int rows) { return rows / kWarpRows * 32; }

// Shared-memory tiles hold scalar_t; a row of n elements is padded to n + tile_pad<scalar_t>
// (16 bytes), which keeps rows 4-byte aligned and spreads a fragment load over all banks.
template <typename scalar_t>
constexpr int tile_pad = 16 / static_cast<int>(sizeof(scalar_t));
// Shared memory per key of a tile for its cell and mask (tile_key_positions).
constexpr size_t kKeyBytes = 2 * sizeof(float) + sizeof(bool);
// The most dynamic shared memory a block may use on sm_86/89 (sm_80: 163 KB, sm_90: 227 KB).
constexpr size_t kMaxSharedBytes = 99 * 1024;

// Tile sizes per head dim. Shared memory per block stays under 99 KB (the limit of sm_86/89)
// for float32 (16-bit tiles take half), hence the smaller tiles for the larger head dims.
template <int D>
struct Tiles {
  static_assert(D == 16 || D == 32 || D == 64 || D == 128, "head dim must be 16, 32, 64 or 128");
  static constexpr int kForwardM = 64;                // queries per forward block
  static constexpr int kForwardN = D <= 64 ? 64 : 32; // keys per forward step
  static constexpr int kDqM = D <= 64 ? 64 : 32;      // queries per dQ block
  static constexpr int kDqN = D <= 64 ? 64 : 32;      // keys per dQ step
  static constexpr int kDkvN = D <= 64 ? 64 : 32;     // keys per dK/dV block
  static constexpr int kDkvM = D <= 32 ? 64 : 32;     // queries per dK/dV step
};

// The levels of spatial_shapes, cut into tiles of `block_n` keys (block_n differs per kernel).
struct LevelTable {
  int num_levels;
  int start[kMaxLevels];           // first key of level s
  int size[kMaxLevels];            // H_s * W_s keys
  int width[kMaxLevels];           // W_s: key start + c sits at x = c % W_s, y = c / W_s
  int tile_begin[kMaxLevels + 1];  // first flattened tile of level s; [num_levels] = all tiles
};

LevelTable make_level_table(c10::IntArrayRef spatial_shapes, int block_n) {
  LevelTable t{};
  t.num_levels = static_cast<int>(spatial_shapes.size() / 2);
  int start = 0, tiles = 0;
  for (int s = 0; s < t.num_levels; ++s) {
    const int size = static_cast<int>(spatial_shapes[2 * s] * spatial_shapes[2 * s + 1]);
    t.start[s] = start;
    t.size[s] = size;
    t.width[s] = static_cast<int>(spatial_shapes[2 * s + 1]);
    t.tile_begin[s] = tiles;
    start += size;
    tiles += (size + block_n - 1) / block_n;
  }
  t.tile_begin[t.num_levels] = tiles;
  return t;
}

// ------------------------------------------------------------------------------------------
// Device helpers

// Copies rows [row0, row0 + ROWS) of a row-major (num_rows, D) matrix into a (ROWS, LD) tile
// of the same dtype, zeros past row_end. With row_scale, matrix row `row` is multiplied by
// row_scale[row * scale_stride] in fp32 and rounded back (one level's alpha: g_s = alpha_s *
// grad_out).
template <int ROWS, int D, int LD, int THREADS, typename scalar_t>
__device__ __forceinline__ void load_tile(scalar_t* tile, const scalar_t* __restrict__ src,
                                          int row0, int row_end,
                                          const float* __restrict__ row_scale = nullptr,
                                          int scale_stride = 0) {
  for (int idx = threadIdx.x; idx < ROWS * D; idx += THREADS) {
    const int r = idx / D, d = idx % D, row = row0 + r;
    scalar_t value = static_cast<scalar_t>(0.f);
    if (row < row_end) {
      value = src[static_cast<int64_t>(row) * D + d];
      if (row_scale != nullptr)
        value = static_cast<scalar_t>(static_cast<float>(value) *
                                      row_scale[static_cast<int64_t>(row) * scale_stride]);
    }
    tile[r * LD + d] = value;
  }
}

// ---- Warp products -------------------------------------------------------------------------
// The tensor-core instructions, one wrapper each (the emulation provides its own, from the
// fragment tables of the PTX ISA). d += a b for one 16 x 8 tile; a, b, d in the fragment layout
// of mma.m16n8k16 (16-bit a, b: two elements a register, the lower index in the lower half)
// or mma.m16n8k8.tf32.
#ifndef SMCA_CUDA_EMULATION
template <typename scalar_t>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "mma_m16n8k16: float16 or bfloat16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// float32 -> tf32 (round to nearest, ties away from zero), as the bits of a float.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
  return bits;
}
#endif  // SMCA_CUDA_EMULATION

// How a tile kernel multiplies: tensor cores for 16-bit inputs, TF32 tensor cores for float32
// when allowed, else fp32 FFMA.
enum class Math { kMma16, kTf32, kFfma };

template <typename scalar_t, bool kTf32>
constexpr Math math_of() {
  if constexpr (!std::is_same_v<scalar_t, float>) return Math::kMma16;
  return kTf32 ? Math::kTf32 : Math::kFfma;
}

// Two adjacent 16-bit elements (the first at an even index of a 4-byte aligned row) as the
// register of an mma operand.
template <typename scalar_t>
__device__ __forceinline__ uint32_t load_pair(const scalar_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
// Two 16-bit elements, lo in the lower half.
template <typename scalar_t>
__device__ __forceinline__ uint32_t pack_pair(scalar_t lo, scalar_t hi) {
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

// acc[j] += (A B)[16 rows, columns 8 j .. 8 j + 7] for j < NT, over k < K: the warp's rows in
// the C fragment layout (acc[j][0..1]: row lane/4, columns 8 j + 2 (lane%4) + {0, 1};
// acc[j][2..3]: the same columns of row lane/4 + 8). A is row-major in shared memory, row r at
// a[r * lda]. B is given transposed (kBT: B[k][n] = b[n * ldb + k], e.g. K for Q K^T) or as it
// is (B[k][n] = b[k * ldb + n], e.g. V for P V). Every lane of the warp must call.
template <Math M, int K, int NT, bool kBT, typename T>
__device__ __forceinline__ void warp_product(float (&acc)[NT][4], const T* a, int lda, const T* b,
                                             int ldb) {
  const int lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
  if constexpr (M == Math::kMma16) {
    static_assert(K % 16 == 0, "warp_product: K must be a multiple of 16");
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
      const T* a_lo = a + group * lda + k0 + 2 * quad;
      const T* a_hi = a_lo + 8 * lda;
      const uint32_t af[4] = {load_pair(a_lo), load_pair(a_hi), load_pair(a_lo + 8),
                              load_pair(a_hi + 8)};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        uint32_t bf[2];
        if constexpr (kBT) {
          const T* col = b + (8 * j + group) * ldb + k0 + 2 * quad;
          bf[0] = load_pair(col);
          bf[1] = load_pair(col + 8);
        } else {
          const T* col = b + (k0 + 2 * quad) * ldb + 8 * j + group;
          bf[0] = pack_pair(col[0], col[ldb]);
          bf[1] = pack_pair(col[8 * ldb], col[9 * ldb]);
        }
        mma_m16n8k16<T>(acc[j], af, bf);
      }
    }
  } else if constexpr (M == Math::kTf32) {
    static_assert(K % 8 == 0, "warp_product: K must be a multiple of 8");
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 8) {
      const T* a_lo = a + group * lda + k0 + quad;
      const T* a_hi = a_lo + 8 * lda;
      const uint32_t af[4] = {to_tf32(a_lo[0]), to_tf32(a_hi[0]), to_tf32(a_lo[4]),
                              to_tf32(a_hi[4])};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        uint32_t bf[2];
        if constexpr (kBT) {
          const T* col = b + (8 * j + group) * ldb + k0 + quad;
          bf[0] = to_tf32(col[0]);
          bf[1] = to_tf32(col[4]);
        } else {
          const T* col = b + (k0 + quad) * ldb + 8 * j + group;
          bf[0] = to_tf32(col[0]);
          bf[1] = to_tf32(col[4 * ldb]);
        }
        mma_m16n8k8_tf32(acc[j], af, bf);
      }
    }
  } else {  // fp32 FFMA, the same fragments
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      const float a_lo = a[group * lda + k], a_hi = a[(group + 8) * lda + k];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int n = 8 * j + 2 * quad;
        const float b0 = kBT ? b[n * ldb + k] : b[k * ldb + n];
        const float b1 = kBT ? b[(n + 1) * ldb + k] : b[k * ldb + n + 1];
        acc[j][0] += a_lo * b0;
        acc[j][1] += a_lo * b1;
        acc[j][2] += a_hi * b0;
        acc[j][3] += a_hi * b1;
      }
    }
  }
}

// S_ij = scale <q_i, k_j> + logG_ij with dx = x_j - cx_i, dy = y_j - cy_i; the one formula
// that the forward and both backward kernels evaluate, so that P is recomputed identically.
__device__ __forceinline__ float score(float dot, float scale, float dx, float dy, float px,
                                       float py) {
  const float ex = px * dx, ey = py * dy;
  return scale * dot - (ex * ex + ey * ey);
}

// Dropout factor of element offset ((b*H + h)*Nq + i)*L + j: 1/(1-p) if kept, else 0.
__device__ __forceinline__ float dropout_factor(uint64_t seed, int64_t offset, float dropout_p,
                                                float inv_keep) {
  return philox_uniform(seed, static_cast<uint64_t>(offset)) >= dropout_p ? inv_keep : 0.f;
}

// Max / sum over the 4 lanes of a quad, which hold one fragment row (every lane must call).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Grid cell of key j of a level that spans keys [start, end) and is `width` cells wide;
// ok = inside the level and not padding-masked.
__device__ __forceinline__ void key_position(int j, int start, int end, int width,
                                             const bool* __restrict__ mask, float& x, float& y,
                                             bool& ok) {
  const int cell = j - start;
  x = static_cast<float>(cell % width);
  y = static_cast<float>(cell / width);
  ok = j < end && (mask == nullptr || !mask[j]);
}

// key_position of the keys k0 .. k0 + BN - 1 of a tile, into shared memory.
template <int BN, int THREADS>
__device__ __forceinline__ void tile_key_positions(int k0, int start, int end, int width,
                                                   const bool* __restrict__ mask, float* x,
                                                   float* y, bool* ok) {
  for (int c = threadIdx.x; c < BN; c += THREADS)
    key_position(k0 + c, start, end, width, mask, x[c], y[c], ok[c]);
}

// ------------------------------------------------------------------------------------------
// Forward

template <typename scalar_t, bool kTf32, int D, int BM, int BN>
__global__ void __launch_bounds__(tile_threads(BM), 1) forward_kernel(
    const scalar_t* __restrict__ q,            // (B*H, Nq, D)
    const scalar_t* __restrict__ k,            // (B*H, L, D)
    const scalar_t* __restrict__ v,            // (B*H, L, D)
    const float* __restrict__ centers,         // (B*H, Nq, S, 2)
    const float* __restrict__ precision,       // (B*H, Nq, S, 2)
    const bool* __restrict__ key_padding_mask, // (B, L), nullptr when absent
    float* __restrict__ m_part,                // (splits, B*H*Nq, S) max score of the split
    float* __restrict__ l_part,                // (splits, B*H*Nq, S) sum_j exp(S_ij - m)
    float* __restrict__ acc_part,              // (splits, B*H*Nq, S, D) sum_j exp(S_ij - m) z_ij v_j
    const LevelTable levels, const int H, const int Nq, const int L, const int num_q_tiles,
    const float scale, const float dropout_p, const uint64_t seed) {
  constexpr Math kMath = math_of<scalar_t, kTf32>();
  constexpr int THREADS = tile_threads(BM), NK = BN / 8, ND = D / 8;
  constexpr int LD = D + tile_pad<scalar_t>, LP = BN + tile_pad<scalar_t>;
  extern __shared__ float smem[];
  scalar_t* q_tile = reinterpret_cast<scalar_t*>(smem);  // (BM, LD)
  scalar_t* k_tile = q_tile + BM * LD;                   // (BN, LD)
  scalar_t* v_tile = k_tile + BN * LD;                   // (BN, LD)
  scalar_t* p_tile = v_tile + BN * LD;                   // (BM, LP) dropped P of the step, rounded
  float* key_x = reinterpret_cast<float*>(p_tile + BM * LP);  // (BN) the step's key cells
  float* key_y = key_x + BN;                                  // (BN)
  bool* key_ok = reinterpret_cast<bool*>(key_y + BN);         // (BN) in the level, not padded

  const int warp = threadIdx.x / 32, group = threadIdx.x % 32 / 4, quad = threadIdx.x % 4;
  const int row = kWarpRows * warp + group;  // the lane's tile rows: row, row + 8
  const int bh = blockIdx.x / num_q_tiles, q0 = (blockIdx.x % num_q_tiles) * BM;
  const int split = blockIdx.y, num_splits = gridDim.y;
  const int S = levels.num_levels;
  const int64_t num_rows = static_cast<int64_t>(gridDim.x / num_q_tiles) * Nq;
  const int total_tiles = levels.tile_begin[S];
  const int split_begin = static_cast<int>(static_cast<int64_t>(split) * total_tiles / num_splits);
  const int split_end = static_cast<int>(static_cast<int64_t>(split + 1) * total_tiles / num_splits);
  const bool* mask = key_padding_mask ? key_padding_mask + static_cast<int64_t>(bh / H) * L : nullptr;
  const float inv_keep = 1.f / (1.f - dropout_p);
  const scalar_t* k_bh = k + static_cast<int64_t>(bh) * L * D;
  const scalar_t* v_bh = v + static_cast<int64_t>(bh) * L * D;

  load_tile<BM, D, LD, THREADS>(q_tile, q + static_cast<int64_t>(bh) * Nq * D, q0, Nq);

  for (int s = 0; s < S; ++s) {
    // Per-row state of this level (rows row + 8 h): Gaussian parameters, running max m, sum
    // l; the accumulator in fragments over the head dim.
    float cx[2], cy[2], px[2], py[2], m[2], l[2], acc[ND][4] = {};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = q0 + row + 8 * h;
      const int64_t c = i < Nq ? ((static_cast<int64_t>(bh) * Nq + i) * S + s) * 2 : -1;
      cx[h] = c >= 0 ? centers[c] : 0.f;
      cy[h] = c >= 0 ? centers[c + 1] : 0.f;
      px[h] = c >= 0 ? precision[c] : 0.f;
      py[h] = c >= 0 ? precision[c + 1] : 0.f;
      m[h] = -INFINITY;
      l[h] = 0.f;
    }
    const int level_first = levels.tile_begin[s];
    const int t_begin = max(split_begin, level_first);
    const int t_end = min(split_end, levels.tile_begin[s + 1]);
    const int start = levels.start[s], end = start + levels.size[s], width = levels.width[s];

    for (int t = t_begin; t < t_end; ++t) {
      const int k0 = start + (t - level_first) * BN;
      __syncthreads();  // the previous step is done reading k/v/p tiles
      load_tile<BN, D, LD, THREADS>(k_tile, k_bh, k0, end);
      load_tile<BN, D, LD, THREADS>(v_tile, v_bh, k0, end);
      tile_key_positions<BN, THREADS>(k0, start, end, width, mask, key_x, key_y, key_ok);
      __syncthreads();

      float sc[NK][4] = {};  // <q_i, k_j>, then S_ij
      warp_product<kMath, D, NK, true>(sc, q_tile + kWarpRows * warp * LD, LD, k_tile, LD);

      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < NK; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int h = c / 2, col = 8 * j + 2 * quad + c % 2;
          sc[j][c] = key_ok[col] ? score(sc[j][c], scale, key_x[col] - cx[h], key_y[col] - cy[h],
                                         px[h], py[h])
                                 : -INFINITY;
          tile_max[h] = fmaxf(tile_max[h], sc[j][c]);
        }
      float m_ref[2], correction[2], sum[2] = {0.f, 0.f};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m_new = fmaxf(m[h], quad_max(tile_max[h]));
        // While every key so far is masked, m_new is -inf: subtract 0 instead to avoid inf - inf.
        m_ref[h] = m_new == -INFINITY ? 0.f : m_new;
        correction[h] = __expf(m[h] - m_ref[h]);
        m[h] = m_new;
      }
#pragma unroll
      for (int j = 0; j < NK; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int h = c / 2, col = 8 * j + 2 * quad + c % 2;
          float p = __expf(sc[j][c] - m_ref[h]);  // 0 for masked keys
          sum[h] += p;                            // softmax statistics use the undropped P
          if (dropout_p > 0.f && p > 0.f) {
            const int64_t offset = (static_cast<int64_t>(bh) * Nq + q0 + row + 8 * h) * L + (k0 + col);
            p *= dropout_factor(seed, offset, dropout_p, inv_keep);
          }
          p_tile[(row + 8 * h) * LP + col] = static_cast<scalar_t>(p);
        }
#pragma unroll
      for (int h = 0; h < 2; ++h) l[h] = l[h] * correction[h] + quad_sum(sum[h]);
#pragma unroll
      for (int j = 0; j < ND; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[j][c] *= correction[c / 2];
      __syncthreads();

      // acc += P V over the step's keys (rows of v_tile past the level are zeros, P is 0 there).
      warp_product<kMath, BN, ND, false>(acc, p_tile + kWarpRows * warp * LP, LP, v_tile, LD);
    }

    // This split's partial result for level s (m = -inf, l = 0, acc = 0 when it has no key
    // of the level or all of them are masked).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = q0 + row + 8 * h;
      if (i >= Nq) continue;
      const int64_t part = (split * num_rows + static_cast<int64_t>(bh) * Nq + i) * S + s;
      if (quad == 0) {
        m_part[part] = m[h];
        l_part[part] = l[h];
      }
#pragma unroll
      for (int j = 0; j < ND; ++j) {
        acc_part[part * D + 8 * j + 2 * quad] = acc[j][2 * h];
        acc_part[part * D + 8 * j + 2 * quad + 1] = acc[j][2 * h + 1];
      }
    }
  }
}

// One thread per (row, d): merges the splits of every level, then mixes the levels.
template <typename scalar_t>
__global__ void forward_combine_kernel(
    const float* __restrict__ m_part,    // (splits, num_rows, S)
    const float* __restrict__ l_part,    // (splits, num_rows, S)
    const float* __restrict__ acc_part,  // (splits, num_rows, S, D)
    const float* __restrict__ alpha,     // (num_rows, S), nullptr when absent (then S == 1)
    const bool* __restrict__ live,       // (B, S) the level has an unpadded key; nullptr: all do
    scalar_t* __restrict__ out,          // (num_rows, D)
    scalar_t* __restrict__ out_levels,   // (num_rows, S, D), nullptr when alpha is absent
    float* __restrict__ lse,             // (num_rows, S)
    const int64_t num_rows, const int64_t rows_per_batch, const int S, const int D,
    const int num_splits) {
  const int64_t split_stride = num_rows * S;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < num_rows * D; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / D;
    const int d = static_cast<int>(idx % D);
    float mixed = 0.f;
    for (int s = 0; s < S; ++s) {
      const int64_t rs = row * S + s;
      float m_max = -INFINITY;
      for (int sp = 0; sp < num_splits; ++sp) m_max = fmaxf(m_max, m_part[sp * split_stride + rs]);
      // While every score is -inf (masked), subtract 0 instead to avoid inf - inf.
      const float m_ref = m_max == -INFINITY ? 0.f : m_max;
      float l = 0.f, acc = 0.f;
      for (int sp = 0; sp < num_splits; ++sp) {
        const int64_t part = sp * split_stride + rs;
        const float w = __expf(m_part[part] - m_ref);  // 0 for a split with m = -inf (times its NaN)
        l += w * l_part[part];
        acc += w * acc_part[part * D + d];
      }
      // A level with no unpadded key: lse = +inf and out_s = acc = sum_j 0 * v_j, as the
      // reference's product with zero weights (0, or NaN where a v_j is not finite). Otherwise
      // acc / l, NaN where l is 0 (every score -inf) or NaN (a NaN score), as softmax gives.
      const bool level_live = live == nullptr || live[(row / rows_per_batch) * S + s];
      const float out_s = level_live ? acc / l : acc;
      if (d == 0) lse[rs] = level_live ? m_max + logf(l) : INFINITY;
      if (out_levels != nullptr) out_levels[rs * D + d] = static_cast<scalar_t>(out_s);
      mixed += (alpha != nullptr ? alpha[rs] : 1.f) * out_s;
    }
    out[idx] = static_cast<scalar_t>(mixed);
  }
}

// ------------------------------------------------------------------------------------------
// Backward

// One warp per (row, level): dalpha = <grad_out, out_s>, Delta = alpha_s * dalpha.
template <typename scalar_t>
__global__ void backward_preprocess_kernel(
    const scalar_t* __restrict__ grad_out,    // (num_rows, D)
    const scalar_t* __restrict__ out_levels,  // (num_rows, S, D)
    const float* __restrict__ alpha,          // (num_rows, S), nullptr when absent
    float* __restrict__ delta,                // (num_rows, S)
    float* __restrict__ grad_alpha,           // (num_rows, S), nullptr when alpha is absent
    const int64_t num_rows, const int S, const int D) {
  const int lane = threadIdx.x % 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t w = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
       w < num_rows * S; w += num_warps) {
    const int64_t row = w / S;
    float dot = 0.f;
    for (int d = lane; d < D; d += 32)
      dot += static_cast<float>(grad_out[row * D + d]) * static_cast<float>(out_levels[w * D + d]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    if (lane == 0) {
      if (grad_alpha != nullptr) grad_alpha[w] = dot;
      delta[w] = alpha != nullptr ? alpha[w] * dot : dot;
    }
  }
}

// dq and the row sums of dS * (dx, dx^2, dy, dy^2) over one split of the keys.
template <typename scalar_t, bool kTf32, int D, int BM, int BN>
__global__ void __launch_bounds__(tile_threads(BM), 1) backward_dq_kernel(
    const scalar_t* __restrict__ q,            // (B*H, Nq, D)
    const scalar_t* __restrict__ k,            // (B*H, L, D)
    const scalar_t* __restrict__ v,            // (B*H, L, D)
    const scalar_t* __restrict__ grad_out,     // (B*H, Nq, D)
    const float* __restrict__ centers,         // (B*H, Nq, S, 2)
    const float* __restrict__ precision,       // (B*H, Nq, S, 2)
    const float* __restrict__ alpha,           // (B*H, Nq, S), nullptr when absent
    const float* __restrict__ lse,             // (B*H, Nq, S)
    const float* __restrict__ delta,           // (B*H, Nq, S)
    const bool* __restrict__ key_padding_mask, // (B, L), nullptr when absent
    float* __restrict__ dq_part,               // (splits, B*H*Nq, D) scale * sum_j dS_ij k_j
    float* __restrict__ rowsum_part,           // (splits, B*H*Nq, S, kMoments)
    const LevelTable levels, const int H, const int Nq, const int L, const int num_q_tiles,
    const float scale, const float dropout_p, const uint64_t seed) {
  constexpr Math kMath = math_of<scalar_t, kTf32>();
  constexpr int THREADS = tile_threads(BM), NK = BN / 8, ND = D / 8;
  constexpr int LD = D + tile_pad<scalar_t>, LP = BN + tile_pad<scalar_t>;
  extern __shared__ float smem[];
  scalar_t* q_tile = reinterpret_cast<scalar_t*>(smem);  // (BM, LD)
  scalar_t* do_tile = q_tile + BM * LD;  // (BM, LD) grad_out (alpha is applied per row below)
  scalar_t* k_tile = do_tile + BM * LD;  // (BN, LD)
  scalar_t* v_tile = k_tile + BN * LD;   // (BN, LD)
  scalar_t* ds_tile = v_tile + BN * LD;  // (BM, LP) dS of the step, rounded
  float* key_x = reinterpret_cast<float*>(ds_tile + BM * LP);  // (BN) the step's key cells
  float* key_y = key_x + BN;                                   // (BN)
  bool* key_ok = reinterpret_cast<bool*>(key_y + BN);          // (BN) in the level, not padded

  const int warp = threadIdx.x / 32, group = threadIdx.x % 32 / 4, quad = threadIdx.x % 4;
  const int row = kWarpRows * warp + group;  // the lane's tile rows: row, row + 8
  const int bh = blockIdx.x / num_q_tiles, q0 = (blockIdx.x % num_q_tiles) * BM;
  const int split = blockIdx.y, num_splits = gridDim.y;
  const int S = levels.num_levels;
  const int64_t num_rows = static_cast<int64_t>(gridDim.x / num_q_tiles) * Nq;
  const int total_tiles = levels.tile_begin[S];
  const int split_begin = static_cast<int>(static_cast<int64_t>(split) * total_tiles / num_splits);
  const int split_end = static_cast<int>(static_cast<int64_t>(split + 1) * total_tiles / num_splits);
  const bool* mask = key_padding_mask ? key_padding_mask + static_cast<int64_t>(bh / H) * L : nullptr;
  const float inv_keep = 1.f / (1.f - dropout_p);
  const scalar_t* k_bh = k + static_cast<int64_t>(bh) * L * D;
  const scalar_t* v_bh = v + static_cast<int64_t>(bh) * L * D;

  load_tile<BM, D, LD, THREADS>(q_tile, q + static_cast<int64_t>(bh) * Nq * D, q0, Nq);
  load_tile<BM, D, LD, THREADS>(do_tile, grad_out + static_cast<int64_t>(bh) * Nq * D, q0, Nq);

  float dq[ND][4] = {};
  for (int s = 0; s < S; ++s) {
    float cx[2], cy[2], px[2], py[2], alpha_s[2], lse_s[2], delta_s[2], sums[2][kMoments];
    bool row_ok[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = q0 + row + 8 * h;
      row_ok[h] = i < Nq;
      const int64_t rs = row_ok[h] ? (static_cast<int64_t>(bh) * Nq + i) * S + s : 0;
      cx[h] = row_ok[h] ? centers[2 * rs] : 0.f;
      cy[h] = row_ok[h] ? centers[2 * rs + 1] : 0.f;
      px[h] = row_ok[h] ? precision[2 * rs] : 0.f;
      py[h] = row_ok[h] ? precision[2 * rs + 1] : 0.f;
      alpha_s[h] = row_ok[h] && alpha != nullptr ? alpha[rs] : 1.f;
      lse_s[h] = row_ok[h] ? lse[rs] : INFINITY;
      delta_s[h] = row_ok[h] ? delta[rs] : 0.f;
#pragma unroll
      for (int c = 0; c < kMoments; ++c) sums[h][c] = 0.f;
    }
    const int level_first = levels.tile_begin[s];
    const int t_begin = max(split_begin, level_first);
    const int t_end = min(split_end, levels.tile_begin[s + 1]);
    const int start = levels.start[s], end = start + levels.size[s], width = levels.width[s];

    for (int t = t_begin; t < t_end; ++t) {
      const int k0 = start + (t - level_first) * BN;
      __syncthreads();  // the previous step is done reading k/v/ds tiles
      load_tile<BN, D, LD, THREADS>(k_tile, k_bh, k0, end);
      load_tile<BN, D, LD, THREADS>(v_tile, v_bh, k0, end);
      tile_key_positions<BN, THREADS>(k0, start, end, width, mask, key_x, key_y, key_ok);
      __syncthreads();

      float qk[NK][4] = {}, gv[NK][4] = {};  // <q_i, k_j>, <grad_out_i, v_j>
      warp_product<kMath, D, NK, true>(qk, q_tile + kWarpRows * warp * LD, LD, k_tile, LD);
      warp_product<kMath, D, NK, true>(gv, do_tile + kWarpRows * warp * LD, LD, v_tile, LD);

#pragma unroll
      for (int j = 0; j < NK; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int h = c / 2, col = 8 * j + 2 * quad + c % 2;
          float ds = 0.f;
          if (row_ok[h] && key_ok[col]) {
            const float dx = key_x[col] - cx[h], dy = key_y[col] - cy[h];
            const float p = __expf(score(qk[j][c], scale, dx, dy, px[h], py[h]) - lse_s[h]);
            float dp = alpha_s[h] * gv[j][c];
            if (dropout_p > 0.f) {
              const int64_t offset = (static_cast<int64_t>(bh) * Nq + q0 + row + 8 * h) * L + (k0 + col);
              dp *= dropout_factor(seed, offset, dropout_p, inv_keep);
            }
            ds = p * (dp - delta_s[h]);
            sums[h][0] += ds * dx;
            sums[h][1] += ds * dx * dx;
            sums[h][2] += ds * dy;
            sums[h][3] += ds * dy * dy;
            sums[h][4] += ds;
            sums[h][5] += p * dx;
            sums[h][6] += p * dx * dx;
            sums[h][7] += p * dy;
            sums[h][8] += p * dy * dy;
          }
          ds_tile[(row + 8 * h) * LP + col] = static_cast<scalar_t>(ds);
        }
      __syncthreads();

      // dq += dS K over the step's keys.
      warp_product<kMath, BN, ND, false>(dq, ds_tile + kWarpRows * warp * LP, LP, k_tile, LD);
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float total[kMoments];
#pragma unroll
      for (int c = 0; c < kMoments; ++c) total[c] = quad_sum(sums[h][c]);
      if (row_ok[h] && quad == 0) {
        const int64_t part = (split * num_rows + static_cast<int64_t>(bh) * Nq + q0 + row + 8 * h) * S + s;
#pragma unroll
        for (int c = 0; c < kMoments; ++c) rowsum_part[part * kMoments + c] = total[c];
      }
    }
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = q0 + row + 8 * h;
    if (i >= Nq) continue;
    const int64_t part = split * num_rows + static_cast<int64_t>(bh) * Nq + i;
#pragma unroll
    for (int j = 0; j < ND; ++j) {
      dq_part[part * D + 8 * j + 2 * quad] = scale * dq[j][2 * h];
      dq_part[part * D + 8 * j + 2 * quad + 1] = scale * dq[j][2 * h + 1];
    }
  }
}

// One thread per (row, d): sums dq over the splits; the thread with d == 0 also forms the
// centre and precision gradients of the row:
//   dcx = 2 px^2 sum_j dS_ij dx_ij,  dpx = -2 px sum_j dS_ij dx_ij^2  (the same for y).
// A row of dS sums to zero, but Delta comes from the rounded output, so the computed row sums
// to e = sum_j dS_ij and carries an extra e P_ij, which dx^2 (the map size squared, more for a
// centre outside it) would amplify; as in the CPU kernel it is taken out:
//   sum_j dS_ij w_j -> sum_j dS_ij w_j - e sum_j P_ij w_j.
template <typename scalar_t>
__global__ void backward_dq_reduce_kernel(
    const float* __restrict__ dq_part,      // (splits, num_rows, D)
    const float* __restrict__ rowsum_part,  // (splits, num_rows, S, kMoments)
    const float* __restrict__ precision,    // (num_rows, S, 2)
    scalar_t* __restrict__ grad_q,          // (num_rows, D)
    float* __restrict__ grad_centers,       // (num_rows, S, 2)
    float* __restrict__ grad_precision,     // (num_rows, S, 2)
    const int64_t num_rows, const int S, const int D, const int num_splits) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < num_rows * D; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float total = 0.f;
    for (int sp = 0; sp < num_splits; ++sp) total += dq_part[sp * num_rows * D + idx];
    grad_q[idx] = static_cast<scalar_t>(total);
    if (idx % D != 0) continue;
    const int64_t row = idx / D;
    for (int s = 0; s < S; ++s) {
      const int64_t rs = row * S + s;
      float m[kMoments] = {};
      for (int sp = 0; sp < num_splits; ++sp) {
        const float* part = rowsum_part + (sp * num_rows * S + rs) * kMoments;
        for (int c = 0; c < kMoments; ++c) m[c] += part[c];
      }
      const float e = m[4];
      const float px = precision[2 * rs], py = precision[2 * rs + 1];
      grad_centers[2 * rs] = 2.f * px * px * (m[0] - e * m[5]);
      grad_centers[2 * rs + 1] = 2.f * py * py * (m[2] - e * m[7]);
      grad_precision[2 * rs] = -2.f * px * (m[1] - e * m[6]);
      grad_precision[2 * rs + 1] = -2.f * py * (m[3] - e * m[8]);
    }
  }
}

// dk, dv of one tile of BN keys (inside one level), summed over every query tile.
// Here the tile rows are keys (a warp per 16) and the columns queries: the products are
// S^T = K Q^T, dP^T = V g^T, then dv += P^T g and dk += dS^T Q.
template <typename scalar_t, bool kTf32, int D, int BN, int BM>
__global__ void __launch_bounds__(tile_threads(BN), 1) backward_dkdv_kernel(
    const scalar_t* __restrict__ q,            // (B*H, Nq, D)
    const scalar_t* __restrict__ k,            // (B*H, L, D)
    const scalar_t* __restrict__ v,            // (B*H, L, D)
    const scalar_t* __restrict__ grad_out,     // (B*H, Nq, D)
    const float* __restrict__ centers,         // (B*H, Nq, S, 2)
    const float* __restrict__ precision,       // (B*H, Nq, S, 2)
    const float* __restrict__ alpha,           // (B*H, Nq, S), nullptr when absent
    const float* __restrict__ lse,             // (B*H, Nq, S)
    const float* __restrict__ delta,           // (B*H, Nq, S)
    const bool* __restrict__ key_padding_mask, // (B, L), nullptr when absent
    scalar_t* __restrict__ grad_k,             // (B*H, L, D)
    scalar_t* __restrict__ grad_v,             // (B*H, L, D)
    const LevelTable levels, const int H, const int Nq, const int L, const int num_k_tiles,
    const float scale, const float dropout_p, const uint64_t seed) {
  constexpr Math kMath = math_of<scalar_t, kTf32>();
  constexpr int THREADS = tile_threads(BN), NQ = BM / 8, ND = D / 8;
  constexpr int LD = D + tile_pad<scalar_t>, LP = BM + tile_pad<scalar_t>;
  extern __shared__ float smem[];
  scalar_t* k_tile = reinterpret_cast<scalar_t*>(smem);  // (BN, LD)
  scalar_t* v_tile = k_tile + BN * LD;    // (BN, LD)
  scalar_t* q_tile = v_tile + BN * LD;    // (BM, LD)
  scalar_t* g_tile = q_tile + BM * LD;    // (BM, LD) g_s = alpha_s * grad_out, rounded
  scalar_t* p_tile = g_tile + BM * LD;    // (BN, LP) dropped P^T, rounded
  scalar_t* ds_tile = p_tile + BN * LP;   // (BN, LP) dS^T, rounded
  float* q_cx = reinterpret_cast<float*>(ds_tile + BN * LP);  // (BM) per-query parameters
  float* q_cy = q_cx + BM;
  float* q_px = q_cy + BM;
  float* q_py = q_px + BM;
  float* q_lse = q_py + BM;
  float* q_delta = q_lse + BM;

  const int warp = threadIdx.x / 32, group = threadIdx.x % 32 / 4, quad = threadIdx.x % 4;
  const int row = kWarpRows * warp + group;  // the lane's key rows: row, row + 8
  const int bh = blockIdx.x / num_k_tiles, tile = blockIdx.x % num_k_tiles;
  const int S = levels.num_levels;
  int s = 0;
  while (tile >= levels.tile_begin[s + 1]) ++s;
  const int start = levels.start[s], end = start + levels.size[s], width = levels.width[s];
  const int k0 = start + (tile - levels.tile_begin[s]) * BN;
  const bool* mask = key_padding_mask ? key_padding_mask + static_cast<int64_t>(bh / H) * L : nullptr;
  const float inv_keep = 1.f / (1.f - dropout_p);
  const int64_t row0 = static_cast<int64_t>(bh) * Nq;  // first (b, h) row of (B*H*Nq, ...)

  load_tile<BN, D, LD, THREADS>(k_tile, k + static_cast<int64_t>(bh) * L * D, k0, end);
  load_tile<BN, D, LD, THREADS>(v_tile, v + static_cast<int64_t>(bh) * L * D, k0, end);

  float kx[2], ky[2];
  bool key_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    key_position(k0 + row + 8 * h, start, end, width, mask, kx[h], ky[h], key_ok[h]);

  float dk[ND][4] = {}, dv[ND][4] = {};
  for (int q0 = 0; q0 < Nq; q0 += BM) {
    __syncthreads();  // the previous step is done reading q/g/p/ds tiles (and k/v are loaded)
    load_tile<BM, D, LD, THREADS>(q_tile, q + row0 * D, q0, Nq);
    load_tile<BM, D, LD, THREADS>(g_tile, grad_out + row0 * D, q0, Nq,
                                  alpha != nullptr ? alpha + row0 * S + s : nullptr, S);
    for (int r = threadIdx.x; r < BM; r += THREADS) {
      const int i = q0 + r;
      const int64_t rs = (row0 + i) * S + s;
      const bool ok = i < Nq;
      q_cx[r] = ok ? centers[2 * rs] : 0.f;
      q_cy[r] = ok ? centers[2 * rs + 1] : 0.f;
      q_px[r] = ok ? precision[2 * rs] : 0.f;
      q_py[r] = ok ? precision[2 * rs + 1] : 0.f;
      q_lse[r] = ok ? lse[rs] : INFINITY;
      q_delta[r] = ok ? delta[rs] : 0.f;
    }
    __syncthreads();

    float kq[NQ][4] = {}, vg[NQ][4] = {};  // <k_j, q_i>, <v_j, g_i>
    warp_product<kMath, D, NQ, true>(kq, k_tile + kWarpRows * warp * LD, LD, q_tile, LD);
    warp_product<kMath, D, NQ, true>(vg, v_tile + kWarpRows * warp * LD, LD, g_tile, LD);

#pragma unroll
    for (int j = 0; j < NQ; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int h = c / 2, ii = 8 * j + 2 * quad + c % 2, i = q0 + ii;
        float p = 0.f, ds = 0.f;
        if (i < Nq && k0 + row + 8 * h < end) {
          // A padded key has score -inf: P = 0, but NaN in a row whose lse is not finite, as
          // the reference gives; and dS = 0, as its masked_fill passes back, whatever dP.
          p = __expf((key_ok[h] ? score(kq[j][c], scale, kx[h] - q_cx[ii], ky[h] - q_cy[ii],
                                        q_px[ii], q_py[ii])
                                : -INFINITY) - q_lse[ii]);
          float dp = vg[j][c];
          if (dropout_p > 0.f) {
            const int64_t offset = (row0 + i) * L + (k0 + row + 8 * h);
            const float z = dropout_factor(seed, offset, dropout_p, inv_keep);
            dp *= z;
            ds = key_ok[h] ? p * (dp - q_delta[ii]) : 0.f;
            p *= z;
          } else {
            ds = key_ok[h] ? p * (dp - q_delta[ii]) : 0.f;
          }
        }
        p_tile[(row + 8 * h) * LP + ii] = static_cast<scalar_t>(p);
        ds_tile[(row + 8 * h) * LP + ii] = static_cast<scalar_t>(ds);
      }
    __syncthreads();

    // dv += P^T g, dk += dS^T q over the step's queries.
    warp_product<kMath, BM, ND, false>(dv, p_tile + kWarpRows * warp * LP, LP, g_tile, LD);
    warp_product<kMath, BM, ND, false>(dk, ds_tile + kWarpRows * warp * LP, LP, q_tile, LD);
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int j = k0 + row + 8 * h;
    if (j >= end) continue;  // belongs to the next level's tile (or is past L)
    const int64_t base = (static_cast<int64_t>(bh) * L + j) * D;
#pragma unroll
    for (int e = 0; e < ND; ++e)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int d = 8 * e + 2 * quad + c;
        grad_k[base + d] = static_cast<scalar_t>(scale * dk[e][2 * h + c]);
        grad_v[base + d] = static_cast<scalar_t>(dv[e][2 * h + c]);
      }
  }
}

// ------------------------------------------------------------------------------------------
// Host side

// Contiguous inputs and sizes of one call.
struct Problem {
  at::Tensor q, k, v, centers, precision;  // contiguous
  at::Tensor alpha, mask;                  // contiguous, undefined when absent
  c10::IntArrayRef spatial_shapes;         // the caller's list, valid during the call
  int64_t B, H, Nq, L, S, D;
  float scale, dropout_p;
  uint64_t seed;

  int64_t num_rows() const { return B * H * Nq; }
  const float* alpha_ptr() const { return alpha.defined() ? alpha.data_ptr<float>() : nullptr; }
  const bool* mask_ptr() const { return mask.defined() ? mask.data_ptr<bool>() : nullptr; }
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& centers, const at::Tensor& precision,
                     const std::optional<at::Tensor>& alpha, c10::IntArrayRef spatial_shapes,
                     const std::optional<at::Tensor>& key_padding_mask, double scale,
                     double dropout_p, const std::optional<at::Tensor>& seed) {
  const int64_t S = check_coattention_args(q, k, v, centers, precision, alpha, spatial_shapes,
                                           key_padding_mask, dropout_p);
  TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor, got device ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "q: the CUDA kernel supports float32, float16 and bfloat16, got ", q.dtype(),
              " (use the reference or the CPU kernel for float64)");
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 16 || D == 32 || D == 64 || D == 128,
              "q: the CUDA kernel supports head dims 16, 32, 64 and 128, got ", D);
  TORCH_CHECK(S <= kMaxLevels, "spatial_shapes: the CUDA kernel supports at most ", kMaxLevels,
              " levels, got ", S);
  TORCH_CHECK(k.size(2) <= INT_MAX / 2 && q.size(2) <= INT_MAX / 2 && q.size(1) <= INT_MAX,
              "q, k: too many queries or keys for the CUDA kernel: Nq = ", q.size(2),
              ", L = ", k.size(2));
  Problem p;
  p.q = q.contiguous();
  p.k = k.contiguous();
  p.v = v.contiguous();
  p.centers = centers.contiguous();
  p.precision = precision.contiguous();
  if (alpha.has_value()) p.alpha = alpha->contiguous();
  if (key_padding_mask.has_value()) p.mask = key_padding_mask->contiguous();
  p.spatial_shapes = spatial_shapes;
  p.B = q.size(0);
  p.H = q.size(1);
  p.Nq = q.size(2);
  p.L = k.size(2);
  p.S = S;
  p.D = D;
  p.scale = static_cast<float>(scale);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = dropout_seed(seed, dropout_p);
  return p;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// (B, S) bool: level s of batch element b has an unpadded key; undefined without a mask.
at::Tensor live_levels(const Problem& p) {
  if (!p.mask.defined()) return at::Tensor();
  std::vector<at::Tensor> levels;
  int64_t start = 0;
  for (int64_t s = 0; s < p.S; ++s) {
    const int64_t size = p.spatial_shapes[2 * s] * p.spatial_shapes[2 * s + 1];
    levels.push_back(p.mask.narrow(1, start, size).logical_not().any(1));
    start += size;
  }
  return at::stack(levels, 1).contiguous();
}

// Splits of the key axis: enough blocks for about two per SM, at least two key tiles a split.
int key_splits(int64_t blocks, int num_tiles) {
  const int64_t target = 2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (blocks >= target) return 1;
  const int64_t splits = std::min<int64_t>({ceil_div(target, blocks), num_tiles / 2, kMaxSplits});
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

// Blocks of a grid-stride elementwise kernel over n items.
unsigned elementwise_blocks(int64_t n) {
  const int64_t cap = 32 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(n, kElementwiseThreads), cap)));
}

// Lets `kernel` use `bytes` of dynamic shared memory (above 48 KB needs an opt-in).
template <typename Kernel>
void set_shared_memory(Kernel kernel, size_t bytes) {
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= limit, "smca CUDA kernel: needs ", bytes,
              " bytes of shared memory per block, this GPU allows ", limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

void check_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= INT_MAX, "smca CUDA kernel: problem too large (", blocks, " blocks)");
}

// Whether float32 products may use TF32 tensor cores: torch's matmul precision for CUDA
// (torch.backends.cuda.matmul.fp32_precision == "tf32"), read at every call.
bool tf32_allowed() {
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
}

// Calls fn(std::bool_constant<kTf32>): true only for float32 when TF32 is allowed.
template <typename scalar_t, typename Fn>
void with_tf32(Fn&& fn) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (tf32_allowed()) return fn(std::true_type());
  }
  fn(std::false_type());
}

template <typename scalar_t, bool kTf32, int D>
void run_forward(const Problem& p, at::Tensor& out, at::Tensor& out_levels, at::Tensor& lse) {
  constexpr int BM = Tiles<D>::kForwardM, BN = Tiles<D>::kForwardN;
  const LevelTable levels = make_level_table(p.spatial_shapes, BN);
  const int64_t num_rows = p.num_rows();
  const int64_t q_tiles = ceil_div(p.Nq, BM);
  check_grid(p.B * p.H * q_tiles);
  const int splits = key_splits(p.B * p.H * q_tiles, levels.tile_begin[p.S]);
  const auto f32 = p.q.options().dtype(at::kFloat);
  at::Tensor m_part = at::empty({splits, num_rows, p.S}, f32);
  at::Tensor l_part = at::empty({splits, num_rows, p.S}, f32);
  at::Tensor acc_part = at::empty({splits, num_rows, p.S, p.D}, f32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  constexpr int LD = D + tile_pad<scalar_t>, LP = BN + tile_pad<scalar_t>;
  auto kernel = forward_kernel<scalar_t, kTf32, D, BM, BN>;
  constexpr size_t smem = sizeof(scalar_t) * ((BM + 2 * BN) * LD + BM * LP) + kKeyBytes * BN;
  static_assert(smem <= kMaxSharedBytes, "forward_kernel: too much shared memory");
  set_shared_memory(kernel, smem);
  kernel<<<dim3(static_cast<unsigned>(p.B * p.H * q_tiles), splits), tile_threads(BM), smem,
           stream>>>(
      p.q.data_ptr<scalar_t>(), p.k.data_ptr<scalar_t>(), p.v.data_ptr<scalar_t>(),
      p.centers.data_ptr<float>(), p.precision.data_ptr<float>(), p.mask_ptr(),
      m_part.data_ptr<float>(), l_part.data_ptr<float>(), acc_part.data_ptr<float>(), levels,
      static_cast<int>(p.H), static_cast<int>(p.Nq), static_cast<int>(p.L),
      static_cast<int>(q_tiles), p.scale, p.dropout_p, p.seed);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor live = live_levels(p);
  forward_combine_kernel<scalar_t>
      <<<elementwise_blocks(num_rows * D), kElementwiseThreads, 0, stream>>>(
          m_part.data_ptr<float>(), l_part.data_ptr<float>(), acc_part.data_ptr<float>(),
          p.alpha_ptr(), live.defined() ? live.data_ptr<bool>() : nullptr,
          out.data_ptr<scalar_t>(),
          p.alpha.defined() ? out_levels.data_ptr<scalar_t>() : nullptr, lse.data_ptr<float>(),
          num_rows, p.H * p.Nq, static_cast<int>(p.S), D, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct Grads {
  at::Tensor q, k, v, centers, precision, alpha;
};

template <typename scalar_t, bool kTf32, int D>
void run_backward(const Problem& p, const at::Tensor& grad_out, const at::Tensor& out_levels,
                  const at::Tensor& lse, Grads& g) {
  const int64_t num_rows = p.num_rows();
  const auto f32 = p.q.options().dtype(at::kFloat);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int H = static_cast<int>(p.H), Nq = static_cast<int>(p.Nq), L = static_cast<int>(p.L);

  at::Tensor delta = at::empty({num_rows, p.S}, f32);
  backward_preprocess_kernel<scalar_t>
      <<<elementwise_blocks(num_rows * p.S * 32), kElementwiseThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), out_levels.data_ptr<scalar_t>(), p.alpha_ptr(),
          delta.data_ptr<float>(), p.alpha.defined() ? g.alpha.data_ptr<float>() : nullptr,
          num_rows, static_cast<int>(p.S), D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  {  // dq, dcenters, dprecision
    constexpr int BM = Tiles<D>::kDqM, BN = Tiles<D>::kDqN;
    const LevelTable levels = make_level_table(p.spatial_shapes, BN);
    const int64_t q_tiles = ceil_div(p.Nq, BM);
    check_grid(p.B * p.H * q_tiles);
    const int splits = key_splits(p.B * p.H * q_tiles, levels.tile_begin[p.S]);
    at::Tensor dq_part = at::empty({splits, num_rows, p.D}, f32);
    at::Tensor rowsum_part = at::empty({splits, num_rows, p.S, kMoments}, f32);
    constexpr int LD = D + tile_pad<scalar_t>, LP = BN + tile_pad<scalar_t>;
    auto kernel = backward_dq_kernel<scalar_t, kTf32, D, BM, BN>;
    constexpr size_t smem = sizeof(scalar_t) * (2 * (BM + BN) * LD + BM * LP) + kKeyBytes * BN;
    static_assert(smem <= kMaxSharedBytes, "backward_dq_kernel: too much shared memory");
    set_shared_memory(kernel, smem);
    kernel<<<dim3(static_cast<unsigned>(p.B * p.H * q_tiles), splits), tile_threads(BM), smem,
             stream>>>(
        p.q.data_ptr<scalar_t>(), p.k.data_ptr<scalar_t>(), p.v.data_ptr<scalar_t>(),
        grad_out.data_ptr<scalar_t>(), p.centers.data_ptr<float>(), p.precision.data_ptr<float>(),
        p.alpha_ptr(), lse.data_ptr<float>(), delta.data_ptr<float>(), p.mask_ptr(),
        dq_part.data_ptr<float>(), rowsum_part.data_ptr<float>(), levels, H, Nq, L,
        static_cast<int>(q_tiles), p.scale, p.dropout_p, p.seed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_dq_reduce_kernel<scalar_t>
        <<<elementwise_blocks(num_rows * D), kElementwiseThreads, 0, stream>>>(
            dq_part.data_ptr<float>(), rowsum_part.data_ptr<float>(),
            p.precision.data_ptr<float>(), g.q.data_ptr<scalar_t>(),
            g.centers.data_ptr<float>(), g.precision.data_ptr<float>(), num_rows,
            static_cast<int>(p.S), D, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  {  // dk, dv
    constexpr int BN = Tiles<D>::kDkvN, BM = Tiles<D>::kDkvM;
    const LevelTable levels = make_level_table(p.spatial_shapes, BN);
    const int k_tiles = levels.tile_begin[p.S];
    check_grid(p.B * p.H * k_tiles);
    constexpr int LD = D + tile_pad<scalar_t>, LP = BM + tile_pad<scalar_t>;
    auto kernel = backward_dkdv_kernel<scalar_t, kTf32, D, BN, BM>;
    constexpr size_t smem =
        sizeof(scalar_t) * (2 * (BN + BM) * LD + 2 * BN * LP) + sizeof(float) * 6 * BM;
    static_assert(smem <= kMaxSharedBytes, "backward_dkdv_kernel: too much shared memory");
    set_shared_memory(kernel, smem);
    kernel<<<static_cast<unsigned>(p.B * p.H * k_tiles), tile_threads(BN), smem, stream>>>(
        p.q.data_ptr<scalar_t>(), p.k.data_ptr<scalar_t>(), p.v.data_ptr<scalar_t>(),
        grad_out.data_ptr<scalar_t>(), p.centers.data_ptr<float>(), p.precision.data_ptr<float>(),
        p.alpha_ptr(), lse.data_ptr<float>(), delta.data_ptr<float>(), p.mask_ptr(),
        g.k.data_ptr<scalar_t>(), g.v.data_ptr<scalar_t>(), levels, H, Nq, L, k_tiles, p.scale,
        p.dropout_p, p.seed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Calls fn(std::integral_constant<int, D>) for the supported head dims.
template <typename Fn>
void with_head_dim(int64_t D, Fn&& fn) {
  switch (D) {
    case 16: return fn(std::integral_constant<int, 16>());
    case 32: return fn(std::integral_constant<int, 32>());
    case 64: return fn(std::integral_constant<int, 64>());
    case 128: return fn(std::integral_constant<int, 128>());
    default: TORCH_CHECK(false, "q: unsupported head dim ", D);
  }
}

#define SMCA_DISPATCH_16BIT_AND_FLOAT(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                         \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

std::tuple<at::Tensor, at::Tensor, at::Tensor> coattention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& centers,
    const at::Tensor& precision, const std::optional<at::Tensor>& alpha,
    c10::IntArrayRef spatial_shapes, const std::optional<at::Tensor>& key_padding_mask,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  const Problem p = make_problem(q, k, v, centers, precision, alpha, spatial_shapes,
                                 key_padding_mask, scale, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(p.q);
  at::Tensor out_levels = p.alpha.defined() ? at::empty({p.B, p.H, p.Nq, p.S, p.D}, p.q.options())
                                            : at::empty({0}, p.q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Nq, p.S}, p.q.options().dtype(at::kFloat));
  if (p.num_rows() == 0) return {out, out_levels, lse};
  SMCA_DISPATCH_16BIT_AND_FLOAT(p.q.scalar_type(), "smca_coattention_forward_cuda", [&] {
    with_tf32<scalar_t>([&](auto tf32) {
      with_head_dim(p.D, [&](auto head_dim) {
        run_forward<scalar_t, decltype(tf32)::value, decltype(head_dim)::value>(p, out, out_levels,
                                                                                lse);
      });
    });
  });
  return {out, out_levels, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
coattention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& centers,
                          const at::Tensor& precision, const std::optional<at::Tensor>& alpha,
                          const at::Tensor& out_levels, const at::Tensor& lse,
                          c10::IntArrayRef spatial_shapes,
                          const std::optional<at::Tensor>& key_padding_mask, double scale,
                          double dropout_p, const std::optional<at::Tensor>& seed) {
  const Problem p = make_problem(q, k, v, centers, precision, alpha, spatial_shapes,
                                 key_padding_mask, scale, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(q.device());
  check_coattention_backward_args(grad_out, q, out_levels, lse, p.S);
  const at::Tensor grad_out_c = grad_out.contiguous();
  const at::Tensor out_levels_c = out_levels.contiguous();
  const at::Tensor lse_c = lse.contiguous();

  Grads g;
  g.q = at::empty_like(p.q);
  g.k = at::empty_like(p.k);
  g.v = at::empty_like(p.v);
  g.centers = at::empty_like(p.centers);
  g.precision = at::empty_like(p.precision);
  g.alpha = p.alpha.defined() ? at::empty_like(p.alpha) : at::empty({0}, p.centers.options());
  if (p.num_rows() == 0) {  // no query: nothing flows to the keys
    g.k.zero_();
    g.v.zero_();
  } else {
    SMCA_DISPATCH_16BIT_AND_FLOAT(p.q.scalar_type(), "smca_coattention_backward_cuda", [&] {
      with_tf32<scalar_t>([&](auto tf32) {
        with_head_dim(p.D, [&](auto head_dim) {
          run_backward<scalar_t, decltype(tf32)::value, decltype(head_dim)::value>(
              p, grad_out_c, out_levels_c, lse_c, g);
        });
      });
    });
  }
  return {g.q, g.k, g.v, g.centers, g.precision, g.alpha};
}

}  // namespace

int64_t cuda_runtime_version() { return CUDART_VERSION; }

TORCH_LIBRARY_IMPL(smca, CUDA, m) {
  m.impl("_coattention_forward", &coattention_forward_cuda);
  m.impl("_coattention_backward", &coattention_backward_cuda);
}

}  // namespace smca
