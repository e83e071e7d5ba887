// C++ CPU kernels of smca::_coattention_forward / _coattention_backward (schemas in
// csrc/smca.cpp, math in SPEC section 1), float32 and float64: the checks, the outputs, and the
// choice of the kernels' ISA level for this call (cpu/isa.h; the kernels are cpu/kernels.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/isa.h"
#include "cpu/kernel_args.h"
#include "smca.h"

namespace smca {
namespace {

void check_cpu_dtype(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              " (CPU): q has dtype ", q.scalar_type(),
              "; the CPU kernel supports float32 and float64 only (use the Triton or CUDA backend "
              "for float16 and bfloat16)");
}

template <typename T>
void run_forward(cpu::Isa isa, const cpu::Problem<T>& problem,
                 const cpu::ForwardOutputs<T>& outputs) {
  switch (isa) {
#if SMCA_CPU_X86_LEVELS
    case cpu::Isa::kAvx512:
      return cpu::avx512::coattention_forward<T>(problem, outputs);
    case cpu::Isa::kAvx2:
      return cpu::avx2::coattention_forward<T>(problem, outputs);
#endif
    default:
      return cpu::generic::coattention_forward<T>(problem, outputs);
  }
}

template <typename T>
void run_backward(cpu::Isa isa, const cpu::Problem<T>& problem,
                  const cpu::BackwardTensors<T>& tensors) {
  switch (isa) {
#if SMCA_CPU_X86_LEVELS
    case cpu::Isa::kAvx512:
      return cpu::avx512::coattention_backward<T>(problem, tensors);
    case cpu::Isa::kAvx2:
      return cpu::avx2::coattention_backward<T>(problem, tensors);
#endif
    default:
      return cpu::generic::coattention_backward<T>(problem, tensors);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coattention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& centers,
    const at::Tensor& precision, const std::optional<at::Tensor>& alpha,
    c10::IntArrayRef spatial_shapes, const std::optional<at::Tensor>& key_padding_mask,
    double scale, double dropout_p, int64_t seed) {
  const int64_t S = check_coattention_args(q, k, v, centers, precision, alpha, spatial_shapes,
                                           key_padding_mask, dropout_p);
  check_cpu_dtype(q, "_coattention_forward");
  const cpu::Isa isa = cpu::selected_isa();  // it may raise: before any output exists
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const at::Tensor q_c = q.contiguous(), k_c = k.contiguous(), v_c = v.contiguous();
  const at::Tensor centers_c = centers.contiguous(), precision_c = precision.contiguous();
  const at::Tensor alpha_c = alpha.has_value() ? alpha->contiguous() : at::Tensor();

  at::Tensor out = at::empty({B, H, Nq, D}, q.options());
  at::Tensor out_levels =
      alpha.has_value() ? at::empty({B, H, Nq, S, D}, q.options()) : at::empty({0}, q.options());
  at::Tensor lse = at::empty({B, H, Nq, S}, q.options());

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_coattention_forward_cpu", [&] {
    const cpu::KeyLayout<scalar_t> keys(spatial_shapes, key_padding_mask, B);
    const cpu::Problem<scalar_t> problem{
        q_c.data_ptr<scalar_t>(), k_c.data_ptr<scalar_t>(), v_c.data_ptr<scalar_t>(),
        centers_c.data_ptr<scalar_t>(), precision_c.data_ptr<scalar_t>(),
        alpha.has_value() ? alpha_c.data_ptr<scalar_t>() : nullptr, &keys, B, H, Nq, D,
        static_cast<scalar_t>(scale), dropout_p, static_cast<uint64_t>(seed)};
    run_forward<scalar_t>(
        isa, problem,
        {out.data_ptr<scalar_t>(), alpha.has_value() ? out_levels.data_ptr<scalar_t>() : nullptr,
         lse.data_ptr<scalar_t>()});
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
  const cpu::Isa isa = cpu::selected_isa();
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
    const cpu::KeyLayout<scalar_t> keys(spatial_shapes, key_padding_mask, B);
    const cpu::Problem<scalar_t> problem{
        q_c.data_ptr<scalar_t>(), k_c.data_ptr<scalar_t>(), v_c.data_ptr<scalar_t>(),
        centers_c.data_ptr<scalar_t>(), precision_c.data_ptr<scalar_t>(),
        alpha.has_value() ? alpha_c.data_ptr<scalar_t>() : nullptr, &keys, B, H, Nq, D,
        static_cast<scalar_t>(scale), dropout_p, static_cast<uint64_t>(seed)};
    run_backward<scalar_t>(
        isa, problem,
        {grad_out_c.data_ptr<scalar_t>(), out_levels_c.data_ptr<scalar_t>(),
         lse_c.data_ptr<scalar_t>(), grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
         grad_v.data_ptr<scalar_t>(), grad_centers.data_ptr<scalar_t>(),
         grad_precision.data_ptr<scalar_t>(),
         alpha.has_value() ? grad_alpha.data_ptr<scalar_t>() : nullptr});
  });
  return {grad_q, grad_k, grad_v, grad_centers, grad_precision, grad_alpha};
}

}  // namespace

double cpu_fma_peak_gflops() {
  constexpr int64_t kIterations = 20'000'000;  // about 0.1 s at 4 GHz
  switch (cpu::selected_isa()) {
#if SMCA_CPU_X86_LEVELS
    case cpu::Isa::kAvx512:
      return cpu::avx512::fma_peak_gflops(kIterations);
    case cpu::Isa::kAvx2:
      return cpu::avx2::fma_peak_gflops(kIterations);
#endif
    default:
      return cpu::generic::fma_peak_gflops(kIterations);
  }
}

TORCH_LIBRARY_IMPL(smca, CPU, m) {
  m.impl("_coattention_forward", &coattention_forward_cpu);
  m.impl("_coattention_backward", &coattention_backward_cpu);
}

}  // namespace smca
