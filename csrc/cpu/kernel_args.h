// What the CPU co-attention kernels take (cpu/kernels.h), and their entry points for each ISA
// level (cpu/isa.h). Shapes and math: csrc/smca.cpp and docs/operators.md.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include "cpu/isa.h"

namespace smca::cpu {

// The key range of each level and the per-key constants every tile needs, built once per call.
// Each array has kPadding finite entries more than it holds keys, so that a tile pass may load a
// whole vector at its last key (cpu/tile_ops.h).
template <typename T>
struct KeyLayout {
  static constexpr int64_t kPadding = 16;  // the widest vector, in elements

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
    key_x.assign(L + kPadding, T(0));
    key_y.assign(L + kPadding, T(0));
    for (int64_t s = 0; s < S; ++s) {
      const int64_t width = spatial_shapes[2 * s + 1];
      for (int64_t j = level_start[s]; j < level_start[s + 1]; ++j) {
        key_x[j] = static_cast<T>((j - level_start[s]) % width);
        key_y[j] = static_cast<T>((j - level_start[s]) / width);
      }
    }
    level_live.assign(B * S, 1);
    if (!key_padding_mask.has_value()) {
      key_bias.assign(L + kPadding, T(0));
      return;
    }
    const at::Tensor mask = key_padding_mask->contiguous();
    const bool* padded = mask.data_ptr<bool>();  // (B, L)
    bias_batch_stride = L;
    key_bias.assign(B * L + kPadding, T(0));
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

// Contiguous inputs and sizes shared by the forward and the backward.
template <typename T>
struct Problem {
  const T* q;          // (B, H, Nq, D)
  const T* k;          // (B, H, L, D)
  const T* v;          // (B, H, L, D)
  const T* centers;    // (B, H, Nq, S, 2) (cx, cy) in each level's grid cells
  const T* precision;  // (B, H, Nq, S, 2) (px, py)
  const T* alpha;      // (B, H, Nq, S), nullptr when S == 1 without alpha
  const KeyLayout<T>* keys;
  int64_t B, H, Nq, D;
  T scale;
  double dropout_p;
  uint64_t seed;
};

template <typename T>
struct ForwardOutputs {
  T* out;         // (B, H, Nq, D)
  T* out_levels;  // (B, H, Nq, S, D), nullptr without alpha
  T* lse;         // (B, H, Nq, S)
};

template <typename T>
struct BackwardTensors {
  const T* grad_out;    // (B, H, Nq, D)
  const T* out_levels;  // (B, H, Nq, S, D): the forward's per-level outputs
  const T* lse;         // (B, H, Nq, S)
  T* grad_q;            // like q
  T* grad_k;            // like k
  T* grad_v;            // like v
  T* grad_centers;      // (B, H, Nq, S, 2)
  T* grad_precision;    // (B, H, Nq, S, 2)
  T* grad_alpha;        // (B, H, Nq, S), nullptr without alpha
};

// One copy of the kernels per ISA level (cpu/kernels.h), float and double each, and the level's
// float32 FMA throughput on the current threads, in GFLOP/s, from `iterations` steps of a loop;
// `Level` names the namespace as a type, for with_level.
#define SMCA_DECLARE_CPU_KERNELS(isa)                                                        \
  namespace isa {                                                                            \
  template <typename T>                                                                      \
  void coattention_forward(const Problem<T>& problem, const ForwardOutputs<T>& outputs);     \
  template <typename T>                                                                      \
  void coattention_backward(const Problem<T>& problem, const BackwardTensors<T>& tensors);   \
  double fma_peak_gflops(int64_t iterations);                                                \
  struct Level {                                                                             \
    template <typename T>                                                                    \
    static void forward(const Problem<T>& problem, const ForwardOutputs<T>& outputs) {       \
      coattention_forward<T>(problem, outputs);                                              \
    }                                                                                        \
    template <typename T>                                                                    \
    static void backward(const Problem<T>& problem, const BackwardTensors<T>& tensors) {     \
      coattention_backward<T>(problem, tensors);                                             \
    }                                                                                        \
    static double peak_gflops(int64_t iterations) { return fma_peak_gflops(iterations); }    \
  };                                                                                         \
  }
SMCA_DECLARE_CPU_KERNELS(generic)
#if SMCA_CPU_X86_LEVELS
SMCA_DECLARE_CPU_KERNELS(avx2)
SMCA_DECLARE_CPU_KERNELS(avx512)
#endif
#undef SMCA_DECLARE_CPU_KERNELS

// fn(Level) with the kernels of `isa`.
template <typename Fn>
decltype(auto) with_level(Isa isa, Fn&& fn) {
  switch (isa) {
#if SMCA_CPU_X86_LEVELS
    case Isa::kAvx512:
      return fn(avx512::Level{});
    case Isa::kAvx2:
      return fn(avx2::Level{});
#endif
    default:
      return fn(generic::Level{});
  }
}

}  // namespace smca::cpu
