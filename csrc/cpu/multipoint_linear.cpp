// CPU kernel of mlifast::multipoint_linear (schema and shapes in csrc/ops.cpp).
//
// Three algorithms; none ever holds more than one extra copy of the weight:
//  * stacked: one GEMM of the input rows against W and one against all J directions,
//    then a fused per-row combine  y = x·Wᵀ + b_k + Σ_j c_kj · (x·D_jᵀ).
//    (J+1)× the FLOPs of a plain linear layer, but one pass over the weights; it is the
//    only choice for a shared input (R rows computed once instead of K·R times).
//  * per-point weights: for each point form W_k = W + Σ_j c_kj·D_j in one reused buffer
//    (ATen's vectorised add; the buffer is kept between calls, see weight_workspace) and
//    run one GEMM on that point's rows. 1× FLOPs plus J axpys over the weight per point,
//    which pays from kPerPointWeightMinRows rows per point.
//  * weights formed in registers (float32, kFormedWeightMinRows to kFormedWeightMaxRows
//    rows per point, where it beats both others; csrc/cpu/formed_weight_linear.h): W and D
//    packed into panels in cache a block of output features at a time, each point's W_k
//    formed one vector at a time right before it multiplies that point's rows. 1 + J/8
//    multiply-adds per useful one, one pass over the weights.
//
// mlifast::multipoint_combine is the stacked algorithm's second half alone, for callers
// that keep x·Wᵀ and x·Dᵀ of a shared input and combine them for one group of points at
// a time (mlifast/multipoint: points evaluated in cache-sized groups on the CPU).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "formed_weight_linear.h"
#include "kept_scratch.h"
#include "multipoint_linear_checks.h"
#include "vector_width.h"

namespace mlifast {
namespace {

// Forming W_k costs J·O·I memory-bound multiply-adds per point; the stacked form costs
// J·R·O·I extra GEMM multiply-adds. Measured on the 2-core CI CPU (K=16, I=O=1024, J=1,
// float32; benchmarks/crossover.py): stacked 8.7 ms vs per-point
// 13.2 ms at 32 rows, even at 64, per-point ahead from ~96 (24.7 vs 34.5 ms at 128).
constexpr int64_t kPerPointWeightMinRows = 64;

// Weights formed in registers (float32) against the stacked form below them and per-point
// weights above; same CPU, 2 threads, K = 16, O × I = 1024² | 4096 × 1024, one
// direction, ms (formed / the other):
//   rows   1: 1.25 / 0.68 (stacked) | 4.47 / 2.65      rows  96: 17.4 / 18.4 (per-point) | 71.0 / 72.6
//   rows   3: 1.31 / 1.13           | 4.72 / 4.14      rows 128: 23.2 / 21.8             | 102.6 / 99.6
//   rows   4: 1.30 / 1.37           | 4.77 / 5.11      rows 256: 48.5 / 36.3             | 202.4 / 161.7
//   rows   8: 1.62 / 2.34 (two GEMMs in PyTorch) | 6.31 / 8.82
// and, K = 256, 127 rows, one thread: 1076 against 683 ms for per-point weights at 128.
// With one row a tile, two vectors of sums cannot hide the FMA latency. Every block of
// output features reads all the input rows again: up to 32 MiB of them (K = 256, 32 rows,
// I = 1024: 123 against 140 ms for the two GEMMs), beyond that they come from memory. A
// thread takes whole blocks of 32 output features, at least two of them.
constexpr int64_t kFormedWeightMinRows = 4;
constexpr int64_t kFormedWeightMaxRows = 95;
constexpr int64_t kFormedWeightMaxInputBytes = int64_t{32} << 20;
constexpr int64_t kFormedWeightMinFeaturesPerThread = 64;

bool formed_weights_apply(const at::Tensor& input, const LinearSizes& s) {
  return !s.shared_input && input.scalar_type() == at::kFloat && s.in_features > 0 &&
         s.rows >= kFormedWeightMinRows && s.rows <= kFormedWeightMaxRows &&
         s.points * s.rows * s.in_features * int64_t{sizeof(float)} <= kFormedWeightMaxInputBytes &&
         s.out_features >= kFormedWeightMinFeaturesPerThread * at::get_num_threads();
}

// (K, O): b + Σ_j c_kj·db_j in the weight's dtype, or an undefined tensor without bias.
at::Tensor point_biases(const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bias_dirs,
                        const at::Tensor& coeffs) {
  if (!bias.has_value()) return at::Tensor();
  const auto opmath = at::toOpMathType(bias->scalar_type());
  at::Tensor b = bias->to(opmath).unsqueeze(0).expand({coeffs.size(0), bias->size(0)});
  if (bias_dirs.has_value()) b = at::addmm(b, coeffs.to(opmath), bias_dirs->to(opmath));
  return b.to(bias->scalar_type()).contiguous();
}

// out[o] = base[o] (+ bias[o]) + Σ_j c[j]·dirs[j·O + o] in opmath_t, then max(·, 0) if
// `relu` (NaN stays NaN, in the last direction's pass), in branch-free loops the compiler
// vectorises (restrict: nothing aliases; float and double write the output row directly).
template <typename scalar_t, typename opmath_t>
inline void combine_row(const scalar_t* __restrict base, const scalar_t* __restrict bias,
                        const scalar_t* __restrict dirs, const opmath_t* __restrict c, int64_t J, int64_t O,
                        bool relu, opmath_t* __restrict out) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t o = 0; o < O; ++o) out[o] = static_cast<opmath_t>(base[o]) + static_cast<opmath_t>(bias[o]);
  } else {
#pragma omp simd
    for (int64_t o = 0; o < O; ++o) out[o] = static_cast<opmath_t>(base[o]);
  }
  for (int64_t j = 0; j < J; ++j) {
    const opmath_t cj = c[j];
    const scalar_t* __restrict d = dirs + j * O;
    if (relu && j == J - 1) {
#pragma omp simd
      for (int64_t o = 0; o < O; ++o) {
        const opmath_t v = out[o] + cj * static_cast<opmath_t>(d[o]);
        out[o] = v < opmath_t(0) ? opmath_t(0) : v;
      }
    } else {
#pragma omp simd
      for (int64_t o = 0; o < O; ++o) out[o] += cj * static_cast<opmath_t>(d[o]);
    }
  }
}

