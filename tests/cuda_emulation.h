// CPU emulation of the CUDA constructs that csrc/cuda/coattention_cuda.cu uses, so that its
// kernels run (slowly) where there is no GPU; see cuda_emulation.py.
//
// Every CUDA thread of a block is a std::thread; __syncthreads is a std::barrier over the block
// and __shfl_xor_sync an exchange between two barriers of the warp; a thread that returns drops
// out of both barriers, as an exited CUDA thread does. Blocks run one after another. Dynamic
// shared memory is a fresh heap buffer of exactly the launch's size, filled with NaN, so that a
// read before a write shows in the results, and AddressSanitizer sees an overflow and
// ThreadSanitizer a missing barrier.
#pragma once
#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

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
