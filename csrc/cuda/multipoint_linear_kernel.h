// Multi-point linear layer on the GPU, free of torch: K points of weight space in one launch.
//
//   y[k, r, o] = sum_i x[k, r, i] * (W[o, i] + sum_j c[k, j] * D[j, o, i])
//                + (b[o] + sum_j c[k, j] * db[j, o])
//
// All pointers are device pointers to contiguous row-major arrays of one dtype:
//   x: (K, R, I), or (R, I) when shared_input (the same rows for every point)
//   W: (O, I)    b: (O,) or nullptr    D: (J, O, I)    db: (J, O) or nullptr
//   c: (K, J)    y: (K, R, O), written
// A nullptr bias or bias direction means zero.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace mlifast::cuda {

enum class DType { Float32, Float64, Float16, BFloat16 };

// Enqueues the computation on `stream` and returns cudaGetLastError(); returns cudaSuccess
// without launching when the output is empty (K, R or O is zero).
cudaError_t launch_multipoint_linear(DType dtype, const void* x, bool shared_input, const void* W,
                                     const void* b, const void* D, const void* db, const void* c,
                                     void* y, int64_t K, int64_t R, int64_t I, int64_t O, int64_t J,
                                     cudaStream_t stream);

// The same on the tensor cores (multipoint_linear_mma.cu) for Float16, BFloat16, and Float32
// rounded to TF32; c is float32 whatever the dtype. Needs compute capability 8.0 or newer;
// returns cudaErrorInvalidValue for Float64. With `partial` null it writes y; otherwise
// `partial` is a zeroed float32 (K, R, O) buffer that receives y (bias included) and y is
// not touched: the input dimension is then split over up to ~4 blocks per multiprocessor
// (`sm_count` of them), for the few-rows case where output tiles alone cannot fill the GPU.
cudaError_t launch_multipoint_linear_tensor_cores(DType dtype, const void* x, bool shared_input,
                                                  const void* W, const void* b, const void* D,
                                                  const void* db, const float* c, void* y,
                                                  float* partial, int64_t K, int64_t R, int64_t I,
                                                  int64_t O, int64_t J, int sm_count,
                                                  cudaStream_t stream);

}  // namespace mlifast::cuda
