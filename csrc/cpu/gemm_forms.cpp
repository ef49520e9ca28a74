// The CUDA glue's GEMM forms (csrc/multipoint_linear_gemm_forms.h) on the CPU: the private
// operator mlifast::_multipoint_linear_gemm_form, which the tests check against the oracle
// on a machine without a GPU. Never dispatched: the CPU's multipoint_linear has its own forms.
#include <torch/library.h>

#include "multipoint_linear_gemm_forms.h"

namespace mlifast {
namespace {

at::Tensor gemm_form_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& weight_dirs, const std::optional<at::Tensor>& bias_dirs,
                         const at::Tensor& coeffs, int64_t points_per_gemm) {
  const gemm_forms::Operands o = gemm_forms::operands(input, weight, bias, weight_dirs, bias_dirs, coeffs);
  if (o.s.points * o.s.rows * o.s.out_features == 0) {
    return at::empty({o.s.points, o.s.rows, o.s.out_features}, input.options());
  }
  return gemm_forms::named_form(o, points_per_gemm);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlifast, CPU, m) {
  m.impl("_multipoint_linear_gemm_form", &gemm_form_cpu);
}

}  // namespace mlifast
