// CUDA implementation of mlifast::multipoint_linear (schema in csrc/ops.cpp).
//
//   input: (K, R, I) per point, or (R, I) shared by every point    weight: (O, I)
//   bias: (O,) or None    weight_dirs: (J, O, I)    bias_dirs: (J, O) or None    coeffs: (K, J)
//   returns (K, R, O): input[k] @ (weight + sum_j coeffs[k, j] * weight_dirs[j]).T
//                      + (bias + sum_j coeffs[k, j] * bias_dirs[j])
//
// Three algorithms, chosen per call by a cost model whose constants were measured on an
// H100 (benchmarks/cuda_check.py; BENCHMARKS.md, "GPU"):
//  * shared input (a first layer): x·Wᵀ and x·Dᵀ once for the R rows on cuBLAS, then the
//    per-point combine: (J+1)·R rows of GEMM instead of K·R.
//  * stacked: two cuBLAS GEMMs over all K·R rows (against W and against the J directions,
//    each with its bias in the epilogue), then the combine in place. (J+1)× the FLOPs, W and
//    D read once, three launches for J = 1.
//  * per-point weights: W_k = W + Σ_j c_kj·D_j for a group of points in one reused buffer,
//    then one batched cuBLAS GEMM of the group's rows against them (points_per_gemm). 1× the
//    FLOPs, (J+2) weight-sized passes per point. It wins over stacked when the saved GEMM
//    time beats the weight passes:
//        2·J·R / F  >  (J+2)·e / BW   ⇔   R > (J+2)·e·(F/BW) / (2·J)
//    with F the card's GEMM rate for the dtype, BW its memory bandwidth, e the element size.
//    H100 (cuda_check.py): F/BW = 267 FLOP/byte for bf16/fp16, 135 for TF32, 17 for float32:
//    the switch is near 800 rows per point for bf16 and TF32 and 100 for float32 (J = 1),
//    where the H100's crossover lay for float32 and TF32; for bf16 the stacked form was
//    still as fast at 1024 rows on the H100 and the H200 (BENCHMARKS.md).
// The fused kernels — tensor cores (multipoint_linear_mma.cu: W and D read once per block,
// every point's weight tile formed on chip, the input dimension split over blocks) and SIMT
// (multipoint_linear_kernel.cu) — are not dispatched: on the H100 the cuBLAS forms beat them
// at every measured size (BENCHMARKS.md). They stay reachable as the private op
// mlifast::_multipoint_linear_fused, which benchmarks/cuda_check.py checks against the
// oracle and times against the cuBLAS forms on every GPU run.
// Both cuBLAS forms are ATen code in csrc/multipoint_linear_gemm_forms.h, which the CPU build
// compiles too: the tests check them there (the private op mlifast::_multipoint_linear_gemm_form).
// This file is compiled only against a CUDA build of torch.
#include <algorithm>
#include <optional>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "multipoint_linear_checks.h"
#include "multipoint_linear_gemm_forms.h"
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

// GEMM FLOPs per byte of memory traffic of an H100 for `x`'s dtype (see the header).
double flops_per_byte(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf:
    case at::kBFloat16: return 267.0;
    case at::kFloat: return at::globalContext().allowTF32CuBLAS() ? 135.0 : 17.0;
    default: return 17.0;
  }
}

bool use_per_point_weights(const at::Tensor& x, const LinearSizes& s) {
  const double J = static_cast<double>(s.directions);
  return static_cast<double>(s.rows) >
         (J + 2) * static_cast<double>(x.element_size()) * flops_per_byte(x) / (2 * J);
}

bool tensor_cores_for(const at::Tensor& x) {
  const auto t = x.scalar_type();
  const bool dtype_ok = t == at::kHalf || t == at::kBFloat16 ||
                        (t == at::kFloat && at::globalContext().allowTF32CuBLAS());
  return dtype_ok && at::cuda::getDeviceProperties(x.get_device())->major >= 8;
}

// Points per batched GEMM of the per-point form. One point's GEMM has ceil(R/128)·ceil(O/128)
// output tiles; W1's 1000 × 1024 gives 64 and a transformer's 256 × 1024 gives 16, far too few
// blocks for 132 multiprocessors. So points go to cuBLAS in groups of enough tiles for
// TILE_WAVES waves, their weights formed together in a buffer of at most WEIGHT_GROUP_BYTES.
constexpr int64_t TILE_WAVES = 4;
constexpr int64_t WEIGHT_GROUP_BYTES = int64_t{256} << 20;

int64_t points_per_gemm(const at::Tensor& x, const LinearSizes& s) {
  const int64_t tiles = ((s.rows + 127) / 128) * ((s.out_features + 127) / 128);
  const int64_t blocks = TILE_WAVES * at::cuda::getDeviceProperties(x.get_device())->multiProcessorCount;
  const int64_t weight_bytes = s.out_features * s.in_features * x.element_size();
  const int64_t group = std::min((blocks + tiles - 1) / tiles, WEIGHT_GROUP_BYTES / std::max<int64_t>(weight_bytes, 1));
  return std::clamp<int64_t>(group, 1, s.points);
}

