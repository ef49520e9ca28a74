// CPU kernel of mlifast::relu_line_linear (schema in csrc/ops.cpp): the linear layer after
// a ReLU, at K points of a line, when the ReLU's input is itself affine along the line.
// A LeakyReLU of slope α too: below, an inactive unit then counts α times, and a switch
// adds or removes (1 − α) times its terms.
//
// The first two layers of an MLP on a line θ0 + c·d see the same input x at every point,
// so the first layer's output is affine in c: z_k = a + c_k·e (a = x·W1ᵀ + b1 at the
// origin, e = x·D1ᵀ + db1 along d). The second layer computes
//     y_k = relu(a + c_k·e) · (W + c_k·D)ᵀ + b + c_k·db.
// Where unit i is active (a_i + c_k·e_i > 0) it adds
//     (a_i + c_k e_i)(W_:i + c_k D_:i) = a_i W_:i + c_k (a_i D_:i + e_i W_:i) + c_k² e_i D_:i,
// so each row of y_k is U + c_k·V + c_k²·Z, with U, V, Z summed over the active units. As c
// grows a + c·e is monotone: each unit switches on or off at most once along the line.
// With the points sorted by c:
//   1. the units active at the first point give U, V, Z by two GEMMs of the masked rows
//      [a; e] (2R × I), one against Wᵀ and one against Dᵀ: 4 of the K per-point GEMMs' FLOPs;
//   2. going to the next point adds or removes the units switching between the two:
//      4 multiply-adds per output column and switch;
//   3. each point's row is U + c_k(V + c_k Z) + its bias: 3 multiply-adds per output.
// FLOPs 2·(4·R·I·O + 4·O·switches + 3·K·R·O) instead of 2·K·R·I·O: on W1 (K = 50, R = 1000,
// I = O = 1024, half the units switching) about 12% of the per-point GEMMs'.
//
// Steps 2 and 3 run row by row through a few column tiles of W and D at a time (packed tile
// by tile, they stay in L2 while every row's switches go through them), with the tile's
// U, V, Z in registers. Non-finite inputs (NaN must stay NaN, an infinite unit never
// switches cleanly) take the per-point form instead: h_k = relu(a + c_k e), then one GEMM
// per point.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "kept_scratch.h"
#include "vector_width.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace mlifast {
namespace {

constexpr const char* kOp = "mlifast::relu_line_linear: ";

struct LineSizes {
  int64_t points, rows, in_features, out_features;
};

LineSizes check_relu_line_linear(const at::Tensor& base, const at::Tensor& along, const at::Tensor& weight,
                                 const at::Tensor& weight_dir, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& bias_dir, const at::Tensor& coeffs) {
  TORCH_CHECK(base.dim() == 2, kOp, "expected base of shape (R, I), got ", base.sizes());
  TORCH_CHECK(weight.dim() == 2, kOp, "expected weight of shape (O, I), got ", weight.sizes());
  TORCH_CHECK(coeffs.dim() == 1, kOp, "expected coeffs of shape (K,), got ", coeffs.sizes());
  const LineSizes s{coeffs.size(0), base.size(0), base.size(1), weight.size(0)};
  TORCH_CHECK(along.sizes() == base.sizes(), kOp, "expected along of base's shape ", base.sizes(), ", got ",
              along.sizes());
  TORCH_CHECK(weight.size(1) == s.in_features, kOp, "expected weight of shape (O, ", s.in_features, "), got ",
              weight.sizes());
  TORCH_CHECK(weight_dir.sizes() == weight.sizes(), kOp, "expected weight_dir of weight's shape ", weight.sizes(),
              ", got ", weight_dir.sizes());
  for (const auto* b : {&bias, &bias_dir}) {
    TORCH_CHECK(!b->has_value() || (*b)->sizes() == at::IntArrayRef({s.out_features}), kOp,
                "expected bias and bias_dir of shape (", s.out_features, ",), got ", (*b)->sizes());
  }
  TORCH_CHECK(!bias_dir.has_value() || bias.has_value(), kOp, "bias_dir given without bias");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, kOp, "expected float32 or float64, got ", dtype);
  for (const at::Tensor* t : {&base, &along, &weight_dir, &coeffs}) {
    TORCH_CHECK(t->scalar_type() == dtype, kOp, "expected every tensor in ", dtype, ", got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), kOp, "expected CPU tensors, got one on ", t->device());
  }
  for (const auto* b : {&bias, &bias_dir}) {
    TORCH_CHECK(!b->has_value() || (*b)->scalar_type() == dtype, kOp, "expected every tensor in ", dtype);
  }
  return s;
}

// One unit of one row switching on (+) or off (−) between two consecutive sorted points:
// its ± a_i and ± e_i, and i.
template <typename scalar_t>
struct Switch {
  scalar_t a, e;
  int64_t unit;
};

// The rows' switches, grouped by row and, within a row, by the sorted point they reach:
// row r's switches reaching point k are items[offsets[r·(K+1) + k] .. offsets[r·(K+1) + k + 1]).
template <typename scalar_t>
struct Switches {
  std::vector<Switch<scalar_t>> items;
  std::vector<int64_t> offsets;
};

// Index of the first sorted point where unit (a, e) is not as at point 0, or K if none:
// a branch-free binary search (the switch points are unpredictable).
template <typename scalar_t>
inline int64_t first_switch(scalar_t a, scalar_t e, bool on_first, const scalar_t* c, int64_t K) {
  if (e == scalar_t(0) || (e > scalar_t(0)) == on_first) return K;  // never switches within [c_0, c_K-1]
  int64_t base = 0, n = K;  // the answer is in (base, base + n], point K standing for "never"
  while (n > 1) {
    const int64_t half = n / 2;
    base = ((a + c[base + half] * e > scalar_t(0)) != on_first) ? base : base + half;
    n -= half;
  }
  return base + 1;
}

// Scratch memory of the calling thread (kept_scratch.h), kept up to kKeptScratchBytes a slot
// (W5: 21 lines of 500 rows a call).
constexpr int64_t kKeptScratchBytes = int64_t{64} << 20;
enum ScratchSlot { kMasked, kProducts, kPacked, kScratchSlots };

at::Tensor scratch(ScratchSlot slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  static thread_local at::Tensor kept[kScratchSlots];
  return kept_scratch(kept[slot], sizes, options, kKeptScratchBytes);
}

// The thread's kept vectors, like its scratch tensors, stay allocated up to kKeptScratchBytes.
template <typename T>
void release_if_large(std::vector<T>& v) {
  if (int64_t(v.capacity() * sizeof(T)) > kKeptScratchBytes) std::vector<T>().swap(v);
}

// masked (2R, I): rows [0, R) the a of units active at the first point, [R, 2R) their e
// (`slope` times them elsewhere); `out`: every switch after it (its vectors are the
// thread's, kept).
template <typename scalar_t>
void switches_from_first_point(const scalar_t* a, const scalar_t* e, const scalar_t* c, scalar_t slope,
                               const LineSizes& s, scalar_t* masked, Switches<scalar_t>& out) {
  const int64_t R = s.rows, I = s.in_features, K = s.points;
  static thread_local std::vector<int32_t> kept;
  std::vector<int32_t>& reached = kept;  // the sorted point each unit switches at (K: never); (a
  reached.resize(R * I);                 // reference: the workers below must see this thread's)
  // Counted at offsets[r·(K+1) + k + 1], then summed: slot r·(K+1) + K + 1 (k = K, never)
  // stays empty, so one row's items end where the next row's start.
  out.offsets.assign(R * (K + 1) + 1, 0);
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t* count = out.offsets.data() + r * (K + 1) + 1;
      for (int64_t i = 0; i < I; ++i) {
        const scalar_t a_i = a[r * I + i], e_i = e[r * I + i];
        const bool on = a_i + c[0] * e_i > scalar_t(0);
        masked[r * I + i] = on ? a_i : slope * a_i;
        masked[(R + r) * I + i] = on ? e_i : slope * e_i;
        const int64_t k = first_switch(a_i, e_i, on, c, K);
        reached[r * I + i] = static_cast<int32_t>(k);
        if (k < K) ++count[k];
      }
    }
  });
  for (size_t n = 1; n < out.offsets.size(); ++n) out.offsets[n] += out.offsets[n - 1];
  out.items.resize(out.offsets.back());  // (no need to shrink: only [0, offsets.back()) is read)
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::vector<int64_t> next(out.offsets.begin() + r * (K + 1), out.offsets.begin() + (r + 1) * (K + 1));
      for (int64_t i = 0; i < I; ++i) {
        const int64_t k = reached[r * I + i];
        if (k == K) continue;
        const scalar_t sign = (a[r * I + i] + c[0] * e[r * I + i] > scalar_t(0) ? scalar_t(-1) : scalar_t(1)) *
                              (scalar_t(1) - slope);
        out.items[next[k]++] = {sign * a[r * I + i], sign * e[r * I + i], i};
      }
    }
  });
  release_if_large(reached);
}

