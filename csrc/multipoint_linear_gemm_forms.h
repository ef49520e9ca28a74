// The GEMM forms of mlifast::multipoint_linear that the CUDA glue dispatches between
// (csrc/cuda/multipoint_linear_cuda.cpp: cuBLAS through ATen), written against ATen alone so
// that the CPU build runs them too: the private operator
// mlifast::_multipoint_linear_gemm_form (csrc/cpu/gemm_forms.cpp) checks them against the
// oracle in the tests on any machine (tests/test_ops_linear.py).
//
//   x: (K or 1, R, I) contiguous (1: the input shared by every point)   w: (O, I)   d: (J, O, I)
//   b: (O,) or undefined   db: (J, O) or undefined   c: (K, J) in x's dtype
//   -> y (K, R, O) = x_k · (w + Σ_j c_kj·d_j)ᵀ + b + Σ_j c_kj·db_j
#pragma once

#include <algorithm>

#include <ATen/ATen.h>

#include "multipoint_linear_checks.h"

namespace mlifast::gemm_forms {

struct Operands {
  LinearSizes s;
  at::Tensor x, w, b, d, db, c;  // (b, db: undefined when absent; c in x's dtype)
};

// The checked sizes and the operands contiguous, the coefficients in the input's dtype (the
// GEMM forms compute in it, coefficients included).
inline Operands operands(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& weight_dirs, const std::optional<at::Tensor>& bias_dirs,
                         const at::Tensor& coeffs) {
  const LinearSizes s = check_multipoint_linear(input, weight, bias, weight_dirs, bias_dirs, coeffs);
  return {s, input.contiguous(), weight.contiguous(), bias.has_value() ? bias->contiguous() : at::Tensor(),
          weight_dirs.contiguous(), bias_dirs.has_value() ? bias_dirs->contiguous() : at::Tensor(),
          coeffs.to(input.scalar_type()).contiguous()};
}

// (K, O): b + Σ_j c_kj·db_j, or an undefined tensor without bias.
inline at::Tensor point_biases(const at::Tensor& b, const at::Tensor& db, const at::Tensor& c) {
  if (!b.defined()) return at::Tensor();
  const at::Tensor expanded = b.unsqueeze(0).expand({c.size(0), b.size(0)});
  return db.defined() ? at::addmm(expanded, c, db) : expanded.contiguous();
}

// Two GEMMs over the rows of every point (or the shared rows once), the origin's bias and
// the directions' in their epilogues, then the combine in place:
//   base = x·wᵀ + b,  along_j = x·d_jᵀ + db_j,  y_k = base_k + Σ_j c_kj·along_j,k
// (J+1)× the FLOPs, w and d read once; three launches for J = 1.
inline at::Tensor stacked(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& d,
                          const at::Tensor& db, const at::Tensor& c, const LinearSizes& s) {
  const int64_t points = s.shared_input ? 1 : s.points;
  const at::Tensor rows = x.view({points * s.rows, s.in_features});
  const at::Tensor base = (b.defined() ? at::addmm(b, rows, w.t()) : at::mm(rows, w.t()))
                              .view({points, s.rows, s.out_features});
  const at::Tensor d_rows = d.view({s.directions * s.out_features, s.in_features}).t();
  const at::Tensor along = (db.defined() ? at::addmm(db.reshape(-1), rows, d_rows) : at::mm(rows, d_rows))
                               .view({points, s.rows, s.directions, s.out_features});
  const auto coefficient = [&](int64_t j) { return c.select(1, j).view({s.points, 1, 1}); };
  // (shared rows: the first addcmul broadcasts the one base to every point)
  at::Tensor y = s.shared_input ? at::addcmul(base, along.select(2, 0), coefficient(0))
                                : base.addcmul_(along.select(2, 0), coefficient(0));
  for (int64_t j = 1; j < s.directions; ++j) {
    y.addcmul_(along.select(2, j), coefficient(j));
  }
  return y;
}

// W_k = w + Σ_j c_kj·d_j for `group` points at a time in one reused buffer, then one batched
// GEMM of the group's rows against them: 1× the FLOPs, (J+2) weight-sized passes a point.
// Not for a shared input.
inline at::Tensor per_point_weights(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                    const at::Tensor& d, const at::Tensor& db, const at::Tensor& c,
                                    const LinearSizes& s, int64_t group) {
  group = std::clamp<int64_t>(group, 1, s.points);
  const at::Tensor bias_k = point_biases(b, db, c);
  const at::Tensor w_group = at::empty({group, s.out_features, s.in_features}, w.options());
  at::Tensor y = at::empty({s.points, s.rows, s.out_features}, x.options());
  for (int64_t first = 0; first < s.points; first += group) {
    const int64_t n = std::min(group, s.points - first);
    // (element-wise, the coefficients read on the device: no host sync)
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

// The form `points_per_gemm` names (0: stacked; n > 0: per-point weights, n points a GEMM):
// mlifast::_multipoint_linear_gemm_form on either device.
inline at::Tensor named_form(const Operands& o, int64_t points_per_gemm) {
  TORCH_CHECK(points_per_gemm >= 0, "mlifast::_multipoint_linear_gemm_form: points_per_gemm must be 0 (the "
              "stacked form) or positive (per-point weights), got ", points_per_gemm);
  TORCH_CHECK(points_per_gemm == 0 || !o.s.shared_input,
              "mlifast::_multipoint_linear_gemm_form: per-point weights need an input of shape (K, R, I)");
  return points_per_gemm > 0 ? per_point_weights(o.x, o.w, o.b, o.d, o.db, o.c, o.s, points_per_gemm)
                             : stacked(o.x, o.w, o.b, o.d, o.db, o.c, o.s);
}

}  // namespace mlifast::gemm_forms
