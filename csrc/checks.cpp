// Argument checks shared by the CPU and CUDA kernels, so that a direct call of
// torch.ops.smca._coattention_* with bad input raises instead of reading out of bounds.
#include <Python.h>
#include <ATen/ATen.h>

#include "smca.h"

// The module smca_kernels._C: nothing but the op registrations, loaded by `import`.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace smca {

int64_t check_coattention_args(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& centers,
    const at::Tensor& precision, const std::optional<at::Tensor>& alpha,
    c10::IntArrayRef spatial_shapes, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p) {
  TORCH_CHECK(q.dim() == 4, "q: expected (B, H, Nq, D), got shape ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(3) == D,
              "k: expected (B, H, L, D) = (", B, ", ", H, ", L, ", D, "), got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected the shape of k ", k.sizes(), ", got shape ",
              v.sizes());
  TORCH_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype(),
              "q, k, v: expected one dtype, got ", q.dtype(), ", ", k.dtype(), ", ", v.dtype());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "q, k, v: expected one device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  TORCH_CHECK(spatial_shapes.size() >= 2 && spatial_shapes.size() % 2 == 0,
              "spatial_shapes: expected [H0, W0, H1, W1, ...], got ", spatial_shapes);
  const int64_t S = static_cast<int64_t>(spatial_shapes.size()) / 2;
  int64_t L = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(spatial_shapes[2 * s] > 0 && spatial_shapes[2 * s + 1] > 0,
                "spatial_shapes: expected positive sizes, got ", spatial_shapes);
    L += spatial_shapes[2 * s] * spatial_shapes[2 * s + 1];
  }
  TORCH_CHECK(k.size(2) == L, "k: expected L = sum of H*W over spatial_shapes ", spatial_shapes,
              " = ", L, " keys, got ", k.size(2));
  // Coordinates stay in fp32 for 16-bit inputs, fp64 for fp64 inputs.
  const auto coord_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"centers", &centers},
                                {"precision", &precision}}) {
    TORCH_CHECK(t->dim() == 5 && t->size(0) == B && t->size(1) == H && t->size(2) == Nq &&
                    t->size(3) == S && t->size(4) == 2,
                name, ": expected (B, H, Nq, S, 2) = (", B, ", ", H, ", ", Nq, ", ", S,
                ", 2), got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == coord_dtype, name, ": expected dtype ", coord_dtype,
                " for q of dtype ", q.dtype(), ", got ", t->dtype());
    TORCH_CHECK(t->device() == q.device(), name, ": expected device ", q.device(), ", got ",
                t->device());
  }
  if (alpha.has_value()) {
    const auto& a = *alpha;
    TORCH_CHECK(a.dim() == 4 && a.size(0) == B && a.size(1) == H && a.size(2) == Nq &&
                    a.size(3) == S,
                "alpha: expected (B, H, Nq, S) = (", B, ", ", H, ", ", Nq, ", ", S,
                "), got shape ", a.sizes());
    TORCH_CHECK(a.scalar_type() == coord_dtype, "alpha: expected dtype ", coord_dtype,
                ", got ", a.dtype());
    TORCH_CHECK(a.device() == q.device(), "alpha: expected device ", q.device(), ", got ",
                a.device());
  } else {
    TORCH_CHECK(S == 1, "alpha: required with ", S, " levels");
  }
  if (key_padding_mask.has_value()) {
    const auto& m = *key_padding_mask;
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == L,
                "key_padding_mask: expected (B, L) = (", B, ", ", L, "), got shape ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool, "key_padding_mask: expected dtype bool, got ",
                m.dtype());
    TORCH_CHECK(m.device() == q.device(), "key_padding_mask: expected device ", q.device(),
                ", got ", m.device());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: expected 0 <= p < 1, got ",
              dropout_p);
  return S;
}

uint64_t dropout_seed(const std::optional<at::Tensor>& seed, double dropout_p) {
  if (dropout_p == 0.0) return 0;
  TORCH_CHECK(seed.has_value(), "seed: required when dropout_p > 0 (", dropout_p,
              "): expected a one-element int64 CPU tensor, got None");
  TORCH_CHECK(seed->device().is_cpu() && seed->scalar_type() == at::kLong && seed->numel() == 1,
              "seed: expected a one-element int64 CPU tensor, got ", seed->numel(),
              " element(s) of dtype ", seed->dtype(), " on ", seed->device());
  return static_cast<uint64_t>(seed->item<int64_t>());
}

void check_coattention_backward_args(const at::Tensor& grad_out, const at::Tensor& q,
                                     const at::Tensor& out_levels, const at::Tensor& lse,
                                     int64_t S) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(),
              "grad_out: expected the shape and dtype of q ", q.sizes(), " ", q.dtype(),
              ", got ", grad_out.sizes(), " ", grad_out.dtype());
  TORCH_CHECK(out_levels.sizes() == c10::IntArrayRef({B, H, Nq, S, D}) &&
                  out_levels.scalar_type() == q.scalar_type(),
              "out_levels: expected shape (B, H, Nq, S, D) = (", B, ", ", H, ", ", Nq, ", ", S,
              ", ", D, ") and dtype ", q.dtype(), ", got ", out_levels.sizes(), " ",
              out_levels.dtype());
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.sizes() == c10::IntArrayRef({B, H, Nq, S}) && lse.scalar_type() == lse_dtype,
              "lse: expected shape (B, H, Nq, S) = (", B, ", ", H, ", ", Nq, ", ", S,
              ") and dtype ", c10::toString(lse_dtype), ", got ", lse.sizes(), " ", lse.dtype());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out},
                                {"out_levels", &out_levels},
                                {"lse", &lse}}) {
    TORCH_CHECK(t->device() == q.device(), name, ": expected device ", q.device(), ", got ",
                t->device());
  }
}

}  // namespace smca