// What steps 2 and 3 read and write. `packed` holds W and D transposed, tile by tile:
// (tiles, I, 2, T), each unit's T columns of W then of D side by side, so that one tile's
// columns for all units are one contiguous block (strided rows of Wᵀ cost a TLB miss per
// switch); the last O mod T columns are read from w_t, d_t (I, O) instead.
template <typename scalar_t>
struct Sweep {
  const scalar_t *u, *v, *z;  // (R, O) each, at the first point
  const Switch<scalar_t>* items;
  const int64_t* offsets;
  const scalar_t *packed, *w_t, *d_t;
  const scalar_t* bias_k;  // (K, O) or nullptr
  const scalar_t* c;       // (K,) sorted
  const int64_t* order;    // (K,) sorted point → its index in the output
  int64_t K, R, I, O;
  bool relu;
  int vector_bytes;  // 16, 32 or 64 (vector_bytes())
  scalar_t* out;     // (K, R, O)
};

// U, V and Z of a tile take kVectorsPerTile vectors each: 12 of AVX2's 16 registers
// (of AVX-512's 32).
constexpr int kVectorsPerTile = 4;

// Columns a tile has with vectors of `bytes` bytes.
template <typename scalar_t>
constexpr int64_t tile_columns(int bytes) { return kVectorsPerTile * bytes / int64_t(sizeof(scalar_t)); }

