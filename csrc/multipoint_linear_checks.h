// Argument checks of mlifast::multipoint_linear shared by every backend. The Python face
// (mlifast/ops/linear.py) raises friendlier ValueErrors first; these guard direct callers
// of torch.ops.mlifast.multipoint_linear.
#pragma once

#include <ATen/ATen.h>

namespace mlifast {

struct LinearSizes {
  int64_t points;        // K
  int64_t rows;          // R, rows per point
  int64_t in_features;   // I
  int64_t out_features;  // O
  int64_t directions;    // J
  bool shared_input;     // input is (R, I), the same for every point
};

// bias (O,) and bias_dirs (J, O), each optional; bias_dirs only with a bias.
inline void check_bias_shapes(const char* op, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& bias_dirs, const LinearSizes& s) {
  if (bias.has_value()) {
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({s.out_features}), op, "expected bias of shape (",
                s.out_features, ",), got ", bias->sizes());
  }
  if (bias_dirs.has_value()) {
    TORCH_CHECK(bias.has_value(), op, "bias_dirs given without bias");
    TORCH_CHECK(bias_dirs->sizes() == at::IntArrayRef({s.directions, s.out_features}), op,
                "expected bias_dirs of shape (", s.directions, ", ", s.out_features, "), got ",
                bias_dirs->sizes());
  }
}

inline LinearSizes check_multipoint_linear(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& weight_dirs, const std::optional<at::Tensor>& bias_dirs, const at::Tensor& coeffs) {
  constexpr const char* op = "mlifast::multipoint_linear: ";
  TORCH_CHECK(weight.dim() == 2, op, "expected weight of shape (O, I), got ", weight.sizes());
  TORCH_CHECK(input.dim() == 2 || input.dim() == 3, op,
              "expected input of shape (K, R, I) or (R, I), got ", input.sizes());
  TORCH_CHECK(coeffs.dim() == 2, op, "expected coeffs of shape (K, J), got ", coeffs.sizes());
  LinearSizes s{coeffs.size(0), input.size(input.dim() - 2), weight.size(1), weight.size(0),
                coeffs.size(1), input.dim() == 2};
  TORCH_CHECK(s.directions >= 1, op, "expected at least one direction, got coeffs ", coeffs.sizes());
  TORCH_CHECK(input.size(-1) == s.in_features, op, "expected input's last dim ", s.in_features,
              " (weight is ", weight.sizes(), "), got ", input.sizes());
  TORCH_CHECK(s.shared_input || input.size(0) == s.points, op, "expected input of shape (",
              s.points, ", R, ", s.in_features, ") for ", s.points, " points, got ", input.sizes());
  TORCH_CHECK(weight_dirs.sizes() == at::IntArrayRef({s.directions, s.out_features, s.in_features}),
              op, "expected weight_dirs of shape (", s.directions, ", ", s.out_features, ", ",
              s.in_features, "), got ", weight_dirs.sizes());
  check_bias_shapes(op, bias, bias_dirs, s);
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op, "expected a floating-point weight, got ",
              weight.scalar_type());
  TORCH_CHECK(at::isFloatingType(coeffs.scalar_type()), op, "expected floating-point coeffs, got ",
              coeffs.scalar_type());
  for (const at::Tensor* t : {&input, &weight_dirs}) {
    TORCH_CHECK(t->scalar_type() == weight.scalar_type(), op, "expected every tensor in ",
                weight.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == weight.device(), op, "expected every tensor on ", weight.device(),
                ", got ", t->device());
  }
  for (const auto* t : {&bias, &bias_dirs}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->scalar_type() == weight.scalar_type(), op, "expected every tensor in ",
                  weight.scalar_type(), ", got ", (*t)->scalar_type());
      TORCH_CHECK((*t)->device() == weight.device(), op, "expected every tensor on ",
                  weight.device(), ", got ", (*t)->device());
    }
  }
  TORCH_CHECK(coeffs.device() == weight.device(), op, "expected coeffs on ", weight.device(),
              ", got ", coeffs.device());
  return s;
}

// mlifast::multipoint_combine: base (R, O), along (R, J, O), bias (O,), bias_dirs (J, O),
// coeffs (K, J). Sizes as a multipoint_linear of a shared input (in_features unused: 0).
inline LinearSizes check_multipoint_combine(const at::Tensor& base, const at::Tensor& along,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& bias_dirs,
                                            const at::Tensor& coeffs) {
  constexpr const char* op = "mlifast::multipoint_combine: ";
  TORCH_CHECK(base.dim() == 2, op, "expected base of shape (R, O), got ", base.sizes());
  TORCH_CHECK(coeffs.dim() == 2, op, "expected coeffs of shape (K, J), got ", coeffs.sizes());
  LinearSizes s{coeffs.size(0), base.size(0), 0, base.size(1), coeffs.size(1), true};
  TORCH_CHECK(s.directions >= 1, op, "expected at least one direction, got coeffs ", coeffs.sizes());
  TORCH_CHECK(along.sizes() == at::IntArrayRef({s.rows, s.directions, s.out_features}), op,
              "expected along of shape (", s.rows, ", ", s.directions, ", ", s.out_features, "), got ",
              along.sizes());
  check_bias_shapes(op, bias, bias_dirs, s);
  TORCH_CHECK(at::isFloatingType(base.scalar_type()), op, "expected a floating-point base, got ",
              base.scalar_type());
  TORCH_CHECK(at::isFloatingType(coeffs.scalar_type()), op, "expected floating-point coeffs, got ",
              coeffs.scalar_type());
  TORCH_CHECK(coeffs.device() == base.device(), op, "expected coeffs on ", base.device(), ", got ",
              coeffs.device());
  const at::Tensor* bias_p = bias.has_value() ? &*bias : nullptr;
  const at::Tensor* bias_dirs_p = bias_dirs.has_value() ? &*bias_dirs : nullptr;
  for (const at::Tensor* t : {&along, bias_p, bias_dirs_p}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->scalar_type() == base.scalar_type(), op, "expected every tensor in ", base.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == base.device(), op, "expected every tensor on ", base.device(), ", got ",
                t->device());
  }
  return s;
}

}  // namespace mlifast
