// CPU kernels of mlifast::channel_moments and mlifast::channel_affine (schemas in
// csrc/ops.cpp): the two passes of a batch norm over each point's rows, the second with the
// residual addition and the ReLU that follow it in a ResNet; and of channel_combine, the
// second pass where each point's rows are a per-channel combination of shared ones.
//
// ATen's training-mode batch norm reads its input three times (mean, variance, normalise)
// and writes it once; the addition and the ReLU after it read and write it twice more. On
// 64 channels-last images of 16 × 32 × 32 floats, the three took 0.87 ms, these two passes
// 0.45 ms (benchmarks/batch_norm_passes.py).
//
// Input layouts: rows of C contiguous values (channels-last images, or (N, C)), or
// contiguous (N, C, S) with S positions per channel; anything else is made contiguous
// first. Points: the N rows hold K points' B rows each, point-major.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "channel_passes_checks.h"
#include "moments.h"
#include "vector_width.h"

#define MLIFAST_ALWAYS_INLINE __attribute__((always_inline)) inline

namespace mlifast {
namespace {

constexpr const char* kMoments = "mlifast::channel_moments: ";
constexpr const char* kAffine = "mlifast::channel_affine: ";
constexpr const char* kCombine = "mlifast::channel_combine: ";
// Rows of C values per task of the moments: the tasks' moments are merged in a fixed
// order, so the result does not depend on the number of threads.
constexpr int64_t kRowsPerTask = 512;
constexpr int64_t kBlockRows = 64;  // rows (or vectors of a run) a block sums in T, then float64
constexpr int64_t kChunkVectors = 4;  // vectors of channels a row step holds in registers

using Layout = ChannelLayout;

// Moments of a set of values, float64: count, mean and sum of squared deviations M2.
// Sets are merged by `merge_moments`; with each block's M2 summed about a pivot near its
// mean it avoids the cancellation of Σx² − n·x̄² (which loses float32's variance to a mean
// far from zero).

// Where a block's pivot sits far from its values, M2 = Σd² − (Σd)²/n cancels: a block
// whose Σd² exceeds kCancellation·M2 in any channel (or is not finite) is summed again
// about its mean. A pivot within one standard deviation of the block's mean passes.
constexpr double kCancellation = 2;

// Σd and Σd² over rows [r0, r1) of `parts` chunks (d = x − pivot), x at the chunks' start.
template <typename T, typename Chunk>
MLIFAST_ALWAYS_INLINE void block_sums(const T* x, int64_t C, int64_t parts, int64_t r0, int64_t r1,
                                      const Chunk* pivot, Chunk* b1, Chunk* b2) {
  constexpr int64_t kLanes = sizeof(Chunk) / sizeof(T);
  for (int64_t j = 0; j < parts; ++j) b1[j] = Chunk{}, b2[j] = Chunk{};
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < parts; ++j) {
      Chunk v;
      std::memcpy(&v, x + r * C + j * kLanes, sizeof(Chunk));
      const Chunk d = v - pivot[j];
      b1[j] += d;
      b2[j] += d * d;
    }
  }
}