// Steps 2 and 3 for row `row` and the T columns of tile `tile`, with U, V, Z in
// kVectorsPerTile vectors of B bytes each.
template <typename scalar_t, int B>
__attribute__((always_inline)) inline void sweep_row_tile(const Sweep<scalar_t>& s, int64_t row, int64_t tile) {
  typedef scalar_t vec __attribute__((vector_size(B)));
  constexpr int N = kVectorsPerTile, L = B / sizeof(scalar_t), T = N * L;
  const int64_t col = tile * T, O = s.O;
  vec u[N], v[N], z[N];
  for (int n = 0; n < N; ++n) {
    std::memcpy(&u[n], s.u + row * O + col + n * L, sizeof(vec));
    std::memcpy(&v[n], s.v + row * O + col + n * L, sizeof(vec));
    std::memcpy(&z[n], s.z + row * O + col + n * L, sizeof(vec));
  }
  const scalar_t* __restrict packed = s.packed + tile * s.I * 2 * T;
  const int64_t* offsets = s.offsets + row * (s.K + 1);
  for (int64_t k = 0; k < s.K; ++k) {
    for (int64_t m = offsets[k]; m < offsets[k + 1]; ++m) {
      const Switch<scalar_t> sw = s.items[m];
      const scalar_t* w = packed + sw.unit * 2 * T;
      for (int n = 0; n < N; ++n) {
        vec w_n, d_n;
        std::memcpy(&w_n, w + n * L, sizeof(vec));
        std::memcpy(&d_n, w + T + n * L, sizeof(vec));
        u[n] += sw.a * w_n;
        v[n] += sw.a * d_n + sw.e * w_n;
        z[n] += sw.e * d_n;
      }
    }
    const scalar_t c_k = s.c[k];
    scalar_t* __restrict y = s.out + (s.order[k] * s.R + row) * O + col;
    const scalar_t* b = s.bias_k == nullptr ? nullptr : s.bias_k + k * O + col;
    for (int n = 0; n < N; ++n) {
      vec y_n = u[n] + c_k * (v[n] + c_k * z[n]);
      if (b != nullptr) {
        vec b_n;
        std::memcpy(&b_n, b + n * L, sizeof(vec));
        y_n += b_n;
      }
      if (s.relu) y_n = y_n < vec{} ? vec{} : y_n;  // (NaN compares false: kept)
      std::memcpy(y + n * L, &y_n, sizeof(vec));
    }
  }
}

