// A batch norm's two passes over K points' rows (see channel_passes_kernel.h).
//
// Moments, in two launches without atomics (the same bits on every run):
//   1. each block takes one slice of one point's values of one channel (runs) or of a tile
//      of channels (rows); each thread keeps Welford's running mean and M2 in the input's
//      dtype over pieces of at most kFlush values, less each piece's first value, merged
//      into float64 (Chan, Golub and LeVeque);
//      the block merges its threads' moments in a fixed order into the workspace;
//   2. one thread per point and channel merges its slices in order: mean and biased
//      variance. Welford's update keeps each piece's deviations about its running mean,
//      and the shift by the piece's first value keeps that mean small: a mean far from
//      zero costs float32 little (a numpy simulation: 5e-7 at an offset of 1e4 σ).
// Rows of C values are read a warp across the channels (coalesced); runs of S values a
// warp along the run.
// Affine: one thread per value, a grid-stride loop.
#include "channel_passes_kernel.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace mlifast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kFlush = 64;           // values a thread takes in the input's dtype before float64
constexpr int kValuesPerThread = 64;  // a slice: about this many values per thread

struct Geometry {
  int64_t C, M;           // channels; values per point and channel (B·S)
  int64_t B, S;           // entries per point; positions per entry and channel
  int channel_tile;       // rows: channels per block (≤ kThreads)
  int rows_per_step;      // rows: kThreads / channel_tile
  int64_t rows_per_slice; // rows: rows a block covers
  int64_t runs_per_slice; // runs: entries a block covers
  int64_t slices;         // per point (rows) or per point and channel (runs)
  int64_t tiles;          // rows: channel tiles
};

Geometry geometry(int64_t B, int64_t C, int64_t S, bool rows) {
  Geometry g{};
  g.C = C, g.B = B, g.S = S, g.M = B * S;
  if (rows) {
    g.channel_tile = static_cast<int>(std::min<int64_t>(C, kThreads));
    g.rows_per_step = kThreads / g.channel_tile;
    g.rows_per_slice = int64_t(g.rows_per_step) * kValuesPerThread;
    g.slices = std::max<int64_t>(1, (g.M + g.rows_per_slice - 1) / g.rows_per_slice);
    g.tiles = (C + g.channel_tile - 1) / g.channel_tile;
  } else {
    g.runs_per_slice = std::max<int64_t>(1, int64_t(kThreads) * kValuesPerThread / std::max<int64_t>(S, 1));
    g.slices = std::max<int64_t>(1, (B + g.runs_per_slice - 1) / g.runs_per_slice);
    g.tiles = 1;
  }
  return g;
}

// Merges the moments (count nb, mean_b, M2 m2_b) of a set into (n, mean, m2), float64.
__device__ __forceinline__ void merge(double& n, double& mean, double& m2, double nb, double mean_b, double m2_b) {
  if (nb == 0) return;
  const double total = n + nb, delta = mean_b - mean, share = nb / total;
  mean += delta * share;
  m2 += m2_b + delta * (delta * (n * share));  // (in this order: no inf · 0 while n = 0)
  n = total;
}

// One thread's moments: Welford's update in T of its values less the first of each piece
// of at most kFlush values (in float32 the running mean of the values themselves would be
// rounded to the ulp of their mean, not of their spread), each piece merged in float64.
template <typename T>
struct ThreadMoments {
  T pivot = T(0), count = T(0), mean = T(0), m2 = T(0);
  double n = 0, total_mean = 0, total_m2 = 0;

  __device__ void add(T v) {
    if (count == T(0)) pivot = v;
    const T shifted = v - pivot;
    count += T(1);
    const T delta = shifted - mean;
    mean += delta / count;
    m2 += delta * (shifted - mean);
    if (count == T(kFlush)) flush();
  }
  __device__ void flush() {
    merge(n, total_mean, total_m2, double(count), double(pivot) + double(mean), double(m2));
    count = mean = m2 = T(0);
  }
};

// Rows: block (point k, slice, channel tile); partials[(k·C + c)·slices + slice] =
// (count, mean, M2).
template <typename T>
__global__ void moments_rows(const T* __restrict__ x, Geometry g, double* __restrict__ partials) {
  __shared__ double sh_n[kThreads], sh_mean[kThreads], sh_m2[kThreads];
  const int64_t k = blockIdx.x / g.slices, slice = blockIdx.x % g.slices;
  const int t = threadIdx.x, lane_c = t % g.channel_tile, lane_r = t / g.channel_tile;
  const int64_t c = int64_t(blockIdx.y) * g.channel_tile + lane_c;
  const T* point = x + k * g.M * g.C;
  ThreadMoments<T> moments;
  if (lane_r < g.rows_per_step && c < g.C) {
    const int64_t first = slice * g.rows_per_slice;
    const int64_t last = first + g.rows_per_slice < g.M ? first + g.rows_per_slice : g.M;
    for (int64_t r = first + lane_r; r < last; r += g.rows_per_step) moments.add(point[r * g.C + c]);
  }
  moments.flush();
  sh_n[t] = moments.n, sh_mean[t] = moments.total_mean, sh_m2[t] = moments.total_m2;
  __syncthreads();
  if (t < g.channel_tile && c < g.C) {
    double n = 0, mean = 0, m2 = 0;
    for (int j = 0; j < g.rows_per_step; ++j) {
      const int i = t + j * g.channel_tile;
      merge(n, mean, m2, sh_n[i], sh_mean[i], sh_m2[i]);
    }
    double* out = partials + ((k * g.C + c) * g.slices + slice) * 3;
    out[0] = n, out[1] = mean, out[2] = m2;
  }
}

