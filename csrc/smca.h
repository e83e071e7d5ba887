// Declarations shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

namespace smca {

// Checks the arguments of _coattention_forward/_coattention_backward (shapes, dtypes, devices)
// with messages that name the argument; returns the number of levels S.
int64_t check_coattention_args(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& centers,
    const at::Tensor& precision, const std::optional<at::Tensor>& alpha,
    c10::IntArrayRef spatial_shapes, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p);

// The dropout's Philox key from the ops' `seed` argument: 0 when dropout_p is 0 (seed unused),
// else the value of a one-element int64 CPU tensor; an error naming `seed` otherwise.
uint64_t dropout_seed(const std::optional<at::Tensor>& seed, double dropout_p);

// The backward's extra arguments: grad_out like q, out_levels (B, H, Nq, S, D) in q's dtype,
// lse (B, H, Nq, S) float32 (float64 for float64 q), all on q's device.
void check_coattention_backward_args(const at::Tensor& grad_out, const at::Tensor& q,
                                     const at::Tensor& out_levels, const at::Tensor& lse,
                                     int64_t S);

// float32 FMA throughput of the CPU kernels' ISA level (cpu/isa.h) on the current threads, in
// GFLOP/s, measured by a loop of independent multiply-adds (coattention_cpu.cpp).
double cpu_fma_peak_gflops();

#ifdef SMCA_WITH_CUDA
int64_t cuda_runtime_version();
#endif

}  // namespace smca
