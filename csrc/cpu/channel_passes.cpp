// CPU kernels of mlifast::channel_moments and mlifast::channel_affine (schemas in
// csrc/ops.cpp): the two passes of a batch norm over each point's rows, the second with the
// residual addition and the ReLU that follow it in a ResNet.
//
// ATen's training-mode batch norm reads its input three times (mean, variance, normalise)
// and writes it once; the addition and the ReLU after it read and write it twice more. On
// 64 channels-last images of 16 × 32 × 32 floats, the three took 0.92 ms, these two passes
// 0.48 ms (benchmarks/batch_norm_passes.py).
//
// Input layouts: rows of C contiguous values (channels-last images, or (N, C)), or
// contiguous (N, C, S) with S positions per channel; anything else is made contiguous
// first. Points: the N rows hold K points' B rows each, point-major.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "channel_passes_checks.h"
#include "vector_width.h"

#define MLIFAST_ALWAYS_INLINE __attribute__((always_inline)) inline

namespace mlifast {
namespace {

constexpr const char* kMoments = "mlifast::channel_moments: ";
constexpr const char* kAffine = "mlifast::channel_affine: ";
// Rows of C values per task of the moments on rows: the partial sums of a point's rows
// are added in a fixed order, so the result does not depend on the number of threads.
constexpr int64_t kRowsPerTask = 512;
constexpr int64_t kBlockRows = 16, kBlockChannels = 64;

using Layout = ChannelLayout;

// Sums of (x − pivot) and (x − pivot)² per channel over rows [begin, end) of C values, in
// blocks of kBlockRows rows summed in T (full-width vectors of float) and added to the
// float64 sums s1, s2: a block's rounding error stays within kBlockRows·ε of its values.
template <typename T>
MLIFAST_ALWAYS_INLINE void row_sums(const T* x, int64_t C, int64_t begin, int64_t end, const T* pivot, double* s1,
                                    double* s2) {
  for (int64_t c0 = 0; c0 < C; c0 += kBlockChannels) {
    const int64_t n = std::min(kBlockChannels, C - c0);
    for (int64_t r0 = begin; r0 < end; r0 += kBlockRows) {
      T b1[kBlockChannels] = {}, b2[kBlockChannels] = {};
      for (int64_t r = r0; r < std::min(end, r0 + kBlockRows); ++r) {
        const T* row = x + r * C + c0;
        for (int64_t c = 0; c < n; ++c) {
          const T d = row[c] - pivot[c0 + c];
          b1[c] += d;
          b2[c] += d * d;
        }
      }
      for (int64_t c = 0; c < n; ++c) s1[c0 + c] += b1[c], s2[c0 + c] += b2[c];
    }
  }
}

// The same over one contiguous run of n values, in vectors of `Bytes` bytes (GCC's vector
// extensions: the auto-vectoriser made slow code of this reduction).
template <typename T, int Bytes>
MLIFAST_ALWAYS_INLINE void run_sums(const T* x, int64_t n, T pivot, double& s1, double& s2) {
  typedef T Vector __attribute__((vector_size(Bytes)));
  constexpr int64_t kWidth = Bytes / sizeof(T);
  const Vector p = Vector{} + pivot;
  int64_t i = 0;
  while (i + kWidth <= n) {
    Vector b1 = {}, b2 = {};
    for (int64_t j = 0; j < kBlockRows && i + kWidth <= n; ++j, i += kWidth) {
      Vector v;
      std::memcpy(&v, x + i, sizeof(Vector));
      const Vector d = v - p;
      b1 += d;
      b2 += d * d;
    }
    for (int64_t l = 0; l < kWidth; ++l) s1 += b1[l], s2 += b2[l];
  }
  for (; i < n; ++i) {
    const double d = double(x[i]) - double(pivot);
    s1 += d, s2 += d * d;
  }
}

// y = x·scale + shift (+ addend) (ReLU: max(y, 0), NaN kept) over n values.
template <typename T, bool kAdd, bool kRelu>
MLIFAST_ALWAYS_INLINE void affine_values(const T* __restrict__ x, const T* __restrict__ addend,
                                         const T* __restrict__ scale, const T* __restrict__ shift, int64_t n,
                                         bool per_value, T* __restrict__ y) {
  for (int64_t i = 0; i < n; ++i) {
    T v = x[i] * scale[per_value ? i : 0] + shift[per_value ? i : 0];
    if constexpr (kAdd) v += addend[i];
    if constexpr (kRelu) v = v < T(0) ? T(0) : v;
    y[i] = v;
  }
}

// One copy of each pass per instruction set, `Bytes` its vector width; `vector_bytes()`
// picks one at run time.
#define MLIFAST_FOR_EACH_WIDTH(name, params, args)                                               \
  template <typename T>                                                                           \
  __attribute__((target("avx512f,avx2,fma"))) void name##_64 params { name<T, 64> args; }        \
  template <typename T>                                                                           \
  __attribute__((target("avx2,fma"))) void name##_32 params { name<T, 32> args; }                \
  template <typename T>                                                                           \
  void name##_16 params { name<T, 16> args; }                                                     \
  template <typename T>                                                                           \
  void name##_any params {                                                                        \
    const int bytes = vector_bytes();                                                             \
    if (bytes == 64) name##_64<T> args;                                                           \
    else if (bytes == 32) name##_32<T> args;                                                      \
    else name##_16<T> args;                                                                       \
  }

template <typename T, int Bytes>
MLIFAST_ALWAYS_INLINE void rows_task(const T* x, const Layout& L, int64_t task, int64_t tasks_per_point,
                                     double* partial) {
  const int64_t k = task / tasks_per_point, rows = L.batch * L.positions;
  const int64_t begin = (task % tasks_per_point) * kRowsPerTask, end = std::min(rows, begin + kRowsPerTask);
  const T* point = x + k * rows * L.channels;
  row_sums<T>(point, L.channels, begin, end, point, partial, partial + L.channels);
}
MLIFAST_FOR_EACH_WIDTH(rows_task, (const T* x, const Layout& L, int64_t task, int64_t per_point, double* partial),
                       (x, L, task, per_point, partial))

// Entries [begin, end) of point k, read in memory order: each entry's C runs of S values
// one after another; partial: (Σd, Σd²) per channel.
template <typename T, int Bytes>
MLIFAST_ALWAYS_INLINE void runs_task(const T* x, const Layout& L, int64_t task, int64_t tasks_per_point,
                                     int64_t entries_per_task, double* partial) {
  const int64_t k = task / tasks_per_point, C = L.channels, S = L.positions;
  const int64_t begin = (task % tasks_per_point) * entries_per_task, end = std::min(L.batch, begin + entries_per_task);
  const T* point = x + k * L.batch * C * S;
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      run_sums<T, Bytes>(point + (b * C + c) * S, S, point[c * S], partial[c], partial[C + c]);
    }
  }
}
MLIFAST_FOR_EACH_WIDTH(runs_task,
                       (const T* x, const Layout& L, int64_t task, int64_t per_point, int64_t entries, double* partial),
                       (x, L, task, per_point, entries, partial))