// Channels [c0, c0 + width) of rows [begin, end) of C values into their (mean, M2), zero
// at first: blocks of kBlockRows rows summed in T about the mean of the blocks before (the
// first block about its first row; read again about its own mean where that cancels), the
// blocks' moments merged in float64 (`merge_moments`, for all channels at once). `Chunk` channels
// a step: full vectors (GCC's vector extensions, kChunkVectors of them, held in
// registers), or one channel at a time for the rest.
template <typename T, typename Chunk>
MLIFAST_ALWAYS_INLINE void chunk_moments(const T* x, int64_t C, int64_t c0, int64_t width, int64_t begin, int64_t end,
                                         double* mean, double* m2) {
  constexpr int64_t kLanes = sizeof(Chunk) / sizeof(T);
  const int64_t parts = width / kLanes;
  double n = 0;
  for (int64_t r0 = begin; r0 < end; r0 += kBlockRows) {
    const int64_t r1 = std::min(end, r0 + kBlockRows);
    const double rows = double(r1 - r0), inv_rows = 1.0 / rows, share = rows / (n + rows);
    Chunk pivot[kChunkVectors], b1[kChunkVectors], b2[kChunkVectors];
    double block_mean[kChunkVectors * kLanes], block_m2[kChunkVectors * kLanes];
    const auto block_moments = [&]() {  // (whether any channel cancelled)
      bool cancelled = false;
      for (int64_t j = 0; j < parts; ++j) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const double s1 = double(b1[j][l]), s2 = double(b2[j][l]), m2_b = s2 - s1 * s1 * inv_rows;
          block_mean[j * kLanes + l] = double(pivot[j][l]) + s1 * inv_rows;
          block_m2[j * kLanes + l] = m2_b;
          cancelled = cancelled || !(s2 <= kCancellation * m2_b && std::isfinite(s2));
        }
      }
      return cancelled;
    };
    for (int64_t j = 0; j < parts; ++j) {
      if (n == 0) {
        std::memcpy(&pivot[j], x + r0 * C + c0 + j * kLanes, sizeof(Chunk));
      } else {
        for (int64_t l = 0; l < kLanes; ++l) pivot[j][l] = T(mean[c0 + j * kLanes + l]);
      }
    }
    block_sums<T, Chunk>(x + c0, C, parts, r0, r1, pivot, b1, b2);
    if (block_moments()) {
      for (int64_t j = 0; j < parts; ++j) pivot[j] += b1[j] * T(inv_rows);  // (the block's mean)
      block_sums<T, Chunk>(x + c0, C, parts, r0, r1, pivot, b1, b2);
      if (block_moments()) {  // (squares beyond T's range, or NaN: two passes in float64)
        for (int64_t i = 0; i < parts * kLanes; ++i) {
          double sum = 0, squares = 0;
          for (int64_t r = r0; r < r1; ++r) sum += double(x[r * C + c0 + i]);
          block_mean[i] = sum * inv_rows;
          for (int64_t r = r0; r < r1; ++r) {
            const double d = double(x[r * C + c0 + i]) - block_mean[i];
            squares += d * d;
          }
          block_m2[i] = squares;
        }
      }
    }
    for (int64_t i = 0; i < parts * kLanes; ++i) {
      const int64_t c = c0 + i;
      const double delta = block_mean[i] - mean[c];
      mean[c] += delta * share;
      m2[c] += block_m2[i] + delta * (delta * (n * share));
    }
    n += rows;
  }
}

template <typename T, int Bytes>
MLIFAST_ALWAYS_INLINE void row_moments(const T* x, int64_t C, int64_t begin, int64_t end, double* mean, double* m2) {
  typedef T Vector __attribute__((vector_size(Bytes)));
  typedef T Scalar __attribute__((vector_size(sizeof(T))));
  constexpr int64_t kWidth = Bytes / sizeof(T), kStep = kWidth * kChunkVectors;
  const int64_t vectored = C / kWidth * kWidth;
  for (int64_t c0 = 0; c0 < vectored; c0 += kStep) {
    chunk_moments<T, Vector>(x, C, c0, std::min(kStep, vectored - c0), begin, end, mean, m2);
  }
  for (int64_t c0 = vectored; c0 < C; c0 += kChunkVectors) {
    chunk_moments<T, Scalar>(x, C, c0, std::min(kChunkVectors, C - c0), begin, end, mean, m2);
  }
}