// The same for one of the last O mod T columns.
template <typename scalar_t>
void sweep_row_column(const Sweep<scalar_t>& s, int64_t row, int64_t col) {
  const int64_t O = s.O;
  scalar_t u = s.u[row * O + col], v = s.v[row * O + col], z = s.z[row * O + col];
  const int64_t* offsets = s.offsets + row * (s.K + 1);
  for (int64_t k = 0; k < s.K; ++k) {
    for (int64_t m = offsets[k]; m < offsets[k + 1]; ++m) {
      const Switch<scalar_t>& sw = s.items[m];
      const scalar_t w = s.w_t[sw.unit * O + col], d = s.d_t[sw.unit * O + col];
      u += sw.a * w;
      v += sw.a * d + sw.e * w;
      z += sw.e * d;
    }
    const scalar_t y = u + s.c[k] * (v + s.c[k] * z) + (s.bias_k == nullptr ? scalar_t(0) : s.bias_k[k * O + col]);
    s.out[(s.order[k] * s.R + row) * O + col] = s.relu && y < scalar_t(0) ? scalar_t(0) : y;
  }
}

// Rows go through a few tiles at a time, whose packed columns (this many bytes) stay in L2
// meanwhile; a row's outputs are written a few tiles' width at a time (each (point, row)
// of O = 1024 float32 outputs is its own page: tile after tile over all rows, every store
// missed the TLB).
constexpr int64_t kPackedBytesPerPass = int64_t{1} << 20;

// Rows [begin, end) through the tiles [tile_begin, tile_end), row by row; one copy per
// instruction set (the extension itself is built for baseline x86-64), chosen at run time.
template <typename scalar_t, int B>
__attribute__((always_inline)) inline void sweep_rows(const Sweep<scalar_t>& s, int64_t begin, int64_t end,
                                                      int64_t tile_begin, int64_t tile_end) {
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) sweep_row_tile<scalar_t, B>(s, r, tile);
  }
}

template <typename scalar_t>
__attribute__((target("avx512f,avx2,fma"))) void sweep_rows_avx512(const Sweep<scalar_t>& s, int64_t begin,
                                                                    int64_t end, int64_t tile_begin, int64_t tile_end) {
  sweep_rows<scalar_t, 64>(s, begin, end, tile_begin, tile_end);
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void sweep_rows_avx2(const Sweep<scalar_t>& s, int64_t begin, int64_t end,
                                                          int64_t tile_begin, int64_t tile_end) {
  sweep_rows<scalar_t, 32>(s, begin, end, tile_begin, tile_end);
}

template <typename scalar_t>
void sweep_rows_baseline(const Sweep<scalar_t>& s, int64_t begin, int64_t end, int64_t tile_begin,
                         int64_t tile_end) {
  sweep_rows<scalar_t, 16>(s, begin, end, tile_begin, tile_end);
}

template <typename scalar_t>
void sweep(const Sweep<scalar_t>& s) {
  const int bytes = s.vector_bytes;
  const int64_t T = tile_columns<scalar_t>(bytes), tiles = s.O / T;
  const int64_t tiles_per_pass = std::max<int64_t>(1, kPackedBytesPerPass / (s.I * 2 * T * int64_t(sizeof(scalar_t))));
  at::parallel_for(0, s.R, 8, [&](int64_t begin, int64_t end) {
    for (int64_t first = 0; first < tiles; first += tiles_per_pass) {
      const int64_t last = std::min(tiles, first + tiles_per_pass);
      if (bytes == 64) sweep_rows_avx512<scalar_t>(s, begin, end, first, last);
      else if (bytes == 32) sweep_rows_avx2<scalar_t>(s, begin, end, first, last);
      else sweep_rows_baseline<scalar_t>(s, begin, end, first, last);
    }
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t col = tiles * T; col < s.O; ++col) sweep_row_column<scalar_t>(s, r, col);
    }
  });
}

