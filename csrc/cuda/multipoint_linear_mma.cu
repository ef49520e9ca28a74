// Multi-point linear layer on the tensor cores (WMMA), for float16, bfloat16 and float32 as
// TF32. Same contract as multipoint_linear_kernel.h:
//
//   y[k, r, o] = sum_i x[k, r, i] * (W[o, i] + sum_j c[k, j] * D[j, o, i])
//                + (b[o] + sum_j c[k, j] * db[j, o])
//
// A block owns kBlockOut outputs and kBlockRows rows, the rows being `points` points x
// rows_per_tile rows of each (4 points of 16 rows when points have few rows, 1 point of 64
// rows when they have many). For each kSliceI slice of the input dimension it reads the W
// and D_j tiles ONCE, forms every one of its points' weight tiles W + sum_j c[k, j] * D_j in
// float, rounds each once to the operand type in shared memory, and runs the warps' 16x16
// fragments against them; the next slice's loads are in flight meanwhile. Bias and the bias
// combine are the epilogue. Accumulation is in float.
//
// Grid: x walks (point group, row tile) fastest, so the blocks resident at one time share
// output tiles and read W and D from L2 after the first of them; y walks output tiles; z
// splits the input dimension when the caller gives a float32 buffer to add partial sums
// into (few rows in all: without the split, output tiles alone cannot fill the GPU).
#include "multipoint_linear_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>

namespace mlifast::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBlockRows = 64;
constexpr int kBlockOut = 64;
constexpr int kSliceI = 32;
constexpr int kMaxPoints = 4;  // kBlockRows / 16, the smallest rows_per_tile
constexpr int kWarps = 4;      // 2 x 2 warps, each 32 rows x 32 outputs (2 x 2 fragments)
constexpr int kThreads = kWarps * 32;
constexpr int kFrag = 16;
constexpr int kChunk = 8;  // consecutive input elements a thread loads at once
constexpr int kChunksPerThread = kBlockOut * kSliceI / kChunk / kThreads;
constexpr int kXChunksPerThread = kBlockRows * kSliceI / kChunk / kThreads;
constexpr int kPrefetchDirs = 2;  // directions whose next tiles are loaded ahead (a line, a plane)
constexpr int kEpilogueLd = kBlockOut + 4;
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

static_assert(kBlockOut * kSliceI % (kChunk * kThreads) == 0, "weight tile chunks split evenly");
static_assert(kBlockRows * kSliceI % (kChunk * kThreads) == 0, "input tile chunks split evenly");