// One contiguous run of n values merged into (count, mean, M2): blocks of kBlockRows
// vectors of `Bytes` bytes (GCC's vector extensions: the auto-vectoriser made slow code of
// these reductions), each summed about the mean so far (the first about its first value;
// again about its own mean where that cancels), then the tail in float64.
template <typename T, int Bytes>
MLIFAST_ALWAYS_INLINE void run_moments(const T* x, int64_t n, double& count, double& mean, double& m2) {
  typedef T Vector __attribute__((vector_size(Bytes)));
  constexpr int64_t kWidth = Bytes / sizeof(T);
  int64_t i = 0;
  while (i + kWidth <= n) {
    const int64_t values = std::min(kBlockRows, (n - i) / kWidth) * kWidth;
    T pivot = count == 0 ? x[i] : T(mean);
    double block_mean = 0, block_m2 = 0;
    for (int attempt = 0; attempt < 3; ++attempt) {
      if (attempt == 2) {  // (squares beyond T's range, or NaN: two passes in float64)
        double sum = 0;
        for (int64_t j = 0; j < values; ++j) sum += double(x[i + j]);
        block_mean = sum / double(values), block_m2 = 0;
        for (int64_t j = 0; j < values; ++j) {
          const double d = double(x[i + j]) - block_mean;
          block_m2 += d * d;
        }
        break;
      }
      const Vector p = Vector{} + pivot;
      Vector b1 = {}, b2 = {};
      for (int64_t j = 0; j < values; j += kWidth) {
        Vector v;
        std::memcpy(&v, x + i + j, sizeof(Vector));
        const Vector d = v - p;
        b1 += d;
        b2 += d * d;
      }
      double s1 = 0, s2 = 0;
      for (int64_t l = 0; l < kWidth; ++l) s1 += b1[l], s2 += b2[l];
      block_mean = double(pivot) + s1 / double(values), block_m2 = s2 - s1 * s1 / double(values);
      if (s2 <= kCancellation * block_m2 && std::isfinite(s2)) break;
      pivot = T(block_mean);
    }
    merge_moments(count, mean, m2, double(values), block_mean, block_m2);
    i += values;
  }
  for (; i < n; ++i) merge_moments(count, mean, m2, 1.0, double(x[i]), 0.0);
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

// `count` lines of `width` values: y = shift + Σ_j u[j]·scales[j·scale_step] (ReLU: max(y, 0),
// NaN kept), the scale and shift per value of a line (kPerValue: a row's channels) or one
// for all (a run of one channel). The shift comes first, so that u[0]·scales[0] is not
// rounded before a folded batch norm's shift (≈ −mean·scale) cancels it: with the
// multiply-adds contracted, as accurate as channel_affine's x·scale + shift (images of
// mean 1000: 3.8e-8 of the largest output, against 1.1e-5 with the shift added last).
// The sum of a vector of `Bytes` bytes stays in registers
// (summed into y, a pass over the line per input, it took twice the time: 4 points of 64
// channels-last images of 16 × 32 × 32, 1.44 against 0.78 ms).
template <typename T, int Bytes, bool kRelu, bool kPerValue>
MLIFAST_ALWAYS_INLINE void combine_values(const T* const* u, int64_t inputs, const T* __restrict__ scales,
                                          int64_t scale_step, const T* __restrict__ shift, int64_t count,
                                          int64_t width, T* __restrict__ y) {
  typedef T Vector __attribute__((vector_size(Bytes)));
  constexpr int64_t kWidth = Bytes / sizeof(T);
  const auto load = [](const T* p) {
    Vector v;
    std::memcpy(&v, p, sizeof(Vector));
    return v;
  };
  const auto scale_at = [&](int64_t j, int64_t i) {
    return kPerValue ? load(scales + j * scale_step + i) : Vector{} + scales[j * scale_step];
  };
  const int64_t vectored = width / kWidth * kWidth;
  for (int64_t r = 0; r < count; ++r) {
    const int64_t line = r * width;
    for (int64_t i = 0; i < vectored; i += kWidth) {
      Vector v = kPerValue ? load(shift + i) : Vector{} + shift[0];
      for (int64_t j = 0; j < inputs; ++j) v += load(u[j] + line + i) * scale_at(j, i);
      if constexpr (kRelu) v = v < Vector{} ? Vector{} : v;
      std::memcpy(y + line + i, &v, sizeof(Vector));
    }
    for (int64_t i = vectored; i < width; ++i) {
      T v = shift[kPerValue ? i : 0];
      for (int64_t j = 0; j < inputs; ++j) v += u[j][line + i] * scales[j * scale_step + (kPerValue ? i : 0)];
      if constexpr (kRelu) v = v < T(0) ? T(0) : v;
      y[line + i] = v;
    }
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

// The moments' tasks: point k's values in pieces of about kRowsPerTask·C, each into
// `partial` — the piece's mean (C) and M2 (C) per channel — merged in order afterwards.
struct MomentTasks {
  int64_t per_point;  // tasks per point
  int64_t entries;    // runs: entries of C runs per task
};

MomentTasks moment_tasks(const Layout& L) {
  const int64_t entries = std::max<int64_t>(1, kRowsPerTask / std::max<int64_t>(1, L.positions));
  const int64_t rows = L.batch * L.positions;
  return {L.rows ? (rows + kRowsPerTask - 1) / kRowsPerTask : (L.batch + entries - 1) / entries, entries};
}

// The values task `task` covers (per channel).
int64_t task_values(const Layout& L, const MomentTasks& tasks, int64_t task) {
  const int64_t i = task % tasks.per_point;
  if (L.rows) return std::min(kRowsPerTask, L.batch * L.positions - i * kRowsPerTask);
  return (std::min(L.batch, (i + 1) * tasks.entries) - i * tasks.entries) * L.positions;
}

// Rows: rows of C values.
template <typename T, int Bytes>
MLIFAST_ALWAYS_INLINE void rows_task(const T* x, const Layout& L, const MomentTasks& tasks, int64_t task,
                                     double* partial) {
  const int64_t k = task / tasks.per_point, rows = L.batch * L.positions;
  const int64_t begin = (task % tasks.per_point) * kRowsPerTask, end = std::min(rows, begin + kRowsPerTask);
  row_moments<T, Bytes>(x + k * rows * L.channels, L.channels, begin, end, partial, partial + L.channels);
}
MLIFAST_FOR_EACH_WIDTH(rows_task,
                       (const T* x, const Layout& L, const MomentTasks& tasks, int64_t task, double* partial),
                       (x, L, tasks, task, partial))

// Runs: whole entries, read in memory order (each entry's C runs of S values in turn).
template <typename T, int Bytes>
MLIFAST_ALWAYS_INLINE void runs_task(const T* x, const Layout& L, const MomentTasks& tasks, int64_t task,
                                     double* partial) {
  const int64_t k = task / tasks.per_point, C = L.channels, S = L.positions;
  const int64_t begin = (task % tasks.per_point) * tasks.entries, end = std::min(L.batch, begin + tasks.entries);
  const T* point = x + k * L.batch * C * S;
  std::vector<double> counts(C, 0.0);
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      run_moments<T, Bytes>(point + (b * C + c) * S, S, counts[c], partial[c], partial[C + c]);
    }
  }
}
MLIFAST_FOR_EACH_WIDTH(runs_task,
                       (const T* x, const Layout& L, const MomentTasks& tasks, int64_t task, double* partial),
                       (x, L, tasks, task, partial))

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

// Spans [begin, end) of the shared inputs (rows of C values, or runs of S values), each
// written for every point (span s of point k to y's span k·spans + s), kCombineSpanValues
// values of the inputs at a time, read once from memory for all points.
constexpr int64_t kCombineSpanValues = 2048;

template <typename T, int Bytes, bool kRelu>
MLIFAST_ALWAYS_INLINE void combine_span(const T* const* inputs, int64_t n, const T* scales, const T* shift,
                                        const Layout& L, int64_t begin, int64_t end, T* y) {
  const int64_t C = L.channels, S = L.positions;
  const int64_t spans = L.rows ? L.batch * S : L.batch * C, values = L.rows ? C : S;
  const int64_t step = std::max<int64_t>(1, kCombineSpanValues / std::max<int64_t>(1, values));
  const T* u[kMaxCombined];
  for (int64_t first = begin; first < end; first += step) {
    const int64_t last = std::min(end, first + step);
    for (int64_t k = 0; k < L.points; ++k) {
      if (L.rows) {  // the chunk's rows at once
        for (int64_t j = 0; j < n; ++j) u[j] = inputs[j] + first * C;
        combine_values<T, Bytes, kRelu, true>(u, n, scales + k * n * C, C, shift + k * C, last - first, C,
                                       y + (k * spans + first) * C);
        continue;
      }
      for (int64_t s = first; s < last; ++s) {  // run by run, each of one channel
        const int64_t c = s % C;
        for (int64_t j = 0; j < n; ++j) u[j] = inputs[j] + s * S;
        combine_values<T, Bytes, kRelu, false>(u, n, scales + k * n * C + c, C, shift + k * C + c, 1, S,
                                        y + (k * spans + s) * S);
      }
    }
  }
}

template <typename T, int Bytes>
MLIFAST_ALWAYS_INLINE void combine_task(const T* const* inputs, int64_t n, const T* scales, const T* shift,
                                        const Layout& L, bool relu, int64_t begin, int64_t end, T* y) {
  if (relu) combine_span<T, Bytes, true>(inputs, n, scales, shift, L, begin, end, y);
  else combine_span<T, Bytes, false>(inputs, n, scales, shift, L, begin, end, y);
}
MLIFAST_FOR_EACH_WIDTH(combine_task,
                       (const T* const* inputs, int64_t n, const T* scales, const T* shift, const Layout& L,
                        bool relu, int64_t begin, int64_t end, T* y),
                       (inputs, n, scales, shift, L, relu, begin, end, y))

template <typename T>
void moments(const at::Tensor& input, const Layout& L, at::Tensor& mean, at::Tensor& var) {
  const T* x = input.const_data_ptr<T>();
  const int64_t K = L.points, C = L.channels;
  const MomentTasks tasks = moment_tasks(L);
  std::vector<double> partials(K * tasks.per_point * 2 * C, 0.0);
  at::parallel_for(0, K * tasks.per_point, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (L.rows) rows_task_any<T>(x, L, tasks, t, partials.data() + t * 2 * C);
      else runs_task_any<T>(x, L, tasks, t, partials.data() + t * 2 * C);
    }
  });
  T* m = mean.data_ptr<T>();
  T* v = var.data_ptr<T>();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      double n = 0, point_mean = 0, m2 = 0;
      for (int64_t t = k * tasks.per_point; t < (k + 1) * tasks.per_point; ++t) {
        const double* p = partials.data() + t * 2 * C;
        merge_moments(n, point_mean, m2, double(task_values(L, tasks, t)), p[c], p[C + c]);
      }
      m[k * C + c] = T(point_mean);
      v[k * C + c] = T(m2 < 0 ? 0.0 : m2 / n);  // (a block's M2 less its mean's rounding may be −ε; NaN stays)
    }
  }
}

