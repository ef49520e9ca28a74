// CPU kernel of mlifast::multipoint_linear (schema and shapes in csrc/ops.cpp).
//
// Two algorithms; neither ever holds more than one extra copy of the weight:
//  * stacked: one GEMM of the input rows against W and one against all J directions,
//    then a fused per-row combine  y = x·Wᵀ + b_k + Σ_j c_kj · (x·D_jᵀ).
//    (J+1)× the FLOPs of a plain linear layer, but one pass over the weights; it is the
//    only choice for a shared input (R rows computed once instead of K·R times).
//  * per-point weights: for each point form W_k = W + Σ_j c_kj·D_j in one reused buffer
//    (ATen's vectorised add) and run one GEMM on that point's rows. 1× FLOPs plus J axpys
//    over the weight per point, which pays from kPerPointWeightMinRows rows per point.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "multipoint_linear_checks.h"

namespace mlifast {
namespace {

// Forming W_k costs J·O·I memory-bound multiply-adds per point; the stacked form costs
// J·R·O·I extra GEMM multiply-adds. Measured on the 2-core CI CPU (K=16, I=O=1024, J=1,
// float32; benchmarks/crossover.py): stacked 8.7 ms vs per-point
// 13.2 ms at 32 rows, even at 64, per-point ahead from ~96 (24.7 vs 34.5 ms at 128).
constexpr int64_t kPerPointWeightMinRows = 64;

// (K, O): b + Σ_j c_kj·db_j in the weight's dtype, or an undefined tensor without bias.
at::Tensor point_biases(const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bias_dirs,
                        const at::Tensor& coeffs) {
  if (!bias.has_value()) return at::Tensor();
  const auto opmath = at::toOpMathType(bias->scalar_type());
  at::Tensor b = bias->to(opmath).unsqueeze(0).expand({coeffs.size(0), bias->size(0)});
  if (bias_dirs.has_value()) b = at::addmm(b, coeffs.to(opmath), bias_dirs->to(opmath));
  return b.to(bias->scalar_type()).contiguous();
}

// y[k, r, :] = base[row, :] + bias_k[k, :] + Σ_j c[k, j]·dirs[row, j·O : (j+1)·O],
// row = r for a shared input, k·R + r otherwise. base: (rows, O), dirs: (rows, J·O).
template <typename scalar_t>
void combine_rows(const at::Tensor& base, const at::Tensor& dirs, const at::Tensor& bias_k,
                  const at::Tensor& coeffs, at::Tensor& y, const LinearSizes& s) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* base_p = base.const_data_ptr<scalar_t>();
  const scalar_t* dirs_p = dirs.const_data_ptr<scalar_t>();
  const scalar_t* bias_p = bias_k.defined() ? bias_k.const_data_ptr<scalar_t>() : nullptr;
  const at::Tensor c = coeffs.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
  const opmath_t* c_p = c.const_data_ptr<opmath_t>();
  scalar_t* y_p = y.data_ptr<scalar_t>();
  const int64_t O = s.out_features, J = s.directions, R = s.rows;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, O * (J + 1)));
  at::parallel_for(0, s.points * R, grain, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> acc(O);
    for (int64_t kr = begin; kr < end; ++kr) {
      const int64_t k = kr / R;
      const int64_t row = s.shared_input ? kr % R : kr;
      const scalar_t* base_row = base_p + row * O;
      for (int64_t o = 0; o < O; ++o) acc[o] = static_cast<opmath_t>(base_row[o]);
      if (bias_p != nullptr) {
        for (int64_t o = 0; o < O; ++o) acc[o] += static_cast<opmath_t>(bias_p[k * O + o]);
      }
      for (int64_t j = 0; j < J; ++j) {
        const opmath_t cj = c_p[k * J + j];
        const scalar_t* dir_row = dirs_p + row * J * O + j * O;
        for (int64_t o = 0; o < O; ++o) acc[o] += cj * static_cast<opmath_t>(dir_row[o]);
      }
      scalar_t* y_row = y_p + kr * O;
      for (int64_t o = 0; o < O; ++o) y_row[o] = static_cast<scalar_t>(acc[o]);
    }
  });
}

at::Tensor stacked(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_dirs,
                   const at::Tensor& bias_k, const at::Tensor& coeffs, const LinearSizes& s) {
  const at::Tensor rows = input.reshape({(s.shared_input ? 1 : s.points) * s.rows, s.in_features});
  const at::Tensor base = at::mm(rows, weight.t()).contiguous();
  const at::Tensor dirs =
      at::mm(rows, weight_dirs.reshape({s.directions * s.out_features, s.in_features}).t()).contiguous();
  at::Tensor y = at::empty({s.points, s.rows, s.out_features}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "multipoint_linear_combine",
                                  [&] { combine_rows<scalar_t>(base, dirs, bias_k, coeffs, y, s); });
  return y;
}

at::Tensor per_point_weights(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_dirs,
                             const at::Tensor& bias_k, const at::Tensor& coeffs, const LinearSizes& s) {
  const at::Tensor w = weight.contiguous();
  const at::Tensor d = weight_dirs.contiguous();
  const at::Tensor c = coeffs.to(at::kDouble).cpu();
  const double* c_p = c.const_data_ptr<double>();
  at::Tensor w_k = at::empty_like(w);
  at::Tensor y = at::empty({s.points, s.rows, s.out_features}, input.options());
  for (int64_t k = 0; k < s.points; ++k) {
    // W_k = W + Σ_j c_kj·D_j with ATen's vectorised, threaded add.
    at::add_out(w_k, w, d[0], c_p[k * s.directions]);
    for (int64_t j = 1; j < s.directions; ++j) w_k.add_(d[j], c_p[k * s.directions + j]);
    at::Tensor y_k = y.select(0, k);
    const at::Tensor x_k = input.select(0, k);
    if (bias_k.defined()) {
      at::addmm_out(y_k, bias_k.select(0, k), x_k, w_k.t());
    } else {
      at::mm_out(y_k, x_k, w_k.t());
    }
  }
  return y;
}

at::Tensor multipoint_linear_cpu(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& weight_dirs,
                                 const std::optional<at::Tensor>& bias_dirs, const at::Tensor& coeffs) {
  const LinearSizes s = check_multipoint_linear(input, weight, bias, weight_dirs, bias_dirs, coeffs);
  const at::Tensor bias_k = point_biases(bias, bias_dirs, coeffs);
  if (s.points * s.rows * s.out_features == 0) {
    return at::empty({s.points, s.rows, s.out_features}, input.options());
  }
  if (!s.shared_input && s.rows >= kPerPointWeightMinRows) {
    return per_point_weights(input, weight, weight_dirs, bias_k, coeffs, s);
  }
  return stacked(input, weight, weight_dirs, bias_k, coeffs, s);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlifast, CPU, m) { m.impl("multipoint_linear", &multipoint_linear_cpu); }

}  // namespace mlifast
