// Multi-point linear layer: a tiled SIMT GEMM with a fused weight prologue.
//
//   y[k, r, o] = sum_i x[k, r, i] * (W[o, i] + sum_j c[k, j] * D[j, o, i])
//                + (b[o] + sum_j c[k, j] * db[j, o])
//
// x: (K, R, I) or shared (R, I); W: (O, I); b: (O,) or null; D: (J, O, I); db: (J, O) or null;
// c: (K, J); y: (K, R, O). A block owns a kTileR x kTileO tile of y for one point k. For each
// kTileI slice of the input dimension it stages the x tile and the point's weight tile
// W + sum_j c[k, j] * D_j in shared memory (each D_j tile read once), then every thread
// accumulates a kPerThread x kPerThread register block. The bias combine is the epilogue.
// Accumulation is in float for float32/half/bfloat16 and in double for float64.
#include "multipoint_linear_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace mlifast::cuda {
namespace {

constexpr int kTileR = 64;    // rows of x / y per block
constexpr int kTileO = 64;    // outputs per block
constexpr int kTileI = 16;    // input slice staged per step
constexpr int kPerThread = 4; // each thread owns kPerThread rows x kPerThread outputs
constexpr int kThreadsR = kTileR / kPerThread;
constexpr int kThreadsO = kTileO / kPerThread;
constexpr int kThreads = kThreadsR * kThreadsO;
constexpr int kXLoads = kTileR * kTileI / kThreads;
constexpr int kWLoads = kTileO * kTileI / kThreads;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxGridX = 2147483647;

static_assert(kTileR * kTileI % kThreads == 0 && kTileO * kTileI % kThreads == 0,
              "tile loads must split evenly over the threads");
static_assert(kThreads % kTileI == 0, "a thread must load the same column of every row it loads");

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccType<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Grid: x over row tiles, y over output tiles, z over points; each axis is strided so that
// a grid clamped to the hardware limits still covers everything.
template <typename T>
__global__ void __launch_bounds__(kThreads)
multipoint_linear_kernel(const T* __restrict__ x, int64_t x_point_stride, const T* __restrict__ W,
                         const T* __restrict__ b, const T* __restrict__ D,
                         const T* __restrict__ db, const T* __restrict__ c, T* __restrict__ y,
                         int64_t K, int64_t R, int64_t I, int64_t O, int64_t J) {
  using Acc = typename AccType<T>::type;
  // +1 column of padding spreads the transposing stores over the banks.
  __shared__ Acc xs[kTileI][kTileR + 1];
  __shared__ Acc ws[kTileI][kTileO + 1];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kThreadsO;
  const int ty = tid / kThreadsO;
  // Tile loads: lanes walk the contiguous input dimension; element l of a thread sits in
  // tile row (tid + l * kThreads) / kTileI, and every element of a thread shares one column.
  const int load_col = tid % kTileI;
  const int load_row = tid / kTileI;
  constexpr int kLoadRowStep = kThreads / kTileI;
  const int64_t OI = O * I;

  for (int64_t k = blockIdx.z; k < K; k += gridDim.z) {
    const T* xk = x + k * x_point_stride;
    const T* ck = c + k * J;
    for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileR; r0 < R;
         r0 += static_cast<int64_t>(gridDim.x) * kTileR) {
      for (int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTileO; o0 < O;
           o0 += static_cast<int64_t>(gridDim.y) * kTileO) {
        Acc acc[kPerThread][kPerThread];
#pragma unroll
        for (int p = 0; p < kPerThread; ++p)
#pragma unroll
          for (int q = 0; q < kPerThread; ++q) acc[p][q] = Acc(0);

        for (int64_t i0 = 0; i0 < I; i0 += kTileI) {
          const int64_t i = i0 + load_col;
          const bool i_ok = i < I;

#pragma unroll
          for (int l = 0; l < kXLoads; ++l) {
            const int rr = load_row + l * kLoadRowStep;
            const int64_t r = r0 + rr;
            xs[load_col][rr] = (i_ok && r < R) ? to_acc(xk[r * I + i]) : Acc(0);
          }

          Acc w[kWLoads];
          int64_t w_off[kWLoads];
          bool w_ok[kWLoads];
#pragma unroll
          for (int l = 0; l < kWLoads; ++l) {
            const int64_t o = o0 + load_row + l * kLoadRowStep;
            w_ok[l] = i_ok && o < O;
            w_off[l] = o * I + i;
            w[l] = w_ok[l] ? to_acc(W[w_off[l]]) : Acc(0);
          }
          for (int64_t j = 0; j < J; ++j) {
            const Acc cj = to_acc(ck[j]);
            const T* Dj = D + j * OI;
#pragma unroll
            for (int l = 0; l < kWLoads; ++l)
              if (w_ok[l]) w[l] += cj * to_acc(Dj[w_off[l]]);
          }
#pragma unroll
          for (int l = 0; l < kWLoads; ++l) ws[load_col][load_row + l * kLoadRowStep] = w[l];

          __syncthreads();
#pragma unroll
          for (int kk = 0; kk < kTileI; ++kk) {
            Acc xv[kPerThread];
            Acc wv[kPerThread];
            // Strided ownership (ty + p * kThreadsR): a warp's shared-memory reads are
            // broadcasts or consecutive words, and its stores of y are contiguous runs.
#pragma unroll
            for (int p = 0; p < kPerThread; ++p) xv[p] = xs[kk][ty + p * kThreadsR];
#pragma unroll
            for (int q = 0; q < kPerThread; ++q) wv[q] = ws[kk][tx + q * kThreadsO];
#pragma unroll
            for (int p = 0; p < kPerThread; ++p)
#pragma unroll
              for (int q = 0; q < kPerThread; ++q) acc[p][q] += xv[p] * wv[q];
          }
          __syncthreads();
        }

#pragma unroll
        for (int q = 0; q < kPerThread; ++q) {
          const int64_t o = o0 + tx + q * kThreadsO;
          if (o >= O) continue;
          Acc bias = b != nullptr ? to_acc(b[o]) : Acc(0);
          if (db != nullptr)
            for (int64_t j = 0; j < J; ++j) bias += to_acc(ck[j]) * to_acc(db[j * O + o]);
#pragma unroll
          for (int p = 0; p < kPerThread; ++p) {
            const int64_t r = r0 + ty + p * kThreadsR;
            if (r < R) y[(k * R + r) * O + o] = from_acc<T>(acc[p][q] + bias);
          }
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch_typed(const void* x, bool shared_input, const void* W, const void* b,
                         const void* D, const void* db, const void* c, void* y, int64_t K,
                         int64_t R, int64_t I, int64_t O, int64_t J, cudaStream_t stream) {
  const int64_t row_tiles = (R + kTileR - 1) / kTileR;
  const int64_t out_tiles = (O + kTileO - 1) / kTileO;
  const dim3 grid(static_cast<unsigned>(std::min(row_tiles, kMaxGridX)),
                  static_cast<unsigned>(std::min(out_tiles, kMaxGridYZ)),
                  static_cast<unsigned>(std::min(K, kMaxGridYZ)));
  multipoint_linear_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x), shared_input ? 0 : R * I, static_cast<const T*>(W),
      static_cast<const T*>(b), static_cast<const T*>(D), static_cast<const T*>(db),
      static_cast<const T*>(c), static_cast<T*>(y), K, R, I, O, J);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_multipoint_linear(DType dtype, const void* x, bool shared_input, const void* W,
                                     const void* b, const void* D, const void* db, const void* c,
                                     void* y, int64_t K, int64_t R, int64_t I, int64_t O, int64_t J,
                                     cudaStream_t stream) {
  if (K < 0 || R < 0 || I < 0 || O < 0 || J < 0) return cudaErrorInvalidValue;
  if (K == 0 || R == 0 || O == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return launch_typed<float>(x, shared_input, W, b, D, db, c, y, K, R, I, O, J, stream);
    case DType::Float64:
      return launch_typed<double>(x, shared_input, W, b, D, db, c, y, K, R, I, O, J, stream);
    case DType::Float16:
      return launch_typed<__half>(x, shared_input, W, b, D, db, c, y, K, R, I, O, J, stream);
    case DType::BFloat16:
      return launch_typed<__nv_bfloat16>(x, shared_input, W, b, D, db, c, y, K, R, I, O, J,
                                         stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mlifast::cuda