// Runs: block (point k, channel c, slice of entries).
template <typename T>
__global__ void moments_runs(const T* __restrict__ x, Geometry g, double* __restrict__ partials) {
  __shared__ double sh_n[kThreads], sh_mean[kThreads], sh_m2[kThreads];
  const int64_t kc = blockIdx.x / g.slices, slice = blockIdx.x % g.slices;
  const int64_t k = kc / g.C, c = kc % g.C;
  const int t = threadIdx.x;
  const T* channel = x + (k * g.B * g.C + c) * g.S;  // entry b's run at channel + b·C·S
  ThreadMoments<T> moments;
  const int64_t first = slice * g.runs_per_slice;
  const int64_t last = first + g.runs_per_slice < g.B ? first + g.runs_per_slice : g.B;
  for (int64_t b = first; b < last; ++b) {
    const T* run = channel + b * g.C * g.S;
    for (int64_t s = t; s < g.S; s += kThreads) moments.add(run[s]);
  }
  moments.flush();
  sh_n[t] = moments.n, sh_mean[t] = moments.total_mean, sh_m2[t] = moments.total_m2;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) merge(sh_n[t], sh_mean[t], sh_m2[t], sh_n[t + stride], sh_mean[t + stride], sh_m2[t + stride]);
    __syncthreads();
  }
  if (t == 0) {
    double* out = partials + (kc * g.slices + slice) * 3;
    out[0] = sh_n[0], out[1] = sh_mean[0], out[2] = sh_m2[0];
  }
}

// One thread per point and channel: its slices merged in order, then mean and biased variance.
template <typename T>
__global__ void moments_finish(Geometry g, int64_t K, const double* __restrict__ partials, T* __restrict__ mean,
                               T* __restrict__ var) {
  const int64_t kc = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kc >= K * g.C) return;
  double n = 0, m = 0, m2 = 0;
  for (int64_t slice = 0; slice < g.slices; ++slice) {
    const double* p = partials + (kc * g.slices + slice) * 3;
    merge(n, m, m2, p[0], p[1], p[2]);
  }
  const double v = m2 / n;
  mean[kc] = T(m);
  var[kc] = T(v < 0 ? 0.0 : v);  // (NaN stays NaN)
}

template <typename T>
__global__ void affine(const T* __restrict__ x, const T* __restrict__ addend, const T* __restrict__ scale,
                       const T* __restrict__ shift, bool rows, bool relu, int64_t n, int64_t C, int64_t S,
                       int64_t per_point, T* __restrict__ y) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = rows ? i % C : (i / S) % C, k = i / per_point;
    T v = x[i] * scale[k * C + c] + shift[k * C + c];
    if (addend != nullptr) v += addend[i];
    y[i] = relu && v < T(0) ? T(0) : v;
  }
}

template <typename T>
cudaError_t moments(const void* x, bool rows, int64_t K, int64_t B, int64_t C, int64_t S, double* workspace,
                    void* mean, void* var, cudaStream_t stream) {
  const Geometry g = geometry(B, C, S, rows);
  const T* xs = static_cast<const T*>(x);
  if (rows) {
    moments_rows<T><<<dim3(unsigned(K * g.slices), unsigned(g.tiles)), kThreads, 0, stream>>>(xs, g, workspace);
  } else {
    moments_runs<T><<<unsigned(K * C * g.slices), kThreads, 0, stream>>>(xs, g, workspace);
  }
  const int64_t threads = K * C;
  moments_finish<T><<<unsigned((threads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      g, K, workspace, static_cast<T*>(mean), static_cast<T*>(var));
  return cudaGetLastError();
}

}  // namespace

int64_t channel_moments_workspace(int64_t K, int64_t B, int64_t C, int64_t S, bool rows) {
  return K * C * geometry(B, C, S, rows).slices * 3;
}

cudaError_t launch_channel_moments(DType dtype, const void* x, bool rows, int64_t K, int64_t B, int64_t C, int64_t S,
                                   double* workspace, void* mean, void* var, cudaStream_t stream) {
  if (K * C == 0 || B * S == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return moments<float>(x, rows, K, B, C, S, workspace, mean, var, stream);
    case DType::Float64:
      return moments<double>(x, rows, K, B, C, S, workspace, mean, var, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_channel_affine(DType dtype, const void* x, const void* addend, const void* scale,
                                  const void* shift, bool rows, bool relu, int64_t K, int64_t B, int64_t C, int64_t S,
                                  void* y, cudaStream_t stream) {
  const int64_t n = K * B * C * S;
  if (n == 0) return cudaSuccess;
  const unsigned blocks = unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
  switch (dtype) {
    case DType::Float32:
      affine<float><<<blocks, kThreads, 0, stream>>>(
          static_cast<const float*>(x), static_cast<const float*>(addend), static_cast<const float*>(scale),
          static_cast<const float*>(shift), rows, relu, n, C, S, B * C * S, static_cast<float*>(y));
      break;
    case DType::Float64:
      affine<double><<<blocks, kThreads, 0, stream>>>(
          static_cast<const double*>(x), static_cast<const double*>(addend), static_cast<const double*>(scale),
          static_cast<const double*>(shift), rows, relu, n, C, S, B * C * S, static_cast<double*>(y));
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace mlifast::cuda
