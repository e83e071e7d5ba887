// Schemas of the smca operators: one TORCH_LIBRARY for the whole namespace.
//
// The co-attention's device kernels, one implementation per dispatch key (csrc/cpu, csrc/cuda):
//   _coattention_forward, _coattention_backward
// Their fake (shape) functions and autograd formula are registered from Python
// (smca_kernels/ops.py), which also registers the Triton kernels as ops of the same form
// (_triton_coattention_forward/_backward). The public functions (gaussian_coattention,
// scale_selective_coattention, SMCAAttention) reach these ops through smca_kernels.ops.coattention.
//
// Shapes: q (B,H,Nq,D); k, v (B,H,L,D); centers, precision (B,H,Nq,S,2); alpha (B,H,Nq,S) or
// None for one level; spatial_shapes [H0,W0,H1,W1,...] (SymInt[], so that torch.compile keeps
// the map sizes symbolic, pytorch/pytorch#121080); key_padding_mask (B,L) bool, True = ignore;
// seed the dropout's Philox key, a one-element int64 CPU tensor, None when dropout_p is 0 (a
// tensor, so that drawing it is no graph break under torch.compile); lse (B,H,Nq,S), +inf where
// a level's keys are all masked; out_levels (B,H,Nq,S,D) the unmixed per-level outputs
// (docs/operators.md).
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/isa.h"
#include "smca.h"

namespace smca {

int64_t cuda_version() {
#ifdef SMCA_WITH_CUDA
  return cuda_runtime_version();
#else
  return 0;
#endif
}

std::string cpu_isa() { return cpu::isa_name(cpu::selected_isa()); }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (cpu::Isa isa : cpu::supported_isas()) names.emplace_back(cpu::isa_name(isa));
  return names;
}

TORCH_LIBRARY(smca, m) {
  // The fake (shape) and autograd registrations live in this Python module.
  m.set_python_module("smca_kernels.ops");
  // Device kernels. With alpha None (one level): out is the level's output and out_levels is
  // an empty tensor; the backward then takes out.unsqueeze(3) as out_levels and returns an
  // empty grad_alpha.
  m.def(
      "_coattention_forward(Tensor q, Tensor k, Tensor v, Tensor centers, Tensor precision, "
      "Tensor? alpha, SymInt[] spatial_shapes, Tensor? key_padding_mask, float scale, "
      "float dropout_p, Tensor? seed) -> (Tensor out, Tensor out_levels, Tensor lse)");
  m.def(
      "_coattention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor centers, "
      "Tensor precision, Tensor? alpha, Tensor out_levels, Tensor lse, SymInt[] spatial_shapes, "
      "Tensor? key_padding_mask, float scale, float dropout_p, Tensor? seed) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_centers, "
      "Tensor grad_precision, Tensor grad_alpha)");

  // CUDA runtime version the extension was compiled against, 0 when built without CUDA.
  m.def("_cuda_version() -> int", &cuda_version);
  // ISA level the CPU kernels use now (SMCA_CPU_ISA, else the widest this CPU runs), and every
  // level this build and CPU support, widest first (csrc/cpu/isa.h).
  m.def("_cpu_isa() -> str", &cpu_isa);
  m.def("_cpu_isas() -> str[]", &cpu_isas);
  // The peak the benchmark reports smca-cpu's GFLOP/s against (csrc/smca.h).
  m.def("_cpu_fma_peak_gflops() -> float", &cpu_fma_peak_gflops);
}

}  // namespace smca