// y[k, r, :] = base[row, :] + bias_k[k, :] + Σ_j c[k, j]·dirs[row, j·O : (j+1)·O],
// row = r for a shared input, k·R + r otherwise. base: (rows, O), dirs: (rows, J·O).
// A shared input's rows are visited once, each combined for every point while it is in
// L1: base and dirs are read once per call, not once per point.
template <typename scalar_t>
void combine_rows(const at::Tensor& base, const at::Tensor& dirs, const at::Tensor& bias_k,
                  const at::Tensor& coeffs, bool relu, at::Tensor& y, const LinearSizes& s) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* base_p = base.const_data_ptr<scalar_t>();
  const scalar_t* dirs_p = dirs.const_data_ptr<scalar_t>();
  const scalar_t* bias_p = bias_k.defined() ? bias_k.const_data_ptr<scalar_t>() : nullptr;
  const at::Tensor c = coeffs.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
  const opmath_t* c_p = c.const_data_ptr<opmath_t>();
  scalar_t* y_p = y.data_ptr<scalar_t>();
  const int64_t O = s.out_features, J = s.directions, R = s.rows;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, O * (J + 1)));
  const int64_t K = s.points;
  at::parallel_for(0, K * R, grain, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> acc(std::is_same_v<scalar_t, opmath_t> ? 0 : O);
    for (int64_t i = begin; i < end; ++i) {
      // shared input: i = r·K + k (row-major, the row reused across points); else i = k·R + r.
      const int64_t k = s.shared_input ? i % K : i / R;
      const int64_t row = s.shared_input ? i / K : i;
      const int64_t kr = s.shared_input ? k * R + row : i;
      const scalar_t* bias_row = bias_p != nullptr ? bias_p + k * O : nullptr;
      scalar_t* y_row = y_p + kr * O;
      const scalar_t* base_row = base_p + row * O;
      const scalar_t* dirs_row = dirs_p + row * J * O;
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        combine_row<scalar_t, opmath_t>(base_row, bias_row, dirs_row, c_p + k * J, J, O, relu, y_row);
      } else {  // half, bfloat16: accumulate in float, round once
        combine_row<scalar_t, opmath_t>(base_row, bias_row, dirs_row, c_p + k * J, J, O, relu, acc.data());
        for (int64_t o = 0; o < O; ++o) y_row[o] = static_cast<scalar_t>(acc[o]);
      }
    }
  });
}