// Operand type in shared memory and the WMMA fragment element type for each dtype.
template <typename T> struct Mma;
template <> struct Mma<__half> {
  using Smem = __half;
  using Elem = __half;
  static constexpr int kStep = 16;
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Mma<__nv_bfloat16> {
  using Smem = __nv_bfloat16;
  using Elem = __nv_bfloat16;
  static constexpr int kStep = 16;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Mma<float> {
  using Smem = float;
  using Elem = wmma::precision::tf32;
  static constexpr int kStep = 8;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

// Shared memory: row strides padded by 16 bytes, which keeps fragment loads off one bank and
// every fragment start 32-byte aligned (WMMA's requirement); the epilogue reuses it all.
template <typename T> struct Layout {
  static constexpr int kSmemSize = static_cast<int>(sizeof(typename Mma<T>::Smem));
  static constexpr int kLd = kSliceI + 16 / kSmemSize;
  static constexpr int kXTileBytes = kBlockRows * kLd * kSmemSize;
  static constexpr int kWTilesBytes = kMaxPoints * kBlockOut * kLd * kSmemSize;
  static constexpr int kEpilogueBytes = kBlockRows * kEpilogueLd * static_cast<int>(sizeof(float));
  static constexpr int kBytes = kXTileBytes + kWTilesBytes > kEpilogueBytes
                                    ? kXTileBytes + kWTilesBytes : kEpilogueBytes;
  static_assert(kBytes <= 48 * 1024, "static shared memory is limited to 48 KiB");
};

// Reads kChunk consecutive elements src[0..kChunk), zero past `valid`; one or two 16-byte
// loads when `vector` (the caller guarantees alignment and a whole chunk).
template <typename T>
__device__ __forceinline__ void fetch(const T* src, int valid, bool vector, T (&out)[kChunk]) {
  if (vector && valid == kChunk) {
    constexpr int kVectors = kChunk * static_cast<int>(sizeof(T)) / 16;
#pragma unroll
    for (int v = 0; v < kVectors; ++v)
      reinterpret_cast<uint4*>(out)[v] = __ldg(reinterpret_cast<const uint4*>(src) + v);
  } else {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) out[e] = e < valid ? src[e] : Mma<T>::from_float(0.0f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
multipoint_linear_mma_kernel(const T* __restrict__ x, bool shared_input, const T* __restrict__ W,
                             const T* __restrict__ b, const T* __restrict__ D,
                             const T* __restrict__ db, const float* __restrict__ c,
                             T* __restrict__ y, float* __restrict__ partial, int64_t K, int64_t R,
                             int64_t I, int64_t O, int64_t J, int rows_per_tile, bool vector_loads,
                             int64_t split_width) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using S = typename Mma<T>::Smem;
  using Elem = typename Mma<T>::Elem;
  constexpr int kLd = Layout<T>::kLd;
  constexpr int kStep = Mma<T>::kStep;
  __shared__ __align__(128) unsigned char smem[Layout<T>::kBytes];
  S* xs = reinterpret_cast<S*>(smem);                          // [kBlockRows][kLd]
  S* ws = reinterpret_cast<S*>(smem + Layout<T>::kXTileBytes);      // [kMaxPoints][kBlockOut][kLd]
  float* out = reinterpret_cast<float*>(smem);                 // [kBlockRows][kEpilogueLd], after the loop

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int warp_row = (warp / 2) * 32;
  const int warp_out = (warp % 2) * 32;
  const int points = kBlockRows / rows_per_tile;
  const int64_t row_tiles = (R + rows_per_tile - 1) / rows_per_tile;
  const int64_t groups = (K + points - 1) / points;
  const int64_t OI = O * I;
  // Split-K: block z sums the inputs [i_begin, i_end) and adds its share into `partial`.
  const int64_t i_begin = static_cast<int64_t>(blockIdx.z) * split_width;
  const int64_t i_end = i_begin + split_width < I ? i_begin + split_width : I;

  for (int64_t o0 = static_cast<int64_t>(blockIdx.y) * kBlockOut; o0 < O;
       o0 += static_cast<int64_t>(gridDim.y) * kBlockOut) {
    for (int64_t tile = blockIdx.x; tile < groups * row_tiles; tile += gridDim.x) {
      const int64_t k0 = (tile / row_tiles) * points;
      const int64_t r0 = (tile % row_tiles) * rows_per_tile;

      wmma::fragment<wmma::accumulator, kFrag, kFrag, kStep, float> acc[2][2];
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int n = 0; n < 2; ++n) wmma::fill_fragment(acc[a][n], 0.0f);

      // The next slice as read from memory (zeros out of bounds): its loads are issued
      // before the tensor cores work on the current slice.
      T x_next[kXChunksPerThread][kChunk];
      T w_next[kChunksPerThread][kChunk];
      T d_next[kChunksPerThread][kPrefetchDirs][kChunk];
      // Row m of the block is row r0 + m % rows_per_tile of point k0 + m / rows_per_tile.
      const auto x_chunk = [&](int q, int& m, int& col) {
        const int chunk = tid + q * kThreads;
        m = chunk / (kSliceI / kChunk);
        col = (chunk % (kSliceI / kChunk)) * kChunk;
      };
      const auto w_chunk = [&](int q, int64_t i0, int& n, int& col, int& valid) {
        const int chunk = tid + q * kThreads;
        n = chunk / (kSliceI / kChunk);
        col = (chunk % (kSliceI / kChunk)) * kChunk;
        const int64_t left = i_end - (i0 + col);
        valid = (o0 + n < O && left > 0) ? static_cast<int>(left < kChunk ? left : kChunk) : 0;
        return (o0 + n) * I + i0 + col;
      };
      const auto fetch_slice = [&](int64_t i0) {
#pragma unroll
        for (int q = 0; q < kXChunksPerThread; ++q) {
          int m, col;
          x_chunk(q, m, col);
          const int64_t k = k0 + m / rows_per_tile;
          const int64_t r = r0 + m % rows_per_tile;
          const int64_t left = i_end - (i0 + col);
          const int valid = (k < K && r < R && left > 0) ? static_cast<int>(left < kChunk ? left : kChunk) : 0;
          fetch(x + (shared_input ? 0 : k * R * I) + r * I + i0 + col, valid, vector_loads, x_next[q]);
        }
#pragma unroll
        for (int q = 0; q < kChunksPerThread; ++q) {
          int n, col, valid;
          const int64_t offset = w_chunk(q, i0, n, col, valid);
          fetch(W + offset, valid, vector_loads, w_next[q]);
#pragma unroll
          for (int j = 0; j < kPrefetchDirs; ++j)
            if (j < J) fetch(D + j * OI + offset, valid, vector_loads, d_next[q][j]);
        }
      };
      if (i_begin < i_end) fetch_slice(i_begin);

      for (int64_t i0 = i_begin; i0 < i_end; i0 += kSliceI) {
#pragma unroll
        for (int q = 0; q < kXChunksPerThread; ++q) {
          int m, col;
          x_chunk(q, m, col);
#pragma unroll
          for (int e = 0; e < kChunk; ++e) xs[m * kLd + col + e] = x_next[q][e];
        }

        // Every point's weight tile W + sum_j c[k, j] D_j, formed in float from one read.
#pragma unroll
        for (int q = 0; q < kChunksPerThread; ++q) {
          int n, col, valid;
          const int64_t offset = w_chunk(q, i0, n, col, valid);
          float wk[kMaxPoints][kChunk];
#pragma unroll
          for (int p = 0; p < kMaxPoints; ++p)
#pragma unroll
            for (int e = 0; e < kChunk; ++e) wk[p][e] = Mma<T>::to_float(w_next[q][e]);
          const auto add_direction = [&](int64_t j, const T (&d)[kChunk]) {
#pragma unroll
            for (int p = 0; p < kMaxPoints; ++p) {
              if (p >= points || k0 + p >= K) continue;
              const float cj = c[(k0 + p) * J + j];
#pragma unroll
              for (int e = 0; e < kChunk; ++e) wk[p][e] += cj * Mma<T>::to_float(d[e]);
            }
          };
#pragma unroll
          for (int j = 0; j < kPrefetchDirs; ++j)
            if (j < J) add_direction(j, d_next[q][j]);
          for (int64_t j = kPrefetchDirs; j < J; ++j) {
            T d[kChunk];
            fetch(D + j * OI + offset, valid, vector_loads, d);
            add_direction(j, d);
          }
#pragma unroll
          for (int p = 0; p < kMaxPoints; ++p) {
            if (p >= points) continue;
#pragma unroll
            for (int e = 0; e < kChunk; ++e)
              ws[(p * kBlockOut + n) * kLd + col + e] = Mma<T>::from_float(wk[p][e]);
          }
        }
        __syncthreads();
        if (i0 + kSliceI < i_end) fetch_slice(i0 + kSliceI);

#pragma unroll
        for (int kk = 0; kk < kSliceI; kk += kStep) {
#pragma unroll
          for (int a = 0; a < 2; ++a) {
            const int row = warp_row + a * kFrag;
            const int point = row / rows_per_tile;
            wmma::fragment<wmma::matrix_a, kFrag, kFrag, kStep, Elem, wmma::row_major> xf;
            wmma::load_matrix_sync(xf, xs + row * kLd + kk, kLd);
            if constexpr (sizeof(S) == 4) {
#pragma unroll
              for (int t = 0; t < xf.num_elements; ++t) xf.x[t] = wmma::__float_to_tf32(xf.x[t]);
            }
#pragma unroll
            for (int n = 0; n < 2; ++n) {
              // B (input x output) is the weight tile read column-major: ws[point][out][in].
              wmma::fragment<wmma::matrix_b, kFrag, kFrag, kStep, Elem, wmma::col_major> wf;
              wmma::load_matrix_sync(wf, ws + (point * kBlockOut + warp_out + n * kFrag) * kLd + kk, kLd);
              if constexpr (sizeof(S) == 4) {
#pragma unroll
                for (int t = 0; t < wf.num_elements; ++t) wf.x[t] = wmma::__float_to_tf32(wf.x[t]);
              }
              wmma::mma_sync(acc[a][n], xf, wf, acc[a][n]);
            }
          }
        }
        __syncthreads();
      }

      // Epilogue: fragments through shared memory, then coalesced stores with the bias.
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int n = 0; n < 2; ++n)
          wmma::store_matrix_sync(out + (warp_row + a * kFrag) * kEpilogueLd + warp_out + n * kFrag,
                                  acc[a][n], kEpilogueLd, wmma::mem_row_major);
      __syncthreads();
      for (int idx = tid; idx < kBlockRows * kBlockOut; idx += kThreads) {
        const int m = idx / kBlockOut;
        const int n = idx % kBlockOut;
        const int64_t k = k0 + m / rows_per_tile;
        const int64_t r = r0 + m % rows_per_tile;
        const int64_t o = o0 + n;
        if (k >= K || r >= R || o >= O) continue;
        float v = out[m * kEpilogueLd + n];
        if (b != nullptr && blockIdx.z == 0) {
          v += Mma<T>::to_float(b[o]);
          if (db != nullptr)
            for (int64_t j = 0; j < J; ++j) v += c[k * J + j] * Mma<T>::to_float(db[j * O + o]);
        }
        if (partial != nullptr) {
          atomicAdd(partial + (k * R + r) * O + o, v);
        } else {
          y[(k * R + r) * O + o] = Mma<T>::from_float(v);
        }
      }
      __syncthreads();
    }
  }
#else
  __trap();  // the launcher refuses devices below compute capability 8.0
#endif
}

template <typename T>
cudaError_t launch_typed(const void* x, bool shared_input, const void* W, const void* b,
                         const void* D, const void* db, const float* c, void* y, float* partial,
                         int64_t K, int64_t R, int64_t I, int64_t O, int64_t J, int sm_count,
                         cudaStream_t stream) {
  const int rows_per_tile = R <= 16 ? 16 : (R <= 32 ? 32 : 64);
  const int points = kBlockRows / rows_per_tile;
  const int64_t tiles = std::min((K + points - 1) / points * ((R + rows_per_tile - 1) / rows_per_tile), kMaxGridX);
  const int64_t out_tiles = std::min((O + kBlockOut - 1) / kBlockOut, kMaxGridY);
  // With a partial-sum buffer, split the input dimension until there are about four blocks
  // per multiprocessor, keeping at least four slices per block.
  const int64_t slices = std::max<int64_t>(1, (I + kSliceI - 1) / kSliceI);
  int64_t splits = 1;
  if (partial != nullptr) {
    const int64_t wanted = (4 * static_cast<int64_t>(sm_count) + tiles * out_tiles - 1) / (tiles * out_tiles);
    splits = std::max<int64_t>(1, std::min({wanted, slices / 4, kMaxGridY}));
  }
  const int64_t split_width = (slices + splits - 1) / splits * kSliceI;
  splits = (std::max<int64_t>(I, 1) + split_width - 1) / split_width;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(out_tiles), static_cast<unsigned>(splits));
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vector_loads = I % kChunk == 0 && aligned(x) && aligned(W) && aligned(D);
  multipoint_linear_mma_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x), shared_input, static_cast<const T*>(W), static_cast<const T*>(b),
      static_cast<const T*>(D), static_cast<const T*>(db), c, static_cast<T*>(y), partial, K, R, I,
      O, J, rows_per_tile, vector_loads, split_width);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_multipoint_linear_tensor_cores(DType dtype, const void* x, bool shared_input,
                                                  const void* W, const void* b, const void* D,
                                                  const void* db, const float* c, void* y,
                                                  float* partial, int64_t K, int64_t R, int64_t I,
                                                  int64_t O, int64_t J, int sm_count,
                                                  cudaStream_t stream) {
  if (K < 0 || R < 0 || I < 0 || O < 0 || J < 0) return cudaErrorInvalidValue;
  if (K == 0 || R == 0 || O == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return launch_typed<float>(x, shared_input, W, b, D, db, c, y, partial, K, R, I, O, J, sm_count, stream);
    case DType::Float16:
      return launch_typed<__half>(x, shared_input, W, b, D, db, c, y, partial, K, R, I, O, J, sm_count, stream);
    case DType::BFloat16:
      return launch_typed<__nv_bfloat16>(x, shared_input, W, b, D, db, c, y, partial, K, R, I, O, J,
                                         sm_count, stream);
    case DType::Float64:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace mlifast::cuda
