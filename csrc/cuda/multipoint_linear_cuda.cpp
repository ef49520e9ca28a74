// CUDA implementation of mlifast::multipoint_linear (schema in csrc/ops.cpp).
//
//   input: (K, R, I) per point, or (R, I) shared by every point    weight: (O, I)
//   bias: (O,) or None    weight_dirs: (J, O, I)    bias_dirs: (J, O) or None    coeffs: (K, J)
//   returns (K, R, O): input[k] @ (weight + sum_j coeffs[k, j] * weight_dirs[j]).T
//                      + (bias + sum_j coeffs[k, j] * bias_dirs[j])
//
// Three algorithms, chosen per call:
//  * shared input with more points than basis vectors (K > J + 1, a first layer): the stacked
//    form on cuBLAS, x·Wᵀ and x·Dᵀ once for the R rows, then one small GEMM that combines
//    them per point: (J+1)·R rows of work instead of K·R.
//  * float32 without TF32 and many rows per point: per point W_k = W + Σ_j c_kj·D_j in one
//    reused buffer and a cuBLAS GEMM on its rows (the SIMT kernel cannot match cuBLAS's
//    float32 rate once the GEMM, not the weight read, dominates).
//  * otherwise the fused kernels (multipoint_linear_kernel.h): the tensor-core kernel for
//    float16, bfloat16, and float32 when torch allows TF32 for matmuls
//    (torch.backends.cuda.matmul.allow_tf32), on compute capability 8.0 or newer; the SIMT
//    kernel for float64 and the rest. Each reads W and D once per block.
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

// From this many rows per point, float32 without TF32 goes to cuBLAS one point at a time.
constexpr int64_t kFloat32CublasMinRows = 256;

// (K, O): b + Σ_j c_kj·db_j, or an undefined tensor without bias.
at::Tensor point_biases(const at::Tensor& b, const at::Tensor& db, const at::Tensor& c) {
  if (!b.defined()) return at::Tensor();
  const at::Tensor expanded = b.unsqueeze(0).expand({c.size(0), b.size(0)});
  return db.defined() ? at::addmm(expanded, c, db) : expanded.contiguous();
}

at::Tensor stacked_shared(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d,
                          const at::Tensor& bias_k, const at::Tensor& c, const LinearSizes& s) {
  const int64_t K = s.points, R = s.rows, O = s.out_features, J = s.directions;
  const at::Tensor base = at::mm(x, w.t());                                        // (R, O)
  const at::Tensor along = at::mm(x, d.view({J * O, s.in_features}).t());          // (R, J·O)
  const at::Tensor along_j = along.view({R, J, O}).permute({1, 0, 2}).reshape({J, R * O});
  at::Tensor y = at::addmm(base.view({1, R * O}).expand({K, R * O}), c, along_j).view({K, R, O});
  if (bias_k.defined()) y.add_(bias_k.unsqueeze(1));
  return y;
}

at::Tensor per_point_cublas(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d,
                            const at::Tensor& bias_k, const at::Tensor& c, const LinearSizes& s) {
  const int64_t OI = s.out_features * s.in_features;
  const at::Tensor w_flat = w.view({1, OI});
  const at::Tensor d_flat = d.view({s.directions, OI});
  at::Tensor w_k = at::empty_like(w);
  at::Tensor y = at::empty({s.points, s.rows, s.out_features}, x.options());
  for (int64_t k = 0; k < s.points; ++k) {
    // W_k = W + c_k·D as a (1, J)·(J, O·I) GEMM: the coefficients never leave the device.
    at::Tensor w_k_flat = w_k.view({1, OI});
    at::addmm_out(w_k_flat, w_flat, c.narrow(0, k, 1), d_flat);
    at::Tensor y_k = y.select(0, k);
    if (bias_k.defined()) {
      at::addmm_out(y_k, bias_k.select(0, k), x.select(0, k), w_k.t());
    } else {
      at::mm_out(y_k, x.select(0, k), w_k.t());
    }
  }
  return y;
}

bool tensor_cores_for(const at::Tensor& x) {
  const auto t = x.scalar_type();
  const bool dtype_ok = t == at::kHalf || t == at::kBFloat16 ||
                        (t == at::kFloat && at::globalContext().allowTF32CuBLAS());
  return dtype_ok && at::cuda::getDeviceProperties(x.get_device())->major >= 8;
}

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
  if (s.points * s.rows * s.out_features == 0) {
    return at::empty({s.points, s.rows, s.out_features}, input.options());
  }
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor d = weight_dirs.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor db = bias_dirs.has_value() ? bias_dirs->contiguous() : at::Tensor();

  if (s.shared_input && s.points > s.directions + 1) {
    const at::Tensor c = coeffs.to(input.scalar_type()).contiguous();
    return stacked_shared(x, w, d, point_biases(b, db, c), c, s);
  }
  if (input.scalar_type() == at::kFloat && !s.shared_input && s.rows >= kFloat32CublasMinRows &&
      !at::globalContext().allowTF32CuBLAS()) {
    const at::Tensor c = coeffs.to(at::kFloat).contiguous();
    return per_point_cublas(x, w, d, point_biases(b, db, c), c, s);
  }

  at::Tensor y = at::empty({s.points, s.rows, s.out_features}, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  if (tensor_cores_for(x)) {
    // The tensor-core kernel reads the coefficients in float32 whatever the dtype.
    const at::Tensor c = coeffs.to(at::kFloat).contiguous();
    C10_CUDA_CHECK(mlifast::cuda::launch_multipoint_linear_tensor_cores(
        dtype, x.data_ptr(), s.shared_input, w.data_ptr(), ptr_or_null(b), d.data_ptr(),
        ptr_or_null(db), c.const_data_ptr<float>(), y.data_ptr(), s.points, s.rows,
        s.in_features, s.out_features, s.directions, stream));
    return y;
  }
  // The SIMT kernel reads the coefficients in the weight's dtype.
  const at::Tensor c = coeffs.to(input.scalar_type()).contiguous();
  C10_CUDA_CHECK(mlifast::cuda::launch_multipoint_linear(
      dtype, x.data_ptr(), s.shared_input, w.data_ptr(), ptr_or_null(b), d.data_ptr(),
      ptr_or_null(db), c.data_ptr(), y.data_ptr(), s.points, s.rows, s.in_features,
      s.out_features, s.directions, stream));
  return y;
}

}  // namespace mlifast

TORCH_LIBRARY_IMPL(mlifast, CUDA, m) {
  m.impl("multipoint_linear", &mlifast::multipoint_linear_cuda);
}
