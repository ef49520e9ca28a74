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
//  * stacked: two cuBLAS GEMMs over all K·R rows (against W and against the J directions),
//    then the combine. (J+1)× the FLOPs, W and D read once.
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
// Compiled only against a CUDA build of torch.
#include <algorithm>
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

// (K, O): b + Σ_j c_kj·db_j, or an undefined tensor without bias.
at::Tensor point_biases(const at::Tensor& b, const at::Tensor& db, const at::Tensor& c) {
  if (!b.defined()) return at::Tensor();
  const at::Tensor expanded = b.unsqueeze(0).expand({c.size(0), b.size(0)});
  return db.defined() ? at::addmm(expanded, c, db) : expanded.contiguous();
}

// y (K, R, O) = base + b_k + Σ_j c_kj·along_j, base (K or 1, R, O), along (K or 1, R, J, O).
at::Tensor combine(const at::Tensor& base, const at::Tensor& along, const at::Tensor& bias_k,
                   const at::Tensor& c, const LinearSizes& s) {
  at::Tensor y = bias_k.defined() ? at::add(base, bias_k.unsqueeze(1))
                                  : base.expand({s.points, s.rows, s.out_features}).contiguous();
  for (int64_t j = 0; j < s.directions; ++j) {
    y.addcmul_(along.select(2, j), c.select(1, j).view({s.points, 1, 1}));
  }
  return y;
}

at::Tensor stacked(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d,
                   const at::Tensor& bias_k, const at::Tensor& c, const LinearSizes& s) {
  const int64_t points = s.shared_input ? 1 : s.points;
  const at::Tensor rows = x.view({points * s.rows, s.in_features});
  const at::Tensor base = at::mm(rows, w.t()).view({points, s.rows, s.out_features});
  const at::Tensor along = at::mm(rows, d.view({s.directions * s.out_features, s.in_features}).t())
                               .view({points, s.rows, s.directions, s.out_features});
  return combine(base, along, bias_k, c, s);
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

at::Tensor per_point_weights(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d,
                             const at::Tensor& bias_k, const at::Tensor& c, const LinearSizes& s) {
  const int64_t group = points_per_gemm(x, s);
  const at::Tensor w_group = at::empty({group, s.out_features, s.in_features}, w.options());
  at::Tensor y = at::empty({s.points, s.rows, s.out_features}, x.options());
  for (int64_t first = 0; first < s.points; first += group) {
    const int64_t n = std::min(group, s.points - first);
    // W_k = W + Σ_j c_kj·D_j for the group's points, element-wise with the coefficients read
    // on the device (no host sync).
    const at::Tensor c_n = c.narrow(0, first, n);
    at::Tensor w_n = w_group.narrow(0, 0, n);
    at::addcmul_out(w_n, w.unsqueeze(0), d.select(0, 0).unsqueeze(0), c_n.select(1, 0).view({n, 1, 1}));
    for (int64_t j = 1; j < s.directions; ++j) {
      w_n.addcmul_(d.select(0, j).unsqueeze(0), c_n.select(1, j).view({n, 1, 1}));
    }
    at::Tensor y_n = y.narrow(0, first, n);
    const at::Tensor x_n = x.narrow(0, first, n);
    if (bias_k.defined()) {
      at::baddbmm_out(y_n, bias_k.narrow(0, first, n).unsqueeze(1), x_n, w_n.transpose(1, 2));
    } else {
      at::bmm_out(y_n, x_n, w_n.transpose(1, 2));
    }
  }
  return y;
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

struct Operands {
  LinearSizes s;
  at::Tensor x, w, b, d, db;
};

Operands prepare(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& weight_dirs, const std::optional<at::Tensor>& bias_dirs,
                 const at::Tensor& coeffs) {
  // Shapes, dtypes and devices: the same contract as every other backend.
  const LinearSizes s = check_multipoint_linear(input, weight, bias, weight_dirs, bias_dirs, coeffs);
  TORCH_CHECK(input.is_cuda(), "mlifast::multipoint_linear: expected tensors on a CUDA device, got ",
              input.device());
  to_dtype(input.scalar_type());
  return {s, input.contiguous(), weight.contiguous(), bias.has_value() ? bias->contiguous() : at::Tensor(),
          weight_dirs.contiguous(), bias_dirs.has_value() ? bias_dirs->contiguous() : at::Tensor()};
}

// The cost model's choice among the cuBLAS forms.
at::Tensor dispatched(const Operands& o, const at::Tensor& coeffs) {
  // The cuBLAS forms compute in the input's dtype, coefficients included.
  const at::Tensor c = coeffs.to(o.x.scalar_type()).contiguous();
  const at::Tensor bias_k = point_biases(o.b, o.db, c);
  if (!o.s.shared_input && use_per_point_weights(o.x, o.s)) {
    return per_point_weights(o.x, o.w, o.d, bias_k, c, o.s);
  }
  return stacked(o.x, o.w, o.d, bias_k, c, o.s);
}

at::Tensor fused_only(const Operands& o, const at::Tensor& coeffs) {
  return fused(o.x, o.w, o.b, o.d, o.db, coeffs, o.s);
}

// One CUDA operator: checks, the device guard and empty outputs, then `algorithm`, then
// the ReLU if asked (a separate in-place pass here; on the CPU it joins the bias pass).
template <at::Tensor (*algorithm)(const Operands&, const at::Tensor&)>
at::Tensor cuda_op(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& weight_dirs, const std::optional<at::Tensor>& bias_dirs,
                   const at::Tensor& coeffs, bool relu) {
  const c10::cuda::CUDAGuard guard(input.device());
  const Operands o = prepare(input, weight, bias, weight_dirs, bias_dirs, coeffs);
  if (o.s.points * o.s.rows * o.s.out_features == 0) {
    return at::empty({o.s.points, o.s.rows, o.s.out_features}, input.options());
  }
  at::Tensor y = algorithm(o, coeffs);
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
}