void stacked(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_dirs,
             const at::Tensor& bias_k, const at::Tensor& coeffs, bool relu, const LinearSizes& s, at::Tensor& y) {
  const at::Tensor rows = input.reshape({(s.shared_input ? 1 : s.points) * s.rows, s.in_features});
  const at::Tensor base = at::mm(rows, weight.t()).contiguous();
  const at::Tensor dirs =
      at::mm(rows, weight_dirs.reshape({s.directions * s.out_features, s.in_features}).t()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "multipoint_linear_combine",
                                  [&] { combine_rows<scalar_t>(base, dirs, bias_k, coeffs, relu, y, s); });
}

at::Tensor multipoint_combine_cpu(const at::Tensor& base, const at::Tensor& along,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& bias_dirs, const at::Tensor& coeffs,
                                  bool relu) {
  const LinearSizes s = check_multipoint_combine(base, along, bias, bias_dirs, coeffs);
  at::Tensor y = at::empty({s.points, s.rows, s.out_features}, base.options());  // first (multipoint_linear_cpu)
  if (y.numel() == 0) return y;
  const at::Tensor bias_k = point_biases(bias, bias_dirs, coeffs);
  const at::Tensor base_c = base.contiguous();
  const at::Tensor along_c = along.contiguous().reshape({s.rows, s.directions * s.out_features});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, base.scalar_type(), "multipoint_combine",
                                  [&] { combine_rows<scalar_t>(base_c, along_c, bias_k, coeffs, relu, y, s); });
  return y;
}

// A buffer for W_k of `like`'s shape, kept between calls up to kKeptWorkspaceBytes (one per
// thread): evaluation calls the op once per layer, batch and group of points.
constexpr int64_t kKeptWorkspaceBytes = int64_t{32} << 20;

at::Tensor weight_workspace(const at::Tensor& like) {
  static thread_local at::Tensor kept;
  return kept_scratch(kept, like.sizes(), like.options(), kKeptWorkspaceBytes);
}

// y_k (R, O) = max(y_k + bias, 0) (bias (O,) if given; NaN stays NaN): one pass over each
// row, in branch-free loops the compiler vectorises.
template <typename scalar_t>
void add_bias_relu(at::Tensor& y_k, const at::Tensor& bias) {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* y_p = y_k.data_ptr<scalar_t>();
  const scalar_t* b_p = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  const int64_t R = y_k.size(0), O = y_k.size(1);
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, O)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* __restrict row = y_p + r * O;
      if (b_p != nullptr) {
#pragma omp simd
        for (int64_t o = 0; o < O; ++o) {
          const opmath_t v = static_cast<opmath_t>(row[o]) + static_cast<opmath_t>(b_p[o]);
          row[o] = static_cast<scalar_t>(v < opmath_t(0) ? opmath_t(0) : v);
        }
      } else {
#pragma omp simd
        for (int64_t o = 0; o < O; ++o) row[o] = row[o] < scalar_t(0) ? scalar_t(0) : row[o];
      }
    }
  });
}

void per_point_weights(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_dirs,
                       const at::Tensor& bias_k, const at::Tensor& coeffs, bool relu, const LinearSizes& s,
                       at::Tensor& y) {
  const at::Tensor w = weight.contiguous();
  const at::Tensor d = weight_dirs.contiguous();
  const at::Tensor c = coeffs.to(at::kDouble).cpu().contiguous();  // (read by index below)
  const double* c_p = c.const_data_ptr<double>();
  at::Tensor w_k = weight_workspace(w);
  for (int64_t k = 0; k < s.points; ++k) {
    // W_k = W + Σ_j c_kj·D_j with ATen's vectorised, threaded add.
    at::add_out(w_k, w, d[0], c_p[k * s.directions]);
    for (int64_t j = 1; j < s.directions; ++j) w_k.add_(d[j], c_p[k * s.directions + j]);
    at::Tensor y_k = y.select(0, k);
    at::mm_out(y_k, input.select(0, k), w_k.t());
    // The bias (and ReLU) applied while y_k is still in cache: addmm would first copy the
    // bias into all of y_k and have the GEMM read y_k back (W1's 1000×1024 rows a point:
    // 0.37 vs 0.38 s for 50 points, on the 2-core CI CPU).
    if (relu) {
      const at::Tensor b = bias_k.defined() ? bias_k.select(0, k) : at::Tensor();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "multipoint_linear_relu",
                                      [&] { add_bias_relu<scalar_t>(y_k, b); });
    } else if (bias_k.defined()) {
      y_k.add_(bias_k.select(0, k));
    }
  }
}