template <typename T, bool kAdd, bool kRelu>
MLIFAST_ALWAYS_INLINE void affine_span(const T* x, const T* addend, const T* scale, const T* shift, const Layout& L,
                                       int64_t begin, int64_t end, T* y) {
  if (L.rows) {  // rows [begin, end) of C values
    const int64_t C = L.channels, rows_per_point = L.batch * L.positions;
    for (int64_t r = begin; r < end;) {
      const int64_t k = r / rows_per_point, stop = std::min(end, (k + 1) * rows_per_point);
      for (; r < stop; ++r) {
        const int64_t at = r * C;
        affine_values<T, kAdd, kRelu>(x + at, addend + (kAdd ? at : 0), scale + k * C, shift + k * C, C, true,
                                      y + at);
      }
    }
  } else {  // runs [begin, end) of S values, run n·C + c
    const int64_t S = L.positions;
    for (int64_t run = begin; run < end; ++run) {
      const int64_t k = run / (L.batch * L.channels), c = run % L.channels, at = run * S;
      const int64_t p = k * L.channels + c;
      affine_values<T, kAdd, kRelu>(x + at, addend + (kAdd ? at : 0), scale + p, shift + p, S, false, y + at);
    }
  }
}

template <typename T, int Bytes>
MLIFAST_ALWAYS_INLINE void affine_task(const T* x, const T* addend, const T* scale, const T* shift, const Layout& L,
                                       bool relu, int64_t begin, int64_t end, T* y) {
  if (addend != nullptr) {
    if (relu) affine_span<T, true, true>(x, addend, scale, shift, L, begin, end, y);
    else affine_span<T, true, false>(x, addend, scale, shift, L, begin, end, y);
  } else {
    if (relu) affine_span<T, false, true>(x, addend, scale, shift, L, begin, end, y);
    else affine_span<T, false, false>(x, addend, scale, shift, L, begin, end, y);
  }
}
MLIFAST_FOR_EACH_WIDTH(affine_task,
                       (const T* x, const T* addend, const T* scale, const T* shift, const Layout& L, bool relu,
                        int64_t begin, int64_t end, T* y),
                       (x, addend, scale, shift, L, relu, begin, end, y))