template <typename scalar_t>
void switching_units(const at::Tensor& base, const at::Tensor& along, const at::Tensor& weight,
                     const at::Tensor& weight_dir, const at::Tensor& bias_k, const at::Tensor& sorted,
                     const at::Tensor& order, double slope, bool relu, const LineSizes& s, at::Tensor& out) {
  const int64_t R = s.rows, I = s.in_features, O = s.out_features;
  const int bytes = vector_bytes();
  const int64_t T = tile_columns<scalar_t>(bytes), tiles = O / T;
  at::Tensor masked = scratch(kMasked, {2 * R, I}, base.options());
  static thread_local Switches<scalar_t> switches;
  switches_from_first_point<scalar_t>(base.const_data_ptr<scalar_t>(), along.const_data_ptr<scalar_t>(),
                                      sorted.const_data_ptr<scalar_t>(), static_cast<scalar_t>(slope), s,
                                      masked.data_ptr<scalar_t>(), switches);
  // [U | a·Dᵀ; e·Wᵀ | Z] at the first point, then V = a·Dᵀ + e·Wᵀ in place of a·Dᵀ.
  at::Tensor products = scratch(kProducts, {2, 2 * R, O}, base.options());  // [a; e]·Wᵀ, [a; e]·Dᵀ
  at::Tensor by_w = products.select(0, 0), by_d = products.select(0, 1);
  at::mm_out(by_w, masked, weight.t());
  at::mm_out(by_d, masked, weight_dir.t());
  by_d.narrow(0, 0, R).add_(by_w.narrow(0, R, R));  // V = a·Dᵀ + e·Wᵀ
  const at::Tensor w_t = weight.t(), d_t = weight_dir.t();
  at::Tensor packed = scratch(kPacked, {tiles, I, 2, T}, base.options());
  packed.select(2, 0).copy_(w_t.narrow(1, 0, tiles * T).reshape({I, tiles, T}).permute({1, 0, 2}));
  packed.select(2, 1).copy_(d_t.narrow(1, 0, tiles * T).reshape({I, tiles, T}).permute({1, 0, 2}));
  const bool rest = tiles * T < O;
  const at::Tensor w_rest = rest ? w_t.contiguous() : at::Tensor(), d_rest = rest ? d_t.contiguous() : at::Tensor();
  sweep<scalar_t>({by_w.const_data_ptr<scalar_t>(), by_d.const_data_ptr<scalar_t>(),
                   by_d.const_data_ptr<scalar_t>() + R * O, switches.items.data(), switches.offsets.data(),
                   packed.const_data_ptr<scalar_t>(), rest ? w_rest.const_data_ptr<scalar_t>() : nullptr,
                   rest ? d_rest.const_data_ptr<scalar_t>() : nullptr,
                   bias_k.defined() ? bias_k.const_data_ptr<scalar_t>() : nullptr, sorted.const_data_ptr<scalar_t>(),
                   order.const_data_ptr<int64_t>(), s.points, R, I, O, relu, bytes, out.data_ptr<scalar_t>()});
  release_if_large(switches.items);
  release_if_large(switches.offsets);
}

// Whether every element is finite, from one vectorised pass: a NaN or an infinity makes
// the sum non-finite (a finite sum overflowing only sends the call to the per-point form).
bool all_finite(const at::Tensor& t) { return std::isfinite(t.sum().item<double>()); }

