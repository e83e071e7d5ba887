// CPU emulation of the CUDA constructs that csrc/cuda/coattention_cuda.cu uses, so that its
// kernels run (slowly) where there is no GPU; see cuda_emulation.py.
//
// Every CUDA thread of a block is a std::thread; __syncthreads is a std::barrier over the block
// and __shfl_xor_sync an exchange between two barriers of the warp; a thread that returns drops
// out of both barriers, as an exited CUDA thread does. Blocks run one after another. Dynamic
// shared memory is a fresh heap buffer of exactly the launch's size, filled with NaN, so that a
// read before a write shows in the results, and AddressSanitizer sees an overflow and
// ThreadSanitizer a missing barrier.
//
// The tensor-core instructions (mma.sync m16n8k16 for float16 / bfloat16, m16n8k8 for tf32) and
// cvt.rna.tf32.f32 replace the .cu's inline-PTX wrappers, which it compiles only without
// SMCA_CUDA_EMULATION. An emulated mma is warp-collective, as the real one: every lane puts its
// fragment registers into the warp's slots, lane 0 assembles A, B and C by the fragment tables
// of the PTX ISA ("Matrix fragments for mma.m16n8k16 / mma.m16n8k8"), computes D = A B + C (the
// products exactly, the sum in double, rounded once to float) and every lane takes its own D
// fragment back. emu::fragment_fault plants a wrong layout (A's rows groupID and groupID + 8
// swapped), so that a test can show that a layout error is caught.
#pragma once
#define SMCA_CUDA_EMULATION 1
#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define CUDART_VERSION 0  // the emulation, not a CUDA runtime

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <typename Kernel>
inline int cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) { return 0; }

namespace emu {

// The device properties the host code reads. SMCA_EMULATED_SMS (default 2) sets the SM count,
// which decides when the kernels split the key axis (fewer blocks than 2 per SM).
struct Props {
  int multiProcessorCount;
  size_t sharedMemPerBlockOptin;
};
inline Props* props() {
  static Props p{};
  const char* sms = std::getenv("SMCA_EMULATED_SMS");
  p.multiProcessorCount = sms ? std::atoi(sms) : 2;
  p.sharedMemPerBlockOptin = 227 * 1024;  // an H100's
  return &p;
}
inline void ignore(int) {}

inline dim3 gridDim, blockIdx, blockDim;  // one block runs at a time
inline thread_local dim3 threadIdx;
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<std::array<uint64_t, 32>> warp_slots;
inline float* dynamic_smem = nullptr;
inline unsigned widest_grid_y = 0;  // the kernels split the key axis along grid.y
inline bool fragment_fault = false;  // a wrong mma fragment layout (tests of the tests)

// A warp's fragments while it runs one mma: each lane's registers of a, b and c (then d).
struct MmaSlots {
  uint32_t a[32][4];
  uint32_t b[32][2];
  float cd[32][4];
};
inline std::vector<MmaSlots> mma_slots;

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem_bytes;

  template <typename... Args>
  void operator()(Args&&... args) {
    const unsigned n = block.x * block.y * block.z;
    const unsigned warps = (n + 31) / 32;
    gridDim = grid;
    blockDim = block;
    widest_grid_y = std::max(widest_grid_y, grid.y);
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          const size_t floats = smem_bytes / sizeof(float);
          std::unique_ptr<float[]> smem(floats ? new float[floats] : nullptr);
          std::fill(smem.get(), smem.get() + floats, NAN);
          dynamic_smem = smem.get();
          block_barrier = std::make_unique<std::barrier<>>(n);
          warp_barriers.clear();
          for (unsigned w = 0; w < warps; ++w)
            warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
          warp_slots.assign(warps, {});
          mma_slots.assign(warps, {});
          std::vector<std::thread> threads;
          threads.reserve(n);
          for (unsigned t = 0; t < n; ++t)
            threads.emplace_back([&, t] {
              threadIdx = dim3(t);
              kernel(args...);
              block_barrier->arrive_and_drop();
              warp_barriers[t / 32]->arrive_and_drop();
            });
          for (auto& thread : threads) thread.join();
        }
  }
};

// kernel<<<grid, block, smem, stream>>>(args) is rewritten as launch(kernel, grid, block, smem, stream)(args).
template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem = 0,
                         cudaStream_t = nullptr) {
  return {kernel, grid, block, smem};
}

}  // namespace emu