// The fused kernels: tensor cores (split over the input dimension) where the dtype and card
// allow, the SIMT kernel otherwise.
at::Tensor fused(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& d,
                 const at::Tensor& db, const at::Tensor& coeffs, const LinearSizes& s) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const auto dtype = to_dtype(x.scalar_type());
  if (tensor_cores_for(x)) {
    const at::Tensor c = coeffs.to(at::kFloat).contiguous();
    at::Tensor partial = at::zeros({s.points, s.rows, s.out_features}, x.options().dtype(at::kFloat));
    const int sm_count = at::cuda::getDeviceProperties(x.get_device())->multiProcessorCount;
    C10_CUDA_CHECK(mlifast::cuda::launch_multipoint_linear_tensor_cores(
        dtype, x.data_ptr(), s.shared_input, w.data_ptr(), ptr_or_null(b), d.data_ptr(),
        ptr_or_null(db), c.const_data_ptr<float>(), nullptr, partial.data_ptr<float>(), s.points,
        s.rows, s.in_features, s.out_features, s.directions, sm_count, stream));
    return partial.to(x.scalar_type());
  }
  // The SIMT kernel reads the coefficients in the weight's dtype.
  const at::Tensor c = coeffs.to(x.scalar_type()).contiguous();
  at::Tensor y = at::empty({s.points, s.rows, s.out_features}, x.options());
  C10_CUDA_CHECK(mlifast::cuda::launch_multipoint_linear(
      dtype, x.data_ptr(), s.shared_input, w.data_ptr(), ptr_or_null(b), d.data_ptr(),
      ptr_or_null(db), c.data_ptr(), y.data_ptr(), s.points, s.rows, s.in_features,
      s.out_features, s.directions, stream));
  return y;
}

using gemm_forms::Operands;

Operands prepare(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& weight_dirs, const std::optional<at::Tensor>& bias_dirs,
                 const at::Tensor& coeffs) {
  // Shapes, dtypes and devices: the same contract as every other backend.
  Operands o = gemm_forms::operands(input, weight, bias, weight_dirs, bias_dirs, coeffs);
  TORCH_CHECK(input.is_cuda(), "mlifast::multipoint_linear: expected tensors on a CUDA device, got ",
              input.device());
  to_dtype(input.scalar_type());
  return o;
}

// The cost model's choice among the cuBLAS forms.
at::Tensor dispatched(const Operands& o, const at::Tensor& /*coeffs*/, int64_t /*group*/) {
  if (!o.s.shared_input && use_per_point_weights(o.x, o.s)) {
    return gemm_forms::per_point_weights(o.x, o.w, o.b, o.d, o.db, o.c, o.s, points_per_gemm(o.x, o.s));
  }
  return gemm_forms::stacked(o.x, o.w, o.b, o.d, o.db, o.c, o.s);
}

at::Tensor fused_only(const Operands& o, const at::Tensor& coeffs, int64_t /*group*/) {
  return fused(o.x, o.w, o.b, o.d, o.db, coeffs, o.s);
}

// One GEMM form, as the caller names it (as on the CPU: csrc/cpu/gemm_forms.cpp).
at::Tensor gemm_form_only(const Operands& o, const at::Tensor& /*coeffs*/, int64_t group) {
  return gemm_forms::named_form(o, group);
}

// One CUDA operator: checks, the device guard and empty outputs, then `algorithm`.
template <at::Tensor (*algorithm)(const Operands&, const at::Tensor&, int64_t)>
at::Tensor run(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
               const at::Tensor& weight_dirs, const std::optional<at::Tensor>& bias_dirs, const at::Tensor& coeffs,
               int64_t group) {
  const c10::cuda::CUDAGuard guard(input.device());
  const Operands o = prepare(input, weight, bias, weight_dirs, bias_dirs, coeffs);
  if (o.s.points * o.s.rows * o.s.out_features == 0) {
    return at::empty({o.s.points, o.s.rows, o.s.out_features}, input.options());
  }
  return algorithm(o, coeffs, group);
}

// multipoint_linear's face: then the ReLU if asked (a separate in-place pass here; on the
// CPU it joins the bias pass).
template <at::Tensor (*algorithm)(const Operands&, const at::Tensor&, int64_t)>
at::Tensor cuda_op(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& weight_dirs, const std::optional<at::Tensor>& bias_dirs,
                   const at::Tensor& coeffs, bool relu) {
  at::Tensor y = run<algorithm>(input, weight, bias, weight_dirs, bias_dirs, coeffs, 0);
  return relu ? y.relu_() : y;
}

}  // namespace
}  // namespace mlifast

// The fused kernels alone, whatever the cost model says: for benchmarks/cuda_check.py.
TORCH_LIBRARY_FRAGMENT(mlifast, m) {
  m.def("_multipoint_linear_fused(Tensor input, Tensor weight, Tensor? bias, Tensor weight_dirs, "
        "Tensor? bias_dirs, Tensor coeffs, bool relu=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(mlifast, CUDA, m) {
  m.impl("multipoint_linear", &mlifast::cuda_op<mlifast::dispatched>);
  m.impl("_multipoint_linear_fused", &mlifast::cuda_op<mlifast::fused_only>);
  m.impl("_multipoint_linear_gemm_form", &mlifast::run<mlifast::gemm_form_only>);
}