std::tuple<at::Tensor, at::Tensor> channel_moments_cpu(const at::Tensor& input_, int64_t points) {
  at::Tensor input = input_;
  const Layout L = channel_layout(input, points, kMoments);
  TORCH_CHECK(input.device().is_cpu(), kMoments, "expected a CPU tensor, got one on ", input.device());
  MomentsOutputs o = moments_outputs(input, L);
  if (!o.empty) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "channel_moments", [&] { moments<scalar_t>(input, L, o.mean, o.var); });
  }
  return {o.mean, o.var};
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

at::Tensor channel_combine_cpu(at::TensorList inputs_, const at::Tensor& scales, const at::Tensor& shift,
                               bool relu) {
  CombineOperands o = combine_operands(inputs_, scales, shift, kCombine);
  TORCH_CHECK(o.inputs[0].device().is_cpu(), kCombine, "expected CPU tensors, got inputs on ",
              o.inputs[0].device());
  const Layout& L = o.layout;
  at::Tensor y = combine_output(o);
  const int64_t spans = L.rows ? L.batch * L.positions : L.batch * L.channels;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, L.rows ? L.channels : L.positions));
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "channel_combine", [&] {
    std::vector<const scalar_t*> u;
    for (const at::Tensor& t : o.inputs) u.push_back(t.const_data_ptr<scalar_t>());
    const scalar_t *sc = o.scales.const_data_ptr<scalar_t>(), *sh = o.shift.const_data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, spans, grain, [&](int64_t begin, int64_t end) {
      combine_task_any<scalar_t>(u.data(), int64_t(u.size()), sc, sh, L, relu, begin, end, out);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mlifast, CPU, m) {
  m.impl("channel_moments", &channel_moments_cpu);
  m.impl("channel_affine", &channel_affine_cpu);
  m.impl("channel_combine", &channel_combine_cpu);
}

}  // namespace mlifast