// The per-point form, for non-finite inputs or none: h_k = leaky_relu(a + c_k e, slope),
// y_k = h_k·W_kᵀ + b_k.
void per_point(const at::Tensor& base, const at::Tensor& along, const at::Tensor& weight,
               const at::Tensor& weight_dir, const at::Tensor& bias_k, const at::Tensor& coeffs, double slope,
               bool relu, at::Tensor& out) {
  for (int64_t k = 0; k < coeffs.size(0); ++k) {
    const at::Tensor c_k = coeffs[k];
    at::Tensor y_k = out.select(0, k);
    at::mm_out(y_k, at::leaky_relu(base + c_k * along, slope), (weight + c_k * weight_dir).t());
    if (bias_k.defined()) y_k.add_(bias_k.select(0, k));
    if (relu) y_k.relu_();
  }
}

at::Tensor& relu_line_linear_out_cpu(const at::Tensor& base, const at::Tensor& along, const at::Tensor& weight,
                                     const at::Tensor& weight_dir, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& bias_dir, const at::Tensor& coeffs, bool relu,
                                     double negative_slope, at::Tensor& out) {
  const LineSizes s = check_relu_line_linear(base, along, weight, weight_dir, bias, bias_dir, coeffs);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({s.points, s.rows, s.out_features}) &&
                  out.scalar_type() == weight.scalar_type() && out.device().is_cpu() && out.is_contiguous(),
              kOp, "expected a contiguous CPU out of shape (", s.points, ", ", s.rows, ", ", s.out_features, ") in ",
              weight.scalar_type(), ", got ", out.sizes(), " ", out.scalar_type(), " on ", out.device());
  if (out.numel() == 0) return out;
  for (const at::Tensor* t : {&base, &along, &weight, &weight_dir, &coeffs}) at::assert_no_overlap(out, *t);
  auto [sorted, order] = coeffs.sort();
  at::Tensor bias_k;  // (K, O) each sorted point's bias
  if (bias.has_value()) {
    bias_k = bias->unsqueeze(0).expand({s.points, s.out_features});
    bias_k = (bias_dir.has_value() ? bias_k + sorted.unsqueeze(1) * bias_dir->unsqueeze(0) : bias_k).contiguous();
  }
  const at::Tensor a = base.contiguous(), e = along.contiguous(), w = weight.contiguous(),
                   d = weight_dir.contiguous();
  // (no inputs: nothing switches, and the tiles would be empty)
  if (s.in_features == 0 ||
      !(all_finite(a) && all_finite(e) && all_finite(w) && all_finite(d) && all_finite(coeffs))) {
    per_point(a, e, w, d, bias_k.defined() ? bias_k.index_select(0, at::argsort(order)) : bias_k, coeffs,
              negative_slope, relu, out);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "relu_line_linear", [&] {
    switching_units<scalar_t>(a, e, w, d, bias_k, sorted.contiguous(), order.contiguous(), negative_slope, relu, s,
                              out);
  });
  return out;
}

at::Tensor relu_line_linear_cpu(const at::Tensor& base, const at::Tensor& along, const at::Tensor& weight,
                                const at::Tensor& weight_dir, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& bias_dir, const at::Tensor& coeffs, bool relu,
                                double negative_slope) {
  const LineSizes s = check_relu_line_linear(base, along, weight, weight_dir, bias, bias_dir, coeffs);
  at::Tensor out = at::empty({s.points, s.rows, s.out_features}, weight.options());
  return relu_line_linear_out_cpu(base, along, weight, weight_dir, bias, bias_dir, coeffs, relu, negative_slope, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlifast, CPU, m) {
  m.impl("relu_line_linear", &relu_line_linear_cpu);
  m.impl("relu_line_linear.out", &relu_line_linear_out_cpu);
}

// `.out` writes in place: the version counter of out goes up.
TORCH_LIBRARY_IMPL(mlifast, ADInplaceOrView, m) {
  m.impl("relu_line_linear.out", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
}

}  // namespace mlifast
