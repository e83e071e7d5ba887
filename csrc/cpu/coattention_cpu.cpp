// C++ CPU kernels of smca::_coattention_forward / _coattention_backward (schemas in
// csrc/smca.cpp, math in docs/operators.md), float32 and float64: the checks, the outputs, and the
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

// The inputs made contiguous, and the kernels' view of them.
struct Inputs {
  at::Tensor q, k, v, centers, precision, alpha;  // alpha undefined when absent

  Inputs(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
         const at::Tensor& centers_, const at::Tensor& precision_,
         const std::optional<at::Tensor>& alpha_)
      : q(q_.contiguous()), k(k_.contiguous()), v(v_.contiguous()),
        centers(centers_.contiguous()), precision(precision_.contiguous()),
        alpha(alpha_.has_value() ? alpha_->contiguous() : at::Tensor()) {}

  template <typename T>
  cpu::Problem<T> problem(const cpu::KeyLayout<T>& keys, double scale, double dropout_p,
                          uint64_t seed) const {
    return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), centers.data_ptr<T>(),
            precision.data_ptr<T>(), alpha.defined() ? alpha.data_ptr<T>() : nullptr, &keys,
            q.size(0), q.size(1), q.size(2), q.size(3), static_cast<T>(scale), dropout_p,
            seed};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> coattention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& centers,
    const at::Tensor& precision, const std::optional<at::Tensor>& alpha,
    c10::IntArrayRef spatial_shapes, const std::optional<at::Tensor>& key_padding_mask,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  const int64_t S = check_coattention_args(q, k, v, centers, precision, alpha, spatial_shapes,
                                           key_padding_mask, dropout_p);
  check_cpu_dtype(q, "_coattention_forward");
  const uint64_t key = dropout_seed(seed, dropout_p);
  const cpu::Isa isa = cpu::selected_isa();  // it may raise: before any output exists
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const Inputs inputs(q, k, v, centers, precision, alpha);

  at::Tensor out = at::empty({B, H, Nq, D}, q.options());
  at::Tensor out_levels =
      alpha.has_value() ? at::empty({B, H, Nq, S, D}, q.options()) : at::empty({0}, q.options());
  at::Tensor lse = at::empty({B, H, Nq, S}, q.options());

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_coattention_forward_cpu", [&] {
    const cpu::KeyLayout<scalar_t> keys(spatial_shapes, key_padding_mask, B);
    const cpu::Problem<scalar_t> problem = inputs.problem<scalar_t>(keys, scale, dropout_p, key);
    const cpu::ForwardOutputs<scalar_t> outputs{
        out.data_ptr<scalar_t>(), alpha.has_value() ? out_levels.data_ptr<scalar_t>() : nullptr,
        lse.data_ptr<scalar_t>()};
    cpu::with_level(isa, [&](auto level) { level.forward(problem, outputs); });
  });
  return {out, out_levels, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
coattention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& centers, const at::Tensor& precision,
    const std::optional<at::Tensor>& alpha, const at::Tensor& out_levels, const at::Tensor& lse,
    c10::IntArrayRef spatial_shapes, const std::optional<at::Tensor>& key_padding_mask,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  const int64_t S = check_coattention_args(q, k, v, centers, precision, alpha, spatial_shapes,
                                           key_padding_mask, dropout_p);
  check_cpu_dtype(q, "_coattention_backward");
  const uint64_t key = dropout_seed(seed, dropout_p);
  const cpu::Isa isa = cpu::selected_isa();
  check_coattention_backward_args(grad_out, q, out_levels, lse, S);
  const Inputs inputs(q, k, v, centers, precision, alpha);
  const at::Tensor grad_out_c = grad_out.contiguous();
  const at::Tensor out_levels_c = out_levels.contiguous(), lse_c = lse.contiguous();

  // The kernel writes every element.
  at::Tensor grad_q = at::empty_like(inputs.q), grad_k = at::empty_like(inputs.k),
             grad_v = at::empty_like(inputs.v);
  at::Tensor grad_centers = at::empty_like(inputs.centers),
             grad_precision = at::empty_like(inputs.precision);
  at::Tensor grad_alpha =
      alpha.has_value() ? at::empty_like(inputs.alpha) : at::empty({0}, centers.options());

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_coattention_backward_cpu", [&] {
    const cpu::KeyLayout<scalar_t> keys(spatial_shapes, key_padding_mask, q.size(0));
    const cpu::Problem<scalar_t> problem = inputs.problem<scalar_t>(keys, scale, dropout_p, key);
    const cpu::BackwardTensors<scalar_t> tensors{
        grad_out_c.data_ptr<scalar_t>(), out_levels_c.data_ptr<scalar_t>(),
        lse_c.data_ptr<scalar_t>(), grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
        grad_v.data_ptr<scalar_t>(), grad_centers.data_ptr<scalar_t>(),
        grad_precision.data_ptr<scalar_t>(),
        alpha.has_value() ? grad_alpha.data_ptr<scalar_t>() : nullptr};
    cpu::with_level(isa, [&](auto level) { level.backward(problem, tensors); });
  });
  return {grad_q, grad_k, grad_v, grad_centers, grad_precision, grad_alpha};
}

}  // namespace

double cpu_fma_peak_gflops() {
  constexpr int64_t kIterations = 20'000'000;  // about 0.1 s at 4 GHz
  return cpu::with_level(cpu::selected_isa(),
                         [](auto level) { return level.peak_gflops(kIterations); });
}

TORCH_LIBRARY_IMPL(smca, CPU, m) {
  m.impl("_coattention_forward", &coattention_forward_cpu);
  m.impl("_coattention_backward", &coattention_backward_cpu);
}

}  // namespace smca