template <typename T>
void moments(const at::Tensor& input, const Layout& L, at::Tensor& mean, at::Tensor& var) {
  const T* x = input.const_data_ptr<T>();
  const int64_t K = L.points, C = L.channels, count = L.batch * L.positions;
  // Tasks of about kRowsPerTask·C values: rows, or whole entries of C runs.
  const int64_t entries = std::max<int64_t>(1, kRowsPerTask / std::max<int64_t>(1, L.positions));
  const int64_t per_point = L.rows ? (count + kRowsPerTask - 1) / kRowsPerTask : (L.batch + entries - 1) / entries;
  std::vector<double> partials(K * per_point * 2 * C, 0.0);  // per task: Σ(x − pivot) (C), Σ(x − pivot)² (C)
  at::parallel_for(0, K * per_point, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (L.rows) rows_task_any<T>(x, L, t, per_point, partials.data() + t * 2 * C);
      else runs_task_any<T>(x, L, t, per_point, entries, partials.data() + t * 2 * C);
    }
  });
  std::vector<double> sums(K * C * 2, 0.0);  // the tasks' partial sums, added in order
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t t = 0; t < per_point; ++t) {
      const double* p = partials.data() + (k * per_point + t) * 2 * C;
      for (int64_t i = 0; i < 2 * C; ++i) sums[k * 2 * C + i] += p[i];
    }
  }
  T* m = mean.data_ptr<T>();
  T* v = var.data_ptr<T>();
  const double n = double(count);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      const double s1 = sums[k * 2 * C + c] / n, s2 = sums[k * 2 * C + C + c] / n;
      const T pivot = L.rows ? x[k * count * C + c] : x[(k * L.batch * C + c) * L.positions];
      m[k * C + c] = T(double(pivot) + s1);
      v[k * C + c] = T(std::max(s2 - s1 * s1, 0.0));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> channel_moments_cpu(const at::Tensor& input_, int64_t points) {
  at::Tensor input = input_;
  const Layout L = channel_layout(input, points, kMoments);
  TORCH_CHECK(input.device().is_cpu(), kMoments, "expected a CPU tensor, got one on ", input.device());
  at::Tensor mean = at::empty({points, L.channels}, input.options());
  at::Tensor var = at::empty({points, L.channels}, input.options());
  if (L.batch * L.positions == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "channel_moments", [&] { moments<scalar_t>(input, L, mean, var); });
  return {mean, var};
}

at::Tensor channel_affine_cpu(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                              const std::optional<at::Tensor>& addend, bool relu) {
  const AffineOperands o = affine_operands(input, scale, shift, addend, kAffine);
  TORCH_CHECK(input.device().is_cpu(), kAffine, "expected CPU tensors, got input on ", input.device());
  const Layout& L = o.layout;
  at::Tensor y = at::empty_like(o.input);
  const int64_t spans = L.rows ? L.points * L.batch * L.positions : L.points * L.batch * L.channels;
  const int64_t values_per_span = L.rows ? L.channels : L.positions;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, values_per_span));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "channel_affine", [&] {
    const scalar_t* x = o.input.const_data_ptr<scalar_t>();
    const scalar_t* a = o.addend.defined() ? o.addend.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t *sc = o.scale.const_data_ptr<scalar_t>(), *sh = o.shift.const_data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, spans, grain, [&](int64_t begin, int64_t end) {
      affine_task_any<scalar_t>(x, a, sc, sh, L, relu, begin, end, out);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mlifast, CPU, m) {
  m.impl("channel_moments", &channel_moments_cpu);
  m.impl("channel_affine", &channel_affine_cpu);
}

}  // namespace mlifast
