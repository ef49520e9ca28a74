// CUDA implementation of mlifast::multipoint_linear (schema in csrc/ops.cpp).
//
//   input: (K, R, I) per point, or (R, I) shared by every point    weight: (O, I)
//   bias: (O,) or None    weight_dirs: (J, O, I)    bias_dirs: (J, O) or None    coeffs: (K, J)
//   returns (K, R, O): input[k] @ (weight + sum_j coeffs[k, j] * weight_dirs[j]).T
//                      + (bias + sum_j coeffs[k, j] * bias_dirs[j])
// Compiled only against a CUDA build of torch.
#include <optional>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "multipoint_linear_checks.h"
#include "multipoint_linear_kernel.h"

namespace mlifast {
namespace {

mlifast::cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return mlifast::cuda::DType::Float32;
    case at::kDouble: return mlifast::cuda::DType::Float64;
    case at::kHalf: return mlifast::cuda::DType::Float16;
    case at::kBFloat16: return mlifast::cuda::DType::BFloat16;
    default: break;
  }
  TORCH_CHECK(false, "mlifast::multipoint_linear: expected input of dtype float32, float64, "
              "float16 or bfloat16, got ", t);
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

}  // namespace

at::Tensor multipoint_linear_cuda(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const at::Tensor& weight_dirs,
                                  const std::optional<at::Tensor>& bias_dirs,
                                  const at::Tensor& coeffs) {
  // Shapes, dtypes and devices: the same contract as every other backend.
  const LinearSizes s =
      check_multipoint_linear(input, weight, bias, weight_dirs, bias_dirs, coeffs);
  TORCH_CHECK(input.is_cuda(), "mlifast::multipoint_linear: expected tensors on a CUDA device, got ",
              input.device());
  const auto dtype = to_dtype(input.scalar_type());

  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor d = weight_dirs.contiguous();
  // The contract allows coeffs in any floating dtype; the kernel reads them in the weight's.
  const at::Tensor c = coeffs.to(input.scalar_type()).contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor db = bias_dirs.has_value() ? bias_dirs->contiguous() : at::Tensor();
  at::Tensor y = at::empty({s.points, s.rows, s.out_features}, x.options());

  C10_CUDA_CHECK(mlifast::cuda::launch_multipoint_linear(
      dtype, x.data_ptr(), s.shared_input, w.data_ptr(), ptr_or_null(b), d.data_ptr(),
      ptr_or_null(db), c.data_ptr(), y.data_ptr(), s.points, s.rows, s.in_features,
      s.out_features, s.directions, at::cuda::getCurrentCUDAStream().stream()));
  return y;
}

}  // namespace mlifast

TORCH_LIBRARY_IMPL(mlifast, CUDA, m) {
  m.impl("multipoint_linear", &mlifast::multipoint_linear_cuda);
}