using emu::blockDim;
using emu::blockIdx;
using emu::gridDim;
using emu::threadIdx;

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline float __expf(float x) { return std::exp(x); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

namespace emu {

enum class MmaKind { kHalf, kBFloat16, kTf32 };

// Element `index` (0: the lower half) of a register of an mma operand of `kind`, as a float.
inline float mma_element(MmaKind kind, uint32_t reg, int index) {
  const auto bits16 = static_cast<uint16_t>(reg >> (16 * index));
  switch (kind) {
    case MmaKind::kHalf: return static_cast<float>(c10::Half(bits16, c10::Half::from_bits()));
    case MmaKind::kBFloat16:
      return static_cast<float>(c10::BFloat16(bits16, c10::BFloat16::from_bits()));
    case MmaKind::kTf32: break;
  }
  const uint32_t tf32 = reg & 0xFFFFE000u;  // the tensor core reads 19 bits: sign, 8 + 10
  float value;
  std::memcpy(&value, &tf32, sizeof(value));
  return value;
}

// d += a b for one m16n8k16 (16-bit) or m16n8k8 (tf32) tile of the warp; see the top.
template <MmaKind kind>
void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  constexpr int K = kind == MmaKind::kTf32 ? 8 : 16;
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  MmaSlots& slots = mma_slots[warp];
  std::copy(a, a + 4, slots.a[lane]);
  std::copy(b, b + 2, slots.b[lane]);
  std::copy(d, d + 4, slots.cd[lane]);
  warp_barriers[warp]->arrive_and_wait();
  if (lane == 0) {
    float A[16][K] = {}, B[K][8] = {};
    double C[16][8] = {};
    for (int l = 0; l < 32; ++l) {
      const int group = l / 4, quad = l % 4;
      for (int r = 0; r < 4; ++r) {  // a register r: row group (+ 8 for odd r)
        const int row = group + 8 * ((r % 2) ^ (fragment_fault ? 1 : 0));
        if constexpr (kind == MmaKind::kTf32) {  // one element: column quad (+ 4 for r >= 2)
          A[row][quad + 4 * (r / 2)] = mma_element(kind, slots.a[l][r], 0);
        } else {  // two: columns 2 quad + {0, 1} (+ 8 for r >= 2)
          for (int e = 0; e < 2; ++e)
            A[row][2 * quad + e + 8 * (r / 2)] = mma_element(kind, slots.a[l][r], e);
        }
      }
      for (int r = 0; r < 2; ++r) {  // b register r: column group
        if constexpr (kind == MmaKind::kTf32) {  // row quad (+ 4 for r = 1)
          B[quad + 4 * r][group] = mma_element(kind, slots.b[l][r], 0);
        } else {  // rows 2 quad + {0, 1} (+ 8 for r = 1)
          for (int e = 0; e < 2; ++e)
            B[2 * quad + e + 8 * r][group] = mma_element(kind, slots.b[l][r], e);
        }
      }
      for (int i = 0; i < 4; ++i)  // c[i]: row group (+ 8 for i >= 2), column 2 quad + i % 2
        C[group + 8 * (i / 2)][2 * quad + i % 2] = slots.cd[l][i];
    }
    for (int row = 0; row < 16; ++row)
      for (int col = 0; col < 8; ++col)
        for (int k = 0; k < K; ++k) C[row][col] += static_cast<double>(A[row][k]) * B[k][col];
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i)
        slots.cd[l][i] = static_cast<float>(C[l / 4 + 8 * (i / 2)][2 * (l % 4) + i % 2]);
  }
  warp_barriers[warp]->arrive_and_wait();
  std::copy(slots.cd[lane], slots.cd[lane] + 4, d);
}

}  // namespace emu

// The .cu's inline-PTX wrappers.
template <typename scalar_t>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>);
  emu::mma<std::is_same_v<scalar_t, c10::Half> ? emu::MmaKind::kHalf : emu::MmaKind::kBFloat16>(d, a, b);
}
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::mma<emu::MmaKind::kTf32>(d, a, b);
}
// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits (the 13 low
// bits cleared); NaN stays NaN, a finite value may round to infinity.
inline uint32_t to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if (std::isnan(x)) return bits;
  return (bits + 0x1000u) & 0xFFFFE000u;
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "__shfl_xor_sync: at most 8 bytes");
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  emu::warp_slots[warp][lane] = bits;
  emu::warp_barriers[warp]->arrive_and_wait();
  bits = emu::warp_slots[warp][lane ^ lane_mask];
  emu::warp_barriers[warp]->arrive_and_wait();
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}