// One copy of the formed-weight blocks per instruction set (formed_weight_linear.h inlined,
// so compiled for it); `vector_bytes()` picks one at run time.
__attribute__((target("avx512f,avx2,fma"))) void formed_blocks_64(const formed::Job& j, int64_t b, int64_t e,
                                                                   float* scratch) {
  formed::blocks<64>(j, b, e, scratch);
}
__attribute__((target("avx2,fma"))) void formed_blocks_32(const formed::Job& j, int64_t b, int64_t e, float* scratch) {
  formed::blocks<32>(j, b, e, scratch);
}
void formed_blocks_16(const formed::Job& j, int64_t b, int64_t e, float* scratch) {
  formed::blocks<16>(j, b, e, scratch);
}

template <int Bytes>
void formed_weights_with(formed::Job job, void (*blocks)(const formed::Job&, int64_t, int64_t, float*)) {
  static thread_local at::Tensor kept_rows;
  const at::Tensor rows =
      kept_scratch(kept_rows, {formed::interleaved_floats<Bytes>(job)}, at::kFloat, kKeptWorkspaceBytes);
  job.interleaved = rows.data_ptr<float>();
  at::parallel_for(0, job.K, 1, [&](int64_t begin, int64_t end) { formed::interleave_rows<Bytes>(job, begin, end); });
  const int64_t NB = formed::tile_features<Bytes>(), blocks_count = (job.O + NB - 1) / NB;
  at::parallel_for(0, blocks_count, 1, [&](int64_t begin, int64_t end) {
    static thread_local at::Tensor kept_panels;
    const at::Tensor panels = kept_scratch(kept_panels, {formed::scratch_floats<Bytes>(job, end == blocks_count)},
                                           at::kFloat, kKeptWorkspaceBytes);
    blocks(job, begin, end, panels.data_ptr<float>());
  });
}

void formed_weights(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& weight_dirs,
                    const at::Tensor& bias_k, const at::Tensor& coeffs, bool relu, const LinearSizes& s,
                    at::Tensor& y) {
  const at::Tensor x = input.contiguous(), w = weight.contiguous(), d = weight_dirs.contiguous();
  const at::Tensor c = coeffs.to(at::kFloat).contiguous();
  const formed::Job job{x.const_data_ptr<float>(), nullptr, w.const_data_ptr<float>(), d.const_data_ptr<float>(),
                        c.const_data_ptr<float>(), bias_k.defined() ? bias_k.const_data_ptr<float>() : nullptr,
                        y.data_ptr<float>(), s.points, s.rows, s.in_features, s.out_features, s.directions, relu};
  switch (vector_bytes()) {
    case 64: return formed_weights_with<64>(job, formed_blocks_64);
    case 32: return formed_weights_with<32>(job, formed_blocks_32);
    default: return formed_weights_with<16>(job, formed_blocks_16);
  }
}

at::Tensor multipoint_linear_cpu(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& weight_dirs,
                                 const std::optional<at::Tensor>& bias_dirs, const at::Tensor& coeffs,
                                 bool relu) {
  const LinearSizes s = check_multipoint_linear(input, weight, bias, weight_dirs, bias_dirs, coeffs);
  // The output is allocated before any temporary: glibc then reuses its memory from call to
  // call, where allocated after small temporaries it came back freshly mapped each time (a
  // page fault per 4 KiB: 1000×1024 float32 per point cost 3× its writes).
  at::Tensor y = at::empty({s.points, s.rows, s.out_features}, input.options());
  if (y.numel() == 0) return y;
  const at::Tensor bias_k = point_biases(bias, bias_dirs, coeffs);
  if (formed_weights_apply(input, s)) {
    formed_weights(input, weight, weight_dirs, bias_k, coeffs, relu, s, y);
  } else if (!s.shared_input && s.rows >= kPerPointWeightMinRows) {
    per_point_weights(input, weight, weight_dirs, bias_k, coeffs, relu, s, y);
  } else {
    stacked(input, weight, weight_dirs, bias_k, coeffs, relu, s, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mlifast, CPU, m) {
  m.impl("multipoint_linear", &multipoint_linear_cpu);
  m.impl("multipoint_combine", &multipoint_combine_cpu);
}

}  // namespace mlifast
