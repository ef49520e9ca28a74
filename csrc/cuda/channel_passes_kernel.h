// A batch norm's two passes over K points' rows on the GPU, free of torch (schemas of
// mlifast::channel_moments and channel_affine in csrc/ops.cpp).
//
// x holds K points of B entries each, C channels and S positions per entry and channel,
// in one of two layouts: `rows` — (K·B·S, C), rows of C contiguous values (channels-last
// images, (N, C)); otherwise (K·B, C, S) contiguous. Pointers are device pointers of one
// dtype (Float32 or Float64; DType from multipoint_linear_kernel.h).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "multipoint_linear_kernel.h"

namespace mlifast::cuda {

// The float64 workspace `launch_channel_moments` needs, in elements.
int64_t channel_moments_workspace(int64_t K, int64_t B, int64_t C, int64_t S, bool rows);

// mean, var: (K, C), each point's per-channel mean and biased variance (Welford's update
// per thread, pieces merged in float64 in a fixed order: the same bits on every run).
// `workspace` holds channel_moments_workspace(...) doubles.
cudaError_t launch_channel_moments(DType dtype, const void* x, bool rows, int64_t K, int64_t B, int64_t C, int64_t S,
                                   double* workspace, void* mean, void* var, cudaStream_t stream);

// y = x·scale[k, c] + shift[k, c] (+ addend, in x's layout; null: none), then max(y, 0)
// (NaN kept) if `relu`; scale, shift: (K, C); y in x's layout.
cudaError_t launch_channel_affine(DType dtype, const void* x, const void* addend, const void* scale,
                                  const void* shift, bool rows, bool relu, int64_t K, int64_t B, int64_t C, int64_t S,
                                  void* y, cudaStream_t stream);

}  // namespace mlifast::cuda
